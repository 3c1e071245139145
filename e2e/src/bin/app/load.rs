//! `get` and `load`: the harness's plain HTTP/1.1 client, over a pooled
//! connection, expecting 2xx answers carrying the answering pod's name.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use weft_e2e::LoadReport;

use crate::http_server::PEER_ECHO_HEADER;

/// The pooled HTTP/1.1 client of `get` and `load`.
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A pooled client with a 2 s connect timeout.
pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// One GET: Ok(body) on 2xx, Err(description) otherwise.
async fn get_once(client: &HttpClient, url: &hyper::Uri) -> Result<String, String> {
    get_with_peer(client, url).await.map(|(body, _)| body)
}

/// One GET: Ok((body, echoed peer identity)) on 2xx, Err(description) otherwise.
async fn get_with_peer(
    client: &HttpClient,
    url: &hyper::Uri,
) -> Result<(String, Option<String>), String> {
    let request = Request::get(url.clone())
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    send_with_peer(client, request).await
}

/// One request: Ok((body, echoed peer identity)) on 2xx, Err(description) otherwise.
pub async fn send_with_peer(
    client: &HttpClient,
    request: Request<Empty<Bytes>>,
) -> Result<(String, Option<String>), String> {
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let peer = response
        .headers()
        .get(PEER_ECHO_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    if status.is_success() {
        Ok((text, peer))
    } else {
        Err(format!("HTTP {status}: {text}"))
    }
}

/// `load`: requests from `concurrency` workers until `count` or `duration`; who answered each.
pub async fn load(
    url: hyper::Uri,
    count: Option<usize>,
    duration: Option<Duration>,
    concurrency: usize,
    interval: Duration,
) -> LoadReport {
    let client = client();
    let started = Instant::now();
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, issued, results) =
            (client.clone(), url.clone(), issued.clone(), results.clone());
        workers.spawn(async move {
            loop {
                if duration.is_some_and(|d| started.elapsed() >= d) {
                    return;
                }
                let n = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if count.is_some_and(|c| n >= c) {
                    return;
                }
                let start = weft_e2e::now_ms();
                let timer = Instant::now();
                let outcome = get_once(&client, &url).await;
                let micros = timer.elapsed().as_micros() as u64;
                results.lock().await.push((start, micros, outcome));
                if !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let mut results = std::mem::take(&mut *results.lock().await);
    results.sort_by_key(|(start, _, _)| *start);
    LoadReport::from_timed_results(results)
}
