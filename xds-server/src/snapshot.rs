//! Snapshots of typed resources as shared layers, and the cache that publishes them.
//!
//! A proxy's view of one type is a few layers: shared ones (the outbound resources
//! every proxy, or every proxy of one scope, gets alike) and its own small one. A
//! layer is held once and referenced by every view that uses it, never copied, so
//! per-proxy memory does not grow with the mesh; the server composes the layers when
//! it sends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};

use crate::resource::{Resource, ResourceInterner, fnv1a, type_url};

/// Resources of one type by name, with the version of the set (computed once).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Layer {
    items: LayerItems,
    version: Version,
}

/// A layer's resources, sorted by name, each name once. A sorted slice rather than a
/// map: every proxy holds layers of a few resources, and a map keyed by a copy of each
/// name costs a tree node and a string per name (about 2.5 KiB per proxy at 10,000).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerItems(Box<[Resource]>);

impl LayerItems {
    /// The resource named `name`.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.0
            .binary_search_by(|r| r.name().cmp(name))
            .ok()
            .map(|i| &self.0[i])
    }

    /// Whether a resource is named `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Number of resources.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The resources in name order.
    pub fn values(&self) -> std::slice::Iter<'_, Resource> {
        self.0.iter()
    }

    /// The names in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Resource::name)
    }

    /// Names and resources in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Resource)> {
        self.0.iter().map(|r| (r.name(), r))
    }

    /// The resources as a map, to edit.
    pub fn to_map(&self) -> BTreeMap<String, Resource> {
        self.iter()
            .map(|(n, r)| (n.to_string(), r.clone()))
            .collect()
    }
}

impl From<BTreeMap<String, Resource>> for LayerItems {
    /// The map's values, which are named by their keys.
    fn from(map: BTreeMap<String, Resource>) -> Self {
        debug_assert!(map.iter().all(|(n, r)| n == r.name()));
        Self(map.into_values().collect())
    }
}

/// The version of a set of resources; shared, so the streams that send and the
/// registry that reports it copy a pointer, not a string.
pub type Version = Arc<str>;

/// A layer shared between views, snapshots and streams.
pub type LayerRef = Arc<Layer>;

impl Layer {
    /// A layer of `resources` (a later one of the same name replaces an earlier one).
    pub fn new(resources: impl IntoIterator<Item = Resource>) -> Self {
        // Latest first, so that a stable sort and dedup keep the later of two names.
        let mut items: Vec<Resource> = resources.into_iter().collect();
        items.reverse();
        items.sort_by(|a, b| a.name().cmp(b.name()));
        items.dedup_by(|later, kept| later.name() == kept.name());
        Self::from_items(LayerItems(items.into_boxed_slice()))
    }

    /// A layer of an existing map (its keys are the resources' names).
    pub fn from_map(items: BTreeMap<String, Resource>) -> Self {
        Self::from_items(items.into())
    }

    fn from_items(items: LayerItems) -> Self {
        let version = set_version(items.values()).into();
        Self { items, version }
    }

    /// Resources by name.
    pub fn items(&self) -> &LayerItems {
        &self.items
    }

    /// Version of the set.
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// What a proxy should have of one type: layers (shared ones first, its own last), and
/// the version of the whole.
///
/// Layers usually hold disjoint names. When they do not, the first layer holding a name
/// decides it and the same name in later layers is shadowed: that is how a small layer
/// placed before a big shared one overrides a few of its resources (the route
/// configurations of a namespace's consumer routes over the mesh's) without copying the
/// big one. Views without overlap (the common case) pay one flag test per walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedResources {
    layers: Vec<LayerRef>,
    version: Version,
    /// Whether some name is held by more than one layer.
    overlap: bool,
    /// Number of resources, shadowed ones not counted (reported per stream on every
    /// response and ACK, so counted once here).
    len: usize,
}

impl Default for TypedResources {
    fn default() -> Self {
        Self::from_layers(Vec::new())
    }
}

