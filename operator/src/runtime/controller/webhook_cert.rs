//! The sidecar injector's serving certificate, issued from Weft's CA by the leader.
//!
//! The leader keeps a `kubernetes.io/tls` Secret (`tls.crt`: leaf and any
//! intermediates, `tls.key`, `ca.crt`: the trust bundle) that the webhook mounts and
//! re-reads when it changes, and puts the trust bundle into `clientConfig.caBundle` of
//! every webhook of the MutatingWebhookConfiguration, so the API server trusts it.
//!
//! On gaining the lead, then every resync period and at the certificate's half-life, it
//! reads the Secret and issues a new certificate only if the stored one is missing,
//! unreadable, not from the current CA, missing one of the Service's DNS names, or past
//! half its lifetime; it patches the caBundle only where it differs. A restart with a
//! valid Secret writes nothing. A replacement made meanwhile by someone else (409) is
//! read and judged again; a MutatingWebhookConfiguration that does not exist yet
//! (installed after the controller) is looked for again until it does.
//!
//! With `--no-webhook-certificate` none of this runs (cert-manager does it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::{Api, Client};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde_json::{Value, json};

use crate::error::WeftError;
use crate::identity::{CertificateAuthority, renewal_time, spiffe_id};
use crate::runtime::controller::lease::Leadership;
use crate::runtime::controller::status::FIELD_MANAGER;
use crate::runtime::metrics::ControlPlaneMetrics;

/// Default Secret holding the webhook's serving certificate (the chart mounts it).
pub const DEFAULT_SECRET: &str = "weft-webhook-tls";
/// Default Service of the webhook, whose DNS names the certificate carries.
pub const DEFAULT_SERVICE: &str = "weft-webhook";
/// Default MutatingWebhookConfiguration that gets the caBundle.
pub const DEFAULT_CONFIGURATION: &str = "weft-sidecar-injector";
/// Default cluster DNS domain.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Default lifetime of the certificate (90 days); it is renewed at half of it.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default period of the leader's re-reads of the Secret and the configuration.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(60);

/// Keys of the Secret.
const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const BUNDLE_KEY: &str = "ca.crt";
/// After a failed request, or while the configuration does not exist.
const RETRY: Duration = Duration::from_secs(5);
/// Replacements of the Secret lost to someone else's write, in one pass, before giving up
/// until the next retry.
const CONFLICTS: usize = 3;

/// What the leader manages, from the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookCertSettings {
    /// The Secret in the controller's namespace.
    pub secret: String,
    /// The webhook's Service in the controller's namespace.
    pub service: String,
    /// The MutatingWebhookConfiguration (cluster-scoped).
    pub configuration: String,
    /// Cluster DNS domain.
    pub cluster_domain: String,
    /// Lifetime of an issued certificate.
    pub ttl: Duration,
    /// How often the Secret and the configuration are read again.
    pub resync: Duration,
}

impl WebhookCertSettings {
    /// The defaults, with these names.
    pub fn new(secret: &str, service: &str, configuration: &str) -> Self {
        Self {
            secret: secret.to_string(),
            service: service.to_string(),
            configuration: configuration.to_string(),
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
            ttl: DEFAULT_TTL,
            resync: DEFAULT_RESYNC,
        }
    }

    /// The DNS names the API server may call the webhook by.
    pub fn dns_names(&self, namespace: &str) -> Vec<String> {
        let service = format!("{}.{namespace}.svc", self.service);
        let full = format!("{service}.{}", self.cluster_domain);
        vec![service, full]
    }
}

/// The flags of `weft controller` for the webhook certificate.
#[derive(Debug, clap::Args)]
pub struct WebhookCertArgs {
    /// Secret in --namespace where the leader keeps the webhook's serving certificate,
    /// issued from Weft's CA (`tls.crt`, `tls.key`, `ca.crt`); the webhook mounts it.
    #[arg(long, default_value = DEFAULT_SECRET)]
    webhook_secret: String,
    /// The webhook's Service in --namespace: the certificate names SERVICE.NAMESPACE.svc
    /// and SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN.
    #[arg(long, default_value = DEFAULT_SERVICE)]
    webhook_service: String,
    /// MutatingWebhookConfiguration whose webhooks get Weft's trust bundle as caBundle.
    #[arg(long, default_value = DEFAULT_CONFIGURATION)]
    webhook_configuration: String,
    /// Lifetime of the webhook's certificate; it is renewed at half of it.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    webhook_cert_ttl: Duration,
    /// How often the leader reads the webhook Secret and configuration again (a deleted
    /// Secret or a changed caBundle is repaired within this).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    webhook_resync: Duration,
    /// Cluster DNS domain, for the webhook certificate's DNS names.
    #[arg(long, default_value = DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Leave the webhook's certificate and caBundle to someone else (cert-manager).
    #[arg(long)]
    no_webhook_certificate: bool,
}

