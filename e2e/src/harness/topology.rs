//! Pods (a network namespace running the test app) and Services (ClusterIPs selecting pods).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Harness, PodNet, ServiceDef};
use crate::command::{check, cmd, output};
use crate::error::{HarnessError, Result};
use crate::{APP_PORT, EXTRA_APP_PORT};

/// One port of a Service: number, name, target port and `appProtocol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// Port name (omitted from the manifest when `None`).
    pub name: Option<String>,
    /// Service port.
    pub port: u16,
    /// The pods' port it targets.
    pub target_port: u16,
    /// `appProtocol`, if declared.
    pub app_protocol: Option<String>,
}

impl PortSpec {
    /// An unnamed port targeting the same number, no appProtocol.
    pub fn new(port: u16) -> Self {
        Self {
            name: None,
            port,
            target_port: port,
            app_protocol: None,
        }
    }

    /// A named port targeting the same number.
    pub fn named(name: &str, port: u16) -> Self {
        Self {
            name: Some(name.to_string()),
            ..Self::new(port)
        }
    }

    /// With an `appProtocol`.
    pub fn app_protocol(mut self, protocol: &str) -> Self {
        self.app_protocol = Some(protocol.to_string());
        self
    }

    /// Targeting another pod port.
    pub fn target(mut self, port: u16) -> Self {
        self.target_port = port;
        self
    }
}

impl Harness {
    /// A pod's addresses, primary first.
    pub fn pod_ips(&self, pod: &str) -> Vec<IpAddr> {
        self.pods
            .get(pod)
            .map(|p| p.ips.clone())
            .unwrap_or_default()
    }

    /// A service's ClusterIPs, primary first.
    pub fn service_ips(&self, service: &str) -> Vec<IpAddr> {
        self.services
            .get(service)
            .map(|s| s.cluster_ips.clone())
            .unwrap_or_default()
    }

    /// Adds a pod (a network namespace with the test app on port 8080).
    pub fn add_pod(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        service_account: &str,
    ) -> Result<Ipv4Addr> {
        self.add_pod_with_body(name, labels, service_account, 0)
    }

    /// Like [`Harness::add_pod`], with the app's answers padded to `body_size` bytes.
    pub fn add_pod_with_body(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        service_account: &str,
        body_size: usize,
    ) -> Result<Ipv4Addr> {
        self.add_pod_listening(name, labels, service_account, body_size, &[])?;
        self.pods
            .get(name)
            .and_then(|p| {
                p.ips.iter().find_map(|ip| match ip {
                    IpAddr::V4(v4) => Some(*v4),
                    IpAddr::V6(_) => None,
                })
            })
            .ok_or_else(|| HarnessError::Command {
                command: format!("add_pod {name}"),
                reason: "the harness gives pods no IPv4 address; use add_pod_listening".into(),
            })
    }

