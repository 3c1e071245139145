//! End-to-end harness: pods are network namespaces on a bridge, each with the test
//! app and (optionally) a real Envoy sidecar behind `weft init-iptables`; the control
//! plane is a real `weft up` over a manifest directory.
//!
//! Addresses come from 198.18.0.0/15 only: pods from 198.18.<id>.0/24, ClusterIPs from
//! 198.19.<id>.0/24; with IPv6 (see [`IpFamilies`]) also from the ULA prefix
//! fd00:198:18:<id in hex>::/64 (pods) and fd00:198:19:<id in hex>::/64 (ClusterIPs). Pods get an
//! on-link route for ClusterIPs and no default route, so nothing leaves the bridge.
//! Everything created is removed on drop, also after a panic.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// UID the sidecar runs as; `weft init-iptables` exempts its traffic.
pub const PROXY_UID: u32 = 1337;
/// Port every test app listens on.
pub const APP_PORT: u16 = 8080;
/// Second port every test app listens on.
pub const EXTRA_APP_PORT: u16 = 9090;
const XDS_PORT: u16 = 15010;
const ADMIN_PORT: u16 = 15090;

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The harness needs root for network namespaces and iptables.
    #[error("the end-to-end harness must run as root (it creates network namespaces); uid is {0}")]
    NotRoot(String),
    /// A binary the harness runs is missing.
    #[error("{what} not found: {hint}")]
    Missing {
        /// Which binary.
        what: &'static str,
        /// How to get it.
        hint: String,
    },
    /// A command failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Status and stderr.
        reason: String,
    },
    /// Something did not become ready in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// File I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Output could not be decoded.
    #[error("decoding {what}: {reason}")]
    Decode {
        /// What was decoded.
        what: String,
        /// Why it failed.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, HarnessError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError + '_ {
    move |source| HarnessError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One request of a load run: when it started and who answered (or why it failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestResult {
    /// Start time, Unix milliseconds.
    pub start_ms: u64,
    /// The pod that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The failure, if the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the request took, in microseconds.
    #[serde(default)]
    pub micros: u64,
}

/// Everything a load run saw, in start order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Per request outcome.
    pub results: Vec<RequestResult>,
}

impl LoadReport {
    /// A report from `(start, duration µs, Ok(pod) | Err(error))` triples.
    pub fn from_timed_results(
        results: Vec<(u64, u64, std::result::Result<String, String>)>,
    ) -> Self {
        Self {
            results: results
                .into_iter()
                .map(|(start_ms, micros, r)| {
                    let (pod, error) = match r {
                        Ok(pod) => (Some(pod), None),
                        Err(e) => (None, Some(e)),
                    };
                    RequestResult {
                        start_ms,
                        pod,
                        error,
                        micros,
                    }
                })
                .collect(),
        }
    }

    /// The `p`-quantile (0.0..=1.0) of successful request latencies, in microseconds.
    pub fn latency_micros(&self, p: f64) -> u64 {
        let mut times: Vec<u64> = self
            .results
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.micros)
            .collect();
        if times.is_empty() {
            return 0;
        }
        times.sort_unstable();
        times[((times.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
    }

    /// Answers per pod.
    pub fn by_pod(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for pod in self.results.iter().filter_map(|r| r.pod.clone()) {
            *counts.entry(pod).or_insert(0) += 1;
        }
        counts
    }

    /// Answers from pods whose name starts with `prefix`.
    pub fn answered_by(&self, prefix: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.pod.as_deref().is_some_and(|p| p.starts_with(prefix)))
            .count()
    }

    /// Failed requests.
    pub fn failures(&self) -> Vec<&RequestResult> {
        self.results.iter().filter(|r| r.error.is_some()).collect()
    }

    /// The requests that started at or after `ms` (Unix milliseconds).
    pub fn started_after(&self, ms: u64) -> LoadReport {
        LoadReport {
            results: self
                .results
                .iter()
                .filter(|r| r.start_ms >= ms)
                .cloned()
                .collect(),
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn render(command: &Command) -> String {
    let mut s = command.get_program().to_string_lossy().to_string();
    for a in command.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output(mut command: Command) -> Result<Output> {
    let line = render(&command);
    command.output().map_err(|e| HarnessError::Command {
        command: line,
        reason: e.to_string(),
    })
}

fn check(command: Command) -> Result<Output> {
    let line = render(&command);
    let out = output(command)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::Command {
            command: line,
            reason: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

fn cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Finds a binary built by this workspace next to the running executable.
fn workspace_binary(name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(format!(
        "WEFT_BIN_{}",
        name.to_uppercase().replace('-', "_")
    )) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io(Path::new("current_exe")))?;
    // target/debug/<bin> or target/debug/deps/<test>.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(HarnessError::Missing {
        what: "workspace binary",
        hint: format!("{name} is not built; run `cargo build --workspace --bins` first"),
    })
}

/// The Envoy binary: `WEFT_ENVOY`, else `envoy` on PATH.
pub fn envoy_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("WEFT_ENVOY") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("envoy"))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::Missing {
            what: "envoy",
            hint: "set WEFT_ENVOY or run `make setup` (installs Envoy 1.40 into tools/)"
                .to_string(),
        })
}

/// The address families of a harness's pods and services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IpFamilies {
    /// IPv4 only (the default).
    #[default]
    V4,
    /// IPv6 only: pods and services have IPv6 addresses alone.
    V6,
    /// Dual-stack, IPv4 primary.
    Dual,
}

impl IpFamilies {
    fn v4(self) -> bool {
        self != Self::V6
    }

    fn v6(self) -> bool {
        self != Self::V4
    }
}

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

/// Formats `ip:port`, bracketing IPv6.
pub fn host_port(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

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
}

#[derive(Debug)]
struct ServiceDef {
    /// ClusterIPs, primary first.
    cluster_ips: Vec<IpAddr>,
    selector: Vec<(String, String)>,
    ports: Vec<PortSpec>,
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

    fn bridge(&self) -> String {
        format!("wftbr{}", self.id)
    }

    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id, 1)
    }

    fn gateway_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(self.id), 0, 0, 0, 1)
    }

    /// Pods and services added from now on get these address families (call it before
    /// adding any). The bridge gets an IPv6 address when IPv6 is used.
    pub fn use_ip_families(&mut self, families: IpFamilies) -> Result<()> {
        if families.v6() && !self.families.v6() {
            check(cmd(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", self.gateway_v6()),
                    "dev",
                    &self.bridge(),
                    "nodad",
                ],
            ))?;
            let bridge = self.bridge();
            check(cmd(
                "ip6tables",
                &[
                    "-w", "-I", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
                ],
            ))?;
            self.forward_rule_v6 = true;
        }
        self.families = families;
        Ok(())
    }

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

    /// The harness's working directory (logs, bootstraps; readable by the proxy UID).
    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    /// The manifest directory `weft up` watches.
    pub fn manifests(&self) -> PathBuf {
        self.work.join("manifests")
    }

    /// The control plane's admin address.
    pub fn admin_addr(&self) -> String {
        format!("{}:{ADMIN_PORT}", self.gateway())
    }

    fn xds_addr(&self) -> String {
        format!("{}:{XDS_PORT}", self.gateway())
    }

    fn xds_addr_v6(&self) -> String {
        format!("[{}]:{XDS_PORT}", self.gateway_v6())
    }

    fn netns(&self, pod: &str) -> String {
        format!("wft{}-{pod}", self.id)
    }

    fn remove_leftovers(&self) {
        let prefix = format!("wft{}-", self.id);
        if let Ok(out) = output(cmd("ip", &["netns", "list"])) {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line.split_whitespace().next().unwrap_or_default();
                if name.starts_with(&prefix) {
                    let _ = output(cmd("ip", &["netns", "del", name]));
                    let _ = fs::remove_dir_all(Path::new("/etc/netns").join(name));
                }
            }
        }
        if let Ok(out) = output(cmd("ip", &["-o", "link", "show"])) {
            let veth_prefix = format!("wv{}p", self.id);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let name = line
                    .split(": ")
                    .nth(1)
                    .unwrap_or_default()
                    .split('@')
                    .next()
                    .unwrap_or_default();
                if name.starts_with(&veth_prefix) {
                    let _ = output(cmd("ip", &["link", "del", name]));
                }
            }
        }
        let _ = output(cmd("ip", &["link", "del", &self.bridge()]));
        let bridge = self.bridge();
        for program in ["iptables", "ip6tables"] {
            while output(cmd(
                program,
                &[
                    "-w", "-D", "FORWARD", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
                ],
            ))
            .is_ok_and(|o| o.status.success())
            {}
        }
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
            },
        );
        self.write_hosts()?;
        Ok(cluster_ips)
    }

    /// `/etc/netns/<pod>/hosts`: what `ip netns exec` shows the pod as /etc/hosts.
    fn write_hosts(&self) -> Result<()> {
        for (name, pod) in &self.pods {
            let dir = Path::new("/etc/netns").join(&pod.netns);
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let mut hosts = "127.0.0.1 localhost\n::1 localhost\n".to_string();
            for ip in &pod.ips {
                hosts.push_str(&format!("{ip} {name}\n"));
            }
            for (svc, def) in &self.services {
                for ip in &def.cluster_ips {
                    hosts.push_str(&format!(
                        "{ip} {svc} {svc}.default {svc}.default.svc {svc}.default.svc.cluster.local\n"
                    ));
                }
            }
            let path = dir.join("hosts");
            fs::write(&path, hosts).map_err(io(&path))?;
        }
        Ok(())
    }

    /// Adds an annotation to a pod's manifest (written by [`Harness::write_cluster_manifest`]).
    pub fn annotate_pod(&mut self, pod: &str, key: &str, value: &str) {
        if let Some(p) = self.pods.get_mut(pod) {
            p.annotations.retain(|(k, _)| k != key);
            p.annotations.push((key.to_string(), value.to_string()));
        }
    }

    /// Keeps a pod out of `cluster.yaml`, as if the control plane had never heard of it.
    pub fn unlist_pod(&mut self, pod: &str) {
        if let Some(p) = self.pods.get_mut(pod) {
            p.unlisted = true;
        }
    }

    /// Writes the Services and Pods (what an API server would hold) as `cluster.yaml`.
    pub fn write_cluster_manifest(&self) -> Result<()> {
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
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {}\n  clusterIPs: [{}]\n  ipFamilies: [{}]\n  selector:\n{selector}  ports:\n{ports}",
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
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n{labels}{annotations}spec:\n  serviceAccountName: {}\n  containers:\n  - name: app\n    image: weft-e2e-app\n    ports:\n    - containerPort: {APP_PORT}\nstatus:\n  phase: Running\n  podIP: \"{}\"\n  podIPs: [{}]\n",
                pod.service_account,
                pod.ips.first().map(ToString::to_string).unwrap_or_default(),
                pod_ips.join(", ")
            ));
        }
        self.write_manifest("cluster.yaml", &docs.join("---\n"))
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

    fn spawn_in(&mut self, pod: &str, what: &str, argv: &[&str], log: &Path) -> Result<()> {
        let netns = self.netns(pod);
        let file = fs::File::create(log).map_err(io(log))?;
        let err = file.try_clone().map_err(io(log))?;
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.args(argv).stdin(Stdio::null()).stdout(file).stderr(err);
        let line = render(&c);
        let child = c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?;
        self.processes.push((format!("{pod}/{what}"), child));
        Ok(())
    }

    /// The control plane's state directory (its CA lives here).
    pub fn state_dir(&self) -> PathBuf {
        self.work.join("state")
    }

    /// Starts `weft up` on the manifest directory and waits until it serves.
    pub fn start_control_plane(&mut self) -> Result<()> {
        self.start_control_plane_with(&[])
    }

    /// Like [`Harness::start_control_plane`], with extra `weft up` flags.
    pub fn start_control_plane_with(&mut self, extra: &[&str]) -> Result<()> {
        self.control_plane_args = extra.iter().map(|s| s.to_string()).collect();
        let log = self.work.join("weft.log");
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(&log))?;
        let err = file.try_clone().map_err(io(&log))?;
        let mut c = Command::new(&self.weft);
        c.arg("up").arg(self.manifests()).args([
            "--xds-addr",
            &self.xds_addr(),
            "--admin-addr",
            &self.admin_addr(),
        ]);
        if self.families.v6() {
            c.args(["--xds-addr", &self.xds_addr_v6()]);
        }
        c.arg("--state-dir")
            .arg(self.state_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        let line = render(&c);
        self.control_plane = Some(c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?);
        let admin = self.admin_addr();
        let weft = self.weft.clone();
        wait_for(
            Duration::from_secs(20),
            "weft up to serve its admin endpoint",
            || {
                output(cmd(&weft, &["status", "--admin-addr", &admin]))
                    .is_ok_and(|o| o.status.success())
            },
        )
    }

    /// Stops `weft up` (SIGTERM, as an operator would) and waits for it to exit.
    pub fn stop_control_plane(&mut self) -> Result<()> {
        if let Some(mut cp) = self.control_plane.take() {
            let pid = cp.id().to_string();
            let _ = output(cmd("kill", &["-TERM", &pid]));
            cp.wait().map_err(io(Path::new("weft up")))?;
        }
        Ok(())
    }

    /// Stops and starts `weft up` again with the same flags and state directory.
    pub fn restart_control_plane(&mut self) -> Result<()> {
        self.stop_control_plane()?;
        let args = self.control_plane_args.clone();
        let extra: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_control_plane_with(&extra)
    }

    /// Bootstraps, redirects and starts a real Envoy sidecar in `pod`; waits until it is LIVE.
    pub fn start_sidecar(&mut self, pod: &str) -> Result<()> {
        self.start_sidecar_as(pod, pod)
    }

    /// Like [`Harness::start_sidecar`], but the sidecar claims to be `claimed_pod`.
    pub fn start_sidecar_as(&mut self, pod: &str, claimed_pod: &str) -> Result<()> {
        self.spawn_sidecar(pod, claimed_pod, self.xds_tls)?;
        self.wait_sidecar_live(pod)
    }

    /// Sidecars started from now on connect to xDS over TLS (`weft bootstrap --ca-file`).
    pub fn use_xds_tls(&mut self, on: bool) {
        self.xds_tls = on;
    }

    /// Sidecars started from now on speak this ADS variant (`delta`, the default, or `sotw`).
    pub fn use_xds_protocol(&mut self, protocol: &'static str) {
        self.xds_protocol = protocol;
    }

    /// Starts a sidecar for `pod` claiming `claimed_pod`, without waiting for it: the
    /// bootstrap, the iptables redirect (as the init container would), then Envoy as
    /// the proxy UID.
    pub fn spawn_sidecar(&mut self, pod: &str, claimed_pod: &str, xds_tls: bool) -> Result<()> {
        let bootstrap = self.work.join(format!("{pod}-envoy.yaml"));
        // An IPv6-only pod reaches the control plane over IPv6.
        let xds = if self.pod_ips(pod).iter().any(IpAddr::is_ipv4) {
            self.xds_addr()
        } else {
            self.xds_addr_v6()
        };
        let mut c = Command::new(&self.weft);
        c.args([
            "bootstrap",
            "--pod",
            &format!("default/{claimed_pod}"),
            "--xds",
            &xds,
            "--health-port",
            "15021",
            "--xds-protocol",
            self.xds_protocol,
            "-o",
        ])
        .arg(&bootstrap);
        if xds_tls {
            c.arg("--ca-file").arg(self.state_dir().join("ca-cert.pem"));
        }
        check(c)?;
        self.spawn_envoy(pod, &bootstrap)
    }

    /// Starts an Envoy in `pod` from any bootstrap (a hand-written one, say), behind the
    /// same iptables redirect and as the same UID as a Weft sidecar.
    pub fn spawn_envoy(&mut self, pod: &str, bootstrap: &Path) -> Result<()> {
        set_mode(bootstrap, 0o644)?;
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        // The same exemptions the injected init container makes: probe and health ports.
        c.arg(&self.weft).args([
            "init-iptables",
            "--proxy-uid",
            &PROXY_UID.to_string(),
            "--exclude-inbound-ports",
            "15020,15021",
        ]);
        check(c)?;
        let uid = PROXY_UID.to_string();
        let envoy = self.envoy.to_string_lossy().to_string();
        let boot = bootstrap.to_string_lossy().to_string();
        let log = self.work.join(format!("{pod}-envoy.log"));
        let argv = [
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
            &envoy,
            "-c",
            &boot,
            "--use-dynamic-base-id",
            "--log-level",
            "warn",
            "--drain-time-s",
            "2",
        ];
        self.spawn_in(pod, "envoy", &argv, &log)
    }

    /// Waits until `pod`'s sidecar reports LIVE on its admin endpoint.
    pub fn wait_sidecar_live(&self, pod: &str) -> Result<()> {
        let (app, netns) = (self.app.clone(), self.netns(pod));
        wait_for(
            Duration::from_secs(30),
            &format!("the sidecar of {pod} to be LIVE"),
            || {
                let mut c = cmd("ip", &["netns", "exec", &netns]);
                c.arg(&app).args(["get", "http://127.0.0.1:15000/ready"]);
                output(c).is_ok_and(|o| o.status.success())
            },
        )
    }

    /// GETs a path from the Envoy admin endpoint of `pod`'s sidecar.
    pub fn envoy_admin(&self, pod: &str, path: &str) -> Result<String> {
        let app = self.app.to_string_lossy().to_string();
        let url = format!("http://127.0.0.1:15000{path}");
        let out = self.exec_in(pod, &[&app, "get", &url])?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{pod}: GET {url}"),
                reason: String::from_utf8_lossy(&out.stderr).to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// A counter or gauge of `pod`'s sidecar (`/stats`), 0 when absent.
    pub fn envoy_stat(&self, pod: &str, name: &str) -> Result<u64> {
        let stats = self.envoy_admin(pod, "/stats")?;
        Ok(stats
            .lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// One GET from `pod`: Ok((answering pod, echoed peer identity)) or Err(stderr).
    pub fn get(
        &self,
        pod: &str,
        url: &str,
    ) -> Result<std::result::Result<(String, Option<String>), String>> {
        self.request(pod, "GET", url, &[])
    }

    /// One request from `pod` with a method and `name: value` headers.
    pub fn request(
        &self,
        pod: &str,
        method: &str,
        url: &str,
        headers: &[&str],
    ) -> Result<std::result::Result<(String, Option<String>), String>> {
        let app = self.app.to_string_lossy().to_string();
        let mut argv = vec![app.as_str(), "get", url, "--method", method];
        for h in headers {
            argv.extend(["--header", h]);
        }
        let out = self.exec_in(pod, &argv)?;
        if !out.status.success() {
            return Ok(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut lines = text.lines();
        let body = lines.next().unwrap_or_default().to_string();
        let peer = lines
            .find_map(|l| l.strip_prefix("peer: "))
            .map(str::to_string);
        Ok(Ok((body, peer)))
    }

    /// Runs a `weft-e2e-app` client subcommand in `pod`: Ok(its JSON) when it exits 0,
    /// Err(its stderr) otherwise.
    pub fn app(
        &self,
        pod: &str,
        args: &[&str],
    ) -> Result<std::result::Result<serde_json::Value, String>> {
        let app = self.app.to_string_lossy().to_string();
        let mut argv = vec![app.as_str()];
        argv.extend_from_slice(args);
        let out = self.exec_in(pod, &argv)?;
        if !out.status.success() {
            return Ok(Err(format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        serde_json::from_slice(&out.stdout)
            .map(Ok)
            .map_err(|e| HarnessError::Decode {
                what: format!("weft-e2e-app {}", args.join(" ")),
                reason: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
            })
    }

    /// Runs a command inside a pod's network namespace.
    pub fn exec_in(&self, pod: &str, argv: &[&str]) -> Result<Output> {
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.args(argv);
        output(c)
    }

    fn load_command(&self, pod: &str, url: &str, limit: &[&str]) -> Command {
        let netns = self.netns(pod);
        let mut c = cmd("ip", &["netns", "exec", &netns]);
        c.arg(&self.app).args(["load", "--url", url]).args(limit);
        c
    }

    /// Sends `count` requests from `pod` to `url` and reports who answered.
    pub fn load(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        concurrency: usize,
    ) -> Result<LoadReport> {
        self.run_load(pod, url, count, concurrency, 0)
    }

    /// Sends `count` requests one at a time, `interval_ms` apart (a fixed rate).
    pub fn load_paced(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        interval_ms: u64,
    ) -> Result<LoadReport> {
        self.run_load(pod, url, count, 1, interval_ms)
    }

    fn run_load(
        &self,
        pod: &str,
        url: &str,
        count: usize,
        concurrency: usize,
        interval_ms: u64,
    ) -> Result<LoadReport> {
        let (count, concurrency, interval) = (
            count.to_string(),
            concurrency.to_string(),
            interval_ms.to_string(),
        );
        let limit = [
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--interval-ms",
            &interval,
        ];
        parse_report(check(self.load_command(pod, url, &limit))?)
    }

    /// Starts a load of `duration` in the background (collect it with [`RunningLoad::finish`]).
    pub fn start_load(
        &self,
        pod: &str,
        url: &str,
        duration: Duration,
        concurrency: usize,
    ) -> Result<RunningLoad> {
        let mut c = self.load_command(
            pod,
            url,
            &[
                "--duration-ms",
                &duration.as_millis().to_string(),
                "--concurrency",
                &concurrency.to_string(),
                "--interval-ms",
                "2",
            ],
        );
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let line = render(&c);
        let child = c.spawn().map_err(|e| HarnessError::Command {
            command: line,
            reason: e.to_string(),
        })?;
        Ok(RunningLoad { child: Some(child) })
    }

    /// `weft proxy-status --json` against this harness's control plane.
    pub fn proxy_status(&self) -> Result<serde_json::Value> {
        self.weft_json("proxy-status")
    }

    /// `weft status --json` against this harness's control plane.
    pub fn status(&self) -> Result<serde_json::Value> {
        self.weft_json("status")
    }

    /// `weft explain --json` for a call from `pod` (namespace default).
    pub fn explain(
        &self,
        pod: &str,
        method: &str,
        url: &str,
        headers: &[&str],
    ) -> Result<serde_json::Value> {
        let from = format!("default/{pod}");
        let mut args = vec!["--from", &from, url, "-X", method];
        for h in headers {
            args.extend(["-H", h]);
        }
        self.weft_json_with("explain", &args)
    }

    fn weft_json(&self, subcommand: &str) -> Result<serde_json::Value> {
        self.weft_json_with(subcommand, &[])
    }

    fn weft_json_with(&self, subcommand: &str, extra: &[&str]) -> Result<serde_json::Value> {
        let admin = self.admin_addr();
        let mut args = vec![subcommand, "--json", "--admin-addr", &admin];
        args.extend_from_slice(extra);
        let out = check(cmd(&self.weft, &args))?;
        serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
            what: subcommand.to_string(),
            reason: e.to_string(),
        })
    }

    /// One Prometheus sample (`name` without labels) from the control plane's `/metrics`.
    pub fn control_plane_metric(&self, name: &str) -> Result<Option<f64>> {
        let url = format!("http://{}/metrics", self.admin_addr());
        let out = check(cmd(&self.app, &["get", &url]))?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok()))
    }

    /// The version of `type_name` (`RDS`, ...) that `pod`'s proxy last ACKed.
    pub fn acked_version(&self, pod: &str, type_name: &str) -> Result<Option<String>> {
        let status = self.proxy_status()?;
        let node = format!("default/{pod}");
        Ok(status
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["node"] == node.as_str())
            .flat_map(|p| p["types"].as_array().cloned().unwrap_or_default())
            .find(|t| t["type"] == type_name && t["state"] == "SYNCED")
            .and_then(|t| t["acked"].as_str().map(str::to_string)))
    }

    /// Waits until `pod`'s proxy has ACKed a `type_name` version other than `old`.
    pub fn wait_for_new_ack(
        &self,
        pod: &str,
        type_name: &str,
        old: Option<&str>,
    ) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self.acked_version(pod, type_name)?
                && Some(v.as_str()) != old
            {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    Duration::from_secs(20),
                    format!("{pod} to ACK a new {type_name} version"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Log files of this harness (control plane, apps, sidecars).
    pub fn logs(&self) -> Vec<PathBuf> {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.work)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        logs
    }
}

/// A load running in the background.
#[derive(Debug)]
pub struct RunningLoad {
    child: Option<Child>,
}

impl RunningLoad {
    /// Waits for the load to end and returns its report.
    pub fn finish(mut self) -> Result<LoadReport> {
        let child = self.child.take().ok_or_else(|| HarnessError::Decode {
            what: "load".into(),
            reason: "already finished".into(),
        })?;
        let out = child
            .wait_with_output()
            .map_err(|e| HarnessError::Command {
                command: "load".into(),
                reason: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: "load".into(),
                reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr)),
            });
        }
        parse_report(out)
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_report(out: Output) -> Result<LoadReport> {
    serde_json::from_slice(&out.stdout).map_err(|e| HarnessError::Decode {
        what: "load report".into(),
        reason: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io(path))
}

fn wait_for(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            return Err(HarnessError::Timeout(timeout, what.to_string()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
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