impl TypedResources {
    /// A view of `layers`; empty layers are dropped. One layer keeps its own version,
    /// several get a hash of theirs.
    pub fn from_layers(layers: Vec<LayerRef>) -> Self {
        let mut layers = layers;
        layers.retain(|l| !l.items.is_empty());
        let version = match layers.as_slice() {
            [] => empty_version(),
            [one] => one.version.clone(),
            many => {
                let mut joined = String::new();
                for (i, l) in many.iter().enumerate() {
                    if i > 0 {
                        joined.push('+');
                    }
                    joined.push_str(&l.version);
                }
                format!("{:016x}", fnv1a(joined.as_bytes())).into()
            }
        };
        let shadowed = shadowed(&layers);
        let len = layers.iter().map(|l| l.items.len()).sum::<usize>() - shadowed;
        Self {
            layers,
            version,
            overlap: shadowed > 0,
            len,
        }
    }

    /// A view of one layer.
    pub fn single(layer: LayerRef) -> Self {
        Self::from_layers(vec![layer])
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[LayerRef] {
        &self.layers
    }

    /// Whether `other` is made of the very same layers, in the same order (a pointer
    /// compare per layer: how streams tell an unchanged view).
    pub fn same_layers(&self, other: &TypedResources) -> bool {
        same_arcs(&self.layers, &other.layers)
    }

    /// Version of the whole view.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Version of the whole view, shared.
    pub fn shared_version(&self) -> Version {
        self.version.clone()
    }

    /// The resource named `name`, from whichever layer holds it.
    pub fn get(&self, name: &str) -> Option<&Resource> {
        self.layers.iter().find_map(|l| l.items.get(name))
    }

    /// Whether some layer holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Number of resources (shadowed ones not counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// Every resource, layer by layer (a name shadowed by an earlier layer is skipped).
    pub fn iter(&self) -> impl Iterator<Item = &Resource> {
        let overlap = self.overlap;
        self.layers.iter().enumerate().flat_map(move |(i, l)| {
            let earlier = &self.layers[..i];
            l.items.values().filter(move |r| {
                !overlap || !earlier.iter().any(|e| e.items.contains_key(r.name()))
            })
        })
    }
}

/// How many names of `layers` an earlier layer already holds (each later holder of a
/// name counts once). Walks the smaller side at each layer, so a small layer next to a
/// mesh-sized one costs its own size in lookups.
fn shadowed(layers: &[LayerRef]) -> usize {
    let mut count = 0;
    for (j, layer) in layers.iter().enumerate().skip(1) {
        let earlier = &layers[..j];
        let earlier_len: usize = earlier.iter().map(|l| l.items.len()).sum();
        count += if layer.items.len() <= earlier_len {
            layer
                .items
                .keys()
                .filter(|n| earlier.iter().any(|e| e.items.contains_key(n)))
                .count()
        } else {
            let names: std::collections::BTreeSet<&str> =
                earlier.iter().flat_map(|e| e.items.keys()).collect();
            names
                .into_iter()
                .filter(|n| layer.items.contains_key(n))
                .count()
        };
    }
    count
}

/// Everything one proxy should have, by type URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Keyed by the type URL constants: every proxy's view is a snapshot, and a copied
    /// URL string per type and view adds up.
    types: BTreeMap<&'static str, TypedResources>,
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds resources under `type_url` as a layer of their own.
    pub fn with(
        mut self,
        type_url: &'static str,
        resources: impl IntoIterator<Item = Resource>,
    ) -> Self {
        self.add_layer(type_url, Arc::new(Layer::new(resources)));
        self
    }

    /// Adds a (possibly shared) layer under `type_url`.
    pub fn add_layer(&mut self, type_url: &'static str, layer: LayerRef) {
        let typed = self.types.entry(type_url).or_default();
        let mut layers = std::mem::take(&mut typed.layers);
        layers.push(layer);
        *typed = TypedResources::from_layers(layers);
    }

    /// The same snapshot, each resource replaced by the equal one `interner` holds.
    pub fn interned(&self, interner: &mut ResourceInterner) -> Self {
        let mut out = Snapshot::new();
        for (type_url, typed) in &self.types {
            for layer in &typed.layers {
                // Equal resources: the same order, names and version.
                let items = layer.items.values().map(|r| interner.intern(r.clone()));
                let interned = Layer {
                    items: LayerItems(items.collect()),
                    version: layer.version.clone(),
                };
                out.add_layer(type_url, Arc::new(interned));
            }
        }
        out
    }

