//! Publishes a mesh model as per-proxy snapshots into the xDS cache.

use std::collections::BTreeSet;
use std::sync::Arc;

use weft_xds::SnapshotCache;

use crate::index::MeshModel;
use crate::translate::{translate_shared, translate_workload};

/// What one publish did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Proxies known to the model.
    pub proxies: usize,
    /// Proxies whose snapshot changed (and so get a push).
    pub changed: usize,
}

/// Turns models into snapshots; remembers which nodes it published to remove stale ones.
#[derive(Debug)]
pub struct MeshPublisher {
    cache: Arc<SnapshotCache>,
    nodes: BTreeSet<String>,
}

impl MeshPublisher {
    /// A publisher into `cache`.
    pub fn new(cache: Arc<SnapshotCache>) -> Self {
        Self {
            cache,
            nodes: BTreeSet::new(),
        }
    }

    /// Publishes `model`: shared resources are encoded once and their bytes shared.
    pub fn publish(&mut self, model: &MeshModel) -> PublishStats {
        let shared = translate_shared(model).to_snapshot();
        // A sidecar whose pod is not (yet) known still gets the outbound config.
        self.cache.set_fallback(shared.clone());
        let mut stats = PublishStats::default();
        let mut nodes = BTreeSet::new();
        for (node, workload) in &model.workloads {
            let mut snapshot = shared.clone();
            snapshot.extend(translate_workload(workload).to_snapshot());
            if self.cache.set(node, snapshot) {
                stats.changed += 1;
            }
            nodes.insert(node.clone());
        }
        for gone in self.nodes.difference(&nodes) {
            self.cache.remove(gone);
        }
        stats.proxies = nodes.len();
        self.nodes = nodes;
        stats
    }
}
