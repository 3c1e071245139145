//! The incremental index and publisher equal a full rebuild and a full translation,
//! after every step of random sequences of changes over generated meshes (services
//! with conflicting ClusterIPs, EndpointSlices, pods sharing IPs, splits, targets,
//! route groups, MeshConfigs, egress scopes).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use weft::index::{Index, MeshModel, MeshObject, ModelDelta, ObjectRef};
use weft::runtime::publish::MeshPublisher;
use weft::sources::parse_manifests;
use weft::translate::{MeshConfig, translate_shared};
use weft_xds::{NodeDemand, SnapshotCache, type_url};

/// xorshift64*: small, deterministic, good enough to pick test cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

const NAMESPACES: [&str; 2] = ["ns-a", "ns-b"];
const APPS: [&str; 3] = ["a", "b", "c"];
const ACCOUNTS: [&str; 3] = ["sa1", "sa2", "default"];
const SERVICES: [&str; 5] = ["s1", "s2", "s3", "s4", "s5"];
const PODS: [&str; 6] = ["p1", "p2", "p3", "p4", "p5", "p6"];

fn service(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    let name = rng.pick(&SERVICES);
    // A small pool of ClusterIPs, so services collide and conflicts resolve.
    let ip = match rng.below(5) {
        0 => "None".to_string(),
        1 => "fd00::7".to_string(),
        n => format!("10.96.0.{n}"),
    };
    let ports = [
        "{name: http, port: 80, targetPort: 8080}",
        "{port: 8081}",
        "{name: mysql, port: 3306}",
        "{name: tcp-x, port: 9000, appProtocol: tcp}",
        "{name: grpc, port: 50051, appProtocol: grpc}",
    ];
    let chosen: Vec<&str> = ports.iter().copied().filter(|_| rng.chance(50)).collect();
    let created = if rng.chance(50) {
        format!(
            ", creationTimestamp: \"2026-01-0{}T00:00:00Z\"",
            1 + rng.below(8)
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}{created}}}\nspec: {{clusterIP: \"{ip}\", selector: {{app: {}}}, ports: [{}]}}\n",
        rng.pick(&APPS),
        chosen.join(", ")
    )
}

fn pod(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    let name = rng.pick(&PODS);
    // Pods may share an IP (one replacing another).
    let ip = format!("10.1.0.{}", 1 + rng.below(8));
    let mut annotations = Vec::new();
    if rng.chance(15) {
        annotations.push("weft.dev/inject: disabled".to_string());
    }
    if rng.chance(25) {
        let scope = rng.pick(&["./*", "ns-a/s1,ns-b/*", "*/s2", "bad"]);
        annotations.push(format!("weft.dev/egress: \"{scope}\""));
    }
    if rng.chance(30) {
        annotations.push("weft.dev/outbound-clusters: on-demand".to_string());
    }
    let ready = if rng.chance(20) { "False" } else { "True" };
    // A pod being deleted that is still Ready drains.
    let deleted = if rng.chance(15) {
        ", deletionTimestamp: \"2025-01-01T00:00:00Z\""
    } else {
        ""
    };
    let ips = if rng.chance(20) {
        format!(
            ", podIPs: [{{ip: {ip}}}, {{ip: \"fd00::{}\"}}]",
            1 + rng.below(8)
        )
    } else {
        String::new()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {}}}, annotations: {{{}}}{deleted}}}\nspec: {{serviceAccountName: {}, containers: [{{name: c, image: i}}]}}\nstatus: {{phase: Running, podIP: {ip}{ips}, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n",
        rng.pick(&APPS),
        annotations.join(", "),
        rng.pick(&ACCOUNTS)
    )
}

fn slice(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    let service = rng.pick(&SERVICES);
    // Ready, unset, serving-terminating (draining), not serving: two slices of a service
    // may name one address in different states.
    let conditions = [
        "{ready: true}",
        "{}",
        "{ready: false, serving: true, terminating: true}",
        "{ready: false, serving: false, terminating: true}",
        "{ready: false}",
    ];
    let endpoints: Vec<String> = (0..1 + rng.below(2))
        .map(|_| {
            format!(
                "{{addresses: [10.1.0.{}], conditions: {}}}",
                1 + rng.below(8),
                rng.pick(&conditions)
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-{}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{port: 8081}}]\nendpoints: [{}]\n",
        rng.below(2),
        endpoints.join(", ")
    )
}

