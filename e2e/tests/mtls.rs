//! Workload identity end to end: real TLS between real Envoy sidecars in network
//! namespaces, certificates from `weft up`'s CA over SDS.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weft_e2e::Harness;

const SERVER_URL: &str = "http://server:8080/";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";

/// client (sa client) → service `server` → server-0 (sa server), both meshed, the client
/// granted access by a TrafficTarget, plus an unmeshed `plain` pod (no sidecar, not in
/// the manifests).
fn mesh(id: u8, name: &str, weft_args: &[&str]) -> (Harness, std::net::Ipv4Addr) {
    let mut h = Harness::new(id, name).expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    let server_ip = h
        .add_pod("server-0", &[("app", "server")], "server")
        .unwrap();
    h.add_pod("plain", &[("app", "plain")], "default").unwrap();
    h.unlist_pod("plain");
    h.add_service("server", &[("app", "server")]).unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "server", &["client"]).unwrap();
    h.start_control_plane_with(weft_args).unwrap();
    h.start_sidecar("client").unwrap();
    h.start_sidecar("server-0").unwrap();
    (h, server_ip)
}

/// Serial numbers of the certificates `pod`'s sidecar currently presents.
fn served_serials(h: &Harness, pod: &str) -> BTreeSet<String> {
    let certs: serde_json::Value =
        serde_json::from_str(&h.envoy_admin(pod, "/certs").unwrap()).unwrap();
    certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["serial_number"].as_str().map(str::to_string))
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn meshed_traffic_is_mutual_tls_with_spiffe_identities() {
    let (h, _) = mesh(10, "mtls", &[]);
    let (body, peer) = h
        .get("client", SERVER_URL)
        .unwrap()
        .expect("client reaches server");
    assert_eq!(body, "server-0");
    let peer = peer.expect("the server app sees the caller's identity");
    assert!(
        peer.contains(&format!("URI={CLIENT_ID}")),
        "x-forwarded-client-cert: {peer}"
    );

    let server_handshakes = h
        .envoy_stat("server-0", "listener.0.0.0.0_15006.ssl.handshake")
        .unwrap();
    let client_handshakes = h
        .envoy_stat(
            "client",
            "cluster.outbound|8080||server|default.ssl.handshake",
        )
        .unwrap();
    eprintln!(
        "TLS handshakes: server inbound {server_handshakes}, client outbound {client_handshakes}"
    );
    assert!(server_handshakes >= 1, "the server sidecar terminated TLS");
    assert!(client_handshakes >= 1, "the client sidecar originated TLS");

    let certs: serde_json::Value =
        serde_json::from_str(&h.envoy_admin("server-0", "/certs").unwrap()).unwrap();
    let text = certs.to_string();
    assert!(
        text.contains("spiffe://cluster.local/ns/default/sa/server"),
        "server presents its SVID: {text}"
    );
}

#[test]
fn strict_rejects_plaintext_from_outside_the_mesh() {
    let (h, server_ip) = mesh(11, "strict", &[]);
    let direct = format!("http://{server_ip}:8080/");
    let outcome = h.get("plain", &direct).unwrap();
    assert!(
        outcome.is_err(),
        "plaintext reached a STRICT pod: {outcome:?}"
    );
    assert!(
        h.get("client", SERVER_URL).unwrap().is_ok(),
        "meshed traffic still flows"
    );
}

