//! SMI access control: TrafficTargets resolved against HTTPRouteGroups and TCPRoutes
//! into grants per destination identity. Policy only grants; anything invalid is
//! rejected with a reason and grants nothing.

use std::collections::{BTreeMap, BTreeSet};

use weft_crds::{HTTPRouteGroup, IdentityBinding, TCPRoute, TrafficTarget};

use super::model::{
    AccessGrant, GrantsByDestination, HttpRequestMatch, Identity, Problem, TcpGrant,
};
use super::{Kind, ObjectRef};

const SERVICE_ACCOUNT: &str = "ServiceAccount";

fn meta_ns(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn meta_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// Whether a service account exists (an object, or a pod running as it, or `default`).
pub(super) struct KnownAccounts<'a>(Box<dyn Fn(&Identity) -> bool + 'a>);

impl<'a> KnownAccounts<'a> {
    /// Accounts `exists` says exist.
    pub fn new(exists: impl Fn(&Identity) -> bool + 'a) -> Self {
        Self(Box::new(exists))
    }

    fn contains(&self, account: &(String, String)) -> bool {
        (self.0)(account)
    }
}

/// Route objects of the mesh by (namespace, name).
#[derive(Default)]
pub(super) struct Routes<'a> {
    pub http: BTreeMap<(String, String), &'a HTTPRouteGroup>,
    pub tcp: BTreeMap<(String, String), &'a TCPRoute>,
}

impl<'a> Routes<'a> {
    pub fn new(
        http: impl IntoIterator<Item = &'a HTTPRouteGroup>,
        tcp: impl IntoIterator<Item = &'a TCPRoute>,
    ) -> Self {
        let key = |m| (meta_ns(m).to_string(), meta_name(m).to_string());
        Self {
            http: http.into_iter().map(|g| (key(&g.metadata), g)).collect(),
            tcp: tcp.into_iter().map(|r| (key(&r.metadata), r)).collect(),
        }
    }
}

/// Checks the syntax only: Envoy compiles the pattern (RE2), and building a matcher
/// here would cost more than the rest of resolving a TrafficTarget.
fn check_regex(what: &str, pattern: &str) -> Result<(), String> {
    regex_syntax::Parser::new()
        .parse(pattern)
        .map(|_| ())
        .map_err(|e| format!("{what} {pattern:?} is not a valid regex: {e}"))
}

/// The request matches of an HTTPRouteGroup; `names` selects entries (empty: all).
pub(super) fn http_matches(
    routes: &Routes<'_>,
    namespace: &str,
    group: &str,
    names: &[String],
) -> Result<Vec<HttpRequestMatch>, String> {
    let g = routes
        .http
        .get(&(namespace.to_string(), group.to_string()))
        .ok_or_else(|| format!("HTTPRouteGroup {namespace}/{group} does not exist"))?;
    for name in names {
        if !g.spec.matches.iter().any(|m| &m.name == name) {
            return Err(format!(
                "HTTPRouteGroup {namespace}/{group} has no match named {name:?}"
            ));
        }
    }
    let mut out = Vec::new();
    for m in g
        .spec
        .matches
        .iter()
        .filter(|m| names.is_empty() || names.contains(&m.name))
    {
        if let Some(path) = &m.path_regex {
            check_regex(&format!("{group}/{}: pathRegex", m.name), path)?;
        }
        for (header, value) in &m.headers {
            check_regex(&format!("{group}/{}: header {header}", m.name), value)?;
        }
        let any_method = m.methods.is_empty() || m.methods.iter().any(|x| x == "*");
        out.push(HttpRequestMatch {
            path_regex: m.path_regex.clone(),
            methods: if any_method {
                Vec::new()
            } else {
                m.methods.iter().map(|x| x.to_ascii_uppercase()).collect()
            },
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
        });
    }
    Ok(out)
}

fn identity(
    target_ns: &str,
    binding: &IdentityBinding,
    role: &str,
) -> Result<(String, String), String> {
    if binding.kind != SERVICE_ACCOUNT {
        return Err(format!(
            "{role} kind is {:?}; only ServiceAccount is supported",
            binding.kind
        ));
    }
    Ok((
        binding
            .namespace
            .clone()
            .unwrap_or_else(|| target_ns.to_string()),
        binding.name.clone(),
    ))
}

/// What one TrafficTarget grants, to which destination identity, or why it is invalid.
pub(super) type TargetResolution = Result<((String, String), AccessGrant), String>;

