//! Publishes the mesh into the xDS cache, at the cost of what changed and of who is
//! connected:
//!
//! - each service is translated and encoded once, when it changes, into shared
//!   layers: one set for the whole mesh and one per egress scope in use; every proxy
//!   references a set (and the outbound capture listener's) and is never given a copy;
//! - a proxy's own layer (inbound listener, its certificate) is built when it connects,
//!   rebuilt when its workload or the grants to its identity change, and dropped a
//!   while after it leaves; certificates are issued to connected proxies only;
//! - calls to pod IPs resolve their cluster on demand ([`ClusterResolver`]);
//! - consumer routes (GAMMA: an HTTPRoute in namespace N on a Service of another
//!   namespace) apply to N's callers only. The listeners stay shared and name the same
//!   route configuration for every caller; what differs is that configuration. So each
//!   namespace with consumer routes gets one more shared layer, `consumer:N`, holding
//!   just the route configurations its consumer routes change (one per Service port they
//!   attach to), placed before the mesh (or scope) layer in N's proxies' views: the first
//!   layer holding a name decides it (see `weft_xds::TypedResources`), so these replace
//!   the shared ones of the same name without copying the shared layer.
//!
//!   Cost at 10,000 services: the consumer layers hold one route configuration per
//!   (namespace, Service port) pair with consumer routes, so memory grows with consumer
//!   routes only, never with services or proxies (a proxy's view gains one layer
//!   reference). A change to a service re-translates its shared configuration plus one
//!   variant per namespace routing it, and rewrites only those namespaces' small layers
//!   (the mesh layers are untouched by consumer routes); a namespace's first or last
//!   consumer route re-layers its connected proxies (their own snapshots, not their
//!   config). The xDS server composes views as before; a view whose layers share a name
//!   filters shadowed ones when walked whole (a map lookup per resource into the small
//!   layer), and delta diffs judge a changed name by what the whole view shows.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use weft_xds::{
    Layer, LayerRef, NodeDemand, NodeSnapshot, Resource, ResourceInterner, Snapshot, SnapshotCache,
    type_url,
};

use crate::error::WeftError;
use crate::identity::{CertificateAuthority, WorkloadCertificates};
use crate::index::{EgressScope, MeshModel, ModelDelta, ServiceKey, Workload};
use crate::translate::{
    MeshConfig, OutboundShape, PodBlock, ServiceOutbound, capture_outbound, clusters_on_demand,
    clusters_pinned, common_clusters, grants_for, pod_block_of, pod_cluster, pod_cluster_ip,
    service_shape, translate_service, translate_workload,
};

/// How long a departed proxy's resources are kept, so a quick reconnect (a control
/// plane restart seen from the proxy, a flapping network) costs nothing.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(60);

/// Shared snapshot of the whole mesh, for proxies with an identity.
const MESH: &str = "mesh";
/// Shared snapshot of the whole mesh in plaintext (no identity, and the fallback).
const MESH_PLAIN: &str = "mesh-plain";
/// Shared snapshot of the whole mesh for proxies that fetch HTTP services' clusters
/// on demand: the clusters they must hold from the start, and everything else.
const MESH_ON_DEMAND: &str = "mesh-on-demand";
/// Shared outbound capture listener that discovers pod clusters on demand.
const CAPTURE_ON_DEMAND: &str = "capture";
/// Shared outbound capture listener without on-demand discovery.
const CAPTURE_PLAIN: &str = "capture-plain";
/// Prefix of a namespace's consumer route configurations (`consumer:NAMESPACE`).
const CONSUMER: &str = "consumer:";

/// What one publish did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Proxies connected and known (with resources of their own).
    pub proxies: usize,
    /// Services re-translated.
    pub services: usize,
    /// Proxies whose own resources changed (and so get a push).
    pub changed: usize,
    /// Certificates issued or renewed.
    pub issued: usize,
}

/// The CA and the certificates it issued to workloads.
#[derive(Debug)]
pub struct MeshIdentity {
    ca: CertificateAuthority,
    certs: WorkloadCertificates,
}

impl MeshIdentity {
    /// Identity for a mesh: `ttl`-long certificates from `ca` in the config's trust domain.
    pub fn new(ca: CertificateAuthority, config: &MeshConfig, ttl: Duration) -> Self {
        Self {
            ca,
            certs: WorkloadCertificates::new(&config.trust_domain, ttl),
        }
    }
}

