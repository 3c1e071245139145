//! Resolution of input objects into the parts of a [`MeshModel`], one entity at a
//! time (a service, a pod, the splits, the access grants, the mesh settings), so the
//! index recomputes only what a change touches. Invalid objects become [`Problem`]s
//! and never affect valid ones.

use super::model::{RateLimitModel, Sourced};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_crds::{MeshConfig, TrafficSplit, annotations};

use super::access::{
    KnownAccounts, Routes, TargetResolution, http_matches, resolve_access, resolve_target,
};
use super::model::{
    AppProtocol, EgressEntry, EgressScope, GrantsByDestination, MeshService, MeshSettings,
    ProbeForward, Problem, ProtocolSource, ServiceEndpoint, ServiceKey, ServicePortModel,
    SplitBackend, SplitModel, Workload, WorkloadPort,
};
use super::protocol::select_protocol;
use super::store::{Key, Store, key_of, name, ns, selects};
use super::{Kind, MeshPod, ObjectRef};

/// Label or annotation that opts a pod out of the mesh when set to `disabled`.
const INJECT_KEY: &str = annotations::INJECT;

/// Sort key: oldest first, then namespace/name, so the winner of a conflict is stable.
/// An object without a creation time (a hand-written manifest) counts as the newest.
pub(super) fn creation_order(
    meta: &ObjectMeta,
) -> (bool, Option<k8s_openapi::jiff::Timestamp>, String, String) {
    let created = meta.creation_timestamp.as_ref().map(|t| t.0);
    (
        created.is_none(),
        created,
        ns(meta).to_string(),
        name(meta).to_string(),
    )
}

/// The MeshConfig in effect (the oldest) and problems: the others are rejected, and an
/// unparsable detection timeout is dropped with a warning.
pub(super) fn resolve_mesh_config(store: &Store) -> (Option<MeshSettings>, Vec<Problem>) {
    let mut configs: Vec<&MeshConfig> = store.mesh_configs.values().map(|c| &**c).collect();
    configs.sort_by_key(|c| creation_order(&c.metadata));
    let mut configs = configs.into_iter();
    let mut problems = Vec::new();
    let Some(first) = configs.next() else {
        return (None, problems);
    };
    let source = ObjectRef::new(Kind::MeshConfig, "", name(&first.metadata));
    for other in configs {
        problems.push(Problem {
            object: ObjectRef::new(Kind::MeshConfig, "", name(&other.metadata)),
            rejected: true,
            reason: format!(
                "{source} is already in effect; a mesh has one MeshConfig (the oldest applies)"
            ),
        });
    }
    let mut spec = first.spec.clone();
    if let Some(text) = &spec.protocol_detection_timeout
        && let Err(reason) = parse_gateway_duration(text)
    {
        problems.push(Problem {
            object: source.clone(),
            rejected: false,
            reason: format!(
                "spec.protocolDetectionTimeout {text:?}: {reason}; the default (1s) applies"
            ),
        });
        spec.protocol_detection_timeout = None;
    }
    if let Some(telemetry) = &spec.telemetry {
        let (checked, reasons) = telemetry.checked();
        problems.extend(reasons.into_iter().map(|reason| Problem {
            object: source.clone(),
            rejected: false,
            reason,
        }));
        spec.telemetry = Some(checked);
    }
    (Some(MeshSettings { source, spec }), problems)
}

/// A Gateway API duration (`1h`, `500ms`, `1m30s`: up to four number+unit parts).
pub fn parse_gateway_duration(text: &str) -> Result<std::time::Duration, String> {
    let mut total = std::time::Duration::ZERO;
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err("expected up to five digits followed by h, m, s or ms".into());
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| "not a number".to_string())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (std::time::Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (std::time::Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (std::time::Duration::from_secs(1), 1)
        } else {
            return Err("the unit must be h, m, s or ms".into());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(number).map_err(|_| "too large".to_string())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err("expected one to four number+unit parts, such as 1s or 1m30s".into());
    }
    Ok(total)
}

/// The protocol of a service port (appProtocol, name, well-known service or target port).
fn protocol_of(port: &ServicePort, opaque_ports: &[u16]) -> (AppProtocol, ProtocolSource) {
    let mut numbers: Vec<u16> = to_port(port.port).into_iter().collect();
    if let Some(IntOrString::Int(target)) = &port.target_port {
        numbers.extend(to_port(*target));
    }
    select_protocol(
        port.app_protocol.as_deref(),
        port.name.as_deref(),
        &numbers,
        opaque_ports,
    )
}

