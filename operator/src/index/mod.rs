//! The index: every input object by kind and namespace/name, resolved into a
//! validated [`MeshModel`]. Plain synchronous code; no I/O.

mod access;
mod few_set;
mod gateway;
mod model;
mod pod;
mod policy;
mod protocol;
mod resolve;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use weft_crds::TrafficPolicy;
use weft_crds::gateway::{GRPCRoute, ReferenceGrant};
use weft_crds::{HTTPRoute, HTTPRouteGroup, MeshConfig, TCPRoute, TrafficSplit, TrafficTarget};

pub use gateway::{RouteCondition, RouteParentState, RouteStatuses};
pub use model::{
    AccessGrant, AppProtocol, EgressEntry, EgressScope, FaultModel, GrantsByDestination, HashModel,
    HeaderChanges, HttpRequestMatch, HttpRouteEntry, Identity, MeshModel, MeshService,
    MeshSettings, MirrorModel, PathChange, PathMatch, PortPolicy, ProbeForward, Problem,
    ProtocolSource, RateLimitModel, RedirectModel, RetryModel, RewriteModel, RouteActionModel,
    RouteBackend, RouteMatchModel, ServiceEndpoint, ServiceKey, ServicePortModel, Sourced,
    SplitBackend, SplitModel, TcpGrant, ValueMatch, Workload, WorkloadPort,
};
pub use pod::{MeshPod, NamedPort};
pub use protocol::{DEFAULT_OPAQUE_PORTS, select_protocol};
pub use resolve::parse_gateway_duration;

use access::TargetResolution;
use few_set::FewSet;
use resolve::{
    clusterip_owners, creation_order, endpoint_ips, resolve_grants, resolve_mesh_config,
    resolve_service_base, resolve_splits, resolve_workload, split_references,
};
use store::{Key, Store, key_of};

/// The kinds of object the index understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// core/v1 Service.
    Service,
    /// core/v1 Pod.
    Pod,
    /// discovery.k8s.io/v1 EndpointSlice.
    EndpointSlice,
    /// split.smi-spec.io TrafficSplit.
    TrafficSplit,
    /// access.smi-spec.io TrafficTarget.
    TrafficTarget,
    /// specs.smi-spec.io HTTPRouteGroup.
    HTTPRouteGroup,
    /// specs.smi-spec.io TCPRoute.
    TCPRoute,
    /// core/v1 ServiceAccount.
    ServiceAccount,
    /// config.weft.dev MeshConfig (cluster-scoped).
    MeshConfig,
    /// gateway.networking.k8s.io HTTPRoute.
    HTTPRoute,
    /// gateway.networking.k8s.io GRPCRoute.
    GRPCRoute,
    /// gateway.networking.k8s.io ReferenceGrant.
    ReferenceGrant,
    /// policy.weft.dev TrafficPolicy.
    TrafficPolicy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Kind plus namespace/name: the identity of an input object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectRef {
    /// The object's kind.
    #[serde(serialize_with = "serialize_display")]
    pub kind: Kind,
    /// Namespace (`default` when the manifest gives none).
    pub namespace: String,
    /// Name.
    pub name: String,
}

fn serialize_display<S: serde::Serializer>(k: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(k)
}

