//! Snapshot cache: per-node snapshots over shared layers, the fallback for unknown
//! nodes, arrivals and departures reported, no wake-up on no change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;
use common::cluster;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use weft_xds::{
    Admission, NodeDemand, NodeSnapshot, Resource, Snapshot, SnapshotCache, SnapshotSource,
    type_url,
};

fn snap(clusters: &[&str]) -> Snapshot {
    Snapshot::new().with(
        type_url::CLUSTER,
        clusters.iter().map(|c| {
            let cluster = Cluster {
                name: c.to_string(),
                ..Default::default()
            };
            Resource::encode(type_url::CLUSTER, *c, &cluster)
        }),
    )
}

fn names(s: &Snapshot) -> Vec<String> {
    let mut names: Vec<String> = s
        .resources(type_url::CLUSTER)
        .unwrap()
        .iter()
        .map(|r| r.name().to_string())
        .collect();
    names.sort();
    names
}

const ANY: Admission = Admission::OwnOrFallback;

#[tokio::test]
async fn unknown_nodes_wait_for_the_fallback_then_switch_to_their_own_snapshot() {
    let cache = SnapshotCache::new();
    let mut watch = cache.watch("ns/pod", "delta");
    assert!(
        watch.current(&ANY).is_none(),
        "nothing to serve before the first publish"
    );

    assert!(cache.set_fallback(snap(&["shared"])));
    watch.changed().await.unwrap();
    let (s, source) = watch.current(&ANY).unwrap();
    assert_eq!(
        (names(&s), source),
        (vec!["shared".to_string()], SnapshotSource::Fallback)
    );

    assert!(cache.set("ns/pod", snap(&["own"])));
    watch.changed().await.unwrap();
    let (s, source) = watch.current(&ANY).unwrap();
    assert_eq!(
        (names(&s), source),
        (vec!["own".to_string()], SnapshotSource::Own)
    );
    assert_eq!(cache.nodes(), vec!["ns/pod".to_string()]);

    cache.remove("ns/pod");
    watch.changed().await.unwrap();
    assert_eq!(
        watch.current(&ANY).unwrap().1,
        SnapshotSource::Fallback,
        "a removed pod falls back"
    );
    assert!(cache.nodes().is_empty());
}

#[tokio::test]
async fn a_known_node_waits_for_its_own_snapshot_instead_of_taking_the_fallback() {
    let cache = SnapshotCache::new();
    cache.set_fallback(snap(&["plaintext"]));
    let mut watch = cache.watch("ns/pod", "delta");
    assert!(watch.current(&Admission::Own).is_none());
    assert_eq!(
        watch
            .current(&Admission::Denied("wrong address".into()))
            .unwrap()
            .1,
        SnapshotSource::Fallback
    );
    cache.set("ns/pod", snap(&["own"]));
    watch.changed().await.unwrap();
    assert_eq!(
        names(&watch.current(&Admission::Own).unwrap().0),
        vec!["own"]
    );
    assert_eq!(
        watch.current(&Admission::Fallback).unwrap().1,
        SnapshotSource::Fallback
    );
}

#[tokio::test]
async fn a_node_is_its_shared_layers_plus_its_own_and_shared_changes_reach_it() {
    let cache = SnapshotCache::new();
    let mesh = snap(&["svc-a", "svc-b"]);
    cache.set_shared("mesh", mesh.clone());
    let own = NodeSnapshot {
        shared: vec!["mesh".into()],
        own: snap(&["inbound"]),
    };
    cache.set_node("ns/pod", own.clone());
    cache.set_node("ns/other", own);
    let mut one = cache.watch("ns/pod", "delta");
    let mut two = cache.watch("ns/other", "delta");
    let (a, _) = one.current(&Admission::Own).unwrap();
    let (b, _) = two.current(&Admission::Own).unwrap();
    assert_eq!(names(&a), vec!["inbound", "svc-a", "svc-b"]);
    // Nothing copied: both views hold the very layer the shared snapshot holds.
    let shared_layer = &mesh.resources(type_url::CLUSTER).unwrap().layers()[0];
    for view in [&a, &b] {
        assert!(Arc::ptr_eq(
            &view.resources(type_url::CLUSTER).unwrap().layers()[0],
            shared_layer
        ));
    }

    cache.set_shared("mesh", snap(&["svc-a", "svc-b", "svc-c"]));
    tokio::time::timeout(Duration::from_millis(100), one.changed())
        .await
        .unwrap()
        .unwrap();
    tokio::time::timeout(Duration::from_millis(100), two.changed())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        names(&one.current(&Admission::Own).unwrap().0),
        vec!["inbound", "svc-a", "svc-b", "svc-c"]
    );
    // A node whose shared snapshot is not published yet waits.
    cache.set_node(
        "ns/pod",
        NodeSnapshot {
            shared: vec!["scope-x".into()],
            own: snap(&["inbound"]),
        },
    );
    one.changed().await.unwrap();
    assert!(one.current(&Admission::Own).is_none());
    cache.set_shared("scope-x", snap(&["svc-x"]));
    one.changed().await.unwrap();
    assert_eq!(
        names(&one.current(&Admission::Own).unwrap().0),
        vec!["inbound", "svc-x"]
    );
}

