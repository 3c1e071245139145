//! The steps run against one binary at one mesh size: start, connect, change, restart,
//! unscoped sample. Each step prints its numbers as it goes and fills a [`RunReport`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{CDS, EDS, Fleet, LDS, Proxy, RDS, Watch, short_type};
use crate::control_plane::{ControlPlane, FdLimit, Launch, Source, free_ports, gib, mib};
use crate::mesh::{Mesh, PORT, namespace_of, service_fqdn};
use crate::report::{
    ChangeRow, ChangeSample, ChangeStats, Measured, Ready, Restarted, RunReport, Synced,
    UnscopedSample, secs,
};

/// The xDS resource names the changes watch, in one place.
pub mod watched {
    use crate::mesh::PORT;

    /// EDS and CDS name of a service's outbound cluster.
    pub fn outbound_cluster(fqdn: &str) -> String {
        format!("outbound|{PORT}||{fqdn}")
    }

    /// RDS name of the inbound HTTP routes (where TrafficTarget authorization lives).
    pub fn inbound_routes() -> String {
        format!("inbound|{PORT}")
    }

    /// RDS name of a service's outbound routes (where TrafficSplit weights live).
    pub fn outbound_routes(fqdn: &str) -> String {
        format!("{fqdn}:{PORT}")
    }
}

/// A mesh size and how many simulated proxies connect to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub services: usize,
    pub pods: usize,
    pub proxies: usize,
    pub scope: bool,
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} services / {} pods, {} proxies, {}",
            self.services,
            self.pods,
            self.proxies,
            if self.scope { "scoped" } else { "unscoped" }
        )
    }
}

/// Which parts run.
#[derive(Clone, Copy, Debug)]
pub struct Steps {
    pub connect: bool,
    pub changes: bool,
    pub restart: bool,
    pub unscoped: bool,
}

/// How long each step may take and how much memory the control plane may use: the
/// same options for `run` and `kube`.
#[derive(Debug, clap::Args)]
pub struct LimitArgs {
    /// Seconds an affected proxy may take to see a change.
    #[arg(long, default_value_t = 30)]
    change_timeout: u64,
    /// Seconds the control plane may take to get ready.
    #[arg(long, default_value_t = 600)]
    ready_timeout: u64,
    /// Seconds the proxies may take to get in sync (connect, restart, sample).
    #[arg(long, default_value_t = 600)]
    sync_timeout: u64,
    /// The control plane is killed (and its run reported as failed) above this RSS.
    #[arg(long, default_value_t = 12.0)]
    memory_cap_gb: f64,
}

/// [`LimitArgs`] as durations and bytes.
#[derive(Clone, Debug)]
pub struct Limits {
    pub change_timeout: Duration,
    pub ready_timeout: Duration,
    pub sync_timeout: Duration,
    pub memory_cap_bytes: u64,
}

impl LimitArgs {
    /// The limits in the units the runs use.
    pub fn limits(&self) -> Limits {
        Limits {
            change_timeout: Duration::from_secs(self.change_timeout),
            ready_timeout: Duration::from_secs(self.ready_timeout),
            sync_timeout: Duration::from_secs(self.sync_timeout),
            memory_cap_bytes: (self.memory_cap_gb * (1u64 << 30) as f64) as u64,
        }
    }
}

/// Settings shared by every run.
#[derive(Clone, Debug)]
pub struct Settings {
    pub work: PathBuf,
    pub repeats: usize,
    pub limits: Limits,
    pub unscoped_sample: usize,
    pub steps: Steps,
    pub shell_nofile: (u64, u64),
}

/// A binary under test and how its fd limit is set (decided on its first start).
#[derive(Clone, Debug)]
pub struct Binary {
    pub label: String,
    pub path: PathBuf,
    pub fd_limit: Option<FdLimit>,
}

