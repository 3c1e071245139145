//! Gateway API for the mesh (GAMMA) end to end: HTTPRoutes attached to a Service steer
//! every meshed caller's requests, with real `weft up`, real Envoy sidecars and real
//! traffic in network-namespace pods. Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_e2e::{Harness, LoadReport, PortSpec, wait_until};

const BACKEND: &str = "http://backend:8080";

/// An HTTPRoute `name` in `default` attached to Service `backend` port 8080, with `rules`
/// (YAML list items, indented by two spaces).
fn route(name: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: backend, port: 8080}}\n  rules:\n{rules}"
    )
}

/// client → backend (backend-v1-0, backend-v2-0), backend-v1 and backend-v2; the client
/// may call the backends; `manifests` are in place before the control plane starts.
fn gamma_mesh(id: u8, name: &str, manifests: &[(&str, String)]) -> Harness {
    Harness::start_split_mesh(id, name, manifests).expect("harness")
}

/// One request from the client: (status, response headers, body).
fn call(h: &Harness, method: &str, url: &str, headers: &[&str]) -> (u16, Value, String) {
    let mut args = vec!["http", url, "--method", method];
    for header in headers {
        args.extend(["--header", header]);
    }
    let v = h
        .app("client", &args)
        .unwrap()
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    (
        u16::try_from(v["status"].as_u64().unwrap()).unwrap(),
        v["headers"].clone(),
        v["body"].as_str().unwrap_or_default().to_string(),
    )
}

/// Which pod answered a request (the app's body is its pod name).
fn answered_by(h: &Harness, method: &str, url: &str, headers: &[&str]) -> String {
    let (status, _, body) = call(h, method, url, headers);
    assert_eq!(status, 200, "{method} {url} {headers:?}: {body}");
    body.trim().to_string()
}

