//! Kubernetes mode (`weft controller`): the control plane fed by the API server, with
//! the writes a cluster expects from it — status, Events, the CA Secret, the trust
//! bundle ConfigMaps — made by the leader only.

pub mod access;
pub mod ca_secret;
pub mod lease;
pub mod status;
pub mod trust_bundle;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::{mpsc, watch};

use crate::error::WeftError;
use crate::identity::{KubeTokenReviewer, NodeBinding, PodAddressBinding, TokenBinding};
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::runtime::serve::{ControlPlane, ServeOptions, serve};
use crate::sources::kube::{WatchAggregator, all_watched, cluster_watches, run_watches};
use crate::translate::MeshConfig;
use lease::{LeaderElector, LeaseSettings};
use status::{StatusObserver, StatusWriter};
use trust_bundle::{MeshedNamespaces, TrustBundlePublisher};

/// How a sidecar's xDS stream proves which pod it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyIdentity {
    /// Its projected ServiceAccount token, checked with a TokenReview.
    Token,
    /// Its peer address must be the pod's IP (for networks where that is reliable).
    Address,
}

/// Settings of `weft controller`.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// A kubeconfig file (else `KUBECONFIG`, the in-cluster config, or ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    pub context: Option<String>,
    /// The controller's namespace: its CA Secret and Lease live there.
    pub namespace: String,
    /// This replica's name (its pod name): the Lease holder and Event reporter.
    pub identity: String,
    /// Where the ADS server listens.
    pub xds_addrs: Vec<SocketAddr>,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Trust domain and mTLS mode.
    pub mesh: MeshConfig,
    /// Lifetime of workload certificates.
    pub svid_ttl: Duration,
    /// Refuse plaintext xDS connections.
    pub require_xds_tls: bool,
    /// DNS names of the xDS Service, for the serving certificate.
    pub xds_names: Vec<String>,
    /// Weft's own CA Secret.
    pub ca_secret: String,
    /// A user-provided `kubernetes.io/tls` CA Secret, used when present.
    pub user_ca_secret: Option<String>,
    /// Name of the leader Lease.
    pub lease_name: String,
    /// How long a leader that stops renewing keeps the Lease.
    pub lease_duration: Duration,
    /// How sidecars prove their pod.
    pub proxy_identity: ProxyIdentity,
}

/// A client from the kubeconfig flag, or inferred (KUBECONFIG, in-cluster, ~/.kube).
async fn client(opts: &ControllerOptions) -> Result<kube::Client, WeftError> {
    let options = KubeConfigOptions {
        context: opts.context.clone(),
        ..KubeConfigOptions::default()
    };
    let usage =
        |e: &dyn std::fmt::Display| WeftError::Usage(format!("Kubernetes configuration: {e}"));
    let config = match (&opts.kubeconfig, &opts.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| WeftError::Usage(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| usage(&e))?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| usage(&e))?,
        (None, None) => kube::Config::infer().await.map_err(|e| usage(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| WeftError::kube("building the client", e))
}

/// Runs Kubernetes mode until SIGINT/SIGTERM (Ok) or until any task fails (Err).
pub async fn run(opts: ControllerOptions) -> Result<(), WeftError> {
    let client = client(&opts).await?;
    let ca = ca_secret::load_ca(
        client.clone(),
        &opts.namespace,
        &opts.ca_secret,
        opts.user_ca_secret.as_deref(),
    )
    .await?;
    let bundle_pem = ca.trust_bundle_pem().to_string();
    let metrics = Arc::new(ControlPlaneMetrics::default());
    let (events, source) = mpsc::channel(16);
    let (namespaces_tx, namespaces) = watch::channel(Arc::default());
    let aggregator = WatchAggregator::new(all_watched(), namespaces_tx, metrics.clone());
    let watches = run_watches(cluster_watches(&client), aggregator, events);
    let settings = LeaseSettings {
        namespace: opts.namespace.clone(),
        name: opts.lease_name.clone(),
        identity: opts.identity.clone(),
        duration: opts.lease_duration,
    };
    let (elector, leadership) =
        LeaderElector::new(client.clone(), settings.clone(), metrics.clone());
    let (status_observer, desired) = StatusObserver::new();
    let (meshed_observer, meshed) = MeshedNamespaces::new();
    let writer = StatusWriter::new(
        client.clone(),
        desired,
        leadership.clone(),
        opts.identity.clone(),
        metrics.clone(),
    );
    let bundle = TrustBundlePublisher::new(
        client.clone(),
        bundle_pem,
        meshed,
        namespaces,
        leadership,
        metrics.clone(),
    );
    let binding: Arc<dyn NodeBinding> = match opts.proxy_identity {
        ProxyIdentity::Address => Arc::new(PodAddressBinding::default()),
        ProxyIdentity::Token => Arc::new(TokenBinding::new(KubeTokenReviewer::new(client.clone()))),
    };
    let outcome = serve(ControlPlane {
        options: ServeOptions {
            xds_addrs: opts.xds_addrs.clone(),
            admin_addr: opts.admin_addr,
            mesh: opts.mesh.clone(),
            svid_ttl: opts.svid_ttl,
            require_xds_tls: opts.require_xds_tls,
            xds_names: opts.xds_names.clone(),
        },
        ca,
        binding,
        source,
        observers: vec![Box::new(status_observer), Box::new(meshed_observer)],
        tasks: vec![
            ("kubernetes-watches", Box::pin(watches)),
            ("leader-election", Box::pin(elector.run())),
            ("status-writer", Box::pin(writer.run())),
            ("trust-bundle", Box::pin(bundle.run())),
        ],
        metrics,
        started: format!(
            "weft controller: control plane running as {} in namespace {}",
            opts.identity, opts.namespace
        ),
    })
    .await;
    // Hand the Lease over at once instead of making the others wait it out.
    let api: kube::Api<Lease> = kube::Api::namespaced(client, &opts.namespace);
    LeaderElector::release(&api, &settings).await;
    outcome
}
