//! Latency an mTLS sidecar pair adds, each row against the same exchange between two
//! pods without sidecars (direct), measured in the same run. Needs root.
//!
//! - HTTP/1.1 GET, 1 KB responses, at a fixed rate over keep-alive, also through two
//!   Envoys with a minimal hand-written static mTLS config (the floor Weft's generated
//!   config is measured against);
//! - gRPC unary calls (HTTP/2 end to end), one at a time on one channel;
//! - the first byte of a server-first protocol (a MySQL-style banner) on a declared
//!   port (`mysql`) and on an undeclared one, where the sidecar waits for the
//!   protocol detection timeout (1 s) before it treats the connection as TCP.
//!
//! - the HTTP exchange again with telemetry off (no access logs, no tracing) and fully
//!   on (JSON access logs and tracing of every request to an OTLP collector), switched
//!   by MeshConfig on the same two sidecars.
//!
//! Any failed request or exchange makes the run fail instead of printing numbers.

mod static_pair;

use std::process::ExitCode;

use weft_e2e::{Harness, HarnessError, LoadReport, PortSpec};

const REQUESTS: usize = 2_000;
const INTERVAL_MS: u64 = 5; // 200 requests per second
const BODY: usize = 1024;
const GRPC_CALLS: usize = 2_000;
const BANNERS: usize = 20;
const GRPC_PORT: u16 = 50051;
const DECLARED_BANNER_PORT: u16 = 3306;
const UNDECLARED_BANNER_PORT: u16 = 7000;
const LISTEN: [(&str, u16); 3] = [
    ("grpc", GRPC_PORT),
    ("banner", DECLARED_BANNER_PORT),
    ("banner", UNDECLARED_BANNER_PORT),
];

fn failed(what: &str, reason: impl Into<String>) -> HarnessError {
    HarnessError::Command {
        command: what.to_string(),
        reason: reason.into(),
    }
}

/// A report with no failures, or the run's error.
fn all_ok(what: &str, report: LoadReport) -> Result<LoadReport, HarnessError> {
    let failures = report.failures();
    if let Some(first) = failures.first() {
        return Err(failed(
            what,
            format!(
                "{} of {} requests failed, first: {:?}",
                failures.len(),
                report.results.len(),
                first.error
            ),
        ));
    }
    Ok(report)
}

fn grpc_load(h: &Harness, pod: &str, addr: &str, count: usize) -> Result<LoadReport, HarnessError> {
    let count = count.to_string();
    let v = h
        .app(
            pod,
            &[
                "grpc-load",
                addr,
                "--count",
                &count,
                "--concurrency",
                "1",
                "--timeout-ms",
                "120000",
            ],
        )?
        .map_err(|e| failed("grpc-load", e))?;
    let report = serde_json::from_value(v).map_err(|e| HarnessError::Decode {
        what: "grpc-load report".into(),
        reason: e.to_string(),
    })?;
    all_ok(&format!("gRPC from {pod} to {addr}"), report)
}

/// Times to the first banner byte of `BANNERS` connections, as a report (µs each).
fn banners(h: &Harness, pod: &str, addr: &str) -> Result<LoadReport, HarnessError> {
    let mut results = Vec::new();
    for _ in 0..BANNERS {
        let v = h
            .app(pod, &["banner", addr])?
            .map_err(|e| failed(&format!("banner from {pod} to {addr}"), e))?;
        let micros = v["first_byte_micros"]
            .as_u64()
            .ok_or_else(|| failed("banner", format!("no first_byte_micros in {v}")))?;
        results.push((weft_e2e::now_ms(), micros, Ok(pod.to_string())));
    }
    Ok(LoadReport::from_timed_results(results))
}

fn header() {
    println!(
        "| {:<44} | {:>8} | {:>10} | {:>10} |",
        "exchange", "count", "p50", "p99"
    );
    println!("|{:-<46}|{:-<10}|{:-<12}|{:-<12}|", "", "", "", "");
}

fn row(label: &str, r: &LoadReport) {
    println!(
        "| {label:<44} | {:>8} | {:>7} µs | {:>7} µs |",
        r.results.len(),
        r.latency_micros(0.5),
        r.latency_micros(0.99),
    );
}

/// What the mesh adds; `ratio` also prints it as a multiple of direct (meaningless
/// for a banner, whose direct first byte takes a few microseconds).
fn added(label: &str, direct: &LoadReport, mesh: &LoadReport, ratio: bool) {
    let times = |p: f64| {
        let (d, m) = (direct.latency_micros(p), mesh.latency_micros(p));
        let multiple = m as f64 / d.max(1) as f64;
        if ratio {
            format!("+{} µs ({multiple:.1}x direct)", m.saturating_sub(d))
        } else {
            format!("+{} µs", m.saturating_sub(d))
        }
    };
    println!("{label}: p50 {}, p99 {}", times(0.5), times(0.99));
}

