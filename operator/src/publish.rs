//! Publishes a mesh model as per-proxy snapshots into the xDS cache.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use weft_xds::SnapshotCache;

use crate::error::WeftError;
use crate::identity::{CertificateAuthority, WorkloadCertificates};
use crate::index::MeshModel;
use crate::translate::{MeshConfig, grants_for, translate_shared, translate_workload};

/// What one publish did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Proxies known to the model.
    pub proxies: usize,
    /// Proxies whose snapshot changed (and so get a push).
    pub changed: usize,
    /// Certificates issued or renewed.
    pub issued: usize,
}

/// The CA and the certificates it issued to workloads.
#[derive(Debug)]
pub struct MeshIdentity {
    ca: CertificateAuthority,
    certs: WorkloadCertificates,
}

impl MeshIdentity {
    /// Identity for a mesh: `ttl`-long certificates from `ca` in the config's trust domain.
    pub fn new(ca: CertificateAuthority, config: &MeshConfig, ttl: Duration) -> Self {
        Self {
            ca,
            certs: WorkloadCertificates::new(&config.trust_domain, ttl),
        }
    }
}

/// Turns models into snapshots; remembers which nodes it published to remove stale ones.
#[derive(Debug)]
pub struct MeshPublisher {
    cache: Arc<SnapshotCache>,
    config: MeshConfig,
    identity: Option<MeshIdentity>,
    nodes: BTreeSet<String>,
}

impl MeshPublisher {
    /// A publisher into `cache`; without identity, proxies get plaintext config.
    pub fn new(
        cache: Arc<SnapshotCache>,
        config: MeshConfig,
        identity: Option<MeshIdentity>,
    ) -> Self {
        Self {
            cache,
            config,
            identity,
            nodes: BTreeSet::new(),
        }
    }

    /// Publishes `model` at time `now` (certificates due by then are renewed).
    /// Shared resources are translated and encoded once and their bytes shared.
    pub fn publish(
        &mut self,
        model: &MeshModel,
        now: SystemTime,
    ) -> Result<PublishStats, WeftError> {
        let mut stats = PublishStats::default();
        if let Some(identity) = &mut self.identity {
            stats.issued = identity.certs.refresh(&identity.ca, model, now)?;
        }
        let config = self.config.effective(model);
        let plaintext = translate_shared(model, &config, false).to_snapshot();
        let with_tls = self
            .identity
            .as_ref()
            .map(|_| translate_shared(model, &config, true).to_snapshot());
        // A sidecar without an identity (unknown pod, or one that failed the identity
        // check) gets the outbound config, in plaintext.
        self.cache.set_fallback(plaintext.clone());
        let mut nodes = BTreeSet::new();
        for (node, workload) in &model.workloads {
            let secrets = self
                .identity
                .as_ref()
                .and_then(|i| i.certs.secrets(node, &i.ca));
            let mut snapshot = match (&secrets, &with_tls) {
                (Some(_), Some(tls)) => tls.clone(),
                _ => plaintext.clone(),
            };
            let grants = grants_for(model, workload);
            snapshot.extend(
                translate_workload(workload, grants, &config, secrets.as_ref()).to_snapshot(),
            );
            if self.cache.set(node, snapshot) {
                stats.changed += 1;
            }
            nodes.insert(node.clone());
        }
        for gone in self.nodes.difference(&nodes) {
            self.cache.remove(gone);
        }
        stats.proxies = nodes.len();
        self.nodes = nodes;
        Ok(stats)
    }

    /// The CA, when the mesh has identity.
    pub fn ca(&self) -> Option<&CertificateAuthority> {
        self.identity.as_ref().map(|i| &i.ca)
    }

    /// When the next certificate is due for renewal.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.identity.as_ref().and_then(|i| i.certs.next_renewal())
    }
}
