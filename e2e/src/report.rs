//! Load reports: the outcome of each request of a load run, and what they add up to.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One request of a load run: when it started and who answered (or why it failed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestResult {
    /// Start time, Unix milliseconds.
    pub start_ms: u64,
    /// The pod that answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The failure, if the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long the request took, in microseconds.
    #[serde(default)]
    pub micros: u64,
}

/// Everything a load run saw, in start order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Per request outcome.
    pub results: Vec<RequestResult>,
}

impl LoadReport {
    /// A report from `(start, duration µs, Ok(pod) | Err(error))` triples.
    pub fn from_timed_results(
        results: Vec<(u64, u64, std::result::Result<String, String>)>,
    ) -> Self {
        Self {
            results: results
                .into_iter()
                .map(|(start_ms, micros, r)| {
                    let (pod, error) = match r {
                        Ok(pod) => (Some(pod), None),
                        Err(e) => (None, Some(e)),
                    };
                    RequestResult {
                        start_ms,
                        pod,
                        error,
                        micros,
                    }
                })
                .collect(),
        }
    }

    /// The `p`-quantile (0.0..=1.0) of successful request latencies, in microseconds.
    pub fn latency_micros(&self, p: f64) -> u64 {
        let mut times: Vec<u64> = self
            .results
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.micros)
            .collect();
        if times.is_empty() {
            return 0;
        }
        times.sort_unstable();
        times[((times.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
    }

    /// Answers per pod.
    pub fn by_pod(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for pod in self.results.iter().filter_map(|r| r.pod.clone()) {
            *counts.entry(pod).or_insert(0) += 1;
        }
        counts
    }

    /// Answers from pods whose name starts with `prefix`.
    pub fn answered_by(&self, prefix: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.pod.as_deref().is_some_and(|p| p.starts_with(prefix)))
            .count()
    }

    /// Failed requests.
    pub fn failures(&self) -> Vec<&RequestResult> {
        self.results.iter().filter(|r| r.error.is_some()).collect()
    }

    /// The requests that started at or after `ms` (Unix milliseconds).
    pub fn started_after(&self, ms: u64) -> LoadReport {
        LoadReport {
            results: self
                .results
                .iter()
                .filter(|r| r.start_ms >= ms)
                .cloned()
                .collect(),
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
