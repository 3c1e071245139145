//! Sources feed the index. Local mode reads a directory of manifests; every change
//! becomes a `reset` of the index with the union of the files' last good objects.

mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;

pub use manifest::{ParsedManifest, RejectedDocument, parse_manifest_documents, parse_manifests};

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
    /// The usable objects of the current version, plus the last good version of any
    /// object whose current document is rejected.
    objects: Vec<MeshObject>,
    /// Why the current version (or some of its documents) cannot be used.
    errors: Vec<String>,
}

impl FileState {
    /// Takes a new version of the file; rejected documents keep their object's last
    /// good version.
    fn update(&mut self, parsed: ParsedManifest) {
        let mut objects = parsed.objects;
        for rejected in &parsed.rejected {
            let Some(key) = &rejected.object else {
                continue;
            };
            let kept = self.objects.iter().find(|o| &o.object_ref() == key);
            if let Some(old) = kept
                && !objects.iter().any(|o| &o.object_ref() == key)
            {
                objects.push(old.clone());
            }
        }
        self.objects = objects;
        self.errors = parsed.rejected.into_iter().map(|r| r.reason).collect();
    }
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

    /// Re-reads every file. A file that does not parse keeps its last good objects, and so
    /// does an object whose document is invalid; a deleted file's objects go away. Fails
    /// only when the directory itself cannot be listed.
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
                .and_then(|text| parse_manifest_documents(&text));
            let before = state.errors.clone();
            match parsed {
                Ok(parsed) => state.update(parsed),
                Err(e) => state.errors = vec![e.to_string()],
            }
            for reason in state.errors.iter().filter(|e| !before.contains(e)) {
                tracing::error!(
                    file = %path.display(),
                    error = %reason,
                    "manifest rejected; the last good version of what it defines keeps serving"
                );
            }
            if !before.is_empty() && state.errors.is_empty() {
                tracing::info!(file = %path.display(), "manifest is valid again");
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
            .flat_map(|(file, s)| {
                s.errors.iter().map(|reason| ManifestError {
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
