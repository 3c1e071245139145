//! The [`Harness`]: one mesh on one bridge, its state, its creation and its teardown.

pub(crate) mod cluster;
mod inspect;
mod manifests;
pub(crate) mod network;
mod processes;
pub(crate) mod topology;
pub(crate) mod traffic;
pub(crate) mod wait;

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Child;

use crate::command::{check, cmd, envoy_binary, output, workspace_binary};
use crate::error::{HarnessError, Result, io};
use network::IpFamilies;
use topology::PortSpec;

#[derive(Debug)]
struct PodNet {
    netns: String,
    /// Root-namespace end of the pod's veth pair.
    host_if: String,
    /// Addresses, primary first.
    ips: Vec<IpAddr>,
    labels: Vec<(String, String)>,
    service_account: String,
    /// Left out of `cluster.yaml`: the control plane does not know this pod.
    unlisted: bool,
    annotations: Vec<(String, String)>,
    /// Kubernetes namespace (`default` unless [`Harness::set_namespace`] says otherwise).
    namespace: String,
}

#[derive(Debug)]
struct ServiceDef {
    /// ClusterIPs, primary first.
    cluster_ips: Vec<IpAddr>,
    selector: Vec<(String, String)>,
    ports: Vec<PortSpec>,
    /// Kubernetes namespace (`default` unless [`Harness::set_namespace`] says otherwise).
    namespace: String,
}

/// A running mesh on one bridge. Dropping it removes everything it created.
#[derive(Debug)]
pub struct Harness {
    id: u8,
    work: PathBuf,
    weft: PathBuf,
    app: PathBuf,
    envoy: PathBuf,
    pods: BTreeMap<String, PodNet>,
    services: BTreeMap<String, ServiceDef>,
    processes: Vec<(String, Child)>,
    control_plane: Option<Child>,
    control_plane_args: Vec<String>,
    xds_tls: bool,
    /// `weft bootstrap --xds-protocol` of sidecars started from now on.
    xds_protocol: &'static str,
    forward_rule: bool,
    forward_rule_v6: bool,
    families: IpFamilies,
    /// More xDS addresses for sidecars started from now on (other controller replicas).
    extra_xds: Vec<String>,
    /// Sidecars started from now on present `<dir>/<pod>.token` on their xDS stream.
    token_dir: Option<PathBuf>,
    /// The control plane's admin address when it is not the first replica's.
    admin_override: Option<String>,
}

impl Harness {
    /// A harness with its own bridge and subnet. `id` must be unique among harnesses
    /// running at the same time (1..=250).
    pub fn new(id: u8, name: &str) -> Result<Self> {
        let uid = output(cmd("id", &["-u"]))?;
        let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
        if uid != "0" {
            return Err(HarnessError::NotRoot(uid));
        }
        let work = std::env::temp_dir().join(format!("weft-e2e-{id}-{name}"));
        let mut harness = Self {
            id,
            weft: workspace_binary("weft")?,
            app: workspace_binary("weft-e2e-app")?,
            envoy: envoy_binary()?,
            work,
            pods: BTreeMap::new(),
            services: BTreeMap::new(),
            processes: Vec::new(),
            control_plane: None,
            control_plane_args: Vec::new(),
            xds_tls: false,
            xds_protocol: "delta",
            forward_rule: false,
            forward_rule_v6: false,
            families: IpFamilies::V4,
            extra_xds: Vec::new(),
            token_dir: None,
            admin_override: None,
        };
        harness.remove_leftovers();
        let _ = fs::remove_dir_all(&harness.work);
        fs::create_dir_all(harness.manifests()).map_err(io(&harness.work))?;
        // Envoy runs as the proxy UID and must read its bootstrap from here.
        set_mode(&harness.work, 0o755)?;
        set_mode(&harness.manifests(), 0o755)?;
        let bridge = harness.bridge();
        check(cmd("ip", &["link", "add", &bridge, "type", "bridge"]))?;
        check(cmd(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", harness.gateway()),
                "dev",
                &bridge,
            ],
        ))?;
        check(cmd("ip", &["link", "set", &bridge, "up"]))?;
        // Bridged frames may pass the host's FORWARD chain (br_netfilter); allow ours.
        check(cmd(
            "iptables",
            &[
                "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ],
        ))?;
        harness.forward_rule = true;
        Ok(harness)
    }

    /// The harness's working directory (logs, bootstraps; readable by the proxy UID).
    pub fn work_dir(&self) -> &Path {
        &self.work
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
}

impl Drop for Harness {
    fn drop(&mut self) {
        for (_, child) in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut cp) = self.control_plane.take() {
            let _ = cp.kill();
            let _ = cp.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- weft-e2e: test failed; logs kept in {} ---",
                self.work.display()
            );
            for log in self.logs() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                eprintln!("==> {} (last {} lines)", log.display(), tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        } else if std::env::var_os("WEFT_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.work);
        }
        for pod in self.pods.values() {
            // Anything still running inside keeps the namespace (and its veth) alive.
            if let Ok(out) = output(cmd("ip", &["netns", "pids", &pod.netns])) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = output(cmd("kill", &["-KILL", pid]));
                }
            }
            let _ = output(cmd("ip", &["link", "del", &pod.host_if]));
            let _ = output(cmd("ip", &["netns", "del", &pod.netns]));
            let _ = fs::remove_dir_all(Path::new("/etc/netns").join(&pod.netns));
        }
        let _ = output(cmd("ip", &["link", "del", &self.bridge()]));
        let bridge = self.bridge();
        for (added, program) in [
            (self.forward_rule, "iptables"),
            (self.forward_rule_v6, "ip6tables"),
        ] {
            if added {
                let _ = output(cmd(
                    program,
                    &[
                        "-w", "-D", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
                    ],
                ));
            }
        }
    }
}
