//! The test app that runs in every harness pod.
//!
//! `serve` answers every request with the pod's name; `get` makes one request;
//! `load` sends many and prints, as JSON, which pod answered each one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Mutex;
use weft_e2e::LoadReport;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP on 0.0.0.0:PORT, answering with NAME.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Pad the body (the name, then spaces) to this many bytes.
        #[arg(long, default_value_t = 0)]
        body_size: usize,
        /// Also serve on this port.
        #[arg(long)]
        extra_port: Option<u16>,
    },
    /// GET a URL once; exit 0 on a 2xx answer. Prints the body, then the echoed
    /// peer identity (if any) on a line `peer: ...`.
    Get {
        url: String,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request header `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
    },
    /// Send requests; print a JSON LoadReport.
    Load {
        #[arg(long)]
        url: String,
        /// Stop after this many requests.
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many milliseconds.
        #[arg(long)]
        duration_ms: Option<u64>,
        /// Requests in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Pause between the requests of one worker.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
}

type AppError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(name: String, port: u16, body_size: usize) -> Result<(), AppError> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    let body = Bytes::from(format!("{name:<body_size$}"));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let body = body.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let mut response = Response::new(Full::new(body.clone()));
                        // Tests read the caller's identity, as the sidecar forwarded it, from here.
                        if let Some(xfcc) = req.headers().get("x-forwarded-client-cert") {
                            response.headers_mut().insert(PEER_ECHO_HEADER, xfcc.clone());
                        }
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done && e.is_panic() {
                    return Err(format!("connection task panicked: {e}").into());
                }
            }
        }
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// Response header carrying the `x-forwarded-client-cert` the app received.
const PEER_ECHO_HEADER: &str = "x-weft-peer-echo";

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
async fn send_with_peer(
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn load(
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
                let start = now_ms();
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

async fn run(args: Args) -> Result<bool, AppError> {
    match args.command {
        Command::Serve {
            name,
            port,
            body_size,
            extra_port,
        } => {
            let main = serve(name.clone(), port, body_size);
            match extra_port {
                Some(extra) => tokio::try_join!(main, serve(name, extra, body_size)).map(|_| true),
                None => main.await.map(|()| true),
            }
        }
        Command::Get {
            url,
            method,
            headers,
        } => {
            let url: hyper::Uri = url.parse()?;
            let mut request = Request::builder().method(method.as_str()).uri(url);
            for h in &headers {
                let (name, value) = h.split_once(':').ok_or("--header needs name: value")?;
                request = request.header(name.trim(), value.trim());
            }
            match send_with_peer(&client(), request.body(Empty::new())?).await {
                Ok((body, peer)) => {
                    println!("{body}");
                    if let Some(peer) = peer {
                        println!("peer: {peer}");
                    }
                    Ok(true)
                }
                Err(e) => {
                    eprintln!("{e}");
                    Ok(false)
                }
            }
        }
        Command::Load {
            url,
            count,
            duration_ms,
            concurrency,
            interval_ms,
        } => {
            if count.is_none() && duration_ms.is_none() {
                return Err("load needs --count or --duration-ms".into());
            }
            let report = load(
                url.parse()?,
                count,
                duration_ms.map(Duration::from_millis),
                concurrency,
                Duration::from_millis(interval_ms),
            )
            .await;
            println!("{}", serde_json::to_string(&report)?);
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-e2e-app: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-e2e-app: {e}");
            ExitCode::FAILURE
        }
    }
}
