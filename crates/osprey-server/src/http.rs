//! Open Inference Protocol over REST (KServe V2), with Triton's extensions that clients rely
//! on: binary tensor data (`Inference-Header-Content-Length`, `binary_data_size`,
//! `binary_data` / `binary_data_output`), model configuration, statistics and the repository
//! index. Every error is `{"error": "..."}` with the status of its [`ErrorCode`].

use crate::gateway::{Gateway, InferOutcome, InputTensor, ModelEntry, RequestOptions, VariantStats};
use crate::protocol::{ModelRef, ParamValue, TenantId, count_edge_error, response_parameters};
use crate::{EXTENSIONS, SERVER_NAME, SERVER_VERSION};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use osprey_core::config::Role;
use osprey_core::error::Error;
use osprey_core::tensor::{RawTensor, byte_size};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::sync::Arc;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An error rendered as the protocol's JSON error object.
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(json!({ "error": self.0.message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"osprey\""),
            );
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn authenticate(
    State(gw): State<Arc<Gateway>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // An empty segment (`/versions//infer`) would read as "no version": refuse it.
    if req.uri().path().contains("//") {
        return ApiError(Error::not_found("the path has an empty segment")).into_response();
    }
    let h = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match gw.authenticate(h) {
        Ok(t) => {
            req.extensions_mut().insert(TenantId(t));
            if req.uri().path().ends_with("/infer") {
                let t0 = std::time::Instant::now();
                let resp = next.run(req).await;
                gw.metrics.http_duration.observe(t0.elapsed().as_secs_f64());
                resp
            } else {
                next.run(req).await
            }
        }
        Err(e) => {
            let dashboard = req.uri().path() == "/dashboard";
            let mut r = ApiError(e).into_response();
            if dashboard {
                // A browser shows its password prompt for Basic only.
                r.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"osprey\", charset=\"UTF-8\""),
                );
            }
            r
        }
    }
}

pub fn router(gw: Arc<Gateway>) -> Router {
    let limit = gw.limits.max_body_bytes;
    let health = Router::new().route("/v2/health/live", get(live)).route("/v2/health/ready", get(ready));
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/versions/{version}/ready", get(model_ready))
        .route("/v2/models/{model}/config", get(model_config))
        .route("/v2/models/{model}/versions/{version}/config", get(model_config))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/models/{model}/versions/{version}/stats", get(model_stats))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/{action}", post(repository_control))
        .route("/metrics", get(metrics))
        .route("/v2/cluster", get(cluster))
        .route("/v2/cluster/nodes/{node}/{action}", post(place_variant))
        .route("/v2/cluster/splits/{model}/privacy", post(split_privacy))
        .route("/dashboard", get(dashboard_page))
        .route("/v2/dashboard/data", get(dashboard_data))
        .route_layer(axum::middleware::from_fn_with_state(gw.clone(), authenticate))
        .merge(health)
        .fallback(|| async { ApiError(Error::not_found("no such route; the API lives under /v2")) })
        .method_not_allowed_fallback(|| async {
            let mut r = ApiError(Error::invalid("this route does not take that method")).into_response();
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(gw)
}

/// Every error carries the protocol's JSON body: the framework's own rejections (a path
/// segment that is not UTF-8, a malformed query) come as plain text and are wrapped.
async fn json_errors(resp: Response) -> Response {
    let s = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(s.is_client_error() || s.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = if text.trim().is_empty() {
        s.canonical_reason().unwrap_or("error").to_string()
    } else {
        text.trim().to_string()
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, axum::body::Body::from(json!({ "error": message }).to_string()))
}

/// Liveness: the status is the answer (what tritonclient reads); the body `{"live": true}`
/// is what KServe's clients read.
async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// Readiness: 200 `{"ready": true}`, or 503 `{"ready": false}`.
async fn ready(State(gw): State<Arc<Gateway>>) -> (StatusCode, Json<Value>) {
    let ready = gw.is_ready();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready })))
}

