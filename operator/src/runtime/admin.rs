//! The admin endpoint: readiness, invalid objects, and per-proxy sync state as JSON.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use weft_xds::{SyncRegistry, TypeSync};

use crate::error::WeftError;
use crate::explain::{CallQuery, Explanation, explain};
use crate::index::{MeshModel, Problem};
use crate::proxy_config::ResourceKind;
use crate::runtime::connections::serve_connections;
use crate::runtime::metrics::ControlPlaneMetrics;
use crate::sources::ManifestError;
use crate::translate::MeshConfig;

/// What `/status` reports: the state of the inputs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    /// Objects in the index.
    pub objects: usize,
    /// Proxies with a snapshot.
    pub proxies: usize,
    /// Objects rejected or applied with a caveat.
    pub problems: Vec<ProblemReport>,
    /// Manifest files rejected (their last good objects keep serving).
    pub manifest_errors: Vec<ManifestError>,
    /// ADS streams refused their pod's config and secrets (peer address mismatch).
    #[serde(default)]
    pub identity_check_failures: u64,
    /// Mesh-wide modes in effect.
    #[serde(default)]
    pub settings: SettingsReport,
    /// Valid TrafficTargets (each grants access to one destination).
    #[serde(default)]
    pub traffic_targets: usize,
    /// The source's first full read is applied: config is being served.
    #[serde(default)]
    pub synced: bool,
    /// HTTPRoutes and GRPCRoutes with their status per Service parent, as Kubernetes
    /// mode writes it to `status.parents[]`.
    #[serde(default)]
    pub routes: Vec<RouteStatusReport>,
}

/// One route's status for one Service parent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteStatusReport {
    /// `Kind namespace/name`.
    pub route: String,
    /// The parent, `namespace/name[:port]`.
    pub parent: String,
    /// `Accepted` condition: status and reason.
    pub accepted: (bool, String),
    /// `ResolvedRefs` condition: status and reason.
    pub resolved_refs: (bool, String),
    /// The conditions' messages, joined.
    pub message: String,
}

impl RouteStatusReport {
    /// One report per parent of each route.
    pub fn all(statuses: &crate::index::RouteStatuses) -> Vec<Self> {
        statuses
            .iter()
            .flat_map(|(route, parents)| {
                parents.iter().map(move |p| {
                    let r = &p.parent_ref;
                    let namespace = r
                        .namespace
                        .clone()
                        .unwrap_or_else(|| route.namespace.clone());
                    let port = r.port.map(|p| format!(":{p}")).unwrap_or_default();
                    let message = [&p.accepted.2, &p.resolved_refs.2]
                        .into_iter()
                        .filter(|m| !m.is_empty())
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ");
                    Self {
                        route: route.to_string(),
                        parent: format!("{namespace}/{}{port}", r.name),
                        accepted: (p.accepted.0, p.accepted.1.to_string()),
                        resolved_refs: (p.resolved_refs.0, p.resolved_refs.1.to_string()),
                        message,
                    }
                })
            })
            .collect()
    }
}

/// The access and mTLS modes in effect and where they come from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsReport {
    /// `deny-by-default` or `permissive`.
    pub access: String,
    /// `strict` or `permissive`.
    pub mtls: String,
    /// `flags`, or the MeshConfig that overrides them.
    pub source: String,
}

/// One problem, flattened for output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemReport {
    /// `Kind namespace/name`.
    pub object: String,
    /// `Rejected` or `Warning`.
    pub state: String,
    /// Why.
    pub reason: String,
}

impl From<&Problem> for ProblemReport {
    fn from(p: &Problem) -> Self {
        Self {
            object: p.object.to_string(),
            state: if p.rejected { "Rejected" } else { "Warning" }.to_string(),
            reason: p.reason.clone(),
        }
    }
}

/// What `/proxy-status` reports for one connected proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Node id (`namespace/pod`).
    pub node: String,
    /// Peer address of the ADS stream.
    pub peer: String,
    /// Per type sync state.
    pub types: Vec<TypeStatus>,
    /// ADS variant of the stream: `delta` or `sotw`.
    #[serde(default)]
    pub protocol: String,
    /// Why the proxy gets only the fallback config, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denied: Option<String>,
}

