//! The HTTP side: accepting connections, routing API paths, and the handlers.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
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
use super::conversion::{VIEWS, View, find_view};
use super::select::Filter;
use super::store::{ApiError, KINDS, Kind, ListRequest, Store, Target, WatchMsg, WatchRequest};
use super::tokens;

/// Not `Sync`: a watch's stream may await a conversion webhook call.
type Body = UnsyncBoxBody<Bytes, io::Error>;

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
    let mut response = Response::new(body.boxed_unsync());
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
    /// Requested in another served version than the stored one (an index into
    /// [`VIEWS`]).
    view: Option<usize>,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

impl ResourcePath {
    fn target(&self) -> Target {
        Target {
            kind: self.kind,
            namespace: self.namespace.clone().unwrap_or_default(),
            name: self.name.clone().unwrap_or_default(),
            status: self.status,
        }
    }
}

fn resolve(group: &str, version: &str, rest: &[&str]) -> Option<ResourcePath> {
    let find = |plural: &str| {
        let stored = KINDS
            .iter()
            .position(|k| (k.group, k.version, k.plural) == (group, version, plural));
        stored
            .map(|k| (k, None))
            .or_else(|| find_view(group, version, plural).map(|v| (VIEWS[v].kind, Some(v))))
    };
    let namespaced = |plural: Option<&&str>| {
        plural
            .and_then(|p| find(p))
            .is_some_and(|(k, _)| KINDS[k].namespaced)
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
    let (kind, view) = find(plural)?;
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
        view,
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

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
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
    match target.view {
        None => {
            let reply = resource(&mut shared.lock(), &target, call, &path)?;
            Ok(render(&KINDS[target.kind], reply, None))
        }
        Some(view) => in_view(shared, &target, &VIEWS[view], call, &path).await,
    }
}

/// What a request on a served kind answers: an object or list, or a watch.
enum Reply {
    Json(u16, Value),
    Watch {
        backlog: VecDeque<WatchMsg>,
        rx: Option<UnboundedReceiver<WatchMsg>>,
        timeout: Duration,
    },
}

/// The response of a reply; watch events are converted to `view`'s version if given.
fn render(
    kind: &'static Kind,
    reply: Reply,
    view: Option<(Arc<Shared>, &'static View)>,
) -> Response<Body> {
    match reply {
        Reply::Json(code, value) => json_response(code, &value),
        Reply::Watch {
            backlog,
            rx,
            timeout,
        } => {
            let api_version = view
                .as_ref()
                .map_or(kind.api_version, |(_, v)| v.api_version);
            watch_response(api_version, kind.kind, backlog, rx, timeout, view)
        }
    }
}

/// A request in another served version than the stored one: a body to store is
/// converted to the stored version first, and the answer to the requested version; a
/// merge or JSON patch applies to the object in the requested version.
async fn in_view(
    shared: &Arc<Shared>,
    path: &ResourcePath,
    view: &'static View,
    mut call: Call,
    raw_path: &str,
) -> Result<Response<Body>, ApiError> {
    let kind = &KINDS[path.kind];
    let apply = call.content_type == "application/apply-patch+yaml";
    if call.method == Method::PATCH && path.name.is_some() && !apply {
        return patch_in_view(shared, path, view, &call).await;
    }
    let writes = matches!(call.method, Method::POST | Method::PUT)
        || (call.method == Method::PATCH && apply);
    if writes && path.name.is_some() != (call.method == Method::POST) {
        let mut body: Value = if apply {
            serde_json::from_slice(&call.body)
                .or_else(|_| serde_yaml_ng::from_slice::<Value>(&call.body))
                .map_err(|e| {
                    ApiError::bad_request(format!("the apply configuration is not valid YAML: {e}"))
                })?
        } else {
            parse_json(&call.body)?
        };
        let Some(fields) = body.as_object_mut() else {
            return Err(ApiError::bad_request(
                "the body must be an object with object metadata",
            ));
        };
        for (field, want) in [("apiVersion", view.api_version), ("kind", kind.kind)] {
            match fields.get(field).and_then(Value::as_str) {
                None => {
                    fields.insert(field.to_string(), json!(want));
                }
                Some(have) if have != want => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} in the data ({have}) does not match the expected {field} ({want})"
                    )));
                }
                Some(_) => {}
            }
        }
        let stored = match shared
            .convert_one(kind, view.webhook, body, kind.api_version)
            .await
        {
            Ok(stored) => stored,
            Err(e) => {
                // Refused before the store, but made (RBAC sees it): counted.
                let verb = verb(path, &call, raw_path)?;
                let subresource = if path.status { "status" } else { "" };
                shared
                    .lock()
                    .count(verb, kind.group, kind.plural, subresource);
                return Err(e);
            }
        };
        call.body = Bytes::from(serde_json::to_vec(&stored).unwrap_or_default());
    }
    let reply = resource(&mut shared.lock(), path, call, raw_path)?;
    match reply {
        Reply::Json(code, value) => Ok(json_response(
            code,
            &shared.convert_answer(view, value).await?,
        )),
        watch => Ok(render(kind, watch, Some((shared.clone(), view)))),
    }
}

