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

    /// Adds (or replaces) resources under `type_url`.
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

type SnapshotSender = watch::Sender<Option<Arc<Snapshot>>>;

/// Holds the latest snapshot of every node and wakes the streams of a node on change.
///
/// A node with no snapshot of its own gets the fallback snapshot (what any proxy may
/// have, e.g. outbound config for a sidecar whose pod is not known yet); until a
/// fallback is set too, its streams wait rather than receive an empty mesh.
#[derive(Debug)]
pub struct SnapshotCache {
    nodes: Mutex<HashMap<String, SnapshotSender>>,
    fallback: SnapshotSender,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self {
            nodes: Mutex::default(),
            fallback: watch::channel(None).0,
        }
    }
}

fn publish(sender: &SnapshotSender, snapshot: Snapshot) -> bool {
    sender.send_if_modified(|current| {
        if current.as_deref() == Some(&snapshot) {
            return false;
        }
        *current = Some(Arc::new(snapshot));
        true
    })
}

impl SnapshotCache {
    /// An empty cache.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn sender(&self, node: &str) -> SnapshotSender {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .entry(node.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Publishes a node's snapshot; returns false (and wakes nobody) when it is unchanged.
    pub fn set(&self, node: &str, snapshot: Snapshot) -> bool {
        publish(&self.sender(node), snapshot)
    }

    /// Publishes the snapshot for nodes without one of their own.
    pub fn set_fallback(&self, snapshot: Snapshot) -> bool {
        publish(&self.fallback, snapshot)
    }

    /// Forgets a node's own snapshot; its open streams move to the fallback.
    pub fn remove(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = nodes.get(node) {
            sender.send_replace(None);
            if sender.receiver_count() == 0 {
                nodes.remove(node);
            }
        }
    }

    /// Node ids with a snapshot of their own.
    pub fn nodes(&self) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<String> = nodes
            .iter()
            .filter(|(_, s)| s.borrow().is_some())
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Subscribes to what a node should have.
    pub fn watch(&self, node: &str) -> NodeWatch {
        NodeWatch {
            own: self.sender(node).subscribe(),
            fallback: self.fallback.subscribe(),
        }
    }
}

/// What one node should have: its own snapshot, else the fallback.
#[derive(Debug)]
pub struct NodeWatch {
    own: watch::Receiver<Option<Arc<Snapshot>>>,
    fallback: watch::Receiver<Option<Arc<Snapshot>>>,
}

/// Which snapshot a node is being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotSource {
    /// Its own.
    Own,
    /// The fallback (the node is not known).
    Fallback,
}

impl NodeWatch {
    /// Waits until either snapshot changes; errs only if the cache is gone.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        tokio::select! {
            r = self.own.changed() => r,
            r = self.fallback.changed() => r,
        }
    }

    /// The snapshot to serve now, marking both as seen. With `own_allowed` false the
    /// node only ever gets the fallback.
    pub fn current(&mut self, own_allowed: bool) -> Option<(Arc<Snapshot>, SnapshotSource)> {
        let fallback = self.fallback.borrow_and_update().clone();
        match self.own.borrow_and_update().clone() {
            Some(own) if own_allowed => Some((own, SnapshotSource::Own)),
            _ => fallback.map(|f| (f, SnapshotSource::Fallback)),
        }
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