/// How long the control plane may take to settle (CPU quiet) after a step.
pub const SETTLE_MAX: Duration = Duration::from_secs(20);
/// How long after the sync went quiet its RSS is read again ("RSS 5 s later"); the
/// report's column names this value.
const SETTLE: Duration = Duration::from_secs(5);

/// Prints one step's numbers, with the machine's 1-minute load average: the two cores
/// may be shared with other work, which the numbers should be read against.
pub fn log_step(label: &str, size: &Size, text: &str) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?");
    println!(
        "[{label} @ {}/{}] {text} (load {load})",
        size.services, size.pods
    );
}

/// Starts the control plane (`weft up` or `weft controller`, by `source`) and waits for
/// it to serve. On the binary's first start, checks that its open-file limit fits
/// `needed` connections; if it does not raise its own limit, restarts it through
/// prlimit and remembers that for later starts.
pub async fn start_control_plane(
    binary: &mut Binary,
    source: Source,
    run_dir: &Path,
    settings: &Settings,
    needed_fds: u64,
) -> (Option<ControlPlane>, Measured<Ready>) {
    let (xds, admin) = match free_ports(2).as_deref() {
        Ok([x, a]) => (*x, *a),
        Ok(_) => return (None, Err("picking ports".to_string())),
        Err(e) => return (None, Err(format!("picking ports: {e}"))),
    };
    let log = match source {
        Source::Files { .. } => run_dir.join("weft.log"),
        Source::ApiServer { .. } => run_dir.join("weft-controller.log"),
    };
    let mut launch = Launch {
        binary: binary.path.clone(),
        source,
        log,
        xds,
        admin,
        fd_limit: binary.fd_limit.unwrap_or(FdLimit::Inherited),
        shell_nofile: settings.shell_nofile,
        memory_cap_bytes: settings.limits.memory_cap_bytes,
    };
    loop {
        let started = Instant::now();
        let mut cp = match ControlPlane::spawn(launch.clone()) {
            Ok(cp) => cp,
            Err(e) => return (None, Err(e)),
        };
        let ready = match cp.wait_ready(started, settings.limits.ready_timeout).await {
            Ok(t) => t,
            Err(e) => return (None, Err(e)),
        };
        let cpu_to_ready_ms = cp.cpu_ms();
        let nofile = cp.nofile_soft();
        if binary.fd_limit.is_none() {
            if nofile.is_some_and(|n| n < needed_fds) && launch.fd_limit == FdLimit::Inherited {
                // The hard limit: raising it (to 1048576) needs CAP_SYS_RESOURCE, which a
                // container's root may lack ("Operation not permitted").
                let limit = settings.shell_nofile.1;
                println!(
                    "  {}: {} kept an open-file limit of {} (needs ~{needed_fds}); restarting it through prlimit --nofile={limit}:{limit}",
                    binary.label,
                    launch.source.command(),
                    nofile.unwrap_or(0)
                );
                let _ = cp.terminate(Duration::from_secs(10)).await;
                launch.fd_limit = FdLimit::Prlimit(limit);
                binary.fd_limit = Some(launch.fd_limit);
                continue;
            }
            binary.fd_limit = Some(launch.fd_limit);
        }
        // Idle: whatever the first translation left behind once the process is quiet.
        cp.wait_quiet(SETTLE_MAX).await;
        let idle_rss = cp.rss_bytes().unwrap_or(0);
        let fd_limit = launch.fd_limit;
        return (
            Some(cp),
            Ok(Ready {
                ready,
                cpu_to_ready_ms,
                idle_rss,
                nofile,
                fd_limit,
            }),
        );
    }
}

/// This bench's own CPU time: it shares the two cores with the control plane.
pub fn own_cpu_ms() -> u64 {
    crate::control_plane::cpu_ms(std::process::id()).unwrap_or(0)
}

fn proxies_for(mesh: &Mesh, pods: &[usize]) -> Vec<Arc<Proxy>> {
    pods.iter()
        .filter_map(|&m| mesh.pods.get(m).map(|p| (m, p)))
        .map(|(m, p)| Arc::new(Proxy::new(p.node_id(), p.ip, m)))
        .collect()
}

