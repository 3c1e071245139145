//! Local mode (`weft up DIR`): the whole control plane against a manifest directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::error::WeftError;
use crate::identity::{CaSource, CertificateAuthority, PodAddressBinding};
use crate::runtime::serve::{ControlPlane, ServeOptions, serve};
use crate::sources::{DirWatch, ManifestDir, SourceEvent};
use crate::translate::MeshConfig;

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

/// Reads what changed in the directory into source events; a directory that cannot
/// be read keeps the last state.
fn rescan(manifests: &mut ManifestDir) -> Vec<SourceEvent> {
    match manifests.rescan() {
        Ok(changes) => vec![
            SourceEvent::Changes(changes),
            SourceEvent::Unreadable(manifests.errors()),
        ],
        Err(e) => {
            tracing::error!(error = %e, "cannot read the manifest directory; keeping the last state");
            vec![SourceEvent::Changes(Vec::new())]
        }
    }
}

/// Runs local mode until SIGINT/SIGTERM (Ok) or until any task fails (Err).
pub async fn run(opts: LocalOptions) -> Result<(), WeftError> {
    // Watch before the first read so no change between the two is missed.
    let mut dir_watch = DirWatch::new(&opts.dir)?;
    let ca = CertificateAuthority::load(&opts.ca, opts.extra_trust_bundle.as_deref())?;
    let mut manifests = ManifestDir::new(&opts.dir);
    let (events, source) = mpsc::channel(16);
    // The first full read goes first: nothing is served before it.
    for event in rescan(&mut manifests) {
        let _ = events.send(event).await;
    }
    let directory = async move {
        while dir_watch.changed().await.is_some() {
            for event in rescan(&mut manifests) {
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
        Err(WeftError::TaskEnded {
            task: "manifest-directory",
            reason: "the file watch stopped".to_string(),
        })
    };
    serve(ControlPlane {
        options: ServeOptions {
            xds_addrs: opts.xds_addrs,
            admin_addr: opts.admin_addr,
            mesh: opts.mesh,
            svid_ttl: opts.svid_ttl,
            require_xds_tls: opts.require_xds_tls,
            xds_names: Vec::new(),
        },
        ca,
        binding: Arc::new(PodAddressBinding::default()),
        source,
        observers: Vec::new(),
        tasks: vec![("manifest-directory", Box::pin(directory))],
        metrics: Arc::default(),
        started: format!("weft up: control plane running on {}", opts.dir.display()),
    })
    .await
}
