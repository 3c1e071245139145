#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use super::*;

fn split(api_version: &str, backends: Value) -> Value {
    json!({
        "apiVersion": api_version, "kind": "TrafficSplit",
        "metadata": {"name": "rollout", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                     "labels": {"app": "web"}},
        "spec": {"service": "web", "backends": backends},
        "status": {"conditions": [{"type": "Accepted", "status": "True", "reason": "Valid", "message": ""}]},
    })
}

fn data(object: &Value) -> Option<Value> {
    let text = object["metadata"]["annotations"][ANNOTATION].as_str()?;
    Some(serde_json::from_str(text).unwrap())
}

fn round_trip(object: &Value, through: &str) -> Value {
    let from = object["apiVersion"].as_str().unwrap().to_string();
    let there = convert(object.clone(), through).unwrap();
    assert_eq!(there["apiVersion"], through);
    convert(there, &from).unwrap()
}

#[test]
fn argo_rollouts_v1alpha1_weights_become_milli_units_and_come_back_as_written() {
    // Argo Rollouts writes `resource.NewQuantity(w, DecimalExponent)`: "80", "20".
    let argo = split(
        "split.smi-spec.io/v1alpha1",
        json!([{"service": "web-canary", "weight": "20"}, {"service": "web-stable", "weight": "80"}]),
    );
    let stored = convert(argo.clone(), "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(
        stored["spec"]["backends"],
        json!([{"service": "web-canary", "weight": 20000}, {"service": "web-stable", "weight": 80000}])
    );
    assert_eq!(
        stored["metadata"], argo["metadata"],
        "canonical spellings need no annotation"
    );
    assert_eq!(stored["status"], argo["status"]);
    assert_eq!(convert(stored, "split.smi-spec.io/v1alpha1").unwrap(), argo);
}

#[test]
fn quantity_weights_keep_their_ratio_exactly() {
    let quarter = split(
        "split.smi-spec.io/v1alpha1",
        json!([{"service": "v1", "weight": "1500m"}, {"service": "v2", "weight": "500m"}]),
    );
    let stored = convert(quarter, "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(
        stored["spec"]["backends"],
        json!([{"service": "v1", "weight": 1500}, {"service": "v2", "weight": 500}])
    );
    // 3 and 1 as numbers: 3000 and 1000, the same 3:1.
    let numbers = split(
        "split.smi-spec.io/v1alpha1",
        json!([{"service": "v1", "weight": 3}, {"service": "v2", "weight": 1}]),
    );
    let stored = convert(numbers.clone(), "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(
        stored["spec"]["backends"],
        json!([{"service": "v1", "weight": 3000}, {"service": "v2", "weight": 1000}])
    );
    // The numbers' spelling (not the canonical "3") is kept for v1alpha1 readers.
    assert!(data(&stored).unwrap()["quantities"].is_array());
    assert_eq!(round_trip(&numbers, "split.smi-spec.io/v1alpha4"), numbers);
    assert_eq!(round_trip(&numbers, "split.smi-spec.io/v1alpha2"), numbers);
}

#[test]
fn stored_weights_read_as_v1alpha1_are_quantities_of_milli_units() {
    let stored = split(
        "split.smi-spec.io/v1alpha4",
        json!([{"service": "v1", "weight": 80}, {"service": "v2", "weight": 20}]),
    );
    let old = convert(stored.clone(), "split.smi-spec.io/v1alpha1").unwrap();
    assert_eq!(
        old["spec"]["backends"],
        json!([{"service": "v1", "weight": "80m"}, {"service": "v2", "weight": "20m"}])
    );
    assert_eq!(round_trip(&stored, "split.smi-spec.io/v1alpha1"), stored);
}

