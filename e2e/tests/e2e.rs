//! End-to-end scenarios: real `weft up`, real Envoy sidecars, real iptables, real HTTP,
//! in network-namespace pods. Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::Duration;

use weft_e2e::{Harness, now_ms};

const BACKEND_URL: &str = "http://backend:8080/";

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: backend-rollout\n  namespace: default\nspec:\n  service: backend\n  backends:\n  - service: backend-v1\n    weight: {v1}\n  - service: backend-v2\n    weight: {v2}\n"
    )
}

/// client → backend (root), backend-v1 and backend-v2, each version one pod, all meshed;
/// a TrafficTarget lets the client in (access is deny-by-default).
fn split_mesh(id: u8, name: &str, v1: u32, v2: u32) -> Harness {
    split_mesh_over(id, name, v1, v2, "delta")
}

/// [`split_mesh`] with sidecars speaking `protocol` (`delta` or `sotw`).
fn split_mesh_over(id: u8, name: &str, v1: u32, v2: u32, protocol: &'static str) -> Harness {
    let mut h = Harness::new(id, name).expect("harness");
    h.use_xds_protocol(protocol);
    h.add_split_topology().unwrap();
    h.write_cluster_manifest().unwrap();
    h.write_manifest("split.yaml", &split(v1, v2)).unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    h
}

#[test]
fn split_80_20_lands_within_five_points() {
    let h = split_mesh(1, "split-80-20", 80, 20);
    let report = h.load("client", BACKEND_URL, 1000, 8).unwrap();
    assert!(
        report.failures().is_empty(),
        "failed requests: {:?}",
        report.failures()
    );
    assert_eq!(report.results.len(), 1000);
    let v1 = report.answered_by("backend-v1") as f64 / 10.0;
    let v2 = report.answered_by("backend-v2") as f64 / 10.0;
    eprintln!(
        "80/20 split: v1 {v1:.1}%, v2 {v2:.1}% ({:?})",
        report.by_pod()
    );
    assert!((75.0..=85.0).contains(&v1), "v1 got {v1}%, expected 80 ± 5");
    assert!((15.0..=25.0).contains(&v2), "v2 got {v2}%, expected 20 ± 5");
}

#[test]
fn changing_the_split_file_moves_all_traffic_without_a_failed_request() {
    split_change_moves_all_traffic(&split_mesh(2, "split-change", 80, 20), "delta");
}

#[test]
fn over_state_of_the_world_xds_a_split_change_also_loses_no_request() {
    let h = split_mesh_over(8, "split-sotw", 80, 20, "sotw");
    split_change_moves_all_traffic(&h, "sotw");
    // A changed cluster becomes active over state of the world too.
    a_cluster_change_reaches(&h, &["client"]);
}

fn split_change_moves_all_traffic(h: &Harness, protocol: &str) {
    let proxies = h.proxy_status().unwrap();
    let protocols: Vec<&str> = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["protocol"].as_str())
        .collect();
    assert_eq!(protocols, vec![protocol; 3], "{proxies}");
    let before = h.acked_version("client", "RDS").unwrap();
    assert!(
        before.is_some(),
        "client proxy has routes before the change"
    );
    let load = h
        .start_load("client", BACKEND_URL, Duration::from_secs(8), 4)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let written = std::time::SystemTime::now();
    h.write_manifest("split.yaml", &split(0, 100)).unwrap();
    h.wait_for_new_ack("client", "RDS", before.as_deref())
        .unwrap();
    let applied_ms = now_ms();
    // proxy-status says when the new routes went out and when Envoy ACKed them.
    let proxies = h.proxy_status().unwrap();
    let rds = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["node"] == "default/client")
        .flat_map(|p| p["types"].as_array().unwrap())
        .find(|t| t["type"] == "RDS")
        .unwrap_or_else(|| panic!("no RDS status for the client: {proxies}"));
    let time = |field: &str| {
        let text = rds[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {rds}"));
        humantime::parse_rfc3339(text).unwrap()
    };
    let (sent, acked) = (time("sent_at"), time("acked_at"));
    assert!(
        written <= sent && sent <= acked,
        "written {written:?}, sent {sent:?}, ACKed {acked:?}"
    );
    let report = load.finish().unwrap();

    assert!(
        report.failures().is_empty(),
        "failed requests during the change: {:?}",
        report.failures()
    );
    let earlier = report
        .results
        .iter()
        .filter(|r| r.start_ms < applied_ms)
        .count();
    let later = report.started_after(applied_ms);
    eprintln!(
        "split change: {} requests, {earlier} before the new routes were ACKed, {} after: {:?}",
        report.results.len(),
        later.results.len(),
        later.by_pod()
    );
    assert!(
        report.answered_by("backend-v1") > 0,
        "v1 served before the change"
    );
    assert!(
        later.results.len() >= 100,
        "enough requests after the change to judge it"
    );
    assert_eq!(
        later.answered_by("backend-v2"),
        later.results.len(),
        "after the change only v2 answers"
    );
}

