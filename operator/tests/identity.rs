//! The CA: issuance (SANs, key usage, validity), chains verified with webpki,
//! persistence across restarts, user-supplied intermediates, and root rotation.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test setup fails loudly

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use weft::identity::{CaSource, CertificateAuthority, spiffe_id};
use x509_parser::extensions::{GeneralName, ParsedExtension};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-identity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

/// Verifies `chain_pem` (leaf first) against the roots in `bundle_pem` at `at`.
fn verify(chain_pem: &str, bundle_pem: &str, at: SystemTime) -> Result<(), webpki::Error> {
    let chain = ders(chain_pem);
    let roots = ders(bundle_pem);
    let anchors: Vec<_> = roots
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).unwrap();
    let time = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    leaf.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

#[test]
fn workload_certificates_carry_the_spiffe_id_and_verify_against_the_root() {
    let dir = temp_dir("issue");
    let ca = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    let id = spiffe_id("cluster.local", "shop", "web");
    let now = SystemTime::now();
    let svid = ca.issue(&id, Duration::from_secs(3600), now).unwrap();

    verify(&svid.cert_chain_pem, ca.trust_bundle_pem(), now).expect("chain verifies");
    let after = svid.not_after + Duration::from_secs(1);
    assert!(
        verify(&svid.cert_chain_pem, ca.trust_bundle_pem(), after).is_err(),
        "expired certificate fails"
    );

    let der = &ders(&svid.cert_chain_pem)[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let mut uris = Vec::new();
    let mut server_and_client = (false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(u) = name {
                        uris.push(u.to_string());
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(eku) => {
                server_and_client = (eku.server_auth, eku.client_auth)
            }
            ParsedExtension::BasicConstraints(bc) => {
                assert!(!bc.ca, "a workload certificate is no CA")
            }
            ParsedExtension::KeyUsage(ku) => assert!(ku.digital_signature() && !ku.key_cert_sign()),
            _ => {}
        }
    }
    assert_eq!(uris, vec![id.clone()]);
    assert_eq!(server_and_client, (true, true));
    let validity = cert.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!((3600..=3660).contains(&lifetime), "lifetime {lifetime}s");
    assert_eq!(svid.serial.len(), 32, "128-bit serial");
    let other = ca.issue(&id, Duration::from_secs(3600), now).unwrap();
    assert_ne!(other.serial, svid.serial);
    assert_ne!(
        other.key_pem, svid.key_pem,
        "every certificate has its own key"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_root_is_persisted_with_a_private_key_file_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("persist");
    let first = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    let mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    assert_eq!(
        first.root_pem(),
        second.root_pem(),
        "a restart keeps the root byte for byte"
    );
    let svid = second
        .issue(
            "spiffe://cluster.local/ns/a/sa/b",
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap();
    verify(
        &svid.cert_chain_pem,
        first.trust_bundle_pem(),
        SystemTime::now(),
    )
    .expect("old root verifies new leaves");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An intermediate signed by a root made here, written as files like a user would supply.
fn user_intermediate(dir: &Path) -> (PathBuf, PathBuf, PathBuf, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir).unwrap();
    let root_key = KeyPair::generate().unwrap();
    let mut root_params = CertificateParams::new(Vec::new()).unwrap();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(root_params, root_key);
    let int_key = KeyPair::generate().unwrap();
    let mut int_params = CertificateParams::new(Vec::new()).unwrap();
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    int_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "user intermediate");
    let intermediate = int_params.signed_by(&int_key, &root_issuer).unwrap();
    let (cert, key, chain) = (
        dir.join("int.pem"),
        dir.join("int-key.pem"),
        dir.join("root.pem"),
    );
    std::fs::write(&cert, intermediate.pem()).unwrap();
    std::fs::write(&key, int_key.serialize_pem()).unwrap();
    std::fs::write(&chain, root.pem()).unwrap();
    (cert, key, chain, root.pem())
}

#[test]
fn a_user_supplied_intermediate_signs_leaves_that_chain_to_the_users_root() {
    let dir = temp_dir("intermediate");
    let (cert, key, chain, root_pem) = user_intermediate(&dir);
    let ca = CertificateAuthority::load(
        &CaSource::Files {
            cert,
            key,
            chain: Some(chain),
        },
        None,
    )
    .unwrap();
    assert_eq!(
        ca.trust_bundle_pem(),
        root_pem,
        "proxies trust the user's root"
    );
    let svid = ca
        .issue(
            "spiffe://cluster.local/ns/a/sa/b",
            Duration::from_secs(60),
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(ders(&svid.cert_chain_pem).len(), 2, "leaf + intermediate");
    verify(&svid.cert_chain_pem, &root_pem, SystemTime::now())
        .expect("leaf chains to the user's root");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Root rotation: start the new CA with the old root as an extra trusted root. Proxies
/// trust both, so leaves of either root verify while certificates roll over; once every
/// leaf is from the new root, drop the extra bundle.
#[test]
fn during_a_root_rotation_both_roots_are_trusted() {
    let old_dir = temp_dir("rotation-old");
    let new_dir = temp_dir("rotation-new");
    let old = CertificateAuthority::load(&CaSource::StateDir(old_dir.clone()), None).unwrap();
    let old_root = old_dir.join("ca-cert.pem");
    let new =
        CertificateAuthority::load(&CaSource::StateDir(new_dir.clone()), Some(&old_root)).unwrap();
    assert_ne!(old.root_pem(), new.root_pem());
    assert_eq!(
        ders(new.trust_bundle_pem()).len(),
        2,
        "bundle holds the new and the old root"
    );
    let now = SystemTime::now();
    let from_old = old
        .issue(
            "spiffe://cluster.local/ns/a/sa/b",
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    let from_new = new
        .issue(
            "spiffe://cluster.local/ns/a/sa/b",
            Duration::from_secs(60),
            now,
        )
        .unwrap();
    verify(&from_old.cert_chain_pem, new.trust_bundle_pem(), now).expect("old leaves still verify");
    verify(&from_new.cert_chain_pem, new.trust_bundle_pem(), now).expect("new leaves verify");
    assert!(
        verify(&from_new.cert_chain_pem, old.trust_bundle_pem(), now).is_err(),
        "the old bundle alone does not trust new leaves"
    );
    std::fs::remove_dir_all(&old_dir).unwrap();
    std::fs::remove_dir_all(&new_dir).unwrap();
}

#[test]
fn workload_certificates_are_issued_once_renewed_at_half_life_and_forgotten() {
    use weft::identity::WorkloadCertificates;
    use weft::index::Index;
    use weft::sources::parse_manifests;
    let dir = temp_dir("workloads");
    let ca = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    let pod = |sa: &str| {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0}}\nspec: {{serviceAccountName: {sa}, containers: [{{name: c, image: i}}]}}\nstatus: {{podIP: 198.18.0.2}}\n"
        );
        let mut index = Index::new();
        index.reset(parse_manifests(&text).unwrap());
        index.model().workloads["default/web-0"].clone()
    };
    let ttl = Duration::from_secs(1000);
    let mut certs = WorkloadCertificates::new("cluster.local", ttl);
    let t0 = SystemTime::now();
    let node = "default/web-0";
    assert!(certs.ensure(&ca, node, &pod("web"), t0).unwrap(), "issued");
    assert!(certs.secrets("default/other", &ca).is_none());
    let first = certs.secrets(node, &ca).unwrap();
    assert_eq!(
        first.svid.spiffe_id,
        "spiffe://cluster.local/ns/default/sa/web"
    );
    let renew = certs.next_renewal().unwrap();
    let half = first.svid.not_before
        + (first
            .svid
            .not_after
            .duration_since(first.svid.not_before)
            .unwrap()
            / 2);
    let spread = renew.duration_since(half).unwrap_or_else(|e| e.duration());
    assert!(
        spread <= Duration::from_secs(61),
        "renewal {renew:?} is near half-life {half:?}"
    );
    assert!(certs.due(t0 + Duration::from_secs(100)).is_empty());
    assert!(
        !certs
            .ensure(&ca, node, &pod("web"), t0 + Duration::from_secs(100))
            .unwrap(),
        "not due yet"
    );
    assert_eq!(certs.due(renew), vec![node.to_string()]);
    assert!(
        certs.ensure(&ca, node, &pod("web"), renew).unwrap(),
        "renewed when due"
    );
    assert_ne!(
        certs.secrets(node, &ca).unwrap().svid.serial,
        first.svid.serial
    );
    assert!(
        certs.ensure(&ca, node, &pod("api"), renew).unwrap(),
        "a new service account gets a new identity"
    );
    assert_eq!(
        certs.secrets(node, &ca).unwrap().svid.spiffe_id,
        "spiffe://cluster.local/ns/default/sa/api"
    );
    certs.forget(node);
    assert!(certs.secrets(node, &ca).is_none(), "forgotten");
    assert!(certs.next_renewal().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The serial (hex) of the certificate a TLS server on `addr` presents for `localhost`.
async fn served_serial(addr: std::net::SocketAddr, root_pem: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for der in ders(root_pem) {
        roots.add(der).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector
        .connect(name, tcp)
        .await
        .expect("handshake verifies against the root");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn the_xds_serving_certificate_is_renewed_live_at_half_life() {
    let dir = temp_dir("xds-serving");
    let ca = CertificateAuthority::load(&CaSource::StateDir(dir.clone()), None).unwrap();
    let now = SystemTime::now();
    let ttl = Duration::from_secs(3600);
    let mut cert = weft::runtime::xds_listener::XdsServingCert::issue(
        &ca,
        "cluster.local",
        &["localhost".to_string()],
        ttl,
        now,
    )
    .unwrap();
    assert_eq!(cert.renew_at(), now + ttl / 2);
    let acceptor = cert.acceptor().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // Hold the connection until the client closes it.
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0u8; 1]).await;
                }
            });
        }
    });

    let first = served_serial(addr, ca.root_pem()).await;
    let first_issued = cert.serial().trim_start_matches('0').to_string();
    assert!(
        first.trim_start_matches('0') == first_issued,
        "served {first}, issued {first_issued}"
    );
    // Renewed now (a real clock would be at half-life; the certificate must be valid
    // for the handshake below).
    let later = SystemTime::now();
    cert.renew(&ca, later).unwrap();
    assert_eq!(cert.renew_at(), later + ttl / 2);
    let second = served_serial(addr, ca.root_pem()).await;
    assert_ne!(first, second, "new handshakes get the renewed certificate");
    assert_eq!(
        second.trim_start_matches('0'),
        cert.serial().trim_start_matches('0')
    );
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}
