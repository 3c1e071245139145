//! The custom kinds' other served versions, and converting between them as the API
//! server does: objects are stored in the stored version (the [`KINDS`] entry); a request
//! in another version has its body converted to the stored version and its answer
//! (object, list items, watch events) to the requested one. Where the CRD's strategy is
//! `None` the API server only rewrites `apiVersion`, and so does the double; where it is
//! `Webhook` the double sends the API server's ConversionReviews to the conversion
//! webhook, over HTTPS with the CA it was given
//! ([`super::ApiServerDouble::use_conversion_webhook`]), and checks the answer as the API
//! server does (the uid, `Success`, one object per object in the desired version, only
//! labels and annotations changed in metadata). Without a webhook such requests fail with
//! 500, as with an unreachable webhook.
//!
//! [`ConversionWebhook`] runs the real `weft-webhook` for that.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, LazyLock, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use super::Shared;
use super::store::{ApiError, KINDS, Kind, new_uid};
use crate::command::{render, workspace_binary};
use crate::error::{HarnessError, Result, io};

/// The custom kinds' served versions besides the stored one, one a line: apiVersion,
/// plural, and the CRD's conversion strategy (as in `helm/weft/crds/`).
const OTHER_VERSIONS: &str = "
    split.smi-spec.io/v1alpha3 trafficsplits Webhook
    split.smi-spec.io/v1alpha2 trafficsplits Webhook
    split.smi-spec.io/v1alpha1 trafficsplits Webhook
    access.smi-spec.io/v1alpha2 traffictargets None
    specs.smi-spec.io/v1alpha3 httproutegroups Webhook
    specs.smi-spec.io/v1alpha2 httproutegroups Webhook
    specs.smi-spec.io/v1alpha1 httproutegroups Webhook
    specs.smi-spec.io/v1alpha3 tcproutes Webhook
    specs.smi-spec.io/v1alpha2 tcproutes Webhook
    specs.smi-spec.io/v1alpha1 tcproutes Webhook
";

/// A served version of a kind other than its stored one.
#[derive(Debug)]
pub(crate) struct View {
    pub api_version: &'static str,
    pub group: &'static str,
    pub version: &'static str,
    /// The stored version's entry in [`KINDS`].
    pub kind: usize,
    /// The CRD converts through the webhook (else by rewriting apiVersion).
    pub webhook: bool,
}

/// Every other served version; an index into it names one.
pub(crate) static VIEWS: LazyLock<Vec<View>> = LazyLock::new(|| {
    let view = |line: &'static str| {
        let [api_version, plural, strategy] = line.split_whitespace().collect::<Vec<_>>()[..]
        else {
            return None;
        };
        let (group, version) = api_version.split_once('/')?;
        let kind = KINDS
            .iter()
            .position(|k| k.group == group && k.plural == plural)?;
        Some(View {
            api_version,
            group,
            version,
            kind,
            webhook: strategy == "Webhook",
        })
    };
    OTHER_VERSIONS.lines().filter_map(view).collect()
});

/// The view serving `plural` in `group/version`, if any.
pub(crate) fn find_view(group: &str, version: &str, plural: &str) -> Option<usize> {
    VIEWS
        .iter()
        .position(|v| (v.group, v.version, KINDS[v.kind].plural) == (group, version, plural))
}

/// The view of `kind` in `api_version`, if that is another served version.
pub(crate) fn find_view_of(api_version: &str, kind: &str) -> Option<usize> {
    VIEWS
        .iter()
        .position(|v| v.api_version == api_version && KINDS[v.kind].kind == kind)
}

/// Every served version of a custom kind with more than one: `(apiVersion, kind, stored,
/// conversion strategy)`, for comparing the double with the CRDs.
pub fn custom_resource_versions() -> Vec<(String, String, bool, String)> {
    let mut out = Vec::new();
    for (k, kind) in KINDS.iter().enumerate() {
        let views: Vec<&View> = VIEWS.iter().filter(|v| v.kind == k).collect();
        let Some(first) = views.first() else {
            continue;
        };
        let strategy = if first.webhook { "Webhook" } else { "None" };
        out.push((
            kind.api_version.into(),
            kind.kind.into(),
            true,
            strategy.into(),
        ));
        for v in views {
            out.push((
                v.api_version.into(),
                kind.kind.into(),
                false,
                strategy.into(),
            ));
        }
    }
    out
}

/// The conversion webhook the double calls: a `kube` client for its HTTPS endpoint.
pub(crate) struct Webhook {
    client: kube::Client,
    path: String,
    url: String,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook").field("url", &self.url).finish()
    }
}

