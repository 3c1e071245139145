//! The state of one incremental (delta) ADS stream, with no I/O.
//!
//! Per type it remembers which resources the proxy has (name → version) and sends
//! only what changed: one changed cluster out of a thousand is one resource on the
//! wire, not a thousand. Additions go out in make-before-break order, removals last.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::BufMut;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use prost::encoding::{WireType, encode_key, encode_varint};

use crate::XdsError;
use crate::connection::{
    Nack, RequestEvent, TypeSync, desired_resources, record_ack, remember_node,
};
use crate::resource::{Resource, type_url};
use crate::snapshot::{
    LayerItems, LayerRef, Served, Snapshot, TypedResources, Version, lock, same_arcs,
};

/// A delta response ready to go on the wire; resource bytes are shared, not copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaResponse {
    /// `system_version_info`: the version of the type's whole set after this response.
    pub system_version_info: Version,
    /// Type URL of every resource in it.
    pub type_url: String,
    /// Nonce the proxy echoes back in its ACK or NACK.
    pub nonce: String,
    /// Added or changed resources: `span` of a vector often shared with every stream
    /// making the same move.
    shared: Arc<Vec<Resource>>,
    span: Range<usize>,
    /// Names of resources the proxy must drop (or that do not exist).
    pub removed: Vec<String>,
}

impl DeltaResponse {
    /// The added or changed resources this response carries.
    pub fn resources(&self) -> &[Resource] {
        &self.shared[self.span.clone()]
    }
}

