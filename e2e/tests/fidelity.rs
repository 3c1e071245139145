//! Data-plane fidelity: what an app sends through its sidecar arrives as it would
//! without the mesh. Real `weft up`, real Envoy sidecars, real iptables, in
//! network-namespace pods; a test app that speaks HTTP/1.1, HTTP/2, gRPC, WebSocket,
//! a server-first banner protocol and a Redis-style protocol. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::{Harness, IpFamilies, PortSpec, host_port};

const GRPC_PORT: u16 = 50051;
const MYSQL_PORT: u16 = 3306;
const UNDECLARED_BANNER_PORT: u16 = 7000;
const REDIS_PORT: u16 = 6379;
const UNDECLARED_HTTP_PORT: u16 = 8081;

/// What every server pod serves besides HTTP on 8080 and 9090.
const LISTEN: [(&str, u16); 5] = [
    ("grpc", GRPC_PORT),
    ("banner", MYSQL_PORT),
    ("banner", UNDECLARED_BANNER_PORT),
    ("redis", REDIS_PORT),
    ("http", UNDECLARED_HTTP_PORT),
];

/// The `server` Service: each protocol declared the way real manifests do, or not.
fn server_ports() -> Vec<PortSpec> {
    vec![
        PortSpec::named("http", 8080),
        PortSpec::named("api", GRPC_PORT).app_protocol("grpc"),
        PortSpec::named("mysql", MYSQL_PORT),
        PortSpec::new(UNDECLARED_BANNER_PORT),
        PortSpec::named("redis", REDIS_PORT),
        PortSpec::named("web", UNDECLARED_HTTP_PORT),
    ]
}

/// `client` and `server-0` (service `server`), both meshed, in `families`; a
/// TrafficTarget lets the client and the server itself in.
fn mesh(id: u8, name: &str, families: IpFamilies) -> Harness {
    let mut h = Harness::new(id, name).expect("harness");
    h.use_ip_families(families).unwrap();
    h.add_pod_listening("client", &[("app", "client")], "client", 0, &[])
        .unwrap();
    h.add_pod_listening("server-0", &[("app", "server")], "server", 0, &LISTEN)
        .unwrap();
    h.add_service_with("server", &[("app", "server")], &server_ports())
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "server", &["client", "server"])
        .unwrap();
    h.start_control_plane().unwrap();
    h.start_sidecar("client").unwrap();
    h.start_sidecar("server-0").unwrap();
    h
}

/// Runs a client subcommand of the test app in `pod`; panics with its stderr on failure.
fn app(h: &Harness, pod: &str, args: &[&str]) -> Value {
    match h.app(pod, args).unwrap() {
        Ok(v) => v,
        Err(e) => panic!("{pod}: weft-e2e-app {}: {e}", args.join(" ")),
    }
}

fn http(h: &Harness, pod: &str, url: &str) -> Value {
    app(h, pod, &["http", url])
}

fn status(v: &Value) -> u64 {
    v["status"].as_u64().unwrap_or_default()
}

fn header<'v>(v: &'v Value, name: &str) -> &'v str {
    v["headers"][name].as_str().unwrap_or_default()
}

fn millis(v: &Value, field: &str) -> f64 {
    v[field].as_f64().unwrap_or(f64::MAX)
}

#[test]
fn http_calls_and_a_pod_calling_itself_work() {
    let h = mesh(30, "fidelity-self", IpFamilies::V4);
    let report = h.load("client", "http://server:8080/", 50, 4).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    assert_eq!(report.answered_by("server-0"), 50);

    // Through its own Service: the endpoint is itself. The sidecar's outbound leg must
    // reach its own inbound listener (mTLS and policy apply: the app sees its own SPIFFE ID).
    let own_service = h.load("server-0", "http://server:8080/", 50, 4).unwrap();
    assert!(
        own_service.failures().is_empty(),
        "calling its own Service: {:?}",
        own_service.failures()
    );
    let (body, peer) = h
        .get("server-0", "http://server:8080/")
        .unwrap()
        .expect("own service");
    assert_eq!(body, "server-0");
    assert!(
        peer.unwrap_or_default()
            .contains("spiffe://cluster.local/ns/default/sa/server"),
        "the call to its own Service went through mTLS"
    );
    // Straight to its own pod IP, and to loopback: untouched, as without the mesh.
    let own_ip = h.pod_ips("server-0")[0];
    for url in [
        format!("http://{}/", host_port(own_ip, 8080)),
        "http://127.0.0.1:8080/".to_string(),
    ] {
        let (body, _) = h
            .get("server-0", &url)
            .unwrap()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(body, "server-0", "{url}");
    }
    // And a TCP protocol to its own Service.
    let banner = app(&h, "server-0", &["banner", &format!("server:{MYSQL_PORT}")]);
    assert_eq!(banner["banner"], "BANNER server-0");
}

