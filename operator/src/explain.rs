//! `weft explain`: why a call from one pod to a URL is allowed or denied, and where it
//! is routed, computed from the same model and rules the proxies get. No I/O.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::index::{
    AccessGrant, AppProtocol, HttpRequestMatch, HttpRouteEntry, MeshModel, MeshService, PathMatch,
    RouteMatchModel, ValueMatch, Workload,
};
use crate::translate::{
    AccessMode, MeshConfig, MtlsMode, PathOutcome, normalize_request_path, path_prefix_regex,
    treated_as,
};

/// A call to explain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallQuery {
    /// The calling pod, `namespace/name`.
    pub from: String,
    /// `http://host:port/path` or `host:port` (TCP); host is a service name, its FQDN,
    /// a ClusterIP or a pod IP.
    pub url: String,
    /// HTTP method (default GET).
    #[serde(default)]
    pub method: Option<String>,
    /// Request headers, `name: value`.
    #[serde(default)]
    pub headers: Vec<String>,
}

/// The answer: a verdict and the reasoning, one line per step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// `allowed`, `denied`, `partly allowed` (some destinations only), `redirected`,
    /// `not found` (no HTTPRoute rule matches), `server error` (a rule without a usable
    /// backend) or `unknown`.
    pub verdict: String,
    /// The steps, for a person.
    pub lines: Vec<String>,
    /// Node ids of the meshed proxies involved (caller first), whose sync state matters.
    #[serde(default)]
    pub proxies: Vec<String>,
    /// The caller sidecar's outbound clusters the call may use, whose live endpoint
    /// state (`live_lines`) says why a request fails now.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// The caller's pod IPs (where its sidecar serves that state).
    #[serde(default)]
    pub caller_ips: Vec<IpAddr>,
}

/// What the caller's sidecar reports about the call's clusters (Envoy's `/clusters`
/// text): ejected and failing endpoints, an open circuit, no healthy endpoint.
pub fn live_lines(clusters: &[String], envoy_clusters: &str) -> Vec<String> {
    let mut out = Vec::new();
    for cluster in clusters {
        let prefix = format!("{cluster}::");
        let mut hosts: BTreeMap<&str, (Vec<&str>, u64)> = BTreeMap::new();
        let mut max_requests = None;
        let mut max_pending = None;
        for line in envoy_clusters.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = rest.split("::").collect();
            match parts.as_slice() {
                ["default_priority", "max_requests", n] => max_requests = n.parse::<u64>().ok(),
                ["default_priority", "max_pending_requests", n] => {
                    max_pending = n.parse::<u64>().ok();
                }
                [host, "health_flags", flags] => {
                    hosts.entry(host).or_default().0 = flags
                        .split('/')
                        .filter(|f| !f.is_empty() && *f != "healthy")
                        .collect();
                }
                [host, "rq_active", n] => {
                    hosts.entry(host).or_default().1 = n.parse().unwrap_or(0);
                }
                _ => {}
            }
        }
        if hosts.is_empty() {
            out.push(format!(
                "live {cluster}: no endpoints in the caller's sidecar (503: no healthy upstream)"
            ));
            continue;
        }
        let mut unhealthy = 0;
        for (host, (flags, _)) in &hosts {
            let why: Vec<&str> = flags
                .iter()
                .map(|f| match *f {
                    "failed_outlier_check" => {
                        "ejected by outlier detection (no requests until the ejection ends)"
                    }
                    "failed_active_hc" => "failing its active health check",
                    "pending_active_hc" => "waiting for its first health check",
                    "failed_eds_health" => "draining or not ready",
                    other => other,
                })
                .collect();
            if !why.is_empty() {
                unhealthy += 1;
                out.push(format!(
                    "live {cluster}: endpoint {host} is {}",
                    why.join(", ")
                ));
            }
        }
        if unhealthy == hosts.len() {
            out.push(format!(
                "live {cluster}: no healthy endpoint: below the panic threshold the caller's sidecar uses all of them anyway, with panicThreshold 0 it answers 503"
            ));
        }
        let in_flight: u64 = hosts.values().map(|h| h.1).sum();
        if let Some(max) = max_requests.filter(|m| in_flight >= *m) {
            out.push(format!(
                "live {cluster}: circuit open: {in_flight} requests in flight of maxRequests {max}; beyond maxPendingRequests {} new requests get 503 (overflow)",
                max_pending.map_or("?".to_string(), |p| p.to_string())
            ));
        } else if unhealthy == 0 {
            out.push(format!(
                "live {cluster}: {} endpoints healthy, {in_flight} requests in flight",
                hosts.len()
            ));
        }
    }
    out
}

