//! Hostile AdmissionReview bodies over real HTTPS: a 400 with the reason, quickly, and
//! the server keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, TestCa};
use weft_webhook::InjectConfig;
use weft_webhook::server::{ReloadingCertificate, acceptor, serve};

fn fixture() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/deployment-pod.json"
    ))
    .unwrap()
}

/// The fixture with `levels` nested arrays in the pod's spec, built as text: a value
/// that deep would overflow the test's own stack.
fn nested_review(levels: usize) -> Vec<u8> {
    let review = fixture();
    let deep = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
    let nested = review.replacen("\"spec\": {", &format!("\"spec\": {{\"deep\": {deep}, "), 1);
    assert_ne!(nested, review, "the fixture has a spec");
    nested.into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_reviews_get_a_400_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("weft-webhook-bounds-{}", std::process::id()));
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
        Arc::new(InjectConfig::default()),
    ));
    let mut client = Client::connect(&ca.connector(), addr).await;

    // 100,000 levels (serde_json stops at 128 on its own); then 120, which serde_json
    // alone accepts.
    for levels in [100_000, 120] {
        let started = Instant::now();
        let (status, body) = tokio::time::timeout(
            Duration::from_secs(20),
            client.send("POST", "/mutate", &nested_review(levels)),
        )
        .await
        .expect("the server answers");
        let body = String::from_utf8_lossy(&body[..body.len().min(400)]);
        assert_eq!(status, 400, "{levels} levels: {body}");
        assert!(
            body.contains("nesting deeper than 64 levels at line"),
            "{levels} levels: {body}"
        );
        // A generous bound that only guards against a hang.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{levels} levels"
        );
    }

    // Within the bound, the same review is served as usual on the same connection.
    let (status, body) = client.send("POST", "/mutate", &nested_review(10)).await;
    assert_eq!(
        status,
        200,
        "{}",
        String::from_utf8_lossy(&body[..body.len().min(400)])
    );
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["response"]["allowed"], true);
    assert!(!server.is_finished(), "the server is still up");

    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