#[tokio::test]
async fn the_first_stream_of_a_node_and_its_last_are_reported() {
    let cache = SnapshotCache::new();
    let mut demands = cache.demands().unwrap();
    assert!(cache.demands().is_none(), "one consumer");
    let first = cache.watch("ns/pod", "delta");
    let second = cache.watch("ns/pod", "delta");
    assert_eq!(
        demands.recv().await.unwrap(),
        NodeDemand {
            node: "ns/pod".into(),
            connected: true,
            protocol: "delta"
        }
    );
    drop(first);
    assert!(demands.try_recv().is_err(), "another stream is still open");
    drop(second);
    assert_eq!(
        demands.recv().await.unwrap(),
        NodeDemand {
            node: "ns/pod".into(),
            connected: false,
            protocol: "delta"
        }
    );
}

#[tokio::test]
async fn an_equal_snapshot_wakes_nobody() {
    let cache = SnapshotCache::new();
    assert!(cache.set("n", snap(&["a"])));
    let mut watch = cache.watch("n", "sotw");
    watch.current(&ANY);
    assert!(!cache.set("n", snap(&["a"])), "same content is no change");
    let woke = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
    assert!(woke.is_err(), "no wake-up for an unchanged snapshot");
    assert!(cache.set("n", snap(&["b"])));
    tokio::time::timeout(Duration::from_millis(50), watch.changed())
        .await
        .unwrap()
        .unwrap();
}

/// Whether `watch.changed()` resolves within a short while.
async fn wakes(watch: &mut weft_xds::NodeWatch) -> bool {
    tokio::time::timeout(Duration::from_millis(50), watch.changed())
        .await
        .is_ok()
}

#[tokio::test]
async fn a_stream_wakes_only_for_what_it_is_served() {
    let cache = SnapshotCache::new();
    cache.set_fallback(snap(&["fallback"]));
    cache.set_shared("mesh", snap(&["svc-a"]));
    cache.set_node(
        "ns/pod",
        NodeSnapshot {
            shared: vec!["mesh".into()],
            own: snap(&["inbound"]),
        },
    );
    let mut watch = cache.watch("ns/pod", "delta");
    let (first, _) = watch.current(&ANY).unwrap();
    let (again, _) = watch.current(&ANY).unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "an unchanged view is the same view, so streams skip it by pointer"
    );

    // Served its own snapshot: fallback changes and on-demand bumps do not concern it.
    watch.set_on_demand(false);
    cache.set_fallback(snap(&["fallback", "more"]));
    cache.bump_on_demand();
    assert!(!wakes(&mut watch).await, "woken for nothing it is served");

    // With on-demand resources, a bump wakes it.
    watch.set_on_demand(true);
    cache.bump_on_demand();
    assert!(wakes(&mut watch).await);
    let (after_bump, _) = watch.current(&ANY).unwrap();
    assert!(Arc::ptr_eq(&first, &after_bump));

    // Served the fallback, fallback changes wake it.
    cache.remove("ns/pod");
    assert!(wakes(&mut watch).await);
    assert_eq!(watch.current(&ANY).unwrap().1, SnapshotSource::Fallback);
    cache.set_fallback(snap(&["fallback"]));
    assert!(wakes(&mut watch).await);
}

#[test]
fn a_view_counts_each_name_once_however_its_layers_overlap() {
    use weft_xds::{Layer, TypedResources};
    let layer = |names: &[&str]| {
        Arc::new(Layer::new(
            snap(names)
                .resources(type_url::CLUSTER)
                .unwrap()
                .iter()
                .cloned(),
        ))
    };
    let big: Vec<String> = (0..50).map(|i| format!("c{i:02}")).collect();
    let big: Vec<&str> = big.iter().map(String::as_str).collect();
    // Small over big, big over small, a name in three layers, disjoint layers.
    let cases: Vec<Vec<Arc<Layer>>> = vec![
        vec![layer(&["c01", "x"]), layer(&big)],
        vec![layer(&big), layer(&["c01", "x"])],
        vec![layer(&["c01"]), layer(&["c01", "c02"]), layer(&big)],
        vec![
            layer(&["c01", "c02"]),
            layer(&["c02", "c03"]),
            layer(&["c01", "c03", "y"]),
        ],
        vec![layer(&["a"]), layer(&["b"]), layer(&big)],
    ];
    for layers in cases {
        let view = TypedResources::from_layers(layers.clone());
        let mut seen: Vec<&str> = view.iter().map(|r| r.name()).collect();
        let walked = seen.len();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), walked, "a shadowed name is walked once");
        assert_eq!(
            view.len(),
            walked,
            "layers {:?}",
            layers.iter().map(|l| l.items().len()).collect::<Vec<_>>()
        );
    }
}

