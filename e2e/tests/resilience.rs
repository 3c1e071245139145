//! TrafficPolicy end to end: fault injection, circuit breaking and outlier detection,
//! enforced by real Envoy sidecars against backends that fail on command (the test
//! app's `/fault`). Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use weft_e2e::Harness;

/// A TrafficPolicy `name` in `default` on Service `service`, with `spec` (YAML lines
/// indented by two spaces).
fn policy(name: &str, service: &str, spec: &str) -> String {
    format!(
        "apiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: {service}}}]\n{spec}"
    )
}

#[test]
fn fault_injection_circuit_breaking_and_outlier_detection_hold_against_real_failures() {
    let h = resilience_mesh(
        91,
        "resilience",
        &[
            (
                "abort.yaml",
                policy(
                    "abort",
                    "backend-v1",
                    "  faultInjection: {abort: {percent: 30, httpStatus: 503}}\n",
                ),
            ),
            (
                "breaker.yaml",
                policy(
                    "breaker",
                    "backend-v2",
                    "  connectionPool: {maxConnections: 1, maxPendingRequests: 1, maxRequests: 1}\n",
                ),
            ),
            (
                "eject.yaml",
                policy(
                    "eject",
                    "backend",
                    "  outlierDetection: {consecutive5xx: 3, interval: 1s, baseEjectionTime: 5s, maxEjectionPercent: 50}\n",
                ),
            ),
        ],
    );

    // Fault injection: 30% of 1,000 requests aborted by the caller's sidecar.
    let report = h
        .load("client", "http://backend-v1:8080/", 1000, 8)
        .unwrap();
    let aborted = report.failures().len();
    eprintln!("abort 30%: {aborted} of 1000 failed");
    assert!((250..=350).contains(&aborted), "{aborted} of 1000 aborted");
    assert!(
        report
            .failures()
            .iter()
            .all(|r| r.error.as_deref().is_some_and(|e| e.contains("503"))),
        "{:?}",
        &report.failures()[..3.min(aborted)]
    );

    // Circuit breaking: 10 concurrent slow requests against 1 in flight + 1 pending.
    // (Sidecars keep no per-cluster stats, to stay small: Envoy's reset reason says it.)
    let report = h
        .load("client", "http://backend-v2:8080/delay/300", 40, 10)
        .unwrap();
    let rejected = report.failures();
    eprintln!("circuit breaker: {} of 40 rejected", rejected.len());
    assert!(
        !rejected.is_empty() && rejected.len() < 40,
        "{} of 40 rejected",
        rejected.len()
    );
    assert!(
        rejected.iter().all(|r| r
            .error
            .as_deref()
            .is_some_and(|e| e.contains("503") && e.contains("overflow"))),
        "{:?}",
        rejected.first()
    );
    // One at a time, nothing overflows.
    let report = h
        .load("client", "http://backend-v2:8080/delay/10", 20, 1)
        .unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());

    // Outlier detection: backend-v1-0 starts failing every request; after 3 in a row it
    // is ejected and backend-v2-0 answers everything.
    let set = h
        .app(
            "backend-v1-0",
            &["http", "http://127.0.0.1:8080/fault?fail=500"],
        )
        .unwrap()
        .unwrap();
    assert_eq!(set["status"], 200, "{set}");
    let report = h.load("client", "http://backend:8080/", 200, 1).unwrap();
    let failed = report.failures().len();
    let tail = &report.results[20..];
    eprintln!("outlier detection: {failed} of 200 failed");
    assert!((1..=5).contains(&failed), "{failed} of 200 failed");
    assert!(
        tail.iter()
            .all(|r| r.pod.as_deref() == Some("backend-v2-0")),
        "after the ejection every request goes to backend-v2-0"
    );
    // `weft explain` reads the caller's sidecar: the ejected endpoint is named.
    let explained = h
        .explain("client", "GET", "http://backend:8080/", &[])
        .unwrap();
    let lines = explained["lines"].to_string();
    let v1_ip = h.pod_ips("backend-v1-0")[0];
    assert!(
        lines.contains(&format!(
            "endpoint {v1_ip}:8080 is ejected by outlier detection"
        )),
        "{explained}"
    );
    assert!(
        lines.contains("outlierDetection consecutive5xx Some(3)"),
        "{explained}"
    );

    // The sidecar's metrics port serves Prometheus text to a scraper outside the mesh,
    // and nothing else of the admin API.
    let (status, body) = h
        .sidecar_metrics_port("client", "/stats/prometheus")
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE envoy_"),
        "{}",
        &body[..body.len().min(300)]
    );
    let (status, _) = h.sidecar_metrics_port("client", "/config_dump").unwrap();
    assert_eq!(status, 404, "the admin API stays on loopback");

    // Healthy again, the ejected endpoint returns once its 5 s ejection ends.
    h.app("backend-v1-0", &["http", "http://127.0.0.1:8080/fault"])
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let report = h.load("client", "http://backend:8080/", 10, 1).unwrap();
        if report.answered_by("backend-v1-0") > 0 {
            assert!(report.failures().is_empty(), "{:?}", report.failures());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend-v1-0 never came back after its ejection"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// client → backend (backend-v1-0, backend-v2-0), backend-v1 and backend-v2, the
/// client allowed to call them, with `manifests` in place before the control plane.
fn resilience_mesh(id: u8, name: &str, manifests: &[(&str, String)]) -> Harness {
    let h = Harness::start_split_mesh(id, name, manifests).expect("harness");
    let status = h.status().unwrap();
    assert!(
        status["problems"].as_array().is_none_or(Vec::is_empty),
        "{status}"
    );
    h
}

/// One request from the client: (status, response headers, body, time taken).
fn call(h: &Harness, url: &str) -> (u64, serde_json::Value, String, Duration) {
    let started = Instant::now();
    let v = h.app("client", &["http", url]).unwrap().unwrap();
    (
        v["status"].as_u64().unwrap(),
        v["headers"].clone(),
        v["body"].as_str().unwrap_or_default().to_string(),
        started.elapsed(),
    )
}

#[test]
fn a_local_rate_limit_answers_429_for_the_excess_and_a_delay_fault_adds_its_latency() {
    let h = resilience_mesh(
        92,
        "rate-limit",
        &[
            (
                "limit.yaml",
                policy(
                    "limit",
                    "backend-v1",
                    "  rateLimit: {local: {tokens: 10, interval: 1s, burst: 10}}\n",
                ),
            ),
            (
                "delay.yaml",
                policy(
                    "delay",
                    "backend-v2",
                    "  faultInjection: {delay: {percent: 100, fixedDelay: 400ms}}\n",
                ),
            ),
        ],
    );
    let (status, headers, body, _) = call(&h, "http://backend-v1:8080/");
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("x-ratelimit-limit").is_some(), "{headers}");

    // 20 requests a second for 3 s against 10 a second (bucket of 10): about a third
    // to a half are refused.
    std::thread::sleep(Duration::from_millis(1100));
    let report = h
        .load_paced("client", "http://backend-v1:8080/", 60, 50)
        .unwrap();
    let refused = report.failures();
    eprintln!("rate limit: {} of 60 refused", refused.len());
    assert!(
        (15..=35).contains(&refused.len()),
        "{} of 60 refused",
        refused.len()
    );
    assert!(
        refused
            .iter()
            .all(|r| r.error.as_deref().is_some_and(|e| e.contains("429"))),
        "{:?}",
        refused.first()
    );

    let (status, _, body, took) = call(&h, "http://backend-v2:8080/");
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_millis(400), "took {took:?}");
    let (status, _, body, took) = call(&h, "http://backend-v1:8080/");
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_millis(400), "took {took:?}");
}