struct Target {
    host: String,
    port: u16,
    path: String,
    /// The query string, without `?`.
    query: String,
    /// An `http://` URL (the caller speaks HTTP), not `tcp://` or `host:port`.
    http: bool,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url);
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: port {p:?} is not a number"))?,
        ),
        None if url.starts_with("http://") => (authority, 80),
        None => return Err(format!("{url:?} has no port")),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    Ok(Target {
        host: host.to_string(),
        port,
        path: path.to_string(),
        query: query.to_string(),
        http: url.starts_with("http://"),
    })
}

/// The service `host` names, seen from `namespace`.
fn find_service<'m>(model: &'m MeshModel, host: &str, namespace: &str) -> Option<&'m MeshService> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return model
            .services
            .values()
            .find(|s| s.cluster_ips.contains(&ip))
            .map(|s| &**s);
    }
    let host = host.trim_end_matches('.');
    let host = host.strip_suffix(".svc.cluster.local").unwrap_or(host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    let (name, ns) = host.split_once('.').unwrap_or((host, namespace));
    model
        .services
        .values()
        .find(|s| s.key.name == name && s.key.namespace == ns)
        .map(|s| &**s)
}

fn full_match(regex: &str, value: &str) -> Result<bool, String> {
    regex::Regex::new(&format!("^(?:{regex})$"))
        .map(|r| r.is_match(value))
        .map_err(|e| format!("regex {regex:?}: {e}"))
}

/// Whether a request matches an SMI HTTPRouteGroup entry (as Envoy's RBAC and routes do).
fn request_matches(
    m: &HttpRequestMatch,
    method: &str,
    path: &str,
    headers: &BTreeMap<String, String>,
) -> bool {
    let path_ok = m
        .path_regex
        .as_ref()
        .is_none_or(|p| full_match(&path_prefix_regex(p), path).unwrap_or(false));
    let method_ok = m.methods.is_empty() || m.methods.iter().any(|x| x == method);
    let headers_ok = m.headers.iter().all(|(name, regex)| {
        headers
            .get(name)
            .is_some_and(|v| full_match(regex, v).unwrap_or(false))
    });
    path_ok && method_ok && headers_ok
}

/// Whether a request matches one HTTPRoute match, as the caller's sidecar decides it.
fn route_match_applies(
    m: &RouteMatchModel,
    method: &str,
    target: &Target,
    headers: &BTreeMap<String, String>,
) -> bool {
    let path = target.path.as_str();
    let path_ok = match &m.path {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => {
            let p = p.trim_end_matches('/');
            p.is_empty()
                || path == p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        }
        PathMatch::Regex(r) => full_match(r, path).unwrap_or(false),
    };
    let value_ok = |v: &ValueMatch, got: Option<&str>| {
        got.is_some_and(|got| {
            if v.regex {
                full_match(&v.value, got).unwrap_or(false)
            } else {
                got == v.value
            }
        })
    };
    let query: Vec<(&str, &str)> = target
        .query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
        .collect();
    path_ok
        && m.method.as_deref().is_none_or(|x| x == method)
        && m.headers
            .iter()
            .all(|h| value_ok(h, headers.get(&h.name).map(String::as_str)))
        && m.query
            .iter()
            .all(|q| value_ok(q, query.iter().find(|(k, _)| *k == q.name).map(|(_, v)| *v)))
}

fn describe_route_match(m: &RouteMatchModel) -> String {
    let mut parts = vec![match &m.path {
        PathMatch::Exact(p) => format!("path = {p}"),
        PathMatch::Prefix(p) => format!("path prefix {p}"),
        PathMatch::Regex(r) => format!("path ~ {r}"),
    }];
    if let Some(method) = &m.method {
        parts.push(method.clone());
    }
    let value =
        |v: &ValueMatch| format!("{} {} {}", v.name, if v.regex { "~" } else { "=" }, v.value);
    parts.extend(m.headers.iter().map(|h| format!("header {}", value(h))));
    parts.extend(m.query.iter().map(|q| format!("query {}", value(q))));
    parts.join(", ")
}

