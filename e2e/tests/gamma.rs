//! Gateway API for the mesh (GAMMA) end to end: HTTPRoutes attached to a Service steer
//! every meshed caller's requests, with real `weft up`, real Envoy sidecars and real
//! traffic in network-namespace pods. Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use serde_json::Value;
use weft_e2e::Harness;

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
    let mut h = Harness::new(id, name).expect("harness");
    h.add_split_topology().unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    for (file, text) in manifests {
        h.write_manifest(file, text).unwrap();
    }
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    h
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
