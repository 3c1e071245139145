//! The Helm chart `helm/weft`, rendered by the real `helm` (4.x, installed by `make setup`;
//! `WEFT_HELM` points at it) and checked against the code it deploys:
//!
//! - `helm lint --strict` passes, with the default values and with other ones;
//! - every object rendered with the default values and with non-default ones is valid
//!   for Kubernetes 1.29 and 1.33 (`kubernetes-validate --strict`; `WEFT_KUBERNETES_VALIDATE`),
//!   the MeshConfig against the chart's own CRD schema, cert-manager objects structurally;
//! - the ClusterRole and Role grant exactly what `weft controller-access` lists;
//! - the chart's CRDs are crdgen's output;
//! - the MutatingWebhookConfiguration selects the label the injector reads;
//! - the injection ConfigMap is read by the real `weft-webhook` as the values say, and the
//!   controller and webhook arguments parse with the real binaries;
//! - `values.schema.json` rejects a wrong type, an unknown failurePolicy and unknown keys;
//! - the Grafana dashboard renders when enabled, its PromQL parses (`promtool`, from Debian's
//!   `prometheus` package) and uses only the statistics the sidecar keeps and the labels the
//!   PodMonitor sets.
//!
//! A missing tool or binary fails the test with how to get it: nothing is skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test setup fails loudly

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const NAMESPACE: &str = "weft-system";
/// The oldest and newest Kubernetes versions the chart claims.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.33.0"];

/// Non-default values: the issue's list (3 replicas, legacy sidecar, failurePolicy Ignore,
/// a user CA Secret, cert-manager on) and more that change what is rendered.
const CUSTOM_VALUES: &str = r#"
images:
  tag: "1.2.3"
  pullPolicy: Always
  pullSecrets: [{name: regcred}]
controller:
  replicas: 3
  podAntiAffinity: hard
  proxyIdentity: address
  priorityClassName: system-cluster-critical
  tolerations: [{key: dedicated, operator: Equal, value: mesh, effect: NoSchedule}]
  nodeSelector: {kubernetes.io/os: linux}
  podAnnotations: {prometheus.io/scrape: "true"}
  leaseDuration: 20s
ca:
  userSecretName: corp-intermediate-ca
mesh:
  trustDomain: corp.example
  access: Permissive
  mtls: Permissive
  svidTTL: 12h
meshConfig:
  opaquePorts: [7000, 9042]
  protocolDetectionTimeout: 500ms
  escapedSlashes: Reject
webhook:
  replicas: 3
  failurePolicy: Ignore
  timeoutSeconds: 3
  failClosed: true
proxy:
  uid: 2102
  resources:
    requests: {cpu: 20m, memory: 40Mi}
    limits: {memory: 300Mi}
  drainSeconds: 9
  legacySidecar: true
certManager:
  enabled: true
metrics:
  grafanaDashboard:
    enabled: true
    namespace: monitoring
    labels: {team: mesh}
"#;

/// cert-manager with an existing ClusterIssuer, and no MeshConfig.
const ISSUER_VALUES: &str = r#"
certManager:
  enabled: true
  issuerRef: {name: corp-issuer, kind: ClusterIssuer, group: cert-manager.io}
meshConfig:
  create: false
"#;

// ---------------------------------------------------------------------------------------
// Tools

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("helm/weft")
}

fn helm() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_HELM").map(PathBuf::from) {
        assert!(
            p.is_file(),
            "WEFT_HELM={} does not exist: run `make setup` (installs helm into tools/)",
            p.display()
        );
        return p;
    }
    weft_e2e::on_path("helm").unwrap_or_else(|| {
        panic!(
            "helm not found: run `make setup` (installs helm 4 into tools/ and sets WEFT_HELM \
                 for `make test`), or set WEFT_HELM"
        )
    })
}

fn kubernetes_validate() -> PathBuf {
    let dir = std::env::var_os("WEFT_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .expect(
            "WEFT_KUBERNETES_VALIDATE is not set: run `make setup` (installs kubernetes-validate \
             into tools/) and point WEFT_KUBERNETES_VALIDATE at it",
        );
    assert!(
        dir.join("kubernetes_validate").is_dir(),
        "WEFT_KUBERNETES_VALIDATE={} holds no kubernetes_validate: run `make setup`",
        dir.display()
    );
    dir
}

/// A workspace binary (`WEFT_BIN_<NAME>`, else next to this test), as the harness finds them.
fn workspace_binary(name: &str) -> PathBuf {
    weft_e2e::workspace_binary(name)
        .unwrap_or_else(|e| panic!("{e}: run `cargo build --workspace --bins` first"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} {args:?}: {e}", program.display()))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-chart-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Rendering

#[derive(Clone, Copy, Debug)]
enum Values {
    Default,
    Custom,
    Issuer,
}

impl Values {
    const ALL: [Self; 3] = [Self::Default, Self::Custom, Self::Issuer];

    fn yaml(self) -> Option<&'static str> {
        match self {
            Self::Default => None,
            Self::Custom => Some(CUSTOM_VALUES),
            Self::Issuer => Some(ISSUER_VALUES),
        }
    }
}

fn parse_documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `helm template` output (CRDs included) as JSON values; panics with helm's message on failure.
fn render(values: Values, kube_version: &str, extra: &[&str]) -> Vec<Value> {
    let out = helm_template(values, kube_version, extra);
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        text(&out)
    );
    parse_documents(&String::from_utf8(out.stdout).unwrap())
}

fn helm_template(values: Values, kube_version: &str, extra: &[&str]) -> Output {
    let dir = TempDir::new("values");
    let chart = chart();
    let mut args: Vec<String> = [
        "template",
        "weft",
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
        "--include-crds",
        "--kube-version",
        kube_version,
    ]
    .map(str::to_string)
    .to_vec();
    if let Some(yaml) = values.yaml() {
        let file = dir.file("values.yaml", yaml);
        args.extend(["--values".to_string(), file.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&helm(), &args)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn all_of<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s}"))
                .to_string()
        })
        .collect()
}

fn container<'a>(deployment: &'a Value, name: &str) -> &'a Value {
    deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

// ---------------------------------------------------------------------------------------
// helm lint

#[test]
fn helm_lint_strict_passes_with_default_and_custom_values() {
    let dir = TempDir::new("lint");
    let chart = chart();
    for values in Values::ALL {
        let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
        let file;
        if let Some(yaml) = values.yaml() {
            file = dir.file("values.yaml", yaml);
            args.extend(["--values", file.to_str().unwrap()]);
        }
        let out = run(&helm(), &args);
        assert!(
            out.status.success(),
            "helm lint --strict ({values:?}):\n{}",
            text(&out)
        );
        assert!(
            text(&out).contains("0 chart(s) failed"),
            "{values:?}: {}",
            text(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Schemas

/// Kinds no Kubernetes schema covers, and why; anything else must pass kubernetes-validate.
fn not_in_kubernetes_schemas(object: &Value) -> Option<&'static str> {
    let api = object["apiVersion"].as_str().unwrap_or_default();
    if api.starts_with("cert-manager.io/") {
        Some(
            "cert-manager's CRDs are not installable here; checked field by field in cert_manager_*",
        )
    } else if api == "monitoring.coreos.com/v1" {
        Some("the Prometheus Operator's CRD: checked field by field in the PodMonitor test")
    } else if api == "config.weft.dev/v1alpha1" {
        Some("Weft's own CRD: validated against the chart's CRD schema below")
    } else {
        None
    }
}

/// Validates every object with kubernetes-validate --strict for `version`; returns the
/// objects it could not (see [`not_in_kubernetes_schemas`]).
fn validate_for(objects: &[Value], version: &str, label: &str) -> Vec<Value> {
    let dir = TempDir::new("validate");
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        if not_in_kubernetes_schemas(object).is_some() {
            skipped.push(object.clone());
            continue;
        }
        let name = format!(
            "{i:02}-{}-{}.yaml",
            object["kind"].as_str().unwrap(),
            object["metadata"]["name"].as_str().unwrap()
        );
        files.push(dir.file(&name, &serde_yaml_ng::to_string(object).unwrap()));
    }
    assert!(files.len() > 15, "{label}: only {} objects", files.len());
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            version,
        ])
        .args(&files)
        .env("PYTHONPATH", kubernetes_validate())
        .output()
        .expect("python3 runs");
    let report = text(&out);
    assert!(
        out.status.success(),
        "{label}: not valid for Kubernetes {version}:\n{report}"
    );
    // kubernetes-validate exits 0 when it has no schema for a kind: every file must pass.
    for file in &files {
        let shown = file.display().to_string();
        assert!(
            report
                .lines()
                .any(|l| l.contains(&shown) && l.contains(" passed ")),
            "{label}: {shown} was not validated for Kubernetes {version}:\n{report}"
        );
    }
    assert!(
        !report.contains("WARN") && !report.contains("ERROR"),
        "{label}, Kubernetes {version}:\n{report}"
    );
    skipped
}

/// Checks a custom resource against its CRD's openAPIV3Schema as the API server would
/// prune it: unknown fields are errors, `self.matches('...')` rules are regexes.
const CR_AGAINST_CRD: &str = r#"
import json, re, sys
import jsonschema
crd, obj = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
group, version = obj["apiVersion"].split("/")
assert crd["spec"]["group"] == group, (crd["spec"]["group"], group)
assert crd["spec"]["names"]["kind"] == obj["kind"]
if crd["spec"]["scope"] == "Cluster":
    assert "namespace" not in obj["metadata"], "a cluster-scoped object has no namespace"
