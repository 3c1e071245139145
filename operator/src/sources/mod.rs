//! Sources feed the index: the manifest directory (local mode) and the API server
//! (Kubernetes mode) both yield the same object changes.
//!
//! Every source bounds its input with `weft_crds::bounds` before any parser sees it:
//! the manifest directory in [`parse_manifest_documents`] (and by file size before it
//! reads a file). The Kubernetes source reads objects the API server has validated and
//! size-limited (1.5 MiB in etcd), decoded by serde_json (recursion limit 128) into
//! fixed-shape types, so no unbounded input reaches a parser there.

mod directory;
pub mod kube;
mod manifest;

pub use directory::{DirWatch, ManifestDir, ManifestError};
pub use manifest::{ParsedManifest, RejectedDocument, parse_manifest_documents, parse_manifests};

use crate::index::{Index, Kind, MeshObject, ModelDelta, ObjectChange};

/// What a source reports: the one seam between where objects come from (a manifest
/// directory, the API server) and the index.
#[derive(Debug)]
pub enum SourceEvent {
    /// Objects added, changed or removed.
    Changes(Vec<ObjectChange>),
    /// Every object of `kinds` (all kinds when `None`) as listed afresh, at the first
    /// sync or a relist: objects of those kinds that are not here are gone.
    Reset {
        /// The kinds listed.
        kinds: Option<Vec<Kind>>,
        /// All their objects.
        objects: Vec<MeshObject>,
    },
    /// The inputs the source cannot read right now (their last good objects stay),
    /// replacing the previous list.
    Unreadable(Vec<ManifestError>),
}

impl SourceEvent {
    /// The kinds of the objects this event names; `None` for a reset of every kind.
    pub fn touched_kinds(&self) -> Option<std::collections::BTreeSet<Kind>> {
        match self {
            Self::Changes(changes) => Some(
                changes
                    .iter()
                    .map(|c| match c {
                        ObjectChange::Upsert(o) => o.kind(),
                        ObjectChange::Delete(r) => r.kind,
                    })
                    .collect(),
            ),
            Self::Reset { kinds, .. } => kinds.as_ref().map(|k| k.iter().copied().collect()),
            Self::Unreadable(_) => Some(std::collections::BTreeSet::new()),
        }
    }

    /// Applies the event to `index`: what changed in the model, `None` when nothing did
    /// (or the event carries no objects).
    pub fn apply_to(self, index: &mut Index) -> Option<ModelDelta> {
        match self {
            Self::Changes(changes) => index.update(changes),
            Self::Reset { kinds, objects } => index.reset_kinds(kinds.as_deref(), objects),
            Self::Unreadable(_) => None,
        }
    }
}
