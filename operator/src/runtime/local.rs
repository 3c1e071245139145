//! Local mode (`weft up DIR`): the whole control plane against a manifest directory.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds::{AdsService, SnapshotCache};

use crate::error::WeftError;
use crate::identity::{CaSource, CertificateAuthority, PodAddressBinding};
use crate::index::{Index, ModelDelta, Problem};
use crate::runtime::admin::{
    self, AdminState, ExplainRequest, MeshStatus, ProblemReport, SettingsReport,
};
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::runtime::publish::{MeshIdentity, MeshPublisher, PublishStats};
use crate::runtime::xds_listener::{self, XdsServingCert};
use crate::sources::{DirWatch, ManifestDir};
use crate::translate::{AccessMode, MeshConfig};

/// Settings of `weft up`.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// The manifest directory.
    pub dir: PathBuf,
    /// Where the ADS server listens (one or more addresses).
    pub xds_addrs: Vec<SocketAddr>,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Where the CA comes from.
    pub ca: CaSource,
    /// Extra roots to trust besides the CA's own (root rotation).
    pub extra_trust_bundle: Option<PathBuf>,
    /// Trust domain and mTLS mode.
    pub mesh: MeshConfig,
    /// Lifetime of workload certificates.
    pub svid_ttl: Duration,
    /// Refuse plaintext xDS connections.
    pub require_xds_tls: bool,
}

/// The index and everything derived from it, updated on every manifest change.
struct LocalMesh {
    manifests: ManifestDir,
    index: Index,
    publisher: MeshPublisher,
    binding: Arc<PodAddressBinding>,
    metrics: Arc<ControlPlaneMetrics>,
    status: watch::Sender<MeshStatus>,
    reported: BTreeSet<Problem>,
    /// The mesh settings from the flags (a MeshConfig may override them).
    flags: MeshConfig,
    /// The settings in effect at the last reload, to log changes.
    settings: Option<SettingsReport>,
    /// The xDS port's certificate, renewed here like the workloads'.
    xds_cert: XdsServingCert,
}

