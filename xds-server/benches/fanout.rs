//! xDS fan-out benchmark: N simulated ADS clients subscribed to 1,000 clusters.
//!
//! Each client is a real stream of `AdsService` (state machine, snapshot watch,
//! one task per stream) whose responses are encoded exactly as the gRPC codec
//! encodes them; only HTTP/2 framing is left out. Reports the time for one
//! changed cluster to reach every client, resident memory per connected client,
//! and the cost of encoding a full response from shared bytes against the naive
//! baseline (re-encoding every resource per stream with prost), in the same process.
//! Runs state of the world and incremental (delta) ADS side by side.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly

use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ConfigSource, Node, config_source,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds::{
    AdsService, Resource, Snapshot, SnapshotCache, encode_delta_response, encode_response, type_url,
};

const CLUSTERS: usize = 1_000;

fn cluster(i: usize, timeout_ms: i32) -> Cluster {
    Cluster {
        name: format!(
            "outbound|8080||service-{i}.namespace-{}.svc.cluster.local",
            i % 10
        ),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                resource_api_version: 2,
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(PbDuration {
            seconds: 0,
            nanos: timeout_ms * 1_000_000,
        }),
        ..Default::default()
    }
}

fn snapshot(clusters: &[Cluster]) -> Snapshot {
    Snapshot::new().with(
        type_url::CLUSTER,
        clusters
            .iter()
            .map(|c| Resource::encode(type_url::CLUSTER, &c.name, c)),
    )
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Row {
    clients: usize,
    connect: Duration,
    change: Duration,
    per_client_kib: f64,
    /// Wire bytes one client received for the change.
    change_bytes: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Sotw,
    Delta,
}

/// What a simulated client reports per response: the version and the wire size.
type Seen = mpsc::UnboundedSender<(String, usize)>;

/// Opens one client stream that ACKs every response; returns what keeps it open.
async fn spawn_client(
    ads: &AdsService,
    i: usize,
    protocol: Protocol,
    seen_tx: Seen,
) -> Box<dyn std::any::Any + Send> {
    let node = Some(Node {
        id: format!("node-{i}"),
        ..Default::default()
    });
    match protocol {
        Protocol::Sotw => {
            let (req_tx, req_rx) = mpsc::channel::<Result<DiscoveryRequest, tonic::Status>>(4);
            let mut responses = ads.open_stream(Default::default(), ReceiverStream::new(req_rx));
            req_tx
                .send(Ok(DiscoveryRequest {
                    node,
                    type_url: type_url::CLUSTER.into(),
                    ..Default::default()
                }))
                .await
                .unwrap();
            let ack_tx = req_tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(resp)) = responses.recv().await {
                    // What the gRPC codec does per stream (its buffer is not kept per stream).
                    let mut wire = Vec::with_capacity(256 * 1024);
                    encode_response(&resp, &mut wire);
                    let ack = DiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        version_info: resp.version_info.to_string(),
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    };
                    if ack_tx.send(Ok(ack)).await.is_err()
                        || seen_tx
                            .send((resp.version_info.to_string(), wire.len()))
                            .is_err()
                    {
                        return;
                    }
                }
            });
            Box::new(req_tx)
        }
        Protocol::Delta => {
            let (req_tx, req_rx) = mpsc::channel::<Result<DeltaDiscoveryRequest, tonic::Status>>(4);
            let mut responses =
                ads.open_delta_stream(Default::default(), ReceiverStream::new(req_rx));
            req_tx
                .send(Ok(DeltaDiscoveryRequest {
                    node,
                    type_url: type_url::CLUSTER.into(),
                    ..Default::default()
                }))
                .await
                .unwrap();
            let ack_tx = req_tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(resp)) = responses.recv().await {
                    let mut wire = Vec::with_capacity(256 * 1024);
                    encode_delta_response(&resp, &mut wire);
                    let ack = DeltaDiscoveryRequest {
                        type_url: resp.type_url.clone(),
                        response_nonce: resp.nonce.clone(),
                        ..Default::default()
                    };
                    if ack_tx.send(Ok(ack)).await.is_err()
                        || seen_tx
                            .send((resp.system_version_info.to_string(), wire.len()))
                            .is_err()
                    {
                        return;
                    }
                }
            });
            Box::new(req_tx)
        }
    }
}

