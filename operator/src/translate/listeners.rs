//! Listeners (LDS): the two capture listeners and one per service address and TCP or
//! undeclared port.
//!
//! Protocols (see `index::protocol`): declared HTTP and HTTP/2 ports of every service
//! share one connection manager per port number inside the outbound capture listener
//! (the address the app called picks the service's route table: a route scope keyed by
//! that address), a TCP port gets a TCP proxy, and an undeclared port both, chosen per
//! connection by inspecting its first bytes. Between sidecars the client side's choice travels in
//! ALPN: its HTTP connection pools offer `h2` (or `http/1.1`), its TCP proxy offers
//! nothing, so the server side picks the same handling without looking inside mTLS.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use envoy_types::pb::envoy::config::common::mutation_rules::v3::{HeaderMutation, header_mutation};
use envoy_types::pb::envoy::config::core::v3::{CidrRange, TrafficDirection};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, TypedExtensionConfig, header_value_option,
};
use envoy_types::pb::envoy::config::listener::v3::{
    AdditionalAddress, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
    listener_filter,
};
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use envoy_types::pb::envoy::config::route::v3::{
    ScopedRouteConfiguration, scoped_route_configuration,
};
use envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, ScopedRds, ScopedRoutes, http_connection_manager,
    scoped_routes,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
use envoy_types::pb::envoy::extensions::http::early_header_mutation::header_mutation::v3::HeaderMutation as EarlyHeaderMutation;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, SubstitutionFormatString, data_source, substitution_format_string,
};
use envoy_types::pb::envoy::extensions::filters::common::set_filter_state::v3::{
    FilterStateValue, filter_state_value,
};
use envoy_types::pb::envoy::extensions::filters::http::on_demand::v3::{OnDemand, OnDemandCds};
use envoy_types::pb::envoy::extensions::filters::network::set_filter_state::v3::Config as SetFilterStateConfig;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::TcpProxy;

use super::clusters::{
    INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER, POD_CLUSTER_PREFIX, inbound_cluster_name,
};
use super::envoy::{
    ads_config_source, any, bool_value, http_filter, network_filter, protobuf_duration,
    socket_address, tcp_proxy_filter, u32_value,
};
use super::http::{hcm_filter, http_connection_manager, no_timeout};
use super::rbac::{
    HTTP_RBAC_FILTER, http_rbac_deny_all, http_rbac_per_route, http_rbac_per_route_allow_all,
    network_rbac_filter,
};
use super::routes::tcp_destination;
use super::settings::{AccessMode, DEFAULT_DETECTION_TIMEOUT, MeshConfig, MtlsMode};
use super::telemetry::{Direction, access_logs, tracing};
use super::tls::downstream_transport_socket;
use super::{
    INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, OutboundShape, PodBlock, ProxyResources,
    outbound_route_name, treated_as,
};
use crate::index::{AccessGrant, AppProtocol, MeshService, RateLimitModel, Workload, WorkloadPort};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::XRateLimitHeadersRfcVersion;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use weft_crds::annotations::APP_PROBE_PORT;

/// The header the shared outbound connection manager writes the called address into
/// (`IP:PORT`, overwriting any the app sent) before it picks a route scope; every
/// outbound route table removes it before the request leaves.
pub const DESTINATION_HEADER: &str = "x-weft-dst";
/// Name of the scoped route configuration the outbound connection managers share.
const OUTBOUND_SCOPES: &str = "outbound";

/// Name of the listener that captures outbound connections.
pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
/// Name of the listener that captures inbound connections.
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

/// What the HTTP inspector reports for cleartext HTTP (HTTP/2 with prior knowledge is `h2c`).
const CLEARTEXT_HTTP: [&str; 3] = ["http/1.0", "http/1.1", "h2c"];
/// What a sidecar's HTTP connection pools offer in ALPN over mTLS.
const MESH_HTTP_ALPN: [&str; 2] = ["h2", "http/1.1"];

fn listener_filter<M: prost::Name>(name: &str, config: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(config))),
        ..Default::default()
    }
}

