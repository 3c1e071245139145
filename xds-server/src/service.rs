//! The tonic ADS service: one supervised task per stream around [`AdsConnection`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use futures::{Stream, StreamExt};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use tonic::codegen::{BoxFuture, http};
use tonic::transport::server::TcpConnectInfo;
use tonic::{Status, server::NamedService};

use crate::XdsError;
use crate::connection::{AdsConnection, AdsResponse, RequestEvent, TypeSync};
use crate::delta::{
    DeltaAdsConnection, DeltaResponse, Diff, DiffMemo, SubscriptionChange, encode_delta_response,
};
use crate::resource::{Resource, type_url};
use crate::snapshot::{
    Admission, Layer, NodeWatch, Served, Snapshot, SnapshotCache, SnapshotSource, TypedResources,
    lock,
};

/// gRPC path of the SotW ADS method.
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
/// gRPC path of the incremental ADS method.
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// A response that can be written as its protobuf message.
pub trait WireResponse: Send + 'static {
    /// Type URL of the resources in it.
    fn type_url(&self) -> &str;
    /// Version it carries.
    fn version(&self) -> &str;
    /// Number of resources (added or removed) in it.
    fn resource_count(&self) -> usize;
    /// Writes the protobuf message.
    fn encode_wire(&self, dst: &mut impl BufMut);
    /// Length of what [`WireResponse::encode_wire`] writes.
    fn encoded_len(&self) -> usize;
}

/// Encoded length of a string field (numbers below 16: a one-byte key).
fn string_field_len(value: &str) -> usize {
    1 + encoded_len_varint(value.len() as u64) + value.len()
}

impl WireResponse for AdsResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn version(&self) -> &str {
        &self.version_info
    }
    fn resource_count(&self) -> usize {
        self.resources.len()
    }
    fn encode_wire(&self, dst: &mut impl BufMut) {
        encode_response(self, dst);
    }
    fn encoded_len(&self) -> usize {
        [&*self.version_info, &self.type_url, &self.nonce]
            .into_iter()
            .map(string_field_len)
            .sum::<usize>()
            + self.entries().map(Bytes::len).sum::<usize>()
    }
}

impl WireResponse for DeltaResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn version(&self) -> &str {
        &self.system_version_info
    }
    fn resource_count(&self) -> usize {
        self.resources().len() + self.removed.len()
    }
    fn encode_wire(&self, dst: &mut impl BufMut) {
        encode_delta_response(self, dst);
    }
    fn encoded_len(&self) -> usize {
        [&*self.system_version_info, &self.type_url, &self.nonce]
            .into_iter()
            .chain(self.removed.iter().map(String::as_str))
            .map(string_field_len)
            .sum::<usize>()
            + self
                .resources()
                .iter()
                .map(|r| r.delta_entry().len())
                .sum::<usize>()
    }
}

/// An ADS variant's per-stream state machine, as the stream task drives it.
pub trait AdsProtocol: Send + 'static {
    /// `delta` or `sotw`, for status output.
    const NAME: &'static str;
    /// A stream's state machine, sharing what the server shares between streams.
    fn new_stream(memo: &Arc<DiffMemo>) -> Self;
    /// The request message.
    type Request: Message + Default + Send + 'static;
    /// The response the state machine produces.
    type Response: WireResponse;
    /// Type URL of a request.
    fn request_type_url(req: &Self::Request) -> &str;
    /// Applies one request.
    fn on_request(&mut self, req: &Self::Request) -> Result<RequestEvent, XdsError>;
    /// Node id, once known.
    fn node_id(&self) -> Option<&str>;
    /// Responses that bring the proxy to `snapshot`.
    fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<Self::Response>;
    /// Per-type sync state.
    fn sync_state(&self) -> Vec<TypeSync>;
    /// What the proxy was sent last, per type (shared layers, not copies).
    fn served(&self) -> Served;
    /// Calls `visit(type_url, name)` for each name subscribed explicitly (candidates for
    /// on-demand resolution); none where the variant has no on-demand discovery.
    fn visit_explicit_names(&self, _visit: &mut dyn FnMut(&str, &str)) {}
    /// Changes whenever the explicit subscriptions change.
    fn subscription_generation(&self) -> u64 {
        0
    }
    /// Whether `name` of `type_url` is subscribed explicitly.
    fn is_explicit(&self, _type_url: &str, _name: &str) -> bool {
        false
    }
    /// Explicit subscriptions added or dropped since the last call; `None` when they
    /// are not listed (too many, or the variant does not keep them).
    fn drain_subscription_changes(&mut self) -> Option<Vec<SubscriptionChange>> {
        None
    }
    /// What changed between two views (memoised between streams); `None` where the
    /// variant keeps no memo.
    fn view_diff(&self, _old: &TypedResources, _new: &TypedResources) -> Option<Arc<Diff>> {
        None
    }
}