fn problems(h: &Harness) -> Vec<(String, bool, String)> {
    let status = h.status().unwrap();
    status["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["object"].as_str().unwrap_or_default().to_string(),
                p["state"] == "Rejected",
                p["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn an_httproute_on_a_service_sends_every_caller_to_its_backend() {
    let h = gamma_mesh(
        80,
        "gamma-basic",
        &[(
            "route.yaml",
            route(
                "to-v2",
                "  - backendRefs: [{name: backend-v2, port: 8080}]\n",
            ),
        )],
    );
    for _ in 0..20 {
        assert_eq!(
            answered_by(&h, "GET", &format!("{BACKEND}/"), &[]),
            "backend-v2-0"
        );
    }
    assert!(problems(&h).is_empty(), "{:?}", problems(&h));
}

#[test]
fn an_httproute_splits_80_20_within_five_points() {
    let h = gamma_mesh(
        81,
        "gamma-weights",
        &[(
            "route.yaml",
            route(
                "weighted",
                "  - backendRefs:\n    - {name: backend-v1, port: 8080, weight: 80}\n    - {name: backend-v2, port: 8080, weight: 20}\n",
            ),
        )],
    );
    let report = h.load("client", &format!("{BACKEND}/"), 1000, 8).unwrap();
    assert!(
        report.failures().is_empty(),
        "failed requests: {:?}",
        report.failures()
    );
    let v1 = report.answered_by("backend-v1") as f64 / 10.0;
    let v2 = report.answered_by("backend-v2") as f64 / 10.0;
    eprintln!("HTTPRoute 80/20: v1 {v1:.1}%, v2 {v2:.1}%");
    assert!((75.0..=85.0).contains(&v1), "v1 got {v1}%, expected 80 ± 5");
    assert!((15.0..=25.0).contains(&v2), "v2 got {v2}%, expected 20 ± 5");
}

#[test]
fn path_header_query_and_method_matches_follow_the_spec_precedence() {
    // Written in reverse precedence order on purpose.
    let rules = "  - backendRefs: [{name: backend-v1, port: 8080}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: backend-v2, port: 8080}]\n\
                 \x20 - matches: [{path: {type: Exact, value: /api/v1-only}}]\n    backendRefs: [{name: backend-v1, port: 8080}]\n\
                 \x20 - matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]\n    backendRefs: [{name: backend-v2, port: 8080}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-pin, value: v1}]}]\n    backendRefs: [{name: backend-v1, port: 8080}]\n\
                 \x20 - matches: [{queryParams: [{name: version, value: \"2\"}]}, {method: POST}, {headers: [{type: RegularExpression, name: x-canary, value: \"yes|true\"}]}]\n    backendRefs: [{name: backend-v2, port: 8080}]\n";
    let h = gamma_mesh(
        82,
        "gamma-matches",
        &[("route.yaml", route("matches", rules))],
    );
    let cases: &[(&str, &str, &[&str], &str)] = &[
        ("GET", "/", &[], "backend-v1-0"),
        ("GET", "/other", &[], "backend-v1-0"),
        // Prefixes match whole segments only.
        ("GET", "/apixyz", &[], "backend-v1-0"),
        ("GET", "/api", &[], "backend-v2-0"),
        ("GET", "/api/orders", &[], "backend-v2-0"),
        // Exact beats the prefix.
        ("GET", "/api/v1-only", &[], "backend-v1-0"),
        ("GET", "/items/42", &[], "backend-v2-0"),
        ("GET", "/items/abc", &[], "backend-v1-0"),
        // The same prefix with a header condition wins over the bare prefix.
        ("GET", "/api/orders", &["x-pin: v1"], "backend-v1-0"),
        ("GET", "/?version=2", &[], "backend-v2-0"),
        ("GET", "/?version=3", &[], "backend-v1-0"),
        ("POST", "/", &[], "backend-v2-0"),
        ("GET", "/", &["x-canary: true"], "backend-v2-0"),
        ("GET", "/", &["x-canary: no"], "backend-v1-0"),
    ];
    for (method, path, headers, want) in cases {
        assert_eq!(
            answered_by(&h, method, &format!("{BACKEND}{path}"), headers),
            *want,
            "{method} {path} {headers:?}"
        );
    }
}

#[test]
fn header_modifiers_reach_the_backend_and_the_caller() {
    let rules = "  - filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Set, value: one}]\n        add: [{name: X-Add, value: two}]\n        remove: [X-Remove]\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set: [{name: X-Response, value: three}]\n    backendRefs: [{name: backend-v1, port: 8080}]\n";
    let h = gamma_mesh(
        83,
        "gamma-headers",
        &[("route.yaml", route("headers", rules))],
    );
    let (status, headers, body) = call(
        &h,
        "GET",
        &format!("{BACKEND}/echo?a=1"),
        &["x-set: zero", "x-add: first", "x-remove: gone"],
    );
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["pod"], "backend-v1-0", "{seen}");
    assert_eq!(seen["path"], "/echo", "{seen}");
    assert_eq!(seen["query"], "a=1", "{seen}");
    assert_eq!(seen["headers"]["x-set"], "one", "{seen}");
    assert_eq!(seen["headers"]["x-add"], "first, two", "{seen}");
    assert!(seen["headers"].get("x-remove").is_none(), "{seen}");
    assert_eq!(headers["x-response"], "three", "{headers}");
}

#[test]
fn redirects_and_rewrites_apply() {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /old}}]\n    filters:\n    - type: RequestRedirect\n      requestRedirect: {hostname: example.com, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /v1/echo}}]\n    filters:\n    - type: URLRewrite\n      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /echo}}\n    backendRefs: [{name: backend-v2, port: 8080}]\n";
    let h = gamma_mesh(
        86,
        "gamma-redirect",
        &[("route.yaml", route("redirects", rules))],
    );
    let (status, headers, _) = call(&h, "GET", &format!("{BACKEND}/old/page"), &[]);
    assert_eq!(status, 301, "{headers}");
    let location = headers["location"].as_str().unwrap_or_default();
    assert!(
        location.starts_with("http://example.com") && location.ends_with("/new/page"),
        "location {location}"
    );
    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/v1/echo/x"), &[]);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["path"], "/echo/x", "{seen}");
    assert_eq!(seen["headers"]["host"], "rewritten.example", "{seen}");
    assert_eq!(seen["pod"], "backend-v2-0", "{seen}");
}

