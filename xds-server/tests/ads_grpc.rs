//! The ADS service over real gRPC: responses framed as the generated client expects,
//! errors as gRPC status trailers, the peer address reaching the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;
use common::cluster;

use std::net::Ipv4Addr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use weft_xds::{AdsService, Snapshot, SnapshotCache, type_url};

fn subscribe(node: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node.map(|id| Node {
            id: id.into(),
            ..Default::default()
        }),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn delta_responses_and_errors_travel_as_grpc() {
    let cache = SnapshotCache::new();
    // Big enough to take several responses.
    let clusters: Vec<_> = (0..3000)
        .map(|i| cluster(&format!("c{i:04}"), 250))
        .collect();
    cache.set_fallback(Snapshot::new().with(type_url::CLUSTER, clusters));
    let (ads, supervisor) = AdsService::new(cache.clone());
    let registry = ads.registry();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    tokio::spawn(supervisor.run());
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe(Some("ns/pod"))).await.unwrap();
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut names = Vec::new();
    let mut parts = 0;
    while names.len() < 3000 {
        let r = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .unwrap()
            .unwrap()
            .expect("stream open");
        assert_eq!(r.type_url, type_url::CLUSTER);
        names.extend(r.resources.into_iter().map(|r| r.name));
        parts += 1;
    }
    assert!(parts > 1, "large pushes come in parts");
    assert_eq!(names.first().map(String::as_str), Some("c0000"));
    assert_eq!(names.last().map(String::as_str), Some("c2999"));
    let streams = registry.list();
    assert_eq!(streams.len(), 1);
    assert_eq!(
        streams[0].peer.map(|p| p.ip()),
        Some(Ipv4Addr::LOCALHOST.into()),
        "the stream knows its peer's address"
    );

    // A second stream whose first request lacks the node: a gRPC status, not a hang.
    let (tx2, rx2) = tokio::sync::mpsc::channel(4);
    tx2.send(subscribe(None)).await.unwrap();
    let mut bad = client
        .delta_aggregated_resources(ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(Duration::from_secs(5), bad.message())
        .await
        .unwrap()
        .expect_err("an error status");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    drop(tx);
}

/// Remembers the bearer tokens streams present; admits everyone to the fallback.
#[derive(Debug, Default)]
struct TokenRecorder(std::sync::Mutex<Vec<Option<String>>>);

impl weft_xds::StreamPolicy for TokenRecorder {
    fn check<'a>(
        &'a self,
        _node: &'a str,
        credentials: &'a weft_xds::StreamCredentials,
    ) -> futures::future::BoxFuture<'a, weft_xds::Admission> {
        self.0
            .lock()
            .unwrap()
            .push(credentials.bearer_token.clone());
        Box::pin(async { weft_xds::Admission::Fallback })
    }
}

#[tokio::test]
async fn the_bearer_token_reaches_the_policy_and_closing_ends_streams_with_unavailable() {
    let cache = SnapshotCache::new();
    cache.set_fallback(Snapshot::new().with(type_url::CLUSTER, [cluster("a", 250)]));
    let (ads, supervisor) = AdsService::new(cache.clone());
    let recorder = std::sync::Arc::new(TokenRecorder::default());
    let ads = ads.with_policy(recorder.clone());
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads.clone())
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    tokio::spawn(supervisor.run());
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(subscribe(Some("ns/pod"))).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert("authorization", "Bearer t0k3n".parse().unwrap());
    let mut responses = client
        .delta_aggregated_resources(request)
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .unwrap()
        .unwrap()
        .expect("a response");
    assert_eq!(first.resources.len(), 1);
    assert!(
        recorder
            .0
            .lock()
            .unwrap()
            .contains(&Some("t0k3n".to_string())),
        "the policy saw the stream's token"
    );

    ads.close_streams();
    let ended = tokio::time::timeout(Duration::from_secs(5), responses.message())
        .await
        .unwrap()
        .expect_err("the stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    drop(tx);
}