/// Encoded size above which a type's changes are split over several responses, so a
/// stream holds at most about this much beyond what the proxy has read: a thousand
/// proxies connecting at once must not each pin a whole mesh's worth of bytes. Each
/// stream's encode buffer keeps the size of its largest response; at 1000 proxies of a
/// 1000-service mesh, 256 KiB left the control plane at 525 MiB, 64 KiB at 250 MiB,
/// in the same sync time and CPU.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Splits `resources` into consecutive spans of at most [`MAX_RESPONSE_BYTES`] each
/// (a single larger resource gets a span of its own).
fn spans(resources: &[Resource]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in resources.iter().enumerate() {
        let len = r.delta_entry().len();
        if i > start && bytes + len > MAX_RESPONSE_BYTES {
            out.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < resources.len() {
        out.push(start..resources.len());
    }
    out
}

fn put_string(field: u32, value: &str, dst: &mut impl BufMut) {
    encode_key(field, WireType::LengthDelimited, dst);
    encode_varint(value.len() as u64, dst);
    dst.put_slice(value.as_bytes());
}

/// Writes `response` as a `DeltaDiscoveryResponse` protobuf message.
pub fn encode_delta_response(response: &DeltaResponse, dst: &mut impl BufMut) {
    // DeltaDiscoveryResponse: system_version_info = 1, resources = 2, type_url = 4,
    // nonce = 5, removed_resources = 6.
    put_string(1, &response.system_version_info, dst);
    for r in response.resources() {
        dst.put_slice(r.delta_entry());
    }
    put_string(4, &response.type_url, dst);
    put_string(5, &response.nonce, dst);
    for name in &response.removed {
        put_string(6, name, dst);
    }
}

/// What a proxy has of one type, as far as the stream knows.
#[derive(Clone, Debug)]
enum Known {
    /// Exactly the view sent last: usually the snapshot's own layers, shared, so a
    /// thousand streams cost one set of layers and an unchanged type costs a few
    /// pointer compares.
    Sent(TypedResources),
    /// Name → version, as the proxy declared on reconnect or after an unsubscribe.
    Versions(BTreeMap<String, String>),
}

impl Default for Known {
    fn default() -> Self {
        Self::Sent(TypedResources::default())
    }
}

impl Known {
    fn contains(&self, name: &str) -> bool {
        match self {
            Self::Sent(m) => m.contains(name),
            Self::Versions(v) => v.contains_key(name),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Sent(m) => m.len(),
            Self::Versions(v) => v.len(),
        }
    }

    /// Drops `name`; `withheld` names of a sent view are not the proxy's either.
    fn forget(&mut self, name: &str, withheld: &BTreeSet<String>) {
        if !self.contains(name) {
            return;
        }
        let mut versions = match self {
            Self::Sent(m) => m
                .iter()
                .filter(|r| !withheld.contains(r.name()))
                .map(|r| (r.name().to_string(), r.version().to_string()))
                .collect(),
            Self::Versions(v) => std::mem::take(v),
        };
        versions.remove(name);
        *self = Self::Versions(versions);
    }

    /// Resources of `desired` the proxy lacks or has in another version, and names it
    /// has that `desired` does not. Layers the two views share cost a pointer compare;
    /// the diff of two shared layers is computed once for every stream (`memo`).
    fn diff(&self, desired: &TypedResources, memo: &DiffMemo) -> Arc<Diff> {
        match self {
            Self::Sent(sent) => diff_views(sent, desired, memo),
            Self::Versions(versions) => {
                let changed = desired
                    .iter()
                    .filter(|r| versions.get(r.name()).map(String::as_str) != Some(r.version()))
                    .cloned()
                    .collect();
                let removed = versions
                    .keys()
                    .filter(|n| !desired.contains(n))
                    .cloned()
                    .collect();
                Arc::new(Diff {
                    changed: Arc::new(changed),
                    removed,
                })
            }
        }
    }
}

/// The diff between two views, layer by layer when they have the same shape (the
/// usual case: each layer replaced by its next version, or kept). A resource may move
/// between layers: a name removed from one layer but present in the new view is not a
/// removal, and one that moved unchanged is not re-sent. Every name a changed layer
/// touches is judged by what the whole view shows (a layer may shadow another's
/// resource): what `desired` shows there is sent when the proxy has another version.
fn diff_views(sent: &TypedResources, desired: &TypedResources, memo: &DiffMemo) -> Arc<Diff> {
    let (old, new) = (sent.layers(), desired.layers());
    let empty = empty_layer();
    let first = |layers: &[LayerRef]| layers.first().cloned().unwrap_or_else(|| empty.clone());
    if sent.same_layers(desired) {
        return Arc::default();
    }
    if old.len() <= 1 && new.len() <= 1 {
        // One layer each: the memoised diff is the answer as is (shared between streams).
        return memo.diff(&first(old), &first(new));
    }
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let mut pairs = 0;
    for i in 0..old.len().max(new.len()) {
        let (a, b) = (old.get(i).unwrap_or(&empty), new.get(i).unwrap_or(&empty));
        if Arc::ptr_eq(a, b) {
            continue;
        }
        pairs += 1;
        let d = memo.diff(a, b);
        let names = d
            .changed
            .iter()
            .map(Resource::name)
            .chain(d.removed.iter().map(String::as_str));
        for name in names {
            match desired.get(name) {
                None => removed.push(name.to_string()),
                Some(r) if sent.get(name).map(Resource::version) != Some(r.version()) => {
                    changed.push(r.clone());
                }
                Some(_) => {}
            }
        }
    }
    if pairs > 1 {
        // A name that moved between layers (or is shadowed) is met more than once.
        changed.sort_by(|a, b| a.name().cmp(b.name()));
        changed.dedup_by(|a, b| a.name() == b.name());
        removed.sort();
        removed.dedup();
    }
    Arc::new(Diff {
        changed: Arc::new(changed),
        removed,
    })
}

/// What moving a proxy from one resource set to another takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Resources added or changed.
    pub changed: Arc<Vec<Resource>>,
    /// Names no longer there.
    pub removed: Vec<String>,
}

/// How many recent diffs are remembered: a few pushes in flight at once.
const MEMO_ENTRIES: usize = 16;

/// Diffs of smaller layers (a proxy's own, its on-demand ones) are cheaper to redo
/// than to look up, and would only push shared diffs out of the memo.
const MEMO_MIN_RESOURCES: usize = 64;

/// The one empty layer every new stream starts from, so their first diffs share the memo.
fn empty_layer() -> LayerRef {
    static EMPTY: std::sync::LazyLock<LayerRef> = std::sync::LazyLock::new(LayerRef::default);
    EMPTY.clone()
}

/// Recent diffs between shared layers: when a thousand streams move from the same
/// layer to the same layer, the diff is computed once. Entries hold both layers, so a
/// pointer match can never be a reused address.
#[derive(Debug, Default)]
pub struct DiffMemo {
    recent: Mutex<VecDeque<(LayerRef, LayerRef, Arc<Diff>)>>,
}

impl DiffMemo {
    fn diff(&self, from: &LayerRef, to: &LayerRef) -> Arc<Diff> {
        if Arc::ptr_eq(from, to) {
            return Arc::default();
        }
        if from.items().len().max(to.items().len()) < MEMO_MIN_RESOURCES {
            return Arc::new(diff_sorted(from.items(), to.items()));
        }
        let found = {
            let recent = lock(&self.recent);
            recent
                .iter()
                .find(|(f, t, _)| Arc::ptr_eq(f, from) && Arc::ptr_eq(t, to))
                .map(|(_, _, d)| d.clone())
        };
        if let Some(diff) = found {
            return diff;
        }
        let diff = Arc::new(diff_sorted(from.items(), to.items()));
        let mut recent = lock(&self.recent);
        if recent.len() == MEMO_ENTRIES {
            recent.pop_front();
        }
        recent.push_back((from.clone(), to.clone(), diff.clone()));
        diff
    }
}

#[derive(Clone, Debug, Default)]
struct DeltaTypeState {
    wildcard: bool,
    /// Names subscribed explicitly: one set shared by every stream subscribed to the
    /// same names (a thousand proxies of a mesh subscribe to the same thousand endpoints).
    names: NameSet,
    /// What the proxy has.
    known: Known,
    /// Subscribed names the proxy must hear about even when they do not exist.
    unanswered: BTreeSet<Name>,
    /// `known` is a whole view the snapshot offered, every name of it subscribed or
    /// `withheld`: the next view's diff (memoised across streams) then tells what to
    /// send without walking thousands of subscribed names.
    covered: bool,
    /// Names of the `known` view the proxy was not sent because it has not subscribed
    /// to them (yet: a new cluster's endpoints come before the proxy asks for them).
    /// A few at most; more, and the stream keeps a view of its own instead. Shared
    /// with what the stream reports as served.
    withheld: Arc<BTreeSet<String>>,
    /// A request is waiting for a response even if nothing changed.
    must_respond: bool,
    /// Version of the type's set per nonce in flight, to report ACKs.
    /// (nonce, version), oldest first: a few at most, so a vector (a map's first node
    /// costs half a KiB per type per stream).
    in_flight: Vec<(u64, Version)>,
    sent_version: Option<Version>,
    /// When `sent_version` was first sent.
    sent_at: Option<SystemTime>,
    responses: u64,
    acked_version: Option<Version>,
    /// When the proxy first ACKed `acked_version`.
    acked_at: Option<SystemTime>,
    nack: Option<Nack>,
}

/// The incremental ADS state machine of one stream.
#[derive(Debug, Default)]
pub struct DeltaAdsConnection {
    node_id: Option<String>,
    // Boxed: a map node has room for 11 entries, and six types use six.
    types: BTreeMap<String, Box<DeltaTypeState>>,
    nonce_seq: u64,
    memo: Arc<DiffMemo>,
    /// Bumped whenever an explicit subscription is added or dropped.
    subscriptions: u64,
    /// Explicit subscriptions added or dropped since the last drain, in order; `None`
    /// once more than [`MAX_LOGGED_CHANGES`] piled up (the reader then starts over).
    changes: Option<Vec<SubscriptionChange>>,
}

impl DeltaAdsConnection {
    /// A connection that has seen no request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection sharing `memo` with the other streams of a server.
    pub fn with_memo(memo: Arc<DiffMemo>) -> Self {
        Self {
            memo,
            ..Self::default()
        }
    }

    /// Node id from the first request that carried one.
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Applies one request from the proxy.
    pub fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<RequestEvent, XdsError> {
        remember_node(&mut self.node_id, &req.type_url, req.node.as_ref())?;
        let is_new = !self.types.contains_key(&req.type_url);
        let state = self.types.entry(req.type_url.clone()).or_default();
        if is_new {
            // A reconnect tells what the proxy already has: only differences are sent.
            state.known = Known::Versions(
                req.initial_resource_versions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            state.wildcard = type_url::is_wildcard_type(&req.type_url)
                && req.resource_names_subscribe.is_empty();
            state.must_respond = true;
        }
        if req.resource_names_subscribe.iter().any(|n| n == "*") {
            state.wildcard = true;
        }
        let subscribed_before = self.subscriptions;
        for name in intern(&req.resource_names_subscribe) {
            if state.names.contains(&name) {
                continue;
            }
            if Arc::make_mut(&mut state.names).insert(name.clone()) {
                log_change(&mut self.changes, &req.type_url, name.clone(), true);
                state.unanswered.insert(name);
                self.subscriptions += 1;
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                state.wildcard = false;
            } else if state.names.contains(name.as_str())
                && Arc::make_mut(&mut state.names).remove(name.as_str())
            {
                state.unanswered.remove(name.as_str());
                state.covered = false;
                self.subscriptions += 1;
                log_change(
                    &mut self.changes,
                    &req.type_url,
                    name.as_str().into(),
                    false,
                );
            }
            // The proxy drops what it unsubscribed from; it must not hear of it again.
            state.known.forget(name, &state.withheld);
            if !state.withheld.is_empty() && matches!(state.known, Known::Versions(_)) {
                state.withheld = Arc::default();
                state.covered = false;
            }
        }
        if self.subscriptions != subscribed_before {
            state.names = share_names(std::mem::take(&mut state.names));
        }
        if !req.resource_names_subscribe.is_empty() {
            state.must_respond = true;
        }
        if req.response_nonce.is_empty() {
            return Ok(if is_new {
                RequestEvent::Subscribe
            } else {
                RequestEvent::SubscriptionChanged
            });
        }
        let answered = req
            .response_nonce
            .parse::<u64>()
            .ok()
            .and_then(|n| state.in_flight.iter().position(|(f, _)| *f == n));
        let Some(at) = answered else {
            return Ok(RequestEvent::Stale);
        };
        // Older responses in flight were answered in order before this one.
        let version = state
            .in_flight
            .drain(..=at)
            .next_back()
            .map(|(_, v)| v)
            .unwrap_or_default();
        if let Some(status) = &req.error_detail {
            let nack = Nack {
                version,
                nonce: req.response_nonce.clone(),
                message: status.message.clone(),
            };
            state.nack = Some(nack.clone());
            return Ok(RequestEvent::Nack(nack));
        }
        record_ack(&mut state.acked_version, &mut state.acked_at, &version);
        state.nack = None;
        if !req.resource_names_subscribe.is_empty() || !req.resource_names_unsubscribe.is_empty() {
            return Ok(RequestEvent::SubscriptionChanged);
        }
        Ok(RequestEvent::Ack { version })
    }

    /// Responses that bring the proxy to `snapshot`: changed resources per type in
    /// make-before-break order (CDS, EDS, SDS, LDS, RDS), then the removals.
    pub fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<DeltaResponse> {
        let ordered = type_url::in_push_order(self.types.keys());
        let mut out = Vec::new();
        let mut removals = Vec::new();
        // Clusters the proxy had that change: each new version warms until it gets its
        // ClusterLoadAssignment (named as the cluster), and Envoy does not ask again
        // for a name it is subscribed to, so those go out again, changed or not.
        let mut rewarm: Vec<String> = Vec::new();
        for type_url in ordered {
            let Some(state) = self.types.get_mut(&type_url) else {
                continue;
            };
            let available = snapshot.resources(&type_url);
            let still_covered = match (&state.known, available) {
                (Known::Sent(sent), Some(available)) if state.covered && !state.wildcard => {
                    let diff = diff_views(sent, available, &self.memo);
                    withhold(state, diff, available)
                        .map(|diff| (available.clone(), available.shared_version(), diff))
                }
                _ => None,
            };
            let (desired, version, mut diff) = match still_covered {
                Some(found) => found,
                None => {
                    let (desired, version) =
                        desired_resources(state.wildcard, &state.names, available);
                    let diff = state.known.diff(&desired, &self.memo);
                    state.withheld = Arc::default();
                    (desired, version, diff)
                }
            };
            state.covered = available.is_some_and(|a| a.same_layers(&desired));
            if type_url == type_url::CLUSTER && state.known.len() > 0 {
                rewarm = diff
                    .changed
                    .iter()
                    .filter(|r| state.known.contains(r.name()))
                    .map(|r| r.name().to_string())
                    .collect();
            } else if type_url == type_url::ENDPOINT && !rewarm.is_empty() {
                // A settings change can touch every cluster and endpoint: no pairwise scan.
                let going: BTreeSet<&str> = diff.changed.iter().map(Resource::name).collect();
                let again: Vec<Resource> = rewarm
                    .iter()
                    .filter(|n| !going.contains(n.as_str()) && !state.withheld.contains(*n))
                    .filter_map(|n| desired.get(n).cloned())
                    .collect();
                if !again.is_empty() {
                    let mut changed = (*diff.changed).clone();
                    changed.extend(again);
                    diff = Arc::new(Diff {
                        changed: Arc::new(changed),
                        removed: diff.removed.clone(),
                    });
                }
            }
            let mut removed = diff.removed.clone();
            // Subscribed names that do not exist are answered as removed, so the proxy
            // stops waiting for them.
            removed.extend(
                state
                    .unanswered
                    .iter()
                    .filter(|n| !desired.contains(n) && !state.known.contains(n))
                    .map(|n| n.to_string()),
            );
            removed.sort();
            removed.dedup();
            state.unanswered.clear();
            let must_respond = std::mem::take(&mut state.must_respond);
            // After this round the proxy has exactly `desired`.
            state.known = Known::Sent(desired);
            if diff.changed.is_empty() && removed.is_empty() && must_respond {
                out.push(self.respond(&type_url, Arc::default(), 0..0, vec![], &version));
            }
            for span in spans(&diff.changed) {
                // The memo's vector, shared with every stream making this move.
                let changed = diff.changed.clone();
                out.push(self.respond(&type_url, changed, span, Vec::new(), &version));
            }
            if !removed.is_empty() {
                removals.push((type_url, removed, version));
            }
        }
        for (type_url, removed, version) in removals {
            out.push(self.respond(&type_url, Arc::default(), 0..0, removed, &version));
        }
        out
    }

    fn respond(
        &mut self,
        type_url: &str,
        shared: Arc<Vec<Resource>>,
        span: Range<usize>,
        removed: Vec<String>,
        version: &Version,
    ) -> DeltaResponse {
        let version = version.clone();
        self.nonce_seq += 1;
        let nonce = self.nonce_seq.to_string();
        let state = self.types.entry(type_url.to_string()).or_default();
        state.responses += 1;
        if state.sent_version.as_deref() != Some(&*version) {
            state.sent_at = Some(SystemTime::now());
        }
        state.sent_version = Some(version.clone());
        state.in_flight.push((self.nonce_seq, version.clone()));
        DeltaResponse {
            system_version_info: version,
            type_url: type_url.to_string(),
            nonce,
            shared,
            span,
            removed,
        }
    }

    /// Calls `visit(type_url, name)` for every name subscribed explicitly (beside any
    /// wildcard).
    pub fn visit_explicit_names(&self, visit: &mut dyn FnMut(&str, &str)) {
        for (type_url, state) in &self.types {
            for name in state.names.iter() {
                visit(type_url, name);
            }
        }
    }

    /// Changes whenever an explicit subscription is added or dropped.
    pub fn subscription_generation(&self) -> u64 {
        self.subscriptions
    }

    /// The explicit subscriptions added or dropped since the last call, in order; `None`
    /// if too many to list (walk [`DeltaAdsConnection::visit_explicit_names`] instead).
    pub fn drain_subscription_changes(&mut self) -> Option<Vec<SubscriptionChange>> {
        self.changes.replace(Vec::new())
    }

    /// Whether `name` of `type_url` is subscribed explicitly.
    pub fn is_explicit(&self, type_url: &str, name: &str) -> bool {
        self.types
            .get(type_url)
            .is_some_and(|s| s.names.contains(name))
    }

    /// What changed from `old` to `new`, with the diffs of shared layers memoised.
    pub fn view_diff(&self, old: &TypedResources, new: &TypedResources) -> Arc<Diff> {
        diff_views(old, new, &self.memo)
    }

    /// What the proxy was sent last, per type (a type known only by the versions the
    /// proxy declared on reconnect is left out until it is answered).
    pub fn served(&self) -> Served {
        let sent = || {
            self.types.iter().filter_map(|(t, s)| match &s.known {
                Known::Sent(view) => Some((t, view, &s.withheld)),
                Known::Versions(_) => None,
            })
        };
        let views = Snapshot::from_views(sent().map(|(t, view, _)| (t.as_str(), view.clone())));
        let withheld = sent()
            .filter(|(_, _, w)| !w.is_empty())
            .map(|(t, _, w)| (t.clone(), w.clone()))
            .collect();
        Served::new(views, withheld)
    }

    /// Per-type sync state.
    pub fn sync_state(&self) -> Vec<TypeSync> {
        self.types
            .iter()
            .map(|(t, s)| TypeSync {
                type_name: type_url::short_name(t),
                sent_version: s.sent_version.clone(),
                acked_version: s.acked_version.clone(),
                sent_resources: s.known.len() - s.withheld.len(),
                responses: s.responses,
                last_nack: s.nack.clone(),
                sent_at: s.sent_at,
                acked_at: s.acked_at,
            })
            .collect()
    }
}

/// A subscribed resource name, shared: a thousand proxies subscribing to the same
/// thousand endpoints hold one copy of each name, not a thousand.
type Name = Arc<str>;

/// Every subscribed name in the process, one copy each.
static NAMES: std::sync::LazyLock<Mutex<NameTable>> = std::sync::LazyLock::new(Mutex::default);

#[derive(Debug, Default)]
struct NameTable {
    names: std::collections::HashSet<Name>,
    /// Size at which names no stream holds any more are swept out.
    sweep_at: usize,
}

/// Smallest table that is swept.
const MIN_SWEEP: usize = 4096;

/// `names` (but `*`) as shared copies, under one lock for a whole request.
fn intern(names: &[String]) -> Vec<Name> {
    if names.is_empty() {
        return Vec::new();
    }
    let mut table = lock(&NAMES);
    let out = names
        .iter()
        .filter(|n| *n != "*")
        .map(|n| match table.names.get(n.as_str()) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Name = Arc::from(n.as_str());
                table.names.insert(shared.clone());
                shared
            }
        })
        .collect();
    let NameTable { names, sweep_at } = &mut *table;
    sweep_when_grown(names, sweep_at, MIN_SWEEP, |n| Arc::strong_count(n) > 1);
    out
}

