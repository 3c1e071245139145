//! Resolves input objects into a [`MeshModel`]; invalid objects become [`Problem`]s
//! and never affect valid ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_crds::{HTTPRouteGroup, MeshConfig, TCPRoute, TrafficSplit, TrafficTarget, annotations};

use super::access::{KnownAccounts, Routes, http_matches, resolve_access};

use super::model::{
    AppProtocol, MeshModel, MeshService, MeshSettings, ProbeForward, Problem, ProtocolSource,
    ServiceKey, ServicePortModel, SplitBackend, SplitModel, Workload, WorkloadPort,
};
use super::protocol::select_protocol;
use super::{Kind, MeshObject, ObjectRef};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label or annotation that opts a pod out of the mesh when set to `disabled`.
const INJECT_KEY: &str = annotations::INJECT;

#[derive(Default)]
struct Inputs<'a> {
    services: Vec<&'a Service>,
    pods: Vec<&'a Pod>,
    slices: Vec<&'a EndpointSlice>,
    splits: Vec<&'a TrafficSplit>,
    targets: Vec<&'a TrafficTarget>,
    route_groups: Vec<&'a HTTPRouteGroup>,
    tcp_routes: Vec<&'a TCPRoute>,
    service_accounts: Vec<&'a ServiceAccount>,
    mesh_configs: Vec<&'a MeshConfig>,
    /// Pods by IP: endpoints are matched back to the pods behind them.
    pods_by_ip: HashMap<IpAddr, Vec<&'a Pod>>,
    /// Ports the MeshConfig in effect adds to the well-known opaque ports.
    opaque_ports: Vec<u16>,
}