    /// A snapshot of views by type URL (empty views, and types no snapshot can hold,
    /// are left out).
    pub fn from_views<'a>(views: impl IntoIterator<Item = (&'a str, TypedResources)>) -> Self {
        Self {
            types: views
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .filter_map(|(t, v)| Some((type_url::known(t)?, v)))
                .collect(),
        }
    }

    /// Resources of one type.
    pub fn resources(&self, type_url: &str) -> Option<&TypedResources> {
        self.types.get(type_url)
    }

    /// Type URLs present.
    pub fn type_urls(&self) -> impl Iterator<Item = &'static str> + Clone {
        self.types.keys().copied()
    }

    /// The layers of `parts`, in order, type by type: shared snapshots first, then a
    /// proxy's own. Nothing is copied but layer references, and a type only one part
    /// has keeps that part's view as it is (every stream composes its view on every
    /// change of a shared layer, so this runs a thousand times per change).
    pub fn layered(parts: &[&Snapshot]) -> Self {
        Self::layered_after(parts, None)
    }

    /// [`Snapshot::layered`], keeping `previous`'s view of every type whose layers are
    /// the same ones: a change of one shared type re-stacks that type only.
    pub fn layered_after(parts: &[&Snapshot], previous: Option<&Snapshot>) -> Self {
        let mut stacked: BTreeMap<&'static str, Vec<&TypedResources>> = BTreeMap::new();
        for part in parts {
            for (type_url, typed) in &part.types {
                stacked.entry(type_url).or_default().push(typed);
            }
        }
        let types = stacked
            .into_iter()
            .map(|(type_url, views)| {
                let view = match views.as_slice() {
                    [one] => (*one).clone(),
                    many => {
                        let layers = || {
                            many.iter()
                                .flat_map(|v| v.layers.iter())
                                .filter(|l| !l.items.is_empty())
                        };
                        match previous.and_then(|p| p.types.get(type_url)) {
                            Some(prev) if same_arcs(&prev.layers, layers()) => prev.clone(),
                            _ => TypedResources::from_layers(layers().cloned().collect()),
                        }
                    }
                };
                (type_url, view)
            })
            .collect();
        Self { types }
    }
}

/// Whether two sequences hold the very same `Arc`s in the same order (a pointer compare
/// each: how an unchanged view, layer list or name set is told apart).
pub(crate) fn same_arcs<'a, T: ?Sized + 'a>(
    a: impl IntoIterator<Item = &'a Arc<T>>,
    b: impl IntoIterator<Item = &'a Arc<T>>,
) -> bool {
    a.into_iter()
        .map(Arc::as_ptr)
        .eq(b.into_iter().map(Arc::as_ptr))
}

/// The version of the empty set, computed once.
fn empty_version() -> Version {
    static EMPTY: std::sync::LazyLock<Version> =
        std::sync::LazyLock::new(|| set_version(std::iter::empty()).into());
    EMPTY.clone()
}

/// Version of a set of resources: a hash of their names and versions.
pub fn set_version<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> String {
    let mut text = String::new();
    for r in resources {
        text.push_str(r.name());
        text.push('\0');
        text.push_str(r.version());
        text.push('\n');
    }
    format!("{:016x}", fnv1a(text.as_bytes()))
}

/// What the control plane publishes for one node: its own resources, and the names of
/// the shared snapshots layered under them (see [`SnapshotCache::set_shared`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// Names of the shared snapshots under the node's own resources, in layer order.
    pub shared: Vec<String>,
    /// The node's own resources.
    pub own: Snapshot,
}

/// A proxy came or went: the first stream of a node opened, or its last closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeDemand {
    /// Node id.
    pub node: String,
    /// Whether a stream of the node is open now.
    pub connected: bool,
    /// ADS variant of the stream that opened (`delta` or `sotw`).
    pub protocol: &'static str,
}

/// How a stream of a node is to be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Its node's own snapshot, once the control plane has published it: the stream
    /// waits for it rather than take the fallback.
    Own,
    /// The fallback snapshot: the node is not a workload the control plane knows.
    Fallback,
    /// The fallback snapshot, and the reason the node was refused its own.
    Denied(String),
    /// No policy decides: its own snapshot when there is one, else the fallback.
    OwnOrFallback,
}