/// A load or unload request's body: empty, or a JSON object whose `parameters` (Triton's
/// config override and file upload) are not supported and refused rather than ignored.
fn control_body(body: Result<Bytes, BytesRejection>) -> ApiResult<()> {
    let body = body.map_err(rejection)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::from(Error::invalid(format!("request body is not valid JSON: {e}"))))?;
    // tritonclient's unload sends `unload_dependents`; a model here has no dependents that
    // could be unloaded with it (a pipeline's stage models are refused), so it changes nothing.
    let params = v
        .get("parameters")
        .and_then(Value::as_object)
        .map_or(0, |p| p.keys().filter(|k| *k != "unload_dependents").count());
    if !v.is_object() || params > 0 {
        return Err(Error::invalid(
            "load and unload take no parameters here (a config override or uploaded files are not supported): \
             change the model's folder in the repository and load it",
        )
        .into());
    }
    Ok(())
}

/// `POST /v2/repository/models/{model}/load` and `…/unload` (admin; `--model-control-mode
/// explicit`).
async fn repository_control(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path((model, action)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    gw.tenants.require(t.0, Role::Admin)?;
    control_body(body)?;
    match action.as_str() {
        "load" => gw.request_load(&model).await?,
        "unload" => gw.request_unload(&model).await?,
        _ => return Err(Error::not_found(format!("no route: {action} (load or unload)")).into()),
    }
    Ok(Json(json!({})))
}

/// The dashboard page (admin).
async fn dashboard_page(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
) -> ApiResult<Response> {
    gw.tenants.require(t.0, Role::Admin)?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        crate::dashboard::PAGE,
    )
        .into_response())
}

/// What the dashboard polls (admin).
async fn dashboard_data(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
) -> ApiResult<Json<Value>> {
    gw.tenants.require(t.0, Role::Admin)?;
    Ok(Json(crate::dashboard::data(&gw)))
}

