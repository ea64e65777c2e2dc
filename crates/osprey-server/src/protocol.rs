//! What the two protocol front ends (REST in `http`, gRPC in `grpc`) share, so that a rule is
//! written once: the authenticated caller, the typed response parameters, which errors the edge
//! counts in metrics, and the `{model}[/versions/{version}]` address.
//!
//! ```text
//! http.rs  ── axum layer ──┐                       ┌─ decode JSON / binary tensors
//! grpc.rs  ── interceptor ─┴─> Gateway::authenticate ─> TenantId ─> Gateway::validate -> ValidRequest
//!                                                         ─> Gateway::infer -> InferOutcome
//!                                                         ─> response_parameters (typed) -> JSON | InferParameter
//! ```

use crate::gateway::{Gateway, InferOutcome};
use osprey_core::error::{Error, ErrorCode};
use serde::Deserialize;

/// The authenticated caller (a tenant index), set once per request by the HTTP auth layer or
/// the gRPC interceptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantId(pub usize);

/// The outcome of authenticating a gRPC call, stored in its extensions by the interceptor
/// (health calls ignore it; every other method requires it to be `Ok`).
#[derive(Debug, Clone)]
pub struct Auth(pub Result<TenantId, Error>);

/// A model address: `/v2/models/{model}` or `/v2/models/{model}/versions/{version}` (gRPC:
/// `name` + `version`); an empty version lets the scheduler choose.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct ModelRef {
    pub model: String,
    #[serde(default)]
    pub version: String,
}

/// A typed response parameter; each protocol renders it natively.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
    Owned(String),
}

/// The parameters every inference response carries (see the README's table); a pipeline's
/// also say what ran each stage (`pipeline_stages`: `stage=model/variant@node,...`); a
/// multi-modal model's say what answered and how it was fused (`modalities`, `ensemble`:
/// `modality=model/variant@node,...`, `fused_confidence`, `refined`, `refinement_stop`,
/// `fusion`, `calls`).
pub fn response_parameters(o: &InferOutcome) -> Vec<(&'static str, ParamValue<'_>)> {
    let mut v = vec![
        ("variant", ParamValue::Str(&o.model.variants[o.variant].spec.name)),
        ("node", ParamValue::Str(&o.node)),
        ("estimated_accuracy", ParamValue::Double(o.estimated_accuracy)),
        ("queue_us", ParamValue::Int(o.queue.as_micros() as i64)),
        ("compute_us", ParamValue::Int(o.compute.as_micros() as i64)),
        ("deadline_met", ParamValue::Bool(o.deadline_met)),
        ("batch_size", ParamValue::Int(i64::from(o.batch_size))),
        ("tenant", ParamValue::Str(&o.tenant)),
    ];
    if let Some(run) = &o.pipeline {
        v.push(("pipeline_stages", ParamValue::Owned(crate::pipeline::stages_parameter(&run.stages))));
    }
    if let Some(m) = &o.multimodal {
        v.push(("modalities", ParamValue::Owned(m.modalities())));
        v.push(("ensemble", ParamValue::Owned(m.ensemble())));
        v.push(("fused_confidence", ParamValue::Double(m.fused_confidence)));
        v.push(("refined", ParamValue::Bool(m.refined)));
        v.push(("refinement_stop", ParamValue::Str(m.stop.as_str())));
        v.push(("fusion", ParamValue::Str(m.fusion.as_str())));
        v.push(("calls", ParamValue::Int(m.calls as i64)));
        match &m.explained {
            Some(Ok(by)) => v.push(("explained", ParamValue::Str(by))),
            Some(Err(why)) => v.push(("explanation_skipped", ParamValue::Str(why))),
            None => {}
        }
    }
    v
}

/// Errors raised at the protocol edge (before the gateway admits the request) that the edge
/// itself counts in `osprey_requests_total`; admission and execution outcomes are counted by
/// the gateway. One rule for both protocols.
pub fn count_edge_error(gw: &Gateway, model: &str, e: &Error) {
    if matches!(e.code, ErrorCode::InvalidArgument | ErrorCode::NotFound | ErrorCode::PayloadTooLarge) {
        let label =
            if gw.model(model).is_ok() || gw.pipeline(model).is_some() || gw.multimodal(model).is_some() {
                model
            } else {
                ""
            };
        gw.metrics.request(label, "", e.code.label());
    }
}