/// What the HTTPRoutes on a service port do with a request.
enum RouteOutcome<'m> {
    /// No HTTPRoute applies to this port for this caller.
    NotRouted,
    /// Forwarded to these (service, how it was chosen).
    Backends(Vec<(&'m MeshService, String)>),
    /// Answered by the caller's sidecar: the verdict.
    Answered(&'static str),
}

/// The HTTPRoute entries of `service` port `port` that decide for a caller in
/// `namespace` (its consumer routes if it has any, else the producer routes), and the
/// first one matching the request.
fn route_outcome<'m>(
    model: &'m MeshModel,
    service: &'m MeshService,
    port: u16,
    namespace: &str,
    request: (&str, &Target, &BTreeMap<String, String>),
    lines: &mut Vec<String>,
) -> RouteOutcome<'m> {
    let entries = service
        .http_routes
        .get(&port)
        .map_or(&[][..], Vec::as_slice);
    let of = |ns: &str| -> Vec<&HttpRouteEntry> {
        entries
            .iter()
            .filter(|e| e.source.namespace == ns)
            .collect()
    };
    let (deciding, kind) = match of(namespace) {
        own if !own.is_empty() && namespace != service.key.namespace => (
            own,
            "consumer route of the caller's namespace (wins over producer routes)",
        ),
        _ => (of(&service.key.namespace), "producer route"),
    };
    if deciding.is_empty() {
        return RouteOutcome::NotRouted;
    }
    let (method, target, headers) = request;
    let Some(entry) = deciding
        .iter()
        .find(|e| route_match_applies(&e.r#match, method, target, headers))
    else {
        let routes: std::collections::BTreeSet<String> =
            deciding.iter().map(|e| e.source.to_string()).collect();
        lines.push(format!(
            "no rule of {} matches this request: the caller's sidecar answers 404",
            routes.into_iter().collect::<Vec<_>>().join(", ")
        ));
        return RouteOutcome::Answered("not found");
    };
    let rule = match &entry.rule_name {
        Some(name) => format!("rule {} ({name})", entry.rule),
        None => format!("rule {}", entry.rule),
    };
    lines.push(format!(
        "{} {rule} matched ({kind}): {}; earlier rules in precedence order did not",
        entry.source,
        describe_route_match(&entry.r#match)
    ));
    let action = &entry.action;
    if let Some(r) = &action.redirect {
        lines.push(format!(
            "redirect {}{}{}{}: the caller's sidecar answers it",
            r.status,
            r.scheme
                .as_deref()
                .map(|s| format!(" scheme {s}"))
                .unwrap_or_default(),
            r.hostname
                .as_deref()
                .map(|h| format!(" host {h}"))
                .unwrap_or_default(),
            r.port.map(|p| format!(" port {p}")).unwrap_or_default(),
        ));
        return RouteOutcome::Answered("redirected");
    }
    if action.backends.is_empty() {
        lines.push("the rule has no usable backend: the caller's sidecar answers 500".into());
        return RouteOutcome::Answered("server error");
    }
    if let Some(t) = action.timeout {
        lines.push(format!("request timeout {}", humantime::format_duration(t)));
    }
    if let Some(r) = &action.retry {
        lines.push(format!(
            "retries: {} on connection failures{}",
            r.attempts,
            if r.codes.is_empty() {
                String::new()
            } else {
                format!(" and {:?}", r.codes)
            }
        ));
    }
    let total: u32 = action.backends.iter().map(|b| b.weight).sum();
    let mut out = Vec::new();
    for b in &action.backends {
        let share = format!("{} weight {}/{total}", entry.source, b.weight);
        match b.service.as_ref().and_then(|s| model.services.get(s)) {
            Some(s) => out.push((&**s, format!("{share} → {}", s.key))),
            None => lines.push(format!(
                "{share}: the backend does not resolve, its share answers 500"
            )),
        }
    }
    RouteOutcome::Backends(out)
}

/// One line per TrafficPolicy field in force on a service port, naming the policy.
fn describe_policy(service: &MeshService, port: u16) -> Vec<String> {
    let Some(p) = service.policies.get(&port) else {
        return Vec::new();
    };
    let ms = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let mut out = Vec::new();
    let mut line = |field: &str, source: &crate::index::ObjectRef, what: String| {
        out.push(format!(
            "{} port {port}: {field} {what} (from {source})",
            service.key
        ));
    };
    if let Some(c) = &p.connection_pool {
        let v = &c.value;
        line(
            "connectionPool",
            &c.source,
            format!(
                "maxConnections {:?}, maxPendingRequests {:?}, maxRequests {:?}, maxRetries {:?}; beyond them callers get 503 (overflow)",
                v.max_connections, v.max_pending_requests, v.max_requests, v.max_retries
            ),
        );
    }
    if let Some(o) = &p.outlier_detection {
        let v = &o.value;
        line(
            "outlierDetection",
            &o.source,
            format!(
                "consecutive5xx {:?}, consecutiveGatewayErrors {:?}, baseEjectionTime {}; an ejected endpoint gets no requests",
                v.consecutive_5xx,
                v.consecutive_gateway_errors,
                v.base_ejection_time.map_or("30s".into(), ms)
            ),
        );
    }
    if let Some(h) = &p.health_check {
        let v = &h.value;
        line(
            "healthCheck",
            &h.source,
            format!(
                "{} every {}; endpoints failing it get no requests (503 when none is healthy)",
                v.http
                    .as_ref()
                    .map_or("TCP connect".to_string(), |(path, _)| format!("GET {path}")),
                ms(v.interval)
            ),
        );
    }
    if let Some(l) = &p.load_balancer {
        line(
            "loadBalancer",
            &l.source,
            format!("{:?}", l.value.algorithm),
        );
    }
    if let Some(f) = &p.fault {
        line(
            "faultInjection",
            &f.source,
            format!(
                "delay {:?}, abort {:?} (percent, value)",
                f.value.delay.map(|(p, d)| (p, ms(d))),
                f.value.abort
            ),
        );
    }
    if let Some(r) = &p.retry {
        line(
            "retries",
            &r.source,
            format!(
                "{} on connection failures and {:?} (unless a route sets its own)",
                r.value.attempts, r.value.codes
            ),
        );
    }
    if let Some(t) = &p.timeout {
        line(
            "timeouts",
            &t.source,
            format!("request {} (unless a route sets its own)", ms(t.value)),
        );
    }
    if let Some(r) = &p.rate_limit {
        line(
            "rateLimit",
            &r.source,
            format!(
                "{} per {} (burst {}) at each destination pod; beyond it 429",
                r.value.tokens,
                ms(r.value.interval),
                r.value.burst
            ),
        );
    }
    out
}

fn describe_match(m: &HttpRequestMatch) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &m.path_regex {
        parts.push(format!("path {p}"));
    }
    parts.push(if m.methods.is_empty() {
        "any method".to_string()
    } else {
        m.methods.join("|")
    });
    for (name, regex) in &m.headers {
        parts.push(format!("{name}: {regex}"));
    }
    parts.join(", ")
}

/// One destination the call may land on.
struct Landing<'m> {
    workload: Option<&'m Workload>,
    address: SocketAddr,
    via: String,
    /// The caller's sidecar passes it through in plaintext (no mTLS, so no identity).
    plaintext: bool,
    /// The caller's sidecar handles the call as HTTP (and says so in ALPN).
    client_http: bool,
}

/// How the destination's inbound side handles a call on a port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Inbound {
    /// HTTP: requests are authorized one by one.
    Http,
    /// TCP: connections are authorized whole.
    Tcp,
    /// A port no service exposes: passed through, only grants on every port apply.
    Passthrough,
}