fn split(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    format!(
        "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: split-{}, namespace: {ns}}}\nspec:\n  service: {}\n  backends: [{{service: {}, weight: {}}}, {{service: {}, weight: 10}}]\n{}",
        rng.below(3),
        rng.pick(&SERVICES),
        rng.pick(&SERVICES),
        rng.below(3) * 45,
        rng.pick(&SERVICES),
        if rng.chance(30) {
            "  matches: [{kind: HTTPRouteGroup, name: routes}]\n"
        } else {
            ""
        }
    )
}

fn http_route(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    let port = match rng.below(3) {
        0 => "",
        1 => ", port: 80",
        _ => ", port: 3306",
    };
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: route-{}, namespace: {ns}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: {}{port}}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /{}}}}}]\n    backendRefs: [{{name: {}, port: 80, weight: {}{}}}, {{name: {}, port: 8081}}]\n",
        rng.below(3),
        rng.pick(&SERVICES),
        rng.pick(&["", "api", "v2"]),
        rng.pick(&SERVICES),
        rng.below(3) * 45,
        if rng.chance(30) {
            format!(", namespace: {}", rng.pick(&NAMESPACES))
        } else {
            String::new()
        },
        rng.pick(&SERVICES),
    )
}

fn target(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    let rules = match rng.below(4) {
        0 => "",
        1 => "  rules: [{kind: HTTPRouteGroup, name: routes, matches: [metrics]}]\n",
        2 => "  rules: [{kind: TCPRoute, name: tcp}]\n",
        _ => "  rules: [{kind: HTTPRouteGroup, name: missing}]\n",
    };
    format!(
        "apiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: t-{}, namespace: {ns}}}\nspec:\n  destination: {{kind: ServiceAccount, name: {}, namespace: {ns}}}\n  sources: [{{kind: ServiceAccount, name: {}, namespace: {}}}]\n{rules}",
        rng.below(3),
        rng.pick(&["sa1", "sa2", "ghost"]),
        rng.pick(&["sa1", "sa2", "nobody"]),
        rng.pick(&NAMESPACES)
    )
}

fn other(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    match rng.below(5) {
        4 => format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {{name: grant-{}, namespace: {ns}}}\nspec:\n  from: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: {}}}]\n  to: [{{group: '', kind: Service{}}}]\n",
            rng.below(2),
            rng.pick(&NAMESPACES),
            if rng.chance(50) {
                format!(", name: {}", rng.pick(&SERVICES))
            } else {
                String::new()
            }
        ),
        0 => format!(
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: routes, namespace: {ns}}}\nspec:\n  matches: [{{name: metrics, pathRegex: {}}}]\n",
            rng.pick(&["/metrics", "/m.*", "\"[\""])
        ),
        1 => format!(
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: tcp, namespace: {ns}}}\nspec: {{matches: {{ports: [{}]}}}}\n",
            rng.pick(&["9000", "3306"])
        ),
        2 => format!(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {}, namespace: {ns}}}\n",
            rng.pick(&["ghost", "nobody"])
        ),
        _ => format!(
            "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: weft-{}}}\nspec: {{access: {}, opaquePorts: [{}]{}}}\n",
            rng.below(2),
            rng.pick(&["Permissive", "DenyByDefault"]),
            rng.pick(&["8081", "80", "7000"]),
            rng.pick(&[
                "",
                ", trafficDefaults: {retries: {attempts: 1}}",
                ", trafficDefaults: {rateLimit: {local: {tokens: 5, interval: 1s}}}"
            ])
        ),
    }
}

/// A TrafficPolicy on one service (some ports, or all), setting a few fields that land
/// in clusters, routes and the destination pods' inbound rate limits.
fn traffic_policy(rng: &mut Rng) -> String {
    let ns = rng.pick(&NAMESPACES);
    format!(
        "apiVersion: policy.weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: policy-{}, namespace: {ns}}}\nspec:\n  targetRefs: [{{group: '', kind: Service, name: {}{}}}]\n  {}\n",
        rng.below(3),
        rng.pick(&SERVICES),
        rng.pick(&["", ", sectionName: http", ", sectionName: nope"]),
        rng.pick(&[
            "rateLimit: {local: {tokens: 10, interval: 1s}}",
            "connectionPool: {maxRequests: 3}",
            "loadBalancer: {type: RingHash, hash: {header: x-user}}",
            "faultInjection: {abort: {percent: 10, httpStatus: 503}}",
            "timeouts: {request: soon}",
        ])
    )
}

