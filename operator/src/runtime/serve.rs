//! The control plane around one source: the mesh task, the xDS and admin servers, and
//! the supervision and shutdown every mode shares (`weft up`, `weft controller`).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds::{AdsService, SnapshotCache};

use crate::error::WeftError;
use crate::identity::{CertificateAuthority, NodeBinding};
use crate::index::Index;
use crate::runtime::admin::{self, AdminState, MeshStatus, ModelQuery};
use crate::runtime::mesh::{MeshRuntime, ModelObserver};
use crate::runtime::metrics::{ControlPlaneMetrics, unix_seconds};
use crate::runtime::publish::{DEPARTED_GRACE, MeshIdentity, MeshPublisher};
use crate::runtime::xds_listener::{self, XdsServingCert};
use crate::sources::SourceEvent;
use crate::translate::MeshConfig;

/// How long a shutdown may take before the process exits anyway.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A task the control plane supervises: its failure ends the process.
pub type SupervisedTask = Pin<Box<dyn Future<Output = Result<(), WeftError>> + Send>>;

/// Where and how the control plane serves, whatever its source.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where the ADS server listens (one or more addresses).
    pub xds_addrs: Vec<SocketAddr>,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Trust domain and mTLS mode (a MeshConfig may override the modes).
    pub mesh: MeshConfig,
    /// Lifetime of workload certificates.
    pub svid_ttl: Duration,
    /// Refuse plaintext xDS connections.
    pub require_xds_tls: bool,
    /// DNS names the xDS serving certificate covers besides `localhost`, `weft-xds`
    /// and the listen addresses.
    pub xds_names: Vec<String>,
}

/// One control plane: its options, identity, binding policy and source.
pub struct ControlPlane {
    /// Where and how to serve.
    pub options: ServeOptions,
    /// Issues workload and xDS serving certificates.
    pub ca: CertificateAuthority,
    /// Which stream may have which node's config.
    pub binding: Arc<dyn NodeBinding>,
    /// Object changes; the first event is the source's first full read.
    pub source: mpsc::Receiver<SourceEvent>,
    /// Told of every applied change.
    pub observers: Vec<Box<dyn ModelObserver>>,
    /// Tasks of the mode (watchers, leader election, writers), supervised with the rest.
    pub tasks: Vec<(&'static str, SupervisedTask)>,
    /// Shared with the mode's tasks, which add their own counters.
    pub metrics: Arc<ControlPlaneMetrics>,
    /// Log line once everything listens.
    pub started: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("options", &self.options)
            .field("observers", &self.observers)
            .field(
                "tasks",
                &self.tasks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, WeftError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| WeftError::Bind { addr, source })
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

type TaskResult = (&'static str, Result<(), WeftError>);

fn supervised(
    tasks: &mut JoinSet<TaskResult>,
    name: &'static str,
    task: impl Future<Output = Result<(), WeftError>> + Send + 'static,
) {
    tasks.spawn(async move { (name, task.await) });
}

/// Runs the control plane until SIGINT/SIGTERM (Ok, after a graceful shutdown) or
/// until any task fails (Err).
pub async fn serve(plane: ControlPlane) -> Result<(), WeftError> {
    let ControlPlane {
        options: opts,
        ca,
        binding,
        mut source,
        observers,
        tasks: mode_tasks,
        metrics,
        started,
    } = plane;
    let cache = SnapshotCache::new();
    let (status_tx, status_rx) = watch::channel(MeshStatus::default());
    let (explain_tx, mut explain_rx) = mpsc::channel::<ModelQuery>(16);
    let mut demands = cache.demands().ok_or_else(|| WeftError::TaskEnded {
        task: "xds-demands",
        reason: "the cache's demand stream was already taken".to_string(),
    })?;
    let mut xds_hosts = vec!["localhost".to_string(), "weft-xds".to_string()];
    xds_hosts.extend(opts.xds_names.iter().cloned());
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
    metrics.ca_expiry.set(unix_seconds(ca.not_after()));
    let identity = MeshIdentity::new(ca, &opts.mesh, opts.svid_ttl);
    let publisher = MeshPublisher::new(cache.clone(), opts.mesh.clone(), Some(identity));
    let resolver = publisher.resolver();
    let mut mesh = MeshRuntime::new(
        Index::new(),
        publisher,
        binding.clone(),
        metrics.clone(),
        status_tx,
        opts.mesh.clone(),
        xds_cert,
        observers,
    );

    let (ads, streams) = AdsService::new(cache.clone());
    let ads = ads.with_policy(binding.clone()).with_on_demand(resolver);
    let draining = Arc::new(AtomicBool::new(false));
    let admin_state = AdminState {
        status: status_rx,
        registry: ads.registry(),
        metrics: metrics.clone(),
        explain: explain_tx,
        draining: draining.clone(),
        cache,
    };
    let mut xds_listeners = Vec::new();
    for addr in &opts.xds_addrs {
        xds_listeners.push(bind(*addr).await?);
    }
    let admin_listener = bind(opts.admin_addr).await?;
    tracing::info!(xds = ?opts.xds_addrs, admin = %opts.admin_addr, "{started}");

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
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(ads.clone())
            .serve_with_incoming_shutdown(ReceiverStream::new(connections), async {
                let _ = server_stopped.await;
            }),
    );
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
    for (name, task) in mode_tasks {
        supervised(&mut tasks, name, task);
    }
    supervised(&mut tasks, "mesh-updates", async move {
        let mut sweep_at: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                event = source.recv() => match event {
                    Some(event) => mesh.apply(event),
                    None => break,
                },
                demand = demands.recv() => match demand {
                    Some(demand) => {
                        mesh.on_demand(&demand);
                        if !demand.connected && sweep_at.is_none() {
                            sweep_at = Some(std::time::Instant::now() + DEPARTED_GRACE);
                        }
                    }
                    None => break,
                },
                Some(request) = explain_rx.recv() => mesh.explain(request),
                () = sleep_until(mesh.next_renewal()) => mesh.renew(),
                () = sleep_until_instant(sweep_at) => {
                    sweep_at = mesh.sweep(std::time::Instant::now());
                }
            }
        }
        Err(WeftError::TaskEnded {
            task: "mesh-updates",
            reason: "the source or the proxy demands stopped".to_string(),
        })
    });

    let outcome = tokio::select! {
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
                server_ended = &mut server => {
            let reason = match server_ended {
                Ok(Ok(())) => "server stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            let err = WeftError::TaskEnded { task: "xds-server", reason };
            tracing::error!(error = %err, "a control plane task failed; exiting");
            Err(err)
        }
        signal = shutdown_signal() => signal,
    };
    outcome?;
    // Not ready any more; every proxy is told to reconnect (to another replica, or to
    // this one once it is back), then the server stops taking connections.
    tracing::info!("shutting down: closing xDS streams so that proxies reconnect elsewhere");
    draining.store(true, Ordering::Relaxed);
    ads.close_streams();
    let _ = stop_server.send(());
    // The server sends GOAWAY and waits for the streams it just ended.
    if tokio::time::timeout(SHUTDOWN_DEADLINE, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("xDS connections still open at the shutdown deadline; closing them");
        server.abort();
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() -> Result<(), WeftError> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| WeftError::io("SIGTERM handler", e))?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map_err(|e| WeftError::io("SIGINT handler", e)),
        _ = term.recv() => Ok(()),
    }
}
