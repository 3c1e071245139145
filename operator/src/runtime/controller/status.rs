//! Status conditions on SMI objects and MeshConfig, written by the leader.
//!
//! The mesh task computes what every object's status should be ([`StatusObserver`]);
//! the writer task ([`StatusWriter`]) compares it with what the cluster holds and
//! writes only the difference, by server-side apply on the status subresource with
//! field manager `weft`. An object whose `Accepted` condition changes also gets one
//! `events.k8s.io/v1` Event for that transition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use weft_crds::{Condition, SmiStatus};

use crate::error::WeftError;
use crate::index::{Index, Kind, ModelDelta, ObjectRef, StatusSubject};
use crate::runtime::controller::lease::Leadership;
use crate::runtime::mesh::ModelObserver;
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::sources::kube::custom_resource;

/// The field manager of every write Weft makes.
pub const FIELD_MANAGER: &str = "weft";

/// What one condition should say (its time is decided when written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionState {
    /// True or False.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// For a person.
    pub message: String,
}

/// What an object's status should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredStatus {
    /// The object's uid: a recreated object is written afresh.
    pub uid: Option<String>,
    /// The generation the status is computed for.
    pub generation: Option<i64>,
    /// `Accepted`: whether Weft applies the object.
    pub accepted: ConditionState,
    /// `ResolvedRefs`: whether everything it names exists.
    pub resolved_refs: ConditionState,
}

/// Desired statuses by object.
pub type DesiredStatuses = BTreeMap<ObjectRef, DesiredStatus>;

/// Kinds that carry a status Weft writes.
pub fn has_status(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::TrafficSplit
            | Kind::TrafficTarget
            | Kind::HTTPRouteGroup
            | Kind::TCPRoute
            | Kind::MeshConfig
    )
}

/// Whether a problem says that something the object names is missing. Problems carry
/// prose only; these are the phrasings the index uses for a missing reference.
fn is_missing_reference(reason: &str) -> bool {
    [
        "does not exist",
        "has no match named",
        "not found",
        "no such",
    ]
    .iter()
    .any(|p| reason.contains(p))
}

/// Longest condition message: the API server's limit is 32 KiB.
const MAX_MESSAGE: usize = 4096;