fn to_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// How a pod serves, by the EndpointSlice controller's rules: `None` when it does not
/// (finished, no address yet, or not Ready), `Some(true)` when it serves while being
/// deleted (draining), `Some(false)` when it takes new requests.
fn pod_endpoint_state(pod: &MeshPod) -> Option<bool> {
    // A pod without a status has no address to serve at either.
    if pod.finished || pod.ips.is_empty() {
        return None;
    }
    // Manifests written by hand often give only podIP: no Ready condition means ready.
    // The kubelet keeps probing a terminating pod, so Ready then means "still serving".
    let serving = pod.ready.unwrap_or(true);
    serving.then_some(pod.metadata.deletion_timestamp.is_some())
}

/// How an EndpointSlice endpoint serves: `Some(false)` when ready (true, or unset, which
/// the API says to read as ready), `Some(true)` when not ready but serving and
/// terminating (a pod shutting down that still answers: draining), else `None`.
fn slice_endpoint_state(conditions: Option<&EndpointConditions>) -> Option<bool> {
    if conditions.and_then(|c| c.ready).unwrap_or(true) {
        return Some(false);
    }
    let c = conditions?;
    // Controllers older than the serving condition leave it unset; it then equals ready.
    (c.serving.unwrap_or(false) && c.terminating.unwrap_or(false)).then_some(true)
}

/// The endpoints of one port as they are collected: one per address, ready winning
/// when two sources disagree (a pod moving between slices, a stale slice).
#[derive(Default)]
struct PortEndpoints(BTreeMap<SocketAddr, bool>);

impl PortEndpoints {
    fn add(&mut self, addr: SocketAddr, draining: bool) {
        *self.0.entry(addr).or_insert(draining) &= draining;
    }

    /// Sorted by address. With no ready endpoint the draining ones take new requests
    /// (KEP-1669, as kube-proxy does): better a pod on its way out than a 503.
    fn finish(self) -> Vec<ServiceEndpoint> {
        let any_ready = self.0.values().any(|draining| !draining);
        self.0
            .into_iter()
            .map(|(addr, draining)| ServiceEndpoint {
                addr,
                draining: draining && any_ready,
            })
            .collect()
    }
}

/// Whether the pod runs a sidecar (not opted out by label or annotation).
pub(super) fn is_meshed(pod: &MeshPod) -> bool {
    let opted_out = |v: Option<&str>| v == Some("disabled");
    !opted_out(pod.label(INJECT_KEY)) && !opted_out(pod.annotation(INJECT_KEY))
}

/// The pod's address in `family` (IPv6 or not), or its primary one when the family
/// is not known.
fn pod_ip_in(pod: &MeshPod, family: Option<bool>) -> Option<IpAddr> {
    match family {
        Some(v6) => pod.ips.iter().copied().find(|ip| ip.is_ipv6() == v6),
        None => pod.ips.first().copied(),
    }
}

/// The container port a service port reaches on one pod.
fn target_port(port: &ServicePort, pod: &MeshPod) -> Option<u16> {
    match &port.target_port {
        None => to_port(port.port),
        Some(IntOrString::Int(n)) => to_port(*n),
        Some(IntOrString::String(named)) => pod
            .named_ports
            .iter()
            .find(|p| p.name == *named)
            .and_then(|p| to_port(p.container_port)),
    }
}

fn is_tcp_family(port: &ServicePort) -> bool {
    port.protocol.as_deref().is_none_or(|p| p == "TCP")
}

