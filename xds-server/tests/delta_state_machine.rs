//! Drives the incremental (delta) ADS state machine as Envoy does: subscribe, ACK,
//! NACK, unsubscribe, reconnect with the versions it already has.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

mod common;
use common::{cluster, load_assignment};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use weft_xds::{
    DeltaAdsConnection, DeltaResponse, RequestEvent, Resource, Snapshot, encode_delta_response,
    type_url,
};

fn route(name: &str, domain: &str) -> Resource {
    let r = RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![envoy_types::pb::envoy::config::route::v3::VirtualHost {
            name: domain.to_string(),
            domains: vec![domain.to_string()],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::encode(type_url::ROUTE, name, &r)
}

fn subscribe(type_url: &str, names: &[&str]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "default/client".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn ack(type_url: &str, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        response_nonce: nonce.into(),
        ..subscribe(type_url, &[])
    }
}

/// ACKs every response in `out`.
fn ack_all(conn: &mut DeltaAdsConnection, out: &[DeltaResponse]) {
    for r in out {
        conn.on_request(&ack(&r.type_url, &r.nonce)).unwrap();
    }
}

fn nack(type_url: &str, nonce: &str, msg: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(RpcStatus {
            code: 3,
            message: msg.into(),
            details: vec![],
        }),
        ..ack(type_url, nonce)
    }
}

fn decode(r: &DeltaResponse) -> DeltaDiscoveryResponse {
    let mut buf = Vec::new();
    encode_delta_response(r, &mut buf);
    assert_eq!(
        buf.len(),
        weft_xds::WireResponse::encoded_len(r),
        "length known up front"
    );
    DeltaDiscoveryResponse::decode(buf.as_slice()).expect("response decodes")
}

fn names(r: &DeltaResponse) -> Vec<&str> {
    r.resources().iter().map(Resource::name).collect()
}

fn clusters(n: usize, timeout_ms: i64) -> Vec<Resource> {
    (0..n)
        .map(|i| cluster(&format!("c{i}"), timeout_ms))
        .collect()
}

#[test]
fn the_wire_form_is_a_delta_discovery_response_with_named_versioned_resources() {
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap();
    let snap = Snapshot::new().with(type_url::CLUSTER, [cluster("a", 250)]);
    let out = conn.next_responses(&snap);
    assert_eq!(out.len(), 1);
    let wire = decode(&out[0]);
    assert_eq!(wire.type_url, type_url::CLUSTER);
    assert_eq!(wire.nonce, out[0].nonce);
    assert_eq!(wire.system_version_info, &*out[0].system_version_info);
    assert_eq!(wire.resources.len(), 1);
    let r = &wire.resources[0];
    assert_eq!(r.name, "a");
    assert_eq!(r.version, cluster("a", 250).version());
    let any = r.resource.as_ref().expect("resource body");
    let decoded = Cluster::decode(any.value.as_slice()).unwrap();
    assert_eq!(decoded.name, "a");
    assert_eq!(decoded.connect_timeout.unwrap().nanos, 250_000_000);
}

#[test]
fn only_changed_resources_are_sent_and_removals_come_last() {
    let mut conn = DeltaAdsConnection::new();
    assert_eq!(
        conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap(),
        RequestEvent::Subscribe
    );
    conn.on_request(&subscribe(type_url::ROUTE, &["r"]))
        .unwrap();
    let mut all = clusters(100, 1000);
    let first = conn.next_responses(
        &Snapshot::new()
            .with(type_url::CLUSTER, all.clone())
            .with(type_url::ROUTE, [route("r", "one")]),
    );
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].resources().len(), 100, "initial: everything");
    assert_eq!(names(&first[1]), vec!["r"]);
    ack_all(&mut conn, &first);

    // One cluster changes, one is added, one goes away, and the route moves to the
    // new cluster: additions (CDS before RDS) first, then the removal.
    all[7] = cluster("c7", 2000);
    all.remove(3);
    all.push(cluster("new", 1000));
    let next = conn.next_responses(
        &Snapshot::new()
            .with(type_url::CLUSTER, all.clone())
            .with(type_url::ROUTE, [route("r", "two")]),
    );
    assert_eq!(next.len(), 3, "{next:?}");
    assert_eq!(names(&next[0]), vec!["c7", "new"]);
    assert!(next[0].removed.is_empty());
    assert_eq!(names(&next[1]), vec!["r"]);
    assert!(next[2].resources().is_empty());
    assert_eq!(next[2].removed, vec!["c3"]);
    assert_eq!(next[2].type_url, type_url::CLUSTER);

    // Nothing changed: nothing sent.
    ack_all(&mut conn, &next);
    let same = conn.next_responses(
        &Snapshot::new()
            .with(type_url::CLUSTER, all)
            .with(type_url::ROUTE, [route("r", "two")]),
    );
    assert!(same.is_empty(), "{same:?}");
}

