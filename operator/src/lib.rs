//! Weft's control plane: sources, index, translate and the local-mode runtime.

pub mod admin;
pub mod bootstrap;
pub mod cli;
pub mod connections;
pub mod error;
pub mod explain;
pub mod identity;
pub mod index;
pub mod iptables;
pub mod local;
pub mod metrics;
pub mod publish;
pub mod source;
pub mod translate;
pub mod xds_listener;

pub use error::WeftError;
