//! TrafficPolicy resolution: each policy's fields land on the ports of the Services it
//! targets; when two policies set the same field of the same port, the older keeps it
//! and the newer is reported as conflicted (GEP-713). A policy whose fields do not
//! parse, or whose targets do not exist, is reported and applies nowhere (or only to
//! the targets that exist).

use std::collections::BTreeMap;

use weft_crds::TrafficPolicy;
use weft_crds::policy::{HashSource, LoadBalancerType, TrafficSettings};

use super::model::{
    ConnectionPoolModel, FaultModel, HashModel, HealthCheckModel, LoadBalancerModel, MeshService,
    OutlierDetectionModel, PortPolicy, Problem, RateLimitModel, RetryModel, ServiceKey, Sourced,
};
use super::resolve::{creation_order, parse_gateway_duration};
use super::store::{Store, key_of};
use super::{Kind, ObjectRef};

/// Policies by service and port.
pub(super) type PoliciesByService = BTreeMap<ServiceKey, BTreeMap<u16, PortPolicy>>;

fn duration(field: &str, value: Option<&str>) -> Result<Option<std::time::Duration>, String> {
    value
        .map(|v| parse_gateway_duration(v).map_err(|e| format!("{field} {v:?}: {e}")))
        .transpose()
}

fn percent(field: &str, value: u32) -> Result<u32, String> {
    if value > 100 {
        return Err(format!("{field} {value} is above 100"));
    }
    Ok(value)
}

/// The settings of `source` (a TrafficPolicy or the MeshConfig), parsed and each marked
/// with it. Checks what the CRD's schema checks too (a manifest in local mode meets no
/// API server).
fn parse(spec: &TrafficSettings, source: &ObjectRef) -> Result<PortPolicy, String> {
    let mut out = PortPolicy::default();
    if let Some(c) = &spec.connection_pool {
        out.connection_pool = Some(sourced_of(
            source,
            ConnectionPoolModel {
                max_connections: c.max_connections,
                max_pending_requests: c.max_pending_requests,
                max_requests: c.max_requests,
                max_retries: c.max_retries,
                max_connection_duration: duration(
                    "spec.connectionPool.maxConnectionDuration",
                    c.max_connection_duration.as_deref(),
                )?,
            },
        ));
    }
    if let Some(o) = &spec.outlier_detection {
        out.outlier_detection = Some(sourced_of(
            source,
            OutlierDetectionModel {
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway_errors: o.consecutive_gateway_errors,
                interval: duration("spec.outlierDetection.interval", o.interval.as_deref())?,
                base_ejection_time: duration(
                    "spec.outlierDetection.baseEjectionTime",
                    o.base_ejection_time.as_deref(),
                )?,
                max_ejection_percent: o
                    .max_ejection_percent
                    .map(|p| percent("spec.outlierDetection.maxEjectionPercent", p))
                    .transpose()?,
            },
        ));
    }
    if let Some(h) = &spec.health_check {
        let http = match (&h.http, &h.tcp) {
            (Some(http), None) => {
                if !http.path.starts_with('/') {
                    return Err(format!(
                        "spec.healthCheck.http.path {:?} must start with /",
                        http.path
                    ));
                }
                Some((http.path.clone(), http.expected_statuses.clone()))
            }
            (None, Some(_)) => None,
            _ => return Err("spec.healthCheck: exactly one of http or tcp".into()),
        };
        out.health_check = Some(sourced_of(
            source,
            HealthCheckModel {
                http,
                interval: duration("spec.healthCheck.interval", h.interval.as_deref())?
                    .unwrap_or(std::time::Duration::from_secs(10)),
                timeout: duration("spec.healthCheck.timeout", h.timeout.as_deref())?
                    .unwrap_or(std::time::Duration::from_secs(1)),
                healthy_threshold: h.healthy_threshold.unwrap_or(1).max(1),
                unhealthy_threshold: h.unhealthy_threshold.unwrap_or(2).max(1),
                panic_threshold: h
                    .panic_threshold
                    .map(|p| percent("spec.healthCheck.panicThreshold", p))
                    .transpose()?,
            },
        ));
    }
    if let Some(lb) = &spec.load_balancer {
        let hashing = matches!(
            lb.type_,
            LoadBalancerType::RingHash | LoadBalancerType::Maglev
        );
        let hash = match (&lb.hash, hashing) {
            (None, false) => None,
            (Some(h), true) => Some(hash_source(h)?),
            (None, true) => {
                return Err(format!(
                    "spec.loadBalancer: {:?} needs a hash source",
                    lb.type_
                ));
            }
            (Some(_), false) => {
                return Err(format!(
                    "spec.loadBalancer.hash: only RingHash and Maglev hash, not {:?}",
                    lb.type_
                ));
            }
        };
        out.load_balancer = Some(sourced_of(
            source,
            LoadBalancerModel {
                algorithm: lb.type_,
                hash,
                slow_start: duration(
                    "spec.loadBalancer.slowStartWindow",
                    lb.slow_start_window.as_deref(),
                )?,
            },
        ));
    }
    if let Some(local) = spec.rate_limit.as_ref().and_then(|r| r.local.as_ref()) {
        if local.tokens == 0 {
            return Err("spec.rateLimit.local.tokens must be at least 1".into());
        }
        let interval = duration("spec.rateLimit.local.interval", Some(&local.interval))?
            .filter(|d| !d.is_zero())
            .ok_or("spec.rateLimit.local.interval must be positive")?;
        out.rate_limit = Some(sourced_of(
            source,
            RateLimitModel {
                tokens: local.tokens,
                interval,
                burst: local.burst.unwrap_or(local.tokens).max(1),
            },
        ));
    }
    if let Some(f) = &spec.fault_injection {
        out.fault = Some(sourced_of(source, FaultModel {
            delay: f
                .delay
                .as_ref()
                .map(|d| {
                    Ok::<_, String>((
                        percent("spec.faultInjection.delay.percent", d.percent)?,
                        duration("spec.faultInjection.delay.fixedDelay", Some(&d.fixed_delay))?
                            .unwrap_or_default(),
                    ))
                })
                .transpose()?,
            abort: f
                .abort
                .as_ref()
                .map(|a| {
                    if !(200..=599).contains(&a.http_status) {
                        return Err(format!(
                            "spec.faultInjection.abort.httpStatus {} is not between 200 and 599",
                            a.http_status
                        ));
                    }
                    Ok((
                        percent("spec.faultInjection.abort.percent", a.percent)?,
                        a.http_status,
                    ))
                })
                .transpose()?,
        }));
    }
    if let Some(r) = &spec.retries {
        if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
            return Err(format!(
                "spec.retries.codes: {c} is not between 400 and 599"
            ));
        }
        out.retry = Some(sourced_of(
            source,
            RetryModel {
                codes: r.codes.iter().map(|&c| u32::from(c)).collect(),
                attempts: r.attempts,
                backoff: duration("spec.retries.backoff", r.backoff.as_deref())?,
                per_try_timeout: duration(
                    "spec.retries.perTryTimeout",
                    r.per_try_timeout.as_deref(),
                )?,
            },
        ));
    }
    if let Some(t) = &spec.timeouts {
        out.timeout =
            duration("spec.timeouts.request", t.request.as_deref())?.map(|d| sourced_of(source, d));
    }
    Ok(out)
}