#[test]
fn defaults_retry_and_time_out_without_a_route_and_yield_to_an_httproute_rule() {
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: backend, namespace: default}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: backend-v1, port: 8080}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /noretry}}]\n    retry: {attempts: 0}\n    backendRefs: [{name: backend-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /patient}}]\n    timeouts: {request: 5s}\n    backendRefs: [{name: backend-v1, port: 8080}]\n  - backendRefs: [{name: backend-v1, port: 8080}]\n";
    let defaults = "  retries: {attempts: 3, codes: [503]}\n  timeouts: {request: 500ms}\n";
    let h = resilience_mesh(
        93,
        "defaults",
        &[
            ("defaults.yaml", policy("defaults", "backend-v2", defaults)),
            (
                "defaults-v1.yaml",
                policy("defaults-v1", "backend-v1", defaults),
            ),
            ("route.yaml", route.to_string()),
        ],
    );
    // No HTTPRoute on backend-v2: the policy's retry and timeout apply.
    let (status, _, body, _) = call(&h, "http://backend-v2:8080/x?fail_first=2&key=v2");
    assert_eq!(status, 200, "{body}");
    let (status, _, body, took) = call(&h, "http://backend-v2:8080/delay/3000");
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // backend-v1's route: rules without their own take the defaults, the others win.
    let (status, _, body, _) = call(&h, "http://backend-v1:8080/x?fail_first=2&key=v1");
    assert_eq!(status, 200, "{body}");
    let (status, _, body, _) = call(&h, "http://backend-v1:8080/noretry?fail_first=1&key=n");
    assert_eq!(status, 503, "{body}");
    let (status, _, body, _) = call(&h, "http://backend-v1:8080/delay/3000");
    assert_eq!(status, 504, "{body}");
    let (status, _, body, _) = call(&h, "http://backend-v1:8080/patient?delay_ms=1000");
    assert_eq!(status, 200, "{body}");
}

