//! Every API request `weft controller` makes, by API group, resource and verb: the
//! source of its RBAC. The chart's ClusterRole and Role are compared with this list by
//! a test, and the end-to-end tests check that the controller calls nothing else.

/// Where a permission applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (ClusterRole).
    Cluster,
    /// The controller's own namespace only (Role).
    OwnNamespace,
}

/// One API permission: group (`""` for core), resource (`plural` or
/// `plural/subresource`), verbs, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group; `""` is the core group.
    pub group: &'static str,
    /// Resource, with `/status` for the status subresource.
    pub resource: &'static str,
    /// Verbs, sorted.
    pub verbs: &'static [&'static str],
    /// Cluster-wide or in the controller's namespace.
    pub scope: Scope,
    /// The only objects it applies to (RBAC `resourceNames`); empty: any object.
    pub names: &'static [&'static str],
    /// A `weft controller` flag with which none of these calls is made (the chart
    /// leaves the rule out when it passes that flag).
    pub unless: Option<&'static str>,
    /// Why the controller needs it.
    pub why: &'static str,
}

const WATCH: &[&str] = &["list", "watch"];
/// Any object of the resource.
const ANY: &[&str] = &[];
/// The flag that leaves the webhook's certificate to cert-manager.
pub const NO_WEBHOOK_CERTIFICATE: &str = "--no-webhook-certificate";

