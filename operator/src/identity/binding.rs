//! Binds an xDS stream to the pod it claims to be: its peer address must be the pod's IP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{PoisonError, RwLock};

use futures::future::BoxFuture;
use weft_xds::{Admission, StreamCredentials, StreamPolicy};

use crate::index::{MeshModel, Workload};

/// Decides which ADS stream may have which node's own config and secrets, kept
/// current with the model.
pub trait NodeBinding: StreamPolicy {
    /// Takes the pods `nodes` (changed, added or gone) from the model.
    fn update_nodes(&self, model: &MeshModel, nodes: &std::collections::BTreeSet<String>);
}

impl NodeBinding for PodAddressBinding {
    fn update_nodes(&self, model: &MeshModel, nodes: &std::collections::BTreeSet<String>) {
        PodAddressBinding::update_nodes(self, model, nodes);
    }
}

/// What a binding knows of each pod, by node id, kept current with the model.
#[derive(Debug)]
pub(crate) struct NodeTable<T> {
    pods: RwLock<HashMap<String, T>>,
    /// What to keep of a workload.
    of: fn(&Workload) -> T,
}

impl<T: Clone> NodeTable<T> {
    /// An empty table keeping `of(workload)` per pod.
    pub(crate) fn new(of: fn(&Workload) -> T) -> Self {
        Self {
            pods: RwLock::default(),
            of,
        }
    }

    /// Takes every pod from a new model.
    pub(crate) fn update(&self, model: &MeshModel) {
        let pods = model
            .workloads
            .iter()
            .map(|(node, w)| (node.clone(), (self.of)(w)))
            .collect();
        *self.pods.write().unwrap_or_else(PoisonError::into_inner) = pods;
    }

    /// Takes the pods `nodes` (changed, added or gone) from the model.
    pub(crate) fn update_nodes<'a>(
        &self,
        model: &MeshModel,
        nodes: impl IntoIterator<Item = &'a String>,
    ) {
        let mut pods = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        for node in nodes {
            match model.workloads.get(node) {
                Some(w) => {
                    pods.insert(node.clone(), (self.of)(w));
                }
                None => {
                    pods.remove(node);
                }
            }
        }
    }

    /// What is known of `node`.
    pub(crate) fn get(&self, node: &str) -> Option<T> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .cloned()
    }
}

/// Pod IPs by node id, checked against the peer address of every ADS stream.
#[derive(Debug)]
pub struct PodAddressBinding {
    pods: NodeTable<Vec<IpAddr>>,
}

impl Default for PodAddressBinding {
    fn default() -> Self {
        Self {
            pods: NodeTable::new(|w| w.ips.iter().copied().map(canonical).collect()),
        }
    }
}

impl PodAddressBinding {
    /// Takes the pods and their IPs from a new model.
    pub fn update(&self, model: &MeshModel) {
        self.pods.update(model);
    }

    /// Takes the pods `nodes` (changed, added or gone) from the model.
    pub fn update_nodes<'a>(&self, model: &MeshModel, nodes: impl IntoIterator<Item = &'a String>) {
        self.pods.update_nodes(model, nodes);
    }
}

/// IPv4 peers may show up as IPv4-mapped IPv6 addresses on a dual-stack listener.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

impl StreamPolicy for PodAddressBinding {
    fn check<'a>(
        &'a self,
        node: &'a str,
        credentials: &'a StreamCredentials,
    ) -> BoxFuture<'a, Admission> {
        Box::pin(std::future::ready(self.admission(node, credentials.peer)))
    }
}

impl PodAddressBinding {
    /// What a stream from `peer` claiming to be `node` may have.
    fn admission(&self, node: &str, peer: Option<SocketAddr>) -> Admission {
        match self.verify(node, peer) {
            Ok(true) => Admission::Own,
            Ok(false) => Admission::Fallback,
            Err(reason) => Admission::Denied(reason),
        }
    }

    /// `Ok(true)` when `peer` is the pod `node`'s address, `Ok(false)` when no such pod
    /// is known, `Err(reason)` when the address does not match.
    fn verify(&self, node: &str, peer: Option<SocketAddr>) -> Result<bool, String> {
        // An unknown node has no workload config or secrets to protect.
        let Some(expected) = self.pods.get(node) else {
            return Ok(false);
        };
        let peer_ip = peer.map(|p| canonical(p.ip()));
        let listed = || {
            expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match peer_ip {
            _ if expected.is_empty() => Err(format!(
                "pod {node} has no IP yet, so no stream can be bound to it"
            )),
            // A dual-stack pod may connect from either of its addresses.
            Some(ip) if expected.contains(&ip) => Ok(true),
            Some(ip) => Err(format!(
                "pod {node} has IP {} but the stream comes from {ip}",
                listed()
            )),
            None => Err(format!(
                "pod {node} has IP {} but the stream's peer address is unknown",
                listed()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use crate::sources::parse_manifests;

    fn binding() -> PodAddressBinding {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 198.18.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: pending}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: dual}\nstatus: {podIP: 198.18.0.4, podIPs: [{ip: 198.18.0.4}, {ip: 'fd00::4'}]}\n";
        let mut index = Index::new();
        index.reset(parse_manifests(text).unwrap());
        let b = PodAddressBinding::default();
        b.update(index.model());
        b
    }

    #[test]
    fn only_the_pods_own_address_may_have_its_config() {
        let b = binding();
        let from = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 40000));
        assert!(b.verify("default/a", from("198.18.0.2")) == Ok(true));
        assert!(
            b.verify("default/a", from("::ffff:198.18.0.2")) == Ok(true),
            "v4-mapped peers match"
        );
        let err = b.verify("default/a", from("198.18.0.9")).unwrap_err();
        assert!(
            err.contains("198.18.0.2") && err.contains("198.18.0.9"),
            "{err}"
        );
        assert!(b.verify("default/a", None).is_err());
        assert!(
            b.verify("default/pending", from("198.18.0.3")).is_err(),
            "no IP, no binding"
        );
        assert!(
            b.admission("default/unknown", from("198.18.0.3")) == Admission::Fallback,
            "unknown nodes get the fallback anyway"
        );
        assert!(b.admission("default/dual", from("198.18.0.4")) == Admission::Own);
        assert!(
            b.verify("default/dual", from("fd00::4")) == Ok(true),
            "a dual-stack pod may connect over IPv6"
        );
        assert!(matches!(
            b.admission("default/dual", from("fd00::5")),
            Admission::Denied(_)
        ));
    }
}