/// Resolves one TrafficTarget against the route groups of its namespace.
pub(super) fn resolve_target(target: &TrafficTarget, routes: &Routes<'_>) -> TargetResolution {
    let ns = meta_ns(&target.metadata);
    let destination = identity(ns, &target.spec.destination, "destination")?;
    let sources: BTreeSet<(String, String)> = target
        .spec
        .sources
        .iter()
        .map(|s| identity(ns, s, "source"))
        .collect::<Result<_, _>>()?;
    if sources.is_empty() {
        return Err("no sources".to_string());
    }
    let port = match target.spec.destination.port {
        None => None,
        Some(p) => {
            Some(u16::try_from(p).map_err(|_| format!("destination port {p} is out of range"))?)
        }
    };
    let mut http = Vec::new();
    let mut tcp = if target.spec.rules.is_empty() {
        TcpGrant::AllPorts
    } else {
        TcpGrant::None
    };
    for rule in &target.spec.rules {
        match rule.kind.as_str() {
            "HTTPRouteGroup" => http.extend(http_matches(routes, ns, &rule.name, &rule.matches)?),
            "TCPRoute" => {
                let route = routes
                    .tcp
                    .get(&(ns.to_string(), rule.name.clone()))
                    .ok_or_else(|| format!("TCPRoute {ns}/{} does not exist", rule.name))?;
                let ports: Vec<u16> = route
                    .spec
                    .matches
                    .ports
                    .iter()
                    .map(|p| {
                        u16::try_from(*p).map_err(|_| {
                            format!("TCPRoute {}: port {p} is out of range", rule.name)
                        })
                    })
                    .collect::<Result<_, _>>()?;
                tcp = match (tcp, ports.is_empty()) {
                    (TcpGrant::AllPorts, _) | (_, true) => TcpGrant::AllPorts,
                    (TcpGrant::Ports(mut have), false) => {
                        have.extend(ports);
                        have.sort_unstable();
                        have.dedup();
                        TcpGrant::Ports(have)
                    }
                    (TcpGrant::None, false) => TcpGrant::Ports(ports),
                };
            }
            other => {
                return Err(format!(
                    "rule kind {other:?} is not HTTPRouteGroup or TCPRoute"
                ));
            }
        }
    }
    http.sort();
    http.dedup();
    let grant = AccessGrant {
        source: ObjectRef::new(Kind::TrafficTarget, ns, meta_name(&target.metadata)),
        sources: sources.into_iter().collect(),
        port,
        http,
        tcp,
    };
    Ok((destination, grant))
}

/// Warnings for service accounts a valid target names that do not exist (yet): most
/// often a typo, which would otherwise only show as 403s.
fn missing_accounts(
    destination: &(String, String),
    grant: &AccessGrant,
    accounts: &KnownAccounts,
) -> Vec<String> {
    let mut out = Vec::new();
    if !accounts.contains(destination) {
        out.push(format!(
            "destination ServiceAccount {}/{} does not exist (no ServiceAccount object, no pod runs as it); this target protects nothing yet",
            destination.0, destination.1
        ));
    }
    for source in grant.sources.iter().filter(|s| !accounts.contains(s)) {
        out.push(format!(
            "source ServiceAccount {}/{} does not exist (no ServiceAccount object, no pod runs as it); it is granted access once it does",
            source.0, source.1
        ));
    }
    out
}

/// Gathers resolved TrafficTargets (by namespace and name) into grants by destination
/// identity; invalid ones become problems.
pub(super) fn resolve_access<'t>(
    targets: impl IntoIterator<Item = (&'t (String, String), &'t TargetResolution)>,
    accounts: &KnownAccounts<'_>,
) -> (GrantsByDestination, Vec<Problem>) {
    let mut grants = GrantsByDestination::new();
    let mut problems = Vec::new();
    for ((namespace, name), resolution) in targets {
        let object = ObjectRef::new(Kind::TrafficTarget, namespace, name);
        match resolution.clone() {
            Ok((destination, grant)) => {
                for reason in missing_accounts(&destination, &grant, accounts) {
                    problems.push(Problem {
                        object: object.clone(),
                        rejected: false,
                        reason,
                    });
                }
                grants.entry(destination).or_default().push(grant);
            }
            Err(reason) => problems.push(Problem {
                object,
                rejected: true,
                reason,
            }),
        }
    }
    for list in grants.values_mut() {
        list.sort_by(|a, b| a.source.cmp(&b.source));
    }
    (grants, problems)
}