#[test]
fn a_service_without_split_balances_over_its_pods_and_unknown_destinations_pass_through() {
    let mut h = Harness::new(3, "no-split").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    for i in 0..3 {
        h.add_pod(&format!("backend-{i}"), &[("app", "backend")], "backend")
            .unwrap();
    }
    // Outside the mesh: no service, no sidecar, not in the manifests.
    let outside = h
        .add_pod("outside", &[("app", "outside")], "default")
        .unwrap();
    h.unlist_pod("outside");
    h.add_service("backend", &[("app", "backend")]).unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-0", "backend-1", "backend-2"] {
        h.start_sidecar(pod).unwrap();
    }
    let report = h.load("client", BACKEND_URL, 300, 4).unwrap();
    assert!(
        report.failures().is_empty(),
        "failed requests: {:?}",
        report.failures()
    );
    let counts = report.by_pod();
    eprintln!("no split: {counts:?}");
    assert_eq!(counts.len(), 3, "every pod answers: {counts:?}");
    for (pod, n) in &counts {
        assert!(*n >= 60, "{pod} got only {n} of 300 requests");
    }

    // An address the mesh does not know goes through the sidecar untouched.
    let direct = h
        .load("client", &format!("http://{outside}:8080/"), 20, 2)
        .unwrap();
    assert!(direct.failures().is_empty(), "{:?}", direct.failures());
    assert_eq!(direct.answered_by("outside"), 20);

    // The routing header is the sidecar's: one the app forges (naming another address)
    // is overwritten by the address called, and the server never sees it.
    let (echo, _) = h
        .request(
            "client",
            "GET",
            "http://backend:8080/echo",
            &[&format!("x-weft-dst: {outside}:8080")],
        )
        .unwrap()
        .expect("the call follows the address called");
    assert!(echo.contains("\"pod\":\"backend-"), "{echo}");
    assert!(
        !echo.contains("x-weft-dst"),
        "the header reached the app: {echo}"
    );
}