async fn run_case(clients: usize, protocol: Protocol) -> Row {
    let mut clusters: Vec<Cluster> = (0..CLUSTERS).map(|i| cluster(i, 1000)).collect();
    let cache = SnapshotCache::new();
    let first = snapshot(&clusters);
    for i in 0..clients {
        cache.set(&format!("node-{i}"), first.clone());
    }
    let (ads, supervisor) = AdsService::new(cache.clone());
    let supervisor = tokio::spawn(supervisor.run());
    let rss_before = rss_bytes();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, usize)>();
    let started = Instant::now();
    let mut request_senders = Vec::with_capacity(clients);
    for i in 0..clients {
        request_senders.push(spawn_client(&ads, i, protocol, seen_tx.clone()).await);
    }
    for _ in 0..clients {
        seen_rx.recv().await.unwrap();
    }
    let connect = started.elapsed();
    let per_client_kib = rss_bytes().saturating_sub(rss_before) as f64 / clients as f64 / 1024.0;

    // One cluster changes; every client must receive the new CDS version.
    clusters[CLUSTERS / 2] = cluster(CLUSTERS / 2, 2000);
    let started = Instant::now();
    let next = snapshot(&clusters);
    for i in 0..clients {
        cache.set(&format!("node-{i}"), next.clone());
    }
    let mut version = None;
    let mut delivered = 0;
    let mut change_bytes = 0;
    while delivered < clients {
        let (v, bytes) = seen_rx.recv().await.unwrap();
        change_bytes = bytes;
        version.get_or_insert_with(|| v.clone());
        assert_eq!(
            Some(&v),
            version.as_ref(),
            "every client gets the same version"
        );
        delivered += 1;
    }
    let change = started.elapsed();
    drop(request_senders);
    supervisor.abort();
    Row {
        clients,
        connect,
        change,
        per_client_kib,
        change_bytes,
    }
}

/// Encoding one full CDS response: shared pre-encoded bytes vs prost per stream.
fn encoding_ratio() -> (Duration, Duration) {
    let clusters: Vec<Cluster> = (0..CLUSTERS).map(|i| cluster(i, 1000)).collect();
    let snap = snapshot(&clusters);
    let mut conn = weft_xds::AdsConnection::new();
    conn.on_request(&DiscoveryRequest {
        node: Some(Node {
            id: "n".into(),
            ..Default::default()
        }),
        type_url: type_url::CLUSTER.into(),
        ..Default::default()
    })
    .unwrap();
    let shared = conn.next_responses(&snap).remove(0);
    let rounds = 200;
    let mut buf = Vec::new();
    let t = Instant::now();
    for _ in 0..rounds {
        buf.clear();
        encode_response(&shared, &mut buf);
    }
    let ours = t.elapsed() / rounds;
    let naive_len = buf.len();
    let t = Instant::now();
    for _ in 0..rounds {
        let response = DiscoveryResponse {
            version_info: shared.version_info.to_string(),
            type_url: shared.type_url.clone(),
            nonce: shared.nonce.clone(),
            resources: clusters
                .iter()
                .map(|c| Any {
                    type_url: type_url::CLUSTER.into(),
                    value: c.encode_to_vec(),
                })
                .collect(),
            ..Default::default()
        };
        buf = response.encode_to_vec();
    }
    let naive = t.elapsed() / rounds;
    assert_eq!(buf.len(), naive_len, "both encodings have the same size");
    (ours, naive)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sizes: Vec<usize> = std::env::var("WEFT_BENCH_CLIENTS")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1_000, 10_000]);
    println!(
        "xDS fan-out: {CLUSTERS} clusters per snapshot, CDS, one changed cluster pushed to every client"
    );
    println!(
        "| ADS   | clients | initial sync | one change to all | bytes per client for it | RSS per client |"
    );
    println!(
        "|-------|--------:|-------------:|------------------:|------------------------:|---------------:|"
    );
    for n in sizes {
        for protocol in [Protocol::Sotw, Protocol::Delta] {
            let row = runtime.block_on(run_case(n, protocol));
            println!(
                "| {:<5} | {:>7} | {:>9.1} ms | {:>14.1} ms | {:>23} | {:>10.1} KiB |",
                format!("{protocol:?}").to_lowercase(),
                row.clients,
                row.connect.as_secs_f64() * 1e3,
                row.change.as_secs_f64() * 1e3,
                row.change_bytes,
                row.per_client_kib
            );
        }
    }
    let (ours, naive) = encoding_ratio();
    println!();
    println!(
        "encoding one {CLUSTERS}-cluster response: shared bytes {:.1} µs, prost per stream (baseline) {:.1} µs, {:.1}x faster",
        ours.as_secs_f64() * 1e6,
        naive.as_secs_f64() * 1e6,
        naive.as_secs_f64() / ours.as_secs_f64()
    );
}