served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
assert served, "version %s is not served" % version
def strict(s):
    if isinstance(s, dict):
        if "properties" in s and "additionalProperties" not in s \
                and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for rule in s.get("x-kubernetes-validations", []):
            m = re.fullmatch(r"self\.matches\('(.*)'\)", rule["rule"])
            if m:
                s.setdefault("pattern", m.group(1))
        for v in s.values():
            strict(v)
    elif isinstance(s, list):
        for v in s:
            strict(v)
schema = served[0]["schema"]["openAPIV3Schema"]
strict(schema)
schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                            metadata={"type": "object"})
errors = list(jsonschema.Draft7Validator(schema).iter_errors(obj))
for e in errors:
    print("%s: %s" % ("/".join(map(str, e.absolute_path)), e.message))
sys.exit(1 if errors else 0)
"#;

fn validate_against_crd(object: &Value, crds: &[Value]) {
    let kind = object["kind"].as_str().unwrap();
    let crd = crds
        .iter()
        .find(|c| c["spec"]["names"]["kind"] == kind)
        .unwrap_or_else(|| panic!("the chart has no CRD for {kind}"));
    let dir = TempDir::new("cr");
    let crd_file = dir.file("crd.json", &crd.to_string());
    let object_file = dir.file("object.json", &object.to_string());
    let out = Command::new("python3")
        .arg("-c")
        .arg(CR_AGAINST_CRD)
        .arg(&crd_file)
        .arg(&object_file)
        .env("PYTHONPATH", kubernetes_validate())
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{kind} {} does not match its CRD:\n{}",
        object["metadata"]["name"],
        text(&out)
    );
}

#[test]
fn every_rendered_object_is_valid_for_kubernetes_1_29_and_1_33() {
    for values in Values::ALL {
        for version in KUBERNETES_VERSIONS {
            let objects = render(values, version, &[]);
            let label = format!("{values:?} values");
            let skipped = validate_for(&objects, version, &label);
            let crds = all_of(&objects, "CustomResourceDefinition");
            let crds: Vec<Value> = crds.into_iter().cloned().collect();
            for object in &skipped {
                let why = not_in_kubernetes_schemas(object).unwrap();
                eprintln!(
                    "{label}, {version}: {} {} not checked by kubernetes-validate: {why}",
                    object["kind"], object["metadata"]["name"]
                );
                if object["apiVersion"]
                    .as_str()
                    .unwrap()
                    .ends_with(".weft.dev/v1alpha1")
                {
                    validate_against_crd(object, &crds);
                }
            }
            let skipped_kinds: BTreeSet<&str> = skipped
                .iter()
                .map(|o| o["kind"].as_str().unwrap())
                .collect();
            let expected: BTreeSet<&str> = match values {
                Values::Default => ["MeshConfig"].into(),
                Values::Custom => ["MeshConfig", "Certificate", "Issuer"].into(),
                Values::Issuer => ["Certificate"].into(),
            };
            assert_eq!(skipped_kinds, expected, "{label}");
        }
    }
}

#[test]
fn the_crd_check_catches_an_invalid_meshconfig() {
    // The structural check above must be able to fail.
    let objects = render(Values::Default, "1.33.0", &[]);
    let crds: Vec<Value> = all_of(&objects, "CustomResourceDefinition")
        .into_iter()
        .cloned()
        .collect();
    let mut bad = find(&objects, "MeshConfig", "weft").clone();
    bad["spec"]["protocolDetectionTimeout"] = json!("soon");
    let result = std::panic::catch_unwind(|| validate_against_crd(&bad, &crds));
    assert!(result.is_err(), "a bad duration passed the CRD check");
    let mut unknown = find(&objects, "MeshConfig", "weft").clone();
    unknown["spec"]["acess"] = json!("Permissive");
    let result = std::panic::catch_unwind(|| validate_against_crd(&unknown, &crds));
    assert!(result.is_err(), "an unknown field passed the CRD check");
}

#[test]
fn the_chart_crds_are_crdgen_output() {
    let dir = TempDir::new("crdgen");
    let out = run(&workspace_binary("crdgen"), &[dir.0.to_str().unwrap()]);
    assert!(out.status.success(), "crdgen: {}", text(&out));
    let mut generated: BTreeMap<String, Value> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir.0).unwrap() {
        let path = entry.unwrap().path();
        let file_text = std::fs::read_to_string(&path).unwrap();
        let committed =
            std::fs::read_to_string(chart().join("crds").join(path.file_name().unwrap()))
                .unwrap_or_default();
        assert!(
            committed == file_text,
            "helm/weft/crds/{} differs from crdgen's output: run `make crdgen`",
            path.file_name().unwrap().to_string_lossy()
        );
        let crd = parse_documents(&file_text).remove(0);
        generated.insert(crd["metadata"]["name"].as_str().unwrap().to_string(), crd);
    }
    assert!(!generated.is_empty());
    let crds = |extra: &[&str]| -> BTreeMap<String, Value> {
        render(Values::Default, "1.33.0", extra)
            .into_iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .map(|o| (o["metadata"]["name"].as_str().unwrap().to_string(), o))
            .collect()
    };
    // With `gatewayAPI.installCRDs=false`: crdgen's CRDs, nothing else.
    let own = crds(&["--set", "gatewayAPI.installCRDs=false"]);
    assert_eq!(
        own.keys().collect::<Vec<_>>(),
        generated.keys().collect::<Vec<_>>(),
        "the chart installs exactly crdgen's CRDs"
    );
    assert_eq!(own, generated);
    // By default also the upstream Gateway API CRDs, unchanged but for the keep policy.
    let mut expected = generated;
    for file in ["httproutes.yaml", "grpcroutes.yaml", "referencegrants.yaml"] {
        let text = std::fs::read_to_string(chart().join("crds-gateway").join(file)).unwrap();
        let mut crd = parse_documents(&text).remove(0);
        crd["metadata"]["annotations"]["helm.sh/resource-policy"] = Value::from("keep");
        expected.insert(crd["metadata"]["name"].as_str().unwrap().to_string(), crd);
    }
    let upstream = repo().join("../shared/gateway-api-v1.6.1");
    if upstream.exists() {
        for file in ["httproutes.yaml", "grpcroutes.yaml", "referencegrants.yaml"] {
            assert_eq!(
                std::fs::read_to_string(upstream.join(file)).unwrap(),
                std::fs::read_to_string(chart().join("crds-gateway").join(file)).unwrap(),
                "helm/weft/crds-gateway/{file} is the upstream v1.6.1 file"
            );
        }
    }
    assert_eq!(crds(&[]), expected);
}

// ---------------------------------------------------------------------------------------
// RBAC

/// group, resource, verb, scope, and the one object it is limited to ("": any object).
type Grant = (String, String, String, String, String);

/// `resourceNames` of a rule or access entry, or `[""]` (any object) when absent or empty.
fn names_of(v: &Value) -> Vec<String> {
    let names = if v.is_null() { Vec::new() } else { strings(v) };
    if names.is_empty() {
        vec![String::new()]
    } else {
        assert!(names.iter().all(|n| !n.is_empty()), "{v}");
        names
    }
}

fn grants_of(role: &Value, scope: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(
            rule.get("nonResourceURLs").is_none(),
            "the access list has no nonResourceURLs: {rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    assert!(
                        group != "*" && resource != "*" && verb != "*",
                        "no wildcards: {rule}"
                    );
                    for name in names_of(&rule["resourceNames"]) {
                        grants.insert((
                            group.clone(),
                            resource.clone(),
                            verb.clone(),
                            scope.to_string(),
                            name,
                        ));
                    }
                }
            }
        }
    }
    grants
}

/// The controller's arguments in a rendering.
fn controller_args(objects: &[Value]) -> Vec<String> {
    strings(&container(find(objects, "Deployment", "weft-controller"), "controller")["args"])
}

/// What `weft controller-access` lists, less what the controller's `args` make
/// unnecessary (an entry's `unless` flag).
fn controller_access(args: &[String]) -> BTreeSet<Grant> {
    let out = run(&workspace_binary("weft"), &["controller-access"]);
    assert!(
        out.status.success(),
        "weft controller-access: {}",
        text(&out)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("controller-access prints JSON");
    let mut grants = BTreeSet::new();
    for entry in list.as_array().unwrap() {
        let scope = entry["scope"].as_str().unwrap();
        assert!(scope == "cluster" || scope == "namespace", "{entry}");
        if let Some(flag) = entry["unless"].as_str() {
            if args.iter().any(|a| a == flag) {
                continue;
            }
        } else {
            assert!(entry["unless"].is_null(), "{entry}");
        }
        for verb in strings(&entry["verbs"]) {
            for name in names_of(&entry["resourceNames"]) {
                grants.insert((
                    entry["group"].as_str().unwrap().to_string(),
                    entry["resource"].as_str().unwrap().to_string(),
                    verb.clone(),
                    scope.to_string(),
                    name,
                ));
            }
        }
    }
    assert!(grants.len() > 10, "{list}");
    grants
}

#[test]
fn cluster_role_and_role_grant_exactly_what_the_controller_uses() {
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let expected = controller_access(&controller_args(&objects));
        let cluster_roles = all_of(&objects, "ClusterRole");
        let roles = all_of(&objects, "Role");
        assert_eq!(cluster_roles.len(), 1, "one ClusterRole");
        assert_eq!(roles.len(), 1, "one Role: the webhook has none");
        let role = roles[0];
        assert_eq!(role["metadata"]["namespace"], NAMESPACE);
        let mut granted = grants_of(cluster_roles[0], "cluster");
        granted.extend(grants_of(role, "namespace"));
        let missing: Vec<_> = expected.difference(&granted).collect();
        let extra: Vec<_> = granted.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{values:?}: the chart's RBAC differs from `weft controller-access`\n\
             missing (the controller uses them): {missing:#?}\n\
             extra (the controller does not use them): {extra:#?}"
        );
        // Bound to the controller's ServiceAccount, and only to it.
        for (kind, binding) in [
            (
                "ClusterRole",
                find(&objects, "ClusterRoleBinding", "weft-controller"),
            ),
            ("Role", find(&objects, "RoleBinding", "weft-controller")),
        ] {
            assert_eq!(binding["roleRef"]["kind"], kind);
            assert_eq!(binding["roleRef"]["name"], "weft-controller");
            assert_eq!(
                binding["subjects"],
                json!([{"kind": "ServiceAccount", "name": "weft", "namespace": NAMESPACE}])
            );
        }
        assert_eq!(all_of(&objects, "ClusterRoleBinding").len(), 1);
        assert_eq!(all_of(&objects, "RoleBinding").len(), 1);
        let deployment = find(&objects, "Deployment", "weft-controller");
        assert_eq!(
            deployment["spec"]["template"]["spec"]["serviceAccountName"],
            "weft"
        );
    }
}

