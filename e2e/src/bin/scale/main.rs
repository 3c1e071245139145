//! `weft-scale`: the control plane at mesh scale, measured from outside the process.
//!
//! ```text
//! weft-scale gen --services N --pods P --dir DIR [--scope] [--unscoped K]
//! weft-scale run [--size SERVICES:PODS:PROXIES[:scoped]]... [--weft PATH] [--baseline PATH]
//!                [--repeats 5] [--change-timeout 30] [--ready-timeout 600] [--sync-timeout 600]
//!                [--memory-cap-gb 12] [--unscoped-sample 50]
//!                [--envoys 100] [--envoy-size 1000:2000] [--envoys-only]
//!                [--no-proxies] [--no-changes] [--no-restart] [--no-unscoped] [--work DIR]
//! weft-scale kube [--services 1000] [--pods 5000] [--smi 500] [--proxies 100] [--repeats 20]
//!                 [--weft PATH] [--scoped] [--no-local] [--no-changes] [--rss-goal-mib 64]
//!                 [--change-timeout 30] [--ready-timeout 600] [--sync-timeout 600]
//!                 [--memory-cap-gb 12] [--work DIR]
//! ```
//!
//! `kube` measures Kubernetes mode instead (see `kube.rs`): `weft controller` fed by the
//! in-process API-server double holding the mesh as API objects (with EndpointSlices,
//! Namespaces, ServiceAccounts, realistic pods), time to `/readyz`, RSS idle and with
//! the proxies in sync, and TrafficTarget, EndpointSlice and TrafficSplit changes
//! written to the double; then `weft up` on the same objects as files, for the ratios.
//! The rest of this comment is about `run`.
//!
//! Default sizes: 1,000 services / 2,000 pods with 1,000 simulated proxies (unscoped) and
//! 10,000 / 20,000 with 10,000 (every pod annotated `weft.dev/egress: "./*"`). Per binary
//! (`--weft`, then `--baseline`) and size, on a fresh state dir and fresh ports:
//!
//! 1. `weft up` starts; time until `/status` and `/ready` answer; RSS once its CPU is quiet.
//! 2. The first PROXIES pods (spread over namespaces) connect as simulated delta-ADS
//!    proxies from their pod IPs (127.64.0.0/10); time until each has every type answered;
//!    RSS and VmHWM, bytes and resources per proxy, CPU time of the control plane.
//! 3. Three changes, each `--repeats` times, written as an editor does (dot-file + rename):
//!    one more pod for a service (watch its EDS `outbound|8080||svc-k.ns-X...`), one more
//!    source in a TrafficTarget (watch RDS `inbound|8080` of the destination's pods), a new
//!    Service (watch its CDS cluster). Affected proxies come from the egress scope (the
//!    whole mesh when unscoped); the time is rename → ACK sent, per proxy and for the last
//!    one; CPU is the control plane's utime+stime from before the rename until it is quiet.
//! 4. SIGTERM, start again on the same state dir and ports; time until every proxy is back
//!    in sync on a new stream (they reconnect with 100 ms-1 s jittered backoff).
//! 5. Scoped sizes: a sample of pods generated without the annotation (the last ones in
//!    connect order, never part of the main load) connect; bytes, resources and CPU per
//!    unscoped proxy, and a linear extrapolation to all proxies, labelled as such.
//! 6. Separately, real Envoys (bootstraps from `weft bootstrap`, xDS bound to the pod IP),
//!    observed through `/proxy-status`: time to sync, RSS, and the same three changes.
//!    Per sidecar also RssAnon/RssFile (`/proc/PID/status`), PSS (`smaps_rollup`) and
//!    Envoy's heap (admin `/memory`), beside the same for one Envoy with an admin-only
//!    bootstrap (the floor): the binary's file pages are shared, the anonymous ones not.
//!
//! The control plane runs under a watchdog that kills it above `--memory-cap-gb` or when
//! the machine is about to run out of memory; Envoys are stopped likewise. Control plane
//! and Envoys are killed when the bench exits, fails, panics or gets SIGINT/SIGTERM.
//!
//! Exit status: non-zero when any measurement of the binary under test failed (a proxy
//! never in sync, a change never seen, the control plane dying). The baseline's failures
//! (say, it exceeds the memory cap at 10,000 services) are printed in its rows instead of
//! numbers and do not change the exit status: it is expected not to scale.

mod bench;
mod client;
mod control_plane;
mod envoys;
mod kube;
mod mesh;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use bench::{Binary, Settings, Size, Steps};
use report::RunReport;

