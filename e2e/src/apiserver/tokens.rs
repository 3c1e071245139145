//! Service-account tokens the test issues, and the TokenReview that checks them.
//!
//! Tokens are shaped like the API server's (a JWT with the same claims) so a client
//! can read `exp` without verifying; the signature is random and nothing verifies
//! it: a review looks the token up, so only issued tokens are authenticated.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::API_AUDIENCE;
use super::store::{ApiError, random_bytes};

/// What a token stands for.
#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    pub namespace: String,
    pub service_account: String,
    pub service_account_uid: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub audience: String,
    /// Checked at review time, not read from the token.
    pub expires: Instant,
}

impl IssuedToken {
    fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// The token: `header.payload.signature`, base64url without padding.
    pub fn encode(&self, ttl: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (iat, exp) = (now.as_secs(), (now + ttl).as_secs());
        let header = json!({"alg": "RS256", "kid": "weft-double"});
        let payload = json!({
            "iss": API_AUDIENCE,
            "sub": self.username(),
            "aud": [self.audience],
            "exp": exp, "iat": iat, "nbf": iat,
            "kubernetes.io": {
                "namespace": self.namespace,
                "pod": {"name": self.pod_name, "uid": self.pod_uid},
                "serviceaccount": {"name": self.service_account, "uid": self.service_account_uid},
            },
        });
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let signature = URL_SAFE_NO_PAD.encode(random_bytes(64));
        format!("{}.{}.{signature}", part(&header), part(&payload))
    }
}

/// Answers a TokenReview body: authenticated with the service account and pod, or
/// not, with the reason, as the API server does.
pub(crate) fn review(
    tokens: &HashMap<String, IssuedToken>,
    body: &[u8],
) -> Result<Value, ApiError> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let spec = review.get("spec").cloned().unwrap_or_else(|| json!({}));
    let token = (spec.get("token").and_then(Value::as_str))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::invalid("spec.token: Required value"))?;
    let requested = spec.get("audiences").and_then(Value::as_array);
    let mut wanted: Vec<&str> = requested
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if wanted.is_empty() {
        // No audiences: the API server's own.
        wanted.push(API_AUDIENCE);
    }
    let failed = |why: String| {
        let error = format!("[invalid bearer token, {why}]");
        json!({"authenticated": false, "user": {}, "error": error})
    };
    let status = match tokens.get(token) {
        None => failed("token not issued by the API-server double".into()),
        Some(t) if Instant::now() >= t.expires => {
            failed("service account token has expired".into())
        }
        Some(t) if !wanted.contains(&t.audience.as_str()) => failed(format!(
            "token audiences [{:?}] is invalid for the target audiences {wanted:?}",
            t.audience
        )),
        Some(t) => json!({
            "authenticated": true,
            "user": {
                "username": t.username(),
                "uid": t.service_account_uid,
                "groups": ["system:serviceaccounts",
                           format!("system:serviceaccounts:{}", t.namespace),
                           "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/pod-name": [t.pod_name],
                    "authentication.kubernetes.io/pod-uid": [t.pod_uid],
                },
            },
            "audiences": [t.audience],
        }),
    };
    Ok(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "metadata": {"creationTimestamp": null}, "spec": spec, "status": status,
    }))
}
