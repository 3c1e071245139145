//! The Kubernetes source: kube-runtime watchers on the API server, turned into the same
//! [`SourceEvent`]s the manifest directory yields.
//!
//! Nothing is sent before every watch has listed once: the first event is one
//! [`SourceEvent::Reset`] of everything, so the control plane serves no partial mesh.
//! A later re-list of one kind (after 410 Gone, or a watch that could not resume) is a
//! `Reset` of that kind only, which the index turns into no change at all when the
//! objects are the same. Watch errors are retried by the watcher's own backoff.
//!
//! Core objects come typed (the API server validated them). Custom resources come as
//! dynamic objects and are decoded one by one, so that one object this version of Weft
//! cannot read is reported instead of failing the whole list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, SelectAll};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::{mpsc, watch};

use crate::error::WeftError;
use crate::index::{Kind, LAST_APPLIED, MeshObject, ObjectChange, ObjectRef, slim_meta};
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::sources::{ManifestError, SourceEvent};

/// What a watch is on: a kind the index reads, or Namespaces (for the trust bundle).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Watched {
    /// A kind of [`MeshObject`].
    Object(Kind),
    /// core/v1 Namespace.
    Namespace,
}

impl std::fmt::Display for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Object(kind) => write!(f, "{kind}"),
            Self::Namespace => f.write_str("Namespace"),
        }
    }
}

/// One object as a watch delivers it, decoded for the index.
#[derive(Debug)]
pub enum Decoded {
    /// An object the index reads.
    Object(MeshObject),
    /// A custom resource that does not decode: what it is and why.
    Unreadable(ObjectRef, String),
    /// A namespace.
    Namespace(NamespaceState),
}

/// One step of one watch, as kube-runtime's watcher reports it.
#[derive(Debug)]
pub enum WatchStep {
    /// A (re-)list starts.
    Init,
    /// An object of the list in progress.
    InitApply(Decoded),
    /// The list is complete.
    InitDone,
    /// An object was added or changed.
    Apply(Decoded),
    /// An object was deleted.
    Delete(Decoded),
    /// The watch failed; the watcher retries after a backoff.
    Error(String),
}

impl WatchStep {
    fn from_event<K>(
        event: Result<watcher::Event<K>, watcher::Error>,
        decode: fn(K) -> Decoded,
    ) -> Self {
        match event {
            Ok(watcher::Event::Init) => Self::Init,
            Ok(watcher::Event::InitApply(o)) => Self::InitApply(decode(o)),
            Ok(watcher::Event::InitDone) => Self::InitDone,
            Ok(watcher::Event::Apply(o)) => Self::Apply(decode(o)),
            Ok(watcher::Event::Delete(o)) => Self::Delete(decode(o)),
            Err(e) => Self::Error(e.to_string()),
        }
    }
}

fn decode_service(mut o: Service) -> Decoded {
    slim_meta(&mut o.metadata);
    o.status = None;
    Decoded::Object(MeshObject::Service(std::sync::Arc::new(o)))
}

fn decode_pod(o: Pod) -> Decoded {
    // The pod's metadata is slimmed on the way in (`From<Pod> for MeshPod`).
    Decoded::Object(MeshObject::Pod(std::sync::Arc::new(o.into())))
}

fn decode_slice(mut o: EndpointSlice) -> Decoded {
    slim_meta(&mut o.metadata);
    Decoded::Object(MeshObject::EndpointSlice(std::sync::Arc::new(o)))
}

fn decode_account(mut o: ServiceAccount) -> Decoded {
    slim_meta(&mut o.metadata);
    o.secrets = None;
    o.image_pull_secrets = None;
    Decoded::Object(MeshObject::ServiceAccount(std::sync::Arc::new(o)))
}

/// The label a namespace opts into sidecar injection with (the webhook's selector).
pub const INJECTION_LABEL: (&str, &str) = ("weft.dev/inject", "enabled");

