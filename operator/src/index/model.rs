//! The validated mesh model: what translate reads. Free of Kubernetes types.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::Serialize;

use super::ObjectRef;

/// Namespace and name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ServiceKey {
    /// A key from parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// `name.namespace.svc.cluster.local`.
    pub fn fqdn(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How the mesh treats a port's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AppProtocol {
    /// An HTTP/1.1 app: L7 routing and authorization, HTTP/2 between sidecars,
    /// HTTP/1.1 to the app.
    Http,
    /// An HTTP/2 app (gRPC, h2c): HTTP/2 on every hop, cleartext to the app.
    Http2,
    /// Opaque TCP: bytes pass unchanged, splits by connection.
    Tcp,
    /// Undeclared: HTTP when the first bytes are HTTP, otherwise TCP once the
    /// detection timeout passes (so a server-first protocol still works).
    Detect,
}

impl AppProtocol {
    /// Whether requests on this port are always handled as HTTP.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2)
    }

    /// The name `weft explain` and the docs use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "HTTP/1.1",
            Self::Http2 => "HTTP/2",
            Self::Tcp => "TCP",
            Self::Detect => "detected (HTTP or TCP)",
        }
    }
}

/// Why a port has its protocol: the first rule that decided it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum ProtocolSource {
    /// The Service port's `appProtocol`.
    AppProtocol(String),
    /// The Service port's name (`<protocol>[-<suffix>]`).
    PortName(String),
    /// A well-known server-first or non-HTTP port (built in, or MeshConfig `opaquePorts`).
    WellKnownPort,
    /// Nothing declares it: detected per connection.
    Undeclared,
}

impl fmt::Display for ProtocolSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AppProtocol(p) => write!(f, "appProtocol {p}"),
            Self::PortName(n) => write!(f, "port name {n}"),
            Self::WellKnownPort => write!(f, "well-known opaque port"),
            Self::Undeclared => write!(f, "undeclared"),
        }
    }
}

/// One endpoint of a service port: where a pod answers, and whether it takes new requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceEndpoint {
    /// Pod IP (of the service's primary family) and target port.
    pub addr: SocketAddr,
    /// Terminating but still serving: in-flight requests and open connections finish,
    /// new requests go to the other endpoints (Envoy health status DRAINING).
    pub draining: bool,
}

impl ServiceEndpoint {
    /// An endpoint that takes new requests.
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            draining: false,
        }
    }

    /// An endpoint that only finishes what it has.
    pub fn draining(addr: SocketAddr) -> Self {
        Self {
            addr,
            draining: true,
        }
    }
}

/// One port of a service, with its serving endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortModel {
    /// Port name (may be empty).
    pub name: String,
    /// Service port.
    pub port: u16,
    /// Protocol treatment.
    pub protocol: AppProtocol,
    /// Why the port has that protocol.
    pub protocol_source: ProtocolSource,
    /// Ready and draining endpoints, sorted by address, one per address. Draining ones
    /// appear only next to a ready one: with none ready, they are sent as ready.
    pub endpoints: Vec<ServiceEndpoint>,
}

impl ServicePortModel {
    /// The endpoints that take new requests.
    pub fn ready_endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints
            .iter()
            .filter(|e| !e.draining)
            .map(|e| e.addr)
    }
}

/// One weighted backend of a split, on a given port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SplitBackend {
    /// The backend service.
    pub service: ServiceKey,
    /// Relative weight.
    pub weight: u32,
}

/// A TrafficSplit resolved against services: backends per root port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SplitModel {
    /// The TrafficSplit this came from.
    pub source: ObjectRef,
    /// Backends per root service port; a port with no usable backend is absent.
    pub backends_by_port: BTreeMap<u16, Vec<SplitBackend>>,
    /// Only requests matching one of these are split (HTTP ports); empty means all.
    pub matches: Vec<HttpRequestMatch>,
}

/// A service of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshService {
    /// Namespace and name.
    pub key: ServiceKey,
    /// The virtual IPs (`spec.clusterIPs`, primary family first); empty when headless.
    pub cluster_ips: Vec<IpAddr>,
    /// Ports, sorted by number.
    pub ports: Vec<ServicePortModel>,
    /// The TrafficSplit rooted at this service, if any.
    pub split: Option<SplitModel>,
    /// Gateway API HTTPRoute entries per service port, in precedence order. Entries
    /// whose `source` is in the service's namespace are producer routes: where a port
    /// has some, they decide its routing (a TrafficSplit on that port gives way). Entries
    /// from another namespace are that namespace's consumer routes: they decide the port
    /// for callers in that namespace only, instead of the producer routes.
    pub http_routes: BTreeMap<u16, Vec<HttpRouteEntry>>,
    /// Whether every endpoint is a meshed pod (so clients must use mTLS to reach it).
    pub meshed: bool,
    /// Service accounts (namespace, name) of the pods behind it, sorted.
    pub service_accounts: Vec<(String, String)>,
    /// TrafficPolicy settings in force, by port.
    pub policies: BTreeMap<u16, PortPolicy>,
}

