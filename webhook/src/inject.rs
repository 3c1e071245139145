//! The pure part of injection: a pod in, a JSON patch (or a reason to skip) out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, Pod, Probe, ProjectedVolumeSource, ResourceRequirements,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use crate::WebhookError;

pub use weft_crds::annotations::{
    APP_PROBE_PORT, EXCLUDE_INBOUND_PORTS as EXCLUDE_INBOUND_PORTS_ANNOTATION,
    EXCLUDE_OUTBOUND_CIDRS as EXCLUDE_OUTBOUND_CIDRS_ANNOTATION,
    EXCLUDE_OUTBOUND_PORTS as EXCLUDE_OUTBOUND_PORTS_ANNOTATION, INJECT as INJECT_KEY,
    INJECTED_VERSION as INJECTED_VERSION_ANNOTATION, ORIGINAL_PROBES as ORIGINAL_PROBES_ANNOTATION,
    PROXY_HEALTH_PORT, PROXY_METRICS_PORT,
};

/// Name of the init container that installs the traffic redirect.
pub const INIT_CONTAINER: &str = "weft-init";
/// Name of the proxy container.
pub const PROXY_CONTAINER: &str = "weft-proxy";
/// Volume of the proxy's ServiceAccount token, with which it proves its pod to the
/// control plane (`weft bootstrap --token-file` [`TOKEN_PATH`]).
pub const TOKEN_VOLUME: &str = "weft-token";
/// Where the proxy container finds the token volume.
pub const TOKEN_DIR: &str = "/var/run/secrets/weft";
/// The token file the proxy's bootstrap reads.
pub const TOKEN_PATH: &str = "/var/run/secrets/weft/token";
/// The token's audience: the control plane reviews tokens for this one only.
pub const TOKEN_AUDIENCE: &str = "weft";
/// The token's lifetime; the kubelet replaces it at 80% of that.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;

/// What injection adds, set by the platform team (Helm values).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct InjectConfig {
    /// Weft's version, recorded on injected pods.
    pub version: String,
    /// Image of the proxy (Envoy plus the `weft` binary for its hooks).
    pub proxy_image: String,
    /// Image running `weft init-iptables`.
    pub init_image: String,
    /// UID (and GID) the proxy runs as.
    pub proxy_uid: i64,
    /// ConfigMap holding `envoy.yaml`; `weft controller` publishes it in every namespace
    /// with meshed pods (TLS to the xDS Service, the token volume as proof of the pod).
    pub bootstrap_config_map: String,
    /// ConfigMap holding `ca.crt`, the mesh's trust bundle (published by `weft controller`).
    pub root_ca_config_map: String,
    /// CPU request of the proxy.
    pub proxy_cpu_request: String,
    /// Memory request of the proxy.
    pub proxy_memory_request: String,
    /// Memory limit of the proxy.
    pub proxy_memory_limit: String,
    /// Seconds the proxy drains connections when the pod stops.
    pub drain_seconds: u32,
    /// For clusters without native sidecars: a regular first container that holds
    /// the app back (postStart) until the proxy is ready.
    pub legacy_sidecar: bool,
    /// Deny pod creation when the pod cannot be decoded (default: allow, with a warning).
    pub fail_closed: bool,
}

impl Default for InjectConfig {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION").to_string();
        Self {
            proxy_image: format!("ghcr.io/weft-mesh/proxy:{version}"),
            init_image: format!("ghcr.io/weft-mesh/weft:{version}"),
            version,
            proxy_uid: 1337,
            bootstrap_config_map: "weft-bootstrap".to_string(),
            root_ca_config_map: "weft-root-ca".to_string(),
            proxy_cpu_request: "50m".to_string(),
            proxy_memory_request: "64Mi".to_string(),
            proxy_memory_limit: "256Mi".to_string(),
            drain_seconds: 5,
            legacy_sidecar: false,
            fail_closed: false,
        }
    }
}

/// Why a pod is admitted unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// The pod opted out (`weft.dev/inject: disabled`).
    OptedOut,
    /// The namespace did not opt in.
    NamespaceNotEnabled,
    /// The pod already carries a proxy, injected by this version.
    AlreadyInjected(String),
    /// A host-network pod shares the node's network: no redirect is possible.
    HostNetwork,
}