impl WebhookCertArgs {
    /// The settings, or `None` with `--no-webhook-certificate`.
    pub fn settings(&self) -> Option<WebhookCertSettings> {
        (!self.no_webhook_certificate).then(|| WebhookCertSettings {
            secret: self.webhook_secret.clone(),
            service: self.webhook_service.clone(),
            configuration: self.webhook_configuration.clone(),
            cluster_domain: self.cluster_domain.clone(),
            ttl: self.webhook_cert_ttl,
            resync: self.webhook_resync,
        })
    }
}

/// Why a new certificate is issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reissue {
    /// No Secret, or no `tls.crt`/`tls.key` in it.
    Missing,
    /// The certificate or key cannot be read, or they do not belong together.
    Unusable(String),
    /// It does not chain to the current trust bundle.
    OtherCa(String),
    /// Expired or not yet valid.
    NotValidNow(String),
    /// It lacks this DNS name.
    WrongName(String),
    /// Past half its lifetime.
    Renewal,
}

impl std::fmt::Display for Reissue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing => write!(f, "no certificate stored"),
            Self::Unusable(why) => write!(f, "the stored certificate is unusable: {why}"),
            Self::OtherCa(why) => write!(
                f,
                "the stored certificate is not from the current CA: {why}"
            ),
            Self::NotValidNow(why) => write!(f, "the stored certificate is not valid now: {why}"),
            Self::WrongName(name) => write!(f, "the stored certificate does not name {name}"),
            Self::Renewal => write!(f, "the stored certificate is past half its lifetime"),
        }
    }
}

/// The verdict on a stored certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it; look again at `renew_at` (its half-life).
    Keep {
        /// When it is due for renewal.
        renew_at: SystemTime,
        /// Its end of validity.
        not_after: SystemTime,
    },
    /// Issue a new one.
    Reissue(Reissue),
}

/// Judges a stored certificate chain (`cert_pem`) and key against the trust bundle, the
/// DNS names it must carry, and the time.
pub fn assess(
    cert_pem: Option<&[u8]>,
    key_pem: Option<&[u8]>,
    trust_bundle_pem: &str,
    names: &[String],
    now: SystemTime,
) -> Verdict {
    let unusable = |why: String| Verdict::Reissue(Reissue::Unusable(why));
    let (Some(cert_pem), Some(key_pem)) = (cert_pem, key_pem) else {
        return Verdict::Reissue(Reissue::Missing);
    };
    let chain: Vec<CertificateDer<'static>> =
        match CertificateDer::pem_slice_iter(cert_pem).collect::<Result<_, _>>() {
            Ok(chain) => chain,
            Err(e) => return unusable(format!("{CERT_KEY}: {e}")),
        };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return unusable(format!("{CERT_KEY} holds no certificate"));
    };
    let key = match PrivateKeyDer::from_pem_slice(key_pem) {
        Ok(key) => key,
        Err(e) => return unusable(format!("{KEY_KEY}: {e}")),
    };
    let provider = rustls::crypto::ring::default_provider();
    if let Err(e) = rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider) {
        return unusable(format!("{KEY_KEY} does not go with {CERT_KEY}: {e}"));
    }
    let Some((not_before, not_after)) = validity(leaf) else {
        return unusable(format!("{CERT_KEY}: no readable validity period"));
    };
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(trust_bundle_pem.as_bytes()).flatten() {
        // A root the bundle cannot hold would fail every verification below.
        let _ = roots.add(root);
    }
    let verifier =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(provider))
            .build()
        {
            Ok(v) => v,
            Err(e) => return Verdict::Reissue(Reissue::OtherCa(format!("trust bundle: {e}"))),
        };
    let at = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    for name in names {
        let Ok(server) = ServerName::try_from(name.clone()) else {
            return Verdict::Reissue(Reissue::WrongName(name.clone()));
        };
        if let Err(e) = verifier.verify_server_cert(leaf, intermediates, &server, &[], at) {
            use rustls::CertificateError as C;
            let reason = match &e {
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ) => Reissue::WrongName(name.clone()),
                rustls::Error::InvalidCertificate(
                    C::Expired
                    | C::ExpiredContext { .. }
                    | C::NotValidYet
                    | C::NotValidYetContext { .. },
                ) => Reissue::NotValidNow(e.to_string()),
                // UnknownIssuer, BadSignature, or a chain the bundle cannot vouch for.
                _ => Reissue::OtherCa(e.to_string()),
            };
            return Verdict::Reissue(reason);
        }
    }
    let renew_at = renewal_time(not_before, not_after, 0.5);
    if now >= renew_at {
        return Verdict::Reissue(Reissue::Renewal);
    }
    Verdict::Keep {
        renew_at,
        not_after,
    }
}

