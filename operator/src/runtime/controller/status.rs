//! Status conditions on SMI objects and MeshConfig, written by the leader.
//!
//! The mesh task computes what every object's status should be ([`StatusObserver`]);
//! the writer task ([`StatusWriter`]) compares it with what the cluster holds and
//! writes only the difference, by server-side apply on the status subresource with
//! field manager `weft`. An object whose `Accepted` condition changes also gets one
//! `events.k8s.io/v1` Event for that transition.
//!
//! Gateway API routes carry their status per parent (`status.parents[]`, entries with
//! `controllerName: weft.dev/mesh`). The upstream CRD makes that list atomic, so
//! server-side apply would take other controllers' entries away: those routes are
//! written by read-modify-write instead (a merge patch pinned to the resourceVersion
//! read, again on a conflict), replacing only Weft's entries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use weft_crds::gateway::{CONTROLLER_NAME, ParentReference, RouteParentStatus};
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
    /// Gateway API routes: the status per Service parent (the two above summarise it).
    pub parents: Vec<DesiredParent>,
}

/// What a route's status for one parent should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredParent {
    /// The parentRef as the route writes it.
    pub parent_ref: ParentReference,
    /// `Accepted`.
    pub accepted: ConditionState,
    /// `ResolvedRefs`.
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
            | Kind::HTTPRoute
            | Kind::GRPCRoute
            | Kind::TrafficPolicy
    )
}

/// Kinds whose status is per parent (`status.parents[]`).
pub fn is_route(kind: Kind) -> bool {
    matches!(kind, Kind::HTTPRoute | Kind::GRPCRoute)
}

fn state(c: &crate::index::RouteCondition) -> ConditionState {
    ConditionState {
        ok: c.0,
        reason: c.1,
        message: truncated(c.2.clone()),
    }
}

/// A route's desired status, from the index's per-parent statuses.
fn route_status(index: &Index, subject: StatusSubject) -> (ObjectRef, DesiredStatus) {
    let parents: Vec<DesiredParent> = index
        .route_statuses()
        .get(&subject.object)
        .into_iter()
        .flatten()
        .map(|p| DesiredParent {
            parent_ref: p.parent_ref.clone(),
            accepted: state(&p.accepted),
            resolved_refs: state(&p.resolved_refs),
        })
        .collect();
    let summary = |pick: fn(&DesiredParent) -> &ConditionState, ok: &'static str| {
        parents
            .iter()
            .map(pick)
            .find(|c| !c.ok)
            .cloned()
            .unwrap_or(ConditionState {
                ok: true,
                reason: ok,
                message: String::new(),
            })
    };
    let desired = DesiredStatus {
        uid: subject.uid,
        generation: subject.generation,
        accepted: summary(|p| &p.accepted, "Accepted"),
        resolved_refs: summary(|p| &p.resolved_refs, "ResolvedRefs"),
        parents,
    };
    (subject.object, desired)
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
    truncated(reasons.join("; "))
}

fn truncated(mut text: String) -> String {
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

/// The reason of `Accepted=False`: GEP-713's `TargetNotFound` or `Conflicted` when
/// the problems say so (a TrafficPolicy's), else `Invalid`.
fn refusal_reason(rejected: &[&str]) -> &'static str {
    for reason in ["TargetNotFound", "Conflicted"] {
        if rejected.iter().all(|r| {
            r.strip_prefix(reason)
                .is_some_and(|rest| rest.starts_with(':'))
        }) {
            return reason;
        }
    }
    "Invalid"
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
        .filter(|s| has_status(s.object.kind))
        .map(|subject| {
            if is_route(subject.object.kind) {
                return route_status(index, subject);
            }
            let StatusSubject {
                object,
                uid,
                generation,
            } = subject;
            {
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
                        reason: refusal_reason(&rejected),
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
                    parents: Vec::new(),
                };
                (object, desired)
            }
        })
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
    pair(
        &desired.accepted,
        &desired.resolved_refs,
        desired.generation,
        previous,
        now,
    )
}

