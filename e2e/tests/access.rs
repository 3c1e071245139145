//! SMI access control and traffic specs end to end (conformance-style steps): real
//! Envoy RBAC on real mTLS identities, in network-namespace pods, `weft up` with its
//! default access mode (deny-by-default), and the permissive mode for adoption.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use weft_e2e::Harness;

/// Pods a-0, b-0, c-0 running as service accounts a, b, c; services a, b (and b on
/// 8080 as HTTP and 9090 as TCP when `tcp` is set).
fn mesh(id: u8, name: &str, tcp: bool) -> Harness {
    mesh_with(id, name, tcp, &[])
}

/// [`mesh`] with extra `weft up` flags.
fn mesh_with(id: u8, name: &str, tcp: bool, weft_args: &[&str]) -> Harness {
    let mut h = Harness::new(id, name).expect("harness");
    for sa in ["a", "b", "c"] {
        h.add_pod(&format!("{sa}-0"), &[("app", sa)], sa).unwrap();
    }
    h.add_service("a", &[("app", "a")]).unwrap();
    if tcp {
        h.add_service_ports(
            "b",
            &[("app", "b")],
            &[("tcp-one", 8080), ("tcp-two", 9090)],
        )
        .unwrap();
    } else {
        h.add_service("b", &[("app", "b")]).unwrap();
    }
    h.write_cluster_manifest().unwrap();
    h.start_control_plane_with(weft_args).unwrap();
    for pod in ["a-0", "b-0", "c-0"] {
        h.start_sidecar(pod).unwrap();
    }
    h
}

fn target(name: &str, source: &str, rules: &str) -> String {
    format!(
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  destination:\n    kind: ServiceAccount\n    name: b\n    namespace: default\n  sources:\n  - kind: ServiceAccount\n    name: {source}\n    namespace: default\n  rules:\n{rules}"
    )
}

const ROUTES: &str = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata:\n  name: b-routes\n  namespace: default\nspec:\n  matches:\n  - name: everything\n    pathRegex: \".*\"\n    methods: [\"*\"]\n  - name: metrics\n    pathRegex: /metrics\n    methods: [\"*\"]\n  - name: one\n    pathRegex: /one\n    methods: [\"*\"]\n  - name: two\n    pathRegex: /two\n    methods: [\"*\"]\n  - name: reads\n    pathRegex: \"/.*\"\n    methods: [GET]\n  - name: debug-header\n    pathRegex: /debug\n    methods: [\"*\"]\n    headers:\n      x-debug: \"^on$\"\n";

fn http_rule(matches: &[&str]) -> String {
    let list: String = matches.iter().map(|m| format!("    - {m}\n")).collect();
    format!("  - kind: HTTPRouteGroup\n    name: b-routes\n    matches:\n{list}")
}

/// Outcome of one request: Ok(answering pod) or the failure text (403s say so).
fn call(
    h: &Harness,
    from: &str,
    method: &str,
    url: &str,
    headers: &[&str],
) -> Result<String, String> {
    h.request(from, method, url, headers)
        .unwrap()
        .map(|(body, _)| body)
}

/// [`call`], once the mesh is settled: `weft explain` must predict the real outcome.
fn checked_call(
    h: &Harness,
    from: &str,
    method: &str,
    url: &str,
    headers: &[&str],
) -> Result<String, String> {
    let outcome = call(h, from, method, url, headers);
    let explained = h.explain(from, method, url, headers).unwrap();
    let predicted = explained["verdict"].as_str().unwrap_or_default();
    assert_eq!(
        predicted == "allowed",
        outcome.is_ok(),
        "weft explain said {predicted} for {from} {method} {url} {headers:?}, the proxies said {outcome:?}: {explained}"
    );
    outcome
}

fn denied(outcome: &Result<String, String>) -> bool {
    outcome.as_ref().err().is_some_and(|e| e.contains("403"))
}

