//! Listening and connecting, for every protocol of the app.

use std::error::Error;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Binds `[::]:port` dual-stack, or `0.0.0.0:port` where the pod has no IPv6.
pub fn bind_any(port: u16) -> std::io::Result<TcpListener> {
    match bind_dual_stack(port) {
        Ok(listener) => Ok(listener),
        // A taken port is taken for IPv4 too: say so rather than half-serve.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(e),
        // A kernel without IPv6 refuses the v6 socket or its bind.
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            listen(socket, SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        }
    }
}

fn bind_dual_stack(port: u16) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    // Explicit, so that a host with net.ipv6.bindv6only=1 still accepts IPv4.
    socket.set_only_v6(false)?;
    listen(socket, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
}

fn listen(socket: Socket, addr: SocketAddr) -> std::io::Result<TcpListener> {
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Splits `host:port` or `[v6]:port` into the host (without brackets) and the port.
pub fn split_host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .map_err(|_| format!("{addr}: bad port {port:?}"))?;
    let host = match host.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| format!("{addr}: unclosed '['"))?,
        None if host.contains(':') => {
            return Err(format!("{addr}: an IPv6 address needs brackets"));
        }
        None => host,
    };
    if host.is_empty() {
        return Err(format!("{addr}: empty host"));
    }
    Ok((host.to_string(), port))
}

/// Connects to the first address of `host` (a name, from /etc/hosts or DNS, or an IP literal) that answers.
pub async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolve {host}: {e}"))?
        .collect();
    let mut last = format!("resolve {host}: no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                // Small writes (lines, RESP commands, chunks) must leave at once.
                stream
                    .set_nodelay(true)
                    .map_err(|e| format!("set TCP_NODELAY: {e}"))?;
                return Ok(stream);
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    Err(last)
}

/// An error with its chain of sources, on one line.
pub fn describe(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a:1"), Ok(("a".into(), 1)));
        assert_eq!(split_host_port("10.0.0.1:80"), Ok(("10.0.0.1".into(), 80)));
        assert_eq!(split_host_port("[::1]:443"), Ok(("::1".into(), 443)));
        assert!(split_host_port("::1:443").is_err());
        assert!(split_host_port("a").is_err());
        assert!(split_host_port("a:x").is_err());
        assert!(split_host_port(":80").is_err());
        assert!(split_host_port("[::1:80").is_err());
    }
}
