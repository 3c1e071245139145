//! The ADS service over real gRPC: responses framed as the generated client expects,
//! errors as gRPC status trailers, the peer address reaching the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;
use common::{cluster, open_delta_stream};

use std::net::Ipv4Addr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio_stream::wrappers::ReceiverStream;
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

/// Serves `ads` on a loopback port and connects a client to it.
async fn serve(
    ads: AdsService,
    supervisor: weft_xds::StreamSupervisor,
) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    let addr = common::serve_ads(ads, supervisor).await;
    AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
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
    let mut client = serve(ads, supervisor).await;

    let (tx, mut responses) = open_delta_stream(&mut client, subscribe(Some("ns/pod"))).await;
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
    let (_tx2, mut bad) = open_delta_stream(&mut client, subscribe(None)).await;
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
    let mut client = serve(ads.clone(), supervisor).await;
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

/// Resolves every endpoint name starting with `od-` (as weight 7), recording the names
/// asked for.
#[derive(Debug, Default)]
struct PrefixResolver(std::sync::Mutex<Vec<String>>);

impl PrefixResolver {
    fn asked(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl weft_xds::OnDemandResolver for PrefixResolver {
    fn resolve(
        &self,
        _node: &str,
        _own: bool,
        type_url: &str,
        name: &str,
    ) -> Option<weft_xds::Resource> {
        self.0.lock().unwrap().push(name.to_string());
        (type_url == type_url::ENDPOINT && name.starts_with("od-"))
            .then(|| common::load_assignment(name, 7))
    }
}

#[tokio::test]
async fn a_subscribed_name_is_resolved_on_demand_exactly_while_the_snapshot_lacks_it() {
    use common::load_assignment;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    let cache = SnapshotCache::new();
    let eds = |items: Vec<weft_xds::Resource>| Snapshot::new().with(type_url::ENDPOINT, items);
    cache.set_fallback(eds(vec![load_assignment("a", 1)]));
    let resolver = std::sync::Arc::new(PrefixResolver::default());
    let (ads, supervisor) = AdsService::new(cache.clone());
    let ads = ads.with_on_demand(resolver.clone());
    let mut client = serve(ads, supervisor).await;
    let first = DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: vec!["a".into(), "od-x".into()],
        ..subscribe(Some("ns/pod"))
    };
    let (tx, mut responses) = open_delta_stream(&mut client, first).await;
    // Each step: what the proxy is sent, as (name, weight) and removed names; then ACK.
    let mut next = async || {
        let r = tokio::time::timeout(Duration::from_secs(5), responses.message())
            .await
            .unwrap()
            .unwrap()
            .expect("stream open");
        let sent: Vec<(String, u32)> = r
            .resources
            .iter()
            .map(|res| {
                let cla =
                    ClusterLoadAssignment::decode(res.resource.as_ref().unwrap().value.as_slice())
                        .unwrap();
                let w = cla.endpoints[0].lb_endpoints[0]
                    .load_balancing_weight
                    .unwrap()
                    .value;
                (res.name.clone(), w)
            })
            .collect();
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        (sent, r.removed_resources)
    };
    let (sent, _) = next().await;
    assert_eq!(
        sent,
        vec![("a".into(), 1), ("od-x".into(), 7)],
        "resolved on demand"
    );

    // The snapshot gains od-x itself: its version replaces the resolved one.
    cache.set_fallback(eds(vec![
        load_assignment("a", 1),
        load_assignment("od-x", 2),
    ]));
    assert_eq!(next().await, (vec![("od-x".into(), 2)], vec![]));
    // A change elsewhere: nothing to resolve, od-x stays the snapshot's.
    let calls = resolver.asked().len();
    cache.set_fallback(eds(vec![
        load_assignment("a", 3),
        load_assignment("od-x", 2),
    ]));
    assert_eq!(next().await, (vec![("a".into(), 3)], vec![]));
    assert_eq!(
        resolver.asked().len(),
        calls,
        "nothing missing, nothing resolved"
    );
    // The snapshot drops od-x: resolved again, never removed.
    cache.set_fallback(eds(vec![load_assignment("a", 3)]));
    assert_eq!(next().await, (vec![("od-x".into(), 7)], vec![]));
    // And it drops a, which the resolver does not know: removed.
    cache.set_fallback(eds(vec![load_assignment("b", 1)]));
    assert_eq!(next().await, (vec![], vec!["a".to_string()]));
    // A later subscription is resolved with no snapshot change; one the snapshot holds
    // is not, and one dropped is resolved no more.
    let change = |subscribe: &[&str], unsubscribe: &[&str]| DeltaDiscoveryRequest {
        type_url: type_url::ENDPOINT.into(),
        resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    tx.send(change(&["od-y", "b"], &["od-x"])).await.unwrap();
    let (mut sent, removed) = next().await;
    sent.sort();
    assert_eq!(
        (sent, removed),
        (vec![("b".into(), 1), ("od-y".into(), 7)], vec![])
    );
    let calls = resolver.asked().len();
    cache.set_fallback(eds(vec![load_assignment("b", 2)]));
    assert_eq!(next().await, (vec![("b".into(), 2)], vec![]));
    let asked = resolver.asked()[calls..].to_vec();
    assert!(
        asked.iter().any(|n| n == "od-y") && !asked.iter().any(|n| n == "od-x" || n == "b"),
        "od-y is resolved, od-x (dropped) and b (held) are not: {asked:?}"
    );
}
