//! Gateway API HTTPRoute entries → Envoy routes of a service port (GAMMA).
//!
//! - matches: path `Exact` → `path`, `PathPrefix` → `path_separated_prefix` (whole
//!   segments; `/` → `prefix`), `RegularExpression` → `safe_regex`; headers, query
//!   parameters and the method as header / query matchers;
//! - filters: header modifiers → `request_headers_to_add/remove` and the response ones,
//!   `RequestRedirect` → a redirect action, `URLRewrite` → host and path rewrites,
//!   `RequestMirror` → mirror policies;
//! - backends: weighted clusters; an unresolved backend is a cluster that does not exist,
//!   answered with 500 (`cluster_not_found_response_code`), and a rule without backends
//!   answers 500 outright, as the Gateway API says;
//! - timeouts: `request` → the route timeout, `backendRequest` → the per-try timeout.

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, RuntimeFractionalPercent, header_value_option,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route,
    RouteAction, RouteMatch, WeightedCluster, header_matcher, query_parameter_matcher,
    redirect_action, retry_policy, route, route_action, route_match, weighted_cluster,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatchAndSubstitute, RegexMatcher, StringMatcher, string_matcher,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent};

use super::envoy::{protobuf_duration, u32_value};
use super::http::no_timeout;
use super::outbound_cluster_name;
use crate::index::{
    HeaderChanges, HttpRouteEntry, PathChange, PathMatch, RetryModel, RouteActionModel,
    RouteMatchModel, ValueMatch,
};

/// The cluster an unresolved backend's share goes to: it never exists, so Envoy answers
/// with the route's `cluster_not_found_response_code` (500).
pub const INVALID_BACKEND_CLUSTER: &str = "weft-invalid-backend";

const RETRY_ON: &str = "connect-failure,refused-stream,reset-before-request";
const RETRIES: u32 = 2;

fn string_match(v: &ValueMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(if v.regex {
            string_matcher::MatchPattern::SafeRegex(RegexMatcher {
                regex: v.value.clone(),
                ..Default::default()
            })
        } else {
            string_matcher::MatchPattern::Exact(v.value.clone())
        }),
        ..Default::default()
    }
}

fn header_matcher(name: &str, value: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(value)),
        ..Default::default()
    }
}

fn route_match(m: &RouteMatchModel) -> RouteMatch {
    let path_specifier = match &m.path {
        PathMatch::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
        PathMatch::Prefix(p) if p == "/" => route_match::PathSpecifier::Prefix("/".into()),
        PathMatch::Prefix(p) => route_match::PathSpecifier::PathSeparatedPrefix(p.clone()),
        PathMatch::Regex(r) => route_match::PathSpecifier::SafeRegex(RegexMatcher {
            regex: r.clone(),
            ..Default::default()
        }),
    };
    let mut headers: Vec<HeaderMatcher> = Vec::new();
    if let Some(method) = &m.method {
        headers.push(header_matcher(
            ":method",
            string_match(&ValueMatch {
                name: ":method".into(),
                value: method.clone(),
                regex: false,
            }),
        ));
    }
    headers.extend(
        m.headers
            .iter()
            .map(|h| header_matcher(&h.name, string_match(h))),
    );
    RouteMatch {
        path_specifier: Some(path_specifier),
        headers,
        query_parameters: m
            .query
            .iter()
            .map(|q| QueryParameterMatcher {
                name: q.name.clone(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        string_match(q),
                    ),
                ),
            })
            .collect(),
        ..Default::default()
    }
}

