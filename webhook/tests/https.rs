//! The HTTPS AdmissionReview server, end to end over real TLS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, TestCa};
use weft_webhook::InjectConfig;
use weft_webhook::server::{ReloadingCertificate, acceptor, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_over_https_and_the_certificate_reloads_when_its_files_change() {
    let dir = std::env::temp_dir().join(format!("weft-webhook-https-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = TestCa::new();
    let first = ca.write_serving_cert(&cert, &key);
    let reloading = Arc::new(ReloadingCertificate::new(cert.clone(), key.clone()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(
        listener,
        acceptor(reloading).unwrap(),
        Arc::new(InjectConfig::default()),
    ));
    let connector = ca.connector();

    let mut client = Client::connect(&connector, addr).await;
    assert_eq!(client.peer_cert, first);
    let review = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/deployment-pod.json"
    ))
    .unwrap();
    let (status, body) = client.send("POST", "/mutate", &review).await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["kind"], "AdmissionReview");
    assert_eq!(json["response"]["allowed"], true);
    assert_eq!(json["response"]["patchType"], "JSONPatch");
    let (status, body) = client
        .send("POST", "/mutate", b"{\"apiVersion\": trunc")
        .await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("not an AdmissionReview"),
        "{body:?}"
    );
    let (status, _) = client.send("GET", "/healthz", b"").await;
    assert_eq!(status, 200);

    // The CA rotates the serving certificate: new connections get the new one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = ca.write_serving_cert(&cert, &key);
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A new client: a resumed TLS session would report the certificate it started with.
    let mut fresh = Client::connect(&ca.connector(), addr).await;
    assert_eq!(
        fresh.peer_cert, second,
        "the new certificate is served without a restart"
    );
    assert_eq!(fresh.send("POST", "/mutate", &review).await.0, 200);

    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
