//! Older SMI versions, as progressive delivery tools write them: a TrafficSplit written as
//! `split.smi-spec.io/v1alpha1` with quantity weights (Argo Rollouts' default) splits
//! traffic exactly like its v1alpha4 twin, in local mode (`weft up`) and in Kubernetes
//! mode, where the API-server double converts through the real `weft-webhook`'s
//! `/convert` over HTTPS as the API server does. The mesh tests need root; they fail
//! (never skip) without it. They need `cargo build --workspace --bins` first.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use weft_e2e::apiserver::{ApiServerDouble, ConversionWebhook, custom_resource_versions};
use weft_e2e::{Harness, KubeCluster, LoadReport, now_ms};

const BACKEND_URL: &str = "http://backend:8080/";
const TWIN_URL: &str = "http://twin:8080/";

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-conversion-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn split_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("split.smi-spec.io", version, "TrafficSplit"),
        "trafficsplits",
    )
}

fn weights(object: &Value) -> Vec<Value> {
    object["spec"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["weight"].clone())
        .collect()
}

/// The API error of a failed call: (code, message).
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// The API-server double serves what the CRDs serve, and converts as the API server does.

#[test]
fn the_double_serves_every_version_the_chart_crds_serve_with_their_strategy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/weft/crds");
    let mut from_crds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
        let versions = crd["spec"]["versions"].as_array().unwrap();
        if versions.len() < 2 {
            continue;
        }
        let strategy = crd["spec"]["conversion"]["strategy"]
            .as_str()
            .unwrap_or("None");
        for v in versions {
            assert_eq!(v["served"], true);
            from_crds.push((
                format!(
                    "{}/{}",
                    crd["spec"]["group"].as_str().unwrap(),
                    v["name"].as_str().unwrap()
                ),
                crd["spec"]["names"]["kind"].as_str().unwrap().to_string(),
                v["storage"] == true,
                strategy.to_string(),
            ));
        }
    }
    let mut served = custom_resource_versions();
    from_crds.sort();
    served.sort();
    assert_eq!(served, from_crds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_converts_older_versions_through_the_real_webhook() {
    let dir = temp_dir("double");
    let api = ApiServerDouble::start().await.unwrap();
    let client = api.client().await.unwrap();
    let ns = |version: &str| -> Api<DynamicObject> {
        Api::namespaced_with(client.clone(), "default", &split_resource(version))
    };
    let (v1, v2, v4) = (ns("v1alpha1"), ns("v1alpha2"), ns("v1alpha4"));
    // As Argo Rollouts writes it (`--traffic-split-api-version` defaults to v1alpha1).
    let rollout = DynamicObject::new("rollout", &split_resource("v1alpha1")).data(json!({
        "spec": {"service": "web", "backends": [
            {"service": "web-canary", "weight": "500m"}, {"service": "web-stable", "weight": "1500m"}]},
    }));

    // No webhook yet: the API server would fail the call as with an unreachable one.
    let (code, message) = api_error(v1.create(&PostParams::default(), &rollout).await);
    assert_eq!(code, 500, "{message}");
    assert!(
        message.contains(
            "conversion webhook for split.smi-spec.io/v1alpha4, Kind=TrafficSplit failed"
        ),
        "{message}"
    );

    let webhook = ConversionWebhook::start(&dir).unwrap();
    api.use_conversion_webhook(webhook.url(), webhook.ca_pem())
        .unwrap();
    let created = v1.create(&PostParams::default(), &rollout).await.unwrap();
    assert_eq!(
        created.types.as_ref().unwrap().api_version,
        "split.smi-spec.io/v1alpha1"
    );
    assert_eq!(weights(&created.data), [json!("500m"), json!("1500m")]);
    // Stored in the stored version, in exact milli-units.
    let stored = api
        .get(
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            Some("default"),
            "rollout",
        )
        .unwrap();
    assert_eq!(stored["apiVersion"], "split.smi-spec.io/v1alpha4");
    assert_eq!(weights(&stored), [json!(500), json!(1500)]);
    assert_eq!(
        weights(&v4.get("rollout").await.unwrap().data),
        [json!(500), json!(1500)]
    );
    assert_eq!(
        weights(&v2.get("rollout").await.unwrap().data),
        [json!(500), json!(1500)]
    );
    assert_eq!(
        api.requests("create", "trafficsplits", ""),
        2,
        "the refused one too"
    );

    // A v1alpha4 writer adds matches; v1alpha2 readers keep them in the annotation, and
    // an Argo-style merge patch of the weights in v1alpha1 leaves them in place.
    let matches = json!({"spec": {"matches": [{"kind": "HTTPRouteGroup", "name": "beta"}]}});
    v4.patch("rollout", &PatchParams::default(), &Patch::Merge(&matches))
        .await
        .unwrap();
    let listed = v2.list(&ListParams::default()).await.unwrap();
    let item = &listed.items[0];
    assert!(item.data["spec"].get("matches").is_none());
    assert!(
        item.metadata.annotations.as_ref().unwrap()["weft.dev/conversion-data"].contains("beta")
    );
    let mut watch = v1
        .watch(&WatchParams::default(), "0")
        .await
        .unwrap()
        .boxed();
    let Some(Ok(WatchEvent::Added(added))) = watch.next().await else {
        panic!("no ADDED event")
    };
    assert_eq!(
        added.types.unwrap().api_version,
        "split.smi-spec.io/v1alpha1"
    );
    assert_eq!(weights(&added.data), [json!("500m"), json!("1500m")]);
    let shift = json!({"spec": {"backends": [
        {"service": "web-canary", "weight": "1"}, {"service": "web-stable", "weight": "0"}]}});
    let patched = v1
        .patch("rollout", &PatchParams::default(), &Patch::Merge(&shift))
        .await
        .unwrap();
    assert_eq!(weights(&patched.data), [json!("1"), json!("0")]);
    let Some(Ok(WatchEvent::Modified(modified))) = watch.next().await else {
        panic!("no MODIFIED event")
    };
    assert_eq!(weights(&modified.data), [json!("1"), json!("0")]);
    let stored = v4.get("rollout").await.unwrap();
    assert_eq!(weights(&stored.data), [json!(1000), json!(0)]);
    assert_eq!(stored.data["spec"]["matches"][0]["name"], "beta");
    assert!(stored.metadata.annotations.is_none(), "{stored:?}");

    // Server-side apply in v1alpha1 too.
    let applied = DynamicObject::new("applied", &split_resource("v1alpha1")).data(json!({
        "spec": {"service": "api", "backends": [{"service": "api-v1", "weight": 3}, {"service": "api-v2", "weight": 1}]},
    }));
    v1.patch(
        "applied",
        &PatchParams::apply("argo-rollouts").force(),
        &Patch::Apply(&applied),
    )
    .await
    .unwrap();
    assert_eq!(
        weights(&v4.get("applied").await.unwrap().data),
        [json!(3000), json!(1000)]
    );

    // What the webhook refuses fails the write, with its reason.
    let tiny = DynamicObject::new("tiny", &split_resource("v1alpha1")).data(json!({
        "spec": {"service": "web", "backends": [{"service": "web-canary", "weight": "1u"}]},
    }));
    let (code, message) = api_error(v1.create(&PostParams::default(), &tiny).await);
    assert_eq!(code, 500);
    assert!(message.contains("finer than a milli-unit"), "{message}");
    assert!(
        api.get(
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            Some("default"),
            "tiny"
        )
        .is_none()
    );

    // TrafficTarget v1alpha2 has v1alpha3's schema: strategy None, no webhook involved.
    let target_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("access.smi-spec.io", "v1alpha2", "TrafficTarget"),
        "traffictargets",
    );
    let targets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &target_resource);
    let target = DynamicObject::new("to-web", &target_resource).data(json!({"spec": {
        "destination": {"kind": "ServiceAccount", "name": "web", "port": 8080},
        "sources": [{"kind": "ServiceAccount", "name": "client"}]}}));
    targets
        .create(&PostParams::default(), &target)
        .await
        .unwrap();
    let stored = api
        .get(
            "access.smi-spec.io/v1alpha3",
            "TrafficTarget",
            Some("default"),
            "to-web",
        )
        .unwrap();
    assert_eq!(stored["spec"]["destination"]["port"], 8080);

    // Discovery lists every served version, the stored one preferred.
    let discovery = kube::discovery::Discovery::new(client.clone())
        .run()
        .await
        .unwrap();
    let group = discovery.get("split.smi-spec.io").unwrap();
    assert_eq!(group.preferred_version_or_latest(), "v1alpha4");
    let versions: Vec<&str> = group.versions().collect();
    assert_eq!(versions, ["v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"]);
    assert!(
        discovery
            .resolve_gvk(&GroupVersionKind::gvk(
                "specs.smi-spec.io",
                "v1alpha1",
                "TCPRoute"
            ))
            .is_some()
    );
    drop(webhook);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// The mesh: a v1alpha1 split with quantity weights routes exactly like its v1alpha4 twin.

