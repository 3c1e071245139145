//! The one error type of the `weft` crate.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can go wrong in the control plane and its CLI.
#[derive(Debug, thiserror::Error)]
pub enum WeftError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A manifest document is not valid YAML or not a valid object.
    #[error("{reason}")]
    Manifest {
        /// What is wrong, including the document number.
        reason: String,
    },
    /// An input is beyond Weft's bounds (size, nesting, alias expansion): see
    /// `weft_crds::bounds`.
    #[error(transparent)]
    Bound(weft_crds::CrdError),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("xDS server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The xDS layer failed.
    #[error(transparent)]
    Xds(#[from] weft_xds::XdsError),
    /// Watching the manifest directory failed.
    #[error("watching manifests: {0}")]
    Watch(#[from] notify::Error),
    /// An external command failed.
    #[error("{command}: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        reason: String,
    },
    /// A program a command needs is not installed (or not on PATH).
    #[error("{program} not found on PATH; it is needed for {purpose}")]
    MissingProgram {
        /// The program.
        program: String,
        /// What it is needed for.
        purpose: &'static str,
    },
    /// A request to the admin endpoint failed.
    #[error("admin endpoint {addr}: {reason}")]
    Admin {
        /// The admin address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// An argument is invalid.
    #[error("{0}")]
    Usage(String),
    /// Creating or loading the CA, or issuing a certificate, failed.
    #[error("identity: {0}")]
    Identity(String),
    /// A request to the Kubernetes API server failed.
    #[error("Kubernetes API: {what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The client's error.
        source: Box<kube::Error>,
    },
    /// A supervised task ended although it should run forever.
    #[error("task {task} ended unexpectedly: {reason}")]
    TaskEnded {
        /// Which task.
        task: &'static str,
        /// Why.
        reason: String,
    },
}

impl WeftError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Manifest { .. } => "manifest",
            Self::Bound(_) => "bound",
            Self::Bind { .. } => "bind",
            Self::Transport(_) => "transport",
            Self::Xds(e) => e.metric_label(),
            Self::Watch(_) => "watch",
            Self::Command { .. } => "command",
            Self::MissingProgram { .. } => "missing_program",
            Self::Admin { .. } => "admin",
            Self::Usage(_) => "usage",
            Self::Identity(_) => "identity",
            Self::TaskEnded { .. } => "task_ended",
            Self::Kube { .. } => "kube",
        }
    }

    /// A failed Kubernetes API request, saying what it was for.
    pub fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
