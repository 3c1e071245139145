//! Pure translation: (mesh model, one proxy) → that proxy's Envoy resources.
//!
//! Deterministic: the model is ordered (BTreeMap, sorted vectors), so an
//! unchanged model gives byte-identical resources and therefore no push.

mod clusters;
mod envoy;
mod gateway;
mod http;
mod listeners;
mod rbac;
mod routes;
mod settings;
mod telemetry;
mod tls;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, ScopedRouteConfiguration};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use weft_xds::{Resource, Snapshot, type_url};

pub use clusters::{
    INBOUND_PASSTHROUGH_SOURCE_V4, INBOUND_PASSTHROUGH_SOURCE_V6, POD_CLUSTER_PREFIX, pod_cluster,
    pod_cluster_ip, pod_cluster_name,
};
pub use gateway::INVALID_BACKEND_CLUSTER;
pub use http::{PathOutcome, normalize_request_path};
pub use listeners::{DESTINATION_HEADER, capture_outbound};
pub use rbac::path_prefix_regex;
pub use settings::{AccessMode, DEFAULT_DETECTION_TIMEOUT, MeshConfig, MtlsMode};
pub use telemetry::TRACING_COLLECTOR_CLUSTER;
pub use tls::{IDENTITY_SECRET, TRUST_BUNDLE_SECRET};

use crate::identity::WorkloadSecrets;
use std::net::IpAddr;

use crate::index::{AccessGrant, AppProtocol, MeshModel, MeshService, ServiceKey, Workload};

/// How a port is handled under `config`: with detection turned off (a zero timeout),
/// undeclared ports are plain TCP.
pub fn treated_as(protocol: AppProtocol, config: &MeshConfig) -> AppProtocol {
    if protocol == AppProtocol::Detect && config.detection_timeout.is_zero() {
        AppProtocol::Tcp
    } else {
        protocol
    }
}

/// Whether the mesh uses IPv6 anywhere: then the capture listeners also bind `[::]`.
/// IP families are a property of the cluster, so this holds for every proxy in it.
pub fn model_has_ipv6(model: &MeshModel) -> bool {
    model
        .services
        .values()
        .any(|s| s.cluster_ips.iter().any(std::net::IpAddr::is_ipv6))
        || model
            .workloads
            .values()
            .any(|w| w.ips.iter().any(std::net::IpAddr::is_ipv6))
}

/// Port of the listener that captures outbound traffic (iptables sends it here).
pub const OUTBOUND_CAPTURE_PORT: u16 = 15001;
/// Port of the listener that captures inbound traffic.
pub const INBOUND_CAPTURE_PORT: u16 = 15006;

/// An address range holding meshed pods (network address and prefix length): calls
/// into it discover their cluster on demand.
pub type PodBlock = (IpAddr, u8);

/// The block of `ip` with a /`v4` (IPv4) or /`v6` (IPv6) prefix.
fn block_of(ip: IpAddr, v4: u8, v6: u8) -> PodBlock {
    match ip {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(v4)).unwrap_or(0);
            (
                IpAddr::V4(std::net::Ipv4Addr::from(u32::from(a) & mask)),
                v4,
            )
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(v6)).unwrap_or(0);
            (
                IpAddr::V6(std::net::Ipv6Addr::from(u128::from(a) & mask)),
                v6,
            )
        }
    }
}

/// The block of `ip`: its /24 (IPv4) or /64 (IPv6), the size a node's pod range has.
pub fn pod_block_of(ip: IpAddr) -> PodBlock {
    block_of(ip, 24, 64)
}

/// The block of a service ClusterIP: its /16 (IPv4) or /64 (IPv6). Service ranges are
/// contiguous and apart from pod ranges, so a few blocks cover every ClusterIP and a
/// new service rarely brings a new one (which changes the capture listener).
pub fn service_block_of(ip: IpAddr) -> PodBlock {
    block_of(ip, 16, 64)
}

