//! Listeners (LDS): the two capture listeners and one per service port.

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;

use super::clusters::{INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER, inbound_cluster_name};
use super::envoy::{
    ads_config_source, any, bool_value, network_filter, socket_address, tcp_proxy_filter, u32_value,
};
use super::routes::tcp_destination;
use super::{INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, ProxyResources, outbound_route_name};
use crate::index::{AppProtocol, MeshModel, Workload};

/// Name of the listener that captures outbound connections.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Name of the listener that captures inbound connections.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

fn original_dst_filter() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(
            &OriginalDst {},
        ))),
        ..Default::default()
    }
}

fn http_connection_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(routes),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_string(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                any(&Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn hcm_filter(hcm: &HttpConnectionManager) -> envoy_types::pb::envoy::config::listener::v3::Filter {
    network_filter("envoy.filters.network.http_connection_manager", hcm)
}

fn capture_listener(name: &str, port: u16, direction: TrafficDirection) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        listener_filters: vec![original_dst_filter()],
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

/// `virtualOutbound` on 15001 hands connections to the listener of their original
/// destination; one non-binding listener per service ClusterIP and port.
pub fn translate_outbound_listeners(model: &MeshModel, out: &mut ProxyResources) {
    out.listeners.push(Listener {
        use_original_dst: Some(bool_value(true)),
        filter_chains: vec![FilterChain {
            filters: vec![tcp_proxy_filter(
                PASSTHROUGH_CLUSTER,
                tcp_proxy::ClusterSpecifier::Cluster(PASSTHROUGH_CLUSTER.to_string()),
            )],
            ..Default::default()
        }],
        ..capture_listener(
            VIRTUAL_OUTBOUND,
            OUTBOUND_CAPTURE_PORT,
            TrafficDirection::Outbound,
        )
    });
    for service in model.services.values() {
        let Some(ip) = service.cluster_ip else {
            continue;
        };
        for port in &service.ports {
            let name = format!("{ip}_{}", port.port);
            let filter = match port.protocol {
                AppProtocol::Http => hcm_filter(&http_connection_manager(
                    &format!("outbound_{name}"),
                    http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads_config_source()),
                        route_config_name: outbound_route_name(&service.key, port.port),
                    }),
                )),
                AppProtocol::Tcp => tcp_proxy_filter(
                    &format!("outbound_{name}"),
                    tcp_destination(service, port.port),
                ),
            };
            out.listeners.push(Listener {
                name: name.clone(),
                address: Some(socket_address(ip, port.port)),
                bind_to_port: Some(bool_value(false)),
                traffic_direction: TrafficDirection::Outbound as i32,
                filter_chains: vec![FilterChain {
                    filters: vec![filter],
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
    }
}

/// `virtualInbound` on 15006: one filter chain per served port, to the app on loopback.
pub fn translate_inbound_listener(proxy: &Workload, out: &mut ProxyResources) {
    let mut chains = Vec::new();
    for port in &proxy.inbound_ports {
        let cluster = inbound_cluster_name(port.port);
        let filter = match port.protocol {
            AppProtocol::Http => hcm_filter(&http_connection_manager(
                &format!("inbound_{}", port.port),
                http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
                    name: cluster.clone(),
                    virtual_hosts: vec![VirtualHost {
                        name: cluster.clone(),
                        domains: vec!["*".to_string()],
                        routes: vec![Route {
                            r#match: Some(RouteMatch {
                                path_specifier: Some(route_match::PathSpecifier::Prefix(
                                    "/".to_string(),
                                )),
                                ..Default::default()
                            }),
                            action: Some(route::Action::Route(RouteAction {
                                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                                    cluster.clone(),
                                )),
                                ..Default::default()
                            })),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            )),
            AppProtocol::Tcp => tcp_proxy_filter(
                &format!("inbound_{}", port.port),
                tcp_proxy::ClusterSpecifier::Cluster(cluster.clone()),
            ),
        };
        chains.push(FilterChain {
            name: cluster,
            filter_chain_match: Some(FilterChainMatch {
                destination_port: Some(u32_value(u32::from(port.port))),
                ..Default::default()
            }),
            filters: vec![filter],
            ..Default::default()
        });
    }
    out.listeners.push(Listener {
        filter_chains: chains,
        default_filter_chain: Some(FilterChain {
            name: INBOUND_PASSTHROUGH_CLUSTER.to_string(),
            filters: vec![tcp_proxy_filter(
                INBOUND_PASSTHROUGH_CLUSTER,
                tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH_CLUSTER.to_string()),
            )],
            ..Default::default()
        }),
        ..capture_listener(
            VIRTUAL_INBOUND,
            INBOUND_CAPTURE_PORT,
            TrafficDirection::Inbound,
        )
    });
}