/// All steps of one binary at one size.
pub async fn run_size(binary: &mut Binary, size: &Size, settings: &Settings) -> RunReport {
    let mut report = RunReport::new(&binary.label);
    let run_dir = settings.work.join(format!(
        "{}-{}x{}{}",
        binary.label.replace(' ', "-"),
        size.services,
        size.pods,
        if size.scope { "-scoped" } else { "" }
    ));
    let manifests = run_dir.join("manifests");
    let _ = std::fs::remove_dir_all(&run_dir);
    let sample = if size.scope && settings.steps.unscoped {
        settings.unscoped_sample
    } else {
        0
    };
    let mut mesh = Mesh::new(size.services, size.pods, size.scope, sample);
    let proxies = size
        .proxies
        .min(mesh.connect_order.len().saturating_sub(sample));
    if let Err(e) = mesh.write(&manifests) {
        report.ready = Some(Err(format!("writing the mesh: {e}")));
        return report;
    }
    let label = binary.label.clone();
    log_step(
        &label,
        size,
        &format!("mesh written to {}", manifests.display()),
    );

    // 1. Start and time to ready.
    let needed_fds = (proxies + sample) as u64 + 1024;
    let source = Source::Files {
        manifests: manifests.clone(),
        state_dir: run_dir.join("state"),
    };
    let (cp, ready) = start_control_plane(binary, source, &run_dir, settings, needed_fds).await;
    match &ready {
        Ok(r) => log_step(
            &label,
            size,
            &format!(
                "ready in {}, RSS idle {}, open-file limit {} ({})",
                secs(r.ready),
                mib(r.idle_rss),
                r.nofile.map_or("?".into(), |n| n.to_string()),
                r.fd_limit
            ),
        ),
        Err(e) => log_step(&label, size, &format!("FAILED to get ready: {e}")),
    }
    report.ready = Some(ready);
    let Some(mut cp) = cp else {
        return report;
    };
    if !settings.steps.connect || proxies == 0 {
        let _ = cp.terminate(Duration::from_secs(10)).await;
        return report;
    }

    // 2. Connect the simulated proxies.
    let pods: Vec<usize> = mesh.connect_order[..proxies].to_vec();
    let (fleet, synced) = connect_proxies(&mesh, &pods, &mut cp, settings, &label, size).await;
    let synced_ok = synced.is_ok();
    report.synced = Some(synced);
    if !synced_ok {
        fleet.stop().await;
        return report;
    }

    // 3. Changes while everything is connected.
    if settings.steps.changes {
        for kind in [
            ChangeKind::Endpoint,
            ChangeKind::TrafficTarget,
            ChangeKind::NewService,
        ] {
            let own0 = own_cpu_ms();
            let mut files = FileChanges { dir: &manifests };
            let row = run_changes(kind, &mut mesh, &mut files, &fleet, &mut cp, settings).await;
            match &row.outcome {
                Ok(stats) => log_step(
                    &label,
                    size,
                    &format!(
                        "{}: {} runs done, watched {} (weft-scale's own CPU: {} ms)",
                        row.kind,
                        stats.samples.len(),
                        row.watched,
                        own_cpu_ms().saturating_sub(own0)
                    ),
                ),
                Err(e) => log_step(&label, size, &format!("{} FAILED: {e}", row.kind)),
            }
            report.changes.push(row);
            if let Some(why) = cp.failure() {
                log_step(&label, size, &format!("control plane gone: {why}"));
                fleet.stop().await;
                return report;
            }
        }
    }

    // 4. Restart on the same state dir; the proxies reconnect on their own.
    if settings.steps.restart {
        let (new_cp, restarted) = restart(cp, &fleet, settings).await;
        match &restarted {
            Ok(r) => log_step(
                &label,
                size,
                &format!(
                    "restart: exit {}{}, ready {}, all proxies in sync {} after the new start",
                    secs(r.exit),
                    if r.killed { " (SIGKILLed)" } else { "" },
                    secs(r.ready),
                    secs(r.all_in_sync)
                ),
            ),
            Err(e) => log_step(&label, size, &format!("restart FAILED: {e}")),
        }
        report.restart = Some(restarted);
        match new_cp {
            Some(c) => cp = c,
            None => {
                fleet.stop().await;
                return report;
            }
        }
    }

    // 5. The unscoped sample (scoped meshes only).
    if sample > 0 {
        let n = mesh.connect_order.len();
        let sample_pods: Vec<usize> = mesh.connect_order[n - sample..].to_vec();
        let u = unscoped_sample(&mesh, &sample_pods, &mut cp, settings, size.proxies).await;
        match &u {
            Ok(u) => log_step(
                &label,
                size,
                &format!(
                    "unscoped sample of {}: in sync in {}, {:.1} KiB and {:.0} resources per proxy, CP CPU {:.1} ms per proxy, RSS {:+} MiB",
                    u.sample,
                    secs(u.time),
                    u.bytes_per_proxy / 1024.0,
                    u.resources_per_proxy,
                    u.cpu_ms as f64 / u.sample as f64,
                    u.rss_growth / (1 << 20)
                ),
            ),
            Err(e) => log_step(&label, size, &format!("unscoped sample FAILED: {e}")),
        }
        report.unscoped = Some(u);
    }
    let peak = cp.peak_rss();
    log_step(
        &label,
        size,
        &format!("peak RSS of the last control plane process: {}", gib(peak)),
    );
    fleet.stop().await;
    let _ = cp.terminate(Duration::from_secs(10)).await;
    report
}