impl AdsProtocol for AdsConnection {
    const NAME: &'static str = "sotw";
    type Request = DiscoveryRequest;
    type Response = AdsResponse;
    fn new_stream(_: &Arc<DiffMemo>) -> Self {
        AdsConnection::new()
    }
    fn request_type_url(req: &DiscoveryRequest) -> &str {
        &req.type_url
    }
    fn on_request(&mut self, req: &DiscoveryRequest) -> Result<RequestEvent, XdsError> {
        AdsConnection::on_request(self, req)
    }
    fn node_id(&self) -> Option<&str> {
        AdsConnection::node_id(self)
    }
    fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<AdsResponse> {
        AdsConnection::next_responses(self, snapshot)
    }
    fn sync_state(&self) -> Vec<TypeSync> {
        AdsConnection::sync_state(self)
    }
    fn served(&self) -> Served {
        AdsConnection::served(self)
    }
}

impl AdsProtocol for DeltaAdsConnection {
    const NAME: &'static str = "delta";
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaResponse;
    fn new_stream(memo: &Arc<DiffMemo>) -> Self {
        DeltaAdsConnection::with_memo(memo.clone())
    }
    fn request_type_url(req: &DeltaDiscoveryRequest) -> &str {
        &req.type_url
    }
    fn on_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<RequestEvent, XdsError> {
        DeltaAdsConnection::on_request(self, req)
    }
    fn node_id(&self) -> Option<&str> {
        DeltaAdsConnection::node_id(self)
    }
    fn next_responses(&mut self, snapshot: &Snapshot) -> Vec<DeltaResponse> {
        DeltaAdsConnection::next_responses(self, snapshot)
    }
    fn sync_state(&self) -> Vec<TypeSync> {
        DeltaAdsConnection::sync_state(self)
    }
    fn served(&self) -> Served {
        DeltaAdsConnection::served(self)
    }
    fn visit_explicit_names(&self, visit: &mut dyn FnMut(&str, &str)) {
        DeltaAdsConnection::visit_explicit_names(self, visit)
    }
    fn subscription_generation(&self) -> u64 {
        DeltaAdsConnection::subscription_generation(self)
    }
    fn is_explicit(&self, type_url: &str, name: &str) -> bool {
        DeltaAdsConnection::is_explicit(self, type_url, name)
    }
    fn drain_subscription_changes(&mut self) -> Option<Vec<SubscriptionChange>> {
        DeltaAdsConnection::drain_subscription_changes(self)
    }
    fn view_diff(&self, old: &TypedResources, new: &TypedResources) -> Option<Arc<Diff>> {
        Some(DeltaAdsConnection::view_diff(self, old, new))
    }
}

/// What a stream presented about who is at the other end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamCredentials {
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The bearer token of the stream's `authorization` metadata, if any.
    pub bearer_token: Option<String>,
}

/// Decides whether a stream may receive its node's own resources (secrets included).
pub trait StreamPolicy: Send + Sync + std::fmt::Debug {
    /// [`Admission::Own`] when the stream may have `node`'s own snapshot (it waits for
    /// it), [`Admission::Fallback`] for a node the control plane does not know,
    /// [`Admission::Denied`] with the reason when it may not have it. Asked on every
    /// wake of the stream: a policy that asks elsewhere caches its answers.
    fn check<'a>(
        &'a self,
        node: &'a str,
        credentials: &'a StreamCredentials,
    ) -> futures::future::BoxFuture<'a, Admission>;
}

/// Resolves resources a proxy subscribes to by name that its snapshot does not hold:
/// on-demand discovery (Envoy asks for a cluster when a connection first needs it).
pub trait OnDemandResolver: Send + Sync + std::fmt::Debug {
    /// The resource `name` of `type_url` for `node` (`own`: served its own snapshot,
    /// so it has an identity), or `None` when there is no such resource.
    fn resolve(&self, node: &str, own: bool, type_url: &str, name: &str) -> Option<Resource>;
}

