//! Certificate issuance: SVIDs per second on one core and the p99 time to issue one,
//! against the cost of generating the P-256 key alone (the floor), in the same process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::time::{Duration, Instant, SystemTime};

use weft::identity::{CaSource, CertificateAuthority};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn measure(n: usize, mut op: impl FnMut()) -> (f64, Duration, Duration) {
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        op();
        times.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    times.sort();
    (rate, percentile(&times, 0.5), percentile(&times, 0.99))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("weft-bench-ca-{}", std::process::id()));
    let ca = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    let n = 2_000;
    let now = SystemTime::now();
    let ttl = Duration::from_secs(24 * 3600);
    let (issue_rate, issue_p50, issue_p99) = measure(n, || {
        ca.issue("spiffe://cluster.local/ns/bench/sa/bench", ttl, now)
            .unwrap();
    });
    let (key_rate, key_p50, key_p99) = measure(n, || {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    });
    println!("X.509 SVID issuance, ECDSA P-256, one thread ({n} each)");
    println!("| operation                |   per second |      p50 |      p99 |");
    println!("|--------------------------|-------------:|---------:|---------:|");
    for (name, rate, p50, p99) in [
        ("issue SVID (key + sign)", issue_rate, issue_p50, issue_p99),
        ("generate key (baseline)", key_rate, key_p50, key_p99),
    ] {
        println!(
            "| {name:<24} | {rate:>12.0} | {:>6.1}µs | {:>6.1}µs |",
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    println!(
        "issuing costs {:.1}x a bare key generation",
        key_rate / issue_rate
    );
    let _ = std::fs::remove_dir_all(&dir);
}