/// A service's model before TrafficSplits and ClusterIP conflicts are applied, or why
/// it is rejected. Endpoints come from its EndpointSlices when it has any, else from
/// the serving pods its selector picks (a deleted pod still serving drains).
pub(super) fn resolve_service_base(
    svc: &Service,
    store: &Store,
    opaque_ports: &[u16],
) -> Result<MeshService, String> {
    let (namespace, svc_name) = key_of(&svc.metadata);
    let key = ServiceKey::new(&namespace, &svc_name);
    let spec = svc.spec.as_ref();
    let cluster_ips = cluster_ips(spec)?;
    // Endpoints come from the primary family, as the EndpointSlice controller's do.
    let family = primary_family(spec, &cluster_ips);
    let slices = store.slices_of(&(namespace.clone(), svc_name));
    let selected: Vec<(&MeshPod, bool)> = if slices.is_empty() {
        store
            .selected_pods(svc)
            .into_iter()
            .filter_map(|p| Some((p, pod_endpoint_state(p)?)))
            .collect()
    } else {
        Vec::new()
    };
    let mut ports = Vec::new();
    for port in spec.iter().flat_map(|s| s.ports.iter().flatten()) {
        let Some(number) = to_port(port.port) else {
            continue;
        };
        if !is_tcp_family(port) {
            continue;
        }
        let endpoints = if slices.is_empty() {
            endpoints_from_pods(port, &selected, family)
        } else {
            endpoints_from_slices(port, &slices, family)
        };
        let (protocol, protocol_source) = protocol_of(port, opaque_ports);
        ports.push(ServicePortModel {
            name: port.name.clone().unwrap_or_default(),
            port: number,
            protocol,
            protocol_source,
            endpoints,
        });
    }
    ports.sort_by_key(|p| p.port);
    ports.dedup_by_key(|p| p.port);
    // Who answers: the pods behind the endpoints, found by address.
    let mut meshed = true;
    let mut service_accounts = BTreeSet::new();
    for ip in ports
        .iter()
        .flat_map(|p| p.endpoints.iter().map(|e| e.addr.ip()))
    {
        match store
            .pods_at(ip)
            .into_iter()
            .find(|p| ns(&p.metadata) == namespace)
        {
            Some(pod) if is_meshed(pod) => {
                service_accounts.insert((namespace.clone(), pod.service_account.clone()));
            }
            _ => meshed = false,
        }
    }
    Ok(MeshService {
        key,
        cluster_ips,
        ports,
        split: None,
        http_routes: BTreeMap::new(),
        meshed,
        service_accounts: service_accounts.into_iter().collect(),
        policies: BTreeMap::new(),
    })
}

/// The endpoint IPs of a service model (the pods behind them decide whether it is meshed).
pub(super) fn endpoint_ips(service: &MeshService) -> BTreeSet<IpAddr> {
    service
        .ports
        .iter()
        .flat_map(|p| p.endpoints.iter().map(|e| e.addr.ip()))
        .collect()
}

/// Which of `claims` (services by creation order, each with its ClusterIPs) win their
/// addresses: oldest first, a service whose address an accepted older one holds is
/// rejected (and claims nothing).
pub(super) fn clusterip_owners<'a>(
    claims: &[(&'a ServiceKey, &'a [IpAddr])],
) -> BTreeMap<&'a ServiceKey, Result<(), (IpAddr, &'a ServiceKey)>> {
    let mut owners: BTreeMap<IpAddr, &ServiceKey> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (key, ips) in claims {
        match ips.iter().find_map(|ip| owners.get(ip).map(|o| (*ip, *o))) {
            Some(taken) => {
                out.insert(*key, Err(taken));
            }
            None => {
                for ip in *ips {
                    owners.insert(*ip, key);
                }
                out.insert(*key, Ok(()));
            }
        }
    }
    out
}

/// `spec.clusterIPs` (or `spec.clusterIP`), primary first; empty when headless.
fn cluster_ips(
    spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>,
) -> Result<Vec<IpAddr>, String> {
    let Some(spec) = spec else {
        return Ok(Vec::new());
    };
    let mut texts: Vec<&str> = spec.cluster_ip.as_deref().into_iter().collect();
    for ip in spec.cluster_ips.iter().flatten() {
        if !texts.contains(&ip.as_str()) {
            texts.push(ip);
        }
    }
    let mut ips = Vec::new();
    for text in texts {
        if text.is_empty() || text == "None" {
            continue;
        }
        let ip = text
            .parse::<IpAddr>()
            .map_err(|_| format!("spec.clusterIP {text:?} is not an IP address"))?;
        if ips
            .iter()
            .any(|other: &IpAddr| other.is_ipv6() == ip.is_ipv6())
        {
            return Err(format!(
                "spec.clusterIPs has two addresses of one family ({ip} and {})",
                ips.iter()
                    .find(|o: &&IpAddr| o.is_ipv6() == ip.is_ipv6())
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ));
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// The service's primary IP family (`Some(true)` for IPv6): `spec.ipFamilies[0]`, else
/// the family of its first ClusterIP; unknown for a headless service without families.
fn primary_family(
    spec: Option<&k8s_openapi::api::core::v1::ServiceSpec>,
    cluster_ips: &[IpAddr],
) -> Option<bool> {
    if let Some(first) = spec
        .and_then(|s| s.ip_families.as_ref())
        .and_then(|f| f.first())
    {
        return Some(first == "IPv6");
    }
    cluster_ips.first().map(IpAddr::is_ipv6)
}

/// A port's endpoints from the serving pods the selector picks (`(pod, draining)`).
fn endpoints_from_pods(
    port: &ServicePort,
    pods: &[(&MeshPod, bool)],
    family: Option<bool>,
) -> Vec<ServiceEndpoint> {
    let mut out = PortEndpoints::default();
    for (pod, draining) in pods {
        if let (Some(ip), Some(target)) = (pod_ip_in(pod, family), target_port(port, pod)) {
            out.add(SocketAddr::new(ip, target), *draining);
        }
    }
    out.finish()
}

/// A port's endpoints from every EndpointSlice of the service in its primary family.
fn endpoints_from_slices(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    family: Option<bool>,
) -> Vec<ServiceEndpoint> {
    let mut out = PortEndpoints::default();
    for slice in slices {
        let slice_v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            // FQDN slices (and unknown types) carry no addresses the mesh can dial.
            _ => continue,
        };
        if family.is_some_and(|v6| v6 != slice_v6) {
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port.name.as_deref().unwrap_or(""))
            .and_then(|p| p.port.and_then(to_port))
        else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(draining) = slice_endpoint_state(ep.conditions.as_ref()) else {
                continue;
            };
            let addresses = ep.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok());
            // An address of the other family in a slice is invalid input: skipped.
            for ip in addresses.filter(|ip| ip.is_ipv6() == slice_v6) {
                out.add(SocketAddr::new(ip, slice_port), draining);
            }
        }
    }
    out.finish()
}