/// One service, translated and encoded.
#[derive(Debug, Default)]
struct EncodedService {
    /// Clusters originating mTLS (for proxies with an identity).
    clusters_tls: Vec<Resource>,
    /// Clusters in plaintext (no identity; the fallback).
    clusters_plain: Vec<Resource>,
    endpoints: Vec<Resource>,
    listeners: Vec<Resource>,
    scopes: Vec<Resource>,
    routes: Vec<Resource>,
    /// The service blocks and HTTP ports it brings to the capture listener.
    shape: (Vec<PodBlock>, Vec<u16>),
    /// Route configurations of callers' namespaces with consumer routes on it.
    consumer: BTreeMap<String, Vec<Resource>>,
    /// Its clusters a proxy may fetch on demand, and the clusters (anyone's) its
    /// resources reach where nothing fetches them (see `clusters_pinned`).
    on_demand: (Vec<String>, Vec<String>),
}

fn encode(type_url: &str, items: Vec<(String, impl prost::Message)>) -> Vec<Resource> {
    // Not `into_iter().map().collect()`: that reuses the message vector's buffer, and
    // every service would keep a few KiB of it (8 MiB at 1,000 services).
    let mut out = Vec::with_capacity(items.len());
    out.extend(
        items
            .into_iter()
            .map(|(name, m)| Resource::encode(type_url, name, &m)),
    );
    out
}

impl EncodedService {
    fn new(
        tls: ServiceOutbound,
        plain: ServiceOutbound,
        shape: (Vec<PodBlock>, Vec<u16>),
        on_demand: (Vec<String>, Vec<String>),
    ) -> Self {
        let mut consumer: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
        for (ns, r) in tls.consumer_routes {
            consumer.entry(ns).or_default().push(Resource::encode(
                type_url::ROUTE,
                r.name.clone(),
                &r,
            ));
        }
        Self {
            consumer,
            shape,
            on_demand,
            scopes: encode(
                type_url::SCOPED_ROUTE,
                tls.scopes
                    .into_iter()
                    .map(|s| (s.name.clone(), s))
                    .collect(),
            ),
            clusters_tls: encode(
                type_url::CLUSTER,
                tls.clusters
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect(),
            ),
            clusters_plain: encode(
                type_url::CLUSTER,
                plain
                    .clusters
                    .into_iter()
                    .map(|c| (c.name.clone(), c))
                    .collect(),
            ),
            endpoints: encode(
                type_url::ENDPOINT,
                tls.endpoints
                    .into_iter()
                    .map(|e| (e.cluster_name.clone(), e))
                    .collect(),
            ),
            listeners: encode(
                type_url::LISTENER,
                tls.listeners
                    .into_iter()
                    .map(|l| (l.name.clone(), l))
                    .collect(),
            ),
            routes: encode(
                type_url::ROUTE,
                tls.routes
                    .into_iter()
                    .map(|r| (r.name.clone(), r))
                    .collect(),
            ),
        }
    }

    /// The resources of one part of a layer set.
    fn part(&self, part: Part) -> &[Resource] {
        match part {
            Part::ClustersTls => &self.clusters_tls,
            Part::ClustersPlain => &self.clusters_plain,
            Part::Endpoints => &self.endpoints,
            Part::Listeners => &self.listeners,
            Part::Scopes => &self.scopes,
            Part::Routes => &self.routes,
        }
    }
}

/// Counts `added` in and `removed` out of `counts` (a key stays while its count is
/// positive); whether the set of keys differs afterwards.
fn count_shape<K: Ord + Clone>(
    counts: &mut BTreeMap<K, usize>,
    removed: &[K],
    added: &[K],
) -> bool {
    let touched: BTreeSet<&K> = removed.iter().chain(added).collect();
    let before: Vec<bool> = touched.iter().map(|k| counts.contains_key(*k)).collect();
    for k in added {
        *counts.entry(k.clone()).or_default() += 1;
    }
    for k in removed {
        if let Some(n) = counts.get_mut(k) {
            *n -= 1;
            if *n == 0 {
                counts.remove(k);
            }
        }
    }
    touched
        .iter()
        .zip(before)
        .any(|(k, was)| counts.contains_key(*k) != was)
}

/// Which clusters a proxy is given from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Every cluster, originating mTLS.
    Tls,
    /// Every cluster, in plaintext (no identity).
    Plain,
    /// mTLS, without the clusters it fetches on demand.
    OnDemand,
}

impl Variant {
    /// The shared snapshot of the whole mesh in this variant.
    fn mesh(self) -> &'static str {
        match self {
            Self::Tls => MESH,
            Self::Plain => MESH_PLAIN,
            Self::OnDemand => MESH_ON_DEMAND,
        }
    }

    /// The shared snapshot of egress scope `key` in this variant.
    fn scope(self, key: &str) -> String {
        let prefix = match self {
            Self::Tls => "scope",
            Self::Plain => "scope-plain",
            Self::OnDemand => "scope-on-demand",
        };
        format!("{prefix}:{key}")
    }
}

/// Clusters of HTTP services a proxy may fetch on demand, and clusters every proxy
/// must hold (reached by a TCP proxy, an undeclared port's connection manager or a
/// mirror), counted over every service.
#[derive(Debug, Default)]
struct OnDemandClusters {
    lazy: BTreeMap<String, usize>,
    pinned: BTreeMap<String, usize>,
}