fn original_dst_filter() -> ListenerFilter {
    listener_filter("envoy.filters.listener.original_dst", &OriginalDst {})
}

fn http_inspector() -> ListenerFilter {
    listener_filter("envoy.filters.listener.http_inspector", &HttpInspector {})
}

fn tls_inspector() -> ListenerFilter {
    listener_filter(
        "envoy.filters.listener.tls_inspector",
        &TlsInspector::default(),
    )
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A binding listener on 0.0.0.0:`port`, also on [::]:`port` when `ipv6`.
fn wildcard_listener(name: &str, port: u16, direction: TrafficDirection, ipv6: bool) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        additional_addresses: if ipv6 {
            vec![AdditionalAddress {
                address: Some(socket_address(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)),
                ..Default::default()
            }]
        } else {
            Vec::new()
        },
        traffic_direction: direction as i32,
        ..Default::default()
    }
}

/// The address ranges of `blocks`.
fn cidrs(blocks: &[PodBlock]) -> Vec<CidrRange> {
    blocks
        .iter()
        .map(|(ip, len)| CidrRange {
            address_prefix: ip.to_string(),
            prefix_len: Some(u32_value(u32::from(*len))),
        })
        .collect()
}

/// `virtualOutbound` on 15001 (and `[::]:15001` with `ipv6`). A call to a service's
/// HTTP port (an address in one of `shape.service_blocks`, a port in
/// `shape.http_ports`) goes to that port's connection manager, which routes by the
/// address called (route scopes, one per ClusterIP and port). Other service ports have
/// listeners of their own, which this one hands their connections to. Calls to
/// addresses in `shape.pod_blocks` (ranges holding meshed pods) ask the control plane
/// for a cluster of their own when `on_demand` (delta xDS with an identity): mTLS to
/// that pod's identity, or plaintext if it has no sidecar; the cluster is named after
/// the address. Anything else passes through. So this listener grows with the ports
/// and address blocks in use, never with the number of services or pods, and a new
/// service changes it only when it brings a new port or block.
pub fn capture_outbound(
    shape: &OutboundShape,
    on_demand: bool,
    ipv6: bool,
    config: &MeshConfig,
) -> Listener {
    let mut chains = Vec::new();
    let pods = |name: String, port: Option<u16>| FilterChain {
        name,
        filter_chain_match: Some(FilterChainMatch {
            destination_port: port.map(|p| u32_value(u32::from(p))),
            prefix_ranges: cidrs(&shape.pod_blocks),
            ..Default::default()
        }),
        filters: vec![pod_cluster_filter(), on_demand_tcp_proxy()],
        ..Default::default()
    };
    let passthrough = |name: String, port: Option<u16>| FilterChain {
        name,
        filter_chain_match: port.map(|p| FilterChainMatch {
            destination_port: Some(u32_value(u32::from(p))),
            ..Default::default()
        }),
        filters: vec![tcp_proxy_filter(
            PASSTHROUGH_CLUSTER,
            tcp_proxy::ClusterSpecifier::Cluster(PASSTHROUGH_CLUSTER.to_string()),
        )],
        ..Default::default()
    };
    let with_pods = on_demand && !shape.pod_blocks.is_empty();
    if with_pods {
        chains.push(pods("pods".to_string(), None));
    }
    // A chain naming a port wins over every chain without one, so each HTTP port also
    // repeats the pod and passthrough chains for its other destinations.
    if !shape.service_blocks.is_empty() {
        for port in &shape.http_ports {
            chains.push(FilterChain {
                name: format!("http|{port}"),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(u32_value(u32::from(*port))),
                    prefix_ranges: cidrs(&shape.service_blocks),
                    ..Default::default()
                }),
                filters: vec![outbound_http_filter(*port, on_demand, config)],
                ..Default::default()
            });
            if with_pods {
                chains.push(pods(format!("pods|{port}"), Some(*port)));
            }
            chains.push(passthrough(
                format!("{PASSTHROUGH_CLUSTER}|{port}"),
                Some(*port),
            ));
        }
    }
    chains.push(passthrough(PASSTHROUGH_CLUSTER.to_string(), None));
    Listener {
        use_original_dst: Some(bool_value(true)),
        filter_chains: chains,
        listener_filters: vec![original_dst_filter()],
        ..wildcard_listener(
            VIRTUAL_OUTBOUND,
            OUTBOUND_CAPTURE_PORT,
            TrafficDirection::Outbound,
            ipv6,
        )
    }
}

