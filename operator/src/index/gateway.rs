//! Gateway API mesh routes (GAMMA, GEP-1426): HTTPRoutes whose parentRefs name a
//! Service, resolved into per-port [`HttpRouteEntry`] lists in precedence order.
//!
//! A route in the Service's namespace is a producer route and applies to every meshed
//! caller; a route in another namespace (its parentRef names the Service's namespace)
//! is a consumer route and applies only to callers in the route's namespace, instead of
//! the producer routes of that port. Both land in the same per-port list, told apart by
//! the entry's `source` namespace (see `translate::routes`). Problems carry the Gateway API condition reason first (`BackendNotFound: ...`)
//! so the status writer and `weft status` say the same thing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use weft_crds::gateway::{
    BackendObjectReference, GATEWAY_GROUP, GRPCRoute, GRPCRouteMatch, HTTPHeaderFilter,
    HTTPPathMatch, HTTPPathModifier, HTTPRoute, HTTPRouteFilter, HTTPRouteMatch, HTTPRouteRule,
    HTTPRouteSpec, HTTPValueMatch, ParentReference,
};

use super::model::{
    HeaderChanges, HttpRouteEntry, MeshService, MirrorModel, PathChange, PathMatch, Problem,
    RedirectModel, RetryModel, RewriteModel, RouteActionModel, RouteBackend, RouteMatchModel,
    ServiceKey, ValueMatch,
};
use super::resolve::{creation_order, parse_gateway_duration};
use super::store::{Store, name, ns};
use super::{AppProtocol, Kind, ObjectRef};

/// One condition of a route's status for one parent: (ok, reason, message).
pub type RouteCondition = (bool, &'static str, String);

/// Weft's status of a route for one of its Service parents (`status.parents[]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteParentState {
    /// The parentRef as written.
    pub parent_ref: ParentReference,
    /// `Accepted`: Accepted, NoMatchingParent or UnsupportedValue.
    pub accepted: RouteCondition,
    /// `ResolvedRefs`: ResolvedRefs, BackendNotFound, RefNotPermitted or InvalidKind.
    pub resolved_refs: RouteCondition,
}

/// Per route, its status for each Service parent.
pub type RouteStatuses = BTreeMap<ObjectRef, Vec<RouteParentState>>;

/// Routes per service and port, in precedence order.
pub(super) type ServiceRoutes = BTreeMap<ServiceKey, BTreeMap<u16, Vec<HttpRouteEntry>>>;

/// One route as the index resolves it: HTTPRoutes as written, GRPCRoutes as the
/// equivalent HTTPRoute (gRPC calls are `POST /package.Service/Method`), with why a
/// GRPCRoute cannot be expressed so.
struct AnyRoute<'a> {
    object: ObjectRef,
    route: Cow<'a, HTTPRoute>,
    invalid: Option<String>,
}

fn all_routes(store: &Store) -> Vec<AnyRoute<'_>> {
    let http = store.http_routes.values().map(|r| AnyRoute {
        object: ObjectRef::new(Kind::HTTPRoute, ns(&r.metadata), name(&r.metadata)),
        route: Cow::Borrowed(r),
        invalid: None,
    });
    let grpc = store.grpc_routes.values().map(|g| {
        let (route, invalid) = grpc_as_http(g);
        AnyRoute {
            object: ObjectRef::new(Kind::GRPCRoute, ns(&g.metadata), name(&g.metadata)),
            route: Cow::Owned(route),
            invalid,
        }
    });
    http.chain(grpc).collect()
}