/// `Accepted` and `ResolvedRefs`, each keeping its transition time from `previous`
/// while its status is the same.
fn pair(
    accepted: &ConditionState,
    resolved_refs: &ConditionState,
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Vec<Condition> {
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
            observed_generation: generation,
            last_transition_time: Some(since),
        }
    };
    vec![
        one("Accepted", accepted),
        one("ResolvedRefs", resolved_refs),
    ]
}

/// Weft's `status.parents[]` entries for `desired`, each keeping its conditions'
/// transition times from the entry for the same parentRef in `previous`.
pub fn parent_statuses(
    desired: &DesiredStatus,
    previous: &[RouteParentStatus],
    now: &str,
) -> Vec<RouteParentStatus> {
    desired
        .parents
        .iter()
        .map(|p| {
            let before = previous
                .iter()
                .find(|s| s.parent_ref == p.parent_ref)
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            RouteParentStatus {
                parent_ref: p.parent_ref.clone(),
                controller_name: CONTROLLER_NAME.to_string(),
                conditions: pair(
                    &p.accepted,
                    &p.resolved_refs,
                    desired.generation,
                    before,
                    now,
                ),
            }
        })
        .collect()
}

/// Weft's entries of a route's `status.parents[]`.
fn ours(status: Option<&serde_json::Value>) -> Vec<RouteParentStatus> {
    status
        .and_then(|s| s.get("parents"))
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .filter_map(|p| serde_json::from_value(p.clone()).ok())
        .collect()
}