#[test]
fn an_invalid_backend_is_reported_and_answers_500_while_other_rules_work() {
    let rules = "  - matches: [{path: {type: PathPrefix, value: /broken}}]\n    backendRefs: [{name: no-such-service, port: 8080}]\n\
                 \x20 - backendRefs: [{name: backend-v2, port: 8080}]\n";
    let bad_kind = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: unsupported, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: backend-v1, port: 8080}]\n  rules:\n  - filters: [{type: ExtensionRef, extensionRef: {group: x.example, kind: Thing, name: t}}]\n    backendRefs: [{name: backend-v2, port: 8080}]\n";
    let h = gamma_mesh(
        84,
        "gamma-invalid",
        &[
            ("route.yaml", route("partly-broken", rules)),
            ("unsupported.yaml", bad_kind.to_string()),
        ],
    );
    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/broken"), &[]);
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        answered_by(&h, "GET", &format!("{BACKEND}/fine"), &[]),
        "backend-v2-0"
    );
    // The rejected route does nothing: backend-v1 keeps its own pods.
    assert_eq!(
        answered_by(&h, "GET", "http://backend-v1:8080/", &[]),
        "backend-v1-0"
    );
    let problems = problems(&h);
    assert!(
        problems
            .iter()
            .any(|(o, rejected, r)| o == "HTTPRoute default/partly-broken"
                && !rejected
                && r.starts_with("BackendNotFound:")
                && r.contains("no-such-service")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|(o, rejected, r)| o == "HTTPRoute default/unsupported"
                && *rejected
                && r.starts_with("UnsupportedValue:")),
        "{problems:?}"
    );
    // `weft status` has each route's status per parent, as Kubernetes mode writes it.
    let status = h.status().unwrap();
    let of = |route: &str| {
        status["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == route)
            .cloned()
            .unwrap_or_else(|| panic!("no status for {route}: {status}"))
    };
    let broken = of("HTTPRoute default/partly-broken");
    assert_eq!(broken["parent"], "default/backend:8080", "{broken}");
    assert_eq!(broken["accepted"], json!([true, "Accepted"]), "{broken}");
    assert_eq!(
        broken["resolved_refs"],
        json!([false, "BackendNotFound"]),
        "{broken}"
    );
    let unsupported = of("HTTPRoute default/unsupported");
    assert_eq!(
        unsupported["accepted"],
        json!([false, "UnsupportedValue"]),
        "{unsupported}"
    );
}

#[test]
fn an_httproute_wins_over_a_traffic_split_on_the_same_port() {
    let split = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: rollout, namespace: default}\nspec:\n  service: backend\n  backends:\n  - {service: backend-v1, weight: 100}\n";
    let h = gamma_mesh(
        85,
        "gamma-vs-split",
        &[
            ("split.yaml", split.to_string()),
            (
                "route.yaml",
                route(
                    "wins",
                    "  - backendRefs: [{name: backend-v2, port: 8080}]\n",
                ),
            ),
        ],
    );
    for _ in 0..10 {
        assert_eq!(
            answered_by(&h, "GET", &format!("{BACKEND}/"), &[]),
            "backend-v2-0"
        );
    }
    let problems = problems(&h);
    assert!(
        problems
            .iter()
            .any(|(o, _, r)| o == "TrafficSplit default/rollout"
                && r.starts_with("Conflicted:")
                && r.contains("HTTPRoute default/wins")),
        "{problems:?}"
    );
}

/// An HTTPRoute on Service `backend` (and on a Gateway, another controller's business)
/// sending everything to `backend`; with another controller's status entry.
fn route_object(backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "to-backend", "namespace": "default", "generation": 1},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "backend", "port": 8080},
                {"name": "edge"},
            ],
            "rules": [{"backendRefs": [{"name": backend, "port": 8080}]}],
        },
        "status": {"parents": [{
            "controllerName": "example.com/gateway",
            "parentRef": {"name": "edge"},
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        }]},
    })
}