/// client → backend (root of the split written as v1alpha1) and twin (root of its
/// v1alpha4 twin), both over backend-v1 and backend-v2, one pod each, all meshed.
fn twin_mesh(id: u8, name: &str) -> Harness {
    let mut h = Harness::new(id, name).expect("harness");
    h.add_split_topology().unwrap();
    h.add_service("twin", &[("app", "backend")]).unwrap();
    h
}

/// The split as Argo Rollouts writes it in v1alpha1: quantity weights, 75% to v1.
const V1ALPHA1_SPLIT: &str = "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata:\n  name: backend-rollout\n  namespace: default\nspec:\n  service: backend\n  backends:\n  - service: backend-v1\n    weight: 1500m\n  - service: backend-v2\n    weight: 500m\n";
/// Its v1alpha4 twin on the twin root service.
const V1ALPHA4_TWIN: &str = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: twin-rollout\n  namespace: default\nspec:\n  service: twin\n  backends:\n  - service: backend-v1\n    weight: 1500\n  - service: backend-v2\n    weight: 500\n";

/// The weighted clusters of the client's routes for `service`, from its Envoy.
fn route_weights(h: &Harness, service: &str) -> BTreeMap<String, u64> {
    let dump: Value = serde_json::from_str(
        &h.envoy_admin("client", "/config_dump?resource=dynamic_route_configs")
            .unwrap(),
    )
    .unwrap();
    let mut out = BTreeMap::new();
    for config in dump["configs"].as_array().unwrap() {
        let hosts = config["route_config"]["virtual_hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // Each service port has its own table (named `<fqdn>:<port>`), reached only
        // through that service's addresses.
        for host in hosts {
            let name = host["name"].as_str().unwrap_or_default();
            if !name.starts_with(&format!("{service}.")) {
                continue;
            }
            for route in host["routes"].as_array().cloned().unwrap_or_default() {
                for c in route["route"]["weighted_clusters"]["clusters"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    let weight = c["weight"].as_u64().unwrap();
                    out.insert(c["name"].as_str().unwrap().to_string(), weight);
                }
            }
        }
    }
    out
}

fn v1_share(report: &LoadReport, what: &str) -> f64 {
    assert!(
        report.failures().is_empty(),
        "{what}: {:?}",
        report.failures()
    );
    let share = report.answered_by("backend-v1") as f64 * 100.0 / report.results.len() as f64;
    eprintln!("{what}: backend-v1 {share:.1}% ({:?})", report.by_pod());
    share
}

/// Both splits route the same: the same clusters with the same weights (1500 and 500),
/// and 75% ± 5 of 1,000 requests each to backend-v1.
fn assert_twins_route_alike(h: &Harness) {
    let old = route_weights(h, "backend");
    let twin = route_weights(h, "twin");
    eprintln!("route weights: v1alpha1-written {old:?}, v1alpha4 twin {twin:?}");
    assert_eq!(
        old.values().copied().collect::<Vec<_>>(),
        [1500, 500],
        "{old:?}"
    );
    assert_eq!(old, twin, "the same weighted clusters");
    let written = v1_share(
        &h.load("client", BACKEND_URL, 1000, 8).unwrap(),
        "v1alpha1 split",
    );
    let twin = v1_share(
        &h.load("client", TWIN_URL, 1000, 8).unwrap(),
        "v1alpha4 twin",
    );
    assert!(
        (70.0..=80.0).contains(&written),
        "v1alpha1: {written}%, expected 75 ± 5"
    );
    assert!(
        (70.0..=80.0).contains(&twin),
        "v1alpha4: {twin}%, expected 75 ± 5"
    );
}

#[test]
fn local_mode_a_v1alpha1_split_with_quantity_weights_splits_like_its_v1alpha4_twin() {
    let mut h = twin_mesh(70, "conv-local");
    h.write_cluster_manifest().unwrap();
    h.write_manifest("split.yaml", V1ALPHA1_SPLIT).unwrap();
    h.write_manifest("twin.yaml", V1ALPHA4_TWIN).unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    assert_twins_route_alike(&h);
    let status = h.status().unwrap();
    for list in ["manifest_errors", "problems"] {
        assert_eq!(
            status[list].as_array().map_or(0, Vec::len),
            0,
            "weft status: {status}"
        );
    }
}

#[test]
fn kubernetes_mode_a_v1alpha1_split_written_like_argo_rollouts_splits_like_its_twin() {
    let mut h = twin_mesh(71, "conv-k8s");
    let KubeCluster { api, kubeconfig } = h.start_cluster().unwrap();
    let webhook = ConversionWebhook::start(&h.work_dir().join("webhook")).unwrap();
    api.use_conversion_webhook(webhook.url(), webhook.ca_pem())
        .unwrap();

    // Argo Rollouts creates its split with the typed v1alpha1 client: over HTTP.
    let client = api.block_on(api.client()).unwrap();
    let v1: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &split_resource("v1alpha1"));
    let written: Value = serde_yaml_ng::from_str(V1ALPHA1_SPLIT).unwrap();
    let split = DynamicObject::new("backend-rollout", &split_resource("v1alpha1"))
        .data(json!({"spec": written["spec"]}));
    api.block_on(v1.create(&PostParams::default(), &split))
        .unwrap();
    api.apply_object(serde_yaml_ng::from_str(V1ALPHA4_TWIN).unwrap())
        .unwrap();
    // The TrafficTarget in v1alpha2 (the same schema: the double rewrites apiVersion).
    api.apply_object(json!({
        "apiVersion": "access.smi-spec.io/v1alpha2", "kind": "TrafficTarget",
        "metadata": {"name": "to-backend", "namespace": "default"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "backend", "namespace": "default"},
                 "sources": [{"kind": "ServiceAccount", "name": "client", "namespace": "default"}]},
    }))
    .unwrap();

    h.start_controller(1, &kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    assert_twins_route_alike(&h);

    // The controller's status shows through the v1alpha1 view Argo Rollouts reads.
    let deadline = Instant::now() + Duration::from_secs(10);
    let accepted = loop {
        let read = api.block_on(v1.get("backend-rollout")).unwrap();
        let conditions = read.data["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(c) = conditions.into_iter().find(|c| c["type"] == "Accepted") {
            break (read, c);
        }
        assert!(Instant::now() < deadline, "no Accepted condition");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(accepted.1["status"], "True", "{}", accepted.1);
    assert_eq!(weights(&accepted.0.data), [json!("1500m"), json!("500m")]);

    // Argo Rollouts promotes: a merge patch of the v1alpha1 weights, under load.
    let before = h.acked_version("client", "RDS").unwrap();
    let load = h
        .start_load("client", BACKEND_URL, Duration::from_secs(8), 4)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let promote = json!({"spec": {"backends": [
        {"service": "backend-v1", "weight": "0"}, {"service": "backend-v2", "weight": "1"}]}});
    api.block_on(v1.patch(
        "backend-rollout",
        &PatchParams::default(),
        &Patch::Merge(&promote),
    ))
    .unwrap();
    h.wait_for_new_ack("client", "RDS", before.as_deref())
        .unwrap();
    let applied_ms = now_ms();
    let report = load.finish().unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let later = report.started_after(applied_ms);
    assert!(
        later.results.len() >= 100,
        "enough requests after the change"
    );
    assert_eq!(later.answered_by("backend-v2"), later.results.len());
    let stored = api
        .get(
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            Some("default"),
            "backend-rollout",
        )
        .unwrap();
    assert_eq!(weights(&stored), [json!(0), json!(1000)]);
    drop(webhook);
}
