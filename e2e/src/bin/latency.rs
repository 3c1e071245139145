//! Added latency of an mTLS sidecar pair: the same request at a fixed rate between two
//! pods without sidecars (direct) and two meshed pods (client Envoy → mTLS → server
//! Envoy), 1 KB responses, measured in the same run. Needs root.

use std::process::ExitCode;

use weft_e2e::{Harness, HarnessError, LoadReport};

const REQUESTS: usize = 2_000;
const INTERVAL_MS: u64 = 5; // 200 requests per second
const BODY: usize = 1024;

fn row(label: &str, r: &LoadReport) {
    println!(
        "| {label:<28} | {:>8} | {:>7} µs | {:>7} µs | {:>6} |",
        r.results.len(),
        r.latency_micros(0.5),
        r.latency_micros(0.99),
        r.failures().len()
    );
}

fn run() -> Result<(), HarnessError> {
    let mut h = Harness::new(101, "latency")?;
    h.add_pod("client", &[("app", "client")], "client")?;
    h.add_pod_with_body("server-0", &[("app", "server")], "server", BODY)?;
    h.add_pod("plain-client", &[("app", "plain-client")], "default")?;
    let plain_server =
        h.add_pod_with_body("plain-server", &[("app", "plain-server")], "default", BODY)?;
    h.unlist_pod("plain-client");
    h.unlist_pod("plain-server");
    h.add_service("server", &[("app", "server")])?;
    h.write_cluster_manifest()?;
    h.start_control_plane()?;
    h.start_sidecar("client")?;
    h.start_sidecar("server-0")?;

    let direct_url = format!("http://{plain_server}:8080/");
    let mesh_url = "http://server:8080/";
    h.load_paced("plain-client", &direct_url, 200, 1)?;
    h.load_paced("client", mesh_url, 200, 1)?;
    let direct = h.load_paced("plain-client", &direct_url, REQUESTS, INTERVAL_MS)?;
    let mesh = h.load_paced("client", mesh_url, REQUESTS, INTERVAL_MS)?;

    println!("HTTP/1.1 GET, {BODY} B responses, one request every {INTERVAL_MS} ms, keep-alive");
    println!(
        "| {:<28} | {:>8} | {:>10} | {:>10} | {:>6} |",
        "path", "requests", "p50", "p99", "failed"
    );
    println!(
        "|{:-<30}|{:-<10}|{:-<12}|{:-<12}|{:-<8}|",
        "", "", "", "", ""
    );
    row("direct (no sidecars)", &direct);
    row("mTLS sidecar pair", &mesh);
    println!(
        "added by the sidecar pair: p50 +{} µs, p99 +{} µs",
        mesh.latency_micros(0.5)
            .saturating_sub(direct.latency_micros(0.5)),
        mesh.latency_micros(0.99)
            .saturating_sub(direct.latency_micros(0.99))
    );
    Ok(())
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
