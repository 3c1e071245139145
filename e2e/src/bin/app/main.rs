//! The test app that runs in every harness pod.
//!
//! `serve` answers HTTP (HTTP/1.1 and h2c) with the pod's name, and on extra
//! listeners speaks gRPC, a server-first "banner" protocol and a Redis subset;
//! `get` makes one request; `load` sends many and prints, as JSON, which pod
//! answered each one. The other subcommands are clients for each protocol:
//! each prints one JSON object and exits 0 when the exchange went as expected,
//! or prints a one-line reason on stderr and exits 1.

mod banner;
mod faults;
mod grpc;
mod http_client;
mod http_server;
mod load;
mod net;
mod otlp;

mod pattern;
mod redis;
mod ws;

use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use http_body_util::Empty;
use hyper::Request;
use serde::Serialize;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP/1.1 and h2c on [::]:PORT, answering with NAME; more protocols with --listen.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Pad the body (the name, then spaces) to this many bytes.
        #[arg(long, default_value_t = 0)]
        body_size: usize,
        /// Also serve HTTP on this port.
        #[arg(long)]
        extra_port: Option<u16>,
        /// Another listener, KIND:PORT with KIND one of http, grpc, banner, redis (repeatable).
        #[arg(long = "listen", value_name = "KIND:PORT")]
        listens: Vec<Listen>,
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
    /// One HTTP request; prints status, version, headers and body as JSON, whatever the status.
    Http {
        url: String,
        /// HTTP method.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Request header `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Speak HTTP/2 without upgrade (h2c).
        #[arg(long)]
        http2_prior_knowledge: bool,
        /// Send the request as HTTP/1.0.
        #[arg(long, conflicts_with = "http2_prior_knowledge")]
        http10: bool,
        /// Send a body of N pattern bytes (with a content-length).
        #[arg(long)]
        body_bytes: Option<u64>,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// WebSocket: send messages, expect each echoed identically, close cleanly.
    Ws {
        url: String,
        /// Messages to send (text and binary alternately).
        #[arg(long, default_value_t = 5)]
        messages: usize,
        /// Open the WebSocket over h2c with an extended CONNECT (RFC 8441).
        #[arg(long)]
        http2_prior_knowledge: bool,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// One call to the weft.test.Echo gRPC service at HOST:PORT.
    Grpc {
        addr: String,
        /// The kind of call.
        #[arg(long, value_enum)]
        call: grpc::Call,
        /// Replies (server-stream) or requests (client-stream, bidi).
        #[arg(long, default_value_t = 3)]
        count: u32,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// Unary gRPC calls to HOST:PORT; prints a JSON LoadReport.
    GrpcLoad {
        addr: String,
        /// Calls to make.
        #[arg(long)]
        count: usize,
        /// Calls in flight at once (over one HTTP/2 connection).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// Receive spans over OTLP/gRPC on ADDR, appending them as JSON lines to OUT.
    Otlp {
        /// Listen address, HOST:PORT.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The file spans are appended to.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Server-first protocol at HOST:PORT: wait for the banner, then check one echo.
    Banner {
        addr: String,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// Redis subset at HOST:PORT: PING, SET, GET, ECHO and an inline PING.
    Redis {
        addr: String,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// POST N pattern bytes (streamed) and check the server's count and sha256.
    Upload {
        url: String,
        /// Body size.
        #[arg(long)]
        bytes: u64,
        /// Speak HTTP/2 without upgrade (h2c).
        #[arg(long)]
        http2_prior_knowledge: bool,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// GET a URL and check that the body is N pattern bytes.
    Download {
        url: String,
        /// Expected body size.
        #[arg(long)]
        bytes: u64,
        /// Speak HTTP/2 without upgrade (h2c).
        #[arg(long)]
        http2_prior_knowledge: bool,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// GET a streamed response; report when each line arrived.
    Stream {
        url: String,
        /// Speak HTTP/2 without upgrade (h2c).
        #[arg(long)]
        http2_prior_knowledge: bool,
        #[command(flatten)]
        timeout: Timeout,
    },
}

/// The bound on a client exchange.
#[derive(ClapArgs, Debug, Clone, Copy)]
struct Timeout {
    /// Fail when the whole exchange takes longer than this.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

/// What a `--listen` listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Grpc,
    Banner,
    Redis,
}

/// A `--listen KIND:PORT` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Listen {
    kind: Kind,
    port: u16,
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, port) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected KIND:PORT"))?;
        let kind = match kind {
            "http" => Kind::Http,
            "grpc" => Kind::Grpc,
            "banner" => Kind::Banner,
            "redis" => Kind::Redis,
            other => {
                return Err(format!(
                    "unknown kind {other:?} (http, grpc, banner, redis)"
                ));
            }
        };
        let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
        Ok(Self { kind, port })
    }
}

type AppError = Box<dyn std::error::Error + Send + Sync>;

/// Serves every listener until one fails.
async fn serve(name: String, body_size: usize, listens: Vec<Listen>) -> Result<(), AppError> {
    let app = Arc::new(http_server::HttpApp::new(&name, body_size));
    let mut servers = tokio::task::JoinSet::new();
    for Listen { kind, port } in listens {
        // Bind everything before serving anything: a taken port fails at once.
        let listener = net::bind_any(port).map_err(|e| format!("listen on port {port}: {e}"))?;
        let (app, name) = (app.clone(), name.clone());
        servers.spawn(async move {
            let outcome: Result<(), String> = match kind {
                Kind::Http => http_server::serve(listener, app)
                    .await
                    .map_err(|e| e.to_string()),
                Kind::Grpc => grpc::serve(listener, name)
                    .await
                    .map_err(|e| net::describe(&e)),
                Kind::Banner => {
                    banner::serve(listener, name).await;
                    Ok(())
                }
                Kind::Redis => {
                    redis::serve(listener).await;
                    Ok(())
                }
            };
            outcome.map_err(|e| format!("{kind:?} server on port {port}: {e}"))
        });
    }
    while let Some(done) = servers.join_next().await {
        done.map_err(|e| format!("server task: {e}"))??;
    }
    Ok(())
}

/// Runs a client exchange within its timeout; prints its JSON report or the reason it failed.
async fn exchange<T: Serialize>(
    timeout: Timeout,
    run: impl Future<Output = Result<T, String>>,
) -> bool {
    let outcome = tokio::time::timeout(Duration::from_millis(timeout.timeout_ms), run)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {} ms", timeout.timeout_ms)))
        .and_then(|report| serde_json::to_string(&report).map_err(|e| e.to_string()));
    match outcome {
        Ok(json) => {
            println!("{json}");
            true
        }
        Err(reason) => {
            eprintln!("{}", reason.replace('\n', " "));
            false
        }
    }
}

async fn run(args: Args) -> Result<bool, AppError> {
    match args.command {
        Command::Serve {
            name,
            port,
            body_size,
            extra_port,
            listens,
        } => {
            let http = |port| Listen {
                kind: Kind::Http,
                port,
            };
            let all = std::iter::once(http(port))
                .chain(extra_port.map(http))
                .chain(listens)
                .collect();
            serve(name, body_size, all).await.map(|()| true)
        }
        Command::Otlp { listen, out } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            otlp::serve(listener, out).await?;
            Ok(true)
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
            match load::send_with_peer(&load::client(), request.body(Empty::new())?).await {
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
            let report = load::load(
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
        Command::Http {
            url,
            method,
            headers,
            http2_prior_knowledge,
            http10,
            body_bytes,
            timeout,
        } => Ok(exchange(
            timeout,
            http_client::http(
                &url,
                &method,
                &headers,
                if http10 {
                    http_client::Wire::Http10
                } else {
                    http_client::Wire::from_h2(http2_prior_knowledge)
                },
                body_bytes,
            ),
        )
        .await),
        Command::Ws {
            url,
            messages,
            http2_prior_knowledge,
            timeout,
        } => Ok(exchange(timeout, ws::client(&url, messages, http2_prior_knowledge)).await),
        Command::Grpc {
            addr,
            call,
            count,
            timeout,
        } => Ok(exchange(timeout, grpc::call(&addr, call, count)).await),
        Command::GrpcLoad {
            addr,
            count,
            concurrency,
            timeout,
        } => Ok(exchange(timeout, grpc::load(&addr, count, concurrency)).await),
        Command::Banner { addr, timeout } => Ok(exchange(timeout, banner::client(&addr)).await),
        Command::Redis { addr, timeout } => Ok(exchange(timeout, redis::client(&addr)).await),
        Command::Upload {
            url,
            bytes,
            http2_prior_knowledge,
            timeout,
        } => Ok(exchange(
            timeout,
            http_client::upload(&url, bytes, http2_prior_knowledge),
        )
        .await),
        Command::Download {
            url,
            bytes,
            http2_prior_knowledge,
            timeout,
        } => Ok(exchange(
            timeout,
            http_client::download(&url, bytes, http2_prior_knowledge),
        )
        .await),
        Command::Stream {
            url,
            http2_prior_knowledge,
            timeout,
        } => Ok(exchange(timeout, http_client::stream(&url, http2_prior_knowledge)).await),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_arguments() {
        assert_eq!(
            "grpc:15051".parse(),
            Ok(Listen {
                kind: Kind::Grpc,
                port: 15051
            })
        );
        assert_eq!(
            "redis:6379".parse::<Listen>().map(|l| l.kind),
            Ok(Kind::Redis)
        );
        assert!("ftp:21".parse::<Listen>().is_err());
        assert!("http".parse::<Listen>().is_err());
        assert!("http:99999".parse::<Listen>().is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }
}
