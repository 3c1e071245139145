//! The HTTPS server: AdmissionReviews (sidecar injection) and, on `/convert`,
//! ConversionReviews (the SMI CRDs' versions). Its certificate is re-read when the files
//! change, so the CA can rotate it without a restart.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use weft_crds::conversion::WEBHOOK_PATH;

use crate::WebhookError;
use crate::convert::{MAX_CONVERSION_REVIEW_BYTES, handle_conversion};
use crate::inject::InjectConfig;
use crate::review::{MAX_REVIEW_BYTES, handle_review};

/// How often the certificate files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    stamp: (SystemTime, SystemTime),
    checked: Instant,
}

/// A serving certificate read from PEM files and re-read when they change.
#[derive(Debug)]
pub struct ReloadingCertificate {
    cert: PathBuf,
    key: PathBuf,
    loaded: Mutex<Loaded>,
}

fn modified(path: &Path) -> Result<SystemTime, WebhookError> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|e| WebhookError::Io(path.to_path_buf(), e))
}

fn load(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, WebhookError> {
    let tls = |what: &str, e: &dyn std::fmt::Display| WebhookError::Tls(format!("{what}: {e}"));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls("certificate", &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls("certificate", &e))?;
    if chain.is_empty() {
        return Err(WebhookError::Tls(format!(
            "{}: no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls("key", &e))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| tls("key", &e))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

impl ReloadingCertificate {
    /// Reads the certificate chain and key once; fails if they are unusable.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, WebhookError> {
        let loaded = Loaded {
            key: load(&cert, &key)?,
            stamp: (modified(&cert)?, modified(&key)?),
            checked: Instant::now(),
        };
        Ok(Self {
            cert,
            key,
            loaded: Mutex::new(loaded),
        })
    }

    /// The current certificate, re-read first if the files changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if loaded.checked.elapsed() >= RELOAD_CHECK {
            loaded.checked = Instant::now();
            if let (Ok(c), Ok(k)) = (modified(&self.cert), modified(&self.key))
                && (c, k) != loaded.stamp
            {
                match load(&self.cert, &self.key) {
                    Ok(key) => {
                        tracing::info!(cert = %self.cert.display(), "serving certificate reloaded");
                        loaded.key = key;
                        loaded.stamp = (c, k);
                    }
                    // A half-written pair: keep serving the old one and retry.
                    Err(e) => {
                        tracing::warn!(error = %e, "new serving certificate unusable; keeping the old one")
                    }
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// A TLS acceptor serving `cert` (HTTP/1.1).
pub fn acceptor(cert: Arc<ReloadingCertificate>) -> Result<TlsAcceptor, WebhookError> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| WebhookError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_cert_resolver(cert);
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn route(
    req: Request<hyper::body::Incoming>,
    config: &InjectConfig,
) -> Response<Full<Bytes>> {
    let json = |status: u16, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let read_error = |e: &dyn std::fmt::Display| {
        json(
            StatusCode::BAD_REQUEST.as_u16(),
            format!(
                r#"{{"error":"reading the request body: {}"}}"#,
                e.to_string().replace('"', "'")
            )
            .into_bytes(),
        )
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => Response::new(Full::new(Bytes::from_static(b"ok\n"))),
        // CRD conversion (ConversionReview); every other POST is an AdmissionReview.
        (&Method::POST, WEBHOOK_PATH) => {
            match Limited::new(req.into_body(), MAX_CONVERSION_REVIEW_BYTES)
                .collect()
                .await
            {
                Ok(body) => {
                    let reply = handle_conversion(&body.to_bytes());
                    json(reply.status, reply.body)
                }
                Err(e) => read_error(&e),
            }
        }
        (&Method::POST, _) => match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
            .collect()
            .await
        {
            Ok(body) => {
                let reply = handle_review(&body.to_bytes(), config);
                json(reply.status, reply.body)
            }
            Err(e) => read_error(&e),
        },
        _ => json(
            StatusCode::METHOD_NOT_ALLOWED.as_u16(),
            br#"{"error":"POST an AdmissionReview (or a ConversionReview to /convert)"}"#.to_vec(),
        ),
    }
}

/// Serves AdmissionReviews on `listener` until an accept loop error; connection tasks
/// are supervised here.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    config: Arc<InjectConfig>,
) -> Result<(), WebhookError> {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                // A response written in two parts must not wait for a delayed ACK.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::warn!(%peer, error = %e, "TCP_NODELAY not set");
                }

                let (tls, config) = (tls.clone(), config.clone());
                connections.spawn(async move {
                    let stream = match tls.accept(stream).await {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let config = config.clone();
                        async move { Ok::<_, Infallible>(route(req, &config).await) }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                });
            }
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    return Err(WebhookError::TaskPanicked(e.to_string()));
                }
            }
        }
    }
}

/// `weft-webhook`: serve AdmissionReviews and ConversionReviews over HTTPS.
#[derive(Debug, clap::Parser)]
#[command(name = "weft-webhook", version)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:9443")]
    addr: std::net::SocketAddr,
    /// Serving certificate chain (PEM); re-read when it changes.
    #[arg(long)]
    cert: PathBuf,
    /// Serving key (PEM); re-read when it changes.
    #[arg(long)]
    key: PathBuf,
    /// Injection settings (JSON with InjectConfig's camelCase fields); defaults otherwise.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Inject a regular container instead of a native sidecar (clusters before 1.29).
    #[arg(long)]
    legacy_sidecar: bool,
    /// Deny pods that cannot be decoded instead of admitting them unchanged.
    #[arg(long)]
    fail_closed: bool,
}

async fn run(args: Args) -> Result<(), WebhookError> {
    let mut config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| WebhookError::Io(path.clone(), e))?;
            serde_json::from_str(&text)
                .map_err(|e| WebhookError::Config(path.clone(), e.to_string()))?
        }
        None => InjectConfig::default(),
    };
    config.legacy_sidecar |= args.legacy_sidecar;
    config.fail_closed |= args.fail_closed;
    let cert = Arc::new(ReloadingCertificate::new(args.cert, args.key)?);
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|e| WebhookError::Bind(args.addr, e))?;
    tracing::info!(addr = %args.addr, "weft-webhook serving");
    serve(listener, acceptor(cert)?, Arc::new(config)).await
}

/// Parses arguments and serves until an error.
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-webhook: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-webhook: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
