//! Parses multi-document Kubernetes YAML into index objects.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::error::WeftError;
use crate::index::{Kind, MeshObject, MeshPod, ObjectRef};

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

/// The kind an `apiVersion`/`kind` pair names, if Weft reads it: every version the
/// CRDs serve for Weft's custom kinds (see [`weft_crds::conversion::SERVED_KINDS`]).
fn kind_of(api_version: &str, kind: &str) -> Option<Kind> {
    Some(match (api_version, kind) {
        ("v1", "Service") => Kind::Service,
        ("v1", "Pod") => Kind::Pod,
        ("v1", "ServiceAccount") => Kind::ServiceAccount,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => Kind::HTTPRoute,
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => Kind::GRPCRoute,
        (
            "gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1",
            "ReferenceGrant",
        ) => Kind::ReferenceGrant,
        _ => match weft_crds::conversion::served_kind(api_version, kind)?.kind {
            "TrafficSplit" => Kind::TrafficSplit,
            "TrafficTarget" => Kind::TrafficTarget,
            "HTTPRouteGroup" => Kind::HTTPRouteGroup,
            "TCPRoute" => Kind::TCPRoute,
            "MeshConfig" => Kind::MeshConfig,
            "TrafficPolicy" => Kind::TrafficPolicy,
            _ => return None,
        },
    })
}

/// A custom resource written in an older served version, converted to the stored one
/// (the version Weft decodes) as the API server would through the conversion webhook;
/// other documents are returned as they are.
fn to_stored_version(api_version: &str, kind: &str, doc: Value) -> Result<Value, String> {
    let Some(served) = weft_crds::conversion::served_kind(api_version, kind) else {
        return Ok(doc);
    };
    let stored = served.storage_api_version();
    if api_version == stored {
        return Ok(doc);
    }
    let json: serde_json::Value = serde_json::to_value(&doc).map_err(|e| e.to_string())?;
    let converted = weft_crds::conversion::convert(json, &stored)
        .map_err(|e| format!("converting it to {stored}: {e}"))?;
    serde_yaml_ng::to_value(converted).map_err(|e| e.to_string())
}

/// A document as a `T`.
fn decoded<T: DeserializeOwned>(doc: Value) -> Result<T, String> {
    serde_yaml_ng::from_value(doc).map_err(|e| e.to_string())
}

