//! HTTP client subcommands: `http`, `upload`, `download`, `stream`.
//!
//! Each request goes over its own connection made with hyper's low-level
//! client: HTTP/1.1 with an origin-form request-target copied byte for byte
//! from the URL (hyper writes it as given, without normalizing `..`, `%2e` or
//! `//`), or HTTP/2 with prior knowledge (h2c). Redirects are never followed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::http::uri::{Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;

use crate::{net, pattern};

/// Body of a client request.
type ReqBody = UnsyncBoxBody<Bytes, Infallible>;

/// How much of a response body `http` prints.
const BODY_PRINT_LIMIT: usize = 4096;

/// Where a URL points.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host to connect to, without IPv6 brackets.
    pub host: String,
    /// Port to connect to (80 when the URL has none).
    pub port: u16,
    /// Authority as written in the URL (the default Host header).
    pub authority: Authority,
    /// Path and query exactly as written in the URL (`/` when empty).
    pub path_and_query: PathAndQuery,
}

impl Target {
    /// Parses `http://host[:port]/path?query` (also `ws://`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        match uri.scheme_str() {
            Some("http" | "ws") => {}
            Some(other) => return Err(format!("{url}: unsupported scheme {other}")),
            None => return Err(format!("{url}: needs http://")),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{url}: no host"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let path_and_query = match uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => pq.clone(),
            _ => PathAndQuery::from_static("/"),
        };
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(80),
            authority,
            path_and_query,
        })
    }
}

/// Parses `name: value` header arguments.
pub fn parse_headers(headers: &[String]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("--header {h:?}: needs name: value"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| format!("--header {h:?}: {e}"))?;
            let value =
                HeaderValue::from_str(value.trim()).map_err(|e| format!("--header {h:?}: {e}"))?;
            Ok((name, value))
        })
        .collect()
}

/// The HTTP version a request goes out in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.0 (old clients and health checkers still send it).
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2 with prior knowledge (h2c).
    H2c,
}

impl Wire {
    /// HTTP/2 when `http2`, else HTTP/1.1.
    pub fn from_h2(http2: bool) -> Self {
        if http2 { Self::H2c } else { Self::Http11 }
    }
}

/// Sends one request on a new connection; the response body is still to be read.
pub async fn send(
    target: &Target,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: ReqBody,
    wire: Wire,
) -> Result<Response<Incoming>, String> {
    let http2 = wire == Wire::H2c;
    let stream = net::connect(&target.host, target.port).await?;
    let io = TokioIo::new(stream);
    let mut request = Request::builder().method(method);
    // A Host given by the caller wins: tests route by virtual host.
    let host = headers
        .iter()
        .find(|(n, _)| n == HOST)
        .map(|(_, v)| v.clone());
    let response = if http2 {
        // HTTP/2 carries the host in `:authority`, taken from an absolute URI.
        let authority = match &host {
            Some(h) => Authority::try_from(h.as_bytes())
                .map_err(|e| format!("host header for :authority: {e}"))?,
            None => target.authority.clone(),
        };
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority)
            .path_and_query(target.path_and_query.clone())
            .build()
            .map_err(|e| format!("uri: {e}"))?;
        request = request.uri(uri).version(hyper::Version::HTTP_2);
        for (name, value) in headers.into_iter().filter(|(n, _)| n != HOST) {
            request = request.header(name, value);
        }
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {}", net::describe(&e)))?;
        tokio::spawn(conn);
        let request = request.body(body).map_err(|e| format!("request: {e}"))?;
        sender.send_request(request).await
    } else {
        // Origin-form: only the path and query go on the request line.
        let mut parts = hyper::http::uri::Parts::default();
        parts.path_and_query = Some(target.path_and_query.clone());
        let uri = Uri::from_parts(parts).map_err(|e| format!("uri: {e}"))?;
        request = request.uri(uri);
        if wire == Wire::Http10 {
            request = request.version(hyper::Version::HTTP_10);
        }
        if host.is_none() {
            let authority = HeaderValue::from_str(target.authority.as_str())
                .map_err(|e| format!("host header: {e}"))?;
            request = request.header(HOST, authority);
        }
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("handshake: {}", net::describe(&e)))?;
        tokio::spawn(conn);
        let request = request.body(body).map_err(|e| format!("request: {e}"))?;
        sender.send_request(request).await
    };
    response.map_err(|e| format!("request: {}", net::describe(&e)))
}