impl ObjectRef {
    /// A reference from parts.
    pub fn new(kind: Kind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            // Cluster-scoped.
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Annotation kubectl stores a whole copy of the object in; the mesh never reads it.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops the metadata no part of the mesh reads, so that the index holds objects, not
/// their whole manifests (a real pod object is 5-20 KB, mostly managed fields, env and
/// volumes).
pub fn slim_meta(meta: &mut ObjectMeta) {
    // The resourceVersion changes with every write, status writes included: kept, every
    // echo of Weft's own status writes would look like a change of the object.
    meta.resource_version = None;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.finalizers = None;
    if let Some(annotations) = &mut meta.annotations {
        annotations.remove(LAST_APPLIED);
    }
}

/// One input object of any supported kind, shared, not copied, between a source that
/// keeps what it read (and its parse cache) and the index.
#[derive(Clone, Debug, PartialEq)]
pub enum MeshObject {
    /// A Service.
    Service(Arc<Service>),
    /// A Pod.
    Pod(Arc<MeshPod>),
    /// An EndpointSlice.
    EndpointSlice(Arc<EndpointSlice>),
    /// A TrafficSplit.
    TrafficSplit(Arc<TrafficSplit>),
    /// A TrafficTarget.
    TrafficTarget(Arc<TrafficTarget>),
    /// An HTTPRouteGroup.
    HTTPRouteGroup(Arc<HTTPRouteGroup>),
    /// A TCPRoute.
    TCPRoute(Arc<TCPRoute>),
    /// A ServiceAccount.
    ServiceAccount(Arc<ServiceAccount>),
    /// The mesh-wide settings.
    MeshConfig(Arc<MeshConfig>),
    /// A Gateway API HTTPRoute.
    HTTPRoute(Arc<HTTPRoute>),
    /// A Gateway API GRPCRoute.
    GRPCRoute(Arc<GRPCRoute>),
    /// A Gateway API ReferenceGrant.
    ReferenceGrant(Arc<ReferenceGrant>),
    /// A TrafficPolicy.
    TrafficPolicy(Arc<TrafficPolicy>),
}

impl MeshObject {
    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::Pod(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::TrafficSplit(o) => &o.metadata,
            Self::TrafficTarget(o) => &o.metadata,
            Self::HTTPRouteGroup(o) => &o.metadata,
            Self::TCPRoute(o) => &o.metadata,
            Self::ServiceAccount(o) => &o.metadata,
            Self::MeshConfig(o) => &o.metadata,
            Self::HTTPRoute(o) => &o.metadata,
            Self::GRPCRoute(o) => &o.metadata,
            Self::ReferenceGrant(o) => &o.metadata,
            Self::TrafficPolicy(o) => &o.metadata,
        }
    }

    /// The object's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::Pod(_) => Kind::Pod,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::TrafficSplit(_) => Kind::TrafficSplit,
            Self::TrafficTarget(_) => Kind::TrafficTarget,
            Self::HTTPRouteGroup(_) => Kind::HTTPRouteGroup,
            Self::TCPRoute(_) => Kind::TCPRoute,
            Self::ServiceAccount(_) => Kind::ServiceAccount,
            Self::MeshConfig(_) => Kind::MeshConfig,
            Self::HTTPRoute(_) => Kind::HTTPRoute,
            Self::GRPCRoute(_) => Kind::GRPCRoute,
            Self::ReferenceGrant(_) => Kind::ReferenceGrant,
            Self::TrafficPolicy(_) => Kind::TrafficPolicy,
        }
    }

    /// Kind, namespace (defaulted; empty for cluster-scoped kinds) and name.
    pub fn object_ref(&self) -> ObjectRef {
        let meta = self.meta();
        let namespace = match self {
            Self::MeshConfig(_) => "",
            _ => meta.namespace.as_deref().unwrap_or("default"),
        };
        ObjectRef::new(
            self.kind(),
            namespace,
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

/// One change of an input object, as every source reports them (the manifest
/// directory, the API server's watches).
#[derive(Clone, Debug, PartialEq)]
pub enum ObjectChange {
    /// The object is new or different.
    Upsert(MeshObject),
    /// The object is gone.
    Delete(ObjectRef),
}

/// An object Weft reports a status on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusSubject {
    /// Which object.
    pub object: ObjectRef,
    /// Its uid, when it came from an API server.
    pub uid: Option<String>,
    /// Its `metadata.generation`, when it came from an API server.
    pub generation: Option<i64>,
}

/// What a change did to the model: the entities whose resolved form differs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelDelta {
    /// Services added, changed or removed.
    pub services: BTreeSet<ServiceKey>,
    /// Workloads (node ids) added, changed or removed.
    pub workloads: BTreeSet<String>,
    /// Destination identities whose grants changed.
    pub grants: BTreeSet<(String, String)>,
    /// The mesh-wide settings changed.
    pub settings: bool,
    /// The list of problems, or the route statuses, changed.
    pub problems: bool,
}

impl ModelDelta {
    /// Whether nothing in the model changed.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.workloads.is_empty()
            && self.grants.is_empty()
            && !self.settings
            && !self.problems
    }

    fn merge(&mut self, other: ModelDelta) {
        self.services.extend(other.services);
        self.workloads.extend(other.workloads);
        self.grants.extend(other.grants);
        self.settings |= other.settings;
        self.problems |= other.problems;
    }
}

/// What a set of object changes makes stale.
#[derive(Debug, Default)]
struct Dirty {
    services: BTreeSet<ServiceKey>,
    pods: BTreeSet<Key>,
    splits: bool,
    access: bool,
    /// TrafficTargets to resolve again (they changed).
    targets: BTreeSet<Key>,
    /// Namespaces whose route groups changed: their TrafficTargets resolve again.
    route_namespaces: BTreeSet<String>,
    config: bool,
    everything: bool,
}

