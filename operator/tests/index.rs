//! The index, manifest parsing and the manifest directory, without any network.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use weft::index::{AppProtocol, Index, Kind, ObjectRef, ServiceEndpoint};
use weft::sources::{ManifestDir, parse_manifests};

fn service(name: &str, ip: &str, port_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {name}}}\n  ports: [{{name: {port_name}, port: 80}}]\n"
    )
}

fn pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: {ip}}}\n"
    )
}

fn index_of(text: &str) -> Index {
    let mut index = Index::new();
    index.reset(parse_manifests(text).unwrap());
    index
}

#[test]
fn apply_delete_and_reset_report_whether_anything_changed() {
    let objects = parse_manifests(&service("web", "198.19.0.1", "http")).unwrap();
    let mut index = Index::new();
    assert!(index.apply(objects[0].clone()).is_some());
    assert!(
        index.apply(objects[0].clone()).is_none(),
        "identical object is no change"
    );
    assert!(
        index.reset(objects.clone()).is_none(),
        "same set is no change"
    );
    let key = ObjectRef::new(Kind::Service, "default", "web");
    assert!(index.delete(&key).is_some());
    assert!(index.delete(&key).is_none());
    assert!(index.is_empty());
}

#[test]
fn selector_matched_ready_pods_become_endpoints() {
    let text = [
        service("web", "198.19.0.1", "http"),
        pod("web-0", "web", "198.18.0.2"),
        pod("other", "db", "198.18.0.3"),
    ]
    .join("---\n");
    let model = index_of(&text).model().clone();
    let web = &model.services.values().next().unwrap().ports[0];
    assert_eq!(
        web.endpoints,
        vec![ServiceEndpoint::ready("198.18.0.2:80".parse().unwrap())]
    );
    assert_eq!(web.protocol, AppProtocol::Http);
    let workload = &model.workloads["default/web-0"];
    assert_eq!(workload.service_account, "default");
    assert_eq!(
        workload.inbound_ports.len(),
        1,
        "web-0 serves port 80 for web"
    );
    assert!(model.workloads["default/other"].inbound_ports.is_empty());
}

#[test]
fn tcp_named_ports_are_proxied_as_tcp() {
    let model = index_of(&service("db", "198.19.0.1", "tcp-postgres"))
        .model()
        .clone();
    assert_eq!(
        model.services.values().next().unwrap().ports[0].protocol,
        AppProtocol::Tcp
    );
}

#[test]
fn a_second_service_on_the_same_cluster_ip_is_rejected() {
    let text = [
        service("a", "198.19.0.1", "http"),
        service("b", "198.19.0.1", "http"),
    ]
    .join("---\n");
    let model = index_of(&text).model().clone();
    assert_eq!(model.services.len(), 1);
    assert_eq!(model.problems.len(), 1);
    assert_eq!(model.problems[0].object.to_string(), "Service default/b");
    assert!(
        model.problems[0]
            .reason
            .contains("already used by Service default/a")
    );
}

#[test]
fn manifest_errors_name_the_document_and_the_reason() {
    let bad_version = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: split.smi-spec.io/v1alpha5\nkind: TrafficSplit\nmetadata: {name: s}\nspec: {service: a, backends: []}\n";
    let err = parse_manifests(bad_version).unwrap_err().to_string();
    assert!(
        err.contains("document 2") && err.contains("v1alpha5"),
        "{err}"
    );
    let no_name = "apiVersion: v1\nkind: Pod\nmetadata: {}\n";
    assert!(
        parse_manifests(no_name)
            .unwrap_err()
            .to_string()
            .contains("metadata.name")
    );
    let wrong_type = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: 7}\n";
    assert!(
        parse_manifests(wrong_type)
            .unwrap_err()
            .to_string()
            .contains("invalid Service")
    );
}

#[test]
fn lists_expand_and_unknown_kinds_are_skipped() {
    let text = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n",
        serde_json_line(&service("web", "198.19.0.1", "http"))
    );
    let objects = parse_manifests(&text).unwrap();
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].object_ref().to_string(), "Service default/web");
}

fn serde_json_line(yaml: &str) -> String {
    let value: serde_json::Value = serde_yaml_ng::from_str(yaml).unwrap();
    serde_json::to_string(&value).unwrap()
}