/// Names the connection's cluster after its destination address (`pod|<ip>`), for
/// the TCP proxy to discover on demand.
fn pod_cluster_filter() -> Filter {
    network_filter(
        "envoy.filters.network.set_filter_state",
        &SetFilterStateConfig {
            on_new_connection: vec![FilterStateValue {
                key: Some(filter_state_value::Key::ObjectKey(
                    "envoy.tcp_proxy.cluster".to_string(),
                )),
                value: Some(filter_state_value::Value::FormatString(
                    SubstitutionFormatString {
                        format: Some(substitution_format_string::Format::TextFormatSource(
                            DataSource {
                                specifier: Some(data_source::Specifier::InlineString(format!(
                                    "{POD_CLUSTER_PREFIX}%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%"
                                ))),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

/// A TCP proxy whose cluster (named by the filter state) is fetched over ADS when the
/// proxy does not have it yet.
fn on_demand_tcp_proxy() -> Filter {
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &TcpProxy {
            stat_prefix: "outbound_pods".to_string(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                PASSTHROUGH_CLUSTER.to_string(),
            )),
            idle_timeout: Some(envoy_types::pb::google::protobuf::Duration::default()),
            on_demand: Some(tcp_proxy::OnDemand {
                odcds_config: Some(ads_config_source()),
                timeout: Some(protobuf_duration(ON_DEMAND_TIMEOUT)),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

/// The name of Envoy's local rate limit filter.
const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

/// A token bucket answering 429 with `x-ratelimit-*` headers when empty; `None`: the
/// inert filter-level configuration (no bucket, nothing limited).
fn local_rate_limit(limit: Option<&RateLimitModel>) -> LocalRateLimit {
    use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
    use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket};
    let all = || RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            ..Default::default()
        }),
        runtime_key: String::new(),
    };
    LocalRateLimit {
        stat_prefix: "inbound_rate_limit".to_string(),
        token_bucket: limit.map(|l| TokenBucket {
            max_tokens: l.burst,
            tokens_per_fill: Some(u32_value(l.tokens)),
            fill_interval: Some(protobuf_duration(l.interval)),
        }),
        filter_enabled: limit.map(|_| all()),
        filter_enforced: limit.map(|_| all()),
        enable_x_ratelimit_headers: XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        ..Default::default()
    }
}

fn local_rate_limit_filter() -> HttpFilter {
    http_filter(LOCAL_RATE_LIMIT_FILTER, &local_rate_limit(None))
}

fn fault_filter() -> HttpFilter {
    http_filter(
        super::routes::FAULT_FILTER,
        &envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault::default(),
    )
}

/// How long a connection to a pod IP waits for its cluster.
const ON_DEMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// An outbound connection manager: the inert fault filter (a route's TrafficPolicy
/// configures it; adding it later would replace the listener or chain and drain its
/// connections), the access logs and the tracer.
fn outbound_hcm(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    config: &MeshConfig,
) -> HttpConnectionManager {
    let mut hcm = http_connection_manager(stat_prefix, routes, config);
    hcm.http_filters.insert(0, fault_filter());
    hcm.access_log = access_logs(Direction::Outbound, &config.telemetry);
    hcm.tracing = tracing(Direction::Outbound, &config.telemetry);
    hcm
}

/// The connection manager of every service's HTTP port `port`: it writes the address
/// called into [`DESTINATION_HEADER`] before anything else runs (whatever the app
/// sent there is overwritten), and that picks the route scope of the service's
/// ClusterIP and port, whose route table is the service's own. With `on_demand`
/// (delta xDS) a route whose cluster the proxy lacks fetches it first (see
/// [`on_demand_cluster_filter`]).
fn outbound_http_filter(port: u16, on_demand: bool, config: &MeshConfig) -> Filter {
    let mut hcm = outbound_hcm(
        &format!("outbound_{port}"),
        http_connection_manager::RouteSpecifier::ScopedRoutes(ScopedRoutes {
            name: OUTBOUND_SCOPES.to_string(),
            scope_key_builder: Some(scoped_routes::ScopeKeyBuilder {
                fragments: vec![scoped_routes::scope_key_builder::FragmentBuilder {
                    r#type: Some(
                        scoped_routes::scope_key_builder::fragment_builder::Type::HeaderValueExtractor(
                            scoped_routes::scope_key_builder::fragment_builder::HeaderValueExtractor {
                                name: DESTINATION_HEADER.to_string(),
                                extract_type: Some(
                                    scoped_routes::scope_key_builder::fragment_builder::header_value_extractor::ExtractType::Index(0),
                                ),
                                ..Default::default()
                            },
                        ),
                    ),
                }],
            }),
            rds_config_source: Some(ads_config_source()),
            config_specifier: Some(scoped_routes::ConfigSpecifier::ScopedRds(ScopedRds {
                scoped_rds_config_source: Some(ads_config_source()),
                ..Default::default()
            })),
        }),
        config,
    );
    hcm.early_header_mutation_extensions = vec![TypedExtensionConfig {
        name: "envoy.http.early_header_mutation.header_mutation".to_string(),
        typed_config: Some(any(&EarlyHeaderMutation {
            mutations: vec![HeaderMutation {
                action: Some(header_mutation::Action::Append(HeaderValueOption {
                    header: Some(HeaderValue {
                        key: DESTINATION_HEADER.to_string(),
                        value: "%DOWNSTREAM_LOCAL_ADDRESS%".to_string(),
                        ..Default::default()
                    }),
                    append_action: header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd
                        as i32,
                    ..Default::default()
                })),
            }],
        })),
    }];
    if on_demand {
        // Just before the router, which is last.
        let router = hcm.http_filters.len().saturating_sub(1);
        hcm.http_filters.insert(router, on_demand_cluster_filter());
    }
    hcm_filter(&hcm)
}

/// Fetches the route's cluster over ADS when the proxy does not have it, holding the
/// request until it arrives (or [`ON_DEMAND_TIMEOUT`] passes): a sidecar that
/// discovers service clusters on demand holds only the clusters it has called. With
/// the cluster present it does nothing, so proxies given every cluster share it.
fn on_demand_cluster_filter() -> HttpFilter {
    http_filter(
        "envoy.filters.http.on_demand",
        &OnDemand {
            odcds: Some(OnDemandCds {
                source: Some(ads_config_source()),
                timeout: Some(protobuf_duration(ON_DEMAND_TIMEOUT)),
                ..Default::default()
            }),
        },
    )
}

/// Whether a service port is HTTP served by the capture listener's connection manager.
pub fn is_shared_http(protocol: AppProtocol, config: &MeshConfig) -> bool {
    matches!(
        treated_as(protocol, config),
        AppProtocol::Http | AppProtocol::Http2
    )
}

/// The route scope key of a ClusterIP and port, as Envoy writes the address called
/// (`10.0.0.1:80`, `[fd00::1]:80`).
pub fn scope_key(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

/// One route scope per ClusterIP (each family) and HTTP port of `service`: the address
/// selects the service's route table.
pub fn service_scopes(service: &MeshService, config: &MeshConfig) -> Vec<ScopedRouteConfiguration> {
    let mut out = Vec::new();
    for ip in &service.cluster_ips {
        for port in service
            .ports
            .iter()
            .filter(|p| is_shared_http(p.protocol, config))
        {
            let key = scope_key(*ip, port.port);
            out.push(ScopedRouteConfiguration {
                name: key.clone(),
                route_configuration_name: outbound_route_name(&service.key, port.port),
                key: Some(scoped_route_configuration::Key {
                    fragments: vec![scoped_route_configuration::key::Fragment {
                        r#type: Some(scoped_route_configuration::key::fragment::Type::StringKey(
                            key,
                        )),
                    }],
                }),
                ..Default::default()
            });
        }
    }
    out
}

/// One non-binding listener per ClusterIP (each family) and TCP or undeclared port of
/// `service` (its HTTP ports are served by the capture listener's connection manager).
pub fn service_listeners(service: &MeshService, config: &MeshConfig) -> Vec<Listener> {
    let mut out = Vec::new();
    for ip in &service.cluster_ips {
        for port in &service.ports {
            let name = format!("{ip}_{}", port.port);
            let stat_prefix = format!("outbound_{name}");
            let http = || {
                hcm_filter(&outbound_hcm(
                    &stat_prefix,
                    http_connection_manager::RouteSpecifier::Rds(Rds {
                        config_source: Some(ads_config_source()),
                        route_config_name: outbound_route_name(&service.key, port.port),
                    }),
                    config,
                ))
            };
            let tcp = || tcp_proxy_filter(&stat_prefix, tcp_destination(service, port.port));
            let base = Listener {
                name: name.clone(),
                address: Some(socket_address(*ip, port.port)),
                bind_to_port: Some(bool_value(false)),
                traffic_direction: TrafficDirection::Outbound as i32,
                ..Default::default()
            };
            let chain = |filter: Filter| FilterChain {
                filters: vec![filter],
                ..Default::default()
            };
            out.push(match treated_as(port.protocol, config) {
                // The capture listener's connection manager serves it.
                AppProtocol::Http | AppProtocol::Http2 => continue,
                AppProtocol::Tcp => Listener {
                    filter_chains: vec![chain(tcp())],
                    ..base
                },
                // The app's first bytes decide; a server-first protocol (the
                // client sends nothing) falls to TCP when the timeout passes.
                AppProtocol::Detect => Listener {
                    listener_filters: vec![http_inspector()],
                    listener_filters_timeout: Some(protobuf_duration(config.detection_timeout)),
                    continue_on_listener_filters_timeout: true,
                    filter_chains: vec![FilterChain {
                        name: "http".to_string(),
                        filter_chain_match: Some(FilterChainMatch {
                            application_protocols: strings(&CLEARTEXT_HTTP),
                            ..Default::default()
                        }),
                        filters: vec![http()],
                        ..Default::default()
                    }],
                    default_filter_chain: Some(FilterChain {
                        name: "tcp".to_string(),
                        ..chain(tcp())
                    }),
                    ..base
                },
            });
        }
    }
    out
}

/// The HTTP filter of one inbound port: routes over RDS (authorization is a per-route
/// RBAC override, so it changes for the next request, also on connections already
/// open). Over mTLS the peer's SPIFFE ID reaches the app in `x-forwarded-client-cert`;
/// a plaintext client's copy of that header is always removed, so it cannot claim an
/// identity.
fn inbound_http_filter(port: u16, mtls: bool, config: &MeshConfig) -> Filter {
    let mut hcm = http_connection_manager(
        &format!("inbound_{port}"),
        http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: inbound_route_name(port),
        }),
        config,
    );
    // Deny unless the route grants: the per-route rules replace this, in both access
    // modes, so the listener never changes with them. The rate limiter comes after it
    // (refused requests take no token) and is inert until a TrafficPolicy configures
    // it on the port's virtual host.
    hcm.http_filters.insert(0, http_rbac_deny_all());
    hcm.http_filters.insert(1, local_rate_limit_filter());
    hcm.access_log = access_logs(Direction::Inbound, &config.telemetry);
    hcm.tracing = tracing(Direction::Inbound, &config.telemetry);
    if mtls {
        hcm.forward_client_cert_details =
            http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32;
        hcm.set_current_client_cert_details =
            Some(http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            });
    }
    hcm_filter(&hcm)
}

/// The TCP filters of one inbound port: `tcp_rbac` (grants, in deny-by-default mode)
/// guards it, then the bytes go to the app.
fn inbound_tcp_filters(port: u16, tcp_rbac: Option<(&[AccessGrant], &MeshConfig)>) -> Vec<Filter> {
    let stat_prefix = format!("inbound_{port}");
    let mut filters = Vec::new();
    if let Some((grants, config)) = tcp_rbac {
        filters.push(network_rbac_filter(
            grants,
            Some(port),
            &config.trust_domain,
            &stat_prefix,
        ));
    }
    filters.push(tcp_proxy_filter(
        &stat_prefix,
        tcp_proxy::ClusterSpecifier::Cluster(inbound_cluster_name(port)),
    ));
    filters
}

/// Name of the route configuration of one inbound HTTP port.
pub fn inbound_route_name(port: u16) -> String {
    format!("inbound|{port}")
}

/// One route configuration per inbound port that may carry HTTP: everything to the
/// app, with the destination's authorization as a per-route RBAC override
/// (TrafficTarget grants in deny-by-default mode, everyone in permissive mode).
pub fn translate_inbound_routes(
    proxy: &Workload,
    grants: &[AccessGrant],
    config: &MeshConfig,
    out: &mut ProxyResources,
) {
    for port in proxy
        .inbound_ports
        .iter()
        .filter(|p| treated_as(p.protocol, config) != AppProtocol::Tcp)
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
        // On the virtual host, not the route: one entry per map keeps encoding stable.
        let vhost_filters: std::collections::HashMap<String, _> = port
            .rate_limit
            .iter()
            .map(|l| {
                (
                    LOCAL_RATE_LIMIT_FILTER.to_string(),
                    any(&local_rate_limit(Some(&l.value))),
                )
            })
            .collect();
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
                        timeout: no_timeout(),
                        ..Default::default()
                    })),
                    // One entry at most: protobuf maps encode in hash order.
                    typed_per_filter_config,
                    ..Default::default()
                }],
                typed_per_filter_config: vhost_filters,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
}