#[test]
fn route_status_per_parent_is_written_in_kubernetes_mode_and_only_when_it_changes() {
    let mut h = Harness::new(87, "gamma-status").expect("harness");
    h.add_split_topology().unwrap();
    let c = h.start_cluster().unwrap();
    const V1: &str = "gateway.networking.k8s.io/v1";
    c.api.apply_object(route_object("backend-v9")).unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    let route = || {
        c.api
            .get(V1, "HTTPRoute", Some("default"), "to-backend")
            .unwrap()
    };
    let ours = |route: &Value| -> Option<Value> {
        route["status"]["parents"]
            .as_array()?
            .iter()
            .find(|p| p["controllerName"] == "weft.dev/mesh")
            .cloned()
    };
    let condition = |entry: &Value, type_: &str| -> Value {
        entry["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            .cloned()
            .unwrap_or(Value::Null)
    };
    wait_until(Duration::from_secs(10), "Weft's status entry", || {
        ours(&route()).is_some()
    })
    .unwrap();
    let stored = route();
    let parents = stored["status"]["parents"].as_array().unwrap();
    assert_eq!(
        parents.len(),
        2,
        "the other controller's entry stays: {stored}"
    );
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "example.com/gateway"),
        "{stored}"
    );
    let entry = ours(&stored).unwrap();
    assert_eq!(
        entry["parentRef"],
        json!({"group": "", "kind": "Service", "name": "backend", "port": 8080})
    );
    let accepted = condition(&entry, "Accepted");
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("True"), &json!("Accepted")),
        "{entry}"
    );
    let resolved = condition(&entry, "ResolvedRefs");
    assert_eq!(
        (&resolved["status"], &resolved["reason"]),
        (&json!("False"), &json!("BackendNotFound")),
        "{entry}"
    );
    assert!(
        resolved["message"].as_str().unwrap().contains("backend-v9"),
        "{resolved}"
    );
    assert!(
        resolved["observedGeneration"].is_number() && resolved["lastTransitionTime"].is_string()
    );
    let accepted_since = accepted["lastTransitionTime"].clone();

    // Fixed: ResolvedRefs turns True; Accepted did not change, nor does its time.
    let mut fixed = route();
    fixed["spec"]["rules"][0]["backendRefs"][0]["name"] = json!("backend-v2");
    c.api.apply_object(fixed).unwrap();
    wait_until(Duration::from_secs(10), "ResolvedRefs=True", || {
        ours(&route()).is_some_and(|e| condition(&e, "ResolvedRefs")["status"] == "True")
    })
    .unwrap();
    let entry = ours(&route()).unwrap();
    assert_eq!(
        condition(&entry, "ResolvedRefs")["reason"],
        "ResolvedRefs",
        "{entry}"
    );
    assert_eq!(
        condition(&entry, "Accepted")["lastTransitionTime"],
        accepted_since
    );
    assert_eq!(route()["status"]["parents"].as_array().unwrap().len(), 2);

    // Changes that change no status write nothing.
    std::thread::sleep(Duration::from_secs(1));
    let patches = c.api.requests("patch", "httproutes", "status");
    assert!(patches >= 2, "{patches} status patches");
    for i in 0..200 {
        let mut same = route();
        same["metadata"]["labels"] = json!({"touch": i.to_string()});
        c.api.apply_object(same).unwrap();
    }
    h.wait_controller_settled(1);
    assert_eq!(
        c.api.requests("patch", "httproutes", "status"),
        patches,
        "no-op reconciles wrote a route status"
    );
}

#[test]
fn a_grpc_route_splits_calls_by_weight_between_two_grpc_backends() {
    const GRPC: u16 = 50051;
    let mut h = Harness::new(88, "gamma-grpc").expect("harness");
    h.add_pod_listening("client", &[("app", "client")], "client", 0, &[])
        .unwrap();
    for version in ["v1", "v2"] {
        h.add_pod_listening(
            &format!("echo-{version}-0"),
            &[("app", "echo"), ("version", version)],
            "echo",
            0,
            &[("grpc", GRPC)],
        )
        .unwrap();
    }
    let port = [PortSpec::named("grpc", GRPC).app_protocol("grpc")];
    h.add_service_with("echo", &[("app", "echo")], &port)
        .unwrap();
    for version in ["v1", "v2"] {
        h.add_service_with(
            &format!("echo-{version}"),
            &[("app", "echo"), ("version", version)],
            &port,
        )
        .unwrap();
    }
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "echo", &["client"]).unwrap();
    h.write_manifest(
        "grpcroute.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: echo-split, namespace: default}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: echo, port: {GRPC}}}]\n  rules:\n  - matches: [{{method: {{service: weft.test.Echo, method: Unary}}}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier: {{set: [{{name: x-route, value: grpc}}]}}\n    backendRefs:\n    - {{name: echo-v1, port: {GRPC}, weight: 80}}\n    - {{name: echo-v2, port: {GRPC}, weight: 20}}\n  - backendRefs: [{{name: echo-v2, port: {GRPC}}}]\n"
        ),
    )
    .unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "echo-v1-0", "echo-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    let addr = format!("echo:{GRPC}");
    let v = h
        .app(
            "client",
            &["grpc-load", &addr, "--count", "1000", "--concurrency", "8"],
        )
        .unwrap()
        .unwrap_or_else(|e| panic!("grpc-load: {e}"));
    let report: LoadReport = serde_json::from_value(v).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let v1 = report.answered_by("echo-v1") as f64 / 10.0;
    let v2 = report.answered_by("echo-v2") as f64 / 10.0;
    eprintln!("GRPCRoute 80/20 on Unary: v1 {v1:.1}%, v2 {v2:.1}%");
    assert!((75.0..=85.0).contains(&v1), "v1 got {v1}%, expected 80 ± 5");
    // The Unary rule's header filter reached the server; the other rule has none.
    let v = h
        .app("client", &["grpc", &addr, "--call", "unary"])
        .unwrap()
        .unwrap();
    assert_eq!(v["route_header"], "grpc", "{v}");
    // Other methods take the second rule: echo-v2 only.
    for _ in 0..5 {
        let v = h
            .app("client", &["grpc", &addr, "--call", "server-stream"])
            .unwrap()
            .unwrap();
        assert_eq!(v["name"], "echo-v2-0", "{v}");
    }
    assert!(problems(&h).is_empty(), "{:?}", problems(&h));
}

