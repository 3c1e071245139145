//! Listeners (LDS): the two capture listeners and one per service port.

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;

use super::clusters::{INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER, inbound_cluster_name};
use super::envoy::{
    ads_config_source, any, bool_value, network_filter, socket_address, tcp_proxy_filter, u32_value,
};
use super::rbac::{
    HTTP_RBAC_FILTER, http_rbac_deny_all, http_rbac_per_route, http_rbac_per_route_allow_all,
    network_rbac_filter,
};
use super::routes::tcp_destination;
use super::tls::{AccessMode, MeshConfig, MtlsMode, downstream_transport_socket};
use super::{
    INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, PodIpsByIdentity, ProxyResources,
    outbound_route_name, pod_identity_cluster_name,
};
use crate::index::{AccessGrant, AppProtocol, MeshModel, Workload, WorkloadPort};
use weft_crds::annotations::APP_PROBE_PORT;

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

fn hcm_filter(hcm: &HttpConnectionManager) -> Filter {
    network_filter("envoy.filters.network.http_connection_manager", hcm)
}

/// A one-address CIDR range.
fn cidr_of(ip: IpAddr) -> CidrRange {
    CidrRange {
        address_prefix: ip.to_string(),
        prefix_len: Some(u32_value(if ip.is_ipv4() { 32 } else { 128 })),
    }
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
/// destination; one non-binding listener per service ClusterIP and port. Connections
/// to a meshed pod's own IP (`pod_ips`, empty without an identity) go over mTLS to that
/// pod's identity; anything else passes through.
pub fn translate_outbound_listeners(
    model: &MeshModel,
    pod_ips: &PodIpsByIdentity,
    out: &mut ProxyResources,
) {
    // One chain per pod: a pod coming or going changes (and drains) only its own chain,
    // never the open connections to its peers.
    let mut chains = Vec::new();
    for ((ns, sa), ips) in pod_ips {
        let cluster = pod_identity_cluster_name(ns, sa);
        for ip in ips {
            chains.push(FilterChain {
                name: format!("outbound-pod|{ip}"),
                filter_chain_match: Some(FilterChainMatch {
                    prefix_ranges: vec![cidr_of(*ip)],
                    ..Default::default()
                }),
                filters: vec![tcp_proxy_filter(
                    &cluster,
                    tcp_proxy::ClusterSpecifier::Cluster(cluster.clone()),
                )],
                ..Default::default()
            });
        }
    }
    chains.sort_by(|a, b| a.name.cmp(&b.name));
    chains.push(FilterChain {
        name: PASSTHROUGH_CLUSTER.to_string(),
        filters: vec![tcp_proxy_filter(
            PASSTHROUGH_CLUSTER,
            tcp_proxy::ClusterSpecifier::Cluster(PASSTHROUGH_CLUSTER.to_string()),
        )],
        ..Default::default()
    });
    out.listeners.push(Listener {
        use_original_dst: Some(bool_value(true)),
        filter_chains: chains,
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

/// The filter that hands one inbound port's traffic to the app. Over mTLS the peer's
/// SPIFFE ID reaches the app in `x-forwarded-client-cert`; a plaintext client's copy of
/// that header is always removed, so it cannot claim an identity. `tcp_rbac` (grants,
/// in deny-by-default mode) guards TCP ports; HTTP ports are guarded per route.
fn inbound_filters(
    port: &WorkloadPort,
    mtls: bool,
    tcp_rbac: Option<(&[AccessGrant], &MeshConfig)>,
) -> Vec<Filter> {
    let cluster = inbound_cluster_name(port.port);
    match port.protocol {
        AppProtocol::Http => {
            // Routes come over RDS so that authorization (a per-route RBAC override)
            // changes for the next request, also on connections already open.
            let mut hcm = http_connection_manager(
                &format!("inbound_{}", port.port),
                http_connection_manager::RouteSpecifier::Rds(Rds {
                    config_source: Some(ads_config_source()),
                    route_config_name: inbound_route_name(port.port),
                }),
            );
            // Deny unless the route grants: the per-route rules replace this, in both
            // access modes, so the listener never changes with them.
            hcm.http_filters.insert(0, http_rbac_deny_all());
            if mtls {
                hcm.forward_client_cert_details =
                    http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32;
                hcm.set_current_client_cert_details =
                    Some(http_connection_manager::SetCurrentClientCertDetails {
                        uri: true,
                        ..Default::default()
                    });
            }
            vec![hcm_filter(&hcm)]
        }
        AppProtocol::Tcp => {
            let stat_prefix = format!("inbound_{}", port.port);
            let mut filters = Vec::new();
            if let Some((grants, config)) = tcp_rbac {
                filters.push(network_rbac_filter(
                    grants,
                    Some(port.port),
                    &config.trust_domain,
                    &stat_prefix,
                ));
            }
            filters.push(tcp_proxy_filter(
                &stat_prefix,
                tcp_proxy::ClusterSpecifier::Cluster(cluster),
            ));
            filters
        }
    }
}

/// Name of the route configuration of one inbound HTTP port.
pub fn inbound_route_name(port: u16) -> String {
    format!("inbound|{port}")
}

/// One route configuration per inbound HTTP port: everything to the app, with the
/// destination's authorization as a per-route RBAC override (TrafficTarget grants in
/// deny-by-default mode, everyone in permissive mode).
pub fn translate_inbound_routes(
    proxy: &Workload,
    grants: &[AccessGrant],
    config: &MeshConfig,
    out: &mut ProxyResources,
) {
    for port in proxy
        .inbound_ports
        .iter()
        .filter(|p| p.protocol == AppProtocol::Http)
    {
        let name = inbound_route_name(port.port);
        let rbac = match config.access {
            AccessMode::DenyByDefault => {
                http_rbac_per_route(grants, port.port, &config.trust_domain)
            }
            AccessMode::Permissive => http_rbac_per_route_allow_all(),
        };
        let typed_per_filter_config =
            std::collections::HashMap::from([(HTTP_RBAC_FILTER.to_string(), rbac)]);
        out.routes.push(RouteConfiguration {
            name: name.clone(),
            virtual_hosts: vec![VirtualHost {
                name,
                domains: vec!["*".to_string()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            inbound_cluster_name(port.port),
                        )),
                        ..Default::default()
                    })),
                    // One entry at most: protobuf maps encode in hash order.
                    typed_per_filter_config,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
    }
}

/// `virtualInbound` on 15006: per served port, a chain to the app on loopback.
///
/// With an identity: STRICT has one mTLS chain per port (plaintext fails the handshake);
/// PERMISSIVE has an mTLS chain and a plaintext chain per port, told apart by TLS
/// inspection. Ports no service exposes pass through (mTLS-terminated in STRICT).
pub fn translate_inbound_listener(
    proxy: &Workload,
    grants: &[AccessGrant],
    config: &MeshConfig,
    has_identity: bool,
    out: &mut ProxyResources,
) {
    let strict = has_identity && config.mtls == MtlsMode::Strict;
    let permissive = has_identity && config.mtls == MtlsMode::Permissive;
    // Deny by default: only TrafficTarget grants pass (callers without mTLS never match).
    let rbac = (config.access == AccessMode::DenyByDefault).then_some((grants, config));
    let mut chains = Vec::new();
    for port in &proxy.inbound_ports {
        let name = inbound_cluster_name(port.port);
        let chain = |transport_protocol: &str, mtls: bool| FilterChain {
            name: if transport_protocol.is_empty() {
                name.clone()
            } else {
                format!("{name}|{transport_protocol}")
            },
            filter_chain_match: Some(FilterChainMatch {
                destination_port: Some(u32_value(u32::from(port.port))),
                transport_protocol: transport_protocol.to_string(),
                ..Default::default()
            }),
            filters: inbound_filters(port, mtls, rbac),
            transport_socket: mtls.then(|| downstream_transport_socket(config)),
            ..Default::default()
        };
        if permissive {
            chains.push(chain("tls", true));
            chains.push(chain("raw_buffer", false));
        } else {
            chains.push(chain("", strict));
        }
    }
    let mut listener_filters = vec![original_dst_filter()];
    if permissive {
        listener_filters.push(ListenerFilter {
            name: "envoy.filters.listener.tls_inspector".to_string(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(any(
                &TlsInspector::default(),
            ))),
            ..Default::default()
        });
    }
    out.listeners.push(Listener {
        filter_chains: chains,
        default_filter_chain: Some(FilterChain {
            name: INBOUND_PASSTHROUGH_CLUSTER.to_string(),
            filters: rbac
                .map(|(grants, config)| {
                    network_rbac_filter(
                        grants,
                        None,
                        &config.trust_domain,
                        INBOUND_PASSTHROUGH_CLUSTER,
                    )
                })
                .into_iter()
                .chain([tcp_proxy_filter(
                    INBOUND_PASSTHROUGH_CLUSTER,
                    tcp_proxy::ClusterSpecifier::Cluster(INBOUND_PASSTHROUGH_CLUSTER.to_string()),
                )])
                .collect(),
            transport_socket: strict.then(|| downstream_transport_socket(config)),
            ..Default::default()
        }),
        listener_filters,
        ..capture_listener(
            VIRTUAL_INBOUND,
            INBOUND_CAPTURE_PORT,
            TrafficDirection::Inbound,
        )
    });
}

/// Name of the listener answering the kubelet's rewritten app probes.
pub const APP_PROBES: &str = "weft-app-probes";

/// The kubelet's probes, rewritten by the injection webhook to the probe port, are
/// forwarded in plaintext to the app over loopback: the probe port bypasses the
/// inbound redirect, so STRICT mTLS does not apply to it.
pub fn translate_probe_listener(proxy: &Workload, out: &mut ProxyResources) {
    if proxy.probes.is_empty() {
        return;
    }
    let routes = proxy
        .probes
        .iter()
        .map(|probe| Route {
            name: probe.path.clone(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Path(probe.path.clone())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                    inbound_cluster_name(probe.port),
                )),
                prefix_rewrite: probe.target_path.clone(),
                ..Default::default()
            })),
            ..Default::default()
        })
        .collect();
    let hcm = http_connection_manager(
        APP_PROBES,
        http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
            name: APP_PROBES.to_string(),
            virtual_hosts: vec![VirtualHost {
                name: APP_PROBES.to_string(),
                domains: vec!["*".to_string()],
                routes,
                ..Default::default()
            }],
            ..Default::default()
        }),
    );
    out.listeners.push(Listener {
        name: APP_PROBES.to_string(),
        address: Some(socket_address(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            APP_PROBE_PORT,
        )),
        traffic_direction: TrafficDirection::Inbound as i32,
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(&hcm)],
            ..Default::default()
        }],
        ..Default::default()
    });
}
