//! Kubernetes mode at scale: `weft controller` fed by the in-process API-server double
//! (`weft_e2e::apiserver`), against `weft up` on the same objects as files.
//!
//! 1. The generated mesh ([`Mesh`], with an SMI budget) is turned into API objects:
//!    every manifest document as JSON, pods made to look like injected pods of a
//!    Deployment (labels, annotations, owner reference, the app container with env,
//!    resources and a rewritten probe, the `weft-init` and `weft-proxy` containers,
//!    volumes, a full status), Services with the fields the API server defaults, and
//!    the Namespaces, ServiceAccounts and EndpointSlices (one per Service, every pod
//!    ready, as the EndpointSlice controller writes them) a cluster has besides. The
//!    double adds uid, resourceVersion, creationTimestamp, generation and a
//!    `managedFields` entry (owner of every field) to each.
//! 2. `weft controller --proxy-identity address` starts on the double's kubeconfig:
//!    time from spawn to `/readyz` 200, RSS once its CPU is quiet.
//! 3. The first PROXIES pods connect as simulated delta-ADS proxies from their pod
//!    IPs; time until all are in sync, RSS.
//! 4. Three changes through the double, each `--repeats` times: a TrafficTarget gets one
//!    more source (RDS `inbound|8080` of the destination's connected pods), an
//!    EndpointSlice one more endpoint (EDS of the service; its pod is created first,
//!    untimed, as a cluster creates the pod before the slice lists it), a TrafficSplit's
//!    weights move by 10 (RDS `<root>:8080` of every caller). Time from the write to
//!    the double to each affected proxy's ACK.
//! 5. `weft up` on the same objects written as manifest files (without what the API
//!    server adds): steps 2 and 3, for the ratios.
//!
//! Proxies are unscoped by default (no `weft.dev/egress` annotation: every proxy gets
//! the whole mesh), as a mesh is until someone writes egress scopes; `--scoped` gives
//! every pod `weft.dev/egress: "./*"`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use weft_e2e::apiserver::ApiServerDouble;

use crate::bench::{
    Binary, ChangeKind, ChangeWriter, Settings, Size, Steps, Target, connect_proxies, log_step,
    own_cpu_ms, run_changes, start_control_plane,
};
use crate::control_plane::{CONTROLLER_NAMESPACE, Source, gib, mib};
use crate::mesh::{self, Mesh, PORT, PodSpec, namespace_name, namespace_of};
use crate::report::{self, RunReport, secs};

#[derive(Debug, clap::Args)]
pub struct KubeArgs {
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    #[arg(long, default_value_t = 5_000)]
    pods: usize,
    /// SMI objects: one HTTPRouteGroup per namespace and the TrafficSplits stay, the
    /// TrafficTargets make up the rest.
    #[arg(long, default_value_t = 500)]
    smi: usize,
    /// Simulated proxies (the first pods, spread over the namespaces).
    #[arg(long, default_value_t = 100)]
    proxies: usize,
    /// Applications of each change (for p50/p99).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// The weft binary under test.
    #[arg(long, default_value = "target/release/weft")]
    weft: PathBuf,
    /// Give every pod the egress annotation `weft.dev/egress: "./*"` (own namespace).
    #[arg(long)]
    scoped: bool,
    /// Skip the `weft up` baseline.
    #[arg(long)]
    no_local: bool,
    #[arg(long)]
    no_changes: bool,
    /// The RSS goal of the controller with the proxies in sync, in MiB.
    #[arg(long, default_value_t = 64)]
    rss_goal_mib: u64,
    #[command(flatten)]
    limits: super::bench::LimitArgs,
    /// Where objects, manifests and logs go (default: a fresh directory under /tmp).
    #[arg(long)]
    work: Option<PathBuf>,
}

/// A fixed point in time for every generated timestamp.
const CREATED: &str = "2026-11-02T09:14:07Z";
/// Nodes the pods are spread over.
const NODES: usize = 50;
/// The version the injection webhook records on pods.
const INJECTED_VERSION: &str = "0.9.0";

/// FNV-1a of `seed`, as `len` lowercase hex digits (stable names and uids).
fn hex_id(seed: &str, len: usize) -> String {
    let mut out = String::new();
    let mut round = 0u8;
    while out.len() < len {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes().chain([round]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
        round += 1;
    }
    out.truncate(len);
    out
}

/// A stable UUID-shaped uid for an object this bench does not store (ReplicaSets).
fn uid_for(seed: &str) -> String {
    weft_e2e::apiserver::uuid_shaped(&hex_id(seed, 32))
}

/// Every YAML document of `text` as JSON.
fn documents(text: &str) -> Result<Vec<Value>, String> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).map_err(|e| format!("parsing the mesh: {e}")))
        .filter(|v| !matches!(v, Ok(Value::Null)))
        .collect()
}

fn one_document(text: &str) -> Result<Value, String> {
    documents(text)?
        .pop()
        .ok_or_else(|| "an empty document".to_string())
}

