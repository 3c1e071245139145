//! Real Envoys against `weft up`: one process per pod, in the root network namespace,
//! each connecting from its pod's IP (`upstream_bind_config` on the xDS cluster).
//! Sync and ACKs are observed through the control plane's `/proxy-status`: the
//! version a proxy ACKed and when, as the server recorded it, polled every `POLL`
//! (a server that does not record the time is timed by the poll that saw the ACK).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::bench::{
    Binary, ChangeKind, Settings, Size, apply_change, log_step, plan_change, start_control_plane,
};
use crate::client::short_type;
use crate::control_plane::{
    ControlPlane, Source, free_ports, log_tail, mem_available, mib, proc_status_kib,
};
use crate::mesh::Mesh;
use crate::report::{
    ChangeRow, ChangeSample, ChangeStats, EnvoyRun, Measured, RunReport, SidecarMemory, percentile,
    secs,
};

/// How often `/proxy-status` is polled (the resolution of ACK times where the server
/// does not report them).
const POLL: Duration = Duration::from_millis(25);
/// Types an Envoy of this mesh subscribes to; in sync = all of them ACKed.
const EXPECTED_TYPES: [&str; 5] = ["CDS", "EDS", "LDS", "RDS", "SDS"];

/// One Envoy process; killed when dropped.
#[derive(Debug)]
struct EnvoyProcess {
    node: String,
    pod: usize,
    /// Fetches service clusters on demand.
    on_demand: bool,
    admin_port: u16,
    log: PathBuf,
    child: Child,
}

/// `/proxy-status` as far as this bench reads it (operator/src/runtime/admin.rs ProxyStatus).
#[derive(Debug, Deserialize)]
struct ProxyStatus {
    node: String,
    types: Vec<TypeStatus>,
}

#[derive(Debug, Deserialize)]
struct TypeStatus {
    #[serde(rename = "type")]
    type_name: String,
    state: String,
    acked: Option<String>,
    #[serde(default)]
    responses: u64,
    /// When the server got the ACK of `acked` (RFC 3339).
    #[serde(default)]
    acked_at: Option<String>,
}

async fn proxy_status(cp: &ControlPlane) -> Result<HashMap<String, ProxyStatus>, String> {
    let body = cp.admin_get("/proxy-status").await?;
    let list: Vec<ProxyStatus> =
        serde_json::from_str(&body).map_err(|e| format!("parsing /proxy-status: {e}"))?;
    // A node may show up twice around a reconnect; the later entry wins.
    Ok(list.into_iter().map(|p| (p.node.clone(), p)).collect())
}

/// When `node`'s latest ACK of `type_name` reached the server, counted from `since`;
/// `None` if the server does not say.
fn ack_time(
    status: &HashMap<String, ProxyStatus>,
    node: &str,
    type_name: &str,
    since: std::time::SystemTime,
) -> Option<Duration> {
    let at = status
        .get(node)?
        .types
        .iter()
        .find(|t| t.type_name == type_name)?
        .acked_at
        .as_deref()?;
    let at = humantime::parse_rfc3339(at).ok()?;
    Some(at.duration_since(since).unwrap_or_default())
}

fn in_sync(status: &ProxyStatus, on_demand: bool) -> bool {
    // A sidecar fetching clusters on demand has no EDS cluster before its first call.
    let needed = |t: &&&str| !(on_demand && **t == "EDS");
    EXPECTED_TYPES.iter().filter(needed).all(|t| {
        status
            .types
            .iter()
            .any(|s| s.type_name == *t && s.state == "SYNCED")
    })
}

