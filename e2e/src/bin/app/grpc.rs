//! gRPC: the `weft.test.Echo` service and its clients, written by hand the way
//! tonic's code generator would (no protoc needed).
//!
//! ```proto
//! package weft.test;
//! message EchoRequest { string message = 1; int32 fail_code = 2; uint32 sleep_ms = 3; uint32 count = 4; }
//! message EchoReply { string message = 1; string name = 2; }
//! service Echo {
//!   rpc Unary(EchoRequest) returns (EchoReply);
//!   rpc ServerStream(EchoRequest) returns (stream EchoReply);
//!   rpc ClientStream(stream EchoRequest) returns (EchoReply);
//!   rpc Bidi(stream EchoRequest) returns (stream EchoReply);
//! }
//! ```

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use hyper::http::uri::PathAndQuery;
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;
use weft_e2e::LoadReport;

use crate::net;

/// Request of every Echo method.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    /// Text to echo.
    #[prost(string, tag = "1")]
    pub message: String,
    /// Unary: when not 0, fail with this gRPC status code.
    #[prost(int32, tag = "2")]
    pub fail_code: i32,
    /// Unary: wait this long before answering.
    #[prost(uint32, tag = "3")]
    pub sleep_ms: u32,
    /// ServerStream: how many replies.
    #[prost(uint32, tag = "4")]
    pub count: u32,
}

/// Reply of every Echo method.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    /// The echoed text.
    #[prost(string, tag = "1")]
    pub message: String,
    /// The serving pod's name.
    #[prost(string, tag = "2")]
    pub name: String,
}

/// Full name of the service.
const SERVICE: &str = "weft.test.Echo";
/// Trailer sent with a requested failure.
const DETAIL_KEY: &str = "x-weft-detail";
/// Message of a requested failure.
const FAIL_MESSAGE: &str = "failed as asked";
/// The longest server stream the server agrees to send.
const MAX_STREAM: u32 = 100_000;

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send + 'static>>;

/// Serves `weft.test.Echo` over h2c on `listener`.
pub async fn serve(listener: TcpListener, name: String) -> Result<(), tonic::transport::Error> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(EchoServer { name: name.into() })
        .serve_with_incoming(incoming)
        .await
}

/// The Echo service, answering as pod `name`.
#[derive(Debug, Clone)]
pub struct EchoServer {
    name: Arc<str>,
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<hyper::http::Request<B>> for EchoServer
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Into<bytes::Bytes> + Send,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = hyper::http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: hyper::http::Request<B>) -> Self::Future {
        let name = self.name.clone();
        let codec = ProstCodec::<EchoReply, EchoRequest>::default();
        let mut grpc = tonic::server::Grpc::new(codec);
        match req.uri().path() {
            "/weft.test.Echo/Unary" => {
                Box::pin(async move { Ok(grpc.unary(Unary(name), req).await) })
            }
            "/weft.test.Echo/ServerStream" => {
                Box::pin(async move { Ok(grpc.server_streaming(ServerStream(name), req).await) })
            }
            "/weft.test.Echo/ClientStream" => {
                Box::pin(async move { Ok(grpc.client_streaming(ClientStream(name), req).await) })
            }
            "/weft.test.Echo/Bidi" => {
                Box::pin(async move { Ok(grpc.streaming(Bidi(name), req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A reply, with the pod's name also in the response metadata.
fn with_name<T>(message: T, name: &str) -> Response<T> {
    let mut response = Response::new(message);
    if let Ok(value) = MetadataValue::try_from(name) {
        response.metadata_mut().insert("x-weft-name", value);
    }
    response
}

struct Unary(Arc<str>);

impl tonic::server::UnaryService<EchoRequest> for Unary {
    type Response = EchoReply;
    type Future = BoxFuture<Response<EchoReply>, Status>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let name = self.0.clone();
        // Request metadata `x-route` comes back as `x-weft-echo-x-route` (what a route's
        // header filter did is visible to the caller).
        let echoed = request.metadata().get("x-route").cloned();
        Box::pin(async move {
            let req = request.into_inner();
            if req.sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(req.sleep_ms.into())).await;
            }
            if req.fail_code != 0 {
                let mut metadata = MetadataMap::new();
                metadata.insert(DETAIL_KEY, MetadataValue::from_static("asked"));
                return Err(Status::with_metadata(
                    Code::from_i32(req.fail_code),
                    FAIL_MESSAGE,
                    metadata,
                ));
            }
            let reply = EchoReply {
                message: req.message,
                name: name.to_string(),
            };
            let mut response = with_name(reply, &name);
            if let Some(value) = echoed {
                response.metadata_mut().insert("x-weft-echo-x-route", value);
            }
            Ok(response)
        })
    }
}

struct ServerStream(Arc<str>);

impl tonic::server::ServerStreamingService<EchoRequest> for ServerStream {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Response<ReplyStream>, Status>;

    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let req = request.into_inner();
            if req.count > MAX_STREAM {
                return Err(Status::invalid_argument(format!(
                    "count above {MAX_STREAM}"
                )));
            }
            let (message, owner) = (req.message, name.to_string());
            let replies = futures::stream::iter(0..req.count).map(move |i| {
                Ok(EchoReply {
                    message: format!("{message}-{i}"),
                    name: owner.clone(),
                })
            });
            Ok(with_name(Box::pin(replies) as ReplyStream, &name))
        })
    }
}

struct ClientStream(Arc<str>);

impl tonic::server::ClientStreamingService<EchoRequest> for ClientStream {
    type Response = EchoReply;
    type Future = BoxFuture<Response<EchoReply>, Status>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let mut requests = request.into_inner();
            let mut message = String::new();
            while let Some(req) = requests.message().await? {
                message.push_str(&req.message);
            }
            let reply = EchoReply {
                message,
                name: name.to_string(),
            };
            Ok(with_name(reply, &name))
        })
    }
}