impl Skip {
    /// A warning for the user, where skipping is surprising.
    pub fn warning(&self) -> Option<String> {
        match self {
            Self::HostNetwork => {
                Some("weft: pod uses hostNetwork; no sidecar injected".to_string())
            }
            _ => None,
        }
    }
}

/// The app's original probe target, kept so the proxy can forward the kubelet's probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalProbe {
    /// The app's port.
    pub port: i32,
    /// The probe path.
    pub path: String,
    /// `HTTP` or `HTTPS`.
    pub scheme: String,
}

fn meta_value<'a>(map: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    map.and_then(|m| m.get(key)).map(String::as_str)
}

/// Decides whether `pod` gets a sidecar; `namespace_labels` is `None` when the API
/// server already selected the namespace (the webhook's namespaceSelector).
pub fn should_inject(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Skip> {
    let meta = &pod.metadata;
    if let Some(version) = meta_value(meta.annotations.as_ref(), INJECTED_VERSION_ANNOTATION) {
        return Err(Skip::AlreadyInjected(version.to_string()));
    }
    let already =
        |cs: Option<&Vec<Container>>| cs.into_iter().flatten().any(|c| c.name == PROXY_CONTAINER);
    if let Some(spec) = &pod.spec
        && (already(Some(&spec.containers)) || already(spec.init_containers.as_ref()))
    {
        return Err(Skip::AlreadyInjected("unknown".to_string()));
    }
    if meta_value(meta.labels.as_ref(), INJECT_KEY) == Some("disabled")
        || meta_value(meta.annotations.as_ref(), INJECT_KEY) == Some("disabled")
    {
        return Err(Skip::OptedOut);
    }
    if let Some(labels) = namespace_labels
        && labels.get(INJECT_KEY).map(String::as_str) != Some("enabled")
    {
        return Err(Skip::NamespaceNotEnabled);
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(Skip::HostNetwork);
    }
    Ok(())
}

/// The label of injected pods (the chart's PodMonitor selects it).
pub const PROXY_LABEL: &str = "weft.dev/proxy";

/// The JSON patch that adds the sidecar to `pod`, or why it is left alone.
pub fn inject(
    pod: &Pod,
    namespace_labels: Option<&BTreeMap<String, String>>,
    config: &InjectConfig,
) -> Result<Result<json_patch::Patch, Skip>, WebhookError> {
    if let Err(skip) = should_inject(pod, namespace_labels) {
        return Ok(Err(skip));
    }
    let mut injected = pod.clone();
    mutate(&mut injected, config)?;
    let before = serde_json::to_value(pod).map_err(WebhookError::Encode)?;
    let after = serde_json::to_value(&injected).map_err(WebhookError::Encode)?;
    Ok(Ok(json_patch::diff(&before, &after)))
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: Some(true),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(i32::from(port)),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn csv(annotations: Option<&BTreeMap<String, String>>, key: &str, always: &[String]) -> String {
    let mut items: Vec<String> = always.to_vec();
    if let Some(extra) = meta_value(annotations, key) {
        items.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    items.join(",")
}

fn init_container(pod: &Pod, config: &InjectConfig) -> Container {
    let annotations = pod.metadata.annotations.as_ref();
    let mut args = vec![
        "init-iptables".to_string(),
        "--proxy-uid".to_string(),
        config.proxy_uid.to_string(),
        "--exclude-inbound-ports".to_string(),
        csv(
            annotations,
            EXCLUDE_INBOUND_PORTS_ANNOTATION,
            &[
                APP_PROBE_PORT.to_string(),
                PROXY_HEALTH_PORT.to_string(),
                PROXY_METRICS_PORT.to_string(),
            ],
        ),
    ];
    for (flag, key) in [
        (
            "--exclude-outbound-cidrs",
            EXCLUDE_OUTBOUND_CIDRS_ANNOTATION,
        ),
        (
            "--exclude-outbound-ports",
            EXCLUDE_OUTBOUND_PORTS_ANNOTATION,
        ),
    ] {
        let value = csv(annotations, key, &[]);
        if !value.is_empty() {
            args.extend([flag.to_string(), value]);
        }
    }
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(config.init_image.clone()),
        args: Some(args),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".to_string())),
                ("memory".to_string(), Quantity("16Mi".to_string())),
            ])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The name spans report for a pod's workload (OpenTelemetry `service.name`): its
/// `app.kubernetes.io/name` or `app` label, else its service account.
pub fn trace_service_name(pod: &Pod) -> String {
    let labels = pod.metadata.labels.as_ref();
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|key| labels.and_then(|l| l.get(*key)))
        .cloned()
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
        })
        .unwrap_or_else(|| "default".to_string())
}

