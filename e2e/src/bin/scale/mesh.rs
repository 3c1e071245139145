//! The generated mesh: namespaces of ten Services, pods spread round-robin, SMI objects,
//! and the changes the bench applies while proxies are connected.
//!
//! Everything is derived from indices (service `i`, replica `j`), so the bench knows
//! every name and address without reading the files back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Services per namespace.
pub const SERVICES_PER_NAMESPACE: usize = 10;
/// Namespaces per manifest file (Services and Pods in `mesh-NNN.yaml`, SMI in `smi-NNN.yaml`).
pub const NAMESPACES_PER_FILE: usize = 100;
/// The one port of every Service and Pod.
pub const PORT: u16 = 8080;
/// The egress scope annotation and the value every scoped pod gets (own namespace only).
pub const EGRESS_ANNOTATION: &str = "weft.dev/egress";
pub const EGRESS_OWN_NAMESPACE: &str = "./*";
/// Asks for service clusters on demand.
pub const ON_DEMAND_ANNOTATION: &str = "weft.dev/outbound-clusters";

/// One generated pod.
#[derive(Clone, Debug)]
pub struct PodSpec {
    /// `svc-<i>-<j>` (or `svc-<i>-x<n>` for pods added by a change).
    pub name: String,
    /// Index of its service.
    pub service: usize,
    pub ip: Ipv4Addr,
    /// Carries the egress annotation (sees its own namespace only).
    pub scoped: bool,
    /// Carries `weft.dev/outbound-clusters: on-demand`.
    pub on_demand: bool,
}

impl PodSpec {
    pub fn namespace(&self) -> String {
        namespace_name(namespace_of(self.service))
    }

    /// The node id its proxy uses: `<namespace>/<pod>`.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.namespace(), self.name)
    }
}

/// The shape of a mesh and everything the bench needs to address it.
#[derive(Clone, Debug)]
pub struct Mesh {
    pub services: usize,
    pub pods: Vec<PodSpec>,
    /// Pods in the order proxies connect: replica-major, and within a replica spread
    /// over every namespace before a namespace gets its second service.
    pub connect_order: Vec<usize>,
    pub scope: bool,
    /// Services whose account is a TrafficTarget's destination (by default every even
    /// service; fewer with an SMI budget, see [`Mesh::with_smi`]).
    traffic_targets: Vec<bool>,
    /// Extra TrafficTarget sources added by changes, per destination service.
    extra_sources: BTreeMap<usize, Vec<usize>>,
    /// TrafficSplit weights changed by changes, per root service (default 80/20).
    split_weights: BTreeMap<usize, (u32, u32)>,
    /// Services added by changes (`svc-new-<n>`), and pods added by changes.
    added_services: usize,
    added: Vec<PodSpec>,
}

pub fn namespace_of(service: usize) -> usize {
    service / SERVICES_PER_NAMESPACE
}

pub fn namespace_name(ns: usize) -> String {
    format!("ns-{ns}")
}

pub fn service_fqdn(service: &str, ns: usize) -> String {
    format!("{service}.{}.svc.cluster.local", namespace_name(ns))
}

/// ClusterIP number `n` in 10.96.0.0/12 (skipping .0 and .255 of every /24).
fn cluster_ip(n: usize) -> Ipv4Addr {
    offset_ip(Ipv4Addr::new(10, 96, 0, 0), n)
}

/// Pod IP number `n` in 127.64.0.0/10: on loopback, so a simulated proxy can bind its
/// socket to its pod's address without any interface set-up.
fn pod_ip(n: usize) -> Ipv4Addr {
    offset_ip(Ipv4Addr::new(127, 64, 0, 0), n)
}

fn offset_ip(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    // 254 usable addresses per /24, so no address ends in .0 or .255.
    let (block, host) = (n / 254, n % 254 + 1);
    Ipv4Addr::from(u32::from(base) + (block as u32) * 256 + host as u32)
}