#[test]
fn a_spelling_is_forgotten_once_the_weight_changes() {
    let numbers = split(
        "split.smi-spec.io/v1alpha1",
        json!([{"service": "v1", "weight": 0.5}, {"service": "v2", "weight": "1"}]),
    );
    let mut stored = convert(numbers, "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(stored["spec"]["backends"][0]["weight"], 500);
    // A v1alpha4 writer moves all traffic to v2.
    stored["spec"]["backends"][0]["weight"] = json!(0);
    let old = convert(stored.clone(), "split.smi-spec.io/v1alpha1").unwrap();
    assert_eq!(
        old["spec"]["backends"],
        json!([{"service": "v1", "weight": "0"}, {"service": "v2", "weight": "1"}])
    );
    assert!(old["metadata"].get("annotations").is_none(), "{old}");
    // Through v1alpha2 the stale spelling is dropped as well.
    let v2 = convert(stored, "split.smi-spec.io/v1alpha2").unwrap();
    assert!(v2["metadata"].get("annotations").is_none(), "{v2}");
}

#[test]
fn matches_survive_versions_without_them() {
    let mut stored = split(
        "split.smi-spec.io/v1alpha4",
        json!([{"service": "v1", "weight": 0}, {"service": "v2", "weight": 100}]),
    );
    stored["spec"]["matches"] = json!([{"kind": "HTTPRouteGroup", "name": "firefox"}]);
    stored["metadata"]["annotations"] = json!({"team": "web"});
    for old in ["split.smi-spec.io/v1alpha2", "split.smi-spec.io/v1alpha1"] {
        let converted = convert(stored.clone(), old).unwrap();
        assert!(converted["spec"].get("matches").is_none(), "{converted}");
        assert_eq!(converted["metadata"]["annotations"]["team"], "web");
        assert_eq!(
            data(&converted).unwrap()["matches"],
            stored["spec"]["matches"]
        );
        assert_eq!(round_trip(&stored, old), stored);
    }
    let v3 = convert(stored.clone(), "split.smi-spec.io/v1alpha3").unwrap();
    let mut expected = stored.clone();
    expected["apiVersion"] = json!("split.smi-spec.io/v1alpha3");
    assert_eq!(v3, expected, "v1alpha3 is v1alpha4's schema");
}

#[test]
fn a_v1alpha2_writer_keeps_the_matches_it_cannot_see() {
    let mut stored = split(
        "split.smi-spec.io/v1alpha4",
        json!([{"service": "v1", "weight": 100}, {"service": "v2", "weight": 0}]),
    );
    stored["spec"]["matches"] = json!([{"kind": "HTTPRouteGroup", "name": "beta"}]);
    let mut v2 = convert(stored, "split.smi-spec.io/v1alpha2").unwrap();
    v2["spec"]["backends"][1]["weight"] = json!(50);
    let back = convert(v2, "split.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(
        back["spec"]["matches"],
        json!([{"kind": "HTTPRouteGroup", "name": "beta"}])
    );
    assert_eq!(back["spec"]["backends"][1]["weight"], 50);
    assert!(back["metadata"].get("annotations").is_none(), "{back}");
}

#[test]
fn weights_weft_cannot_store_exactly_are_refused_with_the_field() {
    for (weight, why) in [
        (json!("1u"), "finer than a milli-unit"),
        (json!("-1"), "negative"),
        (json!(-2), "negative"),
        (json!("lots"), "not a quantity"),
        (json!(null), "not a quantity"),
        (json!("100E"), "too large"),
    ] {
        let old = split(
            "split.smi-spec.io/v1alpha1",
            json!([{"service": "v1", "weight": "1"}, {"service": "v2", "weight": weight}]),
        );
        let err = convert(old, "split.smi-spec.io/v1alpha4").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("spec.backends[1].weight") && text.contains(why),
            "{weight}: {text}"
        );
    }
    let mut stored = split(
        "split.smi-spec.io/v1alpha4",
        json!([{"service": "v1", "weight": 1.5}]),
    );
    let err = convert(stored.clone(), "split.smi-spec.io/v1alpha1").unwrap_err();
    assert!(err.to_string().contains("not a whole number"), "{err}");
    stored["spec"]["backends"] = json!("v1");
    let err = convert(stored, "split.smi-spec.io/v1alpha1").unwrap_err();
    assert!(
        err.to_string().contains("spec.backends: not a list"),
        "{err}"
    );
}

