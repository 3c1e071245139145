//! The manifest directory of local mode: a rescan re-reads only the files that changed
//! and yields object changes (the effective object of each name: the last file
//! defining it wins). Files are bounded by size before they are read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::Watcher;
use tokio::sync::mpsc;
use weft_crds::bounds;

use super::manifest::{DocumentCache, ParsedManifest, parse_manifest_documents_cached};

use crate::error::WeftError;
use crate::index::{MeshObject, ObjectChange, ObjectRef};

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
    objects: BTreeMap<ObjectRef, MeshObject>,
    /// Why the current version (or some of its documents) cannot be used.
    errors: Vec<String>,
    /// What the file looked like when last read: a rescan skips it while unchanged.
    stamp: Option<FileStamp>,
    /// Its documents as last parsed, so a one-object edit re-parses one document.
    documents: DocumentCache,
}

/// Enough of a file's metadata to tell that it changed (an editor's atomic rename
/// gives a new inode; an in-place write a new mtime and usually a new size).
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

impl FileState {
    /// Takes a new version of the file; rejected documents keep their object's last
    /// good version.
    fn update(&mut self, parsed: ParsedManifest) {
        // A later document of the same name wins, as a later `kubectl apply` would.
        let mut objects: BTreeMap<ObjectRef, MeshObject> = parsed
            .objects
            .into_iter()
            .map(|o| (o.object_ref(), o))
            .collect();
        for rejected in &parsed.rejected {
            let Some(key) = &rejected.object else {
                continue;
            };
            if let Some(old) = self.objects.get(key)
                && !objects.contains_key(key)
            {
                objects.insert(key.clone(), old.clone());
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

    /// Re-reads the files that changed since the last rescan (all of them the first
    /// time) and returns the object changes. A file that does not parse keeps its last
    /// good objects, and so does an object whose document is invalid; a deleted file's
    /// objects go away. When several files define one object, the last file (by path)
    /// wins. Fails only when the directory itself cannot be listed.
    pub fn rescan(&mut self) -> Result<Vec<ObjectChange>, WeftError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| WeftError::io(&self.dir, e))?;
        let mut present = BTreeSet::new();
        for entry in entries {
            let path = entry.map_err(|e| WeftError::io(&self.dir, e))?.path();
            if path.is_file() && is_manifest(&path) {
                present.insert(path);
            }
        }
        // Names whose effective object may differ: those of changed and removed files.
        let mut touched: BTreeSet<ObjectRef> = BTreeSet::new();
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(*p))
            .cloned()
            .collect();
        for path in removed {
            if let Some(state) = self.files.remove(&path) {
                touched.extend(state.objects.keys().cloned());
            }
        }
        for path in present {
            let stamp = FileStamp::of(&path);
            let state = self.files.entry(path.clone()).or_default();
            if stamp.is_some() && state.stamp == stamp {
                continue;
            }
            touched.extend(state.objects.keys().cloned());
            state.stamp = stamp;
            let parsed = read_manifest(&path)
                .and_then(|text| parse_manifest_documents_cached(&text, &mut state.documents));
            tracing::debug!(
                file = %path.display(),
                documents_parsed = state.documents.last_parsed(),
                "manifest re-read"
            );
            let errors_before = state.errors.clone();
            match parsed {
                Ok(parsed) => state.update(parsed),
                Err(e) => state.errors = vec![e.to_string()],
            }
            touched.extend(state.objects.keys().cloned());
            for reason in state.errors.iter().filter(|e| !errors_before.contains(e)) {
                tracing::error!(
                    file = %path.display(),
                    error = %reason,
                    "manifest rejected; the last good version of what it defines keeps serving"
                );
            }
            if !errors_before.is_empty() && state.errors.is_empty() {
                tracing::info!(file = %path.display(), "manifest is valid again");
            }
        }
        let mut changes = Vec::new();
        for key in touched {
            match self.effective(&key) {
                Some(object) => changes.push(ObjectChange::Upsert(object.clone())),
                None => changes.push(ObjectChange::Delete(key)),
            }
        }
        Ok(changes)
    }