impl Mesh {
    /// `services` Services, `pods` Pods round-robin over them; with `scope` every pod
    /// carries the egress annotation except the `unscoped` pods last in connect order
    /// (the sample for the unscoped initial sync).
    pub fn new(services: usize, pods: usize, scope: bool, unscoped: usize) -> Mesh {
        let specs: Vec<PodSpec> = (0..pods)
            .map(|m| PodSpec {
                name: format!("svc-{}-{}", m % services, m / services),
                service: m % services,
                ip: pod_ip(m),
                scoped: scope,
                on_demand: false,
            })
            .collect();
        let mut mesh = Mesh {
            services,
            connect_order: Vec::new(),
            pods: specs,
            scope,
            traffic_targets: (0..services).map(|i| i.is_multiple_of(2)).collect(),
            extra_sources: BTreeMap::new(),
            split_weights: BTreeMap::new(),
            added_services: 0,
            added: Vec::new(),
        };
        mesh.connect_order = mesh.spread_order();
        if scope {
            let n = mesh.connect_order.len();
            for &m in &mesh.connect_order[n.saturating_sub(unscoped)..] {
                mesh.pods[m].scoped = false;
            }
        }
        mesh
    }

    pub fn namespaces(&self) -> usize {
        self.services.div_ceil(SERVICES_PER_NAMESPACE)
    }

    /// Pod indices replica by replica; within a replica, position 0 of every namespace,
    /// then position 1, ..., so the first N pods cover as many namespaces as they can.
    fn spread_order(&self) -> Vec<usize> {
        let replicas = self.pods.len().div_ceil(self.services.max(1));
        let mut order = Vec::with_capacity(self.pods.len());
        for j in 0..replicas {
            for pos in 0..SERVICES_PER_NAMESPACE {
                for ns in 0..self.namespaces() {
                    let service = ns * SERVICES_PER_NAMESPACE + pos;
                    let m = j * self.services + service;
                    if service < self.services && m < self.pods.len() {
                        order.push(m);
                    }
                }
            }
        }
        order
    }

    /// Whether a proxy of `pod` is sent config for services of namespace `ns`: with the
    /// scope annotation only its own namespace, without it the whole mesh.
    pub fn sees_namespace(&self, pod: &PodSpec, ns: usize) -> bool {
        !pod.scoped || namespace_of(pod.service) == ns
    }

    pub fn service_name(service: usize) -> String {
        format!("svc-{service}")
    }

    /// Whether `sa-<service>` is the destination of a TrafficTarget (`to-svc-<service>`).
    pub fn has_traffic_target(&self, service: usize) -> bool {
        self.traffic_targets.get(service).copied().unwrap_or(false)
    }

    /// Whether `svc-<service>` is the root of a TrafficSplit (`split-svc-<service>`,
    /// over the next two services): every 20th service, when both are in its namespace.
    pub fn has_traffic_split(&self, service: usize) -> bool {
        service.is_multiple_of(20)
            && self
                .services_of_namespace(namespace_of(service))
                .contains(&(service + 2))
    }

    /// SMI objects of the mesh: one HTTPRouteGroup per namespace, the TrafficTargets
    /// and the TrafficSplits.
    pub fn smi_count(&self) -> usize {
        let targets = self.traffic_targets.iter().filter(|t| **t).count();
        let splits = (0..self.services)
            .filter(|i| self.has_traffic_split(*i))
            .count();
        self.namespaces() + targets + splits
    }

    /// The same mesh with exactly `smi` SMI objects: the HTTPRouteGroups and
    /// TrafficSplits stay, and TrafficTargets go to as many even services as the rest
    /// of the budget allows, spread over the namespaces (position 0 of every namespace,
    /// then position 2, ...), so the first proxies to connect are still destinations.
    pub fn with_smi(mut self, smi: usize) -> Result<Mesh, String> {
        let even: Vec<usize> = (0..SERVICES_PER_NAMESPACE)
            .step_by(2)
            .flat_map(|pos| (0..self.namespaces()).map(move |ns| ns * SERVICES_PER_NAMESPACE + pos))
            .filter(|i| *i < self.services)
            .collect();
        let fixed = self.smi_count() - self.traffic_targets.iter().filter(|t| **t).count();
        if smi < fixed || smi > fixed + even.len() {
            return Err(format!(
                "{smi} SMI objects do not fit {} services: {} HTTPRouteGroups and TrafficSplits, plus 0 to {} TrafficTargets",
                self.services,
                fixed,
                even.len()
            ));
        }
        self.traffic_targets = vec![false; self.services];
        for i in &even[..smi - fixed] {
            self.traffic_targets[*i] = true;
        }
        Ok(self)
    }