/// What the outbound capture listener is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboundShape {
    /// Blocks holding meshed pods, sorted.
    pub pod_blocks: Vec<PodBlock>,
    /// Blocks holding service ClusterIPs, sorted.
    pub service_blocks: Vec<PodBlock>,
    /// Ports some service serves HTTP or HTTP/2 on (declared), sorted.
    pub http_ports: Vec<u16>,
}

/// The service blocks and HTTP ports of `services`.
pub fn service_shape<'s>(
    services: impl Iterator<Item = &'s MeshService>,
    config: &MeshConfig,
) -> (Vec<PodBlock>, Vec<u16>) {
    let mut blocks = std::collections::BTreeSet::new();
    let mut ports = std::collections::BTreeSet::new();
    for service in services.filter(|s| !s.cluster_ips.is_empty()) {
        blocks.extend(service.cluster_ips.iter().map(|ip| service_block_of(*ip)));
        ports.extend(
            service
                .ports
                .iter()
                .filter(|p| listeners::is_shared_http(p.protocol, config))
                .map(|p| p.port),
        );
    }
    (blocks.into_iter().collect(), ports.into_iter().collect())
}

/// The shape of the capture listener for `model`.
pub fn outbound_shape(model: &MeshModel, config: &MeshConfig) -> OutboundShape {
    let (service_blocks, http_ports) = service_shape(model.services.values().map(|s| &**s), config);
    OutboundShape {
        pod_blocks: pod_blocks(model),
        service_blocks,
        http_ports,
    }
}

/// The blocks holding meshed pods, sorted.
pub fn pod_blocks(model: &MeshModel) -> Vec<PodBlock> {
    let blocks: std::collections::BTreeSet<PodBlock> = model
        .workloads
        .values()
        .filter(|w| w.meshed)
        .flat_map(|w| w.ips.iter().map(|ip| pod_block_of(*ip)))
        .collect();
    blocks.into_iter().collect()
}

/// The outbound resources of one service: a proxy that may call it holds these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceOutbound {
    /// One cluster per port.
    pub clusters: Vec<Cluster>,
    /// The endpoints of each cluster.
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// One listener per ClusterIP and TCP or undeclared port.
    pub listeners: Vec<Listener>,
    /// One route scope per ClusterIP and HTTP port.
    pub scopes: Vec<ScopedRouteConfiguration>,
    /// One route configuration per port that may carry HTTP.
    pub routes: Vec<RouteConfiguration>,
    /// Variants of some of `routes` for callers in namespaces with consumer routes on
    /// the service: (caller namespace, configuration of the same name).
    pub consumer_routes: Vec<(String, RouteConfiguration)>,
}

/// Translates one service: a pure function of the service and the mesh settings, so a
/// change to one service re-translates that service alone.
pub fn translate_service(
    service: &MeshService,
    config: &MeshConfig,
    client_tls: bool,
) -> ServiceOutbound {
    let (clusters, endpoints) = clusters::service_clusters(service, config, client_tls);
    ServiceOutbound {
        clusters,
        endpoints,
        listeners: listeners::service_listeners(service, config),
        scopes: listeners::service_scopes(service, config),
        routes: routes::service_route_configs(service, config),
        consumer_routes: routes::consumer_route_configs(service, config),
    }
}

/// Names of `service`'s clusters that a sidecar discovering clusters on demand need
/// not hold before it calls them: those of its HTTP ports, whose routes sit behind the
/// capture listener's connection managers, which fetch a missing cluster.
pub fn clusters_on_demand(service: &MeshService, config: &MeshConfig) -> Vec<String> {
    service
        .ports
        .iter()
        .filter(|p| listeners::is_shared_http(p.protocol, config))
        .map(|p| outbound_cluster_name(&service.key, p.port))
        .collect()
}

