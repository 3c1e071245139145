//! The sidecar injector's serving certificate, end to end: the real `weft controller`
//! against the API-server double (real HTTP, the real kube client) issues it from Weft's
//! CA into the Secret `weft-webhook-tls` and patches the caBundle of every webhook of the
//! MutatingWebhookConfiguration; the real `weft-webhook` serves that certificate and a
//! rustls client trusting only the caBundle verifies it for the Service's DNS name, as the
//! API server would. A restart with a valid Secret writes nothing, a deleted Secret comes
//! back, a configuration installed after the controller gets its caBundle, a replica that
//! does not lead writes nothing, and the certificate is renewed at half its lifetime.
//!
//! Plain processes on 127.0.0.1 (no network namespaces, no root); the binaries must be
//! built (`cargo build --workspace --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test setup fails loudly

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use weft_e2e::apiserver::{ApiServerDouble, BackgroundDouble};
use weft_e2e::wait_until;

const NAMESPACE: &str = "weft-system";
const SECRET: &str = "weft-webhook-tls";
const CONFIGURATION: &str = "weft-sidecar-injector";
const DNS_NAMES: [&str; 2] = [
    "weft-webhook.weft-system.svc",
    "weft-webhook.weft-system.svc.cluster.local",
];
const MWC: (&str, &str) = (
    "admissionregistration.k8s.io/v1",
    "MutatingWebhookConfiguration",
);

// ---------------------------------------------------------------------------------------
// Processes and files

/// A workspace binary (`WEFT_BIN_<NAME>`, else next to this test), as the harness finds them.
fn workspace_binary(name: &str) -> PathBuf {
    weft_e2e::workspace_binary(name)
        .unwrap_or_else(|e| panic!("{e}: run `cargo build --workspace --bins` first"))
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "weft-webhook-cert-{what}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process, killed when dropped; its output goes to `log`.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines of its log containing `text`.
    fn count(&self, text: &str) -> usize {
        self.log_text().lines().filter(|l| l.contains(text)).count()
    }

    /// SIGTERM (it releases its Lease) and wait for it to exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "{pid} did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// The cluster

/// The API-server double on its own runtime, which the test thread does not block.
struct Cluster {
    api: BackgroundDouble,
    dir: TempDir,
    kubeconfig: PathBuf,
}

fn cluster(name: &str) -> Cluster {
    let api = BackgroundDouble::start().unwrap();
    let dir = TempDir::new(name);
    let kubeconfig = dir.path("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    for ns in ["default", NAMESPACE] {
        api.apply_object(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .unwrap();
    }
    Cluster {
        api,
        dir,
        kubeconfig,
    }
}

impl Cluster {
    /// Starts `weft controller` as `identity` (log `<log>.log`), with the chart's webhook
    /// flags, a 1 s resync and a 3 s Lease.
    fn start_controller(&self, identity: &str, log: &str, extra: &[&str]) -> Proc {
        let log = self.dir.path(&format!("{log}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(workspace_binary("weft"))
            .arg("controller")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--namespace", NAMESPACE, "--identity", identity])
            .args(["--xds-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port())])
            .args(["--proxy-identity", "address", "--lease-duration", "3s"])
            .args([
                "--webhook-secret",
                SECRET,
                "--webhook-service",
                "weft-webhook",
                "--webhook-configuration",
                CONFIGURATION,
                "--webhook-resync",
                "1s",
            ])
            .args(extra)
            .env("WEFT_LOG", "info,weft=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("weft controller starts");
        Proc { child, log }
    }

    /// The Secret's data, decoded.
    fn secret(&self, name: &str) -> Option<BTreeMap<String, String>> {
        let secret = self.api.get("v1", "Secret", Some(NAMESPACE), name)?;
        let data = secret["data"].as_object()?;
        Some(
            data.iter()
                .map(|(k, v)| {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    (k.clone(), String::from_utf8(bytes).unwrap())
                })
                .collect(),
        )
    }

    /// The root of Weft's CA, from its Secret.
    fn root(&self) -> String {
        self.secret("weft-ca").expect("the CA Secret")["ca.crt"].clone()
    }

    /// Every webhook's caBundle, decoded.
    fn ca_bundles(&self) -> Vec<Option<String>> {
        let Some(config) = self.api.get(MWC.0, MWC.1, None, CONFIGURATION) else {
            return Vec::new();
        };
        config["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w["clientConfig"]["caBundle"].as_str().map(|b| {
                    let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
                    String::from_utf8(bytes).unwrap()
                })
            })
            .collect()
    }

    /// Writes to the Secrets and the webhook configuration, as the double counted them.
    fn writes(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for (label, verb, resource) in [
            ("secret create", "create", "secrets"),
            ("secret update", "update", "secrets"),
            ("secret patch", "patch", "secrets"),
            (
                "configuration patch",
                "patch",
                "mutatingwebhookconfigurations",
            ),
            (
                "configuration update",
                "update",
                "mutatingwebhookconfigurations",
            ),
        ] {
            counts.insert(label, self.api.requests(verb, resource, ""));
        }
        counts
    }
}

/// A MutatingWebhookConfiguration as the chart renders it (no caBundle), with a second
/// webhook whose caBundle is someone else's.
fn configuration() -> Value {
    let hook = |name: &str, path: &str| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "weft-webhook", "namespace": NAMESPACE, "path": path, "port": 443}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": {"matchExpressions": [{"key": "weft.dev/inject", "operator": "In", "values": ["enabled"]}]},
            "sideEffects": "None",
            "timeoutSeconds": 5,
            "failurePolicy": "Fail",
            "reinvocationPolicy": "IfNeeded",
        })
    };
    let mut second = hook("second.weft.dev", "/second");
    second["clientConfig"]["caBundle"] = json!(
        base64::engine::general_purpose::STANDARD
            .encode("-----BEGIN CERTIFICATE-----\nb2xk\n-----END CERTIFICATE-----\n")
    );
    json!({
        "apiVersion": MWC.0, "kind": MWC.1,
        "metadata": {"name": CONFIGURATION, "labels": {"app.kubernetes.io/name": "weft"}},
        "webhooks": [hook("inject.weft.dev", "/inject"), second],
    })
}