impl OnDemandClusters {
    /// Whether a proxy fetching clusters on demand is spared `name` at first.
    fn spared(&self, name: &str) -> bool {
        self.lazy.contains_key(name) && !self.pinned.contains_key(name)
    }
}

/// The parts of a layer set: one layer each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    ClustersTls,
    ClustersPlain,
    Endpoints,
    Listeners,
    Scopes,
    Routes,
}

const PARTS: [Part; 6] = [
    Part::ClustersTls,
    Part::ClustersPlain,
    Part::Endpoints,
    Part::Listeners,
    Part::Scopes,
    Part::Routes,
];

/// The outbound resources of a set of services, one layer per part.
#[derive(Debug, Default)]
struct LayerSet {
    layers: BTreeMap<Part, LayerRef>,
    /// The mTLS clusters a proxy fetching clusters on demand holds from the start.
    eager: LayerRef,
}

impl LayerSet {
    /// Replaces `old` resources by `new` ones in every part; returns whether any changed.
    fn update(&mut self, changes: &[(Option<&EncodedService>, Option<&EncodedService>)]) -> bool {
        let mut changed = false;
        for part in PARTS {
            // Removals first: a name one service gives up (a ClusterIP's listener) may be
            // taken by another in the same change.
            let mut removed: Vec<&str> = Vec::new();
            let mut upserted: Vec<&Resource> = Vec::new();
            for (old, new) in changes {
                let before = old.map_or(&[][..], |s| s.part(part));
                let after = new.map_or(&[][..], |s| s.part(part));
                for r in before {
                    if !after.iter().any(|n| n.name() == r.name()) {
                        removed.push(r.name());
                    }
                }
                for r in after {
                    if before.iter().find(|o| o.name() == r.name()) != Some(r) {
                        upserted.push(r);
                    }
                }
            }
            if removed.is_empty() && upserted.is_empty() {
                continue;
            }
            let current = self.layers.entry(part).or_default();
            let mut items = current.items().to_map();
            for name in removed {
                items.remove(name);
            }
            for r in upserted {
                items.insert(r.name().to_string(), r.clone());
            }
            *current = Arc::new(Layer::from_map(items));
            changed = true;
        }
        changed
    }

    /// [`LayerSet::update`], then the clusters on-demand proxies hold from the start,
    /// refiltered only when the mTLS clusters or (`spared_changed`) which clusters they
    /// are spared changed. Returns whether anything changed, and whether the mTLS
    /// clusters did.
    fn apply(
        &mut self,
        changes: &[(Option<&EncodedService>, Option<&EncodedService>)],
        on_demand: &OnDemandClusters,
        spared_changed: bool,
    ) -> (bool, bool) {
        let before = self.layers.get(&Part::ClustersTls).cloned();
        let mut changed = !changes.is_empty() && self.update(changes);
        let clusters_changed = match (&before, self.layers.get(&Part::ClustersTls)) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (a, b) => a.is_some() != b.is_some(),
        };
        if clusters_changed || spared_changed {
            changed |= self.refresh_eager(on_demand);
        }
        (changed, clusters_changed)
    }

    /// Refilters the clusters held from the start by on-demand proxies; whether they
    /// changed. Walks every mTLS cluster.
    fn refresh_eager(&mut self, on_demand: &OnDemandClusters) -> bool {
        let kept: Vec<Resource> = self
            .layers
            .get(&Part::ClustersTls)
            .map(|l| {
                l.items()
                    .values()
                    .filter(|r| !on_demand.spared(r.name()))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if self.eager.items().values().eq(kept.iter()) {
            return false;
        }
        self.eager = Arc::new(Layer::new(kept));
        true
    }

    /// The snapshot of one variant: which clusters, with the rest.
    fn snapshot(&self, variant: Variant) -> Snapshot {
        let mut s = Snapshot::new();
        let clusters = match variant {
            Variant::Tls => self.layers.get(&Part::ClustersTls),
            Variant::Plain => self.layers.get(&Part::ClustersPlain),
            Variant::OnDemand => Some(&self.eager),
        };
        if let Some(layer) = clusters {
            s.add_layer(type_url::CLUSTER, layer.clone());
        }
        for (part, type_url) in [
            (Part::Endpoints, type_url::ENDPOINT),
            (Part::Listeners, type_url::LISTENER),
            (Part::Scopes, type_url::SCOPED_ROUTE),
            (Part::Routes, type_url::ROUTE),
        ] {
            if let Some(layer) = self.layers.get(&part) {
                s.add_layer(type_url, layer.clone());
            }
        }
        s
    }
}

/// The shared layers of one egress scope in use, and how many proxies use it.
#[derive(Debug)]
struct ScopeLayers {
    scope: EgressScope,
    variant: Variant,
    layers: LayerSet,
    users: usize,
}

/// A connected proxy with resources of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeState {
    /// Names of the shared snapshots under its own layer.
    shared: Vec<String>,
    /// The scope key it uses, if scoped.
    scope: Option<String>,
}