/// Names of clusters that `service`'s resources reach where nothing fetches a missing
/// cluster: the TCP proxies and per-address connection managers of its TCP and
/// undeclared ports, and request mirrors. Every sidecar holds these from the start,
/// whoever owns them. Reads the route tables of `outbound`, the service's translation.
/// Sorted, without repeats.
pub fn clusters_pinned(
    service: &MeshService,
    outbound: &ServiceOutbound,
    config: &MeshConfig,
) -> Vec<String> {
    use envoy_types::pb::envoy::config::route::v3::{route, route_action};
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::tcp_proxy;
    let mut out = std::collections::BTreeSet::new();
    let mut own_listener_routes = std::collections::BTreeSet::new();
    for port in &service.ports {
        if listeners::is_shared_http(port.protocol, config) {
            continue;
        }
        own_listener_routes.insert(outbound_route_name(&service.key, port.port));
        match routes::tcp_destination(service, port.port) {
            tcp_proxy::ClusterSpecifier::Cluster(name) => {
                out.insert(name);
            }
            tcp_proxy::ClusterSpecifier::WeightedClusters(w) => {
                out.extend(w.clusters.into_iter().map(|c| c.name));
            }
        }
    }
    let configs = outbound
        .routes
        .iter()
        .chain(outbound.consumer_routes.iter().map(|(_, r)| r));
    for rc in configs {
        let whole = own_listener_routes.contains(&rc.name);
        for r in rc.virtual_hosts.iter().flat_map(|v| &v.routes) {
            let Some(route::Action::Route(action)) = &r.action else {
                continue;
            };
            out.extend(
                action
                    .request_mirror_policies
                    .iter()
                    .map(|m| m.cluster.clone()),
            );
            if !whole {
                continue;
            }
            match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(name)) => {
                    out.insert(name.clone());
                }
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    out.extend(w.clusters.iter().map(|c| c.name.clone()));
                }
                _ => {}
            }
        }
    }
    out.into_iter().collect()
}

/// The consumer route configurations of every service, per caller namespace: what a
/// proxy in that namespace gets instead of the shared configurations of the same names.
pub fn translate_consumer(
    model: &MeshModel,
    config: &MeshConfig,
) -> std::collections::BTreeMap<String, ProxyResources> {
    let mut out: std::collections::BTreeMap<String, ProxyResources> = Default::default();
    for service in model.services.values() {
        for (ns, route) in routes::consumer_route_configs(service, config) {
            out.entry(ns).or_default().routes.push(route);
        }
    }
    out.into_iter().map(|(ns, r)| (ns, r.sorted())).collect()
}

/// The Envoy resources of one proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxyResources {
    /// CDS.
    pub clusters: Vec<Cluster>,
    /// EDS.
    pub endpoints: Vec<ClusterLoadAssignment>,
    /// LDS.
    pub listeners: Vec<Listener>,
    /// RDS.
    pub routes: Vec<RouteConfiguration>,
    /// SRDS.
    pub scopes: Vec<ScopedRouteConfiguration>,
    /// SDS.
    pub secrets: Vec<Secret>,
}

impl ProxyResources {
    fn sorted(mut self) -> Self {
        self.clusters.sort_by(|a, b| a.name.cmp(&b.name));
        self.endpoints
            .sort_by(|a, b| a.cluster_name.cmp(&b.cluster_name));
        self.listeners.sort_by(|a, b| a.name.cmp(&b.name));
        self.routes.sort_by(|a, b| a.name.cmp(&b.name));
        self.scopes.sort_by(|a, b| a.name.cmp(&b.name));
        self.secrets.sort_by(|a, b| a.name.cmp(&b.name));
        self
    }

    /// Encodes every resource into an xDS snapshot.
    pub fn to_snapshot(&self) -> Snapshot {
        Snapshot::new()
            .with(
                type_url::CLUSTER,
                self.clusters
                    .iter()
                    .map(|c| Resource::encode(type_url::CLUSTER, &c.name, c)),
            )
            .with(
                type_url::ENDPOINT,
                self.endpoints
                    .iter()
                    .map(|e| Resource::encode(type_url::ENDPOINT, &e.cluster_name, e)),
            )
            .with(
                type_url::LISTENER,
                self.listeners
                    .iter()
                    .map(|l| Resource::encode(type_url::LISTENER, &l.name, l)),
            )
            .with(
                type_url::ROUTE,
                self.routes
                    .iter()
                    .map(|r| Resource::encode(type_url::ROUTE, &r.name, r)),
            )
            .with(
                type_url::SCOPED_ROUTE,
                self.scopes
                    .iter()
                    .map(|s| Resource::encode(type_url::SCOPED_ROUTE, &s.name, s)),
            )
            .with(
                type_url::SECRET,
                self.secrets
                    .iter()
                    .map(|s| Resource::encode(type_url::SECRET, &s.name, s)),
            )
    }
}