/// A GRPCRoute as the HTTPRoute that routes the same calls, and why it cannot be if
/// it cannot.
fn grpc_as_http(g: &GRPCRoute) -> (HTTPRoute, Option<String>) {
    let mut invalid = None;
    let rules = g.spec.rules.as_ref().map(|rules| {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| HTTPRouteRule {
                name: r.name.clone(),
                matches: r.matches.as_ref().map(|list| {
                    list.iter()
                        .enumerate()
                        .map(|(j, m)| {
                            grpc_match(m).unwrap_or_else(|e| {
                                invalid.get_or_insert(format!("spec.rules[{i}].matches[{j}]: {e}"));
                                HTTPRouteMatch::default()
                            })
                        })
                        .collect()
                }),
                filters: r.filters.clone(),
                backend_refs: r.backend_refs.clone(),
                ..HTTPRouteRule::default()
            })
            .collect()
    });
    let route = HTTPRoute {
        metadata: g.metadata.clone(),
        spec: HTTPRouteSpec {
            parent_refs: g.spec.parent_refs.clone(),
            hostnames: None,
            rules,
        },
        status: None,
    };
    (route, invalid)
}

/// A gRPC service/method match as a path match on `/service/method`.
fn grpc_match(m: &GRPCRouteMatch) -> Result<HTTPRouteMatch, String> {
    let path = match &m.method {
        None => None,
        Some(mm) => {
            let service = mm.service.as_deref().filter(|s| !s.is_empty());
            let method = mm.method.as_deref().filter(|s| !s.is_empty());
            let (type_, value) = match (mm.type_.as_deref().unwrap_or("Exact"), service, method) {
                (_, None, None) => ("PathPrefix", "/".to_string()),
                ("Exact", Some(s), Some(m)) => ("Exact", format!("/{s}/{m}")),
                ("Exact", Some(s), None) => ("PathPrefix", format!("/{s}/")),
                ("Exact", None, Some(m)) => (
                    "RegularExpression",
                    format!("/[^/]+/{}", regex_syntax::escape(m)),
                ),
                ("RegularExpression", s, m) => {
                    for r in [s, m].into_iter().flatten() {
                        check_regex(r)?;
                    }
                    (
                        "RegularExpression",
                        format!("/(?:{})/(?:{})", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+")),
                    )
                }
                (other, _, _) => {
                    return Err(format!("method match type {other:?} is not supported"));
                }
            };
            Some(HTTPPathMatch {
                type_: Some(type_.to_string()),
                value: Some(value),
            })
        }
    };
    Ok(HTTPRouteMatch {
        path,
        headers: m.headers.clone(),
        query_params: None,
        method: None,
    })
}

/// Whether a ReferenceGrant in `to`'s namespace lets routes of `from`'s kind in its
/// namespace name Service `to`.
fn permitted(store: &Store, from: &ObjectRef, to: &ServiceKey) -> bool {
    let kind = match from.kind {
        Kind::GRPCRoute => "GRPCRoute",
        _ => "HTTPRoute",
    };
    store
        .reference_grants
        .values()
        .filter(|g| ns(&g.metadata) == to.namespace)
        .any(|g| {
            g.spec.from.iter().any(|f| {
                f.group == GATEWAY_GROUP && f.kind == kind && f.namespace == from.namespace
            }) && g.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_ref().is_none_or(|n| *n == to.name)
            })
        })
}

/// Every service a route names (Service parents and backends), existing or not.
pub(super) fn route_references(store: &Store) -> BTreeSet<ServiceKey> {
    let mut out = BTreeSet::new();
    for any in all_routes(store) {
        let route = &*any.route;
        let route_ns = ns(&route.metadata);
        for parent in route.spec.parent_refs.iter().flatten() {
            if parent.is_service() {
                out.insert(ServiceKey::new(
                    parent.namespace.as_deref().unwrap_or(route_ns),
                    &parent.name,
                ));
            }
        }
        for rule in route.spec.rules.iter().flatten() {
            let filters = rule.filters.iter().flatten().chain(
                rule.backend_refs
                    .iter()
                    .flatten()
                    .flat_map(|b| b.filters.iter().flatten()),
            );
            for backend in rule
                .backend_refs
                .iter()
                .flatten()
                .map(|b| &b.backend)
                .chain(filters.filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref)))
            {
                if backend.is_service() {
                    out.insert(ServiceKey::new(
                        backend.namespace.as_deref().unwrap_or(route_ns),
                        &backend.name,
                    ));
                }
            }
        }
    }
    out
}

