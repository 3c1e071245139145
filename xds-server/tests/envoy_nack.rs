//! A real Envoy against the ADS service, state of the world and incremental: a
//! rejected config is NACKed, remembered with Envoy's message, not re-sent, and the
//! next good config is ACKed.
//! Needs Envoy (`WEFT_ENVOY` or PATH; `make setup` installs it) and fails without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::google::protobuf::Duration as PbDuration;
use tokio_stream::wrappers::TcpListenerStream;
use weft_xds::{AdsService, Resource, Snapshot, SnapshotCache, SyncRegistry, TypeSync, type_url};

const NODE: &str = "test/nack";

fn envoy_binary() -> PathBuf {
    std::env::var_os("WEFT_ENVOY")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH")
                .iter()
                .flat_map(std::env::split_paths)
                .map(|d| d.join("envoy"))
                .find(|p| p.is_file())
        })
        .expect("Envoy not found: set WEFT_ENVOY or run `make setup`")
}

fn static_cluster(host: &str) -> Snapshot {
    let c = Cluster {
        name: "upstream".into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "upstream".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: host.into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(9)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Snapshot::new().with(
        type_url::CLUSTER,
        [Resource::encode(type_url::CLUSTER, "upstream", &c)],
    )
}

struct Envoy(Child);

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_envoy(xds: SocketAddr, api_type: &str) -> Envoy {
    let admin = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bootstrap = format!(
        r#"{{"node": {{"id": "{NODE}", "cluster": "test"}},
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {admin}}}}}}},
  "dynamic_resources": {{
    "ads_config": {{"api_type": "{api_type}", "transport_api_version": "V3",
      "grpc_services": [{{"envoy_grpc": {{"cluster_name": "xds"}}}}]}},
    "cds_config": {{"ads": {{}}, "resource_api_version": "V3"}}}},
  "static_resources": {{"clusters": [{{"name": "xds", "type": "STATIC", "connect_timeout": "1s",
    "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
      "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
      "explicit_http_config": {{"http2_protocol_options": {{}}}}}}}},
    "load_assignment": {{"cluster_name": "xds", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
      {{"socket_address": {{"address": "127.0.0.1", "port_value": {port}}}}}}}}}]}}]}}}}]}}}}"#,
        port = xds.port()
    );
    let child = Command::new(envoy_binary())
        .args([
            "--config-yaml",
            &bootstrap,
            "--use-dynamic-base-id",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("envoy starts");
    Envoy(child)
}

fn cds(registry: &SyncRegistry) -> Option<TypeSync> {
    registry
        .list()
        .into_iter()
        .find(|s| s.node_id.as_deref() == Some(NODE))
        .and_then(|s| s.types.into_iter().find(|t| t.type_name == "CDS"))
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_config_is_remembered_not_resent_and_the_next_good_one_is_acked() {
    nack_scenario("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_delta_xds_a_nack_is_not_resent_and_the_next_good_config_is_acked() {
    nack_scenario("DELTA_GRPC").await;
}

async fn nack_scenario(api_type: &str) {
    let cache = SnapshotCache::new();
    cache.set(NODE, static_cluster("127.0.0.1"));
    let (ads, supervisor) = AdsService::new(cache.clone());
    let registry: Arc<SyncRegistry> = ads.registry();
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let xds = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ads)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let streams = tokio::spawn(supervisor.run());
    let _envoy = start_envoy(xds, api_type);

    wait_until("the first CDS ACK", || {
        cds(&registry)
            .is_some_and(|t| t.acked_version.is_some() && t.acked_version == t.sent_version)
    })
    .await;

    cache.set(NODE, static_cluster("not-an-ip"));
    wait_until("a NACK", || {
        cds(&registry).is_some_and(|t| t.last_nack.is_some())
    })
    .await;
    let nacked = cds(&registry).unwrap();
    let message = nacked.last_nack.as_ref().unwrap().message.clone();
    assert!(
        message.contains("not-an-ip"),
        "Envoy's reason is kept: {message}"
    );
    assert_ne!(
        nacked.acked_version, nacked.sent_version,
        "the bad version is not ACKed"
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = cds(&registry).unwrap();
    assert_eq!(
        later.responses, nacked.responses,
        "nothing re-sent after the NACK"
    );

    cache.set(NODE, static_cluster("127.0.0.2"));
    wait_until("the fix to be ACKed", || {
        cds(&registry).is_some_and(|t| t.last_nack.is_none() && t.acked_version == t.sent_version)
    })
    .await;
    assert_eq!(cds(&registry).unwrap().responses, nacked.responses + 1);
    server.abort();
    streams.abort();
}
