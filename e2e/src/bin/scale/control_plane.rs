//! `weft up` (or `weft controller`) as a separate process, measured from outside:
//! readiness over its admin endpoint, memory and CPU time from /proc, a memory cap
//! enforced by a watchdog.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

/// How the control plane's open-file limit is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdLimit {
    /// Started as a shell would start it (inheriting this process's original soft limit);
    /// `weft up` raises its own limit or lives with it.
    Inherited,
    /// Started through `prlimit --nofile=N:N` because it did not raise its own.
    Prlimit(u64),
}

impl std::fmt::Display for FdLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FdLimit::Inherited => write!(f, "inherited"),
            FdLimit::Prlimit(n) => write!(f, "prlimit --nofile={n}:{n}"),
        }
    }
}

/// Where the control plane reads the mesh from.
#[derive(Clone, Debug)]
pub enum Source {
    /// `weft up MANIFESTS --state-dir STATE_DIR`: local mode.
    Files {
        manifests: PathBuf,
        state_dir: PathBuf,
    },
    /// `weft controller --kubeconfig KUBECONFIG`: Kubernetes mode, proxies identified
    /// by their pod address (the simulated proxies have no ServiceAccount token).
    ApiServer { kubeconfig: PathBuf },
}

impl Source {
    /// The command, for messages: `weft up` or `weft controller`.
    pub fn command(&self) -> &'static str {
        match self {
            Source::Files { .. } => "weft up",
            Source::ApiServer { .. } => "weft controller",
        }
    }

    fn args(&self) -> Vec<std::ffi::OsString> {
        match self {
            Source::Files {
                manifests,
                state_dir,
            } => vec![
                "up".into(),
                manifests.into(),
                "--state-dir".into(),
                state_dir.into(),
            ],
            Source::ApiServer { kubeconfig } => vec![
                "controller".into(),
                "--kubeconfig".into(),
                kubeconfig.into(),
                "--namespace".into(),
                CONTROLLER_NAMESPACE.into(),
                "--identity".into(),
                "weft-scale-0".into(),
                "--proxy-identity".into(),
                "address".into(),
            ],
        }
    }
}

/// The namespace `weft controller` runs in (its CA Secret, Lease and Events).
pub const CONTROLLER_NAMESPACE: &str = "weft-system";

/// Parameters of one control plane instance.
#[derive(Clone, Debug)]
pub struct Launch {
    pub binary: PathBuf,
    pub source: Source,
    pub log: PathBuf,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
    pub fd_limit: FdLimit,
    /// The open-file soft limit this bench started with (what a shell would give).
    pub shell_nofile: (u64, u64),
    pub memory_cap_bytes: u64,
}

/// A running control plane; killed when dropped.
#[derive(Debug)]
pub struct ControlPlane {
    pub launch: Launch,
    child: Option<Child>,
    pub pid: u32,
    watchdog: Arc<Watchdog>,
    watchdog_task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Watchdog {
    /// Highest VmRSS seen, in bytes.
    peak_rss: AtomicU64,
    /// Killed for exceeding the memory cap.
    capped: AtomicBool,
    /// Killed because the machine was about to run out of memory (MemAvailable, bytes).
    machine_low: AtomicU64,
    /// Why the process is gone, once it is.
    gone: Mutex<Option<String>>,
}

/// Picks `n` distinct free TCP ports on 127.0.0.1: binds them all to port 0 before
/// releasing any (one bind-and-release at a time can hand out the same port twice).
pub fn free_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(TcpListener::local_addr).collect()
}