#[test]
fn the_rbac_comparison_fails_on_a_missing_or_extra_verb() {
    let objects = render(Values::Default, "1.33.0", &[]);
    let expected = controller_access(&controller_args(&objects));
    let mut cluster_role = find(&objects, "ClusterRole", "weft-controller").clone();
    let role = find(&objects, "Role", "weft-controller");
    let rules = cluster_role["rules"].as_array_mut().unwrap();
    rules.pop();
    rules.push(json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}));
    let mut granted = grants_of(&cluster_role, "cluster");
    granted.extend(grants_of(role, "namespace"));
    assert!(expected.difference(&granted).next().is_some());
    assert!(granted.difference(&expected).next().is_some());
    // A rule narrowed to one object does not stand for one on every object, nor the reverse.
    let mut role = role.clone();
    for rule in role["rules"].as_array_mut().unwrap() {
        if rule.get("resourceNames").is_some() {
            rule.as_object_mut().unwrap().remove("resourceNames");
        }
    }
    let mut granted = grants_of(find(&objects, "ClusterRole", "weft-controller"), "cluster");
    granted.extend(grants_of(&role, "namespace"));
    assert!(expected.difference(&granted).next().is_some());
    assert!(granted.difference(&expected).next().is_some());
    // With cert-manager the controller needs less: the webhook rules are left out.
    let with_cert_manager = controller_access(&["--no-webhook-certificate".to_string()]);
    assert!(with_cert_manager.len() < expected.len());
    assert!(with_cert_manager.is_subset(&expected));
}

// ---------------------------------------------------------------------------------------
// The webhook registration

/// The injection label as crds/src/lib.rs defines it and webhook/src reads it.
fn injector_label() -> (String, String, String) {
    let lib = std::fs::read_to_string(repo().join("crds/src/lib.rs")).unwrap();
    let key = lib
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("pub const INJECT: &str = \"")
                .and_then(|rest| rest.strip_suffix("\";"))
        })
        .expect("crds/src/lib.rs defines annotations::INJECT")
        .to_string();
    let inject = std::fs::read_to_string(repo().join("webhook/src/inject.rs")).unwrap();
    assert!(
        inject.contains("weft_crds::annotations") && inject.contains("INJECT"),
        "webhook/src/inject.rs reads weft_crds::annotations::INJECT"
    );
    // Namespaces opt in with `enabled`; pods opt out with `disabled` (tested by behaviour in
    // the_webhook_injects_what_the_values_say).
    for value in ["enabled", "disabled"] {
        assert!(
            inject.contains(&format!("Some(\"{value}\")")),
            "webhook/src/inject.rs no longer compares {key} with {value:?}: update the chart \
             and this test"
        );
    }
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("{key}=enabled")) && readme.contains(&format!("{key}: disabled")),
        "the README documents {key}=enabled and {key}: disabled"
    );
    (key, "enabled".to_string(), "disabled".to_string())
}

/// A Kubernetes label selector applied to `labels`.
fn selects(selector: &Value, labels: &BTreeMap<&str, &str>) -> bool {
    let by_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k.as_str()).copied() == v.as_str());
    let by_expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let value = labels.get(e["key"].as_str().unwrap()).copied();
            let values = e["values"]
                .as_array()
                .map(|_| strings(&e["values"]))
                .unwrap_or_default();
            match e["operator"].as_str().unwrap() {
                "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
                "NotIn" => value.is_none_or(|v| values.iter().all(|x| x != v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("unknown operator {other}"),
            }
        });
    by_labels && by_expressions
}