/// All input objects and the mesh model resolved from them, kept current one change at
/// a time: a change recomputes the services, workloads, splits and grants it can
/// affect, found through the store's lookups, and reports what actually changed.
#[derive(Clone, Debug, Default)]
pub struct Index {
    store: Store,
    model: MeshModel,
    /// Every service's resolution before splits and ClusterIP conflicts.
    bases: BTreeMap<ServiceKey, Result<Arc<MeshService>, String>>,
    /// Endpoint IP → services with an endpoint there (whose `meshed` depends on the pod).
    by_endpoint_ip: HashMap<IpAddr, FewSet<ServiceKey>>,
    /// ClusterIP → services claiming it.
    claims: HashMap<IpAddr, FewSet<ServiceKey>>,
    /// Services some TrafficSplit names.
    split_refs: BTreeSet<ServiceKey>,
    /// Services some HTTPRoute names (parents, backends, mirrors).
    route_refs: BTreeSet<ServiceKey>,
    /// HTTPRoutes per service port.
    http_routes: gateway::ServiceRoutes,
    /// Services some TrafficPolicy targets.
    policy_refs: BTreeSet<ServiceKey>,
    /// TrafficPolicy settings per service port.
    policies: policy::PoliciesByService,
    /// The MeshConfig's mesh-wide TrafficPolicy defaults.
    traffic_defaults: Option<PortPolicy>,
    route_problems: Vec<Problem>,
    route_statuses: gateway::RouteStatuses,
    splits: BTreeMap<ServiceKey, SplitModel>,
    service_problems: BTreeMap<ServiceKey, Problem>,
    pod_problems: BTreeMap<Key, Vec<Problem>>,
    conflict_problems: BTreeMap<Key, Vec<Problem>>,
    split_problems: Vec<Problem>,
    access_problems: Vec<Problem>,
    /// Every TrafficTarget resolved, kept until it or a route group of its namespace
    /// changes: resolving checks each route's regexes, and a mesh has thousands.
    resolved_targets: BTreeMap<Key, TargetResolution>,
    config_problems: Vec<Problem>,
    /// Ports the MeshConfig in effect adds to the well-known opaque ports.
    opaque_ports: Vec<u16>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every Gateway API route's status per Service parent.
    pub fn route_statuses(&self) -> &RouteStatuses {
        &self.route_statuses
    }

    /// The current model.
    pub fn model(&self) -> &MeshModel {
        &self.model
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// Whether the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.store.len() == 0
    }

    /// Every object held (cloned).
    pub fn objects(&self) -> Vec<MeshObject> {
        self.store.objects()
    }

    /// The objects Weft reports a status on (SMI kinds and MeshConfig), each with its
    /// uid and generation.
    pub fn status_subjects(&self) -> Vec<StatusSubject> {
        fn subjects<'a, T: 'a + kube::Resource>(
            kind: Kind,
            objects: impl Iterator<Item = &'a Arc<T>>,
        ) -> impl Iterator<Item = StatusSubject> {
            objects.map(move |o| {
                let meta = o.meta();
                StatusSubject {
                    object: ObjectRef::new(
                        kind,
                        meta.namespace.as_deref().unwrap_or(""),
                        meta.name.as_deref().unwrap_or(""),
                    ),
                    uid: meta.uid.clone(),
                    generation: meta.generation,
                }
            })
        }
        let s = &self.store;
        let mut out: Vec<StatusSubject> = subjects(Kind::TrafficSplit, s.splits.values()).collect();
        out.extend(subjects(Kind::TrafficTarget, s.targets.values()));
        out.extend(subjects(Kind::HTTPRouteGroup, s.route_groups.values()));
        out.extend(subjects(Kind::TCPRoute, s.tcp_routes.values()));
        out.extend(subjects(Kind::HTTPRoute, s.http_routes.values()));
        out.extend(subjects(Kind::GRPCRoute, s.grpc_routes.values()));
        out.extend(subjects(Kind::TrafficPolicy, s.traffic_policies.values()));
        out.extend(
            subjects(Kind::MeshConfig, s.mesh_configs.values()).map(|mut o| {
                o.object.namespace.clear();
                o
            }),
        );
        out
    }

    /// Adds or replaces an object: `None` when an equal object was already there,
    /// otherwise what the change did to the model.
    pub fn apply(&mut self, object: MeshObject) -> Option<ModelDelta> {
        if self.store.holds(&object) {
            return None;
        }
        let mut dirty = Dirty::default();
        let key = object.object_ref();
        let new = object.clone();
        let old = self.store.insert(object);
        self.mark(&key, old.as_ref(), Some(&new), &mut dirty);
        Some(self.recompute(dirty))
    }

    /// Removes an object: `None` when it was not there.
    pub fn delete(&mut self, key: &ObjectRef) -> Option<ModelDelta> {
        let old = self.store.remove(key)?;
        let mut dirty = Dirty::default();
        self.mark(key, Some(&old), None, &mut dirty);
        Some(self.recompute(dirty))
    }

