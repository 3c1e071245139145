//! The CRD conversion webhook: `apiextensions.k8s.io/v1` ConversionReview in, the same
//! review with a response out, every object converted by
//! [`weft_crds::conversion::convert`]. Never panics on input: a body beyond Weft's input
//! bounds or that is not a ConversionReview with a request is a 400 whose review
//! carries a `Failure` result with the reason; an object that cannot be converted fails
//! the whole review (`Failure`, no objects), as the API server expects.

use kube::core::Status;
use kube::core::conversion::{ConversionRequest, ConversionResponse, ConversionReview};
use serde_json::Value;

use crate::review::ReviewReply;

/// Largest ConversionReview body read. The API server sends every object of a list
/// response that needs converting in one review, so this is larger than an
/// AdmissionReview's bound: room for tens of thousands of SMI objects (a few KiB each).
pub const MAX_CONVERSION_REVIEW_BYTES: usize = 32 << 20;

fn reply(status: u16, response: ConversionResponse) -> ReviewReply {
    let body = serde_json::to_vec(&response.into_review())
        .unwrap_or_else(|e| format!(r#"{{"error":"encoding the response: {e}"}}"#).into_bytes());
    ReviewReply { status, body }
}

fn malformed(message: String) -> ReviewReply {
    tracing::warn!("{message}");
    reply(
        400,
        ConversionResponse::invalid(Status::failure(&message, "BadRequest").with_code(400)),
    )
}

/// `kind namespace/name` of an object, for messages.
fn describe(object: &Value) -> String {
    let field = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
    let meta = object.get("metadata").unwrap_or(&Value::Null);
    let (namespace, name) = (field(meta, "namespace"), field(meta, "name"));
    let kind = field(object, "kind");
    match (namespace.is_empty(), name.is_empty()) {
        (_, true) => kind,
        (true, false) => format!("{kind} {name}"),
        (false, false) => format!("{kind} {namespace}/{name}"),
    }
}

/// Handles one ConversionReview request body.
pub fn handle_conversion(body: &[u8]) -> ReviewReply {
    // Bounded before any decoder runs (see `weft_crds::bounds`).
    if let Err(e) = weft_crds::bounds::check_json(body, MAX_CONVERSION_REVIEW_BYTES) {
        return malformed(format!("body is not a ConversionReview Weft reads: {e}"));
    }
    let review: ConversionReview = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return malformed(format!("body is not a ConversionReview: {e}")),
    };
    if (
        review.types.api_version.as_str(),
        review.types.kind.as_str(),
    ) != ("apiextensions.k8s.io/v1", "ConversionReview")
    {
        return malformed(format!(
            "{} {} is not an apiextensions.k8s.io/v1 ConversionReview",
            review.types.api_version, review.types.kind
        ));
    }
    let mut request = match ConversionRequest::try_from(review) {
        Ok(r) => r,
        Err(e) => return malformed(format!("ConversionReview without a request: {e}")),
    };
    let objects = std::mem::take(&mut request.objects);
    let desired = request.desired_api_version.clone();
    let uid = request.uid.clone();
    let response = ConversionResponse::for_request(request);
    let mut converted = Vec::with_capacity(objects.len());
    for (i, object) in objects.into_iter().enumerate() {
        let what = describe(&object);
        match weft_crds::conversion::convert(object, &desired) {
            Ok(object) => converted.push(object),
            Err(e) => {
                let message = format!("object {i} ({what}) to {desired}: {e}");
                tracing::warn!(%uid, "conversion failed: {message}");
                return reply(
                    200,
                    response.failure(Status::failure(&message, "Invalid").with_code(422)),
                );
            }
        }
    }
    tracing::debug!(%uid, %desired, objects = converted.len(), "converted");
    reply(200, response.success(converted))
}
