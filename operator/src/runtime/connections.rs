//! Accepting connections with every connection task supervised.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::error::WeftError;

/// Accepts connections on `listener` forever, handling each in its own task. Accept
/// errors are logged and skipped; a handler that panics ends the loop with an error,
/// so the process stops instead of running on with a bug.
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
