//! Snapshot cache: per-node snapshots, the fallback for unknown nodes, no wake-up on no change.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use weft_xds::{Resource, Snapshot, SnapshotCache, SnapshotSource, type_url};

fn snap(cluster: &str) -> Snapshot {
    let c = Cluster {
        name: cluster.into(),
        ..Default::default()
    };
    Snapshot::new().with(
        type_url::CLUSTER,
        [Resource::encode(type_url::CLUSTER, cluster, &c)],
    )
}

fn names(s: &Snapshot) -> Vec<String> {
    s.resources(type_url::CLUSTER)
        .unwrap()
        .items()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn unknown_nodes_wait_for_the_fallback_then_switch_to_their_own_snapshot() {
    let cache = SnapshotCache::new();
    let mut watch = cache.watch("ns/pod");
    assert!(
        watch.current(true).is_none(),
        "nothing to serve before the first publish"
    );

    assert!(cache.set_fallback(snap("shared")));
    watch.changed().await.unwrap();
    let (s, source) = watch.current(true).unwrap();
    assert_eq!(
        (names(&s), source),
        (vec!["shared".to_string()], SnapshotSource::Fallback)
    );

    assert!(cache.set("ns/pod", snap("own")));
    watch.changed().await.unwrap();
    let (s, source) = watch.current(true).unwrap();
    assert_eq!(
        (names(&s), source),
        (vec!["own".to_string()], SnapshotSource::Own)
    );
    assert_eq!(cache.nodes(), vec!["ns/pod".to_string()]);

    cache.remove("ns/pod");
    watch.changed().await.unwrap();
    assert_eq!(
        watch.current(true).unwrap().1,
        SnapshotSource::Fallback,
        "a removed pod falls back"
    );
    assert!(cache.nodes().is_empty());
}

#[tokio::test]
async fn an_equal_snapshot_wakes_nobody() {
    let cache = SnapshotCache::new();
    assert!(cache.set("n", snap("a")));
    let mut watch = cache.watch("n");
    watch.current(true);
    assert!(!cache.set("n", snap("a")), "same content is no change");
    let woke = tokio::time::timeout(Duration::from_millis(50), watch.changed()).await;
    assert!(woke.is_err(), "no wake-up for an unchanged snapshot");
    assert!(cache.set("n", snap("b")));
    tokio::time::timeout(Duration::from_millis(50), watch.changed())
        .await
        .unwrap()
        .unwrap();
}
