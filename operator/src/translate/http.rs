//! HTTP handling that keeps the app's traffic as it was sent: connection managers
//! without Envoy's hidden defaults, and the HTTP version of each upstream hop.
//!
//! What an app would otherwise meet (and what is set instead):
//! - a 15 s route timeout (every route sets `timeout: 0s`: none unless a policy says so);
//! - a 5 min stream idle timeout that cuts long-polls and quiet gRPC streams (disabled;
//!   dead peers are found by TCP keepalive, and a connection with no request open is
//!   still closed after Envoy's 1 h idle timeout);
//! - no `Upgrade` (WebSocket answered 403/404): WebSocket upgrades are allowed, over
//!   HTTP/2 hops as extended CONNECT (RFC 8441);
//! - HTTP/1.0 refused with 426, `Expect: 100-continue` answered by the proxy, the
//!   `server` header rewritten to `envoy`, `x-envoy-*` headers added: all left to the app;
//! - paths reaching authorization unnormalized (`/public/../admin`): paths are
//!   normalized (RFC 3986 dot segments, decoded unreserved characters, merged slashes)
//!   before RBAC and routing, and the app receives the normalized path.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{Http1ProtocolOptions, Http2ProtocolOptions};
use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    ExplicitHttpConfig, UpstreamProtocolOptions, UseDownstreamHttpConfig, explicit_http_config,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration};
use weft_crds::EscapedSlashesPolicy;

use super::envoy::{any, network_filter};
use super::settings::MeshConfig;

/// Key of the upstream HTTP options in a cluster's `typed_extension_protocol_options`.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// The HTTP version Envoy speaks to an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamHttp {
    /// HTTP/1.1 (to an app that speaks it).
    Http1,
    /// HTTP/2: between sidecars over mTLS (ALPN `h2`), or h2c to an HTTP/2 app.
    Http2,
    /// Whatever the downstream spoke: on undeclared ports, where nobody knows which
    /// version the app understands, each hop keeps the client's.
    SameAsDownstream,
}

fn http1() -> Http1ProtocolOptions {
    Http1ProtocolOptions {
        // Old clients and health checkers still send HTTP/1.0; Envoy answers 426 by default.
        accept_http_10: true,
        ..Default::default()
    }
}

fn http2() -> Http2ProtocolOptions {
    Http2ProtocolOptions {
        // Extended CONNECT carries WebSocket upgrades over HTTP/2 hops.
        allow_connect: true,
        ..Default::default()
    }
}

/// A cluster's `typed_extension_protocol_options` for speaking `version` upstream.
pub fn upstream_protocol_options(version: UpstreamHttp) -> HashMap<String, Any> {
    upstream_protocol_options_with(version, None)
}

/// The same, closing each connection (once its requests finish) after
/// `max_connection_duration` (a TrafficPolicy's `connectionPool`).
pub fn upstream_protocol_options_with(
    version: UpstreamHttp,
    max_connection_duration: Option<std::time::Duration>,
) -> HashMap<String, Any> {
    let options = match version {
        UpstreamHttp::Http1 => UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(explicit_http_config::ProtocolConfig::HttpProtocolOptions(
                http1(),
            )),
        }),
        UpstreamHttp::Http2 => UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                http2(),
            )),
        }),
        UpstreamHttp::SameAsDownstream => {
            UpstreamProtocolOptions::UseDownstreamProtocolConfig(UseDownstreamHttpConfig {
                http_protocol_options: Some(http1()),
                http2_protocol_options: Some(http2()),
                ..Default::default()
            })
        }
    };
    // One entry only: protobuf maps encode in hash order.
    HashMap::from([(
        HTTP_PROTOCOL_OPTIONS.to_string(),
        any(&HttpProtocolOptions {
            upstream_protocol_options: Some(options),
            common_http_protocol_options: max_connection_duration.map(|d| {
                envoy_types::pb::envoy::config::core::v3::HttpProtocolOptions {
                    max_connection_duration: Some(super::envoy::protobuf_duration(d)),
                    ..Default::default()
                }
            }),
            ..Default::default()
        }),
    )])
}

fn escaped_slashes_action(
    policy: EscapedSlashesPolicy,
) -> http_connection_manager::PathWithEscapedSlashesAction {
    use http_connection_manager::PathWithEscapedSlashesAction as Action;
    match policy {
        EscapedSlashesPolicy::UnescapeAndRedirect => Action::UnescapeAndRedirect,
        EscapedSlashesPolicy::Reject => Action::RejectRequest,
        EscapedSlashesPolicy::UnescapeAndForward => Action::UnescapeAndForward,
        EscapedSlashesPolicy::KeepUnchanged => Action::KeepUnchanged,
    }
}

