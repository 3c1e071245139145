//! What a proxy holds follows what it needs: an egress scope limits its outbound
//! config to the services it calls; calls straight to pod IPs discover their cluster
//! on demand. Real `weft up`, real Envoy sidecars, in network-namespace pods. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step should fail the test loudly

use weft_e2e::Harness;

/// Names of the outbound service clusters `pod`'s sidecar holds.
fn outbound(h: &Harness, pod: &str) -> Vec<String> {
    let clusters = h.envoy_admin(pod, "/clusters").unwrap();
    let mut names: Vec<String> = clusters
        .lines()
        .filter_map(|l| l.split("::").next())
        .filter(|n| n.starts_with("outbound|"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn a_scoped_proxy_holds_only_the_services_it_calls() {
    let mut h = Harness::new(40, "scale-scope").expect("harness");
    h.add_pod("client", &[("app", "client")], "client").unwrap();
    h.add_pod("wide", &[("app", "wide")], "wide").unwrap();
    for name in ["one", "two", "three"] {
        h.add_pod(&format!("{name}-0"), &[("app", name)], name)
            .unwrap();
        h.add_service(name, &[("app", name)]).unwrap();
    }
    h.annotate_pod("client", "weft.dev/egress", "default/one,./two");
    h.write_cluster_manifest().unwrap();
    h.start_control_plane_with(&["--access", "permissive"])
        .unwrap();
    for pod in ["client", "wide", "one-0", "two-0", "three-0"] {
        h.start_sidecar(pod).unwrap();
    }
    assert_eq!(
        outbound(&h, "client"),
        vec![
            "outbound|8080||one.default.svc.cluster.local",
            "outbound|8080||two.default.svc.cluster.local",
        ],
        "the scoped proxy holds its two services only"
    );
    assert_eq!(
        outbound(&h, "wide").len(),
        3,
        "an unscoped proxy holds them all"
    );
    for url in ["http://one:8080/", "http://two:8080/"] {
        let (body, _) = h
            .get("client", url)
            .unwrap()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(body.ends_with("-0"), "{url}: {body}");
    }
    assert!(
        h.get("client", "http://three:8080/").unwrap().is_err(),
        "a service outside the scope is not routed by the mesh"
    );
    // Widening the scope applies live.
    h.annotate_pod("client", "weft.dev/egress", "./*");
    h.write_cluster_manifest().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while outbound(&h, "client").len() != 3 {
        assert!(std::time::Instant::now() < deadline, "scope never widened");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The cluster can be active a moment before its route table arrives.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        match h.get("client", "http://three:8080/").unwrap() {
            Ok((body, _)) => break body,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "never routed once in scope: {e}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(body, "three-0");
}
