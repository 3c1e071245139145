//! What one binary measured at one mesh size, and the markdown tables that print it.
//! A failed measurement is printed as its reason, never as a number.

use std::time::Duration;

use crate::control_plane::{FdLimit, mib};

/// A measurement, or why there is none.
pub type Measured<T> = Result<T, String>;

#[derive(Clone, Debug)]
pub struct Ready {
    pub ready: Duration,
    /// Control plane CPU time (utime+stime) from spawn to ready.
    pub cpu_to_ready_ms: Option<u64>,
    pub idle_rss: u64,
    pub nofile: Option<u64>,
    pub fd_limit: FdLimit,
}

#[derive(Clone, Debug)]
pub struct Synced {
    pub proxies: usize,
    pub time: Duration,
    pub rss: u64,
    /// RSS `SETTLE` after `rss`: what the allocator keeps once the burst is over.
    pub settled_rss: u64,
    pub hwm: u64,
    pub bytes_per_proxy: f64,
    pub resources_per_proxy: f64,
    pub cpu_ms: u64,
}

/// One kind of change, repeated.
#[derive(Clone, Debug)]
pub struct ChangeRow {
    pub kind: &'static str,
    /// What was watched on the affected proxies.
    pub watched: String,
    pub outcome: Measured<ChangeStats>,
}

/// One application of a change.
#[derive(Clone, Debug)]
pub struct ChangeSample {
    pub affected: usize,
    /// Proxies (affected or not) that received any response for it.
    pub pushed: usize,
    /// Rename → last affected proxy's ACK.
    pub last_ack: Duration,
    /// Rename → each affected proxy's ACK.
    pub per_proxy: Vec<Duration>,
    pub cpu_ms: u64,
    /// CPU the proxies spent from the change to the last ACK: every Envoy's, or this
    /// process's for the simulated ones (they share the control plane's cores).
    pub proxies_cpu_ms: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ChangeStats {
    pub samples: Vec<ChangeSample>,
}

#[derive(Clone, Debug)]
pub struct Restarted {
    pub exit: Duration,
    pub killed: bool,
    pub ready: Duration,
    /// New process started → every proxy back in sync.
    pub all_in_sync: Duration,
}

#[derive(Clone, Debug)]
pub struct UnscopedSample {
    pub sample: usize,
    pub time: Duration,
    pub bytes_per_proxy: f64,
    pub resources_per_proxy: f64,
    pub cpu_ms: u64,
    pub rss_growth: i64,
    /// The proxy count the extrapolation is for.
    pub extrapolate_to: usize,
}

#[derive(Clone, Debug)]
pub struct EnvoyRun {
    pub envoys: usize,
    pub all_in_sync: Duration,
    pub rss_p50: u64,
    pub rss_max: u64,
    pub cp_rss: u64,
    pub listeners: String,
    /// Every sidecar's memory, sampled right after the RSS above.
    pub memory: Measured<Vec<SidecarMemory>>,
    /// The floor: one Envoy with an admin-only bootstrap, started beside the sidecars.
    pub floor: Measured<SidecarMemory>,
    pub changes: Vec<ChangeRow>,
}

/// One Envoy's memory, in bytes: `/proc/PID/status`, `/proc/PID/smaps_rollup` and
/// the heap Envoy reports on its admin `/memory`.
#[derive(Clone, Copy, Debug)]
pub struct SidecarMemory {
    /// VmRSS = RssAnon + RssFile + RssShmem (Envoy's shared memory is a few KiB).
    pub rss: u64,
    pub rss_anon: u64,
    /// Mostly the Envoy binary's pages: page cache shared by every Envoy on the node.
    pub rss_file: u64,
    /// Proportional set size: each shared page divided by the processes mapping it.
    pub pss: u64,
    /// tcmalloc: bytes in use by the application.
    pub heap_allocated: u64,
    /// tcmalloc: bytes reserved for the heap (in use, cached and free).
    pub heap_size: u64,
}

/// Everything one binary measured at one size.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub label: String,
    pub ready: Option<Measured<Ready>>,
    pub synced: Option<Measured<Synced>>,
    pub changes: Vec<ChangeRow>,
    pub restart: Option<Measured<Restarted>>,
    pub unscoped: Option<Measured<UnscopedSample>>,
    pub envoys: Option<Measured<EnvoyRun>>,
}

