//! Kubernetes mode end to end: `weft controller` against the API-server double (real
//! HTTP, the real kube client), real Envoy sidecars in network namespaces, real traffic.
//! Needs root; fails (never skips) without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_e2e::apiserver::ApiServerDouble;
use weft_e2e::{CONTROLLER_NAMESPACE, EndpointState, Harness, now_ms, wait_until};

const BACKEND_URL: &str = "http://backend:8080/";

fn split(v1: u32, v2: u32) -> Value {
    json!({
        "apiVersion": "split.smi-spec.io/v1alpha4", "kind": "TrafficSplit",
        "metadata": {"name": "backend-rollout", "namespace": "default"},
        "spec": {"service": "backend", "backends": [
            {"service": "backend-v1", "weight": v1}, {"service": "backend-v2", "weight": v2}]},
    })
}

fn allow(destination: &str, sources: &[&str]) -> Value {
    let sources: Vec<Value> = sources
        .iter()
        .map(|s| json!({"kind": "ServiceAccount", "name": s, "namespace": "default"}))
        .collect();
    json!({
        "apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"name": format!("to-{destination}"), "namespace": "default"},
        "spec": {"destination": {"kind": "ServiceAccount", "name": destination, "namespace": "default"},
                 "sources": sources},
    })
}

