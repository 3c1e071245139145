//! Drives the ADS state machine with request/ACK/NACK messages, as Envoy sends them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

mod common;
use common::{cluster, load_assignment};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use weft_xds::{
    AdsConnection, AdsResponse, RequestEvent, Resource, Snapshot, encode_response, type_url,
};

fn route(name: &str) -> Resource {
    let r = RouteConfiguration {
        name: name.to_string(),
        ..Default::default()
    };
    Resource::encode(type_url::ROUTE, name, &r)
}

fn request(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "default/client".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn nack(type_url: &str, version: &str, nonce: &str, msg: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: msg.into(),
            details: vec![],
        }),
        ..request(type_url, &[], version, nonce)
    }
}

fn decode(r: &AdsResponse) -> DiscoveryResponse {
    let mut buf = Vec::new();
    encode_response(r, &mut buf);
    DiscoveryResponse::decode(buf.as_slice()).expect("response decodes")
}

fn snapshot(clusters: &[Resource], routes: &[Resource]) -> Snapshot {
    Snapshot::new()
        .with(type_url::CLUSTER, clusters.iter().cloned())
        .with(type_url::ROUTE, routes.iter().cloned())
}

#[test]
fn initial_request_gets_full_state_and_encodes_as_discovery_response() {
    let mut conn = AdsConnection::new();
    let ev = conn
        .on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    assert_eq!(ev, RequestEvent::Subscribe);
    assert_eq!(conn.node_id(), Some("default/client"));
    let out = conn.next_responses(&snapshot(&[cluster("a", 100), cluster("b", 100)], &[]));
    assert_eq!(out.len(), 1);
    let resp = decode(&out[0]);
    assert_eq!(resp.type_url, type_url::CLUSTER);
    assert_eq!(resp.nonce, out[0].nonce);
    assert_eq!(resp.version_info, &*out[0].version_info);
    let names: Vec<String> = resp
        .resources
        .iter()
        .map(|any| Cluster::decode(any.value.as_slice()).unwrap().name)
        .collect();
    assert_eq!(names, vec!["a", "b"]);
}

#[test]
fn ack_with_unchanged_snapshot_sends_nothing() {
    let mut conn = AdsConnection::new();
    let snap = snapshot(&[cluster("a", 100)], &[]);
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let first = conn.next_responses(&snap).remove(0);
    let ev = conn
        .on_request(&request(
            type_url::CLUSTER,
            &[],
            &first.version_info,
            &first.nonce,
        ))
        .unwrap();
    assert_eq!(
        ev,
        RequestEvent::Ack {
            version: first.version_info.clone()
        }
    );
    assert!(conn.next_responses(&snap).is_empty());
    // An equal snapshot built anew (same bytes) is no change either.
    assert!(
        conn.next_responses(&snapshot(&[cluster("a", 100)], &[]))
            .is_empty()
    );
    let sync = conn.sync_state();
    assert_eq!(sync[0].acked_version.as_deref(), Some(&*first.version_info));
}

#[test]
fn nack_is_remembered_and_not_resent_until_the_next_change() {
    let mut conn = AdsConnection::new();
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let good = conn
        .next_responses(&snapshot(&[cluster("a", 100)], &[]))
        .remove(0);
    conn.on_request(&request(
        type_url::CLUSTER,
        &[],
        &good.version_info,
        &good.nonce,
    ))
    .unwrap();

    let bad_snap = snapshot(&[cluster("a", 999)], &[]);
    let bad = conn.next_responses(&bad_snap).remove(0);
    let ev = conn
        .on_request(&nack(
            type_url::CLUSTER,
            &good.version_info,
            &bad.nonce,
            "bad cluster",
        ))
        .unwrap();
    match ev {
        RequestEvent::Nack(n) => {
            assert_eq!(n.message, "bad cluster");
            assert_eq!(n.version, bad.version_info);
        }
        other => panic!("expected NACK, got {other:?}"),
    }
    // Same snapshot again: no loop.
    assert!(conn.next_responses(&bad_snap).is_empty());
    assert!(conn.next_responses(&bad_snap).is_empty());
    assert_eq!(
        conn.sync_state()[0]
            .last_nack
            .as_ref()
            .map(|n| n.message.as_str()),
        Some("bad cluster")
    );
    // The next change goes out.
    let fixed = conn.next_responses(&snapshot(&[cluster("a", 200)], &[]));
    assert_eq!(fixed.len(), 1);
    conn.on_request(&request(
        type_url::CLUSTER,
        &[],
        &fixed[0].version_info,
        &fixed[0].nonce,
    ))
    .unwrap();
    assert!(conn.sync_state()[0].last_nack.is_none());
}

#[test]
fn stale_nonce_is_ignored() {
    let mut conn = AdsConnection::new();
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let first = conn
        .next_responses(&snapshot(&[cluster("a", 100)], &[]))
        .remove(0);
    let second = conn
        .next_responses(&snapshot(&[cluster("a", 200)], &[]))
        .remove(0);
    assert_ne!(first.nonce, second.nonce);
    let ev = conn
        .on_request(&nack(type_url::CLUSTER, "", &first.nonce, "old"))
        .unwrap();
    assert_eq!(ev, RequestEvent::Stale);
    assert!(conn.sync_state()[0].last_nack.is_none());
}

