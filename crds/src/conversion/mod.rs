//! Conversion between the SMI versions Weft serves, as pure functions over JSON objects:
//! the conversion webhook (`weft-webhook`'s `/convert`), local mode (`weft up` reading an
//! older apiVersion) and the tests' API-server double all call [`convert`].
//!
//! Every conversion goes through the stored version (the hub): `split.smi-spec.io`
//! `v1alpha4`, `access.smi-spec.io` `v1alpha3`, `specs.smi-spec.io` `v1alpha4`. Only
//! what differs between two versions is touched; metadata (except one annotation),
//! status and every other field pass through unchanged.
//!
//! What each version cannot express is kept, as Kubernetes' own conversions do, in the
//! annotation [`ANNOTATION`] (`weft.dev/conversion-data`): a JSON object holding those
//! parts of the newer (or, for weights, the older) form, restored when the object comes
//! back, so every served version round-trips through the stored one without loss:
//!
//! | Kind | Versions | Differs | Kept as |
//! |---|---|---|---|
//! | TrafficSplit | v1alpha1 | weights are quantities (`500m`, `1`, `1.5`) | stored as whole milli-units (`500m` → 500, `1` → 1000); a spelling other than the canonical one (`0.5`, a number `1`) in `quantities` |
//! | TrafficSplit | v1alpha1, v1alpha2 | no `spec.matches` | `matches` |
//! | TrafficSplit | v1alpha3 | same schema as v1alpha4 | — |
//! | TrafficTarget | v1alpha2 | same schema as v1alpha3 in Weft (`destination.port` kept) | — |
//! | HTTPRouteGroup | v1alpha1, v1alpha2 | `matches` at the top level, no `spec` | other `spec` fields in `spec` |
//! | HTTPRouteGroup | v1alpha1 | no `headers` in a match | `headers`, per match index and name |
//! | HTTPRouteGroup | v1alpha3 | same schema as v1alpha4 | — |
//! | TCPRoute | v1alpha1, v1alpha2 | no `spec` | `spec` |
//! | TCPRoute | v1alpha3 | `spec` has no fields (no `matches.ports`) | `spec` |
//!
//! Weights in milli-units keep every ratio exact: a v1alpha1 split of `1500m` and `500m`
//! (or `3` and `1`) is stored as 1500 and 500 (3000 and 1000) and routes exactly like a
//! v1alpha4 split of 3 and 1. Read back as v1alpha1, a stored weight `w` is the quantity
//! `w/1000` (`"80"` for 80000, `"500m"` for 500). A quantity finer than a milli-unit
//! (`1u`), negative, or beyond an `i64` in milli-units is refused.

mod quantity;

use serde_json::{Map, Value};

pub use quantity::{canonical as canonical_quantity, parse_milli};

/// The annotation holding what the object's version cannot express (a JSON object).
pub const ANNOTATION: &str = crate::annotations::CONVERSION_DATA;

/// The path the conversion webhook serves, in `weft-webhook`.
pub const WEBHOOK_PATH: &str = "/convert";
/// The Service in front of `weft-webhook`, as the CRDs name it.
pub const WEBHOOK_SERVICE: &str = "weft-webhook";
/// The namespace the CRDs name for [`WEBHOOK_SERVICE`]: the chart's default; the
/// release namespace must replace it (the CRDs in `helm/weft/crds/` are not templated).
pub const WEBHOOK_NAMESPACE: &str = "weft-system";

/// A kind Weft serves, with its versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedKind {
    /// API group.
    pub group: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Resource (plural).
    pub plural: &'static str,
    /// Served versions, newest first; the first is the stored one.
    pub versions: &'static [&'static str],
    /// Whether the versions' schemas differ, so the API server converts through the
    /// webhook (`strategy: Webhook`) rather than by rewriting `apiVersion` (`None`).
    pub webhook: bool,
}

impl ServedKind {
    /// The stored version.
    pub fn storage_version(&self) -> &'static str {
        self.versions[0]
    }

    /// `group/version` of the stored version.
    pub fn storage_api_version(&self) -> String {
        format!("{}/{}", self.group, self.storage_version())
    }
}