/// Connects simulated proxies for `pods` and waits until every one is in sync: time,
/// RSS and VmHWM of the control plane once quiet, bytes and resources per proxy.
pub async fn connect_proxies(
    mesh: &Mesh,
    pods: &[usize],
    cp: &mut ControlPlane,
    settings: &Settings,
    label: &str,
    size: &Size,
) -> (Fleet, Measured<Synced>) {
    let cpu0 = cp.cpu_ms().unwrap_or(0);
    let own0 = own_cpu_ms();
    let started = Instant::now();
    let fleet = Fleet::start(proxies_for(mesh, pods), cp.launch.xds);
    let floors = vec![0; fleet.proxies.len()];
    let synced = match fleet
        .wait_in_sync(&floors, settings.limits.sync_timeout, cp.failure_flag())
        .await
    {
        Ok(last) => {
            let time = last.saturating_duration_since(started);
            let cpu1 = cp.wait_quiet(SETTLE_MAX).await.unwrap_or(cpu0);
            let n = fleet.proxies.len().max(1) as f64;
            let rss = cp.rss_bytes().unwrap_or(0);
            tokio::time::sleep(SETTLE).await;
            let s = Synced {
                proxies: fleet.proxies.len(),
                time,
                rss,
                settled_rss: cp.rss_bytes().unwrap_or(0),
                hwm: cp.hwm_bytes().unwrap_or(0),
                bytes_per_proxy: fleet.total_bytes() as f64 / n,
                resources_per_proxy: fleet
                    .proxies
                    .iter()
                    .map(|p| p.resource_count())
                    .sum::<usize>() as f64
                    / n,
                cpu_ms: cpu1.saturating_sub(cpu0),
            };
            log_step(
                label,
                size,
                &format!(
                    "{} proxies in sync in {}; RSS {} ({} {SETTLE:?} later), VmHWM {}, {:.1} KiB and {:.0} resources per proxy, CPU {} ms (weft-scale's own: {} ms)",
                    s.proxies,
                    secs(s.time),
                    mib(s.rss),
                    mib(s.settled_rss),
                    mib(s.hwm),
                    s.bytes_per_proxy / 1024.0,
                    s.resources_per_proxy,
                    s.cpu_ms,
                    own_cpu_ms().saturating_sub(own0)
                ),
            );
            Ok(s)
        }
        Err(e) => {
            let e = cp.failure().map_or(e.clone(), |f| format!("{e}; {f}"));
            log_step(label, size, &format!("FAILED to sync: {e}"));
            Err(e)
        }
    };
    (fleet, synced)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Endpoint,
    TrafficTarget,
    NewService,
    TrafficSplit,
}

