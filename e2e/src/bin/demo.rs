//! `make demo`: Weft's control plane in local mode driving real Envoy sidecars in
//! network-namespace pods. A client calls http://backend:8080 under an 80/20
//! TrafficSplit; then the split file is edited to 0/100 under continuous traffic.

use std::process::ExitCode;
use std::time::Duration;

use weft_e2e::{Harness, HarnessError, LoadReport, now_ms};

const URL: &str = "http://backend:8080/";
const DEMO_ID: u8 = 100;

fn split(v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata:\n  name: backend-rollout\n  namespace: default\nspec:\n  service: backend\n  backends:\n  - service: backend-v1\n    weight: {v1}\n  - service: backend-v2\n    weight: {v2}\n"
    )
}

fn row(label: &str, report: &LoadReport) {
    let total = report.results.len().max(1) as f64;
    let pct = |n: usize| 100.0 * n as f64 / total;
    let (v1, v2) = (
        report.answered_by("backend-v1"),
        report.answered_by("backend-v2"),
    );
    let failed = report.failures().len();
    println!(
        "| {label:<34} | {:>8} | {v1:>6} ({:>5.1}%) | {v2:>6} ({:>5.1}%) | {failed:>6} |",
        report.results.len(),
        pct(v1),
        pct(v2)
    );
}

fn run() -> Result<bool, HarnessError> {
    println!(
        "Starting 3 pods (client, backend-v1-0, backend-v2-0) as network namespaces with Envoy sidecars..."
    );
    let mut h = Harness::new(DEMO_ID, "demo")?;
    h.add_pod("client", &[("app", "client")], "client")?;
    h.add_pod(
        "backend-v1-0",
        &[("app", "backend"), ("version", "v1")],
        "backend",
    )?;
    h.add_pod(
        "backend-v2-0",
        &[("app", "backend"), ("version", "v2")],
        "backend",
    )?;
    h.add_service("backend", &[("app", "backend")])?;
    h.add_service("backend-v1", &[("app", "backend"), ("version", "v1")])?;
    h.add_service("backend-v2", &[("app", "backend"), ("version", "v2")])?;
    h.write_cluster_manifest()?;
    h.write_manifest("split.yaml", &split(80, 20))?;
    // Access is deny-by-default (SMI): the client may call the backend's service account.
    h.allow("access.yaml", "backend", &["client"])?;
    h.start_control_plane()?;
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod)?;
    }
    println!(
        "Control plane: weft up {} (admin {})",
        h.manifests().display(),
        h.admin_addr()
    );
    println!();
    println!("split.yaml:\n{}", split(80, 20));
    println!(
        "access.yaml (without it every call is denied):\n{}",
        std::fs::read_to_string(h.manifests().join("access.yaml")).unwrap_or_default()
    );

    println!("$ weft explain --from default/client {URL}");
    let explained = h.explain("client", "GET", URL, &[])?;
    for line in explained["lines"].as_array().into_iter().flatten() {
        println!("{}", line.as_str().unwrap_or_default());
    }
    println!("verdict: {}", explained["verdict"].as_str().unwrap_or("?"));
    println!();

    let before = h.load("client", URL, 1000, 8)?;
    let routes = h.acked_version("client", "RDS")?;
    println!(
        "Editing split.yaml to backend-v1: 0, backend-v2: 100 while the client keeps calling..."
    );
    let running = h.start_load("client", URL, Duration::from_secs(6), 4)?;
    std::thread::sleep(Duration::from_secs(2));
    h.write_manifest("split.yaml", &split(0, 100))?;
    h.wait_for_new_ack("client", "RDS", routes.as_deref())?;
    let applied = now_ms();
    let during = running.finish()?;
    let after_change = during.started_after(applied);
    let after = h.load("client", URL, 1000, 8)?;

    println!();
    println!(
        "| {:<34} | {:>8} | {:>15} | {:>15} | {:>6} |",
        "phase", "requests", "backend-v1", "backend-v2", "failed"
    );
    println!(
        "|{:-<36}|{:-<10}|{:-<17}|{:-<17}|{:-<8}|",
        "", "", "", "", ""
    );
    row("split 80/20", &before);
    row("during the edit (whole run)", &during);
    row("  started after the new routes", &after_change);
    row("split 0/100", &after);
    println!();

    let failed = before.failures().len() + during.failures().len() + after.failures().len();
    let moved = after_change.answered_by("backend-v2") == after_change.results.len();
    println!(
        "{}: {failed} failed requests; after the change {} of {} requests reached backend-v2.",
        if failed == 0 && moved {
            "OK"
        } else {
            "PROBLEM"
        },
        after_change.answered_by("backend-v2"),
        after_change.results.len()
    );
    Ok(failed == 0 && moved)
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-demo: {e}");
            ExitCode::FAILURE
        }
    }
}
