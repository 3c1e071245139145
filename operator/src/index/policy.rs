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

/// The settings of one policy, parsed (durations) and checked.
#[derive(Default)]
struct Parsed {
    connection_pool: Option<ConnectionPoolModel>,
    outlier_detection: Option<OutlierDetectionModel>,
    health_check: Option<HealthCheckModel>,
    load_balancer: Option<LoadBalancerModel>,
    fault: Option<FaultModel>,
    retry: Option<RetryModel>,
    timeout: Option<std::time::Duration>,
    rate_limit: Option<RateLimitModel>,
}

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

/// Checks what the CRD's schema checks too (a manifest in local mode meets no API server).
fn parse(spec: &TrafficSettings) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    if let Some(c) = &spec.connection_pool {
        out.connection_pool = Some(ConnectionPoolModel {
            max_connections: c.max_connections,
            max_pending_requests: c.max_pending_requests,
            max_requests: c.max_requests,
            max_retries: c.max_retries,
            max_connection_duration: duration(
                "spec.connectionPool.maxConnectionDuration",
                c.max_connection_duration.as_deref(),
            )?,
        });
    }
    if let Some(o) = &spec.outlier_detection {
        out.outlier_detection = Some(OutlierDetectionModel {
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
        });
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
        out.health_check = Some(HealthCheckModel {
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
        });
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
        out.load_balancer = Some(LoadBalancerModel {
            algorithm: lb.type_,
            hash,
            slow_start: duration(
                "spec.loadBalancer.slowStartWindow",
                lb.slow_start_window.as_deref(),
            )?,
        });
    }
    if let Some(local) = spec.rate_limit.as_ref().and_then(|r| r.local.as_ref()) {
        if local.tokens == 0 {
            return Err("spec.rateLimit.local.tokens must be at least 1".into());
        }
        let interval = duration("spec.rateLimit.local.interval", Some(&local.interval))?
            .filter(|d| !d.is_zero())
            .ok_or("spec.rateLimit.local.interval must be positive")?;
        out.rate_limit = Some(RateLimitModel {
            tokens: local.tokens,
            interval,
            burst: local.burst.unwrap_or(local.tokens).max(1),
        });
    }
    if let Some(f) = &spec.fault_injection {
        out.fault = Some(FaultModel {
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
        });
    }
    if let Some(r) = &spec.retries {
        if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
            return Err(format!(
                "spec.retries.codes: {c} is not between 400 and 599"
            ));
        }
        out.retry = Some(RetryModel {
            codes: r.codes.iter().map(|&c| u32::from(c)).collect(),
            attempts: r.attempts,
            backoff: duration("spec.retries.backoff", r.backoff.as_deref())?,
            per_try_timeout: duration("spec.retries.perTryTimeout", r.per_try_timeout.as_deref())?,
        });
    }
    if let Some(t) = &spec.timeouts {
        out.timeout = duration("spec.timeouts.request", t.request.as_deref())?;
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
    match parse(defaults) {
        Ok(parsed) => (
            Some(PortPolicy {
                connection_pool: parsed.connection_pool.map(|v| sourced_of(source, v)),
                outlier_detection: parsed.outlier_detection.map(|v| sourced_of(source, v)),
                health_check: parsed.health_check.map(|v| sourced_of(source, v)),
                load_balancer: parsed.load_balancer.map(|v| sourced_of(source, v)),
                fault: parsed.fault.map(|v| sourced_of(source, v)),
                retry: parsed.retry.map(|v| sourced_of(source, v)),
                timeout: parsed.timeout.map(|v| sourced_of(source, v)),
                rate_limit: parsed.rate_limit.map(|v| sourced_of(source, v)),
            }),
            Vec::new(),
        ),
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
        let p = out.entry(port).or_default();
        fn fill<T: Clone>(slot: &mut Option<T>, default: &Option<T>) {
            if slot.is_none() {
                slot.clone_from(default);
            }
        }
        fill(&mut p.connection_pool, &d.connection_pool);
        fill(&mut p.outlier_detection, &d.outlier_detection);
        fill(&mut p.health_check, &d.health_check);
        fill(&mut p.load_balancer, &d.load_balancer);
        fill(&mut p.fault, &d.fault);
        fill(&mut p.retry, &d.retry);
        fill(&mut p.timeout, &d.timeout);
        fill(&mut p.rate_limit, &d.rate_limit);
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

/// Sets `slot` from `policy` unless an older policy holds it; returns the field's name
/// when it conflicts.
fn claim<T: Clone>(
    slot: &mut Option<Sourced<T>>,
    value: &Option<T>,
    source: &ObjectRef,
    field: &'static str,
    conflicts: &mut Vec<(&'static str, ObjectRef)>,
) {
    let Some(value) = value else {
        return;
    };
    match slot {
        Some(held) if held.source != *source => conflicts.push((field, held.source.clone())),
        _ => {
            *slot = Some(Sourced {
                source: source.clone(),
                value: value.clone(),
            });
        }
    }
}

/// Every policy's settings on the ports of the services it targets, oldest policy first.
pub(super) fn resolve_traffic_policies<'s>(
    store: &Store,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> (PoliciesByService, Vec<Problem>) {
    let mut policies: Vec<&TrafficPolicy> = store.traffic_policies.values().collect();
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
        let parsed = match parse(&policy.spec.settings) {
            Ok(p) => p,
            Err(e) => {
                problems.push(problem(true, format!("Invalid: {e}")));
                continue;
            }
        };
        let mut missing = Vec::new();
        let mut conflicts = Vec::new();
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
                let before = conflicts.len();
                claim(
                    &mut slot.connection_pool,
                    &parsed.connection_pool,
                    &source,
                    "connectionPool",
                    &mut conflicts,
                );
                claim(
                    &mut slot.outlier_detection,
                    &parsed.outlier_detection,
                    &source,
                    "outlierDetection",
                    &mut conflicts,
                );
                claim(
                    &mut slot.health_check,
                    &parsed.health_check,
                    &source,
                    "healthCheck",
                    &mut conflicts,
                );
                claim(
                    &mut slot.load_balancer,
                    &parsed.load_balancer,
                    &source,
                    "loadBalancer",
                    &mut conflicts,
                );
                claim(
                    &mut slot.fault,
                    &parsed.fault,
                    &source,
                    "faultInjection",
                    &mut conflicts,
                );
                claim(
                    &mut slot.retry,
                    &parsed.retry,
                    &source,
                    "retries",
                    &mut conflicts,
                );
                claim(
                    &mut slot.timeout,
                    &parsed.timeout,
                    &source,
                    "timeouts",
                    &mut conflicts,
                );
                claim(
                    &mut slot.rate_limit,
                    &parsed.rate_limit,
                    &source,
                    "rateLimit",
                    &mut conflicts,
                );

                let new: Vec<String> = conflicts
                    .drain(before..)
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
