//! A client-first protocol: a Redis (RESP2) subset.
//!
//! Commands come as RESP arrays of bulk strings (`*1\r\n$4\r\nPING\r\n`) or as
//! inline lines (`PING\r\n`). Supported: `PING [msg]`, `ECHO msg`,
//! `SET key value`, `GET key`, `DEL key...`, `QUIT`. The store is shared by
//! the connections of one server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::net;

/// Largest bulk string accepted.
const MAX_BULK: usize = 64 * 1024 * 1024;
/// Largest array (argument count) accepted.
const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command or RESP header line.
const MAX_LINE: usize = 64 * 1024;

/// The key-value store.
type Store = Arc<Mutex<HashMap<Bytes, Bytes>>>;

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Integer(i64),
    /// `$3\r\nabc`
    Bulk(Bytes),
    /// `$-1`
    Null,
    /// `*N` followed by N replies.
    Array(Vec<Reply>),
}

impl Reply {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Reply::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::Null => out.extend_from_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }

    /// A short text form, for the client's report.
    fn render(&self) -> String {
        match self {
            Reply::Simple(s) => format!("+{s}"),
            Reply::Error(s) => format!("-{s}"),
            Reply::Integer(n) => format!(":{n}"),
            Reply::Bulk(b) => String::from_utf8_lossy(b).to_string(),
            Reply::Null => "(nil)".into(),
            Reply::Array(items) => format!(
                "[{}]",
                items
                    .iter()
                    .map(Reply::render)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Position just past the `\r\n` ending the line that starts at `from`, and the line.
fn line_at(buf: &[u8], from: usize) -> Result<Option<(&[u8], usize)>, String> {
    let rest = buf.get(from..).unwrap_or_default();
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some((&rest[..end], from + end + 2))),
        None if rest.len() > MAX_LINE => Err("line too long".into()),
        None => Ok(None),
    }
}

fn parse_len(line: &[u8], what: &str) -> Result<i64, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("invalid {what} length {:?}", String::from_utf8_lossy(line)))
}

/// Parses one command from the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the arguments (empty for a blank line) and the bytes consumed.
pub fn parse_command(buf: &[u8]) -> Result<Option<(Vec<Bytes>, usize)>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        // Inline: one line, arguments separated by spaces; `\n` alone also ends it.
        let Some(end) = buf.iter().position(|b| *b == b'\n') else {
            return if buf.len() > MAX_LINE {
                Err("too big inline request".into())
            } else {
                Ok(None)
            };
        };
        let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
        let args = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .map(Bytes::copy_from_slice)
            .collect();
        return Ok(Some((args, end + 1)));
    }
    let Some((header, mut pos)) = line_at(buf, 1)? else {
        return Ok(None);
    };
    let count = parse_len(header, "multibulk")?;
    if count <= 0 {
        return Ok(Some((Vec::new(), pos)));
    }
    let count = usize::try_from(count).map_err(|_| "invalid multibulk length")?;
    if count > MAX_ARGS {
        return Err("invalid multibulk length".into());
    }
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        match buf.get(pos) {
            None => return Ok(None),
            Some(b'$') => {}
            Some(other) => return Err(format!("expected '$', got '{}'", *other as char)),
        }
        let Some((len_line, data)) = line_at(buf, pos + 1)? else {
            return Ok(None);
        };
        let len = usize::try_from(parse_len(len_line, "bulk")?)
            .ok()
            .filter(|len| *len <= MAX_BULK)
            .ok_or("invalid bulk length")?;
        let end = data + len;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err("bulk string not followed by CRLF".into());
        }
        args.push(Bytes::copy_from_slice(&buf[data..end]));
        pos = end + 2;
    }
    Ok(Some((args, pos)))
}

/// Parses one reply from the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let Some((line, pos)) = line_at(buf, 1)? else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(line).to_string();
    match kind {
        b'+' => Ok(Some((Reply::Simple(text()), pos))),
        b'-' => Ok(Some((Reply::Error(text()), pos))),
        b':' => Ok(Some((Reply::Integer(parse_len(line, "integer")?), pos))),
        b'$' => {
            let len = parse_len(line, "bulk")?;
            if len < 0 {
                return Ok(Some((Reply::Null, pos)));
            }
            let len = usize::try_from(len)
                .ok()
                .filter(|len| *len <= MAX_BULK)
                .ok_or("invalid bulk length")?;
            let end = pos + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(Bytes::copy_from_slice(&buf[pos..end])),
                end + 2,
            )))
        }
        b'*' => {
            let count = parse_len(line, "multibulk")?;
            let mut items = Vec::new();
            let mut at = pos;
            for _ in 0..count.max(0) {
                match parse_reply(&buf[at..])? {
                    Some((item, used)) => {
                        items.push(item);
                        at += used;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(items), at)))
        }
        other => Err(format!("unknown reply type '{}'", other as char)),
    }
}