#[test]
fn the_webhook_selects_the_namespaces_and_pods_the_injector_documents() {
    let (key, enabled, disabled) = injector_label();
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let configs = all_of(&objects, "MutatingWebhookConfiguration");
        assert_eq!(configs.len(), 1);
        let webhooks = configs[0]["webhooks"].as_array().unwrap();
        assert_eq!(webhooks.len(), 1);
        let hook = &webhooks[0];
        let ns = |name: &str, inject: Option<&str>| {
            let mut labels = BTreeMap::from([("kubernetes.io/metadata.name", name)]);
            if let Some(v) = inject {
                labels.insert(key.as_str(), v);
            }
            selects(&hook["namespaceSelector"], &labels)
        };
        assert!(
            ns("shop", Some(&enabled)),
            "{values:?}: an enabled namespace"
        );
        assert!(!ns("shop", None), "{values:?}: an unlabelled namespace");
        assert!(!ns("shop", Some(&disabled)), "{values:?}");
        assert!(
            !ns(NAMESPACE, Some(&enabled)),
            "{values:?}: the control plane's own"
        );
        assert!(
            !ns("kube-system", Some(&enabled)),
            "{values:?}: kube-system"
        );
        let pod = |inject: Option<&str>| {
            let labels: BTreeMap<&str, &str> =
                inject.map(|v| (key.as_str(), v)).into_iter().collect();
            selects(&hook["objectSelector"], &labels)
        };
        assert!(pod(None), "{values:?}: an unlabelled pod");
        assert!(!pod(Some(&disabled)), "{values:?}: an opted-out pod");

        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["reinvocationPolicy"], "IfNeeded");
        assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
        let timeout = hook["timeoutSeconds"].as_i64().unwrap();
        assert!((1..=10).contains(&timeout), "short timeout: {timeout}");
        assert_eq!(
            hook["failurePolicy"],
            match values {
                Values::Custom => "Ignore",
                _ => "Fail",
            }
        );
        assert_eq!(
            hook["rules"],
            json!([{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods"], "scope": "Namespaced"}])
        );
        // The caBundle is left to the controller or cert-manager.
        assert!(hook["clientConfig"].get("caBundle").is_none());
        assert!(hook["clientConfig"].get("url").is_none());
        // The Service it calls reaches the webhook's container port.
        let service_ref = &hook["clientConfig"]["service"];
        assert_eq!(service_ref["namespace"], NAMESPACE);
        let service = find(&objects, "Service", service_ref["name"].as_str().unwrap());
        let port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == service_ref["port"])
            .expect("the Service has the webhook's port");
        assert_eq!(service_ref["port"], 443);
        let deployment = find(&objects, "Deployment", "weft-webhook");
        let webhook = container(deployment, "webhook");
        let target = webhook["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == port["targetPort"])
            .expect("the Service's targetPort names a container port");
        assert_eq!(target["containerPort"], 9443);
        assert!(
            strings(&webhook["args"]).contains(&"--addr=0.0.0.0:9443".to_string()),
            "{webhook}"
        );
        assert!(selects(
            &json!({"matchLabels": service["spec"]["selector"]}),
            &deployment["spec"]["template"]["metadata"]["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
                .collect()
        ));
    }
}

#[test]
fn the_webhook_serving_certificate_comes_from_the_controller_or_cert_manager() {
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let deployment = find(&objects, "Deployment", "weft-webhook");
        let volumes = deployment["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
        let tls = volumes.iter().find(|v| v["name"] == "tls").unwrap();
        assert_eq!(tls["secret"]["secretName"], "weft-webhook-tls");
        let config = find(
            &objects,
            "MutatingWebhookConfiguration",
            "weft-sidecar-injector",
        );
        let annotation = &config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"];
        let certificates = all_of(&objects, "Certificate");
        let args = controller_args(&objects);
        let arg = |flag: &str| {
            args.iter()
                .find_map(|a| a.strip_prefix(&format!("{flag}=")))
                .map(str::to_string)
        };
        let webhook_flags: Vec<&String> = args.iter().filter(|a| a.contains("-webhook")).collect();
        match values {
            Values::Default => {
                assert!(annotation.is_null(), "{config}");
                assert!(certificates.is_empty());
                assert!(all_of(&objects, "Issuer").is_empty());
                // The controller issues it: into the Secret the webhook mounts, for the
                // Service the configuration calls, with the caBundle of that configuration.
                assert_eq!(
                    arg("--webhook-secret").as_deref(),
                    tls["secret"]["secretName"].as_str(),
                    "{args:?}"
                );
                let service = &config["webhooks"][0]["clientConfig"]["service"];
                assert_eq!(service["namespace"], NAMESPACE);
                assert_eq!(
                    arg("--webhook-service").as_deref(),
                    service["name"].as_str()
                );
                find(&objects, "Service", service["name"].as_str().unwrap());
                assert_eq!(
                    arg("--webhook-configuration").as_deref(),
                    config["metadata"]["name"].as_str()
                );
                assert_eq!(arg("--cluster-domain").as_deref(), Some("cluster.local"));
                assert!(!args.contains(&"--no-webhook-certificate".to_string()));
                assert!(
                    config["webhooks"][0]["clientConfig"]["caBundle"].is_null(),
                    "the controller patches it in"
                );
                // Its RBAC names exactly those objects.
                let named = |kind: &str, resource: &str| -> Vec<String> {
                    let role = find(&objects, kind, "weft-controller");
                    role["rules"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|r| strings(&r["resources"]).contains(&resource.to_string()))
                        .filter(|r| r.get("resourceNames").is_some())
                        .flat_map(|r| strings(&r["resourceNames"]))
                        .collect()
                };
                assert_eq!(named("Role", "secrets"), [arg("--webhook-secret").unwrap()]);
                assert_eq!(
                    named("ClusterRole", "mutatingwebhookconfigurations"),
                    [arg("--webhook-configuration").unwrap()]
                );
            }
            Values::Custom | Values::Issuer => {
                assert_eq!(
                    webhook_flags,
                    [&"--no-webhook-certificate".to_string()],
                    "cert-manager does it: {args:?}"
                );
                assert_eq!(annotation, &json!(format!("{NAMESPACE}/weft-webhook")));
                let serving = find(&objects, "Certificate", "weft-webhook");
                assert_eq!(serving["apiVersion"], "cert-manager.io/v1");
                assert_eq!(serving["metadata"]["namespace"], NAMESPACE);
                assert_eq!(serving["spec"]["secretName"], "weft-webhook-tls");
                assert_eq!(
                    serving["spec"]["dnsNames"],
                    json!([
                        format!("weft-webhook.{NAMESPACE}.svc"),
                        format!("weft-webhook.{NAMESPACE}.svc.cluster.local")
                    ])
                );
                assert!(strings(&serving["spec"]["usages"]).contains(&"server auth".to_string()));
                let issuer = &serving["spec"]["issuerRef"];
                if let Values::Issuer = values {
                    assert_eq!(
                        issuer,
                        &json!({"name": "corp-issuer", "kind": "ClusterIssuer", "group": "cert-manager.io"})
                    );
                    assert_eq!(certificates.len(), 1);
                } else {
                    // The chart's own CA: self-signed root -> CA Issuer -> serving certificate.
                    let ca_issuer = find(&objects, "Issuer", issuer["name"].as_str().unwrap());
                    let ca_secret = ca_issuer["spec"]["ca"]["secretName"].as_str().unwrap();
                    let root = certificates
                        .iter()
                        .find(|c| c["spec"]["secretName"] == ca_secret)
                        .expect("a Certificate writes the CA Issuer's Secret");
                    assert_eq!(root["spec"]["isCA"], true);
                    let root_issuer = find(
                        &objects,
                        "Issuer",
                        root["spec"]["issuerRef"]["name"].as_str().unwrap(),
                    );
                    assert_eq!(root_issuer["spec"]["selfSigned"], json!({}));
                }
                for object in objects.iter().filter(|o| {
                    o["apiVersion"]
                        .as_str()
                        .unwrap()
                        .starts_with("cert-manager.io/")
                }) {
                    assert_eq!(object["apiVersion"], "cert-manager.io/v1");
                    assert_eq!(object["metadata"]["namespace"], NAMESPACE);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The workloads

fn assert_hardened(deployment: &Value, automount: bool) {
    let pod = &deployment["spec"]["template"]["spec"];
    let name = &deployment["metadata"]["name"];
    assert_eq!(pod["automountServiceAccountToken"], automount, "{name}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{name}"
    );
    for c in pod["containers"].as_array().unwrap() {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(sc["capabilities"].get("add").is_none(), "{name}");
        assert!(c["resources"]["requests"]["cpu"].is_string(), "{name}");
        assert!(c["resources"]["requests"]["memory"].is_string(), "{name}");
        assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
        assert!(
            c["livenessProbe"].is_object() && c["readinessProbe"].is_object(),
            "{name}"
        );
    }
    assert!(
        pod["hostNetwork"].is_null() && pod["hostPID"].is_null(),
        "{name}"
    );
}

#[test]
fn the_controller_runs_hardened_with_probes_on_its_admin_port() {
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let deployment = find(&objects, "Deployment", "weft-controller");
        assert_hardened(deployment, true);
        let replicas = match values {
            Values::Custom => 3,
            _ => 2,
        };
        assert_eq!(deployment["spec"]["replicas"], replicas);
        let pod = &deployment["spec"]["template"]["spec"];
        // It exits within 10 s of SIGTERM.
        assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() >= 15);
        let selector = &deployment["spec"]["selector"]["matchLabels"];
        let anti = &pod["affinity"]["podAntiAffinity"];
        let term = match values {
            Values::Custom => &anti["requiredDuringSchedulingIgnoredDuringExecution"][0],
            _ => &anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"],
        };
        assert_eq!(term["topologyKey"], "kubernetes.io/hostname", "{values:?}");
        assert_eq!(&term["labelSelector"]["matchLabels"], selector);
        let pdb = find(&objects, "PodDisruptionBudget", "weft-controller");
        assert_eq!(&pdb["spec"]["selector"]["matchLabels"], selector);
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);

        let c = container(deployment, "controller");
        let env: BTreeMap<String, Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
            .collect();
        assert_eq!(
            env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        let port = |name: &str| {
            c["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
                .as_i64()
                .unwrap()
        };
        assert_eq!(port("xds"), 15012);
        assert_eq!(port("admin"), 15090);
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
        let args = strings(&c["args"]);
        for expected in [
            "controller",
            "--xds-addr=0.0.0.0:15012",
            "--require-xds-tls",
            "--admin-addr=0.0.0.0:15090",
            "--xds-name=weft-xds.weft-system.svc",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
        let user_ca = args.iter().find(|a| a.starts_with("--user-ca-secret="));
        match values {
            Values::Custom => {
                assert_eq!(user_ca.unwrap(), "--user-ca-secret=corp-intermediate-ca");
                assert!(
                    args.contains(&"--access=permissive".to_string()),
                    "{args:?}"
                );
                assert!(args.contains(&"--mtls=permissive".to_string()), "{args:?}");
                assert!(args.contains(&"--trust-domain=corp.example".to_string()));
            }
            _ => {
                assert!(user_ca.is_none(), "{args:?}");
                assert!(
                    args.contains(&"--access=deny-by-default".to_string()),
                    "{args:?}"
                );
                assert!(args.contains(&"--mtls=strict".to_string()), "{args:?}");
            }
        }
        // Services: xDS on 15012 (TLS), the admin endpoint for metrics.
        for (service, port_name, number) in [
            ("weft-xds", "xds", 15012),
            ("weft-controller-metrics", "admin", 15090),
        ] {
            let s = find(&objects, "Service", service);
            assert_eq!(&s["spec"]["selector"], selector, "{service}");
            assert_eq!(s["spec"]["ports"][0]["port"], number, "{service}");
            assert_eq!(s["spec"]["ports"][0]["targetPort"], port_name, "{service}");
        }
    }
}

#[test]
fn the_webhook_runs_hardened_without_an_api_token() {
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let deployment = find(&objects, "Deployment", "weft-webhook");
        assert_hardened(deployment, false);
        assert_eq!(
            deployment["spec"]["replicas"],
            match values {
                Values::Custom => 3,
                _ => 2,
            }
        );
        let c = container(deployment, "webhook");
        assert_eq!(c["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
        for sa in all_of(&objects, "ServiceAccount") {
            assert_eq!(sa["automountServiceAccountToken"], false, "{sa}");
        }
        let pdb = find(&objects, "PodDisruptionBudget", "weft-webhook");
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"],
            deployment["spec"]["selector"]["matchLabels"]
        );
    }
}

/// The rendered arguments parse with the real binaries (clap validates every flag and value
/// before it reaches the trailing `--help`).
#[test]
fn controller_and_webhook_arguments_parse_with_the_real_binaries() {
    for values in Values::ALL {
        let objects = render(values, "1.33.0", &[]);
        let c = container(
            find(&objects, "Deployment", "weft-controller"),
            "controller",
        );
        let mut args = strings(&c["args"]);
        assert!(c["command"].is_null(), "the image's entrypoint is weft");
        args.push("--help".to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&workspace_binary("weft"), &args);
        assert!(
            out.status.success(),
            "{values:?}: weft {args:?}:\n{}",
            text(&out)
        );

        let w = container(find(&objects, "Deployment", "weft-webhook"), "webhook");
        assert_eq!(w["command"], json!(["weft-webhook"]));
        let mut args = strings(&w["args"]);
        args.push("--help".to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&workspace_binary("weft-webhook"), &args);
        assert!(
            out.status.success(),
            "{values:?}: weft-webhook {args:?}:\n{}",
            text(&out)
        );
    }
    // And the check can fail.
    let out = run(
        &workspace_binary("weft"),
        &["controller", "--no-such-flag", "--help"],
    );
    assert!(!out.status.success());
}

// ---------------------------------------------------------------------------------------
// The injection config, read by the real webhook

struct Webhook(Child);

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const POST_REVIEW: &str = r#"
import ssl, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=open(sys.argv[2], "rb").read(),
                             headers={"content-type": "application/json"})
sys.stdout.write(urllib.request.urlopen(req, context=ssl._create_unverified_context(),
                                        timeout=5).read().decode())
"#;

fn review(pod_labels: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "web-", "namespace": "shop", "labels": pod_labels},
                "spec": {
                    "serviceAccountName": "web",
                    "containers": [{"name": "web", "image": "registry.example/web:1",
                                    "ports": [{"containerPort": 8080}]}]
                }
            },
            "dryRun": false
        }
    })
}

fn injected_pod(webhook_url: &str, dir: &TempDir, labels: Value) -> Value {
    let body = review(labels.clone());
    let file = dir.file("review.json", &body.to_string());
    let out = Command::new("python3")
        .arg("-c")
        .arg(POST_REVIEW)
        .arg(webhook_url)
        .arg(&file)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "POST to the webhook: {}", text(&out));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["response"]["allowed"], true, "{reply}");
    let mut pod = body["request"]["object"].clone();
    let patch = &reply["response"]["patch"];
    if patch.is_null() {
        return pod;
    }
    let bytes: Vec<u8> = match patch {
        Value::String(b64) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap()
        }
        other => serde_json::from_value(other.clone()).unwrap(),
    };
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