fn empty() -> ReqBody {
    Empty::new().boxed_unsync()
}

/// What `http` prints.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    /// Response status code.
    pub status: u16,
    /// Response version, `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// Response headers, names lowercase; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// Body, UTF-8 lossy, cut to its first 4 KiB.
    pub body: String,
    /// Full body length.
    pub body_bytes: u64,
    /// Connect to end of body.
    pub micros: u64,
}

/// `http`: one request, any status is a success.
pub async fn http(
    url: &str,
    method: &str,
    headers: &[String],
    wire: Wire,
    body_bytes: Option<u64>,
) -> Result<HttpReport, String> {
    let started = Instant::now();
    let target = Target::parse(url)?;
    let method = Method::from_bytes(method.as_bytes()).map_err(|e| format!("method: {e}"))?;
    let headers = parse_headers(headers)?;
    let body = match body_bytes {
        // Sized: sent with a content-length.
        Some(n) => {
            let n = usize::try_from(n).map_err(|_| "--body-bytes too large".to_string())?;
            let bytes: Bytes = (0..n as u64).map(pattern::byte_at).collect();
            Full::new(bytes).boxed_unsync()
        }
        None => empty(),
    };
    let response = send(&target, method, headers, body, wire).await?;
    let status = response.status().as_u16();
    let version = format!("{:?}", response.version());
    let mut printed = BTreeMap::<String, String>::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).to_string();
        printed
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let mut body = response.into_body();
    let mut kept = Vec::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| format!("body after {total} bytes: {}", net::describe(&e)))?;
        if let Some(data) = frame.data_ref() {
            total += data.len() as u64;
            let room = BODY_PRINT_LIMIT.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(HttpReport {
        status,
        version,
        headers: printed,
        body: String::from_utf8_lossy(&kept).to_string(),
        body_bytes: total,
        micros: started.elapsed().as_micros() as u64,
    })
}

/// Reads a whole response body as text, for short answers.
async fn body_text(response: Response<Incoming>) -> Result<String, String> {
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {}", net::describe(&e)))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&bytes).trim().to_string())
}

/// Fails on a non-2xx response, with its status and (short) body.
async fn expect_success(response: Response<Incoming>) -> Result<Response<Incoming>, String> {
    if response.status().is_success() {
        return Ok(response);
    }
    let status = response.status();
    let mut text = body_text(response).await.unwrap_or_default();
    text.truncate(200);
    Err(format!("HTTP {status}: {}", text.replace('\n', " ")))
}

/// What `upload` prints.
#[derive(Debug, Serialize)]
pub struct UploadReport {
    /// Response status code.
    pub status: u16,
    /// Bytes sent (and counted by the server).
    pub bytes: u64,
    /// SHA-256 of the body, as both sides computed it.
    pub sha256: String,
    /// The server saw exactly what was sent.
    pub ok: bool,
    /// Connect to answer.
    pub micros: u64,
}

/// `upload`: POSTs `bytes` pattern bytes (streamed, chunked in HTTP/1.1) and
/// checks the server's `<count> <sha256>` answer.
pub async fn upload(url: &str, bytes: u64, http2: bool) -> Result<UploadReport, String> {
    let started = Instant::now();
    let target = Target::parse(url)?;
    let expected = pattern::sha256_hex(bytes);
    let body = StreamBody::new(pattern::frames(bytes)).boxed_unsync();
    let response = send(
        &target,
        Method::POST,
        Vec::new(),
        body,
        Wire::from_h2(http2),
    )
    .await?;
    let status = response.status().as_u16();
    let answer = body_text(expect_success(response).await?).await?;
    let (count, hash) = answer
        .split_once(' ')
        .ok_or_else(|| format!("unexpected answer {answer:?}"))?;
    if count != bytes.to_string() || hash != expected {
        return Err(format!(
            "server saw {count} bytes with sha256 {hash}, sent {bytes} with sha256 {expected}"
        ));
    }
    Ok(UploadReport {
        status,
        bytes,
        sha256: expected,
        ok: true,
        micros: started.elapsed().as_micros() as u64,
    })
}