/// Replaces the TrafficPolicy `backend` on Service backend with `spec`; returns once the
/// client's sidecar has the new clusters.
fn replace_policy(h: &Harness, spec: &str) {
    let clusters = h.acked_version("client", "CDS").unwrap();
    h.write_manifest("backend.yaml", &policy("backend", "backend", spec))
        .unwrap();
    h.wait_for_new_ack("client", "CDS", clusters.as_deref())
        .unwrap();
}

#[test]
fn health_checks_ring_hash_and_least_request_pick_endpoints_as_configured() {
    let checked = "  healthCheck: {http: {path: /healthz}, interval: 300ms, timeout: 200ms, unhealthyThreshold: 1, healthyThreshold: 1}\n";
    let h = resilience_mesh(
        94,
        "balancing",
        &[("backend.yaml", policy("backend", "backend", checked))],
    );
    let answered = |n: usize, url: &str, headers: &[&str]| -> Vec<String> {
        (0..n)
            .map(|_| {
                let mut args = vec!["http", url];
                for header in headers {
                    args.extend(["--header", header]);
                }
                let v = h.app("client", &args).unwrap().unwrap();
                assert_eq!(v["status"], 200, "{v}");
                v["body"].as_str().unwrap_or_default().trim().to_string()
            })
            .collect()
    };
    // Both healthy (once the first probes pass: the client's sidecar started before the
    // backends' did): both answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let both = answered(10, "http://backend:8080/", &[]);
        if both.iter().any(|p| p == "backend-v1-0") && both.iter().any(|p| p == "backend-v2-0") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both endpoints never answered: {both:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // backend-v1-0's health check fails (it still serves): no request reaches it, and
    // none fails.
    let set = h
        .app(
            "backend-v1-0",
            &["http", "http://127.0.0.1:8080/fault?health=fail"],
        )
        .unwrap()
        .unwrap();
    assert_eq!(set["status"], 200, "{set}");
    std::thread::sleep(Duration::from_millis(1500));

    let report = h.load("client", "http://backend:8080/", 50, 4).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert_eq!(report.answered_by("backend-v2-0"), 50);

    // RingHash on a header: each value sticks to one endpoint.
    h.app("backend-v1-0", &["http", "http://127.0.0.1:8080/fault"])
        .unwrap()
        .unwrap();
    replace_policy(
        &h,
        "  loadBalancer: {type: RingHash, hash: {header: X-User}}\n",
    );
    // The hash source is on the route: wait for that too.
    std::thread::sleep(Duration::from_millis(500));
    let mut owners = std::collections::BTreeSet::new();
    for user in 0..8 {
        let header = format!("X-User: user-{user}");
        let pods: std::collections::BTreeSet<String> =
            answered(5, "http://backend:8080/", &[&header])
                .into_iter()
                .collect();
        assert_eq!(pods.len(), 1, "user-{user} went to {pods:?}");
        owners.extend(pods);
    }
    assert_eq!(owners.len(), 2, "8 users all hashed to {owners:?}");

    // LeastRequest: the slow endpoint gets fewer of the concurrent requests.
    h.app(
        "backend-v1-0",
        &["http", "http://127.0.0.1:8080/fault?delay_ms=200"],
    )
    .unwrap()
    .unwrap();
    replace_policy(&h, "  loadBalancer: {type: LeastRequest}\n");
    let report = h.load("client", "http://backend:8080/", 200, 8).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let fast = report.answered_by("backend-v2-0");
    eprintln!("least request: fast endpoint answered {fast} of 200");
    // Round robin would give it half; Envoy's LeastRequest draws two endpoints (with
    // replacement), so the slow one still gets about a quarter.
    assert!(fast >= 125, "the fast endpoint answered {fast} of 200");
}