/// Drops the entries of a process-wide sharing table that nobody else holds, once it
/// has grown to `sweep_at`; the next sweep waits until it has doubled again (or reached
/// `min`), so sweeping costs in proportion to what was added.
fn sweep_when_grown<T: std::hash::Hash + Eq>(
    table: &mut std::collections::HashSet<T>,
    sweep_at: &mut usize,
    min: usize,
    held: impl Fn(&T) -> bool,
) {
    if table.len() >= *sweep_at {
        table.retain(held);
        *sweep_at = (table.len() * 2).max(min);
    }
}

/// A set of subscribed names, shared between the streams that subscribe to just these.
type NameSet = Arc<BTreeSet<Name>>;

/// Every stream's subscribed-name set, one copy of each distinct set.
static NAME_SETS: std::sync::LazyLock<Mutex<NameSetTable>> =
    std::sync::LazyLock::new(Mutex::default);

#[derive(Debug, Default)]
struct NameSetTable {
    sets: std::collections::HashSet<SameNames>,
    /// Size at which sets no stream holds any more are swept out.
    sweep_at: usize,
}

/// Smallest set table that is swept.
const MIN_SET_SWEEP: usize = 256;

/// The shared copy of `names`: the one already in use when another stream subscribes
/// to the same names, else `names`, now shared. Sets of a few names are left alone.
fn share_names(names: NameSet) -> NameSet {
    if names.len() < MIN_SHARED_SET {
        return names;
    }
    let key = SameNames(names);
    let mut table = lock(&NAME_SETS);
    if let Some(shared) = table.sets.get(&key) {
        return shared.0.clone();
    }
    let names = key.0.clone();
    let NameSetTable { sets, sweep_at } = &mut *table;
    sets.insert(key);
    sweep_when_grown(sets, sweep_at, MIN_SET_SWEEP, |s| {
        Arc::strong_count(&s.0) > 1
    });
    names
}