fn start_webhook(dir: &TempDir, config: &str) -> (Webhook, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_file = dir.file("tls.crt", &cert.cert.pem());
    let key_file = dir.file("tls.key", &cert.signing_key.serialize_pem());
    let config_file = dir.file("inject.json", config);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(workspace_binary("weft-webhook"))
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg(format!("--cert={}", cert_file.display()))
        .arg(format!("--key={}", key_file.display()))
        .arg(format!("--config={}", config_file.display()))
        .env("WEFT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("weft-webhook starts");
    let mut webhook = Webhook(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = webhook.0.try_wait().unwrap() {
            panic!("weft-webhook exited with {status} (config:\n{config})");
        }
        assert!(
            Instant::now() < deadline,
            "weft-webhook did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (webhook, format!("https://127.0.0.1:{port}/inject"))
}

fn inject_config(objects: &[Value]) -> String {
    let map = find(objects, "ConfigMap", "weft-injector");
    let config = map["data"]["inject.json"].as_str().unwrap().to_string();
    // The webhook mounts this ConfigMap where its --config points.
    let deployment = find(objects, "Deployment", "weft-webhook");
    let webhook = container(deployment, "webhook");
    assert!(
        strings(&webhook["args"]).contains(&"--config=/etc/weft/inject/inject.json".to_string())
    );
    let mount = webhook["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/etc/weft/inject")
        .unwrap();
    let volume = deployment["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["configMap"]["name"], "weft-injector");
    config
}

#[test]
fn the_webhook_injects_what_the_values_say() {
    let dir = TempDir::new("inject");
    // Default values: a native sidecar with the chart's images.
    let objects = render(Values::Default, "1.33.0", &[]);
    let (webhook, url) = start_webhook(&dir, &inject_config(&objects));
    let pod = injected_pod(&url, &dir, json!({"app": "web"}));
    drop(webhook);
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[0]["name"], "weft-init");
    assert_eq!(inits[0]["image"], "ghcr.io/weft-mesh/weft:0.1.0");
    assert_eq!(inits[1]["name"], "weft-proxy");
    assert_eq!(inits[1]["image"], "ghcr.io/weft-mesh/weft-proxy:0.1.0");
    assert_eq!(inits[1]["restartPolicy"], "Always");
    assert_eq!(inits[1]["securityContext"]["runAsUser"], 1337);
    assert_eq!(
        pod["metadata"]["annotations"]["weft.dev/injected-version"],
        "0.1.0"
    );

    // Custom values: every injection setting reaches the pod.
    let objects = render(Values::Custom, "1.33.0", &[]);
    let (webhook, url) = start_webhook(&dir, &inject_config(&objects));
    let pod = injected_pod(&url, &dir, json!({"app": "web"}));
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(
        inits.len(),
        1,
        "legacy sidecar: only weft-init is an init container"
    );
    assert_eq!(inits[0]["image"], "ghcr.io/weft-mesh/weft:1.2.3");
    assert_eq!(
        strings(&inits[0]["args"])[..3],
        ["init-iptables", "--proxy-uid", "2102"]
    );
    let proxy = &pod["spec"]["containers"][0];
    assert_eq!(
        proxy["name"], "weft-proxy",
        "legacy sidecar: the first container"
    );
    assert_eq!(proxy["image"], "ghcr.io/weft-mesh/weft-proxy:1.2.3");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "20m", "memory": "40Mi"}, "limits": {"memory": "300Mi"}})
    );
    assert!(
        strings(&proxy["lifecycle"]["preStop"]["exec"]["command"]).contains(&"9s".to_string()),
        "{proxy}"
    );
    assert!(proxy["lifecycle"]["postStart"].is_object(), "{proxy}");
    // A pod labelled out is sent only if a selector misses it; the webhook skips it too.
    let pod = injected_pod(
        &url,
        &dir,
        json!({"app": "web", "weft.dev/inject": "disabled"}),
    );
    assert!(pod["spec"]["initContainers"].is_null(), "{pod}");
    drop(webhook);
}

// ---------------------------------------------------------------------------------------
// MeshConfig, NOTES, values.schema.json

#[test]
fn the_default_meshconfig_carries_the_mesh_values() {
    let objects = render(Values::Default, "1.33.0", &[]);
    let mesh = find(&objects, "MeshConfig", "weft");
    assert_eq!(mesh["apiVersion"], "config.weft.dev/v1alpha1");
    assert_eq!(
        mesh["spec"],
        json!({"access": "DenyByDefault", "mtls": "Strict"})
    );
    let objects = render(Values::Custom, "1.33.0", &[]);
    assert_eq!(
        find(&objects, "MeshConfig", "weft")["spec"],
        json!({"access": "Permissive", "mtls": "Permissive", "opaquePorts": [7000, 9042],
               "protocolDetectionTimeout": "500ms", "escapedSlashes": "Reject"})
    );
    let objects = render(Values::Issuer, "1.33.0", &[]);
    assert!(
        all_of(&objects, "MeshConfig").is_empty(),
        "meshConfig.create=false"
    );
}

#[test]
fn notes_render_for_an_install() {
    let chart = chart();
    let out = run(
        &helm(),
        &[
            "install",
            "weft",
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "--dry-run=client",
        ],
    );
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for expected in [
        "kubectl label namespace NAMESPACE weft.dev/inject=enabled",
        "Secret weft-system/weft-webhook-tls",
        "weft explain --admin-addr 127.0.0.1:15090",
    ] {
        assert!(
            report.contains(expected),
            "NOTES lack {expected:?}:\n{report}"
        );
    }
}

fn assert_rejected(set: &[&str], why: &str) {
    let mut extra = Vec::new();
    for s in set {
        extra.extend(["--set", s]);
    }
    let out = helm_template(Values::Default, "1.33.0", &extra);
    let report = text(&out);
    assert!(!out.status.success(), "{set:?} was accepted");
    assert!(
        report.contains("values don't meet the specifications of the schema")
            || report.contains("schema"),
        "{set:?} failed, but not by the schema:\n{report}"
    );
    assert!(
        report.contains(why),
        "{set:?}: expected {why:?} in:\n{report}"
    );
}

