//! Clusters (CDS) and their endpoints (EDS).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, UpstreamConnectionOptions, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    BindConfig, ExtraSourceAddress, HealthStatus, SocketAddress, TcpKeepalive, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};

use super::envoy::{
    address_of, ads_config_source, millis, protobuf_duration, socket_address, u32_value,
};
use super::http::{UpstreamHttp, upstream_protocol_options, upstream_protocol_options_with};
use super::settings::MeshConfig;
use super::tls::{upstream_tls_to, upstream_transport_socket};
use super::{ProxyResources, outbound_cluster_name, treated_as};
use crate::index::{AppProtocol, MeshService, PortPolicy, ServiceEndpoint, Workload};

/// Cluster for outbound traffic to destinations the mesh does not know.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Cluster for inbound traffic to ports no service exposes.
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";

const CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Source address of the inbound passthrough's connections to the pod's own IP
/// (IPv4): the redirect lets traffic from it reach the app instead of looping back
/// into the inbound listener, as it does for the proxy's other connections to its own pod.
pub const INBOUND_PASSTHROUGH_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
/// The same for IPv6 (`init-iptables` adds it to `lo`).
pub const INBOUND_PASSTHROUGH_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// TCP keepalive on upstream connections: with no idle timeouts (long-lived database
/// and stream connections must survive quiet periods), this is how a connection to a
/// peer that vanished without a FIN is found and closed (after about 10 minutes).
fn keepalive() -> UpstreamConnectionOptions {
    UpstreamConnectionOptions {
        tcp_keepalive: Some(TcpKeepalive {
            keepalive_time: Some(u32_value(300)),
            keepalive_interval: Some(u32_value(30)),
            keepalive_probes: Some(u32_value(9)),
        }),
        ..Default::default()
    }
}

fn bind_address(ip: IpAddr) -> SocketAddress {
    SocketAddress {
        address: ip.to_string(),
        port_specifier: Some(socket_address::PortSpecifier::PortValue(0)),
        ..Default::default()
    }
}

/// The HTTP version a client sidecar speaks to a service port: HTTP/2 to another
/// sidecar (multiplexed over one mTLS connection), otherwise what the app speaks.
fn outbound_http(protocol: AppProtocol, to_sidecar: bool) -> Option<UpstreamHttp> {
    match protocol {
        AppProtocol::Http if to_sidecar => Some(UpstreamHttp::Http2),
        AppProtocol::Http => Some(UpstreamHttp::Http1),
        AppProtocol::Http2 => Some(UpstreamHttp::Http2),
        AppProtocol::Detect => Some(UpstreamHttp::SameAsDownstream),
        AppProtocol::Tcp => None,
    }
}

/// The HTTP version a sidecar speaks to its own app on a port.
fn inbound_http(protocol: AppProtocol) -> Option<UpstreamHttp> {
    match protocol {
        AppProtocol::Http => Some(UpstreamHttp::Http1),
        AppProtocol::Http2 => Some(UpstreamHttp::Http2),
        AppProtocol::Detect => Some(UpstreamHttp::SameAsDownstream),
        AppProtocol::Tcp => None,
    }
}

/// Name of the cluster that reaches the local app on `port`.
pub fn inbound_cluster_name(port: u16) -> String {
    format!("inbound|{port}")
}

fn base_cluster(name: String, kind: cluster::DiscoveryType) -> Cluster {
    Cluster {
        name,
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: Some(millis(CONNECT_TIMEOUT_MS)),
        ..Default::default()
    }
}

fn original_dst_cluster(name: &str) -> Cluster {
    Cluster {
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        ..base_cluster(name.to_string(), cluster::DiscoveryType::OriginalDst)
    }
}

/// The load assignment of a cluster. Draining endpoints are sent as DRAINING: Envoy
/// excludes them from load balancing (no new requests, and they do not count towards
/// the panic threshold) while requests and connections already on them finish.
fn load_assignment(cluster_name: &str, endpoints: &[ServiceEndpoint]) -> ClusterLoadAssignment {
    let lb_endpoints: Vec<LbEndpoint> = endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(address_of(e.addr)),
                ..Default::default()
            })),
            // Ready ones stay unset (UNKNOWN counts as healthy without health checks).
            health_status: if e.draining {
                HealthStatus::Draining as i32
            } else {
                HealthStatus::Unknown as i32
            },
            ..Default::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: if lb_endpoints.is_empty() {
            Vec::new()
        } else {
            vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }]
        },
        ..Default::default()
    }
}

/// The cluster for outbound traffic to destinations the mesh does not know.
pub fn passthrough_cluster() -> Cluster {
    original_dst_cluster(PASSTHROUGH_CLUSTER)
}