/// One request from `pod`: (status, response headers, body).
fn call_from(h: &Harness, pod: &str, url: &str) -> (u16, Value, String) {
    let v = h
        .app(pod, &["http", url])
        .unwrap()
        .unwrap_or_else(|e| panic!("{pod}: GET {url}: {e}"));
    (
        u16::try_from(v["status"].as_u64().unwrap()).unwrap(),
        v["headers"].clone(),
        v["body"].as_str().unwrap_or_default().trim().to_string(),
    )
}

/// GEP-1426 consumer routes: an HTTPRoute in `shop` on `default/backend` routes the calls
/// of `shop`'s pods (a delta and a state-of-the-world sidecar) and nobody else's: the
/// producer route in `default` still decides for `default` and `other` callers. The
/// consumer route replaces the producer's for its namespace (a path it does not match is
/// 404 there), and removing it gives `shop` the producer route back, live.
#[test]
fn a_consumer_route_steers_only_its_namespace_and_wins_over_the_producer_route() {
    let mut h = Harness::new(90, "gamma-consumer").expect("harness");
    h.add_split_topology().unwrap();
    for (pod, app, ns) in [
        ("shopper", "shopper", "shop"),
        ("shopper-sotw", "shopper", "shop"),
        ("local-0", "local", "shop"),
        ("visitor", "visitor", "other"),
    ] {
        h.add_pod(pod, &[("app", app)], app).unwrap();
        h.set_namespace(pod, ns).unwrap();
    }
    h.add_service("local", &[("app", "local")]).unwrap();
    h.set_namespace("local", "shop").unwrap();
    h.write_cluster_manifest().unwrap();
    let target = |name: &str, ns: &str, dest: &str, sources: &[(&str, &str)]| {
        let sources: String = sources
            .iter()
            .map(|(ns, sa)| format!("  - {{kind: ServiceAccount, name: {sa}, namespace: {ns}}}\n"))
            .collect();
        format!(
            "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  destination: {{kind: ServiceAccount, name: {dest}, namespace: {ns}}}\n  sources:\n{sources}"
        )
    };
    let access = [
        target(
            "to-backend",
            "default",
            "backend",
            &[
                ("default", "client"),
                ("shop", "shopper"),
                ("other", "visitor"),
            ],
        ),
        target("to-local", "shop", "local", &[("shop", "shopper")]),
    ]
    .join("---\n");
    h.write_manifest("access.yaml", &access).unwrap();
    h.write_manifest(
        "producer.yaml",
        &route(
            "producer",
            "  - backendRefs: [{name: backend-v1, port: 8080}]\n",
        ),
    )
    .unwrap();
    let consumer = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: mine, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: backend, namespace: default, port: 8080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: x-route, value: consumer}]}\n    backendRefs: [{name: local, port: 8080}]\n";
    h.write_manifest("consumer.yaml", consumer).unwrap();
    h.start_control_plane().unwrap();
    for pod in [
        "client",
        "backend-v1-0",
        "backend-v2-0",
        "local-0",
        "shopper",
        "visitor",
    ] {
        h.start_sidecar(pod).unwrap();
    }
    h.use_xds_protocol("sotw");
    h.start_sidecar("shopper-sotw").unwrap();
    assert!(problems(&h).is_empty(), "{:?}", problems(&h));

    for shopper in ["shopper", "shopper-sotw"] {
        for _ in 0..5 {
            let (status, headers, body) = call_from(&h, shopper, &format!("{BACKEND}/api/x"));
            assert_eq!((status, body.as_str()), (200, "local-0"), "{shopper}");
            assert_eq!(headers["x-route"], "consumer", "{shopper}: {headers}");
        }
        let (status, _, body) = call_from(&h, shopper, &format!("{BACKEND}/other"));
        assert_eq!(
            status, 404,
            "{shopper}: the producer route does not apply: {body}"
        );
    }
    for caller in ["client", "visitor"] {
        for path in ["/api/x", "/other"] {
            let (status, headers, body) = call_from(&h, caller, &format!("{BACKEND}{path}"));
            assert_eq!(
                (status, body.as_str()),
                (200, "backend-v1-0"),
                "{caller} {path}"
            );
            assert!(headers.get("x-route").is_none(), "{caller}: {headers}");
        }
    }

    // The consumer route goes: shop's callers follow the producer route again.
    h.remove_manifest("consumer.yaml").unwrap();
    for shopper in ["shopper", "shopper-sotw"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, _, body) = call_from(&h, shopper, &format!("{BACKEND}/api/x"));
            if (status, body.as_str()) == (200, "backend-v1-0") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{shopper} still answered by {status} {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let (status, _, body) = call_from(&h, "client", &format!("{BACKEND}/api/x"));
    assert_eq!((status, body.as_str()), (200, "backend-v1-0"));
}