    /// Applies a batch of changes with one recomputation; `None` when none changed anything.
    pub fn update(
        &mut self,
        changes: impl IntoIterator<Item = ObjectChange>,
    ) -> Option<ModelDelta> {
        let mut dirty = Dirty {
            // From empty (a start), everything is new: one full pass is cheaper.
            everything: self.store.len() == 0,
            ..Dirty::default()
        };
        let mut any = false;
        for change in changes {
            let (key, old, new) = match change {
                ObjectChange::Upsert(object) => {
                    if self.store.holds(&object) {
                        continue;
                    }
                    let key = object.object_ref();
                    let new = object.clone();
                    (key, self.store.insert(object), Some(new))
                }
                ObjectChange::Delete(key) => match self.store.remove(&key) {
                    Some(old) => (key, Some(old), None),
                    None => continue,
                },
            };
            any = true;
            self.mark(&key, old.as_ref(), new.as_ref(), &mut dirty);
        }
        any.then(|| self.recompute(dirty))
    }

    /// Replaces every object (a full relist): applies what differs; `None` when nothing did.
    pub fn reset(&mut self, objects: impl IntoIterator<Item = MeshObject>) -> Option<ModelDelta> {
        self.reset_kinds(None, objects)
    }

    /// Replaces every object of `kinds` (all kinds when `None`) with `objects`, as a
    /// source reports after listing them afresh: applies only what differs, so a relist
    /// that finds nothing new changes nothing.
    pub fn reset_kinds(
        &mut self,
        kinds: Option<&[Kind]>,
        objects: impl IntoIterator<Item = MeshObject>,
    ) -> Option<ModelDelta> {
        let mut next: BTreeMap<ObjectRef, MeshObject> = BTreeMap::new();
        for o in objects {
            next.insert(o.object_ref(), o);
        }
        let gone: Vec<ObjectChange> = self
            .store
            .refs()
            .into_iter()
            .filter(|r| kinds.is_none_or(|k| k.contains(&r.kind)) && !next.contains_key(r))
            .map(ObjectChange::Delete)
            .collect();
        self.update(
            gone.into_iter()
                .chain(next.into_values().map(ObjectChange::Upsert)),
        )
    }