/// Smallest set worth looking up in [`NAME_SETS`].
const MIN_SHARED_SET: usize = 16;

/// A name set compared by the identity of its (interned) names: hashing a pointer per
/// name, not its text. Equal names interned apart compare unequal, which only misses a
/// chance to share.
#[derive(Debug)]
struct SameNames(NameSet);

impl PartialEq for SameNames {
    fn eq(&self, other: &Self) -> bool {
        same_arcs(self.0.iter(), other.0.iter())
    }
}

impl Eq for SameNames {}

impl std::hash::Hash for SameNames {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_usize(self.0.len());
        for name in self.0.iter() {
            state.write_usize(Arc::as_ptr(name).cast::<u8>() as usize);
        }
    }
}

/// An explicit subscription added or dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionChange {
    /// Type URL of the name.
    pub type_url: String,
    /// The resource name (shared with the subscription).
    pub name: Arc<str>,
    /// Added (or dropped).
    pub subscribed: bool,
}

/// Most subscription changes remembered between two drains: a proxy subscribing to a
/// whole mesh at once is walked in full instead of listed.
const MAX_LOGGED_CHANGES: usize = 256;

fn log_change(log: &mut Option<Vec<SubscriptionChange>>, type_url: &str, name: Name, on: bool) {
    if let Some(changes) = log {
        if changes.len() >= MAX_LOGGED_CHANGES {
            *log = None;
            return;
        }
        changes.push(SubscriptionChange {
            type_url: type_url.to_string(),
            name,
            subscribed: on,
        });
    }
}

