//! Prometheus metrics of the control plane, served on the admin endpoint's `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::SystemTime;

use weft_xds::SyncRegistry;

/// The metrics `weft up` exports.
#[derive(Debug)]
pub struct ControlPlaneMetrics {
    registry: Registry,
    /// Workload certificates issued or renewed.
    pub certificates_issued: Counter,
    /// Objects rejected or applied with a warning.
    pub invalid_objects: Gauge,
    /// Manifest files that do not parse.
    pub manifest_errors: Gauge,
    identity_check_failures: Counter,
    nacks: Counter,
    connected_proxies: Gauge,
    /// Model changes published to proxies.
    pub pushes: Counter,
    /// Seconds from a source event to its config being in the cache (translate and publish).
    pub push_seconds: Histogram,
    /// Watch failures and re-lists, by watched kind (Kubernetes mode).
    watch_restarts: Family<Vec<(String, String)>, Counter>,
    /// Status writes, Events, Secrets or ConfigMaps that failed (Kubernetes mode).
    pub reconcile_errors: Counter,
    /// Status subresources written (Kubernetes mode).
    pub status_writes: Counter,
    /// 1 while this replica holds the leader Lease (Kubernetes mode).
    pub leader: Gauge,
    /// Unix time the CA certificate expires.
    pub ca_expiry: Gauge,
    /// Unix time the first workload certificate held expires.
    pub workload_certificate_expiry: Gauge,
    proxy_config_age: Family<Vec<(String, String)>, Gauge>,
    proxy_config_unacked: Family<Vec<(String, String)>, Gauge>,
}

impl Default for ControlPlaneMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let m = Self {
            certificates_issued: Counter::default(),
            invalid_objects: Gauge::default(),
            manifest_errors: Gauge::default(),
            identity_check_failures: Counter::default(),
            nacks: Counter::default(),
            connected_proxies: Gauge::default(),
            pushes: Counter::default(),
            push_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watch_restarts: Family::default(),
            reconcile_errors: Counter::default(),
            status_writes: Counter::default(),
            leader: Gauge::default(),
            ca_expiry: Gauge::default(),
            workload_certificate_expiry: Gauge::default(),
            proxy_config_age: Family::default(),
            proxy_config_unacked: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "Unix time the CA certificate expires (alert well before: every workload certificate ends before it)",
            m.ca_expiry.clone(),
        );
        registry.register(
            "workload_certificate_earliest_expiry_timestamp_seconds",
            "Unix time the first workload certificate held expires (renewals keep it about one TTL ahead)",
            m.workload_certificate_expiry.clone(),
        );
        registry.register(
            "proxy_config_age_seconds",
            "Per connected proxy (node): seconds since it last acknowledged a new config",
            m.proxy_config_age.clone(),
        );
        registry.register(
            "proxy_config_unacked_seconds",
            "Per connected proxy (node): seconds its oldest unacknowledged config has waited (0 in sync)",
            m.proxy_config_unacked.clone(),
        );
        registry.register(
            "pushes",
            "Model changes published to proxies",
            m.pushes.clone(),
        );
        registry.register(
            "push_seconds",
            "Time from a source event to its config being served (translate and publish)",
            m.push_seconds.clone(),
        );
        registry.register(
            "watch_restarts",
            "Kubernetes watch failures and re-lists, by kind",
            m.watch_restarts.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Writes to the API server (status, Events, Secrets, ConfigMaps) that failed",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "status_writes",
            "Status subresources written",
            m.status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            m.leader.clone(),
        );
        registry.register(
            "certificates_issued",
            "Workload certificates issued or renewed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects rejected or applied with a warning",
            m.invalid_objects.clone(),
        );
        registry.register(
            "manifest_errors",
            "Manifest files that do not parse",
            m.manifest_errors.clone(),
        );
        registry.register(
            "identity_check_failures",
            "ADS streams refused their pod's config because the peer address is not the pod's",
            m.identity_check_failures.clone(),
        );
        registry.register(
            "xds_nacks",
            "xDS responses rejected by proxies",
            m.nacks.clone(),
        );
        registry.register(
            "xds_connected_proxies",
            "ADS streams open now",
            m.connected_proxies.clone(),
        );
        Self { registry, ..m }
    }
}

impl ControlPlaneMetrics {
    /// Counts a failed or re-listed watch of `kind`.
    pub fn watch_restarted(&self, kind: &str) {
        self.watch_restarts
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc();
    }

    /// Text exposition, with the xDS layer's counters brought up to date first.
    pub fn render(&self, xds: &SyncRegistry) -> String {
        catch_up(&self.identity_check_failures, xds.denials());
        catch_up(&self.nacks, xds.nacks());
        let streams = xds.list();
        self.connected_proxies
            .set(i64::try_from(streams.len()).unwrap_or(i64::MAX));
        // One series per connected proxy: rebuilt each scrape, so departed ones go.
        self.proxy_config_age.clear();
        self.proxy_config_unacked.clear();
        let now = SystemTime::now();
        let age = |t: SystemTime| {
            i64::try_from(now.duration_since(t).unwrap_or_default().as_secs()).unwrap_or(i64::MAX)
        };
        for stream in &streams {
            let Some(node) = &stream.node_id else {
                continue;
            };
            let label = vec![("node".to_string(), node.clone())];
            if let Some(acked) = stream.types.iter().filter_map(|t| t.acked_at).max() {
                self.proxy_config_age.get_or_create(&label).set(age(acked));
            }
            let waiting = stream
                .types
                .iter()
                .filter(|t| t.sent_version.is_some() && t.sent_version != t.acked_version)
                .filter_map(|t| t.sent_at)
                .min();
            self.proxy_config_unacked
                .get_or_create(&label)
                .set(waiting.map_or(0, age));
        }
        let mut out = String::new();
        match encode(&mut out, &self.registry) {
            Ok(()) => out,
            Err(e) => format!("# encoding metrics failed: {e}\n"),
        }
    }
}

/// A time as a gauge value: whole seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> i64 {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// Advances a counter mirrored from a monotonic source.
fn catch_up(counter: &Counter, source: u64) {
    let current = counter.get();
    if source > current {
        counter.inc_by(source - current);
    }
}