/// The probes the webhook rewrote, from its annotation; HTTPS probes are not forwarded.
fn probe_forwards(pod: &MeshPod, problems: &mut Vec<Problem>) -> Vec<ProbeForward> {
    #[derive(serde::Deserialize)]
    struct Original {
        port: i32,
        path: String,
        #[serde(default)]
        scheme: String,
    }
    let Some(text) = pod.annotation(annotations::ORIGINAL_PROBES) else {
        return Vec::new();
    };
    // An annotation is input too: bounded before it is parsed.
    let parsed =
        weft_crds::bounds::check_json(text.as_bytes(), weft_crds::bounds::MAX_DOCUMENT_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                serde_json::from_str::<BTreeMap<String, Original>>(text).map_err(|e| e.to_string())
            });
    match parsed {
        Ok(originals) => originals
            .into_iter()
            .filter(|(_, o)| o.scheme.is_empty() || o.scheme.eq_ignore_ascii_case("HTTP"))
            .filter_map(|(key, o)| {
                Some(ProbeForward {
                    path: format!("/app-health/{key}"),
                    port: to_port(o.port)?,
                    target_path: o.path,
                })
            })
            .collect(),
        Err(e) => {
            problems.push(Problem {
                object: ObjectRef::new(Kind::Pod, ns(&pod.metadata), name(&pod.metadata)),
                rejected: false,
                reason: format!(
                    "annotation {} is not valid: {e}; kubelet probes are not forwarded",
                    annotations::ORIGINAL_PROBES
                ),
            });
            Vec::new()
        }
    }
}

/// A pod as its sidecar serves it, with problems about it and protocol conflicts
/// between the Services that target it. `services` are the accepted Services
/// selecting it, oldest first: a declared protocol wins over an undeclared one, and
/// when two Services declare different ones the oldest wins (the other is reported).
/// The local rate limit of a service port (service, port number), if a policy sets one.
pub(super) type RateLimitOf<'a> = dyn Fn(&Service, u16) -> Option<Sourced<RateLimitModel>> + 'a;

pub(super) fn resolve_workload(
    pod: &MeshPod,
    services: &[&Service],
    opaque_ports: &[u16],
    rate_limit_of: &RateLimitOf<'_>,
) -> (Workload, Vec<Problem>, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut conflicts = Vec::new();
    let mut inbound: BTreeMap<u16, (AppProtocol, ProtocolSource, &Service)> = BTreeMap::new();
    // The first (oldest) service port targeting a container port with a limit sets it.
    let mut rate_limits: BTreeMap<u16, Sourced<RateLimitModel>> = BTreeMap::new();
    for svc in services.iter().copied().filter(|s| selects(s, pod)) {
        for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if !is_tcp_family(port) {
                continue;
            }
            let Some(target) = target_port(port, pod) else {
                continue;
            };
            let (protocol, source) = protocol_of(port, opaque_ports);
            if let Some(limit) = u16::try_from(port.port)
                .ok()
                .and_then(|p| rate_limit_of(svc, p))
            {
                rate_limits.entry(target).or_insert(limit);
            }
            match inbound.get(&target) {
                None => {
                    inbound.insert(target, (protocol, source, svc));
                }
                Some((p, _, _)) if *p == AppProtocol::Detect && protocol != AppProtocol::Detect => {
                    inbound.insert(target, (protocol, source, svc));
                }
                Some((p, _, owner)) if *p != protocol && protocol != AppProtocol::Detect => {
                    conflicts.push(Problem {
                        object: ObjectRef::new(Kind::Service, ns(&svc.metadata), name(&svc.metadata)),
                        rejected: false,
                        reason: format!(
                            "port {} declares {} for target port {target}, but Service {}/{} (older) declares {} for it; pods serve it as {}",
                            port.port,
                            protocol.as_str(),
                            ns(&owner.metadata),
                            name(&owner.metadata),
                            p.as_str(),
                            p.as_str()
                        ),
                    });
                }
                Some(_) => {}
            }
        }
    }
    let workload = Workload {
        namespace: ns(&pod.metadata).to_string(),
        name: name(&pod.metadata).to_string(),
        ips: pod.ips.clone(),
        service_account: pod.service_account.clone(),
        meshed: is_meshed(pod),
        inbound_ports: inbound
            .into_iter()
            .map(|(port, (protocol, protocol_source, _))| WorkloadPort {
                port,
                protocol,
                protocol_source,
                rate_limit: rate_limits.remove(&port),
            })
            .collect(),
        probes: probe_forwards(pod, &mut problems),
        egress: egress_scope(pod, &mut problems),
        clusters_on_demand: asks_for_clusters_on_demand(pod, &mut problems),
    };
    (workload, problems, conflicts)
}