/// Most names a stream withholds from a view before it keeps a view of its own.
const MAX_WITHHELD: usize = 64;

/// The part of `diff` (from `state`'s covered view to `available`) the proxy may get:
/// changes to names it has not subscribed to are withheld, withheld names it has now
/// subscribed to are sent, and withheld names that went are not its to remove. The
/// memo's shared diff as is when none of that applies (the usual case); `None` when too
/// much would be withheld.
fn withhold(
    state: &mut DeltaTypeState,
    diff: Arc<Diff>,
    available: &TypedResources,
) -> Option<Arc<Diff>> {
    let names = &state.names;
    let withheld = &state.withheld;
    let touches = diff.changed.iter().any(|r| !names.contains(r.name()))
        || (!withheld.is_empty()
            && (diff.removed.iter().any(|n| withheld.contains(n))
                || state.unanswered.iter().any(|n| withheld.contains(&**n))));
    if !touches {
        return Some(diff);
    }
    let mut next = BTreeSet::clone(withheld);
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    for r in diff.changed.iter() {
        if names.contains(r.name()) {
            next.remove(r.name());
            changed.push(r.clone());
        } else {
            next.insert(r.name().to_string());
        }
    }
    for name in &diff.removed {
        if !next.remove(name) {
            removed.push(name.clone());
        }
    }
    for name in &state.unanswered {
        if next.remove(&**name)
            && let Some(r) = available.get(name)
        {
            changed.push(r.clone());
        }
    }
    if next.len() > MAX_WITHHELD {
        return None;
    }
    state.withheld = Arc::new(next);
    changed.sort_by(|a, b| a.name().cmp(b.name()));
    changed.dedup_by(|a, b| a.name() == b.name());
    Some(Arc::new(Diff {
        changed: Arc::new(changed),
        removed,
    }))
}