/// What the controller needs of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceState {
    /// Its name.
    pub name: String,
    /// Being deleted: nothing new is written into it.
    pub terminating: bool,
    /// Labelled for injection: sidecars will need their ConfigMaps there.
    pub injection: bool,
}

fn decode_namespace(o: Namespace) -> Decoded {
    let injection = o
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECTION_LABEL.0))
        .is_some_and(|v| v == INJECTION_LABEL.1);
    Decoded::Namespace(NamespaceState {
        name: o.metadata.name.unwrap_or_default(),
        terminating: o.metadata.deletion_timestamp.is_some(),
        injection,
    })
}

/// Live namespaces (not being deleted), each with whether it is labelled for injection.
pub type LiveNamespaces = BTreeMap<String, bool>;

/// The custom resources Weft reads: kind, group, version, plural.
const CUSTOM: [(Kind, &str, &str, &str, &str); 9] = [
    (
        Kind::TrafficSplit,
        "split.smi-spec.io",
        "v1alpha4",
        "TrafficSplit",
        "trafficsplits",
    ),
    (
        Kind::TrafficTarget,
        "access.smi-spec.io",
        "v1alpha3",
        "TrafficTarget",
        "traffictargets",
    ),
    (
        Kind::HTTPRouteGroup,
        "specs.smi-spec.io",
        "v1alpha4",
        "HTTPRouteGroup",
        "httproutegroups",
    ),
    (
        Kind::TCPRoute,
        "specs.smi-spec.io",
        "v1alpha4",
        "TCPRoute",
        "tcproutes",
    ),
    (
        Kind::MeshConfig,
        "config.weft.dev",
        "v1alpha1",
        "MeshConfig",
        "meshconfigs",
    ),
    (
        Kind::HTTPRoute,
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
    ),
    (
        Kind::GRPCRoute,
        "gateway.networking.k8s.io",
        "v1",
        "GRPCRoute",
        "grpcroutes",
    ),
    (
        Kind::ReferenceGrant,
        "gateway.networking.k8s.io",
        "v1",
        "ReferenceGrant",
        "referencegrants",
    ),
    (
        Kind::TrafficPolicy,
        "policy.weft.dev",
        "v1alpha1",
        "TrafficPolicy",
        "trafficpolicies",
    ),
];

/// The API resource of a custom kind Weft reads.
pub fn custom_resource(kind: Kind) -> Option<ApiResource> {
    CUSTOM
        .iter()
        .find(|c| c.0 == kind)
        .map(|&(_, group, version, kind, plural)| {
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
        })
}

/// Decodes a custom resource into its typed form; its status is left out (Weft
/// writes it and never reads it back into the model).
fn decode_custom(kind: Kind, object: DynamicObject) -> Decoded {
    let namespace = match kind {
        Kind::MeshConfig => String::new(),
        _ => object.metadata.namespace.clone().unwrap_or_default(),
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    let reference = ObjectRef::new(kind, &namespace, &name);
    let mut value = match serde_json::to_value(&object) {
        Ok(v) => v,
        Err(e) => return Decoded::Unreadable(reference, e.to_string()),
    };
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
        // A custom resource may leave out `spec`: its required fields are then reported.
        map.entry("spec").or_insert_with(|| serde_json::json!({}));
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("managedFields");
            meta.remove("resourceVersion");
            if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
                a.remove(LAST_APPLIED);
            }
        }
    }
    fn typed<T: serde::de::DeserializeOwned>(
        v: serde_json::Value,
    ) -> Result<std::sync::Arc<T>, String> {
        serde_json::from_value(v)
            .map(std::sync::Arc::new)
            .map_err(|e| e.to_string())
    }
    let decoded = match kind {
        Kind::TrafficSplit => typed(value).map(MeshObject::TrafficSplit),
        Kind::TrafficTarget => typed(value).map(MeshObject::TrafficTarget),
        Kind::HTTPRouteGroup => typed(value).map(MeshObject::HTTPRouteGroup),
        Kind::TCPRoute => typed(value).map(MeshObject::TCPRoute),
        Kind::MeshConfig => typed(value).map(MeshObject::MeshConfig),
        Kind::HTTPRoute => typed(value).map(MeshObject::HTTPRoute),
        Kind::GRPCRoute => typed(value).map(MeshObject::GRPCRoute),
        Kind::ReferenceGrant => typed(value).map(MeshObject::ReferenceGrant),
        Kind::TrafficPolicy => typed(value).map(MeshObject::TrafficPolicy),
        other => Err(format!("{other} is not a custom resource")),
    };
    match decoded {
        Ok(object) => Decoded::Object(object),
        Err(reason) => Decoded::Unreadable(reference, reason),
    }
}

