//! Authorization on a proxy's inbound side: SMI grants as Envoy RBAC filters.
//!
//! Each RBAC has at most one policy: protobuf maps are encoded in hash order, so one
//! entry keeps the bytes (and so the version) stable. A grant's sources and the
//! requests they may make stay paired inside that policy's principals.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::listener::v3::Filter;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac,
};
use envoy_types::pb::envoy::config::route::v3::{HeaderMatcher, header_matcher};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac as HttpRbac, RbacPerRoute};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpFilter;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher,
};

use envoy_types::pb::google::protobuf::Any;

use super::envoy::{any, network_filter};
use crate::identity::spiffe_id;
use crate::index::{AccessGrant, HttpRequestMatch};

const POLICY: &str = "smi-traffic-targets";

/// A regex that must match the whole value.
fn full_regex(regex: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: regex.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// SMI path regexes are anchored at the start of the path only.
pub fn path_prefix_regex(path_regex: &str) -> String {
    format!("(?:{path_regex}).*")
}

/// `GET|HEAD` as one regex for the `:method` pseudo-header.
pub fn methods_regex(methods: &[String]) -> String {
    methods
        .iter()
        .map(|m| regex::escape(m))
        .collect::<Vec<_>>()
        .join("|")
}

fn header(name: &str, value: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(value)),
        ..Default::default()
    }
}

/// The header conditions of an SMI match (methods and headers), for routes and RBAC.
pub fn request_headers(m: &HttpRequestMatch) -> Vec<HeaderMatcher> {
    let mut out = Vec::new();
    if !m.methods.is_empty() {
        out.push(header(":method", full_regex(&methods_regex(&m.methods))));
    }
    out.extend(
        m.headers
            .iter()
            .map(|(name, value)| header(name, full_regex(value))),
    );
    out
}

fn and_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        0 => Principal {
            identifier: Some(principal::Identifier::Any(true)),
        },
        1 => ids.into_iter().next().unwrap_or_default(),
        _ => Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set { ids })),
        },
    }
}

fn or_ids(ids: Vec<Principal>) -> Principal {
    match ids.len() {
        1 => ids.into_iter().next().unwrap_or_default(),
        _ => Principal {
            identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
        },
    }
}

fn sources(grant: &AccessGrant, trust_domain: &str) -> Principal {
    or_ids(
        grant
            .sources
            .iter()
            .map(|(ns, sa)| Principal {
                identifier: Some(principal::Identifier::Authenticated(
                    principal::Authenticated {
                        principal_name: Some(StringMatcher {
                            match_pattern: Some(string_matcher::MatchPattern::Exact(spiffe_id(
                                trust_domain,
                                ns,
                                sa,
                            ))),
                            ..Default::default()
                        }),
                    },
                )),
            })
            .collect(),
    )
}

fn request(m: &HttpRequestMatch) -> Principal {
    let mut ids = Vec::new();
    if let Some(path) = &m.path_regex {
        ids.push(Principal {
            identifier: Some(principal::Identifier::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(full_regex(&path_prefix_regex(
                    path,
                )))),
            })),
        });
    }
    ids.extend(request_headers(m).into_iter().map(|h| Principal {
        identifier: Some(principal::Identifier::Header(h)),
    }));
    and_ids(ids)
}

fn applies(grant: &AccessGrant, port: Option<u16>) -> bool {
    match (grant.port, port) {
        (Some(want), Some(port)) => want == port,
        _ => true,
    }
}

fn rules(principals: Vec<Principal>) -> Rbac {
    let mut policies = HashMap::new();
    if !principals.is_empty() {
        policies.insert(
            POLICY.to_string(),
            Policy {
                permissions: vec![Permission {
                    rule: Some(permission::Rule::Any(true)),
                }],
                principals,
                ..Default::default()
            },
        );
    }
    Rbac {
        action: rbac::Action::Allow as i32,
        policies,
        ..Default::default()
    }
}

/// Name of Envoy's HTTP RBAC filter (also the key of its per-route config).
pub const HTTP_RBAC_FILTER: &str = "envoy.filters.http.rbac";

/// The HTTP RBAC filter as the listener carries it: deny everything. Each route
/// replaces the rules with its own (`http_rbac_per_route`), so authorization changes
/// over RDS, per request, without touching the listener.
pub fn http_rbac_deny_all() -> HttpFilter {
    super::envoy::http_filter(
        HTTP_RBAC_FILTER,
        &HttpRbac {
            rules: Some(rules(Vec::new())),
            ..Default::default()
        },
    )
}

/// Per-route RBAC for an HTTP port: a request passes if some grant's sources include
/// the caller and (for HTTPRouteGroup rules) the request matches.
pub fn http_rbac_per_route(grants: &[AccessGrant], port: u16, trust_domain: &str) -> Any {
    let mut principals = Vec::new();
    for grant in grants.iter().filter(|g| applies(g, Some(port))) {
        if grant.tcp.covers(port) {
            principals.push(sources(grant, trust_domain));
            continue;
        }
        if grant.http.is_empty() {
            continue;
        }
        let requests = or_ids(grant.http.iter().map(request).collect());
        principals.push(and_ids(vec![sources(grant, trust_domain), requests]));
    }
    any(&RbacPerRoute {
        rbac: Some(HttpRbac {
            rules: Some(rules(principals)),
            ..Default::default()
        }),
    })
}

/// Per-route RBAC of permissive access: every caller passes. Permissive and
/// deny-by-default differ only in routes, so switching modes applies to the next
/// request on every open connection, like a TrafficTarget change.
pub fn http_rbac_per_route_allow_all() -> Any {
    any(&RbacPerRoute {
        rbac: Some(HttpRbac {
            rules: Some(rules(vec![Principal {
                identifier: Some(principal::Identifier::Any(true)),
            }])),
            ..Default::default()
        }),
    })
}

/// The network RBAC filter for a TCP port (or, with `port` None, any port no service
/// exposes): a connection passes if a grant allows its source that port whole.
pub fn network_rbac_filter(
    grants: &[AccessGrant],
    port: Option<u16>,
    trust_domain: &str,
    stat_prefix: &str,
) -> Filter {
    let principals = grants
        .iter()
        .filter(|g| applies(g, port))
        .filter(|g| match port {
            Some(p) => g.tcp.covers(p),
            None => g.tcp == crate::index::TcpGrant::AllPorts,
        })
        .map(|g| sources(g, trust_domain))
        .collect();
    network_filter(
        "envoy.filters.network.rbac",
        &NetworkRbac {
            rules: Some(rules(principals)),
            stat_prefix: stat_prefix.to_string(),
            ..Default::default()
        },
    )
}