impl RunReport {
    pub fn new(label: &str) -> RunReport {
        RunReport {
            label: label.to_string(),
            ready: None,
            synced: None,
            changes: Vec::new(),
            restart: None,
            unscoped: None,
            envoys: None,
        }
    }

    /// Every failed measurement, as `step: reason`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |step: &str, r: Option<Result<(), &String>>| {
            if let Some(Err(e)) = r {
                out.push(format!("{step}: {e}"));
            }
        };
        check("ready", self.ready.as_ref().map(|r| r.as_ref().map(|_| ())));
        check("sync", self.synced.as_ref().map(|r| r.as_ref().map(|_| ())));
        for c in &self.changes {
            check(c.kind, Some(c.outcome.as_ref().map(|_| ())));
        }
        check(
            "restart",
            self.restart.as_ref().map(|r| r.as_ref().map(|_| ())),
        );
        check(
            "unscoped sample",
            self.unscoped.as_ref().map(|r| r.as_ref().map(|_| ())),
        );
        check(
            "envoys",
            self.envoys.as_ref().map(|r| r.as_ref().map(|_| ())),
        );
        if let Some(Ok(e)) = &self.envoys {
            check("Envoy memory", Some(e.memory.as_ref().map(|_| ())));
            check("empty-bootstrap Envoy", Some(e.floor.as_ref().map(|_| ())));
            for c in &e.changes {
                check(c.kind, Some(c.outcome.as_ref().map(|_| ())));
            }
        }
        out
    }
}