/// One EDS cluster (and its load assignment) per port of `service`. Clusters of meshed
/// services originate mTLS when the proxy has an identity (`client_tls`).
pub fn service_clusters(
    service: &MeshService,
    config: &MeshConfig,
    client_tls: bool,
) -> (Vec<Cluster>, Vec<ClusterLoadAssignment>) {
    let mtls = client_tls && service.meshed;
    let mut clusters = Vec::new();
    let mut endpoints = Vec::new();
    for port in &service.ports {
        let name = outbound_cluster_name(&service.key, port.port);
        // No ALPN is configured: Envoy's HTTP pools offer `h2` or `http/1.1`, its
        // TCP proxy nothing, which tells the server sidecar how to handle the stream.
        let http = outbound_http(treated_as(port.protocol, config), mtls);
        let max_connection_duration = service
            .policies
            .get(&port.port)
            .and_then(|p| p.connection_pool.as_ref())
            .and_then(|c| c.value.max_connection_duration);
        clusters.push(Cluster {
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_config_source()),
                service_name: String::new(),
            }),
            lb_policy: cluster::LbPolicy::RoundRobin as i32,
            transport_socket: mtls.then(|| upstream_transport_socket(config, service)),
            typed_extension_protocol_options: http
                .map(|v| upstream_protocol_options_with(v, max_connection_duration))
                .unwrap_or_default(),
            upstream_connection_options: Some(keepalive()),
            alt_stat_name: outbound_stat_name(service, port.port),
            ..base_cluster(name.clone(), cluster::DiscoveryType::Eds)
        });
        if let (Some(policy), Some(cluster)) =
            (service.policies.get(&port.port), clusters.last_mut())
        {
            apply_cluster_policy(
                cluster,
                policy,
                http == Some(UpstreamHttp::Http2),
                &service.key.fqdn(),
            );
        }
        endpoints.push(load_assignment(&name, &port.endpoints));
    }
    (clusters, endpoints)
}

/// The name an outbound cluster's statistics carry: `outbound|PORT||SERVICE|NAMESPACE`.
/// Envoy's Prometheus tags take a cluster's name up to its first dot, so the FQDN of the
/// cluster's own name would leak its namespace into metric names; this one has no dot.
pub fn outbound_stat_name(service: &MeshService, port: u16) -> String {
    format!(
        "outbound|{port}||{}|{}",
        service.key.name, service.key.namespace
    )
}