/// How connections reach an inbound chain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InboundTransport {
    /// Mutual TLS only (STRICT): the chain terminates it.
    Mtls,
    /// Mutual TLS, told apart from plaintext by TLS inspection (PERMISSIVE).
    DetectedMtls,
    /// Plaintext, told apart from mTLS by TLS inspection (PERMISSIVE).
    DetectedPlaintext,
    /// Plaintext only: the proxy has no identity to terminate mTLS with.
    Plaintext,
}

impl InboundTransport {
    fn is_tls(self) -> bool {
        matches!(self, Self::Mtls | Self::DetectedMtls)
    }

    fn match_name(self) -> &'static str {
        match self {
            Self::DetectedMtls => "tls",
            Self::DetectedPlaintext => "raw_buffer",
            Self::Mtls | Self::Plaintext => "",
        }
    }
}

/// The chains of one inbound port over one transport.
fn inbound_port_chains(
    port: &WorkloadPort,
    transport: InboundTransport,
    rbac: Option<(&[AccessGrant], &MeshConfig)>,
    config: &MeshConfig,
) -> Vec<FilterChain> {
    let base_name = inbound_cluster_name(port.port);
    let chain =
        |suffix: &str, application_protocols: &[&str], filters: Vec<Filter>, alpn: &[&str]| {
            let mut name = base_name.clone();
            for part in [transport.match_name(), suffix] {
                if !part.is_empty() {
                    name = format!("{name}|{part}");
                }
            }
            FilterChain {
                name,
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: Some(u32_value(u32::from(port.port))),
                    transport_protocol: transport.match_name().to_string(),
                    application_protocols: strings(application_protocols),
                    ..Default::default()
                }),
                filters,
                transport_socket: transport
                    .is_tls()
                    .then(|| downstream_transport_socket(config, alpn)),
                ..Default::default()
            }
        };
    let http = || inbound_http_filter(port.port, transport.is_tls(), config);
    match treated_as(port.protocol, config) {
        AppProtocol::Http | AppProtocol::Http2 => {
            vec![chain("", &[], vec![http()], &MESH_HTTP_ALPN)]
        }
        AppProtocol::Tcp => vec![chain("", &[], inbound_tcp_filters(port.port, rbac), &[])],
        // A client sidecar says HTTP with ALPN; a plaintext client is inspected.
        AppProtocol::Detect => {
            let http_protocols: &[&str] = if transport.is_tls() {
                &MESH_HTTP_ALPN
            } else {
                &CLEARTEXT_HTTP
            };
            vec![
                chain("http", http_protocols, vec![http()], &MESH_HTTP_ALPN),
                chain("tcp", &[], inbound_tcp_filters(port.port, rbac), &[]),
            ]
        }
    }
}

