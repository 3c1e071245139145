//! Pure translation: (mesh model, one proxy) → that proxy's Envoy resources.
//!
//! Deterministic: the model is ordered (BTreeMap, sorted vectors), so an
//! unchanged model gives byte-identical resources and therefore no push.

mod clusters;
mod envoy;
mod http;
mod listeners;
mod rbac;
mod routes;
mod settings;
mod tls;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use weft_xds::{Resource, Snapshot, type_url};

pub use clusters::{INBOUND_PASSTHROUGH_SOURCE_V4, INBOUND_PASSTHROUGH_SOURCE_V6};
pub use http::{PathOutcome, normalize_request_path};
pub use rbac::path_prefix_regex;
pub use settings::{AccessMode, DEFAULT_DETECTION_TIMEOUT, MeshConfig, MtlsMode};
pub use tls::{IDENTITY_SECRET, TRUST_BUNDLE_SECRET};

use crate::identity::WorkloadSecrets;
use crate::index::{AccessGrant, AppProtocol, MeshModel, ServiceKey, Workload};

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
fn model_has_ipv6(model: &MeshModel) -> bool {
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

/// Meshed pod IPs by identity (namespace, service account).
type PodIpsByIdentity = std::collections::BTreeMap<(String, String), Vec<std::net::IpAddr>>;

/// Meshed pods with an IP, by identity: a client reaches them by pod IP over mTLS, as
/// it reaches them through a service.
fn meshed_pod_ips(model: &MeshModel) -> PodIpsByIdentity {
    let mut out = PodIpsByIdentity::new();
    for w in model.workloads.values().filter(|w| w.meshed) {
        if !w.ips.is_empty() {
            out.entry((w.namespace.clone(), w.service_account.clone()))
                .or_default()
                .extend(&w.ips);
        }
    }
    for ips in out.values_mut() {
        ips.sort();
        ips.dedup();
    }
    out
}

/// Name of the cluster that reaches pods of one identity by their IP, over mTLS.
pub fn pod_identity_cluster_name(namespace: &str, service_account: &str) -> String {
    format!("outbound-pods|{namespace}|{service_account}")
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

/// Resources every proxy gets alike: outbound clusters, endpoints, listeners, routes.
/// Translated (and encoded) once per model change, then shared by all proxies.
/// `client_tls` says whether the proxies have an identity to originate mTLS with.
pub fn translate_shared(
    model: &MeshModel,
    config: &MeshConfig,
    client_tls: bool,
) -> ProxyResources {
    let mut out = ProxyResources::default();
    // Only a proxy with an identity can originate mTLS to pods it calls by IP.
    let pod_ips = if client_tls {
        meshed_pod_ips(model)
    } else {
        PodIpsByIdentity::new()
    };
    clusters::translate_outbound_clusters(model, config, client_tls, &pod_ips, &mut out);
    listeners::translate_outbound_listeners(model, config, &pod_ips, &mut out);
    routes::translate_outbound_routes(model, config, &mut out);
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
    let own = translate_workload(proxy, grants_for(model, proxy), config, secrets);
    out.clusters.extend(own.clusters);
    out.endpoints.extend(own.endpoints);
    out.listeners.extend(own.listeners);
    out.routes.extend(own.routes);
    out.secrets.extend(own.secrets);
    out.sorted()
}