/// A status as the cluster holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stored {
    uid: Option<String>,
    conditions: Vec<Condition>,
    /// Routes: Weft's `status.parents[]` entries.
    parents: Vec<RouteParentStatus>,
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
            Kind::HTTPRoute,
            Kind::GRPCRoute,
            Kind::TrafficPolicy,
        ] {
            let Some(resource) = custom_resource(kind) else {
                continue;
            };
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let items = match api.list(&ListParams::default()).await {
                Ok(items) => items,
                // The Gateway API CRDs are optional: without them there are no routes.
                Err(kube::Error::Api(e)) if e.code == 404 && is_route(kind) => continue,
                Err(e) => return Err(e),
            };
            for item in items {
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
                        parents: ours(item.data.get("status")),
                    },
                );
            }
        }
        self.stored = stored;
        Ok(())
    }

    /// Replaces Weft's `status.parents[]` entries of a route, keeping every other
    /// controller's; `Ok(false)` when the route is gone.
    async fn write_parents(
        &self,
        object: &ObjectRef,
        parents: &[RouteParentStatus],
    ) -> Result<bool, kube::Error> {
        let Some((api, _)) = api_for(&self.client, object) else {
            return Ok(false);
        };
        let mut attempt = 0;
        loop {
            let live = match api.get_status(&object.name).await {
                Ok(live) => live,
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
                Err(e) => return Err(e),
            };
            let mut list: Vec<serde_json::Value> = live
                .data
                .pointer("/status/parents")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .filter(|p| p["controllerName"] != CONTROLLER_NAME)
                .cloned()
                .collect();
            list.extend(parents.iter().map(|p| json!(p)));
            let body = json!({
                "metadata": { "resourceVersion": live.metadata.resource_version },
                "status": { "parents": list },
            });
            match api
                .patch_status(
                    &object.name,
                    &PatchParams {
                        field_manager: Some(FIELD_MANAGER.to_string()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(&body),
                )
                .await
            {
                Ok(_) => return Ok(true),
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
                // Someone wrote in between: read again.
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
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
            if is_route(object.kind) {
                let before: &[RouteParentStatus] =
                    previous.map(|s| s.parents.as_slice()).unwrap_or_default();
                let next = parent_statuses(want, before, &now);
                if previous.is_some_and(|s| s.parents == next)
                    || (previous.is_none() && next.is_empty())
                {
                    continue;
                }
                match self.write_parents(object, &next).await {
                    Ok(true) => {
                        self.metrics.status_writes.inc();
                        self.stored.insert(
                            object.clone(),
                            Stored {
                                uid: want.uid.clone(),
                                conditions: Vec::new(),
                                parents: next,
                            },
                        );
                    }
                    Ok(false) => {}
                    Err(error) => {
                        failed = true;
                        self.metrics.reconcile_errors.inc();
                        tracing::warn!(%error, %object, "writing the route status failed; retrying");
                    }
                }
                continue;
            }
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
                            parents: Vec::new(),
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
    fn a_traffic_policy_gets_the_gep_713_reasons() {
        let policies = "---\napiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop, uid: u9, generation: 2}\nspec:\n  targetRefs: [{group: '', kind: Service, name: web}]\n  timeouts: {request: 1s}\n---\napiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: gone, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: nowhere}]\n---\napiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  targetRefs: [{group: '', kind: Service, name: web}]\n  timeouts: {request: soon}\n";
        let statuses = desired_statuses(&index(&format!("{SERVICES}{policies}")));
        let of = |name: &str| &statuses[&ObjectRef::new(Kind::TrafficPolicy, "shop", name)];
        assert!(of("p").accepted.ok, "{:?}", of("p"));
        assert_eq!(of("p").generation, Some(2));
        assert_eq!(
            (of("gone").accepted.ok, of("gone").accepted.reason),
            (false, "TargetNotFound")
        );
        assert_eq!(
            (of("bad").accepted.ok, of("bad").accepted.reason),
            (false, "Invalid")
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

#[cfg(test)]
mod route_tests {
    use super::*;
    use crate::sources::parse_manifests;

    const SERVICES: &str = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v1, namespace: shop}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: data}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n";

    fn route(name: &str, parent: &str, backend: &str) -> String {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop, generation: 4}}\nspec:\n  parentRefs: [{parent}, {{name: a-gateway}}]\n  rules: [{{backendRefs: [{backend}]}}]\n"
        )
    }

    const GRANT: &str = "---\napiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: shop-to-db, namespace: data}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]\n  to: [{group: '', kind: Service}]\n";

    fn index(text: &str) -> Index {
        let mut index = Index::new();
        index.reset(parse_manifests(text).unwrap());
        index
    }

    fn parents(index: &Index, name: &str) -> Vec<DesiredParent> {
        desired_statuses(index)[&ObjectRef::new(Kind::HTTPRoute, "shop", name)]
            .parents
            .clone()
    }

    const WEB: &str = "{group: '', kind: Service, name: web, port: 80}";

    #[test]
    fn a_route_has_one_entry_per_service_parent_with_the_spec_reasons() {
        let text = format!(
            "{SERVICES}{}{}{}",
            route("good", WEB, "{name: web-v1, port: 80}"),
            route("missing", WEB, "{name: web-v9, port: 80}"),
            route(
                "orphan",
                "{group: '', kind: Service, name: ghost}",
                "{name: web-v1, port: 80}"
            ),
        );
        let index = index(&text);
        let good = parents(&index, "good");
        assert_eq!(good.len(), 1, "the Gateway parent is another controller's");
        assert_eq!(good[0].parent_ref.name, "web");
        assert_eq!(good[0].parent_ref.port, Some(80));
        assert!(good[0].accepted.ok && good[0].resolved_refs.ok, "{good:?}");
        let missing = &parents(&index, "missing")[0];
        assert!(missing.accepted.ok, "{missing:?}");
        assert_eq!(
            (missing.resolved_refs.ok, missing.resolved_refs.reason),
            (false, "BackendNotFound")
        );
        assert!(
            missing.resolved_refs.message.contains("shop/web-v9"),
            "{missing:?}"
        );
        let orphan = &parents(&index, "orphan")[0];
        assert_eq!(
            (orphan.accepted.ok, orphan.accepted.reason),
            (false, "NoMatchingParent")
        );
        let all = desired_statuses(&index);
        let status = &all[&ObjectRef::new(Kind::HTTPRoute, "shop", "missing")];
        assert_eq!(status.generation, Some(4));
        let written = parent_statuses(status, &[], "2026-01-01T00:00:00Z");
        assert_eq!(written[0].controller_name, "weft.dev/mesh");
        assert_eq!(written[0].conditions[1].type_, "ResolvedRefs");
        assert_eq!(written[0].conditions[1].reason, "BackendNotFound");
        assert_eq!(written[0].conditions[1].observed_generation, Some(4));
        let again = parent_statuses(status, &written, "2026-01-02T00:00:00Z");
        assert_eq!(written, again, "nothing changed, nothing moves");
    }

    #[test]
    fn unsupported_kinds_and_values_get_their_reasons() {
        let text = format!(
            "{SERVICES}{}{}",
            route("kind", WEB, "{group: example.com, kind: Bucket, name: b}"),
            route("regex", WEB, "{name: web-v1, port: 80}").replace(
                "rules: [{backendRefs",
                "rules: [{matches: [{path: {type: RegularExpression, value: '['}}], backendRefs"
            ),
        );
        let index = index(&text);
        let kind = &parents(&index, "kind")[0];
        assert_eq!(
            (kind.resolved_refs.ok, kind.resolved_refs.reason),
            (false, "InvalidKind")
        );
        let regex = &parents(&index, "regex")[0];
        assert_eq!(
            (regex.accepted.ok, regex.accepted.reason),
            (false, "UnsupportedValue")
        );
    }

    #[test]
    fn a_reference_grant_permits_a_cross_namespace_backend_and_its_removal_refuses_it() {
        let cross = route("cross", WEB, "{name: db, namespace: data, port: 80}");
        let mut index = index(&format!("{SERVICES}{cross}"));
        let refused = &parents(&index, "cross")[0];
        assert_eq!(
            (refused.resolved_refs.ok, refused.resolved_refs.reason),
            (false, "RefNotPermitted")
        );
        // The grant arrives: the route resolves, incrementally.
        let grant = parse_manifests(GRANT).unwrap().remove(0);
        assert!(index.apply(grant.clone()).is_some_and(|d| d.problems));
        assert!(parents(&index, "cross")[0].resolved_refs.ok);
        let full = self::index(&format!("{SERVICES}{cross}{GRANT}"));
        assert_eq!(index.model(), full.model());
        // A grant for another name, or from another kind, does not.
        for other in [
            GRANT.replace("kind: Service}", "kind: Service, name: cache}"),
            GRANT.replace("kind: HTTPRoute", "kind: GRPCRoute"),
            GRANT.replace("namespace: shop", "namespace: elsewhere"),
        ] {
            index.apply(parse_manifests(&other).unwrap().remove(0));
            let refused = &parents(&index, "cross")[0];
            assert_eq!(refused.resolved_refs.reason, "RefNotPermitted", "{other}");
        }
        index.delete(&grant.object_ref());
        assert_eq!(
            parents(&index, "cross")[0].resolved_refs.reason,
            "RefNotPermitted"
        );
    }

    #[test]
    fn a_grpc_route_gets_a_status_per_parent_too() {
        let text = format!(
            "{SERVICES}---\napiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{WEB}]\n  rules: [{{matches: [{{method: {{service: a.B, method: C}}}}], backendRefs: [{{name: web-v9, port: 80}}]}}]\n"
        );
        let statuses = desired_statuses(&index(&text));
        let g = &statuses[&ObjectRef::new(Kind::GRPCRoute, "shop", "g")].parents[0];
        assert!(g.accepted.ok);
        assert_eq!(g.resolved_refs.reason, "BackendNotFound");
    }
}
