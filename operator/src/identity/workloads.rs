//! The certificates of connected workloads: issued when a proxy connects, renewed at
//! half-life (spread by a jitter, so a batch issued together is not renewed together).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::{CertificateAuthority, Svid, renewal_time, spiffe_id};
use crate::error::WeftError;
use crate::index::Workload;

/// What one proxy receives over SDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadSecrets {
    /// Its certificate and key.
    pub svid: Svid,
    /// The roots it trusts.
    pub trust_bundle_pem: String,
}

#[derive(Debug)]
struct Issued {
    svid: Svid,
    renew_at: SystemTime,
}

/// Certificates of the mesh's workloads, keyed by node id.
#[derive(Debug)]
pub struct WorkloadCertificates {
    trust_domain: String,
    ttl: Duration,
    issued: BTreeMap<String, Issued>,
}

/// Jitter in 0.0..1.0 derived from the serial, so renewals of a batch spread out.
fn jitter(serial: &str) -> f64 {
    let h = weft_xds::resource::fnv1a(serial.as_bytes());
    (h % 10_000) as f64 / 10_000.0
}

impl WorkloadCertificates {
    /// An empty store issuing `ttl`-long certificates in `trust_domain`.
    pub fn new(trust_domain: &str, ttl: Duration) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            ttl,
            issued: BTreeMap::new(),
        }
    }

    /// Makes sure `node` (running `workload`) holds a current certificate: issues one
    /// if it has none, if its service account changed, or if renewal is due at `now`.
    /// Returns whether a certificate was issued.
    pub fn ensure(
        &mut self,
        ca: &CertificateAuthority,
        node: &str,
        workload: &Workload,
        now: SystemTime,
    ) -> Result<bool, WeftError> {
        let id = spiffe_id(
            &self.trust_domain,
            &workload.namespace,
            &workload.service_account,
        );
        let due = match self.issued.get(node) {
            None => true,
            Some(i) => i.svid.spiffe_id != id || i.renew_at <= now,
        };
        if !due {
            return Ok(false);
        }
        let svid = ca.issue(&id, self.ttl, now)?;
        let renew_at = renewal_time(svid.not_before, svid.not_after, jitter(&svid.serial));
        tracing::debug!(node = %node, spiffe_id = %id, serial = %svid.serial, "issued workload certificate");
        self.issued
            .insert(node.to_string(), Issued { svid, renew_at });
        Ok(true)
    }

    /// Forgets a node's certificate (its proxy left, or its pod is gone).
    pub fn forget(&mut self, node: &str) {
        self.issued.remove(node);
    }

    /// Nodes whose renewal is due at `now`.
    pub fn due(&self, now: SystemTime) -> Vec<String> {
        self.issued
            .iter()
            .filter(|(_, i)| i.renew_at <= now)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Number of certificates held.
    pub fn len(&self) -> usize {
        self.issued.len()
    }

    /// Whether no certificate is held.
    pub fn is_empty(&self) -> bool {
        self.issued.is_empty()
    }

    /// The secrets of one node, if it has a certificate.
    pub fn secrets(&self, node: &str, ca: &CertificateAuthority) -> Option<WorkloadSecrets> {
        self.issued.get(node).map(|i| WorkloadSecrets {
            svid: i.svid.clone(),
            trust_bundle_pem: ca.trust_bundle_pem().to_string(),
        })
    }

    /// The earliest expiry of a certificate held.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.issued.values().map(|i| i.svid.not_after).min()
    }

    /// The earliest renewal due.
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.issued.values().map(|i| i.renew_at).min()
    }
}