/// What the destination's inbound side makes of a call, as its listener decides: a
/// declared protocol stands; on an undeclared port a client sidecar's ALPN decides,
/// and a plaintext caller's first bytes.
fn inbound_handling(
    config: &MeshConfig,
    destination: &Workload,
    port: u16,
    landing: &Landing<'_>,
    call_is_http: bool,
) -> Inbound {
    let Some(declared) = destination.inbound_ports.iter().find(|p| p.port == port) else {
        return Inbound::Passthrough;
    };
    match treated_as(declared.protocol, config) {
        AppProtocol::Http | AppProtocol::Http2 => Inbound::Http,
        AppProtocol::Tcp => Inbound::Tcp,
        AppProtocol::Detect if landing.plaintext && call_is_http => Inbound::Http,
        AppProtocol::Detect if !landing.plaintext && landing.client_http => Inbound::Http,
        AppProtocol::Detect => Inbound::Tcp,
    }
}

/// Where a call lands, as its inbound side sees it.
struct Arrival<'m> {
    destination: &'m Workload,
    /// The TrafficTarget grants whose destination is that workload's identity.
    grants: &'m [AccessGrant],
    port: u16,
    inbound: Inbound,
}

/// What a destination's inbound side decides, and why.
fn authorize(
    config: &MeshConfig,
    source: &Workload,
    caller_has_identity: bool,
    arrival: &Arrival<'_>,
    request: (&str, &str, &BTreeMap<String, String>),
) -> (bool, String) {
    let Arrival {
        destination,
        grants,
        port,
        inbound,
    } = *arrival;
    if !destination.meshed {
        return (
            true,
            "destination has no sidecar: nothing is enforced".into(),
        );
    }
    if !caller_has_identity {
        if config.mtls == MtlsMode::Strict {
            return (
                false,
                "the call arrives in plaintext and mTLS is strict: the connection is refused"
                    .into(),
            );
        }
        if config.access == AccessMode::DenyByDefault {
            return (
                false,
                "the call arrives in plaintext, without an identity a TrafficTarget could name: 403"
                    .into(),
            );
        }
    }
    if config.access == AccessMode::Permissive {
        return (
            true,
            "access is permissive: every meshed caller is let in".into(),
        );
    }
    let caller = (source.namespace.clone(), source.service_account.clone());
    let (method, path, headers) = request;
    let mut near_misses = Vec::new();
    for grant in grants {
        if grant.port.is_some_and(|p| p != port) {
            continue;
        }
        if !grant.sources.contains(&caller) {
            near_misses.push(format!(
                "{} lets in {} only",
                grant.source,
                grant
                    .sources
                    .iter()
                    .map(|(ns, sa)| format!("{ns}/{sa}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            continue;
        }
        let whole = match inbound {
            Inbound::Http | Inbound::Tcp => grant.tcp.covers(port),
            // A port no service exposes: only grants on every port reach it.
            Inbound::Passthrough => grant.tcp == crate::index::TcpGrant::AllPorts,
        };
        if whole {
            let scope = if grant.tcp == crate::index::TcpGrant::AllPorts {
                "every port and route".to_string()
            } else {
                format!("TCPRoute port {port}")
            };
            return (true, format!("allowed by {} ({scope})", grant.source));
        }
        if inbound == Inbound::Http {
            if let Some(m) = grant
                .http
                .iter()
                .find(|m| request_matches(m, method, path, headers))
            {
                return (
                    true,
                    format!("allowed by {} ({})", grant.source, describe_match(m)),
                );
            }
            if !grant.http.is_empty() {
                near_misses.push(format!(
                    "{} allows only: {}",
                    grant.source,
                    grant
                        .http
                        .iter()
                        .map(describe_match)
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
        } else if !grant.http.is_empty() {
            near_misses.push(format!(
                "{} grants HTTP routes, but port {port} is TCP",
                grant.source
            ));
        }
    }
    let reason = if near_misses.is_empty() {
        format!(
            "no TrafficTarget lets {}/{} reach {}/{} on port {port} (deny-by-default)",
            caller.0, caller.1, destination.namespace, destination.service_account
        )
    } else {
        near_misses.join("; ")
    };
    (false, reason)
}

/// Explains a call with the model and settings the proxies have now.
pub fn explain(model: &MeshModel, config: &MeshConfig, query: &CallQuery) -> Explanation {
    let mut lines = Vec::new();
    let unknown = |lines: Vec<String>| Explanation {
        verdict: "unknown".into(),
        lines,
        ..Default::default()
    };
    let Some(source) = model.workloads.get(&query.from) else {
        lines.push(format!(
            "{} is not a pod in the mesh (expected NAMESPACE/NAME)",
            query.from
        ));
        return unknown(lines);
    };
    let mut target = match parse_url(&query.url) {
        Ok(t) => t,
        Err(e) => return unknown(vec![e]),
    };
    // The sidecars route and authorize on the path the app will see, not the one sent.
    let sent_path = target.path.clone();
    let path_outcome = normalize_request_path(&sent_path, config.escaped_slashes);
    if let PathOutcome::Forward(path) = &path_outcome {
        target.path = path.clone();
    }
    let method = query
        .method
        .clone()
        .unwrap_or_else(|| "GET".into())
        .to_ascii_uppercase();
    let mut headers = BTreeMap::new();
    for h in &query.headers {
        let Some((name, value)) = h.split_once(':') else {
            return unknown(vec![format!("header {h:?} is not NAME: VALUE")]);
        };
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    lines.push(format!(
        "from {} (service account {}/{}{})",
        query.from,
        source.namespace,
        source.service_account,
        if source.meshed { "" } else { ", no sidecar" }
    ));
    lines.push(format!(
        "access: {}, mtls: {}",
        config.access.as_str(),
        config.mtls.as_str()
    ));

    let mut landings = Vec::new();
    let mut clusters = Vec::new();
    let mut http = target.http;
    if let Some(service) = find_service(model, &target.host, &source.namespace) {
        let Some(port) = service.port(target.port) else {
            lines.push(format!(
                "Service {} has no port {}: the call passes through unrouted",
                service.key, target.port
            ));
            return unknown(lines);
        };
        let protocol = treated_as(port.protocol, config);
        http = match protocol {
            AppProtocol::Http | AppProtocol::Http2 => true,
            AppProtocol::Tcp => false,
            AppProtocol::Detect => target.http,
        };
        let handled = match protocol {
            AppProtocol::Detect if http => "detected: HTTP, from the request's first bytes".into(),
            AppProtocol::Detect => format!(
                "detected: TCP, after {} without HTTP from the caller",
                humantime::format_duration(config.detection_timeout)
            ),
            AppProtocol::Tcp if port.protocol == AppProtocol::Detect => {
                "TCP: protocol detection is off".to_string()
            }
            p => p.as_str().to_string(),
        };
        lines.push(format!(
            "to Service {} port {} ({handled}; from {})",
            service.key, port.port, port.protocol_source
        ));
        let split = service
            .split
            .as_ref()
            .and_then(|s| s.backends_by_port.get(&port.port).map(|b| (s, b)));
        let mut routed: Vec<(&MeshService, String)> = vec![(service, "no TrafficSplit".into())];
        let by_route = if http {
            route_outcome(
                model,
                service,
                port.port,
                &source.namespace,
                (&method, &target, &headers),
                &mut lines,
            )
        } else {
            RouteOutcome::NotRouted
        };
        let split = match by_route {
            RouteOutcome::NotRouted => split,
            RouteOutcome::Backends(backends) => {
                routed = backends;
                None
            }
            RouteOutcome::Answered(verdict) => {
                return Explanation {
                    verdict: verdict.into(),
                    lines,
                    proxies: vec![source.node_id()],
                    ..Default::default()
                };
            }
        };
        if let Some((split, backends)) = split {
            let applies = split.matches.is_empty()
                || (http
                    && split
                        .matches
                        .iter()
                        .any(|m| request_matches(m, &method, &target.path, &headers)));
            if applies {
                routed = backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .filter_map(|b| {
                        model.services.get(&b.service).map(|s| {
                            (
                                &**s,
                                format!(
                                    "{} backend {} weight {}",
                                    split.source, b.service, b.weight
                                ),
                            )
                        })
                    })
                    .collect();
            } else {
                routed = vec![(
                    service,
                    format!("{} does not match this request: root service", split.source),
                )];
            }
        }
        lines.extend(describe_policy(service, port.port));
        for (svc, _) in &routed {
            if svc.key != service.key {
                lines.extend(describe_policy(svc, port.port));
            }
        }
        clusters.extend(
            routed
                .iter()
                .map(|(svc, _)| crate::translate::outbound_cluster_name(&svc.key, port.port)),
        );
        for (svc, via) in routed {
            // Draining endpoints take no new requests.
            let endpoints: Vec<SocketAddr> = svc
                .port(port.port)
                .map(|p| p.ready_endpoints().collect())
                .unwrap_or_default();
            if endpoints.is_empty() {
                lines.push(format!("{via}: no ready endpoints (503)"));
            }
            for address in endpoints {
                let workload = model.workloads.values().find(|w| w.has_ip(address.ip()));
                landings.push(Landing {
                    workload,
                    address,
                    via: via.clone(),
                    plaintext: !svc.meshed || !source.meshed,
                    client_http: http,
                });
            }
        }
    } else if let Ok(ip) = target.host.parse::<IpAddr>() {
        let workload = model.workloads.values().find(|w| w.has_ip(ip));
        // The caller's sidecar sends a call to a meshed pod's IP over mTLS to that
        // pod's identity; anything else passes through in plaintext.
        let mtls = source.meshed && workload.is_some_and(|w| w.meshed);
        lines.push(format!(
            "to {ip}:{} directly (no Service): {}",
            target.port,
            if mtls {
                "mTLS to the pod's identity"
            } else {
                "passed through in plaintext"
            }
        ));
        // The caller's sidecar passes calls to pod IPs on as opaque TCP.
        landings.push(Landing {
            workload,
            address: SocketAddr::new(ip, target.port),
            via: if mtls { "pod IP" } else { "passthrough" }.into(),
            plaintext: !mtls,
            client_http: false,
        });
    } else {
        lines.push(format!(
            "{} is not a Service of the mesh: the call leaves the mesh unrouted",
            target.host
        ));
        return unknown(lines);
    }
    if http {
        lines.push(format!("request: {method} {sent_path}"));
        match &path_outcome {
            PathOutcome::Forward(path) if *path == sent_path => {}
            PathOutcome::Forward(path) => {
                lines.push(format!("path normalized to {path}: the app receives that"));
            }
            PathOutcome::Redirect(path) => {
                lines.push(format!(
                    "the path has escaped slashes: the sidecar redirects the client to {path} (escapedSlashes: UnescapeAndRedirect)"
                ));
                return Explanation {
                    verdict: "redirected".into(),
                    lines,
                    proxies: vec![source.node_id()],
                    ..Default::default()
                };
            }
            PathOutcome::Reject => {
                lines.push(
                    "the path has escaped slashes: the sidecar answers 400 (escapedSlashes: Reject)"
                        .into(),
                );
                return Explanation {
                    verdict: "denied".into(),
                    lines,
                    proxies: vec![source.node_id()],
                    ..Default::default()
                };
            }
        }
    }

    let (mut allowed, mut denied) = (0, 0);
    for landing in &landings {
        let (ok, why) = match landing.workload {
            None => (
                true,
                "not a pod Weft knows: nothing is enforced".to_string(),
            ),
            Some(w) => authorize(
                config,
                source,
                source.meshed && !landing.plaintext,
                &Arrival {
                    destination: w,
                    grants: model
                        .grants
                        .get(&(w.namespace.clone(), w.service_account.clone()))
                        .map_or(&[], Vec::as_slice),
                    port: landing.address.port(),
                    inbound: inbound_handling(
                        config,
                        w,
                        landing.address.port(),
                        landing,
                        target.http,
                    ),
                },
                (&method, &target.path, &headers),
            ),
        };
        if ok {
            allowed += 1;
        } else {
            denied += 1;
        }
        let name = landing.workload.map_or_else(
            || landing.address.to_string(),
            |w| {
                format!(
                    "{}/{} {} (sa {})",
                    w.namespace, w.name, landing.address, w.service_account
                )
            },
        );
        lines.push(format!(
            "  {name} via {}: {} — {why}",
            landing.via,
            if ok { "ALLOWED" } else { "DENIED" }
        ));
    }
    let verdict = match (allowed, denied) {
        (0, 0) => "unknown",
        (_, 0) => "allowed",
        (0, _) => "denied",
        _ => "partly allowed",
    };
    let mut proxies: Vec<String> = std::iter::once(source)
        .chain(landings.iter().filter_map(|l| l.workload))
        .filter(|w| w.meshed)
        .map(Workload::node_id)
        .collect();
    proxies.dedup();
    Explanation {
        verdict: verdict.into(),
        lines,
        proxies,
        clusters,
        caller_ips: if source.meshed {
            source.ips.clone()
        } else {
            Vec::new()
        },
    }
}
