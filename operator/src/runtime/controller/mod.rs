//! Kubernetes mode (`weft controller`): the control plane fed by the API server, with
//! the writes a cluster expects from it — status, Events, the CA Secret, the trust
//! bundle ConfigMaps, the webhook's serving certificate and caBundle — made by the
//! leader only.

pub mod access;
pub mod ca_secret;
pub mod configmaps;
pub mod lease;
pub mod status;
pub mod webhook_cert;

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
use configmaps::{ConfigMapPublisher, MeshedNamespaces, PublishedConfigMap};
use lease::{LeaderElector, LeaseSettings};
use status::{StatusObserver, StatusWriter};

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
    /// Where injected sidecars reach the xDS server (its Service), `HOST:PORT`.
    pub sidecar_xds: String,
    /// The webhook's serving certificate and caBundle, kept by the leader; `None` when
    /// cert-manager does it (`--no-webhook-certificate`).
    pub webhook_certificate: Option<webhook_cert::WebhookCertSettings>,
}

/// Where the injected proxy mounts the trust bundle ConfigMap (webhook/src/inject.rs).
const SIDECAR_CA_DIR: &str = "/etc/weft/ca";
/// The projected ServiceAccount token the injected proxy presents.
const SIDECAR_TOKEN_PATH: &str = "/var/run/secrets/weft/token";
/// The injected proxy's health port, probed by the kubelet.
const SIDECAR_HEALTH_PORT: u16 = 15021;

/// What every meshed namespace gets: the trust bundle, and a bootstrap that reaches
/// the xDS Service over verified TLS with the pod's token (the proxy's command line
/// sets its node id, so one bootstrap serves every pod).
fn sidecar_configmaps(
    opts: &ControllerOptions,
    bundle_pem: String,
) -> Result<Vec<PublishedConfigMap>, WeftError> {
    use crate::sidecar::bootstrap::{BootstrapOptions, XdsTls, render_bootstrap};
    let mut boot = BootstrapOptions::parse("weft/sidecar", &opts.sidecar_xds, 15000)?;
    boot.xds_tls = Some(XdsTls {
        ca_file: PathBuf::from(SIDECAR_CA_DIR).join(configmaps::TRUST_BUNDLE_KEY),
        control_plane_id: crate::runtime::xds_listener::control_plane_id(&opts.mesh.trust_domain),
    });
    boot.health_port = Some(SIDECAR_HEALTH_PORT);
    boot.metrics_port = Some(weft_crds::annotations::PROXY_METRICS_PORT);
    if opts.proxy_identity == ProxyIdentity::Token {
        boot.token_file = Some(PathBuf::from(SIDECAR_TOKEN_PATH));
    }
    let bootstrap = render_bootstrap(&boot)?;
    Ok(vec![
        PublishedConfigMap {
            name: configmaps::TRUST_BUNDLE_CONFIGMAP,
            data: [(configmaps::TRUST_BUNDLE_KEY.to_string(), bundle_pem)].into(),
        },
        PublishedConfigMap {
            name: configmaps::BOOTSTRAP_CONFIGMAP,
            data: [(configmaps::BOOTSTRAP_KEY.to_string(), bootstrap)].into(),
        },
    ])
}

/// A client from the kubeconfig flag, or inferred (KUBECONFIG, in-cluster, ~/.kube).
async fn client(opts: &ControllerOptions) -> Result<kube::Client, WeftError> {
    kube_client(opts.kubeconfig.as_deref(), opts.context.as_deref()).await
}

/// A client from `kubeconfig` (and `context`), or inferred (KUBECONFIG, in-cluster,
/// ~/.kube).
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Client, WeftError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let usage =
        |e: &dyn std::fmt::Display| WeftError::Usage(format!("Kubernetes configuration: {e}"));
    let config = match (kubeconfig, context) {
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
    let ca_material = ca_secret::load_ca_material(
        client.clone(),
        &opts.namespace,
        &opts.ca_secret,
        opts.user_ca_secret.as_deref(),
    )
    .await?;
    let ca = ca_material.authority()?;
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
    let webhook_certificate = match opts.webhook_certificate.clone() {
        Some(settings) => Some(webhook_cert::WebhookCertificate::new(
            client.clone(),
            ca_material.authority()?,
            &opts.namespace,
            &opts.mesh.trust_domain,
            settings,
            leadership.clone(),
            metrics.clone(),
        )),
        None => {
            tracing::info!(
                "webhook serving certificate: left to cert-manager (--no-webhook-certificate)"
            );
            None
        }
    };
    let webhook_certificate = async move {
        match webhook_certificate {
            Some(task) => task.run().await,
            None => std::future::pending().await,
        }
    };
    let bundle = ConfigMapPublisher::new(
        client.clone(),
        sidecar_configmaps(&opts, bundle_pem)?,
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
            ("webhook-certificate", Box::pin(webhook_certificate)),
            ("sidecar-configmaps", Box::pin(bundle.run())),
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