/// The `type` condition of an object in the double, if written.
fn condition(
    api: &ApiServerDouble,
    api_version: &str,
    kind: &str,
    name: &str,
    type_: &str,
) -> Option<Value> {
    let object = api.get(api_version, kind, Some("default"), name)?;
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// client → backend split over backend-v1 and backend-v2, one pod each, all meshed.
fn split_mesh(id: u8, name: &str) -> Harness {
    let mut h = Harness::new(id, name).expect("harness");
    h.add_split_topology().unwrap();
    h
}

#[test]
fn the_controller_serves_a_split_from_the_api_server_and_shifts_it_under_load() {
    let mut h = split_mesh(60, "ctl-split");
    let c = h.start_cluster().unwrap();
    c.api.apply_object(split(80, 20)).unwrap();
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    let report = h.load("client", BACKEND_URL, 1000, 8).unwrap();
    assert!(report.failures().is_empty(), "{:?}", report.failures());
    let v1 = report.answered_by("backend-v1") as f64 / 10.0;
    eprintln!(
        "80/20 from the API server: v1 {v1:.1}% ({:?})",
        report.by_pod()
    );
    assert!((75.0..=85.0).contains(&v1), "v1 got {v1}%, expected 80 ± 5");

    // The split and the target are reported accepted, by server-side apply.
    let accepted = condition(
        &c.api,
        "split.smi-spec.io/v1alpha4",
        "TrafficSplit",
        "backend-rollout",
        "Accepted",
    );
    wait_until(
        Duration::from_secs(5),
        "the split's Accepted condition",
        || {
            condition(
                &c.api,
                "split.smi-spec.io/v1alpha4",
                "TrafficSplit",
                "backend-rollout",
                "Accepted",
            )
            .is_some()
        },
    )
    .unwrap();
    let accepted = accepted
        .or_else(|| {
            condition(
                &c.api,
                "split.smi-spec.io/v1alpha4",
                "TrafficSplit",
                "backend-rollout",
                "Accepted",
            )
        })
        .unwrap();
    assert_eq!(accepted["status"], "True", "{accepted}");
    let stored = c
        .api
        .get(
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            Some("default"),
            "backend-rollout",
        )
        .unwrap();
    let managers: Vec<&str> = stored["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["subresource"] == "status")
        .filter_map(|m| m["manager"].as_str())
        .collect();
    assert_eq!(managers, vec!["weft"], "{stored}");

    // Shift everything to v2 under load: no request fails, later ones all reach v2.
    let before = h.acked_version("client", "RDS").unwrap();
    let load = h
        .start_load("client", BACKEND_URL, Duration::from_secs(8), 4)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let changed_at = Instant::now();
    c.api.apply_object(split(0, 100)).unwrap();
    h.wait_for_new_ack("client", "RDS", before.as_deref())
        .unwrap();
    eprintln!(
        "split change to the client's ACK: {:?}",
        changed_at.elapsed()
    );
    let applied_ms = now_ms();
    let report = load.finish().unwrap();
    assert!(
        report.failures().is_empty(),
        "failed during the shift: {:?}",
        report.failures()
    );
    let later = report.started_after(applied_ms);
    assert!(
        later.results.len() >= 100,
        "enough requests after the change"
    );
    assert_eq!(later.answered_by("backend-v2"), later.results.len());
}

#[test]
fn a_traffic_target_from_the_api_server_grants_and_revokes_access() {
    let mut h = Harness::new(61, "ctl-access").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("backend-0", &[("app", "backend")], "backend")
        .unwrap();
    h.add_service("backend", &[("app", "backend")]).unwrap();
    let c = h.start_cluster().unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    for pod in ["client", "backend-0"] {
        h.start_sidecar(pod).unwrap();
    }
    // 200 when the backend answered, 403 when the sidecar denied, 0 otherwise.
    let status = |h: &Harness| match h.get("client", BACKEND_URL).unwrap() {
        Ok(_) => 200,
        Err(e) if e.contains("403") => 403,
        Err(_) => 0,
    };
    assert_eq!(status(&h), 403, "deny by default");
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    let granted = wait_until(Duration::from_secs(5), "access granted", || {
        status(&h) == 200
    })
    .unwrap();
    c.api
        .delete_object(
            "access.smi-spec.io/v1alpha3",
            "TrafficTarget",
            Some("default"),
            "to-backend",
        )
        .unwrap();
    let revoked = wait_until(Duration::from_secs(5), "access revoked", || {
        status(&h) == 403
    })
    .unwrap();
    eprintln!("granted after {granted:?}, revoked after {revoked:?}");
    assert!(granted < Duration::from_secs(2) && revoked < Duration::from_secs(2));
}

#[test]
fn a_rolling_update_through_endpoint_slices_loses_no_request() {
    let mut h = Harness::new(62, "ctl-rolling").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("backend-old", &[("app", "backend")], "backend")
        .unwrap();
    h.add_pod("backend-new", &[("app", "backend")], "backend")
        .unwrap();
    h.add_service("backend", &[("app", "backend")]).unwrap();
    let c = h.start_cluster().unwrap();
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    // Before the update only the old pod is an endpoint; the new one is starting.
    c.api
        .apply_object(h.endpoint_slice(
            "backend",
            &[
                ("backend-old", EndpointState::Ready),
                ("backend-new", EndpointState::NotReady),
            ],
        ))
        .unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    for pod in ["client", "backend-old", "backend-new"] {
        h.start_sidecar(pod).unwrap();
    }
    let load = h
        .start_load("client", BACKEND_URL, Duration::from_secs(10), 4)
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let eds = h.acked_version("client", "EDS").unwrap();
    c.api
        .apply_object(h.endpoint_slice(
            "backend",
            &[
                ("backend-old", EndpointState::Ready),
                ("backend-new", EndpointState::Ready),
            ],
        ))
        .unwrap();
    let eds = h.wait_for_new_ack("client", "EDS", eds.as_deref()).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // The old pod is terminating: still serving, no new requests.
    let mut old = c
        .api
        .get("v1", "Pod", Some("default"), "backend-old")
        .unwrap();
    old["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    c.api.apply_object(old).unwrap();
    c.api
        .apply_object(h.endpoint_slice(
            "backend",
            &[
                ("backend-old", EndpointState::Terminating),
                ("backend-new", EndpointState::Ready),
            ],
        ))
        .unwrap();
    h.wait_for_new_ack("client", "EDS", Some(&eds)).unwrap();
    let drained_ms = now_ms();
    std::thread::sleep(Duration::from_secs(2));
    // Then it is gone.
    c.api
        .apply_object(h.endpoint_slice("backend", &[("backend-new", EndpointState::Ready)]))
        .unwrap();
    c.api
        .delete_object("v1", "Pod", Some("default"), "backend-old")
        .unwrap();
    let report = load.finish().unwrap();
    assert!(
        report.failures().is_empty(),
        "failed during the rolling update: {:?}",
        report.failures()
    );
    assert!(
        report.answered_by("backend-old") > 0,
        "the old pod served first"
    );
    let later = report.started_after(drained_ms + 200);
    assert!(
        later.results.len() >= 50,
        "enough requests after the old pod began terminating"
    );
    assert_eq!(
        later.answered_by("backend-new"),
        later.results.len(),
        "a terminating pod takes no new requests: {:?}",
        later.by_pod()
    );
}

#[test]
fn a_cut_watch_resumes_without_losing_an_update_and_a_relist_pushes_nothing() {
    let mut h = split_mesh(63, "ctl-watch");
    let c = h.start_cluster().unwrap();
    c.api.apply_object(split(100, 0)).unwrap();
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    h.start_sidecar("client").unwrap();
    let watches = c.api.watch_count();
    assert!(watches >= 10, "one watch per kind at least, got {watches}");

    // A change made while the watches are cut arrives once they resume.
    let before = h.acked_version("client", "RDS").unwrap();
    c.api.cut_watches();
    c.api.apply_object(split(0, 100)).unwrap();
    h.wait_for_new_ack("client", "RDS", before.as_deref())
        .unwrap();

    // A compacted history makes every watch list again; nothing changed, so no push.
    std::thread::sleep(Duration::from_secs(1));
    let pushes = h.controller_metric(1, "weft_pushes_total").unwrap_or(0.0);
    let rds = h.acked_version("client", "RDS").unwrap();
    // A change the model does not read (a namespace label), then a compaction past
    // it: watches that resume from before it get 410 Gone and list again.
    let lists = c.api.requests("list", "pods", "");
    for attempt in 0..3 {
        c.api
            .apply_object(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "default", "labels": {"touch": attempt.to_string()}}}))
            .unwrap();
        c.api.compact();
        c.api.cut_watches();
        let start = Instant::now();
        while c.api.requests("list", "pods", "") == lists
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if c.api.requests("list", "pods", "") > lists {
            break;
        }
    }
    assert!(
        c.api.requests("list", "pods", "") > lists,
        "the pod watch listed again after 410 Gone"
    );
    std::thread::sleep(Duration::from_secs(2));
    let restarts = h.controller_metric(1, "weft_watch_restarts_total");
    eprintln!(
        "after the relist: pushes {pushes} → {:?}, watch restarts {restarts:?}",
        h.controller_metric(1, "weft_pushes_total")
    );
    assert_eq!(
        h.controller_metric(1, "weft_pushes_total").unwrap_or(0.0),
        pushes,
        "a relist of unchanged objects pushes nothing"
    );
    assert_eq!(h.acked_version("client", "RDS").unwrap(), rds);
    assert!(restarts.unwrap_or(0.0) > 0.0, "the relists are counted");
    assert!(h.controller_ready(1), "still ready");
}