type Sender<T> = watch::Sender<Option<Arc<T>>>;
type Receiver<T> = watch::Receiver<Option<Arc<T>>>;

#[derive(Debug)]
struct NodeEntry {
    own: Sender<NodeSnapshot>,
    streams: usize,
}

/// Holds the latest snapshot of every node and of every shared layer set, and wakes
/// the streams of a node when what it should have changes.
///
/// A node with no snapshot of its own gets the fallback snapshot (what any proxy may
/// have, e.g. outbound config for a sidecar whose pod is not known yet); until a
/// fallback is set too, its streams wait rather than receive an empty mesh. Streams
/// opening and closing are reported on [`SnapshotCache::demands`], so the control plane
/// builds per-node resources only for the proxies that are connected.
#[derive(Debug)]
pub struct SnapshotCache {
    nodes: Mutex<HashMap<String, NodeEntry>>,
    shared: Mutex<HashMap<String, Sender<Snapshot>>>,
    fallback: Sender<Snapshot>,
    demands: Mutex<Option<mpsc::UnboundedSender<NodeDemand>>>,
    /// Bumped when on-demand resources may resolve differently.
    epoch: watch::Sender<u64>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self {
            nodes: Mutex::default(),
            shared: Mutex::default(),
            fallback: watch::channel(None).0,
            demands: Mutex::default(),
            epoch: watch::channel(0).0,
        }
    }
}

fn publish<T: PartialEq>(sender: &Sender<T>, value: T) -> bool {
    sender.send_if_modified(|current| {
        if current.as_deref() == Some(&value) {
            return false;
        }
        *current = Some(Arc::new(value));
        true
    })
}