/// Whether the pod asks for on-demand clusters; another value is reported and ignored.
fn asks_for_clusters_on_demand(pod: &MeshPod, problems: &mut Vec<Problem>) -> bool {
    match pod.annotation(annotations::OUTBOUND_CLUSTERS) {
        None | Some("all") => false,
        Some("on-demand") => true,
        Some(other) => {
            problems.push(Problem {
                object: ObjectRef::new(Kind::Pod, ns(&pod.metadata), name(&pod.metadata)),
                rejected: false,
                reason: format!(
                    "annotation {} is {other:?}; expected \"on-demand\" or \"all\"; the proxy holds every cluster",
                    annotations::OUTBOUND_CLUSTERS
                ),
            });
            false
        }
    }
}

/// The pod's egress scope from its annotation; bad entries are reported and skipped,
/// and a scope with no good entry is no scope (the whole mesh), never an empty one.
fn egress_scope(pod: &MeshPod, problems: &mut Vec<Problem>) -> Option<EgressScope> {
    let text = pod.annotation(annotations::EGRESS)?;
    let own = ns(&pod.metadata);
    let mut entries = BTreeSet::new();
    let mut bad = Vec::new();
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((namespace, service)) = item.split_once('/') else {
            bad.push(item);
            continue;
        };
        let namespace = match namespace {
            "." => Some(own.to_string()),
            "*" => None,
            n if !n.is_empty() && !n.contains(['/', '*']) => Some(n.to_string()),
            _ => {
                bad.push(item);
                continue;
            }
        };
        let service = match service {
            "*" => None,
            s if !s.is_empty() && !s.contains(['/', '*']) => Some(s.to_string()),
            _ => {
                bad.push(item);
                continue;
            }
        };
        entries.insert(EgressEntry { namespace, service });
    }
    if !bad.is_empty() {
        problems.push(Problem {
            object: ObjectRef::new(Kind::Pod, own, name(&pod.metadata)),
            rejected: false,
            reason: format!(
                "annotation {} has entries that are not NAMESPACE/SERVICE (., * allowed): {}; they are ignored",
                annotations::EGRESS,
                bad.join(", ")
            ),
        });
    }
    (!entries.is_empty()).then(|| EgressScope {
        entries: entries.into_iter().collect(),
    })
}

/// Access grants by destination identity from every TrafficTarget, and problems
/// (invalid targets, and accounts that do not exist yet).
pub(super) fn resolve_grants(
    store: &Store,
    resolved: &mut BTreeMap<Key, TargetResolution>,
) -> (GrantsByDestination, Vec<Problem>) {
    let routes = Routes::new(
        store.route_groups.values().map(|g| &**g),
        store.tcp_routes.values().map(|t| &**t),
    );
    resolved.retain(|key, _| store.targets.contains_key(key));
    for (key, target) in &store.targets {
        if !resolved.contains_key(key) {
            resolved.insert(key.clone(), resolve_target(target, &routes));
        }
    }
    let accounts = KnownAccounts::new(|account| store.account_exists(account));
    resolve_access(resolved.iter(), &accounts)
}