/// Sync state of one xDS type of one proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeStatus {
    /// `CDS`, `EDS`, `LDS`, `RDS`, `SDS`.
    #[serde(rename = "type")]
    pub type_name: String,
    /// `SYNCED`, `STALE` (sent, not yet ACKed), `NACKED` or `NOT SENT`.
    pub state: String,
    /// Version last sent.
    pub sent: Option<String>,
    /// Version last ACKed.
    pub acked: Option<String>,
    /// Resources in the last response.
    pub resources: usize,
    /// Responses sent for this type on this stream.
    pub responses: u64,
    /// Envoy's message for the last NACK.
    pub nack: Option<String>,
    /// When a new version was last sent (RFC 3339, microseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    /// When a version was last ACKed (RFC 3339, microseconds): with `sent_at`, how long
    /// the proxy took to apply it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acked_at: Option<String>,
}

impl From<&TypeSync> for TypeStatus {
    fn from(t: &TypeSync) -> Self {
        let state = match (&t.last_nack, &t.sent_version, &t.acked_version) {
            (Some(_), _, _) => "NACKED",
            (None, None, _) => "NOT SENT",
            (None, Some(s), Some(a)) if s == a => "SYNCED",
            _ => "STALE",
        };
        Self {
            type_name: t.type_name.to_string(),
            state: state.to_string(),
            sent: t.sent_version.as_deref().map(str::to_string),
            acked: t.acked_version.as_deref().map(str::to_string),
            resources: t.sent_resources,
            responses: t.responses,
            nack: t.last_nack.as_ref().map(|n| n.message.clone()),
            sent_at: t
                .sent_at
                .map(|at| humantime::format_rfc3339_micros(at).to_string()),
            acked_at: t
                .acked_at
                .map(|at| humantime::format_rfc3339_micros(at).to_string()),
        }
    }
}

/// What the admin endpoint reads.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Latest input status.
    pub status: watch::Receiver<MeshStatus>,
    /// ADS stream sync state.
    pub registry: Arc<SyncRegistry>,
    /// Prometheus metrics.
    pub metrics: Arc<ControlPlaneMetrics>,
    /// Asks the task that owns the model for `/explain` and `/top` answers.
    pub explain: mpsc::Sender<ModelQuery>,
    /// Set at shutdown: not ready any more.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// What the proxies are served (`/proxy-config`).
    pub cache: Arc<weft_xds::SnapshotCache>,
}

/// A question for the task that owns the model, and where to answer it: the model is
/// never copied for it.
#[derive(Debug)]
pub enum ModelQuery {
    /// `/explain`: a call to explain.
    Explain {
        /// The call.
        query: CallQuery,
        /// Where the answer goes.
        reply: oneshot::Sender<Explanation>,
    },
    /// `/top`: the meshed pods (node id, an IP) whose sidecars to read, optionally of one
    /// namespace.
    Sidecars {
        /// Only this namespace's, when set.
        namespace: Option<String>,
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<(String, std::net::IpAddr)>>,
    },
}

impl ModelQuery {
    /// Answers from `model` under `config`.
    pub fn answer(self, model: &MeshModel, config: &MeshConfig) {
        // The asker may have given up; nothing to do then.
        match self {
            Self::Explain { query, reply } => {
                let _ = reply.send(explain(model, config, &query));
            }
            Self::Sidecars { namespace, reply } => {
                let pods = model
                    .workloads
                    .values()
                    .filter(|w| w.meshed)
                    .filter(|w| namespace.as_ref().is_none_or(|n| *n == w.namespace))
                    .filter_map(|w| Some((w.node_id(), *w.ips.first()?)))
                    .collect();
                let _ = reply.send(pods);
            }
        }
    }
}