type StepStream = BoxStream<'static, (Watched, WatchStep)>;

fn typed_watch<K>(api: Api<K>, watched: Watched, decode: fn(K) -> Decoded) -> StepStream
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| (watched, WatchStep::from_event(event, decode)))
        .boxed()
}

fn custom_watch(client: &Client, kind: Kind, resource: &ApiResource) -> StepStream {
    let api = Api::<DynamicObject>::all_with(client.clone(), resource);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |event| {
            let step = match event {
                Ok(watcher::Event::Init) => WatchStep::Init,
                Ok(watcher::Event::InitApply(o)) => WatchStep::InitApply(decode_custom(kind, o)),
                Ok(watcher::Event::InitDone) => WatchStep::InitDone,
                Ok(watcher::Event::Apply(o)) => WatchStep::Apply(decode_custom(kind, o)),
                Ok(watcher::Event::Delete(o)) => WatchStep::Delete(decode_custom(kind, o)),
                Err(e) => WatchStep::Error(e.to_string()),
            };
            (Watched::Object(kind), step)
        })
        .boxed()
}

/// Every watch the controller runs, merged into one stream.
pub fn cluster_watches(client: &Client) -> SelectAll<StepStream> {
    let mut all = vec![
        typed_watch(
            Api::<Service>::all(client.clone()),
            Watched::Object(Kind::Service),
            decode_service,
        ),
        typed_watch(
            Api::<EndpointSlice>::all(client.clone()),
            Watched::Object(Kind::EndpointSlice),
            decode_slice,
        ),
        typed_watch(
            Api::<Pod>::all(client.clone()),
            Watched::Object(Kind::Pod),
            decode_pod,
        ),
        typed_watch(
            Api::<ServiceAccount>::all(client.clone()),
            Watched::Object(Kind::ServiceAccount),
            decode_account,
        ),
        typed_watch(
            Api::<Namespace>::all(client.clone()),
            Watched::Namespace,
            decode_namespace,
        ),
    ];
    for (kind, ..) in CUSTOM {
        if let Some(resource) = custom_resource(kind) {
            all.push(custom_watch(client, kind, &resource));
        }
    }
    futures::stream::select_all(all)
}

/// The watches' state: lists in progress, what is still unlisted, objects that do
/// not decode, and the namespaces.
#[derive(Debug)]
pub struct WatchAggregator {
    /// Watches that have not listed once yet.
    pending: BTreeSet<Watched>,
    /// Lists in progress (between Init and InitDone), by watch.
    listing: HashMap<Watched, Vec<Decoded>>,
    /// Until every watch has listed: everything listed or changed so far.
    initial: BTreeMap<ObjectRef, MeshObject>,
    /// Custom resources that do not decode, with the reason.
    unreadable: BTreeMap<ObjectRef, String>,
    /// Namespaces by name.
    namespaces: BTreeMap<String, NamespaceState>,
    namespaces_out: watch::Sender<Arc<LiveNamespaces>>,
    metrics: Arc<ControlPlaneMetrics>,
}

/// Every watch the controller runs.
pub fn all_watched() -> BTreeSet<Watched> {
    let mut all: BTreeSet<Watched> = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ServiceAccount,
    ]
    .into_iter()
    .map(Watched::Object)
    .collect();
    all.insert(Watched::Namespace);
    all.extend(CUSTOM.iter().map(|c| Watched::Object(c.0)));
    all
}

