//! Field ownership and server-side apply.
//!
//! Simpler than the API server's structured merge: maps recurse and every other value
//! (lists included) is one atomic leaf. That is enough for managers that own disjoint
//! fields, co-own equal values and conflict on differing ones.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// A field path: the map keys from the object's root to a leaf.
pub(crate) type Path = Vec<String>;

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Manager {
    pub name: String,
    /// Server-side apply, else `Update` (create, replace and other patches).
    pub apply: bool,
    /// "" for the main resource, else "status".
    pub subresource: &'static str,
    pub time: String,
    pub fields: BTreeSet<Path>,
}

impl Manager {
    fn is(&self, name: &str, apply: bool, subresource: &str) -> bool {
        (self.name.as_str(), self.apply, self.subresource) == (name, apply, subresource)
    }
}

/// The ownable leaves of an object and their values; of `metadata` only these count.
pub(crate) fn leaves(object: &Value) -> BTreeMap<Path, &Value> {
    fn walk<'a>(path: Path, value: &'a Value, out: &mut BTreeMap<Path, &'a Value>) {
        match value.as_object().filter(|m| !m.is_empty()) {
            Some(map) => {
                for (key, child) in map {
                    walk([path.clone(), vec![key.clone()]].concat(), child, out);
                }
            }
            None => {
                out.insert(path, value);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (key, value) in object.as_object().into_iter().flatten() {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(v) = value.get(field) {
                        walk(vec![key.clone(), field.into()], v, &mut out);
                    }
                }
            }
            _ => walk(vec![key.clone()], value, &mut out),
        }
    }
    out
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

fn set_path(value: &mut Value, path: &[String], leaf: Value) {
    let Some((first, rest)) = path.split_first() else {
        return *value = leaf;
    };
    if !value.is_object() {
        *value = json!({});
    }
    if let Some(map) = value.as_object_mut() {
        set_path(map.entry(first.clone()).or_insert(Value::Null), rest, leaf);
    }
}

/// Removes the leaf and the maps it leaves empty (but not `metadata`).
fn remove_path(value: &mut Value, path: &[String]) {
    let (Some((first, rest)), Some(map)) = (path.split_first(), value.as_object_mut()) else {
        return;
    };
    if rest.is_empty() {
        map.remove(first);
    } else if let Some(child) = map.get_mut(first) {
        remove_path(child, rest);
        if child.as_object().is_some_and(Map::is_empty) && first != "metadata" {
            map.remove(first);
        }
    }
}

fn is_empty_map(value: Option<&Value>) -> bool {
    value.and_then(Value::as_object).is_some_and(Map::is_empty)
}

/// Drops ownership of what is no longer a leaf, then managers owning nothing.
fn prune(managers: &mut Vec<Manager>, object: &Value) {
    let live = leaves(object);
    managers
        .iter_mut()
        .for_each(|m| m.fields.retain(|p| live.contains_key(p)));
    managers.retain(|m| !m.fields.is_empty());
}

