//! Objects, resourceVersions, change history and open watches.
//!
//! One counter is the resourceVersion, as with etcd. Every change is kept until
//! [`Store::compact`], so a watch resumes from any resourceVersion not yet compacted
//! and a paged list is a consistent snapshot at its first page's resourceVersion.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use ring::rand::SecureRandom;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::apply::{self, Manager};
use super::select::Filter;
use super::tokens::IssuedToken;

/// The served kinds, one a line: apiVersion, plural, kind, flags (`n`: namespaced,
/// `s`: status subresource; pods, services and namespaces have one as in a cluster;
/// `-`: neither).
const TABLE: &str = "
    v1 namespaces Namespace s
    v1 services Service ns
    v1 pods Pod ns
    v1 serviceaccounts ServiceAccount n
    v1 secrets Secret n
    v1 configmaps ConfigMap n
    discovery.k8s.io/v1 endpointslices EndpointSlice n
    coordination.k8s.io/v1 leases Lease n
    events.k8s.io/v1 events Event n
    split.smi-spec.io/v1alpha4 trafficsplits TrafficSplit ns
    access.smi-spec.io/v1alpha3 traffictargets TrafficTarget ns
    specs.smi-spec.io/v1alpha4 httproutegroups HTTPRouteGroup ns
    specs.smi-spec.io/v1alpha4 tcproutes TCPRoute ns
    config.weft.dev/v1alpha1 meshconfigs MeshConfig s
    gateway.networking.k8s.io/v1 httproutes HTTPRoute ns
    gateway.networking.k8s.io/v1 grpcroutes GRPCRoute ns
    gateway.networking.k8s.io/v1 referencegrants ReferenceGrant n
    policy.weft.dev/v1alpha1 trafficpolicies TrafficPolicy ns

    admissionregistration.k8s.io/v1 mutatingwebhookconfigurations MutatingWebhookConfiguration -
    apiextensions.k8s.io/v1 customresourcedefinitions CustomResourceDefinition -
";

/// One served resource type.
#[derive(Debug)]
pub(crate) struct Kind {
    pub api_version: &'static str,
    /// "" for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Main-resource writes leave `.status` alone; `/status` writes only it.
    pub status: bool,
}

/// Every served kind; an index into it names a kind everywhere else.
pub(crate) static KINDS: LazyLock<Vec<Kind>> = LazyLock::new(|| {
    let kind = |line: &'static str| {
        let [api_version, plural, kind, flags] = line.split_whitespace().collect::<Vec<_>>()[..]
        else {
            return None;
        };
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let (namespaced, status) = (flags.contains('n'), flags.contains('s'));
        Some(Kind {
            api_version,
            group,
            version,
            plural,
            kind,
            namespaced,
            status,
        })
    };
    TABLE.lines().filter_map(kind).collect()
});

/// Index into [`KINDS`] of the kind with this apiVersion and kind.
pub(crate) fn find_kind(api_version: &str, kind: &str) -> Option<usize> {
    KINDS
        .iter()
        .position(|k| (k.api_version, k.kind) == (api_version, kind))
}

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason: `NotFound`, `Conflict`, ...
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        let (reason, message) = (reason.to_string(), message.into());
        Self {
            code,
            reason,
            message,
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// 422, for requests that are well-formed but not acceptable.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }
    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(409, "Conflict", message)
    }
    /// The `Status` body.
    pub(crate) fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn not_found(k: usize, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} {name:?} not found", KINDS[k].plural),
    )
}

/// The API server's 410 for a resourceVersion older than the kept history.
fn too_old(rv: u64, compacted: u64) -> ApiError {
    ApiError::new(
        410,
        "Expired",
        format!("too old resource version: {rv} ({compacted})"),
    )
}

/// `(namespace or "", name)`.
pub(crate) type Key = (String, String);

fn key(ns: &str, name: &str) -> Key {
    (ns.to_string(), name.to_string())
}

/// One object, or its status subresource, as a request names it.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub kind: usize,
    /// "" for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    pub status: bool,
}

