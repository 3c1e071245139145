//! Observability end to end: a real Prometheus scrapes the real sidecars' metrics port
//! and counts each edge's requests by response class under source and destination
//! labels; the sidecars' access logs name both identities of a call. Needs root and
//! `prometheus` (`make setup` installs it); fails (never skips) without them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::{Harness, workspace_binary};

/// A Prometheus server scraping the sidecars every second, killed on drop.
struct Prometheus {
    child: Child,
    address: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Splits the cluster's stat name (`outbound|PORT||SERVICE|NAMESPACE`) into destination
/// labels, as the chart's PodMonitor does.
const RELABEL: &str = r#"
  metric_relabel_configs:
  - source_labels: [envoy_cluster_name]
    regex: 'outbound\|(\d+)\|\|([^|]+)\|([^|]+)'
    target_label: destination_service
    replacement: '$2'
  - source_labels: [envoy_cluster_name]
    regex: 'outbound\|(\d+)\|\|([^|]+)\|([^|]+)'
    target_label: destination_namespace
    replacement: '$3'
  - source_labels: [envoy_cluster_name]
    regex: 'outbound\|(\d+)\|\|([^|]+)\|([^|]+)'
    target_label: destination_port
    replacement: '$1'
"#;

impl Prometheus {
    fn start(h: &Harness, pods: &[(&str, &str)], port: u16) -> Self {
        let targets: String = pods
            .iter()
            .map(|(pod, workload)| {
                let ip = h.pod_ips(pod)[0];
                format!(
                    "  - targets: ['{}']\n    labels: {{namespace: default, pod: {pod}, workload: {workload}}}\n",
                    std::net::SocketAddr::new(ip, 15090)
                )
            })
            .collect();
        let config = format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: weft-sidecars\n  metrics_path: /stats/prometheus\n  static_configs:\n{targets}{RELABEL}"
        );
        let dir = h.work_dir().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let address = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (installed by `make setup`)");
        Self { child, address }
    }

    /// The JSON body of a GET of the Prometheus API.
    fn api(&self, path: &str) -> Option<Value> {
        let url = format!("http://{}{path}", self.address);
        let out = Command::new(workspace_binary("weft-e2e-app").unwrap())
            .args(["http", &url])
            .output()
            .ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        serde_json::from_str(v["body"].as_str()?).ok()
    }