impl ChangeKind {
    pub fn label(self) -> &'static str {
        match self {
            ChangeKind::Endpoint => "endpoint (+1 pod)",
            ChangeKind::TrafficTarget => "TrafficTarget (+1 source)",
            ChangeKind::NewService => "new Service",
            ChangeKind::TrafficSplit => "TrafficSplit (weights)",
        }
    }
}

/// What a change targets.
#[derive(Clone, Debug)]
pub enum Target {
    Endpoint {
        service: usize,
    },
    /// The TrafficTarget whose destination is this service's account.
    Access {
        service: usize,
    },
    NewService {
        ns: usize,
    },
    /// The TrafficSplit whose root is this service.
    Split {
        service: usize,
    },
}

/// What one application of a change touches: which pods' proxies must see it and
/// which resource shows it.
#[derive(Clone, Debug)]
pub struct ChangePlan {
    pub target: Target,
    pub affected_pods: Vec<usize>,
    pub watch_type: usize,
    pub watch_name: String,
}

/// Picks the target of repetition `r` among candidates, spread over the candidates.
fn pick<T: Copy>(candidates: &[T], r: usize, repeats: usize) -> Option<T> {
    if candidates.is_empty() {
        return None;
    }
    let step = (candidates.len() / repeats.max(1)).max(1);
    candidates
        .get((r * step + step / 2) % candidates.len())
        .copied()
}

/// Plans repetition `r` of a change against the connected pods: the target, and the
/// affected proxies computed from the egress scope (the whole mesh when unscoped).
pub fn plan_change(
    kind: ChangeKind,
    r: usize,
    repeats: usize,
    mesh: &Mesh,
    connected: &[usize],
) -> Result<ChangePlan, String> {
    let pods = &mesh.pods;
    let sees = |ns: usize| -> Vec<usize> {
        connected
            .iter()
            .copied()
            .filter(|m| pods.get(*m).is_some_and(|p| mesh.sees_namespace(p, ns)))
            .collect()
    };
    match kind {
        ChangeKind::Endpoint | ChangeKind::NewService => {
            // Namespaces some connected proxy sees (all of them when unscoped).
            let namespaces: Vec<usize> = (0..mesh.namespaces())
                .filter(|ns| !sees(*ns).is_empty())
                .collect();
            // Endpoint changes and new services land in different namespaces.
            let offset = usize::from(kind == ChangeKind::NewService);
            let ns = pick(&namespaces, r * 2 + offset, repeats * 2)
                .ok_or("no namespace is seen by a connected proxy")?;
            let affected_pods = sees(ns);
            if kind == ChangeKind::Endpoint {
                let first = ns * crate::mesh::SERVICES_PER_NAMESPACE;
                let service = (first + r % crate::mesh::SERVICES_PER_NAMESPACE)
                    .min(mesh.services.saturating_sub(1));
                let fqdn = service_fqdn(&Mesh::service_name(service), namespace_of(service));
                Ok(ChangePlan {
                    target: Target::Endpoint { service },
                    affected_pods,
                    watch_type: EDS,
                    watch_name: watched::outbound_cluster(&fqdn),
                })
            } else {
                let fqdn = service_fqdn(&mesh.next_service_name(), ns);
                Ok(ChangePlan {
                    target: Target::NewService { ns },
                    affected_pods,
                    watch_type: CDS,
                    watch_name: watched::outbound_cluster(&fqdn),
                })
            }
        }
        ChangeKind::TrafficTarget => {
            let mut services: Vec<usize> = connected
                .iter()
                .filter_map(|m| pods.get(*m).map(|p| p.service))
                .filter(|s| mesh.has_traffic_target(*s))
                .collect();
            services.sort();
            services.dedup();
            let service = pick(&services, r, repeats)
                .ok_or("no connected proxy runs as a TrafficTarget's destination")?;
            let affected_pods = connected
                .iter()
                .copied()
                .filter(|m| pods.get(*m).is_some_and(|p| p.service == service))
                .collect();
            Ok(ChangePlan {
                target: Target::Access { service },
                affected_pods,
                watch_type: RDS,
                watch_name: watched::inbound_routes(),
            })
        }
        ChangeKind::TrafficSplit => {
            // Roots of splits in namespaces some connected proxy sees; its callers are
            // every proxy that sees the namespace (the whole fleet when unscoped).
            let roots: Vec<usize> = (0..mesh.services)
                .filter(|i| mesh.has_traffic_split(*i) && !sees(namespace_of(*i)).is_empty())
                .collect();
            let service = pick(&roots, r, repeats)
                .ok_or("no TrafficSplit in a namespace a connected proxy sees")?;
            let fqdn = service_fqdn(&Mesh::service_name(service), namespace_of(service));
            Ok(ChangePlan {
                target: Target::Split { service },
                affected_pods: sees(namespace_of(service)),
                watch_type: RDS,
                watch_name: watched::outbound_routes(&fqdn),
            })
        }
    }
}