/// Osprey extension: the cluster's nodes (what `osprey status` shows).
async fn cluster(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
) -> ApiResult<Json<Value>> {
    gw.tenants.require(t.0, Role::Monitor)?;
    let splits: Vec<_> = gw.splits().map(|d| d.status()).collect();
    Ok(Json(json!({ "nodes": gw.cluster.status(), "splits": splits })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariantRef {
    model: String,
    variant: String,
}

fn variant_ref(body: Result<Bytes, BytesRejection>) -> Result<VariantRef, ApiError> {
    let body = body.map_err(rejection)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError(Error::invalid(format!("expected {{\"model\": ..., \"variant\": ...}}: {e}"))))
}

/// Osprey extension: `load` a variant on a remote node, or `unload` it (refused unless another
/// instance hosts it).
async fn place_variant(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path((node, action)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    gw.tenants.require(t.0, Role::Admin)?;
    let v = variant_ref(body)?;
    match action.as_str() {
        "load" => gw.cluster.load(&node, &v.model, &v.variant)?,
        "unload" => gw.cluster.unload(&node, &v.model, &v.variant)?,
        _ => return Err(Error::not_found("use /v2/cluster/nodes/{node}/load or /unload").into()),
    }
    Ok(StatusCode::ACCEPTED)
}

/// Osprey extension (admin): changes a split model's privacy pin at run time,
/// `{"private_units": K}`; the plan is revised at once (a plan that breaks the new pin is
/// replaced, with requests in flight finishing on the old one).
async fn split_privacy(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    gw.tenants.require(t.0, Role::Admin)?;
    let d = gw.split(&model).ok_or_else(|| Error::not_found(format!("no split model '{model}'")))?;
    let body = body.map_err(rejection)?;
    let v: Value =
        serde_json::from_slice(&body).map_err(|e| Error::invalid(format!("body is not valid JSON: {e}")))?;
    let k = v
        .get("private_units")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::invalid("send {\"private_units\": K}"))?;
    d.set_private_units(k as usize)?;
    Ok(Json(json!({ "model": model, "private_units": k })))
}

async fn server_metadata() -> Json<Value> {
    Json(json!({ "name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS }))
}

async fn metrics(State(gw): State<Arc<Gateway>>, Extension(t): Extension<TenantId>) -> ApiResult<Response> {
    gw.tenants.require(t.0, Role::Monitor)?;
    gw.metrics.set_split(&gw.splits().map(|d| d.status()).collect::<Vec<_>>());
    gw.metrics.set_nodes(&gw.cluster.status());
    gw.metrics.set_attainment(&gw.timeline.attainment(std::time::Instant::now(), 60));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        gw.metrics.encode(),
    )
        .into_response())
}

pub fn tensor_meta(t: &osprey_core::model::TensorSpec) -> Value {
    json!({ "name": t.name, "datatype": t.datatype.as_str(), "shape": t.shape })
}

fn metadata(m: &ModelEntry) -> Value {
    json!({
        "name": m.name(),
        "versions": m.variants.iter().map(|v| v.spec.name.clone()).collect::<Vec<_>>(),
        "platform": "onnxruntime_onnx",
        "inputs": m.spec.inputs.iter().map(tensor_meta).collect::<Vec<_>>(),
        "outputs": m.spec.outputs.iter().map(tensor_meta).collect::<Vec<_>>(),
        "parameters": {
            "task": m.spec.task,
            "modality": m.spec.modality,
            "labels": m.spec.labels,
        }
    })
}

/// The model an address names, with the caller's right to see it and the version checked.
fn addressed(gw: &Gateway, t: TenantId, r: &ModelRef) -> Result<Arc<ModelEntry>, Error> {
    gw.tenants.check_visible(t.0, &r.model)?;
    let m = gw.model(&r.model)?;
    m.resolve_version(&r.version)?;
    Ok(m)
}

/// A pipeline's metadata: its first stage's inputs, its last stage's outputs, its stages.
pub fn pipeline_metadata(p: &crate::pipeline::PipelineEntry) -> Value {
    json!({
        "name": p.name(),
        "versions": [],
        "platform": "osprey_pipeline",
        "inputs": p.inputs().iter().map(tensor_meta).collect::<Vec<_>>(),
        "outputs": p.outputs().iter().map(tensor_meta).collect::<Vec<_>>(),
        "parameters": {
            "description": p.spec.description,
            "stages": p.spec.stages.iter().map(|s| format!("{}={}", s.name, s.model)).collect::<Vec<_>>().join(","),
        }
    })
}

/// A multi-modal model's metadata: every modality's inputs (a request may carry some of
/// them), the fused output, its modalities and fusion rules.
pub fn multimodal_metadata(m: &crate::multimodal::MultiModalEntry) -> Value {
    json!({
        "name": m.name(),
        "versions": [],
        "platform": "osprey_multimodal",
        "inputs": m.inputs.iter().map(|(_, t)| tensor_meta(t)).collect::<Vec<_>>(),
        "outputs": m.outputs.iter().map(tensor_meta).collect::<Vec<_>>(),
        "parameters": {
            "description": m.spec.description,
            "modalities": m.modalities_parameter(),
            "fusion": m.fusion_parameter(),
            "labels": m.labels,
        }
    })
}

async fn model_metadata(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path(r): Path<ModelRef>,
) -> ApiResult<Json<Value>> {
    if let Some(d) = gw.split(&r.model) {
        gw.tenants.check_visible(t.0, &r.model)?;
        if !r.version.is_empty() {
            return Err(Error::not_found(format!("split model '{}' has no versions", r.model)).into());
        }
        return Ok(Json(json!({
            "name": d.name(),
            "versions": [],
            "platform": "osprey_split",
            "inputs": [tensor_meta(&d.input_spec())],
            "outputs": [tensor_meta(&d.output_spec())],
            "parameters": {
                "description": d.spec.description,
                "units": d.spec.units(),
                "private_units": d.spec.private_units,
                "seq_len": d.spec.seq_len,
            }
        })));
    }
    if let Some(p) = gw.pipeline(&r.model) {
        gw.tenants.check_visible(t.0, &r.model)?;
        if !r.version.is_empty() {
            return Err(Error::not_found(format!("pipeline '{}' has no versions", r.model)).into());
        }
        return Ok(Json(pipeline_metadata(p)));
    }
    if let Some(m) = gw.multimodal(&r.model) {
        gw.tenants.check_visible(t.0, &r.model)?;
        if !r.version.is_empty() {
            return Err(Error::not_found(format!("multi-modal model '{}' has no versions", r.model)).into());
        }
        return Ok(Json(multimodal_metadata(m)));
    }
    let m = addressed(&gw, t, &r)?;
    Ok(Json(metadata(&m)))
}

async fn model_ready(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path(r): Path<ModelRef>,
) -> ApiResult<StatusCode> {
    if gw.pipeline(&r.model).is_some() || gw.split(&r.model).is_some() || gw.multimodal(&r.model).is_some() {
        gw.tenants.check_visible(t.0, &r.model)?;
        if !r.version.is_empty() {
            return Err(Error::not_found(format!("model '{}' has no versions", r.model)).into());
        }
    } else {
        addressed(&gw, t, &r)?;
    }
    Ok(if gw.model_is_ready(&r.model) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE })
}

/// Triton-style model configuration: dims exclude the batch dimension when batching is on.
pub fn config_json(m: &ModelEntry) -> Value {
    let tensor = |t: &osprey_core::model::TensorSpec| json!({ "name": t.name, "data_type": format!("TYPE_{}", t.datatype.as_str()), "dims": t.sample_shape() });
    json!({
        "name": m.name(),
        "platform": "onnxruntime_onnx",
        "backend": m.backend(),
        "max_batch_size": m.spec.max_batch_size,
        "input": m.spec.inputs.iter().map(tensor).collect::<Vec<_>>(),
        "output": m.spec.outputs.iter().map(tensor).collect::<Vec<_>>(),
        "parameters": {
            "task": { "string_value": m.spec.task },
            "modality": { "string_value": m.spec.modality },
        },
    })
}

async fn model_config(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path(r): Path<ModelRef>,
) -> ApiResult<Json<Value>> {
    let m = addressed(&gw, t, &r)?;
    Ok(Json(config_json(&m)))
}

fn dur(d: &crate::gateway::Duration2) -> Value {
    json!({ "count": d.count, "ns": d.ns })
}

fn stats_json(m: &ModelEntry, only: Option<usize>) -> Vec<Value> {
    m.variants
        .iter()
        .enumerate()
        .filter(|(i, _)| only.is_none_or(|o| o == *i))
        .map(|(_, v)| {
            let s: VariantStats = v.stats.lock().map(|s| s.clone()).unwrap_or_default();
            json!({
                "name": m.name(),
                "version": v.spec.name,
                "last_inference": s.last_inference_ms,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": dur(&s.success), "fail": dur(&s.fail), "queue": dur(&s.queue),
                    "compute_input": dur(&s.compute_input), "compute_infer": dur(&s.compute_infer),
                    "compute_output": dur(&s.compute_output),
                    "cache_hit": {"count": 0, "ns": 0}, "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": s.batches.iter().map(|(b, st)| json!({
                    "batch_size": b,
                    "compute_input": dur(&st.compute_input),
                    "compute_infer": dur(&st.compute_infer),
                    "compute_output": dur(&st.compute_output),
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

async fn all_stats(State(gw): State<Arc<Gateway>>, Extension(t): Extension<TenantId>) -> Json<Value> {
    let all: Vec<Value> = gw
        .models()
        .iter()
        .filter(|m| gw.tenants.may_see(t.0, m.name()))
        .flat_map(|m| stats_json(m, None))
        .collect();
    Json(json!({ "model_stats": all }))
}

async fn model_stats(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    Path(r): Path<ModelRef>,
) -> ApiResult<Json<Value>> {
    gw.tenants.check_visible(t.0, &r.model)?;
    let m = gw.model(&r.model)?;
    let v = m.resolve_version(&r.version)?;
    Ok(Json(json!({ "model_stats": stats_json(&m, v) })))
}

async fn repository_index(
    State(gw): State<Arc<Gateway>>,
    Extension(t): Extension<TenantId>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Value>> {
    let body = body.map_err(rejection)?;
    let mut ready_only = false;
    if !body.is_empty() {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("repository index body is not valid JSON: {e}")))?;
        ready_only = v.get("ready").and_then(Value::as_bool).unwrap_or(false);
    }
    let out: Vec<Value> = gw
        .repository_index(t.0, ready_only)
        .into_iter()
        .map(|e| {
            let mut v = json!({ "name": e.name, "version": e.version, "state": e.state });
            if !e.reason.is_empty() {
                v["reason"] = json!(e.reason);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

fn rejection(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError(Error::too_large("request body exceeds the server's max_body_bytes limit"))
    } else if r.body_text().contains(crate::listener::BODY_TIMEOUT) {
        ApiError(Error::new(osprey_core::error::ErrorCode::RequestTimeout, crate::listener::BODY_TIMEOUT))
    } else {
        ApiError(Error::invalid(format!("could not read the request body: {r}")))
    }
}

// ------------------------------------------------------------------------------------------
// Inference
// ------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct InferRequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// Decoded once the datatype is known, straight into the tensor's bytes.
    #[serde(default, borrow)]
    data: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

fn param_u64(params: &Map<String, Value>, key: &str) -> Result<Option<u64>, Error> {
    match params.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| Error::invalid(format!("parameter '{key}' must be a non-negative integer"))),
    }
}

/// Inference bodies are JSON, optionally followed by binary tensors: `application/json`,
/// `application/octet-stream` (what Triton's binary extension sends), or no Content-Type at all
/// (tritonclient sends none). Anything else, e.g. curl's default form encoding, is refused
/// with 415 rather than guessed at.
fn check_content_type(ct: Option<&HeaderValue>) -> Result<(), Error> {
    let Some(ct) = ct else { return Ok(()) };
    let essence = ct.to_str().unwrap_or("").split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "application/octet-stream" | "application/vnd.sagemaker-triton.binary+json" => {
            Ok(())
        }
        _ => Err(Error::new(
            osprey_core::error::ErrorCode::UnsupportedMediaType,
            format!(
                "Content-Type '{}' is not accepted for inference; send application/json (or application/octet-stream with binary tensors)",
                ct.to_str().unwrap_or("?")
            ),
        )),
    }
}

/// The request headers inference reads (taken alone: the `HeaderMap` extractor would copy
/// every header of every request).
struct InferHeaders {
    content_type: Option<HeaderValue>,
    content_encoding: Option<HeaderValue>,
    header_length: Option<HeaderValue>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for InferHeaders {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(InferHeaders {
            content_type: parts.headers.get(axum::http::header::CONTENT_TYPE).cloned(),
            content_encoding: parts.headers.get(axum::http::header::CONTENT_ENCODING).cloned(),
            header_length: parts.headers.get(HEADER_LENGTH).cloned(),
        })
    }
}

async fn infer(
    State(gw): State<Arc<Gateway>>,
    Path(r): Path<ModelRef>,
    axum::Extension(tenant): axum::Extension<TenantId>,
    headers: InferHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = decode_and_run(&gw, &r.model, &r.version, tenant.0, &headers, body).await;
    if let Err(ApiError(e)) = &result {
        count_edge_error(&gw, &r.model, e);
    }
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn decode_and_run(
    gw: &Gateway,
    model: &str,
    version: &str,
    tenant: usize,
    headers: &InferHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    gw.tenants.check_model(tenant, model)?;
    check_content_type(headers.content_type.as_ref())?;
    let body = body.map_err(rejection)?;
    if let Some(enc) = &headers.content_encoding
        && enc.as_bytes() != b"identity"
    {
        return Err(Error::invalid("Content-Encoding is not supported; send the body uncompressed").into());
    }
    let (json_part, binary) = match &headers.header_length {
        Some(h) => {
            let n: usize = h
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| Error::invalid("Inference-Header-Content-Length must be a byte count"))?;
            if n > body.len() {
                return Err(Error::invalid(format!(
                    "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                    body.len()
                ))
                .into());
            }
            (body.slice(..n), body.slice(n..))
        }
        None => (body.clone(), Bytes::new()),
    };
    let d = decode_request(&json_part, binary, gw.limits.max_body_bytes)?;
    if gw.split(model).is_some() {
        let o = gw.infer_split(model, version, d.inputs, &d.outputs, &d.opts, tenant).await?;
        return Ok(encode_split_response(&o, &d.id, &d.binary_out, d.binary_default));
    }
    let valid = gw.validate(model, version, d.id.clone(), d.inputs, &d.outputs, &d.opts)?;
    let outcome = gw.infer(valid, tenant).await?;
    Ok(encode_response(&outcome, &d.id, &d.binary_out, d.binary_default))
}

/// An inference request body once decoded (JSON header, then any binary tensors).
pub struct Decoded {
    pub id: String,
    pub inputs: Vec<InputTensor>,
    pub opts: RequestOptions,
    pub outputs: Vec<String>,
    /// Per requested output: answer it in binary.
    pub binary_out: Vec<bool>,
    pub binary_default: bool,
}

/// Decodes the JSON header `json_part` and the binary tensors after it: every size is checked
/// against datatype and shape (and `max_body_bytes`) before anything is allocated, and JSON
/// `data` is decoded straight into typed bytes. Pure (no gateway): the fuzz targets drive it.
pub fn decode_request(
    json_part: &[u8],
    mut binary: Bytes,
    max_body_bytes: usize,
) -> Result<Decoded, ApiError> {
    let req: InferRequestJson = serde_json::from_slice(json_part)
        .map_err(|e| Error::invalid(format!("request is not a valid inference request JSON: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for inp in req.inputs {
        let dt = crate::gateway::parse_datatype(&inp.datatype, &inp.name)?;
        let size = byte_size(dt, &inp.shape)?;
        if size > max_body_bytes.saturating_mul(4) {
            return Err(Error::too_large(format!(
                "input '{}' of shape {:?} is larger than the server accepts",
                inp.name, inp.shape
            ))
            .into());
        }
        let tensor = match param_u64(&inp.parameters, "binary_data_size")? {
            Some(n) => {
                if inp.data.is_some() {
                    return Err(Error::invalid(format!(
                        "input '{}' has both 'data' and binary_data_size",
                        inp.name
                    ))
                    .into());
                }
                let n = n as usize;
                // BYTES: `size` is the least its layout can take; `from_bytes` checks it.
                if n != size && !(dt.is_variable() && n > size && n <= max_body_bytes) {
                    return Err(Error::invalid(format!(
                        "input '{}': binary_data_size is {n} but {dt} {:?} needs {size} bytes",
                        inp.name, inp.shape
                    ))
                    .into());
                }
                if n > binary.len() {
                    return Err(Error::invalid(format!(
                        "input '{}': binary_data_size {n} exceeds the {} binary bytes left in the body",
                        inp.name,
                        binary.len()
                    ))
                    .into());
                }
                let chunk = binary.split_to(n);
                RawTensor::from_bytes(dt, inp.shape, chunk.to_vec())?
            }
            None => {
                let data = inp.data.ok_or_else(|| {
                    Error::invalid(format!("input '{}' has neither 'data' nor binary_data_size", inp.name))
                })?;
                RawTensor::from_json(dt, inp.shape, data.get(), &inp.name)?
            }
        };
        inputs.push(InputTensor { name: inp.name, tensor });
    }
    if !binary.is_empty() {
        return Err(Error::invalid(format!(
            "{} bytes of binary data are not claimed by any input",
            binary.len()
        ))
        .into());
    }
    let p = &req.parameters;
    let opts = RequestOptions {
        timeout_us: param_u64(p, "timeout")?,
        deadline_ms: param_u64(p, "deadline_ms")?,
        priority: param_u64(p, "priority")?,
        min_accuracy: match p.get("min_accuracy") {
            None => None,
            Some(v) => {
                Some(v.as_f64().ok_or_else(|| Error::invalid("parameter 'min_accuracy' must be a number"))?)
            }
        },
        max_ensemble: param_u64(p, "max_ensemble")?,
        explain: match p.get("explain") {
            None => None,
            Some(v) => {
                Some(v.as_bool().ok_or_else(|| Error::invalid("parameter 'explain' must be a boolean"))?)
            }
        },
        min_confidence: match p.get("min_confidence") {
            None => None,
            Some(v) => Some(
                v.as_f64().ok_or_else(|| Error::invalid("parameter 'min_confidence' must be a number"))?,
            ),
        },
    };
    let binary_default = match p.get("binary_data_output") {
        None => false,
        Some(v) => {
            v.as_bool().ok_or_else(|| Error::invalid("parameter 'binary_data_output' must be a boolean"))?
        }
    };
    let mut binary_out = Vec::with_capacity(req.outputs.len());
    for o in &req.outputs {
        if o.parameters.contains_key("classification") {
            return Err(Error::invalid(
                "the classification extension is not supported; request the probabilities output",
            )
            .into());
        }
        binary_out.push(match o.parameters.get("binary_data") {
            None => binary_default,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::invalid("output parameter 'binary_data' must be a boolean"))?,
        });
    }
    let outputs: Vec<String> = req.outputs.iter().map(|o| o.name.clone()).collect();
    Ok(Decoded { id: req.id.unwrap_or_default(), inputs, opts, outputs, binary_out, binary_default })
}

/// A split model's response: the embedding (JSON or binary), the epoch it ran on and how many
/// attempts it took.
fn encode_split_response(
    o: &crate::gateway::SplitOutcome,
    id: &str,
    binary_out: &[bool],
    binary_default: bool,
) -> Response {
    let binary = binary_out.first().copied().unwrap_or(binary_default);
    let t = &o.embedding;
    let mut out = Vec::with_capacity(256 + t.data.len() * 2);
    let mut head = json!({
        "model_name": o.model,
        "model_version": "",
        "outputs": [{"name": "embedding", "datatype": t.datatype.as_str(), "shape": t.shape}],
        "parameters": {
            "split_epoch": o.epochs.iter().copied().max().unwrap_or(0),
            "split_attempts": o.attempts,
            "latency_ms": o.latency.as_secs_f64() * 1e3,
        },
    });
    if !id.is_empty() {
        head["id"] = json!(id);
    }
    if binary {
        head["outputs"][0]["parameters"] = json!({"binary_data_size": t.data.len()});
        let _ = serde_json::to_writer(&mut out, &head);
        let header_len = out.len();
        out.extend_from_slice(&t.data);
        let mut resp = out.into_response();
        let h = resp.headers_mut();
        h.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(HEADER_LENGTH, HeaderValue::from(header_len));
        return resp;
    }
    let mut data = Vec::new();
    t.write_json_data(&mut data);
    let raw = serde_json::value::RawValue::from_string(String::from_utf8_lossy(&data).into_owned());
    if let Ok(raw) = raw {
        head["outputs"][0]["data"] = serde_json::to_value(&raw).unwrap_or(Value::Null);
    }
    let _ = serde_json::to_writer(&mut out, &head);
    ([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response()
}

/// Writes the response straight into one buffer (JSON header, then the binary outputs, if
/// any, in Triton's binary form).
fn encode_response(o: &InferOutcome, id: &str, binary_out: &[bool], binary_default: bool) -> Response {
    fn text(out: &mut Vec<u8>, s: &str) {
        let _ = serde_json::to_writer(&mut *out, s);
    }
    let tail: usize = o.outputs.iter().map(|(_, t)| t.data.len()).sum();
    let mut out = Vec::with_capacity(320 + tail * 2);
    out.extend_from_slice(b"{");
    if !id.is_empty() {
        out.extend_from_slice(b"\"id\":");
        text(&mut out, id);
        out.push(b',');
    }
    out.extend_from_slice(b"\"model_name\":");
    text(&mut out, o.addressed_name());
    out.extend_from_slice(b",\"model_version\":");
    text(&mut out, &o.model.variants[o.variant].spec.name);
    out.extend_from_slice(b",\"outputs\":[");
    let mut any_binary = false;
    for (k, (idx, t)) in o.outputs.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        text(&mut out, o.output_name(*idx));
        out.extend_from_slice(b",\"datatype\":\"");
        out.extend_from_slice(t.datatype.as_str().as_bytes());
        out.extend_from_slice(b"\",\"shape\":");
        let _ = serde_json::to_writer(&mut out, &t.shape);
        if binary_out.get(k).copied().unwrap_or(binary_default) {
            any_binary = true;
            out.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            let _ = serde_json::to_writer(&mut out, &t.data.len());
            out.extend_from_slice(b"}}");
        } else {
            out.extend_from_slice(b",\"data\":");
            t.write_json_data(&mut out);
            out.push(b'}');
        }
    }
    out.extend_from_slice(b"],\"parameters\":{");
    for (i, (k, v)) in response_parameters(o).into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        text(&mut out, k);
        out.push(b':');
        let _ = match v {
            ParamValue::Bool(b) => serde_json::to_writer(&mut out, &b),
            ParamValue::Int(i) => serde_json::to_writer(&mut out, &i),
            // Non-finite numbers are not JSON: written as null.
            ParamValue::Double(d) => serde_json::to_writer(&mut out, &d),
            ParamValue::Str(s) => serde_json::to_writer(&mut out, s),
            ParamValue::Owned(s) => serde_json::to_writer(&mut out, &s),
        };
    }
    out.extend_from_slice(b"}}");
    if !any_binary {
        return ([(axum::http::header::CONTENT_TYPE, "application/json")], out).into_response();
    }
    let header_len = out.len();
    for (k, (_, t)) in o.outputs.iter().enumerate() {
        if binary_out.get(k).copied().unwrap_or(binary_default) {
            out.extend_from_slice(&t.data);
        }
    }
    let mut resp = out.into_response();
    let h = resp.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(HEADER_LENGTH, HeaderValue::from(header_len));
    resp
}