#[test]
fn invalid_input_is_reported_and_valid_objects_keep_serving() {
    let h = split_mesh(4, "invalid-input", 100, 0);
    let before = h.acked_version("client", "RDS").unwrap();
    // A file that does not parse, and a split whose root service does not exist.
    h.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: [\n",
    )
    .unwrap();
    h.write_manifest(
        "orphan-split.yaml",
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: orphan\nspec:\n  service: nowhere\n  backends:\n  - service: backend-v2\n    weight: 1\n",
    )
    .unwrap();
    // Editing the good split file into garbage keeps its last good version.
    h.write_manifest("split.yaml", "spec: {service: backend, backends: [")
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = h.status().unwrap();
        let errors = status["manifest_errors"].as_array().map_or(0, Vec::len);
        let problems = status["problems"].as_array().map_or(0, Vec::len);
        if errors == 2 && problems == 1 {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never showed the bad input: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let problem = &status["problems"][0];
    assert_eq!(problem["object"], "TrafficSplit default/orphan");
    assert_eq!(problem["state"], "Rejected");
    assert!(
        problem["reason"].as_str().unwrap().contains("nowhere"),
        "{problem}"
    );
    let files: Vec<&str> = status["manifest_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["file"].as_str().unwrap())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("broken.yaml")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.ends_with("split.yaml")), "{files:?}");

    assert_eq!(
        h.acked_version("client", "RDS").unwrap(),
        before,
        "routes unchanged"
    );
    let report = h.load("client", BACKEND_URL, 100, 4).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert_eq!(
        report.answered_by("backend-v1"),
        100,
        "the last good split (100/0) still applies"
    );
}

#[test]
fn init_iptables_is_idempotent_and_removable() {
    let mut h = Harness::new(5, "iptables").expect("harness");
    h.add_pod("pod", &[("app", "pod")], "default").unwrap();
    let weft = weft_path();
    let save = |h: &Harness| {
        let out = h.exec_in("pod", &["iptables-save", "-t", "nat"]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with(':'))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let install = |h: &Harness| {
        let out = h
            .exec_in(
                "pod",
                &[
                    &weft,
                    "init-iptables",
                    "--exclude-inbound-ports",
                    "22",
                    "--exclude-outbound-cidrs",
                    "198.18.0.0/32",
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    install(&h);
    let once = save(&h);
    assert!(
        once.iter()
            .any(|l| l.contains("--uid-owner 1337") && l.contains("RETURN")),
        "{once:#?}"
    );
    assert!(
        once.iter().any(|l| l.contains("REDIRECT --to-ports 15001")),
        "{once:#?}"
    );
    assert!(
        once.iter().any(|l| l.contains("REDIRECT --to-ports 15006")),
        "{once:#?}"
    );
    assert!(
        once.iter()
            .any(|l| l == "-A PREROUTING -p tcp -j WEFT_INBOUND"),
        "{once:#?}"
    );
    install(&h);
    assert_eq!(save(&h), once, "a second install changes nothing");
    let out = h
        .exec_in("pod", &[&weft, "init-iptables", "--remove"])
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let removed = save(&h);
    assert!(removed.iter().all(|l| !l.contains("WEFT")), "{removed:#?}");
    let out = h
        .exec_in("pod", &[&weft, "init-iptables", "--remove"])
        .unwrap();
    assert!(out.status.success(), "removing twice is fine");
}

fn weft_path() -> String {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("weft")
        .to_string_lossy()
        .to_string()
}

#[test]
fn the_injected_proxy_hooks_wait_for_readiness_and_drain() {
    let mut h = Harness::new(6, "proxy-hooks").expect("harness");
    h.add_pod("pod", &[("app", "pod")], "default").unwrap();
    h.write_cluster_manifest().unwrap();
    h.start_control_plane().unwrap();
    h.start_sidecar("pod").unwrap();
    let weft = weft_path();
    let ready = h
        .exec_in("pod", &[&weft, "wait-proxy-ready", "--timeout", "10s"])
        .unwrap();
    assert!(
        ready.status.success(),
        "{}",
        String::from_utf8_lossy(&ready.stderr)
    );
    let nothing_there = h
        .exec_in(
            "pod",
            &[
                &weft,
                "wait-proxy-ready",
                "--admin-addr",
                "127.0.0.1:1",
                "--timeout",
                "1s",
            ],
        )
        .unwrap();
    assert!(!nothing_there.status.success(), "no proxy, no readiness");
    assert_eq!(
        h.envoy_stat("pod", "listener_manager.listener_stopped")
            .unwrap(),
        0
    );
    // The harness runs Envoy with --drain-time-s 2: listeners stop once that has passed.
    let drain = h
        .exec_in("pod", &[&weft, "drain-proxy", "--wait", "3s"])
        .unwrap();
    assert!(
        drain.status.success(),
        "{}",
        String::from_utf8_lossy(&drain.stderr)
    );
    // drain-proxy returns after its wait; Envoy stops the listeners at the drain's end,
    // which a loaded machine can put a little later.
    weft_e2e::wait_until(
        Duration::from_secs(5),
        "listeners stopped after the graceful drain",
        || {
            h.envoy_stat("pod", "listener_manager.listener_stopped")
                .is_ok_and(|stopped| stopped >= 1)
        },
    )
    .unwrap();
}

#[test]
fn kubelet_probes_reach_the_app_through_the_proxy_under_strict_mtls() {
    let mut h = Harness::new(7, "probes").expect("harness");
    let web = h.add_pod("web-0", &[("app", "web")], "web").unwrap();
    // What the injection webhook writes when it rewrites the app's readiness probe.
    h.annotate_pod(
        "web-0",
        "weft.dev/original-probes",
        r#"{"app/readyz":{"port":8080,"path":"/","scheme":"HTTP"}}"#,
    );
    h.add_pod("kubelet", &[("app", "kubelet")], "default")
        .unwrap();
    h.unlist_pod("kubelet");
    h.add_service("web", &[("app", "web")]).unwrap();
    h.write_cluster_manifest().unwrap();
    h.start_control_plane().unwrap();
    h.start_sidecar("web-0").unwrap();

    let probe = h
        .get(
            "kubelet",
            &format!("http://{web}:15020/app-health/app/readyz"),
        )
        .unwrap();
    assert_eq!(
        probe.map(|(body, _)| body),
        Ok("web-0".to_string()),
        "the rewritten probe reaches the app"
    );
    let ready = h
        .get("kubelet", &format!("http://{web}:15021/ready"))
        .unwrap();
    assert_eq!(
        ready.map(|(body, _)| body),
        Ok("LIVE".to_string()),
        "the proxy's readiness for the kubelet"
    );
    let direct = h.get("kubelet", &format!("http://{web}:8080/")).unwrap();
    assert!(
        direct.is_err(),
        "plaintext to the app port is still refused: {direct:?}"
    );
    let other = h
        .get(
            "kubelet",
            &format!("http://{web}:15020/app-health/app/livez"),
        )
        .unwrap();
    assert!(
        other.is_err(),
        "only the probes the webhook rewrote are forwarded: {other:?}"
    );
}

/// Names of the outbound service clusters a sidecar's Envoy holds (`/clusters`).
fn outbound_clusters(h: &Harness, pod: &str) -> std::collections::BTreeSet<String> {
    h.envoy_admin(pod, "/clusters")
        .unwrap()
        .lines()
        .filter_map(|l| l.split("::").next())
        .filter(|name| name.starts_with("outbound|"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_sidecar_with_on_demand_clusters_holds_only_what_it_called_and_loses_no_request() {
    let mut h = Harness::new(100, "on-demand").expect("harness");
    h.add_split_topology().unwrap();
    h.annotate_pod("client", "weft.dev/outbound-clusters", "on-demand");
    h.write_cluster_manifest().unwrap();
    h.write_manifest("split.yaml", &split(50, 50)).unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    // A sidecar without the annotation holds every service's cluster from the start;
    // the annotated one none, until it calls.
    let eager = outbound_clusters(&h, "backend-v1-0");
    assert_eq!(eager.len(), 3, "{eager:?}");
    assert!(
        outbound_clusters(&h, "client").is_empty(),
        "{:?}",
        outbound_clusters(&h, "client")
    );
    // The very first call streams a 5 MB body: the request waits (its body held back
    // by flow control) while the cluster is fetched, then goes through whole.
    let up = h
        .app(
            "client",
            &["upload", "http://backend:8080/upload", "--bytes", "5000000"],
        )
        .unwrap()
        .unwrap();
    assert_eq!(up["ok"], true, "{up}");
    // Every other call waits for its cluster instead of failing too; the split picks
    // one of two clusters per request, each fetched when first picked.
    let report = h.load("client", BACKEND_URL, 60, 4).unwrap();
    assert!(
        report.failures().is_empty(),
        "failed requests: {:?}",
        report.failures()
    );
    assert!(report.answered_by("backend-v1") > 0 && report.answered_by("backend-v2") > 0);
    let fetched = outbound_clusters(&h, "client");
    let names: Vec<&str> = fetched.iter().map(String::as_str).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.iter().all(|n| n.contains("||backend-v")),
        "only the split's backends were called: {names:?}"
    );
    // What the control plane says it serves the proxy is what Envoy holds: the clusters
    // it fetched and the endpoints of those.
    let ours = h
        .proxy_config("client", &["clusters", "endpoints"])
        .unwrap();
    let served = |kind: &str, field: &str| -> std::collections::BTreeSet<String> {
        ours[kind]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r[field].as_str())
            .filter(|n| n.starts_with("outbound|"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(served("clusters", "name"), fetched);
    assert_eq!(served("endpoints", "cluster_name"), fetched);
    // A fetched cluster follows later changes to it: its endpoints are sent again, so
    // the new version finishes warming and serves; so does the eagerly held copy of a
    // sidecar without the annotation.
    a_cluster_change_reaches(&h, &["client", "backend-v2-0"]);
}

/// A connection limit put on backend-v1 of a running mesh becomes the active cluster
/// in `pods`' Envoys (an updated EDS cluster warms until its endpoints come), and the
/// client's calls keep succeeding.
fn a_cluster_change_reaches(h: &Harness, pods: &[&str]) {
    h.write_manifest(
        "limit.yaml",
        "apiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: limit, namespace: default}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: backend-v1}]\n  connectionPool: {maxConnections: 7}\n",
    )
    .unwrap();
    for pod in pods {
        weft_e2e::wait_until(
            Duration::from_secs(10),
            "the limit in the active cluster",
            || {
                h.envoy_admin(pod, "/clusters").is_ok_and(|text| {
                    text.lines().any(|l| {
                        l.contains("||backend-v1.")
                            && l.ends_with("default_priority::max_connections::7")
                    })
                })
            },
        )
        .unwrap_or_else(|e| panic!("{pod}: {e}"));
    }
    let report = h.load("client", BACKEND_URL, 20, 2).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
}