/// The DER certificates of a PEM text.
fn pem_certificates(pem: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match line {
            "-----BEGIN CERTIFICATE-----" => current = Some(String::new()),
            "-----END CERTIFICATE-----" => {
                if let Some(der) = current.take().and_then(|b64| STANDARD.decode(b64).ok()) {
                    out.push(der);
                }
            }
            _ => {
                if let Some(b64) = current.as_mut() {
                    b64.push_str(line);
                }
            }
        }
    }
    out
}

impl Webhook {
    /// A client for `url` (`https://host:port/path`) trusting `ca_pem`. Needs a Tokio
    /// runtime context (the client spawns its worker).
    pub(crate) fn new(url: &str, ca_pem: &str) -> std::result::Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let path = uri.path().to_string();
        let base: hyper::Uri = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        )
        .parse()
        .map_err(|e| format!("{url}: {e}"))?;
        let roots = pem_certificates(ca_pem);
        if roots.is_empty() {
            return Err("the CA bundle holds no PEM certificate".to_string());
        }
        let mut config = kube::Config::new(base);
        config.root_cert = Some(roots);
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(30));
        let client = kube::Client::try_from(config).map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            path,
            url: url.to_string(),
        })
    }

    /// Sends one ConversionReview; returns the response's converted objects after the
    /// API server's checks.
    async fn review(
        &self,
        desired: &str,
        objects: &[Value],
    ) -> std::result::Result<Vec<Value>, String> {
        let uid = new_uid();
        let review = json!({
            "kind": "ConversionReview", "apiVersion": "apiextensions.k8s.io/v1",
            "request": {"uid": uid, "desiredAPIVersion": desired, "objects": objects},
            "response": {"uid": "", "convertedObjects": null, "result": {"metadata": {}}},
        });
        let body = serde_json::to_vec(&review).map_err(|e| e.to_string())?;
        let request = hyper::Request::builder()
            .method("POST")
            .uri(self.path.as_str())
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(kube::client::Body::from(body))
            .map_err(|e| e.to_string())?;
        let call = async {
            let response = self.client.send(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .map_err(|_| "timed out after 30s".to_string())??;
        if !status.is_success() {
            return Err(format!(
                "the server has rejected the request: {status}: {}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        let reply: Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the response is not a ConversionReview: {e}"))?;
        let response = &reply["response"];
        if response["uid"] != json!(uid) {
            return Err(format!(
                "expected response uid {uid:?}, got {}",
                response["uid"]
            ));
        }
        if response["result"]["status"] != "Success" {
            let message = response["result"]["message"].as_str().unwrap_or("");
            return Err(format!("conversion webhook returned failure: {message}"));
        }
        let converted = response["convertedObjects"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if converted.len() != objects.len() {
            return Err(format!(
                "returned {} objects, expected {}",
                converted.len(),
                objects.len()
            ));
        }
        objects
            .iter()
            .zip(converted)
            .map(|(original, converted)| restore_meta(original, converted, desired))
            .collect()
    }
}

/// As the API server: the converted object must be in the desired version and of the
/// same kind; of its metadata only labels and annotations are taken (maps of strings),
/// everything else stays the original's.
fn restore_meta(
    original: &Value,
    mut converted: Value,
    desired: &str,
) -> std::result::Result<Value, String> {
    if converted["apiVersion"] != desired {
        return Err(format!(
            "invalid apiVersion {} in a converted object, expected {desired}",
            converted["apiVersion"]
        ));
    }
    if converted["kind"] != original["kind"] {
        return Err(format!(
            "invalid kind {} in a converted object, expected {}",
            converted["kind"], original["kind"]
        ));
    }
    let strings = |v: Option<&Value>| {
        v.is_none_or(|v| {
            v.as_object()
                .is_some_and(|m| m.values().all(Value::is_string))
        })
    };
    let mut metadata = original
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    for field in ["labels", "annotations"] {
        let value = converted["metadata"].get(field).cloned();
        if !strings(value.as_ref()) {
            return Err(format!("invalid metadata.{field} in a converted object"));
        }
        if let Some(map) = metadata.as_object_mut() {
            match value {
                Some(v) => map.insert(field.to_string(), v),
                None => map.remove(field),
            };
        }
    }
    converted["metadata"] = metadata;
    Ok(converted)
}

impl Shared {
    fn webhook(&self) -> Option<Arc<Webhook>> {
        (self.webhook.lock().unwrap_or_else(PoisonError::into_inner)).clone()
    }

    /// Converts `objects` of `kind` to `desired` as the API server would: those already
    /// in it stay; the others are rewritten (strategy `None`) or sent to the webhook in
    /// one review. A failure is the API server's 500.
    pub(crate) async fn convert(
        &self,
        kind: &Kind,
        webhook: bool,
        objects: Vec<Value>,
        desired: &str,
    ) -> std::result::Result<Vec<Value>, ApiError> {
        let pending: Vec<usize> = (objects.iter().enumerate())
            .filter(|(_, o)| o["apiVersion"] != desired)
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            return Ok(objects);
        }
        let mut objects = objects;
        if !webhook {
            for i in pending {
                objects[i]["apiVersion"] = json!(desired);
            }
            return Ok(objects);
        }
        let failed = |why: String| {
            ApiError::new(
                500,
                "InternalError",
                format!(
                    "conversion webhook for {}, Kind={} failed: {why}",
                    kind.api_version, kind.kind
                ),
            )
        };
        let Some(hook) = self.webhook() else {
            return Err(failed(
                "no conversion webhook is configured (ApiServerDouble::use_conversion_webhook)"
                    .to_string(),
            ));
        };
        let batch: Vec<Value> = pending.iter().map(|i| objects[*i].clone()).collect();
        let converted = hook.review(desired, &batch).await.map_err(failed)?;
        for (i, object) in pending.into_iter().zip(converted) {
            objects[i] = object;
        }
        Ok(objects)
    }

    /// Converts one object.
    pub(crate) async fn convert_one(
        &self,
        kind: &Kind,
        webhook: bool,
        object: Value,
        desired: &str,
    ) -> std::result::Result<Value, ApiError> {
        let mut converted = self.convert(kind, webhook, vec![object], desired).await?;
        converted
            .pop()
            .ok_or_else(|| ApiError::new(500, "InternalError", "conversion returned no object"))
    }

    /// Converts an answer of the stored version (an object of `kind`, or a list of them)
    /// to the view's version; anything else (a `Status`) as it is.
    pub(crate) async fn convert_answer(
        &self,
        view: &View,
        answer: Value,
    ) -> std::result::Result<Value, ApiError> {
        let kind = &KINDS[view.kind];
        if answer["kind"] == kind.kind {
            return self
                .convert_one(kind, view.webhook, answer, view.api_version)
                .await;
        }
        if answer["kind"] != format!("{}List", kind.kind) {
            return Ok(answer);
        }
        let mut answer = answer;
        let items = match answer.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        let items = self
            .convert(kind, view.webhook, items, view.api_version)
            .await?;
        answer["items"] = Value::Array(items);
        answer["apiVersion"] = json!(view.api_version);
        Ok(answer)
    }
}

/// A `weft-webhook` process serving `/convert` (and admission) over HTTPS on 127.0.0.1,
/// with a serving certificate from a fresh CA; stopped when dropped.
#[derive(Debug)]
pub struct ConversionWebhook {
    child: Child,
    url: String,
    ca_pem: String,
}

impl Drop for ConversionWebhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ConversionWebhook {
    /// Writes a CA and a serving certificate for 127.0.0.1 into `dir`, starts the
    /// workspace's `weft-webhook` on a free port (its log in `dir/weft-webhook.log`) and
    /// waits until it accepts connections.
    pub fn start(dir: &Path) -> Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let tls = |e: rcgen::Error| HarnessError::Command {
            command: "generating the webhook's certificates".to_string(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca_key = KeyPair::generate().map_err(tls)?;
        let mut ca_params = CertificateParams::new(Vec::new()).map_err(tls)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).map_err(tls)?;
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().map_err(tls)?;
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .map_err(tls)?
            .signed_by(&key, &issuer)
            .map_err(tls)?;
        let (cert_file, key_file) = (dir.join("webhook.crt"), dir.join("webhook.key"));
        std::fs::write(&cert_file, leaf.pem()).map_err(io(&cert_file))?;
        std::fs::write(&key_file, key.serialize_pem()).map_err(io(&key_file))?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .map_err(io(dir))?
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let log = dir.join("weft-webhook.log");
        let file = std::fs::File::create(&log).map_err(io(&log))?;
        let err = file.try_clone().map_err(io(&log))?;
        let mut command = Command::new(workspace_binary("weft-webhook")?);
        command
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--cert")
            .arg(&cert_file)
            .arg("--key")
            .arg(&key_file)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err);
        let line = render(&command);
        let child = command.spawn().map_err(|e| HarnessError::Command {
            command: line.clone(),
            reason: e.to_string(),
        })?;
        let mut webhook = Self {
            child,
            url: format!("https://{addr}/convert"),
            ca_pem: ca.pem(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = webhook.child.try_wait() {
                let logged = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(HarnessError::Command {
                    command: line,
                    reason: format!("exited with {status}: {logged}"),
                });
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout(
                    Duration::from_secs(10),
                    format!("weft-webhook on {addr}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(webhook)
    }

    /// `https://127.0.0.1:PORT/convert`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA that signed its serving certificate (PEM), the CRDs' `caBundle`.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
}
