//! Parses multi-document Kubernetes YAML into index objects.

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::error::WeftError;
use crate::index::MeshObject;

fn typed<T: DeserializeOwned>(doc: Value, what: &str, n: usize) -> Result<T, WeftError> {
    serde_yaml_ng::from_value(doc).map_err(|e| WeftError::Manifest {
        reason: format!("document {n}: invalid {what}: {e}"),
    })
}

fn field<'a>(doc: &'a Value, key: &str) -> Option<&'a str> {
    doc.get(key).and_then(Value::as_str)
}

/// Turns one parsed document into objects; kinds Weft does not use are skipped.
fn document_objects(doc: Value, n: usize, out: &mut Vec<MeshObject>) -> Result<(), WeftError> {
    if doc.is_null() {
        return Ok(());
    }
    let api_version = field(&doc, "apiVersion").unwrap_or_default().to_string();
    let kind = field(&doc, "kind").unwrap_or_default().to_string();
    let object = match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = doc
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
            for item in items {
                document_objects(item, n, out)?;
            }
            return Ok(());
        }
        ("v1", "Service") => MeshObject::Service(typed(doc, "Service", n)?),
        ("v1", "Pod") => MeshObject::Pod(typed(doc, "Pod", n)?),
        ("v1", "ServiceAccount") => MeshObject::ServiceAccount(typed(doc, "ServiceAccount", n)?),
        ("config.weft.dev/v1alpha1", "MeshConfig") => {
            MeshObject::MeshConfig(typed(doc, "MeshConfig", n)?)
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            MeshObject::EndpointSlice(typed(doc, "EndpointSlice", n)?)
        }
        ("split.smi-spec.io/v1alpha4", "TrafficSplit") => {
            MeshObject::TrafficSplit(typed(doc, "TrafficSplit", n)?)
        }
        ("access.smi-spec.io/v1alpha3", "TrafficTarget") => {
            MeshObject::TrafficTarget(typed(doc, "TrafficTarget", n)?)
        }
        ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup") => {
            MeshObject::HTTPRouteGroup(typed(doc, "HTTPRouteGroup", n)?)
        }
        ("specs.smi-spec.io/v1alpha4", "TCPRoute") => {
            MeshObject::TCPRoute(typed(doc, "TCPRoute", n)?)
        }
        (_, "") => {
            return Err(WeftError::Manifest {
                reason: format!("document {n}: no kind"),
            });
        }
        (v, "TrafficSplit" | "TrafficTarget" | "HTTPRouteGroup" | "TCPRoute" | "MeshConfig") => {
            return Err(WeftError::Manifest {
                reason: format!("document {n}: {kind} apiVersion {v:?} is not supported"),
            });
        }
        (v, k) => {
            tracing::debug!(
                api_version = v,
                kind = k,
                "skipping a kind Weft does not use"
            );
            return Ok(());
        }
    };
    if object.object_ref().name.is_empty() {
        return Err(WeftError::Manifest {
            reason: format!("document {n}: {kind} has no metadata.name"),
        });
    }
    out.push(object);
    Ok(())
}

/// Parses every document of a YAML (or JSON) text. Any bad document fails the whole text,
/// so a half-edited file never applies half of its objects.
pub fn parse_manifests(text: &str) -> Result<Vec<MeshObject>, WeftError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let doc =
            <Value as serde::Deserialize>::deserialize(de).map_err(|e| WeftError::Manifest {
                reason: format!("document {n}: {e}"),
            })?;
        document_objects(doc, n, &mut out)?;
    }
    Ok(out)
}
