//! Clusters (CDS) and their endpoints (EDS).

use std::net::{IpAddr, Ipv4Addr};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};

use super::envoy::{address_of, ads_config_source, millis, socket_address};
use super::tls::{MeshConfig, upstream_tls_to, upstream_transport_socket};
use super::{PodIpsByIdentity, ProxyResources, outbound_cluster_name, pod_identity_cluster_name};
use crate::index::{MeshModel, Workload};

/// Cluster for outbound traffic to destinations the mesh does not know.
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";
/// Cluster for inbound traffic to ports no service exposes.
pub const INBOUND_PASSTHROUGH_CLUSTER: &str = "InboundPassthroughCluster";

const CONNECT_TIMEOUT_MS: u64 = 1_000;

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

fn load_assignment(
    cluster_name: &str,
    endpoints: impl IntoIterator<Item = std::net::SocketAddr>,
) -> ClusterLoadAssignment {
    let lb_endpoints: Vec<LbEndpoint> = endpoints
        .into_iter()
        .map(|addr| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(address_of(addr)),
                ..Default::default()
            })),
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

/// One EDS cluster (and its load assignment) per service port, plus the passthrough.
/// Clusters of meshed services originate mTLS when the proxy has an identity.
pub fn translate_outbound_clusters(
    model: &MeshModel,
    config: &MeshConfig,
    client_tls: bool,
    pod_ips: &PodIpsByIdentity,
    out: &mut ProxyResources,
) {
    out.clusters.push(original_dst_cluster(PASSTHROUGH_CLUSTER));
    for service in model.services.values() {
        for port in &service.ports {
            let name = outbound_cluster_name(&service.key, port.port);
            out.clusters.push(Cluster {
                eds_cluster_config: Some(cluster::EdsClusterConfig {
                    eds_config: Some(ads_config_source()),
                    service_name: String::new(),
                }),
                lb_policy: cluster::LbPolicy::RoundRobin as i32,
                transport_socket: (client_tls && service.meshed)
                    .then(|| upstream_transport_socket(config, service)),
                ..base_cluster(name.clone(), cluster::DiscoveryType::Eds)
            });
            out.endpoints
                .push(load_assignment(&name, port.endpoints.iter().copied()));
        }
    }
    // Calls straight to a meshed pod's IP (headless services, StatefulSet peers) keep
    // their destination and get mTLS to that pod's identity.
    for (ns, sa) in pod_ips.keys() {
        let name = pod_identity_cluster_name(ns, sa);
        let sni = format!("{sa}.{ns}.sa.weft");
        out.clusters.push(Cluster {
            transport_socket: Some(upstream_tls_to(config, &[(ns.clone(), sa.clone())], sni)),
            ..original_dst_cluster(&name)
        });
    }
}

/// One static cluster per local app port, reached over loopback.
pub fn translate_inbound_clusters(proxy: &Workload, out: &mut ProxyResources) {
    out.clusters
        .push(original_dst_cluster(INBOUND_PASSTHROUGH_CLUSTER));
    // Ports services reach, plus ports the proxy forwards kubelet probes to.
    let ports: std::collections::BTreeSet<u16> = proxy
        .inbound_ports
        .iter()
        .map(|p| p.port)
        .chain(proxy.probes.iter().map(|p| p.port))
        .collect();
    for port in ports {
        let name = inbound_cluster_name(port);
        let mut assignment = load_assignment(&name, []);
        assignment.endpoints = vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(socket_address(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }];
        out.clusters.push(Cluster {
            load_assignment: Some(assignment),
            ..base_cluster(name, cluster::DiscoveryType::Static)
        });
    }
}