/// `website`, `website.ns`, `website.ns.svc` or `website.ns.svc.cluster.local` → key.
fn service_ref(split_ns: &str, reference: &str) -> Result<ServiceKey, String> {
    let mut parts = reference.split('.');
    let name = parts.next().unwrap_or_default();
    let namespace = parts.next().unwrap_or(split_ns);
    if name.is_empty() {
        return Err("spec.service is empty".to_string());
    }
    if namespace != split_ns {
        return Err(format!(
            "service {reference:?} is in namespace {namespace:?}; a TrafficSplit only splits services of its own namespace ({split_ns:?})"
        ));
    }
    Ok(ServiceKey::new(split_ns, name))
}

/// Resolves every TrafficSplit against the accepted services: the split of each root
/// service, and problems for invalid splits. Oldest first: only accepted splits
/// constrain later ones, so a newer invalid split never takes out an older valid one.
pub(super) fn resolve_splits<'s>(
    store: &Store,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> (BTreeMap<ServiceKey, SplitModel>, Vec<Problem>) {
    let routes = Routes::new(
        store.route_groups.values().map(|g| &**g),
        store.tcp_routes.values().map(|t| &**t),
    );
    let mut splits: Vec<&TrafficSplit> = store.splits.values().map(|s| &**s).collect();
    splits.sort_by_key(|s| creation_order(&s.metadata));
    let mut accepted = AcceptedSplits::default();
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for split in splits {
        let object = ObjectRef::new(
            Kind::TrafficSplit,
            ns(&split.metadata),
            name(&split.metadata),
        );
        match resolve_split(split, &object, &accepted, &routes, services) {
            Ok((root, resolved, warnings)) => {
                problems.extend(warnings.into_iter().map(|reason| Problem {
                    object: object.clone(),
                    rejected: false,
                    reason,
                }));
                accepted.roots.insert(root.clone(), object.clone());
                for backend in resolved.backends_by_port.values().flatten() {
                    accepted
                        .backends
                        .insert(backend.service.clone(), object.clone());
                }
                out.insert(root, resolved);
            }
            Err(reason) => problems.push(Problem {
                object,
                rejected: true,
                reason,
            }),
        }
    }
    (out, problems)
}

/// Every service a TrafficSplit names (root and backends), existing or not.
pub(super) fn split_references(store: &Store) -> BTreeSet<ServiceKey> {
    let mut out = BTreeSet::new();
    for split in store.splits.values() {
        let split_ns = ns(&split.metadata);
        let names = std::iter::once(&split.spec.service)
            .chain(split.spec.backends.iter().map(|b| &b.service));
        out.extend(names.filter_map(|r| service_ref(split_ns, r).ok()));
    }
    out
}

/// Roots and backends of the splits accepted so far, with the split that claims them.
#[derive(Default)]
struct AcceptedSplits {
    roots: BTreeMap<ServiceKey, ObjectRef>,
    backends: BTreeMap<ServiceKey, ObjectRef>,
}

type ResolvedSplit = (ServiceKey, SplitModel, Vec<String>);

