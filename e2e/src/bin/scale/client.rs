//! Simulated proxies: one tokio task per proxy, each a real gRPC delta ADS stream that
//! behaves like Envoy (wildcard subscriptions, endpoints subscribed by name for each EDS
//! cluster received, an ACK for every response, reconnects with
//! `initial_resource_versions`) but cheaply: only cluster bodies are decoded, and only
//! as far as their endpoint names; names and versions are kept (interned, shared
//! between proxies).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Buf;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::Service;
use tonic::codegen::http::Uri;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;

/// The xDS types a simulated proxy subscribes to, in this order.
pub const TYPES: [&str; 6] = [
    "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "type.googleapis.com/envoy.config.listener.v3.Listener",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
    // Route scopes: what a real sidecar's outbound connection managers subscribe to.
    "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration",
];
pub const CDS: usize = 0;
pub const EDS: usize = 1;
pub const LDS: usize = 2;
pub const RDS: usize = 3;

pub fn short_type(t: usize) -> &'static str {
    ["CDS", "EDS", "LDS", "RDS", "SDS", "SRDS"]
        .get(t)
        .copied()
        .unwrap_or("?")
}

const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// Reconnect backoff: doubling from the first value up to the cap, with jitter. Short,
/// so the restart measurement is dominated by the control plane, not by the clients.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_millis(1000);
/// A connection attempt that takes longer is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

// --- wire types: only the fields the bench reads; prost skips the rest (the bodies) ---

/// `DeltaDiscoveryResponse` without resource bodies.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeltaResponseHead {
    #[prost(string, tag = "1")]
    pub system_version_info: String,
    #[prost(message, repeated, tag = "2")]
    pub resources: Vec<ResourceHead>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub nonce: String,
    #[prost(string, repeated, tag = "6")]
    pub removed_resources: Vec<String>,
}

/// `envoy.service.discovery.v3.Resource`: version (1) and name (3); the `Any` body (2) is skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceHead {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "3")]
    pub name: String,
}

