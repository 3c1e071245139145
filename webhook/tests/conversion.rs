//! The conversion webhook over real HTTPS, with ConversionReviews shaped as the API
//! server sends them: every served version of every SMI kind round-trips through the
//! stored one (and through every other served version) without loss, over generated
//! objects covering the combinations of their fields; malformed reviews get an error
//! response and the server keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

mod common;

use std::sync::Arc;

use common::{Client, TestCa};
use serde_json::{Value, json};
use weft_crds::conversion::{ANNOTATION, SERVED_KINDS, ServedKind, parse_milli};
use weft_webhook::InjectConfig;
use weft_webhook::server::{ReloadingCertificate, acceptor, serve};

/// A small deterministic generator (xorshift64*), so failures reproduce.
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
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Metadata as the API server stores it, with labels and annotations sometimes.
fn metadata(rng: &mut Rng, kind: &str, api_version: &str, n: usize) -> Value {
    let mut meta = json!({
        "name": format!("{}-{n}", kind.to_lowercase()),
        "namespace": *rng.pick(&["default", "shop", "payments"]),
        "uid": format!("5c2b7f3e-0000-4000-8000-{n:012}"),
        "resourceVersion": (1000 + n).to_string(),
        "generation": 1 + rng.below(5),
        "creationTimestamp": "2025-03-01T10:00:00Z",
        "managedFields": [{
            "apiVersion": api_version, "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {".": {}}}, "manager": "kubectl-client-side-apply",
            "operation": "Update", "time": "2025-03-01T10:00:00Z",
        }],
    });
    if rng.chance(50) {
        meta["labels"] = json!({"app": "web", "rollout": format!("r{n}")});
    }
    if rng.chance(40) {
        meta["annotations"] = json!({
            "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"x\"}\n",
        });
    }
    if rng.chance(10) {
        meta["ownerReferences"] = json!([{"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout",
            "name": "web", "uid": "0b6a7d9e-1111-4111-8111-000000000001", "controller": true,
            "blockOwnerDeletion": true}]);
    }
    meta
}

fn status(rng: &mut Rng) -> Option<Value> {
    rng.chance(50).then(|| {
        json!({"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid",
            "message": "", "observedGeneration": 1, "lastTransitionTime": "2025-03-01T10:00:01Z"}]})
    })
}

/// Quantity spellings and their value in milli-units.
const QUANTITIES: &[(&str, i64)] = &[
    ("0", 0),
    ("1", 1000),
    ("20", 20_000),
    ("80", 80_000),
    ("100", 100_000),
    ("500m", 500),
    ("1500m", 1500),
    ("10m", 10),
    ("1.5", 1500),
    (".5", 500),
    ("0.25", 250),
    ("2k", 2_000_000),
    ("1e3", 1_000_000),
    ("+3", 3000),
    ("1Ki", 1_024_000),
];

/// A TrafficSplit in `version`; with its expected stored weights when written as v1alpha1.
fn split(rng: &mut Rng, version: &str, n: usize) -> (Value, Option<Vec<i64>>) {
    let api_version = format!("split.smi-spec.io/{version}");
    let count = 1 + rng.below(4);
    let mut milli = Vec::new();
    let backends: Vec<Value> = (0..count)
        .map(|i| {
            let weight = if version == "v1alpha1" {
                let (text, value) = *rng.pick(QUANTITIES);
                milli.push(value);
                // Whole numbers are sometimes JSON numbers, as YAML and JSON write them
                // (the schema takes an integer or a string).
                match text.parse::<i64>() {
                    Ok(number) if rng.chance(40) => json!(number),
                    _ => json!(text),
                }
            } else {
                json!(*rng.pick(&[0, 1, 7, 20, 80, 100, 500, 1500, 123_456]))
            };
            json!({"service": format!("web-v{i}"), "weight": weight})
        })
        .collect();
    let mut spec = json!({"service": "web", "backends": backends});
    if matches!(version, "v1alpha3" | "v1alpha4") && rng.chance(60) {
        let refs: Vec<Value> = (0..1 + rng.below(2))
            .map(|i| {
                let mut r = json!({"kind": "HTTPRouteGroup", "name": format!("group-{i}")});
                if rng.chance(30) {
                    r["apiGroup"] = json!("specs.smi-spec.io");
                }
                r
            })
            .collect();
        spec["matches"] = Value::Array(refs);
    }
    let mut object = json!({"apiVersion": api_version, "kind": "TrafficSplit",
        "metadata": metadata(rng, "TrafficSplit", &api_version, n), "spec": spec});
    if let Some(s) = status(rng) {
        object["status"] = s;
    }
    (object, (version == "v1alpha1").then_some(milli))
}