impl Target {
    fn key(&self) -> Key {
        key(&self.namespace, &self.name)
    }
    fn subresource(&self) -> &'static str {
        if self.status { "status" } else { "" }
    }
}

/// A list request: which objects, and which page of which snapshot.
#[derive(Debug)]
pub(crate) struct ListRequest {
    pub kind: usize,
    pub filter: Filter,
    /// At most this many items; 0 for all.
    pub limit: usize,
    /// The previous page's `continue`, if any.
    pub continue_token: Option<String>,
    /// `resourceVersionMatch=Exact`: the state at this resourceVersion instead of the
    /// latest (any other resourceVersion is satisfied by the latest state).
    pub exact: Option<u64>,
}

/// A watch request.
#[derive(Debug)]
pub(crate) struct WatchRequest {
    pub kind: usize,
    pub filter: Filter,
    /// Replay the changes after this resourceVersion; None ("" or "0"): start with
    /// every current object as ADDED.
    pub from: Option<u64>,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `sendInitialEvents`: the current objects as ADDED, then a BOOKMARK marking
    /// their end, whatever `from` is.
    pub initial_events: bool,
}

/// One committed change, kept for resuming watches and for list snapshots.
#[derive(Debug)]
struct Change {
    rv: u64,
    kind: usize,
    key: Key,
    before: Option<Arc<Value>>,
    /// The new state; for a deletion the last one, with the deletion's resourceVersion.
    after: Arc<Value>,
    deleted: bool,
}

/// What a watch stream sends next.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    Event(&'static str, Arc<Value>),
    /// `initial_end`: the bookmark that ends the initial events of a streaming list.
    Bookmark {
        rv: u64,
        initial_end: bool,
    },
    /// The requested resourceVersion is compacted: an ERROR event with 410.
    Gone(ApiError),
}

#[derive(Debug)]
struct Watcher {
    kind: usize,
    filter: Filter,
    bookmarks: bool,
    tx: UnboundedSender<WatchMsg>,
}

/// Past this many changes the oldest go, as etcd compacts.
const MAX_HISTORY: usize = 200_000;

/// Everything the double holds, behind one mutex that is never held across an await.
#[derive(Debug)]
pub(crate) struct Store {
    rv: u64,
    /// Watches and snapshots need the history after this resourceVersion.
    compacted: u64,
    /// Objects with their field managers.
    objects: BTreeMap<(usize, Key), (Value, Vec<Manager>)>,
    history: VecDeque<Change>,
    watchers: Vec<Watcher>,
    /// Issued service-account tokens, by token.
    pub tokens: HashMap<String, IssuedToken>,
    /// `(verb, group, plural, subresource)` → count.
    pub requests: HashMap<(String, String, String, String), usize>,
}

impl Default for Store {
    fn default() -> Self {
        // Not 0: to clients "0" means "any version".
        let (rv, compacted) = (1, 1);
        let (objects, history, watchers) = (BTreeMap::new(), VecDeque::new(), Vec::new());
        let (tokens, requests) = (HashMap::new(), HashMap::new());
        Self {
            rv,
            compacted,
            objects,
            history,
            watchers,
            tokens,
            requests,
        }
    }
}

/// RFC 3339 UTC time in whole seconds, as `metav1.Time`.
pub(crate) fn now() -> String {
    use k8s_openapi::jiff::Timestamp;
    let now = Timestamp::now();
    Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Random bytes; a counter is mixed in so values stay unique even without entropy.
pub(crate) fn random_bytes(len: usize) -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut buf = vec![0u8; len];
    let _ = ring::rand::SystemRandom::new().fill(&mut buf);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes();
    buf.iter_mut().zip(count).for_each(|(b, c)| *b ^= c);
    buf
}

/// A random UUID-shaped uid.
pub(crate) fn new_uid() -> String {
    let h: String = random_bytes(16)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    uuid_shaped(&h)
}

/// 32 hex digits as a UUID (8-4-4-4-12), the shape of Kubernetes uids.
pub fn uuid_shaped(h: &str) -> String {
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object
        .get("metadata")?
        .get(field)?
        .as_str()
        .filter(|s| !s.is_empty())
}

