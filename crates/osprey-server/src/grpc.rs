//! `inference.GRPCInferenceService` over tonic. Inputs arrive as `raw_input_contents` (what
//! tritonclient sends) or typed `contents`; outputs always go back as `raw_output_contents`,
//! which is the only form the official client reads. Callers are authenticated once per call
//! by [`interceptor`] (the same `Gateway::authenticate` the REST layer uses).

use crate::gateway::{Gateway, InputTensor, ModelEntry, RequestOptions, parse_datatype};
use crate::pb;
use crate::pb::grpc_inference_service_server::GrpcInferenceService;
use crate::protocol::{Auth, ParamValue, TenantId, count_edge_error, response_parameters};
use crate::{EXTENSIONS, SERVER_NAME, SERVER_VERSION};
use osprey_core::error::Error;
use osprey_core::tensor::{DataType, RawTensor, byte_size, element_count};
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Code, Request, Response, Status};

pub struct InferenceService {
    gw: Arc<Gateway>,
}

impl InferenceService {
    pub fn new(gw: Arc<Gateway>) -> Self {
        InferenceService { gw }
    }
}

pub fn status(e: Error) -> Status {
    Status::new(Code::from_i32(e.code.grpc_code()), e.message)
}

type R<T> = Result<Response<T>, Status>;

/// The gRPC auth path: resolves the caller from the `authorization` metadata entry and
/// stores the outcome in the call's extensions.
pub fn interceptor(gw: Arc<Gateway>) -> impl tonic::service::Interceptor + Clone {
    move |mut req: Request<()>| {
        let h = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let auth = gw.authenticate(h).map(TenantId);
        req.extensions_mut().insert(Auth(auth));
        Ok(req)
    }
}

impl InferenceService {
    /// The caller the interceptor authenticated.
    fn tenant<T>(&self, r: &Request<T>) -> Result<usize, Status> {
        match r.extensions().get::<Auth>() {
            Some(Auth(Ok(t))) => Ok(t.0),
            Some(Auth(Err(e))) => Err(status(e.clone())),
            // Served without the interceptor (tests wiring the service by hand).
            None => {
                let h = r.metadata().get("authorization").and_then(|v| v.to_str().ok());
                self.gw.authenticate(h).map_err(status)
            }
        }
    }
}

fn tensor_meta(t: &osprey_core::model::TensorSpec) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.as_str().into(),
        shape: t.shape.clone(),
    }
}

/// The model a call names, with the caller's right to see it and the version checked.
fn model_ready(gw: &Gateway, tenant: usize, name: &str, version: &str) -> Result<Arc<ModelEntry>, Status> {
    gw.tenants.check_visible(tenant, name).map_err(status)?;
    let m = gw.model(name).map_err(status)?;
    m.resolve_version(version).map_err(status)?;
    Ok(m)
}