/// One DER element: tag, contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// An X.509 UTCTime (tag 0x17) or GeneralizedTime (0x18), as DER writes them
/// (`YYMMDDHHMMSSZ` / `YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, value: &[u8]) -> Option<SystemTime> {
    let text = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i32 = text.get(..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    if rest.len() != 10 || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |i: usize| rest.get(i..i + 2)?.parse::<u8>().ok();
    let month = time::Month::try_from(field(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, field(2)?).ok()?;
    let at = date.with_hms(field(4)?, field(6)?, field(8)?).ok()?;
    Some(SystemTime::from(at.assume_utc()))
}

/// The validity period (notBefore, notAfter) of a DER certificate.
fn validity(cert: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (0x30, certificate, _) = der_element(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der_element(certificate)? else {
        return None;
    };
    // version [0] (optional), serialNumber, signature, issuer, validity.
    let (tag, _, mut rest) = der_element(tbs)?;
    if tag != 0xa0 {
        rest = tbs;
    }
    for _ in 0..3 {
        rest = der_element(rest)?.2;
    }
    let (0x30, period, _) = der_element(rest)? else {
        return None;
    };
    let (tag, start, rest) = der_element(period)?;
    let not_before = der_time(tag, start)?;
    let (tag, end, _) = der_element(rest)?;
    Some((not_before, der_time(tag, end)?))
}

/// JSON patch operations setting `caBundle` to `bundle_pem` on every webhook of `config`
/// that does not have it; each guarded by a test of the webhook's name at that index,
/// so a list reordered meanwhile fails the patch instead of being patched wrongly.
pub fn ca_bundle_patch(
    config: &MutatingWebhookConfiguration,
    bundle_pem: &str,
) -> Result<Vec<Value>, serde_json::Error> {
    let want = ByteString(bundle_pem.as_bytes().to_vec());
    let encoded = serde_json::to_value(&want)?;
    let mut ops = Vec::new();
    for (i, hook) in config.webhooks.iter().flatten().enumerate() {
        if hook.client_config.ca_bundle.as_ref() != Some(&want) {
            ops.push(
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": hook.name}),
            );
            ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
        }
    }
    Ok(ops)
}

/// The CRDs whose versions differ, so the API server converts them through
/// `weft-webhook` (`weft_crds::conversion::SERVED_KINDS` with `webhook`).
pub const CONVERSION_CRDS: &[&str] = &[
    "trafficsplits.split.smi-spec.io",
    "httproutegroups.specs.smi-spec.io",
    "tcproutes.specs.smi-spec.io",
];

/// JSON patch operations pointing a CRD's conversion webhook at the webhook Service in
/// `namespace` with `bundle_pem` as its caBundle; empty when it already does or when
/// the CRD converts no other way than by webhook (then nothing is Weft's to change).
/// Guarded by a test of the strategy, so a CRD re-applied meanwhile fails the patch.
pub fn conversion_patch(crd: &Value, namespace: &str, bundle_pem: &str) -> Vec<Value> {
    let conversion = &crd["spec"]["conversion"];
    if conversion["strategy"] != "Webhook" || !conversion["webhook"]["clientConfig"].is_object() {
        return Vec::new();
    }
    let client = &conversion["webhook"]["clientConfig"];
    let encoded =
        serde_json::to_value(ByteString(bundle_pem.as_bytes().to_vec())).unwrap_or(Value::Null);
    let mut ops = Vec::new();
    if client["service"].is_object() && client["service"]["namespace"] != namespace {
        ops.push(json!({"op": "add", "path": "/spec/conversion/webhook/clientConfig/service/namespace", "value": namespace}));
    }
    if client["caBundle"] != encoded {
        ops.push(json!({"op": "add", "path": "/spec/conversion/webhook/clientConfig/caBundle", "value": encoded}));
    }
    if !ops.is_empty() {
        ops.insert(
            0,
            json!({"op": "test", "path": "/spec/conversion/strategy", "value": "Webhook"}),
        );
    }
    ops
}

/// Sends a JSON patch (kube's typed `Patch::Json` needs a feature this crate does not
/// enable): only the fields the operations name change.
async fn json_patch(
    client: &Client,
    uri: &str,
    ops: &[Value],
    what: &str,
) -> Result<(), WeftError> {
    let body = serde_json::to_vec(ops).map_err(|e| WeftError::Identity(format!("{what}: {e}")))?;
    let request = hyper::Request::builder()
        .method(hyper::Method::PATCH)
        .uri(format!("{uri}?fieldManager={FIELD_MANAGER}"))
        .header(hyper::header::CONTENT_TYPE, "application/json-patch+json")
        .header(hyper::header::ACCEPT, "application/json")
        .body(body)
        .map_err(|e| WeftError::Identity(format!("{what}: {e}")))?;
    client
        .request::<Value>(request)
        .await
        .map(|_| ())
        .map_err(|e| WeftError::kube(what.to_string(), e))
}

fn time_text(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The leader's task keeping the Secret and the caBundle current.
pub struct WebhookCertificate {
    client: Client,
    ca: CertificateAuthority,
    namespace: String,
    spiffe_id: String,
    names: Vec<String>,
    settings: WebhookCertSettings,
    leadership: Leadership,
    metrics: Arc<ControlPlaneMetrics>,
    /// Whether the missing configuration was reported (once until it appears).
    reported_missing: bool,
}

impl std::fmt::Debug for WebhookCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCertificate")
            .field("namespace", &self.namespace)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What one look at the configuration found.
enum Bundle {
    /// Every webhook has the bundle (now).
    Current,
    /// The configuration does not exist (yet).
    Missing,
}

impl WebhookCertificate {
    /// The task for the controller in `namespace`, signing with `ca`; the certificate's
    /// SPIFFE ID names the Service as the account (`ns/NAMESPACE/sa/SERVICE`).
    pub fn new(
        client: Client,
        ca: CertificateAuthority,
        namespace: &str,
        trust_domain: &str,
        settings: WebhookCertSettings,
        leadership: Leadership,
        metrics: Arc<ControlPlaneMetrics>,
    ) -> Self {
        Self {
            client,
            ca,
            namespace: namespace.to_string(),
            spiffe_id: spiffe_id(trust_domain, namespace, &settings.service),
            names: settings.dns_names(namespace),
            settings,
            leadership,
            metrics,
            reported_missing: false,
        }
    }

    fn secret_what(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.settings.secret)
    }

    /// Reads the Secret and writes a new certificate if it needs one; when to look again.
    async fn ensure_secret(&self) -> Result<SystemTime, WeftError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        let what = self.secret_what();
        let bundle = self.ca.trust_bundle_pem();
        for _ in 0..CONFLICTS {
            let current = api
                .get_opt(&self.settings.secret)
                .await
                .map_err(|e| WeftError::kube(format!("reading {what}"), e))?;
            let data = current.as_ref().and_then(|s| s.data.as_ref());
            let field = |key: &str| data.and_then(|d| d.get(key)).map(|b| b.0.as_slice());
            let now = SystemTime::now();
            let reason = match assess(field(CERT_KEY), field(KEY_KEY), bundle, &self.names, now) {
                Verdict::Keep {
                    renew_at,
                    not_after,
                } => {
                    tracing::debug!(secret = %what, not_after = %time_text(not_after), renew_at = %time_text(renew_at), "webhook serving certificate is current");
                    return Ok(renew_at);
                }
                Verdict::Reissue(reason) => reason,
            };
            if !self.leadership.is_leader() {
                return Ok(now + self.settings.resync);
            }
            let svid =
                self.ca
                    .issue_server(&self.spiffe_id, &self.names, self.settings.ttl, now)?;
            let mut data = BTreeMap::from([
                (
                    CERT_KEY.to_string(),
                    ByteString(svid.cert_chain_pem.into_bytes()),
                ),
                (KEY_KEY.to_string(), ByteString(svid.key_pem.into_bytes())),
                (
                    BUNDLE_KEY.to_string(),
                    ByteString(bundle.as_bytes().to_vec()),
                ),
            ]);
            let written = match current {
                None => {
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.settings.secret.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/managed-by".to_string(),
                                "weft".to_string(),
                            )])),
                            ..ObjectMeta::default()
                        },
                        type_: Some("kubernetes.io/tls".to_string()),
                        data: Some(data),
                        ..Secret::default()
                    };
                    api.create(&post_params(), &secret).await.map(|_| "created")
                }
                Some(mut secret) => {
                    // Other keys and the type (immutable) stay; resourceVersion guards
                    // against a write made since the read.
                    let mut kept = secret.data.take().unwrap_or_default();
                    kept.append(&mut data);
                    secret.data = Some(kept);
                    secret.metadata.managed_fields = None;
                    api.replace(&self.settings.secret, &post_params(), &secret)
                        .await
                        .map(|_| "replaced")
                }
            };
            match written {
                Ok(how) => {
                    let renew_at = renewal_time(svid.not_before, svid.not_after, 0.5);
                    tracing::info!(
                        secret = %what,
                        %reason,
                        serial = %svid.serial,
                        dns_names = ?self.names,
                        not_after = %time_text(svid.not_after),
                        renew_at = %time_text(renew_at),
                        "webhook serving certificate issued from Weft's CA; Secret {how}"
                    );
                    return Ok(renew_at);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    tracing::info!(secret = %what, "the webhook Secret was written by someone else meanwhile; reading it again");
                }
                Err(e) => return Err(WeftError::kube(format!("writing {what}"), e)),
            }
        }
        Err(WeftError::Identity(format!(
            "{what} kept changing under the writes ({CONFLICTS} conflicts)"
        )))
    }

    /// Puts the trust bundle into every webhook's caBundle where it differs.
    async fn ensure_ca_bundle(&mut self) -> Result<Bundle, WeftError> {
        let name = &self.settings.configuration;
        let what = format!("MutatingWebhookConfiguration {name}");
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let Some(config) = api
            .get_opt(name)
            .await
            .map_err(|e| WeftError::kube(format!("reading {what}"), e))?
        else {
            if !std::mem::replace(&mut self.reported_missing, true) {
                tracing::warn!(configuration = %name, "the MutatingWebhookConfiguration does not exist (yet); looking again every {}s to set its caBundle", RETRY.as_secs());
            }
            return Ok(Bundle::Missing);
        };
        if std::mem::take(&mut self.reported_missing) {
            tracing::info!(configuration = %name, "the MutatingWebhookConfiguration exists now");
        }
        let ops = ca_bundle_patch(&config, self.ca.trust_bundle_pem())
            .map_err(|e| WeftError::Identity(format!("caBundle patch: {e}")))?;
        if ops.is_empty() {
            tracing::debug!(configuration = %name, "caBundle is current");
            return Ok(Bundle::Current);
        }
        if !self.leadership.is_leader() {
            return Ok(Bundle::Current);
        }
        json_patch(
            &self.client,
            &format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"),
            &ops,
            &format!("patching the caBundle of {what}"),
        )
        .await?;
        tracing::info!(configuration = %name, webhooks = ops.len() / 2, "caBundle set to Weft's trust bundle");
        Ok(Bundle::Current)
    }

    /// Points the SMI CRDs' conversion webhooks at this namespace's webhook Service,
    /// trusting Weft's bundle; whether one is still missing.
    async fn ensure_conversion(&self) -> Result<Bundle, WeftError> {
        let mut missing = false;
        for name in CONVERSION_CRDS {
            let uri = format!("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}");
            let request = hyper::Request::builder()
                .method(hyper::Method::GET)
                .uri(&uri)
                .header(hyper::header::ACCEPT, "application/json")
                .body(Vec::new())
                .map_err(|e| WeftError::Identity(format!("reading CRD {name}: {e}")))?;
            let crd = match self.client.request::<Value>(request).await {
                Ok(crd) => crd,
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    missing = true;
                    continue;
                }
                Err(e) => return Err(WeftError::kube(format!("reading CRD {name}"), e)),
            };
            let ops = conversion_patch(&crd, &self.namespace, self.ca.trust_bundle_pem());
            if ops.is_empty() || !self.leadership.is_leader() {
                continue;
            }
            json_patch(
                &self.client,
                &uri,
                &ops,
                &format!("patching the conversion webhook of CRD {name}"),
            )
            .await?;
            tracing::info!(crd = %name, namespace = %self.namespace, "conversion webhook pointed at weft-webhook with Weft's trust bundle");
        }
        Ok(if missing {
            Bundle::Missing
        } else {
            Bundle::Current
        })
    }

    /// One pass over the Secret and the configuration; how long until the next.
    async fn reconcile(&mut self) -> Duration {
        let mut wait = self.settings.resync;
        match self.ensure_secret().await {
            Ok(renew_at) => {
                let until = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                wait = wait.min(until);
            }
            Err(error) => {
                self.metrics.reconcile_errors.inc();
                tracing::warn!(%error, "webhook serving certificate: retrying in {}s", RETRY.as_secs());
                wait = wait.min(RETRY);
            }
        }
        match self.ensure_ca_bundle().await {
            Ok(Bundle::Current) => {}
            Ok(Bundle::Missing) => wait = wait.min(RETRY),
            Err(error) => {
                self.metrics.reconcile_errors.inc();
                tracing::warn!(%error, "webhook caBundle: retrying in {}s", RETRY.as_secs());
                wait = wait.min(RETRY);
            }
        }
        match self.ensure_conversion().await {
            Ok(Bundle::Current) => {}
            Ok(Bundle::Missing) => wait = wait.min(RETRY),
            Err(error) => {
                self.metrics.reconcile_errors.inc();
                tracing::warn!(%error, "conversion webhook caBundle: retrying in {}s", RETRY.as_secs());
                wait = wait.min(RETRY);
            }
        }
        wait
    }

    /// Runs forever: a pass on gaining the lead, then at each due time while leading.
    pub async fn run(mut self) -> Result<(), WeftError> {
        tracing::info!(
            secret = %self.secret_what(),
            configuration = %self.settings.configuration,
            dns_names = ?self.names,
            "webhook serving certificate: managed by the leader"
        );
        let mut leading = false;
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let leader = self.leadership.is_leader();
            if leader && (!leading || due.is_some_and(|t| t <= tokio::time::Instant::now())) {
                let wait = self.reconcile().await;
                due = Some(tokio::time::Instant::now() + wait);
            }
            if !leader {
                due = None;
            }
            leading = leader;
            let next = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.leadership.changed() => {}
                () = next => {}
            }
        }
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PostParams::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ca() -> CertificateAuthority {
        let (cert, key) = CertificateAuthority::generate_root().unwrap();
        CertificateAuthority::from_pem(&cert, &key, "", "").unwrap()
    }

    fn names() -> Vec<String> {
        WebhookCertSettings::new(DEFAULT_SECRET, DEFAULT_SERVICE, DEFAULT_CONFIGURATION)
            .dns_names("weft-system")
    }

    fn judge(
        ca: &CertificateAuthority,
        svid: &crate::identity::Svid,
        names: &[String],
        now: SystemTime,
    ) -> Verdict {
        assess(
            Some(svid.cert_chain_pem.as_bytes()),
            Some(svid.key_pem.as_bytes()),
            ca.trust_bundle_pem(),
            names,
            now,
        )
    }

    fn parse(args: &[&str]) -> Option<WebhookCertSettings> {
        use clap::{Args, FromArgMatches};
        let command = WebhookCertArgs::augment_args(clap::Command::new("controller"));
        let matches = command
            .try_get_matches_from(std::iter::once("controller").chain(args.iter().copied()))
            .unwrap();
        WebhookCertArgs::from_arg_matches(&matches)
            .unwrap()
            .settings()
    }

    #[test]
    fn the_flags_default_to_the_charts_names_and_turn_it_off() {
        let defaults = parse(&[]).unwrap();
        assert_eq!(
            defaults,
            WebhookCertSettings::new(DEFAULT_SECRET, DEFAULT_SERVICE, DEFAULT_CONFIGURATION)
        );
        let custom = parse(&[
            "--webhook-secret=s",
            "--webhook-service=svc",
            "--webhook-configuration=c",
            "--webhook-cert-ttl=2h",
            "--webhook-resync=5s",
            "--cluster-domain=corp.example",
        ])
        .unwrap();
        assert_eq!(
            custom.dns_names("ns"),
            ["svc.ns.svc", "svc.ns.svc.corp.example"]
        );
        assert_eq!(
            (custom.ttl, custom.resync),
            (Duration::from_secs(7200), Duration::from_secs(5))
        );
        // The flag the access list names for the rules it makes unnecessary.
        assert_eq!(
            parse(&[crate::runtime::controller::access::NO_WEBHOOK_CERTIFICATE]),
            None
        );
    }

    #[test]
    fn the_dns_names_are_the_services() {
        let mut settings =
            WebhookCertSettings::new(DEFAULT_SECRET, DEFAULT_SERVICE, DEFAULT_CONFIGURATION);
        assert_eq!(
            names(),
            [
                "weft-webhook.weft-system.svc",
                "weft-webhook.weft-system.svc.cluster.local"
            ]
        );
        settings.cluster_domain = "corp.example".to_string();
        assert_eq!(
            settings.dns_names("mesh")[1],
            "weft-webhook.mesh.svc.corp.example"
        );
    }

    #[test]
    fn a_current_certificate_is_kept_until_half_its_lifetime() {
        let ca = ca();
        let now = SystemTime::now();
        let svid = ca
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names(),
                90 * DAY,
                now,
            )
            .unwrap();
        let Verdict::Keep {
            renew_at,
            not_after,
        } = judge(&ca, &svid, &names(), now)
        else {
            panic!("a fresh certificate is kept");
        };
        assert_eq!(not_after, svid.not_after);
        assert_eq!(renew_at, renewal_time(svid.not_before, svid.not_after, 0.5));
        let half = svid.not_before + (svid.not_after.duration_since(svid.not_before).unwrap()) / 2;
        assert_eq!(renew_at, half);
        assert!(matches!(
            judge(&ca, &svid, &names(), now + 44 * DAY),
            Verdict::Keep { .. }
        ));
        assert_eq!(
            judge(&ca, &svid, &names(), half),
            Verdict::Reissue(Reissue::Renewal)
        );
        assert!(matches!(
            judge(&ca, &svid, &names(), now + 91 * DAY),
            Verdict::Reissue(Reissue::NotValidNow(_))
        ));
        assert!(matches!(
            judge(&ca, &svid, &names(), now - DAY),
            Verdict::Reissue(Reissue::NotValidNow(_))
        ));
    }

    #[test]
    fn missing_or_broken_secrets_are_reissued() {
        let ca = ca();
        let now = SystemTime::now();
        let svid = ca
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names(),
                DAY,
                now,
            )
            .unwrap();
        let bundle = ca.trust_bundle_pem();
        assert_eq!(
            assess(None, None, bundle, &names(), now),
            Verdict::Reissue(Reissue::Missing)
        );
        assert_eq!(
            assess(
                Some(svid.cert_chain_pem.as_bytes()),
                None,
                bundle,
                &names(),
                now
            ),
            Verdict::Reissue(Reissue::Missing)
        );
        for (cert, key) in [
            (&b"not PEM"[..], svid.key_pem.as_bytes()),
            (svid.cert_chain_pem.as_bytes(), &b"garbage"[..]),
            (
                &b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"[..],
                svid.key_pem.as_bytes(),
            ),
        ] {
            assert!(
                matches!(
                    assess(Some(cert), Some(key), bundle, &names(), now),
                    Verdict::Reissue(Reissue::Unusable(_))
                ),
                "{}",
                String::from_utf8_lossy(cert)
            );
        }
        // Another certificate's key.
        let other = ca
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names(),
                DAY,
                now,
            )
            .unwrap();
        let verdict = assess(
            Some(svid.cert_chain_pem.as_bytes()),
            Some(other.key_pem.as_bytes()),
            bundle,
            &names(),
            now,
        );
        assert!(
            matches!(&verdict, Verdict::Reissue(Reissue::Unusable(why)) if why.contains("does not go with")),
            "{verdict:?}"
        );
    }

    #[test]
    fn a_certificate_from_another_ca_or_for_other_names_is_reissued() {
        let (ours, theirs) = (ca(), ca());
        let now = SystemTime::now();
        let foreign = theirs
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names(),
                DAY,
                now,
            )
            .unwrap();
        assert!(matches!(
            judge(&ours, &foreign, &names(), now),
            Verdict::Reissue(Reissue::OtherCa(_))
        ));
        // One name only: the other is missing.
        let short = ours
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names()[..1],
                DAY,
                now,
            )
            .unwrap();
        assert_eq!(
            judge(&ours, &short, &names(), now),
            Verdict::Reissue(Reissue::WrongName(names()[1].clone()))
        );
        // Another namespace's Service.
        let moved =
            WebhookCertSettings::new(DEFAULT_SECRET, DEFAULT_SERVICE, DEFAULT_CONFIGURATION)
                .dns_names("mesh");
        assert!(matches!(
            judge(&ours, &short, &moved, now),
            Verdict::Reissue(Reissue::WrongName(_))
        ));
        // An intermediate CA: the leaf carries it, the bundle has the root only.
        let (root_cert, root_key) = CertificateAuthority::generate_root().unwrap();
        let intermediate = intermediate_of(&root_cert, &root_key);
        let signer =
            CertificateAuthority::from_pem(&intermediate.0, &intermediate.1, &root_cert, "")
                .unwrap();
        let leaf = signer
            .issue_server(
                "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                &names(),
                DAY,
                now,
            )
            .unwrap();
        assert!(matches!(
            judge(&signer, &leaf, &names(), now),
            Verdict::Keep { .. }
        ));
        assert!(matches!(
            judge(&ours, &leaf, &names(), now),
            Verdict::Reissue(Reissue::OtherCa(_))
        ));
    }

    /// An intermediate CA certificate and key signed by the root.
    fn intermediate_of(root_cert: &str, root_key: &str) -> (String, String) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let root =
            Issuer::from_ca_cert_pem(root_cert, KeyPair::from_pem(root_key).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.signed_by(&key, &root).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn validity_is_read_from_the_certificate() {
        let ca = ca();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        for ttl in [Duration::from_secs(20), DAY, 90 * DAY, 30 * 365 * DAY] {
            let svid = ca
                .issue_server(
                    "spiffe://cluster.local/ns/weft-system/sa/weft-webhook",
                    &names(),
                    ttl,
                    now,
                )
                .unwrap();
            let der = CertificateDer::from_pem_slice(svid.cert_chain_pem.as_bytes()).unwrap();
            assert_eq!(
                validity(&der),
                Some((svid.not_before, svid.not_after)),
                "{ttl:?}"
            );
        }
        assert_eq!(validity(b"\x30\x03\x02\x01"), None);
        assert_eq!(
            der_time(0x17, b"491231235959Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_524_607_999))
        );
        assert_eq!(
            der_time(0x17, b"700101000000Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
        assert_eq!(
            der_time(0x18, b"20500101000000Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_524_608_000))
        );
        assert_eq!(der_time(0x17, b"7001010000Z"), None);
        assert_eq!(der_time(0x17, b"701301000000Z"), None);
    }

    #[test]
    fn the_ca_bundle_patch_touches_only_webhooks_without_the_bundle() {
        let bundle = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n";
        let hook = |name: &str, ca: Option<&str>| MutatingWebhook {
            name: name.to_string(),
            client_config: WebhookClientConfig {
                ca_bundle: ca.map(|c| ByteString(c.as_bytes().to_vec())),
                ..WebhookClientConfig::default()
            },
            ..MutatingWebhook::default()
        };
        let config = MutatingWebhookConfiguration {
            webhooks: Some(vec![
                hook("inject.weft.dev", None),
                hook("current.weft.dev", Some(bundle)),
                hook("stale.weft.dev", Some("old")),
            ]),
            ..MutatingWebhookConfiguration::default()
        };
        let ops = ca_bundle_patch(&config, bundle).unwrap();
        let encoded = serde_json::to_value(ByteString(bundle.as_bytes().to_vec())).unwrap();
        assert_eq!(
            Value::Array(ops),
            json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "inject.weft.dev"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": encoded},
                {"op": "test", "path": "/webhooks/2/name", "value": "stale.weft.dev"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": encoded},
            ])
        );
        // base64 of the PEM, as the API requires.
        assert_eq!(
            encoded,
            json!(
                "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCnJvb3QKLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="
            )
        );
        let done = MutatingWebhookConfiguration {
            webhooks: Some(vec![hook("inject.weft.dev", Some(bundle))]),
            ..MutatingWebhookConfiguration::default()
        };
        assert!(ca_bundle_patch(&done, bundle).unwrap().is_empty());
        assert!(
            ca_bundle_patch(&MutatingWebhookConfiguration::default(), bundle)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn the_conversion_crds_are_those_weft_converts_by_webhook() {
        let by_webhook: Vec<String> = weft_crds::conversion::SERVED_KINDS
            .iter()
            .filter(|k| k.webhook)
            .map(|k| format!("{}.{}", k.plural, k.group))
            .collect();
        assert_eq!(by_webhook, CONVERSION_CRDS);
    }

    #[test]
    fn conversion_webhooks_are_pointed_at_this_namespace_with_the_bundle() {
        let crd = json!({"spec": {"conversion": {"strategy": "Webhook", "webhook": {
            "conversionReviewVersions": ["v1"],
            "clientConfig": {"service": {"name": "weft-webhook", "namespace": "weft-system", "path": "/convert", "port": 443}}}}}});
        let ops = conversion_patch(&crd, "mesh", "PEM");
        assert_eq!(ops[0]["op"], "test");
        assert_eq!(ops.len(), 3, "{ops:?}");
        let mut patched = crd.clone();
        patched["spec"]["conversion"]["webhook"]["clientConfig"]["service"]["namespace"] =
            json!("mesh");
        patched["spec"]["conversion"]["webhook"]["clientConfig"]["caBundle"] =
            serde_json::to_value(ByteString(b"PEM".to_vec())).unwrap();
        assert!(
            conversion_patch(&patched, "mesh", "PEM").is_empty(),
            "current: nothing to do"
        );
        assert_eq!(
            conversion_patch(&patched, "mesh", "NEW").len(),
            2,
            "a new bundle is set"
        );
        let none = json!({"spec": {"conversion": {"strategy": "None"}}});
        assert!(
            conversion_patch(&none, "mesh", "PEM").is_empty(),
            "no webhook, nothing of Weft's"
        );
    }
}