#[test]
fn status_reports_an_invalid_split_with_one_event_and_no_op_reconciles_write_nothing() {
    let mut h = split_mesh(64, "ctl-status");
    let c = h.start_cluster().unwrap();
    // A split of the root service itself is invalid.
    let mut bad = split(50, 50);
    bad["spec"]["backends"][1]["service"] = json!("backend");
    c.api.apply_object(bad).unwrap();
    h.start_controller(1, &c.kubeconfig, &["--proxy-identity", "address"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    let accepted = || {
        condition(
            &c.api,
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            "backend-rollout",
            "Accepted",
        )
    };
    wait_until(Duration::from_secs(10), "Accepted=False", || {
        accepted().is_some_and(|c| c["status"] == "False")
    })
    .unwrap();
    let rejected = accepted().unwrap();
    assert_eq!(rejected["reason"], "Invalid", "{rejected}");
    assert!(
        rejected["message"].as_str().unwrap().contains("root"),
        "{rejected}"
    );
    assert!(
        rejected["lastTransitionTime"].is_string() && rejected["observedGeneration"].is_number()
    );
    wait_until(Duration::from_secs(5), "one Event", || {
        c.api.requests("create", "events", "") >= 1
    })
    .unwrap();

    // Fixing it flips it to True, with one more Event for the transition.
    c.api.apply_object(split(50, 50)).unwrap();
    wait_until(Duration::from_secs(10), "Accepted=True", || {
        accepted().is_some_and(|c| c["status"] == "True")
    })
    .unwrap();
    wait_until(Duration::from_secs(5), "the second Event", || {
        c.api.requests("create", "events", "") >= 2
    })
    .unwrap();
    let fixed = accepted().unwrap();
    assert_ne!(fixed["lastTransitionTime"], json!(null));

    // A thousand changes that change no status write nothing.
    std::thread::sleep(Duration::from_secs(1));
    let patches = c.api.requests("patch", "trafficsplits", "status");
    let events = c.api.requests("create", "events", "") + c.api.requests("patch", "events", "");
    for i in 0..1000 {
        // Through the main resource, as `kubectl label` would: the status stays.
        let mut same = c
            .api
            .get(
                "split.smi-spec.io/v1alpha4",
                "TrafficSplit",
                Some("default"),
                "backend-rollout",
            )
            .unwrap();
        same["metadata"]["labels"] = json!({"touch": i.to_string()});
        c.api.apply_object(same).unwrap();
    }
    h.wait_controller_settled(1);
    assert_eq!(
        c.api.requests("patch", "trafficsplits", "status"),
        patches,
        "no-op reconciles wrote a status"
    );
    assert_eq!(
        c.api.requests("create", "events", "") + c.api.requests("patch", "events", ""),
        events,
        "no-op reconciles wrote Events"
    );
    assert_eq!(
        accepted().unwrap()["lastTransitionTime"],
        fixed["lastTransitionTime"]
    );
}

#[test]
fn the_ca_secret_and_trust_bundle_configmaps_are_written_once() {
    let mut h = split_mesh(65, "ctl-ca");
    let c = h.start_cluster().unwrap();
    // Two replicas start together: one root.
    h.start_controller(1, &c.kubeconfig, &["--lease-duration", "4s"])
        .unwrap();
    h.start_controller(2, &c.kubeconfig, &["--lease-duration", "4s"])
        .unwrap();
    h.wait_controller_ready(1).unwrap();
    h.wait_controller_ready(2).unwrap();
    let created: Vec<bool> = [1, 2]
        .iter()
        .map(|r| {
            std::fs::read_to_string(h.work_dir().join(format!("controller-{r}.log")))
                .unwrap()
                .contains("created a new root CA")
        })
        .collect();
    assert_eq!(
        created.iter().filter(|c| **c).count(),
        1,
        "exactly one replica created the root: {created:?}"
    );
    let secret = c
        .api
        .get("v1", "Secret", Some(CONTROLLER_NAMESPACE), "weft-ca")
        .unwrap();
    // The two ConfigMaps are written one after the other.
    wait_until(
        Duration::from_secs(10),
        "the trust bundle and bootstrap ConfigMaps",
        || {
            ["weft-root-ca", "weft-bootstrap"].iter().all(|name| {
                c.api
                    .get("v1", "ConfigMap", Some("default"), name)
                    .is_some()
            })
        },
    )
    .unwrap();
    let bundle = c
        .api
        .get("v1", "ConfigMap", Some("default"), "weft-root-ca")
        .unwrap();
    use base64::Engine as _;
    let root = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    let root = String::from_utf8(root).unwrap();
    assert_eq!(
        bundle["data"]["ca.crt"].as_str().unwrap().trim(),
        root.trim(),
        "the bundle is the Secret's root"
    );
    assert!(
        c.api
            .get(
                "v1",
                "ConfigMap",
                Some(CONTROLLER_NAMESPACE),
                "weft-root-ca"
            )
            .is_none(),
        "no meshed pods there"
    );
    // With it, the bootstrap the injected proxies mount: TLS to the xDS Service, the
    // pod's token, the health port.
    let boot = c
        .api
        .get("v1", "ConfigMap", Some("default"), "weft-bootstrap")
        .unwrap();
    let yaml = boot["data"]["envoy.yaml"].as_str().unwrap();
    for needle in [
        "weft-xds.weft-system.svc",
        "/etc/weft/ca/ca.crt",
        "/var/run/secrets/weft/token",
        "15021",
    ] {
        assert!(
            yaml.contains(needle),
            "the bootstrap lacks {needle}: {yaml}"
        );
    }
    // Deleted by someone: written again.
    c.api
        .delete_object("v1", "ConfigMap", Some("default"), "weft-root-ca")
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the ConfigMap written again",
        || {
            c.api
                .get("v1", "ConfigMap", Some("default"), "weft-root-ca")
                .is_some()
        },
    )
    .unwrap();
}

/// Status writes controller `replica` made.
fn writes(h: &Harness, replica: u16) -> f64 {
    h.controller_metric(replica, "weft_status_writes_total")
        .unwrap_or(0.0)
}

/// Which replica holds the Lease, by its metric; `None` when none or both claim it.
fn leader(h: &Harness, replicas: &[u16]) -> Option<u16> {
    let leaders: Vec<u16> = replicas
        .iter()
        .copied()
        .filter(|r| h.controller_metric(*r, "weft_leader") == Some(1.0))
        .collect();
    (leaders.len() == 1).then(|| leaders[0])
}

#[test]
fn two_replicas_serve_one_writes_and_the_other_takes_over_when_it_dies() {
    let mut h = split_mesh(66, "ctl-failover");
    let c = h.start_cluster().unwrap();
    c.api.apply_object(split(100, 0)).unwrap();
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    let flags = ["--proxy-identity", "address", "--lease-duration", "3s"];
    h.start_controller(1, &c.kubeconfig, &flags).unwrap();
    h.start_controller(2, &c.kubeconfig, &flags).unwrap();
    h.wait_controller_ready(1).unwrap();
    h.wait_controller_ready(2).unwrap();
    // Sidecars know both replicas, as they would know the xDS Service.
    h.use_extra_xds(vec![h.controller_xds_addr(2)]);
    for pod in ["client", "backend-v1-0", "backend-v2-0"] {
        h.start_sidecar(pod).unwrap();
    }
    wait_until(Duration::from_secs(10), "one leader", || {
        leader(&h, &[1, 2]).is_some()
    })
    .unwrap();
    let first = leader(&h, &[1, 2]).unwrap();
    let other = 3 - first;
    wait_until(Duration::from_secs(10), "the split's status", || {
        condition(
            &c.api,
            "split.smi-spec.io/v1alpha4",
            "TrafficSplit",
            "backend-rollout",
            "Accepted",
        )
        .is_some()
    })
    .unwrap();
    assert!(writes(&h, first) > 0.0, "the leader wrote the statuses");
    assert_eq!(writes(&h, other), 0.0, "the other replica writes nothing");

    // The leader dies (no goodbye): traffic keeps flowing, the other replica takes over
    // writing within the lease duration, and proxies that were on the dead one get the
    // next change from the survivor.
    let load = h
        .start_load("client", BACKEND_URL, Duration::from_secs(12), 4)
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // Proxy status comes from the survivor: it knows every proxy that reconnects to it.
    h.use_controller_admin(other);
    let before = h.acked_version("client", "RDS").unwrap();
    let killed = Instant::now();
    h.signal_controller(first, "KILL").unwrap();
    let mut invalid = split(50, 50);
    invalid["metadata"]["name"] = json!("self-split");
    invalid["spec"]["backends"][1]["service"] = json!("backend");
    c.api.apply_object(invalid).unwrap();
    c.api.apply_object(split(0, 100)).unwrap();
    // Leadership first, so a slow proxy reconnect does not count as takeover time.
    wait_until(Duration::from_secs(10), "the survivor to lead", || {
        leader(&h, &[other]).is_some()
    })
    .unwrap();
    let takeover = killed.elapsed();
    h.wait_for_new_ack("client", "RDS", before.as_deref())
        .unwrap();
    let reconfigured = killed.elapsed();
    wait_until(
        Duration::from_secs(10),
        "the survivor to write a status",
        || {
            condition(
                &c.api,
                "split.smi-spec.io/v1alpha4",
                "TrafficSplit",
                "self-split",
                "Accepted",
            )
            .is_some_and(|c| c["status"] == "False")
        },
    )
    .unwrap();
    let written = killed.elapsed();
    let report = load.finish().unwrap();
    eprintln!(
        "leader {first} killed: {other} leads after {takeover:?}, status written after {written:?}, \
         the client has the new split after {reconfigured:?}"
    );
    assert!(
        report.failures().is_empty(),
        "failed while the leader died: {:?}",
        report.failures()
    );
    assert!(
        takeover < Duration::from_secs(5),
        "takeover within the lease duration (3 s) plus a renew period"
    );
    assert!(writes(&h, other) > 0.0);
    let after = h
        .get("client", BACKEND_URL)
        .unwrap()
        .expect("the mesh serves");
    assert!(after.0.starts_with("backend-v2"), "{after:?}");
}

/// Writes a token for `pod` into the harness's token directory (readable by the proxy).
fn write_token(dir: &std::path::Path, pod: &str, token: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("{pod}.token"));
    std::fs::write(&path, token).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

#[test]
fn sidecars_prove_their_pod_with_a_service_account_token() {
    use base64::Engine as _;
    let mut h = Harness::new(67, "ctl-identity").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("backend-0", &[("app", "backend")], "backend")
        .unwrap();
    for pod in ["no-token", "expired", "thief"] {
        h.add_pod(pod, &[("app", pod)], "backend").unwrap();
    }
    h.add_service("backend", &[("app", "backend")]).unwrap();
    let c = h.start_cluster().unwrap();
    c.api.apply_object(allow("backend", &["client"])).unwrap();
    // The default: streams prove their pod with a token.
    h.start_controller(1, &c.kubeconfig, &[]).unwrap();
    h.wait_controller_ready(1).unwrap();
    // Sidecars verify the control plane against the root in the CA Secret, and send
    // their token only over that TLS.
    let secret = c
        .api
        .get("v1", "Secret", Some(CONTROLLER_NAMESPACE), "weft-ca")
        .unwrap();
    let root = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    std::fs::create_dir_all(h.state_dir()).unwrap();
    std::fs::write(h.state_dir().join("ca-cert.pem"), root).unwrap();
    h.use_xds_tls(true);
    let tokens = h.work_dir().join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    h.use_token_dir(Some(tokens.clone()));
    let hour = Duration::from_secs(3600);
    let token = |pod: &str, sa: &str, ttl: Duration| {
        c.api
            .issue_token("default", sa, pod, &format!("uid-{pod}"), "weft", ttl)
    };
    write_token(&tokens, "client", &token("client", "client", hour));
    write_token(&tokens, "backend-0", &token("backend-0", "backend", hour));
    write_token(
        &tokens,
        "expired",
        &token("expired", "backend", Duration::from_secs(1)),
    );
    // The thief runs as the same ServiceAccount as backend-0 and presents its token.
    write_token(&tokens, "thief", &token("backend-0", "backend", hour));
    // "no-token" has no file at all.
    std::thread::sleep(Duration::from_secs(2));

    for pod in ["client", "backend-0"] {
        h.start_sidecar(pod).unwrap();
    }
    // Their identities work: mTLS between them, the TrafficTarget applies.
    let answer = h
        .get("client", BACKEND_URL)
        .unwrap()
        .expect("client → backend over mTLS");
    assert!(answer.0.starts_with("backend-0"), "{answer:?}");
    assert!(
        answer
            .1
            .as_deref()
            .is_some_and(|xfcc| xfcc.contains("URI=spiffe://cluster.local/ns/default/sa/client")),
        "the backend saw the client's identity: {answer:?}"
    );

    for pod in ["no-token", "expired", "thief"] {
        h.spawn_sidecar(pod, pod, true).unwrap();
    }
    let reviews_before = c.api.requests("create", "tokenreviews", "");
    let denied = |pod: &str| -> Option<String> {
        let status = h.proxy_status().ok()?;
        status
            .as_array()?
            .iter()
            .find(|p| p["node"] == format!("default/{pod}"))?["denied"]
            .as_str()
            .map(str::to_string)
    };
    for (pod, why) in [
        ("no-token", "token"),
        ("expired", "expired"),
        ("thief", "backend-0"),
    ] {
        wait_until(
            Duration::from_secs(20),
            &format!("{pod}'s stream to be denied"),
            || denied(pod).is_some(),
        )
        .unwrap();
        let reason = denied(pod).unwrap();
        eprintln!("{pod}: {reason}");
        assert!(reason.contains(why), "{pod}: {reason}");
        // No workload certificate reached that proxy.
        let certs = h.envoy_admin(pod, "/certs").unwrap();
        assert!(
            !certs.contains("spiffe://cluster.local/ns/default/sa/"),
            "{pod} got a certificate: {certs}"
        );
    }
    // The client and backend keep theirs; the tokens were reviewed, and cached.
    assert!(
        h.envoy_admin("client", "/certs")
            .unwrap()
            .contains("spiffe://cluster.local/ns/default/sa/client")
    );
    assert!(c.api.requests("create", "tokenreviews", "") >= reviews_before);
}
