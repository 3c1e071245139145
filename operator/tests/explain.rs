//! `weft explain` reasons like the proxies: routing through splits, then the
//! destination's authorization, with the reason for each verdict.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use weft::explain::{CallQuery, Explanation, explain};
use weft::index::{Index, MeshModel};
use weft::sources::parse_manifests;
use weft::translate::{AccessMode, MeshConfig, MtlsMode};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 198.19.9.2, selector: {app: b}, ports: [{name: http, port: 8080}, {name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: b-v2}
spec: {clusterIP: 198.19.9.3, selector: {app: b, version: v2}, ports: [{name: http, port: 8080}, {name: tcp-db, port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a-0, labels: {app: a}}
spec: {serviceAccountName: a, containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b-0, labels: {app: b, version: v1}}
spec: {serviceAccountName: b, containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.2}
---
apiVersion: v1
kind: Pod
metadata: {name: b-1, labels: {app: b, version: v2}}
spec: {serviceAccountName: b, containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.3}
---
apiVersion: v1
kind: Pod
metadata: {name: c-0, labels: {app: c}}
spec: {serviceAccountName: c, containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.4}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, labels: {app: plain}, annotations: {weft.dev/inject: disabled}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.5}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: b-routes}
spec:
  matches:
  - {name: metrics, pathRegex: /metrics, methods: ["*"]}
  - {name: canary, headers: {x-canary: "^yes$"}}
"#;

const METRICS_FOR_A: &str = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: a-metrics}
spec:
  destination: {kind: ServiceAccount, name: b}
  sources: [{kind: ServiceAccount, name: a}]
  rules: [{kind: HTTPRouteGroup, name: b-routes, matches: [metrics]}]
"#;

const CANARY_SPLIT: &str = r#"
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: b-canary}
spec:
  service: b
  matches: [{kind: HTTPRouteGroup, name: b-routes}]
  backends: [{service: b-v2, weight: 100}]
"#;

fn model(extra: &[&str]) -> MeshModel {
    let text = std::iter::once(MESH)
        .chain(extra.iter().copied())
        .collect::<Vec<_>>()
        .join("---\n");
    let mut index = Index::new();
    index.reset(parse_manifests(&text).unwrap());
    let model = index.model().clone();
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    model
}

fn ask(model: &MeshModel, config: &MeshConfig, from: &str, url: &str, method: &str) -> Explanation {
    explain(
        model,
        config,
        &CallQuery {
            from: from.into(),
            url: url.into(),
            method: Some(method.into()),
            headers: Vec::new(),
        },
    )
}

fn says(answer: &Explanation, text: &str) -> bool {
    answer.lines.iter().any(|l| l.contains(text))
}

#[test]
fn deny_by_default_names_the_missing_traffic_target() {
    let m = model(&[]);
    let answer = ask(
        &m,
        &MeshConfig::default(),
        "default/a-0",
        "http://b:8080/",
        "GET",
    );
    assert_eq!(answer.verdict, "denied", "{answer:?}");
    assert!(
        says(
            &answer,
            "no TrafficTarget lets default/a reach default/b on port 8080"
        ),
        "{answer:?}"
    );
    assert!(says(
        &answer,
        "to Service default/b port 8080 (HTTP/1.1; from port name http)"
    ));
}

#[test]
fn a_route_group_grant_allows_its_paths_and_says_what_else_it_would_allow() {
    let m = model(&[METRICS_FOR_A]);
    let config = MeshConfig::default();
    let allowed = ask(
        &m,
        &config,
        "default/a-0",
        "http://b.default.svc.cluster.local:8080/metrics/x",
        "POST",
    );
    assert_eq!(allowed.verdict, "allowed", "{allowed:?}");
    assert!(says(
        &allowed,
        "allowed by TrafficTarget default/a-metrics (path /metrics, any method)"
    ));

    let other = ask(&m, &config, "default/a-0", "http://b:8080/other", "GET");
    assert_eq!(other.verdict, "denied");
    assert!(
        says(
            &other,
            "TrafficTarget default/a-metrics allows only: path /metrics"
        ),
        "{other:?}"
    );

    let stranger = ask(
        &m,
        &config,
        "default/c-0",
        "http://198.19.9.2:8080/metrics",
        "GET",
    );
    assert_eq!(stranger.verdict, "denied");
    assert!(says(&stranger, "lets in default/a only"), "{stranger:?}");

    let tcp = ask(&m, &config, "default/a-0", "b:5432", "GET");
    assert_eq!(
        tcp.verdict, "denied",
        "HTTP routes grant nothing on a TCP port: {tcp:?}"
    );
}

