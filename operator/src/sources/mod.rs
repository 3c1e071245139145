//! Sources feed the index: the manifest directory (local mode) and the API server
//! (Kubernetes mode) both yield the same object changes.
//!
//! Every source bounds its input with `weft_crds::bounds` before any parser sees it:
//! the manifest directory in [`parse_manifest_documents`] (and by file size before it
//! reads a file); the Kubernetes source calls `bounds::check_value` on each object a
//! watcher yields before the index sees it.

mod directory;
mod manifest;

pub use directory::{DirWatch, ManifestDir, ManifestError};
pub use manifest::{ParsedManifest, RejectedDocument, parse_manifest_documents, parse_manifests};