/// `virtualInbound` on 15006: per served port, chains to the app on loopback.
///
/// With an identity: STRICT has mTLS chains per port (plaintext fails the handshake);
/// PERMISSIVE has mTLS and plaintext chains per port, told apart by TLS inspection.
/// Ports no service exposes pass through (mTLS-terminated in STRICT).
pub fn translate_inbound_listener(
    proxy: &Workload,
    grants: &[AccessGrant],
    config: &MeshConfig,
    has_identity: bool,
    out: &mut ProxyResources,
) {
    let strict = has_identity && config.mtls == MtlsMode::Strict;
    let permissive = has_identity && config.mtls == MtlsMode::Permissive;
    let transports: &[InboundTransport] = if strict {
        &[InboundTransport::Mtls]
    } else if permissive {
        &[
            InboundTransport::DetectedMtls,
            InboundTransport::DetectedPlaintext,
        ]
    } else {
        &[InboundTransport::Plaintext]
    };
    // Deny by default: only TrafficTarget grants pass (callers without mTLS never match).
    let rbac = (config.access == AccessMode::DenyByDefault).then_some((grants, config));
    let mut chains = Vec::new();
    for port in &proxy.inbound_ports {
        for transport in transports {
            chains.extend(inbound_port_chains(port, *transport, rbac, config));
        }
    }
    let detects = proxy
        .inbound_ports
        .iter()
        .any(|p| treated_as(p.protocol, config) == AppProtocol::Detect);
    let mut listener_filters = vec![original_dst_filter()];
    // TLS inspection reads the client sidecar's ALPN (and tells mTLS from plaintext);
    // HTTP inspection classifies plaintext on undeclared ports.
    if has_identity {
        listener_filters.push(tls_inspector());
    }
    if detects && !strict {
        listener_filters.push(http_inspector());
    }
    // A client that waits for the server's banner sends nothing to inspect: go on
    // without a verdict after the timeout rather than close the connection.
    let inspect_timeout = if config.detection_timeout.is_zero() {
        DEFAULT_DETECTION_TIMEOUT
    } else {
        config.detection_timeout
    };
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
            transport_socket: strict.then(|| downstream_transport_socket(config, &[])),
            ..Default::default()
        }),
        listener_filters,
        listener_filters_timeout: Some(protobuf_duration(inspect_timeout)),
        continue_on_listener_filters_timeout: true,
        ..wildcard_listener(
            VIRTUAL_INBOUND,
            INBOUND_CAPTURE_PORT,
            TrafficDirection::Inbound,
            proxy.ips.iter().any(IpAddr::is_ipv6),
        )
    });
}

/// Name of the listener answering the kubelet's rewritten app probes.
pub const APP_PROBES: &str = "weft-app-probes";

/// The kubelet's probes, rewritten by the injection webhook to the probe port, are
/// forwarded in plaintext to the app over loopback: the probe port bypasses the
/// inbound redirect, so STRICT mTLS does not apply to it.
pub fn translate_probe_listener(proxy: &Workload, config: &MeshConfig, out: &mut ProxyResources) {
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
        config,
    );
    out.listeners.push(Listener {
        filter_chains: vec![FilterChain {
            filters: vec![hcm_filter(&hcm)],
            ..Default::default()
        }],
        ..wildcard_listener(
            APP_PROBES,
            APP_PROBE_PORT,
            TrafficDirection::Inbound,
            proxy.ips.iter().any(IpAddr::is_ipv6),
        )
    });
}