fn param_u64(p: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<u64>, Error> {
    use pb::infer_parameter::ParameterChoice as C;
    match p.get(key).and_then(|v| v.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(C::Int64Param(v)) if *v >= 0 => Ok(Some(*v as u64)),
        Some(C::Uint64Param(v)) => Ok(Some(*v)),
        Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a non-negative integer"))),
    }
}

fn param_bool(p: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<bool>, Error> {
    use pb::infer_parameter::ParameterChoice as C;
    match p.get(key).and_then(|v| v.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(C::BoolParam(v)) => Ok(Some(*v)),
        Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a boolean"))),
    }
}

fn param_f64(p: &HashMap<String, pb::InferParameter>, key: &str) -> Result<Option<f64>, Error> {
    use pb::infer_parameter::ParameterChoice as C;
    match p.get(key).and_then(|v| v.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(C::DoubleParam(v)) => Ok(Some(*v)),
        Some(C::Int64Param(v)) => Ok(Some(*v as f64)),
        Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a number"))),
    }
}

fn unreachable_fp16() -> Result<(), Error> {
    Err(Error::internal("FP16 typed contents are refused before conversion"))
}

/// Typed `contents` to raw little-endian bytes, checking count and range.
fn from_contents(
    dt: DataType,
    shape: Vec<i64>,
    c: &pb::InferTensorContents,
    name: &str,
) -> Result<RawTensor, Error> {
    let want = element_count(&shape)?;
    let count_err = |got: usize| {
        Error::invalid(format!("input '{name}': shape {shape:?} needs {want} elements, contents has {got}"))
    };
    let range_err = || Error::invalid(format!("input '{name}': a value is out of range for {dt}"));
    // The element count is checked against what the message carries before any allocation: a
    // shape may claim 10¹⁸ elements (found by fuzzing: an allocation of 7.9 EB aborted).
    let got = match dt {
        DataType::Bool => c.bool_contents.len(),
        DataType::Int8 | DataType::Int16 | DataType::Int32 => c.int_contents.len(),
        DataType::Int64 => c.int64_contents.len(),
        DataType::Uint8 | DataType::Uint16 | DataType::Uint32 => c.uint_contents.len(),
        DataType::Uint64 => c.uint64_contents.len(),
        DataType::Fp32 => c.fp32_contents.len(),
        DataType::Fp64 => c.fp64_contents.len(),
        DataType::Bytes => c.bytes_contents.len(),
        DataType::Fp16 => {
            return Err(Error::invalid(format!(
                "input '{name}': FP16 has no typed contents field; send it in raw_input_contents"
            )));
        }
    };
    if got != want {
        return Err(count_err(got));
    }
    let mut out = Vec::with_capacity(byte_size(dt, &shape)?);
    macro_rules! narrow {
        ($src:expr, $t:ty) => {{
            if $src.len() != want {
                return Err(count_err($src.len()));
            }
            for &x in $src.iter() {
                out.extend_from_slice(&<$t>::try_from(x).map_err(|_| range_err())?.to_le_bytes());
            }
        }};
    }
    match dt {
        DataType::Bool => {
            if c.bool_contents.len() != want {
                return Err(count_err(c.bool_contents.len()));
            }
            out.extend(c.bool_contents.iter().map(|&b| b as u8));
        }
        DataType::Int8 => narrow!(c.int_contents, i8),
        DataType::Int16 => narrow!(c.int_contents, i16),
        DataType::Int32 => narrow!(c.int_contents, i32),
        DataType::Int64 => narrow!(c.int64_contents, i64),
        DataType::Uint8 => narrow!(c.uint_contents, u8),
        DataType::Uint16 => narrow!(c.uint_contents, u16),
        DataType::Uint32 => narrow!(c.uint_contents, u32),
        DataType::Uint64 => narrow!(c.uint64_contents, u64),
        DataType::Fp32 => narrow!(c.fp32_contents, f32),
        DataType::Fp64 => narrow!(c.fp64_contents, f64),
        DataType::Bytes => return RawTensor::from_strings(shape, &c.bytes_contents),
        DataType::Fp16 => unreachable_fp16()?,
    }
    RawTensor::from_bytes(dt, shape, out)
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(&self, _: Request<pb::ServerLiveRequest>) -> R<pb::ServerLiveResponse> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<pb::ServerReadyRequest>) -> R<pb::ServerReadyResponse> {
        Ok(Response::new(pb::ServerReadyResponse { ready: self.gw.is_ready() }))
    }

    async fn model_ready(&self, r: Request<pb::ModelReadyRequest>) -> R<pb::ModelReadyResponse> {
        let t = self.tenant(&r)?;
        let r = r.into_inner();
        self.gw.tenants.check_visible(t, &r.name).map_err(status)?;
        let known = if self.gw.pipeline(&r.name).is_some()
            || self.gw.split(&r.name).is_some()
            || self.gw.multimodal(&r.name).is_some()
        {
            r.version.is_empty()
        } else {
            model_ready(&self.gw, t, &r.name, &r.version).is_ok()
        };
        let ready = known && self.gw.model_is_ready(&r.name);
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(&self, r: Request<pb::ServerMetadataRequest>) -> R<pb::ServerMetadataResponse> {
        self.tenant(&r)?;
        Ok(Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: SERVER_VERSION.into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(&self, r: Request<pb::ModelMetadataRequest>) -> R<pb::ModelMetadataResponse> {
        let t = self.tenant(&r)?;
        let r = r.into_inner();
        if let Some(d) = self.gw.split(&r.name) {
            self.gw.tenants.check_visible(t, &r.name).map_err(status)?;
            return Ok(Response::new(pb::ModelMetadataResponse {
                name: d.name().into(),
                versions: Vec::new(),
                platform: "osprey_split".into(),
                inputs: vec![tensor_meta(&d.input_spec())],
                outputs: vec![tensor_meta(&d.output_spec())],
            }));
        }
        if let Some(p) = self.gw.pipeline(&r.name) {
            self.gw.tenants.check_visible(t, &r.name).map_err(status)?;
            return Ok(Response::new(pb::ModelMetadataResponse {
                name: p.name().into(),
                versions: Vec::new(),
                platform: "osprey_pipeline".into(),
                inputs: p.inputs().iter().map(tensor_meta).collect(),
                outputs: p.outputs().iter().map(tensor_meta).collect(),
            }));
        }
        if let Some(mm) = self.gw.multimodal(&r.name) {
            self.gw.tenants.check_visible(t, &r.name).map_err(status)?;
            if !r.version.is_empty() {
                return Err(status(Error::not_found(format!(
                    "multi-modal model '{}' has no versions",
                    r.name
                ))));
            }
            return Ok(Response::new(pb::ModelMetadataResponse {
                name: mm.name().into(),
                versions: Vec::new(),
                platform: "osprey_multimodal".into(),
                inputs: mm.inputs.iter().map(|(_, t)| tensor_meta(t)).collect(),
                outputs: mm.outputs.iter().map(tensor_meta).collect(),
            }));
        }
        let m = model_ready(&self.gw, t, &r.name, &r.version)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name().into(),
            versions: m.variants.iter().map(|v| v.spec.name.clone()).collect(),
            platform: "onnxruntime_onnx".into(),
            inputs: m.spec.inputs.iter().map(tensor_meta).collect(),
            outputs: m.spec.outputs.iter().map(tensor_meta).collect(),
        }))
    }

    async fn model_config(&self, r: Request<pb::ModelConfigRequest>) -> R<pb::ModelConfigResponse> {
        let t = self.tenant(&r)?;
        let r = r.into_inner();
        let m = model_ready(&self.gw, t, &r.name, &r.version)?;
        let config = pb::ModelConfig {
            name: m.name().into(),
            platform: "onnxruntime_onnx".into(),
            backend: m.backend(),
            max_batch_size: m.spec.max_batch_size as i32,
            input: m
                .spec
                .inputs
                .iter()
                .map(|t| pb::ModelInput {
                    name: t.name.clone(),
                    data_type: t.datatype.triton_type(),
                    dims: t.sample_shape().to_vec(),
                })
                .collect(),
            output: m
                .spec
                .outputs
                .iter()
                .map(|t| pb::ModelOutput {
                    name: t.name.clone(),
                    data_type: t.datatype.triton_type(),
                    dims: t.sample_shape().to_vec(),
                })
                .collect(),
        };
        Ok(Response::new(pb::ModelConfigResponse { config: Some(config) }))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> R<pb::ModelStatisticsResponse> {
        let t = self.tenant(&r)?;
        let r = r.into_inner();
        let models: Vec<Arc<ModelEntry>> = if r.name.is_empty() {
            self.gw.models().into_iter().filter(|m| self.gw.tenants.may_see(t, m.name())).collect()
        } else {
            self.gw.tenants.check_visible(t, &r.name).map_err(status)?;
            vec![self.gw.model(&r.name).map_err(status)?]
        };
        let only = match models.first() {
            Some(m) if !r.name.is_empty() => m.resolve_version(&r.version).map_err(status)?,
            _ => None,
        };
        let d = |x: &crate::gateway::Duration2| Some(pb::StatisticDuration { count: x.count, ns: x.ns });
        let mut model_stats = Vec::new();
        for m in models {
            for (i, v) in m.variants.iter().enumerate() {
                if only.is_some_and(|o| o != i) {
                    continue;
                }
                let s = v.stats.lock().map(|s| s.clone()).unwrap_or_default();
                model_stats.push(pb::ModelStatistics {
                    name: m.name().into(),
                    version: v.spec.name.clone(),
                    last_inference: s.last_inference_ms,
                    inference_count: s.inference_count,
                    execution_count: s.execution_count,
                    inference_stats: Some(pb::InferStatistics {
                        success: d(&s.success),
                        fail: d(&s.fail),
                        queue: d(&s.queue),
                        compute_input: d(&s.compute_input),
                        compute_infer: d(&s.compute_infer),
                        compute_output: d(&s.compute_output),
                    }),
                    batch_stats: s
                        .batches
                        .iter()
                        .map(|(b, st)| pb::InferBatchStatistics {
                            batch_size: *b,
                            compute_input: d(&st.compute_input),
                            compute_infer: d(&st.compute_infer),
                            compute_output: d(&st.compute_output),
                        })
                        .collect(),
                });
            }
        }
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(
        &self,
        r: Request<pb::RepositoryIndexRequest>,
    ) -> R<pb::RepositoryIndexResponse> {
        let t = self.tenant(&r)?;
        use pb::repository_index_response::ModelIndex;
        let ready_only = r.into_inner().ready;
        let models: Vec<ModelIndex> = self
            .gw
            .repository_index(t, ready_only)
            .into_iter()
            .map(|e| ModelIndex { name: e.name, version: e.version, state: e.state.into(), reason: e.reason })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        r: Request<pb::RepositoryModelLoadRequest>,
    ) -> R<pb::RepositoryModelLoadResponse> {
        let t = self.tenant(&r)?;
        self.gw.tenants.require(t, osprey_core::config::Role::Admin).map_err(status)?;
        let r = r.into_inner();
        if !r.parameters.is_empty() {
            return Err(status(Error::invalid(
                "load takes no parameters here (a config override or uploaded files are not supported)",
            )));
        }
        self.gw.request_load(&r.model_name).await.map_err(status)?;
        Ok(Response::new(pb::RepositoryModelLoadResponse {}))
    }

    async fn repository_model_unload(
        &self,
        r: Request<pb::RepositoryModelUnloadRequest>,
    ) -> R<pb::RepositoryModelUnloadResponse> {
        let t = self.tenant(&r)?;
        self.gw.tenants.require(t, osprey_core::config::Role::Admin).map_err(status)?;
        let r = r.into_inner();
        if r.parameters.keys().any(|k| k != "unload_dependents") {
            return Err(status(Error::invalid("unload takes no parameters but unload_dependents")));
        }
        self.gw.request_unload(&r.model_name).await.map_err(status)?;
        Ok(Response::new(pb::RepositoryModelUnloadResponse {}))
    }

    async fn model_infer(&self, r: Request<pb::ModelInferRequest>) -> R<pb::ModelInferResponse> {
        let t0 = std::time::Instant::now();
        let res = self.infer(r).await;
        self.gw.metrics.grpc_duration.observe(t0.elapsed().as_secs_f64());
        res
    }
}

/// What a `ModelInferRequest` carries once decoded: typed tensors (sizes checked against
/// datatype and shape before anything is allocated), request options and output names.
pub struct Decoded {
    pub inputs: Vec<InputTensor>,
    pub opts: RequestOptions,
    pub outputs: Vec<String>,
}

/// Decodes a request's tensors and options; raw contents move into the tensors (no copy).
/// Pure (no gateway): the fuzz targets drive it with arbitrary messages.
pub fn decode_request(r: &mut pb::ModelInferRequest) -> Result<Decoded, Error> {
    let mut raw = std::mem::take(&mut r.raw_input_contents);
    if !raw.is_empty() && raw.len() != r.inputs.len() {
        return Err(Error::invalid(format!(
            "raw_input_contents has {} entries for {} inputs",
            raw.len(),
            r.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(r.inputs.len());
    for (i, inp) in r.inputs.iter().enumerate() {
        let dt = parse_datatype(&inp.datatype, &inp.name)?;
        let tensor = if let Some(bytes) = raw.get_mut(i) {
            if inp.contents.is_some() {
                return Err(Error::invalid(format!(
                    "input '{}' has both contents and raw contents",
                    inp.name
                )));
            }
            let want = byte_size(dt, &inp.shape)?;
            // BYTES: `want` is the least its layout can take; `from_bytes` checks the layout.
            if bytes.len() != want && !(dt.is_variable() && bytes.len() > want) {
                return Err(Error::invalid(format!(
                    "input '{}': {dt} {:?} needs {want} bytes, raw_input_contents has {}",
                    inp.name,
                    inp.shape,
                    bytes.len()
                )));
            }
            RawTensor::from_bytes(dt, inp.shape.clone(), std::mem::take(bytes))?
        } else {
            let c = inp
                .contents
                .as_ref()
                .ok_or_else(|| Error::invalid(format!("input '{}' has no contents", inp.name)))?;
            from_contents(dt, inp.shape.clone(), c, &inp.name)?
        };
        inputs.push(InputTensor { name: inp.name.clone(), tensor });
    }
    let opts = RequestOptions {
        timeout_us: param_u64(&r.parameters, "timeout")?,
        deadline_ms: param_u64(&r.parameters, "deadline_ms")?,
        priority: param_u64(&r.parameters, "priority")?,
        min_accuracy: param_f64(&r.parameters, "min_accuracy")?,
        max_ensemble: param_u64(&r.parameters, "max_ensemble")?,
        explain: param_bool(&r.parameters, "explain")?,
        min_confidence: param_f64(&r.parameters, "min_confidence")?,
    };
    for o in &r.outputs {
        if o.parameters.contains_key("classification") {
            return Err(Error::invalid("the classification extension is not supported"));
        }
    }
    let outputs: Vec<String> = r.outputs.iter().map(|o| o.name.clone()).collect();
    Ok(Decoded { inputs, opts, outputs })
}

impl InferenceService {
    async fn infer(&self, r: Request<pb::ModelInferRequest>) -> R<pb::ModelInferResponse> {
        let tenant = self.tenant(&r)?;
        let mut r = r.into_inner();
        self.gw.tenants.check_model(tenant, &r.model_name).map_err(status)?;
        let gw = &self.gw;
        if gw.split(&r.model_name).is_some() {
            let result = async {
                let d = decode_request(&mut r)?;
                gw.infer_split(&r.model_name, &r.model_version, d.inputs, &d.outputs, &d.opts, tenant).await
            }
            .await;
            let o = result.map_err(|e| {
                count_edge_error(gw, &r.model_name, &e);
                status(e)
            })?;
            use pb::infer_parameter::ParameterChoice as C;
            let param = |c| pb::InferParameter { parameter_choice: Some(c) };
            let mut parameters = HashMap::new();
            parameters.insert(
                "split_epoch".to_string(),
                param(C::Int64Param(o.epochs.iter().copied().max().unwrap_or(0) as i64)),
            );
            parameters.insert("split_attempts".to_string(), param(C::Int64Param(o.attempts as i64)));
            return Ok(Response::new(pb::ModelInferResponse {
                model_name: o.model,
                model_version: String::new(),
                id: r.id,
                parameters,
                outputs: vec![pb::model_infer_response::InferOutputTensor {
                    name: "embedding".into(),
                    datatype: o.embedding.datatype.as_str().into(),
                    shape: o.embedding.shape.clone(),
                    parameters: HashMap::new(),
                    contents: None,
                }],
                raw_output_contents: vec![o.embedding.data],
            }));
        }
        let result = async {
            let d = decode_request(&mut r)?;
            let valid =
                gw.validate(&r.model_name, &r.model_version, r.id.clone(), d.inputs, &d.outputs, &d.opts)?;
            gw.infer(valid, tenant).await
        }
        .await;
        let mut o = match result {
            Ok(o) => o,
            Err(e) => {
                count_edge_error(gw, &r.model_name, &e);
                return Err(status(e));
            }
        };
        use pb::infer_parameter::ParameterChoice as C;
        let mut parameters = HashMap::new();
        for (k, v) in response_parameters(&o) {
            let choice = match v {
                ParamValue::Bool(b) => C::BoolParam(b),
                ParamValue::Int(i) => C::Int64Param(i),
                ParamValue::Double(d) => C::DoubleParam(d),
                ParamValue::Str(s) => C::StringParam(s.to_string()),
                ParamValue::Owned(s) => C::StringParam(s),
            };
            parameters.insert(k.to_string(), pb::InferParameter { parameter_choice: Some(choice) });
        }
        let mut outputs = Vec::with_capacity(o.outputs.len());
        let mut raw = Vec::with_capacity(o.outputs.len());
        for (idx, t) in std::mem::take(&mut o.outputs) {
            outputs.push(pb::model_infer_response::InferOutputTensor {
                name: o.output_name(idx).to_string(),
                datatype: t.datatype.as_str().into(),
                shape: t.shape,
                parameters: HashMap::new(),
                contents: None,
            });
            raw.push(t.data);
        }
        Ok(Response::new(pb::ModelInferResponse {
            model_name: o.addressed_name().into(),
            model_version: o.model.variants[o.variant].spec.name.clone(),
            id: r.id,
            parameters,
            outputs,
            raw_output_contents: raw,
        }))
    }
}