/// The address decides which Service's routes apply, not the Host header; timeouts
/// answer 504 in time, `retry` turns a flaky backend's 503s into a success (and without
/// it the 503 reaches the caller), a backend's own header filter applies to requests sent
/// to it only, and `weft explain` names the rule that matched.
#[test]
fn timeouts_retries_backend_filters_and_the_address_not_the_host_decide() {
    let rules = "  - name: slow\n    matches: [{path: {type: PathPrefix, value: /slow}}]\n    timeouts: {request: 500ms}\n    backendRefs: [{name: backend-v2, port: 8080}]\n\
                 \x20 - name: flaky\n    matches: [{path: {type: PathPrefix, value: /flaky}}]\n    retry: {codes: [503], attempts: 3, backoff: 10ms}\n    backendRefs: [{name: backend-v2, port: 8080}]\n\
                 \x20 - name: tagged\n    matches: [{path: {type: PathPrefix, value: /echo}}]\n    backendRefs:\n    - name: backend-v2\n      port: 8080\n      filters:\n      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-Backend, value: v2}]}}\n      - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Served-By, value: v2}]}}\n\
                 \x20 - backendRefs: [{name: backend-v2, port: 8080}]\n";
    let h = gamma_mesh(
        89,
        "gamma-resilience",
        &[("route.yaml", route("resilience", rules))],
    );

    // Sent to backend's address with backend-v1's name in Host: backend's route applies.
    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/echo"), &["Host: backend-v1"]);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&seen["headers"]["host"], &seen["pod"]),
        (&json!("backend-v1"), &json!("backend-v2-0")),
        "{seen}"
    );
    // And the other way round: backend-v1's address, backend's name: no route, v1 answers.
    assert_eq!(
        answered_by(&h, "GET", "http://backend-v1:8080/", &["Host: backend"]),
        "backend-v1-0"
    );

    let started = Instant::now();
    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/slow/x?delay_ms=3000"), &[]);
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_millis(2500), "the 504 took {took:?}");
    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/slow/x?delay_ms=50"), &[]);
    assert_eq!(status, 200, "{body}");

    // The backend fails the first two tries of each key: 3 retries on 503 succeed.
    for key in ["a", "b", "c"] {
        let url = format!("{BACKEND}/flaky/x?fail_first=2&key=flaky-{key}");
        let (status, _, body) = call(&h, "GET", &url, &[]);
        assert_eq!(status, 200, "{url}: {body}");
    }
    // Without a retry on the rule, the mesh retries failed connections only.
    let (status, _, body) = call(
        &h,
        "GET",
        &format!("{BACKEND}/other?fail_first=1&key=plain"),
        &[],
    );
    assert_eq!(status, 503, "{body}");

    let (status, headers, body) = call(&h, "GET", &format!("{BACKEND}/echo"), &[]);
    assert_eq!(status, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["x-backend"], "v2", "{seen}");
    assert_eq!(headers["x-served-by"], "v2", "{headers}");
    let (_, headers, _) = call(&h, "GET", &format!("{BACKEND}/"), &[]);
    assert!(headers.get("x-served-by").is_none(), "{headers}");

    let explained = h
        .explain("client", "GET", &format!("{BACKEND}/flaky/x"), &[])
        .unwrap();
    let lines = explained["lines"].to_string();
    assert!(
        lines.contains("HTTPRoute default/resilience rule 1 (flaky) matched"),
        "{explained}"
    );
    assert!(lines.contains("retries: 3"), "{explained}");
    assert!(problems(&h).is_empty(), "{:?}", problems(&h));
}