/// What `proxy-status` shows for one connected stream.
#[derive(Clone, Debug, Default)]
pub struct StreamSync {
    /// Node id the proxy announced.
    pub node_id: Option<String>,
    /// Peer address of the stream.
    pub peer: Option<SocketAddr>,
    /// Per-type sync state.
    pub types: Vec<TypeSync>,
    /// Why the stream is denied its node's own resources, if it is.
    pub denied: Option<String>,
    /// `delta` or `sotw`.
    pub protocol: &'static str,
    /// What the proxy was sent last (on-demand resources included).
    pub served: Served,
}

/// Sync state of every open stream, keyed by stream id. Each stream writes its own
/// slot, so a thousand streams answering one change do not queue on one lock.
#[derive(Debug, Default)]
pub struct SyncRegistry {
    streams: Mutex<HashMap<u64, Arc<Mutex<StreamSync>>>>,
    denials: AtomicU64,
    nacks: AtomicU64,
}

impl SyncRegistry {
    /// The slot stream `id` keeps its state in.
    fn slot(&self, id: u64) -> Arc<Mutex<StreamSync>> {
        lock(&self.streams).entry(id).or_default().clone()
    }

    fn remove(&self, id: u64) {
        lock(&self.streams).remove(&id);
    }

    /// Streams denied their node's own resources so far (a metric).
    pub fn denials(&self) -> u64 {
        self.denials.load(Ordering::Relaxed)
    }

    /// NACKs received so far (a metric).
    pub fn nacks(&self) -> u64 {
        self.nacks.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> usize {
        lock(&self.streams).len()
    }

    /// What `node`'s stream was sent last (its first stream, if several).
    pub fn served(&self, node: &str) -> Option<Snapshot> {
        let streams = lock(&self.streams);
        let mut ids: Vec<&u64> = streams.keys().collect();
        ids.sort();
        ids.into_iter().find_map(|id| {
            let s = lock(&streams[id]);
            (s.node_id.as_deref() == Some(node)).then(|| s.served.snapshot())
        })
    }

    /// A copy of every stream's state, ordered by node id.
    pub fn list(&self) -> Vec<StreamSync> {
        let slots: Vec<Arc<Mutex<StreamSync>>> = lock(&self.streams).values().cloned().collect();
        let mut all: Vec<StreamSync> = slots.iter().map(|s| lock(s).clone()).collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        all
    }
}

/// Owns the per-stream tasks; [`StreamSupervisor::run`] fails if any of them panics.
#[derive(Debug)]
pub struct StreamSupervisor {
    handles: mpsc::UnboundedReceiver<JoinHandle<()>>,
}

impl StreamSupervisor {
    /// Waits on every stream task; returns an error as soon as one panicked.
    pub async fn run(mut self) -> Result<(), XdsError> {
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                handle = self.handles.recv() => match handle {
                    Some(h) => running.push(h),
                    None if running.is_empty() => return Ok(()),
                    None => {}
                },
                Some(done) = running.next(), if !running.is_empty() => {
                    if let Err(e) = done
                        && e.is_panic()
                    {
                        return Err(XdsError::StreamTaskPanicked(e.to_string()));
                    }
                }
            }
        }
    }
}

/// The ADS gRPC service (state of the world), serving snapshots from a [`SnapshotCache`].
#[derive(Clone, Debug)]
pub struct AdsService {
    cache: Arc<SnapshotCache>,
    policy: Option<Arc<dyn StreamPolicy>>,
    on_demand: Option<Arc<dyn OnDemandResolver>>,
    registry: Arc<SyncRegistry>,
    next_stream: Arc<AtomicU64>,
    spawned: mpsc::UnboundedSender<JoinHandle<()>>,
    memo: Arc<DiffMemo>,
    closing: Arc<watch::Sender<bool>>,
}

impl AdsService {
    /// A service over `cache`, with the supervisor that must be run beside it.
    pub fn new(cache: Arc<SnapshotCache>) -> (Self, StreamSupervisor) {
        let (spawned, handles) = mpsc::unbounded_channel();
        let service = Self {
            cache,
            policy: None,
            on_demand: None,
            registry: Arc::default(),
            next_stream: Arc::default(),
            spawned,
            memo: Arc::default(),
            closing: Arc::new(watch::channel(false).0),
        };
        (service, StreamSupervisor { handles })
    }