/// How long the control plane waits for a sidecar's metrics port (`/top`, `/explain`).
const SIDECAR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A GET of `path` on the sidecar at `ip`'s metrics port (the read-only admin view):
/// the body, or why not, naming the address.
async fn sidecar_view(ip: std::net::IpAddr, path: &str) -> Result<String, String> {
    let addr = SocketAddr::new(ip, weft_crds::annotations::PROXY_METRICS_PORT).to_string();
    match tokio::time::timeout(SIDECAR_TIMEOUT, http_request(&addr, Method::GET, path)).await {
        Ok(Ok((status, body))) if status.is_success() => {
            Ok(String::from_utf8_lossy(&body).into_owned())
        }
        Ok(Ok((status, _))) => Err(format!("{addr}: HTTP {status}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{addr}: no answer within {}",
            humantime::format_duration(SIDECAR_TIMEOUT)
        )),
    }
}

/// One sidecar's outbound counters, if it answers in time.
async fn scrape_sidecar(ip: std::net::IpAddr) -> Option<crate::top::SidecarCounters> {
    let text = sidecar_view(ip, "/stats/prometheus").await.ok()?;
    Some(crate::top::parse_sidecar_stats(&text))
}

/// `/top`: scrapes every meshed sidecar twice, `window` apart, and reports the edges.
async fn top(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    match observed_edges(state, query).await {
        Ok(edges) => json(&edges),
        Err(response) => response,
    }
}

/// `/graph?window=2s[&namespace=NS]`: the live service graph of the mesh page: the
/// edges `/top` measures, each with the verdict `weft explain` gives for it.
async fn graph(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let edges = match observed_edges(state, query).await {
        Ok(edges) => edges,
        Err(response) => return response,
    };
    let mut verdicts = Vec::with_capacity(edges.len());
    for edge in edges.iter().take(crate::dashboard::MAX_EDGES) {
        let verdict = match ask_explain(state, crate::dashboard::edge_query(edge)).await {
            Ok(answer) => answer.verdict,
            Err(_) => "unknown".to_string(),
        };
        verdicts.push(verdict);
    }
    json(&crate::dashboard::MeshGraph::new(&edges, &verdicts))
}

/// Asks the task that owns the model to explain `query`.
async fn ask_explain(
    state: &AdminState,
    query: CallQuery,
) -> Result<Explanation, Response<Full<Bytes>>> {
    ask_model(state, |reply| ModelQuery::Explain { query, reply }).await
}

/// Sends the task that owns the model the question `ask` makes of a reply channel, and
/// waits (bounded) for its answer.
async fn ask_model<T>(
    state: &AdminState,
    ask: impl FnOnce(oneshot::Sender<T>) -> ModelQuery,
) -> Result<T, Response<Full<Bytes>>> {
    let (reply, answer) = oneshot::channel();
    if state.explain.send(ask(reply)).await.is_err() {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the mesh is shutting down",
        ));
    }
    match tokio::time::timeout(EXPLAIN_TIMEOUT, answer).await {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no answer from the mesh in time",
        )),
    }
}

/// The edges the sidecars saw over the query's window (`/top`, `/graph`).
async fn observed_edges(
    state: &AdminState,
    query: Option<&str>,
) -> Result<Vec<crate::top::EdgeReport>, Response<Full<Bytes>>> {
    let mut namespace = None;
    let mut window = std::time::Duration::from_secs(2);
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "namespace" => namespace = Some(value.into_owned()),
            "window" => match humantime::parse_duration(&value) {
                Ok(w) if w <= std::time::Duration::from_secs(60) => window = w,
                _ => {
                    return Err(text(
                        StatusCode::BAD_REQUEST,
                        "window: a duration up to 60s",
                    ));
                }
            },
            _ => {}
        }
    }
    let sidecars = ask_model(state, |reply| ModelQuery::Sidecars { namespace, reply }).await?;

    let scrape_all =
        || futures::future::join_all(sidecars.iter().map(|(_, ip)| scrape_sidecar(*ip)));
    let before = scrape_all().await;
    tokio::time::sleep(window).await;
    let after = scrape_all().await;
    let mut edges = Vec::new();
    for (((node, _), before), after) in sidecars.iter().zip(before).zip(after) {
        if let (Some(before), Some(after)) = (before, after) {
            edges.extend(crate::top::edges(node, &before, &after, window));
        }
    }
    Ok(edges)
}