#[test]
fn a_nack_is_remembered_and_never_resent() {
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap();
    let bad = Snapshot::new().with(type_url::CLUSTER, [cluster("a", -5)]);
    let out = conn.next_responses(&bad);
    let event = conn
        .on_request(&nack(type_url::CLUSTER, &out[0].nonce, "bad timeout"))
        .unwrap();
    let RequestEvent::Nack(n) = event else {
        panic!("expected a NACK, got {event:?}")
    };
    assert_eq!(n.message, "bad timeout");
    assert!(conn.next_responses(&bad).is_empty(), "no NACK loop");
    let sync = conn.sync_state();
    assert_eq!(
        sync[0].last_nack.as_ref().map(|n| n.message.as_str()),
        Some("bad timeout")
    );

    let good = Snapshot::new().with(type_url::CLUSTER, [cluster("a", 100)]);
    let fixed = conn.next_responses(&good);
    assert_eq!(names(&fixed[0]), vec!["a"]);
    conn.on_request(&ack(type_url::CLUSTER, &fixed[0].nonce))
        .unwrap();
    let sync = conn.sync_state();
    assert!(sync[0].last_nack.is_none(), "an ACK clears the NACK");
    assert_eq!(sync[0].acked_version, sync[0].sent_version);
}

#[test]
fn explicit_subscriptions_follow_subscribe_and_unsubscribe() {
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::ROUTE, &["a"]))
        .unwrap();
    let snap = Snapshot::new().with(type_url::ROUTE, [route("a", "a"), route("b", "b")]);
    let out = conn.next_responses(&snap);
    assert_eq!(names(&out[0]), vec!["a"], "only what was asked for");
    conn.on_request(&ack(type_url::ROUTE, &out[0].nonce))
        .unwrap();

    // Subscribing to b and to a name that does not exist: b is sent, the missing one
    // is answered as removed so the proxy stops waiting for it.
    let more = DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["b".into(), "ghost".into()],
        ..subscribe(type_url::ROUTE, &[])
    };
    assert_eq!(
        conn.on_request(&more).unwrap(),
        RequestEvent::SubscriptionChanged
    );
    let out = conn.next_responses(&snap);
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(names(&out[0]), vec!["b"]);
    assert_eq!(out[1].removed, vec!["ghost"]);

    // Unsubscribed resources are dropped by the proxy itself: no removal is sent, and
    // later changes to them are not sent either.
    let less = DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["a".into()],
        ..subscribe(type_url::ROUTE, &[])
    };
    conn.on_request(&less).unwrap();
    let changed = Snapshot::new().with(type_url::ROUTE, [route("a", "a2"), route("b", "b")]);
    assert!(conn.next_responses(&changed).is_empty());
}

#[test]
fn a_reconnect_sends_only_what_differs_from_the_initial_versions() {
    let all = clusters(50, 1000);
    let mut conn = DeltaAdsConnection::new();
    let mut first = subscribe(type_url::CLUSTER, &[]);
    first.initial_resource_versions = all
        .iter()
        .map(|r| (r.name().to_string(), r.version().to_string()))
        .collect();
    // The proxy still has c0..c49 from before; c9 changed while it was away and c49
    // is gone.
    let mut now = all.clone();
    now[9] = cluster("c9", 3000);
    now.pop();
    conn.on_request(&first).unwrap();
    let out = conn.next_responses(&Snapshot::new().with(type_url::CLUSTER, now));
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(names(&out[0]), vec!["c9"]);
    assert_eq!(out[1].removed, vec!["c49"]);
}

