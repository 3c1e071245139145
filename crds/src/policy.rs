//! TrafficPolicy (`policy.weft.dev/v1alpha1`): resilience settings for every caller of
//! a Service, attached as Gateway API policy attachment (GEP-713) does: `targetRefs`
//! name Services, optionally one port by `sectionName`. Structural rules are CEL
//! validations in the schema, so the API server refuses nonsense before Weft sees it.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{DURATION_RULE, SmiStatus};

const DURATION_MESSAGE: &str = "must be a duration such as 250ms, 2s or 1m30s";

/// TrafficPolicy: circuit breaking, outlier detection, active health checks, load
/// balancing, local rate limits, fault injection and retry/timeout defaults for the
/// Services it targets.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "policy.weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    status = "SmiStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Services (in the policy's namespace) it applies to.
    #[schemars(length(min = 1, max = 16))]
    pub target_refs: Vec<PolicyTargetReference>,
    /// What it sets.
    #[serde(flatten)]
    pub settings: TrafficSettings,
}

/// The settings of a TrafficPolicy, also the mesh-wide defaults of a MeshConfig.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSettings {
    /// Circuit breaking: limits on connections and requests to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPool>,
    /// Passive health checking: endpoints that keep failing are ejected for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checking by every caller's sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// How callers pick an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// Rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Faults injected by the callers' sidecars, for chaos testing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<FaultInjection>,
    /// Retries when no HTTPRoute rule sets them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// Timeouts when no HTTPRoute rule sets them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
}

/// The object a policy attaches to (GEP-713 `LocalPolicyTargetReferenceWithSectionName`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.group == '' && self.kind == 'Service'",
    "message": "only core Services (group \"\", kind Service) can be targeted"
}]))]
pub struct PolicyTargetReference {
    /// API group: `""` (core).
    #[serde(default)]
    pub group: String,
    /// Kind: `Service`.
    pub kind: String,
    /// The Service's name.
    pub name: String,
    /// A port name of the Service; absent: every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

/// Circuit-breaker thresholds of each caller's connection pool to the service.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections open at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Retries in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// A connection is closed (after its requests finish) this long after it opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub max_connection_duration: Option<String>,
}

/// Outlier detection (passive health checking).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx responses in a row that eject an endpoint.
    #[serde(
        default,
        rename = "consecutive5xx",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx: Option<u32>,
    /// 502, 503, 504 or connection failures in a row that eject an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are analysed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub interval: Option<String>,
    /// How long the first ejection lasts (later ones last longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub base_ejection_time: Option<String>,
    /// The most endpoints ejected at once, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Active health checking: every caller's sidecar probes the endpoints.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.http) != has(self.tcp)",
    "message": "exactly one of http or tcp"
}]))]
pub struct HealthCheck {
    /// Probe with an HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpHealthCheck>,
    /// Probe by opening a TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHealthCheck>,
    /// Time between probes (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub interval: Option<String>,
    /// Time a probe may take (default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub timeout: Option<String>,
    /// Passing probes that mark an endpoint healthy again (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub healthy_threshold: Option<u32>,
    /// Failed probes that mark an endpoint unhealthy (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unhealthy_threshold: Option<u32>,
    /// Below this share of healthy endpoints (percent), callers use all of them
    /// (Envoy's panic mode; default 50, 0 turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    pub panic_threshold: Option<u32>,
}

/// An HTTP health probe.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpHealthCheck {
    /// Path probed.
    #[schemars(regex(pattern = "^/"))]
    pub path: String,
    /// Statuses that pass (default 200).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = {"type": "integer", "minimum": 100, "maximum": 599}))]
    pub expected_statuses: Vec<u16>,
}

/// A TCP health probe: the connection opens.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TcpHealthCheck {}

/// The load-balancing algorithm.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.hash) == (self.type == 'RingHash' || self.type == 'Maglev')",
    "message": "hash is required by RingHash and Maglev, and only allowed with them"
}]))]
pub struct LoadBalancer {
    /// The algorithm.
    #[serde(rename = "type")]
    pub type_: LoadBalancerType,
    /// What consistent hashing hashes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<HashSource>,
    /// New endpoints get traffic ramped up over this window (RoundRobin, LeastRequest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub slow_start_window: Option<String>,
}

/// Load-balancing algorithms.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum LoadBalancerType {
    /// In turn.
    #[default]
    RoundRobin,
    /// The one of two random endpoints with fewer requests in flight.
    LeastRequest,
    /// Random.
    Random,
    /// Consistent hashing on a ring.
    RingHash,
    /// Consistent hashing with Maglev's table.
    Maglev,
}

/// One source of the consistent hash.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.header), has(self.cookie), has(self.sourceIP)].filter(x, x).size() == 1",
    "message": "exactly one of header, cookie or sourceIP"
}]))]
pub struct HashSource {
    /// A request header's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The caller's IP address.
    #[serde(default, rename = "sourceIP", skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<bool>,
}

/// Rate limits.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct RateLimit {
    /// A token bucket in each destination sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalRateLimit>,
}

/// A token bucket: `tokens` per `interval`, holding at most `burst`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimit {
    /// Tokens added per interval.
    #[schemars(range(min = 1))]
    pub tokens: u32,
    /// The refill interval.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub interval: String,
    /// Bucket size (default `tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub burst: Option<u32>,
}

/// Faults injected into callers' requests.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct FaultInjection {
    /// Delay a share of requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer a share of requests with an error instead of forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// An injected delay.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, 0-100.
    #[schemars(range(max = 100))]
    pub percent: u32,
    /// The delay.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub fixed_delay: String,
}

/// An injected error.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests aborted, 0-100.
    #[schemars(range(max = 100))]
    pub percent: u32,
    /// The status answered.
    #[schemars(range(min = 200, max = 599))]
    pub http_status: u16,
}

/// Retry defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try.
    pub attempts: u32,
    /// Response codes retried (besides refused and reset connections).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = {"type": "integer", "minimum": 400, "maximum": 599}))]
    pub codes: Vec<u16>,
    /// Base wait between tries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub backoff: Option<String>,
    /// Time one try may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub per_try_timeout: Option<String>,
}

/// Timeout defaults.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// The whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": DURATION_RULE, "message": DURATION_MESSAGE}]))]
    pub request: Option<String>,
}