/// Pod IPs and who runs behind them, for clusters resolved on demand.
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: RwLock<DirectoryState>,
}

#[derive(Debug, Default)]
struct DirectoryState {
    /// Meshed pod IP → (namespace, service account).
    meshed: HashMap<IpAddr, (String, String)>,
    config: MeshConfig,
    /// Every service's mTLS clusters, for proxies that fetch them on demand.
    clusters: LayerRef,
}

/// Answers on-demand requests for clusters: `pod|<ip>` ones from the [`PodDirectory`],
/// services' from their shared mTLS clusters.
#[derive(Debug)]
pub struct ClusterResolver {
    directory: Arc<PodDirectory>,
}

impl weft_xds::OnDemandResolver for ClusterResolver {
    fn resolve(&self, _node: &str, own: bool, type_url: &str, name: &str) -> Option<Resource> {
        if type_url != type_url::CLUSTER {
            return None;
        }
        let state = self
            .directory
            .pods
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(ip) = pod_cluster_ip(name) else {
            // A service's cluster, for a proxy with an identity (the plaintext variant
            // holds every cluster from the start).
            return state.clusters.items().get(name).filter(|_| own).cloned();
        };
        // mTLS only from a proxy that has an identity to present, to a pod that has one.
        let identity = state
            .meshed
            .get(&ip)
            .filter(|_| own)
            .map(|(ns, sa)| (ns.as_str(), sa.as_str()));
        let cluster = pod_cluster(ip, identity, &state.config);
        Some(Resource::encode(type_url::CLUSTER, name, &cluster))
    }
}

/// Turns models and their deltas into shared layers and per-proxy snapshots.
#[derive(Debug)]
pub struct MeshPublisher {
    cache: Arc<SnapshotCache>,
    flags: MeshConfig,
    config: MeshConfig,
    identity: Option<MeshIdentity>,
    directory: Arc<PodDirectory>,
    services: BTreeMap<ServiceKey, EncodedService>,
    /// Which clusters on-demand proxies may be spared, over every service.
    on_demand: OnDemandClusters,
    mesh: LayerSet,
    scopes: BTreeMap<String, ScopeLayers>,
    /// Per namespace with consumer routes: its route configurations (never empty).
    consumers: BTreeMap<String, LayerRef>,
    /// Namespaces whose consumer layer appeared or went in this change: their proxies
    /// are re-layered, then a gone layer is unpublished.
    consumers_moved: BTreeSet<String>,
    /// Meshed pod IPs per block.
    blocks: BTreeMap<PodBlock, usize>,
    /// Services per service block and per HTTP port (the capture listener's shape).
    service_blocks: BTreeMap<PodBlock, usize>,
    http_ports: BTreeMap<u16, usize>,
    /// A service block or HTTP port appeared or went in this change.
    shape_changed: bool,
    /// IPs of every workload published, to update blocks and the directory.
    workload_ips: HashMap<String, (Vec<IpAddr>, bool)>,
    /// Services with an IPv6 ClusterIP.
    v6_services: BTreeSet<ServiceKey>,
    /// Workloads (meshed or not) with an IPv6 address.
    v6_workloads: usize,
    /// Every connected node and its ADS variant.
    connected: BTreeMap<String, &'static str>,
    /// Connected nodes that are known workloads, with resources of their own.
    nodes: BTreeMap<String, NodeState>,
    /// Nodes whose last stream closed, and when.
    departed: BTreeMap<String, Instant>,
    /// The plaintext capture snapshot (under the fallback).
    capture_plain: Snapshot,
    primed: bool,
    /// Nodes' own resources that are equal from one node to the next, held once.
    own_resources: ResourceInterner,
}

impl MeshPublisher {
    /// A publisher into `cache` with the mesh settings of the flags (a MeshConfig in the
    /// model overrides them); without identity, proxies get plaintext config.
    pub fn new(
        cache: Arc<SnapshotCache>,
        flags: MeshConfig,
        identity: Option<MeshIdentity>,
    ) -> Self {
        let directory = Arc::new(PodDirectory::default());
        Self {
            cache,
            config: flags.clone(),
            flags,
            identity,
            directory,
            services: BTreeMap::new(),
            on_demand: OnDemandClusters::default(),
            mesh: LayerSet::default(),
            scopes: BTreeMap::new(),
            consumers: BTreeMap::new(),
            consumers_moved: BTreeSet::new(),
            blocks: BTreeMap::new(),
            service_blocks: BTreeMap::new(),
            http_ports: BTreeMap::new(),
            shape_changed: false,
            workload_ips: HashMap::new(),
            v6_services: BTreeSet::new(),
            v6_workloads: 0,
            connected: BTreeMap::new(),
            nodes: BTreeMap::new(),
            departed: BTreeMap::new(),
            capture_plain: Snapshot::new(),
            primed: false,
            own_resources: ResourceInterner::default(),
        }
    }

