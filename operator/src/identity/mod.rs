//! Workload identity: Weft's CA, SPIFFE X.509 SVIDs, and when to renew them.

mod binding;
mod ca;
mod token;
mod workloads;

use std::time::{Duration, SystemTime};

pub use binding::{NodeBinding, PodAddressBinding};
pub use ca::{CaSource, CertificateAuthority, Svid, certificate_not_after};
pub use token::{
    KubeTokenReviewer, POD_NAME_EXTRA, POD_UID_EXTRA, ReviewedToken, TOKEN_AUDIENCE, TokenBinding,
    TokenReviewer, TokenVerdict,
};
pub use workloads::{WorkloadCertificates, WorkloadSecrets};

/// Default trust domain of SPIFFE IDs.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default lifetime of a workload certificate.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// When to renew a certificate valid from `not_before` to `not_after`: at half of its
/// lifetime, moved by up to ±5% of the lifetime by `jitter` (0.0..1.0) so that certificates
/// issued together are not all renewed in the same instant.
pub fn renewal_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let fraction = 0.45 + 0.10 * jitter.clamp(0.0, 1.0);
    not_before + lifetime.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_half_life_within_five_percent() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = start + Duration::from_secs(1000);
        let earliest = renewal_time(start, end, 0.0);
        let latest = renewal_time(start, end, 1.0);
        assert_eq!(earliest, start + Duration::from_secs(450));
        assert_eq!(latest, start + Duration::from_secs(550));
        let middle = renewal_time(start, end, 0.5);
        assert_eq!(middle, start + Duration::from_secs(500));
        assert_eq!(renewal_time(start, end, 7.0), latest, "jitter is clamped");
        assert_eq!(
            renewal_time(end, start, 0.5),
            end,
            "an inverted window renews at once"
        );
    }

    #[test]
    fn spiffe_ids_name_namespace_and_service_account() {
        assert_eq!(
            spiffe_id("cluster.local", "shop", "web"),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
    }
}