fn resolve_split<'s>(
    split: &TrafficSplit,
    object: &ObjectRef,
    accepted: &AcceptedSplits,
    routes: &Routes<'_>,
    services: &dyn Fn(&ServiceKey) -> Option<&'s MeshService>,
) -> Result<ResolvedSplit, String> {
    let split_ns = ns(&split.metadata);
    let root_key = service_ref(split_ns, &split.spec.service)?;
    // Only matching requests are split; all route groups named are merged.
    let mut matches = Vec::new();
    for m in &split.spec.matches {
        if m.kind != "HTTPRouteGroup" {
            return Err(format!(
                "spec.matches kind {:?} is not HTTPRouteGroup",
                m.kind
            ));
        }
        matches.extend(http_matches(routes, split_ns, &m.name, &[])?);
    }
    let root =
        services(&root_key).ok_or_else(|| format!("root service {root_key} does not exist"))?;
    if let Some(other) = accepted.roots.get(&root_key) {
        return Err(format!(
            "service {root_key} is already split by {other}; only one TrafficSplit per root service applies"
        ));
    }
    if let Some(other) = accepted.backends.get(&root_key) {
        return Err(format!(
            "root service {root_key} is a backend of {other}; splits are not hierarchical"
        ));
    }
    let mut warnings = Vec::new();
    let mut backends = Vec::new();
    for b in &split.spec.backends {
        let key = service_ref(split_ns, &b.service)?;
        if key == root_key {
            return Err(format!(
                "backend {key} is the root service itself; a split cannot reference its root"
            ));
        }
        if let Some(other) = accepted.roots.get(&key) {
            return Err(format!(
                "backend {key} is the root of {other}; splits are not hierarchical"
            ));
        }
        let weight = u32::try_from(b.weight)
            .map_err(|_| format!("backend {key} has invalid weight {}", b.weight))?;
        match services(&key) {
            Some(svc) => backends.push((svc, weight)),
            None if weight == 0 => {}
            None => warnings.push(format!(
                "backend service {key} does not exist; it receives no traffic"
            )),
        }
    }
    let mut by_port = BTreeMap::new();
    for port in &root.ports {
        let mut list = Vec::new();
        for (svc, weight) in &backends {
            if svc.port(port.port).is_none() {
                warnings.push(format!(
                    "backend {} has no port {}; it receives no traffic for {}:{}",
                    svc.key, port.port, root_key.name, port.port
                ));
                continue;
            }
            list.push(SplitBackend {
                service: svc.key.clone(),
                weight: *weight,
            });
        }
        if list.iter().any(|b| b.weight > 0) {
            by_port.insert(port.port, list);
        }
    }
    if by_port.is_empty() {
        return Err(format!(
            "no backend with a positive weight serves any port of {root_key}; traffic keeps going to {root_key}"
        ));
    }
    Ok((
        root_key,
        SplitModel {
            source: object.clone(),
            backends_by_port: by_port,
            matches,
        },
        warnings,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test setup fails loudly
mod tests {
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::index::MeshObject;

    /// Conditions as (ready, serving, terminating); `None` leaves a field unset.
    type Conds = (Option<bool>, Option<bool>, Option<bool>);

    const READY: Conds = (Some(true), Some(true), Some(false));
    const DRAINING: Conds = (Some(false), Some(true), Some(true));
    const GONE: Conds = (Some(false), Some(false), Some(true));
    const NOT_READY: Conds = (Some(false), Some(false), Some(false));

    fn mk_slice(name: &str, address_type: &str, endpoints: &[(&str, Conds)]) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_string(),
                    "web".to_string(),
                )])),
                ..Default::default()
            },
            address_type: address_type.into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(address, (ready, serving, terminating))| Endpoint {
                        addresses: vec![(*address).to_string()],
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            serving: *serving,
                            terminating: *terminating,
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    fn mk_port() -> ServicePort {
        ServicePort {
            name: Some("http".into()),
            port: 80,
            target_port: Some(IntOrString::Int(8080)),
            ..Default::default()
        }
    }

    fn mk_service() -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some("198.19.0.1".into()),
                selector: Some(BTreeMap::from([("app".into(), "web".into())])),
                ports: Some(vec![mk_port()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A pod of the `web` service; `ready` sets its Ready condition, `deleted` its
    /// deletionTimestamp.
    fn mk_pod(name: &str, ip: &str, ready: Option<bool>, deleted: bool) -> MeshPod {
        MeshPod::from(Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                deletion_timestamp: deleted.then_some(Time(Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            status: Some(PodStatus {
                pod_ip: Some(ip.into()),
                conditions: ready.map(|r| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: if r { "True" } else { "False" }.into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn ready(addr: &str) -> ServiceEndpoint {
        ServiceEndpoint::ready(addr.parse().unwrap())
    }

    fn draining(addr: &str) -> ServiceEndpoint {
        ServiceEndpoint::draining(addr.parse().unwrap())
    }

    fn from_slices(slices: &[EndpointSlice], family: Option<bool>) -> Vec<ServiceEndpoint> {
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        endpoints_from_slices(&mk_port(), &slices, family)
    }

    /// The endpoints of the `web` service's one port, resolved from `objects`.
    fn resolved(objects: Vec<MeshObject>) -> Vec<ServiceEndpoint> {
        let mut store = Store::default();
        let mut svc = None;
        for o in objects {
            if let MeshObject::Service(s) = &o {
                svc = Some((**s).clone());
            }
            store.insert(o);
        }
        let base = resolve_service_base(&svc.unwrap(), &store, &[]).unwrap();
        base.ports[0].endpoints.clone()
    }

    #[test]
    fn slice_conditions_decide_ready_draining_or_left_out() {
        let unset = (None, None, None);
        let slice = mk_slice(
            "web-a",
            "IPv4",
            &[
                ("198.18.0.5", GONE),
                ("198.18.0.4", NOT_READY),
                ("198.18.0.3", DRAINING),
                ("198.18.0.2", unset),
                ("198.18.0.1", READY),
            ],
        );
        assert_eq!(
            from_slices(&[slice], Some(false)),
            vec![
                ready("198.18.0.1:8080"),
                ready("198.18.0.2:8080"),
                draining("198.18.0.3:8080"),
            ],
            "sorted; unset conditions mean ready; not serving is left out"
        );
    }

    #[test]
    fn terminating_without_a_serving_condition_is_left_out() {
        // Controllers older than `serving` report a terminating pod as not ready only.
        let old = (Some(false), None, Some(true));
        let slice = mk_slice(
            "web-a",
            "IPv4",
            &[("198.18.0.1", READY), ("198.18.0.2", old)],
        );
        assert_eq!(
            from_slices(&[slice], Some(false)),
            vec![ready("198.18.0.1:8080")]
        );
    }

    #[test]
    fn slices_merge_without_doubling_and_ready_wins_over_draining() {
        let a = mk_slice(
            "web-a",
            "IPv4",
            &[("198.18.0.1", READY), ("198.18.0.2", DRAINING)],
        );
        let b = mk_slice(
            "web-b",
            "IPv4",
            &[
                ("198.18.0.1", READY),
                ("198.18.0.2", READY),
                ("198.18.0.3", DRAINING),
            ],
        );
        let expected = vec![
            ready("198.18.0.1:8080"),
            ready("198.18.0.2:8080"),
            draining("198.18.0.3:8080"),
        ];
        assert_eq!(from_slices(&[a.clone(), b.clone()], Some(false)), expected);
        assert_eq!(
            from_slices(&[b, a], Some(false)),
            expected,
            "the order of slices does not matter"
        );
    }

    #[test]
    fn with_no_ready_endpoint_draining_ones_take_new_requests() {
        let a = mk_slice(
            "web-a",
            "IPv4",
            &[
                ("198.18.0.1", DRAINING),
                ("198.18.0.2", NOT_READY),
                ("198.18.0.3", DRAINING),
            ],
        );
        assert_eq!(
            from_slices(&[a], Some(false)),
            vec![ready("198.18.0.1:8080"), ready("198.18.0.3:8080")]
        );
        let none = mk_slice("web-a", "IPv4", &[("198.18.0.2", NOT_READY)]);
        assert!(from_slices(&[none], Some(false)).is_empty());
    }

    #[test]
    fn slices_of_another_family_and_fqdn_slices_are_ignored() {
        let v4 = mk_slice("web-a", "IPv4", &[("198.18.0.1", DRAINING)]);
        let v6 = mk_slice("web-b", "IPv6", &[("fd00::1", READY)]);
        let fqdn = mk_slice("web-c", "FQDN", &[("web.example.com", READY)]);
        let mixed = mk_slice("web-d", "IPv4", &[("fd00::2", READY)]);
        assert_eq!(
            from_slices(&[v4.clone(), v6.clone(), fqdn.clone()], Some(false)),
            vec![ready("198.18.0.1:8080")],
            "the IPv6 slice's ready endpoint does not keep the IPv4 one draining"
        );
        assert_eq!(
            from_slices(&[v4, v6, fqdn, mixed], Some(true)),
            vec![ready("[fd00::1]:8080")],
            "an IPv6 address in an IPv4 slice is skipped"
        );
    }

    #[test]
    fn slices_win_over_pods_and_keep_their_conditions() {
        let objects = vec![
            MeshObject::Service(std::sync::Arc::new(mk_service())),
            MeshObject::Pod(std::sync::Arc::new(mk_pod(
                "web-0",
                "198.18.0.9",
                None,
                false,
            ))),
            MeshObject::EndpointSlice(std::sync::Arc::new(mk_slice(
                "web-a",
                "IPv4",
                &[("198.18.0.1", READY), ("198.18.0.2", DRAINING)],
            ))),
        ];
        assert_eq!(
            resolved(objects),
            vec![ready("198.18.0.1:8080"), draining("198.18.0.2:8080")]
        );
    }

    #[test]
    fn deleted_pods_that_still_serve_drain() {
        let service = || MeshObject::Service(std::sync::Arc::new(mk_service()));
        let pod = |name, ip, ready, deleted| {
            MeshObject::Pod(std::sync::Arc::new(mk_pod(name, ip, ready, deleted)))
        };
        let objects = vec![
            service(),
            pod("web-0", "198.18.0.1", None, false),
            pod("web-1", "198.18.0.2", Some(true), true),
            pod("web-2", "198.18.0.3", Some(false), true),
            pod("web-3", "198.18.0.4", Some(false), false),
        ];
        assert_eq!(
            resolved(objects),
            vec![ready("198.18.0.1:8080"), draining("198.18.0.2:8080")]
        );
        let objects = vec![
            service(),
            pod("web-1", "198.18.0.2", None, true),
            pod("web-3", "198.18.0.4", Some(false), false),
        ];
        assert_eq!(
            resolved(objects),
            vec![ready("198.18.0.2:8080")],
            "the last pod serving takes new requests while it is deleted"
        );
    }
}