/// A setting and the TrafficPolicy that set it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Sourced<T> {
    /// The TrafficPolicy.
    pub source: ObjectRef,
    /// The setting.
    pub value: T,
}

/// The TrafficPolicy settings of one service port, each from the oldest policy setting it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortPolicy {
    /// Circuit-breaker thresholds.
    pub connection_pool: Option<Sourced<ConnectionPoolModel>>,
    /// Outlier detection.
    pub outlier_detection: Option<Sourced<OutlierDetectionModel>>,
    /// Active health check.
    pub health_check: Option<Sourced<HealthCheckModel>>,
    /// Load balancing.
    pub load_balancer: Option<Sourced<LoadBalancerModel>>,
    /// Fault injection.
    pub fault: Option<Sourced<FaultModel>>,
    /// Retry default.
    pub retry: Option<Sourced<RetryModel>>,
    /// Request timeout default.
    pub timeout: Option<Sourced<std::time::Duration>>,
    /// Local rate limit, enforced by the destination's sidecars.
    pub rate_limit: Option<Sourced<RateLimitModel>>,
}

/// A token bucket in each destination sidecar.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RateLimitModel {
    /// Tokens added per interval.
    pub tokens: u32,
    /// Refill interval.
    pub interval: std::time::Duration,
    /// Bucket size.
    pub burst: u32,
}

/// Circuit-breaker thresholds (unset: Envoy's defaults, 1024 each; retries 3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPoolModel {
    /// Connections.
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    pub max_requests: Option<u32>,
    /// Retries in flight.
    pub max_retries: Option<u32>,
    /// Connections close (after their requests) this long after they opened (HTTP).
    pub max_connection_duration: Option<std::time::Duration>,
}

/// Outlier detection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutlierDetectionModel {
    /// 5xx in a row that eject.
    pub consecutive_5xx: Option<u32>,
    /// Gateway errors in a row that eject.
    pub consecutive_gateway_errors: Option<u32>,
    /// Analysis interval.
    pub interval: Option<std::time::Duration>,
    /// First ejection time.
    pub base_ejection_time: Option<std::time::Duration>,
    /// Most endpoints ejected, percent.
    pub max_ejection_percent: Option<u32>,
}

/// An active health check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HealthCheckModel {
    /// HTTP path and passing statuses; `None`: a TCP connect.
    pub http: Option<(String, Vec<u16>)>,
    /// Between probes.
    pub interval: std::time::Duration,
    /// Per probe.
    pub timeout: std::time::Duration,
    /// Passing probes to become healthy.
    pub healthy_threshold: u32,
    /// Failed probes to become unhealthy.
    pub unhealthy_threshold: u32,
    /// Panic threshold, percent.
    pub panic_threshold: Option<u32>,
}

/// Load balancing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LoadBalancerModel {
    /// The algorithm.
    pub algorithm: weft_crds::policy::LoadBalancerType,
    /// The hash source of RingHash and Maglev.
    pub hash: Option<HashModel>,
    /// Slow start window.
    pub slow_start: Option<std::time::Duration>,
}

/// What consistent hashing hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HashModel {
    /// A header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The caller's address.
    SourceIp,
}

/// Fault injection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FaultModel {
    /// (percent, delay).
    pub delay: Option<(u32, std::time::Duration)>,
    /// (percent, status).
    pub abort: Option<(u32, u16)>,
}

impl MeshService {
    /// The port with this number.
    pub fn port(&self, port: u16) -> Option<&ServicePortModel> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// A port a workload serves, as reached through its inbound listener.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct WorkloadPort {
    /// The container port.
    pub port: u16,
    /// Protocol treatment.
    pub protocol: AppProtocol,
    /// Why the port has that protocol.
    pub protocol_source: ProtocolSource,
    /// The local rate limit of the service port that targets it, if any.
    pub rate_limit: Option<Sourced<RateLimitModel>>,
}

/// A pod that may run a sidecar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod IPs (`status.podIPs`, primary family first), once assigned.
    pub ips: Vec<IpAddr>,
    /// The service account the pod runs as.
    pub service_account: String,
    /// Whether the pod runs a sidecar (not opted out with `weft.dev/inject: disabled`).
    pub meshed: bool,
    /// Ports other meshed workloads reach through services, sorted.
    pub inbound_ports: Vec<WorkloadPort>,
    /// Kubelet probes the proxy forwards to the app (from the injection annotation), sorted.
    pub probes: Vec<ProbeForward>,
    /// The services it calls, when it says so: its proxy gets only these.
    pub egress: Option<EgressScope>,
    /// Its proxy fetches the clusters of HTTP services when it first calls them
    /// (`weft.dev/outbound-clusters: on-demand`) rather than holding them all.
    pub clusters_on_demand: bool,
}