/// How long `/explain` waits for the model's owner (busy applying a large change).
const EXPLAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The `/explain` query string for `query`.
pub fn explain_path(query: &CallQuery) -> String {
    let mut params = form_urlencoded::Serializer::new(String::new());
    params.append_pair("from", &query.from);
    params.append_pair("url", &query.url);
    if let Some(method) = &query.method {
        params.append_pair("method", method);
    }
    for header in &query.headers {
        params.append_pair("header", header);
    }
    format!("/explain?{}", params.finish())
}

fn explain_query(query: Option<&str>) -> CallQuery {
    let mut out = CallQuery::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "from" => out.from = value.into_owned(),
            "url" => out.url = value.into_owned(),
            "method" => out.method = Some(value.into_owned()),
            "header" => out.headers.push(value.into_owned()),
            _ => {}
        }
    }
    out
}

impl AdminState {
    fn proxy_status(&self) -> Vec<ProxyStatus> {
        self.registry
            .list()
            .iter()
            .map(|s| ProxyStatus {
                node: s.node_id.clone().unwrap_or_default(),
                peer: s.peer.map(|p| p.to_string()).unwrap_or_default(),
                types: s.types.iter().map(TypeStatus::from).collect(),
                protocol: s.protocol.to_string(),
                denied: s.denied.clone(),
            })
            .collect()
    }
}

/// The caller sidecar's live view of the call's clusters (ejected endpoints, failing
/// health checks, an open circuit), from its metrics port; a line saying why not when
/// it cannot be read.
async fn caller_live_state(answer: &Explanation) -> Vec<String> {
    let Some(ip) = answer.caller_ips.first() else {
        return Vec::new();
    };
    if answer.clusters.is_empty() {
        return Vec::new();
    }
    match sidecar_view(*ip, "/weft/clusters").await {
        Ok(text) => crate::explain::live_lines(&answer.clusters, &text),
        Err(e) => vec![format!(
            "live state of the caller's sidecar unavailable: {e}"
        )],
    }
}

