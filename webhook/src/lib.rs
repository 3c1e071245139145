//! Weft's sidecar injection: a pure [`inject`] that turns a pod into a JSON patch,
//! and an HTTPS server for `admission.k8s.io/v1` AdmissionReviews; and the SMI CRDs'
//! conversion webhook ([`handle_conversion`], on `/convert`).

pub mod convert;
pub mod inject;
pub mod review;
pub mod server;

use std::path::PathBuf;

pub use convert::handle_conversion;
pub use inject::{InjectConfig, Skip, inject};
pub use review::{ReviewReply, handle_review};

/// Errors of the webhook.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A pod or patch could not be encoded as JSON.
    #[error("encoding JSON: {0}")]
    Encode(serde_json::Error),
    /// A file could not be read.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The serving certificate or key is unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// A listener could not be bound.
    #[error("binding {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    /// A connection task panicked: a bug, so the process stops.
    #[error("connection task panicked: {0}")]
    TaskPanicked(String),
    /// The configuration file is invalid.
    #[error("config {0}: {1}")]
    Config(PathBuf, String),
}

impl WebhookError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Encode(_) => "encode",
            Self::Io(..) => "io",
            Self::Tls(_) => "tls",
            Self::Bind(..) => "bind",
            Self::TaskPanicked(_) => "task_panicked",
            Self::Config(..) => "config",
        }
    }
}