/// Ownership after a non-apply write: the writer takes every leaf it changed, from
/// everyone else; leaves that are gone lose their owners.
pub(crate) fn record_update(
    managers: &mut Vec<Manager>,
    before: Option<&Value>,
    after: &Value,
    (writer, subresource): (&str, &'static str),
    now: &str,
) {
    let old = before.map(leaves).unwrap_or_default();
    let new = leaves(after)
        .into_iter()
        .filter(|(p, v)| old.get(p) != Some(v));
    let changed: BTreeSet<Path> = new.map(|(p, _)| p).collect();
    if !changed.is_empty() {
        managers
            .iter_mut()
            .for_each(|m| m.fields.retain(|p| !changed.contains(p)));
        let position = managers
            .iter()
            .position(|m| m.is(writer, false, subresource));
        let index = position.unwrap_or_else(|| {
            managers.push(manager(writer, false, subresource));
            managers.len() - 1
        });
        managers[index].fields.extend(changed);
        managers[index].time = now.to_string();
    }
    prune(managers, after);
}

fn manager(name: &str, apply: bool, subresource: &'static str) -> Manager {
    let (name, time, fields) = (name.to_string(), String::new(), BTreeSet::new());
    Manager {
        name,
        apply,
        subresource,
        time,
        fields,
    }
}

/// Server-side apply of `patch` onto `live` by `applier`: the new object and managers,
/// or, without `force`, the conflicts as messages.
pub(crate) fn apply(
    live: &Value,
    managers: &[Manager],
    patch: &Value,
    (applier, subresource): (&str, &'static str),
    force: bool,
    now: &str,
) -> Result<(Value, Vec<Manager>), Vec<String>> {
    // A null in an apply configuration claims nothing.
    let applied: BTreeMap<Path, &Value> = leaves(patch)
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .collect();
    let me = |m: &Manager| m.is(applier, true, subresource);
    // A differing value, or a leaf on one side where the other has content below it.
    let clash = |p: &Path, v: &Value, q: &Path| match () {
        _ if p == q => lookup(live, q) != Some(v),
        _ if p.starts_with(q) => !is_empty_map(lookup(live, q)),
        _ if q.starts_with(p) => !is_empty_map(Some(v)),
        _ => false,
    };
    let mut conflicts = Vec::new();
    for (i, m) in managers.iter().enumerate().filter(|(_, m)| !me(m)) {
        let clashing = m
            .fields
            .iter()
            .filter(|q| applied.iter().any(|(p, v)| clash(p, v, q)));
        conflicts.extend(clashing.map(|q| (i, q.clone())));
    }
    if !conflicts.is_empty() && !force {
        let describe = |(i, q): (usize, Path)| {
            let m: &Manager = &managers[i];
            let how = if m.apply { "" } else { " using Update" };
            let path: String = q.iter().map(|k| format!(".{k}")).collect();
            format!("conflict with {:?}{how}: {path}", m.name)
        };
        return Err(conflicts.into_iter().map(describe).collect());
    }
    let mut out = managers.to_vec();
    for (i, q) in &conflicts {
        out[*i].fields.remove(q);
    }
    let mut object = live.clone();
    for (p, v) in &applied {
        // An empty map claims the map, not what others put in it.
        if !(is_empty_map(Some(v)) && lookup(&object, p).is_some_and(Value::is_object)) {
            set_path(&mut object, p, (*v).clone());
        }
    }
    // What this manager applied before and no longer does goes, unless others own it.
    let previous = out
        .iter()
        .find(|m| me(m))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for p in &previous {
        let wanted = applied.keys().any(|a| a.starts_with(p) || p.starts_with(a));
        if !wanted && !out.iter().any(|m| !me(m) && m.fields.contains(p)) {
            remove_path(&mut object, p);
        }
    }
    let fields: BTreeSet<Path> = applied.into_keys().collect();
    if !out.iter().any(me) {
        out.push(manager(applier, true, subresource));
    }
    if let Some(m) = out.iter_mut().find(|m| me(m) && m.fields != fields) {
        m.fields = fields;
        m.time = now.to_string();
    }
    prune(&mut out, &object);
    Ok((object, out))
}

/// `metadata.managedFields` in the API's shape (FieldsV1 with `f:` keys).
pub(crate) fn render(managers: &[Manager], api_version: &str) -> Value {
    let entry = |m: &Manager| {
        let mut fields = json!({});
        for path in &m.fields {
            let keys: Vec<String> = path.iter().map(|k| format!("f:{k}")).collect();
            set_path(&mut fields, &keys, json!({}));
        }
        let mut entry = json!({
            "manager": m.name, "operation": if m.apply { "Apply" } else { "Update" },
            "apiVersion": api_version, "time": m.time, "fieldsType": "FieldsV1", "fieldsV1": fields,
        });
        if !m.subresource.is_empty() {
            entry["subresource"] = json!(m.subresource);
        }
        entry
    };
    managers.iter().map(entry).collect()
}
