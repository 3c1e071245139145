//! `weft proxy-config`: a proxy's resources as the control plane serves them, in the
//! JSON of Envoy's own config dump (proto field names, `@type` on every `Any`), with
//! private keys redacted as Envoy redacts them.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;
use weft_xds::{Snapshot, type_url};

use crate::error::WeftError;

/// The descriptor set envoy-types is generated from (its `src/generated/types.bin`,
/// which the crate does not export; `tests/golden.rs` checks this copy is the same).
static ENVOY_DESCRIPTORS: &[u8] = include_bytes!("../descriptors/envoy-types.bin");

/// What Envoy's config dump writes instead of a sensitive value.
const REDACTED: &str = "[redacted]";

/// The xDS resource types, by their config-dump names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ResourceKind {
    /// LDS.
    Listeners,
    /// RDS.
    Routes,
    /// SRDS: which route table each service address selects.
    Scopes,
    /// CDS.
    Clusters,
    /// EDS.
    Endpoints,
    /// SDS (private keys redacted).
    Secrets,
}

impl ResourceKind {
    /// Every kind, in the order they are printed.
    pub const ALL: [Self; 6] = [
        Self::Listeners,
        Self::Scopes,
        Self::Routes,
        Self::Clusters,
        Self::Endpoints,
        Self::Secrets,
    ];

    /// The name used in the output and the admin query.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listeners => "listeners",
            Self::Routes => "routes",
            Self::Scopes => "scopes",
            Self::Clusters => "clusters",
            Self::Endpoints => "endpoints",
            Self::Secrets => "secrets",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }

    fn type_url(self) -> &'static str {
        match self {
            Self::Listeners => type_url::LISTENER,
            Self::Routes => type_url::ROUTE,
            Self::Scopes => type_url::SCOPED_ROUTE,
            Self::Clusters => type_url::CLUSTER,
            Self::Endpoints => type_url::ENDPOINT,
            Self::Secrets => type_url::SECRET,
        }
    }
}

/// The Envoy API descriptors, decoded once.
pub fn envoy_descriptors() -> Result<&'static DescriptorPool, WeftError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(ENVOY_DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| WeftError::Usage(format!("the built-in Envoy descriptors: {e}")))
}

/// The resources of `kinds` in `snapshot` as JSON: `{"listeners": [...], ...}`, each
/// list sorted by name.
pub fn render(snapshot: &Snapshot, kinds: &[ResourceKind]) -> Result<Value, WeftError> {
    let pool = envoy_descriptors()?;
    let options = SerializeOptions::new().use_proto_field_name(true);
    let mut out = serde_json::Map::new();
    for kind in kinds {
        let mut resources: Vec<_> = snapshot
            .resources(kind.type_url())
            .map(|t| t.iter().collect())
            .unwrap_or_default();
        resources.sort_by(|a, b| a.name().cmp(b.name()));
        let mut items = Vec::with_capacity(resources.len());
        for resource in resources {
            let bad = |reason: String| {
                WeftError::Usage(format!("{} {}: {reason}", kind.as_str(), resource.name()))
            };
            let any = resource
                .to_any()
                .ok_or_else(|| bad("does not decode".into()))?;
            let name = any.type_url.rsplit('/').next().unwrap_or_default();
            let descriptor = pool
                .get_message_by_name(name)
                .ok_or_else(|| bad(format!("no descriptor for {name}")))?;
            let message = DynamicMessage::decode(descriptor, any.value.as_slice())
                .map_err(|e| bad(e.to_string()))?;
            let mut json = message
                .serialize_with_options(serde_json::value::Serializer, &options)
                .map_err(|e| bad(e.to_string()))?;
            redact(&mut json, false);
            // As in the config dump, where each resource is an `Any`.
            if let Value::Object(map) = &mut json {
                map.insert("@type".into(), Value::String(any.type_url.clone()));
            }
            items.push(json);
        }
        out.insert(kind.as_str().to_string(), Value::Array(items));
    }
    Ok(Value::Object(out))
}

/// Replaces every string under a `private_key` with `[redacted]` (bytes: its base64),
/// as Envoy's config dump does for sensitive fields.
fn redact(value: &mut Value, sensitive: bool) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let inside = sensitive || key == "private_key";
                if inside && key == "inline_bytes" {
                    *v = Value::String("W3JlZGFjdGVkXQ==".into());
                } else {
                    redact(v, inside);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, sensitive)),
        Value::String(s) if sensitive => *s = REDACTED.to_string(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
        Secret, TlsCertificate, secret,
    };
    use weft_xds::Resource;

    #[test]
    fn secrets_come_out_without_their_private_key_and_resources_with_their_types() {
        let secret = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(b"CERT".to_vec())),
                    ..Default::default()
                }),
                private_key: Some(DataSource {
                    specifier: Some(data_source::Specifier::InlineBytes(
                        b"-----BEGIN PRIVATE KEY-----".to_vec(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            })),
        };
        let snapshot = Snapshot::new().with(
            type_url::SECRET,
            [Resource::encode(type_url::SECRET, "default", &secret)],
        );
        let json = render(&snapshot, &ResourceKind::ALL).unwrap();
        let text = json.to_string();
        assert!(
            !text.contains("QkVHSU4"),
            "the key's base64 is gone: {text}"
        );
        let tls = &json["secrets"][0]["tls_certificate"];
        assert_eq!(tls["private_key"]["inline_bytes"], "W3JlZGFjdGVkXQ==");
        assert_eq!(tls["certificate_chain"]["inline_bytes"], "Q0VSVA==");
        assert_eq!(json["listeners"], serde_json::json!([]));
    }
}
