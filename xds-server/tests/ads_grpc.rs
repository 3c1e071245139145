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
