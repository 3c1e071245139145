//! Parses multi-document Kubernetes YAML into index objects.

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::error::WeftError;
use crate::index::{Kind, MeshObject, ObjectRef};

/// A document that could not be used, and the object it names when that can be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedDocument {
    /// The object the document names (kind, namespace, name), if it names one.
    pub object: Option<ObjectRef>,
    /// Why, starting with `document N:`.
    pub reason: String,
}

/// What one manifest text yields: the usable objects and the rejected documents.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedManifest {
    /// Objects of every usable document.
    pub objects: Vec<MeshObject>,
    /// Documents that are well-formed YAML but not a valid object of their kind.
    pub rejected: Vec<RejectedDocument>,
}

fn field<'a>(doc: &'a Value, key: &str) -> Option<&'a str> {
    doc.get(key).and_then(Value::as_str)
}

/// The kind an `apiVersion`/`kind` pair names, if Weft reads it.
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    Some(match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "ServiceAccount") => Kind::ServiceAccount,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("split.smi-spec.io/v1alpha4", "TrafficSplit") => Kind::TrafficSplit,
        ("access.smi-spec.io/v1alpha3", "TrafficTarget") => Kind::TrafficTarget,
        ("specs.smi-spec.io/v1alpha4", "HTTPRouteGroup") => Kind::HTTPRouteGroup,
        ("specs.smi-spec.io/v1alpha4", "TCPRoute") => Kind::TCPRoute,
        ("config.weft.dev/v1alpha1", "MeshConfig") => Kind::MeshConfig,
        _ => return None,
    })
}

fn typed<T: DeserializeOwned>(doc: Value) -> Result<Box<T>, String> {
    serde_yaml_ng::from_value(doc).map_err(|e| e.to_string())
}

/// Decodes a document of a known kind.
fn decode(kind: Kind, mut doc: Value) -> Result<MeshObject, String> {
    let custom = matches!(
        kind,
        Kind::TrafficSplit
            | Kind::TrafficTarget
            | Kind::HTTPRouteGroup
            | Kind::TCPRoute
            | Kind::MeshConfig
    );
    // A custom resource may leave out `spec` (the SMI examples' TCPRoutes do); its
    // required fields, if any, are then reported by name.
    if custom
        && let Some(map) = doc.as_mapping_mut()
        && !map.contains_key("spec")
    {
        map.insert(
            Value::from("spec"),
            Value::Mapping(serde_yaml_ng::Mapping::new()),
        );
    }
    Ok(match kind {
        Kind::Service => MeshObject::Service(typed(doc)?),
        Kind::Pod => MeshObject::Pod(typed(doc)?),
        Kind::ServiceAccount => MeshObject::ServiceAccount(typed(doc)?),
        Kind::EndpointSlice => MeshObject::EndpointSlice(typed(doc)?),
        Kind::TrafficSplit => MeshObject::TrafficSplit(typed(doc)?),
        Kind::TrafficTarget => MeshObject::TrafficTarget(typed(doc)?),
        Kind::HTTPRouteGroup => MeshObject::HTTPRouteGroup(typed(doc)?),
        Kind::TCPRoute => MeshObject::TCPRoute(typed(doc)?),
        Kind::MeshConfig => MeshObject::MeshConfig(typed(doc)?),
    })
}

/// The object a raw document names, read without decoding it.
fn named_object(kind: Kind, doc: &Value) -> Option<ObjectRef> {
    let meta = doc.get("metadata")?;
    let name = field(meta, "name").filter(|n| !n.is_empty())?;
    let namespace = match kind {
        Kind::MeshConfig => "",
        _ => field(meta, "namespace").unwrap_or("default"),
    };
    Some(ObjectRef::new(kind, namespace, name))
}

/// Turns one parsed document into objects; kinds Weft does not use are skipped.
fn document_objects(doc: Value, n: usize, out: &mut ParsedManifest) {
    if doc.is_null() {
        return;
    }
    let api_version = field(&doc, "apiVersion").unwrap_or_default().to_string();
    let kind_name = field(&doc, "kind").unwrap_or_default().to_string();
    let reject = |out: &mut ParsedManifest, object, reason: String| {
        out.rejected.push(RejectedDocument {
            object,
            reason: format!("document {n}: {reason}"),
        });
    };
    if (api_version.as_str(), kind_name.as_str()) == ("v1", "List") {
        let items = doc
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for item in items {
            document_objects(item, n, out);
        }
        return;
    }
    let Some(kind) = kind_of(&api_version, &kind_name) else {
        match kind_name.as_str() {
            "" => reject(out, None, "no kind".to_string()),
            "TrafficSplit" | "TrafficTarget" | "HTTPRouteGroup" | "TCPRoute" | "MeshConfig" => {
                reject(
                    out,
                    None,
                    format!("{kind_name} apiVersion {api_version:?} is not supported"),
                )
            }
            _ => tracing::debug!(
                api_version,
                kind = kind_name,
                "skipping a kind Weft does not use"
            ),
        }
        return;
    };
    let Some(object) = named_object(kind, &doc) else {
        reject(out, None, format!("{kind_name} has no metadata.name"));
        return;
    };
    match decode(kind, doc) {
        Ok(decoded) => out.objects.push(decoded),
        Err(e) => reject(out, Some(object), format!("invalid {kind_name}: {e}")),
    }
}

/// Parses every document of a YAML (or JSON) text. A document that is not a valid
/// object is rejected on its own, as the API server would; a YAML syntax error fails
/// the whole text (the file is most likely being written), and so does a text beyond
/// Weft's input bounds (too large, nested too deep, aliases expanding too far), checked
/// before the parser runs so that the cost stays in proportion to the text's size.
pub fn parse_manifest_documents(text: &str) -> Result<ParsedManifest, WeftError> {
    weft_crds::bounds::check_yaml(text).map_err(WeftError::Bound)?;
    let mut out = ParsedManifest::default();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let doc =
            <Value as serde::Deserialize>::deserialize(de).map_err(|e| WeftError::Manifest {
                reason: format!("document {n}: {e}"),
            })?;
        document_objects(doc, n, &mut out);
    }
    Ok(out)
}

/// Parses every document of a text, failing on the first rejected document.
pub fn parse_manifests(text: &str) -> Result<Vec<MeshObject>, WeftError> {
    let parsed = parse_manifest_documents(text)?;
    match parsed.rejected.into_iter().next() {
        Some(rejected) => Err(WeftError::Manifest {
            reason: rejected.reason,
        }),
        None => Ok(parsed.objects),
    }
}
