//! Weft's xDS server: per-node snapshots of typed resources, served over ADS.
//!
//! Knows nothing of Kubernetes or of the mesh: callers put [`Snapshot`]s into a
//! [`SnapshotCache`] and [`AdsService`] streams them to every proxy.

pub mod connection;
pub mod delta;
pub mod resource;
pub mod service;
pub mod snapshot;

pub use connection::{AdsConnection, AdsResponse, Nack, RequestEvent, TypeSync};
pub use delta::{
    DeltaAdsConnection, DeltaResponse, Diff, DiffMemo, MAX_RESPONSE_BYTES, SubscriptionChange,
    encode_delta_response,
};
pub use resource::{Resource, ResourceInterner, type_url};
pub use service::{
    AdsProtocol, AdsService, OnDemandResolver, StreamCredentials, StreamPolicy, StreamSupervisor,
    StreamSync, SyncRegistry, WireResponse, encode_response,
};
pub use snapshot::{
    Admission, Layer, LayerItems, LayerRef, NodeDemand, NodeSnapshot, NodeWatch, Served, Snapshot,
    SnapshotCache, SnapshotSource, TypedResources,
};

/// Errors of the xDS server.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    /// A request without `type_url` (ADS requires it).
    #[error("discovery request without type_url")]
    MissingTypeUrl,
    /// The first request of a stream did not say which node it is.
    #[error("first discovery request carries no node id")]
    MissingNode,
    /// A stream task panicked: a bug, so the process stops.
    #[error("ADS stream task panicked: {0}")]
    StreamTaskPanicked(String),
}

impl XdsError {
    /// Short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingTypeUrl => "missing_type_url",
            Self::MissingNode => "missing_node",
            Self::StreamTaskPanicked(_) => "stream_task_panicked",
        }
    }
}