    /// Checks every stream with `policy` before serving it its node's own resources.
    pub fn with_policy(mut self, policy: Arc<dyn StreamPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Resolves names no snapshot holds with `resolver` (on-demand discovery).
    pub fn with_on_demand(mut self, resolver: Arc<dyn OnDemandResolver>) -> Self {
        self.on_demand = Some(resolver);
        self
    }

    /// Sync state of all open streams.
    pub fn registry(&self) -> Arc<SyncRegistry> {
        self.registry.clone()
    }

    /// Ends every open stream with `UNAVAILABLE` so that proxies reconnect (to another
    /// replica, or to this one after a restart); streams opened later end at once.
    pub fn close_streams(&self) {
        self.closing.send_replace(true);
    }

    /// Starts a state-of-the-world stream task for `requests`; responses arrive on the
    /// returned channel.
    pub fn open_stream<S>(
        &self,
        credentials: StreamCredentials,
        requests: S,
    ) -> mpsc::Receiver<Result<Box<AdsResponse>, Status>>
    where
        S: Stream<Item = Result<DiscoveryRequest, Status>> + Send + Unpin + 'static,
    {
        self.open::<AdsConnection, S>(credentials, requests)
    }

    /// Starts an incremental (delta) stream task for `requests`.
    pub fn open_delta_stream<S>(
        &self,
        credentials: StreamCredentials,
        requests: S,
    ) -> mpsc::Receiver<Result<Box<DeltaResponse>, Status>>
    where
        S: Stream<Item = Result<DeltaDiscoveryRequest, Status>> + Send + Unpin + 'static,
    {
        self.open::<DeltaAdsConnection, S>(credentials, requests)
    }

    fn open<P, S>(
        &self,
        credentials: StreamCredentials,
        requests: S,
    ) -> mpsc::Receiver<Result<Box<P::Response>, Status>>
    where
        P: AdsProtocol,
        S: Stream<Item = Result<P::Request, Status>> + Send + Unpin + 'static,
    {
        // Responses are boxed: the channel allocates slots 32 at a time, and a slot of a
        // pointer instead of a 120-byte response saves 3.5 KiB per stream.
        let (tx, rx) = mpsc::channel(16);
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let cache = self.cache.clone();
        let registry = self.registry.clone();
        let policy = self.policy.clone();
        let on_demand = self.on_demand.clone();
        let closing = self.closing.subscribe();
        let conn = P::new_stream(&self.memo);
        let handle = tokio::spawn(async move {
            let stream = StreamContext {
                id,
                credentials,
                closing,
                cache: &cache,
                registry: &registry,
                policy: policy.as_deref(),
                on_demand: on_demand.as_deref(),
            };
            run_stream::<P, S>(stream, conn, requests, tx).await;
            registry.remove(id);
        });
        // The supervisor is gone only during shutdown; the task still runs to completion.
        let _ = self.spawned.send(handle);
        rx
    }
}

/// What a stream task works with besides its requests and responses.
struct StreamContext<'a> {
    id: u64,
    credentials: StreamCredentials,
    closing: watch::Receiver<bool>,
    cache: &'a Arc<SnapshotCache>,
    registry: &'a SyncRegistry,
    policy: Option<&'a dyn StreamPolicy>,
    on_demand: Option<&'a dyn OnDemandResolver>,
}

/// A stream's on-demand resources: resolved again whenever what the proxy should have
/// changes, and kept as the same layers while they resolve the same.
#[derive(Default)]
struct OnDemandLayers {
    by_type: std::collections::BTreeMap<String, Arc<Layer>>,
    /// Subscribed names the snapshot lacked, and what that was computed against: a
    /// proxy subscribes to thousands of names, and walking them all on every wake of
    /// every stream (each pod change wakes them all) would cost more than the push.
    missing: Vec<(String, String)>,
    missing_for: Option<(Arc<Snapshot>, u64)>,
    /// Types with explicit subscriptions when `missing` was last computed in full.
    explicit_types: Vec<String>,
}

impl OnDemandLayers {
    /// Whether the proxy subscribed to names its snapshot lacks (resolved on demand).
    fn has_missing(&self) -> bool {
        !self.missing.is_empty()
    }

    /// Updates `missing` for subscriptions added or dropped, judged against `snapshot`.
    fn follow_subscriptions(&mut self, changes: &[SubscriptionChange], snapshot: &Snapshot) {
        for c in changes {
            let (t, n) = (&c.type_url, &*c.name);
            if !c.subscribed {
                self.missing.retain(|(mt, mn)| mt != t || mn != n);
                continue;
            }
            if !self.explicit_types.contains(t) {
                self.explicit_types.push(t.clone());
            }
            if !snapshot.resources(t).is_some_and(|v| v.contains(n)) {
                list_missing(&mut self.missing, t, n);
            }
        }
    }

