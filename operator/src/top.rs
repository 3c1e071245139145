//! `weft top`: per edge (calling workload → destination service), requests per second,
//! success rate and latency quantiles, from two scrapes of the callers' sidecar stats
//! (Prometheus text) a window apart. No I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One calling sidecar's counters per destination (cluster stat name).
pub type SidecarCounters = BTreeMap<String, EdgeCounters>;

/// The counters of one outbound cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeCounters {
    /// Responses by class (`1`..`5`).
    pub by_class: BTreeMap<String, f64>,
    /// Latency histogram: upper bound (ms) → cumulative count.
    pub buckets: Vec<(f64, f64)>,
}

/// One edge's traffic during the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    /// The calling pod, `namespace/name`.
    pub source: String,
    /// The destination, `namespace/service:port`.
    pub destination: String,
    /// Requests per second (responses counted in the window).
    pub rps: f64,
    /// Share of responses that were not 5xx, in percent.
    pub success_rate: f64,
    /// Median latency, ms (histogram bucket bound).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms (histogram bucket bound).
    pub p99_ms: Option<f64>,
}

/// The value of `name` in a label set `{a="x",b="y"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let rest = &labels[start..];
    Some(&rest[..rest.find('"')?])
}

/// The outbound counters in a sidecar's `/stats/prometheus` text.
pub fn parse_sidecar_stats(text: &str) -> SidecarCounters {
    let mut out = SidecarCounters::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(cluster) =
            label(labels, "envoy_cluster_name").filter(|c| c.starts_with("outbound|"))
        else {
            continue;
        };
        match name {
            "envoy_cluster_upstream_rq_xx" => {
                if let Some(class) = label(labels, "envoy_response_code_class") {
                    out.entry(cluster.to_string())
                        .or_default()
                        .by_class
                        .insert(class.to_string(), value);
                }
            }
            "envoy_cluster_upstream_rq_time_bucket" => {
                let bound = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(b) => b.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                out.entry(cluster.to_string())
                    .or_default()
                    .buckets
                    .push((bound, value));
            }
            _ => {}
        }
    }
    out
}

/// `outbound|PORT||SERVICE|NAMESPACE` as `NAMESPACE/SERVICE:PORT`.
fn destination(cluster: &str) -> String {
    let parts: Vec<&str> = cluster.split('|').collect();
    match parts.as_slice() {
        ["outbound", port, "", service, namespace] => format!("{namespace}/{service}:{port}"),
        _ => cluster.to_string(),
    }
}

/// The bucket bound under which `q` of the window's requests finished.
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let old = |bound: f64| {
        before
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0.0, |(_, c)| *c)
    };
    let deltas: Vec<(f64, f64)> = after.iter().map(|(b, c)| (*b, c - old(*b))).collect();
    let total = deltas.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .filter(|(_, c)| *c >= q * total)
        .map(|(b, _)| *b)
        .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.min(b))))
        .filter(|b| b.is_finite())
}

/// The edges of one calling pod between two scrapes `window` apart; edges without
/// responses in the window are left out.
pub fn edges(
    source: &str,
    before: &SidecarCounters,
    after: &SidecarCounters,
    window: Duration,
) -> Vec<EdgeReport> {
    let seconds = window.as_secs_f64().max(0.001);
    let mut out = Vec::new();
    for (cluster, now) in after {
        let then = before.get(cluster);
        let delta = |class: &str| {
            now.by_class.get(class).copied().unwrap_or(0.0)
                - then
                    .and_then(|t| t.by_class.get(class))
                    .copied()
                    .unwrap_or(0.0)
        };
        let total: f64 = ["1", "2", "3", "4", "5"].iter().map(|c| delta(c)).sum();
        if total <= 0.0 {
            continue;
        }
        let empty = Vec::new();
        let old = then.map_or(&empty, |t| &t.buckets);
        out.push(EdgeReport {
            source: source.to_string(),
            destination: destination(cluster),
            rps: total / seconds,
            success_rate: 100.0 * (total - delta("5")) / total,
            p50_ms: quantile(old, &now.buckets, 0.5),
            p99_ms: quantile(old, &now.buckets, 0.99),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(ok: u32, failed: u32, fast: u32, slow: u32) -> String {
        let c = r#"envoy_cluster_name="outbound|8080||backend|default""#;
        format!(
            "# TYPE envoy_cluster_upstream_rq_xx counter\n\
             envoy_cluster_upstream_rq_xx{{envoy_response_code_class=\"2\",{c}}} {ok}\n\
             envoy_cluster_upstream_rq_xx{{envoy_response_code_class=\"5\",{c}}} {failed}\n\
             envoy_cluster_upstream_rq_xx{{envoy_response_code_class=\"2\",envoy_cluster_name=\"weft-xds\"}} 7\n\
             envoy_cluster_upstream_rq_time_bucket{{{c},le=\"5\"}} {fast}\n\
             envoy_cluster_upstream_rq_time_bucket{{{c},le=\"100\"}} {}\n\
             envoy_cluster_upstream_rq_time_bucket{{{c},le=\"+Inf\"}} {}\n",
            fast + slow,
            fast + slow
        )
    }

    #[test]
    fn rates_success_and_latency_come_from_the_difference_of_two_scrapes() {
        let before = parse_sidecar_stats(&scrape(100, 0, 100, 0));
        let after = parse_sidecar_stats(&scrape(190, 10, 198, 2));
        let edges = edges("default/client", &before, &after, Duration::from_secs(2));
        assert_eq!(edges.len(), 1, "the xDS cluster is not an edge: {edges:?}");
        let e = &edges[0];
        assert_eq!(e.destination, "default/backend:8080");
        assert!((e.rps - 50.0).abs() < 1e-9, "{e:?}");
        assert!((e.success_rate - 90.0).abs() < 1e-9, "{e:?}");
        assert_eq!((e.p50_ms, e.p99_ms), (Some(5.0), Some(100.0)));
    }

    #[test]
    fn an_idle_edge_is_left_out() {
        let same = parse_sidecar_stats(&scrape(5, 0, 5, 0));
        assert!(edges("default/client", &same, &same, Duration::from_secs(1)).is_empty());
    }
}