#[test]
fn an_empty_wildcard_subscription_is_still_answered() {
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::LISTENER, &[]))
        .unwrap();
    let out = conn.next_responses(&Snapshot::new());
    assert_eq!(out.len(), 1, "Envoy waits for the first LDS response");
    assert!(out[0].resources().is_empty() && out[0].removed.is_empty());
    conn.on_request(&ack(type_url::LISTENER, &out[0].nonce))
        .unwrap();
    assert!(conn.next_responses(&Snapshot::new()).is_empty());
}

#[test]
fn streams_making_the_same_move_share_one_diff() {
    let memo = std::sync::Arc::new(weft_xds::DiffMemo::default());
    let mut streams: Vec<DeltaAdsConnection> = (0..2)
        .map(|_| DeltaAdsConnection::with_memo(memo.clone()))
        .collect();
    // Large enough to be memoised (small layers are cheaper to diff again).
    let mut all = clusters(100, 1000);
    let first = Snapshot::new().with(type_url::CLUSTER, all.clone());
    for conn in &mut streams {
        conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap();
        let out = conn.next_responses(&first);
        conn.on_request(&ack(type_url::CLUSTER, &out[0].nonce))
            .unwrap();
    }
    all[5] = cluster("c5", 2000);
    let second = Snapshot::new().with(type_url::CLUSTER, all);
    let moves: Vec<DeltaResponse> = streams
        .iter_mut()
        .map(|conn| conn.next_responses(&second).remove(0))
        .collect();
    assert_eq!(names(&moves[0]), vec!["c5"]);
    assert!(
        std::ptr::eq(moves[0].resources(), moves[1].resources()),
        "the second stream reuses the first one's diff"
    );
}

#[test]
fn a_large_initial_push_is_split_into_bounded_responses_that_each_need_an_ack() {
    // Clusters with ~2 KiB of metadata each: 1000 of them are ~2 MiB on the wire.
    let big = |i: usize| {
        let c = Cluster {
            name: format!("c{i:04}"),
            alt_stat_name: "x".repeat(2048),
            ..Default::default()
        };
        Resource::encode(type_url::CLUSTER, &c.name, &c)
    };
    let all: Vec<Resource> = (0..1000).map(big).collect();
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap();
    let out = conn.next_responses(&Snapshot::new().with(type_url::CLUSTER, all.clone()));
    assert!(out.len() >= 8, "~2 MiB in {} responses", out.len());
    let mut seen = Vec::new();
    for r in &out {
        let mut wire = Vec::new();
        encode_delta_response(r, &mut wire);
        assert!(
            wire.len() <= weft_xds::MAX_RESPONSE_BYTES + 1024,
            "{} bytes",
            wire.len()
        );
        seen.extend(decode(r).resources.into_iter().map(|x| x.name));
    }
    let expected: Vec<String> = all.iter().map(|r| r.name().to_string()).collect();
    assert_eq!(seen, expected, "every cluster exactly once, in order");

    // The type counts as in sync only once the last part is ACKed.
    for r in &out[..out.len() - 1] {
        assert!(matches!(
            conn.on_request(&ack(type_url::CLUSTER, &r.nonce)).unwrap(),
            RequestEvent::Ack { .. }
        ));
    }
    let last = out.last().unwrap();
    assert_eq!(
        conn.on_request(&ack(type_url::CLUSTER, &last.nonce))
            .unwrap(),
        RequestEvent::Ack {
            version: last.system_version_info.clone()
        }
    );
    assert!(
        conn.next_responses(&Snapshot::new().with(type_url::CLUSTER, all))
            .is_empty()
    );
}

/// A view of route layers, first one deciding a name several hold.
fn routes(layers: &[&std::sync::Arc<weft_xds::Layer>]) -> Snapshot {
    let mut s = Snapshot::new();
    for l in layers {
        s.add_layer(type_url::ROUTE, (*l).clone());
    }
    s
}

