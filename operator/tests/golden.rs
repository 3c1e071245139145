//! Golden files for translate: `testdata/translate/in/*.yaml` (manifests) →
//! `testdata/translate/out/*.yaml` (every Envoy resource, as Envoy's own JSON
//! mapping in YAML, plus the problems found). Regenerate only with
//! `WEFT_UPDATE_GOLDEN=1 cargo test -p weft --test golden`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use weft::identity::{Svid, WorkloadSecrets, spiffe_id};
use weft::index::{Index, Workload};
use weft::proxy_config::{ResourceKind, render as render_snapshot};
use weft::sources::parse_manifests;
use weft::translate::{
    AccessMode, MeshConfig, MtlsMode, ProxyResources, grants_for, translate_consumer,
    translate_shared, translate_workload,
};

/// The descriptor set that envoy-types generates its code from (not exported by the
/// crate), read from the crate's sources.
fn envoy_types_descriptor_bytes() -> Vec<u8> {
    let rustc = std::process::Command::new("rustc")
        .arg("-vV")
        .output()
        .expect("rustc -vV runs");
    let host = String::from_utf8_lossy(&rustc.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("rustc names its host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Filtering to the host platform lets this run offline.
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types in the dependency graph");
    let bin = Path::new(manifest)
        .parent()
        .unwrap()
        .join("src/generated/types.bin");
    std::fs::read(&bin).expect("envoy-types descriptor set")
}

#[test]
fn the_built_in_envoy_descriptors_are_those_of_the_envoy_types_in_use() {
    // `weft proxy-config` embeds a copy; after an envoy-types upgrade, copy the new
    // one: cp $(envoy-types)/src/generated/types.bin operator/descriptors/envoy-types.bin
    let built_in: &[u8] = include_bytes!("../descriptors/envoy-types.bin");
    assert!(
        built_in == envoy_types_descriptor_bytes().as_slice(),
        "operator/descriptors/envoy-types.bin differs from envoy-types' own"
    );
}

/// Every resource of `resources`, as `weft proxy-config` shows them (types without
/// any left out).
fn render(resources: &ProxyResources) -> Value {
    let mut out = render_snapshot(&resources.to_snapshot(), &ResourceKind::ALL).unwrap();
    if let Value::Object(map) = &mut out {
        map.retain(|_, v| v.as_array().is_some_and(|a| !a.is_empty()));
    }
    out
}

/// Stand-in secrets: real keys are random, golden files must not be.
fn fake_secrets(config: &MeshConfig, w: &Workload) -> WorkloadSecrets {
    let id = spiffe_id(&config.trust_domain, &w.namespace, &w.service_account);
    WorkloadSecrets {
        svid: Svid {
            cert_chain_pem: format!("<certificate of {id}>"),
            key_pem: format!("<key of {id}>"),
            spiffe_id: id,
            serial: "01".into(),
            not_before: std::time::SystemTime::UNIX_EPOCH,
            not_after: std::time::SystemTime::UNIX_EPOCH,
        },
        trust_bundle_pem: "<trust bundle>".into(),
    }
}

/// `# weft-golden: mtls=permissive access=permissive` on the first line sets modes
/// (default: strict, deny-by-default).
fn config_for(text: &str) -> MeshConfig {
    let mut config = MeshConfig::default();
    let directives = text.lines().next().unwrap_or_default();
    if directives.contains("mtls=permissive") {
        config.mtls = MtlsMode::Permissive;
    }
    if directives.contains("access=permissive") {
        config.access = AccessMode::Permissive;
    }
    config
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/translate/in");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    cases
}

#[test]
fn translate_matches_golden_files() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    let all = cases();
    assert!(all.len() >= 3, "golden cases present");
    for input in all {
        let text = std::fs::read_to_string(&input).unwrap();
        let mut index = Index::new();
        index.reset(parse_manifests(&text).unwrap());
        let model = index.model();
        // As the publisher does: a MeshConfig in the manifests overrides the flags.
        let config = config_for(&text).effective(model);
        let workloads: serde_json::Map<String, Value> = model
            .workloads
            .iter()
            .map(|(node, w)| {
                let secrets = w.meshed.then(|| fake_secrets(&config, w));
                let grants = grants_for(model, w);
                (
                    node.clone(),
                    render(&translate_workload(w, grants, &config, secrets.as_ref())),
                )
            })
            .collect();
        let problems: Vec<Value> = model
            .problems
            .iter()
            .map(|p| json!({ "object": p.object.to_string(), "rejected": p.rejected, "reason": p.reason }))
            .collect();
        let mut doc = json!({
            "problems": problems,
            "shared": render(&translate_shared(model, &config, true)),
            "workloads": workloads,
        });
        // Consumer routes: per caller namespace, the route configurations its proxies
        // get instead of the shared ones of the same names.
        let consumer: serde_json::Map<String, Value> = translate_consumer(model, &config)
            .iter()
            .map(|(ns, r)| (ns.clone(), render(r)))
            .collect();
        if !consumer.is_empty() {
            doc["consumer"] = Value::Object(consumer);
        }
        let text = format!(
            "# Generated from in/{}; regenerate with WEFT_UPDATE_GOLDEN=1 cargo test -p weft --test golden\n{}",
            input.file_name().unwrap().to_string_lossy(),
            serde_yaml_ng::to_string(&doc).unwrap()
        );
        let golden = input
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("out")
            .join(input.file_name().unwrap());
        if update {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        if expected != text {
            let diff = expected
                .lines()
                .zip(text.lines())
                .enumerate()
                .find(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("line {}: golden `{a}`, now `{b}`", i + 1))
                .unwrap_or_else(|| "lengths differ".to_string());
            failed.push(format!("{}: {diff}", golden.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "translation differs from golden files (if intended: WEFT_UPDATE_GOLDEN=1 cargo test -p weft --test golden):\n{}",
        failed.join("\n")
    );
}

#[test]
fn unchanged_input_gives_byte_identical_resources() {
    for input in cases() {
        let text = std::fs::read_to_string(&input).unwrap();
        let model = |t: &str| {
            let mut index = Index::new();
            index.reset(parse_manifests(t).unwrap());
            index.model().clone()
        };
        let (a, b) = (model(&text), model(&text));
        let config = MeshConfig::default();
        assert_eq!(
            translate_shared(&a, &config, true).to_snapshot(),
            translate_shared(&b, &config, true).to_snapshot()
        );
    }
}