    /// The result of an instant PromQL query.
    fn query(&self, promql: &str) -> Option<Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(promql)))
    }

    /// The value of an instant PromQL query with one result, if it has one.
    fn value(&self, promql: &str) -> Option<f64> {
        self.query(promql)?["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Waits until `promql` gives `want`.
    fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.value(promql);
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql}: {got:?}, expected {want}; the scrapes: {}",
                self.query(r#"{pod="client",__name__=~"envoy_cluster_upstream_rq.*"}"#)
                    .map(|v| v.to_string().chars().take(3000).collect::<String>())
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The JSON access log lines of `pod`'s sidecar.
fn access_log(h: &Harness, pod: &str) -> Vec<Value> {
    std::fs::read_to_string(h.work_dir().join(format!("{pod}-envoy.log")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("direction").is_some())
        .collect()
}

#[test]
fn prometheus_counts_each_edge_by_class_and_access_logs_name_both_identities() {
    let mut h = Harness::new(96, "observability").expect("harness");
    h.add_split_topology().unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    let prometheus = Prometheus::start(
        &h,
        &[
            ("client", "client"),
            ("backend-v1-0", "backend-v1"),
            ("backend-v2-0", "backend-v2"),
        ],
        19096,
    );

    // 180 requests succeed, 20 fail with 500 (the app fails them as asked).
    let ok = h.load("client", "http://backend:8080/", 180, 4).unwrap();
    assert!(ok.failures().is_empty(), "{:?}", ok.failures());
    let failing = h
        .load("client", "http://backend:8080/x?fail=500", 20, 2)
        .unwrap();
    assert_eq!(failing.failures().len(), 20);

    let edge = r#"pod="client",destination_service="backend",destination_namespace="default",destination_port="8080""#;
    prometheus.wait_for(
        &format!(r#"sum(envoy_cluster_upstream_rq_xx{{{edge},envoy_response_code_class="2"}})"#),
        180.0,
    );
    prometheus.wait_for(
        &format!(r#"sum(envoy_cluster_upstream_rq_xx{{{edge},envoy_response_code_class="5"}})"#),
        20.0,
    );
    prometheus.wait_for(
        &format!("sum(envoy_cluster_upstream_rq_time_count{{{edge}}})"),
        200.0,
    );
    // The destination side counts what reached each pod: together, all 200.
    prometheus.wait_for(
        r#"sum(envoy_http_downstream_rq_xx{workload=~"backend-v.",envoy_http_conn_manager_prefix="inbound_8080"})"#,
        200.0,
    );

    // The chart's Grafana dashboard, each query run on this Prometheus (its variables
    // at "All"): every one executes, and the traffic panels show the edge.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../helm/weft/dashboards/weft-mesh.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let panels_with_data = || {
        let mut with_data = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$__rate_interval", "30s")
                    .replace("$__range", "5m")
                    .replace("$namespace", ".*")
                    .replace("$workload", ".*")
                    .replace("$service", ".*");
                let answer = prometheus.query(&expr).unwrap_or_default();
                assert_eq!(answer["status"], "success", "{expr}: {answer}");
                if answer["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
                {
                    with_data.push(panel["title"].as_str().unwrap().to_string());
                }
            }
        }
        with_data
    };
    // Rates need two scrapes of a counter inside their window: failures after the 5xx
    // series exists (503s, which the access-log checks below do not count).
    let more = h
        .load("client", "http://backend:8080/x?fail=503", 10, 1)
        .unwrap();
    assert_eq!(more.failures().len(), 10);
    let mut with_data = panels_with_data();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !with_data.iter().any(|t| t == "Top failing edges") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        with_data = panels_with_data();
    }
    for title in [
        "Request rate by destination service",
        "Success rate by destination service",
        "p99 latency by destination service",
        "Top failing edges",
        "Request rate: inbound at $workload",
        "Latency: callers → $service",
    ] {
        assert!(
            with_data.iter().any(|t| t == title),
            "no data for {title:?}; panels with data: {with_data:?}"
        );
    }

    // `weft check` in local mode: the CA, every proxy in sync, Prometheus scraping them.
    let check = Command::new(workspace_binary("weft").unwrap())
        .args(["check", "--local", "--admin-addr", &h.admin_addr()])
        .args(["--prometheus", &format!("http://{}", prometheus.address)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{text}");
    for line in [
        "[ok  ] CA certificate: the mesh CA valid until ",
        "[ok  ] proxies in sync: 3 connected proxies, all in sync",
        "[ok  ] Prometheus: http://127.0.0.1:19096 scrapes 3 sidecar(s)",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }

    // `weft top`: the edge under a steady load, measured from the sidecars.
    let load = h
        .start_load("client", "http://backend:8080/", Duration::from_secs(4), 2)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let top = h.top("2s").unwrap();
    let report = load.finish().unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let edge = top
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == "default/client" && e["destination"] == "default/backend:8080")
        .unwrap_or_else(|| panic!("no client → backend edge: {top}"));
    let rps = edge["rps"].as_f64().unwrap();
    let sent = report.results.len() as f64 / 4.0;
    eprintln!("weft top: {edge}; the load sent {sent:.0} requests per second");
    assert!(
        rps > sent * 0.5 && rps < sent * 1.5,
        "{edge} vs {sent} rps sent"
    );
    assert_eq!(edge["success_rate"], 100.0, "{edge}");
    assert!(edge["p50_ms"].as_f64().is_some(), "{edge}");

    // Access logs: the caller's outbound line and the server's inbound line of a
    // failed call name both identities, the status and the upstream.
    let client = "spiffe://cluster.local/ns/default/sa/client";
    let backend = "spiffe://cluster.local/ns/default/sa/backend";
    // Envoy flushes its log every 10 s.
    let failed = |pods: &[&str], direction: &str| -> Vec<Value> {
        pods.iter()
            .flat_map(|pod| access_log(&h, pod))
            .filter(|l| l["direction"] == direction && l["status"] == 500)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(25);
    while (failed(&["client"], "outbound").len() < 20
        || failed(&["backend-v1-0", "backend-v2-0"], "inbound").len() < 20)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    let outbound = failed(&["client"], "outbound");
    assert_eq!(outbound.len(), 20, "{:?}", outbound.first());
    let line = &outbound[0];
    assert_eq!(line["source_identity"], client, "{line}");
    assert_eq!(line["destination_identity"], backend, "{line}");
    assert_eq!(line["path"], "/x?fail=500", "{line}");
    assert_eq!(
        line["upstream_cluster"], "outbound|8080||backend|default",
        "{line}"
    );
    let inbound = failed(&["backend-v1-0", "backend-v2-0"], "inbound");
    assert_eq!(inbound.len(), 20);
    assert_eq!(inbound[0]["source_identity"], client, "{}", inbound[0]);
    assert_eq!(
        inbound[0]["destination_identity"], backend,
        "{}",
        inbound[0]
    );
}

/// An OTLP/gRPC receiver (`weft-e2e-app otlp`) in the root namespace, killed on drop.
struct Collector {
    child: Child,
    spans: std::path::PathBuf,
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Collector {
    fn start(h: &Harness, listen: std::net::SocketAddr) -> Self {
        let spans = h.work_dir().join("spans.jsonl");
        let log = std::fs::File::create(h.work_dir().join("collector.log")).unwrap();
        let child = Command::new(workspace_binary("weft-e2e-app").unwrap())
            .args(["otlp", "--listen", &listen.to_string(), "--out"])
            .arg(&spans)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child, spans }
    }

    /// The spans received so far.
    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The spans of one trace, once `count` of them arrived.
    fn trace(&self, trace_id: &str, count: usize) -> Vec<Value> {
        let of_trace = || -> Vec<Value> {
            self.spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace_id)
                .collect()
        };
        let waited = weft_e2e::wait_until(Duration::from_secs(20), "spans", || {
            of_trace().len() >= count
        });
        let spans = of_trace();
        assert!(
            waited.is_ok() && spans.len() == count,
            "trace {trace_id}: {} spans, expected {count}: {spans:#?}; all: {:#?}",
            spans.len(),
            self.spans()
        );
        spans
    }
}

/// The span of `trace` reported by `service`'s sidecar on `direction`'s side.
fn span<'s>(trace: &'s [Value], service: &str, direction: &str) -> &'s Value {
    trace
        .iter()
        .find(|s| {
            s["resource"]["service.name"] == service
                && s["attributes"]["weft.direction"] == direction
        })
        .unwrap_or_else(|| panic!("no {direction} span of {service}: {trace:#?}"))
}

#[test]
fn spans_of_a_two_hop_request_chain_at_the_collector_and_telemetry_follows_the_mesh_config() {
    let mut h = Harness::new(97, "tracing").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("frontend-0", &[("app", "frontend")], "frontend")
        .unwrap();
    h.add_pod("backend-0", &[("app", "backend")], "backend")
        .unwrap();
    h.add_service("frontend", &[("app", "frontend")]).unwrap();
    h.add_service("backend", &[("app", "backend")]).unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("frontend-access.yaml", "frontend", &["client"])
        .unwrap();
    h.allow("backend-access.yaml", "backend", &["frontend"])
        .unwrap();
    let collector_addr = std::net::SocketAddr::new(h.host_address().into(), 14317);
    let mesh_config = |telemetry: &str| {
        format!(
            "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: weft}}\nspec:\n  telemetry:\n{telemetry}"
        )
    };
    h.write_manifest(
        "meshconfig.yaml",
        &mesh_config(&format!(
            "    tracing: {{collector: '{collector_addr}', sampling: {{numerator: 100}}}}\n"
        )),
    )
    .unwrap();
    let collector = Collector::start(&h, collector_addr);
    h.start_control_plane().unwrap();
    for pod in ["client", "frontend-0", "backend-0"] {
        h.start_sidecar(pod).unwrap();
    }

    // client → frontend, whose app calls backend passing the trace context on.
    let relay = "http://frontend:8080/relay?to=http://backend:8080/";
    let (body, _) = h.get("client", relay).unwrap().expect("relayed call");
    assert!(
        body.starts_with("relayed frontend-0 -> backend-0"),
        "{body}"
    );
    // The caller's sidecar started the trace (sampling 100%): find it by its root span.
    let deadline = Instant::now() + Duration::from_secs(20);
    let root = loop {
        if let Some(root) = collector
            .spans()
            .into_iter()
            .find(|s| s["resource"]["service.name"] == "client" && s["parent_span_id"] == "")
        {
            break root;
        }
        assert!(
            Instant::now() < deadline,
            "no root span from the client: {:#?}",
            collector.spans()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let trace_id = root["trace_id"].as_str().unwrap().to_string();
    let trace = collector.trace(&trace_id, 4);
    let client_out = span(&trace, "client", "outbound");
    let frontend_in = span(&trace, "frontend", "inbound");
    let frontend_out = span(&trace, "frontend", "outbound");
    let backend_in = span(&trace, "backend", "inbound");
    // Each hop is the child of the one before: caller → server → its own call → server.
    assert_eq!(frontend_in["parent_span_id"], client_out["span_id"]);
    assert_eq!(frontend_out["parent_span_id"], frontend_in["span_id"]);
    assert_eq!(backend_in["parent_span_id"], frontend_out["span_id"]);
    assert_eq!(client_out["kind"], 3, "CLIENT: {client_out}");
    assert_eq!(frontend_in["kind"], 2, "SERVER: {frontend_in}");
    // The spans carry both workload identities and the pod.
    let id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
    assert_eq!(
        client_out["attributes"]["weft.source.identity"],
        id("client")
    );
    assert_eq!(
        client_out["attributes"]["weft.destination.identity"],
        id("frontend")
    );
    assert_eq!(
        backend_in["attributes"]["weft.source.identity"],
        id("frontend")
    );
    assert_eq!(
        backend_in["attributes"]["weft.destination.identity"],
        id("backend")
    );
    assert_eq!(backend_in["resource"]["k8s.pod.name"], "backend-0");
    assert_eq!(backend_in["resource"]["k8s.namespace.name"], "default");

    // An app that started the trace itself: the sidecars continue it.
    let app_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("traceparent: 00-{app_trace}-00f067aa0ba902b7-01");
    h.request("client", "GET", relay, &[&traceparent])
        .unwrap()
        .expect("relayed call with the app's trace");
    let trace = collector.trace(app_trace, 4);
    assert_eq!(
        span(&trace, "client", "outbound")["parent_span_id"],
        "00f067aa0ba902b7"
    );

    // Zipkin/B3: the app behind the sidecars receives both B3 and W3C headers (Envoy
    // took the new tracer: a NACK would leave the OTLP one in place, without B3).
    // Text access logs of failures only: successes sampled at 0.
    h.write_manifest(
        "meshconfig.yaml",
        &mesh_config(&format!(
            "    tracing: {{collector: '{}:19411', protocol: Zipkin, sampling: {{numerator: 100}}}}\n    accessLog: {{format: Text, sampling: {{numerator: 0}}}}\n",
            h.host_address()
        )),
    )
    .unwrap();
    weft_e2e::wait_until(Duration::from_secs(20), "B3 headers at the backend", || {
        h.get("frontend-0", "http://backend:8080/echo")
            .ok()
            .and_then(Result::ok)
            .is_some_and(|(body, _)| body.contains("x-b3-traceid") && body.contains("traceparent"))
    })
    .unwrap();
    let text_lines = |pod: &str| -> Vec<String> {
        std::fs::read_to_string(h.work_dir().join(format!("{pod}-envoy.log")))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("time="))
            .map(str::to_string)
            .collect()
    };
    let ok = h.load("frontend-0", "http://backend:8080/", 30, 3).unwrap();
    assert!(ok.failures().is_empty(), "{:?}", ok.failures());
    let failing = h
        .load("frontend-0", "http://backend:8080/x?fail=503", 5, 1)
        .unwrap();
    assert_eq!(failing.failures().len(), 5);
    // Envoy flushes its log every 10 s.
    let waited = weft_e2e::wait_until(Duration::from_secs(25), "text access log lines", || {
        text_lines("frontend-0").len() >= 5
    });
    std::thread::sleep(Duration::from_secs(1));
    let lines = text_lines("frontend-0");
    assert!(waited.is_ok(), "{lines:?}");
    assert_eq!(lines.len(), 5, "only the failures are logged: {lines:#?}");
    for line in &lines {
        assert!(line.contains(" direction=outbound "), "{line}");
        assert!(line.contains(" status=503 "), "{line}");
        assert!(
            line.contains(&format!("destination_identity={} ", id("backend"))),
            "{line}"
        );
    }
}

/// Numbers as f64 (Envoy writes `100`, serde `100.0`): the JSON compared as values.
fn normalized(value: &Value) -> Value {
    match value {
        Value::Number(n) => serde_json::json!(n.as_f64()),
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The endpoint addresses of a ClusterLoadAssignment, sorted.
fn endpoint_addresses(assignment: &Value) -> Value {
    let mut out: Vec<Value> = assignment["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["lb_endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| normalized(&e["endpoint"]["address"]))
        .collect();
    out.sort_by_key(Value::to_string);
    Value::Array(out)
}

#[test]
fn proxy_config_is_what_envoy_reports_in_its_config_dump() {
    let h = Harness::start_split_mesh(98, "proxy-config", &[]).expect("mesh");
    let (body, _) = h.get("client", "http://backend:8080/").unwrap().unwrap();
    assert!(body.starts_with("backend-v"), "{body}");
    let ours = h.proxy_config("client", &[]).unwrap();
    let dump: Value = serde_json::Deserializer::from_str(
        &h.envoy_admin("client", "/config_dump?include_eds").unwrap(),
    )
    .into_iter()
    .next()
    .unwrap()
    .unwrap();
    let section = |suffix: &str| -> &Value {
        dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(&format!(".{suffix}")))
            })
            .unwrap_or_else(|| panic!("no {suffix} in the config dump"))
    };
    // (our kind, Envoy's section, its list, the resource inside each entry, name field)
    let kinds = [
        (
            "listeners",
            "ListenersConfigDump",
            "dynamic_listeners",
            "active_state.listener",
            "name",
        ),
        (
            "clusters",
            "ClustersConfigDump",
            "dynamic_active_clusters",
            "cluster",
            "name",
        ),
        (
            "routes",
            "RoutesConfigDump",
            "dynamic_route_configs",
            "route_config",
            "name",
        ),
        ("scopes", "ScopedRoutesConfigDump", "", "scope", "name"),
        (
            "endpoints",
            "EndpointsConfigDump",
            "dynamic_endpoint_configs",
            "endpoint_config",
            "cluster_name",
        ),
        (
            "secrets",
            "SecretsConfigDump",
            "dynamic_active_secrets",
            "secret",
            "name",
        ),
    ];
    // Route scopes come grouped under the scoped-routes configuration they belong to.
    let scopes: Vec<Value> = section("ScopedRoutesConfigDump")["dynamic_scoped_route_configs"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| {
            group["scoped_route_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|scope| serde_json::json!({ "scope": scope }))
        .collect();
    for (kind, section_type, list, path, name_field) in kinds {
        let entries = if kind == "scopes" {
            scopes.clone()
        } else {
            section(section_type)[list]
                .as_array()
                .cloned()
                .unwrap_or_default()
        };
        let envoy: std::collections::BTreeMap<String, Value> = entries
            .iter()
            .map(|entry| {
                let resource = path.split('.').fold(entry, |v, key| &v[key]).clone();
                (resource[name_field].as_str().unwrap().to_string(), resource)
            })
            .collect();
        let mine: std::collections::BTreeMap<String, Value> = ours[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r[name_field].as_str().unwrap().to_string(), r.clone()))
            .collect();
        assert!(!mine.is_empty(), "no {kind} for the client");
        // Envoy also lists the endpoints of clusters that are not EDS (passthrough).
        let mut envoy = envoy;
        if kind == "endpoints" {
            envoy.retain(|name, _| mine.contains_key(name));
        }
        assert_eq!(
            mine.keys().collect::<Vec<_>>(),
            envoy.keys().collect::<Vec<_>>(),
            "{kind}: names differ"
        );
        for (name, resource) in &mine {
            let (ours, theirs) = if kind == "endpoints" {
                // Envoy dumps its live host set (health, weights, defaults filled in),
                // not the message it received: the addresses must agree.
                (
                    endpoint_addresses(resource),
                    endpoint_addresses(&envoy[name]),
                )
            } else {
                (normalized(resource), normalized(&envoy[name]))
            };
            assert_eq!(
                ours, theirs,
                "{kind} {name}: weft proxy-config differs from Envoy's config dump"
            );
        }
    }
    // The control plane's own metrics: certificate expiry and each proxy's config age.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let metric = |name: &str| {
        h.control_plane_metric(name)
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let ca = metric("weft_ca_certificate_expiry_timestamp_seconds");
    assert!(
        ca > now + 300.0 * 86400.0,
        "the CA expires at {ca}, now {now}"
    );
    let svid = metric("weft_workload_certificate_earliest_expiry_timestamp_seconds");
    assert!(
        svid > now && svid <= now + 24.0 * 3600.0 + 60.0,
        "workload certificates live 24h: {svid} vs {now}"
    );
    let age = metric(r#"weft_proxy_config_age_seconds{node="default/client"}"#);
    assert!((0.0..120.0).contains(&age), "config age {age}");
    assert_eq!(
        metric(r#"weft_proxy_config_unacked_seconds{node="default/client"}"#),
        0.0,
        "the client is in sync"
    );
    // No private key leaves the control plane.
    let text = ours.to_string();
    assert!(!text.contains("PRIVATE KEY") && !text.contains("LS0tLS1CRUdJTiBQUklWQVRF"));
    // Only the kinds asked for, and a clear error for a pod without config.
    let listeners = h.proxy_config("client", &["listeners"]).unwrap();
    // The same through kubectl, with `weft` installed as its plugin (`make install`
    // links `kubectl-weft`).
    let kubectl =
        std::env::var_os("WEFT_KUBECTL").expect("WEFT_KUBECTL (make setup installs kubectl)");
    let plugins = h.work_dir().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    std::os::unix::fs::symlink(
        workspace_binary("weft").unwrap(),
        plugins.join("kubectl-weft"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&kubectl)
        .args([
            "weft",
            "proxy-config",
            "default/client",
            "listeners",
            "-o",
            "json",
        ])
        .args(["--admin-addr", &h.admin_addr()])
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let via_kubectl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        via_kubectl, listeners,
        "kubectl weft proxy-config = weft proxy-config"
    );
    assert_eq!(
        listeners.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["listeners"]
    );
    assert!(h.proxy_config("no-such-pod", &[]).is_err());
}

/// Headless Chromium (`make setup` installs Debian's `chromium`) on `url`, after its
/// scripts ran: the rendered DOM, and a screenshot at `screenshot`. A run that hangs is
/// killed and tried once more.
fn chromium(url: &str, screenshot: &std::path::Path, dir: &std::path::Path) -> String {
    let run = |extra: &[&str], attempt: usize| -> Option<String> {
        let out_file = dir.join(format!("chromium-{attempt}.out"));
        let err_file = dir.join(format!("chromium-{attempt}.err"));
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,800",
                // Virtual time waits while the page's one fetch of /graph (1 s of
                // measuring) is in flight, then runs out: the page is drawn.
                "--virtual-time-budget=5000",
                &format!(
                    "--user-data-dir={}",
                    dir.join(format!("profile-{attempt}")).display()
                ),
            ])
            .args(extra)
            .arg(url)
            .stdout(std::fs::File::create(&out_file).unwrap())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .expect("chromium (installed by `make setup`)");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "chromium: {}",
                    std::fs::read_to_string(&err_file).unwrap_or_default()
                );
                return Some(std::fs::read_to_string(&out_file).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let twice = |extra: &[&str], name: &str| {
        run(extra, 0)
            .or_else(|| run(extra, 1))
            .unwrap_or_else(|| panic!("chromium hung twice taking the {name}"))
    };
    twice(
        &[&format!("--screenshot={}", screenshot.display())],
        "screenshot",
    );
    twice(&["--dump-dom"], "DOM")
}

/// The value of attribute `name` in an element's opening tag.
fn attribute<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let rest = &tag[start..];
    Some(&rest[..rest.find('"')?])
}

#[test]
fn the_mesh_page_draws_the_observed_calls_and_marks_the_one_policy_denies() {
    let mut h = Harness::new(99, "mesh-page").expect("harness");
    h.add_split_topology().unwrap();
    h.add_pod("stranger", &[("app", "stranger")], "stranger")
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "backend", &["client"]).unwrap();
    h.start_control_plane().unwrap();
    for pod in ["client", "stranger", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    // Both call the backend all along; the stranger's calls are refused (403).
    let allowed = h
        .start_load("client", "http://backend:8080/", Duration::from_secs(70), 2)
        .unwrap();
    let refused = h
        .start_load(
            "stranger",
            "http://backend:8080/",
            Duration::from_secs(70),
            1,
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("mesh-page.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{}/dashboard?window=1s&refresh=0", h.admin_addr());
    let dom = chromium(&url, &screenshot, h.work_dir());
    std::fs::write(artifacts.join("mesh-page.html"), &dom).unwrap();

    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the page never drew the graph:\n{dom}"
    );
    let tags = |class: &str| -> Vec<String> {
        dom.split('<')
            .filter(|t| {
                t.starts_with("g ")
                    && attribute(t, "class").is_some_and(|c| c.split(' ').next() == Some(class))
            })
            .map(|t| t[..t.find('>').unwrap_or(t.len())].to_string())
            .collect()
    };
    let nodes: Vec<String> = tags("node")
        .iter()
        .filter_map(|t| attribute(t, "data-id").map(str::to_string))
        .collect();
    for node in ["default/client", "default/stranger", "default/backend:8080"] {
        assert!(
            nodes.iter().any(|n| n == node),
            "node {node} missing: {nodes:?}"
        );
    }
    let edges = tags("edge");
    let edge = |source: &str| {
        edges
            .iter()
            .find(|t| {
                attribute(t, "data-source") == Some(source)
                    && attribute(t, "data-destination") == Some("default/backend:8080")
            })
            .unwrap_or_else(|| panic!("no edge from {source}: {edges:?}"))
    };
    let client = edge("default/client");
    assert_eq!(
        attribute(client, "data-verdict"),
        Some("allowed"),
        "{client}"
    );
    assert!(
        !attribute(client, "class").unwrap().contains("denied"),
        "{client}"
    );
    assert_eq!(attribute(client, "data-success"), Some("100.0"), "{client}");
    let rps: f64 = attribute(client, "data-rps").unwrap().parse().unwrap();
    assert!(rps > 1.0, "{client}");
    let stranger = edge("default/stranger");
    assert_eq!(
        attribute(stranger, "data-verdict"),
        Some("denied"),
        "{stranger}"
    );
    assert!(
        attribute(stranger, "class")
            .unwrap()
            .split(' ')
            .any(|c| c == "denied"),
        "{stranger}"
    );
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot of the mesh page: {}", screenshot.display());

    // A click fetches the edge's `explain` path: it says why the stranger is refused.
    let get = |path: &str| -> Value {
        let out = Command::new(workspace_binary("weft-e2e-app").unwrap())
            .args(["http", &format!("http://{}{path}", h.admin_addr())])
            .args(["--timeout-ms", "20000"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_str(v["body"].as_str().unwrap()).unwrap()
    };
    let graph = get("/graph?window=1s");
    let explain = graph["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["source"] == "default/stranger")
        .map(|e| e["explain"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no stranger edge: {graph}"));
    let answer = get(&explain);
    assert_eq!(answer["verdict"], "denied", "{answer}");
    assert!(
        answer["lines"].to_string().contains("default/stranger"),
        "{answer}"
    );
    let report = allowed.finish().unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let _ = refused.finish();
}
