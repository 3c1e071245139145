//! The xDS port: TLS (with a certificate from Weft's CA) and, unless TLS is required,
//! plaintext on the same port, told apart by the first byte a client sends.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::error::WeftError;
use crate::identity::{CertificateAuthority, spiffe_id};
use crate::runtime::connections::serve_connections;

/// Namespace and service account the control plane's own identity names.
pub const CONTROL_PLANE_NAMESPACE: &str = "weft-system";
/// Service account of the control plane.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "weft";
/// Lifetime of the xDS serving certificate; it is reissued at half of it, live.
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long after a failed renewal of the serving certificate the next attempt is.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);
/// A client that sends nothing for this long is dropped before it ties up a slot.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// SPIFFE ID in the control plane's serving certificate, checked by bootstraps.
pub fn control_plane_id(trust_domain: &str) -> String {
    spiffe_id(
        trust_domain,
        CONTROL_PLANE_NAMESPACE,
        CONTROL_PLANE_SERVICE_ACCOUNT,
    )
}

/// One accepted xDS connection.
#[derive(Debug)]
pub enum XdsConnection {
    /// Plaintext gRPC.
    Plain(TcpStream),
    /// gRPC over TLS.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for XdsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Self::Plain(s) => s.connect_info(),
            Self::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for XdsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for XdsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The certificate the xDS port presents, swapped in place when it is renewed: new
/// handshakes get the new one, established connections are left alone.
#[derive(Debug)]
struct ServingCertResolver {
    current: RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for ServingCertResolver {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn tls_err(e: &dyn std::fmt::Display) -> WeftError {
    WeftError::Identity(format!("xDS TLS: {e}"))
}

/// The xDS port's certificate from Weft's CA (SPIFFE ID [`control_plane_id`], the
/// given host names), renewed at half its lifetime.
#[derive(Debug)]
pub struct XdsServingCert {
    resolver: Arc<ServingCertResolver>,
    trust_domain: String,
    hosts: Vec<String>,
    ttl: Duration,
    serial: String,
    renew_at: SystemTime,
}

impl XdsServingCert {
    /// Issues the first certificate.
    pub fn issue(
        ca: &CertificateAuthority,
        trust_domain: &str,
        hosts: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Self, WeftError> {
        let (key, serial) = Self::certified_key(ca, trust_domain, hosts, ttl, now)?;
        Ok(Self {
            resolver: Arc::new(ServingCertResolver {
                current: RwLock::new(Arc::new(key)),
            }),
            trust_domain: trust_domain.to_string(),
            hosts: hosts.to_vec(),
            ttl,
            serial,
            renew_at: now + ttl / 2,
        })
    }

    fn certified_key(
        ca: &CertificateAuthority,
        trust_domain: &str,
        hosts: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(rustls::sign::CertifiedKey, String), WeftError> {
        let svid = ca.issue_server(&control_plane_id(trust_domain), hosts, ttl, now)?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(svid.cert_chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err(&e))?;
        let key =
            PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).map_err(|e| tls_err(&e))?;
        let signing_key =
            rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| tls_err(&e))?;
        Ok((
            rustls::sign::CertifiedKey::new(chain, signing_key),
            svid.serial,
        ))
    }

    /// When the certificate is due for renewal.
    pub fn renew_at(&self) -> SystemTime {
        self.renew_at
    }

    /// Serial number (hex) of the certificate presented now.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Issues a new certificate and presents it from the next handshake on. On failure
    /// the current one stays and the next attempt is a minute later.
    pub fn renew(&mut self, ca: &CertificateAuthority, now: SystemTime) -> Result<(), WeftError> {
        let (key, serial) =
            match Self::certified_key(ca, &self.trust_domain, &self.hosts, self.ttl, now) {
                Ok(issued) => issued,
                Err(e) => {
                    self.renew_at = now + RENEWAL_RETRY;
                    return Err(e);
                }
            };
        *self
            .resolver
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
        self.serial = serial;
        self.renew_at = now + self.ttl / 2;
        Ok(())
    }

    /// A TLS acceptor (ALPN h2) that always presents the current certificate.
    pub fn acceptor(&self) -> Result<TlsAcceptor, WeftError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&e))?
        .with_no_client_auth()
        .with_cert_resolver(self.resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

async fn classify(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    require_tls: bool,
) -> io::Result<XdsConnection> {
    let mut first = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no data from the client"))??;
    if n == 1 && first[0] == TLS_HANDSHAKE {
        let tls = tokio::time::timeout(FIRST_BYTE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        return Ok(XdsConnection::Tls(Box::new(tls)));
    }
    if require_tls {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "plaintext xDS refused (--require-xds-tls)",
        ));
    }
    Ok(XdsConnection::Plain(stream))
}

/// Accepts xDS connections and hands classified ones to the gRPC server; handshakes
/// run concurrently and are supervised. Ends only with an error.
pub async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    require_tls: bool,
    ready: mpsc::Sender<Result<XdsConnection, io::Error>>,
) -> Result<(), WeftError> {
    serve_connections(listener, "xds-handshake", move |stream, peer| {
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        async move {
            match classify(stream, &acceptor, require_tls).await {
                Ok(conn) => {
                    // The gRPC server is gone only at shutdown.
                    let _ = ready.send(Ok(conn)).await;
                }
                Err(e) => tracing::warn!(%peer, error = %e, "xDS connection dropped"),
            }
        }
    })
    .await
}