fn ns(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn name(meta: &ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

/// Sort key: oldest first, then namespace/name, so the winner of a conflict is stable.
/// An object without a creation time (a hand-written manifest) counts as the newest.
fn creation_order(
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

/// Builds the model from every object in the index.
pub(super) fn resolve<'a>(objects: impl Iterator<Item = &'a MeshObject>) -> MeshModel {
    let mut inputs = Inputs::default();
    for o in objects {
        match o {
            MeshObject::Service(s) => inputs.services.push(s),
            MeshObject::Pod(p) => inputs.pods.push(p),
            MeshObject::EndpointSlice(e) => inputs.slices.push(e),
            MeshObject::TrafficSplit(t) => inputs.splits.push(t),
            MeshObject::TrafficTarget(t) => inputs.targets.push(t),
            MeshObject::HTTPRouteGroup(g) => inputs.route_groups.push(g),
            MeshObject::TCPRoute(r) => inputs.tcp_routes.push(r),
            MeshObject::ServiceAccount(a) => inputs.service_accounts.push(a),
            MeshObject::MeshConfig(c) => inputs.mesh_configs.push(c),
        }
    }
    for pod in &inputs.pods {
        for ip in pod_ips(pod) {
            inputs.pods_by_ip.entry(ip).or_default().push(pod);
        }
    }
    let mut model = MeshModel::default();
    // First: the MeshConfig decides which undeclared ports are opaque.
    resolve_mesh_config(&inputs.mesh_configs, &mut model);
    inputs.opaque_ports = model
        .settings
        .as_ref()
        .map(|s| s.spec.opaque_ports.clone())
        .unwrap_or_default();
    // Oldest first, so when two services claim one ClusterIP the newer one is rejected.
    let mut services = inputs.services.clone();
    services.sort_by_key(|s| creation_order(&s.metadata));
    let mut ip_owners: BTreeMap<IpAddr, ServiceKey> = BTreeMap::new();
    for svc in services {
        let Some(service) = resolve_service(svc, &inputs, &mut model.problems) else {
            continue;
        };
        if let Some((ip, owner)) = service
            .cluster_ips
            .iter()
            .find_map(|ip| ip_owners.get(ip).map(|owner| (ip, owner)))
        {
            model.problems.push(Problem {
                object: ObjectRef::new(Kind::Service, &service.key.namespace, &service.key.name),
                rejected: true,
                reason: format!("clusterIP {ip} is already used by Service {owner}"),
            });
            continue;
        }
        for ip in &service.cluster_ips {
            ip_owners.insert(*ip, service.key.clone());
        }
        model.services.insert(service.key.clone(), service);
    }
    // Services that decide inbound protocols: accepted ones, oldest first.
    let mut deciding: Vec<&Service> = inputs
        .services
        .iter()
        .copied()
        .filter(|s| {
            model
                .services
                .contains_key(&ServiceKey::new(ns(&s.metadata), name(&s.metadata)))
        })
        .collect();
    deciding.sort_by_key(|s| creation_order(&s.metadata));
    let mut conflicts = BTreeSet::new();
    for pod in &inputs.pods {
        let workload =
            resolve_workload(pod, &deciding, &inputs, &mut conflicts, &mut model.problems);
        model.workloads.insert(workload.node_id(), workload);
    }
    model.problems.extend(conflicts);
    let routes = Routes::new(&inputs.route_groups, &inputs.tcp_routes);
    resolve_splits(&inputs.splits, &routes, &mut model);
    let accounts = known_accounts(&inputs);
    resolve_access(&inputs.targets, &routes, &accounts, &mut model);
    model.problems.sort();
    model
}

/// Service accounts that exist: declared as objects, or run as by a pod (`default`
/// exists in every namespace, as the API server creates it).
fn known_accounts(inputs: &Inputs<'_>) -> KnownAccounts {
    let mut accounts = KnownAccounts::default();
    for sa in &inputs.service_accounts {
        accounts.insert(ns(&sa.metadata), name(&sa.metadata));
    }
    for pod in &inputs.pods {
        accounts.insert(ns(&pod.metadata), &pod_service_account(pod));
    }
    accounts
}

/// The oldest MeshConfig applies; any other is rejected, naming the one in effect.
fn resolve_mesh_config(configs: &[&MeshConfig], model: &mut MeshModel) {
    let mut configs = configs.to_vec();
    configs.sort_by_key(|c| creation_order(&c.metadata));
    let mut configs = configs.into_iter();
    let Some(first) = configs.next() else {
        return;
    };
    let source = ObjectRef::new(Kind::MeshConfig, "", name(&first.metadata));
    for other in configs {
        model.problems.push(Problem {
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
        model.problems.push(Problem {
            object: source.clone(),
            rejected: false,
            reason: format!(
                "spec.protocolDetectionTimeout {text:?}: {reason}; the default (1s) applies"
            ),
        });
        spec.protocol_detection_timeout = None;
    }
    model.settings = Some(MeshSettings { source, spec });
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

fn is_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let Some(status) = &pod.status else {
        return false;
    };
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return false;
    }
    // Manifests written by hand often give only podIP: no Ready condition means ready.
    status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True")
}

fn is_meshed(pod: &Pod) -> bool {
    let opted_out = |m: &Option<BTreeMap<String, String>>| {
        m.as_ref()
            .and_then(|m| m.get(INJECT_KEY))
            .is_some_and(|v| v == "disabled")
    };
    !opted_out(&pod.metadata.labels) && !opted_out(&pod.metadata.annotations)
}

fn pod_service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// The pod's IPs, primary first: `status.podIPs`, or `status.podIP` alone.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .into_iter()
        .collect();
    for ip in status.pod_ips.iter().flatten() {
        if let Ok(ip) = ip.ip.parse::<IpAddr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

/// The pod's address in `family` (IPv6 or not), or its primary one when the family
/// is not known.
fn pod_ip_in(pod: &Pod, family: Option<bool>) -> Option<IpAddr> {
    let ips = pod_ips(pod);
    match family {
        Some(v6) => ips.into_iter().find(|ip| ip.is_ipv6() == v6),
        None => ips.into_iter().next(),
    }
}

fn selects(svc: &Service, pod: &Pod) -> bool {
    if ns(&svc.metadata) != ns(&pod.metadata) {
        return false;
    }
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    !selector.is_empty()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The container port a service port reaches on one pod.
fn target_port(port: &ServicePort, pod: &Pod) -> Option<u16> {
    match &port.target_port {
        None => to_port(port.port),
        Some(IntOrString::Int(n)) => to_port(*n),
        Some(IntOrString::String(named)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(named.as_str()))
            .and_then(|p| to_port(p.container_port)),
    }
}

fn is_tcp_family(port: &ServicePort) -> bool {
    port.protocol.as_deref().is_none_or(|p| p == "TCP")
}

fn resolve_service(
    svc: &Service,
    inputs: &Inputs<'_>,
    problems: &mut Vec<Problem>,
) -> Option<MeshService> {
    let key = ServiceKey::new(ns(&svc.metadata), name(&svc.metadata));
    let object = ObjectRef::new(Kind::Service, &key.namespace, &key.name);
    if key.name.is_empty() {
        return None;
    }
    let spec = svc.spec.as_ref();
    let cluster_ips = match cluster_ips(spec) {
        Ok(ips) => ips,
        Err(reason) => {
            problems.push(Problem {
                object,
                rejected: true,
                reason,
            });
            return None;
        }
    };
    // Endpoints come from the primary family, as the EndpointSlice controller's do.
    let family = primary_family(spec, &cluster_ips);
    let slices: Vec<&EndpointSlice> = inputs
        .slices
        .iter()
        .copied()
        .filter(|s| {
            ns(&s.metadata) == key.namespace
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(&key.name)
        })
        .collect();
    let selected: Vec<&Pod> = inputs
        .pods
        .iter()
        .copied()
        .filter(|p| is_ready(p) && selects(svc, p))
        .collect();

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
        let (protocol, protocol_source) = protocol_of(port, &inputs.opaque_ports);
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
        .flat_map(|p| p.endpoints.iter().map(|e| e.ip()))
    {
        let behind = inputs.pods_by_ip.get(&ip).into_iter().flatten();
        match behind.copied().find(|p| ns(&p.metadata) == key.namespace) {
            Some(pod) if is_meshed(pod) => {
                service_accounts.insert((key.namespace.clone(), pod_service_account(pod)));
            }
            _ => meshed = false,
        }
    }
    Some(MeshService {
        key,
        cluster_ips,
        ports,
        split: None,
        meshed,
        service_accounts: service_accounts.into_iter().collect(),
    })
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

fn endpoints_from_pods(port: &ServicePort, pods: &[&Pod], family: Option<bool>) -> Vec<SocketAddr> {
    let set: BTreeSet<SocketAddr> = pods
        .iter()
        .filter_map(|p| {
            Some(SocketAddr::new(
                pod_ip_in(p, family)?,
                target_port(port, p)?,
            ))
        })
        .collect();
    set.into_iter().collect()
}

fn endpoints_from_slices(
    port: &ServicePort,
    slices: &[&EndpointSlice],
    family: Option<bool>,
) -> Vec<SocketAddr> {
    let mut set = BTreeSet::new();
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
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            set.extend(
                ep.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, slice_port)),
            );
        }
    }
    set.into_iter().collect()
}

/// The probes the webhook rewrote, from its annotation; HTTPS probes are not forwarded.
fn probe_forwards(pod: &Pod, problems: &mut Vec<Problem>) -> Vec<ProbeForward> {
    #[derive(serde::Deserialize)]
    struct Original {
        port: i32,
        path: String,
        #[serde(default)]
        scheme: String,
    }
    let Some(text) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::ORIGINAL_PROBES))
    else {
        return Vec::new();
    };
    match serde_json::from_str::<BTreeMap<String, Original>>(text) {
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

/// A pod as its sidecar serves it. The protocol of each inbound port comes from the
/// Services that target it: a declared protocol wins over an undeclared one, and when
/// two Services declare different ones the oldest Service wins (the other is reported).
fn resolve_workload(
    pod: &Pod,
    services: &[&Service],
    inputs: &Inputs<'_>,
    conflicts: &mut BTreeSet<Problem>,
    problems: &mut Vec<Problem>,
) -> Workload {
    let mut inbound: BTreeMap<u16, (AppProtocol, ProtocolSource, &Service)> = BTreeMap::new();
    for svc in services.iter().copied().filter(|s| selects(s, pod)) {
        for port in svc.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
            if !is_tcp_family(port) {
                continue;
            }
            let Some(target) = target_port(port, pod) else {
                continue;
            };
            let (protocol, source) = protocol_of(port, &inputs.opaque_ports);
            match inbound.get(&target) {
                None => {
                    inbound.insert(target, (protocol, source, svc));
                }
                Some((p, _, _)) if *p == AppProtocol::Detect && protocol != AppProtocol::Detect => {
                    inbound.insert(target, (protocol, source, svc));
                }
                Some((p, _, owner)) if *p != protocol && protocol != AppProtocol::Detect => {
                    conflicts.insert(Problem {
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
    Workload {
        namespace: ns(&pod.metadata).to_string(),
        name: name(&pod.metadata).to_string(),
        ips: pod_ips(pod),
        service_account: pod_service_account(pod),
        meshed: is_meshed(pod),
        inbound_ports: inbound
            .into_iter()
            .map(|(port, (protocol, protocol_source, _))| WorkloadPort {
                port,
                protocol,
                protocol_source,
            })
            .collect(),
        probes: probe_forwards(pod, problems),
    }
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

fn resolve_splits(splits: &[&TrafficSplit], routes: &Routes<'_>, model: &mut MeshModel) {
    let mut splits: Vec<&TrafficSplit> = splits.to_vec();
    splits.sort_by_key(|s| creation_order(&s.metadata));
    // Only accepted splits constrain later ones, so a newer invalid split never
    // takes out an older valid one.
    let mut accepted = AcceptedSplits::default();
    for split in splits {
        let object = ObjectRef::new(
            Kind::TrafficSplit,
            ns(&split.metadata),
            name(&split.metadata),
        );
        match resolve_split(split, &object, &accepted, routes, model) {
            Ok((root, resolved, warnings)) => {
                model
                    .problems
                    .extend(warnings.into_iter().map(|reason| Problem {
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
                if let Some(service) = model.services.get_mut(&root) {
                    service.split = Some(resolved);
                }
            }
            Err(reason) => model.problems.push(Problem {
                object,
                rejected: true,
                reason,
            }),
        }
    }
}

/// Roots and backends of the splits accepted so far, with the split that claims them.
#[derive(Default)]
struct AcceptedSplits {
    roots: BTreeMap<ServiceKey, ObjectRef>,
    backends: BTreeMap<ServiceKey, ObjectRef>,
}

type ResolvedSplit = (ServiceKey, SplitModel, Vec<String>);

fn resolve_split(
    split: &TrafficSplit,
    object: &ObjectRef,
    accepted: &AcceptedSplits,
    routes: &Routes<'_>,
    model: &MeshModel,
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
    let root = model
        .services
        .get(&root_key)
        .ok_or_else(|| format!("root service {root_key} does not exist"))?;
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
        match model.services.get(&key) {
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
