//! The HTTP handler: HTTP/1.1 and h2c on one port.
//!
//! `/` and every unknown path answer the pod's name; `/delay/<ms>`, `/stream`,
//! `/upload`, `/download` and `/ws` exercise timing, streaming, large bodies and
//! upgrades; `/relay?to=URL` calls another service as an instrumented app does
//! (passing the trace context on). Every response says what the app saw: `x-weft-path`, `x-weft-proto`,
//! `x-weft-name`, and the caller identity in `x-weft-peer-echo`. Failure modes
//! (`/fault`, `/healthz` and per-request query parameters) are in `faults`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::faults::{FaultOutcome, FaultSpec, Faults};
use crate::pattern;
use crate::ws;

/// Response header carrying the `x-forwarded-client-cert` the app received.
pub const PEER_ECHO_HEADER: &str = "x-weft-peer-echo";
/// Response header: the request-target (path and query) as it arrived.
const PATH_HEADER: &str = "x-weft-path";
/// Response header: the HTTP version the app saw.
const PROTO_HEADER: &str = "x-weft-proto";
/// Response header: the serving pod's name.
const NAME_HEADER: &str = "x-weft-name";

/// Body of every response of the app.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the handler answers with.
#[derive(Debug)]
pub struct HttpApp {
    /// The pod's name.
    pub name: String,
    /// The answer to `/`: the name padded with spaces to `--body-size`.
    pub body: Bytes,
    /// Failure modes switched on by tests.
    pub faults: Faults,
}

/// A request whose failure mode is a dropped connection.
#[derive(Debug)]
pub struct ConnectionDropped;

impl std::fmt::Display for ConnectionDropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped as asked")
    }
}

impl std::error::Error for ConnectionDropped {}

impl HttpApp {
    /// An app answering `name`, padded to `body_size` bytes.
    pub fn new(name: &str, body_size: usize) -> Self {
        Self {
            name: name.to_string(),
            body: Bytes::from(format!("{name:<body_size$}")),
            faults: Faults::default(),
        }
    }
}

/// Serves the HTTP handler on `listener` until an error.
pub async fn serve(listener: TcpListener, app: Arc<HttpApp>) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // RFC 8441: lets a proxy carry a WebSocket over HTTP/2 (extended CONNECT).
    builder.http2().enable_connect_protocol();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // Transient (aborted connection, fd exhaustion): keep serving.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, builder) = (app.clone(), builder.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(app.clone(), req));
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One request: route it, then stamp what the app saw on the response.
async fn handle(
    app: Arc<HttpApp>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ConnectionDropped> {
    let target = req.uri().path_and_query().map_or_else(
        || req.uri().path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let version = format!("{:?}", req.version());
    let peer = req.headers().get("x-forwarded-client-cert").cloned();
    let mut response = route(&app, req).await?;
    let headers = response.headers_mut();
    for (name, value) in [
        (PATH_HEADER, target.as_str()),
        (PROTO_HEADER, version.as_str()),
        (NAME_HEADER, app.name.as_str()),
    ] {
        // The request-target only holds visible ASCII, so this fails only for odd names.
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    // Tests read the caller's identity, as the sidecar forwarded it, from here.
    if let Some(xfcc) = peer {
        headers.insert(PEER_ECHO_HEADER, xfcc);
    }
    Ok(response)
}

async fn route(app: &HttpApp, req: Request<Incoming>) -> Result<Response<Body>, ConnectionDropped> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match path.as_str() {
        "/fault" => {
            return Ok(match FaultSpec::parse(&query) {
                Ok(spec) => {
                    app.faults.set_pod(spec.unwrap_or_default());
                    text(StatusCode::OK, format!("faults of {}: {query}\n", app.name))
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            });
        }
        "/healthz" if app.faults.healthy() => return Ok(text(StatusCode::OK, "ok\n".into())),
        "/healthz" => {
            return Ok(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy as asked\n".into(),
            ));
        }
        _ => {}
    }
    let own = match FaultSpec::parse(&query) {
        Ok(own) => own,
        Err(e) => return Ok(text(StatusCode::BAD_REQUEST, format!("{e}\n"))),
    };
    match app.faults.apply(own).await {
        FaultOutcome::Pass => {}
        FaultOutcome::Fail(status) => {
            return Ok(text(status, format!("{} failed as asked\n", app.name)));
        }
        FaultOutcome::Close => return Err(ConnectionDropped),
    }
    Ok(route_path(app, req, &path, &query).await)
}

async fn route_path(
    app: &HttpApp,
    req: Request<Incoming>,
    path: &str,
    query: &str,
) -> Response<Body> {
    if path == "/ws" {
        return ws::accept(req);
    }
    if path == "/echo" || path.starts_with("/echo/") {
        return echo(app, &req);
    }
    if path == "/relay" {
        return relay(app, &req, query).await;
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        return match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                full(StatusCode::OK, app.body.clone())
            }
            Err(_) => text(StatusCode::BAD_REQUEST, format!("bad delay {ms:?}\n")),
        };
    }
    match path {
        "/stream" => stream(query),
        "/download" => download(query),
        "/upload" => upload(req.into_body()).await,
        _ => full(StatusCode::OK, app.body.clone()),
    }
}

/// Headers an instrumented app copies from the request it serves to the calls it
/// makes, so its sidecars' spans join one trace (W3C trace context and B3).
const TRACE_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "x-request-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