fn http_route_group(rng: &mut Rng, version: &str, n: usize) -> Value {
    let api_version = format!("specs.smi-spec.io/{version}");
    let matches: Vec<Value> = (0..rng.below(4))
        .map(|i| {
            let mut m = json!({"name": format!("match-{i}")});
            if rng.chance(60) {
                m["pathRegex"] = json!(*rng.pick(&["/api/.*", "/metrics", ".*"]));
            }
            if rng.chance(50) {
                m["methods"] = json!(*rng.pick(&[&["GET"][..], &["GET", "HEAD"], &["*"]]));
            }
            if version != "v1alpha1" && rng.chance(50) {
                m["headers"] = match rng.below(3) {
                    0 => json!({"user-agent": ".*Firefox.*"}),
                    1 => json!({"user-agent": ".*Android.*", "cookie": "^(.*?;)?(type=insider)(;.*)?$"}),
                    _ => json!({}),
                };
            }
            m
        })
        .collect();
    let mut object = json!({"apiVersion": api_version, "kind": "HTTPRouteGroup",
        "metadata": metadata(rng, "HTTPRouteGroup", &api_version, n)});
    let with_matches = !matches.is_empty() || rng.chance(50);
    match version {
        "v1alpha1" | "v1alpha2" => {
            if with_matches {
                object["matches"] = Value::Array(matches);
            }
        }
        _ => {
            object["spec"] = if with_matches {
                json!({"matches": matches})
            } else {
                json!({})
            };
        }
    }
    if let Some(s) = status(rng) {
        object["status"] = s;
    }
    object
}

fn tcp_route(rng: &mut Rng, version: &str, n: usize) -> Value {
    let api_version = format!("specs.smi-spec.io/{version}");
    let mut object = json!({"apiVersion": api_version, "kind": "TCPRoute",
        "metadata": metadata(rng, "TCPRoute", &api_version, n)});
    match version {
        "v1alpha4" => {
            object["spec"] = match rng.below(4) {
                0 => json!({}),
                1 => json!({"matches": {}}),
                2 => json!({"matches": {"ports": []}}),
                _ => json!({"matches": {"ports": [3306, 6446]}}),
            }
        }
        "v1alpha3" => object["spec"] = json!({}),
        _ => {}
    }
    if let Some(s) = status(rng) {
        object["status"] = s;
    }
    object
}

fn traffic_target(rng: &mut Rng, version: &str, n: usize) -> Value {
    let api_version = format!("access.smi-spec.io/{version}");
    let mut destination = json!({"kind": "ServiceAccount", "name": "api"});
    if rng.chance(50) {
        destination["namespace"] = json!("shop");
    }
    if rng.chance(50) {
        destination["port"] = json!(8080);
    }
    let mut spec = json!({"destination": destination,
        "sources": [{"kind": "ServiceAccount", "name": "web", "namespace": "shop"}]});
    if rng.chance(70) {
        spec["rules"] = json!([{"kind": "HTTPRouteGroup", "name": "routes", "matches": ["metrics"]},
                               {"kind": "TCPRoute", "name": "db"}]);
    }
    json!({"apiVersion": api_version, "kind": "TrafficTarget",
        "metadata": metadata(rng, "TrafficTarget", &api_version, n), "spec": spec})
}

/// A generated object of `kind` in `version`, with the stored weights it must get.
fn generate(
    rng: &mut Rng,
    kind: &ServedKind,
    version: &str,
    n: usize,
) -> (Value, Option<Vec<i64>>) {
    match kind.kind {
        "TrafficSplit" => split(rng, version, n),
        "HTTPRouteGroup" => (http_route_group(rng, version, n), None),
        "TCPRoute" => (tcp_route(rng, version, n), None),
        "TrafficTarget" => (traffic_target(rng, version, n), None),
        _ => {
            let api_version = format!("{}/{version}", kind.group);
            let object = json!({"apiVersion": api_version, "kind": kind.kind,
                "metadata": {"name": "weft"}, "spec": {"access": "Permissive"}});
            (object, None)
        }
    }
}

/// A ConversionReview as the API server sends it (the empty response included).
fn review(uid: &str, desired: &str, objects: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "kind": "ConversionReview", "apiVersion": "apiextensions.k8s.io/v1",
        "request": {"uid": uid, "desiredAPIVersion": desired, "objects": objects},
        "response": {"uid": "", "convertedObjects": null, "result": {"metadata": {}}},
    }))
    .unwrap()
}