impl WatchAggregator {
    /// Waits for the watches in `pending`; live namespaces go to `namespaces_out`.
    pub fn new(
        pending: BTreeSet<Watched>,
        namespaces_out: watch::Sender<Arc<LiveNamespaces>>,
        metrics: Arc<ControlPlaneMetrics>,
    ) -> Self {
        Self {
            pending,
            listing: HashMap::new(),
            initial: BTreeMap::new(),
            unreadable: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            namespaces_out,
            metrics,
        }
    }

    /// Whether every watch has listed once.
    pub fn synced(&self) -> bool {
        self.pending.is_empty()
    }

    /// The watches that have not listed yet.
    pub fn pending(&self) -> &BTreeSet<Watched> {
        &self.pending
    }

    fn publish_namespaces(&self) {
        let live: LiveNamespaces = self
            .namespaces
            .values()
            .filter(|n| !n.terminating)
            .map(|n| (n.name.clone(), n.injection))
            .collect();
        self.namespaces_out.send_if_modified(|current| {
            if **current == live {
                return false;
            }
            *current = Arc::new(live);
            true
        });
    }

    fn unreadable_event(&self) -> SourceEvent {
        SourceEvent::Unreadable(
            self.unreadable
                .iter()
                .map(|(object, reason)| ManifestError {
                    file: PathBuf::from(object.to_string()),
                    reason: reason.clone(),
                })
                .collect(),
        )
    }

    /// Takes one watch step; what to send to the control plane, in order (changes of
    /// several steps may be merged by the caller).
    pub fn step(&mut self, watched: Watched, step: WatchStep) -> Vec<SourceEvent> {
        match step {
            WatchStep::Error(error) => {
                self.metrics.watch_restarted(&watched.to_string());
                tracing::warn!(watch = %watched, %error, "watch failed; retrying after a backoff");
                Vec::new()
            }
            WatchStep::Init => {
                if !self.pending.contains(&watched) {
                    self.metrics.watch_restarted(&watched.to_string());
                    tracing::info!(watch = %watched, "listing again (the watch could not resume)");
                }
                self.listing.insert(watched, Vec::new());
                Vec::new()
            }
            WatchStep::InitApply(decoded) => {
                self.listing.entry(watched).or_default().push(decoded);
                Vec::new()
            }
            WatchStep::InitDone => self.list_done(watched),
            WatchStep::Apply(decoded) => self.changed(decoded, false),
            WatchStep::Delete(decoded) => self.changed(decoded, true),
        }
    }

    fn list_done(&mut self, watched: Watched) -> Vec<SourceEvent> {
        let listed = self.listing.remove(&watched).unwrap_or_default();
        let was_synced = self.synced();
        let first = self.pending.remove(&watched);
        let unreadable_before = self.unreadable.len();
        if let Watched::Object(kind) = watched {
            self.unreadable.retain(|o, _| o.kind != kind);
        }
        let mut objects = Vec::new();
        if watched == Watched::Namespace {
            self.namespaces.clear();
        }
        for decoded in listed {
            match decoded {
                Decoded::Object(o) => objects.push(o),
                Decoded::Unreadable(object, reason) => {
                    self.unreadable.insert(object, reason);
                }
                Decoded::Namespace(state) => {
                    self.namespaces.insert(state.name.clone(), state);
                }
            }
        }
        if watched == Watched::Namespace {
            self.publish_namespaces();
        }
        let unreadable_changed =
            self.unreadable.len() != unreadable_before || !self.unreadable.is_empty();
        let mut out = Vec::new();
        if !was_synced {
            if let Watched::Object(kind) = watched {
                self.initial.retain(|r, _| r.kind != kind);
                self.initial
                    .extend(objects.into_iter().map(|o| (o.object_ref(), o)));
            }
            if first && self.synced() {
                tracing::info!(
                    objects = self.initial.len(),
                    "every watch has listed; serving"
                );
                let objects = std::mem::take(&mut self.initial).into_values().collect();
                out.push(SourceEvent::Reset {
                    kinds: None,
                    objects,
                });
                out.push(self.unreadable_event());
            }
            return out;
        }
        if let Watched::Object(kind) = watched {
            out.push(SourceEvent::Reset {
                kinds: Some(vec![kind]),
                objects,
            });
        }
        if unreadable_changed {
            out.push(self.unreadable_event());
        }
        out
    }

