//! Weft's CRD types: the SMI resources Weft reconciles, with their schemas.
//!
//! The group/version of each type follows the SMI spec exactly; the `status`
//! subresource is Weft's own (SMI defines none) and carries conditions.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// Errors of this crate (CRD YAML generation and manifest parsing).
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CRD could not be rendered as YAML.
    #[error("rendering CRD {name} as YAML: {source}")]
    Render {
        /// The CRD's name.
        name: String,
        /// The serializer's error.
        source: serde_yaml_ng::Error,
    },
    /// An input is larger than Weft reads (see [`bounds`]).
    #[error("{what} is larger than the {} limit", bounds::mib(*.limit))]
    TooLarge {
        /// What is too large, with its size when known.
        what: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// Collections nest deeper than [`bounds::MAX_NESTING`].
    #[error("nesting deeper than {limit} levels {at}")]
    TooDeep {
        /// The limit.
        limit: usize,
        /// Where, e.g. `at line 3 column 7`.
        at: String,
    },
    /// YAML aliases expand a document far beyond the text's size (an alias bomb).
    #[error(
        "document {document}: YAML aliases expand it to more than {} times the text's size",
        bounds::ALIAS_EXPANSION_FACTOR
    )]
    AliasExpansion {
        /// The document, counted from 1.
        document: usize,
    },
}

/// CEL rule: a Gateway API duration (`250ms`, `2s`, `1m30s`: up to four parts of up to
/// five digits and a unit), as the control plane parses it.
const DURATION_RULE: &str = "self.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$')";

/// One status condition, shaped like `metav1.Condition`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    pub reason: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// Status Weft reports on every SMI object it validates.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct SmiStatus {
    /// Conditions; `Accepted` says whether Weft applies the object.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// TrafficSplit: weight a root service's traffic over backend services.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "split.smi-spec.io",
    version = "v1alpha4",
    kind = "TrafficSplit",
    namespaced,
    derive = "PartialEq",
    validation = Rule::new("self.spec.backends.all(b, b.service != self.spec.service)").message("a backend cannot be the root service itself"),
    status = "SmiStatus",
    shortname = "ts",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#
)]
pub struct TrafficSplitSpec {
    /// The root service clients address (name or FQDN).
    pub service: String,
    /// Services that receive the root service's traffic, by weight.
    #[schemars(length(min = 1))]
    pub backends: Vec<TrafficSplitBackend>,
    /// HTTPRouteGroups restricting the split to matching requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TypedLocalRef>,
}

/// One backend of a TrafficSplit.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TrafficSplitBackend {
    /// Backend service name in the split's namespace.
    pub service: String,
    /// Relative weight (a whole number, 0 allowed).
    #[schemars(range(min = 0))]
    pub weight: i64,
}

/// A reference to an object of a given kind in the same namespace.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TypedLocalRef {
    /// Kind of the referenced object, e.g. `HTTPRouteGroup`.
    pub kind: String,
    /// Name of the referenced object.
    pub name: String,
    /// API group of the referenced object, if given.
    #[serde(default, rename = "apiGroup", skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
}

/// TrafficTarget: which source identities may reach a destination identity.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "access.smi-spec.io",
    version = "v1alpha3",
    kind = "TrafficTarget",
    namespaced,
    derive = "PartialEq",
    validation = Rule::new("self.spec.destination.kind == 'ServiceAccount' && self.spec.sources.all(s, s.kind == 'ServiceAccount')").message("sources and destination must be ServiceAccounts"),
    status = "SmiStatus",
    shortname = "tt"
)]
pub struct TrafficTargetSpec {
    /// The destination identity.
    pub destination: IdentityBinding,
    /// The source identities that are granted access.
    #[serde(default)]
    pub sources: Vec<IdentityBinding>,
    /// Route rules limiting what the sources may do; none means everything.
    #[serde(default)]
    pub rules: Vec<TrafficTargetRule>,
}