fn joined(reasons: &[&str]) -> String {
    let mut text = reasons.join("; ");
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Every status subject's desired status, from the model's problems.
pub fn desired_statuses(index: &Index) -> DesiredStatuses {
    let mut problems: HashMap<&ObjectRef, Vec<(bool, &str)>> = HashMap::new();
    for p in &index.model().problems {
        problems
            .entry(&p.object)
            .or_default()
            .push((p.rejected, p.reason.as_str()));
    }
    index
        .status_subjects()
        .into_iter()
        // HTTPRoutes carry per-parent status (`status.parents[]`), not SMI conditions:
        // not written yet.
        .filter(|s| has_status(s.object.kind))
        .map(
            |StatusSubject {
                 object,
                 uid,
                 generation,
             }| {
                let found = problems.get(&object).map(Vec::as_slice).unwrap_or_default();
                let rejected: Vec<&str> = found.iter().filter(|p| p.0).map(|p| p.1).collect();
                let missing: Vec<&str> = found
                    .iter()
                    .filter(|p| is_missing_reference(p.1))
                    .map(|p| p.1)
                    .collect();
                let warnings: Vec<&str> = found.iter().filter(|p| !p.0).map(|p| p.1).collect();
                let accepted = if rejected.is_empty() {
                    ConditionState {
                        ok: true,
                        reason: "Accepted",
                        message: if warnings.is_empty() {
                            "applied".to_string()
                        } else {
                            format!("applied with warnings: {}", joined(&warnings))
                        },
                    }
                } else {
                    ConditionState {
                        ok: false,
                        reason: "Invalid",
                        message: joined(&rejected),
                    }
                };
                let resolved_refs = if missing.is_empty() {
                    ConditionState {
                        ok: true,
                        reason: "ResolvedRefs",
                        message: "every reference resolves".to_string(),
                    }
                } else {
                    ConditionState {
                        ok: false,
                        reason: "RefNotFound",
                        message: joined(&missing),
                    }
                };
                let desired = DesiredStatus {
                    uid,
                    generation,
                    accepted,
                    resolved_refs,
                };
                (object, desired)
            },
        )
        .collect()
}

/// Follows the model on the mesh task and hands the desired statuses to the writer.
#[derive(Debug)]
pub struct StatusObserver {
    desired: watch::Sender<Arc<DesiredStatuses>>,
}

impl StatusObserver {
    /// An observer and the receiver the writer reads.
    pub fn new() -> (Self, watch::Receiver<Arc<DesiredStatuses>>) {
        let (desired, rx) = watch::channel(Arc::default());
        (Self { desired }, rx)
    }
}

impl ModelObserver for StatusObserver {
    fn applied(&mut self, index: &Index, delta: &ModelDelta, touched: Option<&BTreeSet<Kind>>) {
        // Pods and endpoints change all the time and never change a status by
        // themselves: only problems or the status kinds do.
        let relevant =
            delta.problems || touched.is_none_or(|kinds| kinds.iter().any(|k| has_status(*k)));
        if !relevant {
            return;
        }
        let desired = desired_statuses(index);
        self.desired.send_if_modified(|current| {
            if **current == desired {
                return false;
            }
            *current = Arc::new(desired);
            true
        });
    }
}

/// The conditions to write for `desired`, keeping each condition's transition time
/// from `previous` while its status is the same.
pub fn conditions(desired: &DesiredStatus, previous: &[Condition], now: &str) -> Vec<Condition> {
    let one = |type_: &str, state: &ConditionState| {
        let status = if state.ok { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_string());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: state.reason.to_string(),
            message: state.message.clone(),
            observed_generation: desired.generation,
            last_transition_time: Some(since),
        }
    };
    vec![
        one("Accepted", &desired.accepted),
        one("ResolvedRefs", &desired.resolved_refs),
    ]
}

/// A status as the cluster holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    uid: Option<String>,
    conditions: Vec<Condition>,
}

/// Writes statuses and their Events while this replica leads.
pub struct StatusWriter {
    client: Client,
    desired: watch::Receiver<Arc<DesiredStatuses>>,
    leadership: Leadership,
    recorder: Recorder,
    metrics: Arc<ControlPlaneMetrics>,
    /// What the cluster holds, as listed when leadership began and written since.
    stored: HashMap<ObjectRef, Stored>,
    loaded: bool,
}

impl std::fmt::Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("stored", &self.stored.len())
            .finish_non_exhaustive()
    }
}

/// How long after a failed write the writer tries again.
const RETRY: Duration = Duration::from_secs(2);

fn api_for(
    client: &Client,
    object: &ObjectRef,
) -> Option<(Api<DynamicObject>, kube::api::ApiResource)> {
    let resource = custom_resource(object.kind)?;
    let api = if object.namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), &object.namespace, &resource)
    };
    Some((api, resource))
}

fn rfc3339_now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now().to_string())
}