/// Every custom kind Weft serves.
pub const SERVED_KINDS: &[ServedKind] = &[
    ServedKind {
        group: "split.smi-spec.io",
        kind: "TrafficSplit",
        plural: "trafficsplits",
        versions: &["v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"],
        webhook: true,
    },
    ServedKind {
        group: "access.smi-spec.io",
        kind: "TrafficTarget",
        plural: "traffictargets",
        versions: &["v1alpha3", "v1alpha2"],
        webhook: false,
    },
    ServedKind {
        group: "specs.smi-spec.io",
        kind: "HTTPRouteGroup",
        plural: "httproutegroups",
        versions: &["v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"],
        webhook: true,
    },
    ServedKind {
        group: "specs.smi-spec.io",
        kind: "TCPRoute",
        plural: "tcproutes",
        versions: &["v1alpha4", "v1alpha3", "v1alpha2", "v1alpha1"],
        webhook: true,
    },
    ServedKind {
        group: "config.weft.dev",
        kind: "MeshConfig",
        plural: "meshconfigs",
        versions: &["v1alpha1"],
        webhook: false,
    },
    ServedKind {
        group: "policy.weft.dev",
        kind: "TrafficPolicy",
        plural: "trafficpolicies",
        versions: &["v1alpha1"],
        webhook: false,
    },
];

/// The served kind `kind` of `api_version` (`group/version`), if Weft serves that version.
pub fn served_kind(api_version: &str, kind: &str) -> Option<&'static ServedKind> {
    let (group, version) = api_version.split_once('/')?;
    SERVED_KINDS
        .iter()
        .find(|k| k.group == group && k.kind == kind && k.versions.contains(&version))
}