    /// Adds a pod whose app also serves `listen` (`(kind, port)`: `http`, `grpc`,
    /// `banner`, `redis`; see `weft-e2e-app serve --listen`). Returns its addresses.
    pub fn add_pod_listening(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        service_account: &str,
        body_size: usize,
        listen: &[(&str, u16)],
    ) -> Result<Vec<IpAddr>> {
        let index = u8::try_from(self.pods.len() + 2).map_err(|_| HarnessError::Command {
            command: "add_pod".into(),
            reason: "too many pods".into(),
        })?;
        let v4 = Ipv4Addr::new(198, 18, self.id, index);
        let v6 = Ipv6Addr::new(
            0xfd00,
            0x198,
            0x18,
            u16::from(self.id),
            0,
            0,
            0,
            u16::from(index),
        );
        let mut ips = Vec::new();
        if self.families.v4() {
            ips.push(IpAddr::V4(v4));
        }
        if self.families.v6() {
            ips.push(IpAddr::V6(v6));
        }
        let netns = self.netns(name);
        let host_if = format!("wv{}p{index}", self.id);
        let pod_if = format!("wc{}p{index}", self.id);
        // Namespace teardown is asynchronous in the kernel: a pair from an earlier run
        // with this id may still exist.
        let _ = output(cmd("ip", &["link", "del", &host_if]));
        check(cmd("ip", &["netns", "add", &netns]))?;
        self.pods.insert(
            name.to_string(),
            PodNet {
                netns: netns.clone(),
                host_if: host_if.clone(),
                ips: ips.clone(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                service_account: service_account.to_string(),
                unlisted: false,
                annotations: Vec::new(),
                namespace: "default".into(),
            },
        );
        check(cmd(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &pod_if,
            ],
        ))?;
        check(cmd(
            "ip",
            &["link", "set", &host_if, "master", &self.bridge(), "up"],
        ))?;
        check(cmd("ip", &["link", "set", &pod_if, "netns", &netns]))?;
        let in_pod = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns, "ip"];
            all.extend_from_slice(args);
            check(cmd("ip", &all))
        };
        in_pod(&["link", "set", &pod_if, "name", "eth0"])?;
        in_pod(&["link", "set", "lo", "up"])?;
        // ClusterIPs are on-link: routable (so the nat OUTPUT chain sees the connect)
        // yet never forwarded anywhere if a packet escapes the redirect.
        if self.families.v4() {
            in_pod(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        }
        if self.families.v6() {
            // No duplicate address detection: the address is usable at once.
            in_pod(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        in_pod(&["link", "set", "eth0", "up"])?;
        if self.families.v4() {
            in_pod(&[
                "route",
                "add",
                &format!("198.19.{}.0/24", self.id),
                "dev",
                "eth0",
            ])?;
        }
        if self.families.v6() {
            in_pod(&[
                "-6",
                "route",
                "add",
                &format!("fd00:198:19:{:x}::/64", self.id),
                "dev",
                "eth0",
            ])?;
        }
        self.write_hosts()?;
        let log = self.work.join(format!("{name}-app.log"));
        let app = self.app.to_string_lossy().to_string();
        let (port, size) = (APP_PORT.to_string(), body_size.to_string());
        let extra = EXTRA_APP_PORT.to_string();
        let listens: Vec<String> = listen.iter().map(|(k, p)| format!("{k}:{p}")).collect();
        let mut argv = vec![
            app.as_str(),
            "serve",
            "--name",
            name,
            "--port",
            &port,
            "--extra-port",
            &extra,
            "--body-size",
            &size,
        ];
        for l in &listens {
            argv.extend(["--listen", l.as_str()]);
        }
        self.spawn_in(name, "app", &argv, &log)?;
        Ok(ips)
    }

    /// Adds a Service selecting pods by labels, on port 8080, with the next ClusterIP.
    pub fn add_service(&mut self, name: &str, selector: &[(&str, &str)]) -> Result<Ipv4Addr> {
        self.add_service_ports(name, selector, &[("http", APP_PORT)])
    }

    /// Adds a Service with the given (name, port) ports, each targeting that port.
    pub fn add_service_ports(
        &mut self,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[(&str, u16)],
    ) -> Result<Ipv4Addr> {
        let specs: Vec<PortSpec> = ports.iter().map(|(n, p)| PortSpec::named(n, *p)).collect();
        let ips = self.add_service_with(name, selector, &specs)?;
        ips.iter()
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .ok_or_else(|| HarnessError::Command {
                command: format!("add_service {name}"),
                reason: "the harness gives services no IPv4 address; use add_service_with".into(),
            })
    }

    /// Adds a Service with the given ports and the next ClusterIP of each family in use.
    pub fn add_service_with(
        &mut self,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[PortSpec],
    ) -> Result<Vec<IpAddr>> {
        let index = u8::try_from(self.services.len() + 10).unwrap_or(u8::MAX);
        let mut cluster_ips = Vec::new();
        if self.families.v4() {
            cluster_ips.push(IpAddr::V4(Ipv4Addr::new(198, 19, self.id, index)));
        }
        if self.families.v6() {
            cluster_ips.push(IpAddr::V6(Ipv6Addr::new(
                0xfd00,
                0x198,
                0x19,
                u16::from(self.id),
                0,
                0,
                0,
                u16::from(index),
            )));
        }
        self.services.insert(
            name.to_string(),
            ServiceDef {
                cluster_ips: cluster_ips.clone(),
                selector: selector
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: ports.to_vec(),
                namespace: "default".into(),
            },
        );
        self.write_hosts()?;
        Ok(cluster_ips)
    }

    /// Adds an annotation to a pod's manifest (written by [`Harness::write_cluster_manifest`]).
    pub fn annotate_pod(&mut self, pod: &str, key: &str, value: &str) {
        if let Some(p) = self.pods.get_mut(pod) {
            p.annotations.retain(|(k, _)| k != key);
            p.annotations.push((key.to_string(), value.to_string()));
        }
    }

    /// Puts a pod or a Service (by name; names are unique across namespaces in the
    /// harness) in `namespace` instead of `default`: its manifest, its sidecar's node id
    /// and the host names of a Service follow. Call before writing `cluster.yaml`.
    pub fn set_namespace(&mut self, object: &str, namespace: &str) -> Result<()> {
        if let Some(p) = self.pods.get_mut(object) {
            p.namespace = namespace.to_string();
        }
        if let Some(s) = self.services.get_mut(object) {
            s.namespace = namespace.to_string();
        }
        self.write_hosts()
    }

    /// The name a pod's spans report, as the injector picks it: its
    /// `app.kubernetes.io/name` or `app` label, else its service account.
    pub fn trace_service_name(&self, pod: &str) -> String {
        let Some(p) = self.pods.get(pod) else {
            return "default".into();
        };
        ["app.kubernetes.io/name", "app"]
            .iter()
            .find_map(|key| p.labels.iter().find(|(k, _)| k == key))
            .map_or_else(|| p.service_account.clone(), |(_, v)| v.clone())
    }

    /// The namespace of a pod (`default` for one the harness does not know).
    pub fn pod_namespace(&self, pod: &str) -> &str {
        self.pods
            .get(pod)
            .map_or("default", |p| p.namespace.as_str())
    }

    /// Keeps a pod out of `cluster.yaml`, as if the control plane had never heard of it.
    pub fn unlist_pod(&mut self, pod: &str) {
        if let Some(p) = self.pods.get_mut(pod) {
            p.unlisted = true;
        }
    }
}