fn set_or_remove(object: &mut Value, key: &str, value: Option<Value>) {
    if let Some(map) = object.as_object_mut() {
        match value {
            Some(v) => map.insert(key.to_string(), v),
            None => map.remove(key),
        };
    }
}

/// A body must be an object whose `metadata`, if any, is one: the code below relies
/// on that to index into it (indexing a non-object mutably would panic).
fn check_body(k: usize, body: &Value) -> Result<(), ApiError> {
    let metadata_ok = matches!(body.get("metadata"), None | Some(Value::Object(_)));
    if !body.is_object() || !metadata_ok {
        return Err(ApiError::bad_request(
            "the body must be an object with object metadata",
        ));
    }
    let kind = &KINDS[k];
    for (field, want) in [("apiVersion", kind.api_version), ("kind", kind.kind)] {
        if body[field].as_str().is_some_and(|have| have != want) {
            return Err(ApiError::bad_request(format!("{field} must be {want:?}")));
        }
    }
    Ok(())
}

fn modified(k: usize, name: &str) -> ApiError {
    ApiError::conflict(format!(
        "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
         please apply your changes to the latest version and try again",
        KINDS[k].plural
    ))
}

/// A write with a `metadata.resourceVersion` other than the current one is stale.
fn check_version(k: usize, name: &str, body: &Value, current: &Value) -> Result<(), ApiError> {
    match meta_str(body, "resourceVersion") {
        Some(rv) if Some(rv) != meta_str(current, "resourceVersion") => Err(modified(k, name)),
        _ => Ok(()),
    }
}

/// Metadata only the server writes; writes carry it over from the stored object.
const SYSTEM_METADATA: [&str; 9] = [
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "resourceVersion",
    "generation",
    "managedFields",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// Whether anything outside metadata (and status, where that is a subresource)
/// differs: that bumps `generation`.
fn spec_changed(k: usize, before: &Value, after: &Value) -> bool {
    let strip = |v: &Value| {
        let mut map = v.as_object().cloned().unwrap_or_default();
        map.retain(|field, _| field != "metadata" && !(KINDS[k].status && field == "status"));
        map
    };
    strip(before) != strip(after)
}

/// Marked for deletion and no finalizer left: the object goes.
fn finalized(object: &Value) -> bool {
    let finalizers = object["metadata"]["finalizers"].as_array();
    meta_str(object, "deletionTimestamp").is_some() && finalizers.is_none_or(Vec::is_empty)
}

/// The event a watch with `filter` gets for a change: an object that starts or stops
/// matching its selectors is ADDED or DELETED for it.
fn event_type(change: &Change, filter: &Filter) -> Option<&'static str> {
    let scoped = filter.in_scope(&change.key.0);
    let now = scoped && filter.matches(&change.after);
    let was = change.before.as_ref().map(|b| scoped && filter.matches(b));
    match (change.deleted, was, now) {
        (true, _, true) => Some("DELETED"),
        (false, Some(true), true) => Some("MODIFIED"),
        (false, _, true) => Some("ADDED"),
        (false, Some(true), false) => Some("DELETED"),
        _ => None,
    }
}

impl Store {
    /// The resourceVersion of the last change.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Forgets the history: older resourceVersions get 410 from now on.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Drops every watch: their streams end mid-stream.
    pub fn cut_watches(&mut self) {
        self.watchers.clear();
    }

    /// Open watches, after forgetting those whose client went away.
    pub fn watch_count(&mut self) -> usize {
        self.watchers.retain(|w| !w.tx.is_closed());
        self.watchers.len()
    }