/// A route's problem: `rejected` routes (Accepted=False) do nothing; others apply with
/// the unresolved parts answering 500.
fn problem(route: &ObjectRef, rejected: bool, reason: &'static str, message: String) -> Problem {
    Problem {
        object: route.clone(),
        rejected,
        reason: format!("{reason}: {message}"),
    }
}

/// Sort key of one entry: the Gateway API's precedence (exact path, then regex, then
/// the longest prefix; method; most headers; most query parameters; oldest route, then
/// namespace/name; rule and match order).
type Precedence = (
    u8,
    std::cmp::Reverse<usize>,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    (bool, Option<k8s_openapi::jiff::Timestamp>, String, String),
    usize,
    usize,
);

fn precedence(
    m: &RouteMatchModel,
    route: &HTTPRoute,
    rule: usize,
    match_index: usize,
) -> Precedence {
    let (rank, len) = match &m.path {
        PathMatch::Exact(p) => (0, p.len()),
        PathMatch::Regex(p) => (1, p.len()),
        PathMatch::Prefix(p) => (2, p.len()),
    };
    (
        rank,
        std::cmp::Reverse(len),
        m.method.is_none(),
        std::cmp::Reverse(m.headers.len()),
        std::cmp::Reverse(m.query.len()),
        creation_order(&route.metadata),
        rule,
        match_index,
    )
}

