//! Label and field selectors of list and watch requests.

use serde_json::Value;

/// Which objects a list or watch wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    /// `None`: every namespace (or a cluster-scoped kind).
    pub namespace: Option<String>,
    /// `(key, op, values)`, op one of `in`, `notin`, `exists`, `!`.
    labels: Vec<(String, &'static str, Vec<String>)>,
    /// `(metadata field, equal, value)`.
    fields: Vec<(String, bool, String)>,
}

impl Filter {
    /// Parses `labelSelector` and `fieldSelector`; the error is for a 400.
    pub fn parse(namespace: Option<String>, labels: &str, fields: &str) -> Result<Self, String> {
        let labels = split_terms(labels)
            .into_iter()
            .map(|t| requirement(t).ok_or_else(|| format!("unable to parse requirement {t:?}")));
        let labels = labels.collect::<Result<_, _>>()?;
        let mut parsed = Vec::new();
        for term in fields.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, equal, value) = match term.split_once("!=") {
                Some((k, v)) => (k, false, v),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((k, v)) => (k, true, v),
                    None => return Err(format!("invalid field selector {term:?}")),
                },
            };
            // As for custom resources: only these two fields are indexed.
            let Some(field @ ("name" | "namespace")) = key.trim().strip_prefix("metadata.") else {
                return Err(format!("field label not supported: {}", key.trim()));
            };
            parsed.push((field.to_string(), equal, value.trim().to_string()));
        }
        Ok(Self {
            namespace,
            labels,
            fields: parsed,
        })
    }

    /// Whether an object in namespace `ns` ("" when cluster-scoped) is in scope.
    pub fn in_scope(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|want| want == ns)
    }

    /// Whether the object's labels and fields match.
    pub fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        let labels_match = self.labels.iter().all(|(key, op, values)| {
            let value = meta["labels"][key.as_str()].as_str();
            let listed = value.is_some_and(|v| values.iter().any(|w| w == v));
            match *op {
                "in" => listed,
                "notin" => !listed,
                "exists" => value.is_some(),
                _ => value.is_none(),
            }
        });
        let field = |f: &str| meta[f].as_str().unwrap_or("").to_string();
        labels_match
            && self
                .fields
                .iter()
                .all(|(f, eq, want)| (field(f) == *want) == *eq)
    }
}

/// Splits at commas outside parentheses: `a in (x,y),b` is two terms.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
fn requirement(term: &str) -> Option<(String, &'static str, Vec<String>)> {
    let list = |v: &str| v.split(',').map(|s| s.trim().to_string()).collect();
    let (key, op, values) = if let Some((head, rest)) = term.split_once('(') {
        let (key, op) = head.trim().split_once(' ')?;
        let op = match op.trim() {
            "in" => "in",
            "notin" => "notin",
            _ => return None,
        };
        (key, op, list(rest.strip_suffix(')')?))
    } else if let Some(key) = term.strip_prefix('!') {
        (key, "!", Vec::new())
    } else if let Some((key, value)) = term.split_once("!=") {
        (key, "notin", list(value))
    } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (key, "in", list(value))
    } else {
        (term, "exists", Vec::new())
    };
    let key = key.trim();
    (!key.is_empty() && !key.contains(' ')).then(|| (key.to_string(), op, values))
}
