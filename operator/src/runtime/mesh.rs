//! The mesh as the control plane holds it: index, publisher and the status they
//! report, driven by source events, proxy demands and certificate renewals.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::identity::NodeBinding;
use crate::index::{Index, Kind, ModelDelta, Problem};
use crate::runtime::admin::{MeshStatus, ModelQuery, ProblemReport, SettingsReport};
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::runtime::publish::{MeshPublisher, PublishStats};
use crate::runtime::xds_listener::XdsServingCert;
use crate::sources::{ManifestError, SourceEvent};
use crate::translate::{AccessMode, MeshConfig};

/// The index and everything derived from it, updated on every source event.
#[derive(Debug)]
pub struct MeshRuntime {
    index: Index,
    publisher: MeshPublisher,
    binding: Arc<dyn NodeBinding>,
    metrics: Arc<ControlPlaneMetrics>,
    status: watch::Sender<MeshStatus>,
    reported: BTreeSet<Problem>,
    /// The mesh settings from the flags (a MeshConfig may override them).
    flags: MeshConfig,
    /// The settings in effect at the last reload, to log changes.
    settings: Option<SettingsReport>,
    /// The xDS port's certificate, renewed here like the workloads'.
    xds_cert: XdsServingCert,
    /// Inputs the source cannot read (their last good objects keep serving).
    source_errors: Vec<ManifestError>,
    /// Whether the source's first full read has been applied.
    synced: bool,
    /// Told of every applied change (status writers, trust bundle publishers).
    observers: Vec<Box<dyn ModelObserver>>,
}

/// Something that follows the index as changes are applied (runs on the mesh task:
/// it must hand work off, not block).
pub trait ModelObserver: Send + std::fmt::Debug {
    /// Called after `delta` was applied to `index` and published; `touched` holds the
    /// kinds of the objects the event named (`None`: every kind, a full reset).
    fn applied(&mut self, index: &Index, delta: &ModelDelta, touched: Option<&BTreeSet<Kind>>);
}

impl MeshRuntime {
    /// A runtime over `index` that has applied nothing yet.
    #[allow(clippy::too_many_arguments)] // the parts the serving code assembles, once
    pub fn new(
        index: Index,
        publisher: MeshPublisher,
        binding: Arc<dyn NodeBinding>,
        metrics: Arc<ControlPlaneMetrics>,
        status: watch::Sender<MeshStatus>,
        flags: MeshConfig,
        xds_cert: XdsServingCert,
        observers: Vec<Box<dyn ModelObserver>>,
    ) -> Self {
        Self {
            index,
            publisher,
            binding,
            metrics,
            status,
            reported: BTreeSet::new(),
            flags,
            settings: None,
            xds_cert,
            source_errors: Vec::new(),
            synced: false,
            observers,
        }
    }

    /// Answers `weft explain` from the current model.
    pub fn explain(&self, request: ModelQuery) {
        let model = self.index.model();
        let config = self.flags.effective(model);
        request.answer(model, &config);
    }

    /// Drops the config of proxies gone long enough; when to sweep next.
    pub fn sweep(&mut self, now: std::time::Instant) -> Option<std::time::Instant> {
        self.publisher.sweep(now)
    }

    /// Applies one source event and publishes what it changed. The first event is the
    /// source's first full read: nothing is served before it.
    pub fn apply(&mut self, event: SourceEvent) {
        let started = std::time::Instant::now();
        if let SourceEvent::Unreadable(errors) = event {
            self.source_errors = errors;
            self.record_status();
            return;
        }
        let touched = event.touched_kinds();
        let applied = event.apply_to(&mut self.index);
        let first = !self.synced;
        if applied.is_none() && !first {
            // Every object was already held as it is (a relist, the echo of a status
            // write): nothing to publish, nothing for the observers.
            tracing::debug!("no object changed");
            return;
        }
        let delta = applied.unwrap_or_default();
        self.synced = true;
        self.binding
            .update_nodes(self.index.model(), &delta.workloads);
        if delta.problems || first {
            self.report_problems();
        }
        let config = self.flags.effective(self.index.model());
        self.report_settings(&config);
        self.publish(&delta);
        if !delta.is_empty() {
            self.metrics.pushes.inc();
            self.metrics
                .push_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        for observer in &mut self.observers {
            observer.applied(&self.index, &delta, touched.as_ref());
        }
        if first {
            self.status.send_modify(|s| s.synced = true);
        }
        tracing::debug!(
            services = delta.services.len(),
            workloads = delta.workloads.len(),
            grants = delta.grants.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "change applied"
        );
    }

    /// When the next certificate (a workload's or the xDS port's) is due.
    pub(super) fn next_renewal(&self) -> Option<SystemTime> {
        let workloads = self.publisher.next_renewal();
        if self.publisher.ca().is_none() {
            return workloads;
        }
        let xds = self.xds_cert.renew_at();
        Some(workloads.map_or(xds, |w| w.min(xds)))
    }

    /// Renews what is due: the xDS serving certificate, then workload certificates.
    /// A failed renewal is retried at the next wake-up.
    pub(super) fn renew(&mut self) {
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
    pub(super) fn on_demand(&mut self, demand: &weft_xds::NodeDemand) {
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
        if let Some(expiry) = self.publisher.earliest_certificate_expiry() {
            self.metrics
                .workload_certificate_expiry
                .set(crate::runtime::metrics::unix_seconds(expiry));
        }
        self.status
            .send_modify(|status| status.proxies = stats.proxies);
        self.record_status();
    }

    /// Metrics and `weft status` of the inputs.
    fn record_status(&mut self) {
        let model = self.index.model();
        let invalid = i64::try_from(model.problems.len()).unwrap_or(i64::MAX);
        self.metrics.invalid_objects.set(invalid);
        let manifest_errors = self.source_errors.clone();
        let unreadable = i64::try_from(manifest_errors.len()).unwrap_or(i64::MAX);
        self.metrics.manifest_errors.set(unreadable);
        let objects = self.index.len();
        let routes = crate::runtime::admin::RouteStatusReport::all(self.index.route_statuses());
        self.status.send_modify(|status| {
            status.objects = objects;
            status.routes = routes;
            status.problems = model.problems.iter().map(ProblemReport::from).collect();
            status.manifest_errors = manifest_errors;
        });
    }
}