/// Serves `layer` as the route set: exactly one response must go out, carrying the
/// route `expected` alone. ACKs it and returns it.
fn sends_one(
    conn: &mut DeltaAdsConnection,
    layer: &std::sync::Arc<weft_xds::Layer>,
    expected: &str,
) -> DeltaResponse {
    let out = conn.next_responses(&routes(&[layer]));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(names(&out[0]), vec![expected]);
    ack_all(conn, &out);
    out.into_iter().next().unwrap()
}

#[test]
fn an_overriding_layer_shadows_a_shared_name_and_its_removal_restores_it() {
    use std::sync::Arc;
    use weft_xds::Layer;
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::ROUTE, &["a", "b"]))
        .unwrap();
    let shared = Arc::new(Layer::new([route("a", "shared-a"), route("b", "shared-b")]));
    let consumer = Arc::new(Layer::new([route("b", "consumer-b")]));
    let view = routes(&[&consumer, &shared]);
    let typed = view.resources(type_url::ROUTE).unwrap();
    assert_eq!(typed.len(), 2, "a shadowed name counts once");
    assert_eq!(typed.iter().count(), 2);
    let first = conn.next_responses(&view);
    let mut sent: Vec<(String, String)> = first
        .iter()
        .flat_map(|r| decode(r).resources)
        .map(|r| {
            let rc = RouteConfiguration::decode(r.resource.unwrap().value.as_slice()).unwrap();
            (rc.name, rc.virtual_hosts[0].name.clone())
        })
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("a".to_string(), "shared-a".to_string()),
            ("b".to_string(), "consumer-b".to_string())
        ]
    );
    ack_all(&mut conn, &first);
    // The shared layer changes under the override: only what shows changes is sent.
    let shared2 = Arc::new(Layer::new([
        route("a", "shared-a"),
        route("b", "shared-b2"),
    ]));
    let next = conn.next_responses(&routes(&[&consumer, &shared2]));
    assert!(next.is_empty(), "a shadowed change is invisible: {next:?}");
    // The override goes: the shared resource is sent again, nothing is removed.
    let next = conn.next_responses(&routes(&[&shared2]));
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(names(&next[0]), vec!["b"]);
    assert!(next[0].removed.is_empty());
    let vh = RouteConfiguration::decode(
        decode(&next[0]).resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_slice(),
    )
    .unwrap()
    .virtual_hosts[0]
        .name
        .clone();
    assert_eq!(vh, "shared-b2");
    ack_all(&mut conn, &next);
    // And comes back: its version replaces the shared one.
    let back = conn.next_responses(&routes(&[&consumer, &shared2]));
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(names(&back[0]), vec!["b"]);
}

#[test]
fn a_changed_cluster_gets_its_unchanged_endpoints_again_to_finish_warming() {
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::CLUSTER, &[])).unwrap();
    conn.on_request(&subscribe(type_url::ENDPOINT, &["a", "b"]))
        .unwrap();
    let endpoints = [load_assignment("a", 1), load_assignment("b", 2)];
    let first = conn.next_responses(
        &Snapshot::new()
            .with(type_url::CLUSTER, [cluster("a", 250), cluster("b", 250)])
            .with(type_url::ENDPOINT, endpoints.clone()),
    );
    ack_all(&mut conn, &first);
    // Cluster a changes, b does not, c is new: a's endpoints go out again (Envoy warms
    // the new a until they come and does not ask for a name it already has); b's do not.
    let next = conn.next_responses(
        &Snapshot::new()
            .with(
                type_url::CLUSTER,
                [cluster("a", 500), cluster("b", 250), cluster("c", 250)],
            )
            .with(type_url::ENDPOINT, endpoints),
    );
    let by_type: Vec<(&str, Vec<&str>)> = next
        .iter()
        .map(|r| (type_url::short_name(&r.type_url), names(r)))
        .collect();
    assert_eq!(
        by_type,
        vec![("CDS", vec!["a", "c"]), ("EDS", vec!["a"])],
        "{next:?}"
    );
}