    /// Updates `missing` from `old` to `new` (same subscriptions) by what the views of
    /// the subscribed types changed: names that appeared are no longer missing, and
    /// subscribed names that went are. False if the protocol cannot tell.
    fn follow_changes<P: AdsProtocol>(&mut self, conn: &P, old: &Snapshot, new: &Snapshot) -> bool {
        let empty = TypedResources::default();
        for type_url in &self.explicit_types {
            let before = old.resources(type_url).unwrap_or(&empty);
            let after = new.resources(type_url).unwrap_or(&empty);
            if before.same_layers(after) {
                continue;
            }
            let Some(diff) = conn.view_diff(before, after) else {
                return false;
            };
            if !self.missing.is_empty() {
                let appeared: std::collections::BTreeSet<&str> =
                    diff.changed.iter().map(Resource::name).collect();
                self.missing
                    .retain(|(t, n)| t != type_url || !appeared.contains(n.as_str()));
            }
            for name in &diff.removed {
                if conn.is_explicit(type_url, name) {
                    list_missing(&mut self.missing, type_url, name);
                }
            }
        }
        true
    }

    /// `snapshot` plus the explicitly subscribed names it lacks, resolved.
    fn apply<P: AdsProtocol>(
        &mut self,
        conn: &mut P,
        resolver: Option<&dyn OnDemandResolver>,
        source: SnapshotSource,
        snapshot: Arc<Snapshot>,
    ) -> Arc<Snapshot> {
        // Drained on every call, so the list never piles up.
        let changes = conn.drain_subscription_changes();
        let (Some(resolver), Some(node)) = (resolver, conn.node_id()) else {
            return snapshot;
        };
        let generation = conn.subscription_generation();
        let current = self
            .missing_for
            .as_ref()
            .is_some_and(|(s, g)| Arc::ptr_eq(s, &snapshot) && *g == generation);
        if !current {
            let moved = match (self.missing_for.clone(), changes) {
                (Some((old, _)), Some(changes)) => {
                    self.follow_subscriptions(&changes, &snapshot);
                    self.follow_changes(&*conn, &old, &snapshot)
                }
                _ => false,
            };
            if !moved {
                self.missing.clear();
                self.explicit_types.clear();
                conn.visit_explicit_names(&mut |type_url, name| {
                    if self.explicit_types.last().map(String::as_str) != Some(type_url) {
                        self.explicit_types.push(type_url.to_string());
                    }
                    if !snapshot
                        .resources(type_url)
                        .is_some_and(|t| t.contains(name))
                    {
                        self.missing.push((type_url.to_string(), name.to_string()));
                    }
                });
            }
            self.missing_for = Some((snapshot.clone(), generation));
        }
        let mut wanted: std::collections::BTreeMap<String, Vec<Resource>> = Default::default();
        for (type_url, name) in &self.missing {
            let resolved = resolver.resolve(node, source == SnapshotSource::Own, type_url, name);
            let entry = wanted.entry(type_url.clone()).or_default();
            entry.extend(resolved);
        }
        self.by_type.retain(|t, _| wanted.contains_key(t));
        if wanted.values().all(Vec::is_empty) {
            self.by_type.clear();
            return snapshot;
        }
        let mut extra = Snapshot::new();
        for (type_url, resources) in wanted {
            let layer = Layer::new(resources);
            let layer = match self.by_type.get(&type_url) {
                Some(same) if **same == layer => same.clone(),
                _ => Arc::new(layer),
            };
            self.by_type.insert(type_url.clone(), layer.clone());
            // Only the types a snapshot serves can be missing from one.
            if let Some(type_url) = type_url::known(&type_url) {
                extra.add_layer(type_url, layer);
            }
        }
        Arc::new(Snapshot::layered(&[&snapshot, &extra]))
    }
}

/// Adds `name` of `type_url` to `missing` unless it is listed already.
fn list_missing(missing: &mut Vec<(String, String)>, type_url: &str, name: &str) {
    if !missing.iter().any(|(t, n)| t == type_url && n == name) {
        missing.push((type_url.to_string(), name.to_string()));
    }
}