/// One entry of an egress scope: a service, or every service, of a namespace (or of
/// every namespace).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EgressEntry {
    /// The namespace; `None` for every namespace.
    pub namespace: Option<String>,
    /// The service; `None` for every service.
    pub service: Option<String>,
}

/// The services a workload calls (`weft.dev/egress`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EgressScope {
    /// Entries, sorted, without repeats.
    pub entries: Vec<EgressEntry>,
}

impl EgressScope {
    /// Whether the scope includes `service`.
    pub fn includes(&self, service: &ServiceKey) -> bool {
        self.entries.iter().any(|e| {
            e.namespace.as_ref().is_none_or(|n| *n == service.namespace)
                && e.service.as_ref().is_none_or(|s| *s == service.name)
        })
    }

    /// A stable name for the scope, the same for every workload with the same entries.
    pub fn key(&self) -> String {
        self.entries
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e.namespace.as_deref().unwrap_or("*"),
                    e.service.as_deref().unwrap_or("*")
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A rewritten kubelet probe: the proxy's path and where the app answers it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ProbeForward {
    /// Path on the proxy's probe port, `/app-health/<container>/<kind>`.
    pub path: String,
    /// The app's port.
    pub port: u16,
    /// The app's probe path.
    pub target_path: String,
}

impl Workload {
    /// The node id its sidecar announces: `namespace/name`.
    pub fn node_id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether `ip` is one of the pod's addresses.
    pub fn has_ip(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }

    /// Whether the pod has IPv6 addresses only (its app is reached over `::1`).
    pub fn is_ipv6_only(&self) -> bool {
        !self.ips.is_empty() && self.ips.iter().all(IpAddr::is_ipv6)
    }
}

/// An object Weft does not apply (or applies only in part), and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    /// The object concerned.
    pub object: ObjectRef,
    /// Whether the object is ignored (`true`) or applied with a caveat (`false`).
    pub rejected: bool,
    /// What is wrong, for a person.
    pub reason: String,
}

/// One HTTP request match (SMI HTTPRouteGroup entry): all present conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct HttpRequestMatch {
    /// Regex the path must match from its start.
    pub path_regex: Option<String>,
    /// Allowed methods; empty means any.
    pub methods: Vec<String>,
    /// Header name to a regex its value must match in full.
    pub headers: BTreeMap<String, String>,
}

/// Connection-level access a grant gives (from TCPRoute rules).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TcpGrant {
    /// None.
    #[default]
    None,
    /// Every port of the destination.
    AllPorts,
    /// These ports.
    Ports(Vec<u16>),
}

impl TcpGrant {
    /// Whether connections to `port` are allowed whole.
    pub fn covers(&self, port: u16) -> bool {
        match self {
            Self::None => false,
            Self::AllPorts => true,
            Self::Ports(ports) => ports.contains(&port),
        }
    }
}

/// What one TrafficTarget allows its sources to do to its destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessGrant {
    /// The TrafficTarget.
    pub source: ObjectRef,
    /// Source identities (namespace, service account), sorted.
    pub sources: Vec<(String, String)>,
    /// Only this destination port, if the TrafficTarget names one.
    pub port: Option<u16>,
    /// HTTP requests allowed (ORed); empty when no HTTPRouteGroup rule applies.
    pub http: Vec<HttpRequestMatch>,
    /// Connections allowed whole.
    pub tcp: TcpGrant,
}

/// A workload identity: (namespace, service account).
pub type Identity = (String, String);

/// Access grants by destination identity.
pub type GrantsByDestination = BTreeMap<Identity, Vec<AccessGrant>>;

/// Everything translate needs, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshModel {
    /// Services by namespace/name; a service no split, route or policy changes is the
    /// index's own resolution of it, shared.
    #[serde(serialize_with = "shared_services")]
    pub services: BTreeMap<ServiceKey, Arc<MeshService>>,
    /// Workloads by node id (`namespace/name`).
    pub workloads: BTreeMap<String, Workload>,
    /// Access grants by destination identity (namespace, service account).
    pub grants: BTreeMap<(String, String), Vec<AccessGrant>>,
    /// Invalid or partly applied objects, sorted.
    pub problems: Vec<Problem>,
    /// Mesh-wide settings from the MeshConfig in effect, if any.
    pub settings: Option<MeshSettings>,
}