/// How a change reaches the control plane: a manifest file, or an API object.
pub trait ChangeWriter {
    /// Untimed work before the change, while the control plane still settles (a pod
    /// created before the EndpointSlice lists it, as in a cluster).
    fn prepare(&mut self, _target: &Target, _mesh: &mut Mesh) -> Result<(), String> {
        Ok(())
    }

    /// Makes the change; returns the instant it was handed over (where latency starts).
    fn write(&mut self, target: &Target, mesh: &mut Mesh) -> Result<Instant, String>;
}

/// Changes as files in the manifest directory of `weft up`.
#[derive(Debug)]
pub struct FileChanges<'a> {
    pub dir: &'a Path,
}

impl ChangeWriter for FileChanges<'_> {
    fn write(&mut self, target: &Target, mesh: &mut Mesh) -> Result<Instant, String> {
        apply_change(target, mesh, self.dir)
    }
}

/// Writes the change; returns the instant of the rename.
pub fn apply_change(target: &Target, mesh: &mut Mesh, dir: &Path) -> Result<Instant, String> {
    let renamed = match target {
        Target::Endpoint { service } => mesh.add_pod(dir, *service).map(|(_, at)| at),
        Target::Access { service } => mesh.add_traffic_target_source(dir, *service),
        Target::NewService { ns } => mesh.add_service(dir, *ns).map(|(_, at)| at),
        Target::Split { .. } => return Err("TrafficSplit changes are not written as files".into()),
    };
    renamed.map_err(|e| format!("writing the change: {e}"))
}