// ---------------------------------------------------------------------------------------
// Certificates and TLS

/// Checks `tls_crt` with x509-parser: its leaf is signed by `root_pem`'s key (directly,
/// or through the intermediates after it), names the Service, serves TLS, and lives
/// `ttl`; returns the leaf's serial (hex).
fn check_certificate(tls_crt: &str, root_pem: &str, ttl: Duration) -> String {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(tls_crt.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let root = CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
    let parsed: Vec<_> = chain
        .iter()
        .map(|c| x509_parser::parse_x509_certificate(c).unwrap().1)
        .collect();
    // Each certificate signed by the next, the last by the root.
    for (i, cert) in parsed.iter().enumerate() {
        let issuer = parsed.get(i + 1).unwrap_or(&root);
        assert_eq!(cert.issuer().as_raw(), issuer.subject().as_raw());
        cert.verify_signature(Some(issuer.public_key()))
            .unwrap_or_else(|e| panic!("certificate {i} is not signed by its issuer: {e}"));
    }
    let leaf = &parsed[0];
    assert!(!leaf.is_ca());
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("a SAN extension")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(names, DNS_NAMES, "the Service's DNS names");
    let eku = leaf.extended_key_usage().unwrap().expect("an EKU").value;
    assert!(eku.server_auth, "a serving certificate");
    let validity = leaf.validity();
    let lifetime = (validity.not_after.timestamp() - validity.not_before.timestamp()) as u64;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(validity.not_before.timestamp() <= now && now < validity.not_after.timestamp());
    // Issued for `ttl`, backdated by at most a minute.
    assert!(
        lifetime >= ttl.as_secs() && lifetime <= ttl.as_secs() + 60,
        "lifetime {lifetime}s for {ttl:?}"
    );
    leaf.raw_serial_as_string()
}

/// A real TLS handshake with `127.0.0.1:port` as `server_name`, trusting only
/// `trust_pem`, then `GET /healthz`; the server's leaf certificate and the answer.
fn handshake(
    port: u16,
    server_name: &str,
    trust_pem: &str,
) -> Result<(CertificateDer<'static>, String), String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trust_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n");
    // Debug: it names the rustls error (`InvalidCertificate(UnknownIssuer)`, ...).
    tls.write_all(request.as_bytes())
        .map_err(|e| format!("{e:?}"))?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // A server that closes without close_notify: what arrived is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(format!("{e:?}")),
    }
    let leaf = tls.conn.peer_certificates().unwrap()[0]
        .clone()
        .into_owned();
    Ok((leaf, String::from_utf8_lossy(&answer).into_owned()))
}