fn random_object(rng: &mut Rng) -> MeshObject {
    let text = match rng.below(10) {
        0..=1 => service(rng),
        2..=4 => pod(rng),
        5 => slice(rng),
        6 if rng.chance(50) => split(rng),
        6 => http_route(rng),
        7 => target(rng),
        8 if rng.chance(50) => traffic_policy(rng),
        _ => other(rng),
    };
    parse_manifests(&text)
        .unwrap_or_else(|e| panic!("generated manifest does not parse: {e}\n{text}"))
        .remove(0)
}

fn full(objects: Vec<MeshObject>) -> MeshModel {
    let mut index = Index::new();
    index.reset(objects);
    index.model().clone()
}

/// Keys whose values differ between two maps.
fn changed<K: Ord + Clone, V: PartialEq>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> BTreeSet<K> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Names and versions of a snapshot's resources of one type.
fn contents(snapshot: Option<&weft_xds::TypedResources>) -> BTreeMap<String, String> {
    snapshot
        .into_iter()
        .flat_map(|t| t.iter())
        .map(|r| (r.name().to_string(), r.version().to_string()))
        .collect()
}

#[test]
fn incremental_model_equals_a_full_rebuild_after_every_change() {
    for seed in 1..=40u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut index = Index::new();
        let mut before = MeshModel::default();
        let mut statuses_before = index.route_statuses().clone();
        for step in 0..120 {
            let delta = if !index.is_empty() && rng.chance(25) {
                let objects = index.objects();
                let victim = objects[rng.below(objects.len())].object_ref();
                index.delete(&victim)
            } else {
                index.apply(random_object(&mut rng))
            };
            let expected = full(index.objects());
            let now = index.model();
            assert_eq!(
                now, &expected,
                "seed {seed} step {step}: the incremental model differs from a full rebuild"
            );
            let statuses = index.route_statuses().clone();
            if let Some(delta) = delta {
                check_delta(&before, now, &delta, seed, step);
                // Route statuses (written by the status writer) raise the flag too.
                assert_eq!(
                    delta.problems,
                    before.problems != now.problems || statuses_before != statuses,
                    "seed {seed} step {step}: problems flag"
                );
            }
            before = now.clone();
            statuses_before = statuses;
        }
    }
}

/// The delta names exactly what changed between two models.
fn check_delta(before: &MeshModel, after: &MeshModel, delta: &ModelDelta, seed: u64, step: usize) {
    assert_eq!(
        delta.services,
        changed(&before.services, &after.services),
        "seed {seed} step {step}: services in the delta"
    );
    assert_eq!(
        delta.workloads,
        changed(&before.workloads, &after.workloads),
        "seed {seed} step {step}: workloads in the delta"
    );
    assert_eq!(
        delta.grants,
        changed(&before.grants, &after.grants),
        "seed {seed} step {step}: grants in the delta"
    );
}

