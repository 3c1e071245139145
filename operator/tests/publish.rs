//! The publisher builds per-proxy config for connected proxies only, shares scope
//! layers between proxies with the same scope, and forgets departed proxies after the
//! grace period (certificates included).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::time::{Duration, Instant, SystemTime};

use weft::identity::{CaSource, CertificateAuthority};
use weft::index::{Index, ModelDelta};
use weft::runtime::publish::{DEPARTED_GRACE, MeshIdentity, MeshPublisher};
use weft::sources::parse_manifests;
use weft::translate::MeshConfig;
use weft_xds::{NodeDemand, SnapshotCache, type_url};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {clusterIP: 10.96.0.1, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 10.96.0.2, selector: {app: db}, ports: [{name: tcp-pg, port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, labels: {app: api}, annotations: {weft.dev/egress: "./*"}}
spec: {serviceAccountName: api}
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, labels: {app: api}, annotations: {weft.dev/egress: "default/*"}}
spec: {serviceAccountName: api}
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db}}
spec: {serviceAccountName: db}
status: {podIP: 10.1.0.3}
"#;

fn demand(node: &str, connected: bool) -> NodeDemand {
    NodeDemand {
        node: node.into(),
        connected,
        protocol: "delta",
    }
}

fn publisher(dir: &str) -> (std::sync::Arc<SnapshotCache>, MeshPublisher, Index) {
    let state = std::env::temp_dir().join(format!("weft-publish-{dir}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let ca = CertificateAuthority::load(&CaSource::StateDir(state.clone()), None).unwrap();
    // The CA is in memory now; its key must not outlive the test in /tmp.
    std::fs::remove_dir_all(&state).unwrap();
    let config = MeshConfig::default();
    let identity = MeshIdentity::new(ca, &config, Duration::from_secs(3600));
    let cache = SnapshotCache::new();
    let publisher = MeshPublisher::new(cache.clone(), config, Some(identity));
    let mut index = Index::new();
    index.reset(parse_manifests(MESH).unwrap());
    (cache, publisher, index)
}

#[test]
fn only_connected_proxies_get_config_and_departed_ones_are_forgotten_after_the_grace() {
    let (cache, mut publisher, index) = publisher("connected");
    let now = SystemTime::now();
    let stats = publisher
        .apply(index.model(), &ModelDelta::default(), now)
        .unwrap();
    assert_eq!(stats.proxies, 0, "nobody is connected yet");
    assert!(
        cache.nodes().is_empty(),
        "no per-proxy config for pods nobody runs"
    );
    assert!(publisher.next_renewal().is_none(), "no certificate issued");

    let stats = publisher
        .on_demand(index.model(), &demand("data/db-0", true), now)
        .unwrap();
    assert_eq!((stats.proxies, stats.issued), (1, 1));
    let own = cache.node("data/db-0").expect("built on connect");
    assert!(
        own.own.resources(type_url::SECRET).is_some(),
        "with its certificate"
    );
    assert_eq!(own.shared, vec!["capture".to_string(), "mesh".to_string()]);

    // Gone, then back within the grace: nothing rebuilt, nothing reissued.
    publisher
        .on_demand(index.model(), &demand("data/db-0", false), now)
        .unwrap();
    assert!(
        publisher.sweep(Instant::now()).is_some(),
        "a sweep is due later"
    );
    assert!(cache.node("data/db-0").is_some(), "kept within the grace");
    let back = publisher
        .on_demand(index.model(), &demand("data/db-0", true), now)
        .unwrap();
    assert_eq!(back.issued, 0);

    publisher
        .on_demand(index.model(), &demand("data/db-0", false), now)
        .unwrap();
    let later = Instant::now() + DEPARTED_GRACE + Duration::from_secs(1);
    assert!(publisher.sweep(later).is_none());
    assert!(cache.node("data/db-0").is_none(), "dropped after the grace");
    assert!(
        publisher.next_renewal().is_none(),
        "its certificate is forgotten"
    );
}

#[test]
fn an_unknown_proxy_gets_its_config_once_its_pod_appears() {
    let (cache, mut publisher, mut index) = publisher("unknown");
    let now = SystemTime::now();
    publisher
        .apply(index.model(), &ModelDelta::default(), now)
        .unwrap();
    publisher
        .on_demand(index.model(), &demand("default/late-0", true), now)
        .unwrap();
    assert!(cache.node("default/late-0").is_none());
    let delta = index
        .update(
            parse_manifests(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: late-0}\nspec: {serviceAccountName: late}\nstatus: {podIP: 10.1.0.9}\n",
            )
            .unwrap()
            .into_iter()
            .map(weft::index::ObjectChange::Upsert),
        )
        .unwrap();
    assert!(delta.workloads.contains("default/late-0"));
    publisher.apply(index.model(), &delta, now).unwrap();
    assert!(
        cache.node("default/late-0").is_some(),
        "built when its pod appeared"
    );
}

/// A publisher with the mesh applied and two replicas of `api` connected.
fn two_replicas_connected(dir: &str) -> (std::sync::Arc<SnapshotCache>, MeshPublisher, Index) {
    let (cache, mut publisher, index) = publisher(dir);
    let now = SystemTime::now();
    publisher
        .apply(index.model(), &ModelDelta::default(), now)
        .unwrap();
    for node in ["default/api-0", "default/api-1"] {
        publisher
            .on_demand(index.model(), &demand(node, true), now)
            .unwrap();
    }
    (cache, publisher, index)
}

#[test]
fn proxies_with_the_same_scope_share_one_set_of_layers() {
    let (cache, mut publisher, index) = two_replicas_connected("scopes");
    let now = SystemTime::now();
    let a = cache.node("default/api-0").unwrap();
    let b = cache.node("default/api-1").unwrap();
    assert_eq!(a.shared, b.shared, "./* and default/* are the same scope");
    let scope = cache.shared(&a.shared[1]).expect("scope layers published");
    let clusters: Vec<String> = scope
        .resources(type_url::CLUSTER)
        .unwrap()
        .iter()
        .map(|r| r.name().to_string())
        .collect();
    assert_eq!(clusters, vec!["outbound|80||api.default.svc.cluster.local"]);
    let name = a.shared[1].clone();
    for node in ["default/api-0", "default/api-1"] {
        publisher
            .on_demand(index.model(), &demand(node, false), now)
            .unwrap();
    }
    publisher.sweep(Instant::now() + DEPARTED_GRACE + Duration::from_secs(1));
    assert!(cache.shared(&name).is_none(), "an unused scope is dropped");
}

#[test]
fn a_consumer_route_is_one_small_layer_before_the_mesh_for_its_namespace_only() {
    let (cache, mut publisher, mut index) = publisher("consumer");
    let now = SystemTime::now();
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: shop-0, namespace: shop}\nspec: {serviceAccountName: shop}\nstatus: {podIP: 10.1.0.7}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api-local, namespace: shop}\nspec: {clusterIP: 10.96.0.7, selector: {app: api}, ports: [{name: http, port: 80}]}\n";
    let delta = index
        .update(
            parse_manifests(pods)
                .unwrap()
                .into_iter()
                .map(weft::index::ObjectChange::Upsert),
        )
        .unwrap();
    publisher.apply(index.model(), &delta, now).unwrap();
    for node in ["shop/shop-0", "data/db-0"] {
        publisher
            .on_demand(index.model(), &demand(node, true), now)
            .unwrap();
    }
    let mesh = vec!["capture".to_string(), "mesh".to_string()];
    assert_eq!(cache.node("shop/shop-0").unwrap().shared, mesh);

    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: mine, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api, namespace: default}]\n  rules:\n  - backendRefs: [{name: api-local, port: 80}]\n";
    let route = parse_manifests(route).unwrap().remove(0);
    let key = route.object_ref();
    let delta = index.apply(route).unwrap();
    assert!(
        index.model().problems.is_empty(),
        "{:?}",
        index.model().problems
    );
    publisher.apply(index.model(), &delta, now).unwrap();
    let shop = cache.node("shop/shop-0").unwrap();
    assert_eq!(
        shop.shared,
        vec!["capture".to_string(), "consumer:shop".into(), "mesh".into()],
        "the consumer layer goes before the mesh's"
    );
    assert_eq!(
        cache.node("data/db-0").unwrap().shared,
        mesh,
        "others keep the mesh's"
    );
    let layer = cache.shared("consumer:shop").expect("published");
    let routes = layer.resources(type_url::ROUTE).unwrap();
    let names: Vec<&str> = routes.iter().map(|r| r.name()).collect();
    assert_eq!(
        names,
        vec!["api.default.svc.cluster.local:80"],
        "just the routed port"
    );
    let shared = cache.shared("mesh").unwrap();
    let shared_route = shared
        .resources(type_url::ROUTE)
        .unwrap()
        .get("api.default.svc.cluster.local:80")
        .unwrap()
        .clone();
    assert_ne!(
        routes.get("api.default.svc.cluster.local:80"),
        Some(&shared_route)
    );

    // The route goes: so do the layer and shop's reference to it.
    let delta = index.delete(&key).unwrap();
    publisher.apply(index.model(), &delta, now).unwrap();
    assert_eq!(cache.node("shop/shop-0").unwrap().shared, mesh);
    assert!(cache.shared("consumer:shop").is_none(), "unpublished");
}

#[test]
fn equal_own_resources_of_two_proxies_are_held_once() {
    let (cache, _publisher, _index) = two_replicas_connected("interned");
    let a = cache.node("default/api-0").unwrap();
    let b = cache.node("default/api-1").unwrap();
    let (mut same, mut different) = (Vec::new(), Vec::new());
    for type_url in a.own.type_urls() {
        for r in a.own.resources(type_url).unwrap().iter() {
            let Some(other) = b.own.resources(type_url).and_then(|v| v.get(r.name())) else {
                continue;
            };
            if other == r {
                assert_eq!(
                    other.entry().as_ptr(),
                    r.entry().as_ptr(),
                    "{} is equal, so held once",
                    r.name()
                );
                same.push(r.name().to_string());
            } else {
                different.push(r.name().to_string());
            }
        }
    }
    assert!(same.contains(&"weft-trust-bundle".to_string()), "{same:?}");
    assert!(same.iter().any(|n| n.starts_with("inbound|")), "{same:?}");
    assert_eq!(different, ["weft-identity"], "each has its own certificate");
}