    fn changed(&mut self, decoded: Decoded, deleted: bool) -> Vec<SourceEvent> {
        let change = match decoded {
            Decoded::Namespace(state) => {
                if deleted {
                    self.namespaces.remove(&state.name);
                } else {
                    self.namespaces.insert(state.name.clone(), state);
                }
                self.publish_namespaces();
                return Vec::new();
            }
            Decoded::Unreadable(object, reason) => {
                if deleted {
                    self.unreadable.remove(&object);
                    // Whatever the index still holds under that name goes too.
                    ObjectChange::Delete(object)
                } else {
                    tracing::warn!(%object, %reason, "object cannot be read; its last good version keeps serving");
                    self.unreadable.insert(object, reason);
                    return if self.synced() {
                        vec![self.unreadable_event()]
                    } else {
                        Vec::new()
                    };
                }
            }
            Decoded::Object(o) => {
                let reference = o.object_ref();
                let was_unreadable = self.unreadable.remove(&reference).is_some();
                let change = if deleted {
                    ObjectChange::Delete(reference)
                } else {
                    ObjectChange::Upsert(o)
                };
                if was_unreadable && self.synced() {
                    return vec![SourceEvent::Changes(vec![change]), self.unreadable_event()];
                }
                change
            }
        };
        if self.synced() {
            return vec![SourceEvent::Changes(vec![change])];
        }
        match change {
            ObjectChange::Upsert(o) => {
                self.initial.insert(o.object_ref(), o);
            }
            ObjectChange::Delete(r) => {
                self.initial.remove(&r);
            }
        }
        Vec::new()
    }
}

/// Appends `event` to `batch`, merging consecutive changes into one event.
fn push_merged(batch: &mut Vec<SourceEvent>, event: SourceEvent) {
    if let (Some(SourceEvent::Changes(last)), SourceEvent::Changes(more)) =
        (batch.last_mut(), &event)
    {
        last.extend(more.iter().cloned());
        return;
    }
    batch.push(event);
}

