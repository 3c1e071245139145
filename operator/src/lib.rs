//! Weft's control plane.
//!
//! - [`sources`]: where objects come from (a manifest directory, the API server).
//! - [`index`]: objects in, the mesh model out, one change at a time.
//! - [`translate`]: the model into Envoy resources (pure, golden-tested).
//! - [`explain`]: what happens to a given call, from the model.
//! - [`identity`]: the CA, workload certificates, and which proxy may have which.
//! - [`runtime`]: publishing, the xDS and admin servers, the run loops.
//! - [`sidecar`]: the bootstrap and the iptables redirect, run in the pod.
//! - [`cli`]: the `weft` command.

pub mod check;
pub mod cli;
pub mod dashboard;

pub mod error;
pub mod explain;
pub mod identity;
pub mod index;
pub mod proxy_config;

pub mod runtime;
pub mod sidecar;
pub mod sources;
pub mod top;
pub mod translate;

pub use error::WeftError;