    /// The generated pods of `service`, then the pods changes added to it.
    pub fn pods_of_service(&self, service: usize) -> impl Iterator<Item = &PodSpec> {
        let generated = self.pods.iter().skip(service).step_by(self.services.max(1));
        generated.chain(self.added.iter().filter(move |p| p.service == service))
    }

    /// The text of every manifest file [`Mesh::write`] writes, Services and Pods first.
    pub fn texts(&self) -> Vec<String> {
        let files = self.namespaces().div_ceil(NAMESPACES_PER_FILE);
        let mut out: Vec<String> = (0..files).map(|f| self.mesh_file_text(f)).collect();
        out.extend((0..files).map(|f| self.smi_file_text(f)));
        out
    }

    /// Writes the whole mesh into `dir` (created if missing).
    pub fn write(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        fs::create_dir_all(dir)?;
        let files = self.namespaces().div_ceil(NAMESPACES_PER_FILE);
        let mut written = Vec::new();
        for f in 0..files {
            let path = dir.join(mesh_file(f));
            write_atomically(&path, &self.mesh_file_text(f))?;
            written.push(path);
            let path = dir.join(smi_file(f));
            write_atomically(&path, &self.smi_file_text(f))?;
            written.push(path);
        }
        Ok(written)
    }

    fn namespaces_of_file(&self, file: usize) -> std::ops::Range<usize> {
        let first = file * NAMESPACES_PER_FILE;
        first..(first + NAMESPACES_PER_FILE).min(self.namespaces())
    }

    fn services_of_namespace(&self, ns: usize) -> std::ops::Range<usize> {
        let first = ns * SERVICES_PER_NAMESPACE;
        first..(first + SERVICES_PER_NAMESPACE).min(self.services)
    }

    fn mesh_file_text(&self, file: usize) -> String {
        let mut out = String::new();
        for ns in self.namespaces_of_file(file) {
            for i in self.services_of_namespace(ns) {
                push_service(&mut out, &Self::service_name(i), ns, cluster_ip(i));
            }
        }
        for pod in &self.pods {
            if self
                .namespaces_of_file(file)
                .contains(&namespace_of(pod.service))
            {
                push_pod(&mut out, pod);
            }
        }
        out
    }

    fn smi_file_text(&self, file: usize) -> String {
        let mut out = String::new();
        for ns in self.namespaces_of_file(file) {
            out.push_str(&route_group_text(ns));
            for i in self.services_of_namespace(ns) {
                if let Some(text) = self.traffic_target_text(i) {
                    out.push_str(&text);
                }
                if let Some(text) = self.traffic_split_text(i) {
                    out.push_str(&text);
                }
            }
        }
        out
    }

    /// The TrafficTarget `to-svc-<service>` (if it has one) as a YAML document.
    pub fn traffic_target_text(&self, i: usize) -> Option<String> {
        if !self.has_traffic_target(i) {
            return None;
        }
        let ns = namespace_of(i);
        let namespace = namespace_name(ns);
        let services = self.services_of_namespace(ns);
        let mut sources = vec![i + 1];
        sources.extend(self.extra_sources.get(&i).into_iter().flatten().copied());
        let sources = sources
            .iter()
            .filter(|s| services.contains(s))
            .map(|s| format!("{{kind: ServiceAccount, name: sa-{s}, namespace: {namespace}}}"))
            .collect::<Vec<_>>()
            .join(", ");
        // Half of the targets allow only the `read` route, half everything.
        let rules = if i.is_multiple_of(4) {
            "  rules: [{kind: HTTPRouteGroup, name: routes, matches: [read]}]\n"
        } else {
            ""
        };
        Some(format!(
            "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: to-svc-{i}, namespace: {namespace}}}\nspec:\n  destination: {{kind: ServiceAccount, name: sa-{i}, namespace: {namespace}}}\n  sources: [{sources}]\n{rules}"
        ))
    }