/// Resolves every HTTPRoute against the accepted services.
pub(super) fn resolve_http_routes<'s>(
    store: &Store,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> (ServiceRoutes, Vec<Problem>, RouteStatuses) {
    let mut problems = Vec::new();
    let mut statuses = RouteStatuses::new();
    let mut entries: BTreeMap<ServiceKey, BTreeMap<u16, Vec<(Precedence, HttpRouteEntry)>>> =
        BTreeMap::new();
    for any in all_routes(store) {
        let route = &*any.route;
        let object = any.object;
        let service_parents = || {
            route
                .spec
                .parent_refs
                .iter()
                .flatten()
                .filter(|p| p.is_service())
        };
        let resolved = match any.invalid {
            Some(message) => Err((
                "UnsupportedValue",
                problem(&object, true, "UnsupportedValue", message),
            )),
            None => resolve_rules(store, route, &object, services),
        };
        let rules = match resolved {
            Ok((rules, warnings)) => {
                let resolved: RouteCondition = match warnings.first() {
                    Some((reason, _)) => (
                        false,
                        reason,
                        warnings
                            .iter()
                            .map(|(_, p)| unprefixed(&p.reason))
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                    None => (true, "ResolvedRefs", "every reference resolves".to_string()),
                };
                let list = statuses.entry(object.clone()).or_default();
                for parent in service_parents() {
                    list.push(RouteParentState {
                        parent_ref: parent.clone(),
                        accepted: (true, "Accepted", "applied".to_string()),
                        resolved_refs: resolved.clone(),
                    });
                }
                problems.extend(warnings.into_iter().map(|(_, p)| p));
                rules
            }
            Err((reason, p)) => {
                let message = unprefixed(&p.reason).to_string();
                statuses.insert(
                    object.clone(),
                    service_parents()
                        .map(|parent| RouteParentState {
                            parent_ref: parent.clone(),
                            accepted: (false, reason, message.clone()),
                            resolved_refs: (
                                true,
                                "ResolvedRefs",
                                "every reference resolves".to_string(),
                            ),
                        })
                        .collect(),
                );
                problems.push(p);
                continue;
            }
        };
        let mut attached = false;
        for parent in route.spec.parent_refs.iter().flatten() {
            match parent_ports(route, parent, services) {
                Ok(Some((key, ports))) => {
                    attached = true;
                    for port in ports {
                        let list = entries
                            .entry(key.clone())
                            .or_default()
                            .entry(port)
                            .or_default();
                        for (rule_index, rule_name, matches, action) in &rules {
                            for (i, m) in matches.iter().enumerate() {
                                list.push((
                                    precedence(m, route, *rule_index, i),
                                    HttpRouteEntry {
                                        source: object.clone(),
                                        rule: *rule_index,
                                        rule_name: rule_name.clone(),
                                        r#match: m.clone(),
                                        action: action.clone(),
                                    },
                                ));
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err((reason, message)) => {
                    if let Some(state) = statuses
                        .get_mut(&object)
                        .and_then(|l| l.iter_mut().find(|s| s.parent_ref == *parent))
                    {
                        state.accepted = (false, reason, message.clone());
                    }
                    problems.push(problem(&object, false, reason, message));
                }
            }
        }
        if !attached
            && route
                .spec
                .parent_refs
                .iter()
                .flatten()
                .any(|p| p.is_service())
        {
            // Every Service parent failed: reported above, and nothing applies.
            if let Some(p) = problems.iter_mut().rev().find(|p| p.object == object) {
                p.rejected = true;
            }
        }
    }
    let out = entries
        .into_iter()
        .map(|(key, ports)| {
            let ports = ports
                .into_iter()
                .map(|(port, mut list)| {
                    list.sort_by(|a, b| a.0.cmp(&b.0));
                    (port, list.into_iter().map(|(_, e)| e).collect())
                })
                .collect();
            (key, ports)
        })
        .collect();
    (out, problems, statuses)
}

/// A problem's message without its condition reason.
fn unprefixed(reason: &str) -> &str {
    reason.split_once(": ").map_or(reason, |(_, m)| m)
}

/// The service and ports a parentRef attaches to; `None` for parents that are not
/// Services (Gateways belong to other controllers).
#[allow(clippy::type_complexity)]
fn parent_ports<'s>(
    route: &HTTPRoute,
    parent: &ParentReference,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> Result<Option<(ServiceKey, Vec<u16>)>, (&'static str, String)> {
    if !parent.is_service() {
        return Ok(None);
    }
    let route_ns = ns(&route.metadata);
    let key = ServiceKey::new(
        parent.namespace.as_deref().unwrap_or(route_ns),
        &parent.name,
    );
    // A parent in another namespace makes a consumer route: its entries keep the
    // route's namespace as `source`, and only callers in that namespace follow them.
    let service = services(&key).ok_or_else(|| {
        (
            "NoMatchingParent",
            format!("parent Service {key} does not exist"),
        )
    })?;
    if service.cluster_ips.is_empty() {
        return Err((
            "NoMatchingParent",
            format!("parent Service {key} is headless: no address to route"),
        ));
    }
    let http_port = |p: &&super::ServicePortModel| p.protocol != AppProtocol::Tcp;
    let ports: Vec<u16> = match parent.port {
        Some(port) => {
            let port = u16::try_from(port).unwrap_or(0);
            match service.port(port) {
                Some(p) if http_port(&p) => vec![port],
                Some(_) => {
                    return Err((
                        "NoMatchingParent",
                        format!("port {port} of Service {key} is TCP; an HTTPRoute needs HTTP"),
                    ));
                }
                None => {
                    return Err((
                        "NoMatchingParent",
                        format!("Service {key} has no port {port}"),
                    ));
                }
            }
        }
        None => service
            .ports
            .iter()
            .filter(http_port)
            .map(|p| p.port)
            .collect(),
    };
    Ok(Some((key, ports)))
}

/// An unresolved reference: its ResolvedRefs reason and the problem.
type Warning = (&'static str, Problem);

/// Why a route is not accepted: its Accepted reason and the problem.
type Rejection = (&'static str, Problem);

type ResolvedRule = (
    usize,
    Option<String>,
    Vec<RouteMatchModel>,
    RouteActionModel,
);

/// The rules of a route, or why it is rejected; warnings for unresolved backends.
fn resolve_rules<'s>(
    store: &Store,
    route: &HTTPRoute,
    object: &ObjectRef,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> Result<(Vec<ResolvedRule>, Vec<Warning>), Rejection> {
    let reject = |message: String| {
        (
            "UnsupportedValue",
            problem(object, true, "UnsupportedValue", message),
        )
    };
    let default_rule = [HTTPRouteRule::default()];
    let rules: &[HTTPRouteRule] = route.spec.rules.as_deref().unwrap_or(&default_rule);
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let at = |what: &str| format!("spec.rules[{index}].{what}");
        let matches = match rule.matches.as_deref() {
            None | Some([]) => vec![RouteMatchModel {
                path: PathMatch::Prefix("/".into()),
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            }],
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    resolve_match(m)
                        .map_err(|e| reject(format!("{}: {e}", at(&format!("matches[{i}]")))))
                })
                .collect::<Result<_, _>>()?,
        };
        let mut action = RouteActionModel::default();
        for (i, f) in rule.filters.iter().flatten().enumerate() {
            apply_filter(
                store,
                f,
                &matches,
                &mut action,
                object,
                services,
                &mut warnings,
            )
            .map_err(|e| reject(format!("{}: {e}", at(&format!("filters[{i}]")))))?;
        }
        if let Some(t) = &rule.timeouts {
            let parse = |what: &str, v: &Option<String>| {
                v.as_deref()
                    .map(|t| {
                        parse_gateway_duration(t)
                            .map_err(|e| reject(format!("{} {t:?}: {e}", at(what))))
                    })
                    .transpose()
            };
            action.timeout = parse("timeouts.request", &t.request)?.filter(|d| !d.is_zero());
            action.backend_timeout =
                parse("timeouts.backendRequest", &t.backend_request)?.filter(|d| !d.is_zero());
        }
        if let Some(r) = &rule.retry {
            action.retry =
                Some(resolve_retry(r).map_err(|e| reject(format!("{}: {e}", at("retry"))))?);
        }
        for (i, b) in rule.backend_refs.iter().flatten().enumerate() {
            let weight = b.weight.unwrap_or(1);
            let weight = u32::try_from(weight).map_err(|_| {
                reject(format!(
                    "{}: weight {weight} is negative",
                    at("backendRefs")
                ))
            })?;
            let (request_headers, response_headers) = backend_header_changes(b)
                .map_err(|e| reject(format!("{}: {e}", at(&format!("backendRefs[{i}]")))))?;
            if weight == 0 {
                continue;
            }
            match resolve_backend(store, object, &b.backend, services) {
                Ok((service, port)) => action.backends.push(RouteBackend {
                    service: Some(service),
                    port,
                    weight,
                    request_headers,
                    response_headers,
                }),
                Err((reason, message)) => {
                    warnings.push((
                        reason,
                        problem(
                            object,
                            false,
                            reason,
                            format!(
                                "{}: {message}; its share of requests answers 500",
                                at(&format!("backendRefs[{i}]"))
                            ),
                        ),
                    ));
                    action.backends.push(RouteBackend {
                        service: None,
                        port: u16::try_from(b.backend.port.unwrap_or(0)).unwrap_or(0),
                        weight,
                        request_headers,
                        response_headers,
                    });
                }
            }
        }
        out.push((index, rule.name.clone(), matches, action));
    }
    Ok((out, warnings))
}

fn value_matches(
    list: &Option<Vec<HTTPValueMatch>>,
    lower: bool,
) -> Result<Vec<ValueMatch>, String> {
    let mut out = Vec::new();
    for v in list.iter().flatten() {
        let regex = match v.type_.as_deref().unwrap_or("Exact") {
            "Exact" => false,
            "RegularExpression" => {
                check_regex(&v.value)?;
                true
            }
            other => return Err(format!("match type {other:?} is not supported")),
        };
        out.push(ValueMatch {
            name: if lower {
                v.name.to_ascii_lowercase()
            } else {
                v.name.clone()
            },
            value: v.value.clone(),
            regex,
        });
    }
    Ok(out)
}

fn check_regex(pattern: &str) -> Result<(), String> {
    regex_syntax::Parser::new()
        .parse(pattern)
        .map(|_| ())
        .map_err(|e| format!("{pattern:?} is not a valid regex: {e}"))
}

fn resolve_match(m: &HTTPRouteMatch) -> Result<RouteMatchModel, String> {
    let value = m
        .path
        .as_ref()
        .and_then(|p| p.value.clone())
        .unwrap_or_else(|| "/".into());
    let path = match m
        .path
        .as_ref()
        .and_then(|p| p.type_.as_deref())
        .unwrap_or("PathPrefix")
    {
        "Exact" => {
            if !value.starts_with('/') {
                return Err(format!("path {value:?} does not start with /"));
            }
            PathMatch::Exact(value)
        }
        "PathPrefix" => {
            if !value.starts_with('/') {
                return Err(format!("path {value:?} does not start with /"));
            }
            // `/foo/` and `/foo` select the same segments.
            let trimmed = value.trim_end_matches('/');
            PathMatch::Prefix(if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.into()
            })
        }
        "RegularExpression" => {
            check_regex(&value)?;
            PathMatch::Regex(value)
        }
        other => return Err(format!("path match type {other:?} is not supported")),
    };
    Ok(RouteMatchModel {
        path,
        method: m.method.clone(),
        headers: value_matches(&m.headers, true)?,
        query: value_matches(&m.query_params, false)?,
    })
}

/// A rule's `retry`: codes 400-599 (Envoy retries any listed code), attempts ≥ 0.
fn resolve_retry(r: &weft_crds::gateway::HTTPRouteRetry) -> Result<RetryModel, String> {
    let codes = r
        .codes
        .iter()
        .flatten()
        .map(|&c| {
            u32::try_from(c)
                .ok()
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| format!("code {c} is not between 400 and 599"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let attempts = match r.attempts {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(a) => u32::try_from(a).map_err(|_| format!("attempts {a} is negative"))?,
    };
    let backoff = r
        .backoff
        .as_deref()
        .map(|b| parse_gateway_duration(b).map_err(|e| format!("backoff {b:?}: {e}")))
        .transpose()?;
    Ok(RetryModel {
        codes,
        attempts,
        backoff,
        per_try_timeout: None,
    })
}

/// Retries when a `retry` names no attempts (GEP-1731 leaves it to the implementation).
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;

/// A backend's own filters: header modifiers only (the others act on the whole
/// request, before a backend is picked).
fn backend_header_changes(
    b: &weft_crds::gateway::HTTPBackendRef,
) -> Result<(HeaderChanges, HeaderChanges), String> {
    let mut request = HeaderChanges::default();
    let mut response = HeaderChanges::default();
    for (i, f) in b.filters.iter().flatten().enumerate() {
        let missing = || format!("filters[{i}]: filter {} has no configuration", f.type_);
        match f.type_.as_str() {
            "RequestHeaderModifier" => header_changes(
                f.request_header_modifier.as_ref().ok_or_else(missing)?,
                &mut request,
            ),
            "ResponseHeaderModifier" => header_changes(
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
                &mut response,
            ),
            other => {
                return Err(format!(
                    "filters[{i}]: {other:?} is not supported on a backend (only header modifiers)"
                ));
            }
        }
    }
    Ok((request, response))
}

fn header_changes(f: &HTTPHeaderFilter, into: &mut HeaderChanges) {
    let pairs = |l: &Option<Vec<weft_crds::gateway::HTTPHeader>>| {
        l.iter()
            .flatten()
            .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
            .collect::<Vec<_>>()
    };
    into.set.extend(pairs(&f.set));
    into.add.extend(pairs(&f.add));
    into.remove
        .extend(f.remove.iter().flatten().map(|h| h.to_ascii_lowercase()));
}

fn path_change(m: &HTTPPathModifier, matches: &[RouteMatchModel]) -> Result<PathChange, String> {
    match m.type_.as_str() {
        "ReplaceFullPath" => Ok(PathChange::Full(
            m.replace_full_path.clone().unwrap_or_else(|| "/".into()),
        )),
        "ReplacePrefixMatch" => {
            if !matches
                .iter()
                .all(|m| matches!(m.path, PathMatch::Prefix(_)))
            {
                return Err("ReplacePrefixMatch needs PathPrefix matches".into());
            }
            Ok(PathChange::Prefix(
                m.replace_prefix_match.clone().unwrap_or_else(|| "/".into()),
            ))
        }
        other => Err(format!("path modifier {other:?} is not supported")),
    }
}

fn apply_filter<'s>(
    store: &Store,
    f: &HTTPRouteFilter,
    matches: &[RouteMatchModel],
    action: &mut RouteActionModel,
    object: &ObjectRef,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
    warnings: &mut Vec<Warning>,
) -> Result<(), String> {
    let missing = || format!("filter {} has no configuration", f.type_);
    match f.type_.as_str() {
        "RequestHeaderModifier" => header_changes(
            f.request_header_modifier.as_ref().ok_or_else(missing)?,
            &mut action.request_headers,
        ),
        "ResponseHeaderModifier" => header_changes(
            f.response_header_modifier.as_ref().ok_or_else(missing)?,
            &mut action.response_headers,
        ),
        "RequestRedirect" => {
            let r = f.request_redirect.as_ref().ok_or_else(missing)?;
            let status = r.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(format!("redirect status {status} is not supported"));
            }
            action.redirect = Some(RedirectModel {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                port: r
                    .port
                    .map(|p| u16::try_from(p).map_err(|_| format!("port {p} is out of range")))
                    .transpose()?,
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_change(p, matches))
                    .transpose()?,
                status: u16::try_from(status).unwrap_or(302),
            });
        }
        "URLRewrite" => {
            let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
            action.rewrite = Some(RewriteModel {
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_change(p, matches))
                    .transpose()?,
            });
        }
        "RequestMirror" => {
            let m = f.request_mirror.as_ref().ok_or_else(missing)?;
            let per_million = match (&m.percent, &m.fraction) {
                (Some(p), _) => u32::try_from(*p).unwrap_or(0).min(100) * 10_000,
                (None, Some(fr)) => {
                    let d = u64::try_from(fr.denominator.unwrap_or(100).max(1)).unwrap_or(100);
                    let n = u64::try_from(fr.numerator).unwrap_or(0).min(d);
                    u32::try_from(n * 1_000_000 / d).unwrap_or(1_000_000)
                }
                (None, None) => 1_000_000,
            };
            match resolve_backend(store, object, &m.backend_ref, services) {
                Ok((service, port)) => action.mirrors.push(MirrorModel {
                    service,
                    port,
                    per_million,
                }),
                Err((reason, message)) => warnings.push((
                    reason,
                    problem(
                        object,
                        false,
                        reason,
                        format!("mirror: {message}; nothing is mirrored"),
                    ),
                )),
            }
        }
        other => return Err(format!("filter {other:?} is not supported")),
    }
    Ok(())
}

/// A backend reference → (service, port), or (reason, message).
fn resolve_backend<'s>(
    store: &Store,
    object: &ObjectRef,
    b: &BackendObjectReference,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> Result<(ServiceKey, u16), (&'static str, String)> {
    if !b.is_service() {
        return Err((
            "InvalidKind",
            format!(
                "backend kind {}/{} is not a Service",
                b.group.as_deref().unwrap_or(""),
                b.kind.as_deref().unwrap_or("Service")
            ),
        ));
    }
    let route_ns = object.namespace.as_str();
    let key = ServiceKey::new(b.namespace.as_deref().unwrap_or(route_ns), &b.name);
    if key.namespace != route_ns && !permitted(store, object, &key) {
        return Err((
            "RefNotPermitted",
            format!(
                "backend Service {key} is in another namespace and no ReferenceGrant there permits {}s from {route_ns}",
                object.kind
            ),
        ));
    }
    let port = b.port.and_then(|p| u16::try_from(p).ok()).ok_or_else(|| {
        (
            "UnsupportedValue",
            format!("backend Service {key} needs a port"),
        )
    })?;
    let service = services(&key).ok_or_else(|| {
        (
            "BackendNotFound",
            format!("backend Service {key} does not exist"),
        )
    })?;
    if service.port(port).is_none() {
        return Err((
            "BackendNotFound",
            format!("backend Service {key} has no port {port}"),
        ));
    }
    Ok((key, port))
}