/// What the API server checks of a conversion response: the uid, success, as many
/// objects in the desired version, same kind, metadata unchanged but for labels and
/// annotations. Returns the converted objects.
async fn convert(client: &mut Client, uid: &str, desired: &str, objects: &[Value]) -> Vec<Value> {
    let (status, body) = client
        .send("POST", "/convert", &review(uid, desired, objects))
        .await;
    let reply: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["apiVersion"], "apiextensions.k8s.io/v1");
    assert_eq!(reply["kind"], "ConversionReview");
    let response = &reply["response"];
    assert_eq!(response["uid"], uid);
    assert_eq!(response["result"]["status"], "Success", "{reply}");
    let converted = response["convertedObjects"].as_array().unwrap().clone();
    assert_eq!(converted.len(), objects.len());
    for (before, after) in objects.iter().zip(&converted) {
        assert_eq!(after["apiVersion"], desired);
        assert_eq!(after["kind"], before["kind"]);
        let strip = |v: &Value| {
            let mut m = v["metadata"].clone();
            if let Some(m) = m.as_object_mut() {
                m.remove("labels");
                m.remove("annotations");
            }
            m
        };
        assert_eq!(
            strip(after),
            strip(before),
            "only labels and annotations may change"
        );
        assert_eq!(after["metadata"]["labels"], before["metadata"]["labels"]);
        assert_eq!(after["status"], before["status"]);
    }
    converted
}