#[test]
fn fields_an_older_version_lacks_are_refused_not_dropped() {
    let mut v2 = split(
        "split.smi-spec.io/v1alpha2",
        json!([{"service": "v1", "weight": 1}]),
    );
    v2["spec"]["matches"] = json!([{"kind": "HTTPRouteGroup", "name": "x"}]);
    let err = convert(v2, "split.smi-spec.io/v1alpha4").unwrap_err();
    assert!(err.to_string().contains("from v1alpha3 on"), "{err}");

    let group = json!({"apiVersion": "specs.smi-spec.io/v1alpha1", "kind": "HTTPRouteGroup",
        "metadata": {"name": "r"}, "matches": [{"name": "m", "headers": {"x": "y"}}]});
    let err = convert(group, "specs.smi-spec.io/v1alpha4").unwrap_err();
    assert!(err.to_string().contains("matches[0].headers"), "{err}");

    let group = json!({"apiVersion": "specs.smi-spec.io/v1alpha2", "kind": "HTTPRouteGroup",
        "metadata": {"name": "r"}, "spec": {"matches": []}});
    let err = convert(group, "specs.smi-spec.io/v1alpha4").unwrap_err();
    assert!(err.to_string().contains("top level"), "{err}");

    let tcp = json!({"apiVersion": "specs.smi-spec.io/v1alpha3", "kind": "TCPRoute",
        "metadata": {"name": "r"}, "spec": {"matches": {"ports": [3306]}}});
    let err = convert(tcp, "specs.smi-spec.io/v1alpha4").unwrap_err();
    assert!(err.to_string().contains("spec.matches"), "{err}");
}

#[test]
fn http_route_groups_move_between_the_top_level_and_spec_and_keep_headers() {
    // The SMI v1alpha2 example: matches at the top level, headers as a map.
    let v2 = json!({
        "apiVersion": "specs.smi-spec.io/v1alpha2", "kind": "HTTPRouteGroup",
        "metadata": {"name": "the-routes", "namespace": "default"},
        "matches": [{"name": "android-insiders",
                     "headers": {"user-agent": ".*Android.*", "cookie": "^(.*?;)?(type=insider)(;.*)?$"}},
                    {"name": "metrics", "pathRegex": "/metrics", "methods": ["GET"]}],
    });
    let stored = convert(v2.clone(), "specs.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(stored["spec"]["matches"], v2["matches"]);
    assert!(stored.get("matches").is_none());
    assert_eq!(round_trip(&v2, "specs.smi-spec.io/v1alpha4"), v2);

    let v1 = convert(stored.clone(), "specs.smi-spec.io/v1alpha1").unwrap();
    assert!(v1.get("spec").is_none());
    assert!(v1["matches"][0].get("headers").is_none(), "{v1}");
    assert_eq!(v1["matches"][1], v2["matches"][1]);
    assert_eq!(
        data(&v1).unwrap()["headers"][0]["headers"]["user-agent"],
        ".*Android.*"
    );
    assert_eq!(round_trip(&stored, "specs.smi-spec.io/v1alpha1"), stored);

    // Without matches: an empty spec in the stored version, nothing in the old.
    let empty = json!({"apiVersion": "specs.smi-spec.io/v1alpha1", "kind": "HTTPRouteGroup",
        "metadata": {"name": "none"}});
    let stored = convert(empty.clone(), "specs.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(stored["spec"], json!({}));
    assert_eq!(round_trip(&empty, "specs.smi-spec.io/v1alpha4"), empty);
}

#[test]
fn tcp_route_ports_are_kept_by_versions_without_them() {
    let stored = json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "TCPRoute",
        "metadata": {"name": "db"}, "spec": {"matches": {"ports": [3306, 6446]}}});
    let v3 = convert(stored.clone(), "specs.smi-spec.io/v1alpha3").unwrap();
    assert_eq!(v3["spec"], json!({}));
    assert_eq!(data(&v3).unwrap()["spec"], stored["spec"]);
    let v1 = convert(stored.clone(), "specs.smi-spec.io/v1alpha1").unwrap();
    assert!(v1.get("spec").is_none());
    for old in [
        "specs.smi-spec.io/v1alpha1",
        "specs.smi-spec.io/v1alpha2",
        "specs.smi-spec.io/v1alpha3",
    ] {
        assert_eq!(round_trip(&stored, old), stored, "{old}");
    }
    // An old route (every port) is stored with an empty spec.
    let old = json!({"apiVersion": "specs.smi-spec.io/v1alpha2", "kind": "TCPRoute",
        "metadata": {"name": "any"}});
    let stored = convert(old.clone(), "specs.smi-spec.io/v1alpha4").unwrap();
    assert_eq!(stored["spec"], json!({}));
    assert_eq!(round_trip(&old, "specs.smi-spec.io/v1alpha4"), old);
}