#[test]
fn a_broken_file_keeps_its_last_good_objects_and_a_deleted_file_drops_them() {
    let dir = std::env::temp_dir().join(format!("weft-manifest-dir-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), service("a", "198.19.0.1", "http")).unwrap();
    std::fs::write(dir.join("b.yaml"), service("b", "198.19.0.2", "http")).unwrap();
    std::fs::write(dir.join(".hidden.yaml"), "not: [valid").unwrap();
    std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
    let mut manifests = ManifestDir::new(&dir);
    manifests.rescan().unwrap();
    assert_eq!(manifests.objects().len(), 2);
    assert!(
        manifests.errors().is_empty(),
        "hidden and non-YAML files are ignored"
    );

    std::fs::write(dir.join("a.yaml"), "kind: Service\nmetadata: [").unwrap();
    manifests.rescan().unwrap();
    let names: Vec<String> = manifests
        .objects()
        .iter()
        .map(|o| o.object_ref().name)
        .collect();
    assert_eq!(names, vec!["a", "b"], "a keeps its last good version");
    let errors = manifests.errors();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].file.ends_with("a.yaml"));

    std::fs::remove_file(dir.join("b.yaml")).unwrap();
    manifests.rescan().unwrap();
    let names: Vec<String> = manifests
        .objects()
        .iter()
        .map(|o| o.object_ref().name)
        .collect();
    assert_eq!(names, vec!["a"]);

    std::fs::write(dir.join("a.yaml"), service("a2", "198.19.0.3", "http")).unwrap();
    manifests.rescan().unwrap();
    assert!(manifests.errors().is_empty(), "fixed file clears its error");
    assert_eq!(manifests.objects()[0].object_ref().name, "a2");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_invalid_document_is_rejected_alone_and_keeps_its_objects_last_good_version() {
    let dir = std::env::temp_dir().join(format!("weft-manifest-docs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let split = |weight: &str| {
        format!(
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: s}}\nspec: {{service: web, backends: [{{service: web-v2, weight: {weight}}}]}}\n"
        )
    };
    let file = dir.join("mesh.yaml");
    let write = |split_doc: &str| {
        let text = format!(
            "{}---\n{split_doc}---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {{name: no-spec}}\n",
            service("web", "198.19.0.1", "http")
        );
        std::fs::write(&file, text).unwrap();
    };
    let names = |m: &ManifestDir| -> Vec<String> {
        let mut v: Vec<String> = m
            .objects()
            .iter()
            .map(|o| o.object_ref().to_string())
            .collect();
        v.sort();
        v
    };

    // First read: the broken split is reported; the service and the TCPRoute (whose
    // spec may be left out) apply.
    write(&split("lots"));
    let mut manifests = ManifestDir::new(&dir);
    manifests.rescan().unwrap();
    assert_eq!(
        names(&manifests),
        vec!["Service default/web", "TCPRoute default/no-spec"]
    );
    let errors = manifests.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .reason
            .starts_with("document 2: invalid TrafficSplit"),
        "{errors:?}"
    );

    // Fixed: the split applies and the error clears.
    write(&split("100"));
    manifests.rescan().unwrap();
    assert!(manifests.errors().is_empty());
    assert_eq!(names(&manifests).len(), 3);

    // Broken again: its last good version keeps serving, next to the others.
    write(&split("-1x"));
    manifests.rescan().unwrap();
    assert_eq!(manifests.errors().len(), 1);
    let objects = manifests.objects();
    let kept = objects
        .iter()
        .find(|o| o.object_ref().to_string() == "TrafficSplit default/s")
        .expect("last good split kept");
    let weft::index::MeshObject::TrafficSplit(kept) = kept else {
        panic!("a TrafficSplit")
    };
    assert_eq!(kept.spec.backends[0].weight, 100);
    assert_eq!(names(&manifests).len(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn dual_stack_services_take_endpoints_from_their_primary_family() {
    let text = r#"
apiVersion: v1
kind: Service
metadata: {name: v6first}
spec:
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 198.19.0.10]
  ipFamilies: [IPv6, IPv4]
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: v4only}
spec: {clusterIP: 198.19.0.11, selector: {app: db}, ports: [{name: tcp-pg, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: sliced}
spec: {clusterIP: fd00::12, ipFamilies: [IPv6], ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sliced-v4, labels: {kubernetes.io/service-name: sliced}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.0.20]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sliced-v6, labels: {kubernetes.io/service-name: sliced}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00::20"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 198.18.0.2, podIPs: [{ip: 198.18.0.2}, {ip: "fd00::2"}]}
"#;
    let model = index_of(text).model().clone();
    assert!(model.problems.is_empty(), "{:?}", model.problems);
    let endpoints = |name: &str| {
        model
            .services
            .values()
            .find(|s| s.key.name == name)
            .unwrap()
            .ports[0]
            .ready_endpoints()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        endpoints("v6first"),
        vec!["[fd00::2]:5432".parse().unwrap()]
    );
    assert_eq!(
        endpoints("v4only"),
        vec!["198.18.0.2:5432".parse().unwrap()]
    );
    assert_eq!(
        endpoints("sliced"),
        vec!["[fd00::20]:8080".parse().unwrap()],
        "only the slices of the service's family"
    );
    let v6first = model
        .services
        .values()
        .find(|s| s.key.name == "v6first")
        .unwrap();
    assert_eq!(
        v6first.cluster_ips,
        vec![
            "fd00::10".parse::<std::net::IpAddr>().unwrap(),
            "198.19.0.10".parse().unwrap()
        ]
    );
    assert_eq!(model.workloads["default/db-0"].ips.len(), 2);
}

#[test]
fn two_clusterips_of_one_family_are_rejected() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 198.19.0.1, clusterIPs: [198.19.0.1, 198.19.0.2]}\n";
    let model = index_of(text).model().clone();
    assert!(model.services.is_empty());
    assert!(
        model.problems[0]
            .reason
            .contains("two addresses of one family"),
        "{:?}",
        model.problems
    );
}