/// What the controller calls, and why.
pub const CONTROLLER_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "the model's services",
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "endpoints and their conditions",
    },
    ApiAccess {
        group: "",
        resource: "pods",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "workloads: IPs, ports, ServiceAccounts",
    },
    ApiAccess {
        group: "",
        resource: "namespaces",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "where the trust bundle goes",
    },
    ApiAccess {
        group: "",
        resource: "serviceaccounts",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "TrafficTarget identities",
    },
    ApiAccess {
        group: "split.smi-spec.io",
        resource: "trafficsplits",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "SMI input",
    },
    ApiAccess {
        group: "access.smi-spec.io",
        resource: "traffictargets",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "SMI input",
    },
    ApiAccess {
        group: "specs.smi-spec.io",
        resource: "httproutegroups",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "SMI input",
    },
    ApiAccess {
        group: "specs.smi-spec.io",
        resource: "tcproutes",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "SMI input",
    },
    ApiAccess {
        group: "gateway.networking.k8s.io",
        resource: "httproutes",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "Gateway API mesh routes (GAMMA)",
    },
    ApiAccess {
        group: "gateway.networking.k8s.io",
        resource: "grpcroutes",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "Gateway API mesh routes (GAMMA)",
    },
    ApiAccess {
        group: "gateway.networking.k8s.io",
        resource: "referencegrants",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "cross-namespace backendRefs a route may use",
    },
    ApiAccess {
        group: "config.weft.dev",
        resource: "meshconfigs",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "mesh-wide settings",
    },
    ApiAccess {
        group: "policy.weft.dev",
        resource: "trafficpolicies",
        verbs: WATCH,
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "resilience policy (TrafficPolicy)",
    },
    ApiAccess {
        group: "split.smi-spec.io",
        resource: "trafficsplits/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "access.smi-spec.io",
        resource: "traffictargets/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "specs.smi-spec.io",
        resource: "httproutegroups/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "specs.smi-spec.io",
        resource: "tcproutes/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "gateway.networking.k8s.io",
        resource: "httproutes/status",
        verbs: &["get", "patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "route status per parent (read-modify-write: status.parents is atomic)",
    },
    ApiAccess {
        group: "gateway.networking.k8s.io",
        resource: "grpcroutes/status",
        verbs: &["get", "patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "route status per parent (read-modify-write: status.parents is atomic)",
    },
    ApiAccess {
        group: "policy.weft.dev",
        resource: "trafficpolicies/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "config.weft.dev",
        resource: "meshconfigs/status",
        verbs: &["patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "status conditions (server-side apply)",
    },
    ApiAccess {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "an Event per status transition (patch: repeats of one)",
    },
    ApiAccess {
        group: "",
        resource: "configmaps",
        verbs: &["create", "list", "patch", "watch"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "the weft-root-ca trust bundle (server-side apply; watched by name to rewrite it)",
    },
    ApiAccess {
        group: "authentication.k8s.io",
        resource: "tokenreviews",
        verbs: &["create"],
        scope: Scope::Cluster,
        names: ANY,
        unless: None,
        why: "sidecar ServiceAccount tokens on xDS streams",
    },
    ApiAccess {
        group: "",
        resource: "secrets",
        verbs: &["create", "get"],
        scope: Scope::OwnNamespace,
        names: ANY,
        unless: None,
        why: "the CA Secret (read, or created once) and the webhook's serving certificate",
    },
    ApiAccess {
        group: "",
        resource: "secrets",
        verbs: &["update"],
        scope: Scope::OwnNamespace,
        names: &[super::webhook_cert::DEFAULT_SECRET],
        unless: Some(NO_WEBHOOK_CERTIFICATE),
        why: "the webhook's serving certificate, renewed in place",
    },
    ApiAccess {
        group: "admissionregistration.k8s.io",
        resource: "mutatingwebhookconfigurations",
        verbs: &["get", "patch"],
        scope: Scope::Cluster,
        names: &[super::webhook_cert::DEFAULT_CONFIGURATION],
        unless: Some(NO_WEBHOOK_CERTIFICATE),
        why: "the sidecar injector's caBundle (Weft's trust bundle)",
    },
    ApiAccess {
        group: "apiextensions.k8s.io",
        resource: "customresourcedefinitions",
        verbs: &["get", "patch"],
        scope: Scope::Cluster,
        names: super::webhook_cert::CONVERSION_CRDS,
        unless: Some(NO_WEBHOOK_CERTIFICATE),
        why: "the SMI CRDs' conversion webhook: this namespace's Service and Weft's trust bundle",
    },
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
        scope: Scope::OwnNamespace,
        names: ANY,
        unless: None,
        why: "leader election",
    },
];

/// The list as JSON: `[{group, resource, verbs, scope: "cluster"|"namespace",
/// resourceNames, unless, why}]` (`resourceNames` empty: any object; `unless`: null or
/// the flag that makes the calls unnecessary).
pub fn access_json() -> serde_json::Value {
    CONTROLLER_ACCESS
        .iter()
        .map(|a| {
            serde_json::json!({
                "group": a.group,
                "resource": a.resource,
                "verbs": a.verbs,
                "scope": match a.scope { Scope::Cluster => "cluster", Scope::OwnNamespace => "namespace" },
                "resourceNames": a.names,
                "unless": a.unless,
                "why": a.why,
            })
        })
        .collect()
}

/// Whether `verb` on `group`/`resource` is in [`CONTROLLER_ACCESS`] (any scope).
pub fn allowed(group: &str, resource: &str, verb: &str) -> bool {
    CONTROLLER_ACCESS
        .iter()
        .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&verb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_are_sorted_and_each_resource_listed_once_per_scope() {
        for a in CONTROLLER_ACCESS {
            let mut sorted = a.verbs.to_vec();
            sorted.sort_unstable();
            assert_eq!(sorted, a.verbs, "{a:?}");
            let same = CONTROLLER_ACCESS
                .iter()
                .filter(|b| {
                    b.group == a.group
                        && b.resource == a.resource
                        && b.scope == a.scope
                        && b.names == a.names
                })
                .count();
            assert_eq!(same, 1, "{a:?}");
            // RBAC cannot narrow these by name.
            if !a.names.is_empty() {
                for verb in ["create", "list", "watch", "deletecollection"] {
                    assert!(!a.verbs.contains(&verb), "{a:?}");
                }
            }
        }
        assert!(allowed("", "pods", "watch"));
        assert!(!allowed("", "pods", "delete"));
        assert!(
            !allowed("", "secrets", "list"),
            "no Secret is listed: only the CA's is read"
        );
    }
}
