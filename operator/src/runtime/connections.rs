//! Accepting connections with every connection task supervised.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::error::WeftError;

/// Accepts connections on `listener` forever, handling each in its own task. Accept
/// errors are logged and skipped; a handler that panics ends the loop with an error,
/// so the process stops instead of running on with a bug. Every connection gets
/// `TCP_NODELAY`: with Nagle's algorithm, a small write (an xDS push) that follows one
/// the peer has not ACKed yet (an HTTP/2 WINDOW_UPDATE) waits for the peer's delayed
/// ACK, up to 40 ms.
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    what: &'static str,
    handle: F,
) -> Result<(), WeftError>
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::warn!(what, %peer, error = %e, "TCP_NODELAY not set");
                    }
                    connections.spawn(handle(stream, peer));
                }
                Err(e) => tracing::warn!(what, error = %e, "accept failed"),
            },
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    return Err(WeftError::TaskEnded { task: what, reason: e.to_string() });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(serve_connections(listener, "test", move |stream, _| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(stream.nodelay().ok());
            }
        }));
        let _client = TcpStream::connect(addr).await.unwrap();
        assert_eq!(rx.recv().await, Some(Some(true)));
        server.abort();
    }
}