/// How many watch steps already waiting are folded into one batch of changes.
const MAX_BATCH: usize = 1000;
/// How often the log says which watches have not listed yet.
const PENDING_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the watches into `events` until the receiver is gone; logs which watches are
/// still pending until all have listed.
pub async fn run_watches(
    mut watches: impl futures::Stream<Item = (Watched, WatchStep)> + Unpin,
    mut aggregator: WatchAggregator,
    events: mpsc::Sender<SourceEvent>,
) -> Result<(), WeftError> {
    let started = Instant::now();
    let mut pending_log = tokio::time::interval(PENDING_LOG_INTERVAL);
    pending_log.tick().await;
    loop {
        let next = tokio::select! {
            next = watches.next() => next,
            _ = pending_log.tick(), if !aggregator.synced() => {
                let pending: Vec<String> = aggregator.pending().iter().map(ToString::to_string).collect();
                tracing::warn!(
                    waited_s = started.elapsed().as_secs(),
                    pending = %pending.join(", "),
                    "not serving yet: waiting for the first list of these watches (is the CRD installed, may Weft list it?)"
                );
                continue;
            }
        };
        let Some((watched, step)) = next else {
            return Err(WeftError::TaskEnded {
                task: "kubernetes-watches",
                reason: "the watch streams ended".to_string(),
            });
        };
        let mut batch = Vec::new();
        for event in aggregator.step(watched, step) {
            push_merged(&mut batch, event);
        }
        // Fold in what is already waiting, so a burst of watch events is one update.
        for _ in 0..MAX_BATCH {
            let Some(Some((watched, step))) = watches.next().now_or_never() else {
                break;
            };
            for event in aggregator.step(watched, step) {
                push_merged(&mut batch, event);
            }
        }
        for event in batch {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str, ip: &str) -> Decoded {
        let mut p = Pod::default();
        p.metadata.name = Some(name.to_string());
        p.metadata.namespace = Some("default".to_string());
        p.status = Some(PodStatus {
            pod_ip: Some(ip.to_string()),
            ..PodStatus::default()
        });
        decode_pod(p)
    }

    fn aggregator(pending: &[Watched]) -> (WatchAggregator, watch::Receiver<Arc<LiveNamespaces>>) {
        let (tx, rx) = watch::channel(Arc::default());
        (
            WatchAggregator::new(pending.iter().copied().collect(), tx, Arc::default()),
            rx,
        )
    }

    const PODS: Watched = Watched::Object(Kind::Pod);
    const SPLITS: Watched = Watched::Object(Kind::TrafficSplit);

    #[test]
    fn nothing_is_sent_before_every_watch_has_listed() {
        let (mut agg, _) = aggregator(&[PODS, SPLITS]);
        assert!(agg.step(PODS, WatchStep::Init).is_empty());
        assert!(
            agg.step(PODS, WatchStep::InitApply(pod("a", "10.0.0.1")))
                .is_empty()
        );
        assert!(agg.step(PODS, WatchStep::InitDone).is_empty());
        // A change while another watch still lists is folded into the first read.
        assert!(
            agg.step(PODS, WatchStep::Apply(pod("b", "10.0.0.2")))
                .is_empty()
        );
        assert!(
            agg.step(PODS, WatchStep::Delete(pod("a", "10.0.0.1")))
                .is_empty()
        );
        assert!(!agg.synced());
        assert_eq!(agg.pending().iter().collect::<Vec<_>>(), vec![&SPLITS]);
        agg.step(SPLITS, WatchStep::Init);
        let out = agg.step(SPLITS, WatchStep::InitDone);
        let SourceEvent::Reset {
            kinds: None,
            objects,
        } = &out[0]
        else {
            panic!("expected a full reset first, got {out:?}");
        };
        let names: Vec<String> = objects.iter().map(|o| o.object_ref().name).collect();
        assert_eq!(names, vec!["b"]);
        assert!(agg.synced());
    }

    #[test]
    fn a_relist_resets_its_kind_only_and_changes_flow_one_by_one() {
        let (mut agg, _) = aggregator(&[PODS]);
        agg.step(PODS, WatchStep::Init);
        agg.step(PODS, WatchStep::InitDone);
        let out = agg.step(PODS, WatchStep::Apply(pod("a", "10.0.0.1")));
        assert!(matches!(&out[..], [SourceEvent::Changes(c)] if c.len() == 1));
        agg.step(PODS, WatchStep::Init);
        agg.step(PODS, WatchStep::InitApply(pod("a", "10.0.0.1")));
        let out = agg.step(PODS, WatchStep::InitDone);
        assert!(
            matches!(&out[..], [SourceEvent::Reset { kinds: Some(k), objects }] if k == &vec![Kind::Pod] && objects.len() == 1),
            "{out:?}"
        );
    }

    #[test]
    fn an_unreadable_custom_resource_is_reported_and_the_rest_serves() {
        let (mut agg, _) = aggregator(&[SPLITS]);
        let bad = DynamicObject {
            types: None,
            metadata: ObjectMeta {
                name: Some("bad".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            data: serde_json::json!({"spec": {"service": 7, "backends": "no"}}),
        };
        let good = DynamicObject {
            types: None,
            metadata: ObjectMeta {
                name: Some("good".into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            data: serde_json::json!({"spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 1}]}, "status": {"conditions": []}}),
        };
        agg.step(SPLITS, WatchStep::Init);
        agg.step(
            SPLITS,
            WatchStep::InitApply(decode_custom(Kind::TrafficSplit, bad)),
        );
        agg.step(
            SPLITS,
            WatchStep::InitApply(decode_custom(Kind::TrafficSplit, good)),
        );
        let out = agg.step(SPLITS, WatchStep::InitDone);
        let [
            SourceEvent::Reset { objects, .. },
            SourceEvent::Unreadable(errors),
        ] = &out[..]
        else {
            panic!("{out:?}");
        };
        assert_eq!(objects.len(), 1);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].file.to_string_lossy().contains("shop/bad"),
            "{errors:?}"
        );
    }

    #[test]
    fn watcher_events_become_one_first_read_then_changes() {
        let (mut agg, _) = aggregator(&[PODS]);
        let mut p = Pod::default();
        p.metadata.name = Some("a".into());
        p.metadata.namespace = Some("d".into());
        let events = [
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(p.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(p)),
        ];
        let out: Vec<Vec<SourceEvent>> = events
            .into_iter()
            .map(|e| agg.step(PODS, WatchStep::from_event(e, decode_pod)))
            .collect();
        assert!(out[0].is_empty() && out[1].is_empty());
        assert!(
            matches!(&out[2][..], [SourceEvent::Reset { kinds: None, objects }, SourceEvent::Unreadable(e)] if objects.len() == 1 && e.is_empty())
        );
        assert!(
            matches!(&out[3][..], [SourceEvent::Changes(c)] if matches!(&c[..], [ObjectChange::Delete(r)] if r.name == "a"))
        );
        let error = watcher::Error::NoResourceVersion;
        assert!(
            agg.step(PODS, WatchStep::from_event::<Pod>(Err(error), decode_pod))
                .is_empty()
        );
    }

    #[test]
    fn the_echo_of_a_status_write_is_the_same_object() {
        let split = |rv: &str, status: serde_json::Value| DynamicObject {
            types: None,
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("shop".into()),
                resource_version: Some(rv.into()),
                generation: Some(2),
                ..ObjectMeta::default()
            },
            data: serde_json::json!({"spec": {"service": "web", "backends": [{"service": "web-v1", "weight": 1}]}, "status": status}),
        };
        let before = decode_custom(Kind::TrafficSplit, split("10", serde_json::json!({})));
        let after = decode_custom(
            Kind::TrafficSplit,
            split(
                "11",
                serde_json::json!({"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted"}]}),
            ),
        );
        let (Decoded::Object(a), Decoded::Object(b)) = (before, after) else {
            panic!("both decode");
        };
        assert_eq!(
            a, b,
            "a status write must not look like a change to the index"
        );
        let mut index = crate::index::Index::new();
        index.update([ObjectChange::Upsert(a)]);
        assert!(index.update([ObjectChange::Upsert(b)]).is_none());
    }

    #[test]
    fn live_namespaces_are_published() {
        let ns = |name: &str, terminating: bool, injection: bool| {
            Decoded::Namespace(NamespaceState {
                name: name.into(),
                terminating,
                injection,
            })
        };
        let (mut agg, rx) = aggregator(&[Watched::Namespace]);
        agg.step(Watched::Namespace, WatchStep::Init);
        agg.step(
            Watched::Namespace,
            WatchStep::InitApply(ns("a", false, false)),
        );
        agg.step(
            Watched::Namespace,
            WatchStep::InitApply(ns("gone", true, true)),
        );
        agg.step(Watched::Namespace, WatchStep::InitDone);
        assert_eq!(
            rx.borrow().iter().collect::<Vec<_>>(),
            vec![(&"a".to_string(), &false)]
        );
        agg.step(Watched::Namespace, WatchStep::Apply(ns("b", false, true)));
        assert_eq!(rx.borrow().get("b"), Some(&true), "labelled for injection");
        let mut labelled = Namespace::default();
        labelled.metadata.name = Some("shop".into());
        labelled.metadata.labels =
            Some([("weft.dev/inject".to_string(), "enabled".to_string())].into());
        assert!(matches!(
            decode_namespace(labelled),
            Decoded::Namespace(NamespaceState {
                injection: true,
                ..
            })
        ));
    }
}