#[test]
fn long_streamed_and_large_requests_pass_whole() {
    let h = mesh(31, "fidelity-long", IpFamilies::V4);
    // Longer than Envoy's default 15 s route timeout.
    let slow = Instant::now();
    let v = app(
        &h,
        "client",
        &[
            "http",
            "http://server:8080/delay/16500",
            "--timeout-ms",
            "30000",
        ],
    );
    assert_eq!(status(&v), 200, "{v}");
    assert!(slow.elapsed() >= Duration::from_millis(16_500));

    // Chunks flow one by one: the first long before the last.
    let v = app(
        &h,
        "client",
        &[
            "stream",
            "http://server:8080/stream?chunks=5&interval_ms=400",
        ],
    );
    assert_eq!(v["chunks"], 5, "{v}");
    assert!(
        millis(&v, "first_chunk_ms") < 700.0 && millis(&v, "last_chunk_ms") >= 1_500.0,
        "chunks were buffered: {v}"
    );

    let up = app(
        &h,
        "client",
        &["upload", "http://server:8080/upload", "--bytes", "20000000"],
    );
    assert_eq!(up["ok"], true, "{up}");
    let down = app(
        &h,
        "client",
        &[
            "download",
            "http://server:8080/download?bytes=50000000",
            "--bytes",
            "50000000",
        ],
    );
    assert_eq!(down["ok"], true, "{down}");
}

#[test]
fn websocket_upgrades_pass_and_are_authorized() {
    let mut h = mesh(32, "fidelity-ws", IpFamilies::V4);
    let v = app(
        &h,
        "client",
        &["ws", "ws://server:8080/ws", "--messages", "5"],
    );
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["echoed"], 5, "{v}");

    // A caller no TrafficTarget names is refused at the upgrade request.
    h.add_pod("outsider", &[("app", "outsider")], "outsider")
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.start_sidecar("outsider").unwrap();
    let refused = h
        .app(
            "outsider",
            &["ws", "ws://server:8080/ws", "--messages", "1"],
        )
        .unwrap();
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "an unauthorized upgrade must get 403: {refused:?}"
    );
}

#[test]
fn grpc_and_http2_keep_their_semantics() {
    let h = mesh(33, "fidelity-grpc", IpFamilies::V4);
    let addr = format!("server:{GRPC_PORT}");
    for (call, replies) in [
        ("unary", 1),
        ("server-stream", 5),
        ("client-stream", 1),
        ("bidi", 5),
    ] {
        let v = app(
            &h,
            "client",
            &["grpc", &addr, "--call", call, "--count", "5"],
        );
        assert_eq!(v["name"], "server-0", "{call}: {v}");
        assert_eq!(
            v["messages"].as_array().map(Vec::len),
            Some(replies),
            "{call}: {v}"
        );
    }
    let v = app(
        &h,
        "client",
        &["grpc", &addr, "--call", "server-stream", "--count", "5"],
    );
    assert_eq!(v["messages"][4], "hello-4", "{v}");
    // Status codes, messages and trailers arrive intact.
    let v = app(&h, "client", &["grpc", &addr, "--call", "error"]);
    assert_eq!(v["code"], 5, "{v}");
    assert_eq!(v["message"], "failed as asked", "{v}");
    assert_eq!(v["detail"], "asked", "a custom trailer: {v}");

    // HTTP/1.1 app: HTTP/2 between the sidecars, HTTP/1.1 to the app.
    let v = http(&h, "client", "http://server:8080/");
    assert_eq!(header(&v, "x-weft-proto"), "HTTP/1.1", "{v}");
    let cluster = "cluster.outbound|8080||server|default";
    assert!(
        h.envoy_stat("client", &format!("{cluster}.upstream_cx_http2_total"))
            .unwrap()
            >= 1,
        "sidecars speak HTTP/2 to each other"
    );
    assert!(
        h.envoy_stat("server-0", "cluster.inbound|8080.upstream_cx_http1_total")
            .unwrap()
            >= 1,
        "the sidecar speaks HTTP/1.1 to an HTTP/1.1 app"
    );
    // An HTTP/1.0 client is served, not told to upgrade.
    let v = app(&h, "client", &["http", "http://server:8080/", "--http10"]);
    assert_eq!(status(&v), 200, "{v}");
    // The response carries what the app sent: no `server: envoy`, no x-envoy headers.
    let v = http(&h, "client", "http://server:8080/");
    assert_ne!(header(&v, "server"), "envoy", "{v}");
    assert!(
        v["headers"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with("x-envoy")),
        "{v}"
    );
}