/// Writes pod `m`'s bootstrap: `weft bootstrap`'s output with the xDS cluster bound to
/// the pod's IP, so the control plane sees the stream come from the pod.
async fn write_bootstrap(
    weft: &Path,
    mesh: &Mesh,
    m: usize,
    xds: std::net::SocketAddr,
    admin_port: u16,
    out: &Path,
) -> Result<(), String> {
    let pod = mesh.pods.get(m).ok_or("no such pod")?;
    let output = Command::new(weft)
        .args([
            "bootstrap",
            "--pod",
            &pod.node_id(),
            "--xds",
            &xds.to_string(),
        ])
        .args(["--admin-port", &admin_port.to_string()])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("weft bootstrap: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "weft bootstrap: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut bootstrap: serde_json::Value =
        serde_yaml_ng::from_slice(&output.stdout).map_err(|e| format!("bootstrap YAML: {e}"))?;
    let clusters = bootstrap
        .pointer_mut("/static_resources/clusters")
        .and_then(|c| c.as_array_mut())
        .ok_or("bootstrap has no static clusters")?;
    let xds_cluster = clusters
        .iter_mut()
        .find(|c| c.get("name").and_then(|n| n.as_str()) == Some("weft-xds"))
        .ok_or("bootstrap has no weft-xds cluster")?;
    xds_cluster["upstream_bind_config"] = serde_json::json!({
        "source_address": { "address": pod.ip.to_string(), "port_value": 0 }
    });
    let text = serde_json::to_string_pretty(&bootstrap).map_err(|e| e.to_string())?;
    std::fs::write(out, text).map_err(|e| format!("writing {}: {e}", out.display()))
}

fn spawn_envoy(envoy: &Path, config: &Path, log: &Path) -> Result<Child, String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    Command::new(envoy)
        .arg("-c")
        .arg(config)
        .args([
            "--use-dynamic-base-id",
            "--concurrency",
            "2",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", envoy.display()))
}

/// `WEFT_ENVOY` or `envoy` on PATH (the harness's rule), else what `make setup`
/// installed under the workspace's tools/ (the Makefile exports WEFT_ENVOY only to
/// the commands it runs itself).
fn envoy_binary() -> Result<PathBuf, String> {
    weft_e2e::envoy_binary().or_else(|e| {
        let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools");
        std::fs::read_dir(&tools)
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join("envoy/_bin/envoy"))
            .find(|p| p.is_file())
            .ok_or_else(|| e.to_string())
    })
}

/// Envoys stop being started or kept once the machine has less than this available:
/// at 1,000 services with the whole mesh in every Envoy, each takes ~300 MiB, so 100 of
/// them do not fit in 24 GB, and the OOM killer would pick the control plane or this bench.
const MEMORY_RESERVE_BYTES: u64 = 2 << 30;

/// Fails if an Envoy exited, or if the machine is about to run out of memory.
fn check_alive(envoys: &mut [EnvoyProcess]) -> Result<(), String> {
    if let Some(available) = mem_available().filter(|a| *a < MEMORY_RESERVE_BYTES) {
        let rss: Vec<u64> = envoys
            .iter()
            .filter_map(|e| e.child.id())
            .filter_map(|pid| proc_status_kib(pid, "VmRSS"))
            .map(|k| k * 1024)
            .collect();
        return Err(format!(
            "machine memory exhausted: {} available with {} Envoys running (RSS p50 {}, max {}, total {}); stopped before the OOM killer",
            mib(available),
            envoys.len(),
            mib(percentile(&rss, 0.5).unwrap_or(0)),
            mib(rss.iter().max().copied().unwrap_or(0)),
            mib(rss.iter().sum())
        ));
    }
    for e in envoys.iter_mut() {
        if let Ok(Some(status)) = e.child.try_wait() {
            return Err(format!(
                "Envoy of {} exited ({status}): {}",
                e.node,
                log_tail(&e.log, 5)
            ));
        }
    }
    Ok(())
}

/// Reads a few listener stats from every Envoy: were the shared wildcard ports
/// (0.0.0.0:15001/15006, SO_REUSEPORT) bound by all of them?
async fn listener_check(envoys: &[EnvoyProcess]) -> Result<String, String> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut active = Vec::new();
    let mut failures = 0u64;
    for e in envoys {
        let uri: hyper::Uri = format!(
            "http://127.0.0.1:{}/stats?filter=^listener_manager\\.(total_listeners_active|listener_create_failure|lds\\.update_rejected)$",
            e.admin_port
        )
        .parse()
        .map_err(|e| format!("{e}"))?;
        let response = client
            .get(uri)
            .await
            .map_err(|err| format!("Envoy {} admin: {err}", e.node))?;
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|err| format!("Envoy {} admin: {err}", e.node))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        let stat = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("listener_manager.{name}: ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        active.push(stat("total_listeners_active"));
        failures += stat("listener_create_failure") + stat("lds.update_rejected");
    }
    let (min, max) = (
        active.iter().min().copied().unwrap_or(0),
        active.iter().max().copied().unwrap_or(0),
    );
    if failures > 0 || min == 0 {
        return Err(format!(
            "listeners not all bound: {failures} create failures / rejected LDS updates, active listeners per Envoy {min}-{max}"
        ));
    }
    Ok(format!(
        "{min}-{max} active per Envoy, 0 bind failures (SO_REUSEPORT on 15001/15006)"
    ))
}