    /// The TrafficSplit `split-svc-<service>` (if it has one) as a YAML document.
    pub fn traffic_split_text(&self, i: usize) -> Option<String> {
        if !self.has_traffic_split(i) {
            return None;
        }
        let namespace = namespace_name(namespace_of(i));
        let (a, b) = self.split_weights(i);
        Some(format!(
            "---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: split-svc-{i}, namespace: {namespace}}}\nspec:\n  service: svc-{i}\n  backends:\n  - {{service: svc-{}, weight: {a}}}\n  - {{service: svc-{}, weight: {b}}}\n",
            i + 1,
            i + 2
        ))
    }

    /// The weights of the TrafficSplit of `service` (80/20 until a change).
    pub fn split_weights(&self, service: usize) -> (u32, u32) {
        self.split_weights
            .get(&service)
            .copied()
            .unwrap_or((80, 20))
    }

    /// Change: the TrafficSplit of `service` moves 10 points of weight (80/20 → 70/30 →
    /// 80/20 ...). Returns the new weights; the caller writes the object.
    pub fn shift_split(&mut self, service: usize) -> (u32, u32) {
        let weights = match self.split_weights(service) {
            (80, 20) => (70, 30),
            _ => (80, 20),
        };
        self.split_weights.insert(service, weights);
        weights
    }

    /// A new pod for `service` (`svc-<service>-x<n>`, the next free pod IP), remembered
    /// as part of the mesh; the caller writes it.
    pub fn new_pod(&mut self, service: usize) -> PodSpec {
        let n = self.added.len();
        let pod = PodSpec {
            name: format!("svc-{service}-x{n}"),
            service,
            ip: pod_ip(self.pods.len() + n),
            scoped: self.scope,
            on_demand: false,
        };
        self.added.push(pod.clone());
        pod
    }

    /// Change: the TrafficTarget of `sa-<service>` gets one more source (another service
    /// account of its namespace). The caller writes the object.
    pub fn add_source(&mut self, service: usize) {
        let services = self.services_of_namespace(namespace_of(service));
        let taken = self.extra_sources.entry(service).or_default();
        let source = services
            .clone()
            .find(|s| *s != service && *s != service + 1 && !taken.contains(s))
            .unwrap_or(service);
        taken.push(source);
    }

    /// Change: one more pod for `service`, in a file of its own. Returns its spec and
    /// the instant of the rename.
    pub fn add_pod(&mut self, dir: &Path, service: usize) -> std::io::Result<(PodSpec, Instant)> {
        let n = self.added.len();
        let pod = self.new_pod(service);
        let mut text = String::new();
        push_pod(&mut text, &pod);
        let at = write_atomically(&dir.join(format!("change-pod-{n}.yaml")), &text)?;
        Ok((pod, at))
    }

    /// Change: the TrafficTarget of `sa-<service>` gets one more source (another service
    /// account of its namespace); rewrites that namespace's SMI file as an editor would.
    /// Returns the instant of the rename.
    pub fn add_traffic_target_source(
        &mut self,
        dir: &Path,
        service: usize,
    ) -> std::io::Result<Instant> {
        self.add_source(service);
        let file = namespace_of(service) / NAMESPACES_PER_FILE;
        write_atomically(&dir.join(smi_file(file)), &self.smi_file_text(file))
    }

    /// The name the next [`Mesh::add_service`] gives its Service.
    pub fn next_service_name(&self) -> String {
        format!("svc-new-{}", self.added_services)
    }

    /// Change: a new Service `svc-new-<n>` in namespace `ns` (selecting no pod).
    /// Returns its name and the instant of the rename.
    pub fn add_service(&mut self, dir: &Path, ns: usize) -> std::io::Result<(String, Instant)> {
        let name = self.next_service_name();
        let n = self.added_services;
        self.added_services += 1;
        let mut text = String::new();
        push_service(&mut text, &name, ns, cluster_ip(self.services + n));
        let at = write_atomically(&dir.join(format!("change-svc-{n}.yaml")), &text)?;
        Ok((name, at))
    }
}

fn mesh_file(file: usize) -> String {
    format!("mesh-{file:03}.yaml")
}

fn smi_file(file: usize) -> String {
    format!("smi-{file:03}.yaml")
}