fn proxy_container(config: &InjectConfig, service_name: &str) -> Container {
    let uid = config.proxy_uid;
    Container {
        name: PROXY_CONTAINER.to_string(),
        image: Some(config.proxy_image.clone()),
        args: Some(
            [
                "-c",
                "/etc/weft/bootstrap/envoy.yaml",
                // The control plane knows a sidecar by namespace/name.
                "--service-node",
                "$(POD_NAMESPACE)/$(POD_NAME)",
                "--service-cluster",
                "$(POD_NAME).$(POD_NAMESPACE)",
                "--disable-hot-restart",
                "--drain-strategy",
                "gradual",
                "--drain-time-s",
                &config.drain_seconds.to_string(),
                "--log-level",
                "warn",
            ]
            .map(str::to_string)
            .to_vec(),
        ),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            // Read by the tracer's environment resource detector: the control plane
            // sends every sidecar the same tracer, the sidecar names its workload.
            EnvVar {
                name: "OTEL_RESOURCE_ATTRIBUTES".to_string(),
                value: Some(format!(
                    "service.name={service_name},service.namespace=$(POD_NAMESPACE),k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME)"
                )),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("weft-health".to_string()),
                container_port: i32::from(PROXY_HEALTH_PORT),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("weft-metrics".to_string()),
                container_port: i32::from(PROXY_METRICS_PORT),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            },
        ]),
        startup_probe: Some(http_probe("/ready", PROXY_HEALTH_PORT, 1, 120)),
        readiness_probe: Some(http_probe("/ready", PROXY_HEALTH_PORT, 5, 3)),
        lifecycle: Some(Lifecycle {
            // Stop taking new connections, let in-flight requests finish, then exit.
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(
                        [
                            "weft",
                            "drain-proxy",
                            "--wait",
                            &format!("{}s", config.drain_seconds),
                        ]
                        .map(str::to_string)
                        .to_vec(),
                    ),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(uid),
            run_as_group: Some(uid),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                (
                    "cpu".to_string(),
                    Quantity(config.proxy_cpu_request.clone()),
                ),
                (
                    "memory".to_string(),
                    Quantity(config.proxy_memory_request.clone()),
                ),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity(config.proxy_memory_limit.clone()),
            )])),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("weft-bootstrap", "/etc/weft/bootstrap"),
            mount("weft-root-ca", "/etc/weft/ca"),
            mount("weft-podinfo", "/etc/weft/podinfo"),
            // Only the proxy mounts the token, so the kubelet makes it the proxy UID's.
            mount(TOKEN_VOLUME, TOKEN_DIR),
        ]),
        ..Default::default()
    }
}