/// Locks `m`; a panic elsewhere while it was held does not poison it for everyone.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SnapshotCache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn own_sender(&self, node: &str) -> Sender<NodeSnapshot> {
        lock(&self.nodes)
            .entry(node.to_string())
            .or_insert_with(|| NodeEntry {
                own: watch::channel(None).0,
                streams: 0,
            })
            .own
            .clone()
    }

    fn shared_sender(&self, name: &str) -> Sender<Snapshot> {
        lock(&self.shared)
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Publishes a node's snapshot (no shared layers); returns false (and wakes
    /// nobody) when it is unchanged.
    pub fn set(&self, node: &str, snapshot: Snapshot) -> bool {
        self.set_node(
            node,
            NodeSnapshot {
                shared: Vec::new(),
                own: snapshot,
            },
        )
    }

    /// Publishes a node's own resources over the shared snapshot `snapshot.shared`.
    pub fn set_node(&self, node: &str, snapshot: NodeSnapshot) -> bool {
        publish(&self.own_sender(node), snapshot)
    }

    /// Publishes a shared snapshot under `name`: every node layered on it sees the change.
    pub fn set_shared(&self, name: &str, snapshot: Snapshot) -> bool {
        publish(&self.shared_sender(name), snapshot)
    }

    /// Forgets a shared snapshot no node uses any more.
    pub fn remove_shared(&self, name: &str) {
        let mut shared = lock(&self.shared);
        if let Some(sender) = shared.get(name) {
            sender.send_replace(None);
            if sender.receiver_count() == 0 {
                shared.remove(name);
            }
        }
    }

    /// The shared snapshot published under `name`, if any.
    pub fn shared(&self, name: &str) -> Option<Arc<Snapshot>> {
        lock(&self.shared)
            .get(name)
            .and_then(|s| s.borrow().clone())
    }

    /// A node's own snapshot, if one is published.
    pub fn node(&self, node: &str) -> Option<Arc<NodeSnapshot>> {
        lock(&self.nodes)
            .get(node)
            .and_then(|e| e.own.borrow().clone())
    }

    /// What `node` is served: its own resources over its shared snapshots; `None`
    /// while it has none (or a shared layer it names is missing).
    pub fn view(&self, node: &str) -> Option<Snapshot> {
        let own = self.node(node)?;
        let shared: Vec<Arc<Snapshot>> = own
            .shared
            .iter()
            .map(|name| self.shared(name))
            .collect::<Option<_>>()?;
        let mut layers: Vec<&Snapshot> = shared.iter().map(|s| &**s).collect();
        layers.push(&own.own);
        Some(Snapshot::layered(&layers))
    }

    /// Publishes the snapshot for nodes without one of their own.
    pub fn set_fallback(&self, snapshot: Snapshot) -> bool {
        publish(&self.fallback, snapshot)
    }

    /// Tells streams with on-demand resources to resolve them again.
    pub fn bump_on_demand(&self) {
        self.epoch.send_modify(|e| *e = e.wrapping_add(1));
    }

    /// Forgets a node's own snapshot; its open streams wait or take the fallback.
    pub fn remove(&self, node: &str) {
        let mut nodes = lock(&self.nodes);
        if let Some(entry) = nodes.get(node) {
            entry.own.send_replace(None);
            if entry.own.receiver_count() == 0 && entry.streams == 0 {
                nodes.remove(node);
            }
        }
    }

    /// Node ids with a snapshot of their own.
    pub fn nodes(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.nodes)
            .iter()
            .filter(|(_, e)| e.own.borrow().is_some())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The stream of node arrivals and departures; there is one, taken once.
    pub fn demands(&self) -> Option<mpsc::UnboundedReceiver<NodeDemand>> {
        let mut slot = lock(&self.demands);
        if slot.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        *slot = Some(tx);
        Some(rx)
    }

    fn report(&self, demand: NodeDemand) {
        if let Some(tx) = lock(&self.demands).as_ref() {
            // A gone receiver means nobody builds per-node resources on demand.
            let _ = tx.send(demand);
        }
    }

    /// Subscribes a stream of `node` (speaking `protocol`) to what the node should have.
    pub fn watch(self: &Arc<Self>, node: &str, protocol: &'static str) -> NodeWatch {
        let first = {
            let mut nodes = lock(&self.nodes);
            let entry = nodes.entry(node.to_string()).or_insert_with(|| NodeEntry {
                own: watch::channel(None).0,
                streams: 0,
            });
            entry.streams += 1;
            entry.streams == 1
        };
        if first {
            self.report(NodeDemand {
                node: node.to_string(),
                connected: true,
                protocol,
            });
        }
        NodeWatch {
            cache: self.clone(),
            node: node.to_string(),
            protocol,
            own: self.own_sender(node).subscribe(),
            shared: Vec::new(),
            fallback: self.fallback.subscribe(),
            epoch: self.epoch.subscribe(),
            on_demand: true,
            serving: None,
            composed: None,
        }
    }

    fn unwatch(&self, node: &str, protocol: &'static str) {
        let last = {
            let mut nodes = lock(&self.nodes);
            match nodes.get_mut(node) {
                Some(entry) => {
                    entry.streams = entry.streams.saturating_sub(1);
                    entry.streams == 0
                }
                None => false,
            }
        };
        if last {
            self.report(NodeDemand {
                node: node.to_string(),
                connected: false,
                protocol,
            });
        }
    }
}

/// What a stream sent its proxy: views by type, less the names it held back from some
/// of them. Streams record this on every send; the held-back names are filtered out
/// only when someone reads it, so a send costs pointer copies, not a view per stream.
#[derive(Clone, Debug, Default)]
pub struct Served {
    views: Snapshot,
    withheld: Vec<(String, Arc<BTreeSet<String>>)>,
}

impl Served {
    /// `views`, less the `withheld` names of each type listed.
    pub fn new(views: Snapshot, withheld: Vec<(String, Arc<BTreeSet<String>>)>) -> Self {
        Self { views, withheld }
    }

    /// What the proxy has.
    pub fn snapshot(&self) -> Snapshot {
        if self.withheld.iter().all(|(_, names)| names.is_empty()) {
            return self.views.clone();
        }
        Snapshot::from_views(self.views.types.iter().map(|(t, view)| {
            match self.withheld.iter().find(|(w, _)| w == t) {
                Some((_, names)) if !names.is_empty() => {
                    let kept = view.iter().filter(|r| !names.contains(r.name())).cloned();
                    (*t, TypedResources::single(Arc::new(Layer::new(kept))))
                }
                _ => (*t, view.clone()),
            }
        }))
    }
}