#[derive(Debug, Parser)]
#[command(
    name = "weft-scale",
    about = "Control plane scale benchmark (time and memory, measured from outside)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a generated mesh into a directory (what `run` feeds `weft up`).
    Gen {
        #[arg(long)]
        services: usize,
        #[arg(long)]
        pods: usize,
        #[arg(long)]
        dir: PathBuf,
        /// Give every pod the egress annotation `weft.dev/egress: "./*"`.
        #[arg(long)]
        scope: bool,
        /// With --scope: leave this many pods (last in connect order) unscoped.
        #[arg(long, default_value_t = 0)]
        unscoped: usize,
    },
    /// Run the benchmark.
    Run(RunArgs),
    /// Kubernetes mode: `weft controller` on the API-server double, beside `weft up`.
    Kube(kube::KubeArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Mesh sizes, SERVICES:PODS:PROXIES[:scoped]; repeatable.
    /// Default: 1000:2000:1000 and 10000:20000:10000:scoped.
    #[arg(long = "size", value_parser = parse_size)]
    sizes: Vec<Size>,
    /// The weft binary under test.
    #[arg(long, default_value = "target/release/weft")]
    weft: PathBuf,
    /// An older weft binary run through the same steps, printed beside.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Applications of each change (for p50/p99).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[command(flatten)]
    limits: bench::LimitArgs,
    /// Unscoped proxies sampled on scoped meshes.
    #[arg(long, default_value_t = 50)]
    unscoped_sample: usize,
    /// Real Envoys (0: none).
    #[arg(long, default_value_t = 100)]
    envoys: usize,
    /// Give the real Envoys' pods `weft.dev/outbound-clusters: on-demand` (memory and
    /// sync only: they make no calls, so they hold no service cluster).
    #[arg(long)]
    envoy_on_demand: bool,
    /// Mesh of the real-Envoy run, SERVICES:PODS.
    #[arg(long, default_value = "1000:2000", value_parser = parse_size)]
    envoy_size: Size,
    /// Skip the simulated proxies (each size then measures only the ready time).
    #[arg(long)]
    no_proxies: bool,
    /// Run only the real-Envoy part (no simulated-proxy sizes).
    #[arg(long)]
    envoys_only: bool,
    #[arg(long)]
    no_changes: bool,
    #[arg(long)]
    no_restart: bool,
    #[arg(long)]
    no_unscoped: bool,
    /// Where meshes, state dirs and logs go (default: a fresh directory under /tmp).
    #[arg(long)]
    work: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<Size, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let num = |i: usize| -> Result<usize, String> {
        parts
            .get(i)
            .ok_or_else(|| format!("{s}: expected SERVICES:PODS[:PROXIES[:scoped]]"))?
            .parse()
            .map_err(|e| format!("{s}: {e}"))
    };
    let services = num(0)?;
    let pods = num(1)?;
    let proxies = if parts.len() > 2 { num(2)? } else { 0 };
    let scope = match parts.get(3) {
        None => false,
        Some(&"scoped") => true,
        Some(other) => return Err(format!("{s}: unknown flag {other} (scoped?)")),
    };
    if services == 0 || pods == 0 {
        return Err(format!("{s}: services and pods must be positive"));
    }
    Ok(Size {
        services,
        pods,
        proxies,
        scope,
    })
}

/// Raises this process's open-file soft limit to the hard limit (10,000 connections);
/// returns the limits it started with (what a shell would give `weft up`).
fn raise_nofile() -> (u64, u64) {
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, hard)) => {
            if let Err(e) = rlimit::Resource::NOFILE.set(hard, hard) {
                eprintln!("warning: cannot raise RLIMIT_NOFILE to {hard}: {e}");
            }
            (soft, hard)
        }
        Err(e) => {
            eprintln!("warning: cannot read RLIMIT_NOFILE: {e}");
            (1024, 1024)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Gen {
            services,
            pods,
            dir,
            scope,
            unscoped,
        } => {
            let mesh = mesh::Mesh::new(services, pods, scope, unscoped);
            match mesh.write(&dir) {
                Ok(files) => {
                    println!("wrote {} files to {}", files.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let shell_nofile = raise_nofile();
            block_on(run(args, shell_nofile))
        }
        Command::Kube(args) => {
            let shell_nofile = raise_nofile();
            block_on(kube::run(args, shell_nofile))
        }
    }
}

/// Runs `bench` on a two-worker runtime (the machine has two cores, shared with the
/// control plane) until it ends or SIGINT/SIGTERM arrives.
fn block_on(bench: impl Future<Output = ExitCode>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        tokio::select! {
            code = bench => code,
            // Dropping the bench drops every guard: control planes and Envoys are killed.
            signal = interrupted() => {
                eprintln!("interrupted by {signal}; stopping the control plane and Envoys");
                ExitCode::from(130)
            }
        }
    })
}

/// Resolves on SIGINT or SIGTERM (a signal whose handler cannot be installed never fires).
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let wait_for = |kind: SignalKind| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = wait_for(SignalKind::interrupt()) => "SIGINT",
        () = wait_for(SignalKind::terminate()) => "SIGTERM",
    }
}