#[test]
fn incremental_publishing_equals_a_full_translation_after_every_change() {
    for seed in 1..=15u64 {
        let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d).wrapping_add(7));
        let cache = SnapshotCache::new();
        let flags = MeshConfig::default();
        let mut publisher = MeshPublisher::new(cache.clone(), flags.clone(), None);
        let mut index = Index::new();
        publisher
            .apply(index.model(), &ModelDelta::default(), SystemTime::now())
            .unwrap();
        for step in 0..80 {
            let delta = if !index.is_empty() && rng.chance(25) {
                let objects = index.objects();
                let victim: ObjectRef = objects[rng.below(objects.len())].object_ref();
                index.delete(&victim)
            } else {
                index.apply(random_object(&mut rng))
            };
            let Some(delta) = delta else {
                continue;
            };
            let model = index.model();
            publisher.apply(model, &delta, SystemTime::now()).unwrap();
            // Connect a proxy now and then, as a running mesh would.
            if let Some(node) = model.workloads.keys().nth(step % 7) {
                publisher
                    .on_demand(
                        model,
                        &NodeDemand {
                            node: node.clone(),
                            connected: true,
                            protocol: "delta",
                        },
                        SystemTime::now(),
                    )
                    .unwrap();
            }
            let config = flags.effective(model);
            // Without identity the mesh layers are the plaintext translation.
            let full = translate_shared(model, &config, false).to_snapshot();
            let mesh = cache.shared("mesh-plain").expect("mesh layers published");
            for type_url in [type_url::ENDPOINT, type_url::SCOPED_ROUTE, type_url::ROUTE] {
                assert_eq!(
                    contents(mesh.resources(type_url)),
                    contents(full.resources(type_url)),
                    "seed {seed} step {step}: {type_url}"
                );
            }
            // Clusters and listeners also hold the capture listener (its chains follow
            // the pod and ClusterIP blocks and HTTP ports, counted incrementally) and
            // the passthrough.
            let capture = cache.shared("capture-plain").expect("capture published");
            for type_url in [type_url::CLUSTER, type_url::LISTENER] {
                let mut got = contents(mesh.resources(type_url));
                got.extend(contents(capture.resources(type_url)));
                let want = contents(full.resources(type_url));
                assert_eq!(got, want, "seed {seed} step {step}: {type_url}");
            }
            // Proxies fetching clusters on demand start with every mTLS cluster but those
            // of HTTP ports that nothing pins (a TCP proxy, an undeclared port, a mirror).
            let (mut lazy, mut pinned, mut clusters) =
                (BTreeSet::new(), BTreeSet::new(), Vec::new());
            for s in model.services.values() {
                let outbound = weft::translate::translate_service(s, &config, true);
                lazy.extend(weft::translate::clusters_on_demand(s, &config));
                pinned.extend(weft::translate::clusters_pinned(s, &outbound, &config));
                clusters.extend(outbound.clusters);
            }
            let mut want: BTreeMap<String, String> = BTreeMap::new();
            for c in clusters {
                if !lazy.contains(&c.name) || pinned.contains(&c.name) {
                    let r = weft_xds::Resource::encode(type_url::CLUSTER, c.name.clone(), &c);
                    want.insert(c.name.clone(), r.version().to_string());
                }
            }
            let on_demand = cache
                .shared("mesh-on-demand")
                .expect("on-demand layers published");
            assert_eq!(
                contents(on_demand.resources(type_url::CLUSTER)),
                want,
                "seed {seed} step {step}: clusters held from the start"
            );
            // Every connected known proxy's own layer is its workload's translation.
            for node in cache.nodes() {
                let Some(workload) = model.workloads.get(&node) else {
                    continue;
                };
                let own = cache.node(&node).unwrap();
                let want = weft::translate::translate_workload(
                    workload,
                    weft::translate::grants_for(model, workload),
                    &config,
                    None,
                )
                .to_snapshot();
                for type_url in [type_url::CLUSTER, type_url::LISTENER, type_url::ROUTE] {
                    assert_eq!(
                        contents(own.own.resources(type_url)),
                        contents(want.resources(type_url)),
                        "seed {seed} step {step}: {node} {type_url}"
                    );
                }
            }
            let _ = Arc::clone(&cache);
        }
    }
}

#[test]
fn clusters_reached_without_on_demand_discovery_are_pinned_whoever_owns_them() {
    // `db` speaks TCP on 5432 and splits to `db-v1`, whose 5432 is HTTP: the TCP proxy
    // of db's listener names db-v1's cluster, which nothing would fetch on demand.
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: d}\nspec: {clusterIP: 10.96.0.1, selector: {app: db}, ports: [{name: tcp-pg, port: 5432, appProtocol: tcp}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: db-v1, namespace: d}\nspec: {clusterIP: 10.96.0.2, selector: {app: db}, ports: [{name: http, port: 5432}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: d}\nspec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{name: http, port: 80}]}\n---\napiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: db, namespace: d}\nspec: {service: db, backends: [{service: db-v1, weight: 100}]}\n";
    let model = full(parse_manifests(text).unwrap());
    let config = MeshConfig::default();
    let service = |name: &str| {
        model
            .services
            .values()
            .find(|s| s.key.name == name)
            .unwrap()
    };
    let on_demand = |name: &str| weft::translate::clusters_on_demand(service(name), &config);
    let pinned = |name: &str| {
        let outbound = weft::translate::translate_service(service(name), &config, true);
        weft::translate::clusters_pinned(service(name), &outbound, &config)
    };
    assert_eq!(
        on_demand("db"),
        Vec::<String>::new(),
        "TCP ports are never lazy"
    );
    assert_eq!(
        on_demand("db-v1"),
        vec!["outbound|5432||db-v1.d.svc.cluster.local"]
    );
    assert_eq!(
        on_demand("web"),
        vec!["outbound|80||web.d.svc.cluster.local"]
    );
    assert_eq!(
        pinned("db"),
        vec!["outbound|5432||db-v1.d.svc.cluster.local"]
    );
    assert!(pinned("web").is_empty() && pinned("db-v1").is_empty());
}
