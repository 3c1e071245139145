//! Per-node snapshots of typed resources and the cache that publishes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

use crate::resource::{Resource, fnv1a};

/// Resources by name, shared between snapshots and streams.
pub type ResourceMap = Arc<BTreeMap<String, Resource>>;

/// The resources of one type in a snapshot, by name, with the version of the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypedResources {
    items: ResourceMap,
    version: String,
}

impl Default for TypedResources {
    fn default() -> Self {
        Self::new(ResourceMap::default())
    }
}

impl TypedResources {
    fn new(items: ResourceMap) -> Self {
        let version = set_version(items.values());
        Self { items, version }
    }

    /// Adds (or replaces) resources and recomputes the set's version.
    fn extend(&mut self, resources: impl IntoIterator<Item = Resource>) {
        let mut items = BTreeMap::clone(&self.items);
        items.extend(resources.into_iter().map(|r| (r.name().to_string(), r)));
        *self = Self::new(Arc::new(items));
    }

    /// Resources by name.
    pub fn items(&self) -> &ResourceMap {
        &self.items
    }

    /// Version of the whole set (computed once, when the snapshot is built).
    pub fn version(&self) -> &str {
        &self.version
    }
}

/// Everything one proxy should have, by type URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    types: BTreeMap<String, TypedResources>,
}

impl Snapshot {
    /// An empty snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a resource under `type_url`.
    pub fn insert(&mut self, type_url: &str, resource: Resource) {
        self.extend_type(type_url, [resource]);
    }

    /// Builder form of [`Snapshot::insert`] for many resources.
    pub fn with(mut self, type_url: &str, resources: impl IntoIterator<Item = Resource>) -> Self {
        self.extend_type(type_url, resources);
        self
    }

    fn extend_type(&mut self, type_url: &str, resources: impl IntoIterator<Item = Resource>) {
        self.types
            .entry(type_url.to_string())
            .or_default()
            .extend(resources);
    }

    /// Resources of one type (empty when the type has none).
    pub fn resources(&self, type_url: &str) -> Option<&TypedResources> {
        self.types.get(type_url)
    }

    /// Number of resources over all types.
    pub fn len(&self) -> usize {
        self.types.values().map(|t| t.items.len()).sum()
    }

    /// Whether the snapshot holds no resource at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

/// Holds the latest snapshot of every node and wakes the streams of a node on change.
///
/// A node with no snapshot yet gets `None`: its streams wait rather than receive an
/// empty mesh.
#[derive(Debug, Default)]
pub struct SnapshotCache {
    nodes: Mutex<HashMap<String, watch::Sender<Option<Arc<Snapshot>>>>>,
}

impl SnapshotCache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn sender(&self, node: &str) -> watch::Sender<Option<Arc<Snapshot>>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Publishes a node's snapshot; returns false (and wakes nobody) when it is unchanged.
    pub fn set(&self, node: &str, snapshot: Snapshot) -> bool {
        self.sender(node).send_if_modified(|current| {
            if current.as_deref() == Some(&snapshot) {
                return false;
            }
            *current = Some(Arc::new(snapshot));
            true
        })
    }

    /// Forgets a node (its open streams keep their last snapshot).
    pub fn remove(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.remove(node);
    }

    /// Node ids with a snapshot.
    pub fn nodes(&self) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<String> = nodes.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// The current snapshot of a node, if any.
    pub fn get(&self, node: &str) -> Option<Arc<Snapshot>> {
        self.sender(node).borrow().clone()
    }

    /// Subscribes to a node's snapshots.
    pub fn watch(&self, node: &str) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.sender(node).subscribe()
    }
}

impl Snapshot {
    /// Adds every resource of `other` (replacing same-named ones).
    pub fn extend(&mut self, other: Snapshot) {
        for (type_url, typed) in other.types {
            match self.types.entry(type_url) {
                std::collections::btree_map::Entry::Occupied(mut mine) => {
                    mine.get_mut().extend(typed.items.values().cloned());
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(typed);
                }
            }
        }
    }
}