/// An identity (a ServiceAccount) in a TrafficTarget.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct IdentityBinding {
    /// Must be `ServiceAccount`.
    pub kind: String,
    /// ServiceAccount name.
    pub name: String,
    /// ServiceAccount namespace; defaults to the TrafficTarget's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Destination port (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// A rule of a TrafficTarget: a route group and the matches used from it.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TrafficTargetRule {
    /// `HTTPRouteGroup` or `TCPRoute`.
    pub kind: String,
    /// Name of the route object.
    pub name: String,
    /// Names of HTTPRouteGroup matches; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<String>,
}

/// HTTPRouteGroup: named HTTP request matches.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "HTTPRouteGroup",
    namespaced,
    derive = "PartialEq",
    status = "SmiStatus",
    shortname = "htr"
)]
pub struct HTTPRouteGroupSpec {
    /// The named matches of this group.
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
}

/// One HTTP match: path regex, methods and header regexes, all ANDed.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatch {
    /// Name of the match, referenced from TrafficTarget rules.
    pub name: String,
    /// Regex anchored at the start of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// HTTP methods; `*` matches any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header name to value regex.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "header_filters"
    )]
    pub headers: BTreeMap<String, String>,
}

/// Accepts the v1alpha4 map form and the older list-of-maps form of headers.
fn header_filters<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Map(BTreeMap<String, String>),
        List(Vec<BTreeMap<String, String>>),
    }
    Ok(match Option::<Form>::deserialize(d)? {
        None => BTreeMap::new(),
        Some(Form::Map(m)) => m,
        Some(Form::List(l)) => l.into_iter().flatten().collect(),
    })
}

/// TCPRoute: L4 traffic on a list of ports.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "specs.smi-spec.io",
    version = "v1alpha4",
    kind = "TCPRoute",
    namespaced,
    derive = "PartialEq",
    status = "SmiStatus"
)]
pub struct TCPRouteSpec {
    /// The ports matched; none means every port of the service.
    #[serde(default)]
    pub matches: TcpMatch,
}

/// Ports of a TCPRoute.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub struct TcpMatch {
    /// Port numbers; empty means all.
    #[serde(default)]
    pub ports: Vec<i32>,
}

/// MeshConfig: mesh-wide settings that override `weft up`'s flags while it exists.
/// Cluster-scoped; when several exist the oldest applies and the others are reported.
#[derive(
    CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq,
)]
#[kube(
    group = "config.weft.dev",
    version = "v1alpha1",
    kind = "MeshConfig",
    derive = "PartialEq",
    status = "SmiStatus",
    printcolumn = r#"{"name":"Access","type":"string","jsonPath":".spec.access"}"#,
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfigSpec {
    /// Authorization mode; unset keeps the control plane's flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessPolicy>,
    /// Inbound mutual TLS mode; unset keeps the control plane's flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsPolicy>,
    /// Ports treated as opaque TCP when nothing declares their protocol, in addition
    /// to the built-in server-first ports (25, 587, 3306, 4444, 5432, 6379, 9300, 11211).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = {"type": "integer", "minimum": 1, "maximum": 65535}))]
    pub opaque_ports: Vec<u16>,
    /// How long a sidecar waits for a client's first bytes on an undeclared port
    /// before it treats the connection as TCP (a Gateway API duration such as
    /// `500ms` or `1s`; default `1s`; `0s` treats undeclared ports as TCP at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": DURATION_RULE,
        "message": "must be a duration such as 500ms, 1s or 1m30s"
    }]))]
    pub protocol_detection_timeout: Option<String>,
    /// What sidecars do with `%2F` and `%5C` (escaped slashes) in request paths,
    /// which could otherwise let a request slip past a path rule; default
    /// `UnescapeAndRedirect`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escaped_slashes: Option<EscapedSlashesPolicy>,
    /// Mesh-wide TrafficPolicy defaults: every Service port gets each field no
    /// TrafficPolicy sets for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_defaults: Option<policy::TrafficSettings>,
    /// Access logs and tracing of every sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<telemetry::TelemetrySettings>,
}