impl ControlPlane {
    /// Starts the control plane; does not wait for it to serve.
    pub fn spawn(launch: Launch) -> Result<ControlPlane, String> {
        if let Source::Files { state_dir, .. } = &launch.source {
            std::fs::create_dir_all(state_dir)
                .map_err(|e| format!("creating {}: {e}", state_dir.display()))?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .map_err(|e| format!("opening {}: {e}", launch.log.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", launch.log.display()))?;
        // prlimit sets the limits and execs the command: the pid is weft's own.
        let (soft, hard) = match launch.fd_limit {
            FdLimit::Inherited => launch.shell_nofile,
            FdLimit::Prlimit(n) => (n, n),
        };
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={soft}:{hard}"))
            .arg("--")
            .arg(&launch.binary)
            .args(launch.source.args())
            .arg("--xds-addr")
            .arg(launch.xds.to_string())
            .arg("--admin-addr")
            .arg(launch.admin.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", launch.binary.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| format!("{} exited at once", launch.source.command()))?;
        let watchdog = Arc::new(Watchdog::default());
        let task = tokio::spawn(watch_memory(pid, launch.memory_cap_bytes, watchdog.clone()));
        Ok(ControlPlane {
            launch,
            child: Some(child),
            pid,
            watchdog,
            watchdog_task: Some(task),
        })
    }

    /// Why the control plane is not usable any more (exited, killed at the memory cap).
    pub fn failure(&mut self) -> Option<String> {
        if let Some(why) = machine_low(&self.watchdog) {
            return Some(why);
        }
        if self.watchdog.capped.load(Ordering::Acquire) {
            return Some(format!(
                "exceeded the memory cap of {} (RSS reached {}); killed",
                gib(self.launch.memory_cap_bytes),
                gib(self.watchdog.peak_rss.load(Ordering::Acquire))
            ));
        }
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let why = format!(
                "{} exited ({status}): {} (log: {})",
                self.launch.source.command(),
                log_tail(&self.launch.log, 1),
                self.launch.log.display()
            );
            *self
                .watchdog
                .gone
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
            return Some(why);
        }
        self.watchdog
            .gone
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A cheap check usable from a closure: the memory cap or a recorded exit.
    pub fn failure_flag(&self) -> impl Fn() -> Option<String> + use<> {
        let watchdog = self.watchdog.clone();
        let cap = self.launch.memory_cap_bytes;
        move || {
            if let Some(why) = machine_low(&watchdog) {
                return Some(why);
            }
            if watchdog.capped.load(Ordering::Acquire) {
                return Some(format!("exceeded the memory cap of {}; killed", gib(cap)));
            }
            watchdog
                .gone
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }
    }

    /// Polls `/status` and `/ready` until both answer 200; the time since `since`.
    pub async fn wait_ready(
        &mut self,
        since: Instant,
        timeout: Duration,
    ) -> Result<Duration, String> {
        let client = http_client();
        let deadline = since + timeout;
        loop {
            if let Some(why) = self.failure() {
                return Err(why);
            }
            let status = get(&client, self.launch.admin, "/status").await;
            if status.is_ok() && get(&client, self.launch.admin, "/ready").await.is_ok() {
                return Ok(since.elapsed());
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on the admin endpoint.
    pub async fn admin_get(&self, path: &str) -> Result<String, String> {
        get(&http_client(), self.launch.admin, path).await
    }

    pub fn rss_bytes(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS").map(|k| k * 1024)
    }

    pub fn hwm_bytes(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM").map(|k| k * 1024)
    }

    /// Soft open-file limit of the running process.
    pub fn nofile_soft(&self) -> Option<u64> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).ok()?;
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .split_whitespace()
            .nth(3)?
            .parse()
            .ok()
    }

    /// User + system CPU time so far, in milliseconds.
    pub fn cpu_ms(&self) -> Option<u64> {
        cpu_ms(self.pid)
    }

    /// Waits until the process has been (nearly) idle for a while: CPU time grows by at
    /// most `QUIET_CPU_MS` over `QUIET_WINDOW`; gives up after `max`. Returns the CPU
    /// time at that point.
    pub async fn wait_quiet(&self, max: Duration) -> Option<u64> {
        const QUIET_WINDOW: Duration = Duration::from_millis(300);
        const QUIET_CPU_MS: u64 = 20;
        let deadline = Instant::now() + max;
        let mut last = self.cpu_ms()?;
        loop {
            tokio::time::sleep(QUIET_WINDOW).await;
            let now = self.cpu_ms()?;
            if now.saturating_sub(last) <= QUIET_CPU_MS || Instant::now() >= deadline {
                return Some(now);
            }
            last = now;
        }
    }

    /// SIGTERM (as an operator would), then waits for the exit; SIGKILL after `grace`.
    /// Returns how long it took to exit and whether it had to be killed.
    pub async fn terminate(&mut self, grace: Duration) -> Result<(Duration, bool), String> {
        let Some(mut child) = self.child.take() else {
            return Err("not running".to_string());
        };
        if let Some(t) = self.watchdog_task.take() {
            t.abort();
        }
        let started = Instant::now();
        send_signal(self.pid, "TERM").await?;
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(Ok(_)) => Ok((started.elapsed(), false)),
            Ok(Err(e)) => Err(format!("waiting for {}: {e}", self.launch.source.command())),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Ok((started.elapsed(), true))
            }
        }
    }

    /// Peak RSS the watchdog saw.
    pub fn peak_rss(&self) -> u64 {
        self.watchdog.peak_rss.load(Ordering::Acquire)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(t) = self.watchdog_task.take() {
            t.abort();
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
    }
}

fn machine_low(watchdog: &Watchdog) -> Option<String> {
    let available = watchdog.machine_low.load(Ordering::Acquire);
    (available > 0).then(|| {
        format!(
            "the machine ran out of memory (MemAvailable {}) with the control plane at RSS {}; killed before the OOM killer picks a process",
            mib(available),
            gib(watchdog.peak_rss.load(Ordering::Acquire))
        )
    })
}

/// Below this much available memory the control plane is killed: the machine is shared
/// with the simulated proxies (and Envoys), and the kernel's OOM killer would pick any
/// of them.
const MACHINE_RESERVE_BYTES: u64 = 1 << 30;

/// MemAvailable from /proc/meminfo, in bytes.
pub fn mem_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Samples RSS every 200 ms; kills the process (SIGKILL) once it exceeds `cap`, or when
/// the machine is about to run out of memory.
async fn watch_memory(pid: u32, cap: u64, watchdog: Arc<Watchdog>) {
    loop {
        let Some(rss) = proc_status_kib(pid, "VmRSS").map(|k| k * 1024) else {
            let mut gone = watchdog.gone.lock().unwrap_or_else(PoisonError::into_inner);
            gone.get_or_insert_with(|| "the control plane is gone".to_string());
            return;
        };
        watchdog.peak_rss.fetch_max(rss, Ordering::AcqRel);
        if rss > cap {
            watchdog.capped.store(true, Ordering::Release);
            let _ = send_signal(pid, "KILL").await;
            return;
        }
        if let Some(available) = mem_available().filter(|a| *a < MACHINE_RESERVE_BYTES) {
            watchdog
                .machine_low
                .store(available.max(1), Ordering::Release);
            let _ = send_signal(pid, "KILL").await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `kill -SIG pid` (the workspace forbids unsafe code, so no libc call).
pub async fn send_signal(pid: u32, signal: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("kill -{signal} {pid}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid}: {status}"))
    }
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of a process (all its threads) in milliseconds.
pub fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) * 1000 / clock_ticks())
}

/// Clock ticks per second (USER_HZ); 100 on every Linux this runs on, checked once.
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

type HttpClient = Client<HttpConnector, Empty<bytes::Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<String, String> {
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| format!("GET {path}: timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))?;
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(30), response.into_body().collect())
        .await
        .map_err(|_| format!("GET {path}: body timed out"))?
        .map_err(|e| format!("GET {path}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("GET {path}: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).to_string())
}

pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

pub fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<String> = text
        .lines()
        .map(strip_ansi)
        .filter(|l| !l.is_empty())
        .collect();
    all[all.len().saturating_sub(lines)..].join(" / ")
}

/// Drops terminal colour sequences (`ESC [ ... m`) that tracing writes to the log.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_string()
}
