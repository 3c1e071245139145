//! Sources feed the index. Local mode reads a directory of manifests; every change
//! becomes a `reset` of the index with the union of the files' last good objects.

mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

pub use manifest::parse_manifests;

use crate::error::WeftError;
use crate::index::MeshObject;

/// One manifest file that could not be used, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

#[derive(Debug, Default)]
struct FileState {
    /// Objects of the last version that parsed.
    objects: Vec<MeshObject>,
    /// Why the current version does not parse, if it does not.
    error: Option<String>,
}

/// A directory of manifests and the last good objects of each file in it.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    !hidden
        && path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
}

impl ManifestDir {
    /// A directory not yet read.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Re-reads every file. A file that fails keeps its last good objects; a deleted
    /// file's objects go away. Fails only when the directory itself cannot be listed.
    pub fn rescan(&mut self) -> Result<(), WeftError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| WeftError::io(&self.dir, e))?;
        let mut present = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| WeftError::io(&self.dir, e))?.path();
            if path.is_file() && is_manifest(&path) {
                present.push(path);
            }
        }
        self.files.retain(|p, _| present.contains(p));
        for path in present {
            let state = self.files.entry(path.clone()).or_default();
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| WeftError::io(&path, e))
                .and_then(|text| parse_manifests(&text));
            match parsed {
                Ok(objects) => {
                    if state.error.take().is_some() {
                        tracing::info!(file = %path.display(), "manifest parses again");
                    }
                    state.objects = objects;
                }
                Err(e) => {
                    let reason = e.to_string();
                    if state.error.as_deref() != Some(reason.as_str()) {
                        tracing::error!(
                            file = %path.display(),
                            error = %reason,
                            "manifest rejected; its last good objects keep serving"
                        );
                    }
                    state.error = Some(reason);
                }
            }
        }
        Ok(())
    }

    /// The last good objects of every file.
    pub fn objects(&self) -> Vec<MeshObject> {
        self.files
            .values()
            .flat_map(|f| f.objects.iter().cloned())
            .collect()
    }

    /// Files whose current contents are rejected.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.files
            .iter()
            .filter_map(|(file, s)| {
                s.error.as_ref().map(|reason| ManifestError {
                    file: file.clone(),
                    reason: reason.clone(),
                })
            })
            .collect()
    }
}

/// How long to wait after a file event for more events before rescanning: editors
/// write a file in several steps.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// File events of a watched directory.
#[derive(Debug)]
pub struct DirWatch {
    // Dropping the watcher stops the events.
    _watcher: notify::RecommendedWatcher,
    events: mpsc::UnboundedReceiver<notify::Result<notify::Event>>,
}

impl DirWatch {
    /// Starts watching `dir` (not recursively).
    pub fn new(dir: &Path) -> Result<Self, WeftError> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            // The receiver is gone only at shutdown.
            let _ = tx.send(event);
        })?;
        watcher.watch(dir, notify::RecursiveMode::NonRecursive)?;
        Ok(Self {
            _watcher: watcher,
            events,
        })
    }

    /// Waits for the next change, then for the burst of events it belongs to to end.
    /// Returns `None` when watching stopped.
    pub async fn changed(&mut self) -> Option<()> {
        loop {
            match self.events.recv().await? {
                Ok(event) if changes_content(&event.kind) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "file watch error; rescanning");
                    break;
                }
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        while self.events.try_recv().is_ok() {}
        Some(())
    }
}

/// Reading a file (as every rescan does) raises access events; only these matter.
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::ModifyKind;
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write)) => {
            true
        }
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}
