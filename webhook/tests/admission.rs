//! AdmissionReview fixtures, as the API server sends them, through the handler: the
//! returned JSON patch is applied with json-patch, the result decoded as a Pod and
//! validated against the Kubernetes schema (`kubernetes-validate`, installed by
//! `make setup`; `WEFT_KUBERNETES_VALIDATE` points at it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use weft_webhook::{InjectConfig, handle_review};

fn fixture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.json"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Outcome {
    status: u16,
    response: Value,
    original: Value,
}

fn review(body: &[u8], config: &InjectConfig) -> Outcome {
    let reply = handle_review(body, config);
    let json: Value = serde_json::from_slice(&reply.body).expect("the reply is JSON");
    let original: Value = serde_json::from_slice(body)
        .map(|r: Value| r["request"]["object"].clone())
        .unwrap_or(Value::Null);
    Outcome {
        status: reply.status,
        response: json["response"].clone(),
        original,
    }
}

/// The pod after applying the response's JSON patch. kube-core sends the patch bytes
/// as a JSON array of numbers, which the API server's decoder accepts for `[]byte`.
fn patched(outcome: &Outcome) -> Value {
    assert_eq!(outcome.response["patchType"], "JSONPatch");
    let raw: Vec<u8> =
        serde_json::from_value(outcome.response["patch"].clone()).expect("patch bytes");
    let patch: json_patch::Patch = serde_json::from_slice(&raw).expect("a JSON patch");
    let mut pod = outcome.original.clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies");
    pod
}

fn kubernetes_validate(pod: &Value, name: &str) {
    let tool = std::env::var_os("WEFT_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .expect(
            "WEFT_KUBERNETES_VALIDATE is not set: run `make setup` (installs kubernetes-validate)",
        );
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let file = std::env::temp_dir().join(format!(
        "weft-webhook-{name}-{}-{n}.yaml",
        std::process::id()
    ));
    // The tool needs a name; a generateName pod gets its name from the API server later.
    let mut pod = pod.clone();
    if pod["metadata"].get("name").is_none_or(Value::is_null) {
        let generated = format!(
            "{}x7k2p",
            pod["metadata"]["generateName"].as_str().unwrap_or("pod-")
        );
        pod["metadata"]["name"] = Value::String(generated);
    }
    std::fs::write(&file, serde_yaml_ng::to_string(&pod).unwrap()).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
            "1.33.0",
        ])
        .arg(&file)
        .env("PYTHONPATH", &tool)
        .output()
        .expect("python3 runs");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "{name}: the injected pod is not valid for Kubernetes 1.33:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {list}"))
}

fn inject_fixture(name: &str, config: &InjectConfig) -> Value {
    let outcome = review(&fixture(name), config);
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.response["allowed"], true, "{}", outcome.response);
    let pod = patched(&outcome);
    serde_json::from_value::<Pod>(pod.clone()).expect("decodes as a k8s-openapi Pod");
    kubernetes_validate(&pod, name);
    pod
}

