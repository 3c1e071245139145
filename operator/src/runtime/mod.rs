//! What runs: the publisher that turns models into xDS snapshots, the xDS and admin
//! listeners, metrics, and the local-mode loop that ties them to a source.

pub mod admin;
pub mod connections;
pub mod controller;

pub mod local;
pub mod mesh;
pub mod metrics;
pub mod publish;
pub mod serve;
pub mod xds_listener;
