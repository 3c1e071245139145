//! WebSocket: the `/ws` echo endpoint and the `ws` client.

use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::http_client::Target;
use crate::http_server::{Body, text};
use crate::{net, pattern};

/// Answers an upgrade request on `/ws`, then echoes every message on the upgraded connection.
pub fn accept(mut req: Request<Incoming>) -> Response<Body> {
    // HTTP/2 (RFC 8441): CONNECT with `:protocol websocket`, answered with 200.
    let extended_connect = req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
    let has = |name, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let upgrade = has(UPGRADE, "websocket") && has(CONNECTION, "upgrade");
    let accept_key = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|key| derive_accept_key(key.as_bytes()));
    let response = if extended_connect {
        text(StatusCode::OK, String::new())
    } else {
        match (upgrade, accept_key) {
            (true, Some(key)) => {
                let mut response = text(StatusCode::SWITCHING_PROTOCOLS, String::new());
                let headers = response.headers_mut();
                headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                if let Ok(key) = HeaderValue::from_str(&key) {
                    headers.insert(SEC_WEBSOCKET_ACCEPT, key);
                }
                response
            }
            (true, None) => {
                return text(StatusCode::BAD_REQUEST, "no sec-websocket-key\n".into());
            }
            (false, _) => {
                let mut response = text(
                    StatusCode::UPGRADE_REQUIRED,
                    "/ws needs a WebSocket upgrade\n".into(),
                );
                response
                    .headers_mut()
                    .insert(UPGRADE, HeaderValue::from_static("websocket"));
                return response;
            }
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let socket =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                echo(socket).await;
            }
            Err(e) => eprintln!("ws upgrade: {e}"),
        }
    });
    response
}

async fn echo<S>(mut socket: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(message) = socket.next().await {
        match message {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if socket.send(m).await.is_err() {
                    return;
                }
            }
            // tungstenite answers pings and the close handshake by itself; the
            // next poll flushes that answer and ends the stream after a close.
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// What `ws` prints.
#[derive(Debug, Serialize)]
pub struct WsReport {
    /// Status of the handshake response (101).
    pub status: u16,
    /// Messages that came back identical.
    pub echoed: usize,
    /// Whole exchange, connect to close.
    pub micros: u64,
}

/// Connects to a `ws://` (or `http://`) URL, sends `messages` messages (text and
/// binary alternately), expects each echoed identically, then closes cleanly.
/// With `http2`, opens the WebSocket with an HTTP/2 extended CONNECT (RFC 8441, h2c).
pub async fn client(url: &str, messages: usize, http2: bool) -> Result<WsReport, String> {
    let started = Instant::now();
    let target = Target::parse(url)?;
    let stream = net::connect(&target.host, target.port).await?;
    let (status, echoed) = if http2 {
        let (status, socket) = connect_h2(&target, stream).await?;
        (status, exchange(socket, messages).await?)
    } else {
        let ws_url = format!("ws://{}{}", target.authority, target.path_and_query);
        let (socket, response) = tokio_tungstenite::client_async(ws_url.as_str(), stream)
            .await
            .map_err(|e| format!("websocket handshake: {}", net::describe(&e)))?;
        (
            response.status().as_u16(),
            exchange(socket, messages).await?,
        )
    };
    Ok(WsReport {
        status,
        echoed,
        micros: started.elapsed().as_micros() as u64,
    })
}

/// The RFC 8441 handshake: CONNECT with `:protocol websocket`, answered 200.
async fn connect_h2(
    target: &Target,
    stream: tokio::net::TcpStream,
) -> Result<(u16, WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>), String> {
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("h2 handshake: {}", net::describe(&e)))?;
    tokio::spawn(conn);
    let uri = format!("http://{}{}", target.authority, target.path_and_query);
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(uri)
        .version(hyper::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("extended CONNECT: {}", net::describe(&e)))?;
    if response.status() != StatusCode::OK {
        return Err(format!("extended CONNECT answered {}", response.status()));
    }
    let upgraded = hyper::upgrade::on(&mut response)
        .await
        .map_err(|e| format!("upgrade: {}", net::describe(&e)))?;
    let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    Ok((response.status().as_u16(), socket))
}

/// Sends the messages one at a time, each checked on its echo, then closes: the count echoed.
async fn exchange<S>(mut socket: WebSocketStream<S>, messages: usize) -> Result<usize, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for i in 0..messages {
        let sent = if i % 2 == 0 {
            Message::text(format!("weft message {i}"))
        } else {
            // Binary, larger than one TCP segment, with every byte value.
            Message::Binary(Bytes::from_iter((0..4000 + i as u64).map(pattern::byte_at)))
        };
        socket
            .send(sent.clone())
            .await
            .map_err(|e| format!("send message {i}: {e}"))?;
        let received = loop {
            match socket.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => break m,
                Some(Err(e)) => return Err(format!("receive message {i}: {e}")),
                None => return Err(format!("connection closed before echo {i}")),
            }
        };
        if received != sent {
            return Err(format!(
                "message {i} came back different: sent {}, got {}",
                summary(&sent),
                summary(&received)
            ));
        }
    }
    socket
        .close(None)
        .await
        .map_err(|e| format!("close: {e}"))?;
    // Wait for the server's close frame: a clean close is part of the check.
    while let Some(m) = socket.next().await {
        if let Err(e) = m {
            return Err(format!("close handshake: {e}"));
        }
    }
    Ok(messages)
}

fn summary(m: &Message) -> String {
    match m {
        Message::Text(t) => format!("text {:?}", t.as_str()),
        Message::Binary(b) => format!("{} binary bytes", b.len()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_server::{HttpApp, serve};
    use std::sync::Arc;

    /// Over HTTP/1.1 (101) and over HTTP/2 with extended CONNECT (RFC 8441, 200).
    #[tokio::test]
    async fn echo_over_http1_and_http2() {
        let listener = net::bind_any(0).expect("bind");
        let port = listener.local_addr().expect("local addr").port();
        tokio::spawn(serve(listener, Arc::new(HttpApp::new("t", 0))));
        let url = format!("http://127.0.0.1:{port}/ws");
        let h1 = client(&url, 4, false).await.expect("HTTP/1.1 websocket");
        assert_eq!((h1.status, h1.echoed), (101, 4));
        let h2 = client(&url, 3, true).await.expect("HTTP/2 websocket");
        assert_eq!((h2.status, h2.echoed), (200, 3));
        let refused = client(&format!("http://127.0.0.1:{port}/other"), 1, true).await;
        assert!(refused.is_err());
    }
}