/// A TrafficPolicy's cluster settings: circuit breakers, outlier detection, active
/// health checks, the load-balancing algorithm and slow start. `h2`: the cluster speaks
/// HTTP/2 (to a sidecar), so HTTP health probes do too; they carry `host` (the
/// default, the cluster's name, is not a valid authority).
fn apply_cluster_policy(cluster: &mut Cluster, policy: &PortPolicy, h2: bool, host: &str) {
    use envoy_types::pb::envoy::config::cluster::v3::{
        CircuitBreakers, OutlierDetection, circuit_breakers,
    };
    use envoy_types::pb::envoy::config::core::v3::{HealthCheck, health_check};
    use envoy_types::pb::envoy::r#type::v3::{CodecClientType, Int64Range, Percent};
    use weft_crds::policy::LoadBalancerType;

    if let Some(pool) = &policy.connection_pool {
        let p = &pool.value;
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![circuit_breakers::Thresholds {
                max_connections: p.max_connections.map(u32_value),
                max_pending_requests: p.max_pending_requests.map(u32_value),
                max_requests: p.max_requests.map(u32_value),
                max_retries: p.max_retries.map(u32_value),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    if let Some(outlier) = &policy.outlier_detection {
        let o = &outlier.value;
        cluster.outlier_detection = Some(OutlierDetection {
            consecutive_5xx: o.consecutive_5xx.map(u32_value),
            consecutive_gateway_failure: o.consecutive_gateway_errors.map(u32_value),
            // Envoy counts gateway failures but enforces none by default.
            enforcing_consecutive_gateway_failure: o
                .consecutive_gateway_errors
                .map(|_| u32_value(100)),
            interval: o.interval.map(protobuf_duration),
            base_ejection_time: o.base_ejection_time.map(protobuf_duration),
            max_ejection_percent: o.max_ejection_percent.map(u32_value),
            ..Default::default()
        });
    }
    if let Some(check) = &policy.health_check {
        let h = &check.value;
        let checker = match &h.http {
            Some((path, statuses)) => {
                health_check::HealthChecker::HttpHealthCheck(health_check::HttpHealthCheck {
                    path: path.clone(),
                    host: host.to_string(),
                    expected_statuses: statuses
                        .iter()
                        .map(|&s| Int64Range {
                            start: i64::from(s),
                            end: i64::from(s) + 1,
                        })
                        .collect(),
                    codec_client_type: if h2 {
                        CodecClientType::Http2 as i32
                    } else {
                        CodecClientType::Http1 as i32
                    },
                    ..Default::default()
                })
            }
            None => {
                health_check::HealthChecker::TcpHealthCheck(health_check::TcpHealthCheck::default())
            }
        };
        cluster.health_checks = vec![HealthCheck {
            timeout: Some(protobuf_duration(h.timeout)),
            interval: Some(protobuf_duration(h.interval)),
            // Envoy probes a cluster that has had no traffic yet only once a minute: a
            // sidecar that just started would keep a failed first probe that long.
            no_traffic_interval: Some(protobuf_duration(h.interval)),
            healthy_threshold: Some(u32_value(h.healthy_threshold)),
            unhealthy_threshold: Some(u32_value(h.unhealthy_threshold)),
            health_checker: Some(checker),
            ..Default::default()
        }];
        if let Some(panic) = h.panic_threshold {
            cluster.common_lb_config = Some(cluster::CommonLbConfig {
                healthy_panic_threshold: Some(Percent {
                    value: f64::from(panic),
                }),
                ..Default::default()
            });
        }
    }
    if let Some(lb) = &policy.load_balancer {
        let lb = &lb.value;
        let slow_start = lb.slow_start.map(|w| cluster::SlowStartConfig {
            slow_start_window: Some(protobuf_duration(w)),
            ..Default::default()
        });
        let (policy, config) = match lb.algorithm {
            LoadBalancerType::RoundRobin => (
                cluster::LbPolicy::RoundRobin,
                slow_start.map(|s| {
                    cluster::LbConfig::RoundRobinLbConfig(cluster::RoundRobinLbConfig {
                        slow_start_config: Some(s),
                    })
                }),
            ),
            LoadBalancerType::LeastRequest => (
                cluster::LbPolicy::LeastRequest,
                slow_start.map(|s| {
                    cluster::LbConfig::LeastRequestLbConfig(cluster::LeastRequestLbConfig {
                        slow_start_config: Some(s),
                        ..Default::default()
                    })
                }),
            ),
            LoadBalancerType::Random => (cluster::LbPolicy::Random, None),
            LoadBalancerType::RingHash => (cluster::LbPolicy::RingHash, None),
            LoadBalancerType::Maglev => (cluster::LbPolicy::Maglev, None),
        };
        cluster.lb_policy = policy as i32;
        cluster.lb_config = config;
    }
}

/// Prefix of the names of on-demand clusters for calls straight to a pod IP.
pub const POD_CLUSTER_PREFIX: &str = "pod|";

/// Name of the on-demand cluster for calls to `ip`.
pub fn pod_cluster_name(ip: IpAddr) -> String {
    format!("{POD_CLUSTER_PREFIX}{ip}")
}

/// The IP an on-demand pod cluster name stands for.
pub fn pod_cluster_ip(name: &str) -> Option<IpAddr> {
    name.strip_prefix(POD_CLUSTER_PREFIX)?.parse().ok()
}

/// The on-demand cluster for calls straight to `ip` (a headless service's pod, a
/// StatefulSet peer): the original destination, over mTLS to the pod's identity when
/// it is a meshed pod (`identity`: namespace, service account) and the caller has one,
/// else in plaintext, as any unknown destination.
pub fn pod_cluster(ip: IpAddr, identity: Option<(&str, &str)>, config: &MeshConfig) -> Cluster {
    let name = pod_cluster_name(ip);
    match identity {
        Some((ns, sa)) => {
            let sni = format!("{sa}.{ns}.sa.weft");
            Cluster {
                transport_socket: Some(upstream_tls_to(
                    config,
                    &[(ns.to_string(), sa.to_string())],
                    sni,
                )),
                upstream_connection_options: Some(keepalive()),
                ..original_dst_cluster(&name)
            }
        }
        None => original_dst_cluster(&name),
    }
}

/// One static cluster per local app port, reached over loopback (`::1` in an
/// IPv6-only pod), speaking the app's HTTP version.
pub fn translate_inbound_clusters(proxy: &Workload, config: &MeshConfig, out: &mut ProxyResources) {
    // Ports no service declares go to the original destination, the pod's own IP, from
    // an address the redirect lets through to the app.
    out.clusters.push(Cluster {
        upstream_bind_config: Some(BindConfig {
            source_address: Some(bind_address(IpAddr::V4(INBOUND_PASSTHROUGH_SOURCE_V4))),
            extra_source_addresses: vec![ExtraSourceAddress {
                address: Some(bind_address(IpAddr::V6(INBOUND_PASSTHROUGH_SOURCE_V6))),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..original_dst_cluster(INBOUND_PASSTHROUGH_CLUSTER)
    });
    let loopback = if proxy.is_ipv6_only() {
        IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    // Ports services reach, plus ports the proxy forwards kubelet probes (HTTP/1.1) to.
    let mut ports: std::collections::BTreeMap<u16, AppProtocol> = proxy
        .probes
        .iter()
        .map(|p| (p.port, AppProtocol::Http))
        .collect();
    ports.extend(
        proxy
            .inbound_ports
            .iter()
            .map(|p| (p.port, treated_as(p.protocol, config))),
    );
    for (port, protocol) in ports {
        let name = inbound_cluster_name(port);
        let mut assignment = load_assignment(&name, &[]);
        assignment.endpoints = vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(loopback, port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }];
        out.clusters.push(Cluster {
            load_assignment: Some(assignment),
            typed_extension_protocol_options: inbound_http(protocol)
                .map(upstream_protocol_options)
                .unwrap_or_default(),
            ..base_cluster(name, cluster::DiscoveryType::Static)
        });
    }
}