#[test]
fn values_schema_rejects_wrong_types_unknown_policies_and_unknown_keys() {
    // The same values with a valid value render: the failures below are the schema's.
    let out = helm_template(
        Values::Default,
        "1.33.0",
        &[
            "--set",
            "webhook.failurePolicy=Ignore",
            "--set",
            "controller.replicas=3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    assert_rejected(
        &["webhook.failurePolicy=Sometimes"],
        "/webhook/failurePolicy",
    );
    assert_rejected(&["failurePolicy=Sometimes"], "failurePolicy");
    assert_rejected(&["controller.replicas=two"], "/controller/replicas");
    assert_rejected(&["proxy.legacySidecar=maybe"], "/proxy/legacySidecar");
    assert_rejected(&["webhook.timeoutSeconds=60"], "/webhook/timeoutSeconds");
    assert_rejected(&["mesh.access=Open"], "/mesh/access");
    assert_rejected(
        &["controller.terminationGracePeriodSeconds=5"],
        "terminationGracePeriodSeconds",
    );
    assert_rejected(
        &["proxy.resources.requests.cpu=lots"],
        "/proxy/resources/requests/cpu",
    );
    assert_rejected(&["controller.replica=3"], "replica");
}

// ---------------------------------------------------------------------------------------
// Documentation, images, the kind walkthrough

/// Dotted paths of values.yaml's leaves (an empty map or a list is a leaf).
fn value_paths(prefix: &str, value: &Value, out: &mut Vec<String>) {
    match value.as_object() {
        Some(map) if !map.is_empty() => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                value_paths(&path, v, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_value_is_documented_and_in_the_schema() {
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let mut paths = Vec::new();
    value_paths("", &values, &mut paths);
    assert!(paths.len() > 40, "{paths:?}");
    for path in &paths {
        // Documented as itself or as a whole (`controller.resources`).
        let parts: Vec<&str> = path.split('.').collect();
        let documented =
            (1..=parts.len()).any(|n| readme.contains(&format!("| `{}` |", parts[..n].join("."))));
        assert!(documented, "helm/weft/README.md does not document `{path}`");
        // And known to the schema, which rejects unknown keys.
        let mut node = &schema;
        for part in &parts {
            node = node["properties"]
                .get(*part)
                .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))
                .unwrap_or_else(|| panic!("values.schema.json has no `{path}`"));
        }
    }
    // No documented value that values.yaml lacks.
    for line in readme.lines().filter(|l| l.starts_with("| `")) {
        let key = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            paths
                .iter()
                .any(|p| p == key || p.starts_with(&format!("{key}."))),
            "README documents `{key}`, which values.yaml lacks"
        );
    }
}

fn dockerfile(name: &str) -> String {
    std::fs::read_to_string(repo().join("docker").join(name)).unwrap()
}

/// The lines of the stage named `name` (from its FROM to the next FROM).
fn stage(dockerfile: &str, name: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in dockerfile.lines() {
        if line.starts_with("FROM ") {
            inside = line.ends_with(&format!(" AS {name}"));
        }
        if inside {
            lines.push(line.to_string());
        }
    }
    lines
}

#[test]
fn images_are_pinned_non_root_and_what_the_chart_runs() {
    let weft = dockerfile("weft.Dockerfile");
    let proxy = dockerfile("weft-proxy.Dockerfile");
    for (name, text) in [("weft", &weft), ("weft-proxy", &proxy)] {
        // Every base image is an ARG default with an exact version.
        for line in text
            .lines()
            .filter(|l| l.starts_with("ARG ") && l.contains("_IMAGE="))
        {
            let image = line.split('=').nth(1).unwrap();
            let tag = image.rsplit(':').next().unwrap();
            assert!(
                image.contains(':')
                    && tag.chars().any(|c| c.is_ascii_digit())
                    && !tag.contains("latest"),
                "{name}: {image} is not pinned to a version"
            );
        }
        assert!(
            text.lines()
                .filter(|l| l.starts_with("FROM "))
                .all(|l| l.contains("${")),
            "{name}: every FROM takes a pinned ARG"
        );
        assert!(text.contains("+crt-static"), "{name}: static binaries");
        let user = text.lines().rfind(|l| l.starts_with("USER ")).unwrap();
        assert!(
            !user.contains(" 0") && !user.contains("root"),
            "{name}: {user}"
        );
    }
    assert!(weft.contains("USER 65532:65532"));
    assert!(weft.contains(r#"ENTRYPOINT ["/usr/local/bin/weft"]"#));
    assert!(weft.contains("/usr/local/bin/"), "weft-webhook on PATH");
    assert!(proxy.contains("USER 1337:1337"), "the proxy UID");
    assert!(
        proxy.contains("envoyproxy/envoy:distroless-v1.40."),
        "Envoy 1.40"
    );
    assert!(proxy.contains(r#"ENTRYPOINT ["/usr/local/bin/envoy"]"#));
    assert!(proxy.contains("COPY --from=build /out/weft /usr/local/bin/weft"));
    assert_eq!(
        stage(&weft, "build"),
        stage(&proxy, "build"),
        "one build stage, so a layer cache compiles once"
    );
    assert!(stage(&weft, "build").len() > 5);
    // The chart's defaults are what `make images` tags and the UID the proxy image runs as.
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml")).unwrap())
            .unwrap();
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    assert!(makefile.contains("IMAGE_REGISTRY ?= ghcr.io/weft-mesh"));
    assert!(makefile.contains("$(IMAGE_REGISTRY)/weft:$(IMAGE_TAG)"));
    assert!(makefile.contains("$(IMAGE_REGISTRY)/weft-proxy:$(IMAGE_TAG)"));
    assert_eq!(values["images"]["weft"], "ghcr.io/weft-mesh/weft");
    assert_eq!(values["images"]["proxy"], "ghcr.io/weft-mesh/weft-proxy");
    assert_eq!(values["proxy"]["uid"], 1337);
    assert!(
        values["webhook"]["port"].as_i64().unwrap() >= 1024,
        "non-root binds"
    );
}

#[test]
fn the_kind_walkthrough_is_valid_and_matches_the_chart() {
    let kind = repo().join("e2e/kind");
    let out = run(
        Path::new("bash"),
        &["-n", kind.join("run.sh").to_str().unwrap()],
    );
    assert!(out.status.success(), "run.sh: {}", text(&out));
    let script = std::fs::read_to_string(kind.join("run.sh")).unwrap();
    let objects = render(Values::Default, "1.33.0", &[]);
    // Names and ports the script relies on. Sidecars reach the xDS Service through the
    // bootstrap the controller publishes: its address is the Service's.
    let xds = find(&objects, "Service", "weft-xds");
    let controller_args = container(
        find(&objects, "Deployment", "weft-controller"),
        "controller",
    )["args"]
        .clone();
    let sidecar_xds = format!(
        "--sidecar-xds-address=weft-xds.{NAMESPACE}.svc:{}",
        xds["spec"]["ports"][0]["port"]
    );
    assert!(
        controller_args
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a.as_str() == Some(sidecar_xds.as_str())),
        "{controller_args}"
    );
    assert!(
        script.contains("weft-bootstrap"),
        "the script waits for the published bootstrap"
    );
    find(
        &objects,
        "MutatingWebhookConfiguration",
        "weft-sidecar-injector",
    );
    let admin = container(
        find(&objects, "Deployment", "weft-controller"),
        "controller",
    )["ports"][1]["containerPort"]
        .clone();
    assert!(script.contains(&format!(
        "port-forward deploy/weft-controller {admin}:{admin}"
    )));
    assert!(script.contains("weft.dev/inject=enabled"));
    // Its manifests: Kubernetes objects valid for 1.29 and 1.33, SMI objects valid for the CRDs.
    let app = parse_documents(&std::fs::read_to_string(kind.join("shop.yaml")).unwrap());
    let kinds: BTreeSet<&str> = app.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Deployment", "Service", "ServiceAccount"].into());
    for version in KUBERNETES_VERSIONS {
        let dir = TempDir::new("kind");
        let files: Vec<PathBuf> = app
            .iter()
            .enumerate()
            .map(|(i, o)| dir.file(&format!("{i}.yaml"), &serde_yaml_ng::to_string(o).unwrap()))
            .collect();
        let out = Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--kubernetes-version",
                version,
            ])
            .args(&files)
            .env("PYTHONPATH", kubernetes_validate())
            .output()
            .expect("python3 runs");
        let report = text(&out);
        assert!(out.status.success() && !report.contains("WARN"), "{report}");
        assert_eq!(report.matches(" passed ").count(), files.len(), "{report}");
    }
    let crds: Vec<Value> = all_of(&objects, "CustomResourceDefinition")
        .into_iter()
        .cloned()
        .collect();
    let smi = parse_documents(&std::fs::read_to_string(kind.join("smi.yaml")).unwrap());
    assert_eq!(smi.len(), 2);
    for object in &smi {
        validate_against_crd(object, &crds);
    }
    // The split's services and the target's accounts exist in the app.
    let named = |kind: &str, name: &str| {
        app.iter()
            .any(|o| o["kind"] == kind && o["metadata"]["name"] == name)
    };
    let split = smi.iter().find(|o| o["kind"] == "TrafficSplit").unwrap();
    assert!(named("Service", split["spec"]["service"].as_str().unwrap()));
    for backend in split["spec"]["backends"].as_array().unwrap() {
        assert!(
            named("Service", backend["service"].as_str().unwrap()),
            "{backend}"
        );
    }
    let target = smi.iter().find(|o| o["kind"] == "TrafficTarget").unwrap();
    assert!(named(
        "ServiceAccount",
        target["spec"]["destination"]["name"].as_str().unwrap()
    ));
    for source in target["spec"]["sources"].as_array().unwrap() {
        assert!(
            named("ServiceAccount", source["name"].as_str().unwrap()),
            "{source}"
        );
    }
}

#[test]
fn the_pod_monitor_scrapes_injected_sidecars_when_enabled() {
    let off = render(Values::Default, "1.33.0", &[]);
    assert!(all_of(&off, "PodMonitor").is_empty(), "off by default");
    let on = render(
        Values::Default,
        "1.33.0",
        &[
            "--set",
            "metrics.podMonitor.enabled=true",
            "--set",
            "metrics.podMonitor.labels.release=prom",
        ],
    );
    let monitor = find(&on, "PodMonitor", "weft-sidecars");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    // The webhook's label and the sidecar's port name.
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["weft.dev/proxy"],
        "injected"
    );
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "weft-metrics");
    assert_eq!(endpoint["path"], "/stats/prometheus");
    // The destination labels come from the dot-free cluster stat name.
    let relabel = endpoint["metricRelabelings"].as_array().unwrap();
    let targets: Vec<&str> = relabel
        .iter()
        .map(|r| r["targetLabel"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        [
            "destination_service",
            "destination_namespace",
            "destination_port"
        ]
    );
    let regex =
        regex::Regex::new(&format!("^(?:{})$", relabel[0]["regex"].as_str().unwrap())).unwrap();
    let caps = regex.captures("outbound|8080||backend|shop").unwrap();
    assert_eq!((&caps[1], &caps[2], &caps[3]), ("8080", "backend", "shop"));
}

// ---------------------------------------------------------------------------------------
// The Grafana dashboard

/// The ConfigMap's name for the release `weft` (`helm_template` installs it as `weft`).
const DASHBOARD_CONFIGMAP: &str = "weft-weft-dashboard";

/// The dashboard as the chart ships it, to import by hand.
fn dashboard_file() -> Value {
    let path = chart().join("dashboards/weft-mesh.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel, with the panels of collapsed rows (which carry their own).
fn dashboard_panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

/// `(panel title and refId, expression)` of every query of every panel.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a target without expr: {target}", panel["title"]));
            out.push((
                format!("{} ({})", panel["title"], target["refId"]),
                expr.to_string(),
            ));
        }
    }
    out
}