/// Drives one stream: requests and snapshot changes in, responses out.
async fn run_stream<P, S>(
    ctx: StreamContext<'_>,
    mut conn: P,
    mut requests: S,
    tx: mpsc::Sender<Result<Box<P::Response>, Status>>,
) where
    P: AdsProtocol,
    S: Stream<Item = Result<P::Request, Status>> + Unpin,
{
    let StreamContext {
        id,
        credentials,
        mut closing,
        cache,
        registry,
        policy,
        on_demand,
    } = ctx;
    let peer = credentials.peer;
    let mut denied: Option<String> = None;
    let mut snapshots: Option<NodeWatch> = None;
    let mut source = None;
    let mut extra = OnDemandLayers::default();
    let slot = registry.slot(id);
    loop {
        // Whether what `proxy-status` shows may have changed: a request came, a
        // response went or the verdict changed (most wakes of most streams do neither).
        let mut touched = false;
        let mut sent = false;
        if *closing.borrow_and_update() {
            let _ = tx
                .send(Err(Status::unavailable(
                    "the control plane is shutting down; reconnect",
                )))
                .await;
            return;
        }
        tokio::select! {
            _ = closing.changed() => continue,
            req = requests.next() => match req {
                None => return,
                Some(Err(status)) => {
                    tracing::debug!(stream = id, %status, "ADS stream ended by the proxy");
                    return;
                }
                Some(Ok(req)) => {
                    touched = true;
                    match conn.on_request(&req) {
                    Err(e) => {
                        tracing::warn!(stream = id, ?peer, error = %e, "rejecting ADS stream");
                        let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return;
                    }
                    Ok(RequestEvent::Nack(nack)) => {
                        registry.nacks.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                        stream = id,
                        node = conn.node_id().unwrap_or_default(),
                        r#type = type_url::short_name(P::request_type_url(&req)),
                        version = %nack.version,
                        error = %nack.message,
                        "proxy rejected config (NACK); keeping its last good config until the next change"
                        );
                    }
                    Ok(event) => tracing::debug!(stream = id, r#type = type_url::short_name(P::request_type_url(&req)), ?event, "ADS request"),
                    }
                }
            },
            changed = async {
                match snapshots.as_mut() {
                    Some(w) => w.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if snapshots.is_none() {
            snapshots = conn.node_id().map(|n| cache.watch(n, P::NAME));
        }
        let mut admission = Admission::OwnOrFallback;
        if let Some(node) = conn.node_id()
            && let Some(policy) = policy
        {
            admission = policy.check(node, &credentials).await;
            let verdict = match &admission {
                Admission::Denied(reason) => Some(reason.clone()),
                _ => None,
            };
            if verdict.is_some() && verdict != denied {
                registry.denials.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    stream = id,
                    node,
                    ?peer,
                    reason = verdict.as_deref().unwrap_or_default(),
                    "proxy failed the identity check; it gets no secrets and no workload config"
                );
            }
            touched |= verdict != denied;
            denied = verdict;
        }
        if let Some(w) = snapshots.as_mut()
            && let Some((snapshot, now)) = w.current(&admission)
        {
            let snapshot = extra.apply(&mut conn, on_demand, now, snapshot);
            w.set_on_demand(extra.has_missing());
            if source != Some(now) {
                let node = conn.node_id().unwrap_or_default();
                match now {
                    SnapshotSource::Own => tracing::info!(
                        stream = id,
                        node,
                        ?peer,
                        "serving the proxy its workload's config"
                    ),
                    SnapshotSource::Fallback => tracing::warn!(
                        stream = id,
                        node,
                        ?peer,
                        "proxy is not a known workload; serving outbound config only"
                    ),
                }
                source = Some(now);
            }
            for response in conn.next_responses(&snapshot) {
                tracing::debug!(
                    stream = id,
                    r#type = type_url::short_name(response.type_url()),
                    version = %response.version(),
                    resources = response.resource_count(),
                    "pushing"
                );
                if tx.send(Ok(Box::new(response))).await.is_err() {
                    return;
                }
                sent = true;
            }
        }
        if touched || sent {
            let mut s = lock(&slot);
            if s.node_id.as_deref() != conn.node_id() {
                s.node_id = conn.node_id().map(str::to_string);
            }
            s.peer = peer;
            s.types = conn.sync_state();
            s.denied = denied.clone();
            s.protocol = P::NAME;
            if sent {
                s.served = conn.served();
            }
        }
    }
}

/// Writes `response` as a `DiscoveryResponse` protobuf message.
pub fn encode_response(response: &AdsResponse, dst: &mut impl BufMut) {
    // Field numbers of DiscoveryResponse: version_info = 1, resources = 2, type_url = 4, nonce = 5.
    for (field, value) in [
        (1, &*response.version_info),
        (4, &response.type_url),
        (5, &response.nonce),
    ] {
        encode_key(field, WireType::LengthDelimited, dst);
        encode_varint(value.len() as u64, dst);
        dst.put_slice(value.as_bytes());
    }
    for entry in response.entries() {
        dst.put_slice(entry);
    }
}

/// The requests of one stream, decoded from the gRPC messages of `body`.
///
/// Not tonic's `Streaming`: its buffer keeps the size of the largest request for the
/// life of the stream, and a proxy's largest are its first endpoint subscription (tens
/// of KiB) and a reconnect listing everything it holds (hundreds): per stream, for
/// good. This buffer is dropped once a large message is read out of it.
fn request_messages<R: Message + Default + 'static>(
    body: tonic::body::Body,
) -> impl Stream<Item = Result<R, Status>> + Send + Unpin + 'static {
    Box::pin(futures::stream::unfold(
        Some((body, BytesMut::new())),
        |state| async move {
            let (mut body, mut buf) = state?;
            loop {
                match next_message(&mut buf) {
                    Ok(Some(message)) => {
                        let decoded = R::decode(message).map_err(|e| {
                            Status::invalid_argument(format!("malformed discovery request: {e}"))
                        });
                        release_large(&mut buf);
                        let rest = decoded.is_ok().then_some((body, buf));
                        return Some((decoded, rest));
                    }
                    Ok(None) => {}
                    Err(status) => return Some((Err(status), None)),
                }
                match body.frame().await {
                    None if buf.is_empty() => return None,
                    None => {
                        let status = Status::invalid_argument("ADS request cut short");
                        return Some((Err(status), None));
                    }
                    Some(Err(status)) => return Some((Err(status), None)),
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                }
            }
        },
    ))
}

