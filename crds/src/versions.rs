//! The older SMI versions Weft serves besides the stored ones, as schema types for the
//! CRDs only: Weft reads every object in its stored version (see [`crate::conversion`]).
//!
//! Where an SMI version keeps fields at the top level instead of under `spec`
//! (HTTPRouteGroup and TCPRoute v1alpha1 and v1alpha2), the derived schema is hoisted
//! out of `spec` by [`hoist_spec`]; the derived Rust types of those versions do not
//! describe their objects and stay private.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{HttpMatch, IdentityBinding, SmiStatus, TrafficTargetRule, TypedLocalRef};

/// `split.smi-spec.io/v1alpha3`: the same schema as v1alpha4.
pub mod split_v1alpha3 {
    use super::*;

    /// TrafficSplit: weight a root service's traffic over backend services.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha3",
        kind = "TrafficSplit",
        namespaced,
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
        pub backends: Vec<crate::TrafficSplitBackend>,
        /// HTTPRouteGroups restricting the split to matching requests.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub matches: Vec<TypedLocalRef>,
    }
}

/// `split.smi-spec.io/v1alpha2`: no `matches`.
pub mod split_v1alpha2 {
    use super::*;

    /// TrafficSplit v1alpha2.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficSplit",
        namespaced,
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
        pub backends: Vec<crate::TrafficSplitBackend>,
    }
}

/// `split.smi-spec.io/v1alpha1`: weights are quantities, no `matches`.
pub mod split_v1alpha1 {
    use super::*;

    /// TrafficSplit v1alpha1.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "split.smi-spec.io",
        version = "v1alpha1",
        kind = "TrafficSplit",
        namespaced,
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
    }

    /// One backend of a v1alpha1 TrafficSplit.
    #[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
    pub struct TrafficSplitBackend {
        /// Backend service name in the split's namespace.
        pub service: String,
        /// Relative weight, a quantity (`1` = `1000m`); Weft stores it in whole
        /// milli-units, so it must not be finer than `1m`.
        #[schemars(schema_with = "super::quantity_schema")]
        pub weight: serde_json::Value,
    }
}

/// `access.smi-spec.io/v1alpha2`: the same schema as v1alpha3 in Weft (whose v1alpha3
/// keeps v1alpha2's `destination.port`).
pub mod access_v1alpha2 {
    use super::*;

    /// TrafficTarget: which source identities may reach a destination identity.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "access.smi-spec.io",
        version = "v1alpha2",
        kind = "TrafficTarget",
        namespaced,
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
}

/// `specs.smi-spec.io/v1alpha3`: HTTPRouteGroup as v1alpha4; TCPRoute's spec is empty.
pub mod specs_v1alpha3 {
    use super::*;

    /// HTTPRouteGroup: named HTTP request matches.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha3",
        kind = "HTTPRouteGroup",
        namespaced,
        status = "SmiStatus",
        shortname = "htr"
    )]
    pub struct HTTPRouteGroupSpec {
        /// The named matches of this group.
        #[serde(default)]
        pub matches: Vec<HttpMatch>,
    }

    /// TCPRoute v1alpha3: any TCP traffic (ports came in v1alpha4).
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha3",
        kind = "TCPRoute",
        namespaced,
        status = "SmiStatus"
    )]
    pub struct TCPRouteSpec {}
}

/// `specs.smi-spec.io/v1alpha2`: HTTPRouteGroup `matches` at the top level; TCPRoute
/// without a spec. Schema only (hoisted).
pub(crate) mod specs_v1alpha2 {
    use super::*;

    /// HTTPRouteGroup v1alpha2: `matches` at the top level (hoisted out of `spec`).
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha2",
        kind = "HTTPRouteGroup",
        namespaced,
        status = "SmiStatus",
        shortname = "htr"
    )]
    pub struct HTTPRouteGroupSpec {
        /// The named matches of this group.
        #[serde(default)]
        pub matches: Vec<HttpMatch>,
    }

    /// TCPRoute v1alpha2: no fields (its `spec` is hoisted away).
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha2",
        kind = "TCPRoute",
        namespaced,
        status = "SmiStatus"
    )]
    pub struct TCPRouteSpec {}
}

/// `specs.smi-spec.io/v1alpha1`: as v1alpha2, and matches have no headers.
pub(crate) mod specs_v1alpha1 {
    use super::*;

    /// HTTPRouteGroup v1alpha1: `matches` at the top level, without headers.
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha1",
        kind = "HTTPRouteGroup",
        namespaced,
        status = "SmiStatus",
        shortname = "htr"
    )]
    pub struct HTTPRouteGroupSpec {
        /// The named matches of this group.
        #[serde(default)]
        pub matches: Vec<HttpMatch>,
    }

    /// One v1alpha1 HTTP match: path regex and methods (headers came in v1alpha2).
    #[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
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
    }

    /// TCPRoute v1alpha1: no fields (its `spec` is hoisted away).
    #[derive(CustomResource, Clone, Debug, Deserialize, Serialize, JsonSchema)]
    #[kube(
        group = "specs.smi-spec.io",
        version = "v1alpha1",
        kind = "TCPRoute",
        namespaced,
        status = "SmiStatus"
    )]
    pub struct TCPRouteSpec {}
}

/// The schema of a Kubernetes quantity (an integer or a string such as `500m`), as the
/// API server's own types declare it; negative quantities are refused.
pub(crate) fn quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Relative weight, a quantity (`1` = `1000m`); Weft stores it in whole milli-units, so it must not be finer than `1m`.",
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        "x-kubernetes-int-or-string": true
    })
}

/// Gives the `anyOf` of every `x-kubernetes-int-or-string` schema its two types
/// (`integer`, `string`), which kube's structural rewrite leaves empty.
pub(crate) fn int_or_string_types(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn visit(schema: &mut JSONSchemaProps) {
        if schema.x_kubernetes_int_or_string == Some(true) {
            schema.any_of = Some(
                ["integer", "string"]
                    .map(|t| JSONSchemaProps {
                        type_: Some(t.to_string()),
                        ..Default::default()
                    })
                    .to_vec(),
            );
        }
        for property in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
            visit(property);
        }
        if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
            visit(items);
        }
    }
    for version in &mut crd.spec.versions {
        if let Some(root) = (version.schema.as_mut()).and_then(|s| s.open_api_v3_schema.as_mut()) {
            visit(root);
        }
    }
    crd
}

/// Moves the fields of `spec` to the top level of the (single-version) CRD's schema,
/// for the SMI versions that have no `spec`.
pub(crate) fn hoist_spec(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    for version in &mut crd.spec.versions {
        let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        else {
            continue;
        };
        let spec: Option<JSONSchemaProps> = root.properties.as_mut().and_then(|p| p.remove("spec"));
        if let Some(required) = root.required.as_mut() {
            required.retain(|r| r != "spec");
        }
        let Some(spec) = spec else { continue };
        let properties = root.properties.get_or_insert_with(Default::default);
        properties.extend(spec.properties.unwrap_or_default());
        let required: Vec<String> = root
            .required
            .take()
            .unwrap_or_default()
            .into_iter()
            .chain(spec.required.unwrap_or_default())
            .collect();
        root.required = (!required.is_empty()).then_some(required);
    }
    crd
}