    /// The resolver of on-demand pod clusters, for the ADS service.
    pub fn resolver(&self) -> Arc<ClusterResolver> {
        Arc::new(ClusterResolver {
            directory: self.directory.clone(),
        })
    }

    /// The CA, when the mesh has identity.
    pub fn ca(&self) -> Option<&CertificateAuthority> {
        self.identity.as_ref().map(|i| &i.ca)
    }

    /// When the first certificate of a connected proxy expires.
    pub fn earliest_certificate_expiry(&self) -> Option<SystemTime> {
        self.identity
            .as_ref()
            .and_then(|i| i.certs.earliest_expiry())
    }

    /// When the next certificate of a connected proxy is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.identity.as_ref().and_then(|i| i.certs.next_renewal())
    }

    /// The mesh settings in effect (the flags, overridden by the model's MeshConfig).
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// Brings the shared layers and every connected proxy up to `model`, given what
    /// changed. The first call (or a settings change) translates everything.
    pub fn apply(
        &mut self,
        model: &MeshModel,
        delta: &ModelDelta,
        now: SystemTime,
    ) -> Result<PublishStats, WeftError> {
        let mut stats = PublishStats::default();
        let config = self.flags.effective(model);
        let everything = !self.primed || config != self.config || delta.settings;
        self.config = config;
        self.primed = true;
        let services: BTreeSet<ServiceKey> = if everything {
            self.services
                .keys()
                .chain(model.services.keys())
                .cloned()
                .collect()
        } else {
            delta.services.clone()
        };
        stats.services = self.update_services(model, &services, everything);
        let workloads: Vec<String> = if everything {
            self.workload_ips
                .keys()
                .chain(model.workloads.keys())
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            delta.workloads.iter().cloned().collect()
        };
        let capture_changed = self.update_pod_directory(model, &workloads, everything);
        if everything || capture_changed || std::mem::take(&mut self.shape_changed) {
            self.publish_capture();
        }
        // Proxies whose own resources may differ.
        let mut affected: BTreeSet<String> = BTreeSet::new();
        if everything {
            affected.extend(self.connected.keys().cloned());
        } else {
            // A namespace's consumer layer appeared or went: its proxies' views change.
            for node in self.nodes.keys() {
                if model
                    .workloads
                    .get(node)
                    .is_some_and(|w| self.consumers_moved.contains(&w.namespace))
                {
                    affected.insert(node.clone());
                }
            }
            affected.extend(
                delta
                    .workloads
                    .iter()
                    .filter(|n| self.connected.contains_key(*n))
                    .cloned(),
            );
            for node in self.nodes.keys() {
                let Some(w) = model.workloads.get(node) else {
                    continue;
                };
                if delta
                    .grants
                    .contains(&(w.namespace.clone(), w.service_account.clone()))
                {
                    affected.insert(node.clone());
                }
            }
        }
        for node in affected {
            let (changed, issued) = self.build_node(model, &node, now)?;
            stats.changed += usize::from(changed);
            stats.issued += usize::from(issued);
        }
        // Gone consumer layers, now that no proxy's view names them.
        for ns in std::mem::take(&mut self.consumers_moved) {
            if !self.consumers.contains_key(&ns) {
                self.cache.remove_shared(&format!("{CONSUMER}{ns}"));
            }
        }
        stats.proxies = self.nodes.len();
        Ok(stats)
    }

    /// A proxy came or went: builds its resources when it connects, schedules their
    /// removal when it leaves.
    pub fn on_demand(
        &mut self,
        model: &MeshModel,
        demand: &NodeDemand,
        now: SystemTime,
    ) -> Result<PublishStats, WeftError> {
        let mut stats = PublishStats::default();
        if demand.connected {
            self.departed.remove(&demand.node);
            let before = self.connected.insert(demand.node.clone(), demand.protocol);
            if before != Some(demand.protocol) || !self.nodes.contains_key(&demand.node) {
                let (changed, issued) = self.build_node(model, &demand.node, now)?;
                stats.changed += usize::from(changed);
                stats.issued += usize::from(issued);
            }
        } else {
            self.departed.insert(demand.node.clone(), Instant::now());
        }
        stats.proxies = self.nodes.len();
        Ok(stats)
    }

    /// Drops the resources of proxies gone for longer than [`DEPARTED_GRACE`]; returns
    /// when to call again.
    pub fn sweep(&mut self, now: Instant) -> Option<Instant> {
        let expired: Vec<String> = self
            .departed
            .iter()
            .filter(|(_, t)| now.duration_since(**t) >= DEPARTED_GRACE)
            .map(|(n, _)| n.clone())
            .collect();
        for node in expired {
            self.departed.remove(&node);
            self.connected.remove(&node);
            self.drop_node(&node);
        }
        self.departed.values().min().map(|t| *t + DEPARTED_GRACE)
    }

    /// Renews the certificates due at `now` and republishes those proxies.
    pub fn renew(&mut self, model: &MeshModel, now: SystemTime) -> Result<PublishStats, WeftError> {
        let mut stats = PublishStats::default();
        let due = self
            .identity
            .as_ref()
            .map(|i| i.certs.due(now))
            .unwrap_or_default();
        for node in due {
            let (changed, issued) = self.build_node(model, &node, now)?;
            stats.changed += usize::from(changed);
            stats.issued += usize::from(issued);
        }
        stats.proxies = self.nodes.len();
        Ok(stats)
    }

    /// Re-translates `keys` and applies them to the mesh and scope layers (published
    /// when they change, or always with `publish_all`).
    fn update_services(
        &mut self,
        model: &MeshModel,
        keys: &BTreeSet<ServiceKey>,
        publish_all: bool,
    ) -> usize {
        let mut replaced: Vec<(ServiceKey, Option<EncodedService>)> = Vec::new();
        // Whether the clusters on-demand proxies are spared may differ.
        let mut spared_changed = false;
        for key in keys {
            let next = model.services.get(key).map(|service| {
                let tls = translate_service(service, &self.config, true);
                let on_demand = (
                    clusters_on_demand(service, &self.config),
                    clusters_pinned(service, &tls, &self.config),
                );
                EncodedService::new(
                    tls,
                    translate_service(service, &self.config, false),
                    service_shape(std::iter::once(&**service), &self.config),
                    on_demand,
                )
            });
            match model.services.get(key) {
                Some(s) if s.cluster_ips.iter().any(IpAddr::is_ipv6) => {
                    self.v6_services.insert(key.clone());
                }
                _ => {
                    self.v6_services.remove(key);
                }
            }
            let old = match next {
                Some(n) => self.services.insert(key.clone(), n),
                None => self.services.remove(key),
            };
            // What the service brought to the mesh-wide counts, and what it brings now.
            let none = EncodedService::default();
            let was = old.as_ref().unwrap_or(&none);
            let is = self.services.get(key).unwrap_or(&none);
            self.shape_changed |= count_shape(&mut self.service_blocks, &was.shape.0, &is.shape.0);
            self.shape_changed |= count_shape(&mut self.http_ports, &was.shape.1, &is.shape.1);
            spared_changed |=
                count_shape(&mut self.on_demand.lazy, &was.on_demand.0, &is.on_demand.0);
            spared_changed |= count_shape(
                &mut self.on_demand.pinned,
                &was.on_demand.1,
                &is.on_demand.1,
            );
            replaced.push((key.clone(), old));
        }
        let changes: Vec<(Option<&EncodedService>, Option<&EncodedService>)> = replaced
            .iter()
            .map(|(k, old)| (old.as_ref(), self.services.get(k)))
            .collect();
        let (changed, clusters_changed) =
            self.mesh.apply(&changes, &self.on_demand, spared_changed);
        let mesh_changed = changed || publish_all;
        if clusters_changed {
            // Streams holding clusters fetched on demand resolve them again.
            self.directory
                .pods
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clusters = self
                .mesh
                .layers
                .get(&Part::ClustersTls)
                .cloned()
                .unwrap_or_default();
            self.cache.bump_on_demand();
        }
        if mesh_changed {
            for variant in [Variant::Tls, Variant::Plain, Variant::OnDemand] {
                self.cache
                    .set_shared(variant.mesh(), self.mesh.snapshot(variant));
            }
        }
        for (name, scope) in &mut self.scopes {
            let mine: Vec<(Option<&EncodedService>, Option<&EncodedService>)> = replaced
                .iter()
                .zip(&changes)
                .filter(|((k, _), _)| scope.scope.includes(k))
                .map(|(_, c)| *c)
                .collect();
            let (changed, _) = scope.layers.apply(&mine, &self.on_demand, spared_changed);
            if changed {
                self.cache
                    .set_shared(name, scope.layers.snapshot(scope.variant));
            }
        }
        update_consumers(
            &mut self.consumers,
            &mut self.consumers_moved,
            &self.cache,
            &changes,
        );
        drop(changes);
        if mesh_changed {
            self.publish_fallback();
        }
        replaced.len()
    }

    /// Updates pod blocks and the on-demand directory; returns whether the capture
    /// listener changes (a block appeared or went, IPv6 came or went).
    fn update_pod_directory(
        &mut self,
        model: &MeshModel,
        nodes: &[String],
        everything: bool,
    ) -> bool {
        let ipv6_before = self.ipv6();
        // Blocks of meshed pod IPs that went and came, counted once at the end.
        let mut gone: Vec<PodBlock> = Vec::new();
        let mut came: Vec<PodBlock> = Vec::new();
        let mut directory = self
            .directory
            .pods
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut directory_changed = everything;
        if everything {
            directory.config = self.config.clone();
        }
        for node in nodes {
            if let Some((ips, meshed)) = self.workload_ips.remove(node) {
                self.v6_workloads -= usize::from(ips.iter().any(IpAddr::is_ipv6));
                if meshed {
                    for ip in ips {
                        directory.meshed.remove(&ip);
                        gone.push(pod_block_of(ip));
                    }
                }
                directory_changed = true;
            }
            if let Some(w) = model.workloads.get(node) {
                self.v6_workloads += usize::from(w.ips.iter().any(IpAddr::is_ipv6));
                if w.meshed {
                    for ip in &w.ips {
                        directory
                            .meshed
                            .insert(*ip, (w.namespace.clone(), w.service_account.clone()));
                        came.push(pod_block_of(*ip));
                    }
                }
                self.workload_ips
                    .insert(node.clone(), (w.ips.clone(), w.meshed));
                directory_changed = true;
            }
        }
        drop(directory);
        if directory_changed {
            self.cache.bump_on_demand();
        }
        let blocks_changed = count_shape(&mut self.blocks, &gone, &came);
        blocks_changed || ipv6_before != self.ipv6()
    }

    /// Whether the mesh uses IPv6 anywhere, as `model_has_ipv6` says.
    fn ipv6(&self) -> bool {
        !self.v6_services.is_empty() || self.v6_workloads > 0
    }

    /// Publishes the two outbound capture snapshots, then the fallback.
    fn publish_capture(&mut self) {
        let shape = OutboundShape {
            pod_blocks: self.blocks.keys().copied().collect(),
            service_blocks: self.service_blocks.keys().copied().collect(),
            http_ports: self.http_ports.keys().copied().collect(),
        };
        let ipv6 = self.ipv6();
        // The passthrough and, with tracing on, the collector.
        let clusters: Vec<Resource> = common_clusters(&self.config)
            .iter()
            .map(|c| Resource::encode(type_url::CLUSTER, c.name.clone(), c))
            .collect();
        for (name, on_demand) in [(CAPTURE_ON_DEMAND, true), (CAPTURE_PLAIN, false)] {
            let listener = capture_outbound(&shape, on_demand, ipv6, &self.config);
            let snapshot = Snapshot::new()
                .with(type_url::CLUSTER, clusters.iter().cloned())
                .with(
                    type_url::LISTENER,
                    [Resource::encode(
                        type_url::LISTENER,
                        listener.name.clone(),
                        &listener,
                    )],
                );
            self.cache.set_shared(name, snapshot.clone());
            if !on_demand {
                self.capture_plain = snapshot;
            }
        }
        self.publish_fallback();
    }

    /// What a proxy without its own config gets: plaintext outbound for the whole mesh.
    fn publish_fallback(&self) {
        self.cache.set_fallback(Snapshot::layered(&[
            &self.capture_plain,
            &self.mesh.snapshot(Variant::Plain),
        ]));
    }

    /// The shared snapshots a proxy uses and the scope it holds a reference to.
    fn shared_for(
        &mut self,
        workload: &Workload,
        protocol: &'static str,
        tls: bool,
    ) -> (Vec<String>, Option<String>) {
        // Clusters on demand need delta xDS and an identity to originate mTLS with.
        let delta = tls && protocol == "delta";
        let capture = if delta {
            CAPTURE_ON_DEMAND
        } else {
            CAPTURE_PLAIN
        };
        let variant = match (tls, delta && workload.clusters_on_demand) {
            (false, _) => Variant::Plain,
            (true, false) => Variant::Tls,
            (true, true) => Variant::OnDemand,
        };
        // A namespace's consumer routes go before the mesh's (or scope's): first wins.
        let mut shared = vec![capture.to_string()];
        if self.consumers.contains_key(&workload.namespace) {
            shared.push(format!("{CONSUMER}{}", workload.namespace));
        }
        let Some(scope) = &workload.egress else {
            shared.push(variant.mesh().to_string());
            return (shared, None);
        };
        let name = variant.scope(&scope.key());
        if !self.scopes.contains_key(&name) {
            let mut layers = LayerSet::default();
            let members: Vec<(Option<&EncodedService>, Option<&EncodedService>)> = self
                .services
                .iter()
                .filter(|(k, _)| scope.includes(k))
                .map(|(_, s)| (None, Some(s)))
                .collect();
            layers.apply(&members, &self.on_demand, false);
            self.cache.set_shared(&name, layers.snapshot(variant));
            self.scopes.insert(
                name.clone(),
                ScopeLayers {
                    scope: scope.clone(),
                    variant,
                    layers,
                    users: 0,
                },
            );
        }
        shared.push(name.clone());
        (shared, Some(name))
    }

    fn release_scope(&mut self, name: &str) {
        if let Some(scope) = self.scopes.get_mut(name) {
            scope.users = scope.users.saturating_sub(1);
            if scope.users == 0 {
                self.scopes.remove(name);
                self.cache.remove_shared(name);
            }
        }
    }

    /// (Re)builds a connected node's own resources from the model: issues its
    /// certificate if needed. Returns (whether its snapshot changed, whether a
    /// certificate was issued). Unknown or gone workloads lose their resources.
    fn build_node(
        &mut self,
        model: &MeshModel,
        node: &str,
        now: SystemTime,
    ) -> Result<(bool, bool), WeftError> {
        let (Some(protocol), Some(workload)) =
            (self.connected.get(node).copied(), model.workloads.get(node))
        else {
            self.drop_node(node);
            return Ok((false, false));
        };
        let mut issued = false;
        let secrets = match &mut self.identity {
            Some(identity) if workload.meshed => {
                issued = identity.certs.ensure(&identity.ca, node, workload, now)?;
                identity.certs.secrets(node, &identity.ca)
            }
            _ => None,
        };
        let (shared, scope) = self.shared_for(workload, protocol, secrets.is_some());
        let state = NodeState { shared, scope };
        match self.nodes.get(node) {
            Some(old) if old.scope != state.scope => {
                if let Some(s) = state.scope.as_deref().and_then(|s| self.scopes.get_mut(s)) {
                    s.users += 1;
                }
                if let Some(old_scope) = old.scope.clone() {
                    self.release_scope(&old_scope);
                }
            }
            Some(_) => {}
            None => {
                if let Some(s) = state.scope.as_deref().and_then(|s| self.scopes.get_mut(s)) {
                    s.users += 1;
                }
            }
        }
        let own = translate_workload(
            workload,
            grants_for(model, workload),
            &self.config,
            secrets.as_ref(),
        )
        .to_snapshot()
        .interned(&mut self.own_resources);
        let changed = self.cache.set_node(
            node,
            NodeSnapshot {
                shared: state.shared.clone(),
                own,
            },
        );
        self.nodes.insert(node.to_string(), state);
        Ok((changed, issued))
    }

    fn drop_node(&mut self, node: &str) {
        if let Some(state) = self.nodes.remove(node) {
            if let Some(scope) = state.scope {
                self.release_scope(&scope);
            }
            self.cache.remove(node);
        }
        if let Some(identity) = &mut self.identity {
            identity.certs.forget(node);
        }
    }
}

