//! One AdmissionReview (admission.k8s.io/v1): the object in, a JSON patch out.
//!
//! The object goes through the same [`inject::inject_object`] as a document of `mesh-init
//! inject`, so both give the same pod; the patch is the difference between the object as sent
//! and as injected (RFC 6902). A refusal (a bad annotation, an unusable flag for this pod) is an
//! answer with `allowed: false` and the same sentence `mesh-init inject` prints, which the API
//! server shows to whoever created the pod; the notes become the answer's `warnings`, which
//! `kubectl` prints.

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::inject::{self, Settings, STATUS};

/// The part of an AdmissionReview request this webhook reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Review {
    pub api_version: String,
    pub kind: String,
    pub request: Option<Request>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub operation: String,
    pub object: Option<Json>,
}

/// The answer: the request's uid and what to do with the object.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    /// The JSON patch, base64 (the API's `[]byte`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub code: u16,
    pub message: String,
}

/// A request that is not an AdmissionReview this webhook can answer (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not an AdmissionReview: {0}")]
    Json(serde_json::Error),
    #[error("{api_version} {kind}: expected admission.k8s.io/v1 AdmissionReview")]
    Version { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
}

/// Answers one AdmissionReview body with the AdmissionReview to send back.
pub fn answer(body: &[u8], settings: &Settings) -> Result<Json, BadReview> {
    let review: Review = serde_json::from_slice(body).map_err(BadReview::Json)?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(BadReview::Version { api_version: review.api_version, kind: review.kind });
    }
    let request = review.request.ok_or(BadReview::NoRequest)?;
    let response = respond(&request, settings);
    Ok(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The decision for one request.
pub fn respond(request: &Request, settings: &Settings) -> Response {
    let allow = |warnings: Vec<String>| Response {
        uid: request.uid.clone(),
        allowed: true,
        patch_type: None,
        patch: None,
        status: None,
        warnings,
    };
    // The configuration registers CREATE only; anything else passes untouched.
    let Some(object) = request.object.as_ref().filter(|_| request.operation == "CREATE") else {
        return allow(vec![]);
    };
    // inject_object names the kind and the workload after this.
    let at = format!("namespace {}", request.namespace);
    if already_injected(object) {
        return allow(vec![format!("{STATUS} is already set; left as is")]);
    }
    let mut yaml: serde_yaml::Value = serde_yaml::to_value(object).expect("JSON converts to YAML");
    let mut notes = vec![];
    if let Err(e) = inject::inject_object(&mut yaml, &at, settings, &mut notes) {
        return Response {
            uid: request.uid.clone(),
            allowed: false,
            patch_type: None,
            patch: None,
            status: Some(Status { code: 400, message: format!("mesh-init: {e}") }),
            warnings: vec![],
        };
    }
    let injected: Json = serde_json::to_value(&yaml).expect("YAML converts back to JSON");
    let patch = json_patch::diff(object, &injected);
    let mut response = allow(notes);
    if !patch.0.is_empty() {
        let bytes = serde_json::to_vec(&patch).expect("a patch serialises");
        response.patch_type = Some("JSONPatch".into());
        response.patch = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    response
}

/// True when the object's pod template already carries the status annotation: a pod created
/// from a workload that `mesh-init inject` injected keeps the injection its template has (as
/// Istio's webhook skips injected pods), rather than being re-injected with this webhook's flags.
fn already_injected(object: &Json) -> bool {
    ["/metadata", "/spec/template/metadata", "/spec/jobTemplate/spec/template/metadata"]
        .iter()
        .filter_map(|p| object.pointer(p))
        .filter_map(|m| m.get("annotations"))
        .any(|a| a.get(STATUS).is_some())
}