impl LocalMesh {
    /// Rescans the directory and applies what changed; a failing directory keeps the
    /// last state.
    fn reload(&mut self) {
        let started = std::time::Instant::now();
        let changes = match self.manifests.rescan() {
            Ok(changes) => changes,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the manifest directory; keeping the last state");
                return;
            }
        };
        let delta = self.index.update(changes).unwrap_or_default();
        self.binding
            .update_nodes(self.index.model(), &delta.workloads);
        if delta.problems {
            self.report_problems();
        }
        let config = self.flags.effective(self.index.model());
        self.report_settings(&config);
        self.publish(&delta);
        tracing::debug!(
            services = delta.services.len(),
            workloads = delta.workloads.len(),
            grants = delta.grants.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "change applied"
        );
    }

    /// When the next certificate (a workload's or the xDS port's) is due.
    fn next_renewal(&self) -> Option<SystemTime> {
        let workloads = self.publisher.next_renewal();
        if self.publisher.ca().is_none() {
            return workloads;
        }
        let xds = self.xds_cert.renew_at();
        Some(workloads.map_or(xds, |w| w.min(xds)))
    }

    /// Renews what is due: the xDS serving certificate, then workload certificates.
    /// A failed renewal is retried at the next wake-up.
    fn renew(&mut self) {
        let now = SystemTime::now();
        if self.xds_cert.renew_at() <= now
            && let Some(ca) = self.publisher.ca()
        {
            match self.xds_cert.renew(ca, now) {
                Ok(()) => tracing::info!(
                    serial = self.xds_cert.serial(),
                    "xDS serving certificate renewed"
                ),
                Err(e) => tracing::error!(
                    error = %e,
                    "renewing the xDS serving certificate failed; the current one stays"
                ),
            }
        }
        match self.publisher.renew(self.index.model(), now) {
            Ok(stats) => self.record(stats),
            Err(e) => {
                tracing::error!(error = %e, "renewing workload certificates failed; retrying at the next wake-up")
            }
        }
    }

    /// A proxy connected or left.
    fn on_demand(&mut self, demand: &weft_xds::NodeDemand) {
        match self
            .publisher
            .on_demand(self.index.model(), demand, SystemTime::now())
        {
            Ok(stats) => {
                tracing::debug!(node = %demand.node, connected = demand.connected, "proxy demand");
                self.record(stats);
            }
            Err(e) => {
                tracing::error!(node = %demand.node, error = %e, "building the proxy's config failed; it waits")
            }
        }
    }

    /// Logs the mesh-wide modes when they change (a MeshConfig added, edited or removed).
    fn report_settings(&mut self, config: &MeshConfig) {
        let model = self.index.model();
        let settings = SettingsReport {
            access: config.access.as_str().to_string(),
            mtls: config.mtls.as_str().to_string(),
            source: model
                .settings
                .as_ref()
                .map_or_else(|| "flags".to_string(), |s| s.source.to_string()),
        };
        if self.settings.as_ref() != Some(&settings) {
            tracing::info!(
                access = %settings.access,
                mtls = %settings.mtls,
                from = %settings.source,
                "mesh settings in effect"
            );
        }
        let grants: usize = model.grants.values().map(Vec::len).sum();
        if config.access == AccessMode::DenyByDefault && grants == 0 && !model.workloads.is_empty()
        {
            let first = self.settings.is_none();
            if first || self.status.borrow().traffic_targets > 0 {
                tracing::warn!(
                    "access is deny-by-default and no TrafficTarget grants anything: every call between meshed workloads gets 403 (TCP: closed). Add TrafficTargets, or allow all with `--access permissive` or a MeshConfig with `access: Permissive`"
                );
            }
        }
        self.status.send_modify(|status| {
            status.settings = settings.clone();
            status.traffic_targets = grants;
        });
        self.settings = Some(settings);
    }

    fn report_problems(&mut self) {
        let current: BTreeSet<Problem> = self.index.model().problems.iter().cloned().collect();
        for p in current.difference(&self.reported) {
            if p.rejected {
                tracing::warn!(object = %p.object, reason = %p.reason, "invalid object rejected; everything else keeps working");
            } else {
                tracing::warn!(object = %p.object, reason = %p.reason, "object applied with a warning");
            }
        }
        for p in self.reported.difference(&current) {
            tracing::info!(object = %p.object, "problem resolved: {}", p.reason);
        }
        self.reported = current;
    }

    /// Publishes what `delta` changed.
    fn publish(&mut self, delta: &ModelDelta) {
        let stats = match self
            .publisher
            .apply(self.index.model(), delta, SystemTime::now())
        {
            Ok(stats) => stats,
            Err(e) => {
                tracing::error!(error = %e, "publishing failed; proxies keep their last config");
                return;
            }
        };
        if stats.changed == 0 && stats.services == 0 {
            tracing::debug!(objects = self.index.len(), "no proxy config changed");
        } else {
            tracing::info!(
                objects = self.index.len(),
                services = stats.services,
                proxies = stats.proxies,
                changed = stats.changed,
                certificates_issued = stats.issued,
                "mesh model published"
            );
        }
        self.record(stats);
    }

    /// Metrics and `weft status` after a publish.
    fn record(&mut self, stats: PublishStats) {
        self.metrics.certificates_issued.inc_by(stats.issued as u64);
        let model = self.index.model();
        let invalid = i64::try_from(model.problems.len()).unwrap_or(i64::MAX);
        self.metrics.invalid_objects.set(invalid);
        let manifest_errors = self.manifests.errors();
        let unreadable = i64::try_from(manifest_errors.len()).unwrap_or(i64::MAX);
        self.metrics.manifest_errors.set(unreadable);
        let objects = self.index.len();
        self.status.send_modify(|status| {
            status.objects = objects;
            status.proxies = stats.proxies;
            status.problems = model.problems.iter().map(ProblemReport::from).collect();
            status.manifest_errors = manifest_errors;
        });
    }
}