/// Services some TrafficPolicy targets (in its namespace).
pub(super) fn policy_references(store: &Store) -> std::collections::BTreeSet<ServiceKey> {
    store
        .traffic_policies
        .iter()
        .flat_map(|((ns, _), p)| {
            p.spec
                .target_refs
                .iter()
                .map(move |t| ServiceKey::new(ns, &t.name))
        })
        .collect()
}

/// The MeshConfig's `trafficDefaults` as port settings (each field sourced from the
/// MeshConfig), or why they cannot be used.
pub(super) fn mesh_defaults(
    settings: Option<&super::MeshSettings>,
) -> (Option<PortPolicy>, Vec<Problem>) {
    let Some((source, defaults)) =
        settings.and_then(|s| Some((&s.source, s.spec.traffic_defaults.as_ref()?)))
    else {
        return (None, Vec::new());
    };
    match parse(defaults, source) {
        Ok(policy) => (Some(policy), Vec::new()),
        Err(e) => (
            None,
            vec![Problem {
                object: source.clone(),
                rejected: false,
                reason: format!("spec.trafficDefaults: {e}; no mesh-wide defaults apply"),
            }],
        ),
    }
}

fn sourced_of<T>(source: &ObjectRef, value: T) -> Sourced<T> {
    Sourced {
        source: source.clone(),
        value,
    }
}

/// A service's policies with the mesh-wide defaults filling every field no policy sets,
/// on each of `ports`.
pub(super) fn with_defaults(
    policies: Option<&BTreeMap<u16, PortPolicy>>,
    ports: impl Iterator<Item = u16>,
    defaults: Option<&PortPolicy>,
) -> BTreeMap<u16, PortPolicy> {
    let mut out = policies.cloned().unwrap_or_default();
    let Some(d) = defaults else {
        return out;
    };
    for port in ports {
        // A field a policy set keeps it: the default only fills the rest.
        fill(out.entry(port).or_default(), d);
    }
    out
}