#[test]
fn a_subscription_covering_the_whole_view_still_gets_only_its_names_when_the_view_grows() {
    use std::sync::Arc;
    use weft_xds::Layer;
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::ROUTE, &["a", "b"]))
        .unwrap();
    let first = Arc::new(Layer::new([route("a", "a"), route("b", "b")]));
    let out = conn.next_responses(&routes(&[&first]));
    assert_eq!(names(&out[0]), vec!["a", "b"]);
    ack_all(&mut conn, &out);

    // The shared layer changes a and gains c, which nobody asked for: only a goes out.
    let grown = Arc::new(Layer::new([
        route("a", "a2"),
        route("b", "b"),
        route("c", "c"),
    ]));
    sends_one(&mut conn, &grown, "a");

    let served: Vec<String> = conn
        .served()
        .snapshot()
        .resources(type_url::ROUTE)
        .unwrap()
        .iter()
        .map(|r| r.name().to_string())
        .collect();
    assert_eq!(
        served,
        vec!["a", "b"],
        "what the proxy was not sent is not shown as served"
    );
    assert_eq!(conn.sync_state()[0].sent_resources, 2);

    // A change to c alone is none of the proxy's business; one to b is.
    let c2 = Arc::new(Layer::new([
        route("a", "a2"),
        route("b", "b2"),
        route("c", "c2"),
    ]));
    sends_one(&mut conn, &c2, "b");

    // Subscribing to c brings it; the view is whole again, and a later change to c
    // (and only that) goes out.
    conn.on_request(&subscribe(type_url::ROUTE, &["c"]))
        .unwrap();
    let out = conn.next_responses(&routes(&[&c2]));
    assert_eq!(names(&out[0]), vec!["c"]);
    ack_all(&mut conn, &out);
    let c3 = Arc::new(Layer::new([
        route("a", "a2"),
        route("b", "b2"),
        route("c", "c3"),
        route("d", "d"),
    ]));
    sends_one(&mut conn, &c3, "c");

    // Unsubscribing from a: later changes to a are not sent, b's are.
    conn.on_request(&DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["a".into()],
        ..subscribe(type_url::ROUTE, &[])
    })
    .unwrap();
    let a4 = Arc::new(Layer::new([
        route("a", "a4"),
        route("b", "b4"),
        route("c", "c3"),
    ]));
    let out = sends_one(&mut conn, &a4, "b");
    assert!(out.removed.is_empty(), "{out:?}");
}

#[test]
fn an_unsubscribed_name_that_comes_and_goes_is_never_sent_nor_removed_however_many() {
    use std::sync::Arc;
    use weft_xds::Layer;
    let mut conn = DeltaAdsConnection::new();
    conn.on_request(&subscribe(type_url::ROUTE, &["a"]))
        .unwrap();
    let out = conn.next_responses(&routes(&[&Arc::new(Layer::new([route("a", "a")]))]));
    ack_all(&mut conn, &out);
    // x appears (unsubscribed), then goes: the proxy hears of neither.
    let with_x = Arc::new(Layer::new([route("a", "a"), route("x", "x")]));
    assert!(conn.next_responses(&routes(&[&with_x])).is_empty());
    let without_x = Arc::new(Layer::new([route("a", "a2")]));
    let out = sends_one(&mut conn, &without_x, "a");
    assert!(out.removed.is_empty(), "x was never the proxy's: {out:?}");

    // Far more unsubscribed names than a stream withholds: still none of them is sent,
    // and a change to a still is.
    let many: Vec<Resource> = std::iter::once(route("a", "a3"))
        .chain((0..200).map(|i| route(&format!("n{i:03}"), "n")))
        .collect();
    let many = Arc::new(Layer::new(many));
    sends_one(&mut conn, &many, "a");

    // Subscribing to one of them sends it alone; they all go: only it is removed.
    conn.on_request(&subscribe(type_url::ROUTE, &["n007"]))
        .unwrap();
    let out = conn.next_responses(&routes(&[&many]));
    assert_eq!(names(&out[0]), vec!["n007"]);
    ack_all(&mut conn, &out);
    let out = conn.next_responses(&routes(&[&without_x]));
    let removed: Vec<&String> = out.iter().flat_map(|r| &r.removed).collect();
    assert_eq!(removed, vec!["n007"], "{out:?}");
}
