//! The minimum a sidecar pair can cost: two Envoys with a hand-written static mTLS
//! config (one listener, one route, one cluster each side), behind the same iptables
//! redirect as Weft's sidecars, so `weft-latency` can show what Weft's generated config
//! costs over it.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use weft_e2e::HarnessError;

fn err(what: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Command {
        command: what.to_string(),
        reason: e.to_string(),
    }
}

fn write(path: &Path, text: &str) -> Result<(), HarnessError> {
    std::fs::write(path, text).map_err(|source| HarnessError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(|source| {
        HarnessError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A CA and one certificate per name (SPIFFE-like URI SANs), written under `dir` as
/// `ca.pem`, `<name>.pem` and `<name>.key`.
pub fn write_certificates(dir: &Path, names: &[&str]) -> Result<(), HarnessError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err("ca key", e))?;
    let mut ca = CertificateParams::default();
    // Distinct names: a leaf named like its CA would look self-issued to the verifier.
    ca.distinguished_name = distinguished_name("weft-latency static CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| err("ca cert", e))?;
    write(&dir.join("ca.pem"), &ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for name in names {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| err("key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(name);
        let uri = format!("spiffe://static/{name}")
            .try_into()
            .map_err(|e| err("uri", e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| err("cert", e))?;
        write(&dir.join(format!("{name}.pem")), &cert.pem())?;
        write(&dir.join(format!("{name}.key")), &key.serialize_pem())?;
    }
    Ok(())
}

fn tls_context(dir: &Path, name: &str, peer: &str) -> String {
    let d = dir.display();
    format!(
        "common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
            - certificate_chain: {{filename: {d}/{name}.pem}}
              private_key: {{filename: {d}/{name}.key}}
            validation_context:
              trusted_ca: {{filename: {d}/ca.pem}}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{exact: \"spiffe://static/{peer}\"}}"
    )
}

const ROUTER: &str = "http_filters:
          - name: envoy.filters.http.router
            typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}";

/// The client side: everything the app sends (redirected to 15001) goes over HTTP/2
/// and mTLS to `server_ip:8080`.
pub fn client_bootstrap(dir: &Path, server_ip: &str) -> String {
    let tls = tls_context(dir, "client", "server");
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: out
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15001}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: out
          route_config:
            virtual_hosts:
            - {{name: all, domains: ['*'], routes: [{{match: {{prefix: /}}, route: {{cluster: server, timeout: 0s}}}}]}}
          {ROUTER}
  clusters:
  - name: server
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: server
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {server_ip}, port_value: 8080}}}}}}}}]}}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"
    )
}

/// The server side: mTLS terminated on 15006 (where inbound traffic is redirected),
/// HTTP/1.1 to the app on loopback.
pub fn server_bootstrap(dir: &Path) -> String {
    let tls = tls_context(dir, "server", "client");
    format!(
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 15000}}}}}}
static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 0.0.0.0, port_value: 15006}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          route_config:
            virtual_hosts:
            - {{name: all, domains: ['*'], routes: [{{match: {{prefix: /}}, route: {{cluster: app, timeout: 0s}}}}]}}
          {ROUTER}
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: app
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 8080}}}}}}}}]}}]
"
    )
}