/// GET on an Envoy's admin endpoint (127.0.0.1); the body of a 2xx answer.
async fn envoy_admin_get(admin_port: u16, path: &str) -> Result<String, String> {
    const TIMEOUT: Duration = Duration::from_secs(10);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: hyper::Uri = format!("http://127.0.0.1:{admin_port}{path}")
        .parse()
        .map_err(|e| format!("admin {path}: {e}"))?;
    let fetch = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| format!("admin {path}: {e}"))?;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .map_err(|e| format!("admin {path}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            return Err(format!("admin {path}: {status}: {}", text.trim()));
        }
        Ok(text)
    };
    tokio::time::timeout(TIMEOUT, fetch)
        .await
        .map_err(|_| format!("admin {path}: no answer within {TIMEOUT:?}"))?
}

/// A `Name:  1234 kB` field of a /proc file (`status`, `smaps_rollup`), in bytes.
fn proc_kib_field(text: &str, pid: u32, file: &str, field: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .ok_or_else(|| format!("/proc/{pid}/{file} has no {field} field"))?;
    let mut words = line[field.len() + 1..].split_whitespace();
    match (words.next().map(str::parse::<u64>), words.next()) {
        (Some(Ok(kib)), Some("kB")) => Ok(kib * 1024),
        _ => Err(format!(
            "/proc/{pid}/{file}: cannot read {field} from {line:?} (expected `N kB`)"
        )),
    }
}

/// A byte count from Envoy's `/memory`: a JSON string (proto uint64) or a number.
fn admin_bytes(memory: &serde_json::Value, field: &str) -> Result<u64, String> {
    let value = memory
        .get(field)
        .ok_or_else(|| format!("admin /memory has no {field}"))?;
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| format!("admin /memory: {field} is {value}, not a byte count"))
}

/// One Envoy's memory: RSS split from `/proc/PID/status`, PSS from
/// `/proc/PID/smaps_rollup`, tcmalloc's heap from the admin `/memory`.
async fn sidecar_memory(pid: u32, admin_port: u16) -> Result<SidecarMemory, String> {
    let read = |file: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|e| format!("/proc/{pid}/{file}: {e}"))
    };
    let status = read("status")?;
    let rollup = read("smaps_rollup")?;
    let memory = envoy_admin_get(admin_port, "/memory").await?;
    let memory: serde_json::Value =
        serde_json::from_str(&memory).map_err(|e| format!("parsing admin /memory: {e}"))?;
    Ok(SidecarMemory {
        rss: proc_kib_field(&status, pid, "status", "VmRSS")?,
        rss_anon: proc_kib_field(&status, pid, "status", "RssAnon")?,
        rss_file: proc_kib_field(&status, pid, "status", "RssFile")?,
        pss: proc_kib_field(&rollup, pid, "smaps_rollup", "Pss")?,
        heap_allocated: admin_bytes(&memory, "allocated")?,
        heap_size: admin_bytes(&memory, "heap_size")?,
    })
}