/// Repeats one kind of change `settings.repeats` times on the simulated proxies.
pub async fn run_changes(
    kind: ChangeKind,
    mesh: &mut Mesh,
    writer: &mut dyn ChangeWriter,
    fleet: &Fleet,
    cp: &mut ControlPlane,
    settings: &Settings,
) -> ChangeRow {
    let by_pod: std::collections::HashMap<usize, Arc<Proxy>> =
        fleet.proxies.iter().map(|p| (p.pod, p.clone())).collect();
    let connected: Vec<usize> = fleet.proxies.iter().map(|p| p.pod).collect();
    let mut stats = ChangeStats::default();
    let mut watched = String::new();
    for r in 0..settings.repeats {
        let plan = match plan_change(kind, r, settings.repeats, mesh, &connected) {
            Ok(p) => p,
            Err(e) => return change_row(kind, watched, Err(e)),
        };
        if let Err(e) = writer.prepare(&plan.target, mesh) {
            return change_row(kind, watched, Err(e));
        }
        // Start from a quiet control plane so the CPU time belongs to this change.
        let cpu0 = cp.wait_quiet(SETTLE_MAX).await.unwrap_or(0);
        // No response in flight either: a late push of the previous change must not
        // satisfy this change's watches.
        fleet.wait_no_responses(SETTLE_MAX).await;
        let own0 = own_cpu_ms();
        let responses0: Vec<u64> = fleet.proxies.iter().map(|p| p.responses()).collect();
        let affected: Vec<Arc<Proxy>> = plan
            .affected_pods
            .iter()
            .filter_map(|m| by_pod.get(m).cloned())
            .collect();
        // Watches are registered before the file is written (each baseline under lock).
        let mut receivers = Vec::with_capacity(affected.len());
        let mut what = Vec::new();
        for p in &affected {
            let watch =
                if kind == ChangeKind::TrafficTarget && !p.has_resource(RDS, &plan.watch_name) {
                    what.push("any RDS/LDS change (no RDS inbound route)".to_string());
                    Watch::AnyChange {
                        types: vec![RDS, LDS],
                    }
                } else {
                    what.push(format!(
                        "{} {}",
                        short_type(plan.watch_type),
                        plan.watch_name
                    ));
                    Watch::Resource {
                        type_index: plan.watch_type,
                        name: plan.watch_name.clone(),
                    }
                };
            receivers.push(p.watch(watch));
        }
        what.sort();
        what.dedup();
        if kind == ChangeKind::TrafficSplit {
            what = vec![format!(
                "{} <root service>.<ns>.svc.cluster.local:{PORT}",
                short_type(plan.watch_type)
            )];
        } else if kind != ChangeKind::TrafficTarget {
            // The name pattern, not this repetition's service.
            what = vec![format!(
                "{} outbound|{PORT}||<service>.<ns>.svc.cluster.local",
                short_type(plan.watch_type)
            )];
        }
        watched = what.join(" + ");
        let renamed = match writer.write(&plan.target, mesh) {
            Ok(t) => t,
            Err(e) => return change_row(kind, watched, Err(e)),
        };
        let all = futures::future::join_all(receivers);
        let acks = match tokio::time::timeout(settings.limits.change_timeout, all).await {
            Ok(acks) => acks,
            Err(_) => {
                let missing = affected.iter().filter(|p| p.has_pending_watch()).count();
                let examples: Vec<&str> = affected
                    .iter()
                    .filter(|p| p.has_pending_watch())
                    .take(3)
                    .map(|p| p.node.as_str())
                    .collect();
                for p in &affected {
                    p.clear_watches();
                }
                let why = format!(
                    "run {}: {missing} of {} affected proxies did not see {:?} within {:?} (e.g. {}){}",
                    r + 1,
                    affected.len(),
                    plan.target,
                    settings.limits.change_timeout,
                    examples.join(", "),
                    cp.failure().map(|f| format!("; {f}")).unwrap_or_default()
                );
                return change_row(kind, watched, Err(why));
            }
        };
        let mut per_proxy = Vec::with_capacity(acks.len());
        for a in acks {
            match a {
                Ok(at) => per_proxy.push(at.saturating_duration_since(renamed)),
                Err(_) => return change_row(kind, watched, Err("a proxy task ended".into())),
            }
        }
        let last_ack = per_proxy.iter().max().copied().unwrap_or_default();
        let proxies_cpu_ms = own_cpu_ms().saturating_sub(own0);
        let cpu1 = cp.wait_quiet(SETTLE_MAX).await.unwrap_or(cpu0);
        let pushed = fleet
            .proxies
            .iter()
            .zip(&responses0)
            .filter(|(p, before)| p.responses() > **before)
            .count();
        stats.samples.push(ChangeSample {
            affected: affected.len(),
            pushed,
            last_ack,
            per_proxy,
            cpu_ms: cpu1.saturating_sub(cpu0),
            proxies_cpu_ms,
        });
    }
    change_row(kind, watched, Ok(stats))
}

