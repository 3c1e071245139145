//! Mutual TLS: SDS secrets, upstream and downstream TLS contexts, mesh-wide mode.

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, data_source, transport_socket,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext, common_tls_context, secret,
    subject_alt_name_matcher,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use super::envoy::{ads_config_source, any, bool_value};
use super::settings::MeshConfig;
use crate::identity::{WorkloadSecrets, spiffe_id};
use crate::index::MeshService;

/// SDS name of a proxy's own certificate and key.
pub const IDENTITY_SECRET: &str = "weft-identity";
/// SDS name of the roots a proxy trusts.
pub const TRUST_BUNDLE_SECRET: &str = "weft-trust-bundle";

fn sds(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(ads_config_source()),
    }
}

fn uri_matcher(pattern: string_matcher::MatchPattern) -> SubjectAltNameMatcher {
    SubjectAltNameMatcher {
        san_type: subject_alt_name_matcher::SanType::Uri as i32,
        matcher: Some(StringMatcher {
            match_pattern: Some(pattern),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn common_tls(peer: Vec<SubjectAltNameMatcher>) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![sds(IDENTITY_SECRET)],
        validation_context_type: Some(
            common_tls_context::ValidationContextType::CombinedValidationContext(
                common_tls_context::CombinedCertificateValidationContext {
                    default_validation_context: Some(CertificateValidationContext {
                        match_typed_subject_alt_names: peer,
                        ..Default::default()
                    }),
                    validation_context_sds_secret_config: Some(sds(TRUST_BUNDLE_SECRET)),
                    ..Default::default()
                },
            ),
        ),
        ..Default::default()
    }
}

fn tls_socket<M: prost::Name>(context: &M) -> TransportSocket {
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(transport_socket::ConfigType::TypedConfig(any(context))),
    }
}

/// Client side of mTLS to `service`: present our identity, accept only the
/// identities its pods run as.
pub fn upstream_transport_socket(config: &MeshConfig, service: &MeshService) -> TransportSocket {
    upstream_tls_to(config, &service.service_accounts, service.key.fqdn())
}

/// Client side of mTLS to pods running as `accounts` (namespace, service account).
pub fn upstream_tls_to(
    config: &MeshConfig,
    accounts: &[(String, String)],
    sni: String,
) -> TransportSocket {
    let peers = accounts
        .iter()
        .map(|(ns, sa)| {
            uri_matcher(string_matcher::MatchPattern::Exact(spiffe_id(
                &config.trust_domain,
                ns,
                sa,
            )))
        })
        .collect();
    tls_socket(&UpstreamTlsContext {
        common_tls_context: Some(common_tls(peers)),
        sni,
        ..Default::default()
    })
}

/// Server side of mTLS: a client certificate from the mesh's trust domain is required.
/// `alpn` lists the protocols it may negotiate (`h2` lets client sidecars speak HTTP/2).
pub fn downstream_transport_socket(config: &MeshConfig, alpn: &[&str]) -> TransportSocket {
    let trust_domain = format!("spiffe://{}/", config.trust_domain);
    let mut common = common_tls(vec![uri_matcher(string_matcher::MatchPattern::Prefix(
        trust_domain,
    ))]);
    common.alpn_protocols = alpn.iter().map(|p| p.to_string()).collect();
    tls_socket(&DownstreamTlsContext {
        common_tls_context: Some(common),
        require_client_certificate: Some(bool_value(true)),
        ..Default::default()
    })
}

fn inline(text: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineString(text.to_string())),
        ..Default::default()
    })
}

/// The two SDS secrets of a proxy: its certificate and key, and the trust bundle.
pub fn translate_secrets(secrets: &WorkloadSecrets) -> Vec<Secret> {
    vec![
        Secret {
            name: TRUST_BUNDLE_SECRET.to_string(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: inline(&secrets.trust_bundle_pem),
                    ..Default::default()
                },
            )),
        },
        Secret {
            name: IDENTITY_SECRET.to_string(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(&secrets.svid.cert_chain_pem),
                private_key: inline(&secrets.svid.key_pem),
                ..Default::default()
            })),
        },
    ]
}