#[test]
fn port_protocols_follow_app_protocol_then_name_then_well_known_ports() {
    let text = r#"
apiVersion: config.weft.dev/v1alpha1
kind: MeshConfig
metadata: {name: weft}
spec: {opaquePorts: [7000], protocolDetectionTimeout: soon}
---
apiVersion: v1
kind: Service
metadata: {name: s}
spec:
  clusterIP: 198.19.0.1
  selector: {app: s}
  ports:
  - {name: tcp-x, port: 80, appProtocol: kubernetes.io/h2c}
  - {name: mongo-main, port: 81}
  - {port: 3306}
  - {port: 7000}
  - {name: web, port: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: s-0, labels: {app: s}}
spec: {containers: [{name: c, image: i}]}
status: {podIP: 198.18.0.2}
"#;
    let model = index_of(text).model().clone();
    let ports: Vec<(u16, AppProtocol)> = model
        .services
        .values()
        .next()
        .unwrap()
        .ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        vec![
            (80, AppProtocol::Http2),
            (81, AppProtocol::Tcp),
            (3306, AppProtocol::Tcp),
            (7000, AppProtocol::Tcp),
            (8080, AppProtocol::Detect),
        ]
    );
    let inbound: Vec<(u16, AppProtocol)> = model.workloads["default/s-0"]
        .inbound_ports
        .iter()
        .map(|p| (p.port, p.protocol))
        .collect();
    assert_eq!(
        inbound, ports,
        "the pod serves each port as its Service declares it"
    );
    assert!(
        model
            .problems
            .iter()
            .any(|p| !p.rejected && p.reason.contains("protocolDetectionTimeout \"soon\"")),
        "a bad duration is reported and the default applies: {:?}",
        model.problems
    );
    assert!(
        model
            .settings
            .unwrap()
            .spec
            .protocol_detection_timeout
            .is_none()
    );
}

/// Ten levels of anchors, each aliasing the one before nine times: 9^10 nodes.
fn billion_laughs() -> String {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
    }
    text
}

/// `levels` mappings, each indented one more space than the one before.
fn indented(levels: usize) -> String {
    (0..levels)
        .map(|l| format!("{}k{l}:\n", " ".repeat(l)))
        .collect()
}

#[test]
fn hostile_manifests_are_rejected_with_a_reason_before_the_parser_runs() {
    let service_with = |annotation: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: big\n  annotations:\n    note: {annotation}\nspec: {{clusterIP: 198.19.0.9, ports: [{{port: 80}}]}}\n"
        )
    };
    // One anchor of 20,000 cells, aliased in 20,000 cells: 4 * 10^8 nodes from 100 KB,
    // which serde_yaml_ng's own repetition limit lets through.
    let wide = format!(
        "a: &a [{}]\nb: [{}]\n",
        vec!["x"; 20_000].join(","),
        vec!["*a"; 20_000].join(",")
    );
    let cases = [
        (
            "100,000 nested brackets",
            "[".repeat(100_000),
            "nesting deeper than 64 levels at line 1 column 65",
        ),
        (
            "100,000 nested flow mappings",
            "{a: ".repeat(100_000),
            "nesting deeper than 64 levels at line 1 column 257",
        ),
        (
            "10,000 nested block sequences",
            format!("kind: Pod\nspec:\n{}x\n", "- ".repeat(10_000)),
            "nesting deeper than 64 levels at line 3 column 127",
        ),
        (
            "100 levels of indentation",
            indented(100),
            "nesting deeper than 64 levels at line 65 column 65",
        ),
        (
            // 48 MiB: one more space per level adds up.
            "10,000 levels of indentation",
            indented(10_000),
            "is larger than the 16.0 MiB limit",
        ),
        ("a billion laughs", billion_laughs(), "YAML aliases expand"),
        ("an anchor aliased everywhere", wide, "YAML aliases expand"),
        (
            "an object larger than the API server takes",
            service_with(&"x".repeat(4 << 20)),
            "the document at line 1 is larger than the 3.0 MiB limit",
        ),
    ];
    for (what, text, reason) in cases {
        let started = std::time::Instant::now();
        let err = parse_manifests(&text).unwrap_err().to_string();
        let took = started.elapsed();
        assert!(err.contains(reason), "{what}: {err}");
        // A generous bound that only guards against a hang (the parser alone spends
        // minutes on the nested flow mappings).
        assert!(took < std::time::Duration::from_secs(2), "{what}: {took:?}");
    }
    // Within the bounds, the same shapes parse as before.
    assert_eq!(
        parse_manifests(&service_with(&"x".repeat(1 << 20)))
            .unwrap()
            .len(),
        1
    );
    let anchored = "apiVersion: v1\nkind: Service\nmetadata: {name: anchored, labels: &labels {app: web}}\nspec: {clusterIP: 198.19.0.8, selector: *labels, ports: [{port: 80}]}\n";
    assert_eq!(parse_manifests(anchored).unwrap().len(), 1);
    let deep = weft::sources::parse_manifest_documents(&indented(64)).unwrap();
    assert_eq!(deep.rejected[0].reason, "document 1: no kind");
}

