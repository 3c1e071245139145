//! A server-first protocol, like MySQL or SMTP: the server speaks first.
//!
//! On accept the server writes `BANNER <name>\r\n`, then answers every line
//! with `ECHO <line>\r\n` until the client closes. Proxies that wait for the
//! client's first bytes (protocol sniffing) stall such protocols: the client
//! measures how long the banner took.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::net;

/// Longest line the server echoes; longer ones are cut into several.
const MAX_LINE: u64 = 64 * 1024;
/// The line the client sends.
const PROBE: &str = "hello weft";

/// Serves the banner protocol on `listener` as pod `name`.
pub async fn serve(listener: TcpListener, name: String) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = session(stream, &name).await;
                });
            }
            Err(e) => {
                eprintln!("banner accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn session(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (reader, mut writer) = stream.into_split();
    writer
        .write_all(format!("BANNER {name}\r\n").as_bytes())
        .await?;
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        if (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await?
            == 0
        {
            break;
        }
        let mut answer = b"ECHO ".to_vec();
        answer.extend_from_slice(trim_eol(&line));
        answer.extend_from_slice(b"\r\n");
        writer.write_all(&answer).await?;
    }
    writer.shutdown().await
}

/// A line without its `\n` or `\r\n`.
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What `banner` prints.
#[derive(Debug, Serialize)]
pub struct BannerReport {
    /// The banner line, without its line end.
    pub banner: String,
    /// Time to establish the TCP connection (to the sidecar, when there is one).
    pub connect_micros: u64,
    /// From connected to the first byte of the banner; the client sent nothing before.
    pub first_byte_micros: u64,
    /// The probe line came back as `ECHO <line>`.
    pub echo_ok: bool,
    /// Whole exchange.
    pub micros: u64,
}

/// `banner`: waits for the banner without sending, then checks one echo.
pub async fn client(addr: &str) -> Result<BannerReport, String> {
    let started = Instant::now();
    let (host, port) = net::split_host_port(addr)?;
    let stream = net::connect(&host, port).await?;
    let connected = Instant::now();
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let first = reader
        .fill_buf()
        .await
        .map_err(|e| format!("waiting for the banner: {e}"))?;
    if first.is_empty() {
        return Err("connection closed before the banner".into());
    }
    let first_byte = connected.elapsed();
    let banner = read_line(&mut reader).await?;
    if !banner.starts_with("BANNER ") {
        return Err(format!("unexpected banner {banner:?}"));
    }
    writer
        .write_all(format!("{PROBE}\r\n").as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let echo = read_line(&mut reader).await?;
    if echo != format!("ECHO {PROBE}") {
        return Err(format!("echo {echo:?}, expected \"ECHO {PROBE}\""));
    }
    let _ = writer.shutdown().await;
    Ok(BannerReport {
        banner,
        connect_micros: connected.duration_since(started).as_micros() as u64,
        first_byte_micros: first_byte.as_micros() as u64,
        echo_ok: true,
        micros: started.elapsed().as_micros() as u64,
    })
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Result<String, String> {
    let mut line = Vec::new();
    reader
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if !line.ends_with(b"\n") {
        return Err(format!(
            "connection closed mid-line after {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(String::from_utf8_lossy(trim_eol(&line)).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends() {
        assert_eq!(trim_eol(b"a\r\n"), b"a");
        assert_eq!(trim_eol(b"a\n"), b"a");
        assert_eq!(trim_eol(b"a"), b"a");
        assert_eq!(trim_eol(b"a\r"), b"a");
    }
}
