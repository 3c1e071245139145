//! The harness's error type and the `Result` every fallible step returns.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The harness needs root for network namespaces and iptables.
    #[error("the end-to-end harness must run as root (it creates network namespaces); uid is {0}")]
    NotRoot(String),
    /// A binary the harness runs is missing.
    #[error("{what} not found: {hint}")]
    Missing {
        /// Which binary.
        what: &'static str,
        /// How to get it.
        hint: String,
    },
    /// A command failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Status and stderr.
        reason: String,
    },
    /// Something did not become ready in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Output could not be decoded.
    #[error("decoding {what}: {reason}")]
    Decode {
        /// What was decoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

pub(crate) type Result<T> = std::result::Result<T, HarnessError>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        path: path.to_path_buf(),
        source,
    }
}