#[test]
fn composing_shares_a_part_alone_in_its_type_and_stacks_the_rest_in_order() {
    let shared = snap(&["a", "b"]);
    let mut own = snap(&["b", "mine"]);
    own.add_layer(
        type_url::ENDPOINT,
        Arc::new(weft_xds::Layer::new(
            snap(&["e"])
                .resources(type_url::CLUSTER)
                .unwrap()
                .iter()
                .cloned(),
        )),
    );
    let view = Snapshot::layered(&[&shared, &own]);
    // Endpoints only the node's own part has: its view as it was.
    assert_eq!(
        view.resources(type_url::ENDPOINT),
        own.resources(type_url::ENDPOINT)
    );
    // Clusters of both: shared layer first, then the node's.
    let clusters = view.resources(type_url::CLUSTER).unwrap();
    assert_eq!(clusters.layers().len(), 2);
    assert!(Arc::ptr_eq(
        &clusters.layers()[0],
        &shared.resources(type_url::CLUSTER).unwrap().layers()[0]
    ));
    assert_eq!(clusters.len(), 3, "b counts once");
    assert_eq!(names(&view), vec!["a", "b", "mine"]);
}

#[test]
fn recomposing_after_a_change_restacks_what_changed_and_equals_a_fresh_composition() {
    let own = snap(&["b", "mine"]);
    let before = Snapshot::layered(&[&snap(&["a", "b"]), &own]);
    // Same layers: the previous view, as it was.
    let shared = snap(&["a", "b"]);
    let first = Snapshot::layered(&[&shared, &own]);
    let again = Snapshot::layered_after(&[&shared, &own], Some(&first));
    assert_eq!(again, first);
    // A changed shared layer (or a stale previous view) is stacked anew.
    let changed = snap(&["a", "c"]);
    for previous in [&first, &before] {
        let next = Snapshot::layered_after(&[&changed, &own], Some(previous));
        assert_eq!(next, Snapshot::layered(&[&changed, &own]));
        assert_eq!(names(&next), vec!["a", "b", "c", "mine"]);
        assert_eq!(next.resources(type_url::CLUSTER).unwrap().len(), 4);
    }
    // An empty layer added to a part does not count as a change of what is stacked.
    let mut padded = shared.clone();
    padded.add_layer(type_url::CLUSTER, Arc::new(weft_xds::Layer::new([])));
    let padded_view = Snapshot::layered_after(&[&padded, &own], Some(&first));
    assert_eq!(padded_view, first);
}

#[test]
fn a_layer_holds_each_name_once_in_order_and_the_later_of_two_wins() {
    let (c1, b, a, c2) = (
        cluster("c", 1),
        cluster("b", 1),
        cluster("a", 1),
        cluster("c", 2),
    );
    let layer = weft_xds::Layer::new([c1.clone(), b.clone(), a.clone(), c2.clone()]);
    let items = layer.items();
    assert_eq!(items.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(
        items.get("c"),
        Some(&c2),
        "the later of two resources named c"
    );
    assert_eq!(items.get("b"), Some(&b));
    assert_eq!(items.get("d"), None);
    assert_eq!(items.len(), 3);
    // The same set from a map has the same content and version.
    let from_map = weft_xds::Layer::from_map(
        [a, b, c2]
            .into_iter()
            .map(|r| (r.name().to_string(), r))
            .collect(),
    );
    assert_eq!(from_map, layer);
}

#[test]
fn views_of_types_no_snapshot_serves_are_left_out() {
    let clusters = snap(&["a"]).resources(type_url::CLUSTER).unwrap().clone();
    let views = Snapshot::from_views([
        (
            "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            clusters.clone(),
        ),
        (type_url::CLUSTER, clusters),
    ]);
    assert_eq!(views.type_urls().collect::<Vec<_>>(), [type_url::CLUSTER]);
    assert_eq!(names(&views), ["a"]);
}

#[test]
fn the_interner_holds_equal_resources_once_and_keeps_none_alive() {
    let encode = |name: &str| cluster(name, 100);
    let mut interner = weft_xds::ResourceInterner::default();
    let first = interner.intern(encode("x"));
    let again = interner.intern(encode("x"));
    assert_eq!(again.entry().as_ptr(), first.entry().as_ptr(), "held once");
    let other = encode("y");
    let kept = interner.intern(other.clone());
    assert_eq!(
        kept.entry().as_ptr(),
        other.entry().as_ptr(),
        "a different one is itself"
    );
    // Nobody holds x any more: a new x is not matched to the dropped one.
    drop((first, again));
    let fresh = encode("x");
    let fresh_ptr = fresh.entry().as_ptr();
    assert_eq!(interner.intern(fresh).entry().as_ptr(), fresh_ptr);
}