/// Nearest-rank percentile of unsorted values.
pub fn percentile<T: Copy + Ord>(values: &[T], p: f64) -> Option<T> {
    let mut v = values.to_vec();
    v.sort();
    if v.is_empty() {
        return None;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v.get(rank - 1).copied()
}

pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn opt_secs(d: Option<Duration>) -> String {
    d.map(secs).unwrap_or_else(|| "-".to_string())
}

fn kib(bytes: f64) -> String {
    format!("{:.1} KiB", bytes / 1024.0)
}

/// A failed cell: the reason, shortened and without `|` so the table stays a table.
fn failed(reason: &str) -> String {
    let mut r: String = reason.replace('|', "/").replace('\n', " ");
    if r.len() > 140 {
        let mut cut = 140;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r.truncate(cut);
        r.push('…');
    }
    format!("FAILED: {r}")
}

fn row(cells: &[String]) -> String {
    format!("| {} |", cells.join(" | "))
}

fn header(cells: &[&str]) -> String {
    let mut s = row(&cells.iter().map(|c| c.to_string()).collect::<Vec<_>>());
    s.push('\n');
    s.push_str(&row(&cells
        .iter()
        .map(|_| "---".to_string())
        .collect::<Vec<_>>()));
    s
}

/// Startup and initial sync, one row per binary.
pub fn startup_table(runs: &[RunReport]) -> String {
    let mut out = vec![header(&[
        "binary",
        "ready",
        "RSS idle",
        "fd limit",
        "proxies",
        "all in sync",
        "RSS synced",
        "RSS 5 s later",
        "VmHWM",
        "received per proxy",
        "resources per proxy",
        "CPU for the sync",
    ])];
    for r in runs {
        let mut cells = vec![r.label.clone()];
        match &r.ready {
            Some(Ok(x)) => cells.extend([
                secs(x.ready),
                mib(x.idle_rss),
                format!(
                    "{} ({})",
                    x.nofile.map_or("?".to_string(), |n| n.to_string()),
                    x.fd_limit
                ),
            ]),
            Some(Err(e)) => cells.extend([failed(e), "-".into(), "-".into()]),
            None => cells.extend(["not run".into(), "-".into(), "-".into()]),
        }
        match &r.synced {
            Some(Ok(s)) => cells.extend([
                s.proxies.to_string(),
                secs(s.time),
                mib(s.rss),
                mib(s.settled_rss),
                mib(s.hwm),
                kib(s.bytes_per_proxy),
                format!("{:.0}", s.resources_per_proxy),
                format!("{} ms", s.cpu_ms),
            ]),
            Some(Err(e)) => {
                cells.push("-".into());
                cells.push(failed(e));
                cells.extend(std::iter::repeat_n("-".to_string(), 6));
            }
            None => cells.extend(std::iter::repeat_n("-".to_string(), 8)),
        }
        out.push(row(&cells));
    }
    out.join("\n")
}

/// The changes, one row per binary and kind.
pub fn changes_table(runs: &[(String, Vec<ChangeRow>)]) -> String {
    let mut out = vec![header(&[
        "binary",
        "change",
        "runs",
        "affected",
        "pushed to",
        "last ACK p50",
        "last ACK max",
        "per-proxy ACK p50",
        "per-proxy ACK p99",
        "CP CPU p50",
        "CP CPU max",
        "proxies' CPU p50",
        "watched",
    ])];
    for (label, changes) in runs {
        if changes.is_empty() {
            out.push(row(&[
                label.clone(),
                "-".into(),
                "not run".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]));
        }
        for c in changes {
            let mut cells = vec![label.clone(), c.kind.to_string()];
            match &c.outcome {
                Ok(s) => {
                    let last: Vec<Duration> = s.samples.iter().map(|x| x.last_ack).collect();
                    let all: Vec<Duration> = s
                        .samples
                        .iter()
                        .flat_map(|x| x.per_proxy.iter().copied())
                        .collect();
                    let cpu: Vec<u64> = s.samples.iter().map(|x| x.cpu_ms).collect();
                    let proxies_cpu: Vec<u64> =
                        s.samples.iter().map(|x| x.proxies_cpu_ms).collect();
                    let affected: Vec<usize> = s.samples.iter().map(|x| x.affected).collect();
                    let pushed: Vec<usize> = s.samples.iter().map(|x| x.pushed).collect();
                    cells.extend([
                        s.samples.len().to_string(),
                        range(&affected),
                        range(&pushed),
                        opt_secs(percentile(&last, 0.5)),
                        opt_secs(last.iter().max().copied()),
                        opt_secs(percentile(&all, 0.5)),
                        opt_secs(percentile(&all, 0.99)),
                        percentile(&cpu, 0.5).map_or("-".into(), |c| format!("{c} ms")),
                        cpu.iter().max().map_or("-".into(), |c| format!("{c} ms")),
                        percentile(&proxies_cpu, 0.5).map_or("-".into(), |c| format!("{c} ms")),
                    ]);
                }
                Err(e) => {
                    cells.push(failed(e));
                    cells.extend(std::iter::repeat_n("-".to_string(), 9));
                }
            }
            cells.push(c.watched.replace('|', "\\|"));
            out.push(row(&cells));
        }
    }
    out.join("\n")
}

fn range(values: &[usize]) -> String {
    match (values.iter().min(), values.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "-".to_string(),
    }
}

/// Restart and the unscoped sample, one row per binary.
pub fn restart_table(runs: &[RunReport]) -> String {
    let mut out = vec![header(&[
        "binary",
        "SIGTERM → exit",
        "restart → ready",
        "restart → all proxies in sync",
        "unscoped sample",
        "sample in sync",
        "received per unscoped proxy",
        "resources per unscoped proxy",
        "CP CPU per unscoped proxy",
        "EXTRAPOLATED to all proxies unscoped (linear)",
    ])];
    for r in runs {
        let mut cells = vec![r.label.clone()];
        match &r.restart {
            Some(Ok(x)) => cells.extend([
                format!(
                    "{}{}",
                    secs(x.exit),
                    if x.killed { " (SIGKILLed)" } else { "" }
                ),
                secs(x.ready),
                secs(x.all_in_sync),
            ]),
            Some(Err(e)) => cells.extend([failed(e), "-".into(), "-".into()]),
            None => cells.extend(["not run".into(), "-".into(), "-".into()]),
        }
        match &r.unscoped {
            Some(Ok(u)) => {
                let factor = u.extrapolate_to as f64 / u.sample.max(1) as f64;
                cells.extend([
                    u.sample.to_string(),
                    secs(u.time),
                    kib(u.bytes_per_proxy),
                    format!("{:.0}", u.resources_per_proxy),
                    format!("{:.1} ms", u.cpu_ms as f64 / u.sample.max(1) as f64),
                    format!(
                        "{} proxies: {:.2} GiB sent, {:.1} s CP CPU, {} to sync (linear in time)",
                        u.extrapolate_to,
                        u.bytes_per_proxy * u.extrapolate_to as f64 / (1u64 << 30) as f64,
                        u.cpu_ms as f64 * factor / 1e3,
                        secs(u.time.mul_f64(factor)),
                    ),
                ]);
            }
            Some(Err(e)) => {
                cells.push(failed(e));
                cells.extend(std::iter::repeat_n("-".to_string(), 5));
            }
            None => cells.extend(std::iter::repeat_n("-".to_string(), 6)),
        }
        out.push(row(&cells));
    }
    out.join("\n")
}

/// Real Envoys, one row per binary.
pub fn envoy_table(runs: &[RunReport]) -> String {
    let mut out = vec![header(&[
        "binary",
        "Envoys",
        "all in sync",
        "Envoy RSS p50",
        "Envoy RSS max",
        "CP RSS",
        "listeners",
    ])];
    for r in runs {
        let mut cells = vec![r.label.clone()];
        match &r.envoys {
            Some(Ok(e)) => cells.extend([
                e.envoys.to_string(),
                secs(e.all_in_sync),
                mib(e.rss_p50),
                mib(e.rss_max),
                mib(e.cp_rss),
                e.listeners.clone(),
            ]),
            Some(Err(e)) => {
                cells.push("-".into());
                cells.push(failed(e));
                cells.extend(std::iter::repeat_n("-".to_string(), 4));
            }
            None => cells.extend(std::iter::repeat_n("-".to_string(), 6)),
        }
        out.push(row(&cells));
    }
    out.join("\n")
}

/// Why the memory table has more than RSS.
pub const MEMORY_NOTE: &str = "RSS counts the Envoy binary's file-backed pages (RssFile), which sit once in the page cache and are shared by every sidecar on the node (PSS divides them among the processes mapping them); RssAnon (heap, stacks, per-process data) is what each additional sidecar costs. Heap = Envoy's own tcmalloc figures from the admin `/memory` (allocated: in use; heap size: reserved).";

/// Sidecar memory, one row for the mesh's Envoys and one for the empty-bootstrap floor,
/// per binary. Each cell is `p50 / max` over the sidecars.
pub fn envoy_memory_table(runs: &[RunReport]) -> String {
    let mut out = vec![header(&[
        "binary",
        "Envoy",
        "Envoys",
        "RSS p50 / max",
        "RssAnon p50 / max",
        "RssFile p50 / max",
        "PSS p50 / max",
        "PSS total",
        "heap allocated p50 / max",
        "heap size p50 / max",
    ])];
    const STATS: usize = 7;
    for r in runs {
        let Some(Ok(e)) = &r.envoys else {
            let mut cells = vec![r.label.clone(), "-".into()];
            cells.extend(std::iter::repeat_n("-".to_string(), STATS + 1));
            out.push(row(&cells));
            continue;
        };
        let floor = e.floor.as_ref().map(std::slice::from_ref);
        for (what, samples) in [
            ("sidecars of the mesh", e.memory.as_deref()),
            ("empty bootstrap (admin only)", floor),
        ] {
            let mut cells = vec![r.label.clone(), what.to_string()];
            match samples {
                Ok(s) => {
                    let stat = |f: fn(&SidecarMemory) -> u64| -> String {
                        let v: Vec<u64> = s.iter().map(f).collect();
                        match (v.as_slice(), percentile(&v, 0.5), v.iter().max()) {
                            ([one], _, _) => mib(*one),
                            (_, Some(p50), Some(max)) => format!("{} / {}", mib(p50), mib(*max)),
                            _ => "-".to_string(),
                        }
                    };
                    cells.extend([
                        s.len().to_string(),
                        stat(|m| m.rss),
                        stat(|m| m.rss_anon),
                        stat(|m| m.rss_file),
                        stat(|m| m.pss),
                        mib(s.iter().map(|m| m.pss).sum()),
                        stat(|m| m.heap_allocated),
                        stat(|m| m.heap_size),
                    ]);
                }
                Err(e) => {
                    cells.push(failed(e));
                    cells.extend(std::iter::repeat_n("-".to_string(), STATS));
                }
            }
            out.push(row(&cells));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[7u64], 0.99), Some(7));
        assert_eq!(percentile::<u64>(&[], 0.5), None);
    }
}