/// Writes the Secret's certificate and key where the webhook reads them, as the kubelet
/// updates a mounted Secret.
fn write_mount(dir: &TempDir, secret: &BTreeMap<String, String>) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.path("tls.crt"), dir.path("tls.key"));
    std::fs::write(&key, &secret["tls.key"]).unwrap();
    std::fs::write(&cert, &secret["tls.crt"]).unwrap();
    (cert, key)
}

/// The real `weft-webhook` serving `cert`/`key` on 127.0.0.1; its port.
fn start_webhook(dir: &TempDir, cert: &Path, key: &Path) -> (Proc, u16) {
    let port = free_port();
    let log = dir.path("webhook.log");
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(workspace_binary("weft-webhook"))
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg(format!("--cert={}", cert.display()))
        .arg(format!("--key={}", key.display()))
        .env("WEFT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("weft-webhook starts");
    let mut webhook = Proc { child, log };
    wait_until(Duration::from_secs(20), "weft-webhook to listen", || {
        if let Some(status) = webhook.child.try_wait().unwrap() {
            panic!("weft-webhook exited with {status}:\n{}", webhook.log_text());
        }
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .unwrap();
    (webhook, port)
}

/// Every verb the double saw on `resource` is one `weft controller-access` lists for it.
fn assert_calls_are_listed(api: &ApiServerDouble, group: &str, resource: &str) {
    let out = Command::new(workspace_binary("weft"))
        .arg("controller-access")
        .output()
        .unwrap();
    assert!(out.status.success());
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["group"] == group && e["resource"] == resource)
        .flat_map(|e| e["verbs"].as_array().unwrap().clone())
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    for verb in [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ] {
        if api.requests(verb, resource, "") > 0 {
            assert!(
                listed.iter().any(|v| v == verb),
                "the controller called {verb} on {resource}, which controller-access does not list ({listed:?})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn the_controller_issues_the_webhook_certificate_and_sets_the_ca_bundle() {
    let c = cluster("issue");
    // The chart's CRDs, as if installed for another namespace and without a caBundle.
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/weft/crds");
    let mut converted = Vec::new();
    for entry in std::fs::read_dir(&crds).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut crd: Value = serde_yaml_ng::from_str(&text).unwrap();
        if crd["spec"]["conversion"]["strategy"] == "Webhook" {
            crd["spec"]["conversion"]["webhook"]["clientConfig"]["service"]["namespace"] =
                json!("elsewhere");
            converted.push(crd["metadata"]["name"].as_str().unwrap().to_string());
        }
        c.api.apply_object(crd).unwrap();
    }
    converted.sort();
    assert_eq!(converted.len(), 3, "{converted:?}");
    // The configuration is installed after the controller starts.
    let controller = c.start_controller("weft-1", "controller-1", &[]);
    wait_until(Duration::from_secs(30), "the webhook Secret", || {
        c.secret(SECRET).is_some()
    })
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the missing configuration reported",
        || controller.count("MutatingWebhookConfiguration does not exist") == 1,
    )
    .unwrap();
    c.api.apply_object(configuration()).unwrap();
    let root = c.root();
    wait_until(Duration::from_secs(15), "both caBundles set", || {
        c.ca_bundles() == [Some(root.clone()), Some(root.clone())]
    })
    .unwrap();
    // Only the caBundles changed.
    let stored = c.api.get(MWC.0, MWC.1, None, CONFIGURATION).unwrap();
    let mut expected = configuration();
    for hook in expected["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"]["caBundle"] =
            json!(base64::engine::general_purpose::STANDARD.encode(&root));
    }
    assert_eq!(stored["webhooks"], expected["webhooks"]);
    assert_eq!(stored["metadata"]["labels"], expected["metadata"]["labels"]);
    // The SMI CRDs' conversion webhook: this namespace's Service, trusting the root.
    let encoded_root = json!(base64::engine::general_purpose::STANDARD.encode(&root));
    wait_until(
        Duration::from_secs(15),
        "the CRDs' conversion webhooks set",
        || {
            converted.iter().all(|name| {
                c.api
                    .get(
                        "apiextensions.k8s.io/v1",
                        "CustomResourceDefinition",
                        None,
                        name,
                    )
                    .is_some_and(|crd| {
                        let client = &crd["spec"]["conversion"]["webhook"]["clientConfig"];
                        client["caBundle"] == encoded_root
                            && client["service"]["namespace"] == NAMESPACE
                    })
            })
        },
    )
    .unwrap();

    // The Secret: a kubernetes.io/tls certificate from Weft's root for the Service.
    let secret = c.secret(SECRET).unwrap();
    let raw = c.api.get("v1", "Secret", Some(NAMESPACE), SECRET).unwrap();
    assert_eq!(raw["type"], "kubernetes.io/tls");
    assert_eq!(secret["ca.crt"], root, "ca.crt is the trust bundle");
    let ninety_days = Duration::from_secs(90 * 24 * 3600);
    let serial = check_certificate(&secret["tls.crt"], &root, ninety_days);
    assert_eq!(controller.count("webhook serving certificate issued"), 1);

    // The real webhook serves it; a client trusting only the caBundle verifies it for the
    // Service's names, and not for another name or with another root.
    let mount = TempDir::new("mount");
    let (cert, key) = write_mount(&mount, &secret);
    let (webhook, port) = start_webhook(&mount, &cert, &key);
    let bundle = c.ca_bundles()[0].clone().unwrap();
    for name in DNS_NAMES {
        let (leaf, answer) = handshake(port, name, &bundle).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok\n"),
            "{answer}"
        );
        let expected = CertificateDer::from_pem_slice(secret["tls.crt"].as_bytes()).unwrap();
        assert_eq!(leaf, expected);
    }
    let wrong_name = handshake(port, "weft-webhook.default.svc", &bundle).unwrap_err();
    assert!(wrong_name.contains("NotValidForName"), "{wrong_name}");
    let (other_root, _) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (params.self_signed(&key).unwrap().pem(), key)
    };
    let untrusted = handshake(port, DNS_NAMES[0], &other_root).unwrap_err();
    assert!(untrusted.contains("UnknownIssuer"), "{untrusted}");

    // Someone resets a caBundle: it is set again.
    let before = c.writes();
    c.api.apply_object(configuration()).unwrap();
    wait_until(Duration::from_secs(10), "the caBundle set again", || {
        c.ca_bundles() == [Some(root.clone()), Some(root.clone())]
    })
    .unwrap();
    let after = c.writes();
    assert_eq!(
        after["configuration patch"],
        before["configuration patch"] + 1,
        "one patch"
    );

    // A restart with a valid Secret and current caBundles writes nothing.
    controller.stop();
    let before = c.writes();
    let restarted = c.start_controller("weft-1", "controller-1-restarted", &[]);
    wait_until(
        Duration::from_secs(30),
        "the restarted controller to check the Secret and caBundles",
        || restarted.count("caBundle is current") >= 3,
    )
    .unwrap();
    assert_eq!(c.writes(), before, "a restart writes nothing");
    assert_eq!(restarted.count("webhook serving certificate issued"), 0);
    assert_eq!(restarted.count("caBundle set"), 0);

    // A deleted Secret is issued again; the webhook picks it up from its files.
    c.api
        .delete_object("v1", "Secret", Some(NAMESPACE), SECRET)
        .unwrap();
    wait_until(Duration::from_secs(10), "the Secret re-created", || {
        c.secret(SECRET).is_some()
    })
    .unwrap();
    let recreated = c.secret(SECRET).unwrap();
    let new_serial = check_certificate(&recreated["tls.crt"], &root, ninety_days);
    assert_ne!(new_serial, serial);
    assert_eq!(c.writes()["secret create"], before["secret create"] + 1);
    assert_eq!(
        c.writes()["configuration patch"],
        before["configuration patch"],
        "the caBundle did not change"
    );
    write_mount(&mount, &recreated);
    let expected = CertificateDer::from_pem_slice(recreated["tls.crt"].as_bytes()).unwrap();
    wait_until(Duration::from_secs(10), "the webhook to serve it", || {
        handshake(port, DNS_NAMES[0], &bundle).is_ok_and(|(leaf, _)| leaf == expected)
    })
    .unwrap();
    // Logged after the create returns, so it may trail the Secret.
    wait_until(Duration::from_secs(10), "the reason logged", || {
        restarted.log_text().lines().any(|l| {
            l.contains("webhook serving certificate issued") && l.contains("no certificate stored")
        })
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", restarted.log_text()));
    drop(webhook);

    for (group, resource) in [
        ("", "secrets"),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
        ),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    ] {
        assert_calls_are_listed(&c.api, group, resource);
    }
}

#[test]
fn only_the_leader_writes_and_a_successor_keeps_a_valid_certificate() {
    let c = cluster("leader");
    c.api.apply_object(configuration()).unwrap();
    let first = c.start_controller("weft-1", "controller-1", &[]);
    let root = loop {
        if let Some(ca) = c.secret("weft-ca") {
            break ca["ca.crt"].clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    wait_until(Duration::from_secs(30), "the Secret and caBundles", || {
        c.secret(SECRET).is_some() && c.ca_bundles() == [Some(root.clone()), Some(root.clone())]
    })
    .unwrap();
    let second = c.start_controller("weft-2", "controller-2", &[]);
    wait_until(
        Duration::from_secs(20),
        "the second replica to start",
        || second.count("webhook serving certificate: managed by the leader") == 1,
    )
    .unwrap();
    // A deleted Secret is written once, by the leader.
    let before = c.writes();
    c.api
        .delete_object("v1", "Secret", Some(NAMESPACE), SECRET)
        .unwrap();
    wait_until(Duration::from_secs(10), "the Secret re-created", || {
        c.secret(SECRET).is_some()
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after = c.writes();
    assert_eq!(after["secret create"], before["secret create"] + 1);
    assert_eq!(after["secret update"], before["secret update"]);
    assert_eq!(first.count("webhook serving certificate issued"), 2);
    assert_eq!(second.count("webhook serving certificate issued"), 0);
    assert_eq!(
        second.count("webhook serving certificate is current"),
        0,
        "the other replica does not even read it"
    );
    let serial = check_certificate(
        &c.secret(SECRET).unwrap()["tls.crt"],
        &root,
        Duration::from_secs(90 * 24 * 3600),
    );

    // The leader dies without a goodbye: the other takes over and keeps the certificate.
    let before = c.writes();
    drop(first);
    wait_until(
        Duration::from_secs(20),
        "the second replica to lead and check the certificate",
        || second.count("caBundle is current") >= 2,
    )
    .unwrap();
    assert_eq!(c.writes(), before, "a valid Secret is kept");
    let kept = check_certificate(
        &c.secret(SECRET).unwrap()["tls.crt"],
        &root,
        Duration::from_secs(90 * 24 * 3600),
    );
    assert_eq!(kept, serial);
    // And it repairs what needs it.
    c.api
        .delete_object("v1", "Secret", Some(NAMESPACE), SECRET)
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the successor to re-create it",
        || c.secret(SECRET).is_some(),
    )
    .unwrap();
    // The Secret can appear before the log line that reports its issue is read.
    wait_until(
        Duration::from_secs(10),
        "the successor to log the issue",
        || second.count("webhook serving certificate issued") >= 1,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(second.count("webhook serving certificate issued"), 1);
}

#[test]
fn the_certificate_is_renewed_at_half_its_lifetime_in_place() {
    let c = cluster("renew");
    c.api.apply_object(configuration()).unwrap();
    let ttl = Duration::from_secs(8);
    let controller = c.start_controller("weft-1", "controller-1", &["--webhook-cert-ttl", "8s"]);
    wait_until(Duration::from_secs(30), "the webhook Secret", || {
        c.secret(SECRET).is_some()
    })
    .unwrap();
    let root = c.root();
    let first = c.secret(SECRET).unwrap();
    let serial = check_certificate(&first["tls.crt"], &root, ttl);
    let mount = TempDir::new("renew-mount");
    let (cert, key) = write_mount(&mount, &first);
    let (_webhook, port) = start_webhook(&mount, &cert, &key);
    let issued = Instant::now();
    wait_until(Duration::from_secs(15), "a renewed certificate", || {
        c.secret(SECRET)
            .is_some_and(|s| s["tls.crt"] != first["tls.crt"])
    })
    .unwrap();
    let renewed_after = issued.elapsed();
    // At half of 8 s plus the up-to-2 s backdating, not at expiry.
    assert!(
        renewed_after < Duration::from_secs(7),
        "renewed after {renewed_after:?}"
    );
    let renewed = c.secret(SECRET).unwrap();
    let new_serial = check_certificate(&renewed["tls.crt"], &root, ttl);
    assert_ne!(new_serial, serial);
    let writes = c.writes();
    assert!(writes["secret update"] >= 1, "renewed in place: {writes:?}");
    assert_eq!(
        writes["configuration patch"], 1,
        "the caBundle stays: {writes:?}"
    );
    // Logged after the replace returns, so it may trail the Secret.
    wait_until(Duration::from_secs(10), "the renewal logged", || {
        controller
            .log_text()
            .lines()
            .any(|l| l.contains("past half its lifetime") && l.contains("Secret replaced"))
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", controller.log_text()));
    // The webhook serves the renewed one once its files change.
    write_mount(&mount, &renewed);
    let bundle = c.ca_bundles()[0].clone().unwrap();
    let expected = CertificateDer::from_pem_slice(renewed["tls.crt"].as_bytes()).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the webhook to serve the renewed one",
        || handshake(port, DNS_NAMES[1], &bundle).is_ok_and(|(leaf, _)| leaf == expected),
    )
    .unwrap();
}

/// Runs `weft check` against the cluster: (exit success, stdout).
fn weft_check(c: &Cluster, extra: &[&str]) -> (bool, String) {
    let out = Command::new(workspace_binary("weft"))
        .arg("check")
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["--namespace", NAMESPACE])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn weft_check_passes_a_healthy_install_and_names_the_fix_for_an_expired_webhook_certificate() {
    let c = cluster("check");
    // Before the CRDs are there: the pre-install checks pass, the full ones name them.
    let (ok, text) = weft_check(&c, &["--pre-install"]);
    assert!(ok, "{text}");
    assert!(text.contains("[ok  ] Kubernetes API: reachable"), "{text}");
    let (ok, text) = weft_check(&c, &[]);
    assert!(!ok, "{text}");
    assert!(text.contains("[FAIL] CRDs: missing: "), "{text}");
    assert!(text.contains("fix: helm upgrade --install"), "{text}");

    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/weft/crds");
    for entry in std::fs::read_dir(&crds).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        c.api
            .apply_object(serde_yaml_ng::from_str(&text).unwrap())
            .unwrap();
    }
    c.api.apply_object(configuration()).unwrap();
    // The injector's pod is ready behind its Service.
    c.api
        .apply_object(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "weft-webhook-1", "namespace": NAMESPACE,
                         "labels": {"kubernetes.io/service-name": "weft-webhook"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}],
        }))
        .unwrap();
    let controller = c.start_controller("weft-1", "controller-check", &[]);
    wait_until(
        Duration::from_secs(30),
        "the webhook Secret and caBundles",
        || c.secret(SECRET).is_some() && c.ca_bundles().iter().all(Option::is_some),
    )
    .unwrap();
    let (ok, text) = weft_check(&c, &[]);
    assert!(ok, "a healthy install passes:\n{text}");
    for line in [
        "[ok  ] CRDs: all ",
        "[ok  ] webhook configuration: weft-sidecar-injector: 2 webhook(s) with a caBundle",
        "[ok  ] webhook certificate: Secret weft-system/weft-webhook-tls valid until ",
        "[ok  ] webhook reachable: Service weft-system/weft-webhook has 1 ready endpoint(s)",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }

    // The controller is gone and the certificate has expired meanwhile.
    controller.stop();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![DNS_NAMES[0].to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2024, 4, 1);
    let expired = params.self_signed(&key).unwrap().pem();
    let mut secret = c.api.get("v1", "Secret", Some(NAMESPACE), SECRET).unwrap();
    secret["data"]["tls.crt"] = json!(base64::engine::general_purpose::STANDARD.encode(&expired));
    c.api.apply_object(secret).unwrap();
    let (ok, text) = weft_check(&c, &[]);
    assert!(
        !ok,
        "an expired webhook certificate fails the check:\n{text}"
    );
    assert!(
        text.contains(
            "[FAIL] webhook certificate: Secret weft-system/weft-webhook-tls expired at 2024-04-01T00:00:00Z"
        ),
        "{text}"
    );
    assert!(
        text.contains("fix: the controller renews it at half its lifetime, so it is not running"),
        "{text}"
    );
    // The rest still passes: the failure is that one.
    assert_eq!(text.matches("[FAIL]").count(), 1, "{text}");
}