/// Runs one command against the store.
pub fn execute(args: &[Bytes], store: &Mutex<HashMap<Bytes, Bytes>>) -> Reply {
    let Some(command) = args.first() else {
        return Reply::Error("ERR empty command".into());
    };
    let name = String::from_utf8_lossy(command).to_ascii_uppercase();
    let wrong_args = || {
        Reply::Error(format!(
            "ERR wrong number of arguments for '{}' command",
            name.to_ascii_lowercase()
        ))
    };
    // A panic elsewhere cannot leave the map half-written: take it anyway.
    let store = || {
        store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    match (name.as_str(), &args[1..]) {
        ("PING", []) => Reply::Simple("PONG".into()),
        ("PING", [message]) => Reply::Bulk(message.clone()),
        ("ECHO", [message]) => Reply::Bulk(message.clone()),
        // Options (EX, NX...) are accepted and ignored.
        ("SET", [key, value, ..]) => {
            store().insert(key.clone(), value.clone());
            Reply::Simple("OK".into())
        }
        ("GET", [key]) => store().get(key).cloned().map_or(Reply::Null, Reply::Bulk),
        ("DEL", keys) if !keys.is_empty() => {
            let mut store = store();
            Reply::Integer(keys.iter().filter(|k| store.remove(*k).is_some()).count() as i64)
        }
        ("QUIT", _) => Reply::Simple("OK".into()),
        ("PING" | "ECHO" | "SET" | "GET" | "DEL", _) => wrong_args(),
        _ => Reply::Error(format!(
            "ERR unknown command '{}'",
            String::from_utf8_lossy(command)
        )),
    }
}

/// Serves the Redis subset on `listener`.
pub async fn serve(listener: TcpListener) {
    let store = Store::default();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let store = store.clone();
                tokio::spawn(async move {
                    let _ = session(stream, store).await;
                });
            }
            Err(e) => {
                eprintln!("redis accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn session(mut stream: TcpStream, store: Store) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        // Answer every complete command in the buffer (pipelining) in one write.
        let mut out = Vec::new();
        let mut quit = false;
        loop {
            match parse_command(&buf) {
                Ok(Some((args, used))) => {
                    buf.advance(used);
                    if args.is_empty() {
                        continue;
                    }
                    execute(&args, &store).encode(&mut out);
                    if args[0].eq_ignore_ascii_case(b"QUIT") {
                        quit = true;
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    Reply::Error(format!("ERR Protocol error: {e}")).encode(&mut out);
                    quit = true;
                    break;
                }
            }
        }
        stream.write_all(&out).await?;
        if quit {
            return stream.shutdown().await;
        }
    }
}

/// What `redis` prints.
#[derive(Debug, Serialize)]
pub struct RedisReport {
    /// Every reply was the expected one.
    pub ok: bool,
    /// The replies, in order (`+PONG`, `+OK`, bulk strings as text).
    pub replies: Vec<String>,
    /// Whole exchange.
    pub micros: u64,
}

/// A command as a RESP array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let items = args
        .iter()
        .map(|a| Reply::Bulk(Bytes::copy_from_slice(a)))
        .collect();
    let mut out = Vec::new();
    Reply::Array(items).encode(&mut out);
    out
}

/// `redis`: PING, SET, GET, ECHO as RESP arrays, then an inline PING.
pub async fn client(addr: &str) -> Result<RedisReport, String> {
    let started = Instant::now();
    let (host, port) = net::split_host_port(addr)?;
    let mut stream = net::connect(&host, port).await?;
    let key = format!("weft:{}", std::process::id());
    let value = format!("value-{}", std::process::id());
    let steps: Vec<(Vec<u8>, Reply)> = vec![
        (command(&[b"PING"]), Reply::Simple("PONG".into())),
        (
            command(&[b"SET", key.as_bytes(), value.as_bytes()]),
            Reply::Simple("OK".into()),
        ),
        (
            command(&[b"GET", key.as_bytes()]),
            Reply::Bulk(Bytes::from(value.clone())),
        ),
        (
            command(&[b"ECHO", b"hello weft"]),
            Reply::Bulk(Bytes::from_static(b"hello weft")),
        ),
        (b"PING\r\n".to_vec(), Reply::Simple("PONG".into())),
    ];
    let mut buf = BytesMut::with_capacity(4096);
    let mut replies = Vec::new();
    for (request, expected) in steps {
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("send: {e}"))?;
        let reply = loop {
            if let Some((reply, used)) = parse_reply(&buf)? {
                buf.advance(used);
                break reply;
            }
            if stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?
                == 0
            {
                return Err(format!("connection closed after replies {:?}", replies));
            }
        };
        replies.push(reply.render());
        if reply != expected {
            return Err(format!(
                "reply {:?}, expected {:?} (sent {:?})",
                reply.render(),
                expected.render(),
                String::from_utf8_lossy(&request)
            ));
        }
    }
    let _ = stream.shutdown().await;
    Ok(RedisReport {
        ok: true,
        replies,
        micros: started.elapsed().as_micros() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<Bytes> {
        v.iter().map(|s| Bytes::from(s.to_string())).collect()
    }

    #[test]
    fn resp_arrays() {
        let buf = b"*1\r\n$4\r\nPING\r\n";
        assert_eq!(parse_command(buf), Ok(Some((args(&["PING"]), buf.len()))));
        let buf = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\na b\r\n\r\n*1";
        assert_eq!(
            parse_command(buf),
            Ok(Some((args(&["SET", "k", "a b\r\n"]), buf.len() - 2)))
        );
        // Every prefix of a command is incomplete, not an error.
        let full = b"*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n";
        for n in 0..full.len() {
            assert_eq!(parse_command(&full[..n]), Ok(None), "prefix {n}");
        }
        assert!(parse_command(b"*1\r\n+PING\r\n").is_err());
        assert!(parse_command(b"*x\r\n").is_err());
        assert!(parse_command(b"*1\r\n$2\r\nabcd\r\n").is_err());
        assert!(parse_command(b"*1\r\n$99999999999\r\n").is_err());
        assert_eq!(parse_command(b"*0\r\n"), Ok(Some((vec![], 4))));
    }

    #[test]
    fn inline_commands() {
        assert_eq!(parse_command(b"PING\r\n"), Ok(Some((args(&["PING"]), 6))));
        assert_eq!(
            parse_command(b"set  k v\n"),
            Ok(Some((args(&["set", "k", "v"]), 9)))
        );
        assert_eq!(parse_command(b"\r\n"), Ok(Some((vec![], 2))));
        assert_eq!(parse_command(b"PIN"), Ok(None));
        assert!(parse_command(&vec![b'a'; MAX_LINE + 1]).is_err());
    }

    #[test]
    fn replies_round_trip() {
        for reply in [
            Reply::Simple("OK".into()),
            Reply::Error("ERR x".into()),
            Reply::Integer(-3),
            Reply::Bulk(Bytes::from_static(b"a\r\nb")),
            Reply::Null,
            Reply::Array(vec![Reply::Null, Reply::Integer(1)]),
        ] {
            let mut wire = Vec::new();
            reply.encode(&mut wire);
            assert_eq!(parse_reply(&wire), Ok(Some((reply.clone(), wire.len()))));
            assert_eq!(parse_reply(&wire[..wire.len() - 1]), Ok(None));
        }
    }

    #[test]
    fn commands() {
        let store = Mutex::default();
        let run = |v: &[&str]| execute(&args(v), &store);
        assert_eq!(run(&["ping"]), Reply::Simple("PONG".into()));
        assert_eq!(run(&["PING", "x"]), Reply::Bulk("x".into()));
        assert_eq!(run(&["ECHO", "hi"]), Reply::Bulk("hi".into()));
        assert_eq!(run(&["GET", "k"]), Reply::Null);
        assert_eq!(run(&["SET", "k", "v"]), Reply::Simple("OK".into()));
        assert_eq!(run(&["GET", "k"]), Reply::Bulk("v".into()));
        assert_eq!(run(&["DEL", "k", "z"]), Reply::Integer(1));
        assert!(matches!(run(&["GET"]), Reply::Error(e) if e.contains("wrong number")));
        assert!(matches!(run(&["NOPE"]), Reply::Error(e) if e.contains("unknown command")));
    }
}