/// Serializes shared services as the services themselves (serde's `Arc` support is an
/// opt-in feature the workspace leaves off).
fn shared_services<S: serde::Serializer>(
    services: &BTreeMap<ServiceKey, Arc<MeshService>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(services.iter().map(|(k, v)| (k, &**v)))
}

/// The MeshConfig in effect: its overrides of the control plane's flags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeshSettings {
    /// The MeshConfig object.
    pub source: ObjectRef,
    /// Its spec.
    pub spec: weft_crds::MeshConfigSpec,
}

/// A path condition of an HTTPRoute match.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PathMatch {
    /// The path, exactly.
    Exact(String),
    /// Whole path segments (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`).
    Prefix(String),
    /// An RE2 regex the whole path must match.
    Regex(String),
}

/// A header or query parameter condition.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ValueMatch {
    /// Name (headers: lower case).
    pub name: String,
    /// The value, or a regex matching the whole value.
    pub value: String,
    /// Whether `value` is a regex.
    pub regex: bool,
}

/// One HTTPRoute match: every condition must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteMatchModel {
    /// Path condition.
    pub path: PathMatch,
    /// Method, if any.
    pub method: Option<String>,
    /// Header conditions.
    pub headers: Vec<ValueMatch>,
    /// Query parameter conditions.
    pub query: Vec<ValueMatch>,
}

/// Header changes of a RequestHeaderModifier or ResponseHeaderModifier filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderChanges {
    /// Set (replacing any value).
    pub set: Vec<(String, String)>,
    /// Added (appended to any value).
    pub add: Vec<(String, String)>,
    /// Removed.
    pub remove: Vec<String>,
}

impl HeaderChanges {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// A path change of a redirect or rewrite.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathChange {
    /// Replace the whole path.
    Full(String),
    /// Replace the matched prefix.
    Prefix(String),
}

/// A RequestRedirect filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RedirectModel {
    /// New scheme.
    pub scheme: Option<String>,
    /// New host.
    pub hostname: Option<String>,
    /// New port.
    pub port: Option<u16>,
    /// New path.
    pub path: Option<PathChange>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A URLRewrite filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RewriteModel {
    /// New Host header.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathChange>,
}

/// A RequestMirror filter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MirrorModel {
    /// The service mirrored to.
    pub service: ServiceKey,
    /// Its port.
    pub port: u16,
    /// Share mirrored, in millionths (1,000,000: every request).
    pub per_million: u32,
}

/// A backend of an HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteBackend {
    /// The service; `None` when the reference does not resolve (its share answers 500).
    pub service: Option<ServiceKey>,
    /// The service port.
    pub port: u16,
    /// Relative weight (positive).
    pub weight: u32,
    /// Header changes of requests sent to this backend (its own filters).
    pub request_headers: HeaderChanges,
    /// Header changes of responses from this backend.
    pub response_headers: HeaderChanges,
}

/// An HTTPRoute rule's `retry`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryModel {
    /// Response codes retried (besides connection failures).
    pub codes: Vec<u32>,
    /// Retries after the first try.
    pub attempts: u32,
    /// Base wait between tries.
    pub backoff: Option<std::time::Duration>,
    /// Time one try may take (TrafficPolicy; HTTPRoute uses `timeouts.backendRequest`).
    pub per_try_timeout: Option<std::time::Duration>,
}

/// What an HTTPRoute rule does with a matching request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RouteActionModel {
    /// Request header changes.
    pub request_headers: HeaderChanges,
    /// Response header changes.
    pub response_headers: HeaderChanges,
    /// Answer with a redirect instead of forwarding.
    pub redirect: Option<RedirectModel>,
    /// Rewrite before forwarding.
    pub rewrite: Option<RewriteModel>,
    /// Mirrors.
    pub mirrors: Vec<MirrorModel>,
    /// Backends with a positive weight; empty: every request answers 500.
    pub backends: Vec<RouteBackend>,
    /// `timeouts.request`.
    pub timeout: Option<std::time::Duration>,
    /// `timeouts.backendRequest`.
    pub backend_timeout: Option<std::time::Duration>,
    /// `retry`; `None`: the mesh's default retries of failed connections only.
    pub retry: Option<RetryModel>,
}

/// One match of one HTTPRoute rule, ready to translate: a port's entries are sorted by
/// the Gateway API's precedence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRouteEntry {
    /// The HTTPRoute.
    pub source: ObjectRef,
    /// Index of the rule in the route.
    pub rule: usize,
    /// The rule's name, if any.
    pub rule_name: Option<String>,
    /// The match.
    pub r#match: RouteMatchModel,
    /// What happens to matching requests.
    pub action: RouteActionModel,
}