    /// Counts a request, for [`super::ApiServerDouble::requests`].
    pub fn count(&mut self, verb: &str, group: &str, plural: &str, subresource: &str) {
        let key = (verb.into(), group.into(), plural.into(), subresource.into());
        *self.requests.entry(key).or_default() += 1;
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that wants them.
    pub fn send_bookmarks(&mut self) {
        let rv = self.rv;
        let msg = || WatchMsg::Bookmark {
            rv,
            initial_end: false,
        };
        self.watchers
            .retain(|w| !w.bookmarks || w.tx.send(msg()).is_ok());
    }

    fn current(&self, k: usize, key: &Key) -> Result<(Value, Vec<Manager>), ApiError> {
        let stored = self.objects.get(&(k, key.clone()));
        stored.cloned().ok_or_else(|| not_found(k, &key.1))
    }

    /// The stored object.
    pub fn get(&self, k: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        Ok(self.current(k, &key(ns, name))?.0)
    }

    /// The matching objects as of resourceVersion `at`, rebuilt from the history.
    fn snapshot(&self, k: usize, filter: &Filter, at: u64) -> Result<Vec<(Key, Value)>, ApiError> {
        if at < self.compacted {
            return Err(too_old(at, self.compacted));
        }
        let in_scope = |kind: usize, key: &Key| kind == k && filter.in_scope(&key.0);
        let mut objects: BTreeMap<Key, Value> = (self.objects.iter())
            .filter(|((kind, key), _)| in_scope(*kind, key))
            .map(|((_, key), (object, _))| (key.clone(), object.clone()))
            .collect();
        // Undo the later changes, newest first.
        for change in self.history.iter().rev().take_while(|c| c.rv > at) {
            match &change.before {
                _ if !in_scope(change.kind, &change.key) => None,
                Some(before) => objects.insert(change.key.clone(), Value::clone(before)),
                None => objects.remove(&change.key),
            };
        }
        Ok(objects
            .into_iter()
            .filter(|(_, o)| filter.matches(o))
            .collect())
    }

    /// A list page. A continue token is `RV/NAMESPACE/NAME`: the snapshot and the
    /// last key served, so later pages come from the same snapshot.
    pub fn list(&self, request: &ListRequest) -> Result<Value, ApiError> {
        let k = request.kind;
        let (at, after) = match request.continue_token.as_deref().filter(|t| !t.is_empty()) {
            None => (request.exact.unwrap_or(self.rv), None),
            Some(token) => {
                let parsed = token
                    .split_once('/')
                    .and_then(|(rv, rest)| Some((rv.parse::<u64>().ok()?, rest.split_once('/')?)));
                let (rv, (ns, name)) =
                    parsed.ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
                if rv < self.compacted {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent \
                         list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(key(ns, name)))
            }
        };
        if at > self.rv {
            return Err(ApiError::new(
                504,
                "Timeout",
                format!("Too large resource version: {at}"),
            ));
        }
        let snapshot = self.snapshot(k, &request.filter, at)?;
        let start = after.map_or(0, |after| {
            snapshot.partition_point(|(key, _)| *key <= after)
        });
        let end = match request.limit {
            0 => snapshot.len(),
            limit => snapshot.len().min(start.saturating_add(limit)),
        };
        let page = &snapshot[start..end];
        let mut metadata = json!({"resourceVersion": at.to_string()});
        if let (true, Some(((ns, name), _))) = (end < snapshot.len(), page.last()) {
            metadata["continue"] = json!(format!("{at}/{ns}/{name}"));
            metadata["remainingItemCount"] = json!(snapshot.len() - end);
        }
        let items: Vec<&Value> = page.iter().map(|(_, object)| object).collect();
        let (api_version, kind) = (KINDS[k].api_version, format!("{}List", KINDS[k].kind));
        Ok(json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}))
    }

    /// Opens a watch: the messages to send first and, unless the stream ends after
    /// them, the receiver of later ones.
    pub fn watch(
        &mut self,
        request: WatchRequest,
    ) -> (VecDeque<WatchMsg>, Option<UnboundedReceiver<WatchMsg>>) {
        let WatchRequest {
            kind: k,
            filter,
            from,
            bookmarks,
            initial_events,
        } = request;
        let current = |store: &Self| -> VecDeque<WatchMsg> {
            let objects = store.snapshot(k, &filter, store.rv).unwrap_or_default();
            let added = objects
                .into_iter()
                .map(|(_, o)| WatchMsg::Event("ADDED", Arc::new(o)));
            added.collect()
        };
        let backlog = match from {
            _ if initial_events => {
                let mut backlog = current(self);
                backlog.push_back(WatchMsg::Bookmark {
                    rv: self.rv,
                    initial_end: true,
                });
                backlog
            }
            None => current(self),
            Some(rv) if rv < self.compacted => {
                return ([WatchMsg::Gone(too_old(rv, self.compacted))].into(), None);
            }
            Some(rv) => (self.history.iter())
                .filter(|change| change.rv > rv && change.kind == k)
                .filter_map(|change| {
                    let event = event_type(change, &filter)?;
                    Some(WatchMsg::Event(event, change.after.clone()))
                })
                .collect(),
        };
        let (tx, rx) = unbounded_channel();
        self.watchers.push(Watcher {
            kind: k,
            filter,
            bookmarks,
            tx,
        });
        (backlog, Some(rx))
    }

    /// Adds a change to the history and sends it to the watches that want it.
    fn record(&mut self, k: usize, key: Key, before: Option<Value>, after: Value, deleted: bool) {
        let (before, after) = (before.map(Arc::new), Arc::new(after));
        let change = Change {
            rv: self.rv,
            kind: k,
            key,
            before,
            after,
            deleted,
        };
        self.watchers
            .retain(|w| match event_type(&change, &w.filter) {
                Some(t) if w.kind == k => {
                    w.tx.send(WatchMsg::Event(t, change.after.clone())).is_ok()
                }
                _ => !w.tx.is_closed(),
            });
        self.history.push_back(change);
        while self.history.len() > MAX_HISTORY {
            self.compacted = self.history.pop_front().map_or(self.compacted, |c| c.rv);
        }
    }

    /// Removes an object at once, with a new resourceVersion on its last state.
    fn remove_now(&mut self, k: usize, key: Key, mut last: Value) -> Value {
        let before = self
            .objects
            .remove(&(k, key.clone()))
            .map(|(object, _)| object);
        self.rv += 1;
        last["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(k, key, before, last.clone(), true);
        last
    }

    /// Stores `object` (new when `before` is None) with its generation, managed fields
    /// and a new resourceVersion; a write that changes nothing stores nothing, and one
    /// that removes the last finalizer of an object marked for deletion deletes it.
    fn commit(
        &mut self,
        k: usize,
        key: Key,
        before: Option<Value>,
        mut object: Value,
        managers: Vec<Manager>,
    ) -> Value {
        let generation = match &before {
            Some(b) => {
                let bump = i64::from(spec_changed(k, b, &object));
                b["metadata"]["generation"].as_i64().unwrap_or(1) + bump
            }
            None => 1,
        };
        object["metadata"]["generation"] = json!(generation);
        let fields = (!managers.is_empty()).then(|| apply::render(&managers, KINDS[k].api_version));
        set_or_remove(&mut object["metadata"], "managedFields", fields);
        if before.as_ref() == Some(&object) {
            return object;
        }
        if finalized(&object) {
            return self.remove_now(k, key, object);
        }
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.objects
            .insert((k, key.clone()), (object.clone(), managers));
        self.record(k, key, before, object.clone(), false);
        object
    }

    /// Sets a new object's type and server-set metadata.
    fn stamp_new(&self, k: usize, key: &Key, object: &mut Value) {
        let kind = &KINDS[k];
        object["apiVersion"] = json!(kind.api_version);
        object["kind"] = json!(kind.kind);
        let meta = &mut object["metadata"];
        SYSTEM_METADATA
            .iter()
            .for_each(|field| set_or_remove(meta, field, None));
        meta["name"] = json!(key.1);
        if kind.namespaced {
            meta["namespace"] = json!(key.0);
        }
        meta["uid"] = json!(new_uid());
        meta["creationTimestamp"] = json!(now());
    }

    /// Copies the server-set metadata of the stored object onto a replacement.
    fn keep_system_metadata(current: &Value, object: &mut Value) {
        for field in SYSTEM_METADATA {
            let value = current["metadata"].get(field).cloned();
            set_or_remove(&mut object["metadata"], field, value);
        }
    }

    /// `metadata.name`, or `generateName` and a random suffix.
    fn new_name(&self, k: usize, ns: &str, object: &Value) -> Result<String, ApiError> {
        if let Some(name) = meta_str(object, "name") {
            return Ok(name.to_string());
        }
        let prefix = meta_str(object, "generateName").ok_or_else(|| {
            ApiError::invalid("metadata.name: Required value: name or generateName is required")
        })?;
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        loop {
            let suffix: String = (random_bytes(5).into_iter())
                .map(|b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
                .collect();
            let name = format!("{prefix}{suffix}");
            if !self.objects.contains_key(&(k, key(ns, &name))) {
                return Ok(name);
            }
        }
    }

    /// POST: a new object, owned by `manager` (as an Update).
    pub fn create(
        &mut self,
        k: usize,
        ns: &str,
        mut object: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let kind = &KINDS[k];
        check_body(k, &object)?;
        if kind.namespaced && meta_str(&object, "namespace").is_some_and(|n| n != ns) {
            return Err(ApiError::bad_request(
                "the object's namespace does not match the request",
            ));
        }
        let key = key(ns, &self.new_name(k, ns, &object)?);
        if self.objects.contains_key(&(k, key.clone())) {
            let message = format!("{} {:?} already exists", kind.plural, key.1);
            return Err(ApiError::new(409, "AlreadyExists", message));
        }
        if kind.status {
            set_or_remove(&mut object, "status", None);
        }
        self.stamp_new(k, &key, &mut object);
        let mut managers = Vec::new();
        apply::record_update(&mut managers, None, &object, (manager, ""), &now());
        Ok(self.commit(k, key, None, object, managers))
    }

    /// PUT, and the end of merge and JSON patches: replaces the object, or through the
    /// status subresource only its status.
    pub fn replace(&mut self, t: &Target, body: Value, manager: &str) -> Result<Value, ApiError> {
        let (current, mut managers) = self.current(t.kind, &t.key())?;
        check_body(t.kind, &body)?;
        if meta_str(&body, "name").is_some_and(|n| n != t.name) {
            return Err(ApiError::bad_request(
                "the name in the body does not match the URL",
            ));
        }
        check_version(t.kind, &t.name, &body, &current)?;
        let mut object = if t.status {
            current.clone()
        } else {
            body.clone()
        };
        if t.status || KINDS[t.kind].status {
            let source = if t.status { &body } else { &current };
            set_or_remove(&mut object, "status", source.get("status").cloned());
        }
        Self::keep_system_metadata(&current, &mut object);
        object["apiVersion"] = json!(KINDS[t.kind].api_version);
        object["kind"] = json!(KINDS[t.kind].kind);
        let writer = (manager, t.subresource());
        apply::record_update(&mut managers, Some(&current), &object, writer, &now());
        Ok(self.commit(t.kind, t.key(), Some(current), object, managers))
    }

    /// Server-side apply; creates a missing object (not through `/status`). Returns
    /// 201 or 200 and the object.
    pub fn apply(
        &mut self,
        t: &Target,
        patch: Value,
        manager: &str,
        force: bool,
    ) -> Result<(u16, Value), ApiError> {
        let k = t.kind;
        check_body(k, &patch)?;
        if meta_str(&patch, "name").is_some_and(|n| n != t.name) {
            return Err(ApiError::bad_request(
                "the name in the body does not match the URL",
            ));
        }
        let mut owned = patch.clone();
        if let Some(map) = owned.as_object_mut() {
            // Each endpoint applies its part only.
            map.retain(|field, _| {
                !(t.status || KINDS[k].status) || (field == "status") == t.status
            });
        }
        let applier = (manager, t.subresource());
        let conflict = |conflicts: Vec<String>| {
            let (n, list) = (conflicts.len(), conflicts.join("; "));
            let s = if n == 1 { "" } else { "s" };
            ApiError::conflict(format!("Apply failed with {n} conflict{s}: {list}"))
        };
        let (current, managers) = match self.current(k, &t.key()) {
            Ok(found) => found,
            Err(e) if t.status => return Err(e),
            Err(_) => {
                let mut base = json!({});
                self.stamp_new(k, &t.key(), &mut base);
                let (object, managers) =
                    apply::apply(&base, &[], &owned, applier, force, &now()).map_err(conflict)?;
                return Ok((201, self.commit(k, t.key(), None, object, managers)));
            }
        };
        check_version(k, &t.name, &patch, &current)?;
        let (object, managers) =
            apply::apply(&current, &managers, &owned, applier, force, &now()).map_err(conflict)?;
        Ok((
            200,
            self.commit(k, t.key(), Some(current), object, managers),
        ))
    }

    /// DELETE: gone at once, or with finalizers only marked (`deletionTimestamp`) until
    /// a write removes the last one. `options` is the DeleteOptions body, if any.
    pub fn delete(&mut self, t: &Target, options: &Value) -> Result<Value, ApiError> {
        let (current, managers) = self.current(t.kind, &t.key())?;
        let preconditions = &options["preconditions"];
        for field in ["uid", "resourceVersion"] {
            let want = preconditions[field].as_str();
            if want.is_some_and(|want| Some(want) != meta_str(&current, field)) {
                return Err(modified(t.kind, &t.name));
            }
        }
        let finalizers = current["metadata"]["finalizers"].as_array();
        if finalizers.is_none_or(Vec::is_empty) {
            return Ok(self.remove_now(t.kind, t.key(), current));
        }
        if meta_str(&current, "deletionTimestamp").is_some() {
            return Ok(current);
        }
        let mut marked = current.clone();
        marked["metadata"]["deletionTimestamp"] = json!(now());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        Ok(self.commit(t.kind, t.key(), Some(current), marked, managers))
    }

    /// DELETE on a collection: deletes every matching object; returns them as a list.
    pub fn delete_collection(&mut self, k: usize, filter: &Filter) -> Result<Value, ApiError> {
        let matching = self.snapshot(k, filter, self.rv)?;
        let mut items = Vec::new();
        for ((namespace, name), _) in matching {
            let target = Target {
                kind: k,
                namespace,
                name,
                status: false,
            };
            items.push(self.delete(&target, &Value::Null)?);
        }
        let (api_version, kind) = (KINDS[k].api_version, format!("{}List", KINDS[k].kind));
        let metadata = json!({"resourceVersion": self.rv.to_string()});
        Ok(json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}))
    }

    /// Deletes at once, finalizers or not (for fixtures); returns the last state.
    pub fn delete_fixture(&mut self, k: usize, ns: &str, name: &str) -> Option<Value> {
        let (current, _) = self.current(k, &key(ns, name)).ok()?;
        Some(self.remove_now(k, key(ns, name), current))
    }

    /// Creates or wholly replaces an object, status included, for fixtures.
    pub fn put_fixture(&mut self, mut object: Value) -> Result<Value, ApiError> {
        let (api_version, kind) = (object["apiVersion"].as_str(), object["kind"].as_str());
        let k = find_kind(api_version.unwrap_or(""), kind.unwrap_or("")).ok_or_else(|| {
            ApiError::bad_request(format!("unknown kind {api_version:?} {kind:?}"))
        })?;
        check_body(k, &object)?;
        let ns = match meta_str(&object, "namespace") {
            _ if !KINDS[k].namespaced => "",
            namespace => namespace.unwrap_or("default"),
        };
        let key = key(ns, &self.new_name(k, ns, &object)?);
        let (before, mut managers) = match self.current(k, &key) {
            Ok((current, managers)) => {
                Self::keep_system_metadata(&current, &mut object);
                (Some(current), managers)
            }
            Err(_) => {
                self.stamp_new(k, &key, &mut object);
                (None, Vec::new())
            }
        };
        apply::record_update(
            &mut managers,
            before.as_ref(),
            &object,
            ("fixture", ""),
            &now(),
        );
        Ok(self.commit(k, key, before, object, managers))
    }
}