/// The namespace's HTTPRouteGroup `routes` as a YAML document.
fn route_group_text(ns: usize) -> String {
    let namespace = namespace_name(ns);
    format!(
        "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: routes, namespace: {namespace}}}\nspec:\n  matches:\n  - {{name: read, pathRegex: \"/api/.*\", methods: [GET, HEAD]}}\n  - {{name: write, pathRegex: \"/api/.*\", methods: [POST, PUT]}}\n"
    )
}

fn push_service(out: &mut String, name: &str, ns: usize, ip: Ipv4Addr) {
    let namespace = namespace_name(ns);
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: {PORT}}}]\n"
    );
}

/// A pod as a YAML document.
pub fn pod_text(pod: &PodSpec) -> String {
    let mut out = String::new();
    push_pod(&mut out, pod);
    out
}

fn push_pod(out: &mut String, pod: &PodSpec) {
    let app = Mesh::service_name(pod.service);
    let mut entries = Vec::new();
    if pod.scoped {
        entries.push(format!("{EGRESS_ANNOTATION}: \"{EGRESS_OWN_NAMESPACE}\""));
    }
    if pod.on_demand {
        entries.push(format!("{ON_DEMAND_ANNOTATION}: on-demand"));
    }
    let annotations = if entries.is_empty() {
        String::new()
    } else {
        format!("\n  annotations: {{{}}}", entries.join(", "))
    };
    let _ = write!(
        out,
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{app: {app}}}{annotations}\nspec:\n  serviceAccountName: sa-{}\n  containers: [{{name: app, image: app, ports: [{{containerPort: {PORT}}}]}}]\nstatus: {{phase: Running, podIP: {}}}\n",
        pod.name,
        pod.namespace(),
        pod.service,
        pod.ip
    );
}

/// Writes `text` to a dot-file beside `path`, then renames it over `path`, as an editor
/// does: the watcher never sees a half-written file (and ignores dot-files). Returns
/// the instant just before the rename, where change latencies start.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<Instant> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    let at = Instant::now();
    fs::rename(&tmp, path)?;
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_network_and_broadcast_octets() {
        assert_eq!(pod_ip(0), Ipv4Addr::new(127, 64, 0, 1));
        assert_eq!(pod_ip(253), Ipv4Addr::new(127, 64, 0, 254));
        assert_eq!(pod_ip(254), Ipv4Addr::new(127, 64, 1, 1));
        assert_eq!(cluster_ip(254 * 3), Ipv4Addr::new(10, 96, 3, 1));
    }

    #[test]
    fn connect_order_spreads_over_namespaces_and_covers_every_pod() {
        let mesh = Mesh::new(100, 200, true, 5);
        assert_eq!(mesh.connect_order.len(), 200);
        let first: Vec<usize> = mesh.connect_order[..10]
            .iter()
            .map(|&m| namespace_of(mesh.pods[m].service))
            .collect();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let mut sorted = mesh.connect_order.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 200);
        let unscoped = mesh.pods.iter().filter(|p| !p.scoped).count();
        assert_eq!(unscoped, 5);
    }

    #[test]
    fn an_smi_budget_keeps_routes_and_splits_and_spreads_the_targets() {
        let mesh = Mesh::new(1000, 5000, false, 0);
        // 100 HTTPRouteGroups, 500 TrafficTargets, 50 TrafficSplits.
        assert_eq!(mesh.smi_count(), 650);
        let mesh = mesh.with_smi(500).unwrap();
        assert_eq!(mesh.smi_count(), 500);
        let docs: usize = mesh
            .texts()
            .iter()
            .map(|t| {
                t.matches("\nkind: Traffic").count() + t.matches("\nkind: HTTPRouteGroup").count()
            })
            .sum();
        assert_eq!(docs, 500);
        // Position 0 of every namespace (the first proxies to connect) is a destination.
        assert!((0..100).all(|ns| mesh.has_traffic_target(ns * SERVICES_PER_NAMESPACE)));
        assert!(Mesh::new(1000, 5000, false, 0).with_smi(100).is_err());
        assert_eq!(mesh.pods_of_service(7).count(), 5);
        assert!(mesh.pods_of_service(7).all(|p| p.service == 7));
    }
}