fn volumes(config: &InjectConfig) -> Vec<Volume> {
    let config_map = |name: &str, map: &str| Volume {
        name: name.to_string(),
        config_map: Some(ConfigMapVolumeSource {
            name: map.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let field = |path: &str| DownwardAPIVolumeFile {
        path: path.to_string(),
        field_ref: Some(ObjectFieldSelector {
            field_path: format!("metadata.{path}"),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        config_map("weft-bootstrap", &config.bootstrap_config_map),
        config_map("weft-root-ca", &config.root_ca_config_map),
        Volume {
            name: "weft-podinfo".to_string(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![
                    field("labels"),
                    field("annotations"),
                    field("name"),
                    field("namespace"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: TOKEN_VOLUME.to_string(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_string()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".to_string(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

/// Points the app's HTTP probes at the proxy's probe port (plaintext kubelet probes
/// would otherwise meet STRICT mTLS) and returns the originals.
fn rewrite_probes(containers: &mut [Container]) -> BTreeMap<String, OriginalProbe> {
    let mut originals = BTreeMap::new();
    for c in containers.iter_mut() {
        let named_port = |name: &str| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port)
        };
        let mut rewritten = Vec::new();
        for (kind, probe) in [
            ("livez", c.liveness_probe.as_ref()),
            ("readyz", c.readiness_probe.as_ref()),
            ("startupz", c.startup_probe.as_ref()),
        ] {
            let Some(get) = probe.and_then(|p| p.http_get.as_ref()) else {
                continue;
            };
            // HTTPS probes are not forwarded by the proxy: they stay as they are.
            if get
                .scheme
                .as_deref()
                .is_some_and(|s| !s.eq_ignore_ascii_case("HTTP"))
            {
                continue;
            }
            let port = match &get.port {
                IntOrString::Int(n) => Some(*n),
                IntOrString::String(name) => named_port(name),
            };
            let Some(port) = port else {
                continue;
            };
            let key = format!("{}/{kind}", c.name);
            originals.insert(
                key.clone(),
                OriginalProbe {
                    port,
                    path: get.path.clone().unwrap_or_else(|| "/".to_string()),
                    scheme: get.scheme.clone().unwrap_or_else(|| "HTTP".to_string()),
                },
            );
            rewritten.push((kind, format!("/app-health/{key}")));
        }
        for (kind, path) in rewritten {
            let probe = match kind {
                "livez" => c.liveness_probe.as_mut(),
                "readyz" => c.readiness_probe.as_mut(),
                _ => c.startup_probe.as_mut(),
            };
            if let Some(get) = probe.and_then(|p| p.http_get.as_mut()) {
                get.path = Some(path);
                get.port = IntOrString::Int(i32::from(APP_PROBE_PORT));
                get.scheme = Some("HTTP".to_string());
                get.host = None;
            }
        }
    }
    originals
}

fn mutate(pod: &mut Pod, config: &InjectConfig) -> Result<(), WebhookError> {
    let spec = pod.spec.get_or_insert_with(Default::default);
    let originals = rewrite_probes(&mut spec.containers);
    let init = init_container(pod, config);
    let service_name = trace_service_name(pod);
    let spec = pod.spec.get_or_insert_with(Default::default);
    let mut proxy = proxy_container(config, &service_name);
    let mut inits = vec![init];
    if config.legacy_sidecar {
        // Started first and holding the app back until the proxy is ready.
        proxy
            .lifecycle
            .get_or_insert_with(Default::default)
            .post_start = Some(LifecycleHandler {
            exec: Some(ExecAction {
                command: Some(
                    ["weft", "wait-proxy-ready", "--timeout", "120s"]
                        .map(str::to_string)
                        .to_vec(),
                ),
            }),
            ..Default::default()
        });
        spec.containers.insert(0, proxy);
    } else {
        // A native sidecar: starts before the app, stops after it, and never keeps a
        // Job's pod from completing.
        proxy.restart_policy = Some("Always".to_string());
        inits.push(proxy);
    }
    inits.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(inits);
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(config));
    // A label, so a PodMonitor (which selects by label) finds every sidecar.
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(PROXY_LABEL.to_string(), "injected".to_string());
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(
        INJECTED_VERSION_ANNOTATION.to_string(),
        config.version.clone(),
    );
    // The usual scrape annotations, unless the pod already chose its own.
    if !annotations.contains_key("prometheus.io/scrape") {
        for (key, value) in [
            ("prometheus.io/scrape", "true".to_string()),
            ("prometheus.io/port", PROXY_METRICS_PORT.to_string()),
            ("prometheus.io/path", "/stats/prometheus".to_string()),
        ] {
            annotations.insert(key.to_string(), value);
        }
    }
    if !originals.is_empty() {
        let json = serde_json::to_string(&originals).map_err(WebhookError::Encode)?;
        annotations.insert(ORIGINAL_PROBES_ANNOTATION.to_string(), json);
    }
    Ok(())
}