/// Merges `extra` into `target`: maps recursively, anything else replaced.
fn merge(target: &mut Value, extra: Value) {
    match (target, extra) {
        (Value::Object(t), Value::Object(e)) => {
            for (k, v) in e {
                merge(t.entry(k).or_insert(Value::Null), v);
            }
        }
        (t, e) => *t = e,
    }
}

/// The ReplicaSet a service's pods belong to: `svc-<i>-<hash>`.
fn replica_set(service: usize) -> (String, String) {
    let name = Mesh::service_name(service);
    let hash = hex_id(&name, 10);
    (format!("{name}-{hash}"), hash)
}

/// A generated Pod document made to look like an injected pod of a Deployment, as the
/// API server serves it (the double adds uid, resourceVersion and managedFields).
fn enrich_pod(pod: &mut Value, spec: &PodSpec, index: usize) {
    let app = Mesh::service_name(spec.service);
    let (rs, hash) = replica_set(spec.service);
    let node = index % NODES;
    let host_ip = format!("10.0.{}.{}", node / 200, node % 200 + 10);
    let ip = spec.ip.to_string();
    let probes = json!({"app/readyz": {"port": PORT, "path": "/healthz", "scheme": "HTTP"}});
    let env = |name: &str, value: &str| json!({"name": name, "value": value});
    let field_env = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}});
    let api_access = format!("kube-api-access-{}", hex_id(&spec.name, 5));
    let running = |name: &str, image: &str, ready: bool| {
        json!({
            "name": name, "image": image, "imageID": format!("{image}@sha256:{}", hex_id(image, 64)),
            "containerID": format!("containerd://{}", hex_id(&format!("{}/{name}", spec.name), 64)),
            "ready": ready, "started": true, "restartCount": 0,
            "state": {"running": {"startedAt": CREATED}}, "lastState": {},
            "volumeMounts": [{"name": api_access, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true, "recursiveReadOnly": "Disabled"}],
        })
    };
    let image = format!("registry.example.com/shop/{app}:1.4.{}", spec.service % 10);
    let proxy_image = "envoyproxy/envoy:v1.40.0";
    let init_image = format!("ghcr.io/weft/weft:{INJECTED_VERSION}");
    let condition = |t: &str| json!({"type": t, "status": "True", "lastProbeTime": null, "lastTransitionTime": CREATED});
    merge(
        pod,
        json!({
            "metadata": {
                "generateName": format!("{rs}-"),
                "labels": {
                    "pod-template-hash": hash,
                    "app.kubernetes.io/name": app,
                    "app.kubernetes.io/part-of": "shop",
                    "app.kubernetes.io/version": "1.4",
                    "version": "v1",
                },
                "annotations": {
                    "weft.dev/injected-version": INJECTED_VERSION,
                    "weft.dev/original-probes": probes.to_string(),
                    "kubectl.kubernetes.io/default-container": "app",
                    "kubectl.kubernetes.io/restartedAt": CREATED,
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": PORT.to_string(),
                    "prometheus.io/path": "/metrics",
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                    "uid": uid_for(&rs), "controller": true, "blockOwnerDeletion": true,
                }],
            },
            "spec": {
                "serviceAccount": format!("sa-{}", spec.service),
                "initContainers": [{
                    "name": "weft-init", "image": init_image,
                    "args": ["init-iptables", "--proxy-uid", "1337", "--exclude-inbound-ports", "15020,15021"],
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                    "securityContext": {"runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false, "privileged": false,
                        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}},
                    "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }],
                "containers": [
                    {
                        "name": "app", "image": image, "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                        "env": [
                            env("LOG_LEVEL", "info"),
                            env("LISTEN_ADDR", &format!("0.0.0.0:{PORT}")),
                            env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector.observability:4317"),
                            field_env("POD_NAME", "metadata.name"),
                            field_env("POD_NAMESPACE", "metadata.namespace"),
                        ],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/app-health/app/readyz", "port": 15020, "scheme": "HTTP"},
                            "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                        "volumeMounts": [{"name": api_access, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    },
                    {
                        "name": "weft-proxy", "image": proxy_image, "imagePullPolicy": "IfNotPresent",
                        "args": ["-c", "/etc/weft/bootstrap/envoy.yaml", "--service-node", "$(POD_NAMESPACE)/$(POD_NAME)",
                            "--service-cluster", "$(POD_NAME).$(POD_NAMESPACE)", "--disable-hot-restart",
                            "--drain-strategy", "gradual", "--drain-time-s", "20", "--log-level", "warn"],
                        "env": [field_env("POD_NAME", "metadata.name"), field_env("POD_NAMESPACE", "metadata.namespace"),
                            field_env("POD_IP", "status.podIP"), field_env("SERVICE_ACCOUNT", "spec.serviceAccountName")],
                        "ports": [{"name": "weft-health", "containerPort": 15021, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 15021, "scheme": "HTTP"},
                            "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                        "lifecycle": {"preStop": {"exec": {"command": ["weft", "drain-proxy", "--wait", "20s"]}}},
                        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
                        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": true, "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false, "privileged": false, "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": [
                            {"name": "weft-bootstrap", "mountPath": "/etc/weft/bootstrap"},
                            {"name": "weft-root-ca", "mountPath": "/etc/weft/ca"},
                            {"name": "weft-podinfo", "mountPath": "/etc/weft/podinfo"},
                            {"name": api_access, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                        ],
                        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
                    },
                ],
                "volumes": [
                    {"name": "weft-bootstrap", "configMap": {"name": "weft-bootstrap", "defaultMode": 420}},
                    {"name": "weft-root-ca", "configMap": {"name": "weft-root-ca", "defaultMode": 420}},
                    {"name": "weft-podinfo", "downwardAPI": {"defaultMode": 420, "items": [
                        {"path": "labels", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.labels"}},
                        {"path": "annotations", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.annotations"}},
                        {"path": "name", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}},
                        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                    {"name": api_access, "projected": {"defaultMode": 420, "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}]}},
                ],
                "nodeName": format!("node-{node}"),
                "restartPolicy": "Always", "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
                "terminationGracePeriodSeconds": 30, "securityContext": {}, "enableServiceLinks": true,
                "priority": 0, "preemptionPolicy": "PreemptLowerPriority",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                ],
            },
            "status": {
                "podIPs": [{"ip": ip}],
                "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
                "startTime": CREATED, "qosClass": "Burstable",
                "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"), condition("Ready"),
                    condition("ContainersReady"), condition("PodScheduled")],
                "initContainerStatuses": [{
                    "name": "weft-init", "image": init_image, "imageID": format!("{init_image}@sha256:{}", hex_id(&init_image, 64)),
                    "containerID": format!("containerd://{}", hex_id(&format!("{}/weft-init", spec.name), 64)),
                    "ready": true, "restartCount": 0, "started": false, "lastState": {},
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": CREATED, "finishedAt": CREATED}},
                }],
                "containerStatuses": [running("app", &image, true), running("weft-proxy", proxy_image, true)],
            },
        }),
    );
    // The manifest's `containers: [{name: app, image: app, ...}]` is replaced as a whole.
}

/// A generated Service document with the fields the API server defaults.
fn enrich_service(service: &mut Value) {
    let name = service["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip = service["spec"]["clusterIP"].clone();
    merge(
        service,
        json!({
            "metadata": {
                "labels": {"app": name, "app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "shop"},
                "annotations": {"meta.helm.sh/release-name": "shop", "meta.helm.sh/release-namespace": service["metadata"]["namespace"]},
            },
            "spec": {
                "type": "ClusterIP", "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                "sessionAffinity": "None", "internalTrafficPolicy": "Cluster",
                "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": PORT}],
            },
            "status": {"loadBalancer": {}},
        }),
    );
}

/// The EndpointSlice of `service` listing every pod of it as ready, as the EndpointSlice
/// controller writes it. `uids` holds the stored pods' and services' uids.
fn endpoint_slice(mesh: &Mesh, service: usize, uids: &HashMap<String, String>) -> Value {
    let name = Mesh::service_name(service);
    let namespace = namespace_name(namespace_of(service));
    let uid = |kind: &str, n: &str| {
        uids.get(&format!("{kind}/{namespace}/{n}"))
            .cloned()
            .unwrap_or_default()
    };
    let endpoints: Vec<Value> = mesh
        .pods_of_service(service)
        .enumerate()
        .map(|(j, p)| {
            json!({
                "addresses": [p.ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", (service + j * mesh.services) % NODES),
                "targetRef": {"kind": "Pod", "name": p.name, "namespace": namespace, "uid": uid("Pod", &p.name)},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-{}", hex_id(&format!("slice/{name}"), 5)),
            "namespace": namespace,
            "generateName": format!("{name}-"),
            "labels": {
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "app": name,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": CREATED},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name,
                "uid": uid("Service", &name), "controller": true, "blockOwnerDeletion": true}],
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
    })
}

fn object_key(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or_default(),
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// The pod object of `spec` (its manifest document, enriched).
fn pod_object(spec: &PodSpec, index: usize) -> Result<Value, String> {
    let mut pod = one_document(&mesh::pod_text(spec))?;
    enrich_pod(&mut pod, spec, index);
    Ok(pod)
}

/// What was loaded into the double.
#[derive(Debug, Default)]
struct Loaded {
    /// The objects as generated (without what the API server adds), for `weft up`.
    objects: Vec<Value>,
    /// Per kind, how many.
    counts: Vec<(String, usize)>,
    /// `Kind/namespace/name` → uid.
    uids: HashMap<String, String>,
    /// Mean JSON size of a pod as the double serves it, and of its managedFields.
    pod_bytes: usize,
    pod_managed_fields_bytes: usize,
    /// Total JSON size of everything served.
    served_bytes: usize,
}

/// Generates every object of the mesh and stores it in the double.
fn load(api: &ApiServerDouble, mesh: &Mesh) -> Result<Loaded, String> {
    let mut loaded = Loaded::default();
    let mut generated: Vec<Value> = Vec::new();
    for ns in (0..mesh.namespaces())
        .map(namespace_name)
        .chain([CONTROLLER_NAMESPACE.to_string()])
    {
        generated.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": ns, "labels": {"kubernetes.io/metadata.name": ns, "weft.dev/inject": "enabled"}}}));
    }
    for i in 0..mesh.services {
        generated.push(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {
            "name": format!("sa-{i}"), "namespace": namespace_name(namespace_of(i)),
            "labels": {"app.kubernetes.io/part-of": "shop"}}}),
        );
    }
    let by_name: HashMap<(String, String), usize> = mesh
        .pods
        .iter()
        .enumerate()
        .map(|(m, p)| ((p.namespace(), p.name.clone()), m))
        .collect();
    for text in mesh.texts() {
        for mut doc in documents(&text)? {
            match doc["kind"].as_str() {
                Some("Pod") => {
                    let key = (
                        doc["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        doc["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    );
                    let m = *by_name
                        .get(&key)
                        .ok_or_else(|| format!("pod {key:?} is not in the mesh"))?;
                    enrich_pod(&mut doc, &mesh.pods[m], m);
                }
                Some("Service") => enrich_service(&mut doc),
                _ => {}
            }
            generated.push(doc);
        }
    }
    let store = |object: Value, loaded: &mut Loaded| -> Result<(), String> {
        let key = object_key(&object);
        let stored = api
            .apply_object(object.clone())
            .map_err(|e| format!("storing {key}: {e}"))?;
        let uid = stored["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        loaded.uids.insert(key.clone(), uid);
        let kind = key.split('/').next().unwrap_or_default().to_string();
        match loaded.counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => loaded.counts.push((kind.clone(), 1)),
        }
        let bytes = serde_json::to_vec(&stored).map_or(0, |b| b.len());
        loaded.served_bytes += bytes;
        if kind == "Pod" {
            loaded.pod_bytes += bytes;
            loaded.pod_managed_fields_bytes +=
                serde_json::to_vec(&stored["metadata"]["managedFields"]).map_or(0, |b| b.len());
        }
        loaded.objects.push(object);
        Ok(())
    };
    for object in generated {
        store(object, &mut loaded)?;
    }
    // The EndpointSlice controller's work, once the pods and services have uids.
    for i in 0..mesh.services {
        let slice = endpoint_slice(mesh, i, &loaded.uids);
        store(slice, &mut loaded)?;
    }
    let pods = mesh.pods.len().max(1);
    loaded.pod_bytes /= pods;
    loaded.pod_managed_fields_bytes /= pods;
    // Nothing watches yet: no history needs to be kept (the double keeps every change).
    api.compact();
    Ok(loaded)
}

/// Writes the generated objects as manifest files for `weft up`, 1,000 to a file, each a
/// YAML document in JSON form.
fn write_manifests(objects: &[Value], dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (n, chunk) in objects.chunks(1000).enumerate() {
        let mut text = String::new();
        for o in chunk {
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(o).map_err(|e| e.to_string())?);
            text.push('\n');
        }
        let path = dir.join(format!("objects-{n:03}.yaml"));
        mesh::write_atomically(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Changes as writes to the double, as the cluster's writers make them: `kubectl apply`
/// of a TrafficTarget's or TrafficSplit's spec (status and metadata kept), the
/// EndpointSlice controller's update of a slice after a new pod got ready.
struct ApiChanges<'a> {
    api: &'a ApiServerDouble,
    uids: HashMap<String, String>,
}

impl ApiChanges<'_> {
    /// The stored object with `spec` replaced, written back; returns the instant before
    /// the write.
    fn write_spec(&self, document: &str) -> Result<Instant, String> {
        let new = one_document(document)?;
        let (api_version, kind) = (
            new["apiVersion"].as_str().unwrap_or_default(),
            new["kind"].as_str().unwrap_or_default(),
        );
        let (namespace, name) = (
            new["metadata"]["namespace"].as_str(),
            new["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let mut object = self
            .api
            .get(api_version, kind, namespace, name)
            .ok_or_else(|| format!("{kind} {namespace:?}/{name} is not stored"))?;
        object["spec"] = new["spec"].clone();
        let at = Instant::now();
        self.api
            .apply_object(object)
            .map_err(|e| format!("writing {kind} {name}: {e}"))?;
        Ok(at)
    }
}

impl ChangeWriter for ApiChanges<'_> {
    fn prepare(&mut self, target: &Target, mesh: &mut Mesh) -> Result<(), String> {
        if let Target::Endpoint { service } = target {
            // Pods added by changes go on the nodes after the generated ones.
            let index = mesh.pods.len() + mesh.pods_of_service(*service).count();
            let spec = mesh.new_pod(*service);
            let pod = pod_object(&spec, index)?;
            let key = object_key(&pod);
            let stored = self
                .api
                .apply_object(pod)
                .map_err(|e| format!("creating {key}: {e}"))?;
            let uid = stored["metadata"]["uid"].as_str().unwrap_or_default();
            self.uids.insert(key, uid.to_string());
        }
        Ok(())
    }

    fn write(&mut self, target: &Target, mesh: &mut Mesh) -> Result<Instant, String> {
        match target {
            Target::Endpoint { service } => {
                let slice = endpoint_slice(mesh, *service, &self.uids);
                let at = Instant::now();
                self.api
                    .apply_object(slice)
                    .map_err(|e| format!("writing the EndpointSlice: {e}"))?;
                Ok(at)
            }
            Target::Access { service } => {
                mesh.add_source(*service);
                let text = mesh
                    .traffic_target_text(*service)
                    .ok_or_else(|| format!("svc-{service} has no TrafficTarget"))?;
                self.write_spec(&text)
            }
            Target::Split { service } => {
                mesh.shift_split(*service);
                let text = mesh
                    .traffic_split_text(*service)
                    .ok_or_else(|| format!("svc-{service} has no TrafficSplit"))?;
                self.write_spec(&text)
            }
            Target::NewService { .. } => Err("new Services are not measured in kube mode".into()),
        }
    }
}

/// What one control plane measured here, beyond the shared [`RunReport`].
#[derive(Debug, Default)]
struct Extra {
    rss_after_changes: Option<u64>,
    hwm_after_changes: Option<u64>,
    /// This process's CPU while the control plane got ready (the double's work, mostly).
    own_cpu_ready_ms: u64,
    /// Spawn → CPU quiet after the start (the first translation, the status and
    /// ConfigMap writes, and their echo through the watches), and the CPU time to then.
    spawn_to_quiet: Option<Duration>,
    cpu_to_quiet_ms: Option<u64>,
    /// Proxies in sync → CPU quiet, waited for before the changes.
    settle_before_changes: Option<Duration>,
}

/// One control plane through start, connect (and, with `writer`, the changes).
async fn measure(
    binary: &mut Binary,
    source: Source,
    mesh: &mut Mesh,
    size: &Size,
    settings: &Settings,
    run_dir: &Path,
    writer: Option<&mut dyn ChangeWriter>,
) -> (RunReport, Extra) {
    let mut report = RunReport::new(&binary.label);
    let mut extra = Extra::default();
    let label = binary.label.clone();
    let own0 = own_cpu_ms();
    let needed_fds = size.proxies as u64 + 1024;
    let spawned = Instant::now();
    let (cp, mut ready) = start_control_plane(binary, source, run_dir, settings, needed_fds).await;
    if let (Some(cp), Ok(r)) = (&cp, &mut ready) {
        // start_control_plane waits at most 20 s for a quiet CPU; the controller may
        // still be digesting its own status writes. Idle RSS is taken once it is quiet.
        cp.wait_quiet(settings.limits.ready_timeout).await;
        extra.spawn_to_quiet = Some(spawned.elapsed());
        extra.cpu_to_quiet_ms = cp.cpu_ms();
        r.idle_rss = cp.rss_bytes().unwrap_or(r.idle_rss);
    }
    // Until quiet, not ready: a little more than the double's share of the start.
    extra.own_cpu_ready_ms = own_cpu_ms().saturating_sub(own0);
    match &ready {
        Ok(r) => log_step(
            &label,
            size,
            &format!(
                "ready in {} (CPU {} ms), CPU quiet {} after the spawn (CPU {} ms), RSS idle {} (weft-scale's own CPU meanwhile: {} ms)",
                secs(r.ready),
                r.cpu_to_ready_ms.unwrap_or(0),
                extra.spawn_to_quiet.map_or("-".into(), secs),
                extra.cpu_to_quiet_ms.unwrap_or(0),
                mib(r.idle_rss),
                extra.own_cpu_ready_ms
            ),
        ),
        Err(e) => log_step(&label, size, &format!("FAILED to get ready: {e}")),
    }
    report.ready = Some(ready);
    let Some(mut cp) = cp else {
        return (report, extra);
    };
    if size.proxies == 0 {
        let _ = cp.terminate(Duration::from_secs(10)).await;
        return (report, extra);
    }
    let pods: Vec<usize> =
        mesh.connect_order[..size.proxies.min(mesh.connect_order.len())].to_vec();
    let (fleet, synced) = connect_proxies(mesh, &pods, &mut cp, settings, &label, size).await;
    let synced_ok = synced.is_ok();
    report.synced = Some(synced);
    if synced_ok && let Some(writer) = writer {
        // Changes are measured on a settled control plane (each repetition waits again,
        // at most 20 s): a change made while it is busy queues behind that work.
        let t = Instant::now();
        cp.wait_quiet(settings.limits.sync_timeout).await;
        extra.settle_before_changes = Some(t.elapsed());
        log_step(
            &label,
            size,
            &format!("CPU quiet {} after the sync", secs(t.elapsed())),
        );
        for kind in [
            ChangeKind::TrafficTarget,
            ChangeKind::Endpoint,
            ChangeKind::TrafficSplit,
        ] {
            let row = run_changes(kind, mesh, &mut *writer, &fleet, &mut cp, settings).await;
            match &row.outcome {
                Ok(stats) => log_step(
                    &label,
                    size,
                    &format!("{}: {} runs done", row.kind, stats.samples.len()),
                ),
                Err(e) => log_step(&label, size, &format!("{} FAILED: {e}", row.kind)),
            }
            report.changes.push(row);
            if let Some(why) = cp.failure() {
                log_step(&label, size, &format!("control plane gone: {why}"));
                break;
            }
        }
        cp.wait_quiet(crate::bench::SETTLE_MAX).await;
        extra.rss_after_changes = cp.rss_bytes();
        extra.hwm_after_changes = cp.hwm_bytes();
    }
    if let Some(why) = cp.failure() {
        // Died after the last measurement: still a failure.
        report.changes.push(report::ChangeRow {
            kind: "control plane alive at the end",
            watched: String::new(),
            outcome: Err(why),
        });
    }
    log_step(
        &label,
        size,
        &format!("peak RSS seen by the watchdog: {}", gib(cp.peak_rss())),
    );
    fleet.stop().await;
    let _ = cp.terminate(Duration::from_secs(10)).await;
    (report, extra)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".to_string(),
    }
}

fn ready_of(r: &RunReport) -> Option<&report::Ready> {
    r.ready.as_ref().and_then(|r| r.as_ref().ok())
}

fn synced_of(r: &RunReport) -> Option<&report::Synced> {
    r.synced.as_ref().and_then(|r| r.as_ref().ok())
}

/// Kubernetes mode against local mode, one row per measure.
fn comparison_table(
    kube: (&RunReport, &Extra),
    local: Option<(&RunReport, &Extra)>,
    goal_mib: u64,
) -> String {
    let local_extra = local.map(|l| l.1);
    let local = local.map(|l| l.0);
    let mut out = vec![
        "| measure | weft controller (API server) | weft up (same objects as files) | controller / up |".to_string(),
        "| --- | --- | --- | --- |".to_string(),
    ];
    let cell = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    let mut line = |what: &str, k: Option<f64>, l: Option<f64>, show: &dyn Fn(f64) -> String| {
        out.push(format!(
            "| {what} | {} | {} | {} |",
            cell(k.map(show)),
            cell(l.map(show)),
            ratio(k, l)
        ));
    };
    let (k, extra) = kube;
    let show_secs = |s: f64| secs(Duration::from_secs_f64(s));
    let show_mib = |b: f64| mib(b as u64);
    line(
        "start → ready",
        ready_of(k).map(|r| r.ready.as_secs_f64()),
        local.and_then(ready_of).map(|r| r.ready.as_secs_f64()),
        &show_secs,
    );
    line(
        "control plane CPU, start → ready",
        ready_of(k)
            .and_then(|r| r.cpu_to_ready_ms)
            .map(|ms| ms as f64 / 1e3),
        local
            .and_then(ready_of)
            .and_then(|r| r.cpu_to_ready_ms)
            .map(|ms| ms as f64 / 1e3),
        &show_secs,
    );
    line(
        "spawn → CPU quiet (first translation, status writes and their echo)",
        extra.spawn_to_quiet.map(|d| d.as_secs_f64()),
        local_extra
            .and_then(|e| e.spawn_to_quiet)
            .map(|d| d.as_secs_f64()),
        &show_secs,
    );
    line(
        "control plane CPU, spawn → quiet",
        extra.cpu_to_quiet_ms.map(|ms| ms as f64 / 1e3),
        local_extra
            .and_then(|e| e.cpu_to_quiet_ms)
            .map(|ms| ms as f64 / 1e3),
        &show_secs,
    );
    line(
        "weft-scale CPU, start → controller quiet (mostly the double serving the lists)",
        Some(extra.own_cpu_ready_ms as f64 / 1e3),
        None,
        &show_secs,
    );
    line(
        "RSS idle (ready, CPU quiet)",
        ready_of(k).map(|r| r.idle_rss as f64),
        local.and_then(ready_of).map(|r| r.idle_rss as f64),
        &show_mib,
    );
    line(
        "proxies connected → all in sync",
        synced_of(k).map(|s| s.time.as_secs_f64()),
        local.and_then(synced_of).map(|s| s.time.as_secs_f64()),
        &show_secs,
    );
    line(
        "RSS with the proxies in sync",
        synced_of(k).map(|s| s.rss as f64),
        local.and_then(synced_of).map(|s| s.rss as f64),
        &show_mib,
    );
    line(
        "VmHWM with the proxies in sync",
        synced_of(k).map(|s| s.hwm as f64),
        local.and_then(synced_of).map(|s| s.hwm as f64),
        &show_mib,
    );
    line(
        "proxies in sync → CPU quiet (before the changes)",
        extra.settle_before_changes.map(|d| d.as_secs_f64()),
        None,
        &show_secs,
    );
    line(
        "RSS after the changes",
        extra.rss_after_changes.map(|b| b as f64),
        None,
        &show_mib,
    );
    line(
        "VmHWM after the changes",
        extra.hwm_after_changes.map(|b| b as f64),
        None,
        &show_mib,
    );
    let worst = [
        ready_of(k).map(|r| r.idle_rss),
        synced_of(k).map(|s| s.rss),
        extra.rss_after_changes,
    ]
    .into_iter()
    .flatten()
    .max();
    let verdict = match worst {
        Some(b) if b <= goal_mib << 20 => format!("met (highest steady RSS {})", mib(b)),
        Some(b) => format!("NOT met (highest steady RSS {})", mib(b)),
        None => "-".to_string(),
    };
    out.push(format!(
        "| controller RSS goal ≤ {goal_mib} MiB (the issue's, at 1,000 services / 5,000 pods, where istiod needs ~1.5 GB) | {verdict} | | |"
    ));
    out.join("\n")
}

/// API requests the controller made to the double, by verb and resource.
fn request_summary(api: &ApiServerDouble) -> String {
    const RESOURCES: [&str; 14] = [
        "namespaces",
        "services",
        "pods",
        "serviceaccounts",
        "endpointslices",
        "trafficsplits",
        "traffictargets",
        "httproutegroups",
        "tcproutes",
        "meshconfigs",
        "secrets",
        "configmaps",
        "leases",
        "events",
    ];
    const VERBS: [&str; 7] = [
        "list", "watch", "get", "create", "update", "patch", "delete",
    ];
    let mut parts = Vec::new();
    for verb in VERBS {
        let mut items = Vec::new();
        for resource in RESOURCES {
            for sub in ["", "status"] {
                let n = api.requests(verb, resource, sub);
                if n > 0 {
                    let name = if sub.is_empty() {
                        resource.to_string()
                    } else {
                        format!("{resource}/{sub}")
                    };
                    items.push(format!("{name} {n}"));
                }
            }
        }
        if !items.is_empty() {
            parts.push(format!("{verb}: {}", items.join(", ")));
        }
    }
    parts.join("; ")
}

/// The whole `kube` subcommand.
pub async fn run(args: KubeArgs, shell_nofile: (u64, u64)) -> ExitCode {
    let begun = Instant::now();
    let work = args.work.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("weft-scale-kube-{}", std::process::id()))
    });
    for old in ["controller", "local"] {
        let _ = std::fs::remove_dir_all(work.join(old));
    }
    if let Err(e) = std::fs::create_dir_all(&work) {
        eprintln!("error: creating {}: {e}", work.display());
        return ExitCode::FAILURE;
    }
    let weft = match std::fs::canonicalize(&args.weft) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: weft binary {}: {e}", args.weft.display());
            return ExitCode::FAILURE;
        }
    };
    let mut mesh = match Mesh::new(args.services, args.pods, args.scoped, 0).with_smi(args.smi) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let size = Size {
        services: args.services,
        pods: args.pods,
        proxies: args.proxies.min(args.pods),
        scope: args.scoped,
    };
    let settings = Settings {
        work: work.clone(),
        repeats: args.repeats.max(1),
        limits: args.limits.limits(),
        unscoped_sample: 0,
        steps: Steps {
            connect: true,
            changes: !args.no_changes,
            restart: false,
            unscoped: false,
        },
        shell_nofile,
    };
    println!("# weft-scale kube");
    println!();
    println!("- weft: {}", weft.display());
    println!(
        "- {} services / {} pods / {} SMI objects, {} simulated proxies ({}), repeats {}, change timeout {:?}, work dir {}",
        size.services,
        size.pods,
        mesh.smi_count(),
        size.proxies,
        if size.scope {
            "scoped to their namespace"
        } else {
            "unscoped: every proxy gets the whole mesh"
        },
        settings.repeats,
        settings.limits.change_timeout,
        work.display()
    );
    println!();

    // 1. The objects, into the double.
    let api = match ApiServerDouble::start().await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: starting the API-server double: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = Instant::now();
    let loaded = match load(&api, &mesh) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: loading the double: {e}");
            return ExitCode::FAILURE;
        }
    };
    let counts: Vec<String> = loaded
        .counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "[double] {} objects stored in {}: {}",
        loaded.objects.len(),
        secs(t.elapsed()),
        counts.join(", ")
    );
    println!(
        "[double] served JSON: {:.1} MiB in all; a pod {:.1} KiB, of which managedFields {:.1} KiB (real pods: 5-20 KiB, managedFields often a third)",
        loaded.served_bytes as f64 / f64::from(1 << 20),
        loaded.pod_bytes as f64 / 1024.0,
        loaded.pod_managed_fields_bytes as f64 / 1024.0
    );
    let kubeconfig = work.join("kubeconfig");
    if let Err(e) = api.write_kubeconfig(&kubeconfig) {
        eprintln!("error: writing {}: {e}", kubeconfig.display());
        return ExitCode::FAILURE;
    }
    let manifests = work.join("local").join("manifests");
    if !args.no_local
        && let Err(e) = write_manifests(&loaded.objects, &manifests)
    {
        eprintln!("error: writing the manifests: {e}");
        return ExitCode::FAILURE;
    }

    // 2-4. weft controller.
    let mut controller = Binary {
        label: "weft controller".to_string(),
        path: weft.clone(),
        fd_limit: None,
    };
    let kube_dir = work.join("controller");
    let _ = std::fs::create_dir_all(&kube_dir);
    let mut writer = ApiChanges {
        api: &api,
        uids: loaded.uids,
    };
    let writer: Option<&mut dyn ChangeWriter> = if args.no_changes {
        None
    } else {
        Some(&mut writer)
    };
    let t = Instant::now();
    let (kube_report, kube_extra) = measure(
        &mut controller,
        Source::ApiServer { kubeconfig },
        &mut mesh,
        &size,
        &settings,
        &kube_dir,
        writer,
    )
    .await;
    println!(
        "[weft controller] done in {}; API requests: {}",
        secs(t.elapsed()),
        request_summary(&api)
    );
    drop(api);

    // 5. weft up on the same objects.
    let local_report = if args.no_local {
        None
    } else {
        let mut up = Binary {
            label: "weft up".to_string(),
            path: weft.clone(),
            fd_limit: None,
        };
        let local_dir = work.join("local");
        let source = Source::Files {
            manifests: manifests.clone(),
            state_dir: local_dir.join("state"),
        };
        let t = Instant::now();
        let measured = measure(
            &mut up, source, &mut mesh, &size, &settings, &local_dir, None,
        )
        .await;
        println!("[weft up] done in {}", secs(t.elapsed()));
        Some(measured)
    };

    println!();
    println!(
        "## {} services / {} pods / {} SMI objects, {} proxies",
        size.services,
        size.pods,
        mesh.smi_count(),
        size.proxies
    );
    println!();
    println!(
        "{}",
        comparison_table(
            (&kube_report, &kube_extra),
            local_report.as_ref().map(|(r, e)| (r, e)),
            args.rss_goal_mib
        )
    );
    println!();
    let mut runs = vec![kube_report.clone()];
    runs.extend(local_report.iter().map(|(r, _)| r.clone()));
    println!("{}", report::startup_table(&runs));
    println!();
    println!(
        "### Changes through the API server (time from the write to the double to the affected proxies' ACKs; CPU = controller utime+stime until quiet)"
    );
    println!();
    println!(
        "{}",
        report::changes_table(&[(kube_report.label.clone(), kube_report.changes.clone())])
    );
    println!();
    println!("total time: {}", secs(begun.elapsed()));
    if let Some(hwm) = crate::control_plane::proc_status_kib(std::process::id(), "VmHWM") {
        println!(
            "weft-scale's own peak RSS (the double included): {} MiB",
            hwm / 1024
        );
    }
    let failures: Vec<String> = runs
        .iter()
        .flat_map(|r| {
            r.failures()
                .into_iter()
                .map(|f| format!("{}: {f}", r.label))
        })
        .collect();
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!();
        println!("FAILED measurements:");
        for f in &failures {
            println!("- {f}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_object_of_a_small_mesh_converts_and_slices_list_every_pod() {
        let mesh = Mesh::new(20, 50, false, 0).with_smi(8).unwrap();
        let docs: Vec<Value> = mesh
            .texts()
            .iter()
            .flat_map(|t| documents(t).unwrap())
            .collect();
        let kinds = |k: &str| docs.iter().filter(|d| d["kind"] == k).count();
        assert_eq!(kinds("Service"), 20);
        assert_eq!(kinds("Pod"), 50);
        assert_eq!(
            kinds("TrafficTarget") + kinds("TrafficSplit") + kinds("HTTPRouteGroup"),
            8
        );
        let slice = endpoint_slice(&mesh, 3, &HashMap::new());
        assert_eq!(slice["endpoints"].as_array().map(Vec::len), Some(3));
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-3"
        );
        let mut pod = one_document(&mesh::pod_text(&mesh.pods[3])).unwrap();
        enrich_pod(&mut pod, &mesh.pods[3], 3);
        assert_eq!(pod["status"]["podIP"], mesh.pods[3].ip.to_string());
        assert_eq!(pod["spec"]["serviceAccountName"], "sa-3");
        assert_eq!(pod["metadata"]["labels"]["app"], "svc-3");
        assert_eq!(pod["spec"]["containers"].as_array().map(Vec::len), Some(2));
    }
}