/// Handling of escaped slashes (`%2F`, `%5C`) in request paths. Paths are always
/// normalized (RFC 3986 dot segments, percent-decoded unreserved characters, merged
/// slashes) before authorization and routing; this decides the escaped slashes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum EscapedSlashesPolicy {
    /// Unescape them and redirect the client to the resulting path (gRPC requests get
    /// an INTERNAL error), so every party sees the same path.
    UnescapeAndRedirect,
    /// Refuse the request with 400.
    Reject,
    /// Unescape them and forward the request: the app receives real slashes.
    UnescapeAndForward,
    /// Leave them as they are (unsafe with path rules if the app decodes `%2F`).
    KeepUnchanged,
}

/// Whether meshed workloads need a TrafficTarget to be reached.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum AccessPolicy {
    /// Only what TrafficTargets grant (the SMI default).
    DenyByDefault,
    /// Every meshed caller is allowed, still over mutual TLS (for adoption).
    Permissive,
}

/// How meshed workloads accept inbound connections.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum MtlsPolicy {
    /// Only mutual TLS from the mesh.
    Strict,
    /// Mutual TLS and plaintext.
    Permissive,
}

/// Every CRD Weft installs, as `(file stem, CRD)`: each serves every version of
/// [`conversion::SERVED_KINDS`], newest first, and stores the newest; kinds whose
/// versions' schemas differ convert through `weft-webhook`'s `/convert` (the
/// `weft-webhook` Service in `weft-system`: the chart's controller points it at the
/// release namespace and fills in the `caBundle`).
pub fn all_crds() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    use kube::CustomResourceExt;
    use versions::{
        access_v1alpha2, hoist_spec, int_or_string_types, specs_v1alpha1, specs_v1alpha2,
        specs_v1alpha3, split_v1alpha1, split_v1alpha2, split_v1alpha3,
    };
    vec![
        (
            "trafficsplits.split.smi-spec.io",
            multi_version(vec![
                TrafficSplit::crd(),
                split_v1alpha3::TrafficSplit::crd(),
                split_v1alpha2::TrafficSplit::crd(),
                int_or_string_types(split_v1alpha1::TrafficSplit::crd()),
            ]),
        ),
        (
            "traffictargets.access.smi-spec.io",
            multi_version(vec![
                TrafficTarget::crd(),
                access_v1alpha2::TrafficTarget::crd(),
            ]),
        ),
        (
            "httproutegroups.specs.smi-spec.io",
            multi_version(vec![
                HTTPRouteGroup::crd(),
                specs_v1alpha3::HTTPRouteGroup::crd(),
                hoist_spec(specs_v1alpha2::HTTPRouteGroup::crd()),
                hoist_spec(specs_v1alpha1::HTTPRouteGroup::crd()),
            ]),
        ),
        (
            "tcproutes.specs.smi-spec.io",
            multi_version(vec![
                TCPRoute::crd(),
                specs_v1alpha3::TCPRoute::crd(),
                hoist_spec(specs_v1alpha2::TCPRoute::crd()),
                hoist_spec(specs_v1alpha1::TCPRoute::crd()),
            ]),
        ),
        ("meshconfigs.config.weft.dev", MeshConfig::crd()),
        (
            "trafficpolicies.policy.weft.dev",
            policy::TrafficPolicy::crd(),
        ),
    ]
}

/// One CRD serving the versions of `crds` (single-version CRDs of one kind, the stored
/// version first), in that order, with the conversion strategy
/// [`conversion::SERVED_KINDS`] gives the kind.
fn multi_version(
    crds: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceConversion, ServiceReference, WebhookClientConfig, WebhookConversion,
    };
    let mut crds = crds.into_iter();
    let Some(mut merged) = crds.next() else {
        return Default::default();
    };
    for crd in crds {
        merged
            .spec
            .versions
            .extend(crd.spec.versions.into_iter().map(|mut v| {
                v.storage = false;
                v
            }));
    }
    let webhook = conversion::SERVED_KINDS
        .iter()
        .any(|k| k.kind == merged.spec.names.kind && k.webhook);
    merged.spec.conversion = Some(if webhook {
        CustomResourceConversion {
            strategy: "Webhook".to_string(),
            webhook: Some(WebhookConversion {
                conversion_review_versions: vec!["v1".to_string()],
                client_config: Some(WebhookClientConfig {
                    service: Some(ServiceReference {
                        name: conversion::WEBHOOK_SERVICE.to_string(),
                        namespace: conversion::WEBHOOK_NAMESPACE.to_string(),
                        path: Some(conversion::WEBHOOK_PATH.to_string()),
                        port: Some(443),
                    }),
                    ..Default::default()
                }),
            }),
        }
    } else {
        CustomResourceConversion {
            strategy: "None".to_string(),
            webhook: None,
        }
    });
    merged
}

