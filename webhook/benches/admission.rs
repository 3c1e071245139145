//! Webhook latency: 10,000 AdmissionReviews over HTTPS from concurrent clients, p50/p99,
//! against the pure handler alone in the same process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, TestCa};
use weft_webhook::server::{ReloadingCertificate, acceptor, serve};
use weft_webhook::{InjectConfig, handle_review};

const REVIEWS: usize = 10_000;
const CONNECTIONS: usize = 16;

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let review = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/deployment-pod.json"
    ))
    .unwrap();
    let config = InjectConfig::default();

    let mut inproc = Vec::with_capacity(REVIEWS);
    for _ in 0..REVIEWS {
        let t = Instant::now();
        assert_eq!(handle_review(&review, &config).status, 200);
        inproc.push(t.elapsed());
    }
    inproc.sort();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (https, wall) = runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("weft-webhook-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let ca = TestCa::new();
        ca.write_serving_cert(&cert, &key);
        let reloading = Arc::new(ReloadingCertificate::new(cert, key).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(
            listener,
            acceptor(reloading).unwrap(),
            Arc::new(config.clone()),
        ));
        let connector = ca.connector();
        let review = Arc::new(review.clone());
        let started = Instant::now();
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CONNECTIONS {
            let (connector, review) = (connector.clone(), review.clone());
            clients.spawn(async move {
                let mut client = Client::connect(&connector, addr).await;
                let mut times = Vec::with_capacity(REVIEWS / CONNECTIONS);
                for _ in 0..REVIEWS / CONNECTIONS {
                    let t = Instant::now();
                    let (status, _) = client.send("POST", "/mutate", &review).await;
                    assert_eq!(status, 200);
                    times.push(t.elapsed());
                }
                times
            });
        }
        let mut all = Vec::with_capacity(REVIEWS);
        while let Some(times) = clients.join_next().await {
            all.extend(times.unwrap());
        }
        let wall = started.elapsed();
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        all.sort();
        (all, wall)
    });

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!("AdmissionReview (Deployment pod, native sidecar), {REVIEWS} reviews");
    println!("| path                                     |      p50 |      p99 |");
    println!("|------------------------------------------|---------:|---------:|");
    println!(
        "| handler alone (baseline)                 | {:>6.0}µs | {:>6.0}µs |",
        us(quantile(&inproc, 0.5)),
        us(quantile(&inproc, 0.99))
    );
    println!(
        "| HTTPS, {CONNECTIONS} concurrent keep-alive clients  | {:>6.0}µs | {:>6.0}µs |",
        us(quantile(&https, 0.5)),
        us(quantile(&https, 0.99))
    );
    println!(
        "throughput over HTTPS: {:.0} reviews/s",
        REVIEWS as f64 / wall.as_secs_f64()
    );
}