#[test]
fn a_hostile_file_is_reported_like_a_broken_one_and_the_others_keep_serving() {
    let dir = std::env::temp_dir().join(format!("weft-manifest-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.yaml"), service("a", "198.19.0.1", "http")).unwrap();
    std::fs::write(
        dir.join("b.json"),
        serde_json_line(&service("b", "198.19.0.2", "http")),
    )
    .unwrap();
    std::fs::write(dir.join("c.yaml"), service("c", "198.19.0.3", "http")).unwrap();
    let mut manifests = ManifestDir::new(&dir);
    manifests.rescan().unwrap();
    assert_eq!(manifests.objects().len(), 3);

    // c turns hostile; d is an alias bomb; e is larger than any manifest file may be
    // (it is refused before it is read).
    std::fs::write(dir.join("c.yaml"), "[".repeat(100_000)).unwrap();
    std::fs::write(dir.join("d.yaml"), billion_laughs()).unwrap();
    let e = std::fs::File::create(dir.join("e.yaml")).unwrap();
    e.set_len(17 << 20).unwrap();
    let started = std::time::Instant::now();
    manifests.rescan().unwrap();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");

    let names: Vec<String> = manifests
        .objects()
        .iter()
        .map(|o| o.object_ref().name)
        .collect();
    assert_eq!(names, vec!["a", "b", "c"], "c keeps its last good version");
    let errors: Vec<(String, String)> = manifests
        .errors()
        .into_iter()
        .map(|e| {
            (
                e.file.file_name().unwrap().to_string_lossy().into_owned(),
                e.reason,
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            (
                "c.yaml".to_string(),
                "nesting deeper than 64 levels at line 1 column 65".to_string()
            ),
            (
                "d.yaml".to_string(),
                "document 1: YAML aliases expand it to more than 2 times the text's size"
                    .to_string()
            ),
            (
                "e.yaml".to_string(),
                "the file (17.0 MiB) is larger than the 16.0 MiB limit".to_string()
            ),
        ]
    );

    // Fixed, c serves its new version and its error clears.
    std::fs::write(dir.join("c.yaml"), service("c2", "198.19.0.3", "http")).unwrap();
    manifests.rescan().unwrap();
    assert_eq!(manifests.errors().len(), 2);
    assert!(
        manifests
            .objects()
            .iter()
            .any(|o| o.object_ref().name == "c2")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_on_demand_annotation_is_read_and_an_unknown_value_reported() {
    let annotated = |name: &str, value: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: a}}, annotations: {{weft.dev/outbound-clusters: \"{value}\"}}}}\nspec: {{containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 198.18.0.9}}\n"
        )
    };
    let text = [
        annotated("lazy", "on-demand"),
        annotated("eager", "all"),
        annotated("typo", "ondemand"),
        pod("plain", "a", "198.18.0.8"),
    ]
    .join("---\n");
    let index = index_of(&text);
    let model = index.model();
    let on_demand = |name: &str| {
        model
            .workloads
            .values()
            .find(|w| w.name == name)
            .unwrap()
            .clusters_on_demand
    };
    assert!(on_demand("lazy"));
    assert!(!on_demand("eager") && !on_demand("typo") && !on_demand("plain"));
    let reported: Vec<String> = model
        .problems
        .iter()
        .map(|p| p.object.to_string())
        .collect();
    assert_eq!(reported, vec!["Pod default/typo"], "{:?}", model.problems);
    assert!(model.problems[0].reason.contains("\"ondemand\""));
}