#[test]
fn traffic_targets_only_change_api_version() {
    let v2 = json!({"apiVersion": "access.smi-spec.io/v1alpha2", "kind": "TrafficTarget",
        "metadata": {"name": "t"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": "api", "port": 8080},
                 "rules": [{"kind": "HTTPRouteGroup", "name": "r", "matches": ["m"]}],
                 "sources": [{"kind": "ServiceAccount", "name": "web"}]}});
    let v3 = convert(v2.clone(), "access.smi-spec.io/v1alpha3").unwrap();
    let mut expected = v2.clone();
    expected["apiVersion"] = json!("access.smi-spec.io/v1alpha3");
    assert_eq!(v3, expected);
}

#[test]
fn what_is_not_a_served_version_or_object_is_an_error() {
    let stored = split("split.smi-spec.io/v1alpha4", json!([]));
    for desired in [
        "split.smi-spec.io/v1alpha5",
        "split.smi-spec.io/v1",
        "specs.smi-spec.io/v1alpha4",
        "v1",
        "",
    ] {
        assert!(
            matches!(
                convert(stored.clone(), desired),
                Err(ConversionError::NotServed { .. })
            ),
            "{desired}"
        );
    }
    let mut other = stored.clone();
    other["kind"] = json!("Deployment");
    assert!(matches!(
        convert(other, "split.smi-spec.io/v1alpha1"),
        Err(ConversionError::NotServed { .. })
    ));
    assert_eq!(
        convert(json!([1]), "split.smi-spec.io/v1alpha1"),
        Err(ConversionError::NotAnObject)
    );
    assert_eq!(
        convert(
            json!({"kind": "TrafficSplit"}),
            "split.smi-spec.io/v1alpha1"
        ),
        Err(ConversionError::Missing("apiVersion"))
    );
    // The desired version already: unchanged, whatever it holds.
    let odd =
        json!({"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit", "spec": 3});
    assert_eq!(
        convert(odd.clone(), "split.smi-spec.io/v1alpha1").unwrap(),
        odd
    );
}

#[test]
fn an_annotation_weft_did_not_write_is_dropped_and_others_stay() {
    let mut stored = split(
        "split.smi-spec.io/v1alpha4",
        json!([{"service": "v1", "weight": 1000}]),
    );
    stored["metadata"]["annotations"] = json!({ANNOTATION: "not json", "keep": "me"});
    let old = convert(stored, "split.smi-spec.io/v1alpha1").unwrap();
    assert_eq!(old["metadata"]["annotations"], json!({"keep": "me"}));
    assert_eq!(old["spec"]["backends"][0]["weight"], "1");
}

#[test]
fn served_kinds_name_their_storage_version_first() {
    let split = served_kind("split.smi-spec.io/v1alpha1", "TrafficSplit").unwrap();
    assert_eq!(split.storage_api_version(), "split.smi-spec.io/v1alpha4");
    assert!(served_kind("split.smi-spec.io/v1alpha1", "TrafficTarget").is_none());
    assert!(served_kind("access.smi-spec.io/v1alpha1", "TrafficTarget").is_none());
    assert_eq!(
        served_kind("access.smi-spec.io/v1alpha2", "TrafficTarget")
            .unwrap()
            .storage_version(),
        "v1alpha3"
    );
}
