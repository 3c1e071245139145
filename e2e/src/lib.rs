//! End-to-end harness: pods are network namespaces on a bridge, each with the test
//! app and (optionally) a real Envoy sidecar behind `weft init-iptables`; the control
//! plane is a real `weft up` over a manifest directory.
//!
//! Addresses come from 198.18.0.0/15 only: pods from 198.18.<id>.0/24, ClusterIPs from
//! 198.19.<id>.0/24; with IPv6 (see [`IpFamilies`]) also from the ULA prefix
//! fd00:198:18:<id in hex>::/64 (pods) and fd00:198:19:<id in hex>::/64 (ClusterIPs). Pods get an
//! on-link route for ClusterIPs and no default route, so nothing leaves the bridge.
//! Everything created is removed on drop, also after a panic.

pub mod apiserver;
mod command;
mod error;
mod harness;
mod report;

pub use command::{envoy_binary, on_path, workspace_binary};
pub use error::HarnessError;
pub use harness::Harness;
pub use harness::cluster::{CONTROLLER_NAMESPACE, EndpointState, KubeCluster};
pub use harness::network::{IpFamilies, host_port};
pub use harness::topology::PortSpec;
pub use harness::traffic::RunningLoad;
pub use harness::wait::wait_until;
pub use report::{LoadReport, RequestResult, now_ms};

/// UID the sidecar runs as; `weft init-iptables` exempts its traffic.
pub const PROXY_UID: u32 = 1337;
/// Port every test app listens on.
pub const APP_PORT: u16 = 8080;
/// Second port every test app listens on.
pub const EXTRA_APP_PORT: u16 = 9090;
const XDS_PORT: u16 = 15010;
const ADMIN_PORT: u16 = 15090;