#[test]
fn permissive_accepts_plaintext_and_mtls() {
    let (h, server_ip) = mesh(12, "permissive", &["--mtls", "permissive"]);
    let direct = format!("http://{server_ip}:8080/");
    // Plaintext is accepted, but a plaintext caller has no identity a TrafficTarget
    // could name: deny-by-default refuses it until access is permissive.
    let refused = h.get("plain", &direct).unwrap();
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("403")),
        "plaintext caller under deny-by-default: {refused:?}"
    );
    h.write_manifest(
        "meshconfig.yaml",
        "apiVersion: config.weft.dev/v1alpha1\nkind: MeshConfig\nmetadata:\n  name: weft\nspec:\n  access: Permissive\n",
    )
    .unwrap();
    wait_for("a permissive MeshConfig", Duration::from_secs(10), || {
        h.get("plain", &direct).unwrap().is_ok()
    });
    let (body, peer) = h
        .get("plain", &direct)
        .unwrap()
        .expect("plaintext accepted");
    assert_eq!(body, "server-0");
    assert!(
        peer.is_none(),
        "a plaintext caller has no identity: {peer:?}"
    );
    let (_, peer) = h.get("client", SERVER_URL).unwrap().expect("mTLS accepted");
    assert!(peer.unwrap_or_default().contains(CLIENT_ID));
    assert!(
        h.envoy_stat("server-0", "listener.0.0.0.0_15006.ssl.handshake")
            .unwrap()
            >= 1
    );
}

