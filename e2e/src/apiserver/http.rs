//! The HTTP side: accepting connections, routing API paths, and the handlers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

use super::Shared;
use super::select::Filter;
use super::store::{ApiError, KINDS, Kind, ListRequest, Store, Target, WatchMsg, WatchRequest};
use super::tokens;

type Body = BoxBody<Bytes, io::Error>;

/// Serves connections until the task is aborted; aborting drops every connection too.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors or similar: don't spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    // A connection error ends only that connection.
                    let _ = connection.await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = route(&shared, req).await;
    Ok(response.unwrap_or_else(|e| json_response(e.code, &e.status())))
}

fn json_response(code: u16, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let body = Full::new(Bytes::from(bytes)).map_err(|never| match never {});
    let mut response = Response::new(body.boxed());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (response.headers_mut()).insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Query parameters, percent-decoded; the last of repeated keys wins.
struct Query(HashMap<String, String>);

impl Query {
    fn parse(query: &str) -> Self {
        let pairs = query.split('&').filter(|p| !p.is_empty()).map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        });
        Self(pairs.collect())
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
    fn filter(&self, namespace: Option<String>) -> Result<Filter, ApiError> {
        let (labels, fields) = (self.get("labelSelector"), self.get("fieldSelector"));
        Filter::parse(namespace, labels.unwrap_or(""), fields.unwrap_or(""))
            .map_err(ApiError::bad_request)
    }
}

/// `application/x-www-form-urlencoded` decoding, as clients encode query strings.
fn decode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.as_bytes().get(i) {
        let hex = s
            .get(i + 1..i + 3)
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {rv:?}")))
}

/// A resource path: a kind, the namespace and object if named, `/status` or not.
struct ResourcePath {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn resolve(group: &str, version: &str, rest: &[&str]) -> Option<ResourcePath> {
    let find = |plural: &str| {
        KINDS
            .iter()
            .position(|k| (k.group, k.version, k.plural) == (group, version, plural))
    };
    let namespaced = |plural: Option<&&str>| {
        plural
            .and_then(|p| find(p))
            .is_some_and(|k| KINDS[k].namespaced)
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if namespaced(tail.first()) => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(*name), None),
        [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
        _ => return None,
    };
    let kind = find(plural)?;
    // A namespaced object is only addressable within its namespace.
    if KINDS[kind].namespaced && namespace.is_none() && name.is_some() {
        return None;
    }
    let status = match sub {
        None => false,
        Some("status") if KINDS[kind].status => true,
        Some(_) => return None,
    };
    Some(ResourcePath {
        kind,
        namespace,
        name: name.map(String::from),
        status,
    })
}

fn not_found_path(path: &str) -> ApiError {
    let message = format!("the server could not find the requested resource ({path})");
    ApiError::new(404, "NotFound", message)
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        format!("{method} is not supported on {path}"),
    )
}

/// What a handler needs from the request besides the path.
struct Call {
    method: Method,
    query: Query,
    content_type: String,
    /// The field manager: `fieldManager`, else the user agent up to its first '/', as
    /// the API server defaults it.
    manager: String,
    body: Bytes,
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let bearer = header(AUTHORIZATION).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(shared.token.as_str()) {
        return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    let content_type = header(CONTENT_TYPE)
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("");
    let content_type = content_type.trim().to_string();
    let agent = header(USER_AGENT)
        .and_then(|ua| ua.split('/').next())
        .filter(|a| !a.is_empty());
    let agent = agent.unwrap_or("unknown").to_string();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let manager = query.get("fieldManager").map_or(agent, String::from);
    let body = req.into_body().collect().await;
    let body = body.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
    let call = Call {
        method,
        query,
        content_type,
        manager,
        body: body.to_bytes(),
    };

    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if call.method == Method::GET
        && let Some(document) = discovery(&segments)
    {
        return Ok(json_response(200, &document));
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found_path(&path)),
    };
    if (group, version, rest) == ("authentication.k8s.io", "v1", &["tokenreviews"][..]) {
        if call.method != Method::POST {
            return Err(method_not_allowed(&call.method, &path));
        }
        let mut store = shared.lock();
        store.count("create", group, "tokenreviews", "");
        return Ok(json_response(
            201,
            &tokens::review(&store.tokens, &call.body)?,
        ));
    }
    let target = resolve(group, version, rest).ok_or_else(|| not_found_path(&path))?;
    resource(&mut shared.lock(), &target, call, &path)
}

