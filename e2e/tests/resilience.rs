//! TrafficPolicy end to end: fault injection, circuit breaking and outlier detection,
//! enforced by real Envoy sidecars against backends that fail on command (the test
//! app's `/fault`). Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

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
    let mut h = Harness::new(91, "resilience").expect("harness");
    h.add_split_topology().unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.write_manifest(
        "abort.yaml",
        &policy(
            "abort",
            "backend-v1",
            "  faultInjection: {abort: {percent: 30, httpStatus: 503}}\n",
        ),
    )
    .unwrap();
    h.write_manifest(
        "breaker.yaml",
        &policy(
            "breaker",
            "backend-v2",
            "  connectionPool: {maxConnections: 1, maxPendingRequests: 1, maxRequests: 1}\n",
        ),
    )
    .unwrap();
    h.write_manifest(
        "eject.yaml",
        &policy(
            "eject",
            "backend",
            "  outlierDetection: {consecutive5xx: 3, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}\n",
        ),
    )
    .unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    let status = h.status().unwrap();
    assert!(
        status["problems"].as_array().is_none_or(Vec::is_empty),
        "{status}"
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
}