fn header_options(changes: &HeaderChanges) -> Vec<HeaderValueOption> {
    let option = |(k, v): &(String, String), action| HeaderValueOption {
        header: Some(HeaderValue {
            key: k.clone(),
            value: v.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    changes
        .set
        .iter()
        .map(|h| {
            option(
                h,
                header_value_option::HeaderAppendAction::OverwriteIfExistsOrAdd,
            )
        })
        .chain(changes.add.iter().map(|h| {
            option(
                h,
                header_value_option::HeaderAppendAction::AppendIfExistsOrAdd,
            )
        }))
        .collect()
}

fn regex_rewrite(pattern: String, substitution: String) -> RegexMatchAndSubstitute {
    RegexMatchAndSubstitute {
        pattern: Some(RegexMatcher {
            regex: pattern,
            ..Default::default()
        }),
        substitution,
    }
}

/// How a path change applies to a request matched by `m`: a prefix rewrite, or a regex.
enum PathRewrite {
    Prefix(String),
    Regex(RegexMatchAndSubstitute),
}

fn path_rewrite(change: &PathChange, m: &RouteMatchModel) -> PathRewrite {
    match change {
        PathChange::Full(path) => PathRewrite::Regex(regex_rewrite("^/.*$".into(), path.clone())),
        PathChange::Prefix(replacement) => {
            let prefix = match &m.path {
                PathMatch::Prefix(p) => p.as_str(),
                _ => "/",
            };
            let trimmed = replacement.trim_end_matches('/');
            if prefix == "/" {
                // `/x` with prefix `/` replaced by `/new` is `/new/x`.
                PathRewrite::Regex(regex_rewrite("^/".into(), format!("{trimmed}/")))
            } else if trimmed.is_empty() {
                // Replaced by `/`: `/prefix/x` → `/x`, `/prefix` → `/`.
                PathRewrite::Regex(regex_rewrite(
                    format!("^{}/*", regex::escape(prefix)),
                    "/".into(),
                ))
            } else {
                PathRewrite::Prefix(trimmed.to_string())
            }
        }
    }
}

fn redirect(entry: &HttpRouteEntry) -> Option<RedirectAction> {
    let r = entry.action.redirect.as_ref()?;
    use redirect_action::RedirectResponseCode as Code;
    let response_code = match r.status {
        301 => Code::MovedPermanently,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::Found,
    };
    let path_rewrite_specifier = r
        .path
        .as_ref()
        .map(|p| match path_rewrite(p, &entry.r#match) {
            PathRewrite::Prefix(p) => redirect_action::PathRewriteSpecifier::PrefixRewrite(p),
            PathRewrite::Regex(r) => redirect_action::PathRewriteSpecifier::RegexRewrite(r),
        });
    let path_rewrite_specifier = match (&r.path, path_rewrite_specifier) {
        (Some(PathChange::Full(p)), _) => Some(
            redirect_action::PathRewriteSpecifier::PathRedirect(p.clone()),
        ),
        (_, other) => other,
    };
    // A scheme change without a port goes to the new scheme's default port.
    let port_redirect = match (r.port, r.scheme.as_deref()) {
        (Some(p), _) => u32::from(p),
        (None, Some("https")) => 443,
        (None, Some("http")) => 80,
        (None, _) => 0,
    };
    Some(RedirectAction {
        host_redirect: r.hostname.clone().unwrap_or_default(),
        port_redirect,
        response_code: response_code as i32,
        scheme_rewrite_specifier: r
            .scheme
            .clone()
            .map(redirect_action::SchemeRewriteSpecifier::SchemeRedirect),
        path_rewrite_specifier,
        ..Default::default()
    })
}

fn destination(action: &RouteActionModel) -> route_action::ClusterSpecifier {
    let name = |b: &crate::index::RouteBackend| match &b.service {
        Some(s) => outbound_cluster_name(s, b.port),
        None => INVALID_BACKEND_CLUSTER.to_string(),
    };
    let own_headers = |b: &crate::index::RouteBackend| {
        !b.request_headers.is_empty() || !b.response_headers.is_empty()
    };
    // A backend's own header filters need a weighted entry to live on, even alone.
    if let [only] = action.backends.as_slice()
        && !own_headers(only)
    {
        return route_action::ClusterSpecifier::Cluster(name(only));
    }
    route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
        clusters: action
            .backends
            .iter()
            .map(|b| weighted_cluster::ClusterWeight {
                name: name(b),
                weight: Some(u32_value(b.weight)),
                request_headers_to_add: header_options(&b.request_headers),
                request_headers_to_remove: b.request_headers.remove.clone(),
                response_headers_to_add: header_options(&b.response_headers),
                response_headers_to_remove: b.response_headers.remove.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// The mesh retries refused and reset connections; a `retry` (an HTTPRoute rule's or a
/// TrafficPolicy's default) adds its status codes, and sets the number of retries and
/// the backoff.
pub(super) fn retry_policy(
    retry: Option<&RetryModel>,
    backend_timeout: Option<std::time::Duration>,
) -> RetryPolicy {
    let mut policy = RetryPolicy {
        retry_on: RETRY_ON.to_string(),
        num_retries: Some(u32_value(RETRIES)),
        per_try_timeout: retry
            .and_then(|r| r.per_try_timeout)
            .or(backend_timeout)
            .map(protobuf_duration),
        ..Default::default()
    };
    if let Some(retry) = retry {
        if !retry.codes.is_empty() {
            policy.retry_on.push_str(",retriable-status-codes");
            policy.retriable_status_codes = retry.codes.clone();
        }
        policy.num_retries = Some(u32_value(retry.attempts));
        policy.retry_back_off = retry.backoff.map(|b| retry_policy::RetryBackOff {
            base_interval: Some(protobuf_duration(b)),
            ..Default::default()
        });
    }
    policy
}

fn forward(entry: &HttpRouteEntry) -> route::Action {
    let action = &entry.action;
    if action.backends.is_empty() {
        return route::Action::DirectResponse(DirectResponseAction {
            status: 500,
            ..Default::default()
        });
    }
    let mut out = RouteAction {
        cluster_specifier: Some(destination(action)),
        cluster_not_found_response_code:
            route_action::ClusterNotFoundResponseCode::InternalServerError as i32,
        retry_policy: Some(retry_policy(action.retry.as_ref(), action.backend_timeout)),
        timeout: action.timeout.map(protobuf_duration).or_else(no_timeout),
        request_mirror_policies: action
            .mirrors
            .iter()
            .map(|m| route_action::RequestMirrorPolicy {
                cluster: outbound_cluster_name(&m.service, m.port),
                runtime_fraction: (m.per_million < 1_000_000).then(|| RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: m.per_million,
                        denominator: fractional_percent::DenominatorType::Million as i32,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    if let Some(rewrite) = &action.rewrite {
        if let Some(host) = &rewrite.hostname {
            out.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(host.clone()),
            );
        }
        match rewrite
            .path
            .as_ref()
            .map(|p| path_rewrite(p, &entry.r#match))
        {
            Some(PathRewrite::Prefix(p)) => out.prefix_rewrite = p,
            Some(PathRewrite::Regex(r)) => out.regex_rewrite = Some(r),
            None => {}
        }
    }
    route::Action::Route(out)
}

/// The Envoy routes of one service port's HTTPRoute entries (already in precedence
/// order). A request no entry matches gets 404, as a Gateway answers it.
pub fn http_route_routes(entries: &[HttpRouteEntry]) -> Vec<Route> {
    entries
        .iter()
        .map(|e| {
            let name = match &e.rule_name {
                Some(rule) => format!("{}/{}/{rule}", e.source.namespace, e.source.name),
                None => format!("{}/{}/rule-{}", e.source.namespace, e.source.name, e.rule),
            };
            Route {
                name,
                r#match: Some(route_match(&e.r#match)),
                action: Some(match redirect(e) {
                    Some(r) => route::Action::Redirect(r),
                    None => forward(e),
                }),
                request_headers_to_add: header_options(&e.action.request_headers),
                request_headers_to_remove: e.action.request_headers.remove.clone(),
                response_headers_to_add: header_options(&e.action.response_headers),
                response_headers_to_remove: e.action.response_headers.remove.clone(),
                ..Default::default()
            }
        })
        .collect()
}