/// Polls until `ok` holds; returns how long it took.
fn eventually(what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn no_traffic_target_denies_and_a_traffic_target_grants_until_deleted() {
    let h = mesh(20, "access-grant", false);
    let b = "http://b:8080/";
    assert!(denied(&call(&h, "a-0", "GET", b, &[])), "default deny");
    h.write_manifest("routes.yaml", ROUTES).unwrap();
    h.write_manifest(
        "a-to-b.yaml",
        &target("a-to-b", "a", &http_rule(&["everything"])),
    )
    .unwrap();
    let granted = eventually("a to be allowed", || {
        call(&h, "a-0", "GET", b, &[]) == Ok("b-0".to_string())
    });
    assert!(
        denied(&call(&h, "c-0", "GET", b, &[])),
        "only the named source is allowed"
    );
    h.remove_manifest("a-to-b.yaml").unwrap();
    let revoked = eventually("a to be denied again", || {
        denied(&call(&h, "a-0", "GET", b, &[]))
    });
    eprintln!("access granted after {granted:?}, revoked after {revoked:?}");
    assert!(
        revoked < Duration::from_secs(1),
        "deleting the TrafficTarget denies within a second: {revoked:?}"
    );
    let rbac = h
        .envoy_stat("b-0", "http.inbound_8080.rbac.denied")
        .unwrap();
    assert!(rbac >= 2, "denials show in Envoy's RBAC stats: {rbac}");
}

#[test]
fn route_groups_limit_paths_methods_and_headers() {
    let h = mesh(21, "access-routes", false);
    h.write_manifest("routes.yaml", ROUTES).unwrap();
    h.write_manifest("t.yaml", &target("a-to-b", "a", &http_rule(&["metrics"])))
        .unwrap();
    let url = |p: &str| format!("http://b:8080{p}");
    eventually("/metrics allowed", || {
        call(&h, "a-0", "GET", &url("/metrics"), &[]).is_ok()
    });
    assert!(
        checked_call(&h, "a-0", "POST", &url("/metrics"), &[]).is_ok(),
        "any method on /metrics"
    );
    assert!(
        checked_call(&h, "a-0", "GET", &url("/metrics/detail"), &[]).is_ok(),
        "pathRegex is anchored at the start only"
    );
    assert!(
        denied(&checked_call(&h, "a-0", "GET", &url("/other"), &[])),
        "/other is not granted"
    );

    h.write_manifest("t.yaml", &target("a-to-b", "a", &http_rule(&["reads"])))
        .unwrap();
    eventually("GET allowed", || {
        call(&h, "a-0", "GET", &url("/anything"), &[]).is_ok()
    });
    assert!(
        denied(&checked_call(&h, "a-0", "POST", &url("/anything"), &[])),
        "only GET"
    );

    h.write_manifest(
        "t.yaml",
        &target("a-to-b", "a", &http_rule(&["debug-header"])),
    )
    .unwrap();
    // The previous grant (GET anything) is gone once GET /anything is refused.
    eventually("the reads grant replaced", || {
        denied(&call(&h, "a-0", "GET", &url("/anything"), &[]))
    });
    assert!(
        checked_call(&h, "a-0", "GET", &url("/debug"), &["x-debug: on"]).is_ok(),
        "header matches"
    );
    assert!(
        denied(&checked_call(&h, "a-0", "GET", &url("/debug"), &[])),
        "header missing"
    );
    assert!(
        denied(&checked_call(
            &h,
            "a-0",
            "GET",
            &url("/debug"),
            &["x-debug: off"]
        )),
        "header value not matching"
    );
}

#[test]
fn a_tcp_route_allows_one_port_and_denies_another() {
    let h = mesh(22, "access-tcp", true);
    h.write_manifest(
        "tcp.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata:\n  name: port-one\n  namespace: default\nspec:\n  matches:\n    ports: [8080]\n",
    )
    .unwrap();
    h.write_manifest(
        "t.yaml",
        &target("a-to-b", "a", "  - kind: TCPRoute\n    name: port-one\n"),
    )
    .unwrap();
    eventually("port 8080 allowed", || {
        call(&h, "a-0", "GET", "http://b:8080/", &[]) == Ok("b-0".to_string())
    });
    let other = checked_call(&h, "a-0", "GET", "http://b:9090/", &[]);
    assert!(other.is_err(), "port 9090 is closed to a: {other:?}");
    assert!(
        checked_call(&h, "c-0", "GET", "http://b:8080/", &[]).is_err(),
        "c has no grant at all"
    );
    let denied_conns = h.envoy_stat("b-0", "inbound_9090.rbac.denied").unwrap();
    assert!(
        denied_conns >= 1,
        "the refused connection shows in the network RBAC stats"
    );
}

#[test]
fn two_traffic_targets_add_up() {
    let h = mesh(23, "access-sum", false);
    h.write_manifest("routes.yaml", ROUTES).unwrap();
    h.write_manifest("t1.yaml", &target("a-one", "a", &http_rule(&["one"])))
        .unwrap();
    h.write_manifest("t2.yaml", &target("a-two", "a", &http_rule(&["two"])))
        .unwrap();
    eventually("both grants", || {
        call(&h, "a-0", "GET", "http://b:8080/one", &[]).is_ok()
            && call(&h, "a-0", "GET", "http://b:8080/two", &[]).is_ok()
    });
    assert!(denied(&call(&h, "a-0", "GET", "http://b:8080/three", &[])));
}

#[test]
fn a_split_with_matches_sends_only_matching_requests_to_its_backends() {
    let mut h = Harness::new(24, "canary").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("web-v1-0", &[("app", "web"), ("version", "v1")], "web")
        .unwrap();
    h.add_pod("web-v2-0", &[("app", "web"), ("version", "v2")], "web")
        .unwrap();
    // The root service is the stable version; the canary is reached through the split.
    h.add_service("web", &[("app", "web"), ("version", "v1")])
        .unwrap();
    h.add_service("web-v2", &[("app", "web"), ("version", "v2")])
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.write_manifest(
        "canary.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata:\n  name: insiders\n  namespace: default\nspec:\n  matches:\n  - name: insiders\n    headers:\n      x-canary: \"^yes$\"\n---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: web-canary\n  namespace: default\nspec:\n  service: web\n  matches:\n  - kind: HTTPRouteGroup\n    name: insiders\n  backends:\n  - service: web-v2\n    weight: 100\n",
    )
    .unwrap();
    h.allow("access.yaml", "web", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "web-v1-0", "web-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    for _ in 0..10 {
        assert_eq!(
            call(&h, "client", "GET", "http://web:8080/", &["x-canary: yes"]),
            Ok("web-v2-0".to_string())
        );
        assert_eq!(
            call(&h, "client", "GET", "http://web:8080/", &[]),
            Ok("web-v1-0".to_string())
        );
        assert_eq!(
            call(&h, "client", "GET", "http://web:8080/", &["x-canary: no"]),
            Ok("web-v1-0".to_string())
        );
    }
}

#[test]
fn permissive_mode_allows_meshed_traffic_over_mtls_and_a_mesh_config_switches_it_live() {
    let h = mesh_with(25, "access-permissive", false, &["--access", "permissive"]);
    let b = "http://b:8080/";
    for from in ["a-0", "c-0"] {
        assert_eq!(
            call(&h, from, "GET", b, &[]),
            Ok("b-0".to_string()),
            "{from}"
        );
    }
    let (_, peer) = h.request("a-0", "GET", b, &[]).unwrap().unwrap();
    assert!(
        peer.unwrap_or_default()
            .contains("URI=spiffe://cluster.local/ns/default/sa/a"),
        "permissive access still authenticates callers with mutual TLS"
    );

    h.write_manifest(
        "meshconfig.yaml",
        "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: weft\nspec:\n  access: DenyByDefault\n",
    )
    .unwrap();
    let to_deny = eventually("the MeshConfig to deny by default", || {
        denied(&call(&h, "a-0", "GET", b, &[]))
    });
    let status = h.status().unwrap();
    assert_eq!(status["settings"]["access"], "deny-by-default", "{status}");
    assert_eq!(status["settings"]["source"], "MeshConfig weft", "{status}");

    // Requests ride the same pooled connection: a mode switch changes only routes, so
    // it applies to the next request rather than when old connections drain.
    assert!(
        denied(&checked_call(&h, "a-0", "GET", b, &[])),
        "denied on every connection"
    );
    h.remove_manifest("meshconfig.yaml").unwrap();
    let to_permissive = eventually("the flag's permissive mode again", || {
        call(&h, "a-0", "GET", b, &[]) == Ok("b-0".to_string())
    });
    eprintln!("mode switched to deny in {to_deny:?}, back to permissive in {to_permissive:?}");
    assert!(
        to_deny < Duration::from_secs(1) && to_permissive < Duration::from_secs(1),
        "a mode switch applies within a second: {to_deny:?}, {to_permissive:?}"
    );
    assert_eq!(h.status().unwrap()["settings"]["source"], "flags");
}

#[test]
fn revoking_tcp_access_closes_open_connections_within_the_drain_time() {
    let h = mesh(26, "access-tcp-revoke", true);
    h.write_manifest(
        "t.yaml",
        &target("a-to-b", "a", "  - kind: TCPRoute\n    name: all-ports\n"),
    )
    .unwrap();
    h.write_manifest(
        "tcp.yaml",
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata:\n  name: all-ports\n  namespace: default\nspec:\n  matches:\n    ports: []\n",
    )
    .unwrap();
    let url = "http://b:9090/";
    eventually("TCP access granted", || {
        call(&h, "a-0", "GET", url, &[]) == Ok("b-0".to_string())
    });
    // Keep-alive connections opened while access is granted.
    let running = h.start_load("a-0", url, Duration::from_secs(9), 2).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let listeners = h.acked_version("b-0", "LDS").unwrap();
    h.remove_manifest("t.yaml").unwrap();
    h.wait_for_new_ack("b-0", "LDS", listeners.as_deref())
        .unwrap();
    let revoked = weft_e2e::now_ms();
    let report = running.finish().unwrap();
    let before = report.results.iter().filter(|r| r.start_ms < revoked);
    assert!(
        before.filter(|r| r.error.is_none()).count() > 10,
        "traffic flowed before the revocation"
    );
    let last_success = report
        .results
        .iter()
        .filter(|r| r.error.is_none())
        .map(|r| r.start_ms)
        .max()
        .unwrap_or(revoked);
    let lingered = last_success.saturating_sub(revoked);
    eprintln!("open TCP connections served {lingered} ms after the revocation");
    // The harness runs Envoy with --drain-time-s 2: the changed filter chain's
    // connections are closed when it has passed, and new ones are refused.
    assert!(
        lingered < 3_500,
        "requests on connections opened before the revocation still succeeded {lingered} ms later"
    );
    let after = report
        .results
        .iter()
        .filter(|r| r.start_ms > revoked + 3_500)
        .count();
    assert!(after > 0, "the load kept trying after the drain time");
}