/// Walks two name-sorted maps once, side by side (no lookups): what `desired` adds or
/// changes, and what `sent` has that `desired` dropped.
fn diff_sorted(sent: &LayerItems, desired: &LayerItems) -> Diff {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let mut old = sent.iter().peekable();
    for (name, new) in desired.iter() {
        loop {
            match old.peek() {
                Some((o, _)) if *o < name => {
                    removed.push(o.to_string());
                    old.next();
                }
                _ => break,
            }
        }
        match old.peek() {
            Some((o, r)) if *o == name => {
                if r.version() != new.version() {
                    changed.push(new.clone());
                }
                old.next();
            }
            _ => changed.push(new.clone()),
        }
    }
    removed.extend(old.map(|(o, _)| o.to_string()));
    Diff {
        changed: Arc::new(changed),
        removed,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly
mod tests {
    use super::*;

    fn request(subscribe: &[String], unsubscribe: &[String]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(envoy_types::pb::envoy::config::core::v3::Node {
                id: "ns/pod".into(),
                ..Default::default()
            }),
            type_url: type_url::ENDPOINT.into(),
            resource_names_subscribe: subscribe.to_vec(),
            resource_names_unsubscribe: unsubscribe.to_vec(),
            ..Default::default()
        }
    }

    fn names_of(conn: &DeltaAdsConnection) -> NameSet {
        conn.types[type_url::ENDPOINT].names.clone()
    }

    #[test]
    fn streams_subscribed_to_the_same_names_share_one_set_and_part_on_a_change() {
        let all: Vec<String> = (0..40).map(|i| format!("shared-set-test-{i}")).collect();
        let (mut a, mut b) = (DeltaAdsConnection::new(), DeltaAdsConnection::new());
        // The same names, in two requests for one stream and one for the other.
        a.on_request(&request(&all[..25], &[])).unwrap();
        a.on_request(&request(&all[25..], &[])).unwrap();
        b.on_request(&request(&all, &[])).unwrap();
        assert!(Arc::ptr_eq(&names_of(&a), &names_of(&b)));
        // One unsubscribes: it gets a set of its own, the other keeps every name.
        b.on_request(&request(&[], &all[..1])).unwrap();
        assert!(!Arc::ptr_eq(&names_of(&a), &names_of(&b)));
        assert_eq!(names_of(&a).len(), 40);
        assert_eq!(names_of(&b).len(), 39);
        assert!(a.is_explicit(type_url::ENDPOINT, &all[0]));
        assert!(!b.is_explicit(type_url::ENDPOINT, &all[0]));
        // Subscribing again to what it has changes nothing it shares.
        let before = names_of(&a);
        a.on_request(&request(&all[..3], &[])).unwrap();
        assert!(Arc::ptr_eq(&before, &names_of(&a)));
    }
}