/// A request on a served kind. Watches return at once with a streaming body.
fn resource(
    store: &mut Store,
    path: &ResourcePath,
    call: Call,
    raw_path: &str,
) -> Result<Response<Body>, ApiError> {
    let kind = &KINDS[path.kind];
    // Creating a namespaced object needs its namespace in the path.
    let creatable = path.namespace.is_some() || !kind.namespaced;
    let verb = match (&call.method, path.name.is_some()) {
        (&Method::GET, false) if call.query.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) if creatable => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) if !path.status => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return Err(method_not_allowed(&call.method, raw_path)),
    };
    let subresource = if path.status { "status" } else { "" };
    store.count(verb, kind.group, kind.plural, subresource);
    let target = Target {
        kind: path.kind,
        namespace: path.namespace.clone().unwrap_or_default(),
        name: path.name.clone().unwrap_or_default(),
        status: path.status,
    };
    let query = &call.query;
    match verb {
        "get" => Ok(json_response(
            200,
            &store.get(target.kind, &target.namespace, &target.name)?,
        )),
        "list" => {
            let limit = query.get("limit").map_or(Ok(0), |l| {
                l.parse()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))
            })?;
            let exact = match (
                query.get("resourceVersionMatch"),
                query.get("resourceVersion"),
            ) {
                (Some("Exact"), Some(rv)) => Some(parse_rv(rv)?),
                _ => None,
            };
            let request = ListRequest {
                kind: path.kind,
                filter: query.filter(path.namespace.clone())?,
                limit,
                continue_token: query.get("continue").map(String::from),
                exact,
            };
            Ok(json_response(200, &store.list(&request)?))
        }
        "watch" => {
            let from = match query.get("resourceVersion") {
                None | Some("0") => None,
                Some(rv) => Some(parse_rv(rv)?),
            };
            let seconds = query.get("timeoutSeconds").and_then(|t| t.parse().ok());
            let request = WatchRequest {
                kind: path.kind,
                filter: query.filter(path.namespace.clone())?,
                from,
                bookmarks: query.flag("allowWatchBookmarks"),
                initial_events: query.flag("sendInitialEvents"),
            };
            let (backlog, rx) = store.watch(request);
            // The API server's default is a random 30 to 60 minutes.
            let timeout = Duration::from_secs(seconds.unwrap_or(1800));
            Ok(watch_response(kind, backlog, rx, timeout))
        }
        "create" => {
            let object = store.create(
                target.kind,
                &target.namespace,
                parse_json(&call.body)?,
                &call.manager,
            )?;
            Ok(json_response(201, &object))
        }
        "update" => Ok(json_response(
            200,
            &store.replace(&target, parse_json(&call.body)?, &call.manager)?,
        )),
        "patch" => {
            let (code, object) = patch(store, &target, &call)?;
            Ok(json_response(code, &object))
        }
        "delete" => {
            let options = if call.body.is_empty() {
                Value::Null
            } else {
                parse_json(&call.body)?
            };
            Ok(json_response(200, &store.delete(&target, &options)?))
        }
        _ => {
            let filter = query.filter(path.namespace.clone())?;
            Ok(json_response(
                200,
                &store.delete_collection(path.kind, &filter)?,
            ))
        }
    }
}