/// CPU time (user + system) of every Envoy still running, summed.
fn envoys_cpu_ms(envoys: &[EnvoyProcess]) -> u64 {
    envoys
        .iter()
        .filter_map(|e| e.child.id())
        .filter_map(crate::control_plane::cpu_ms)
        .sum()
}

/// Every Envoy's memory; fails on the first one that cannot be read.
async fn envoys_memory(envoys: &[EnvoyProcess]) -> Result<Vec<SidecarMemory>, String> {
    let mut out = Vec::with_capacity(envoys.len());
    for e in envoys {
        let pid = e
            .child
            .id()
            .ok_or_else(|| format!("Envoy of {} has exited", e.node))?;
        out.push(
            sidecar_memory(pid, e.admin_port)
                .await
                .map_err(|err| format!("Envoy of {}: {err}", e.node))?,
        );
    }
    Ok(out)
}

/// The floor: an Envoy with an admin-only bootstrap (no xDS, no listeners, no
/// clusters), started with the sidecars' flags once they are measured, beside them:
/// its PSS shares the binary's pages with the N sidecars (theirs with each other).
/// Measured once `/ready` says LIVE and a moment has passed for its workers to start;
/// killed on return.
async fn floor_memory(envoy: &Path, run_dir: &Path) -> Result<SidecarMemory, String> {
    const READY_TIMEOUT: Duration = Duration::from_secs(30);
    const SETTLE: Duration = Duration::from_secs(1);
    let admin_port = free_ports(1)
        .map_err(|e| format!("picking an admin port: {e}"))?
        .first()
        .map(|a| a.port())
        .ok_or("picking an admin port: none")?;
    let config = run_dir.join("envoy-empty.json");
    let bootstrap = serde_json::json!({
        "admin": {
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": admin_port } }
        }
    });
    std::fs::write(&config, bootstrap.to_string())
        .map_err(|e| format!("writing {}: {e}", config.display()))?;
    let log = run_dir.join("envoy-empty.log");
    let mut child = spawn_envoy(envoy, &config, &log)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("exited ({status}): {}", log_tail(&log, 5)));
        }
        let ready = envoy_admin_get(admin_port, "/ready").await;
        if matches!(&ready, Ok(body) if body.trim() == "LIVE") {
            break;
        }
        if Instant::now() >= deadline {
            let answer = ready.unwrap_or_else(|e| e);
            return Err(format!(
                "admin /ready not LIVE within {READY_TIMEOUT:?} (last answer: {}): {}",
                answer.trim(),
                log_tail(&log, 5)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let pid = child.id().ok_or("exited before it was measured")?;
    let measured = sidecar_memory(pid, admin_port).await;
    let _ = child.kill().await;
    measured
}

/// Starts `count` Envoys for the first pods in connect order, measures sync, RSS and
/// the three changes. Everything is killed on return (and on panic, by Drop).
pub async fn run_envoys(
    binary: &mut Binary,
    size: &Size,
    count: usize,
    on_demand: bool,
    settings: &Settings,
) -> RunReport {
    let mut report = RunReport::new(&binary.label);
    let run_dir = settings.work.join(format!(
        "{}-envoys-{}x{}",
        binary.label.replace(' ', "-"),
        size.services,
        size.pods
    ));
    let _ = std::fs::remove_dir_all(&run_dir);
    let manifests = run_dir.join("manifests");
    let mut mesh = Mesh::new(size.services, size.pods, size.scope, 0);
    for m in mesh
        .connect_order
        .iter()
        .take(count)
        .copied()
        .collect::<Vec<_>>()
    {
        mesh.pods[m].on_demand = on_demand;
    }
    if let Err(e) = mesh.write(&manifests) {
        report.envoys = Some(Err(format!("writing the mesh: {e}")));
        return report;
    }
    let source = Source::Files {
        manifests: manifests.clone(),
        state_dir: run_dir.join("state"),
    };
    let (cp, ready) =
        start_control_plane(binary, source, &run_dir, settings, count as u64 + 1024).await;
    report.ready = Some(ready);
    let Some(mut cp) = cp else {
        report.envoys = Some(Err("the control plane did not start".into()));
        return report;
    };
    let result = envoys_on(
        binary, &mut mesh, &manifests, &run_dir, &mut cp, count, size, settings,
    )
    .await;
    if let Err(e) = &result {
        log_step(&binary.label, size, &format!("Envoys FAILED: {e}"));
    }
    report.envoys = Some(result);
    let _ = cp.terminate(Duration::from_secs(10)).await;
    report
}

#[allow(clippy::too_many_arguments)]
async fn envoys_on(
    binary: &Binary,
    mesh: &mut Mesh,
    manifests: &Path,
    run_dir: &Path,
    cp: &mut ControlPlane,
    count: usize,
    size: &Size,
    settings: &Settings,
) -> Measured<EnvoyRun> {
    let envoy = envoy_binary()?;
    let pods: Vec<usize> = mesh.connect_order.iter().take(count).copied().collect();
    let ports = free_ports(pods.len()).map_err(|e| format!("picking admin ports: {e}"))?;
    let mut configs = Vec::new();
    for (&m, port) in pods.iter().zip(ports) {
        let admin_port = port.port();
        let config = run_dir.join(format!("envoy-{m}.json"));
        write_bootstrap(&binary.path, mesh, m, cp.launch.xds, admin_port, &config).await?;
        configs.push((m, admin_port, config));
    }
    let started = Instant::now();
    let mut envoys = Vec::new();
    for (m, admin_port, config) in configs {
        let log = run_dir.join(format!("envoy-{m}.log"));
        let child = spawn_envoy(&envoy, &config, &log)?;
        let node = mesh.pods.get(m).map(|p| p.node_id()).unwrap_or_default();
        envoys.push(EnvoyProcess {
            node,
            pod: m,
            on_demand: mesh.pods.get(m).is_some_and(|p| p.on_demand),
            admin_port,
            log,
            child,
        });
    }
    // In sync: every Envoy has every expected type ACKed (SYNCED) on the server.
    let deadline = started + settings.limits.sync_timeout;
    let mut synced = 0;
    let all_in_sync = loop {
        check_alive(&mut envoys)
            .map_err(|e| format!("{e} ({synced} of {} were in sync)", envoys.len()))?;
        if let Some(why) = cp.failure() {
            return Err(why);
        }
        let status = proxy_status(cp).await?;
        synced = envoys
            .iter()
            .filter(|e| status.get(&e.node).is_some_and(|s| in_sync(s, e.on_demand)))
            .count();
        if synced == envoys.len() {
            break started.elapsed();
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{synced} of {} Envoys in sync after {:?}",
                envoys.len(),
                settings.limits.sync_timeout
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    log_step(
        &binary.label,
        size,
        &format!("{} Envoys in sync in {}", envoys.len(), secs(all_in_sync)),
    );
    let listeners = listener_check(&envoys).await?;
    let rss: Vec<u64> = envoys
        .iter()
        .filter_map(|e| e.child.id())
        .filter_map(|pid| proc_status_kib(pid, "VmRSS"))
        .map(|k| k * 1024)
        .collect();
    let cp_rss = cp.rss_bytes().unwrap_or(0);
    log_step(
        &binary.label,
        size,
        &format!(
            "Envoy RSS p50 {} max {}; control plane RSS {}; listeners: {listeners}",
            mib(percentile(&rss, 0.5).unwrap_or(0)),
            mib(rss.iter().max().copied().unwrap_or(0)),
            mib(cp_rss)
        ),
    );
    let memory = envoys_memory(&envoys).await;
    let floor = floor_memory(&envoy, run_dir).await;
    let p50 = |f: fn(&SidecarMemory) -> u64, m: &[SidecarMemory]| {
        mib(percentile(&m.iter().map(f).collect::<Vec<_>>(), 0.5).unwrap_or(0))
    };
    for (what, measured) in [
        ("Envoy memory p50", memory.as_deref()),
        (
            "empty-bootstrap Envoy",
            floor.as_ref().map(std::slice::from_ref),
        ),
    ] {
        let line = match measured {
            Ok(m) => format!(
                "{what}: RSS {} = anon {} + file {}; PSS {}; heap allocated {}",
                p50(|x| x.rss, m),
                p50(|x| x.rss_anon, m),
                p50(|x| x.rss_file, m),
                p50(|x| x.pss, m),
                p50(|x| x.heap_allocated, m),
            ),
            Err(e) => format!("{what} FAILED: {e}"),
        };
        log_step(&binary.label, size, &line);
    }
    let mut changes = Vec::new();
    // Sidecars fetching clusters on demand hold no service cluster or endpoints before
    // they call (these Envoys do not), so only their memory and sync are measured.
    let kinds = if envoys.iter().any(|e| e.on_demand) {
        log_step(
            &binary.label,
            size,
            "on-demand Envoys: changes not measured",
        );
        Vec::new()
    } else {
        vec![
            ChangeKind::Endpoint,
            ChangeKind::TrafficTarget,
            ChangeKind::NewService,
        ]
    };
    for kind in kinds {
        let row = envoy_changes(kind, mesh, manifests, cp, &mut envoys, settings).await;
        match &row.outcome {
            Ok(s) => log_step(
                &binary.label,
                size,
                &format!("Envoys, {}: {} runs done", row.kind, s.samples.len()),
            ),
            Err(e) => log_step(
                &binary.label,
                size,
                &format!("Envoys, {} FAILED: {e}", row.kind),
            ),
        }
        changes.push(row);
    }
    Ok(EnvoyRun {
        envoys: envoys.len(),
        all_in_sync,
        rss_p50: percentile(&rss, 0.5).unwrap_or(0),
        rss_max: rss.iter().max().copied().unwrap_or(0),
        cp_rss,
        listeners,
        memory,
        floor,
        changes,
    })
}

/// Polls `/proxy-status` until every Envoy has every type SYNCED (ACKed what it was
/// sent) and two polls `SETTLE_GAP` apart agree; returns the last status.
async fn wait_settled(
    cp: &mut ControlPlane,
    envoys: &mut [EnvoyProcess],
    timeout: Duration,
) -> Result<HashMap<String, ProxyStatus>, String> {
    const SETTLE_GAP: Duration = Duration::from_millis(300);
    let deadline = Instant::now() + timeout;
    let fingerprint = |s: &HashMap<String, ProxyStatus>| -> Vec<(String, String, Option<String>)> {
        let mut v: Vec<_> = s
            .values()
            .flat_map(|p| {
                p.types
                    .iter()
                    .map(|t| (p.node.clone(), t.type_name.clone(), t.acked.clone()))
            })
            .collect();
        v.sort();
        v
    };
    let mut previous = None;
    loop {
        check_alive(envoys)?;
        if let Some(why) = cp.failure() {
            return Err(why);
        }
        let status = proxy_status(cp).await?;
        let synced = envoys
            .iter()
            .all(|e| status.get(&e.node).is_some_and(|s| in_sync(s, e.on_demand)));
        let print = fingerprint(&status);
        if synced && previous.as_ref() == Some(&print) {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the Envoys did not settle (every type ACKed, nothing moving) within {timeout:?} before the change"
            ));
        }
        previous = synced.then_some(print);
        tokio::time::sleep(SETTLE_GAP).await;
    }
}

async fn envoy_changes(
    kind: ChangeKind,
    mesh: &mut Mesh,
    dir: &Path,
    cp: &mut ControlPlane,
    envoys: &mut [EnvoyProcess],
    settings: &Settings,
) -> ChangeRow {
    let connected: Vec<usize> = envoys.iter().map(|e| e.pod).collect();
    let nodes: BTreeMap<usize, String> = envoys.iter().map(|e| (e.pod, e.node.clone())).collect();
    let mut stats = ChangeStats::default();
    let mut watched = String::new();
    let fail = |watched: &str, e: String| ChangeRow {
        kind: kind.label(),
        watched: watched.to_string(),
        outcome: Err(e),
    };
    let mut slowest_poll = Duration::ZERO;
    // Whether the server reported when the ACKs came (`acked_at`).
    let mut server_timed = false;
    let mut poll_errors: Vec<String> = Vec::new();
    for r in 0..settings.repeats {
        let plan = match plan_change(kind, r, settings.repeats, mesh, &connected) {
            Ok(p) => p,
            Err(e) => return fail(&watched, e),
        };
        watched = format!(
            "{} ACKed version (/proxy-status every {POLL:?}; slowest poll {}{})",
            short_type(plan.watch_type),
            secs(slowest_poll),
            if poll_errors.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} polls failed, e.g. {}",
                    poll_errors.len(),
                    poll_errors[0]
                )
            }
        );
        let type_name = short_type(plan.watch_type);
        let cpu0 = cp.wait_quiet(Duration::from_secs(20)).await.unwrap_or(0);
        // The baseline is taken only once every Envoy has ACKed everything it was sent
        // and nothing moves any more: a late ACK of the previous change would otherwise
        // count as this change's.
        let before = match wait_settled(cp, envoys, settings.limits.change_timeout).await {
            Ok(s) => s,
            Err(e) => return fail(&watched, format!("run {}: {e}", r + 1)),
        };
        let acked = |s: &HashMap<String, ProxyStatus>, node: &str| -> Option<String> {
            s.get(node)?
                .types
                .iter()
                .find(|t| t.type_name == type_name)?
                .acked
                .clone()
        };
        let responses = |s: &HashMap<String, ProxyStatus>, node: &str| -> u64 {
            s.get(node)
                .map(|p| p.types.iter().map(|t| t.responses).sum())
                .unwrap_or(0)
        };
        let affected: Vec<String> = plan
            .affected_pods
            .iter()
            .filter_map(|m| nodes.get(m).cloned())
            .collect();
        let baseline: HashMap<String, Option<String>> = affected
            .iter()
            .map(|n| (n.clone(), acked(&before, n)))
            .collect();
        let responses_before: HashMap<String, u64> = envoys
            .iter()
            .map(|e| (e.node.clone(), responses(&before, &e.node)))
            .collect();
        let envoys_cpu0 = envoys_cpu_ms(envoys);
        let renamed = match apply_change(&plan.target, mesh, dir) {
            Ok(t) => t,
            Err(e) => return fail(&watched, e),
        };
        let renamed_wall = std::time::SystemTime::now() - renamed.elapsed();
        let mut seen: HashMap<String, Duration> = HashMap::new();
        let mut last_status = before;
        while seen.len() < affected.len() {
            if renamed.elapsed() > settings.limits.change_timeout {
                let missing: Vec<&String> =
                    affected.iter().filter(|n| !seen.contains_key(*n)).collect();
                return fail(
                    &watched,
                    format!(
                        "run {}: {} of {} affected Envoys did not ACK a new {type_name} within {:?} (e.g. {:?})",
                        r + 1,
                        missing.len(),
                        affected.len(),
                        settings.limits.change_timeout,
                        missing.iter().take(3).collect::<Vec<_>>()
                    ),
                );
            }
            if let Err(e) = check_alive(envoys) {
                return fail(&watched, e);
            }
            tokio::time::sleep(POLL).await;
            // A poll that fails or is slow (the admin endpoint shares the control plane's
            // two cores) is not a failed change: retry until the change deadline.
            let poll_started = Instant::now();
            let polled = proxy_status(cp).await;
            slowest_poll = slowest_poll.max(poll_started.elapsed());
            let status = match polled {
                Ok(s) => s,
                Err(e) => {
                    poll_errors.push(e);
                    if renamed.elapsed() > settings.limits.change_timeout {
                        let last = poll_errors.last().cloned().unwrap_or_default();
                        return fail(&watched, format!("run {}: /proxy-status: {last}", r + 1));
                    }
                    continue;
                }
            };
            // Observed when the poll returned: an upper bound on the ACK time.
            let now = renamed.elapsed();
            for node in &affected {
                if seen.contains_key(node) {
                    continue;
                }
                let nacked = status.get(node).is_some_and(|p| {
                    p.types
                        .iter()
                        .any(|t| t.type_name == type_name && t.state == "NACKED")
                });
                if nacked {
                    return fail(&watched, format!("{node} NACKED {type_name}"));
                }
                if acked(&status, node) != baseline.get(node).cloned().flatten() {
                    let at = ack_time(&status, node, type_name, renamed_wall);
                    server_timed |= at.is_some();
                    seen.insert(node.clone(), at.map_or(now, |at| at.min(now)));
                }
            }
            last_status = status;
        }
        // Up to the last ACK: idle Envoys spend CPU too (stats flushes, ~1 ms a second each).
        let proxies_cpu_ms = envoys_cpu_ms(envoys).saturating_sub(envoys_cpu0);
        let cpu1 = cp.wait_quiet(Duration::from_secs(20)).await.unwrap_or(cpu0);
        let after = proxy_status(cp).await.unwrap_or(last_status);
        // Envoys that were sent anything for this change (per-type response counters).
        let pushed = envoys
            .iter()
            .filter(|e| {
                responses(&after, &e.node) > responses_before.get(&e.node).copied().unwrap_or(0)
            })
            .count();
        let per_proxy: Vec<Duration> = seen.values().copied().collect();
        stats.samples.push(ChangeSample {
            affected: affected.len(),
            pushed,
            last_ack: per_proxy.iter().max().copied().unwrap_or_default(),
            per_proxy,
            cpu_ms: cpu1.saturating_sub(cpu0),
            proxies_cpu_ms,
        });
    }
    let timing = if server_timed {
        "ACK times as the server recorded them"
    } else {
        "ACK times = the poll that saw them"
    };
    let watched = format!(
        "{} ACKed version ({timing}; /proxy-status every {POLL:?}; slowest poll {}{})",
        watched.split(' ').next().unwrap_or("?"),
        secs(slowest_poll),
        if poll_errors.is_empty() {
            String::new()
        } else {
            format!(
                "; {} polls failed, e.g. {}",
                poll_errors.len(),
                poll_errors[0]
            )
        }
    );
    ChangeRow {
        kind: kind.label(),
        watched,
        outcome: Ok(stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_in_bytes_or_a_clear_error() {
        let status = "VmRSS:\t   64376 kB\nRssAnon:\t   13848 kB\nRssFile:\t   50524 kB\n";
        assert_eq!(
            proc_kib_field(status, 7, "status", "RssAnon"),
            Ok(13848 * 1024)
        );
        let missing = proc_kib_field(status, 7, "status", "RssShmem");
        assert_eq!(
            missing,
            Err("/proc/7/status has no RssShmem field".to_string())
        );
        assert!(proc_kib_field("Pss: lots\n", 7, "smaps_rollup", "Pss").is_err());
        // `Pss:` must not match `Pss_Anon:`.
        let rollup = "Pss_Anon: 1 kB\nPss:  2 kB\n";
        assert_eq!(proc_kib_field(rollup, 7, "smaps_rollup", "Pss"), Ok(2048));
    }

    #[test]
    fn admin_memory_counts_are_strings_or_numbers() {
        let memory = serde_json::json!({ "allocated": "5825120", "heap_size": 10485760 });
        assert_eq!(admin_bytes(&memory, "allocated"), Ok(5825120));
        assert_eq!(admin_bytes(&memory, "heap_size"), Ok(10485760));
        assert!(admin_bytes(&memory, "pageheap_free").is_err());
    }
}