/// `(variable, PromQL)` of every query variable: `label_values(SELECTOR, LABEL)` becomes
/// `count by (LABEL) (SELECTOR)`, which Prometheus evaluates the same way.
fn variable_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let label_values =
        regex::Regex::new(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$").unwrap();
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or_else(|| panic!("variable without a query: {v}"));
            let caps = label_values.captures(query).unwrap_or_else(|| {
                panic!("${}: not label_values(SELECTOR, LABEL): {query}", v["name"])
            });
            (
                format!("variable ${}", v["name"].as_str().unwrap()),
                format!("count by ({}) ({})", &caps[2], &caps[1]),
            )
        })
        .collect()
}

/// What Grafana puts in place of its own variables when it sends a query.
const GRAFANA_BUILTINS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "30s"),
    ("__range", "1h"),
];

/// `expr` with its Grafana variables (`$name`, `${name}`, `${name:format}`, `[[name]]`)
/// replaced as Grafana sends them: the built-ins by durations, the dashboard's own
/// (multi-value, regex-formatted) by `(shop|web)`, which only a regex matcher accepts.
fn substitute_variables(what: &str, expr: &str, variables: &BTreeSet<String>) -> String {
    let reference = regex::Regex::new(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]").unwrap();
    let mut out = String::new();
    let mut last = 0;
    for caps in reference.captures_iter(expr) {
        let whole = caps.get(0).unwrap();
        let name = caps
            .get(1)
            .or(caps.get(2))
            .or(caps.get(3))
            .unwrap()
            .as_str();
        let before = &expr[last..whole.start()];
        out.push_str(before);
        let value = if let Some((_, v)) = GRAFANA_BUILTINS.iter().find(|(n, _)| *n == name) {
            v.to_string()
        } else if variables.contains(name) {
            assert!(
                out.ends_with("=~\"") || out.ends_with("!~\""),
                "{what}: ${name} is a multi-value variable: use it only as a regex (=~\"${name}\"): {expr}"
            );
            "(shop|web)".to_string()
        } else {
            panic!("{what}: ${name} is neither a dashboard variable nor a Grafana built-in: {expr}")
        };
        out.push_str(&value);
        last = whole.end();
    }
    out.push_str(&expr[last..]);
    out
}

/// The dashboard's expressions (panels and variables), variables substituted.
fn concrete_exprs(dashboard: &Value) -> Vec<(String, String)> {
    let variables: BTreeSet<String> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    dashboard_exprs(dashboard)
        .into_iter()
        .chain(variable_exprs(dashboard))
        .map(|(what, expr)| {
            let concrete = substitute_variables(&what, &expr, &variables);
            (what, concrete)
        })
        .collect()
}

fn promtool() -> PathBuf {
    weft_e2e::on_path("promtool").unwrap_or_else(|| {
        panic!(
            "promtool not found: run `make setup` (installs Debian's `prometheus` package, \
                 which provides /usr/bin/promtool)"
        )
    })
}

/// `promtool check rules` on a rules file with one recording rule per expression: the
/// report when any does not parse.
fn promtool_check(exprs: &[(String, String)]) -> Result<(), String> {
    let dir = TempDir::new("promtool");
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, expr))| json!({ "record": format!("weft_dashboard:expr_{i}"), "expr": expr }))
        .collect();
    // JSON is YAML.
    let file = dir.file(
        "rules.yml",
        &json!({ "groups": [{ "name": "weft-dashboard", "rules": rules }] }).to_string(),
    );
    let out = run(&promtool(), &["check", "rules", file.to_str().unwrap()]);
    if out.status.success() && text(&out).contains(&format!("{} rules found", exprs.len())) {
        return Ok(());
    }
    let index: Vec<String> = exprs
        .iter()
        .enumerate()
        .map(|(i, (what, expr))| format!("weft_dashboard:expr_{i} = {what}: {expr}"))
        .collect();
    Err(format!("{}\n{}", text(&out), index.join("\n")))
}

#[test]
fn the_grafana_dashboard_renders_only_when_enabled() {
    let named_dashboard = |objects: &[Value]| {
        objects
            .iter()
            .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == DASHBOARD_CONFIGMAP)
            .count()
    };
    let off = render(Values::Default, "1.33.0", &[]);
    assert_eq!(named_dashboard(&off), 0, "off by default");
    assert!(
        !serde_json::to_string(&off)
            .unwrap()
            .contains("weft-mesh.json"),
        "nothing of the dashboard is rendered by default"
    );

    let on = render(
        Values::Default,
        "1.33.0",
        &["--set", "metrics.grafanaDashboard.enabled=true"],
    );
    assert_eq!(named_dashboard(&on), 1);
    let configmap = find(&on, "ConfigMap", DASHBOARD_CONFIGMAP);
    assert_eq!(configmap["apiVersion"], "v1");
    assert_eq!(configmap["metadata"]["namespace"], NAMESPACE);
    let labels = &configmap["metadata"]["labels"];
    assert_eq!(
        labels["grafana_dashboard"], "1",
        "the label Grafana's sidecar watches"
    );
    assert_eq!(labels["app.kubernetes.io/instance"], "weft");
    let data = configmap["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["weft-mesh.json"]);
    let dashboard: Value = serde_json::from_str(data["weft-mesh.json"].as_str().unwrap())
        .expect("the ConfigMap holds valid JSON");
    assert_eq!(dashboard, dashboard_file(), "the chart's file, unchanged");

    // Another namespace (Grafana's) and other labels.
    let elsewhere = render(
        Values::Default,
        "1.33.0",
        &[
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--set",
            "metrics.grafanaDashboard.namespace=monitoring",
            "--set-string",
            "metrics.grafanaDashboard.labels.team=mesh",
        ],
    );
    let configmap = find(&elsewhere, "ConfigMap", DASHBOARD_CONFIGMAP);
    assert_eq!(configmap["metadata"]["namespace"], "monitoring");
    assert_eq!(configmap["metadata"]["labels"]["team"], "mesh");
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    // Label values are strings: `--set ...=1` is an integer.
    assert_rejected(
        &[
            "metrics.grafanaDashboard.enabled=true",
            "metrics.grafanaDashboard.labels.grafana_dashboard=1",
        ],
        "/metrics/grafanaDashboard/labels/grafana_dashboard",
    );

    // The JSON model: schema version, variables, the two rows and their panels.
    assert_eq!(dashboard["schemaVersion"], 39);
    assert_eq!(dashboard["uid"], "weft-mesh");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let variable = |name: &str| {
        variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable ${name}"))
    };
    assert_eq!(variable("datasource")["type"], "datasource");
    assert_eq!(variable("datasource")["query"], "prometheus");
    for name in ["namespace", "workload", "service"] {
        let v = variable(name);
        assert_eq!(v["type"], "query", "${name}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${name}");
        assert!(
            v["query"]["query"]
                .as_str()
                .unwrap()
                .starts_with("label_values("),
            "${name}: {v}"
        );
        assert_eq!(
            v["definition"], v["query"]["query"],
            "${name}: what Grafana shows"
        );
    }

    let mut rows: Vec<(String, Vec<&Value>)> = Vec::new();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for panel in dashboard_panels(&dashboard) {
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "duplicate id: {panel}"
        );
        let grid = &panel["gridPos"];
        let (x, y, w, h) = ["x", "y", "w", "h"]
            .map(|k| grid[k].as_u64().unwrap())
            .into();
        assert!(x + w <= 24, "{}: wider than the dashboard", panel["title"]);
        for cell in (x..x + w).flat_map(|c| (y..y + h).map(move |r| (c, r))) {
            assert!(
                cells.insert(cell),
                "{} overlaps another panel",
                panel["title"]
            );
        }
        if panel["type"] == "row" {
            rows.push((panel["title"].as_str().unwrap().to_string(), Vec::new()));
            continue;
        }
        rows.last_mut()
            .expect("every panel is under a row")
            .1
            .push(panel);
        assert_eq!(
            panel["datasource"]["type"], "prometheus",
            "{}",
            panel["title"]
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}: no query", panel["title"]);
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{target}");
            assert!(
                !target["expr"].as_str().unwrap().trim().is_empty(),
                "{target}"
            );
        }
    }
    let titles = |row: &str| -> Vec<String> {
        rows.iter()
            .find(|(t, _)| t == row)
            .unwrap_or_else(|| panic!("no row {row:?}"))
            .1
            .iter()
            .map(|p| p["title"].as_str().unwrap().to_string())
            .collect()
    };
    let overview = titles("Mesh overview");
    for wanted in [
        "Request rate by destination service",
        "Success rate by destination service",
        "p99 latency by destination service",
        "Top failing edges",
    ] {
        assert!(
            overview.iter().any(|t| t == wanted),
            "{wanted:?} not in {overview:?}"
        );
    }
    let golden = titles("Service golden signals");
    for wanted in [
        "Request rate",
        "Errors: 5xx share",
        "Latency",
        "Saturation",
        "Circuit-breaker overflow",
        "Outlier ejections",
    ] {
        assert!(
            golden.iter().any(|t| t.starts_with(wanted)),
            "{wanted:?} not in {golden:?}"
        );
    }
    // Latency panels show p50, p90 and p99.
    for panel in dashboard_panels(&dashboard)
        .into_iter()
        .filter(|p| p["title"].as_str().unwrap().starts_with("Latency"))
    {
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["expr"].as_str().unwrap())
            .collect();
        for q in ["0.5", "0.9", "0.99"] {
            assert!(
                exprs
                    .iter()
                    .any(|e| e.starts_with(&format!("histogram_quantile({q},"))),
                "{}: no p{q}: {exprs:?}",
                panel["title"]
            );
        }
    }
}