/// Applies changed services to the consumer layers of the namespaces that route
/// them (before or after), publishing the layers that changed.
fn update_consumers(
    consumers: &mut BTreeMap<String, LayerRef>,
    moved: &mut BTreeSet<String>,
    cache: &SnapshotCache,
    changes: &[(Option<&EncodedService>, Option<&EncodedService>)],
) {
    let mut edits: BTreeMap<&str, (Vec<&str>, Vec<&Resource>)> = BTreeMap::new();
    let none = BTreeMap::new();
    for (old, new) in changes {
        let before = old.map_or(&none, |s| &s.consumer);
        let after = new.map_or(&none, |s| &s.consumer);
        for (ns, resources) in before {
            let kept = after.get(ns).map_or(&[][..], Vec::as_slice);
            for r in resources {
                if !kept.iter().any(|k| k.name() == r.name()) {
                    edits.entry(ns).or_default().0.push(r.name());
                }
            }
        }
        for (ns, resources) in after {
            let had = before.get(ns).map_or(&[][..], Vec::as_slice);
            for r in resources {
                if had.iter().find(|o| o.name() == r.name()) != Some(r) {
                    edits.entry(ns).or_default().1.push(r);
                }
            }
        }
    }
    for (ns, (removed, upserted)) in edits {
        let mut items = consumers
            .get(ns)
            .map(|l| l.items().to_map())
            .unwrap_or_default();
        for name in removed {
            items.remove(name);
        }
        for r in upserted {
            items.insert(r.name().to_string(), r.clone());
        }
        let name = format!("{CONSUMER}{ns}");
        if items.is_empty() {
            if consumers.remove(ns).is_some() {
                moved.insert(ns.to_string());
            }
            continue;
        }
        let layer = Arc::new(Layer::from_map(items));
        let mut snapshot = Snapshot::new();
        snapshot.add_layer(type_url::ROUTE, layer.clone());
        cache.set_shared(&name, snapshot);
        if consumers.insert(ns.to_string(), layer).is_none() {
            moved.insert(ns.to_string());
        }
    }
}