/// Why an object could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    /// Not a JSON object.
    #[error("the object is not a JSON object")]
    NotAnObject,
    /// No `apiVersion` or `kind` string.
    #[error("the object has no {0}")]
    Missing(&'static str),
    /// A kind or version Weft does not serve (the object's or the desired one).
    #[error("{kind} {api_version} is not served by Weft")]
    NotServed {
        /// `group/version`.
        api_version: String,
        /// Kind.
        kind: String,
    },
    /// A field the conversion reads is not what its version allows.
    #[error("{kind} {api_version}: {field}: {reason}")]
    Invalid {
        /// Kind.
        kind: String,
        /// `group/version` of the object.
        api_version: String,
        /// JSON path of the field, e.g. `spec.backends[0].weight`.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Converts `object` (any served version of a Weft kind) to `desired_api_version` of
/// the same group, through the stored version; an object already in that version is
/// returned unchanged. Only labels and annotations change in `metadata`, as the API
/// server requires of a conversion webhook.
pub fn convert(object: Value, desired_api_version: &str) -> Result<Value, ConversionError> {
    let Value::Object(object) = object else {
        return Err(ConversionError::NotAnObject);
    };
    let field = |name: &'static str| {
        object
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(ConversionError::Missing(name))
    };
    let (api_version, kind) = (field("apiVersion")?, field("kind")?);
    let served = served_kind(&api_version, &kind).ok_or_else(|| ConversionError::NotServed {
        api_version: api_version.clone(),
        kind: kind.clone(),
    })?;
    let to = match served_kind(desired_api_version, &kind) {
        Some(k) if k == served => version_of(desired_api_version),
        _ => {
            return Err(ConversionError::NotServed {
                api_version: desired_api_version.to_string(),
                kind,
            });
        }
    };
    let from = version_of(&api_version).to_string();
    if from == to {
        return Ok(Value::Object(object));
    }
    let mut c = Converting {
        object,
        data: Map::new(),
        kind: served.kind,
        api_version,
    };
    c.take_data();
    match served.kind {
        "TrafficSplit" => {
            split::to_hub(&mut c, &from)?;
            split::from_hub(&mut c, to)?;
        }
        "HTTPRouteGroup" => {
            http_route_group::to_hub(&mut c, &from)?;
            http_route_group::from_hub(&mut c, to)?;
        }
        "TCPRoute" => {
            tcp_route::to_hub(&mut c, &from)?;
            tcp_route::from_hub(&mut c, to)?;
        }
        // Same schema in every version: only apiVersion changes.
        _ => {}
    }
    c.put_data();
    let mut object = c.object;
    object.insert("apiVersion".to_string(), Value::from(desired_api_version));
    Ok(Value::Object(object))
}

fn version_of(api_version: &str) -> &str {
    api_version
        .split_once('/')
        .map_or(api_version, |(_, version)| version)
}

/// An object being converted, with the conversion data taken out of its annotation.
struct Converting {
    object: Map<String, Value>,
    data: Map<String, Value>,
    kind: &'static str,
    /// The version the object came in (for error messages).
    api_version: String,
}

impl Converting {
    fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> ConversionError {
        ConversionError::Invalid {
            kind: self.kind.to_string(),
            api_version: self.api_version.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Takes the annotation out. One that is not a JSON object (not written by Weft) is
    /// dropped: it holds nothing a conversion can use.
    fn take_data(&mut self) {
        let Some(Value::Object(metadata)) = self.object.get_mut("metadata") else {
            return;
        };
        let Some(Value::Object(annotations)) = metadata.get_mut("annotations") else {
            return;
        };
        let Some(text) = annotations.remove(ANNOTATION) else {
            return;
        };
        if annotations.is_empty() {
            metadata.remove("annotations");
        }
        if let Some(Value::Object(data)) = text.as_str().and_then(|t| serde_json::from_str(t).ok())
        {
            self.data = data;
        }
    }

    /// Puts what is left of the conversion data back into the annotation.
    fn put_data(&mut self) {
        if self.data.is_empty() {
            return;
        }
        let text = Value::Object(std::mem::take(&mut self.data)).to_string();
        let metadata = self
            .object
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(metadata) = metadata else {
            return;
        };
        let annotations = metadata
            .entry("annotations")
            .or_insert_with(|| Value::Object(Map::new()));
        if !annotations.is_object() {
            *annotations = Value::Object(Map::new());
        }
        if let Value::Object(annotations) = annotations {
            annotations.insert(ANNOTATION.to_string(), Value::String(text));
        }
    }

    /// `spec`, if present; an error if it is not an object.
    fn spec(&mut self) -> Result<Option<&mut Map<String, Value>>, ConversionError> {
        match self.object.get("spec") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(_)) => {
                Ok(self.object.get_mut("spec").and_then(Value::as_object_mut))
            }
            Some(_) => Err(self.invalid("spec", "not an object")),
        }
    }

    /// Fails when the object has `field` at the top level, which its version lacks.
    fn refuse_top_level(&self, field: &str, why: &str) -> Result<(), ConversionError> {
        match self.object.get(field) {
            Some(_) => Err(self.invalid(field, why)),
            None => Ok(()),
        }
    }
}

/// TrafficSplit: v1alpha4 (stored) = v1alpha3 ⊃ v1alpha2 (no matches) ≈ v1alpha1
/// (quantity weights).
mod split {
    use serde_json::{Value, json};

    use super::quantity::{canonical, value_milli};
    use super::{ConversionError, Converting};

    const MATCHES: &str = "matches";
    const QUANTITIES: &str = "quantities";

    pub(super) fn to_hub(c: &mut Converting, from: &str) -> Result<(), ConversionError> {
        let matches = c.data.remove(MATCHES);
        if matches!(from, "v1alpha1" | "v1alpha2") {
            if c.spec()?.is_some_and(|s| s.contains_key(MATCHES)) {
                return Err(c.invalid(
                    "spec.matches",
                    "TrafficSplits have matches from v1alpha3 on; write v1alpha3 or v1alpha4",
                ));
            }
            if let (Some(matches), Some(spec)) = (matches, c.spec()?) {
                spec.insert(MATCHES.to_string(), matches);
            }
        }
        let quantities = c.data.remove(QUANTITIES);
        if from != "v1alpha1" {
            // Spellings of weights that have changed since are forgotten.
            let current = backends(c)?.cloned().unwrap_or_default();
            let still: Vec<Value> = (quantities.iter())
                .filter_map(Value::as_array)
                .flatten()
                .filter(|q| spelling_for(q, &current).is_some())
                .cloned()
                .collect();
            if !still.is_empty() {
                c.data.insert(QUANTITIES.to_string(), Value::Array(still));
            }
            return Ok(());
        }
        // v1alpha1: quantities to whole milli-units, with the spellings that are not
        // the canonical form kept.
        let mut spelled = Vec::new();
        let mut failure = None;
        for (i, backend) in backends(c)?.into_iter().flatten().enumerate() {
            let Value::Object(backend) = backend else {
                continue;
            };
            let Some(weight) = backend.get_mut("weight") else {
                continue;
            };
            match value_milli(weight) {
                Ok(milli) => {
                    let quantity = std::mem::replace(weight, json!(milli));
                    if canonical(milli) != quantity {
                        let service = backend.get("service").cloned().unwrap_or(Value::Null);
                        spelled.push(json!({"backend": i, "service": service,
                                            "weight": milli, "quantity": quantity}));
                    }
                }
                Err(why) => {
                    failure = Some((format!("spec.backends[{i}].weight"), why));
                    break;
                }
            }
        }
        if let Some((field, why)) = failure {
            return Err(c.invalid(field, why));
        }
        if !spelled.is_empty() {
            c.data.insert(QUANTITIES.to_string(), Value::Array(spelled));
        }
        Ok(())
    }

    pub(super) fn from_hub(c: &mut Converting, to: &str) -> Result<(), ConversionError> {
        if matches!(to, "v1alpha1" | "v1alpha2")
            && let Some(matches) = c.spec()?.and_then(|s| s.remove(MATCHES))
        {
            c.data.insert(MATCHES.to_string(), matches);
        }
        if to != "v1alpha1" {
            return Ok(());
        }
        let quantities = match c.data.remove(QUANTITIES) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        let current = backends(c)?.cloned().unwrap_or_default();
        let mut failure = None;
        for (i, backend) in backends(c)?.into_iter().flatten().enumerate() {
            let Some(weight) = backend.get_mut("weight") else {
                continue;
            };
            let Some(milli) = weight.as_i64().filter(|w| *w >= 0) else {
                failure = Some((
                    format!("spec.backends[{i}].weight"),
                    format!("{weight} is not a whole number of 0 or more"),
                ));
                break;
            };
            let spelled = (quantities.iter())
                .filter(|q| q.get("backend") == Some(&json!(i)))
                .find_map(|q| spelling_for(q, &current));
            *weight = spelled.unwrap_or_else(|| canonical(milli));
        }
        match failure {
            Some((field, why)) => Err(c.invalid(field, why)),
            None => Ok(()),
        }
    }

    /// `spec.backends`, if present.
    fn backends(c: &mut Converting) -> Result<Option<&mut Vec<Value>>, ConversionError> {
        let not_a_list = (c.spec()?.and_then(|s| s.get("backends")))
            .is_some_and(|b| !b.is_array() && !b.is_null());
        if not_a_list {
            return Err(c.invalid("spec.backends", "not a list"));
        }
        Ok(c.spec()?
            .and_then(|s| s.get_mut("backends"))
            .and_then(Value::as_array_mut))
    }

    /// The original quantity of a `quantities` entry, if it still describes its backend
    /// of `current` (same index, service and weight) and spells that weight.
    fn spelling_for(entry: &Value, current: &[Value]) -> Option<Value> {
        let i = usize::try_from(entry.get("backend")?.as_u64()?).ok()?;
        let backend = current.get(i)?;
        let weight = entry.get("weight")?.as_i64()?;
        let quantity = entry.get("quantity")?;
        let same = backend.get("service") == entry.get("service")
            && backend.get("weight").and_then(Value::as_i64) == Some(weight)
            && value_milli(quantity) == Ok(weight);
        same.then(|| quantity.clone())
    }
}

/// HTTPRouteGroup: v1alpha4 (stored) = v1alpha3 (`spec.matches`); v1alpha2 and
/// v1alpha1 keep `matches` at the top level, and v1alpha1's matches have no headers.
mod http_route_group {
    use serde_json::{Map, Value, json};

    use super::{ConversionError, Converting};

    const SPEC: &str = "spec";
    const MATCHES: &str = "matches";
    const HEADERS: &str = "headers";

    pub(super) fn to_hub(c: &mut Converting, from: &str) -> Result<(), ConversionError> {
        let kept_spec = c.data.remove(SPEC);
        let kept_headers = c.data.remove(HEADERS);
        if !matches!(from, "v1alpha1" | "v1alpha2") {
            return Ok(());
        }
        c.refuse_top_level(
            SPEC,
            "HTTPRouteGroups have a spec from v1alpha3 on; in v1alpha1 and v1alpha2 matches are at the top level",
        )?;
        if from == "v1alpha1"
            && let Some(Value::Array(items)) = c.object.get(MATCHES)
            && let Some(i) = items.iter().position(|m| m.get(HEADERS).is_some())
        {
            return Err(c.invalid(
                format!("matches[{i}].headers"),
                "HTTPRouteGroup matches have headers from v1alpha2 on",
            ));
        }
        let mut spec = match kept_spec {
            Some(Value::Object(spec)) => spec,
            _ => Map::new(),
        };
        if let Some(mut matches) = c.object.remove(MATCHES) {
            if from == "v1alpha1"
                && let (Some(Value::Array(kept)), Value::Array(items)) =
                    (kept_headers, &mut matches)
            {
                for entry in kept {
                    let Some(i) = (entry.get("match").and_then(Value::as_u64))
                        .and_then(|i| usize::try_from(i).ok())
                    else {
                        continue;
                    };
                    if let Some(Value::Object(m)) = items.get_mut(i)
                        && m.get("name").unwrap_or(&Value::Null)
                            == entry.get("name").unwrap_or(&Value::Null)
                        && let Some(headers) = entry.get(HEADERS)
                    {
                        m.insert(HEADERS.to_string(), headers.clone());
                    }
                }
            }
            spec.insert(MATCHES.to_string(), matches);
        }
        c.object.insert(SPEC.to_string(), Value::Object(spec));
        Ok(())
    }

    pub(super) fn from_hub(c: &mut Converting, to: &str) -> Result<(), ConversionError> {
        if !matches!(to, "v1alpha1" | "v1alpha2") {
            return Ok(());
        }
        c.spec()?;
        let Some(Value::Object(mut spec)) = c.object.remove(SPEC) else {
            return Ok(());
        };
        let matches = spec.remove(MATCHES);
        if !spec.is_empty() {
            c.data.insert(SPEC.to_string(), Value::Object(spec));
        }
        let Some(mut matches) = matches else {
            return Ok(());
        };
        if to == "v1alpha1"
            && let Value::Array(items) = &mut matches
        {
            let mut kept = Vec::new();
            for (i, m) in items.iter_mut().enumerate() {
                if let Value::Object(m) = m
                    && let Some(headers) = m.remove(HEADERS)
                {
                    let name = m.get("name").cloned().unwrap_or(Value::Null);
                    kept.push(json!({"match": i, "name": name, "headers": headers}));
                }
            }
            if !kept.is_empty() {
                c.data.insert(HEADERS.to_string(), Value::Array(kept));
            }
        }
        c.object.insert(MATCHES.to_string(), matches);
        Ok(())
    }
}

/// TCPRoute: v1alpha4 (stored) has `spec.matches.ports`; v1alpha3 an empty `spec`;
/// v1alpha2 and v1alpha1 no `spec`.
mod tcp_route {
    use serde_json::{Map, Value};

    use super::{ConversionError, Converting};

    const SPEC: &str = "spec";

    pub(super) fn to_hub(c: &mut Converting, from: &str) -> Result<(), ConversionError> {
        let kept = c.data.remove(SPEC).filter(Value::is_object);
        match from {
            "v1alpha1" | "v1alpha2" => {
                c.refuse_top_level(SPEC, "TCPRoutes have a spec from v1alpha3 on")?;
                let spec = kept.unwrap_or_else(|| Value::Object(Map::new()));
                c.object.insert(SPEC.to_string(), spec);
            }
            "v1alpha3" => {
                if let Some(field) = c.spec()?.and_then(|s| s.keys().next().cloned()) {
                    return Err(c.invalid(
                        format!("spec.{field}"),
                        "a v1alpha3 TCPRoute's spec has no fields; matches.ports came in v1alpha4",
                    ));
                }
                if let Some(kept) = kept {
                    c.object.insert(SPEC.to_string(), kept);
                }
            }
            _ => {}
        }
        Ok(())
    }

    pub(super) fn from_hub(c: &mut Converting, to: &str) -> Result<(), ConversionError> {
        let spec = match to {
            "v1alpha1" | "v1alpha2" => {
                c.spec()?;
                c.object.remove(SPEC)
            }
            "v1alpha3" => c.spec()?.map(|spec| Value::Object(std::mem::take(spec))),
            _ => return Ok(()),
        };
        if let Some(spec) = spec.filter(|s| s.as_object().is_some_and(|s| !s.is_empty())) {
            c.data.insert(SPEC.to_string(), spec);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