/// What one stream's node should have: its own snapshot over its shared one, else the
/// fallback. Dropping it tells the cache the stream is gone.
#[derive(Debug)]
pub struct NodeWatch {
    cache: Arc<SnapshotCache>,
    node: String,
    protocol: &'static str,
    own: Receiver<NodeSnapshot>,
    shared: Vec<(String, Receiver<Snapshot>)>,
    fallback: Receiver<Snapshot>,
    epoch: watch::Receiver<u64>,
    /// Whether the stream has on-demand resources to resolve again when told to.
    on_demand: bool,
    /// What the last [`NodeWatch::current`] served.
    serving: Option<SnapshotSource>,
    /// The last composition and what it was made of, so an unchanged view is the same
    /// `Arc` (streams compare views by pointer).
    composed: Option<Composed>,
}

#[derive(Debug)]
struct Composed {
    own: Arc<NodeSnapshot>,
    shared: Vec<Arc<Snapshot>>,
    view: Arc<Snapshot>,
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.cache.unwatch(&self.node, self.protocol);
    }
}

/// Which snapshot a node is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Its own.
    Own,
    /// The fallback (the node is not known, or was refused its own).
    Fallback,
}

impl NodeWatch {
    /// Whether the stream has on-demand resources, which it resolves again on
    /// [`SnapshotCache::bump_on_demand`]; streams without any are not woken by it.
    pub fn set_on_demand(&mut self, on_demand: bool) {
        self.on_demand = on_demand;
    }

    /// Waits until anything the node's view is made of changes; errs only if the
    /// cache is gone. A stream served its own snapshot does not wake for fallback
    /// changes, nor one without on-demand resources for on-demand bumps: with ten
    /// thousand proxies, each needless wake is ten thousand tasks.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        let watch_fallback = self.serving != Some(SnapshotSource::Own);
        let shared = async {
            if self.shared.is_empty() {
                return std::future::pending().await;
            }
            let changes = self.shared.iter_mut().map(|(_, rx)| Box::pin(rx.changed()));
            futures::future::select_all(changes).await.0
        };
        tokio::select! {
                        r = self.own.changed() => r,
            r = self.fallback.changed(), if watch_fallback => r,
            r = shared => r,
            r = self.epoch.changed(), if self.on_demand => r,
        }
    }

    /// The snapshot to serve now under `admission`, marking everything as seen; `None`
    /// while what the stream should get is not published yet.
    pub fn current(&mut self, admission: &Admission) -> Option<(Arc<Snapshot>, SnapshotSource)> {
        self.epoch.borrow_and_update();
        let fallback = self.fallback.borrow_and_update().clone();
        let own = self.own.borrow_and_update().clone();
        let fallback = || fallback.map(|f| (f, SnapshotSource::Fallback));
        let current = match admission {
            Admission::Fallback | Admission::Denied(_) => fallback(),
            Admission::Own => own
                .and_then(|own| self.compose(own))
                .map(|s| (s, SnapshotSource::Own)),
            Admission::OwnOrFallback => match own {
                Some(own) => self.compose(own).map(|s| (s, SnapshotSource::Own)),
                None => fallback(),
            },
        };
        self.serving = current.as_ref().map(|(_, source)| *source);
        current
    }

    /// The node's own layers over its shared snapshots; `None` while one is missing.
    fn compose(&mut self, own: Arc<NodeSnapshot>) -> Option<Arc<Snapshot>> {
        let subscribed = self.shared.iter().map(|(n, _)| n);
        if !subscribed.eq(own.shared.iter()) {
            self.shared = own
                .shared
                .iter()
                .map(|n| (n.clone(), self.cache.shared_sender(n).subscribe()))
                .collect();
        }
        let mut parts = Vec::with_capacity(self.shared.len());
        for (_, rx) in &mut self.shared {
            parts.push(rx.borrow_and_update().clone()?);
        }
        if let Some(c) = &self.composed
            && Arc::ptr_eq(&c.own, &own)
            && same_arcs(&c.shared, &parts)
        {
            return Some(c.view.clone());
        }
        let mut layers: Vec<&Snapshot> = parts.iter().map(|p| &**p).collect();
        layers.push(&own.own);
        let previous = self.composed.as_ref().map(|c| &*c.view);
        let view = Arc::new(Snapshot::layered_after(&layers, previous));
        self.composed = Some(Composed {
            own,
            shared: parts,
            view: view.clone(),
        });
        Some(view)
    }
}