fn patch(store: &mut Store, target: &Target, call: &Call) -> Result<(u16, Value), ApiError> {
    let force = call.query.flag("force");
    if call.content_type == "application/apply-patch+yaml" {
        let manager = call.query.get("fieldManager").ok_or_else(|| {
            ApiError::invalid("fieldManager: Required value: is required for apply patch")
        })?;
        // JSON is YAML too; the JSON parser is stricter, so it goes first.
        let patch = serde_json::from_slice(&call.body)
            .or_else(|_| serde_yaml_ng::from_slice::<Value>(&call.body))
            .map_err(|e| {
                ApiError::bad_request(format!("the apply configuration is not valid YAML: {e}"))
            })?;
        return store.apply(target, patch, manager, force);
    }
    if force {
        return Err(ApiError::invalid(
            "force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let mut object = store.get(target.kind, &target.namespace, &target.name)?;
    match call.content_type.as_str() {
        // Strategic merge differs from a merge patch in how it merges lists (by key
        // instead of replacing): close enough here, once its directives are gone.
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let mut patch = parse_json(&call.body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            strip_directives(&mut patch);
            json_patch::merge(&mut object, &patch);
        }
        "application/json-patch+json" => {
            let patch: json_patch::Patch = serde_json::from_slice(&call.body)
                .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}")))?;
            json_patch::patch(&mut object, &patch.0)
                .map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        other => {
            let message = format!("the body of the request was in an unknown format: {other:?}");
            return Err(ApiError::new(415, "UnsupportedMediaType", message));
        }
    }
    Ok((200, store.replace(target, object, &call.manager)?))
}

/// Drops strategic-merge directives (`$patch`, `$setElementOrder/...`, ...), which a
/// merge patch would otherwise store as fields.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

fn event_line(kind: &Kind, msg: WatchMsg) -> Bytes {
    let (event_type, object) = match msg {
        WatchMsg::Event(t, object) => (t, object),
        WatchMsg::Bookmark { rv, initial_end } => {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let object =
                json!({"apiVersion": kind.api_version, "kind": kind.kind, "metadata": metadata});
            ("BOOKMARK", Arc::new(object))
        }
        WatchMsg::Gone(error) => ("ERROR", Arc::new(error.status())),
    };
    let event = json!({"type": event_type, "object": &*object});
    let mut line = serde_json::to_vec(&event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// A watch response: newline-delimited events until the timeout (a clean end) or
/// until the double drops the watch (an abrupt end, as when a connection breaks).
fn watch_response(
    kind: &'static Kind,
    backlog: VecDeque<WatchMsg>,
    rx: Option<UnboundedReceiver<WatchMsg>>,
    timeout: Duration,
) -> Response<Body> {
    struct State {
        kind: &'static Kind,
        backlog: VecDeque<WatchMsg>,
        rx: Option<UnboundedReceiver<WatchMsg>>,
        deadline: tokio::time::Instant,
        cut: bool,
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let state = State {
        kind,
        backlog,
        rx,
        deadline,
        cut: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.cut {
            return None;
        }
        if let Some(msg) = s.backlog.pop_front() {
            return Some((Ok(Frame::data(event_line(s.kind, msg))), s));
        }
        let rx = s.rx.as_mut()?;
        let next = tokio::select! {
            _ = tokio::time::sleep_until(s.deadline) => return None,
            msg = rx.recv() => msg,
        };
        match next {
            Some(msg) => Some((Ok(Frame::data(event_line(s.kind, msg))), s)),
            None => {
                // A body error makes hyper abort the connection mid-stream.
                s.cut = true;
                Some((
                    Err(io::Error::other("watch cut by the API-server double")),
                    s,
                ))
            }
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    (response.headers_mut()).insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `/version`, `/api`, `/apis` and the resource lists of each group version, as far as
/// `kube`'s discovery reads them.
fn discovery(segments: &[&str]) -> Option<Value> {
    let versions = || {
        let mut seen: Vec<(&str, &str)> = KINDS.iter().map(|k| (k.group, k.version)).collect();
        seen.push(("authentication.k8s.io", "v1"));
        seen.sort_unstable();
        seen.dedup();
        seen
    };
    let document = match segments {
        ["version"] => json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-weft-double", "gitCommit": "",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
            "compiler": "gc", "platform": "linux/amd64",
        }),
        ["api"] => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        }
        ["apis"] => {
            let mut groups: Vec<Value> = Vec::new();
            for (group, version) in versions().into_iter().filter(|(g, _)| !g.is_empty()) {
                let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
                match groups.iter_mut().find(|g| g["name"] == group) {
                    Some(existing) => existing["versions"].as_array_mut()?.push(gv),
                    None => groups
                        .push(json!({"name": group, "versions": [gv], "preferredVersion": gv})),
                }
            }
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        ["api", version] => resource_list("", version)?,
        ["apis", group, version] => resource_list(group, version)?,
        _ => return None,
    };
    Some(document)
}

/// The APIResourceList of a group version, if served.
fn resource_list(group: &str, version: &str) -> Option<Value> {
    const VERBS: [&str; 8] = [
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    ];
    let entry = |name: &str, singular: &str, namespaced: bool, kind: &str, verbs: &[&str]| {
        json!({"name": name, "singularName": singular, "namespaced": namespaced, "kind": kind,
               "verbs": verbs})
    };
    let mut resources = Vec::new();
    for k in KINDS
        .iter()
        .filter(|k| (k.group, k.version) == (group, version))
    {
        let singular = k.kind.to_lowercase();
        resources.push(entry(k.plural, &singular, k.namespaced, k.kind, &VERBS));
        if k.status {
            let status = format!("{}/status", k.plural);
            resources.push(entry(
                &status,
                "",
                k.namespaced,
                k.kind,
                &["get", "patch", "update"],
            ));
        }
    }
    if (group, version) == ("authentication.k8s.io", "v1") {
        resources.push(entry(
            "tokenreviews",
            "tokenreview",
            false,
            "TokenReview",
            &["create"],
        ));
    }
    let group_version = match group {
        "" => version.to_string(),
        group => format!("{group}/{version}"),
    };
    (!resources.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
               "resources": resources})
    })
}