async fn run(args: RunArgs, shell_nofile: (u64, u64)) -> ExitCode {
    let begun = Instant::now();
    let sizes = if args.sizes.is_empty() {
        vec![
            Size {
                services: 1_000,
                pods: 2_000,
                proxies: 1_000,
                scope: false,
            },
            Size {
                services: 10_000,
                pods: 20_000,
                proxies: 10_000,
                scope: true,
            },
        ]
    } else {
        args.sizes.clone()
    };
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("weft-scale-{}", std::process::id())));
    let settings = Settings {
        work: work.clone(),
        repeats: args.repeats.max(1),
        limits: args.limits.limits(),
        unscoped_sample: args.unscoped_sample,
        steps: Steps {
            connect: !args.no_proxies,
            changes: !args.no_changes,
            restart: !args.no_restart,
            unscoped: !args.no_unscoped,
        },
        shell_nofile,
    };
    let mut binaries = Vec::new();
    for (label, path) in [
        ("under test", Some(&args.weft)),
        ("baseline", args.baseline.as_ref()),
    ] {
        let Some(path) = path else { continue };
        let path = match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {label} binary {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        binaries.push(Binary {
            label: label.to_string(),
            path,
            fd_limit: None,
        });
    }
    println!("# weft-scale");
    println!();
    for b in &binaries {
        println!("- {}: {}", b.label, b.path.display());
    }
    println!(
        "- repeats {}, change timeout {:?}, memory cap {:.1} GiB, work dir {}",
        settings.repeats,
        settings.limits.change_timeout,
        settings.limits.memory_cap_bytes as f64 / (1u64 << 30) as f64,
        work.display()
    );
    println!(
        "- this process: RLIMIT_NOFILE raised from {} to {}",
        shell_nofile.0, shell_nofile.1
    );
    println!();
    let mut fatal = Vec::new();
    let mut tolerated = Vec::new();
    let mut record = |label: &str, what: &str, report: &RunReport| {
        for f in report.failures() {
            let line = format!("{label} @ {what}: {f}");
            if label == "under test" {
                fatal.push(line);
            } else {
                tolerated.push(line);
            }
        }
    };

    if !args.envoys_only {
        for size in &sizes {
            println!("## {size}");
            println!();
            let mut reports = Vec::new();
            for b in binaries.iter_mut() {
                let t = Instant::now();
                let report = bench::run_size(b, size, &settings).await;
                println!(
                    "[{} @ {}/{}] done in {}",
                    b.label,
                    size.services,
                    size.pods,
                    report::secs(t.elapsed())
                );
                record(&b.label, &size.to_string(), &report);
                reports.push(report);
            }
            print_size_tables(size, &reports);
        }
    }

    if args.envoys > 0 {
        let size = args.envoy_size;
        println!(
            "## {} real Envoys, {} services / {} pods",
            args.envoys, size.services, size.pods
        );
        println!();
        let mut reports = Vec::new();
        for b in binaries.iter_mut() {
            let t = Instant::now();
            let report =
                envoys::run_envoys(b, &size, args.envoys, args.envoy_on_demand, &settings).await;
            println!("[{} envoys] done in {}", b.label, report::secs(t.elapsed()));
            record(&b.label, &format!("{} Envoys", args.envoys), &report);
            reports.push(report);
        }
        println!();
        println!("{}", report::envoy_table(&reports));
        println!();
        println!("Envoy memory per sidecar: {}", report::MEMORY_NOTE);
        println!();
        println!("{}", report::envoy_memory_table(&reports));
        println!();
        let changes: Vec<(String, Vec<report::ChangeRow>)> = reports
            .iter()
            .map(|r| {
                let rows = match &r.envoys {
                    Some(Ok(e)) => e.changes.clone(),
                    _ => Vec::new(),
                };
                (r.label.clone(), rows)
            })
            .collect();
        println!("Changes observed on the real Envoys:");
        println!();
        println!("{}", report::changes_table(&changes));
        println!();
    }

    println!("total time: {}", report::secs(begun.elapsed()));
    if let Some(hwm) = control_plane::proc_status_kib(std::process::id(), "VmHWM") {
        println!("weft-scale's own peak RSS: {} MiB", hwm / 1024);
    }
    if !tolerated.is_empty() {
        println!();
        println!("baseline could not complete (not counted as a failure):");
        for t in &tolerated {
            println!("- {t}");
        }
    }
    if fatal.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!();
        println!("FAILED measurements of the binary under test:");
        for f in &fatal {
            println!("- {f}");
        }
        ExitCode::FAILURE
    }
}

fn print_size_tables(size: &Size, reports: &[RunReport]) {
    println!();
    println!("### {size}: startup and initial sync");
    println!();
    println!("{}", report::startup_table(reports));
    println!();
    println!(
        "### {size}: changes (time from the file rename to the affected proxies' ACKs; CPU = control plane utime+stime until it is quiet again)"
    );
    println!();
    let changes: Vec<(String, Vec<report::ChangeRow>)> = reports
        .iter()
        .map(|r| (r.label.clone(), r.changes.clone()))
        .collect();
    println!("{}", report::changes_table(&changes));
    println!();
    println!(
        "### {size}: restart{}",
        if size.scope {
            " and unscoped proxies"
        } else {
            ""
        }
    );
    println!();
    println!("{}", report::restart_table(reports));
    println!();
}
