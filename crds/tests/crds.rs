//! The committed CRD YAML matches crdgen, and the SMI spec examples deserialize.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;

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
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name} has a status subresource"
        );
    }
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