/// The next whole gRPC message in `buf`, taken out of it; `None` until one is whole.
fn next_message(buf: &mut BytesMut) -> Result<Option<Bytes>, Status> {
    if buf.len() < GRPC_HEADER {
        return Ok(None);
    }
    if buf[0] != 0 {
        return Err(Status::unimplemented(
            "compressed ADS requests are not supported",
        ));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&buf[1..GRPC_HEADER]);
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_REQUEST_BYTES {
        return Err(Status::resource_exhausted(format!(
            "ADS request of {len} bytes; the limit is {MAX_REQUEST_BYTES}"
        )));
    }
    // No room is reserved for a declared length: the buffer grows only with what
    // actually arrives.
    if buf.len() < GRPC_HEADER + len {
        return Ok(None);
    }
    buf.advance(GRPC_HEADER);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Largest request buffer a stream keeps between messages (most requests are ACKs of
/// a few hundred bytes).
const KEPT_REQUEST_BUFFER: usize = 4 * 1024;

/// Frees `buf` once it is empty and larger than a stream keeps.
fn release_large(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > KEPT_REQUEST_BUFFER {
        *buf = BytesMut::new();
    }
}

/// Largest request accepted (a reconnect lists every resource the proxy has).
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// One response as a gRPC length-prefixed message, in a buffer of its own that is
/// freed once written. (tonic's encoder keeps one buffer per stream as large as the
/// largest batch it ever sent: with ten thousand streams, most of the server's memory.)
fn grpc_message(response: &impl WireResponse) -> Bytes {
    let mut buf = BytesMut::with_capacity(GRPC_HEADER + response.encoded_len());
    buf.put_bytes(0, GRPC_HEADER);
    response.encode_wire(&mut buf);
    debug_assert_eq!(buf.len() - GRPC_HEADER, response.encoded_len());
    let len = u32::try_from(buf.len() - GRPC_HEADER).unwrap_or(u32::MAX);
    buf[1..GRPC_HEADER].copy_from_slice(&len.to_be_bytes());
    buf.freeze()
}

/// Compression flag and message length.
const GRPC_HEADER: usize = 5;

/// The response body of one stream: its messages, then the trailers with the status.
fn response_body<R: WireResponse>(
    rx: mpsc::Receiver<Result<Box<R>, Status>>,
) -> impl Stream<Item = Result<Frame<Bytes>, Status>> + Send {
    futures::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        let (status, rest) = match rx.recv().await {
            Some(Ok(response)) => {
                return Some((Ok(Frame::data(grpc_message(&*response))), Some(rx)));
            }
            Some(Err(status)) => (status, None),
            None => (Status::ok(""), None),
        };
        let mut trailers = http::HeaderMap::new();
        if let Err(e) = status.add_header(&mut trailers) {
            tracing::warn!(error = %e, "ADS status does not fit in trailers");
        }
        Some((Ok(Frame::trailers(trailers)), rest))
    })
}