impl StatusWriter {
    /// A writer for `client`, writing what `desired` says while `leadership` holds.
    pub fn new(
        client: Client,
        desired: watch::Receiver<Arc<DesiredStatuses>>,
        leadership: Leadership,
        reporter_instance: String,
        metrics: Arc<ControlPlaneMetrics>,
    ) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: "weft".to_string(),
            instance: Some(reporter_instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            desired,
            leadership,
            metrics,
            stored: HashMap::new(),
            loaded: false,
        }
    }

    /// Lists the status kinds to learn what the cluster holds.
    async fn load(&mut self) -> Result<(), kube::Error> {
        let mut stored = HashMap::new();
        for kind in [
            Kind::TrafficSplit,
            Kind::TrafficTarget,
            Kind::HTTPRouteGroup,
            Kind::TCPRoute,
            Kind::MeshConfig,
        ] {
            let Some(resource) = custom_resource(kind) else {
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            for item in api.list(&ListParams::default()).await? {
                let namespace = match kind {
                    Kind::MeshConfig => String::new(),
                    _ => item.metadata.namespace.clone().unwrap_or_default(),
                };
                let name = item.metadata.name.clone().unwrap_or_default();
                let status: SmiStatus = item
                    .data
                    .get("status")
                    .cloned()
                    .and_then(|s| serde_json::from_value(s).ok())
                    .unwrap_or_default();
                stored.insert(
                    ObjectRef::new(kind, &namespace, &name),
                    Stored {
                        uid: item.metadata.uid.clone(),
                        conditions: status.conditions,
                    },
                );
            }
        }
        self.stored = stored;
        Ok(())
    }

    /// Writes one status; `Ok(false)` when the object is gone.
    async fn write(
        &self,
        object: &ObjectRef,
        conditions: &[Condition],
    ) -> Result<bool, kube::Error> {
        let Some((api, resource)) = api_for(&self.client, object) else {
            return Ok(false);
        };
        let mut metadata = json!({ "name": object.name });
        if !object.namespace.is_empty() {
            metadata["namespace"] = json!(object.namespace);
        }
        let body = json!({
            "apiVersion": resource.api_version,
            "kind": resource.kind,
            "metadata": metadata,
            "status": { "conditions": conditions },
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        match api
            .patch_status(&object.name, &params, &Patch::Apply(&body))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn announce(&self, object: &ObjectRef, uid: Option<&String>, accepted: &Condition) {
        let Some(resource) = custom_resource(object.kind) else {
            return;
        };
        let reference = ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(resource.kind.clone()),
            name: Some(object.name.clone()),
            namespace: (!object.namespace.is_empty()).then(|| object.namespace.clone()),
            uid: uid.cloned(),
            ..ObjectReference::default()
        };
        let ok = accepted.status == "True";
        let event = Event {
            type_: if ok {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: if ok { "Accepted" } else { "Invalid" }.to_string(),
            note: Some(accepted.message.chars().take(1000).collect()),
            action: "Validate".to_string(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            self.metrics.reconcile_errors.inc();
            tracing::warn!(%error, %object, "publishing an Event failed");
        }
    }

    /// Writes every status that differs; whether any write failed.
    async fn reconcile(&mut self) -> bool {
        let desired = self.desired.borrow_and_update().clone();
        let now = rfc3339_now();
        let mut failed = false;
        self.stored.retain(|object, _| desired.contains_key(object));
        for (object, want) in desired.iter() {
            if !self.leadership.is_leader() {
                return false;
            }
            let previous = self
                .stored
                .get(object)
                .filter(|s| want.uid.is_none() || s.uid == want.uid);
            let before: &[Condition] = previous
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            let next = conditions(want, before, &now);
            if previous.is_some_and(|s| s.conditions == next) {
                continue;
            }
            let was_accepted = before
                .iter()
                .find(|c| c.type_ == "Accepted")
                .map(|c| c.status.clone());
            match self.write(object, &next).await {
                Ok(true) => {
                    self.metrics.status_writes.inc();
                    let accepted = &next[0];
                    // An Event per transition: into False, or back to True.
                    let transition = match &was_accepted {
                        Some(s) => *s != accepted.status,
                        None => accepted.status == "False",
                    };
                    if transition {
                        self.announce(object, want.uid.as_ref(), accepted).await;
                    }
                    self.stored.insert(
                        object.clone(),
                        Stored {
                            uid: want.uid.clone(),
                            conditions: next,
                        },
                    );
                }
                Ok(false) => {}
                Err(error) => {
                    failed = true;
                    self.metrics.reconcile_errors.inc();
                    tracing::warn!(%error, %object, "writing the status failed; retrying");
                }
            }
        }
        failed
    }

    /// Writes while leading, forever.
    pub async fn run(mut self) -> Result<(), WeftError> {
        loop {
            let retry_at: Option<tokio::time::Instant>;
            if self.leadership.is_leader() {
                if !self.loaded {
                    match self.load().await {
                        Ok(()) => self.loaded = true,
                        Err(error) => {
                            self.metrics.reconcile_errors.inc();
                            tracing::warn!(%error, "listing statuses failed; retrying");
                        }
                    }
                }
                if self.loaded {
                    let failed = self.reconcile().await;
                    retry_at = failed.then(|| tokio::time::Instant::now() + RETRY);
                } else {
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                }
            } else {
                // Whoever leads next lists afresh: what this replica knew may be stale.
                self.loaded = false;
                self.stored.clear();
                retry_at = None;
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = self.desired.changed() => if changed.is_err() {
                    return Err(WeftError::TaskEnded {
                        task: "status-writer",
                        reason: "the mesh task stopped".to_string(),
                    });
                },
                () = self.leadership.changed() => {}
                () = retry => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::parse_manifests;

    fn index(text: &str) -> Index {
        let mut index = Index::new();
        index.reset(parse_manifests(text).unwrap());
        index
    }

    const SPLIT: &str = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s, namespace: shop, generation: 3, uid: u1}\nspec:\n  service: web\n  backends: [{service: web-v1, weight: 80}, {service: web-v2, weight: 20}]\n";
    const SERVICES: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v1, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v2, namespace: shop}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n";

    #[test]
    fn a_valid_split_is_accepted_at_its_generation() {
        let statuses = desired_statuses(&index(&format!("{SPLIT}{SERVICES}")));
        let s = &statuses[&ObjectRef::new(Kind::TrafficSplit, "shop", "s")];
        assert!(s.accepted.ok && s.resolved_refs.ok, "{s:?}");
        assert_eq!(s.generation, Some(3));
        assert_eq!(s.uid.as_deref(), Some("u1"));
    }

    #[test]
    fn a_split_of_its_own_root_is_not_accepted() {
        let bad = SPLIT.replace("web-v2, weight: 20", "web, weight: 20");
        let statuses = desired_statuses(&index(&format!("{bad}{SERVICES}")));
        let s = &statuses[&ObjectRef::new(Kind::TrafficSplit, "shop", "s")];
        assert!(!s.accepted.ok, "{s:?}");
        assert_eq!(s.accepted.reason, "Invalid");
        assert!(
            s.accepted.message.contains("root"),
            "{}",
            s.accepted.message
        );
    }

    #[test]
    fn transition_time_moves_only_on_a_transition() {
        let statuses = desired_statuses(&index(&format!("{SPLIT}{SERVICES}")));
        let want = &statuses[&ObjectRef::new(Kind::TrafficSplit, "shop", "s")];
        let first = conditions(want, &[], "2026-01-01T00:00:00Z");
        let again = conditions(want, &first, "2026-01-02T00:00:00Z");
        assert_eq!(first, again, "same status, same conditions");
        let mut rejected = want.clone();
        rejected.accepted.ok = false;
        let flipped = conditions(&rejected, &again, "2026-01-03T00:00:00Z");
        assert_eq!(
            flipped[0].last_transition_time.as_deref(),
            Some("2026-01-03T00:00:00Z")
        );
        assert_eq!(
            flipped[1].last_transition_time.as_deref(),
            Some("2026-01-01T00:00:00Z"),
            "ResolvedRefs did not change"
        );
    }

    #[test]
    fn pod_churn_does_not_recompute_statuses() {
        let idx = index(&format!("{SPLIT}{SERVICES}"));
        let (mut observer, mut rx) = StatusObserver::new();
        let pods: BTreeSet<Kind> = [Kind::Pod].into();
        observer.applied(&idx, &ModelDelta::default(), Some(&pods));
        assert!(!rx.has_changed().unwrap());
        observer.applied(&idx, &ModelDelta::default(), None);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        observer.applied(&idx, &ModelDelta::default(), None);
        assert!(
            !rx.has_changed().unwrap(),
            "the same statuses are not sent again"
        );
    }
}