    /// The pods service `key` selects.
    fn selected_pod_keys(&self, key: &ServiceKey) -> Vec<Key> {
        self.store
            .services
            .get(&(key.namespace.clone(), key.name.clone()))
            .map(|svc| {
                self.store
                    .selected_pods(svc)
                    .into_iter()
                    .map(|p| key_of(&p.metadata))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Marks what a change of one object (from `old` to `new`) can affect.
    fn mark(
        &self,
        key: &ObjectRef,
        old: Option<&MeshObject>,
        new: Option<&MeshObject>,
        dirty: &mut Dirty,
    ) {
        if dirty.everything {
            return;
        }
        let versions = || old.into_iter().chain(new);
        match key.kind {
            Kind::Service => {
                dirty
                    .services
                    .insert(ServiceKey::new(&key.namespace, &key.name));
                for o in versions() {
                    if let MeshObject::Service(svc) = o {
                        dirty.pods.extend(
                            self.store
                                .selected_pods(svc)
                                .into_iter()
                                .map(|p| key_of(&p.metadata)),
                        );
                    }
                }
            }
            Kind::Pod => {
                dirty.pods.insert((key.namespace.clone(), key.name.clone()));
                for o in versions() {
                    if let MeshObject::Pod(pod) = o {
                        dirty
                            .services
                            .extend(self.store.services_selecting(pod).into_iter().map(|s| {
                                let (n, m) = key_of(&s.metadata);
                                ServiceKey::new(&n, &m)
                            }));
                        for ip in &pod.ips {
                            dirty
                                .services
                                .extend(self.by_endpoint_ip.get(ip).into_iter().flatten().cloned());
                        }
                    }
                }
                // Whether a service account exists may have changed (target warnings).
                let account_of = |o: Option<&MeshObject>| match o {
                    Some(MeshObject::Pod(p)) => {
                        Some((key.namespace.clone(), p.service_account.clone()))
                    }
                    _ => None,
                };
                let (was, is) = (account_of(old), account_of(new));
                if was != is {
                    let pod_name = &key.name;
                    // The old account may have lost its last pod; the new one may have
                    // gained its first (the store holds the new version already).
                    let lost = was.as_ref().is_some_and(|a| !self.store.account_exists(a));
                    let gained = is.as_ref().is_some_and(|a| {
                        a.1 != "default"
                            && !self.store.service_accounts.contains_key(a)
                            && self
                                .store
                                .pods_running_as(a)
                                .iter()
                                .all(|(_, n)| n == pod_name)
                    });
                    dirty.access |= lost || gained;
                }
            }
            Kind::EndpointSlice => {
                for o in versions() {
                    if let MeshObject::EndpointSlice(slice) = o
                        && let Some(service) = slice
                            .metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(store::SERVICE_NAME_LABEL))
                    {
                        dirty
                            .services
                            .insert(ServiceKey::new(&key.namespace, service));
                    }
                }
            }
            Kind::TrafficSplit
            | Kind::HTTPRoute
            | Kind::GRPCRoute
            | Kind::ReferenceGrant
            | Kind::TrafficPolicy => dirty.splits = true,
            Kind::HTTPRouteGroup => {
                dirty.splits = true;
                dirty.access = true;
                dirty.route_namespaces.insert(key.namespace.clone());
            }
            Kind::TCPRoute => {
                dirty.access = true;
                dirty.route_namespaces.insert(key.namespace.clone());
            }
            Kind::TrafficTarget => {
                dirty.access = true;
                dirty
                    .targets
                    .insert((key.namespace.clone(), key.name.clone()));
            }
            Kind::ServiceAccount => dirty.access = true,
            Kind::MeshConfig => dirty.config = true,
        }
    }

    /// Recomputes what `dirty` names and applies it to the model.
    fn recompute(&mut self, mut dirty: Dirty) -> ModelDelta {
        let mut delta = ModelDelta::default();
        if dirty.config {
            let (settings, defaults, problems) = resolve_config(&self.store);
            if defaults != self.traffic_defaults {
                // Every service port may take them.
                self.traffic_defaults = defaults;
                dirty.everything = true;
            }
            let opaque = settings
                .as_ref()
                .map(|s| s.spec.opaque_ports.clone())
                .unwrap_or_default();
            if opaque != self.opaque_ports {
                // Port protocols of every service and pod may differ.
                self.opaque_ports = opaque;
                dirty.everything = true;
            }
            if settings != self.model.settings {
                self.model.settings = settings;
                delta.settings = true;
            }
            if problems != self.config_problems {
                self.config_problems = problems;
                delta.problems = true;
            }
        }
        if dirty.everything {
            delta.merge(self.rebuild());
            return delta;
        }
        delta.merge(self.recompute_services(&dirty.services, &mut dirty.pods, dirty.splits));
        delta.merge(self.recompute_workloads(&dirty.pods));
        if dirty.access {
            self.resolved_targets.retain(|key, _| {
                !dirty.targets.contains(key) && !dirty.route_namespaces.contains(&key.0)
            });
            delta.merge(self.recompute_access());
        }
        if delta.problems {
            self.collect_problems();
        }
        delta
    }

    /// Resolves everything again from the store.
    fn rebuild(&mut self) -> ModelDelta {
        let before = std::mem::take(&mut self.model);
        let (settings, defaults, config_problems) = resolve_config(&self.store);
        self.traffic_defaults = defaults;
        self.opaque_ports = settings
            .as_ref()
            .map(|s| s.spec.opaque_ports.clone())
            .unwrap_or_default();
        self.model.settings = settings;
        self.config_problems = config_problems;
        self.bases.clear();
        self.by_endpoint_ip.clear();
        self.claims.clear();
        self.splits.clear();
        self.http_routes.clear();
        self.policies.clear();
        self.service_problems.clear();
        self.pod_problems.clear();
        self.conflict_problems.clear();
        self.resolved_targets.clear();
        let all: BTreeSet<ServiceKey> = self
            .store
            .services
            .keys()
            .map(|(n, m)| ServiceKey::new(n, m))
            .collect();
        let mut pods = BTreeSet::new();
        self.recompute_services(&all, &mut pods, true);
        let every_pod: BTreeSet<Key> = self.store.pods.keys().cloned().collect();
        self.recompute_workloads(&every_pod);
        self.recompute_access();
        self.collect_problems();
        let mut delta = ModelDelta {
            settings: before.settings != self.model.settings,
            problems: before.problems != self.model.problems,
            ..ModelDelta::default()
        };
        diff_maps(&before.services, &self.model.services, &mut delta.services);
        diff_maps(
            &before.workloads,
            &self.model.workloads,
            &mut delta.workloads,
        );
        diff_maps(&before.grants, &self.model.grants, &mut delta.grants);
        delta
    }

    /// Resolves `keys` again (their bases, ClusterIP ownership, splits), updates the
    /// model's services, and adds to `pods` the pods of services whose acceptance flipped.
    fn recompute_services(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
        pods: &mut BTreeSet<Key>,
        splits_dirty: bool,
    ) -> ModelDelta {
        let mut delta = ModelDelta::default();
        if keys.is_empty() && !splits_dirty {
            return delta;
        }
        let mut touched_ips: BTreeSet<IpAddr> = BTreeSet::new();
        for key in keys {
            let old = self.bases.remove(key);
            if let Some(Ok(old)) = &old {
                for ip in endpoint_ips(old) {
                    few_set::remove(&mut self.by_endpoint_ip, ip, key);
                }
                for ip in &old.cluster_ips {
                    touched_ips.insert(*ip);
                    few_set::remove(&mut self.claims, *ip, key);
                }
            }
            let svc = self
                .store
                .services
                .get(&(key.namespace.clone(), key.name.clone()));
            let Some(svc) = svc else {
                continue;
            };
            let base = resolve_service_base(svc, &self.store, &self.opaque_ports);
            if let Ok(b) = &base {
                for ip in endpoint_ips(b) {
                    few_set::add(&mut self.by_endpoint_ip, ip, key.clone());
                }
                for ip in &b.cluster_ips {
                    touched_ips.insert(*ip);
                    few_set::add(&mut self.claims, *ip, key.clone());
                }
            }
            self.bases.insert(key.clone(), base.map(Arc::new));
        }
        // ClusterIP ownership: every service sharing an address with a changed one.
        let mut group: BTreeSet<ServiceKey> = keys.clone();
        let mut frontier: Vec<IpAddr> = touched_ips.into_iter().collect();
        let mut seen_ips = BTreeSet::new();
        while let Some(ip) = frontier.pop() {
            if !seen_ips.insert(ip) {
                continue;
            }
            for key in self.claims.get(&ip).into_iter().flatten() {
                if group.insert(key.clone())
                    && let Some(Ok(b)) = self.bases.get(key)
                {
                    frontier.extend(b.cluster_ips.iter().copied());
                }
            }
        }
        let mut ordered: Vec<(&ServiceKey, &[IpAddr])> = group
            .iter()
            .filter_map(|k| match self.bases.get(k) {
                Some(Ok(b)) => Some((k, b.cluster_ips.as_slice())),
                _ => None,
            })
            .collect();
        let order = |k: &ServiceKey| {
            self.store
                .services
                .get(&(k.namespace.clone(), k.name.clone()))
                .map(|s| creation_order(&s.metadata))
        };
        ordered.sort_by_key(|(k, _)| order(k));
        let owners = clusterip_owners(&ordered);
        let mut accepted_changed = BTreeSet::new();
        for key in &group {
            let object = ObjectRef::new(Kind::Service, &key.namespace, &key.name);
            let problem = match self.bases.get(key) {
                Some(Err(reason)) => Some(Problem {
                    object,
                    rejected: true,
                    reason: reason.clone(),
                }),
                Some(Ok(_)) => match owners.get(key) {
                    Some(Err((ip, owner))) => Some(Problem {
                        object,
                        rejected: true,
                        reason: format!("clusterIP {ip} is already used by Service {owner}"),
                    }),
                    _ => None,
                },
                None => None,
            };
            if self.service_problems.get(key) != problem.as_ref() {
                delta.problems = true;
                match problem {
                    Some(p) => self.service_problems.insert(key.clone(), p),
                    None => self.service_problems.remove(key),
                };
            }
            let accepted = matches!(self.bases.get(key), Some(Ok(_)))
                && matches!(owners.get(key), Some(Ok(())));
            if accepted != self.model.services.contains_key(key) {
                accepted_changed.insert(key.clone());
            }
        }
        // Pods of services that appeared or disappeared serve different ports now.
        for key in &accepted_changed {
            pods.extend(self.selected_pod_keys(key));
        }
        let accepted_base = |index: &Self, key: &ServiceKey| -> Option<Arc<MeshService>> {
            match (index.bases.get(key), owners.get(key)) {
                (Some(Ok(b)), Some(Ok(()))) => Some(b.clone()),
                // Untouched by this change: keeps its acceptance.
                (Some(Ok(b)), None) if index.model.services.contains_key(key) => Some(b.clone()),
                _ => None,
            }
        };
        // Splits and HTTPRoutes: again when a split, a route group, a route or a service
        // one of them names changed.
        let mut candidates: BTreeSet<ServiceKey> = group.clone();
        if splits_dirty
            || group.iter().any(|k| {
                self.split_refs.contains(k)
                    || self.route_refs.contains(k)
                    || self.policy_refs.contains(k)
            })
        {
            self.split_refs = split_references(&self.store);
            self.route_refs = gateway::route_references(&self.store);
            self.policy_refs = policy::policy_references(&self.store);
            // Splits see the group's new state and everyone else's current one.
            let overlay: BTreeMap<ServiceKey, Option<Arc<MeshService>>> = group
                .iter()
                .map(|k| (k.clone(), accepted_base(self, k)))
                .collect();
            let model_services = &self.model.services;
            let lookup = |k: &ServiceKey| match overlay.get(k) {
                Some(s) => s.as_deref(),
                None => model_services.get(k).map(|s| &**s),
            };
            let (mut splits, mut problems) = resolve_splits(&self.store, &lookup);
            let (routes, mut route_problems, route_statuses) =
                gateway::resolve_http_routes(&self.store, &lookup);
            let (policies, policy_problems) =
                policy::resolve_traffic_policies(&self.store, &lookup);
            route_problems.extend(policy_problems);
            // An HTTPRoute and a TrafficSplit on one service port: the HTTPRoute wins.
            for (key, split) in &mut splits {
                let Some(routed) = routes.get(key) else {
                    continue;
                };
                // Only producer routes take a port from every caller; a consumer route
                // (another namespace's) leaves the split to everyone else.
                let producer = |e: &&HttpRouteEntry| e.source.namespace == key.namespace;
                let lost: Vec<u16> = split
                    .backends_by_port
                    .keys()
                    .copied()
                    .filter(|p| {
                        routed
                            .get(p)
                            .is_some_and(|l| l.iter().any(|e| producer(&e)))
                    })
                    .collect();
                if lost.is_empty() {
                    continue;
                }
                for port in &lost {
                    split.backends_by_port.remove(port);
                }
                let by: BTreeSet<String> = lost
                    .iter()
                    .flat_map(|p| {
                        routed[p]
                            .iter()
                            .filter(producer)
                            .map(|e| e.source.to_string())
                    })
                    .collect();
                route_problems.push(Problem {
                    object: split.source.clone(),
                    rejected: split.backends_by_port.is_empty(),
                    reason: format!(
                        "Conflicted: {} routes port {} of service {key}; the HTTPRoute wins there",
                        by.into_iter().collect::<Vec<_>>().join(", "),
                        lost.iter()
                            .map(u16::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            splits.retain(|_, s| !s.backends_by_port.is_empty());
            problems.sort();
            route_problems.sort();
            for key in self
                .splits
                .keys()
                .chain(splits.keys())
                .chain(self.http_routes.keys())
                .chain(routes.keys())
                .chain(self.policies.keys())
                .chain(policies.keys())
            {
                candidates.insert(key.clone());
            }
            if problems != self.split_problems
                || route_problems != self.route_problems
                || route_statuses != self.route_statuses
            {
                self.split_problems = problems;
                self.route_problems = route_problems;
                self.route_statuses = route_statuses;
                delta.problems = true;
            }
            self.splits = splits;
            self.http_routes = routes;
            self.policies = policies;
        }
        for key in candidates {
            let next = accepted_base(self, &key).map(|base| {
                let split = self.splits.get(&key).cloned();
                let http_routes = self.http_routes.get(&key).cloned().unwrap_or_default();
                let policies = policy::with_defaults(
                    self.policies.get(&key),
                    base.ports.iter().map(|p| p.port),
                    self.traffic_defaults.as_ref(),
                );
                // Most services have none of these: they keep sharing the base.
                if base.split == split
                    && base.http_routes == http_routes
                    && base.policies == policies
                {
                    return base;
                }
                let mut s = (*base).clone();
                s.split = split;
                s.http_routes = http_routes;
                s.policies = policies;
                Arc::new(s)
            });
            // Pods serve a service's rate limit: they follow its changes.
            let limits = |s: Option<&MeshService>| {
                s.map(|s| {
                    s.policies
                        .iter()
                        .map(|(p, pol)| (*p, pol.rate_limit.clone()))
                        .collect::<Vec<_>>()
                })
            };
            if limits(next.as_deref()) != limits(self.model.services.get(&key).map(|s| &**s)) {
                pods.extend(self.selected_pod_keys(&key));
            }
            if next.as_ref() != self.model.services.get(&key) {
                delta.services.insert(key.clone());
            }
            // Taken even when equal, so that the model and the base stay one allocation.
            match next {
                Some(s) => self.model.services.insert(key, s),
                None => self.model.services.remove(&key),
            };
        }
        delta
    }

    /// Resolves the workloads of `pods` again.
    fn recompute_workloads(&mut self, pods: &BTreeSet<Key>) -> ModelDelta {
        let mut delta = ModelDelta::default();
        for key in pods {
            let node = format!("{}/{}", key.0, key.1);
            let Some(pod) = self.store.pods.get(key) else {
                if self.model.workloads.remove(&node).is_some() {
                    delta.workloads.insert(node);
                }
                if self.pod_problems.remove(key).is_some()
                    | self.conflict_problems.remove(key).is_some()
                {
                    delta.problems = true;
                }
                continue;
            };
            let mut services: Vec<&Service> = self
                .store
                .services_selecting(pod)
                .into_iter()
                .filter(|s| {
                    let (n, m) = key_of(&s.metadata);
                    self.model.services.contains_key(&ServiceKey::new(&n, &m))
                })
                .collect();
            services.sort_by_key(|s| creation_order(&s.metadata));
            let model_services = &self.model.services;
            let rate_limit_of = |svc: &Service, port: u16| {
                let (n, m) = key_of(&svc.metadata);
                model_services
                    .get(&ServiceKey::new(&n, &m))?
                    .policies
                    .get(&port)?
                    .rate_limit
                    .clone()
            };
            let (workload, problems, conflicts) =
                resolve_workload(pod, &services, &self.opaque_ports, &rate_limit_of);
            if self.model.workloads.get(&node) != Some(&workload) {
                self.model.workloads.insert(node.clone(), workload);
                delta.workloads.insert(node);
            }
            for (map, list) in [
                (&mut self.pod_problems, problems),
                (&mut self.conflict_problems, conflicts),
            ] {
                let changed = if list.is_empty() {
                    map.remove(key).is_some()
                } else if map.get(key) != Some(&list) {
                    map.insert(key.clone(), list);
                    true
                } else {
                    false
                };
                delta.problems |= changed;
            }
        }
        delta
    }

    /// Resolves every TrafficTarget again; reports the destinations whose grants changed.
    fn recompute_access(&mut self) -> ModelDelta {
        let mut delta = ModelDelta::default();
        let (grants, problems) = resolve_grants(&self.store, &mut self.resolved_targets);
        diff_maps(&self.model.grants, &grants, &mut delta.grants);
        self.model.grants = grants;
        if problems != self.access_problems {
            self.access_problems = problems;
            delta.problems = true;
        }
        delta
    }

    /// The model's problem list, from every producer, sorted and without repeats.
    fn collect_problems(&mut self) {
        let all: BTreeSet<Problem> = self
            .service_problems
            .values()
            .cloned()
            .chain(self.pod_problems.values().flatten().cloned())
            .chain(self.conflict_problems.values().flatten().cloned())
            .chain(self.split_problems.iter().cloned())
            .chain(self.route_problems.iter().cloned())
            .chain(self.access_problems.iter().cloned())
            .chain(self.config_problems.iter().cloned())
            .collect();
        self.model.problems = all.into_iter().collect();
    }
}

/// The MeshConfig in effect, its mesh-wide TrafficPolicy defaults, and the problems of
/// both.
fn resolve_config(store: &Store) -> (Option<MeshSettings>, Option<PortPolicy>, Vec<Problem>) {
    let (settings, mut problems) = resolve_mesh_config(store);
    let (defaults, default_problems) = policy::mesh_defaults(settings.as_ref());
    problems.extend(default_problems);
    (settings, defaults, problems)
}

/// Keys whose values differ between two maps (added, removed or changed).
fn diff_maps<K: Ord + Clone, V: PartialEq>(
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
    out: &mut BTreeSet<K>,
) {
    for (k, v) in after {
        if before.get(k) != Some(v) {
            out.insert(k.clone());
        }
    }
    out.extend(before.keys().filter(|k| !after.contains_key(*k)).cloned());
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test setup fails loudly
mod tests {
    use super::*;

    /// A service that no split, route or policy changes is held once, by the index and
    /// the model together; the root of a split gets its own copy, with the split.
    #[test]
    fn plain_services_share_their_resolution_with_the_model() {
        let service = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{name: http, port: 80}}]}}\n---\n"
            )
        };
        let text = format!(
            "{}{}{}apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: s}}\nspec: {{service: web, backends: [{{service: web-v2, weight: 1}}]}}\n",
            service("web", "198.19.0.1"),
            service("web-v2", "198.19.0.2"),
            service("db", "198.19.0.3"),
        );
        let mut index = Index::new();
        index.reset(crate::sources::parse_manifests(&text).unwrap());
        let shared = |index: &Index, name: &str| {
            let key = ServiceKey::new("default", name);
            let base = index.bases.get(&key).unwrap().as_ref().unwrap();
            Arc::ptr_eq(base, index.model.services.get(&key).unwrap())
        };
        assert!(shared(&index, "db") && shared(&index, "web-v2"));
        assert!(!shared(&index, "web"));
        let web = index.model.services.get(&ServiceKey::new("default", "web"));
        assert!(web.unwrap().split.is_some());
        // An edit the model does not see (an annotation) resolves `db` again, to an equal
        // service: no change to report, and still one allocation.
        let edited =
            service("db", "198.19.0.3").replace("{name: db}", "{name: db, annotations: {a: b}}");
        let db = crate::sources::parse_manifests(&edited).unwrap().remove(0);
        assert!(index.apply(db).is_none_or(|d| d.services.is_empty()));
        assert!(shared(&index, "db"));
    }
}