struct Bidi(Arc<str>);

impl tonic::server::StreamingService<EchoRequest> for Bidi {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Response<ReplyStream>, Status>;

    fn call(&mut self, request: Request<Streaming<EchoRequest>>) -> Self::Future {
        let name = self.0.clone();
        Box::pin(async move {
            let owner = name.to_string();
            // One reply per request, as each arrives.
            let replies = request.into_inner().map(move |req| {
                req.map(|req| EchoReply {
                    message: req.message,
                    name: owner.clone(),
                })
            });
            Ok(with_name(Box::pin(replies) as ReplyStream, &name))
        })
    }
}

/// A gRPC client for `weft.test.Echo`.
#[derive(Debug, Clone)]
pub struct EchoClient {
    inner: tonic::client::Grpc<Channel>,
}

fn codec() -> ProstCodec<EchoRequest, EchoReply> {
    ProstCodec::default()
}

fn path(method: &'static str) -> PathAndQuery {
    PathAndQuery::from_static(method)
}

fn unavailable(e: tonic::transport::Error) -> Status {
    Status::unavailable(net::describe(&e))
}

impl EchoClient {
    /// Connects (h2c) to `addr`, `host:port` or `[v6]:port`.
    pub async fn connect(addr: &str) -> Result<Self, String> {
        // Validates the form, and refuses a scheme or path.
        net::split_host_port(addr)?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("{addr}: {}", net::describe(&e)))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {}", net::describe(&e)))?;
        Ok(Self {
            inner: tonic::client::Grpc::new(channel),
        })
    }

    /// `Unary`.
    pub async fn unary(&mut self, req: EchoRequest) -> Result<Response<EchoReply>, Status> {
        self.inner.ready().await.map_err(unavailable)?;
        let path = path("/weft.test.Echo/Unary");
        self.inner.unary(Request::new(req), path, codec()).await
    }

    /// `ServerStream`.
    pub async fn server_stream(
        &mut self,
        req: EchoRequest,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.inner.ready().await.map_err(unavailable)?;
        let path = path("/weft.test.Echo/ServerStream");
        self.inner
            .server_streaming(Request::new(req), path, codec())
            .await
    }

    /// `ClientStream`.
    pub async fn client_stream(
        &mut self,
        reqs: impl Stream<Item = EchoRequest> + Send + 'static,
    ) -> Result<Response<EchoReply>, Status> {
        self.inner.ready().await.map_err(unavailable)?;
        let path = path("/weft.test.Echo/ClientStream");
        self.inner
            .client_streaming(Request::new(reqs), path, codec())
            .await
    }

    /// `Bidi`.
    pub async fn bidi(
        &mut self,
        reqs: impl Stream<Item = EchoRequest> + Send + 'static,
    ) -> Result<Response<Streaming<EchoReply>>, Status> {
        self.inner.ready().await.map_err(unavailable)?;
        let path = path("/weft.test.Echo/Bidi");
        self.inner
            .streaming(Request::new(reqs), path, codec())
            .await
    }
}

/// The kinds of call `grpc` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Call {
    /// One request, one reply.
    Unary,
    /// One request, `--count` replies.
    ServerStream,
    /// `--count` requests, one reply.
    ClientStream,
    /// `--count` requests, each answered before the next is sent.
    Bidi,
    /// A unary call asking for NOT_FOUND, with a trailer.
    Error,
}

/// What `grpc` prints.
#[derive(Debug, Default, Serialize)]
pub struct GrpcReport {
    /// The call made (`unary`, `server-stream`, ...).
    pub call: String,
    /// The replies' messages, in order.
    pub messages: Vec<String>,
    /// The serving pod's name, from the replies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `error`: the gRPC status code received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// `error`: the status message received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `error`: the `x-weft-detail` trailer received.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// `unary`: the `x-route` request header the server saw, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_header: Option<String>,
    /// Whole exchange, connect included.
    pub micros: u64,
}

fn failed(what: &str, status: &Status) -> String {
    format!(
        "{what}: gRPC status {} ({:?}): {}",
        status.code() as i32,
        status.code(),
        status.message()
    )
}

