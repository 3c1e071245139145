//! The committed CRD YAML matches crdgen, and the SMI spec examples deserialize.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;

use weft_crds::conversion::{SERVED_KINDS, convert, served_kind};
use weft_crds::{HTTPRouteGroup, TCPRoute, TrafficSplit, TrafficTarget};

fn documents(file: &str) -> Vec<serde_yaml_ng::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/smi-examples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("example file readable");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect()
}

#[test]
fn committed_crd_yaml_matches_crdgen() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/weft/crds");
    let rendered = weft_crds::render_crds().expect("CRDs render");
    // Every committed file is rendered (no stale CRD left behind) and vice versa.
    let mut committed_files: Vec<String> = std::fs::read_dir(&dir)
        .expect("helm/weft/crds exists")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    committed_files.sort();
    let mut rendered_files: Vec<String> = rendered.iter().map(|(f, _)| f.clone()).collect();
    rendered_files.sort();
    assert_eq!(committed_files, rendered_files);
    for (file, text) in rendered {
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            committed == text,
            "helm/weft/crds/{file} is out of date: run `cargo run -p weft-crds --bin crdgen` and commit"
        );
    }
}

#[test]
fn crds_have_status_subresource_and_smi_groups() {
    for (name, crd) in weft_crds::all_crds() {
        assert_eq!(crd.metadata.name.as_deref(), Some(name));
        for version in &crd.spec.versions {
            assert!(
                version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{name} {} has a status subresource",
                version.name
            );
        }
    }
}

#[test]
fn crds_serve_every_version_store_one_and_convert_through_the_webhook_where_schemas_differ() {
    let crds = weft_crds::all_crds();
    assert_eq!(crds.len(), SERVED_KINDS.len());
    for served in SERVED_KINDS {
        let (name, crd) = crds
            .iter()
            .find(|(_, crd)| crd.spec.names.kind == served.kind)
            .unwrap();
        assert_eq!(*name, format!("{}.{}", served.plural, served.group));
        assert_eq!(crd.spec.group, served.group);
        let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            versions, served.versions,
            "{name}: served versions, newest first"
        );
        assert!(crd.spec.versions.iter().all(|v| v.served), "{name}");
        let stored: Vec<&str> = (crd.spec.versions.iter())
            .filter(|v| v.storage)
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(
            stored,
            [served.storage_version()],
            "{name}: exactly one stored"
        );
        // Every version has the same printer columns and the names' short names.
        let columns = &crd.spec.versions[0].additional_printer_columns;
        assert!(
            crd.spec
                .versions
                .iter()
                .all(|v| &v.additional_printer_columns == columns)
        );
        if served.versions.len() == 1 {
            continue;
        }
        let conversion = crd.spec.conversion.as_ref().unwrap();
        let rendered = serde_json::to_value(conversion).unwrap();
        if served.webhook {
            assert_eq!(
                rendered,
                serde_json::json!({"strategy": "Webhook", "webhook": {
                    "conversionReviewVersions": ["v1"],
                    "clientConfig": {"service": {"name": "weft-webhook", "namespace": "weft-system",
                                                 "path": "/convert", "port": 443}}}}),
                "{name}"
            );
        } else {
            assert_eq!(rendered, serde_json::json!({"strategy": "None"}), "{name}");
            // None converts by rewriting apiVersion: the schemas must be the same.
            let schemas: Vec<_> = crd.spec.versions.iter().map(|v| &v.schema).collect();
            assert!(
                schemas.windows(2).all(|w| w[0] == w[1]),
                "{name}: schemas differ"
            );
        }
    }
}

/// The top-level property names of a version's schema.
fn top_level(name: &str, version: &str) -> Vec<String> {
    let (_, crd) = weft_crds::all_crds()
        .into_iter()
        .find(|(n, _)| n.starts_with(name))
        .unwrap();
    let v = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == version)
        .unwrap();
    let schema = v
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    schema
        .properties
        .as_ref()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[test]