/// Name of the outbound cluster of one service port.
pub fn outbound_cluster_name(service: &ServiceKey, port: u16) -> String {
    format!("outbound|{port}||{}", service.fqdn())
}

/// Name of the outbound route configuration of one service port.
pub fn outbound_route_name(service: &ServiceKey, port: u16) -> String {
    format!("{}:{port}", service.fqdn())
}

/// The clusters every proxy holds besides the services': the passthrough and, with
/// tracing on, the collector's.
pub fn common_clusters(config: &MeshConfig) -> Vec<Cluster> {
    let mut out = vec![clusters::passthrough_cluster()];
    out.extend(telemetry::tracing_collector(&config.telemetry));
    out
}

/// Resources every proxy gets alike: the outbound capture listener, the passthrough,
/// and every service's outbound resources (the whole mesh, unscoped). `client_tls`
/// says whether the proxies have an identity to originate mTLS with (and so discover
/// pod clusters on demand).
pub fn translate_shared(
    model: &MeshModel,
    config: &MeshConfig,
    client_tls: bool,
) -> ProxyResources {
    let mut out = ProxyResources {
        clusters: common_clusters(config),
        ..Default::default()
    };
    out.listeners.push(listeners::capture_outbound(
        &outbound_shape(model, config),
        client_tls,
        model_has_ipv6(model),
        config,
    ));
    for service in model.services.values() {
        let s = translate_service(service, config, client_tls);
        out.clusters.extend(s.clusters);
        out.endpoints.extend(s.endpoints);
        out.listeners.extend(s.listeners);
        out.scopes.extend(s.scopes);
        out.routes.extend(s.routes);
    }
    out.sorted()
}

/// The access grants whose destination is `proxy`'s identity.
pub fn grants_for<'m>(model: &'m MeshModel, proxy: &Workload) -> &'m [AccessGrant] {
    model
        .grants
        .get(&(proxy.namespace.clone(), proxy.service_account.clone()))
        .map_or(&[], Vec::as_slice)
}

/// Resources specific to one proxy: its inbound listener, local app clusters and secrets.
pub fn translate_workload(
    proxy: &Workload,
    grants: &[AccessGrant],
    config: &MeshConfig,
    secrets: Option<&WorkloadSecrets>,
) -> ProxyResources {
    let mut out = ProxyResources::default();
    clusters::translate_inbound_clusters(proxy, config, &mut out);
    listeners::translate_inbound_listener(proxy, grants, config, secrets.is_some(), &mut out);
    listeners::translate_inbound_routes(proxy, grants, config, &mut out);
    listeners::translate_probe_listener(proxy, config, &mut out);
    if let Some(secrets) = secrets {
        out.secrets = tls::translate_secrets(secrets);
    }
    out.sorted()
}

/// Translates the model into every resource of `proxy`'s sidecar.
pub fn translate_proxy(
    model: &MeshModel,
    config: &MeshConfig,
    proxy: &Workload,
    secrets: Option<&WorkloadSecrets>,
) -> ProxyResources {
    let mut out = translate_shared(model, config, secrets.is_some());
    // The proxy's namespace's consumer routes replace the shared configurations.
    for (ns, route) in model
        .services
        .values()
        .flat_map(|s| routes::consumer_route_configs(s, config))
    {
        if ns == proxy.namespace
            && let Some(slot) = out.routes.iter_mut().find(|r| r.name == route.name)
        {
            *slot = route;
        }
    }
    let own = translate_workload(proxy, grants_for(model, proxy), config, secrets);
    out.clusters.extend(own.clusters);
    out.endpoints.extend(own.endpoints);
    out.listeners.extend(own.listeners);
    out.routes.extend(own.routes);
    out.secrets.extend(own.secrets);
    out.sorted()
}
