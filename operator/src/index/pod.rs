//! A pod as the index keeps it: only what the model reads. A mesh holds tens of
//! thousands of pods, and k8s-openapi's `Pod` and `Container` take 2.4 and 2.3 KB each
//! inline however empty: 20,000 pods cost about 96 MB as `Pod`s, a tenth of that as
//! [`MeshPod`]s. Labels and annotations are kept as sorted vectors: a map of one
//! entry allocates a whole B-tree node (eleven slots, about 550 bytes). Both sources (manifests and the API server) build pods through here,
//! so both keep the same fields.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The prefix of the annotations the mesh reads on a pod (probes, egress, opt-out).
const MESH_ANNOTATIONS: &str = "weft.dev/";

/// A pod reduced to what the model reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshPod {
    /// Name, namespace, deletion and creation times; its labels and annotations are
    /// moved out into [`Self::labels`] and [`Self::annotations`].
    pub metadata: ObjectMeta,
    /// Labels, sorted by key.
    pub labels: Vec<(String, String)>,
    /// The `weft.dev/` annotations, sorted by key.
    pub annotations: Vec<(String, String)>,
    /// The service account it runs as: `spec.serviceAccountName`, `default` when unset
    /// or empty.
    pub service_account: String,
    /// The named container ports of all containers (service `targetPort` by name).
    pub named_ports: Vec<NamedPort>,
    /// `status.podIP`, then the rest of `status.podIPs`; unparsable ones are left out.
    pub ips: Vec<IpAddr>,
    /// `status.phase` is `Succeeded` or `Failed`: the pod serves nothing any more.
    pub finished: bool,
    /// The `Ready` condition's status, `None` when the pod has none (hand-written
    /// manifests often give only `podIP`).
    pub ready: Option<bool>,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedPort {
    /// The port's name.
    pub name: String,
    /// Its number, as written (not yet checked to be a port).
    pub container_port: i32,
}

impl From<Pod> for MeshPod {
    fn from(pod: Pod) -> Self {
        let mut metadata = pod.metadata;
        super::slim_meta(&mut metadata);

        let labels: Vec<(String, String)> = metadata.labels.take().into_iter().flatten().collect();
        let annotations: Vec<(String, String)> = metadata
            .annotations
            .take()
            .into_iter()
            .flatten()
            .filter(|(k, _)| k.starts_with(MESH_ANNOTATIONS))
            .collect();

        let (service_account, mut named_ports) = match pod.spec {
            Some(spec) => {
                let ports = spec
                    .containers
                    .into_iter()
                    .flat_map(|c| c.ports.into_iter().flatten())
                    .filter_map(|p| {
                        Some(NamedPort {
                            name: p.name?,
                            container_port: p.container_port,
                        })
                    })
                    .collect();
                (spec.service_account_name, ports)
            }
            None => (None, Vec::new()),
        };
        let service_account = service_account
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_string());
        named_ports.shrink_to_fit();
        let mut out = MeshPod {
            metadata,
            labels,
            annotations,
            service_account,
            named_ports,
            ..MeshPod::default()
        };
        if let Some(status) = pod.status {
            out.finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            out.ready = status
                .conditions
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .map(|c| c.status == "True");
            let written = status
                .pod_ip
                .into_iter()
                .chain(status.pod_ips.into_iter().flatten().map(|ip| ip.ip));
            for ip in written {
                if let Ok(ip) = ip.parse::<IpAddr>()
                    && !out.ips.contains(&ip)
                {
                    out.ips.push(ip);
                }
            }
            out.ips.shrink_to_fit();
        }
        out
    }
}

impl MeshPod {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        find(&self.labels, key)
    }

    /// The value of annotation `key` (only `weft.dev/` ones are kept).
    pub fn annotation(&self, key: &str) -> Option<&str> {
        find(&self.annotations, key)
    }
}

/// The value of `key` in pairs sorted by key (a BTreeMap's order, as they were read).
fn find<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .binary_search_by(|(k, _)| k.as_str().cmp(key))
        .ok()
        .map(|i| pairs[i].1.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_only_what_the_model_reads() {
        let text = r#"{"metadata": {"name": "p", "namespace": "d", "labels": {"tier": "front", "app": "web"}, "resourceVersion": "7", "managedFields": [{"manager": "kubelet"}],
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}", "other": "1", "weft.dev/egress": "./*"}},
          "spec": {"serviceAccountName": "web", "volumes": [{"name": "v"}],
            "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 9090}]},
                           {"name": "side", "ports": [{"containerPort": 15000, "name": "admin"}]}]},
          "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}, {"ip": "bad"}], "phase": "Running",
            "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}}"#;
        let pod: MeshPod = serde_json::from_str::<Pod>(text).unwrap().into();
        assert!(pod.metadata.managed_fields.is_none() && pod.metadata.resource_version.is_none());
        assert!(pod.metadata.annotations.is_none() && pod.metadata.labels.is_none());
        let annotations: Vec<&str> = pod.annotations.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(annotations, vec!["weft.dev/egress"]);
        assert_eq!(pod.annotation("weft.dev/egress"), Some("./*"));
        assert_eq!(pod.annotation("other"), None);
        assert_eq!(
            (pod.label("app"), pod.label("tier"), pod.label("b")),
            (Some("web"), Some("front"), None)
        );
        assert_eq!(pod.service_account, "web");
        let ports: Vec<(&str, i32)> = pod
            .named_ports
            .iter()
            .map(|p| (p.name.as_str(), p.container_port))
            .collect();
        assert_eq!(ports, vec![("http", 8080), ("admin", 15000)]);
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(pod.ips, ips);
        assert_eq!((pod.finished, pod.ready), (false, Some(false)));
    }

    #[test]
    fn a_finished_pod_without_conditions() {
        let text = r#"{"metadata": {"name": "p"}, "status": {"phase": "Succeeded"}}"#;
        let pod: MeshPod = serde_json::from_str::<Pod>(text).unwrap().into();
        assert_eq!((pod.finished, pod.ready), (true, None));
        assert_eq!(pod.service_account, "default");
        assert!(pod.ips.is_empty() && pod.annotations.is_empty());
    }
}