#[test]
fn every_dashboard_expression_parses_with_promtool() {
    let exprs = concrete_exprs(&dashboard_file());
    assert!(exprs.len() > 15, "{exprs:?}");
    if let Err(report) = promtool_check(&exprs) {
        panic!("the dashboard's PromQL does not parse:\n{report}");
    }
}

#[test]
fn the_promtool_check_fails_on_a_broken_expression() {
    let good = (
        "good".to_string(),
        "sum(rate(envoy_server_live[1m]))".to_string(),
    );
    promtool_check(std::slice::from_ref(&good)).expect("a valid expression passes");
    for broken in [
        "sum by (le (rate(envoy_cluster_upstream_rq_time_bucket[1m]))",
        // A Grafana variable left in place is not PromQL.
        "rate(envoy_cluster_upstream_rq_total[$__rate_interval])",
    ] {
        let exprs = [good.clone(), ("broken".to_string(), broken.to_string())];
        let report = promtool_check(&exprs).expect_err(broken);
        assert!(report.contains("weft_dashboard:expr_1"), "{report}");
    }
}

/// The sidecar's stats matcher, read from the source that builds it
/// (`operator/src/sidecar/bootstrap.rs`: `STAT_PREFIXES`, `STAT_SUFFIXES` and the
/// `safe_regex` patterns `limit_stats` adds).
struct StatsMatcher {
    prefixes: Vec<String>,
    suffixes: Vec<String>,
    regexes: Vec<regex::Regex>,
}

/// The string literals of `const NAME: [&str; N] = [...]` in `source`, checked to be N.
fn const_str_array(source: &str, name: &str) -> Vec<String> {
    let decl =
        regex::Regex::new(&format!(r"const {name}: \[&str; (\d+)\] = \[((?s:.*?))\];")).unwrap();
    let caps = decl
        .captures(source)
        .unwrap_or_else(|| panic!("bootstrap.rs no longer declares `const {name}: [&str; N]`"));
    let literal = regex::Regex::new(r#""((?:[^"\\]|\\.)*)""#).unwrap();
    let strings: Vec<String> = caps[2]
        .lines()
        .map(|l| l.split("//").next().unwrap())
        .flat_map(|l| {
            literal
                .captures_iter(l)
                .map(|c| c[1].to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        strings.len().to_string(),
        &caps[1],
        "{name}: read {strings:?}"
    );
    strings
}

impl StatsMatcher {
    fn from_source() -> Self {
        let path = repo().join("operator/src/sidecar/bootstrap.rs");
        let source = std::fs::read_to_string(&path).unwrap();
        for used in [
            r#"json!({ "prefix": p })"#,
            r#"json!({ "suffix": s })"#,
            "inclusion_list",
        ] {
            assert!(
                source.contains(used),
                "{} no longer builds the stats matcher with {used}: update this reader",
                path.display()
            );
        }
        let safe_regex =
            regex::Regex::new(r#""safe_regex"\s*:\s*\{\s*"regex"\s*:\s*r#*"([^"]*)""#).unwrap();
        let regexes: Vec<regex::Regex> = safe_regex
            .captures_iter(&source)
            // Envoy's safe_regex matches the whole name; dots compared as below.
            .map(|c| regex::Regex::new(&format!("^(?:{})$", c[1].replace(r"\.", "_"))).unwrap())
            .collect();
        assert!(
            !regexes.is_empty(),
            "no safe_regex pattern in {}",
            path.display()
        );
        Self {
            prefixes: const_str_array(&source, "STAT_PREFIXES"),
            suffixes: const_str_array(&source, "STAT_SUFFIXES"),
            regexes,
        }
    }

    /// Whether the sidecar keeps the statistic `name`. Prometheus names lose the dots of
    /// Envoy's (`outlier_detection.ejections_active` becomes `..._ejections_active`), so
    /// both sides are compared with dots as underscores.
    fn keeps(&self, name: &str) -> bool {
        let flat = |s: &str| s.replace('.', "_");
        let name = flat(name);
        self.prefixes.iter().any(|p| name.starts_with(&flat(p)))
            || self.suffixes.iter().any(|s| name.ends_with(&flat(s)))
            || self.regexes.iter().any(|r| r.is_match(&name))
    }
}

/// The Envoy statistics behind the Prometheus metric `metric`, as a sidecar names them:
/// the parts Envoy's tag extraction takes out put back (an outbound cluster, the inbound
/// connection manager of port 8080, each response class).
fn envoy_stats_of(metric: &str) -> Vec<String> {
    let base = metric
        .strip_prefix("envoy_")
        .unwrap_or_else(|| panic!("{metric} is not an Envoy metric"));
    let base = ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    let stat = if let Some(rest) = base.strip_prefix("cluster_") {
        format!("cluster.outbound|8080||backend|shop.{rest}")
    } else if let Some(rest) = base.strip_prefix("http_") {
        format!("http.inbound_8080.{rest}")
    } else if let Some(rest) = base.strip_prefix("server_") {
        format!("server.{rest}")
    } else {
        base.to_string()
    };
    match stat.strip_suffix("_xx") {
        Some(stem) => (1..=5).map(|class| format!("{stem}_{class}xx")).collect(),
        None => vec![stat],
    }
}

/// Labels of the sidecars' series besides those the PodMonitor sets: Envoy's tags and the
/// histogram bucket bound.
const ENVOY_LABELS: &[&str] = &[
    "envoy_cluster_name",
    "envoy_response_code_class",
    "envoy_http_conn_manager_prefix",
    "le",
];

#[test]
fn the_dashboard_uses_only_statistics_the_sidecar_keeps_and_labels_the_pod_monitor_sets() {
    let matcher = StatsMatcher::from_source();
    // The check itself: what the e2e tests scrape is kept, a per-cluster gauge is not.
    for kept in [
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_http_downstream_rq_xx",
    ] {
        assert!(
            envoy_stats_of(kept).iter().all(|s| matcher.keeps(s)),
            "{kept}"
        );
    }
    for dropped in [
        "envoy_cluster_upstream_cx_active",
        "envoy_cluster_upstream_rq_retry",
        "envoy_listener_downstream_cx_total",
    ] {
        assert!(
            !envoy_stats_of(dropped).iter().all(|s| matcher.keeps(s)),
            "{dropped}"
        );
    }

    // Labels the series carry once scraped: the PodMonitor's target labels.
    let objects = render(
        Values::Default,
        "1.33.0",
        &["--set", "metrics.podMonitor.enabled=true"],
    );
    let endpoint = &find(&objects, "PodMonitor", "weft-sidecars")["spec"]["podMetricsEndpoints"][0];
    let mut labels: BTreeSet<String> = ["relabelings", "metricRelabelings"]
        .iter()
        .flat_map(|k| endpoint[*k].as_array().unwrap())
        .map(|r| r["targetLabel"].as_str().unwrap().to_string())
        .collect();
    assert!(
        labels.contains("workload") && labels.contains("destination_service"),
        "{labels:?}"
    );
    labels.extend(ENVOY_LABELS.iter().map(|l| l.to_string()));

    let dashboard = dashboard_file();
    let matchers = regex::Regex::new(r#"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*""#).unwrap();
    let groupings =
        regex::Regex::new(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
            .unwrap();
    let envoy_names = regex::Regex::new(r"\benvoy_[a-z_]+\b").unwrap();
    let legend_labels = regex::Regex::new(r"\{\{\s*(\w+)\s*\}\}").unwrap();
    let mut metrics = BTreeSet::new();
    for (what, expr) in concrete_exprs(&dashboard) {
        let mut used: BTreeSet<String> = matchers
            .captures_iter(&expr)
            .map(|c| c[1].to_string())
            .collect();
        for caps in groupings.captures_iter(&expr) {
            used.extend(
                caps[1]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            );
        }
        for label in &used {
            assert!(
                labels.contains(label),
                "{what}: label {label} is not on the scraped series (PodMonitor: {labels:?}): {expr}"
            );
        }
        let names: BTreeSet<String> = envoy_names
            .find_iter(&expr)
            .map(|m| m.as_str().to_string())
            .filter(|n| !used.contains(n))
            .collect();
        assert!(!names.is_empty(), "{what}: no Envoy metric: {expr}");
        for metric in names {
            for stat in envoy_stats_of(&metric) {
                assert!(
                    matcher.keeps(&stat),
                    "{what}: {metric} ({stat}) is not kept by the sidecar's stats matcher \
                     (operator/src/sidecar/bootstrap.rs): {expr}"
                );
            }
            metrics.insert(metric);
        }
    }
    // Legends name only labels the queries keep.
    for panel in dashboard_panels(&dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            for caps in legend_labels.captures_iter(legend) {
                assert!(
                    labels.contains(&caps[1]),
                    "{}: legend {legend:?} names {}",
                    panel["title"],
                    &caps[1]
                );
            }
        }
    }
    // Both sides of each call.
    for wanted in [
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_http_downstream_rq_xx",
        "envoy_http_downstream_rq_time_bucket",
        "envoy_cluster_upstream_rq_pending_overflow",
        "envoy_cluster_outlier_detection_ejections_active",
    ] {
        assert!(metrics.contains(wanted), "{wanted} unused: {metrics:?}");
    }
}