/// Renders every CRD as `(file name, YAML text)`, as `crdgen` writes them.
pub fn render_crds() -> Result<Vec<(String, String)>, CrdError> {
    all_crds()
        .into_iter()
        .map(|(name, crd)| {
            let body = serde_yaml_ng::to_string(&crd).map_err(|source| CrdError::Render {
                name: name.to_string(),
                source,
            })?;
            Ok((
                format!("{name}.yaml"),
                format!(
                    "# Generated by `cargo run -p weft-crds --bin crdgen`; do not edit.\n{body}"
                ),
            ))
        })
        .collect()
}

/// Labels and annotations Weft reads or writes on pods and namespaces: the contract
/// between the injection webhook and the control plane.
pub mod annotations {
    /// `enabled` on a namespace opts its pods in; `disabled` on a pod opts it out.
    pub const INJECT: &str = "weft.dev/inject";
    /// The Weft version that injected the pod.
    pub const INJECTED_VERSION: &str = "weft.dev/injected-version";
    /// The app's original HTTP probes, JSON `{"<container>/<kind>": {port, path, scheme}}`.
    pub const ORIGINAL_PROBES: &str = "weft.dev/original-probes";
    /// More inbound ports that bypass the proxy (comma separated).
    pub const EXCLUDE_INBOUND_PORTS: &str = "weft.dev/exclude-inbound-ports";
    /// Outbound CIDRs that bypass the proxy (comma separated).
    pub const EXCLUDE_OUTBOUND_CIDRS: &str = "weft.dev/exclude-outbound-cidrs";
    /// Outbound ports that bypass the proxy (comma separated).
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "weft.dev/exclude-outbound-ports";
    /// Port where the proxy answers the app's rewritten kubelet probes.
    pub const APP_PROBE_PORT: u16 = 15020;
    /// Port of the proxy's readiness endpoint for the kubelet.
    pub const PROXY_HEALTH_PORT: u16 = 15021;
    /// Port of the proxy's Prometheus stats (`/stats/prometheus`) and endpoint health.
    pub const PROXY_METRICS_PORT: u16 = 15090;
    /// The services a pod calls, comma separated (`namespace/service`, `namespace/*`,
    /// `./service`, `./*` for its own namespace, `*/service`): its proxy gets only these.
    pub const EGRESS: &str = "weft.dev/egress";
    /// `on-demand`: the pod's proxy fetches a service's cluster when it first calls it
    /// (HTTP ports; needs delta xDS), instead of holding every cluster from the start.
    pub const OUTBOUND_CLUSTERS: &str = "weft.dev/outbound-clusters";

    /// On an SMI object: what its apiVersion cannot express, kept for the versions that
    /// can (JSON; see [`crate::conversion`]).
    pub const CONVERSION_DATA: &str = "weft.dev/conversion-data";
}

/// Bounds on untrusted input, checked before any parser runs.
pub mod bounds;

/// Gateway API types for the mesh (GAMMA): HTTPRoute, GRPCRoute, ReferenceGrant.
pub mod gateway;

/// Weft's TrafficPolicy (resilience policy attached to Services).
pub mod policy;
pub use gateway::{GRPCRoute, HTTPRoute, ReferenceGrant};
pub use policy::TrafficPolicy;

/// MeshConfig telemetry settings.
pub mod telemetry;

/// Conversion between the SMI versions Weft serves.
pub mod conversion;

/// The older versions' schemas.
mod versions;