/// How much slower `measured` is than `baseline`, in percent at p50 and p99.
fn relative(label: &str, measured: &LoadReport, baseline: &LoadReport) {
    let over = |p: f64| {
        let (m, b) = (
            measured.latency_micros(p) as f64,
            baseline.latency_micros(p).max(1) as f64,
        );
        (m / b - 1.0) * 100.0
    };
    println!("{label}: p50 {:+.1}%, p99 {:+.1}%", over(0.5), over(0.99));
}

fn run() -> Result<(), HarnessError> {
    let mut h = Harness::new(101, "latency")?;
    h.add_pod("client", &[("app", "client")], "client")?;
    h.add_pod_listening("server-0", &[("app", "server")], "server", BODY, &LISTEN)?;
    h.add_pod("plain-client", &[("app", "plain-client")], "default")?;
    h.add_pod("static-client", &[("app", "static-client")], "default")?;
    let static_server = h.add_pod_with_body(
        "static-server",
        &[("app", "static-server")],
        "default",
        BODY,
    )?;
    h.unlist_pod("static-client");
    h.unlist_pod("static-server");
    let plain_server = h.add_pod_listening(
        "plain-server",
        &[("app", "plain-server")],
        "default",
        BODY,
        &LISTEN,
    )?[0];
    h.unlist_pod("plain-client");
    h.unlist_pod("plain-server");
    h.add_service_with(
        "server",
        &[("app", "server")],
        &[
            PortSpec::named("http", 8080),
            PortSpec::named("api", GRPC_PORT).app_protocol("grpc"),
            PortSpec::named("mysql", DECLARED_BANNER_PORT),
            PortSpec::new(UNDECLARED_BANNER_PORT),
        ],
    )?;
    h.write_cluster_manifest()?;
    h.allow("access.yaml", "server", &["client"])?;
    h.start_control_plane()?;
    h.start_sidecar("client")?;
    h.start_sidecar("server-0")?;
    // The floor: the same two Envoys, hand-configured, same redirect, same protocols.
    let dir = h.work_dir().to_path_buf();
    static_pair::write_certificates(&dir, &["client", "server"])?;
    let boot = |name: &str, text: String| -> Result<std::path::PathBuf, HarnessError> {
        let path = dir.join(format!("{name}-static.yaml"));
        std::fs::write(&path, text).map_err(|source| HarnessError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    let client_boot = boot(
        "client",
        static_pair::client_bootstrap(&dir, &static_server.to_string()),
    )?;
    let server_boot = boot("server", static_pair::server_bootstrap(&dir))?;
    h.spawn_envoy("static-client", &client_boot)?;
    h.spawn_envoy("static-server", &server_boot)?;
    h.wait_sidecar_live("static-client")?;
    h.wait_sidecar_live("static-server")?;

    let direct_url = format!("http://{plain_server}:8080/");
    let mesh_url = "http://server:8080/";
    // Warm up: connections, certificates, pools.
    all_ok(
        "warm-up",
        h.load_paced("plain-client", &direct_url, 200, 1)?,
    )?;
    all_ok("warm-up", h.load_paced("client", mesh_url, 200, 1)?)?;
    let direct = all_ok(
        "HTTP direct",
        h.load_paced("plain-client", &direct_url, REQUESTS, INTERVAL_MS)?,
    )?;
    let mesh = all_ok(
        "HTTP mesh",
        h.load_paced("client", mesh_url, REQUESTS, INTERVAL_MS)?,
    )?;
    let static_url = format!("http://{static_server}:8080/");
    all_ok(
        "warm-up",
        h.load_paced("static-client", &static_url, 200, 1)?,
    )?;
    let minimal = all_ok(
        "HTTP static",
        h.load_paced("static-client", &static_url, REQUESTS, INTERVAL_MS)?,
    )?;

    let (telemetry_off, telemetry_on) = telemetry_pair(&mut h, mesh_url)?;

    let direct_grpc_addr = format!("{plain_server}:{GRPC_PORT}");
    let mesh_grpc_addr = format!("server:{GRPC_PORT}");
    grpc_load(&h, "plain-client", &direct_grpc_addr, 200)?;
    grpc_load(&h, "client", &mesh_grpc_addr, 200)?;
    let direct_grpc = grpc_load(&h, "plain-client", &direct_grpc_addr, GRPC_CALLS)?;
    let mesh_grpc = grpc_load(&h, "client", &mesh_grpc_addr, GRPC_CALLS)?;

    let direct_banner = banners(
        &h,
        "plain-client",
        &format!("{plain_server}:{DECLARED_BANNER_PORT}"),
    )?;
    let declared_banner = banners(&h, "client", &format!("server:{DECLARED_BANNER_PORT}"))?;
    let undeclared_banner = banners(&h, "client", &format!("server:{UNDECLARED_BANNER_PORT}"))?;

    println!(
        "Two meshed pods (client and server sidecars, mTLS) against two pods without sidecars, same run"
    );
    header();
    row("HTTP/1.1 GET 1 KB, direct", &direct);
    row("HTTP/1.1 GET 1 KB, minimal static Envoy pair", &minimal);
    row("HTTP/1.1 GET 1 KB, mTLS sidecar pair", &mesh);
    row("HTTP/1.1, sidecar pair, telemetry off", &telemetry_off);
    row("HTTP/1.1, sidecar pair, logs + tracing 100%", &telemetry_on);
    row("gRPC unary, direct", &direct_grpc);
    row("gRPC unary, mTLS sidecar pair", &mesh_grpc);
    row("server-first banner, first byte, direct", &direct_banner);
    row("banner, declared port (mysql), mesh", &declared_banner);
    row("banner, undeclared port, mesh", &undeclared_banner);
    added("HTTP/1.1 added by the sidecar pair", &direct, &mesh, true);
    added(
        "HTTP/1.1 added by a minimal static pair",
        &direct,
        &minimal,
        true,
    );
    relative(
        "Weft's generated config over the minimal static one",
        &mesh,
        &minimal,
    );
    relative(
        "Telemetry (access logs + tracing every request) over none",
        &telemetry_on,
        &telemetry_off,
    );
    added(
        "gRPC unary added by the sidecar pair",
        &direct_grpc,
        &mesh_grpc,
        true,
    );
    added(
        "banner on a declared port (connect + mTLS handshake through two sidecars)",
        &direct_banner,
        &declared_banner,
        false,
    );
    added(
        "banner on an undeclared port (detection timeout 1 s)",
        &direct_banner,
        &undeclared_banner,
        false,
    );
    Ok(())
}

/// The OTLP receiver spans go to during the telemetry rows; killed on drop.
struct Collector(std::process::Child);

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Switches the mesh's telemetry by MeshConfig and waits until both sidecars ACKed it.
fn set_telemetry(h: &Harness, telemetry: &str) -> Result<(), HarnessError> {
    let pods = ["client", "server-0"];
    let before: Vec<Option<String>> = pods
        .iter()
        .map(|p| h.acked_version(p, "LDS"))
        .collect::<Result<_, _>>()?;
    h.write_manifest(
        "meshconfig.yaml",
        &format!(
            "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: weft}}\nspec:\n  telemetry:\n{telemetry}"
        ),
    )?;
    for (pod, old) in pods.iter().zip(&before) {
        h.wait_for_new_ack(pod, "LDS", old.as_deref())?;
    }
    Ok(())
}

/// The HTTP exchange with telemetry off, then fully on: (off, on).
fn telemetry_pair(h: &mut Harness, url: &str) -> Result<(LoadReport, LoadReport), HarnessError> {
    let listen = std::net::SocketAddr::new(h.host_address().into(), 14317);
    let spans = h.work_dir().join("spans.jsonl");
    let app = weft_e2e::workspace_binary("weft-e2e-app")?;
    let child = std::process::Command::new(&app)
        .args(["otlp", "--listen", &listen.to_string(), "--out"])
        .arg(&spans)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| failed("the OTLP collector", e.to_string()))?;
    let _collector = Collector(child);
    set_telemetry(h, "    accessLog: {enabled: false}\n")?;
    all_ok("warm-up", h.load_paced("client", url, 200, 1)?)?;
    let off = all_ok(
        "HTTP, telemetry off",
        h.load_paced("client", url, REQUESTS, INTERVAL_MS)?,
    )?;
    set_telemetry(
        h,
        &format!(
            "    accessLog: {{format: JSON}}\n    tracing: {{collector: '{listen}', sampling: {{numerator: 100}}}}\n"
        ),
    )?;
    all_ok("warm-up", h.load_paced("client", url, 200, 1)?)?;
    let on = all_ok(
        "HTTP, telemetry on",
        h.load_paced("client", url, REQUESTS, INTERVAL_MS)?,
    )?;
    // The spans did reach the collector (Envoy flushes them every 5 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::fs::metadata(&spans).map_or(0, |m| m.len()) == 0 {
        if std::time::Instant::now() > deadline {
            return Err(failed("tracing", "no span reached the collector"));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok((off, on))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-latency: {e}");
            ExitCode::FAILURE
        }
    }
}
