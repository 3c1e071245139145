//! The Gateway API types accept every field the upstream v1.6.1 schemas define: a
//! maximal object built by walking each CRD's `openAPIV3Schema` deserializes and
//! serializes back unchanged; the upstream defaults are left as written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use weft_crds::{GRPCRoute, HTTPRoute, ReferenceGrant};

fn schema(file: &str, version: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/gateway-api-v1.6.1")
        .join(file);
    let path = if path.exists() {
        path
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../helm/weft/crds-gateway")
            .join(file)
    };
    let text = std::fs::read_to_string(&path).expect("upstream CRD readable");
    let crd: Value = serde_yaml_ng::from_str(&text).expect("CRD YAML");
    crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == version)
        .expect("version served")["schema"]["openAPIV3Schema"]
        .clone()
}

/// A value with every property the schema defines (one item per array).
fn maximal(schema: &Value, depth: usize) -> Value {
    assert!(depth < 40, "schema nests too deep");
    if let Some(values) = schema["enum"].as_array() {
        return values.last().unwrap().clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    out.insert(name.clone(), maximal(sub, depth + 1));
                }
            }
            Value::Object(out)
        }
        Some("array") => json!([maximal(&schema["items"], depth + 1)]),
        Some("integer") => json!(7),
        Some("boolean") => json!(true),
        Some("string") => json!("x"),
        other => panic!("schema type {other:?}"),
    }
}

fn round_trip<T: DeserializeOwned + serde::Serialize>(file: &str, version: &str, kind: &str) {
    let schema = schema(file, version);
    let mut object = maximal(&schema, 0);
    object["apiVersion"] = json!(format!("gateway.networking.k8s.io/{version}"));
    object["kind"] = json!(kind);
    object["metadata"] = json!({"name": "r", "namespace": "shop"});
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{kind} with every field: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(back, object, "{kind} re-serialized differs");
}

#[test]
fn httproute_accepts_every_upstream_field() {
    round_trip::<HTTPRoute>("httproutes.yaml", "v1", "HTTPRoute");
}

#[test]
fn grpcroute_accepts_every_upstream_field() {
    round_trip::<GRPCRoute>("grpcroutes.yaml", "v1", "GRPCRoute");
}

#[test]
fn referencegrant_accepts_every_upstream_field() {
    round_trip::<ReferenceGrant>("referencegrants.yaml", "v1", "ReferenceGrant");
}

#[test]
fn a_minimal_mesh_route_deserializes_and_unknown_fields_are_dropped() {
    let text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: r, namespace: shop}\n\
                spec:\n  parentRefs: [{group: '', kind: Service, name: backend, port: 8080}]\n  \
                future: 1\n  rules:\n  - backendRefs: [{name: backend-v1, port: 8080, weight: 80}]\n";
    let route: HTTPRoute = serde_yaml_ng::from_str(text).unwrap();
    let parent = &route.spec.parent_refs.as_ref().unwrap()[0];
    assert!(parent.is_service());
    assert_eq!(parent.port, Some(8080));
    let rule = &route.spec.rules.as_ref().unwrap()[0];
    let backend = &rule.backend_refs.as_ref().unwrap()[0];
    assert_eq!(backend.backend.name, "backend-v1");
    assert!(backend.backend.is_service());
    assert_eq!(backend.weight, Some(80));
    assert!(rule.matches.is_none());
}
