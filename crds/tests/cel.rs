//! Every CEL validation rule in the committed CRDs, evaluated as the API server would
//! on a value it must accept and one it must refuse. A rule without cases
//! here fails the test, so a new rule comes with its cases.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use cel_interpreter::{Context, Program};
use serde_json::{Value, json};

/// (rule, a value it accepts, a value it refuses).
fn cases() -> Vec<(&'static str, Value, Value)> {
    let duration = "self.matches('^([0-9]{1,5}(h|m|s|ms)){1,4}$')";
    let collector = r"self.matches('^[A-Za-z0-9.-]+:[0-9]{1,5}$') || self.matches('^\\[[0-9A-Fa-f:.]+\\]:[0-9]{1,5}$')";
    vec![
        (
            "self.numerator <= self.denominator",
            json!({"numerator": 1, "denominator": 100}),
            json!({"numerator": 3, "denominator": 2}),
        ),
        (
            collector,
            json!("otel-collector.observability:4317"),
            json!("otel collector"),
        ),
        (
            collector,
            json!("[fd00::1]:4317"),
            json!("http://otel:4317"),
        ),
        (duration, json!("250ms"), json!("soon")),
        (duration, json!("1m30s"), json!("-1s")),
        (
            "self.group == '' && self.kind == 'Service'",
            json!({"group": "", "kind": "Service", "name": "api"}),
            json!({"group": "apps", "kind": "Deployment", "name": "api"}),
        ),
        (
            "has(self.http) != has(self.tcp)",
            json!({"http": {"path": "/healthz"}}),
            json!({"http": {"path": "/healthz"}, "tcp": {}}),
        ),
        (
            "has(self.http) != has(self.tcp)",
            json!({"tcp": {}}),
            json!({"interval": "1s"}),
        ),
        (
            "has(self.hash) == (self.type == 'RingHash' || self.type == 'Maglev')",
            json!({"type": "RingHash", "hash": {"header": "x-user"}}),
            json!({"type": "Random", "hash": {"header": "x-user"}}),
        ),
        (
            "has(self.hash) == (self.type == 'RingHash' || self.type == 'Maglev')",
            json!({"type": "LeastRequest"}),
            json!({"type": "Maglev"}),
        ),
        (
            "[has(self.header), has(self.cookie), has(self.sourceIP)].filter(x, x).size() == 1",
            json!({"cookie": "session"}),
            json!({"header": "x-user", "sourceIP": true}),
        ),
        (
            "self.spec.backends.all(b, b.service != self.spec.service)",
            json!({"spec": {"service": "web", "backends": [{"service": "web-v2", "weight": 1}]}}),
            json!({"spec": {"service": "web", "backends": [{"service": "web", "weight": 1}]}}),
        ),
        (
            "self.spec.destination.kind == 'ServiceAccount' && self.spec.sources.all(s, s.kind == 'ServiceAccount')",
            json!({"spec": {"destination": {"kind": "ServiceAccount", "name": "b"}, "sources": [{"kind": "ServiceAccount", "name": "a"}]}}),
            json!({"spec": {"destination": {"kind": "ServiceAccount", "name": "b"}, "sources": [{"kind": "Group", "name": "a"}]}}),
        ),
    ]
}

/// Every `x-kubernetes-validations` rule under `schema`, with its path.
fn rules(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "x-kubernetes-validations" {
                    for rule in value.as_array().into_iter().flatten() {
                        out.push((path.to_string(), rule["rule"].as_str().unwrap().to_string()));
                        assert!(
                            rule["message"].as_str().is_some_and(|m| !m.is_empty()),
                            "{path}: rule {rule} has no message"
                        );
                    }
                } else {
                    rules(value, &format!("{path}.{key}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                rules(item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn evaluate(rule: &str, value: &Value) -> bool {
    let program = Program::compile(rule).unwrap_or_else(|e| panic!("{rule}: {e:?}"));
    let mut context = Context::default();
    context.add_variable_from_value("self", cel_interpreter::to_value(value).unwrap());
    match program.execute(&context) {
        Ok(cel_interpreter::Value::Bool(b)) => b,
        other => panic!("{rule} on {value}: {other:?}"),
    }
}

#[test]
fn every_cel_rule_of_the_crds_accepts_and_refuses_its_cases() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/weft/crds");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        rules(&crd["spec"]["versions"], &name, &mut found);
    }
    // TrafficPolicy alone has 13.
    assert!(found.len() >= 20, "{found:?}");
    let cases = cases();
    for (at, rule) in &found {
        let mine: Vec<_> = cases.iter().filter(|(r, _, _)| r == rule).collect();
        assert!(!mine.is_empty(), "{at}: rule {rule:?} has no test case");
        for (_, good, bad) in mine {
            assert!(evaluate(rule, good), "{at}: {rule} refuses {good}");
            assert!(!evaluate(rule, bad), "{at}: {rule} accepts {bad}");
        }
    }
}
