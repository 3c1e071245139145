//! The xDS port: TLS (with a certificate from Weft's CA) and, unless TLS is required,
//! plaintext on the same port, told apart by the first byte a client sends.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
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

use crate::connections::serve_connections;
use crate::error::WeftError;
use crate::identity::{CertificateAuthority, spiffe_id};

/// Namespace and service account the control plane's own identity names.
pub const CONTROL_PLANE_NAMESPACE: &str = "weft-system";
/// Service account of the control plane.
pub const CONTROL_PLANE_SERVICE_ACCOUNT: &str = "weft";
/// The xDS serving certificate is reissued on every start; it lives this long.
const SERVING_CERT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
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

/// A TLS acceptor for the xDS port with a fresh certificate from `ca` (ALPN h2).
pub fn tls_acceptor(
    ca: &CertificateAuthority,
    trust_domain: &str,
    hosts: &[String],
) -> Result<TlsAcceptor, WeftError> {
    let svid = ca.issue_server(
        &control_plane_id(trust_domain),
        hosts,
        SERVING_CERT_TTL,
        SystemTime::now(),
    )?;
    let tls_err = |e: &dyn std::fmt::Display| WeftError::Identity(format!("xDS TLS: {e}"));
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(svid.cert_chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes()).map_err(|e| tls_err(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls_err(&e))?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| tls_err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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