/// A backend in another namespace needs a ReferenceGrant there: without it the rule's
/// share answers 500 and the route says RefNotPermitted while its other rules work;
/// granting it routes there, live. A mirror copies requests to another service whose
/// answers the caller never sees.
#[test]
fn a_cross_namespace_backend_needs_a_reference_grant_and_a_mirror_copies_requests() {
    let mut h = Harness::new(95, "gamma-grant").expect("harness");
    h.add_split_topology().unwrap();
    h.add_pod("db-0", &[("app", "db")], "db").unwrap();
    h.set_namespace("db-0", "data").unwrap();
    h.add_service("db", &[("app", "db")]).unwrap();
    h.set_namespace("db", "data").unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.write_manifest(
        "db-access.yaml",
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {name: to-db, namespace: data}\nspec:\n  destination: {kind: ServiceAccount, name: db, namespace: data}\n  sources: [{kind: ServiceAccount, name: client, namespace: default}]\n",
    )
    .unwrap();
    let rules = "  - matches: [{path: {type: PathPrefix, value: /db}}]\n    backendRefs: [{name: db, namespace: data, port: 8080}]\n\
                 \x20 - matches: [{path: {type: PathPrefix, value: /mirrored}}]\n    filters:\n    - {type: RequestMirror, requestMirror: {backendRef: {name: backend-v1, port: 8080}}}\n    backendRefs: [{name: backend-v2, port: 8080}]\n\
                 \x20 - backendRefs: [{name: backend-v2, port: 8080}]\n";
    h.write_manifest("route.yaml", &route("cross", rules))
        .unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0", "db-0"] {
        h.start_sidecar(pod).unwrap();
    }

    let (status, _, body) = call(&h, "GET", &format!("{BACKEND}/db"), &[]);
    assert_eq!(status, 500, "{body}");
    assert_eq!(
        answered_by(&h, "GET", &format!("{BACKEND}/"), &[]),
        "backend-v2-0"
    );
    let refused = problems(&h);
    assert!(
        refused
            .iter()
            .any(|(o, rejected, r)| o == "HTTPRoute default/cross"
                && !rejected
                && r.starts_with("RefNotPermitted:")),
        "{refused:?}"
    );

    h.write_manifest(
        "grant.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {name: routes-from-default, namespace: data}\nspec:\n  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: default}]\n  to: [{group: '', kind: Service, name: db}]\n",
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "the grant to take effect", || {
        call(&h, "GET", &format!("{BACKEND}/db"), &[]).2.trim() == "db-0"
    })
    .unwrap();
    assert!(problems(&h).is_empty(), "{:?}", problems(&h));

    // Mirror: backend-v1-0's sidecar sees each mirrored request; the caller gets v2's.
    let seen = || {
        h.envoy_stat("backend-v1-0", "http.inbound_8080.downstream_rq_completed")
            .unwrap()
    };
    let before = seen();
    for _ in 0..5 {
        assert_eq!(
            answered_by(&h, "GET", &format!("{BACKEND}/mirrored"), &[]),
            "backend-v2-0"
        );
    }
    wait_until(
        Duration::from_secs(5),
        "5 mirrored requests at backend-v1-0",
        || seen() >= before + 5,
    )
    .unwrap();
    assert_eq!(seen(), before + 5, "exactly the mirrored requests");
}