/// `/relay?to=URL`: GETs URL with the request's trace headers and answers with its
/// status and `relayed NAME -> BODY`.
async fn relay(app: &HttpApp, req: &Request<Incoming>, query: &str) -> Response<Body> {
    let Some(url) = query_param(query, "to") else {
        return text(StatusCode::BAD_REQUEST, "relay needs ?to=URL\n".into());
    };
    let target = match crate::http_client::Target::parse(url) {
        Ok(t) => t,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let headers = TRACE_HEADERS
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(*name)?.clone();
            Some((hyper::header::HeaderName::from_static(name), value))
        })
        .collect();
    let sent = crate::http_client::send(
        &target,
        hyper::Method::GET,
        headers,
        http_body_util::Empty::new().boxed_unsync(),
        crate::http_client::Wire::Http11,
    )
    .await;
    let response = match sent {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("relay to {url}: {e}\n")),
    };
    let status = response.status();
    match response.into_body().collect().await {
        Ok(body) => text(
            status,
            format!(
                "relayed {} -> {}\n",
                app.name,
                String::from_utf8_lossy(&body.to_bytes()).trim_end()
            ),
        ),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("relay body: {e}\n")),
    }
}

/// `/echo[/...]`: what the app received, as JSON: method, path, query, request headers
/// (names lowercase; repeated ones joined with `, `) and the pod's name.
fn echo(app: &HttpApp, req: &Request<Incoming>) -> Response<Body> {
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).to_string();
        let entry = headers
            .entry(name.as_str().to_string())
            .or_insert_with(|| serde_json::Value::String(String::new()));
        if let serde_json::Value::String(v) = entry {
            if !v.is_empty() {
                v.push_str(", ");
            }
            v.push_str(&value);
        }
    }
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query().unwrap_or(""),
        "headers": headers,
        "pod": app.name,
    });
    let mut response = full(StatusCode::OK, Bytes::from(body.to_string()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `/stream?chunks=N&interval_ms=M`: N lines `chunk <i>\n`, M ms apart.
fn stream(query: &str) -> Response<Body> {
    let (chunks, interval) = match (
        query_u64(query, "chunks", 5),
        query_u64(query, "interval_ms", 100),
    ) {
        (Ok(c), Ok(i)) => (c, Duration::from_millis(i)),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, e),
    };
    // Each chunk is its own body frame: hyper writes (and flushes) it before the
    // stream is polled again, so the chunks leave one by one.
    let frames = futures::stream::unfold(0u64, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let frame = Frame::data(Bytes::from(format!("chunk {i}\n")));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `/download?bytes=N`: N pattern bytes, streamed in chunks, with a content-length.
fn download(query: &str) -> Response<Body> {
    let total = match query_u64(query, "bytes", 0) {
        Ok(n) => n,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let mut response = Response::new(StreamBody::new(pattern::frames(total)).boxed_unsync());
    let headers = response.headers_mut();
    headers.insert(CONTENT_LENGTH, HeaderValue::from(total));
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `/upload`: reads the body as it streams in; answers `<byte count> <sha256 hex>`.
async fn upload(mut body: Incoming) -> Response<Body> {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut count = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    digest.update(data);
                    count += data.len() as u64;
                }
            }
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("body broken after {count} bytes: {e}\n"),
                );
            }
        }
    }
    let hash = pattern::hex(digest.finish().as_ref());
    text(StatusCode::OK, format!("{count} {hash}\n"))
}

/// A response with a fixed body.
pub fn full(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed_unsync());
    *response.status_mut() = status;
    response
}

/// A response with a text body.
pub fn text(status: StatusCode, body: String) -> Response<Body> {
    full(status, Bytes::from(body))
}

/// The value of `key` in a query string (`a=1&b=2`), undecoded.
pub fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A numeric query parameter, `default` when absent.
pub fn query_u64(query: &str, key: &str, default: u64) -> Result<u64, String> {
    match query_param(query, key) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("query parameter {key}: not a number: {v:?}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// Concatenation of a stream of body chunks, for tests.
    async fn collect_text(response: Response<Body>) -> String {
        let mut body = response.into_body().into_data_stream();
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            out.extend_from_slice(&chunk);
        }
        String::from_utf8_lossy(&out).to_string()
    }

    #[test]
    fn query() {
        assert_eq!(query_param("a=1&b=2", "b"), Some("2"));
        assert_eq!(query_param("a=1&b=2", "c"), None);
        assert_eq!(query_param("flag&b=2", "flag"), Some(""));
        assert_eq!(query_param("", "a"), None);
        assert_eq!(query_param("ab=1&a=3", "a"), Some("3"));
        assert_eq!(query_u64("bytes=100", "bytes", 0), Ok(100));
        assert_eq!(query_u64("", "bytes", 7), Ok(7));
        assert!(query_u64("bytes=x", "bytes", 0).is_err());
        assert!(query_u64("bytes=-1", "bytes", 0).is_err());
    }

    #[tokio::test]
    async fn stream_and_download_bodies() {
        let body = collect_text(stream("chunks=3&interval_ms=1")).await;
        assert_eq!(body, "chunk 0\nchunk 1\nchunk 2\n");
        let response = download("bytes=1000");
        assert_eq!(
            response.headers().get(CONTENT_LENGTH),
            Some(&HeaderValue::from(1000u64))
        );
        let mut v = pattern::Verifier::default();
        let mut body = response.into_body().into_data_stream();
        while let Some(Ok(chunk)) = body.next().await {
            v.feed(&chunk);
        }
        assert_eq!((v.len, v.first_mismatch), (1000, None));
    }
}