fn request(message: String) -> EchoRequest {
    EchoRequest {
        message,
        ..Default::default()
    }
}

/// `grpc`: one call of the given kind, checked against what the server must answer.
pub async fn call(addr: &str, call: Call, count: u32) -> Result<GrpcReport, String> {
    let started = Instant::now();
    let mut client = EchoClient::connect(addr).await?;
    let mut report = GrpcReport {
        call: clap::ValueEnum::to_possible_value(&call)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        ..Default::default()
    };
    let mut replies = Vec::new();
    let expected: Vec<String> = match call {
        Call::Unary => {
            let reply = client
                .unary(request("hello".into()))
                .await
                .map_err(|s| failed("unary", &s))?;
            report.route_header = reply
                .metadata()
                .get("x-weft-echo-x-route")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            replies.push(reply.into_inner());
            vec!["hello".into()]
        }
        Call::ServerStream => {
            let req = EchoRequest {
                count,
                ..request("hello".into())
            };
            let mut stream = client
                .server_stream(req)
                .await
                .map_err(|s| failed("server-stream", &s))?
                .into_inner();
            while let Some(reply) = stream
                .message()
                .await
                .map_err(|s| failed("server-stream", &s))?
            {
                replies.push(reply);
            }
            (0..count).map(|i| format!("hello-{i}")).collect()
        }
        Call::ClientStream => {
            let parts: Vec<String> = (0..count).map(|i| format!("part{i};")).collect();
            let reqs = futures::stream::iter(parts.clone().into_iter().map(request));
            let reply = client
                .client_stream(reqs)
                .await
                .map_err(|s| failed("client-stream", &s))?;
            replies.push(reply.into_inner());
            vec![parts.concat()]
        }
        Call::Bidi => {
            // Lockstep: the next request leaves only once the previous one is
            // answered, which proves that replies flow while the call is open.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let send = |i: u32| {
                let tx = tx.clone();
                async move { tx.send(request(format!("bidi-{i}"))).await.is_ok() }
            };
            if count > 0 && !send(0).await {
                return Err("bidi: request stream closed".into());
            }
            let mut stream = client
                .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|s| failed("bidi", &s))?
                .into_inner();
            for i in 0..count {
                let reply = stream
                    .message()
                    .await
                    .map_err(|s| failed("bidi", &s))?
                    .ok_or_else(|| format!("bidi: stream ended after {i} replies"))?;
                replies.push(reply);
                if i + 1 < count && !send(i + 1).await {
                    return Err("bidi: request stream closed".into());
                }
            }
            drop(tx);
            while let Some(reply) = stream.message().await.map_err(|s| failed("bidi", &s))? {
                replies.push(reply);
            }
            (0..count).map(|i| format!("bidi-{i}")).collect()
        }
        Call::Error => {
            let req = EchoRequest {
                fail_code: Code::NotFound as i32,
                ..request("hello".into())
            };
            match client.unary(req).await {
                Ok(_) => return Err("error: the call succeeded, expected NOT_FOUND".into()),
                Err(status) => {
                    report.code = Some(status.code() as i32);
                    report.message = Some(status.message().to_string());
                    report.detail = status
                        .metadata()
                        .get(DETAIL_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let (code, message, detail) =
                        (status.code(), status.message(), report.detail.as_deref());
                    if code != Code::NotFound || message != FAIL_MESSAGE || detail != Some("asked")
                    {
                        return Err(format!(
                            "error: got code {} message {message:?} {DETAIL_KEY} {detail:?}, expected 5 {FAIL_MESSAGE:?} \"asked\"",
                            code as i32
                        ));
                    }
                }
            }
            Vec::new()
        }
    };
    report.messages = replies.iter().map(|r| r.message.clone()).collect();
    report.name = replies.first().map(|r| r.name.clone());
    if report.messages != expected {
        return Err(format!(
            "{}: got messages {:?}, expected {expected:?}",
            report.call, report.messages
        ));
    }
    report.micros = started.elapsed().as_micros() as u64;
    Ok(report)
}

/// `grpc-load`: `count` unary calls, `concurrency` at a time, over one channel.
pub async fn load(addr: &str, count: usize, concurrency: usize) -> Result<LoadReport, String> {
    let client = EchoClient::connect(addr).await?;
    let issued = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (mut client, issued) = (client.clone(), issued.clone());
        workers.spawn(async move {
            let mut results = Vec::new();
            while issued.fetch_add(1, Ordering::Relaxed) < count {
                let start = weft_e2e::now_ms();
                let timer = Instant::now();
                let outcome = client
                    .unary(request("load".into()))
                    .await
                    .map(|r| r.into_inner().name)
                    .map_err(|s| failed("unary", &s));
                results.push((start, timer.elapsed().as_micros() as u64, outcome));
            }
            results
        });
    }
    let mut results = Vec::new();
    while let Some(done) = workers.join_next().await {
        results.extend(done.map_err(|e| format!("worker: {e}"))?);
    }
    results.sort_by_key(|(start, _, _)| *start);
    Ok(LoadReport::from_timed_results(results))
}
