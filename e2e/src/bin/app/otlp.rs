//! A small OpenTelemetry collector: the OTLP/gRPC trace service
//! (`opentelemetry.proto.collector.trace.v1.TraceService/Export`), written by hand
//! like grpc.rs (no protoc), appending each span it receives as a JSON line to a file.
//! Only the fields tests read are declared; prost skips the rest.

use std::convert::Infallible;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use envoy_types::pb::opentelemetry::proto::common::v1::{KeyValue, any_value};
use serde::Serialize;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ExportTraceServiceResponse` (its partial-success field left out: all accepted).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {}

/// `ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `Span`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
}

/// One received span, as written to the file.
#[derive(Debug, Serialize)]
struct SpanLine {
    /// The resource's attributes (`service.name`, `k8s.pod.name`, ...).
    resource: std::collections::BTreeMap<String, String>,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent_span_id: String,
    name: String,
    /// `SPAN_KIND_SERVER` is 2, `SPAN_KIND_CLIENT` 3.
    kind: i32,
    attributes: std::collections::BTreeMap<String, String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(kvs: &[KeyValue]) -> std::collections::BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

/// The trace service, appending to `out`.
#[derive(Clone)]
struct TraceService {
    out: Arc<Mutex<std::fs::File>>,
}

impl NamedService for TraceService {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> Service<hyper::http::Request<B>> for TraceService
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
        let export = Export(self.out.clone());
        let codec = ProstCodec::<ExportTraceServiceResponse, ExportTraceServiceRequest>::default();
        let mut grpc = tonic::server::Grpc::new(codec);
        match req.uri().path() {
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export" => {
                Box::pin(async move { Ok(grpc.unary(export, req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

struct Export(Arc<Mutex<std::fs::File>>);

impl tonic::server::UnaryService<ExportTraceServiceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<Response<ExportTraceServiceResponse>, Status>;

    fn call(&mut self, request: Request<ExportTraceServiceRequest>) -> Self::Future {
        let out = self.0.clone();
        Box::pin(async move {
            let mut lines = String::new();
            for rs in &request.get_ref().resource_spans {
                let resource = attributes(
                    rs.resource
                        .as_ref()
                        .map_or(&[][..], |r| r.attributes.as_slice()),
                );
                for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
                    let line = SpanLine {
                        resource: resource.clone(),
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        name: span.name.clone(),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                    };
                    let json = serde_json::to_string(&line)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    lines.push_str(&json);
                    lines.push('\n');
                }
            }
            let mut file = out
                .lock()
                .map_err(|_| Status::internal("the span file's lock is poisoned"))?;
            file.write_all(lines.as_bytes())
                .and_then(|()| file.flush())
                .map_err(|e| Status::internal(format!("writing spans: {e}")))?;
            Ok(Response::new(ExportTraceServiceResponse {}))
        })
    }
}

/// Receives spans over OTLP/gRPC on `listener`, appending them to `out` as JSON lines.
pub async fn serve(listener: TcpListener, out: PathBuf) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tonic::transport::Server::builder()
        .add_service(TraceService {
            out: Arc::new(Mutex::new(file)),
        })
        .serve_with_incoming(incoming)
        .await
        .map_err(|e| format!("OTLP receiver: {e}"))
}