/// Whether the proxies a call involves have what `/explain` reasoned about: the model
/// is what they should have, not necessarily what they run.
pub fn sync_lines(nodes: &[String], proxies: &[ProxyStatus]) -> Vec<String> {
    nodes
        .iter()
        .map(|node| {
            let Some(p) = proxies.iter().find(|p| &p.node == node) else {
                return format!("proxy {node}: not connected, so none of this is in effect there");
            };
            if let Some(reason) = &p.denied {
                return format!("proxy {node}: failed the identity check ({reason}): outbound config only, no certificate");
            }
            if let Some(t) = p.types.iter().find(|t| t.state == "NACKED") {
                return format!(
                    "proxy {node}: rejected its latest {} ({}); it runs its last good config",
                    t.type_name,
                    t.nack.as_deref().unwrap_or_default()
                );
            }
            let stale: Vec<&str> = p
                .types
                .iter()
                .filter(|t| t.state != "SYNCED")
                .map(|t| t.type_name.as_str())
                .collect();
            if stale.is_empty() {
                format!("proxy {node}: in sync")
            } else {
                format!("proxy {node}: not yet acknowledged: {}", stale.join(", "))
            }
        })
        .collect()
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `/proxy-config?node=NS/NAME[&types=listeners,routes]`: what the node is served.
fn proxy_config(state: &AdminState, query: Option<&str>) -> Response<Full<Bytes>> {
    let mut node = None;
    let mut kinds = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "node" => node = Some(value.into_owned()),
            "types" => {
                for name in value.split(',') {
                    match ResourceKind::parse(name) {
                        Some(kind) => kinds.push(kind),
                        None => {
                            return text(
                                StatusCode::BAD_REQUEST,
                                &format!(
                                    "unknown type {name:?}: listeners, scopes, routes, clusters, endpoints or secrets"
                                ),
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    let Some(node) = node else {
        return text(StatusCode::BAD_REQUEST, "needs ?node=NAMESPACE/NAME");
    };
    if kinds.is_empty() {
        kinds = ResourceKind::ALL.to_vec();
    }
    // What the proxy was sent (clusters it fetched on demand, the endpoints it
    // subscribed to); what it would be sent while no stream is open.
    let served = state.registry.served(&node);
    let Some(snapshot) = served.or_else(|| state.cache.view(&node)) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "no config for {node}: a proxy's config is built while it is connected (see `weft proxy-status`)"
            ),
        );
    };
    match crate::proxy_config::render(&snapshot, &kinds) {
        Ok(config) => json(&config),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *response.status_mut() = status;
    response
}

async fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok"),
        // Ready once the first full read of the source is served, until shutdown.
        "/ready" | "/readyz" => {
            if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            } else if state.status.borrow().synced {
                text(StatusCode::OK, "ready")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the first full read of the source",
                )
            }
        }
        "/status" => {
            let mut status = state.status.borrow().clone();
            status.identity_check_failures = state.registry.denials();
            json(&status)
        }
        "/proxy-status" => json(&state.proxy_status()),
        "/proxy-config" => proxy_config(state, req.uri().query()),
        "/top" => top(state, req.uri().query()).await,
        "/graph" => graph(state, req.uri().query()).await,
        "/dashboard" | "/dashboard/" => Response::builder()
            .header("content-type", "text/html; charset=utf-8")
            // Everything is inline; nothing may load from elsewhere.
            .header(
                "content-security-policy",
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            )
            .body(Full::new(Bytes::from_static(
                crate::dashboard::PAGE.as_bytes(),
            )))
            .unwrap_or_default(),
        "/explain" => match ask_explain(state, explain_query(req.uri().query())).await {
            Ok(mut answer) => {
                answer
                    .lines
                    .extend(sync_lines(&answer.proxies, &state.proxy_status()));
                let live = caller_live_state(&answer).await;
                answer.lines.extend(live);
                json(&answer)
            }
            Err(response) => response,
        },
        "/metrics" => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(
                state.metrics.render(&state.registry),
            )))
            .unwrap_or_default(),
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: /healthz /readyz /status /proxy-status /proxy-config /explain /top /graph /dashboard /metrics",
        ),
    }
}

/// Serves the admin endpoint on `listener` until an error; connections are supervised.
pub async fn serve(listener: TcpListener, state: AdminState) -> Result<(), WeftError> {
    serve_connections(listener, "admin connection", move |stream, _peer| {
        let state = state.clone();
        async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        }
    })
    .await
}

/// GETs `path` from the admin endpoint at `addr` and decodes the JSON body.
pub async fn fetch<T: for<'de> Deserialize<'de>>(addr: &str, path: &str) -> Result<T, WeftError> {
    let (status, body) = http_request(addr, Method::GET, path).await?;
    let err = |reason: String| WeftError::Admin {
        addr: addr.to_string(),
        reason,
    };
    if !status.is_success() {
        return Err(err(format!("{path}: HTTP {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| err(format!("{path}: {e}")))
}

/// One plain HTTP/1.1 request to `addr` (an admin endpoint on this host): status and body.
pub async fn http_request(
    addr: &str,
    method: Method,
    path: &str,
) -> Result<(StatusCode, Bytes), WeftError> {
    let err = |reason: String| WeftError::Admin {
        addr: addr.to_string(),
        reason,
    };
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| err(format!("not HOST:PORT: {e}")))?;
    let stream = tokio::net::TcpStream::connect(sock)
        .await
        .map_err(|e| err(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| err(e.to_string()))?;
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| err(e.to_string()))?;
    let exchange = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| err(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        Ok::<_, WeftError>((status, body))
    };
    tokio::pin!(exchange);
    // The connection must be driven while the body is read; it may finish first.
    tokio::select! {
        biased;
        done = &mut exchange => done,
        closed = conn => {
            closed.map_err(|e| err(e.to_string()))?;
            exchange.await
        }
    }
}