#[test]
fn non_wildcard_types_send_only_subscribed_names_and_answer_subscription_changes() {
    let mut conn = AdsConnection::new();
    let snap = snapshot(&[], &[route("r1"), route("r2")]);
    conn.on_request(&request(type_url::ROUTE, &["r1"], "", ""))
        .unwrap();
    let first = conn.next_responses(&snap).remove(0);
    assert_eq!(first.names(), vec!["r1"]);
    let ev = conn
        .on_request(&request(
            type_url::ROUTE,
            &["r1", "r2"],
            &first.version_info,
            &first.nonce,
        ))
        .unwrap();
    assert_eq!(ev, RequestEvent::SubscriptionChanged);
    let second = conn.next_responses(&snap).remove(0);
    assert_eq!(second.names(), vec!["r1", "r2"]);
}

#[test]
fn updates_go_out_clusters_first_and_removals_last() {
    let mut conn = AdsConnection::new();
    conn.on_request(&request(type_url::ROUTE, &["r"], "", ""))
        .unwrap();
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let first = conn.next_responses(&snapshot(&[cluster("old", 100)], &[route("r")]));
    let order: Vec<&str> = first
        .iter()
        .map(|r| type_url::short_name(&r.type_url))
        .collect();
    assert_eq!(order, vec!["CDS", "RDS"]);

    // "old" is replaced by "new" and the route changes to point at "new".
    let r2 = Resource::encode(
        type_url::ROUTE,
        "r",
        &RouteConfiguration {
            name: "r".into(),
            validate_clusters: Some(envoy_types::pb::google::protobuf::BoolValue { value: true }),
            ..Default::default()
        },
    );
    let out = conn.next_responses(&snapshot(&[cluster("new", 100)], &[r2]));
    let seq: Vec<(String, Vec<String>)> = out
        .iter()
        .map(|r| (type_url::short_name(&r.type_url).to_string(), r.names()))
        .collect();
    assert_eq!(
        seq,
        vec![
            (
                "CDS".to_string(),
                vec!["new".to_string(), "old".to_string()]
            ),
            ("RDS".to_string(), vec!["r".to_string()]),
            ("CDS".to_string(), vec!["new".to_string()]),
        ]
    );
}

#[test]
fn reconnect_after_restart_is_answered_even_when_versions_match() {
    let snap = snapshot(&[cluster("a", 100)], &[]);
    let mut before = AdsConnection::new();
    before
        .on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let version = before.next_responses(&snap).remove(0).version_info;

    let mut after = AdsConnection::new();
    after
        .on_request(&request(type_url::CLUSTER, &[], &version, ""))
        .unwrap();
    let out = after.next_responses(&snap);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].version_info, version,
        "same content keeps the same version across restarts"
    );
}

#[test]
fn requests_without_node_or_type_are_errors() {
    let mut conn = AdsConnection::new();
    let mut r = request(type_url::CLUSTER, &[], "", "");
    r.node = None;
    assert!(conn.on_request(&r).is_err());
    let mut r = request("", &[], "", "");
    r.type_url.clear();
    assert!(conn.on_request(&r).is_err());
}

#[test]
fn a_name_two_layers_hold_is_sent_once_as_the_first_layer_has_it() {
    use std::sync::Arc;
    use weft_xds::Layer;
    let mut conn = AdsConnection::new();
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    let mut view = Snapshot::new();
    view.add_layer(type_url::CLUSTER, Arc::new(Layer::new([cluster("b", 200)])));
    view.add_layer(
        type_url::CLUSTER,
        Arc::new(Layer::new([cluster("a", 100), cluster("b", 100)])),
    );
    let out = conn.next_responses(&view);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].names(), vec!["a", "b"]);
    let wire = decode(&out[0]);
    assert_eq!(wire.resources.len(), 2, "the shadowed b is not sent");
    let b = wire
        .resources
        .iter()
        .map(|r| Cluster::decode(r.value.as_slice()).unwrap())
        .find(|c| c.name == "b")
        .unwrap();
    assert_eq!(b.connect_timeout.unwrap().nanos, 200_000_000);
}

#[test]
fn a_changed_cluster_gets_its_unchanged_endpoints_again_to_finish_warming() {
    let mut conn = AdsConnection::new();
    conn.on_request(&request(type_url::CLUSTER, &[], "", ""))
        .unwrap();
    conn.on_request(&request(type_url::ENDPOINT, &["a"], "", ""))
        .unwrap();
    let snap = |timeout_ms| {
        Snapshot::new()
            .with(type_url::CLUSTER, [cluster("a", timeout_ms)])
            .with(type_url::ENDPOINT, [load_assignment("a", 1)])
    };
    let first = conn.next_responses(&snap(250));
    assert_eq!(first.len(), 2);
    for r in &first {
        let wire = decode(r);
        let names: &[&str] = if wire.type_url == type_url::ENDPOINT {
            &["a"]
        } else {
            &[]
        };
        conn.on_request(&request(
            &wire.type_url,
            names,
            &wire.version_info,
            &wire.nonce,
        ))
        .unwrap();
    }
    // Nothing changed: nothing goes out.
    assert!(conn.next_responses(&snap(250)).is_empty());
    // The cluster changes, its endpoints do not: both go out, endpoints after it.
    let next = conn.next_responses(&snap(500));
    let types: Vec<String> = next.iter().map(|r| decode(r).type_url).collect();
    assert_eq!(types, vec![type_url::CLUSTER, type_url::ENDPOINT]);
    assert_eq!(decode(&next[1]).resources.len(), 1);
}