/// Sleeps until `at` (monotonic); forever when there is nothing to wait for.
async fn sleep_until_instant(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at` (wall clock); forever when there is nothing to wait for.
async fn sleep_until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
        }
        None => std::future::pending().await,
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, WeftError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| WeftError::Bind { addr, source })
}

type TaskResult = (&'static str, Result<(), WeftError>);

fn supervised(
    tasks: &mut JoinSet<TaskResult>,
    name: &'static str,
    task: impl Future<Output = Result<(), WeftError>> + Send + 'static,
) {
    tasks.spawn(async move { (name, task.await) });
}

/// Runs local mode until SIGINT/SIGTERM (Ok) or until any task fails (Err).
pub async fn run(opts: LocalOptions) -> Result<(), WeftError> {
    // Watch before the first read so no change between the two is missed.
    let mut dir_watch = DirWatch::new(&opts.dir)?;
    let cache = SnapshotCache::new();
    let (status_tx, status_rx) = watch::channel(MeshStatus::default());
    let (explain_tx, mut explain_rx) = mpsc::channel::<ExplainRequest>(16);
    let mut demands = cache.demands().ok_or_else(|| WeftError::TaskEnded {
        task: "xds-demands",
        reason: "the cache's demand stream was already taken".to_string(),
    })?;
    let ca = CertificateAuthority::load(&opts.ca, opts.extra_trust_bundle.as_deref())?;
    let mut xds_hosts = vec!["localhost".to_string(), "weft-xds".to_string()];
    for addr in opts.xds_addrs.iter().filter(|a| !a.ip().is_unspecified()) {
        xds_hosts.push(addr.ip().to_string());
    }
    let xds_cert = XdsServingCert::issue(
        &ca,
        &opts.mesh.trust_domain,
        &xds_hosts,
        xds_listener::SERVING_CERT_TTL,
        SystemTime::now(),
    )?;
    let acceptor = xds_cert.acceptor()?;
    tracing::info!(trust_domain = %opts.mesh.trust_domain, "workload identity enabled");
    let identity = MeshIdentity::new(ca, &opts.mesh, opts.svid_ttl);
    let mut mesh = LocalMesh {
        manifests: ManifestDir::new(&opts.dir),
        index: Index::new(),
        publisher: MeshPublisher::new(cache.clone(), opts.mesh.clone(), Some(identity)),
        binding: Arc::new(PodAddressBinding::default()),
        metrics: Arc::new(ControlPlaneMetrics::default()),
        status: status_tx,
        reported: BTreeSet::new(),
        flags: opts.mesh.clone(),
        settings: None,
        xds_cert,
    };
    // The first full read completes before any proxy is served: never push an empty mesh.
    mesh.reload();

    let (ads, streams) = AdsService::new(cache);
    let ads = ads
        .with_policy(mesh.binding.clone())
        .with_on_demand(mesh.publisher.resolver());
    let admin_state = AdminState {
        status: status_rx,
        registry: ads.registry(),
        metrics: mesh.metrics.clone(),
        explain: explain_tx,
    };
    let mut xds_listeners = Vec::new();
    for addr in &opts.xds_addrs {
        xds_listeners.push(bind(*addr).await?);
    }
    let admin_listener = bind(opts.admin_addr).await?;
    tracing::info!(
        dir = %opts.dir.display(),
        xds = ?opts.xds_addrs,
        admin = %opts.admin_addr,
        "weft up: control plane running"
    );

    let mut tasks = JoinSet::new();
    let (connections_tx, connections) = mpsc::channel(64);
    // Every xDS address feeds the one server.
    for listener in xds_listeners {
        supervised(
            &mut tasks,
            "xds-accept",
            xds_listener::accept_loop(
                listener,
                acceptor.clone(),
                opts.require_xds_tls,
                connections_tx.clone(),
            ),
        );
    }
    drop(connections_tx);
    supervised(&mut tasks, "xds-server", async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(ads)
            .serve_with_incoming(ReceiverStream::new(connections))
            .await?;
        Err(WeftError::TaskEnded {
            task: "xds-server",
            reason: "server stopped".to_string(),
        })
    });
    supervised(&mut tasks, "xds-streams", async move {
        streams.run().await?;
        Err(WeftError::TaskEnded {
            task: "xds-streams",
            reason: "stream supervisor stopped".to_string(),
        })
    });
    supervised(
        &mut tasks,
        "admin",
        admin::serve(admin_listener, admin_state),
    );
    supervised(&mut tasks, "mesh-updates", async move {
        let mut sweep_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                changed = dir_watch.changed() => match changed {
                    Some(()) => mesh.reload(),
                    None => break,
                },
                demand = demands.recv() => match demand {
                    Some(demand) => {
                        mesh.on_demand(&demand);
                        if !demand.connected && sweep_at.is_none() {
                            sweep_at = Some(std::time::Instant::now() + crate::runtime::publish::DEPARTED_GRACE);
                        }
                    }
                    None => break,
                },
                Some(request) = explain_rx.recv() => {
                    let model = mesh.index.model();
                    let config = mesh.flags.effective(model);
                    request.answer(model, &config);
                }
                () = sleep_until(mesh.next_renewal()) => mesh.renew(),
                () = sleep_until_instant(sweep_at) => {
                    sweep_at = mesh.publisher.sweep(std::time::Instant::now());
                }
            }
        }
        Err(WeftError::TaskEnded {
            task: "mesh-updates",
            reason: "file watch or proxy demands stopped".to_string(),
        })
    });

    tokio::select! {
        ended = tasks.join_next() => {
            let err = match ended {
                Some(Ok((name, Ok(())))) => WeftError::TaskEnded { task: name, reason: "returned".to_string() },
                Some(Ok((_, Err(e)))) => e,
                Some(Err(e)) => WeftError::TaskEnded { task: "unknown", reason: e.to_string() },
                None => WeftError::TaskEnded { task: "all", reason: "no task left".to_string() },
            };
            tracing::error!(error = %err, "a control plane task failed; exiting");
            Err(err)
        }
        signal = shutdown_signal() => {
            signal?;
            tracing::info!("shutting down");
            Ok(())
        }
    }
}

async fn shutdown_signal() -> Result<(), WeftError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| WeftError::io("SIGTERM handler", e))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|e| WeftError::io("SIGINT handler", e)),
        _ = term.recv() => Ok(()),
    }
}