/// A merge or JSON patch in another served version: the stored object converted to it,
/// patched, converted back and stored (again on a conflict with a concurrent write,
/// unless the patch names a resourceVersion).
async fn patch_in_view(
    shared: &Arc<Shared>,
    path: &ResourcePath,
    view: &'static View,
    call: &Call,
) -> Result<Response<Body>, ApiError> {
    let kind = &KINDS[path.kind];
    let target = path.target();
    shared.lock().count(
        "patch",
        kind.group,
        kind.plural,
        if target.status { "status" } else { "" },
    );
    if call.query.flag("force") {
        return Err(ApiError::invalid(
            "force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let pinned = call.body.windows(17).any(|w| w == b"\"resourceVersion\"");
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = shared
            .lock()
            .get(target.kind, &target.namespace, &target.name)?;
        let mut object = shared
            .convert_one(kind, view.webhook, current, view.api_version)
            .await?;
        apply_patch(&mut object, call)?;
        let stored = shared
            .convert_one(kind, view.webhook, object, kind.api_version)
            .await?;
        let result = shared.lock().replace(&target, stored, &call.manager);
        match result {
            Err(e) if e.code == 409 && !pinned && attempt < 5 => continue,
            result => {
                let answer = shared.convert_answer(view, result?).await?;
                return Ok(json_response(200, &answer));
            }
        }
    }
}

/// The verb of a request on a resource path, as RBAC names it.
fn verb(path: &ResourcePath, call: &Call, raw_path: &str) -> Result<&'static str, ApiError> {
    // Creating a namespaced object needs its namespace in the path.
    let creatable = path.namespace.is_some() || !KINDS[path.kind].namespaced;
    Ok(match (&call.method, path.name.is_some()) {
        (&Method::GET, false) if call.query.flag("watch") => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) if creatable => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) if !path.status => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return Err(method_not_allowed(&call.method, raw_path)),
    })
}

