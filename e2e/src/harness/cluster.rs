//! Kubernetes mode: the harness's Services and Pods as API objects for the API-server
//! double (with the EndpointSlices the EndpointSlice controller would write), and
//! `weft controller` replicas pointed at it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::Harness;
use super::wait::wait_for;
use crate::apiserver::{ApiServerDouble, BackgroundDouble};
use crate::command::{cmd, output, render};
use crate::error::{HarnessError, Result, io};
use crate::{ADMIN_PORT, XDS_PORT};

/// The namespace `weft controller` runs in (its CA Secret and Lease).
pub const CONTROLLER_NAMESPACE: &str = "weft-system";

/// An endpoint's state in an EndpointSlice, as the EndpointSlice controller reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Ready: takes new traffic.
    Ready,
    /// Being deleted but still serving (a rolling update's old pod).
    Terminating,
    /// Neither ready nor serving.
    NotReady,
}

/// The harness's cluster in an API-server double, and a kubeconfig for it.
#[derive(Debug)]
pub struct KubeCluster {
    /// The double, serving on its own runtime.
    pub api: BackgroundDouble,
    /// A kubeconfig file for `weft controller --kubeconfig`.
    pub kubeconfig: PathBuf,
}

impl Harness {
    /// Starts an API-server double holding the harness's Services, Pods, EndpointSlices,
    /// namespaces and ServiceAccounts ([`Harness::sync_to`]), with a kubeconfig for it in
    /// the work directory.
    pub fn start_cluster(&self) -> Result<KubeCluster> {
        let api = BackgroundDouble::start().map_err(io(Path::new("API-server double")))?;
        let kubeconfig = self.work.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).map_err(io(&kubeconfig))?;
        self.sync_to(&api)?;
        Ok(KubeCluster { api, kubeconfig })
    }

    /// client → backend, split over backend-v1 and backend-v2 (one pod each, all meshed,
    /// ServiceAccounts `client` and `backend`): the topology of the split scenarios.
    pub fn add_split_topology(&mut self) -> Result<()> {
        self.add_pod("client", &[("app", "client")], "client")?;
        for version in ["v1", "v2"] {
            self.add_pod(
                &format!("backend-{version}-0"),
                &[("app", "backend"), ("version", version)],
                "backend",
            )?;
        }
        self.add_service("backend", &[("app", "backend")])?;
        for version in ["v1", "v2"] {
            self.add_service(
                &format!("backend-{version}"),
                &[("app", "backend"), ("version", version)],
            )?;
        }
        Ok(())
    }

    /// The split topology in local mode, the client allowed to call the backends, with
    /// `manifests` (file, text) in place before the control plane starts, and every
    /// sidecar started.
    pub fn start_split_mesh(id: u8, name: &str, manifests: &[(&str, String)]) -> Result<Self> {
        let mut h = Self::new(id, name)?;
        h.add_split_topology()?;
        h.write_cluster_manifest()?;
        h.allow("access.yaml", "backend", &["client"])?;
        for (file, text) in manifests {
            h.write_manifest(file, text)?;
        }
        h.start_control_plane()?;
        for pod in ["client", "backend-v1-0", "backend-v2-0"] {
            h.start_sidecar(pod)?;
        }
        Ok(h)
    }

    /// The Services and Pods as API objects (YAML of `cluster.yaml`, as JSON).
    pub fn cluster_objects(&self) -> Result<Vec<Value>> {
        let text = self.cluster_manifest();
        text.split("\n---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|doc| {
                serde_yaml_ng::from_str::<Value>(doc).map_err(|e| HarnessError::Command {
                    command: "parsing the cluster manifest".to_string(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// The EndpointSlice of `service` listing `endpoints` (pods and their states), on
    /// the service's ports, as the EndpointSlice controller writes it.
    pub fn endpoint_slice(&self, service: &str, endpoints: &[(&str, EndpointState)]) -> Value {
        let ports: Vec<Value> = self
            .services
            .get(service)
            .map(|s| {
                s.ports
                    .iter()
                    .map(|p| {
                        let mut port = json!({"port": p.target_port, "protocol": "TCP"});
                        if let Some(name) = &p.name {
                            port["name"] = json!(name);
                        }
                        if let Some(a) = &p.app_protocol {
                            port["appProtocol"] = json!(a);
                        }
                        port
                    })
                    .collect()
            })
            .unwrap_or_default();
        let endpoints: Vec<Value> = endpoints
            .iter()
            .filter_map(|(pod, state)| {
                let net = self.pods.get(*pod)?;
                let ip = net.ips.iter().find(|ip| ip.is_ipv4())?;
                let (ready, serving, terminating) = match state {
                    EndpointState::Ready => (true, true, false),
                    EndpointState::Terminating => (false, true, true),
                    EndpointState::NotReady => (false, false, false),
                };
                Some(json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"},
                }))
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-slice"),
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    /// The pods a service selects, by name.
    pub fn selected_pods(&self, service: &str) -> Vec<String> {
        let Some(svc) = self.services.get(service) else {
            return Vec::new();
        };
        self.pods
            .iter()
            .filter(|(_, p)| !p.unlisted)
            .filter(|(_, p)| svc.selector.iter().all(|sel| p.labels.contains(sel)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Puts the Services, Pods, their EndpointSlices (every selected pod ready), the
    /// `default` and controller namespaces and the pods' ServiceAccounts into `api`.
    pub fn sync_to(&self, api: &ApiServerDouble) -> Result<()> {
        let fail = |e: crate::apiserver::ApiError| HarnessError::Command {
            command: "writing to the API-server double".to_string(),
            reason: e.to_string(),
        };
        for ns in ["default", CONTROLLER_NAMESPACE] {
            api.apply_object(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .map_err(fail)?;
        }
        let accounts: std::collections::BTreeSet<&str> = self
            .pods
            .values()
            .map(|p| p.service_account.as_str())
            .collect();
        for sa in accounts {
            api.apply_object(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": "default"}}))
                .map_err(fail)?;
        }
        for object in self.cluster_objects()? {
            api.apply_object(object).map_err(fail)?;
        }
        for service in self.services.keys() {
            let pods = self.selected_pods(service);
            let endpoints: Vec<(&str, EndpointState)> = pods
                .iter()
                .map(|p| (p.as_str(), EndpointState::Ready))
                .collect();
            api.apply_object(self.endpoint_slice(service, &endpoints))
                .map_err(fail)?;
        }
        Ok(())
    }

    /// The xDS address of controller replica `replica` (1, 2, ...).
    pub fn controller_xds_addr(&self, replica: u16) -> String {
        format!("{}:{}", self.gateway(), XDS_PORT + 100 * (replica - 1))
    }

    /// The admin address of controller replica `replica` (1 is [`Harness::admin_addr`]).
    pub fn controller_admin_addr(&self, replica: u16) -> String {
        format!("{}:{}", self.gateway(), ADMIN_PORT + 100 * (replica - 1))
    }

    /// Starts `weft controller` replica `replica` against the API server of
    /// `kubeconfig`, and waits until its admin endpoint answers (not until ready).
    pub fn start_controller(
        &mut self,
        replica: u16,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Result<()> {
        let log = self.work.join(format!("controller-{replica}.log"));
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let err = file.try_clone().map_err(io(&log))?;
        let mut c = Command::new(&self.weft);
        c.arg("controller")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--namespace",
                CONTROLLER_NAMESPACE,
                "--identity",
                &format!("weft-{replica}"),
                "--xds-addr",
                &self.controller_xds_addr(replica),
                "--admin-addr",
                &self.controller_admin_addr(replica),
            ])
            .args(extra)
            .env("WEFT_LOG", "info,weft=debug")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        let line = render(&c);
        let child = c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?;
        self.processes
            .push((format!("controller-{replica}"), child));
        let admin = self.controller_admin_addr(replica);
        let app = self.app.clone();
        wait_for(
            Duration::from_secs(20),
            &format!("controller {replica} to serve its admin endpoint"),
            || {
                output(cmd(&app, &["get", &format!("http://{admin}/healthz")]))
                    .is_ok_and(|o| o.status.success())
            },
        )
    }

    /// Whether controller replica `replica` reports ready on `/readyz`.
    pub fn controller_ready(&self, replica: u16) -> bool {
        let admin = self.controller_admin_addr(replica);
        output(cmd(&self.app, &["get", &format!("http://{admin}/readyz")]))
            .is_ok_and(|o| o.status.success())
    }

    /// Waits until controller replica `replica` is ready (every watch listed once).
    pub fn wait_controller_ready(&self, replica: u16) -> Result<()> {
        wait_for(
            Duration::from_secs(30),
            &format!("controller {replica} to be ready"),
            || self.controller_ready(replica),
        )
    }

    /// Sends `signal` (`TERM`, `KILL`) to controller replica `replica` and waits for it.
    pub fn signal_controller(&mut self, replica: u16, signal: &str) -> Result<()> {
        let name = format!("controller-{replica}");
        if let Some(i) = self.processes.iter().position(|(n, _)| *n == name) {
            let (_, mut child) = self.processes.remove(i);
            let pid = child.id().to_string();
            let _ = output(cmd("kill", &[&format!("-{signal}"), &pid]));
            child.wait().map_err(io(Path::new("weft controller")))?;
        }
        Ok(())
    }

    /// The sum of every series of metric `name` (any labels) of controller `replica`;
    /// `None` when it has none or its admin endpoint does not answer.
    pub fn controller_metric(&self, replica: u16, name: &str) -> Option<f64> {
        let url = format!("http://{}/metrics", self.controller_admin_addr(replica));
        let out = output(cmd(&self.app, &["get", &url])).ok()?;
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let values: Vec<f64> = text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(k, _)| {
                *k == name
                    || k.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{'))
            })
            .filter_map(|(_, v)| v.trim().parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Waits (up to 5 s) until controller `replica` has taken in what was written: its
    /// push count stops moving; then one more second for anything it would write.
    pub fn wait_controller_settled(&self, replica: u16) {
        let mut last = self.controller_metric(replica, "weft_pushes_total");
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let now = self.controller_metric(replica, "weft_pushes_total");
            if now == last {
                break;
            }
            last = now;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }

    /// Status, proxy-status and metrics queries go to controller `replica` from now on.
    pub fn use_controller_admin(&mut self, replica: u16) {
        self.admin_override = Some(self.controller_admin_addr(replica));
    }

    /// Sidecars started from now on also know these xDS addresses (other replicas).
    pub fn use_extra_xds(&mut self, addrs: Vec<String>) {
        self.extra_xds = addrs;
    }

    /// Sidecars started from now on present this ServiceAccount token file.
    pub fn use_token_dir(&mut self, dir: Option<std::path::PathBuf>) {
        self.token_dir = dir;
    }
}