/// A connection manager that leaves the app's HTTP as it was: see the module docs.
/// Accepts HTTP/1.x and HTTP/2 (prior knowledge, or `h2` over TLS) alike.
pub fn http_connection_manager(
    stat_prefix: &str,
    routes: http_connection_manager::RouteSpecifier,
    config: &MeshConfig,
) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(routes),
        http_filters: vec![super::envoy::http_filter(
            "envoy.filters.http.router",
            &Router {
                suppress_envoy_headers: true,
                ..Default::default()
            },
        )],
        http_protocol_options: Some(http1()),
        http2_protocol_options: Some(http2()),
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_string(),
            ..Default::default()
        }],
        stream_idle_timeout: Some(Duration::default()),
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        path_with_escaped_slashes_action: escaped_slashes_action(config.escaped_slashes) as i32,
        server_header_transformation:
            http_connection_manager::ServerHeaderTransformation::PassThrough as i32,
        proxy_100_continue: true,
        ..Default::default()
    }
}

/// The network filter entry of a connection manager.
pub fn hcm_filter(hcm: &HttpConnectionManager) -> Filter {
    network_filter("envoy.filters.network.http_connection_manager", hcm)
}

/// A route's "no timeout": Envoy's default of 15 s would cut long requests.
pub fn no_timeout() -> Option<Duration> {
    Some(Duration::default())
}

/// What a sidecar does with a request path before authorization and routing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathOutcome {
    /// The request goes on with this (normalized) path.
    Forward(String),
    /// The client is redirected to this path (escaped slashes were unescaped).
    Redirect(String),
    /// The request is refused with 400 (escaped slashes, `Reject`).
    Reject,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

/// Decodes `%XX` when the byte is unreserved (or, with `slashes`, `/` or `\`, the latter
/// read as `/`); other escapes stay.
fn decode(path: &str, slashes: bool) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            let b = hi * 16 + lo;
            if is_unreserved(b) {
                out.push(b);
                i += 3;
                continue;
            }
            if slashes && matches!(b, b'/' | b'\\') {
                out.push(b'/');
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 section 5.2.4 dot-segment removal plus merged slashes.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, segment) in parts.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                segments.pop();
                trailing_slash = i == last;
            }
            "" => trailing_slash = i == last,
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = format!("/{}", segments.join("/"));
    if trailing_slash && !segments.is_empty() {
        out.push('/');
    }
    out
}

fn has_escaped_slash(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("%2f") || lower.contains("%5c")
}

/// The path a sidecar's connection manager forwards (or redirects to), as configured
/// by [`http_connection_manager`]: unreserved characters decoded, dot segments removed,
/// slashes merged, then escaped slashes handled by `policy`. The query is kept.
pub fn normalize_request_path(path: &str, policy: EscapedSlashesPolicy) -> PathOutcome {
    let (path, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let with_query = |p: String| match query {
        Some(q) => format!("{p}?{q}"),
        None => p,
    };
    let normalized = remove_dot_segments(&decode(path, false));
    if !has_escaped_slash(&normalized) {
        return PathOutcome::Forward(with_query(normalized));
    }
    match policy {
        EscapedSlashesPolicy::KeepUnchanged => PathOutcome::Forward(with_query(normalized)),
        EscapedSlashesPolicy::Reject => PathOutcome::Reject,
        EscapedSlashesPolicy::UnescapeAndForward => {
            PathOutcome::Forward(with_query(remove_dot_segments(&decode(&normalized, true))))
        }
        EscapedSlashesPolicy::UnescapeAndRedirect => {
            PathOutcome::Redirect(with_query(remove_dot_segments(&decode(&normalized, true))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forward(path: &str) -> PathOutcome {
        PathOutcome::Forward(path.to_string())
    }

    #[test]
    fn dot_segments_and_encoded_dots_and_double_slashes_are_resolved() {
        let p = EscapedSlashesPolicy::UnescapeAndRedirect;
        assert_eq!(
            normalize_request_path("/public/../admin", p),
            forward("/admin")
        );
        assert_eq!(
            normalize_request_path("/public/%2e%2e/admin", p),
            forward("/admin")
        );
        assert_eq!(
            normalize_request_path("/public/%2E%2E/admin", p),
            forward("/admin")
        );
        assert_eq!(normalize_request_path("/a//b///c", p), forward("/a/b/c"));
        assert_eq!(normalize_request_path("/a/./b/", p), forward("/a/b/"));
        assert_eq!(normalize_request_path("/../../x", p), forward("/x"));
        assert_eq!(
            normalize_request_path("/%7Euser?q=/../x", p),
            forward("/~user?q=/../x")
        );
        assert_eq!(normalize_request_path("/", p), forward("/"));
        assert_eq!(normalize_request_path("/a%20b", p), forward("/a%20b"));
    }

    #[test]
    fn escaped_slashes_follow_the_policy() {
        let path = "/public/..%2Fadmin";
        assert_eq!(
            normalize_request_path(path, EscapedSlashesPolicy::UnescapeAndRedirect),
            PathOutcome::Redirect("/admin".into())
        );
        assert_eq!(
            normalize_request_path(path, EscapedSlashesPolicy::Reject),
            PathOutcome::Reject
        );
        assert_eq!(
            normalize_request_path(path, EscapedSlashesPolicy::UnescapeAndForward),
            forward("/admin")
        );
        assert_eq!(
            normalize_request_path(path, EscapedSlashesPolicy::KeepUnchanged),
            forward("/public/..%2Fadmin")
        );
        assert_eq!(
            normalize_request_path("/a%5cb", EscapedSlashesPolicy::UnescapeAndForward),
            forward("/a/b")
        );
    }
}