#[test]
fn a_sidecar_claiming_another_pods_identity_gets_no_certificate() {
    let (mut h, _) = mesh(13, "impersonation", &[]);
    h.add_pod("evil", &[("app", "evil")], "default").unwrap();
    h.unlist_pod("evil");
    h.start_sidecar_as("evil", "client").unwrap();

    let status = h.status().unwrap();
    assert!(
        status["identity_check_failures"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let metric = h
        .control_plane_metric("weft_identity_check_failures_total")
        .unwrap();
    assert!(
        metric.unwrap_or(0.0) >= 1.0,
        "the mismatch is counted in a metric: {metric:?}"
    );
    assert_eq!(
        h.control_plane_metric("weft_xds_connected_proxies")
            .unwrap(),
        Some(3.0)
    );
    let proxies = h.proxy_status().unwrap();
    let denied: Vec<&serde_json::Value> = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["denied"].is_string())
        .collect();
    assert_eq!(denied.len(), 1, "exactly the impostor is denied: {proxies}");
    assert_eq!(denied[0]["node"], "default/client");
    assert!(
        denied[0]["denied"]
            .as_str()
            .unwrap()
            .contains("stream comes from"),
        "{}",
        denied[0]
    );

    assert!(
        served_serials(&h, "evil").is_empty(),
        "the impostor holds no certificate"
    );
    let outcome = h.get("evil", SERVER_URL).unwrap();
    assert!(
        outcome.is_err(),
        "the impostor reached a STRICT service: {outcome:?}"
    );
    assert!(
        h.get("client", SERVER_URL).unwrap().is_ok(),
        "the real client is unaffected"
    );
}

#[test]
fn certificates_rotate_under_load_without_a_failed_request() {
    let (h, _) = mesh(14, "rotation", &["--svid-ttl", "20s"]);
    let first = served_serials(&h, "server-0");
    assert_eq!(first.len(), 1, "one workload certificate: {first:?}");
    let load = h
        .start_load("client", SERVER_URL, Duration::from_secs(60), 2)
        .unwrap();
    let mut seen = first.clone();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(58) {
        std::thread::sleep(Duration::from_secs(2));
        seen.extend(served_serials(&h, "server-0"));
    }
    let report = load.finish().unwrap();
    eprintln!(
        "rotation: {} requests over 60s, server certificates seen: {}",
        report.results.len(),
        seen.len()
    );
    assert!(
        report.failures().is_empty(),
        "failed during rotation: {:?}",
        report.failures()
    );
    assert!(report.results.len() > 1000, "the load really ran");
    assert!(
        seen.len() >= 3,
        "at least two rotations in 60s with a 20s TTL: {seen:?}"
    );
    assert_ne!(
        served_serials(&h, "server-0"),
        first,
        "the served certificate changed"
    );
}

#[test]
fn a_control_plane_restart_keeps_the_root_and_traffic() {
    let (mut h, _) = mesh(15, "restart", &[]);
    let root_before = std::fs::read(h.state_dir().join("ca-cert.pem")).unwrap();
    let load = h
        .start_load("client", SERVER_URL, Duration::from_secs(15), 2)
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    h.restart_control_plane().unwrap();
    let root_after = std::fs::read(h.state_dir().join("ca-cert.pem")).unwrap();
    assert_eq!(
        root_before, root_after,
        "the root is byte-identical after a restart"
    );
    wait_for(
        "both proxies to resync with the new control plane",
        Duration::from_secs(30),
        || {
            let proxies = h.proxy_status().unwrap();
            let synced = |node: &str| {
                proxies.as_array().unwrap().iter().any(|p| {
                    p["node"] == node
                        && p["types"].as_array().is_some_and(|t| {
                            t.len() >= 4 && t.iter().all(|t| t["state"] == "SYNCED")
                        })
                })
            };
            synced("default/client") && synced("default/server-0")
        },
    );
    let report = load.finish().unwrap();
    eprintln!(
        "restart: {} requests, {} failed",
        report.results.len(),
        report.failures().len()
    );
    assert!(
        report.failures().is_empty(),
        "failed across the restart: {:?}",
        report.failures()
    );
    let (_, peer) = h
        .get("client", SERVER_URL)
        .unwrap()
        .expect("traffic after the restart");
    assert!(
        peer.unwrap_or_default().contains(CLIENT_ID),
        "still mTLS after the restart"
    );
}

#[test]
fn xds_over_tls_is_verified_against_the_root_and_plaintext_can_be_refused() {
    let mut h = Harness::new(16, "xds-tls").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("server-0", &[("app", "server")], "server")
        .unwrap();
    h.add_pod("legacy", &[("app", "legacy")], "legacy").unwrap();
    h.add_service("server", &[("app", "server")]).unwrap();
    h.write_cluster_manifest().unwrap();
    h.allow("access.yaml", "server", &["client"]).unwrap();
    h.start_control_plane_with(&["--require-xds-tls"]).unwrap();
    h.use_xds_tls(true);
    h.start_sidecar("client").unwrap();
    h.start_sidecar("server-0").unwrap();
    let (_, peer) = h
        .get("client", SERVER_URL)
        .unwrap()
        .expect("config arrived over TLS");
    assert!(peer.unwrap_or_default().contains(CLIENT_ID));
    let xds_tls = h
        .envoy_stat("client", "cluster.weft-xds.ssl.handshake")
        .unwrap();
    assert!(xds_tls >= 1, "the xDS connection is TLS");

    // A bootstrap without --ca-file speaks plaintext: refused, so it never gets config.
    h.spawn_sidecar("legacy", "legacy", false).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let proxies = h.proxy_status().unwrap();
    let nodes: Vec<&str> = proxies
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["node"].as_str())
        .collect();
    assert!(
        !nodes.contains(&"default/legacy"),
        "a plaintext sidecar was served: {nodes:?}"
    );
    assert!(
        nodes.contains(&"default/client") && nodes.contains(&"default/server-0"),
        "{nodes:?}"
    );
}

#[test]
fn a_meshed_client_reaches_a_pod_ip_directly_over_mtls_under_strict() {
    // Headless services and StatefulSet peers address pods by IP, not through a
    // ClusterIP: the client's sidecar still originates mTLS to the pod's identity.
    let (h, server_ip) = mesh(17, "pod-ip", &[]);
    let direct = format!("http://{server_ip}:8080/");
    let (body, peer) = h
        .get("client", &direct)
        .unwrap()
        .expect("a meshed client reaches a STRICT pod by its IP");
    assert_eq!(body, "server-0");
    assert!(
        peer.unwrap_or_default().contains(CLIENT_ID),
        "the server sees the client's identity"
    );
    // The cluster for the pod's address was discovered on demand, named after it.
    let handshakes = h
        .envoy_stat("client", &format!("cluster.pod|{server_ip}.ssl.handshake"))
        .unwrap();
    assert!(handshakes >= 1, "the client sidecar originated mTLS");
    let discovered = h
        .envoy_stat("client", "cluster_manager.cluster_added")
        .unwrap();
    assert!(discovered >= 1, "{discovered}");
    // Without a sidecar the same call stays refused.
    assert!(h.get("plain", &direct).unwrap().is_err());
}
