//! Failure modes a test switches per request (query parameters on any path) or for the
//! whole pod (`/fault?...`, kept until the next `/fault`):
//!
//! - `fail=<status>`: answer with that status (default 503 when another `fail_*` is given);
//! - `fail_rate=<0..1>`: only that share of requests fails;
//! - `fail_first=<n>&key=<k>`: the first n requests carrying key k fail, later ones pass
//!   (what a retry needs);
//! - `delay_ms=<n>`: wait before answering;
//! - `close=1`: drop the connection without an answer;
//! - `health=fail` (pod only): `/healthz` answers 503 instead of 200.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper::StatusCode;

use crate::http_server::query_param;

/// A set of failure modes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultSpec {
    status: Option<StatusCode>,
    rate: Option<f64>,
    first: Option<(u64, String)>,
    delay: Option<Duration>,
    close: bool,
    unhealthy: bool,
}

/// What a request gets.
#[derive(Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Answered normally.
    Pass,
    /// Answered with this status.
    Fail(StatusCode),
    /// The connection is dropped.
    Close,
}

const PARAMS: [&str; 7] = [
    "fail",
    "fail_rate",
    "fail_first",
    "key",
    "delay_ms",
    "close",
    "health",
];

impl FaultSpec {
    /// The failure modes a query string asks for; `None` when it names none.
    pub fn parse(query: &str) -> Result<Option<Self>, String> {
        if !PARAMS.iter().any(|p| query_param(query, p).is_some()) {
            return Ok(None);
        }
        let number = |key: &str| -> Result<Option<f64>, String> {
            query_param(query, key)
                .map(|v| {
                    v.parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite() && *n >= 0.0)
                        .ok_or_else(|| format!("{key}={v:?} is not a non-negative number"))
                })
                .transpose()
        };
        let status = query_param(query, "fail")
            .map(|v| {
                v.parse::<u16>()
                    .ok()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .ok_or_else(|| format!("fail={v:?} is not an HTTP status"))
            })
            .transpose()?;
        let rate = number("fail_rate")?;
        if rate.is_some_and(|r| r > 1.0) {
            return Err("fail_rate is a share between 0 and 1".into());
        }
        let first = number("fail_first")?.map(|n| {
            (
                n as u64,
                query_param(query, "key").unwrap_or_default().to_string(),
            )
        });
        Ok(Some(Self {
            status,
            rate,
            first,
            delay: number("delay_ms")?.map(|ms| Duration::from_millis(ms as u64)),
            close: query_param(query, "close").is_some_and(|v| v != "0"),
            unhealthy: query_param(query, "health") == Some("fail"),
        }))
    }

    /// Whether anything fails (not only delays).
    fn fails(&self) -> bool {
        self.status.is_some() || self.rate.is_some() || self.first.is_some()
    }
}

/// The pod's failure modes and the state they need.
#[derive(Debug, Default)]
pub struct Faults {
    pod: Mutex<FaultSpec>,
    attempts: Mutex<HashMap<String, u64>>,
    draws: AtomicU64,
}

impl Faults {
    /// Replaces the pod-wide failure modes.
    pub fn set_pod(&self, spec: FaultSpec) {
        if let Ok(mut pod) = self.pod.lock() {
            *pod = spec;
        }
    }

    /// Whether `/healthz` passes.
    pub fn healthy(&self) -> bool {
        self.pod.lock().map(|p| !p.unhealthy).unwrap_or(true)
    }

    /// Applies the request's own failure modes, or the pod's: waits out any delay and
    /// says how the request ends.
    pub async fn apply(&self, own: Option<FaultSpec>) -> FaultOutcome {
        let spec = match own {
            Some(spec) => spec,
            None => match self.pod.lock() {
                Ok(pod) => pod.clone(),
                Err(_) => return FaultOutcome::Pass,
            },
        };
        if let Some(delay) = spec.delay {
            tokio::time::sleep(delay).await;
        }
        if spec.close {
            return FaultOutcome::Close;
        }
        if !spec.fails() {
            return FaultOutcome::Pass;
        }
        let failing = match &spec.first {
            Some((n, key)) => {
                let Ok(mut attempts) = self.attempts.lock() else {
                    return FaultOutcome::Pass;
                };
                let seen = attempts.entry(key.clone()).or_insert(0);
                *seen += 1;
                *seen <= *n
            }
            None => spec.rate.is_none_or(|rate| self.draw() < rate),
        };
        if failing {
            FaultOutcome::Fail(spec.status.unwrap_or(StatusCode::SERVICE_UNAVAILABLE))
        } else {
            FaultOutcome::Pass
        }
    }

    /// A uniform draw in [0, 1) (splitmix64 over a counter: no shared RNG state to lock).
    fn draw(&self) -> f64 {
        let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
        let mut z = self
            .draws
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(seed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fail_first_fails_that_many_tries_per_key_then_passes() {
        let faults = Faults::default();
        let spec = || FaultSpec::parse("fail_first=2&key=a&fail=502").unwrap();
        assert_eq!(
            faults.apply(spec()).await,
            FaultOutcome::Fail(StatusCode::BAD_GATEWAY)
        );
        assert_eq!(
            faults.apply(spec()).await,
            FaultOutcome::Fail(StatusCode::BAD_GATEWAY)
        );
        assert_eq!(faults.apply(spec()).await, FaultOutcome::Pass);
        let other = FaultSpec::parse("fail_first=1&key=b").unwrap();
        assert_eq!(
            faults.apply(other).await,
            FaultOutcome::Fail(StatusCode::SERVICE_UNAVAILABLE)
        );
    }

    #[tokio::test]
    async fn a_rate_fails_about_that_share_and_the_pod_spec_applies_without_own() {
        let faults = Faults::default();
        faults.set_pod(FaultSpec::parse("fail=500&fail_rate=0.3").unwrap().unwrap());
        let mut failed = 0;
        for _ in 0..2000 {
            if faults.apply(None).await != FaultOutcome::Pass {
                failed += 1;
            }
        }
        assert!((500..700).contains(&failed), "{failed} of 2000 failed");
        // A request's own parameters replace the pod's.
        assert_eq!(
            faults.apply(FaultSpec::parse("delay_ms=0").unwrap()).await,
            FaultOutcome::Pass
        );
    }

    #[test]
    fn nonsense_is_refused_and_plain_queries_are_no_fault() {
        assert_eq!(FaultSpec::parse("chunks=3"), Ok(None));
        assert!(FaultSpec::parse("fail=abc").is_err());
        assert!(FaultSpec::parse("fail_rate=2").is_err());
        assert!(FaultSpec::parse("delay_ms=-1").is_err());
        assert!(
            FaultSpec::parse("health=fail")
                .unwrap()
                .is_some_and(|s| s.unhealthy)
        );
    }

    #[test]
    fn health_follows_the_pod_spec() {
        let faults = Faults::default();
        assert!(faults.healthy());
        faults.set_pod(FaultSpec::parse("health=fail").unwrap().unwrap());
        assert!(!faults.healthy());
        faults.set_pod(FaultSpec::default());
        assert!(faults.healthy());
    }
}