#[test]
fn a_deployment_pod_gets_a_native_sidecar_behind_the_iptables_init() {
    let pod = inject_fixture("deployment-pod", &InjectConfig::default());
    let inits = &pod["spec"]["initContainers"];
    assert_eq!(inits[0]["name"], "weft-init");
    assert_eq!(
        inits[1]["name"], "weft-proxy",
        "the proxy comes right after the redirect"
    );
    let init = &inits[0];
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["drop"],
        serde_json::json!(["ALL"])
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["allowPrivilegeEscalation"], false);
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..3], ["init-iptables", "--proxy-uid", "1337"]);
    assert!(
        args.contains(&"15020,15021,15090,9999"),
        "probe, health, metrics and annotated ports bypass the proxy: {args:?}"
    );

    let proxy = &inits[1];
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    let sc = &proxy["securityContext"];
    assert_eq!(
        (sc["runAsUser"].as_i64(), sc["runAsGroup"].as_i64()),
        (Some(1337), Some(1337))
    );
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15021);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert!(
        proxy["lifecycle"]["preStop"]["exec"]["command"]
            .to_string()
            .contains("drain-proxy")
    );
    let args = proxy["args"].to_string();
    assert!(
        args.contains("$(POD_NAMESPACE)/$(POD_NAME)"),
        "node id from the downward API: {args}"
    );
    let env = proxy["env"].to_string();
    assert!(
        env.contains("spec.serviceAccountName") && env.contains("metadata.namespace"),
        "{env}"
    );
    // Spans name the workload by its `app` label (the tracer reads this variable).
    let resource = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OTEL_RESOURCE_ATTRIBUTES")
        .unwrap_or_else(|| panic!("no OTEL_RESOURCE_ATTRIBUTES: {env}"));
    assert!(
        resource["value"]
            .as_str()
            .unwrap()
            .starts_with("service.name=web,service.namespace=$(POD_NAMESPACE),"),
        "{resource}"
    );
    for volume in [
        "weft-bootstrap",
        "weft-root-ca",
        "weft-podinfo",
        "weft-token",
        "kube-api-access-x7k2p",
    ] {
        container(&pod["spec"]["volumes"], volume);
    }
    // The proxy proves its pod with a token for the control plane alone, which the
    // kubelet renews; the app containers never see it.
    assert_eq!(
        container(&pod["spec"]["volumes"], "weft-token")["projected"],
        serde_json::json!({"sources": [{"serviceAccountToken": {
            "audience": "weft", "expirationSeconds": 3600, "path": "token",
        }}]})
    );
    let token_mount = container(&proxy["volumeMounts"], "weft-token");
    assert_eq!(
        (&token_mount["mountPath"], &token_mount["readOnly"]),
        (
            &serde_json::json!("/var/run/secrets/weft"),
            &serde_json::json!(true)
        )
    );
    assert_eq!(
        weft_webhook::inject::TOKEN_PATH,
        format!("{}/token", token_mount["mountPath"].as_str().unwrap()),
        "the path `weft bootstrap --token-file` is given"
    );
    for app in pod["spec"]["containers"].as_array().unwrap() {
        assert!(
            !app["volumeMounts"].to_string().contains("weft-token"),
            "{}",
            app["name"]
        );
    }

    // Probes now go through the proxy's probe port; the originals are kept.
    let web = container(&pod["spec"]["containers"], "web");
    assert_eq!(web["livenessProbe"]["httpGet"]["port"], 15020);
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/livez"
    );
    assert_eq!(
        web["readinessProbe"]["httpGet"]["path"],
        "/app-health/web/readyz"
    );
    assert_eq!(web["livenessProbe"]["periodSeconds"], 10, "timing is kept");
    let annotations = &pod["metadata"]["annotations"];
    let originals: Value =
        serde_json::from_str(annotations["weft.dev/original-probes"].as_str().unwrap()).unwrap();
    assert_eq!(
        originals["web/livez"],
        serde_json::json!({"port": 8080, "path": "/healthz", "scheme": "HTTP"})
    );
    assert_eq!(originals["web/readyz"]["path"], "/ready");
    assert_eq!(
        annotations["weft.dev/injected-version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(pod["metadata"]["labels"]["weft.dev/proxy"], "injected");
    assert_eq!(annotations["prometheus.io/port"], "15090");
    assert_eq!(annotations["prometheus.io/path"], "/stats/prometheus");
    assert!(
        pod["metadata"].get("name").is_none_or(Value::is_null),
        "generateName pods have no name yet"
    );
}

#[test]
fn a_job_pod_keeps_completing_because_the_proxy_is_a_native_sidecar() {
    let pod = inject_fixture("job-pod", &InjectConfig::default());
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(
        containers.len(),
        1,
        "no long-running regular container keeps the Job alive"
    );
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(
        container(&pod["spec"]["initContainers"], "weft-proxy")["restartPolicy"],
        "Always"
    );
}

#[test]
fn legacy_mode_starts_the_proxy_first_and_holds_the_app_until_it_is_ready() {
    let config = InjectConfig {
        legacy_sidecar: true,
        ..InjectConfig::default()
    };
    let pod = inject_fixture("deployment-pod", &config);
    let first = &pod["spec"]["containers"][0];
    assert_eq!(first["name"], "weft-proxy");
    assert!(first.get("restartPolicy").is_none_or(Value::is_null));
    assert!(
        first["lifecycle"]["postStart"]["exec"]["command"]
            .to_string()
            .contains("wait-proxy-ready")
    );
    assert_eq!(
        pod["spec"]["initContainers"].as_array().unwrap().len(),
        1,
        "only the iptables init"
    );
}

#[test]
fn reinjecting_an_injected_pod_changes_nothing() {
    let outcome = review(&fixture("injected-pod"), &InjectConfig::default());
    assert_eq!(outcome.response["allowed"], true);
    assert!(
        outcome.response.get("patch").is_none_or(Value::is_null),
        "{}",
        outcome.response
    );

    // And a pod this webhook just injected, sent again, is left alone too.
    let injected = inject_fixture("deployment-pod", &InjectConfig::default());
    let mut again: Value = serde_json::from_slice(&fixture("deployment-pod")).unwrap();
    again["request"]["object"] = injected;
    let outcome = review(
        &serde_json::to_vec(&again).unwrap(),
        &InjectConfig::default(),
    );
    assert!(
        outcome.response.get("patch").is_none_or(Value::is_null),
        "{}",
        outcome.response
    );
}

#[test]
fn host_network_and_opted_out_pods_are_admitted_unchanged() {
    let outcome = review(&fixture("hostnetwork-pod"), &InjectConfig::default());
    assert_eq!(outcome.response["allowed"], true);
    assert!(outcome.response.get("patch").is_none_or(Value::is_null));
    assert!(
        outcome.response["warnings"]
            .to_string()
            .contains("hostNetwork"),
        "{}",
        outcome.response
    );
    let outcome = review(&fixture("opted-out-pod"), &InjectConfig::default());
    assert_eq!(outcome.response["allowed"], true);
    assert!(outcome.response.get("patch").is_none_or(Value::is_null));
}

#[test]
fn an_undecodable_pod_is_admitted_with_a_warning_unless_fail_closed() {
    let outcome = review(&fixture("invalid-object"), &InjectConfig::default());
    assert_eq!(outcome.status, 200);
    assert_eq!(outcome.response["allowed"], true);
    assert!(
        outcome.response["warnings"]
            .to_string()
            .contains("cannot inject"),
        "{}",
        outcome.response
    );
    assert_eq!(
        outcome.response["uid"], "4a8b2c5d-6e7f-4a9b-8c3d-5e6f7a8b9c0d",
        "the uid is echoed"
    );
    let closed = InjectConfig {
        fail_closed: true,
        ..InjectConfig::default()
    };
    let outcome = review(&fixture("invalid-object"), &closed);
    assert_eq!(outcome.response["allowed"], false);
}

#[test]
fn malformed_and_truncated_bodies_get_400_with_a_reason_and_never_a_panic() {
    let config = InjectConfig::default();
    let body = fixture("deployment-pod");
    let mut cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[]".to_vec(),
        br#"{"kind":"AdmissionReview"}"#.to_vec(),
    ];
    cases.extend((1..body.len()).step_by(7).map(|n| body[..n].to_vec()));
    // Deterministic pseudo-random bytes and byte flips of a valid review.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let len = (next() % 512) as usize;
        cases.push((0..len).map(|_| next() as u8).collect());
        let mut flipped = body.clone();
        let at = (next() as usize) % flipped.len();
        flipped[at] = next() as u8;
        cases.push(flipped);
    }
    for case in cases {
        let reply = handle_review(&case, &config);
        let json: Value = serde_json::from_slice(&reply.body).expect("always JSON");
        match reply.status {
            400 => {
                assert_eq!(json["response"]["allowed"], false);
                assert!(
                    !json["response"]["status"]["message"]
                        .as_str()
                        .unwrap_or_default()
                        .is_empty()
                );
            }
            200 => assert!(json["response"]["uid"].is_string(), "{json}"),
            other => panic!("unexpected status {other}"),
        }
    }
}