fn older_versions_have_the_shape_their_smi_documents_give_them() {
    // HTTPRouteGroup and TCPRoute v1alpha1 and v1alpha2 keep their fields at the top.
    assert_eq!(
        top_level("httproutegroups", "v1alpha1"),
        ["matches", "status"]
    );
    assert_eq!(
        top_level("httproutegroups", "v1alpha2"),
        ["matches", "status"]
    );
    assert_eq!(top_level("httproutegroups", "v1alpha3"), ["spec", "status"]);
    assert_eq!(top_level("tcproutes", "v1alpha2"), ["status"]);
    assert_eq!(top_level("tcproutes", "v1alpha3"), ["spec", "status"]);
    let yaml = weft_crds::render_crds().unwrap();
    let text = |prefix: &str| {
        let (_, text) = yaml.iter().find(|(f, _)| f.starts_with(prefix)).unwrap();
        serde_yaml_ng::from_str::<serde_json::Value>(text).unwrap()
    };
    let split = text("trafficsplits");
    let version = |crd: &serde_json::Value, name: &str| {
        crd["spec"]["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()["schema"]["openAPIV3Schema"]
            .clone()
    };
    let backend =
        |v: &serde_json::Value| v["properties"]["spec"]["properties"]["backends"]["items"].clone();
    // v1alpha1 weights are quantities, as the API server's own types declare them.
    let weight = &backend(&version(&split, "v1alpha1"))["properties"]["weight"];
    assert_eq!(weight["x-kubernetes-int-or-string"], true);
    assert_eq!(
        weight["anyOf"],
        serde_json::json!([{"type": "integer"}, {"type": "string"}])
    );
    assert_eq!(
        backend(&version(&split, "v1alpha2"))["properties"]["weight"]["type"],
        "integer"
    );
    assert!(
        version(&split, "v1alpha2")["properties"]["spec"]["properties"]
            .get("matches")
            .is_none()
    );
    assert!(
        version(&split, "v1alpha3")["properties"]["spec"]["properties"]
            .get("matches")
            .is_some()
    );
    // v1alpha1 matches have no headers; v1alpha2's do.
    let groups = text("httproutegroups");
    let matches =
        |v: &str| version(&groups, v)["properties"]["matches"]["items"]["properties"].clone();
    assert!(matches("v1alpha1").get("headers").is_none());
    assert!(matches("v1alpha2").get("headers").is_some());
    // v1alpha3 TCPRoutes have an empty spec.
    let tcp = text("tcproutes");
    assert!(
        version(&tcp, "v1alpha3")["properties"]["spec"]
            .get("properties")
            .is_none()
    );
}

#[test]
fn the_older_smi_examples_convert_to_the_stored_versions() {
    let docs = documents("older-versions.yaml");
    let mut kinds = Vec::new();
    for doc in docs {
        let object: serde_json::Value = serde_json::to_value(&doc).unwrap();
        let kind = object["kind"].as_str().unwrap().to_string();
        let api_version = object["apiVersion"].as_str().unwrap().to_string();
        let served = served_kind(&api_version, &kind).unwrap();
        let stored = convert(object.clone(), &served.storage_api_version()).unwrap();
        let back = convert(stored.clone(), &api_version).unwrap();
        assert_eq!(back, object, "{kind} {api_version} round-trips");
        match kind.as_str() {
            "TrafficSplit" => {
                let split: TrafficSplit = serde_json::from_value(stored).unwrap();
                let weights: Vec<i64> = split.spec.backends.iter().map(|b| b.weight).collect();
                match (api_version.as_str(), split.metadata.name.as_deref()) {
                    ("split.smi-spec.io/v1alpha1", Some("my-weights")) => {
                        assert_eq!(weights, [10, 100, 1500])
                    }
                    // "1" and "500m": 33% to foobar-v2, as the document says.
                    ("split.smi-spec.io/v1alpha1", _) => assert_eq!(weights, [1000, 500]),
                    ("split.smi-spec.io/v1alpha2", _) => assert_eq!(weights, [50, 50]),
                    _ => assert_eq!(split.spec.matches[0].name, "ab-test"),
                }
            }
            "HTTPRouteGroup" => {
                let group: HTTPRouteGroup = serde_json::from_value(stored).unwrap();
                assert!(!group.spec.matches.is_empty());
            }
            "TCPRoute" => {
                let route: TCPRoute = serde_json::from_value(stored).unwrap();
                assert!(route.spec.matches.ports.is_empty());
            }
            _ => {
                let target: TrafficTarget = serde_json::from_value(stored).unwrap();
                assert_eq!(target.spec.destination.port, Some(8080));
            }
        }
        kinds.push(format!("{kind} {api_version}"));
    }
    assert_eq!(kinds.len(), 10, "{kinds:?}");
}

#[test]
fn traffic_split_examples_deserialize() {
    let docs = documents("traffic-split.yaml");
    let splits: Vec<TrafficSplit> = docs
        .into_iter()
        .map(|d| serde_yaml_ng::from_value(d).expect("TrafficSplit"))
        .collect();
    assert_eq!(splits[0].spec.service, "website");
    assert_eq!(
        splits[0]
            .spec
            .backends
            .iter()
            .map(|b| b.weight)
            .collect::<Vec<_>>(),
        vec![90, 10]
    );
    assert_eq!(splits[1].spec.matches[0].kind, "HTTPRouteGroup");
    assert_eq!(splits[1].spec.backends[0].weight, 0);
}

#[test]
fn traffic_spec_examples_deserialize() {
    let docs = documents("traffic-specs.yaml");
    let groups: Vec<HTTPRouteGroup> = docs[..3]
        .iter()
        .map(|d| serde_yaml_ng::from_value(d.clone()).expect("HTTPRouteGroup"))
        .collect();
    assert_eq!(groups[0].spec.matches[1].methods, vec!["*"]);
    assert_eq!(
        groups[1].spec.matches[0]
            .headers
            .get("user-agent")
            .map(String::as_str),
        Some(".*Android.*")
    );
    assert_eq!(
        groups[2].spec.matches[0].path_regex.as_deref(),
        Some("/api/.*")
    );
    let tcp: Vec<TCPRoute> = docs[3..]
        .iter()
        .map(|d| serde_yaml_ng::from_value(d.clone()).expect("TCPRoute"))
        .collect();
    assert_eq!(tcp[0].spec.matches.ports, vec![3306, 6446]);
    assert!(tcp[1].spec.matches.ports.is_empty());
}

#[test]
fn older_list_form_of_headers_is_accepted() {
    let yaml = "matches:\n- name: firefox-users\n  headers:\n  - user-agent: \".*Firefox.*\"\n";
    let spec: weft_crds::HTTPRouteGroupSpec = serde_yaml_ng::from_str(yaml).expect("list form");
    assert_eq!(
        spec.matches[0]
            .headers
            .get("user-agent")
            .map(String::as_str),
        Some(".*Firefox.*")
    );
}

#[test]
fn traffic_access_examples_deserialize() {
    let targets: Vec<TrafficTarget> = documents("traffic-access.yaml")
        .into_iter()
        .map(|d| serde_yaml_ng::from_value(d).expect("TrafficTarget"))
        .collect();
    assert_eq!(targets[0].spec.destination.name, "service-a");
    assert_eq!(targets[0].spec.rules[0].matches, vec!["metrics"]);
    assert_eq!(targets[1].spec.rules[0].kind, "TCPRoute");
}

#[test]
fn crds_carry_cel_rules_the_api_server_enforces() {
    let crds = weft_crds::render_crds().unwrap();
    let split = &crds
        .iter()
        .find(|(f, _)| f.starts_with("trafficsplits"))
        .unwrap()
        .1;
    assert!(
        split.contains("self.spec.backends.all(b, b.service != self.spec.service)"),
        "{split}"
    );
    let target = &crds
        .iter()
        .find(|(f, _)| f.starts_with("traffictargets"))
        .unwrap()
        .1;
    assert!(target.contains("s.kind == 'ServiceAccount'"), "{target}");
}

#[test]
fn mesh_config_reads_kubernetes_style_enums_and_rejects_unknown_modes() {
    let config: weft_crds::MeshConfig = serde_yaml_ng::from_str(
        "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: weft\nspec:\n  access: Permissive\n",
    )
    .unwrap();
    assert_eq!(
        config.spec.access,
        Some(weft_crds::AccessPolicy::Permissive)
    );
    assert_eq!(config.spec.mtls, None);
    let wrong = serde_yaml_ng::from_str::<weft_crds::MeshConfig>(
        "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: weft\nspec:\n  access: allow-everything\n",
    );
    assert!(wrong.is_err());
}