/// The webhook on 127.0.0.1 over TLS, and a client for it.
async fn start(
    name: &str,
) -> (
    Client,
    tokio::task::JoinHandle<Result<(), weft_webhook::WebhookError>>,
    std::path::PathBuf,
) {
    let dir = std::env::temp_dir().join(format!("weft-webhook-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let ca = TestCa::new();
    ca.write_serving_cert(&cert, &key);
    let reloading = Arc::new(ReloadingCertificate::new(cert, key).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(serve(
        listener,
        acceptor(reloading).unwrap(),
        Arc::new(InjectConfig::default()),
    ));
    (Client::connect(&ca.connector(), addr).await, server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_version_round_trips_through_the_stored_one_without_loss() {
    let (mut client, server, dir) = start("round-trip").await;
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let (mut checked, mut reviews, mut n) = (0usize, 0usize, 0usize);
    for kind in SERVED_KINDS {
        let stored = kind.storage_api_version();
        for version in kind.versions {
            let api_version = format!("{}/{version}", kind.group);
            // Objects written in this version, sent in batches as a list would be.
            let mut originals = Vec::new();
            let mut expected_weights = Vec::new();
            for _ in 0..120 {
                n += 1;
                let (object, weights) = generate(&mut rng, kind, version, n);
                originals.push(object);
                expected_weights.push(weights);
            }
            // And objects of this version read from stored ones written in other
            // versions: they carry what this version cannot express.
            for other in kind.versions.iter().filter(|v| *v != version) {
                let mut batch = Vec::new();
                for _ in 0..30 {
                    n += 1;
                    batch.push(generate(&mut rng, kind, other, n).0);
                }
                reviews += 2;
                let at_hub = convert(&mut client, &format!("hub-{n}"), &stored, &batch).await;
                let here = convert(&mut client, &format!("here-{n}"), &api_version, &at_hub).await;
                expected_weights.extend(std::iter::repeat_n(None, here.len()));
                originals.extend(here);
            }
            for (chunk, weights) in originals.chunks(16).zip(expected_weights.chunks(16)) {
                reviews += 1;
                let at_hub =
                    convert(&mut client, &format!("to-{n}-{reviews}"), &stored, chunk).await;
                for (object, weights) in at_hub.iter().zip(weights) {
                    if let Some(weights) = weights {
                        let stored_weights: Vec<i64> = object["spec"]["backends"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|b| b["weight"].as_i64().unwrap())
                            .collect();
                        assert_eq!(&stored_weights, weights, "exact milli-units: {object}");
                    }
                }
                reviews += 1;
                let back = convert(
                    &mut client,
                    &format!("back-{n}-{reviews}"),
                    &api_version,
                    &at_hub,
                )
                .await;
                for (original, back) in chunk.iter().zip(&back) {
                    assert_eq!(back, original, "{api_version} through {stored}");
                    checked += 1;
                }
                // Through every other served version too (each step goes via the hub).
                for other in kind.versions {
                    let there_api = format!("{}/{other}", kind.group);
                    reviews += 2;
                    let there =
                        convert(&mut client, &format!("there-{reviews}"), &there_api, chunk).await;
                    let back = convert(
                        &mut client,
                        &format!("again-{reviews}"),
                        &api_version,
                        &there,
                    )
                    .await;
                    assert_eq!(back, chunk, "{api_version} through {there_api}");
                }
            }
        }
    }
    eprintln!("{checked} objects round-tripped in {reviews} ConversionReviews");
    assert!(checked > 2000, "{checked}");
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1alpha1_split_as_argo_rollouts_writes_it_is_stored_with_exact_ratios() {
    let (mut client, server, dir) = start("argo").await;
    // Argo Rollouts' v1alpha1 split: Quantity weights ("20"/"80"), owned by the Rollout.
    let argo = json!({
        "apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "5",
            "ownerReferences": [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Rollout", "name": "web",
                "uid": "r", "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"service": "web", "backends": [{"service": "web-canary", "weight": "20"},
                                                 {"service": "web-stable", "weight": "80"}]},
    });
    let quarter = json!({
        "apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
        "metadata": {"name": "quarter", "namespace": "shop"},
        "spec": {"service": "web", "backends": [{"service": "web-v1", "weight": "1500m"},
                                                 {"service": "web-v2", "weight": "500m"}]},
    });
    let stored = convert(
        &mut client,
        "argo",
        "split.smi-spec.io/v1alpha4",
        &[argo, quarter],
    )
    .await;
    let weights = |o: &Value| -> Vec<i64> {
        (o["spec"]["backends"].as_array().unwrap().iter())
            .map(|b| b["weight"].as_i64().unwrap())
            .collect()
    };
    assert_eq!(weights(&stored[0]), [20_000, 80_000]);
    assert_eq!(weights(&stored[1]), [1500, 500]);
    assert_eq!(
        parse_milli("1500m").unwrap() * 500,
        1500 * parse_milli("500m").unwrap()
    );
    assert!(
        stored
            .iter()
            .all(|o| o["metadata"].get("annotations").is_none())
    );
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_reviews_get_an_error_response_and_the_server_keeps_serving() {
    let (mut client, server, dir) = start("malformed").await;
    let good = review(
        "ok",
        "split.smi-spec.io/v1alpha4",
        &[
            json!({"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
                 "metadata": {"name": "a"}, "spec": {"service": "s", "backends": [{"service": "b", "weight": "1"}]}}),
        ],
    );
    let deep = {
        let text = String::from_utf8(good.clone()).unwrap();
        let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        text.replacen(
            "\"service\":\"s\"",
            &format!("\"service\":\"s\",\"deep\":{nested}"),
            1,
        )
        .into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated", good[..good.len() / 2].to_vec(), "not a ConversionReview"),
        ("not JSON", b"hello".to_vec(), "not a ConversionReview"),
        ("empty", Vec::new(), "not a ConversionReview"),
        ("no type", b"{}".to_vec(), "not a ConversionReview"),
        ("no request", br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview"}"#.to_vec(),
         "without a request"),
        ("an AdmissionReview",
         br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","desiredAPIVersion":"x/y","objects":[]}}"#.to_vec(),
         "is not an apiextensions.k8s.io/v1 ConversionReview"),
        ("v1beta1", br#"{"apiVersion":"apiextensions.k8s.io/v1beta1","kind":"ConversionReview","request":{"uid":"u","desiredAPIVersion":"x/y","objects":[]}}"#.to_vec(),
         "is not an apiextensions.k8s.io/v1 ConversionReview"),
        ("objects not a list",
         br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{"uid":"u","desiredAPIVersion":"x/y","objects":{}}}"#.to_vec(),
         "not a ConversionReview"),
        ("no uid",
         br#"{"apiVersion":"apiextensions.k8s.io/v1","kind":"ConversionReview","request":{"desiredAPIVersion":"x/y","objects":[]}}"#.to_vec(),
         "not a ConversionReview"),
        ("nested 100,000 deep", deep, "nesting deeper than 64 levels"),
    ];
    for (what, body, why) in cases {
        let (status, reply) = client.send("POST", "/convert", &body).await;
        let reply: Value = serde_json::from_slice(&reply).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(status, 400, "{what}: {reply}");
        assert_eq!(reply["kind"], "ConversionReview", "{what}");
        assert_eq!(reply["response"]["result"]["status"], "Failure", "{what}");
        let message = reply["response"]["result"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{what}: {message}");
    }

    // Well-formed reviews whose objects cannot be converted: a Failure result, no objects.
    let objects = |weight: Value| {
        vec![
            json!({"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
                   "metadata": {"name": "fine", "namespace": "shop"},
                   "spec": {"service": "s", "backends": [{"service": "b", "weight": "1"}]}}),
            json!({"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit",
                   "metadata": {"name": "odd", "namespace": "shop"},
                   "spec": {"service": "s", "backends": [{"service": "b", "weight": weight}]}}),
        ]
    };
    for (desired, objects, why) in [
        (
            "split.smi-spec.io/v1alpha4",
            objects(json!("1u")),
            "object 1 (TrafficSplit shop/odd)",
        ),
        (
            "split.smi-spec.io/v1alpha4",
            objects(json!("-3")),
            "negative",
        ),
        (
            "split.smi-spec.io/v9",
            objects(json!("1")),
            "v9 is not served",
        ),
        (
            "specs.smi-spec.io/v1alpha4",
            objects(json!("1")),
            "is not served",
        ),
        (
            "split.smi-spec.io/v1alpha4",
            vec![json!("a string")],
            "not a JSON object",
        ),
        (
            "split.smi-spec.io/v1alpha4",
            vec![json!({"apiVersion": "v1", "kind": "Pod"})],
            "Pod v1 is not served",
        ),
    ] {
        let (status, reply) = client
            .send("POST", "/convert", &review("uid-7", desired, &objects))
            .await;
        let reply: Value = serde_json::from_slice(&reply).unwrap();
        assert_eq!(status, 200, "{reply}");
        let response = &reply["response"];
        assert_eq!(response["uid"], "uid-7");
        assert_eq!(response["result"]["status"], "Failure", "{reply}");
        assert!(
            response["result"]["message"]
                .as_str()
                .unwrap()
                .contains(why),
            "{reply}"
        );
        assert_eq!(response["convertedObjects"], json!([]));
    }

    // An empty review is a success with nothing converted.
    let (status, reply) = client
        .send(
            "POST",
            "/convert",
            &review("none", "split.smi-spec.io/v1alpha1", &[]),
        )
        .await;
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(
        (status, &reply["response"]["result"]["status"]),
        (200, &json!("Success"))
    );
    // Only POST.
    let (status, _) = client.send("GET", "/convert", b"").await;
    assert_eq!(status, 405);
    // Still serving, on the same connection.
    let (status, reply) = client.send("POST", "/convert", &good).await;
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        reply["response"]["convertedObjects"][0]["spec"]["backends"][0]["weight"],
        1000
    );
    assert!(!server.is_finished());
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reviews_beyond_the_bound_are_refused_before_parsing() {
    let limit = weft_webhook::convert::MAX_CONVERSION_REVIEW_BYTES;
    let mut body = review("big", "split.smi-spec.io/v1alpha4", &[]);
    body.resize(limit + 1, b' ');
    let reply = weft_webhook::handle_conversion(&body);
    assert_eq!(reply.status, 400);
    let reply: Value = serde_json::from_slice(&reply.body).unwrap();
    let message = reply["response"]["result"]["message"].as_str().unwrap();
    assert!(
        message.contains("larger than the 32.0 MiB limit"),
        "{message}"
    );
}

#[test]
fn the_conversion_data_annotation_is_the_only_metadata_written() {
    // A stored split with matches, read as v1alpha1: the matches go to the annotation.
    let stored = json!({"apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "metadata": {"name": "ab", "annotations": {"team": "web"}},
        "spec": {"service": "web", "matches": [{"kind": "HTTPRouteGroup", "name": "firefox"}],
                 "backends": [{"service": "web-v2", "weight": 100}]}});
    let reply =
        weft_webhook::handle_conversion(&review("a", "split.smi-spec.io/v1alpha1", &[stored]));
    let reply: Value = serde_json::from_slice(&reply.body).unwrap();
    let old = &reply["response"]["convertedObjects"][0];
    let annotations = old["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(annotations.len(), 2);
    assert_eq!(annotations["team"], "web");
    let data: Value = serde_json::from_str(annotations[ANNOTATION].as_str().unwrap()).unwrap();
    assert_eq!(
        data,
        json!({"matches": [{"kind": "HTTPRouteGroup", "name": "firefox"}]})
    );
    assert_eq!(old["spec"]["backends"][0]["weight"], "100m");
}