/// A document as a `T` the index, the sources and their caches share.
fn typed<T: DeserializeOwned>(doc: Value) -> Result<Arc<T>, String> {
    decoded(doc).map(Arc::new)
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
        Kind::Service => MeshObject::Service(typed::<Service>(doc)?),
        Kind::Pod => MeshObject::Pod(Arc::new(MeshPod::from(decoded::<Pod>(doc)?))),
        Kind::ServiceAccount => MeshObject::ServiceAccount(typed(doc)?),
        Kind::EndpointSlice => MeshObject::EndpointSlice(typed::<EndpointSlice>(doc)?),
        Kind::TrafficSplit => MeshObject::TrafficSplit(typed(doc)?),
        Kind::TrafficTarget => MeshObject::TrafficTarget(typed(doc)?),
        Kind::HTTPRouteGroup => MeshObject::HTTPRouteGroup(typed(doc)?),
        Kind::TCPRoute => MeshObject::TCPRoute(typed(doc)?),
        Kind::MeshConfig => MeshObject::MeshConfig(typed(doc)?),
        Kind::HTTPRoute => MeshObject::HTTPRoute(typed(doc)?),
        Kind::GRPCRoute => MeshObject::GRPCRoute(typed(doc)?),
        Kind::ReferenceGrant => MeshObject::ReferenceGrant(typed(doc)?),
        Kind::TrafficPolicy => MeshObject::TrafficPolicy(typed(doc)?),
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
        let served = weft_crds::conversion::SERVED_KINDS
            .iter()
            .find(|k| k.kind == kind_name);
        match (kind_name.as_str(), served) {
            ("", _) => reject(out, None, "no kind".to_string()),
            (_, Some(served)) => reject(
                out,
                None,
                format!(
                    "{kind_name} apiVersion {api_version:?} is not supported (Weft reads {} {})",
                    served.group,
                    served.versions.join(", ")
                ),
            ),
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
    match to_stored_version(&api_version, &kind_name, doc).and_then(|doc| decode(kind, doc)) {
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
    parse_whole(text)
}

/// Every document of `text`, parsed in one go (its bounds already checked).
fn parse_whole(text: &str) -> Result<ParsedManifest, WeftError> {
    parse_stretch(text, 0).map(|(_, parsed)| parsed)
}

/// What the stretches of a file between document markers parsed to last time, by a
/// fingerprint of their text: editing one object of a file of a thousand re-parses that
/// object's document, not the file.
#[derive(Debug, Default)]
pub struct DocumentCache {
    /// Stretch → (number of documents before it, documents in it, what they gave).
    stretches: std::collections::HashMap<StretchKey, (usize, usize, ParsedManifest)>,
    /// Stretches the last parse read afresh.
    parsed: usize,
}

impl DocumentCache {
    /// How many stretches between document markers the last parse read afresh (the
    /// rest were unchanged).
    pub fn last_parsed(&self) -> usize {
        self.parsed
    }
}

/// [`parse_manifest_documents`], re-parsing only the stretches of `text` between
/// document markers that are new or moved since `cache` last saw the file. The result
/// is the same (a syntax error is reported as the whole text's parse reports it).
pub fn parse_manifest_documents_cached(
    text: &str,
    cache: &mut DocumentCache,
) -> Result<ParsedManifest, WeftError> {
    weft_crds::bounds::check_yaml(text).map_err(WeftError::Bound)?;
    cache.parsed = 0;
    let Some(stretches) = document_stretches(text) else {
        cache.stretches.clear();
        return parse_whole(text);
    };
    let mut out = ParsedManifest::default();
    let mut seen = std::collections::HashMap::with_capacity(stretches.len());
    let mut before = 0;
    for stretch in stretches {
        let key = StretchKey::of(stretch);
        let reused = cache
            .stretches
            .remove(&key)
            .filter(|(at, _, _)| *at == before);
        let (count, parsed) = match reused {
            Some((_, count, parsed)) => (count, parsed),
            None => match parse_stretch(stretch, before) {
                Ok(found) => {
                    cache.parsed += 1;
                    found
                }
                // Syntax errors are rare; the whole text tells where they are.
                Err(_) => {
                    cache.stretches.clear();
                    return parse_whole(text);
                }
            },
        };
        out.objects.extend(parsed.objects.iter().cloned());
        out.rejected.extend(parsed.rejected.iter().cloned());
        seen.insert(key, (before, count, parsed));
        before += count;
    }
    cache.stretches = seen;
    Ok(out)
}

/// A stretch of text by its length and two independent 64-bit hashes, instead of a copy
/// of the text: a 10,000-service manifest would otherwise be held twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct StretchKey {
    len: usize,
    fnv: u64,
    sip: u64,
}

impl StretchKey {
    fn of(stretch: &str) -> Self {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same text gives the same key on every rescan.
        let mut sip = std::hash::DefaultHasher::new();
        stretch.hash(&mut sip);
        Self {
            len: stretch.len(),
            fnv: weft_xds::resource::fnv1a(stretch.as_bytes()),
            sip: sip.finish(),
        }
    }
}

/// The documents of one stretch of text, numbered after the `before` that precede it,
/// and how many there are; a YAML syntax error fails the stretch.
fn parse_stretch(stretch: &str, before: usize) -> Result<(usize, ParsedManifest), WeftError> {
    let mut out = ParsedManifest::default();
    let mut count = 0;
    for de in serde_yaml_ng::Deserializer::from_str(stretch) {
        count += 1;
        let n = before + count;
        let doc =
            <Value as serde::Deserialize>::deserialize(de).map_err(|e| WeftError::Manifest {
                reason: format!("document {n}: {e}"),
            })?;
        document_objects(doc, n, &mut out);
    }
    Ok((count, out))
}

/// `text` cut before each `---` document marker (a marker at the start of a line is
/// always one, even inside what looks like a block scalar). `None` when the text has
/// directives (`%YAML`), which belong to the document after them.
fn document_stretches(text: &str) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') {
            return None;
        }
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if marker && at > start {
            out.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    out.push(&text[start..]);
    Some(out)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn split_of(text: &str) -> weft_crds::TrafficSplit {
        match parse_manifests(text).unwrap().as_slice() {
            [MeshObject::TrafficSplit(split)] => (**split).clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_v1alpha1_split_with_quantity_weights_reads_like_its_v1alpha4_twin() {
        let old = split_of(
            "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: s, namespace: shop}\n\
             spec:\n  service: web\n  backends:\n  - {service: web-v1, weight: 1500m}\n  - {service: web-v2, weight: 500m}\n",
        );
        let twin = split_of(
            "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s, namespace: shop}\n\
             spec:\n  service: web\n  backends:\n  - {service: web-v1, weight: 1500}\n  - {service: web-v2, weight: 500}\n",
        );
        assert_eq!(old.spec, twin.spec);
        assert_eq!(old.metadata, twin.metadata);
        // Argo Rollouts' "80"/"20" and plain numbers: whole quantities in milli-units.
        let argo = split_of(
            "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: s}\n\
             spec:\n  service: web\n  backends:\n  - {service: web-v1, weight: \"80\"}\n  - {service: web-v2, weight: 20}\n",
        );
        let weights: Vec<i64> = argo.spec.backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [80_000, 20_000]);
    }

    #[test]
    fn older_spec_and_access_versions_are_read_in_their_stored_form() {
        let text = "apiVersion: specs.smi-spec.io/v1alpha2\nkind: HTTPRouteGroup\nmetadata: {name: r}\n\
                    matches:\n- name: firefox\n  headers: {user-agent: \".*Firefox.*\"}\n\
                    ---\napiVersion: specs.smi-spec.io/v1alpha1\nkind: TCPRoute\nmetadata: {name: t}\n\
                    ---\napiVersion: access.smi-spec.io/v1alpha2\nkind: TrafficTarget\nmetadata: {name: a}\n\
                    spec:\n  destination: {kind: ServiceAccount, name: api, port: 8080}\n  sources: [{kind: ServiceAccount, name: web}]\n\
                    ---\napiVersion: split.smi-spec.io/v1alpha3\nkind: TrafficSplit\nmetadata: {name: s}\n\
                    spec:\n  service: web\n  matches: [{kind: HTTPRouteGroup, name: r}]\n  backends: [{service: web-v2, weight: 1}]\n";
        let objects = parse_manifests(text).unwrap();
        let [
            MeshObject::HTTPRouteGroup(group),
            MeshObject::TCPRoute(tcp),
            MeshObject::TrafficTarget(target),
            MeshObject::TrafficSplit(split),
        ] = objects.as_slice()
        else {
            panic!("{objects:?}");
        };
        assert_eq!(
            group.spec.matches[0]
                .headers
                .get("user-agent")
                .map(String::as_str),
            Some(".*Firefox.*")
        );
        assert!(tcp.spec.matches.ports.is_empty());
        assert_eq!(target.spec.destination.port, Some(8080));
        assert_eq!(split.spec.matches[0].name, "r");
    }

    #[test]
    fn what_an_older_version_cannot_hold_is_rejected_on_its_own_with_the_reason() {
        let text = "apiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: fine}\n\
                    spec: {service: web, backends: [{service: web-v1, weight: 1}]}\n\
                    ---\napiVersion: split.smi-spec.io/v1alpha1\nkind: TrafficSplit\nmetadata: {name: tiny}\n\
                    spec: {service: web, backends: [{service: web-v1, weight: 1u}]}\n\
                    ---\napiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {name: early}\n\
                    spec: {service: web, matches: [{kind: HTTPRouteGroup, name: r}], backends: [{service: web-v1, weight: 1}]}\n\
                    ---\napiVersion: split.smi-spec.io/v1alpha5\nkind: TrafficSplit\nmetadata: {name: future}\n";
        let parsed = parse_manifest_documents(text).unwrap();
        assert_eq!(parsed.objects.len(), 1);
        let reasons: Vec<&str> = parsed.rejected.iter().map(|r| r.reason.as_str()).collect();
        assert!(
            reasons[0].starts_with(
                "document 2: invalid TrafficSplit: converting it to split.smi-spec.io/v1alpha4"
            ) && reasons[0].contains("spec.backends[0].weight")
                && reasons[0].contains("finer than a milli-unit"),
            "{reasons:?}"
        );
        assert_eq!(
            parsed.rejected[0]
                .object
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("TrafficSplit default/tiny")
        );
        assert!(reasons[1].contains("from v1alpha3 on"), "{reasons:?}");
        assert!(
            reasons[2].contains("is not supported (Weft reads split.smi-spec.io v1alpha4, v1alpha3, v1alpha2, v1alpha1)"),
            "{reasons:?}"
        );
    }

    /// Texts whose documents a stretch-wise parse must read exactly as a whole parse.
    fn stretch_cases() -> Vec<String> {
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{port: 80}}]\n"
            )
        };
        let bad = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: bad}\nspec: {service: 7}\n";
        vec![
            format!("{}---\n{}---\n{bad}---\n{}", svc("a"), svc("b"), svc("c")),
            format!(
                "---\n{}---\n---\n# only a comment\n---\n{bad}---\n{}---\n",
                svc("a"),
                svc("b")
            ),
            format!("{}...\n---\n{}--- # trailing\n{bad}", svc("a"), svc("b")),
            format!(
                "{}---\n{}",
                svc("a"),
                "data: |\n  text\n  --- not a marker\n"
            ),
            "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"j\"}}"
                .to_string(),
            format!("%YAML 1.2\n---\n{}", svc("d")),
            format!("{}---\n{{unclosed: [\n---\n{}", svc("a"), svc("b")),
            String::new(),
        ]
    }

    #[test]
    fn a_stretch_wise_parse_reads_what_a_whole_parse_reads() {
        for text in stretch_cases() {
            let whole = parse_manifest_documents(&text).map_err(|e| e.to_string());
            let mut cache = DocumentCache::default();
            let first =
                parse_manifest_documents_cached(&text, &mut cache).map_err(|e| e.to_string());
            assert_eq!(first, whole, "{text}");
            let again =
                parse_manifest_documents_cached(&text, &mut cache).map_err(|e| e.to_string());
            assert_eq!(again, whole, "from the cache: {text}");
        }
    }

    #[test]
    fn editing_one_document_of_many_reparses_that_one() {
        let doc = |i: usize, port: u16| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  ports: [{{port: {port}}}]\n"
            )
        };
        let text = |edited: u16| -> String {
            (0..200)
                .map(|i| doc(i, if i == 120 { edited } else { 80 }))
                .collect()
        };
        let mut cache = DocumentCache::default();
        parse_manifest_documents_cached(&text(80), &mut cache).unwrap();
        assert_eq!(cache.last_parsed(), 200);
        let edited = parse_manifest_documents_cached(&text(81), &mut cache).unwrap();
        assert_eq!(
            cache.last_parsed(),
            1,
            "only the edited document is parsed again"
        );
        assert_eq!(edited, parse_manifest_documents(&text(81)).unwrap());
        // A document inserted in front moves every later one: they are numbered anew.
        let moved = format!("{}{}", doc(999, 80), text(81));
        let parsed = parse_manifest_documents_cached(&moved, &mut cache).unwrap();
        assert_eq!(parsed, parse_manifest_documents(&moved).unwrap());
    }
}