    /// The object `key` names, from the last file (by path) that defines it (files are
    /// few; each lookup is by name).
    fn effective(&self, key: &ObjectRef) -> Option<&MeshObject> {
        self.files.values().rev().find_map(|f| f.objects.get(key))
    }

    /// The last good objects of every file.
    pub fn objects(&self) -> Vec<MeshObject> {
        self.files
            .values()
            .flat_map(|f| f.objects.values().cloned())
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

/// Reads a manifest file, refusing one beyond `MAX_FILE_BYTES` before reading it (a log
/// or an image saved into the directory by mistake must not be read into memory).
fn read_manifest(path: &Path) -> Result<String, WeftError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| WeftError::io(path, e))?;
    let size = file.metadata().map_err(|e| WeftError::io(path, e))?.len();
    bounds::check_file_size(size).map_err(WeftError::Bound)?;
    // `take` also bounds a file that grows while it is read; parsing then rejects it.
    let mut text = String::new();
    file.take(bounds::MAX_FILE_BYTES as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| WeftError::io(path, e))?;
    Ok(text)
}

/// How long the directory must be quiet after a file event before rescanning: editors
/// and `cp -r` write in several steps.
const QUIET: Duration = Duration::from_millis(20);

/// The quiet wanted after an event that ends a write (a file renamed into place,
/// closed after writing, or removed): the file is whole, so only events already on
/// their way are worth waiting for. A `cp -r` that is still going raises its next
/// event sooner than this.
const QUIET_AFTER_COMPLETE: Duration = Duration::from_millis(2);

/// A directory that never goes quiet is rescanned at least this often.
const MAX_DEBOUNCE: Duration = Duration::from_millis(250);

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
        let mut quiet = loop {
            match self.events.recv().await? {
                Ok(event) if changes_content(&event.kind) => break quiet_after(&event.kind),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "file watch error; rescanning");
                    break QUIET;
                }
            }
        };
        let deadline = tokio::time::Instant::now() + MAX_DEBOUNCE;
        loop {
            let quiet_until = (tokio::time::Instant::now() + quiet).min(deadline);
            match tokio::time::timeout_at(quiet_until, self.events.recv()).await {
                // More events of the same burst: wait for quiet again, as long as the
                // latest of them asks.
                Ok(Some(event)) if tokio::time::Instant::now() < deadline => {
                    if let Ok(event) = event
                        && changes_content(&event.kind)
                    {
                        quiet = quiet_after(&event.kind);
                    }
                }
                Ok(None) => return None,
                _ => break,
            }
        }
        while self.events.try_recv().is_ok() {}
        Some(())
    }
}

/// How long to wait for more events after `kind` (see [`QUIET_AFTER_COMPLETE`]).
fn quiet_after(kind: &notify::EventKind) -> Duration {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        | EventKind::Remove(_) => QUIET_AFTER_COMPLETE,
        _ => QUIET,
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::EventKind;
    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode,
    };

    #[test]
    fn a_finished_write_waits_briefly_and_a_write_in_progress_waits_for_quiet() {
        let finished = [
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            EventKind::Remove(RemoveKind::File),
        ];
        for kind in finished {
            assert!(changes_content(&kind), "{kind:?}");
            assert_eq!(quiet_after(&kind), QUIET_AFTER_COMPLETE, "{kind:?}");
        }
        let in_progress = [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Content)),
            // The old name of a rename: the new one is yet to show.
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
        ];
        for kind in in_progress {
            assert!(changes_content(&kind), "{kind:?}");
            assert_eq!(quiet_after(&kind), QUIET, "{kind:?}");
        }
        assert!(QUIET_AFTER_COMPLETE < QUIET);
    }

    #[tokio::test]
    async fn a_file_renamed_into_place_is_reported() {
        let dir = std::env::temp_dir().join(format!("weft-dir-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut watch = DirWatch::new(&dir).expect("watch");
        let hidden = dir.join(".mesh.yaml.tmp");
        std::fs::write(&hidden, "kind: Service\n").expect("write");
        std::fs::rename(&hidden, dir.join("mesh.yaml")).expect("rename");
        let changed = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await;
        assert_eq!(changed, Ok(Some(())));

        let _ = std::fs::remove_dir_all(&dir);
    }
}