#[test]
fn permissive_mode_allows_meshed_callers_and_plaintext_follows_the_mtls_mode() {
    let m = model(&[]);
    let permissive = MeshConfig {
        access: AccessMode::Permissive,
        ..MeshConfig::default()
    };
    let answer = ask(&m, &permissive, "default/c-0", "b:5432", "GET");
    assert_eq!(answer.verdict, "allowed", "{answer:?}");

    // Pod IP, no service: a meshed caller's sidecar uses mTLS to the pod's identity.
    let pod = "http://198.18.9.2:8080/";
    let direct = ask(&m, &permissive, "default/a-0", pod, "GET");
    assert_eq!(direct.verdict, "allowed", "{direct:?}");
    assert!(says(&direct, "mTLS to the pod's identity"), "{direct:?}");
    let denied = ask(&m, &MeshConfig::default(), "default/a-0", pod, "GET");
    assert_eq!(
        denied.verdict, "denied",
        "pod IPs get the same authorization"
    );

    // A caller without a sidecar sends plaintext: strict refuses it; permissive mTLS
    // lets it in when access is permissive too.
    let plain = ask(&m, &permissive, "default/plain", pod, "GET");
    assert_eq!(plain.verdict, "denied", "{plain:?}");
    assert!(says(&plain, "mTLS is strict"));
    let relaxed = MeshConfig {
        mtls: MtlsMode::Permissive,
        ..permissive
    };
    let plain = ask(&m, &relaxed, "default/plain", pod, "GET");
    assert_eq!(plain.verdict, "allowed", "{plain:?}");
}

#[test]
fn a_split_with_matches_routes_only_matching_requests_to_its_backends() {
    let m = model(&[CANARY_SPLIT]);
    let permissive = MeshConfig {
        access: AccessMode::Permissive,
        ..MeshConfig::default()
    };
    let plain = ask(&m, &permissive, "default/a-0", "http://b:8080/", "GET");
    assert!(
        says(&plain, "does not match this request: root service"),
        "{plain:?}"
    );
    assert!(says(&plain, "default/b-0") && says(&plain, "default/b-1"));

    let canary = explain(
        &m,
        &permissive,
        &CallQuery {
            from: "default/a-0".into(),
            url: "http://b:8080/".into(),
            method: None,
            headers: vec!["X-Canary: yes".into()],
        },
    );
    assert!(
        says(&canary, "backend default/b-v2 weight 100"),
        "{canary:?}"
    );
    assert!(
        says(&canary, "default/b-1") && !says(&canary, "default/b-0"),
        "{canary:?}"
    );
}

#[test]
fn unknown_callers_and_destinations_are_reported_not_guessed() {
    let m = model(&[]);
    let config = MeshConfig::default();
    assert_eq!(
        ask(&m, &config, "default/nobody", "http://b:8080/", "GET").verdict,
        "unknown"
    );
    let outside = ask(&m, &config, "default/a-0", "http://example.com:80/", "GET");
    assert_eq!(outside.verdict, "unknown");
    assert!(says(&outside, "not a Service of the mesh"));
    assert_eq!(
        ask(&m, &config, "default/a-0", "b", "GET").verdict,
        "unknown"
    );
}

#[test]
fn the_involved_proxies_are_listed_with_their_sync_state() {
    use weft::runtime::admin::{ProxyStatus, TypeStatus, sync_lines};
    let m = model(&[METRICS_FOR_A]);
    let answer = ask(
        &m,
        &MeshConfig::default(),
        "default/a-0",
        "http://b:8080/metrics",
        "GET",
    );
    assert_eq!(
        answer.proxies,
        vec!["default/a-0", "default/b-0", "default/b-1"]
    );

    let types = |state: &str, nack: Option<&str>| {
        vec![TypeStatus {
            type_name: "LDS".into(),
            state: state.into(),
            sent: Some("v2".into()),
            acked: Some("v1".into()),
            resources: 3,
            responses: 2,
            nack: nack.map(str::to_string),
            sent_at: None,
            acked_at: None,
        }]
    };
    let proxy = |node: &str, state: &str, nack: Option<&str>| ProxyStatus {
        node: node.into(),
        peer: "198.18.9.1:4000".into(),
        types: types(state, nack),
        protocol: "delta".into(),
        denied: None,
    };
    let lines = sync_lines(
        &answer.proxies,
        &[
            proxy("default/a-0", "SYNCED", None),
            proxy("default/b-0", "NACKED", Some("bad regex")),
        ],
    );
    assert_eq!(lines[0], "proxy default/a-0: in sync");
    assert!(
        lines[1].contains("rejected its latest LDS (bad regex)"),
        "{lines:?}"
    );
    assert!(lines[2].contains("not connected"), "{lines:?}");
}

