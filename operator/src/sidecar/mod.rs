//! Tools that run in the pod beside the app: the Envoy bootstrap and the iptables
//! redirect.

pub mod bootstrap;
pub mod iptables;