/// A request on a served kind, in its stored version. Watches return at once with
/// their first events and the receiver of later ones.
fn resource(
    store: &mut Store,
    path: &ResourcePath,
    call: Call,
    raw_path: &str,
) -> Result<Reply, ApiError> {
    let kind = &KINDS[path.kind];
    let verb = verb(path, &call, raw_path)?;
    let subresource = if path.status { "status" } else { "" };
    store.count(verb, kind.group, kind.plural, subresource);
    let target = path.target();
    let query = &call.query;
    match verb {
        "get" => Ok(Reply::Json(
            200,
            store.get(target.kind, &target.namespace, &target.name)?,
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
            Ok(Reply::Json(200, store.list(&request)?))
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
            Ok(Reply::Watch {
                backlog,
                rx,
                timeout,
            })
        }
        "create" => {
            let object = store.create(
                target.kind,
                &target.namespace,
                parse_json(&call.body)?,
                &call.manager,
            )?;
            Ok(Reply::Json(201, object))
        }
        "update" => Ok(Reply::Json(
            200,
            store.replace(&target, parse_json(&call.body)?, &call.manager)?,
        )),
        "patch" => {
            let (code, object) = patch(store, &target, &call)?;
            Ok(Reply::Json(code, object))
        }
        "delete" => {
            let options = if call.body.is_empty() {
                Value::Null
            } else {
                parse_json(&call.body)?
            };
            Ok(Reply::Json(200, store.delete(&target, &options)?))
        }
        _ => {
            let filter = query.filter(path.namespace.clone())?;
            Ok(Reply::Json(
                200,
                store.delete_collection(path.kind, &filter)?,
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
    apply_patch(&mut object, call)?;
    Ok((200, store.replace(target, object, &call.manager)?))
}

/// Applies a merge, strategic-merge or JSON patch to `object`.
fn apply_patch(object: &mut Value, call: &Call) -> Result<(), ApiError> {
    match call.content_type.as_str() {
        // Strategic merge differs from a merge patch in how it merges lists (by key
        // instead of replacing): close enough here, once its directives are gone.
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let mut patch = parse_json(&call.body)?;
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            strip_directives(&mut patch);
            json_patch::merge(object, &patch);
        }
        "application/json-patch+json" => {
            let patch: json_patch::Patch = serde_json::from_slice(&call.body)
                .map_err(|e| ApiError::bad_request(format!("the body is not a JSON patch: {e}")))?;
            json_patch::patch(object, &patch.0).map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        other => {
            let message = format!("the body of the request was in an unknown format: {other:?}");
            return Err(ApiError::new(415, "UnsupportedMediaType", message));
        }
    }
    Ok(())
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

fn event_line(api_version: &str, kind: &str, msg: WatchMsg) -> Bytes {
    let (event_type, object) = match msg {
        WatchMsg::Event(t, object) => (t, object),
        WatchMsg::Bookmark { rv, initial_end } => {
            let mut metadata = json!({"resourceVersion": rv.to_string()});
            if initial_end {
                metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
            }
            let object = json!({"apiVersion": api_version, "kind": kind, "metadata": metadata});
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
/// until the double drops the watch (an abrupt end, as when a connection breaks). With a
/// view, each event's object is converted to its version first; a failed conversion is
/// an ERROR event that ends the watch, as the API server's.
fn watch_response(
    api_version: &'static str,
    kind: &'static str,
    backlog: VecDeque<WatchMsg>,
    rx: Option<UnboundedReceiver<WatchMsg>>,
    timeout: Duration,
    view: Option<(Arc<Shared>, &'static View)>,
) -> Response<Body> {
    struct State {
        api_version: &'static str,
        kind: &'static str,
        backlog: VecDeque<WatchMsg>,
        rx: Option<UnboundedReceiver<WatchMsg>>,
        deadline: tokio::time::Instant,
        view: Option<(Arc<Shared>, &'static View)>,
        cut: bool,
        done: bool,
    }
    impl State {
        async fn line(&mut self, msg: WatchMsg) -> Bytes {
            let msg = match (msg, &self.view) {
                (WatchMsg::Event(t, object), Some((shared, view))) => {
                    match shared.convert_answer(view, Value::clone(&object)).await {
                        Ok(converted) => WatchMsg::Event(t, Arc::new(converted)),
                        Err(e) => {
                            self.done = true;
                            WatchMsg::Gone(e)
                        }
                    }
                }
                (msg, _) => msg,
            };
            event_line(self.api_version, self.kind, msg)
        }
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let state = State {
        api_version,
        kind,
        backlog,
        rx,
        deadline,
        view,
        cut: false,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        if s.cut || s.done {
            return None;
        }
        if let Some(msg) = s.backlog.pop_front() {
            let line = s.line(msg).await;
            return Some((Ok(Frame::data(line)), s));
        }
        let rx = s.rx.as_mut()?;
        let next = tokio::select! {
            _ = tokio::time::sleep_until(s.deadline) => return None,
            msg = rx.recv() => msg,
        };
        match next {
            Some(msg) => {
                let line = s.line(msg).await;
                Some((Ok(Frame::data(line)), s))
            }
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
    let mut response = Response::new(BodyExt::boxed_unsync(StreamBody::new(stream)));
    (response.headers_mut()).insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// `/version`, `/api`, `/apis` and the resource lists of each group version, as far as
/// `kube`'s discovery reads them.
fn discovery(segments: &[&str]) -> Option<Value> {
    // Each group's versions by priority: the stored version first (the preferred one),
    // then the other served versions, newest first.
    let versions = || {
        let mut seen: Vec<(&str, &str)> = KINDS.iter().map(|k| (k.group, k.version)).collect();
        seen.extend(VIEWS.iter().map(|v| (v.group, v.version)));
        seen.push(("authentication.k8s.io", "v1"));
        let mut unique: Vec<(&str, &str)> = Vec::new();
        for gv in seen {
            if !unique.contains(&gv) {
                unique.push(gv);
            }
        }
        unique
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
    let stored = KINDS
        .iter()
        .filter(|k| (k.group, k.version) == (group, version));
    let viewed = (VIEWS.iter())
        .filter(|v| (v.group, v.version) == (group, version))
        .map(|v| &KINDS[v.kind]);
    for k in stored.chain(viewed) {
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
