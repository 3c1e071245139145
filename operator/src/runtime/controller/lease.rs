//! Leader election on a coordination.k8s.io Lease: every replica serves, one writes.
//!
//! Written here rather than with kube-lease-manager: that crate keeps reporting
//! leadership while it cannot reach the API server (a failed renewal is retried, the
//! flag stays up), so a partitioned leader would go on writing after another replica
//! took the Lease. Here leadership is a deadline: each successful acquire or renew
//! extends it to (start of that request + lease duration − a safety margin), and
//! writers check the deadline before every write, so a replica that cannot renew
//! stops writing before anyone else may take the Lease, as client-go's elector does.
//! Expiry of another holder is judged by the local clock since the record was last
//! seen to change, never by comparing clocks across machines.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

use crate::error::WeftError;
use crate::runtime::metrics::ControlPlaneMetrics;

/// Until when this replica may write as the leader (`None`: it is not the leader).
#[derive(Clone, Debug)]
pub struct Leadership {
    until: watch::Receiver<Option<Instant>>,
    /// Keeps a fixed leadership's sender alive.
    _fixed: Option<std::sync::Arc<watch::Sender<Option<Instant>>>>,
}

impl Leadership {
    /// Whether this replica may write now.
    pub fn is_leader(&self) -> bool {
        self.until
            .borrow()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Waits until leadership may have changed (gained, renewed, lost, or ran out).
    pub async fn changed(&mut self) {
        let until = *self.until.borrow_and_update();
        // A deadline already past is no news: waiting on it would return at once, and
        // callers loop on this, so they would spin until the next renewal lands.
        let expiry = async {
            match until.filter(|t| *t > Instant::now()) {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
                        r = self.until.changed() => if r.is_err() { std::future::pending::<()>().await },
            () = expiry => {}
        }
    }

    /// A leadership that is always held (a single replica without a Lease; tests).
    pub fn always() -> Self {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let (tx, rx) = watch::channel(Some(far));
        Self {
            until: rx,
            _fixed: Some(std::sync::Arc::new(tx)),
        }
    }
}

/// How the Lease is held.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Namespace and name of the Lease.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a holder that stops renewing keeps the Lease.
    pub duration: Duration,
}

impl LeaseSettings {
    /// How often the holder renews, and others check.
    fn retry(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// Time taken off the deadline for the request's own delay and clock drift.
    fn margin(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(100))
    }
}

/// The Lease as last seen, and when it was seen to change (local clock).
#[derive(Debug)]
struct Observed {
    holder: Option<String>,
    resource_version: Option<String>,
    renew: Option<MicroTime>,
    changed_at: Instant,
}

/// Runs the election loop, holding the Lease while it can.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Option<Observed>,
    until: watch::Sender<Option<Instant>>,
    metrics: std::sync::Arc<ControlPlaneMetrics>,
}