const UNDECLARED_PORT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: u}
spec: {clusterIP: 198.19.9.9, selector: {app: b}, ports: [{name: web, port: 8081}]}
"#;

#[test]
fn undeclared_ports_are_explained_as_detected_and_paths_as_normalized() {
    let m = model(&[UNDECLARED_PORT, METRICS_FOR_A]);
    let config = MeshConfig::default();
    let http = ask(&m, &config, "default/a-0", "http://u:8081/metrics", "GET");
    assert!(
        says(
            &http,
            "port 8081 (detected: HTTP, from the request's first bytes; from undeclared)"
        ),
        "{http:?}"
    );
    assert_eq!(http.verdict, "allowed", "{http:?}");
    let tcp = ask(&m, &config, "default/a-0", "u:8081", "GET");
    assert!(says(&tcp, "detected: TCP, after 1s"), "{tcp:?}");
    assert_eq!(
        tcp.verdict, "denied",
        "an HTTP grant does not cover TCP: {tcp:?}"
    );

    // Authorization sees the normalized path, as the proxies do.
    let sneaky = ask(
        &m,
        &config,
        "default/a-0",
        "http://b:8080/metrics/../admin",
        "GET",
    );
    assert!(says(&sneaky, "path normalized to /admin"), "{sneaky:?}");
    assert_eq!(sneaky.verdict, "denied", "{sneaky:?}");
    let dotted = ask(
        &m,
        &config,
        "default/a-0",
        "http://b:8080/x/%2e%2e/metrics",
        "GET",
    );
    assert_eq!(dotted.verdict, "allowed", "{dotted:?}");
    let escaped = ask(
        &m,
        &config,
        "default/a-0",
        "http://b:8080/metrics/..%2Fadmin",
        "GET",
    );
    assert_eq!(escaped.verdict, "redirected", "{escaped:?}");
    let reject = MeshConfig {
        escaped_slashes: weft_crds::EscapedSlashesPolicy::Reject,
        ..MeshConfig::default()
    };
    let rejected = ask(
        &m,
        &reject,
        "default/a-0",
        "http://b:8080/metrics/..%2Fadmin",
        "GET",
    );
    assert_eq!(rejected.verdict, "denied", "{rejected:?}");
    assert!(says(&rejected, "answers 400"), "{rejected:?}");
}

#[test]
fn draining_endpoints_take_no_new_calls() {
    let deleted = r#"
apiVersion: v1
kind: Pod
metadata: {name: b-2, labels: {app: b, version: v1}, deletionTimestamp: "2025-01-01T00:00:00Z"}
spec: {serviceAccountName: b, containers: [{name: c, image: i}]}
status: {podIP: 198.18.9.6}
"#;
    let m = model(&[deleted]);
    let permissive = MeshConfig {
        access: AccessMode::Permissive,
        ..MeshConfig::default()
    };
    let answer = ask(&m, &permissive, "default/a-0", "http://b:8080/", "GET");
    assert_eq!(answer.verdict, "allowed", "{answer:?}");
    assert!(says(&answer, "198.18.9.2:8080"), "{answer:?}");
    assert!(
        !says(&answer, "198.18.9.6"),
        "the pod being deleted only finishes what it has: {answer:?}"
    );
}

const B_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-route}
spec:
  parentRefs: [{group: "", kind: Service, name: b, port: 8080}]
  rules:
  - name: canary
    matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-canary, value: "yes"}], queryParams: [{name: v, value: "2"}]}]
    backendRefs: [{name: b-v2, port: 8080}]
  - name: moved
    matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.com, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    retry: {codes: [503], attempts: 3}
    backendRefs: [{name: b, port: 8080}]
"#;