#[test]
fn server_first_and_opaque_protocols_pass() {
    let h = mesh(34, "fidelity-tcp", IpFamilies::V4);
    // Declared (port name mysql): no wait for client bytes.
    let declared = app(&h, "client", &["banner", &format!("server:{MYSQL_PORT}")]);
    assert_eq!(declared["banner"], "BANNER server-0", "{declared}");
    assert_eq!(declared["echo_ok"], true, "{declared}");
    // Undeclared: the banner arrives once the detection timeout (1 s) has passed.
    let undeclared = app(
        &h,
        "client",
        &["banner", &format!("server:{UNDECLARED_BANNER_PORT}")],
    );
    assert_eq!(undeclared["banner"], "BANNER server-0", "{undeclared}");
    let first_byte_ms = undeclared["first_byte_micros"].as_f64().unwrap() / 1000.0;
    assert!(
        first_byte_ms < 2_500.0,
        "banner after {first_byte_ms} ms on an undeclared port"
    );
    let declared_ms = declared["first_byte_micros"].as_f64().unwrap() / 1000.0;
    assert!(
        declared_ms < 500.0,
        "banner after {declared_ms} ms on a declared port"
    );
    eprintln!("banner first byte: declared {declared_ms:.1} ms, undeclared {first_byte_ms:.1} ms");

    let redis = app(&h, "client", &["redis", &format!("server:{REDIS_PORT}")]);
    assert_eq!(redis["ok"], true, "{redis}");

    // HTTP on an undeclared port is detected and handled as HTTP (HTTP/1.1 and h2c).
    let url = format!("http://server:{UNDECLARED_HTTP_PORT}/detected");
    let v = http(&h, "client", &url);
    assert_eq!(status(&v), 200, "{v}");
    assert_eq!(header(&v, "x-weft-proto"), "HTTP/1.1", "{v}");
    let v = app(&h, "client", &["http", &url, "--http2-prior-knowledge"]);
    assert_eq!(status(&v), 200, "{v}");
    assert_eq!(
        header(&v, "x-weft-proto"),
        "HTTP/2.0",
        "h2c stays HTTP/2 to the app on an undeclared port: {v}"
    );
    let ip = h.service_ips("server")[0];
    let rq = format!("http.outbound_{ip}_{UNDECLARED_HTTP_PORT}.downstream_rq_total");
    assert!(
        h.envoy_stat("client", &rq).unwrap() >= 2,
        "the client sidecar handled the undeclared port as HTTP ({rq})"
    );
    let explained = h.explain("client", "GET", &url, &[]).unwrap();
    let text = explained["lines"].to_string();
    assert!(text.contains("detected: HTTP"), "{explained}");
}