fn change_row(kind: ChangeKind, watched: String, outcome: Measured<ChangeStats>) -> ChangeRow {
    ChangeRow {
        kind: kind.label(),
        watched,
        outcome,
    }
}

/// SIGTERM, start again on the same state dir and ports, and wait until every simulated
/// proxy is back in sync on a new stream. Returns the new control plane if it runs.
async fn restart(
    mut cp: ControlPlane,
    fleet: &Fleet,
    settings: &Settings,
) -> (Option<ControlPlane>, Measured<Restarted>) {
    let floors = fleet.generations();
    let (exit, killed) = match cp.terminate(Duration::from_secs(30)).await {
        Ok(x) => x,
        Err(e) => return (None, Err(e)),
    };
    let launch = cp.launch.clone();
    drop(cp);
    let started = Instant::now();
    let mut cp = match ControlPlane::spawn(launch) {
        Ok(cp) => cp,
        Err(e) => return (None, Err(e)),
    };
    let ready = match cp.wait_ready(started, settings.limits.ready_timeout).await {
        Ok(t) => t,
        Err(e) => return (None, Err(e)),
    };
    let flag = cp.failure_flag();
    match fleet
        .wait_in_sync(&floors, settings.limits.sync_timeout, flag)
        .await
    {
        Ok(last) => {
            let r = Restarted {
                exit,
                killed,
                ready,
                all_in_sync: last.saturating_duration_since(started),
            };
            (Some(cp), Ok(r))
        }
        Err(e) => {
            let e = cp.failure().map_or(e.clone(), |f| format!("{e}; {f}"));
            (None, Err(e))
        }
    }
}

/// Connects the unscoped pods (no egress annotation) of a scoped mesh while the main
/// load stays connected, and measures what one unscoped proxy costs.
async fn unscoped_sample(
    mesh: &Mesh,
    pods: &[usize],
    cp: &mut ControlPlane,
    settings: &Settings,
    extrapolate_to: usize,
) -> Measured<UnscopedSample> {
    if let Some(p) = pods
        .iter()
        .filter_map(|m| mesh.pods.get(*m))
        .find(|p| p.scoped)
    {
        return Err(format!("sample pod {} is scoped", p.name));
    }
    let cpu0 = cp.wait_quiet(SETTLE_MAX).await.unwrap_or(0);
    let rss0 = cp.rss_bytes().unwrap_or(0) as i64;
    let started = Instant::now();
    let fleet = Fleet::start(proxies_for(mesh, pods), cp.launch.xds);
    let floors = vec![0; fleet.proxies.len()];
    let result = fleet
        .wait_in_sync(&floors, settings.limits.sync_timeout, cp.failure_flag())
        .await;
    let out = match result {
        Ok(last) => {
            let cpu1 = cp.wait_quiet(SETTLE_MAX).await.unwrap_or(cpu0);
            let n = fleet.proxies.len().max(1) as f64;
            Ok(UnscopedSample {
                sample: fleet.proxies.len(),
                time: last.saturating_duration_since(started),
                bytes_per_proxy: fleet.total_bytes() as f64 / n,
                resources_per_proxy: fleet
                    .proxies
                    .iter()
                    .map(|p| p.resource_count())
                    .sum::<usize>() as f64
                    / n,
                cpu_ms: cpu1.saturating_sub(cpu0),
                rss_growth: cp.rss_bytes().unwrap_or(0) as i64 - rss0,
                extrapolate_to,
            })
        }
        Err(e) => Err(cp.failure().map_or(e.clone(), |f| format!("{e}; {f}"))),
    };
    fleet.stop().await;
    out
}