fn hash_source(h: &HashSource) -> Result<HashModel, String> {
    match (&h.header, &h.cookie, h.source_ip) {
        (Some(header), None, None | Some(false)) => {
            Ok(HashModel::Header(header.to_ascii_lowercase()))
        }
        (None, Some(cookie), None | Some(false)) => Ok(HashModel::Cookie(cookie.clone())),
        (None, None, Some(true)) => Ok(HashModel::SourceIp),
        _ => Err("spec.loadBalancer.hash: exactly one of header, cookie or sourceIP".into()),
    }
}

/// Fills every field of `into` that nothing set yet from `from`; returns the fields
/// another object already holds (the holder keeps them), with that holder.
fn fill(into: &mut PortPolicy, from: &PortPolicy) -> Vec<(&'static str, ObjectRef)> {
    fn one<T: Clone>(
        slot: &mut Option<Sourced<T>>,
        value: &Option<Sourced<T>>,
        field: &'static str,
        held_elsewhere: &mut Vec<(&'static str, ObjectRef)>,
    ) {
        let Some(value) = value else {
            return;
        };
        match slot {
            Some(held) if held.source != value.source => {
                held_elsewhere.push((field, held.source.clone()));
            }
            _ => *slot = Some(value.clone()),
        }
    }
    let mut held = Vec::new();
    one(
        &mut into.connection_pool,
        &from.connection_pool,
        "connectionPool",
        &mut held,
    );
    one(
        &mut into.outlier_detection,
        &from.outlier_detection,
        "outlierDetection",
        &mut held,
    );
    one(
        &mut into.health_check,
        &from.health_check,
        "healthCheck",
        &mut held,
    );
    one(
        &mut into.load_balancer,
        &from.load_balancer,
        "loadBalancer",
        &mut held,
    );
    one(&mut into.fault, &from.fault, "faultInjection", &mut held);
    one(&mut into.retry, &from.retry, "retries", &mut held);
    one(&mut into.timeout, &from.timeout, "timeouts", &mut held);
    one(
        &mut into.rate_limit,
        &from.rate_limit,
        "rateLimit",
        &mut held,
    );
    held
}

/// Every policy's settings on the ports of the services it targets, oldest policy first.
pub(super) fn resolve_traffic_policies<'s>(
    store: &Store,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> (PoliciesByService, Vec<Problem>) {
    let mut policies: Vec<&TrafficPolicy> = store.traffic_policies.values().map(|p| &**p).collect();
    policies.sort_by_key(|p| creation_order(&p.metadata));
    let mut out = PoliciesByService::new();
    let mut problems = Vec::new();
    for policy in policies {
        let (namespace, name) = key_of(&policy.metadata);
        let source = ObjectRef::new(Kind::TrafficPolicy, &namespace, &name);
        let problem = |rejected: bool, reason: String| Problem {
            object: source.clone(),
            rejected,
            reason,
        };
        let parsed = match parse(&policy.spec.settings, &source) {
            Ok(p) => p,
            Err(e) => {
                problems.push(problem(true, format!("Invalid: {e}")));
                continue;
            }
        };
        let mut missing = Vec::new();
        let mut applied = false;
        for (i, target) in policy.spec.target_refs.iter().enumerate() {
            if !target.group.is_empty() || target.kind != "Service" {
                missing.push(format!(
                    "spec.targetRefs[{i}]: {}/{} is not a Service",
                    target.group, target.kind
                ));
                continue;
            }
            let key = ServiceKey::new(&namespace, &target.name);
            let Some(service) = services(&key) else {
                missing.push(format!(
                    "spec.targetRefs[{i}]: Service {key} does not exist"
                ));
                continue;
            };
            let ports: Vec<u16> = service
                .ports
                .iter()
                .filter(|p| target.section_name.as_ref().is_none_or(|s| *s == p.name))
                .map(|p| p.port)
                .collect();
            if ports.is_empty() {
                missing.push(format!(
                    "spec.targetRefs[{i}]: Service {key} has no port named {:?}",
                    target.section_name.as_deref().unwrap_or_default()
                ));
                continue;
            }
            applied = true;
            for port in ports {
                let slot = out.entry(key.clone()).or_default().entry(port).or_default();
                let held = fill(slot, &parsed);
                let new: Vec<String> = held
                    .into_iter()
                    .map(|(field, winner)| format!("{field} of Service {key} port {port} is set by the older {winner}, which keeps it"))
                    .collect();
                if !new.is_empty() {
                    problems.push(problem(false, format!("Conflicted: {}", new.join("; "))));
                }
            }
        }
        if !missing.is_empty() {
            problems.push(problem(
                !applied,
                format!("TargetNotFound: {}", missing.join("; ")),
            ));
        }
    }
    (out, problems)
}
