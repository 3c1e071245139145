//! The tonic ADS service: one supervised task per stream around [`AdsConnection`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::BufMut;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use futures::{Stream, StreamExt};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, http};
use tonic::{Status, server::NamedService};

use crate::XdsError;
use crate::connection::{AdsConnection, AdsResponse, RequestEvent, TypeSync};
use crate::resource::type_url;
use crate::snapshot::{NodeWatch, SnapshotCache, SnapshotSource};

/// gRPC path of the SotW ADS method.
const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";

/// Decides whether a stream may receive its node's own resources (secrets included).
pub trait StreamPolicy: Send + Sync + std::fmt::Debug {
    /// `Ok` when `peer` may have `node`'s own snapshot; `Err(reason)` otherwise, and the
    /// stream gets only the fallback snapshot.
    fn check(&self, node: &str, peer: Option<SocketAddr>) -> Result<(), String>;
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
}

/// Sync state of every open stream, keyed by stream id.
#[derive(Debug, Default)]
pub struct SyncRegistry {
    streams: Mutex<HashMap<u64, StreamSync>>,
    denials: AtomicU64,
    nacks: AtomicU64,
}

impl SyncRegistry {
    fn update(&self, id: u64, sync: StreamSync) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.insert(id, sync);
    }

    fn remove(&self, id: u64) {
        let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.remove(&id);
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
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// A copy of every stream's state, ordered by node id.
    pub fn list(&self) -> Vec<StreamSync> {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<StreamSync> = streams.values().cloned().collect();
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
    registry: Arc<SyncRegistry>,
    next_stream: Arc<AtomicU64>,
    spawned: mpsc::UnboundedSender<JoinHandle<()>>,
}

impl AdsService {
    /// A service over `cache`, with the supervisor that must be run beside it.
    pub fn new(cache: Arc<SnapshotCache>) -> (Self, StreamSupervisor) {
        let (spawned, handles) = mpsc::unbounded_channel();
        let service = Self {
            cache,
            policy: None,
            registry: Arc::default(),
            next_stream: Arc::default(),
            spawned,
        };
        (service, StreamSupervisor { handles })
    }

    /// Checks every stream with `policy` before serving it its node's own resources.
    pub fn with_policy(mut self, policy: Arc<dyn StreamPolicy>) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sync state of all open streams.
    pub fn registry(&self) -> Arc<SyncRegistry> {
        self.registry.clone()
    }

    /// Starts a stream task for `requests`; responses arrive on the returned channel.
    pub fn open_stream<S>(
        &self,
        peer: Option<SocketAddr>,
        requests: S,
    ) -> mpsc::Receiver<Result<AdsResponse, Status>>
    where
        S: Stream<Item = Result<DiscoveryRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(16);
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let cache = self.cache.clone();
        let registry = self.registry.clone();
        let policy = self.policy.clone();
        let handle = tokio::spawn(async move {
            let stream = StreamContext {
                id,
                peer,
                cache: &cache,
                registry: &registry,
                policy: policy.as_deref(),
            };
            run_stream(stream, requests, tx).await;
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
    peer: Option<SocketAddr>,
    cache: &'a SnapshotCache,
    registry: &'a SyncRegistry,
    policy: Option<&'a dyn StreamPolicy>,
}

/// Drives one stream: requests and snapshot changes in, responses out.
async fn run_stream<S>(
    ctx: StreamContext<'_>,
    mut requests: S,
    tx: mpsc::Sender<Result<AdsResponse, Status>>,
) where
    S: Stream<Item = Result<DiscoveryRequest, Status>> + Unpin,
{
    let StreamContext {
        id,
        peer,
        cache,
        registry,
        policy,
    } = ctx;
    let mut denied: Option<String> = None;
    let mut conn = AdsConnection::new();
    let mut snapshots: Option<NodeWatch> = None;
    let mut source = None;
    loop {
        tokio::select! {
            req = requests.next() => match req {
                None => return,
                Some(Err(status)) => {
                    tracing::debug!(stream = id, %status, "ADS stream ended by the proxy");
                    return;
                }
                Some(Ok(req)) => match conn.on_request(&req) {
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
                        r#type = type_url::short_name(&req.type_url),
                        version = %nack.version,
                        error = %nack.message,
                        "proxy rejected config (NACK); keeping its last good config until the next change"
                        );
                    }
                    Ok(event) => tracing::debug!(stream = id, r#type = type_url::short_name(&req.type_url), ?event, "ADS request"),
                },
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
            snapshots = conn.node_id().map(|n| cache.watch(n));
        }
        if let Some(node) = conn.node_id() {
            let verdict = policy.map_or(Ok(()), |p| p.check(node, peer)).err();
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
            denied = verdict;
        }
        let own_allowed = denied.is_none();
        if let Some((snapshot, now)) = snapshots.as_mut().and_then(|w| w.current(own_allowed)) {
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
                    r#type = type_url::short_name(&response.type_url),
                    version = %response.version_info,
                    resources = response.resources.len(),
                    "pushing"
                );
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        }
        registry.update(
            id,
            StreamSync {
                node_id: conn.node_id().map(str::to_string),
                peer,
                types: conn.sync_state(),
                denied: denied.clone(),
            },
        );
    }
}

/// Codec that decodes requests with prost and splices pre-encoded resources into responses.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdsCodec;

/// Encoder half of [`AdsCodec`].
#[derive(Debug)]
pub struct AdsEncoder;

/// Decoder half of [`AdsCodec`].
#[derive(Debug)]
pub struct AdsDecoder;

impl Codec for AdsCodec {
    type Encode = AdsResponse;
    type Decode = DiscoveryRequest;
    type Encoder = AdsEncoder;
    type Decoder = AdsDecoder;

    fn encoder(&mut self) -> AdsEncoder {
        AdsEncoder
    }

    fn decoder(&mut self) -> AdsDecoder {
        AdsDecoder
    }
}

impl Encoder for AdsEncoder {
    type Item = AdsResponse;
    type Error = Status;

    fn encode(&mut self, item: AdsResponse, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_response(&item, dst);
        Ok(())
    }
}

/// Writes `response` as a `DiscoveryResponse` protobuf message.
pub fn encode_response(response: &AdsResponse, dst: &mut impl BufMut) {
    // Field numbers of DiscoveryResponse: version_info = 1, resources = 2, type_url = 4, nonce = 5.
    for (field, value) in [
        (1, &response.version_info),
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

impl Decoder for AdsDecoder {
    type Item = DiscoveryRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DiscoveryRequest>, Status> {
        DiscoveryRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed DiscoveryRequest: {e}")))
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// Adapter giving tonic's `Grpc::streaming` the stream handler it expects.
struct SotwMethod(AdsService);

impl tonic::server::StreamingService<DiscoveryRequest> for SotwMethod {
    type Response = AdsResponse;
    type ResponseStream = ReceiverStream<Result<AdsResponse, Status>>;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Self::Future {
        let peer = request.remote_addr();
        let rx = self.0.open_stream(peer, request.into_inner());
        Box::pin(async move { Ok(tonic::Response::new(ReceiverStream::new(rx))) })
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for AdsService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != SOTW_PATH {
            return Box::pin(async {
                Ok(Status::unimplemented("only SotW ADS is served").into_http())
            });
        }
        let method = SotwMethod(self.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(AdsCodec)
                .apply_max_message_size_config(Some(64 << 20), Some(256 << 20));
            Ok(grpc.streaming(method, req).await)
        })
    }
}
