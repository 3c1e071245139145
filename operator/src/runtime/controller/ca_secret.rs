//! The CA in the cluster: a Secret in the controller's namespace, created once.
//!
//! Replicas that start together race to create it; the loser's create answers 409
//! and it reads the winner's, so every replica signs with the same root. A
//! `kubernetes.io/tls` Secret named by the user (a root, or an intermediate with its
//! chain) is used instead when present.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use crate::error::WeftError;
use crate::identity::CertificateAuthority;

/// Key of the root certificate in Weft's own CA Secret.
const CERT_KEY: &str = "ca.crt";
/// Key of the root's private key in Weft's own CA Secret.
const KEY_KEY: &str = "ca.key";

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn missing(name: &str, key: &str) -> WeftError {
    WeftError::Identity(format!("Secret {name} has no usable {key}"))
}

/// Splits PEM text into its certificates.
fn certificates(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----")
        .filter(|c| c.contains("-----BEGIN CERTIFICATE-----"))
        .map(|c| format!("{}\n", c.trim()))
        .collect()
}

/// The PEM text a [`CertificateAuthority`] is made from, so that the tasks that sign
/// (the xDS server, the webhook certificate) each get their own instance of one CA.
#[derive(Clone)]
pub struct CaMaterial {
    cert: String,
    key: String,
    chain: String,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CaMaterial").finish_non_exhaustive()
    }
}

impl CaMaterial {
    /// The CA; checked once by [`load_ca_material`], so this fails only if that did.
    pub fn authority(&self) -> Result<CertificateAuthority, WeftError> {
        CertificateAuthority::from_pem(&self.cert, &self.key, &self.chain, "")
    }

    fn checked(cert: String, key: String, chain: String) -> Result<Self, WeftError> {
        let material = Self { cert, key, chain };
        material.authority()?;
        Ok(material)
    }
}

/// A CA from a `kubernetes.io/tls` Secret: `tls.crt` (the CA certificate, possibly
/// followed by its chain), `tls.key`, and `ca.crt` (the root) when it is an
/// intermediate.
fn from_tls_secret(name: &str, secret: &Secret) -> Result<CaMaterial, WeftError> {
    let certs = certificates(&text(secret, "tls.crt").ok_or_else(|| missing(name, "tls.crt"))?);
    let key = text(secret, "tls.key").ok_or_else(|| missing(name, "tls.key"))?;
    let (cert, rest) = certs
        .split_first()
        .ok_or_else(|| missing(name, "certificate in tls.crt"))?;
    let mut chain = rest.concat();
    if let Some(root) = text(secret, "ca.crt") {
        for c in certificates(&root) {
            if !chain.contains(&c) && c != *cert {
                chain.push_str(&c);
            }
        }
    }
    CaMaterial::checked(cert.clone(), key, chain)
}

/// Loads the CA: see [`load_ca_material`].
pub async fn load_ca(
    client: kube::Client,
    namespace: &str,
    own_secret: &str,
    user_secret: Option<&str>,
) -> Result<CertificateAuthority, WeftError> {
    load_ca_material(client, namespace, own_secret, user_secret)
        .await?
        .authority()
}

/// Loads the CA: the user's Secret `user_secret` when given and present, else Weft's
/// own Secret `own_secret`, created with a new root if it does not exist yet.
pub async fn load_ca_material(
    client: kube::Client,
    namespace: &str,
    own_secret: &str,
    user_secret: Option<&str>,
) -> Result<CaMaterial, WeftError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(name) = user_secret {
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                tracing::info!(secret = %name, %namespace, "using the CA from the user's Secret");
                return from_tls_secret(name, &secret);
            }
            Ok(None) => {
                tracing::warn!(secret = %name, %namespace, "the CA Secret named by --ca-secret does not exist; using Weft's own root");
            }
            Err(e) => {
                return Err(WeftError::kube(
                    format!("reading Secret {namespace}/{name}"),
                    e,
                ));
            }
        }
    }
    let own = |secret: &Secret| -> Result<CaMaterial, WeftError> {
        let cert = text(secret, CERT_KEY).ok_or_else(|| missing(own_secret, CERT_KEY))?;
        let key = text(secret, KEY_KEY).ok_or_else(|| missing(own_secret, KEY_KEY))?;
        CaMaterial::checked(cert, key, String::new())
    };
    let what = format!("Secret {namespace}/{own_secret}");
    if let Some(secret) = api
        .get_opt(own_secret)
        .await
        .map_err(|e| WeftError::kube(&what, e))?
    {
        return own(&secret);
    }
    let (cert, key) = CertificateAuthority::generate_root()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(own_secret.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "weft".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_string(), ByteString(cert.clone().into_bytes())),
            (KEY_KEY.to_string(), ByteString(key.clone().into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %what, "created a new root CA");
            CaMaterial::checked(cert, key, String::new())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica created it first: everyone signs with the winner's root.
            let secret = api
                .get(own_secret)
                .await
                .map_err(|e| WeftError::kube(&what, e))?;
            tracing::info!(secret = %what, "another replica created the root CA first; using it");
            own(&secret)
        }
        Err(e) => Err(WeftError::kube(format!("creating {what}"), e)),
    }
}
