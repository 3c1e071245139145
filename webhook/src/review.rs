//! AdmissionReview v1 in, AdmissionReview v1 out. Never panics on input: a malformed
//! body (or one beyond Weft's input bounds) is a 400 with the reason; a pod Weft cannot
//! read is admitted with a warning (unless fail-closed) so the mesh never blocks pod
//! creation by accident.

use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};

use crate::inject::{InjectConfig, inject};

/// Largest AdmissionReview body read: it carries the object and, for an update, the old
/// one too, each bounded by the API server's 3 MiB request limit (1.5 MiB in etcd).
pub const MAX_REVIEW_BYTES: usize = 8 << 20;

/// An HTTP status and a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewReply {
    /// 200, or 400 for a body that is not an AdmissionReview with a request.
    pub status: u16,
    /// The AdmissionReview (with a response) as JSON.
    pub body: Vec<u8>,
}

fn reply(status: u16, response: AdmissionResponse) -> ReviewReply {
    let body = serde_json::to_vec(&response.into_review())
        .unwrap_or_else(|e| format!(r#"{{"error":"encoding the response: {e}"}}"#).into_bytes());
    ReviewReply { status, body }
}

fn add_warning(mut response: AdmissionResponse, warning: String) -> AdmissionResponse {
    response.warnings.get_or_insert_with(Vec::new).push(warning);
    response
}

/// Handles one AdmissionReview request body.
pub fn handle_review(body: &[u8], config: &InjectConfig) -> ReviewReply {
    // Bounded before any decoder runs (see `weft_crds::bounds`).
    if let Err(e) = weft_crds::bounds::check_json(body, MAX_REVIEW_BYTES) {
        return reply(
            400,
            AdmissionResponse::invalid(format!("body is not an AdmissionReview Weft reads: {e}")),
        );
    }
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return reply(
                400,
                AdmissionResponse::invalid(format!("body is not an AdmissionReview: {e}")),
            );
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            return reply(
                400,
                AdmissionResponse::invalid(format!("AdmissionReview without a request: {e}")),
            );
        }
    };
    let response = AdmissionResponse::from(&request);
    if request.operation != Operation::Create || request.kind.kind != "Pod" {
        return reply(200, response);
    }
    let undecodable = |response: AdmissionResponse, why: String| {
        let message = format!("weft: cannot inject a sidecar: {why}");
        tracing::warn!(uid = %request.uid, "{message}");
        if config.fail_closed {
            reply(200, response.deny(message))
        } else {
            reply(200, add_warning(response, message))
        }
    };
    let pod = request
        .object
        .as_ref()
        .ok_or_else(|| "the review carries no object".to_string())
        .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string()))
        .and_then(|v| {
            serde_json::from_value::<Pod>(v)
                .map_err(|e| format!("the object is not a valid Pod: {e}"))
        });
    let pod = match pod {
        Ok(pod) => pod,
        Err(why) => return undecodable(response, why),
    };
    // The API server's namespaceSelector already chose the namespaces that opted in.
    match inject(&pod, None, config) {
        Ok(Ok(patch)) => match response.clone().with_patch(patch) {
            Ok(patched) => reply(200, patched),
            Err(e) => undecodable(response, format!("encoding the patch: {e}")),
        },
        Ok(Err(skip)) => {
            tracing::debug!(uid = %request.uid, ?skip, "not injecting");
            match skip.warning() {
                Some(w) => reply(200, add_warning(response, w)),
                None => reply(200, response),
            }
        }
        Err(e) => undecodable(response, e.to_string()),
    }
}
