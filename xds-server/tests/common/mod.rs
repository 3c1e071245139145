//! Resources the state-machine tests share.

use std::net::{Ipv4Addr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use weft_xds::{AdsService, Resource, StreamSupervisor, type_url};

/// Serves `ads` (and runs its stream supervisor) on a loopback port.
#[allow(dead_code)] // each test binary compiles this module; not all of them use it
pub async fn serve_ads(ads: AdsService, supervisor: StreamSupervisor) -> SocketAddr {
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
    addr
}

/// Opens a delta ADS stream whose first request is `first`: the sender of the later
/// requests, and the responses.
#[allow(dead_code)] // each test binary compiles this module; not all of them use it
pub async fn open_delta_stream(
    client: &mut AggregatedDiscoveryServiceClient<tonic::transport::Channel>,
    first: DeltaDiscoveryRequest,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(first).await.unwrap();
    let responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, responses)
}

/// A cluster whose content (and so version) changes with `timeout_ms`.
pub fn cluster(name: &str, timeout_ms: i64) -> Resource {
    let c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 0,
            nanos: (timeout_ms * 1_000_000) as i32,
        }),
        ..Default::default()
    };
    Resource::encode(type_url::CLUSTER, name, &c)
}

/// A ClusterLoadAssignment `name` whose one endpoint has weight `weight` (a
/// distinct content per weight).
#[allow(dead_code)] // each test binary compiles this module; not all of them use it
pub fn load_assignment(name: &str, weight: u32) -> Resource {
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, LbEndpoint, LocalityLbEndpoints,
    };
    let cla = ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                load_balancing_weight: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: weight,
                }),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::encode(type_url::ENDPOINT, name, &cla)
}