fn serve_method<P: AdsProtocol>(
    service: AdsService,
    req: http::Request<tonic::body::Body>,
) -> BoxFuture<http::Response<tonic::body::Body>, Infallible> {
    let credentials = StreamCredentials {
        peer: req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr),
        bearer_token: req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string()),
    };
    if req.headers().contains_key("grpc-encoding") {
        let status = Status::unimplemented("compressed ADS requests are not supported");
        return Box::pin(async { Ok(status.into_http()) });
    }
    let requests = request_messages::<P::Request>(req.into_body());
    let rx = service.open::<P, _>(credentials, requests);
    let body = tonic::body::Body::new(StreamBody::new(response_body(rx)));
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Box::pin(async { Ok(response) })
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl tower_service::Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match req.uri().path() {
            SOTW_PATH => serve_method::<AdsConnection>(self.clone(), req),
            DELTA_PATH => serve_method::<DeltaAdsConnection>(self.clone(), req),
            _ => Box::pin(async { Ok(Status::unimplemented("not an ADS method").into_http()) }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly
mod tests {
    use super::*;

    /// A gRPC message of `request`, with `flag` as its compression byte.
    fn framed(request: &DeltaDiscoveryRequest, flag: u8) -> Vec<u8> {
        let body = request.encode_to_vec();
        let mut out = vec![flag];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A request body that arrives in `chunks`.
    fn body(chunks: Vec<Vec<u8>>) -> tonic::body::Body {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, Status>(Frame::data(Bytes::from(c))));
        tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)))
    }

    fn request(names: usize) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url::ENDPOINT.into(),
            resource_names_subscribe: (0..names)
                .map(|i| format!("outbound|8080||svc-{i}"))
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn requests_are_read_across_and_within_chunks() {
        let (a, b, c) = (request(1), request(3000), request(2));
        let mut bytes = framed(&a, 0);
        bytes.extend(framed(&b, 0));
        bytes.extend(framed(&c, 0));
        // Cut anywhere: inside a header, inside a large message, two in one chunk.
        let chunks: Vec<Vec<u8>> = bytes.chunks(7001).map(<[u8]>::to_vec).collect();
        let got: Vec<_> = request_messages::<DeltaDiscoveryRequest>(body(chunks))
            .collect()
            .await;
        let got: Vec<_> = got.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, vec![a, b, c]);
    }

    #[tokio::test]
    async fn a_bad_request_ends_the_stream_with_a_status() {
        let cases = [
            (vec![framed(&request(1), 1)], tonic::Code::Unimplemented),
            (
                vec![vec![0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]],
                tonic::Code::ResourceExhausted,
            ),
            (
                vec![framed(&request(10), 0)[..20].to_vec()],
                tonic::Code::InvalidArgument,
            ),
            (
                vec![vec![0, 0, 0, 0, 3, 0xff, 0xff, 0xff]],
                tonic::Code::InvalidArgument,
            ),
        ];
        for (chunks, code) in cases {
            let got: Vec<_> = request_messages::<DeltaDiscoveryRequest>(body(chunks))
                .collect()
                .await;
            assert_eq!(got.len(), 1, "one error, then the end: {got:?}");
            assert_eq!(got[0].as_ref().unwrap_err().code(), code, "{got:?}");
        }
    }

    #[test]
    fn a_large_request_leaves_no_large_buffer_behind() {
        let large = framed(&request(3000), 0);
        // As the reader's buffer grows while chunks arrive: room beyond the message.
        let mut buf = BytesMut::with_capacity(2 * large.len());
        buf.extend_from_slice(&large);
        let message = next_message(&mut buf).unwrap().expect("whole");
        assert!(DeltaDiscoveryRequest::decode(message).is_ok());
        assert_eq!(next_message(&mut buf).unwrap(), None);
        assert!(
            buf.capacity() > KEPT_REQUEST_BUFFER,
            "the room is left behind"
        );
        release_large(&mut buf);
        assert!(buf.capacity() <= KEPT_REQUEST_BUFFER, "{}", buf.capacity());
        // A small buffer, or one still holding part of a message, is kept.
        let mut small = BytesMut::with_capacity(1024);
        release_large(&mut small);
        assert_eq!(small.capacity(), 1024);
        let mut partial = BytesMut::from(&large[..large.len() - 1]);
        assert_eq!(next_message(&mut partial).unwrap(), None);
        release_large(&mut partial);
        assert_eq!(partial.len(), large.len() - 1);
    }
}