impl std::fmt::Debug for LeaderElector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElector")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElector {
    /// An elector and the leadership it reports.
    pub fn new(
        client: kube::Client,
        settings: LeaseSettings,
        metrics: std::sync::Arc<ControlPlaneMetrics>,
    ) -> (Self, Leadership) {
        let (until, rx) = watch::channel(None);
        let api = Api::namespaced(client, &settings.namespace);
        (
            Self {
                api,
                settings,
                observed: None,
                until,
                metrics,
            },
            Leadership {
                until: rx,
                _fixed: None,
            },
        )
    }

    fn set_leader(&self, until: Option<Instant>) {
        let was = self.until.borrow().is_some();
        if was != until.is_some() {
            if until.is_some() {
                tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "became the leader");
            } else {
                tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "not the leader any more");
            }
        }
        self.metrics.leader.set(i64::from(until.is_some()));
        self.until.send_replace(until);
    }

    fn lease_spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let seconds = i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(i32::MAX);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(acquired.unwrap_or_else(now_micro)),
            renew_time: Some(now_micro()),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: acquire, renew or observe. `Ok(true)` when this replica holds the
    /// Lease now.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let name = self.settings.name.clone();
        let Some(mut lease) = self.api.get_opt(&name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.lease_spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let seen = (
            holder.clone(),
            lease.metadata.resource_version.clone(),
            spec.renew_time.clone(),
        );
        let changed = match &self.observed {
            Some(o) => {
                (
                    o.holder.clone(),
                    o.resource_version.clone(),
                    o.renew.clone(),
                ) != seen
            }
            None => true,
        };
        if changed {
            self.observed = Some(Observed {
                holder: seen.0,
                resource_version: seen.1,
                renew: seen.2,
                changed_at: Instant::now(),
            });
        }
        let mine = holder.as_deref() == Some(self.settings.identity.as_str());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs);
        let expired = self
            .observed
            .as_ref()
            .is_some_and(|o| o.changed_at.elapsed() >= duration);
        if !mine && holder.is_some() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine {
            spec.acquire_time.clone()
        } else {
            None
        };
        lease.spec = Some(self.lease_spec(transitions, acquired));
        // The resourceVersion in `lease` makes this a compare-and-swap: another
        // replica's write in between answers 409 and this round is lost.
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Holds the Lease while it can, forever.
    pub async fn run(mut self) -> Result<(), WeftError> {
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    let until = started + self.settings.duration - self.settings.margin();
                    self.set_leader(Some(until));
                }
                Ok(false) => self.set_leader(None),
                Err(error) => {
                    // The deadline stays: it runs out on its own if renewing keeps failing.
                    tracing::warn!(%error, lease = %self.settings.name, "leader election: Lease request failed");
                }
            }
            tokio::time::sleep(self.settings.retry()).await;
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once.
    pub async fn release(api: &Api<Lease>, settings: &LeaseSettings) {
        let Ok(Some(mut lease)) = api.get_opt(&settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now_micro());
        match api
            .replace(&settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %settings.name, "released the leader Lease"),
            Err(error) => {
                tracing::warn!(%error, "releasing the leader Lease failed; it expires on its own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leadership_runs_out_at_its_deadline_without_any_message() {
        let (tx, rx) = watch::channel(Some(Instant::now() + Duration::from_millis(100)));
        let mut leadership = Leadership {
            until: rx,
            _fixed: None,
        };
        assert!(leadership.is_leader());
        // No renewal arrives (the API server is unreachable): the deadline alone ends it.
        tokio::time::timeout(Duration::from_secs(2), leadership.changed())
            .await
            .expect("changed() wakes at the deadline");
        assert!(!leadership.is_leader());
        tx.send_replace(Some(Instant::now() + Duration::from_secs(60)));
        assert!(leadership.is_leader(), "a renewal makes it leader again");
        tx.send_replace(None);
        assert!(!leadership.is_leader());
        assert!(Leadership::always().is_leader());
        // A deadline that has passed without a renewal (a slow API server): changed()
        // waits for the next message instead of returning at once, again and again.
        tx.send_replace(Some(Instant::now() - Duration::from_millis(1)));
        assert!(!leadership.is_leader());
        assert!(
            tokio::time::timeout(Duration::from_millis(200), leadership.changed())
                .await
                .is_err(),
            "a past deadline must not wake the caller again"
        );
        // A renewal arriving while it waits wakes it.
        let renew = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send_replace(Some(Instant::now() + Duration::from_secs(60)));
        };
        let (woke, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(1), leadership.changed()),
            renew
        );
        woke.expect("a renewal wakes it");
        assert!(leadership.is_leader());
    }

    #[test]
    fn renewals_come_several_times_per_lease_and_the_margin_is_kept() {
        let s = LeaseSettings {
            namespace: "weft-system".into(),
            name: "weft-controller".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert_eq!(s.retry(), Duration::from_secs(3));
        assert!(s.margin() < s.duration && s.retry() + s.margin() < s.duration);
    }
}