/// What `download` prints.
#[derive(Debug, Serialize)]
pub struct DownloadReport {
    /// Response status code.
    pub status: u16,
    /// Body bytes received.
    pub bytes: u64,
    /// Length and every byte matched the pattern.
    pub ok: bool,
    /// Connect to end of body.
    pub micros: u64,
}

/// `download`: GETs a URL, streams the body and checks length and pattern.
pub async fn download(url: &str, bytes: u64, http2: bool) -> Result<DownloadReport, String> {
    let started = Instant::now();
    let target = Target::parse(url)?;
    let response = send(
        &target,
        Method::GET,
        Vec::new(),
        empty(),
        Wire::from_h2(http2),
    )
    .await?;
    let status = response.status().as_u16();
    let mut body = expect_success(response).await?.into_body();
    let mut verifier = pattern::Verifier::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            format!(
                "body broken after {} bytes: {}",
                verifier.len,
                net::describe(&e)
            )
        })?;
        if let Some(data) = frame.data_ref() {
            verifier.feed(data);
        }
    }
    if let Some(at) = verifier.first_mismatch {
        return Err(format!("byte {at} differs from the pattern"));
    }
    if verifier.len != bytes {
        return Err(format!("got {} bytes, expected {bytes}", verifier.len));
    }
    Ok(DownloadReport {
        status,
        bytes: verifier.len,
        ok: true,
        micros: started.elapsed().as_micros() as u64,
    })
}

/// What `stream` prints.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    /// Response status code.
    pub status: u16,
    /// Complete lines (`chunk <i>\n`) received.
    pub chunks: usize,
    /// Body frames (reads) they came in: fewer than `chunks` means some were coalesced.
    pub frames: usize,
    /// When the first line was complete, in ms since the request was sent.
    pub first_chunk_ms: Option<u64>,
    /// When the last line was complete, in ms since the request was sent.
    pub last_chunk_ms: Option<u64>,
    /// When each line was complete, in ms since the request was sent.
    pub chunk_ms: Vec<u64>,
}

/// `stream`: GETs a streamed response and records when each line arrived.
pub async fn stream(url: &str, http2: bool) -> Result<StreamReport, String> {
    let target = Target::parse(url)?;
    // Includes the connect, which is local and quick (to the address or the sidecar).
    let sent = Instant::now();
    let response = send(
        &target,
        Method::GET,
        Vec::new(),
        empty(),
        Wire::from_h2(http2),
    )
    .await?;
    let status = response.status().as_u16();
    let mut body = expect_success(response).await?.into_body();
    let (mut chunk_ms, mut frames) = (Vec::new(), 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            format!(
                "body broken after {} chunks: {}",
                chunk_ms.len(),
                net::describe(&e)
            )
        })?;
        if let Some(data) = frame.data_ref() {
            frames += 1;
            let at = sent.elapsed().as_millis() as u64;
            chunk_ms.extend(data.iter().filter(|b| **b == b'\n').map(|_| at));
        }
    }
    Ok(StreamReport {
        status,
        chunks: chunk_ms.len(),
        frames,
        first_chunk_ms: chunk_ms.first().copied(),
        last_chunk_ms: chunk_ms.last().copied(),
        chunk_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_keep_the_path() {
        for (url, host, port, path) in [
            (
                "http://a:8080/public/../admin",
                "a",
                8080,
                "/public/../admin",
            ),
            (
                "http://a/public/%2e%2e/admin?x=1",
                "a",
                80,
                "/public/%2e%2e/admin?x=1",
            ),
            ("http://[::1]:9/a//b", "::1", 9, "/a//b"),
            ("http://10.1.2.3:7", "10.1.2.3", 7, "/"),
            ("ws://b:1/ws", "b", 1, "/ws"),
        ] {
            let t = Target::parse(url).expect("valid url");
            assert_eq!(
                (t.host.as_str(), t.port, t.path_and_query.as_str()),
                (host, port, path)
            );
        }
        assert!(Target::parse("https://a/").is_err());
        assert!(Target::parse("/relative").is_err());
    }

    #[test]
    fn header_arguments() {
        let h = parse_headers(&["X-A: 1".into(), "host:b ".into()]).expect("valid");
        assert_eq!(h[0].0.as_str(), "x-a");
        assert_eq!(h[1].1, "b");
        assert!(parse_headers(&["nocolon".into()]).is_err());
    }
}