#[test]
fn an_httproute_rule_is_named_with_why_it_matched_and_where_it_sends() {
    let m = model(&[B_ROUTE]);
    let permissive = MeshConfig {
        access: AccessMode::Permissive,
        ..MeshConfig::default()
    };
    let call = |url: &str, headers: &[&str]| {
        explain(
            &m,
            &permissive,
            &CallQuery {
                from: "default/a-0".into(),
                url: url.into(),
                method: None,
                headers: headers.iter().map(|h| h.to_string()).collect(),
            },
        )
    };
    let canary = call("http://b:8080/api/x?v=2", &["X-Canary: yes"]);
    assert_eq!(canary.verdict, "allowed", "{canary:?}");
    assert!(
        says(
            &canary,
            "HTTPRoute default/b-route rule 0 (canary) matched (producer route)"
        ),
        "{canary:?}"
    );
    assert!(
        says(&canary, "default/b-1") && !says(&canary, "default/b-0"),
        "{canary:?}"
    );
    // Without the query parameter the canary rule does not match; the next /api one does.
    let plain = call("http://b:8080/api/x", &["X-Canary: yes"]);
    assert!(says(&plain, "rule 2 matched"), "{plain:?}");
    assert!(
        says(&plain, "retries: 3 on connection failures and [503]"),
        "{plain:?}"
    );
    // `/apix` is not under the `/api` prefix: no rule matches.
    let none = call("http://b:8080/apix", &[]);
    assert_eq!(none.verdict, "not found", "{none:?}");
    assert!(says(&none, "answers 404"), "{none:?}");
    let moved = call("http://b:8080/old", &[]);
    assert_eq!(moved.verdict, "redirected", "{moved:?}");
    assert!(
        says(&moved, "rule 1 (moved)") && says(&moved, "redirect 301 host example.com"),
        "{moved:?}"
    );
}

#[test]
fn the_traffic_policy_in_force_is_listed_with_the_object_that_set_each_field() {
    let older = r#"
apiVersion: policy.weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b-breaker, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: b}]
  connectionPool: {maxRequests: 5}
  rateLimit: {local: {tokens: 10, interval: 1s}}
"#;
    let newer = r#"
apiVersion: policy.weft.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: b-more, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  targetRefs: [{group: "", kind: Service, name: b, sectionName: http}]
  connectionPool: {maxRequests: 50}
  timeouts: {request: 2s}
"#;
    let text = [MESH, older, newer].join("---\n");
    let mut index = Index::new();
    index.reset(parse_manifests(&text).unwrap());
    let m = index.model().clone();
    // The newer policy loses connectionPool to the older one, and says so.
    assert!(
        m.problems.iter().any(|p| p.object.to_string() == "TrafficPolicy default/b-more"
            && !p.rejected
            && p.reason.contains("connectionPool of Service default/b port 8080 is set by the older TrafficPolicy default/b-breaker")),
        "{:?}",
        m.problems
    );
    let permissive = MeshConfig {
        access: AccessMode::Permissive,
        ..MeshConfig::default()
    };
    let answer = ask(&m, &permissive, "default/a-0", "http://b:8080/", "GET");
    assert!(
        says(
            &answer,
            "connectionPool maxConnections None, maxPendingRequests None, maxRequests Some(5)"
        ) && says(&answer, "(from TrafficPolicy default/b-breaker)"),
        "{answer:?}"
    );
    assert!(
        says(
            &answer,
            "timeouts request 2s (unless a route sets its own) (from TrafficPolicy default/b-more)"
        ),
        "{answer:?}"
    );
    assert!(
        says(&answer, "rateLimit 10 per 1s (burst 10)"),
        "{answer:?}"
    );
    // The TCP port has only what targets every port.
    let tcp = ask(&m, &permissive, "default/a-0", "b:5432", "GET");
    assert!(!says(&tcp, "timeouts"), "{tcp:?}");
}

#[test]
fn the_callers_live_endpoint_state_names_ejections_failed_checks_and_an_open_circuit() {
    use weft::explain::live_lines;
    let c = "outbound|8080||b.default.svc.cluster.local";
    let text = format!(
        "{c}::default_priority::max_requests::2\n{c}::default_priority::max_pending_requests::1\n\
         {c}::198.18.9.2:8080::rq_active::1\n{c}::198.18.9.2:8080::health_flags::/failed_outlier_check\n\
         {c}::198.18.9.3:8080::rq_active::1\n{c}::198.18.9.3:8080::health_flags::healthy\n\
         other::198.18.9.9:8080::health_flags::/failed_active_hc\n"
    );
    let lines = live_lines(&[c.to_string()], &text);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("endpoint 198.18.9.2:8080 is ejected by outlier detection")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("circuit open: 2 requests in flight of maxRequests 2")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains("198.18.9.9")), "{lines:?}");
    let all_failed = text.replace("health_flags::healthy", "health_flags::/failed_active_hc");
    let lines = live_lines(&[c.to_string()], &all_failed);
    assert!(
        lines.iter().any(|l| l.contains("no healthy endpoint")),
        "{lines:?}"
    );
    assert!(
        live_lines(&[c.to_string()], "")
            .iter()
            .any(|l| l.contains("no endpoints")),
    );
}