const PUBLIC_ONLY: &str = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata:\n  name: public\n  namespace: default\nspec:\n  matches:\n  - name: public\n    pathRegex: /public/.*\n    methods: [\"*\"]\n---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata:\n  name: visitor-public\n  namespace: default\nspec:\n  destination:\n    kind: ServiceAccount\n    name: server\n    namespace: default\n  sources:\n  - kind: ServiceAccount\n    name: visitor\n    namespace: default\n  rules:\n  - kind: HTTPRouteGroup\n    name: public\n    matches: [public]\n";

#[test]
fn authorization_decides_on_the_path_the_app_sees() {
    let mut h = mesh(35, "fidelity-paths", IpFamilies::V4);
    h.add_pod("visitor", &[("app", "visitor")], "visitor")
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.write_manifest("public.yaml", PUBLIC_ONLY).unwrap();
    h.start_sidecar("visitor").unwrap();
    let base = "http://server:8080";
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&http(&h, "visitor", &format!("{base}/public/x"))) != 200 {
        assert!(Instant::now() < deadline, "the public grant never applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let check = |path: &str, want_status: u64, want_app_path: Option<&str>| {
        let url = format!("{base}{path}");
        let v = http(&h, "visitor", &url);
        assert_eq!(status(&v), want_status, "{path}: {v}");
        if let Some(app_path) = want_app_path {
            assert_eq!(header(&v, "x-weft-path"), app_path, "{path}: {v}");
        }
        let explained = h.explain("visitor", "GET", &url, &[]).unwrap();
        let verdict = explained["verdict"].as_str().unwrap_or_default();
        let expected = match want_status {
            200 => "allowed",
            307 => "redirected",
            _ => "denied",
        };
        assert_eq!(verdict, expected, "weft explain for {path}: {explained}");
        v
    };
    check("/public/x", 200, Some("/public/x"));
    check("/public//x", 200, Some("/public/x"));
    check("/public/./x", 200, Some("/public/x"));
    check("/public/../admin", 403, None);
    check("/public/%2e%2e/admin", 403, None);
    check("/public/%2E%2E/admin", 403, None);
    check("/admin", 403, None);
    // Escaped slashes: redirected to the unescaped, normalized path (the default).
    let v = check("/public/..%2Fadmin", 307, None);
    assert_eq!(header(&v, "location"), "/admin", "{v}");
    check("/public/a%2Fb", 307, None);

    // MeshConfig: reject them instead.
    h.write_manifest(
        "meshconfig.yaml",
        "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: weft\nspec:\n  escapedSlashes: Reject\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&http(&h, "visitor", &format!("{base}/public/..%2Fadmin"))) != 400 {
        assert!(
            Instant::now() < deadline,
            "escapedSlashes: Reject never applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check("/public/..%2Fadmin", 400, None);
    check("/public/x", 200, Some("/public/x"));
}

/// A pod pair over IPv6 only, then a dual-stack pair reached over either family.
#[test]
fn ipv6_only_and_dual_stack_pods_are_meshed() {
    for (id, name, families) in [
        (36, "fidelity-v6", IpFamilies::V6),
        (37, "fidelity-dual", IpFamilies::Dual),
    ] {
        let h = mesh(id, name, families);
        for ip in h.service_ips("server") {
            let url = format!("http://{}/", host_port(ip, 8080));
            let (body, peer) = h
                .get("client", &url)
                .unwrap()
                .unwrap_or_else(|e| panic!("{name} {url}: {e}"));
            assert_eq!(body, "server-0", "{name} {url}");
            assert!(
                peer.unwrap_or_default().contains("sa/client"),
                "{name} {url}: mTLS between the sidecars"
            );
            let banner = app(&h, "client", &["banner", &host_port(ip, MYSQL_PORT)]);
            assert_eq!(banner["banner"], "BANNER server-0", "{name}: {banner}");
        }
        // Straight to the server's pod IPs, each family: mTLS to its identity.
        for ip in h.pod_ips("server-0") {
            let url = format!("http://{}/", host_port(ip, 8080));
            let (body, peer) = h
                .get("client", &url)
                .unwrap()
                .unwrap_or_else(|e| panic!("{name} {url}: {e}"));
            assert_eq!(body, "server-0");
            assert!(
                peer.unwrap_or_default().contains("sa/client"),
                "{name} {url}"
            );
        }
        // Calling itself over IPv6 too.
        let report = h.load("server-0", "http://server:8080/", 20, 2).unwrap();
        assert!(
            report.failures().is_empty(),
            "{name}: {:?}",
            report.failures()
        );
    }
}

/// Under PERMISSIVE mTLS a caller without a sidecar arrives in plaintext: the
/// server's sidecar inspects its first bytes on an undeclared port too.
#[test]
fn plaintext_callers_are_detected_on_the_inbound_side() {
    let mut h = Harness::new(38, "fidelity-plaintext").expect("harness");
    h.add_pod_listening("plain", &[("app", "plain")], "plain", 0, &[])
        .unwrap();
    h.unlist_pod("plain");
    h.add_pod_listening("server-0", &[("app", "server")], "server", 0, &LISTEN)
        .unwrap();
    h.add_service_with("server", &[("app", "server")], &server_ports())
        .unwrap();
    h.write_cluster_manifest().unwrap();
    h.start_control_plane_with(&["--mtls", "permissive", "--access", "permissive"])
        .unwrap();
    h.start_sidecar("server-0").unwrap();
    let server = h.pod_ips("server-0")[0];

    let url = format!("http://{}/plain", host_port(server, UNDECLARED_HTTP_PORT));
    let v = http(&h, "plain", &url);
    assert_eq!(status(&v), 200, "{v}");
    assert_eq!(header(&v, "x-weft-path"), "/plain", "{v}");
    let inbound = format!("http.inbound_{UNDECLARED_HTTP_PORT}.downstream_rq_total");
    assert!(
        h.envoy_stat("server-0", &inbound).unwrap() >= 1,
        "the server sidecar handled plaintext HTTP on an undeclared port as HTTP"
    );
    let banner = app(
        &h,
        "plain",
        &["banner", &host_port(server, UNDECLARED_BANNER_PORT)],
    );
    assert_eq!(banner["banner"], "BANNER server-0", "{banner}");
    let ms = banner["first_byte_micros"].as_f64().unwrap() / 1000.0;
    assert!(ms < 2_500.0, "banner after {ms} ms");
    let declared = app(&h, "plain", &["banner", &host_port(server, MYSQL_PORT)]);
    assert_eq!(declared["echo_ok"], true, "{declared}");
    let redis = app(&h, "plain", &["redis", &host_port(server, REDIS_PORT)]);
    assert_eq!(redis["ok"], true, "{redis}");
}