/// A CDS response's clusters, read only as far as Envoy needs to subscribe to their
/// endpoints.
#[derive(Clone, PartialEq, prost::Message)]
struct ClusterResponseBody {
    #[prost(message, repeated, tag = "2")]
    resources: Vec<ClusterEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ClusterEntry {
    #[prost(message, optional, tag = "2")]
    resource: Option<AnyBody>,
    #[prost(string, tag = "3")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AnyBody {
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `Cluster`: `type` (2) and `eds_cluster_config` (3) only.
#[derive(Clone, PartialEq, prost::Message)]
struct ClusterKind {
    #[prost(int32, optional, tag = "2")]
    discovery_type: Option<i32>,
    #[prost(message, optional, tag = "3")]
    eds_cluster_config: Option<EdsClusterConfigHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EdsClusterConfigHead {
    #[prost(string, tag = "2")]
    service_name: String,
}

/// `Cluster.DiscoveryType.EDS`.
const DISCOVERY_TYPE_EDS: i32 = 3;

/// A response head and its size on the wire (protobuf bytes, before gRPC framing).
#[derive(Debug)]
pub struct Received {
    pub head: DeltaResponseHead,
    pub bytes: usize,
    /// For clusters: each EDS cluster's name and the endpoint name it subscribes to.
    pub eds: Vec<(String, String)>,
}

/// Encodes requests with prost; decodes responses into [`Received`] (names only).
#[derive(Clone, Copy, Debug, Default)]
struct AdsCodec;

#[derive(Debug)]
struct RequestEncoder;

#[derive(Debug)]
struct HeadDecoder;

impl Codec for AdsCodec {
    type Encode = DeltaDiscoveryRequest;
    type Decode = Received;
    type Encoder = RequestEncoder;
    type Decoder = HeadDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        HeadDecoder
    }
}

impl Encoder for RequestEncoder {
    type Item = DeltaDiscoveryRequest;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(buf)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

impl Decoder for HeadDecoder {
    type Item = Received;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let size = buf.remaining();
        let body = buf.copy_to_bytes(size);
        let bad = |e: prost::DecodeError| tonic::Status::internal(e.to_string());
        let head = DeltaResponseHead::decode(body.clone()).map_err(bad)?;
        let mut eds = Vec::new();
        if head.type_url == TYPES[CDS] {
            for entry in ClusterResponseBody::decode(body).map_err(bad)?.resources {
                let value = entry.resource.map(|a| a.value).unwrap_or_default();
                let kind = ClusterKind::decode(value.as_slice()).map_err(bad)?;
                if kind.discovery_type == Some(DISCOVERY_TYPE_EDS) {
                    let service = kind
                        .eds_cluster_config
                        .map(|c| c.service_name)
                        .filter(|s| !s.is_empty())
                        .unwrap_or_else(|| entry.name.clone());
                    eds.push((entry.name, service));
                }
            }
        }
        Ok(Some(Received {
            head,
            bytes: size,
            eds,
        }))
    }
}

/// Connects from the pod's IP: the control plane serves a proxy its workload's config
/// only when the stream comes from the pod's address.
#[derive(Clone, Debug)]
struct PodConnector {
    source: Ipv4Addr,
    server: SocketAddr,
}

impl Service<Uri> for PodConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (source, server) = (self.source, self.server);
        Box::pin(async move {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
            let stream = socket.connect(server).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}

// --- shared strings ---

/// FxHash (rustc's hasher): the default SipHash showed up in profiles of the initial
/// sync, and these keys come from our own control plane, not from an adversary.
#[derive(Clone, Copy, Debug, Default)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = std::hash::BuildHasherDefault<FxHasher>;
type NameMap = HashMap<Arc<str>, Arc<str>, FxBuild>;

/// Names and versions are the same strings in thousands of proxies: keep one copy.
static INTERNED: LazyLock<Mutex<HashSet<Arc<str>, FxBuild>>> = LazyLock::new(Mutex::default);

fn intern_all<'a>(strings: impl Iterator<Item = &'a str>) -> Vec<Arc<str>> {
    let mut set = INTERNED.lock().unwrap_or_else(PoisonError::into_inner);
    strings
        .map(|s| match set.get(s) {
            Some(a) => a.clone(),
            None => {
                let a: Arc<str> = Arc::from(s);
                set.insert(a.clone());
                a
            }
        })
        .collect()
}

// --- one proxy ---

/// What the bench waits for on one proxy.
#[derive(Clone, Debug)]
pub enum Watch {
    /// Resource `name` of type `type_index` has a version other than the one it had
    /// when the watch was set (appearing and disappearing count).
    Resource { type_index: usize, name: String },
    /// Any response of one of these types that adds, changes or removes something.
    AnyChange { types: Vec<usize> },
}

#[derive(Debug)]
struct Waiter {
    watch: Watch,
    baseline: Option<Arc<str>>,
    /// Gets the instant the ACK of the response that satisfied the watch was sent.
    done: oneshot::Sender<Instant>,
}

#[derive(Debug, Default)]
struct ProxyState {
    /// Per type: resource name → version.
    resources: [NameMap; TYPES.len()],
    /// Per type: answered at least once on the current stream.
    answered: [bool; TYPES.len()],
    /// Endpoint names subscribed on this stream and not answered yet (sent or removed).
    endpoints_waiting: HashSet<Arc<str>, FxBuild>,
    /// EDS clusters the proxy has → the endpoint name each subscribes to.
    endpoints_of: HashMap<Arc<str>, Arc<str>, FxBuild>,
    waiters: Vec<Waiter>,
    /// When the current stream had every type answered.
    synced_at: Option<Instant>,
}

/// One simulated proxy, shared between its task and the bench.
#[derive(Debug)]
pub struct Proxy {
    pub node: String,
    pub pod_ip: Ipv4Addr,
    /// Index of the pod in the mesh.
    pub pod: usize,
    state: Mutex<ProxyState>,
    /// Streams opened so far (each reconnect is a new one).
    generation: AtomicU64,
    in_sync: AtomicBool,
    responses: AtomicU64,
    bytes: AtomicU64,
}

impl Proxy {
    pub fn new(node: String, pod_ip: Ipv4Addr, pod: usize) -> Proxy {
        Proxy {
            node,
            pod_ip,
            pod,
            state: Mutex::default(),
            generation: AtomicU64::new(0),
            in_sync: AtomicBool::new(false),
            responses: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every type answered on the current stream.
    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::Acquire)
    }

    pub fn synced_at(&self) -> Option<Instant> {
        self.lock().synced_at
    }

    pub fn responses(&self) -> u64 {
        self.responses.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn has_resource(&self, type_index: usize, name: &str) -> bool {
        self.lock()
            .resources
            .get(type_index)
            .is_some_and(|m| m.contains_key(name))
    }

    pub fn resource_count(&self) -> usize {
        self.lock().resources.iter().map(NameMap::len).sum()
    }

    /// Registers `watch`; the baseline is read under the same lock, so no update can slip
    /// between reading it and waiting.
    pub fn watch(&self, watch: Watch) -> oneshot::Receiver<Instant> {
        let (done, rx) = oneshot::channel();
        let mut state = self.lock();
        let baseline = match &watch {
            Watch::Resource { type_index, name } => state
                .resources
                .get(*type_index)
                .and_then(|m| m.get(name.as_str()).cloned()),
            Watch::AnyChange { .. } => None,
        };
        state.waiters.push(Waiter {
            watch,
            baseline,
            done,
        });
        rx
    }

    pub fn has_pending_watch(&self) -> bool {
        !self.lock().waiters.is_empty()
    }

    /// Drops watches that were never satisfied (after a timeout).
    pub fn clear_watches(&self) {
        self.lock().waiters.clear();
    }

    /// Applies one response; returns whether it changed anything, and (for clusters) the
    /// endpoint subscription it calls for, as Envoy makes one per EDS cluster: names to
    /// subscribe to and to drop.
    fn apply(&self, t: usize, received: &Received) -> (bool, Vec<Arc<str>>, Vec<String>) {
        let head = &received.head;
        let names = intern_all(
            head.resources
                .iter()
                .flat_map(|r| [r.name.as_str(), r.version.as_str()]),
        );
        let mut state = self.lock();
        let state = &mut *state;
        let Some(map) = state.resources.get_mut(t) else {
            return (false, Vec::new(), Vec::new());
        };
        for pair in names.chunks_exact(2) {
            map.insert(pair[0].clone(), pair[1].clone());
        }
        for name in &head.removed_resources {
            map.remove(name.as_str());
        }
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        if t == CDS {
            let eds: HashMap<&str, &str> = received
                .eds
                .iter()
                .map(|(c, e)| (c.as_str(), e.as_str()))
                .collect();
            let touched = head.resources.iter().map(|r| r.name.as_str());
            for cluster in touched.chain(head.removed_resources.iter().map(String::as_str)) {
                let now = eds.get(cluster).copied();
                let before = state.endpoints_of.get(cluster).cloned();
                if before.as_deref() == now {
                    continue;
                }
                if let Some(old) = before {
                    state.endpoints_of.remove(cluster);
                    unsubscribe.push(old.to_string());
                }
                if let Some(new) = now
                    && let [cluster, new] = &intern_all([cluster, new].into_iter())[..]
                {
                    state.endpoints_of.insert(cluster.clone(), new.clone());
                    subscribe.push(new.clone());
                }
            }
            for name in &unsubscribe {
                state.endpoints_waiting.remove(name.as_str());
                state.resources[EDS].remove(name.as_str());
            }
            state.endpoints_waiting.extend(subscribe.iter().cloned());
        }
        if t == EDS {
            for r in &head.resources {
                state.endpoints_waiting.remove(r.name.as_str());
            }
            for name in &head.removed_resources {
                state.endpoints_waiting.remove(name.as_str());
            }
        }
        let changed = !head.resources.is_empty() || !head.removed_resources.is_empty();
        (changed, subscribe, unsubscribe)
    }

    /// After the ACK of a response of type `t` went out at `acked`: marks the type
    /// answered and wakes the watches it satisfied.
    fn after_ack(&self, t: usize, changed: bool, acked: Instant) {
        let mut state = self.lock();
        if let Some(a) = state.answered.get_mut(t) {
            *a = true;
        }
        if state.synced_at.is_none()
            && state.answered.iter().all(|a| *a)
            && state.endpoints_waiting.is_empty()
        {
            state.synced_at = Some(acked);
            self.in_sync.store(true, Ordering::Release);
        }
        if state.waiters.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut state.waiters);
        for w in waiters {
            let fired = match &w.watch {
                Watch::Resource { type_index, name } => {
                    *type_index == t
                        && state
                            .resources
                            .get(t)
                            .map(|m| m.get(name.as_str()).cloned())
                            .unwrap_or_default()
                            != w.baseline
                }
                Watch::AnyChange { types } => changed && types.contains(&t),
            };
            if fired {
                let _ = w.done.send(acked);
            } else {
                state.waiters.push(w);
            }
        }
    }

    /// A new stream starts: nothing answered on it yet.
    fn stream_started(&self) {
        let mut state = self.lock();
        state.answered = [false; TYPES.len()];
        state.synced_at = None;
        // Resubscribed in the first requests: every EDS cluster's endpoints. Those the
        // proxy already has are declared in `initial_resource_versions` and come again
        // only if they changed, so only the others are waited for.
        let held = &state.resources[EDS];
        state.endpoints_waiting = state
            .endpoints_of
            .values()
            .filter(|n| !held.contains_key(&**n))
            .cloned()
            .collect();
        self.in_sync.store(false, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn stream_ended(&self) {
        self.in_sync.store(false, Ordering::Release);
    }

    /// The first request of every type: wildcard (endpoints: the clusters it has), with
    /// what the proxy already has.
    fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        let state = self.lock();
        TYPES
            .iter()
            .enumerate()
            .map(|(t, type_url)| DeltaDiscoveryRequest {
                // Envoy sends the node on the first message only.
                node: (t == 0).then(|| Node {
                    id: self.node.clone(),
                    cluster: self.node.clone(),
                    ..Default::default()
                }),
                type_url: type_url.to_string(),
                resource_names_subscribe: if t == EDS {
                    state.endpoints_of.values().map(|n| n.to_string()).collect()
                } else {
                    vec!["*".to_string()]
                },
                initial_resource_versions: state
                    .resources
                    .get(t)
                    .into_iter()
                    .flatten()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .collect()
    }
}

/// Runs one proxy until the task is aborted: connect, stream, reconnect.
async fn run_proxy(proxy: Arc<Proxy>, server: SocketAddr, connect_permits: Arc<Semaphore>) {
    let mut failures: u32 = 0;
    loop {
        match stream_once(&proxy, server, &connect_permits).await {
            // A stream that got at least one response resets the backoff.
            Ok(true) => failures = 0,
            Ok(false) | Err(_) => failures = failures.saturating_add(1),
        }
        proxy.stream_ended();
        let exp = BACKOFF_FIRST.saturating_mul(1u32 << failures.min(4));
        let wait = exp.min(BACKOFF_CAP);
        // Jitter (50-100%) so thousands of proxies do not reconnect in lockstep.
        let jitter = 0.5 + 0.5 * pseudo_random(&proxy.node, failures);
        tokio::time::sleep(wait.mul_f64(jitter)).await;
    }
}

/// A cheap deterministic number in 0..1 from a proxy name and an attempt counter.
fn pseudo_random(seed: &str, attempt: u32) -> f64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in seed.bytes().chain(attempt.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
    (h % 10_000) as f64 / 10_000.0
}

/// One connection and stream; `Ok(true)` if it received anything before it ended.
async fn stream_once(
    proxy: &Proxy,
    server: SocketAddr,
    connect_permits: &Semaphore,
) -> Result<bool, String> {
    let (requests, request_rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let mut inbound = {
        // Connections are opened a bounded number at a time, so thousands of proxies
        // starting together do not overflow the server's accept backlog (SYN retries
        // would add whole seconds that say nothing about the control plane).
        let _permit = connect_permits.acquire().await.map_err(|e| e.to_string())?;
        let endpoint = Endpoint::from_shared(format!("http://{server}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = tokio::time::timeout(
            CONNECT_TIMEOUT,
            endpoint.connect_with_connector(PodConnector {
                source: proxy.pod_ip,
                server,
            }),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        for r in proxy.initial_requests() {
            requests.send(r).await.map_err(|e| e.to_string())?;
        }
        let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(usize::MAX);
        grpc.ready().await.map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(
            CONNECT_TIMEOUT,
            grpc.streaming(
                tonic::Request::new(ReceiverStream::new(request_rx)),
                PathAndQuery::from_static(DELTA_ADS_PATH),
                AdsCodec,
            ),
        )
        .await
        .map_err(|_| "stream open timed out".to_string())?
        .map_err(|e| e.to_string())?;
        response.into_inner()
    };
    proxy.stream_started();
    let mut got_any = false;
    loop {
        let received = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(got_any),
            Err(e) => {
                return if got_any {
                    Ok(true)
                } else {
                    Err(e.to_string())
                };
            }
        };
        got_any = true;
        proxy.responses.fetch_add(1, Ordering::Relaxed);
        proxy
            .bytes
            .fetch_add(received.bytes as u64, Ordering::Relaxed);
        let Some(t) = TYPES.iter().position(|u| *u == received.head.type_url) else {
            continue;
        };
        let (changed, subscribe, unsubscribe) = proxy.apply(t, &received);
        let head = received.head;
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            // Like Envoy, the new clusters' endpoint subscriptions go before the CDS ACK.
            let eds = DeltaDiscoveryRequest {
                type_url: TYPES[EDS].to_string(),
                resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
                resource_names_unsubscribe: unsubscribe,
                ..Default::default()
            };
            if requests.send(eds).await.is_err() {
                return Ok(true);
            }
        }
        let ack = DeltaDiscoveryRequest {
            type_url: head.type_url,
            response_nonce: head.nonce,
            ..Default::default()
        };
        if requests.send(ack).await.is_err() {
            return Ok(true);
        }
        proxy.after_ack(t, changed, Instant::now());
    }
}

/// A set of simulated proxies connected to one control plane.
#[derive(Debug)]
pub struct Fleet {
    pub proxies: Vec<Arc<Proxy>>,
    tasks: JoinSet<()>,
}

/// Connection attempts in flight at once.
const CONNECTS_IN_FLIGHT: usize = 128;

impl Fleet {
    /// Starts one task per proxy; they connect to `server` on their own.
    pub fn start(proxies: Vec<Arc<Proxy>>, server: SocketAddr) -> Fleet {
        let permits = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
        let mut tasks = JoinSet::new();
        for p in &proxies {
            tasks.spawn(run_proxy(p.clone(), server, permits.clone()));
        }
        Fleet { proxies, tasks }
    }

    pub fn generations(&self) -> Vec<u64> {
        self.proxies.iter().map(|p| p.generation()).collect()
    }

    /// Waits until every proxy is in sync on a stream newer than `floors` (per proxy;
    /// zeros for a first connect). Returns the instant the last one got in sync.
    pub async fn wait_in_sync(
        &self,
        floors: &[u64],
        timeout: Duration,
        abort: impl Fn() -> Option<String>,
    ) -> Result<Instant, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending: Vec<&Arc<Proxy>> = self
                .proxies
                .iter()
                .zip(floors)
                .filter(|(p, floor)| !(p.generation() > **floor && p.in_sync()))
                .map(|(p, _)| p)
                .collect();
            if pending.is_empty() {
                let last = self.proxies.iter().filter_map(|p| p.synced_at()).max();
                return last.ok_or_else(|| "no proxy reported a sync time".to_string());
            }
            if let Some(why) = abort() {
                return Err(why);
            }
            if Instant::now() >= deadline {
                let examples: Vec<&str> = pending.iter().take(5).map(|p| p.node.as_str()).collect();
                return Err(format!(
                    "{} of {} proxies not in sync after {:?} (e.g. {})",
                    pending.len(),
                    self.proxies.len(),
                    timeout,
                    examples.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until no proxy has received anything for 300 ms (at most `max`).
    pub async fn wait_no_responses(&self, max: Duration) {
        let deadline = Instant::now() + max;
        let total = || self.proxies.iter().map(|p| p.responses()).sum::<u64>();
        let mut last = total();
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = total();
            if now == last || Instant::now() >= deadline {
                return;
            }
            last = now;
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.proxies.iter().map(|p| p.bytes()).sum()
    }

    /// Stops every proxy (their connections close).
    pub async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}
