//! The manifest directory `weft up` watches: `cluster.yaml`, access rules, any file a test writes.

use std::fs;
use std::path::PathBuf;

use super::Harness;
use crate::APP_PORT;
use crate::error::{Result, io};

impl Harness {
    /// The manifest directory `weft up` watches.
    pub fn manifests(&self) -> PathBuf {
        self.work.join("manifests")
    }

    /// Writes the Services and Pods (what an API server would hold) as `cluster.yaml`.
    pub fn write_cluster_manifest(&self) -> Result<()> {
        self.write_manifest("cluster.yaml", &self.cluster_manifest())
    }

    /// The Services and Pods as YAML documents.
    pub(crate) fn cluster_manifest(&self) -> String {
        let mut docs = Vec::new();
        for (name, svc) in &self.services {
            let selector: String = svc
                .selector
                .iter()
                .map(|(k, v)| format!("    {k}: {v}\n"))
                .collect();
            let ips: Vec<String> = svc
                .cluster_ips
                .iter()
                .map(|ip| format!("\"{ip}\""))
                .collect();
            let families: Vec<&str> = svc
                .cluster_ips
                .iter()
                .map(|ip| if ip.is_ipv6() { "IPv6" } else { "IPv4" })
                .collect();
            let ports: String = svc
                .ports
                .iter()
                .map(|p| {
                    let mut text =
                        format!("  - port: {}\n    targetPort: {}\n", p.port, p.target_port);
                    if let Some(n) = &p.name {
                        text.push_str(&format!("    name: {n}\n"));
                    }
                    if let Some(a) = &p.app_protocol {
                        text.push_str(&format!("    appProtocol: {a}\n"));
                    }
                    text
                })
                .collect();
            docs.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {}\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  selector:\n{selector}  ports:\n{ports}",
                svc.namespace,
                ips.first().cloned().unwrap_or_default(),
                ips.join(", "),
                families.join(", "),
            ));
        }
        for (name, pod) in self.pods.iter().filter(|(_, p)| !p.unlisted) {
            let labels: String = pod
                .labels
                .iter()
                .map(|(k, v)| format!("    {k}: {v}\n"))
                .collect();
            let annotations: String = if pod.annotations.is_empty() {
                String::new()
            } else {
                let items: String = pod
                    .annotations
                    .iter()
                    .map(|(k, v)| format!("    {k}: {}\n", serde_json::Value::String(v.clone())))
                    .collect();
                format!("  annotations:\n{items}")
            };
            let pod_ips: Vec<String> = pod
                .ips
                .iter()
                .map(|ip| format!("{{ip: \"{ip}\"}}"))
                .collect();
            docs.push(format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {}\n  labels:\n{labels}{annotations}spec:\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: weft-e2e-app\n    ports:\n    - containerPort: {APP_PORT}\nstatus:\n  phase: Running\n  podIP: \"{}\"\n  podIPs: [{}]\n",
                pod.namespace,
                pod.service_account,
                pod.ips.first().map(ToString::to_string).unwrap_or_default(),
                                pod_ips.join(", ")
            ));
        }
        docs.join("---\n")
    }

    /// Writes a manifest file atomically (write + rename), as an editor would.
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        let tmp = self.manifests().join(format!(".{file}.tmp"));
        let path = self.manifests().join(file);
        fs::write(&tmp, text).map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Writes `FILE` = a TrafficTarget letting `sources` (service accounts) reach
    /// `destination` on every route and port (access is deny-by-default).
    pub fn allow(&self, file: &str, destination: &str, sources: &[&str]) -> Result<()> {
        let sources: String = sources
            .iter()
            .map(|s| format!("  - kind: ServiceAccount\n    name: {s}\n    namespace: default\n"))
            .collect();
        self.write_manifest(
            file,
            &format!(
                "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata:\n  name: to-{destination}\n  namespace: default\nspec:\n  destination:\n    kind: ServiceAccount\n    name: {destination}\n    namespace: default\n  sources:\n{sources}"
            ),
        )
    }

    /// Removes a manifest file.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let path = self.manifests().join(file);
        fs::remove_file(&path).map_err(io(&path))
    }
}
