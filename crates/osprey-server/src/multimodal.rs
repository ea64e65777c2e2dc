//! Multi-modal models served live: a `multimodal.toml` of the repository addressed as one
//! model over the Open Inference Protocol. A request carries the inputs of one or more of its
//! modalities (each modality's inputs are its member model's, named as there); the answer is
//! the fused class probabilities under the model's output name, and the response parameters
//! say which modalities and variants answered, the fused confidence and whether refinement
//! happened.
//!
//! Decisions are `osprey_policy::refine` (sans-IO): this module builds its services (every
//! variant of every modality the request carries and the tenant may use, with the per-input
//! accuracy estimate, the per-class accuracy profile, and `Dispatcher::expected_service` for
//! the instance it would run on), runs the calls it asks for one after another, each as an
//! ordinary request of the member model pinned to the variant (its own queue, batching and
//! instance selection), and reports answers and failures back.
//!
//! The tenant's sample and cost quotas are charged once, by the first call; later calls of
//! the same request are not charged again. The time budget is the tenant's
//! `quality.time_budget_ms` (default its `latency_slo_ms`), tightened by the request's
//! `timeout` or `deadline_ms`.

use crate::gateway::{Charge, Gateway, InferOutcome, InputTensor, ModelEntry, RequestOptions, ValidRequest};
use osprey_core::ErrorCode;
use osprey_core::error::{Error, Result};
use osprey_core::model::{ModelSpec, TensorSpec};
use osprey_core::multimodal::{ExplainMiss, ExplainWhen, Fusion, MultiModalSpec};
use osprey_core::tensor::RawTensor;
use osprey_policy::refine::{
    Objective, Plan, Refinement, Service, Step, Stop, argmax, confidence, explain_estimate,
    fan_out_explainer, fuse, plan,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A served multi-modal model: its spec, and its inputs (the members' in modality order, each
/// with the modality it belongs to). Members are looked up by name at each request, so a
/// member reloaded or unloaded by model control is seen at once.
#[derive(Debug)]
pub struct MultiModalEntry {
    pub spec: MultiModalSpec,
    pub inputs: Vec<(usize, TensorSpec)>,
    pub output: TensorSpec,
    /// The outputs a request may name: the fused probabilities, then `explanation` (FP32
    /// `[-1, -1]`: per row, one attribution per patch of the modality that answered first)
    /// when some member declares `[explain]`.
    pub outputs: Vec<TensorSpec>,
    pub labels: Vec<String>,
}

/// The explanation output's name.
pub const EXPLANATION: &str = "explanation";

/// The validated parts of a multi-modal request: per modality, the member model's request,
/// or `None` when the request does not carry that modality.
#[derive(Debug)]
pub struct MultiModalRequest {
    pub entry: Arc<MultiModalEntry>,
    pub parts: Vec<Option<ValidRequest>>,
    /// The request's `max_ensemble` and `min_confidence` parameters.
    pub max_ensemble: Option<usize>,
    pub min_confidence: Option<f64>,
    /// The request asked for an explanation (parameter `explain`, or the output named).
    pub explain: bool,
}

/// One call that answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub modality: String,
    pub model: String,
    pub variant: String,
    pub node: Arc<str>,
    pub estimated_accuracy: f64,
}

/// How a multi-modal request was answered.
#[derive(Debug, Clone)]
pub struct MultiModalRun {
    pub entry: Arc<MultiModalEntry>,
    pub answers: Vec<Answer>,
    pub fused_confidence: f64,
    pub refined: bool,
    pub stop: Stop,
    pub fusion: Fusion,
    /// Calls made, failed ones included.
    pub calls: usize,
    /// When an explanation was wanted: `Ok("modality=model/variant")` that explained, or
    /// `Err(why it was skipped)`.
    pub explained: Option<std::result::Result<String, String>>,
}

impl MultiModalRun {
    /// The modalities that answered, comma-separated, in answer order (a response parameter).
    pub fn modalities(&self) -> String {
        let mut seen: Vec<&str> = Vec::new();
        for a in &self.answers {
            if !seen.contains(&a.modality.as_str()) {
                seen.push(&a.modality);
            }
        }
        seen.join(",")
    }

    /// `modality=model/variant@node` per answer, comma-separated (a response parameter).
    pub fn ensemble(&self) -> String {
        self.answers
            .iter()
            .map(|a| format!("{}={}/{}@{}", a.modality, a.model, a.variant, a.node))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl MultiModalEntry {
    /// Checks the spec against the served models (`MultiModalSpec::check`).
    pub fn new(spec: MultiModalSpec, served: &[Arc<ModelEntry>]) -> Result<MultiModalEntry> {
        let specs: Vec<ModelSpec> = served.iter().map(|m| m.spec.clone()).collect();
        let members = spec.check(&specs)?;
        let inputs = members
            .iter()
            .enumerate()
            .flat_map(|(k, m)| m.inputs.iter().map(move |t| (k, t.clone())))
            .collect();
        let labels = members[0].labels.clone();
        let output = TensorSpec {
            name: spec.output.clone(),
            datatype: osprey_core::tensor::DataType::Fp32,
            shape: vec![-1, labels.len() as i64],
        };
        let mut outputs = vec![output.clone()];
        if members.iter().any(|m| m.explain.is_some()) {
            outputs.push(TensorSpec {
                name: EXPLANATION.into(),
                datatype: osprey_core::tensor::DataType::Fp32,
                shape: vec![-1, -1],
            });
        }
        Ok(MultiModalEntry { spec, inputs, output, outputs, labels })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Member model names in modality order.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.spec.modalities.iter().map(|m| m.model.as_str())
    }

    /// `modality=model` per modality, comma-separated.
    pub fn modalities_parameter(&self) -> String {
        self.spec.modalities.iter().map(|m| format!("{}={}", m.name, m.model)).collect::<Vec<_>>().join(",")
    }

    pub fn fusion_parameter(&self) -> String {
        self.spec.fusion.iter().map(|f| f.as_str()).collect::<Vec<_>>().join(",")
    }
}

impl Gateway {
    /// Validates a request to multi-modal model `mm`: every tensor belongs to one modality,
    /// each modality it carries has all its inputs (checked by that member model's own rules),
    /// one batch size throughout, and only the fused output may be asked for.
    pub(crate) fn validate_multimodal(
        &self,
        mm: Arc<MultiModalEntry>,
        version: &str,
        id: String,
        inputs: Vec<InputTensor>,
        outputs: &[String],
        opts: &RequestOptions,
    ) -> Result<ValidRequest> {
        let name = mm.name().to_string();
        if !version.is_empty() {
            return Err(Error::not_found(format!(
                "multi-modal model '{name}' has no versions; address it as /v2/models/{name}"
            )));
        }
        if opts.max_ensemble == Some(0) {
            return Err(Error::invalid("max_ensemble must be at least 1"));
        }
        if let Some(c) = opts.min_confidence
            && !(0.0..=1.0).contains(&c)
        {
            return Err(Error::invalid("min_confidence must be within 0..1"));
        }
        if let Some(o) = outputs.iter().find(|o| !mm.outputs.iter().any(|t| &t.name == *o)) {
            let names: Vec<&str> = mm.outputs.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::invalid(format!(
                "model '{name}' has no output '{o}'; it has {}",
                names.join(", ")
            )));
        }
        let explain = opts.explain.unwrap_or(false) || outputs.iter().any(|o| o == EXPLANATION);
        if explain && mm.outputs.len() < 2 {
            return Err(Error::invalid(format!("no modality of '{name}' declares explanations ([explain])")));
        }
        let mut groups: Vec<Vec<InputTensor>> = (0..mm.spec.modalities.len()).map(|_| Vec::new()).collect();
        for it in inputs {
            let Some((k, _)) = mm.inputs.iter().find(|(_, t)| t.name == it.name) else {
                let names: Vec<String> = mm
                    .inputs
                    .iter()
                    .map(|(k, t)| format!("{} ({})", t.name, mm.spec.modalities[*k].name))
                    .collect();
                return Err(Error::invalid(format!(
                    "model '{name}' has no input '{}'; its inputs are: {}",
                    it.name,
                    names.join(", ")
                )));
            };
            groups[*k].push(it);
        }
        if groups.iter().all(Vec::is_empty) {
            return Err(Error::invalid(format!(
                "a request to '{name}' must carry the inputs of at least one modality ({})",
                mm.modalities_parameter()
            )));
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut rows: Option<u32> = None;
        for (k, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                parts.push(None);
                continue;
            }
            let modality = &mm.spec.modalities[k];
            let part = self
                .validate(&modality.model, "", id.clone(), group, std::slice::from_ref(&mm.output.name), opts)
                .map_err(|e| {
                    let code = if e.code == ErrorCode::NotFound { ErrorCode::Unavailable } else { e.code };
                    Error::new(
                        code,
                        format!("modality '{}' (model '{}'): {}", modality.name, modality.model, e.message),
                    )
                })?;
            if *rows.get_or_insert(part.rows) != part.rows {
                return Err(Error::invalid("every modality's inputs must have the same batch size"));
            }
            parts.push(Some(part));
        }
        let first = parts.iter().flatten().next().ok_or_else(|| Error::internal("no modality validated"))?;
        Ok(ValidRequest {
            model: first.model.clone(),
            id,
            pinned: None,
            inputs: Vec::new(),
            rows: first.rows,
            outputs: first.outputs.clone(),
            timeout: first.timeout,
            priority: first.priority,
            min_accuracy: first.min_accuracy,
            pipeline: None,
            multimodal: Some(Box::new(MultiModalRequest {
                entry: mm,
                parts,
                max_ensemble: opts.max_ensemble.map(|n| n.min(usize::MAX as u64) as usize),
                min_confidence: opts.min_confidence,
                explain,
            })),
        })
    }

    /// Answers a validated multi-modal request by cross-modal refinement (module docs).
    pub(crate) async fn infer_multimodal(
        &self,
        m: MultiModalRequest,
        req: ValidRequest,
        tenant: usize,
    ) -> Result<InferOutcome> {
        let name = m.entry.name().to_string();
        let result = self.refine(&m, &req, tenant).await;
        let label = result.as_ref().map_or_else(|e| e.code.label(), |_| "ok");
        self.metrics.request(&name, "", label);
        result
    }

    async fn refine(&self, m: &MultiModalRequest, req: &ValidRequest, tenant: usize) -> Result<InferOutcome> {
        let started = Instant::now();
        let tcfg = &self.tenants.get(tenant).config;
        let q = tcfg.quality.clone().unwrap_or_default();
        let spec = &m.entry.spec;
        for (k, part) in m.parts.iter().enumerate() {
            let modality = &spec.modalities[k].name;
            if part.is_some() && !q.modalities.is_empty() && !q.modalities.contains(modality) {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "tenant '{}' may use the modalities {} of '{}'; this request carries '{modality}'",
                        tcfg.name,
                        q.modalities.join(", "),
                        spec.name
                    ),
                ));
            }
        }
        let fusion = q.fusion.unwrap_or(spec.fusion[0]);
        if !spec.fusion.contains(&fusion) {
            return Err(Error::invalid(format!(
                "tenant '{}' asks for fusion '{}', which '{}' does not support ({})",
                tcfg.name,
                fusion.as_str(),
                spec.name,
                m.entry.fusion_parameter()
            )));
        }
        let explain = match (q.explain, m.explain) {
            (ExplainWhen::Never, true) => {
                return Err(Error::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "tenant '{}' has explanations turned off (quality.explain = \"never\")",
                        tcfg.name
                    ),
                ));
            }
            (ExplainWhen::Always, _) | (ExplainWhen::Requested, true) => Some(q.explain_miss),
            _ => None,
        };
        let budget = Duration::from_millis(q.time_budget_ms.unwrap_or(tcfg.latency_slo_ms));
        let budget = req.timeout.map_or(budget, |t| t.min(budget));
        let mut services = Vec::new();
        for (k, part) in m.parts.iter().enumerate() {
            let Some(part) = part else { continue };
            let entry = &part.model;
            let estimate = crate::gateway::estimate(entry, part);
            let patches = entry.spec.explain.as_ref().map_or(0, |x| x.patches() as u32);
            for (v, variant) in entry.variants.iter().enumerate() {
                let Some(e) = self.cluster.expected_service(entry.index, v, part.rows) else { continue };
                let explain_us = (patches > 0).then(|| {
                    let batch = self.cluster.expected_service(entry.index, v, part.rows * patches);
                    let profiled = variant.profile.explain_us.unwrap_or(0.0) * f64::from(part.rows);
                    explain_estimate(batch.map(|b| b.latency_us), profiled)
                });
                services.push(Service {
                    modality: k,
                    variant: v,
                    accuracy: estimate.get(v).copied().unwrap_or(variant.spec.accuracy),
                    profiled_accuracy: variant.spec.accuracy,
                    class_accuracy: variant.spec.class_accuracy.clone(),
                    latency_us: e.latency_us,
                    idle_us: e.idle_us,
                    admit_us: e.admit_us,
                    failure_rate: e.failure_rate,
                    explain_us,
                });
            }
        }
        if services.is_empty() {
            return Err(Error::unavailable(format!(
                "no live node hosts a variant of the modalities this request to '{}' carries",
                spec.name
            )));
        }
        let floor = tcfg.accuracy_floor.max(req.min_accuracy.unwrap_or(0.0));
        let mut objective = Objective::from_quality(&q, budget.as_micros() as u64, floor, fusion, explain);
        objective.max_ensemble = m.max_ensemble.map_or(q.max_ensemble, |n| n.min(q.max_ensemble));
        objective.min_confidence = m.min_confidence.unwrap_or(q.min_confidence);
        let deadline = started + budget;
        let mut done = match plan(self.multimodal_policy, objective, &services) {
            Plan::Refine(objective) => self.run_refinement(m, tenant, objective, services).await?,
            Plan::FanOut { calls, fusion } => {
                self.run_fan_out(m, tenant, services, &calls, fusion, deadline).await?
            }
            Plan::Hindsight => {
                return Err(Error::internal("the oracle multi-modal policy exists only in the simulator"));
            }
        };
        let Some(mut o) = done.first.take() else {
            return Err(done.last_error.take().unwrap_or_else(|| {
                let fastest = done.services.iter().map(Service::expected_us).fold(f64::INFINITY, f64::min);
                let with = if explain == Some(ExplainMiss::Refuse) { " with its explanation" } else { "" };
                Error::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "no modality of this request can answer{with} within its {} us budget (the fastest \
                         answer is expected to take {fastest:.0} us)",
                        budget.as_micros()
                    ),
                )
            }));
        };
        let classes = m.entry.labels.len();
        let flat: Vec<f32> = done.fused.iter().flatten().copied().collect();
        let tensor = RawTensor::from_f32(vec![done.fused.len() as i64, classes as i64], &flat)?;
        o.outputs = vec![(0, tensor)];
        let mut explained = None;
        if explain.is_some() {
            let targets: Vec<usize> = done.fused.iter().map(|row| argmax(row)).collect();
            let why = match done.explainer {
                None => Err("it could not finish within the time budget".to_string()),
                Some((k, ref base)) => {
                    let s = done.services[k].clone();
                    match self.explanation(m, &s, base, &targets, tenant, deadline).await {
                        Ok(t) => {
                            o.outputs.push((1, t));
                            let modality = &spec.modalities[s.modality];
                            let variant = m.parts[s.modality]
                                .as_ref()
                                .and_then(|p| p.model.variants.get(s.variant))
                                .map_or("", |v| v.spec.name.as_str());
                            Ok(format!("{}={}/{variant}", modality.name, modality.model))
                        }
                        Err(e) => Err(e.message),
                    }
                }
            };
            explained = Some(why);
        }
        o.queue = done.queue;
        o.compute = done.compute;
        o.batch_size = done.batch;
        o.deadline_met = Instant::now() <= deadline;
        o.estimated_accuracy = done.answers.iter().map(|a| a.estimated_accuracy).fold(0.0, f64::max);
        o.multimodal = Some(Box::new(MultiModalRun {
            entry: m.entry.clone(),
            fused_confidence: confidence(&done.fused),
            refined: done.answers.len() > 1,
            stop: done.stop,
            fusion: done.fusion,
            calls: done.calls,
            answers: done.answers,
            explained,
        }));
        Ok(o)
    }

    /// The member request of one call: modality `part`'s inputs, pinned to `variant` (or left
    /// to the member model's rule), to answer within `timeout`.
    fn member_call(part: &ValidRequest, variant: Option<usize>, timeout: Duration) -> ValidRequest {
        Self::call_with(part, variant, part.inputs.clone(), part.rows, timeout)
    }

    /// [`Self::member_call`] on other inputs of `rows` rows (an explanation's masked copies).
    fn call_with(
        part: &ValidRequest,
        variant: Option<usize>,
        inputs: Vec<RawTensor>,
        rows: u32,
        timeout: Duration,
    ) -> ValidRequest {
        ValidRequest {
            model: part.model.clone(),
            id: part.id.clone(),
            pinned: variant,
            inputs,
            rows,
            outputs: part.outputs.clone(),
            timeout: Some(timeout.max(Duration::from_micros(1))),
            priority: part.priority,
            min_accuracy: None,
            pipeline: None,
            multimodal: None,
        }
    }

    /// Calls one after another as `osprey_policy::refine::Refinement` decides.
    async fn run_refinement(
        &self,
        m: &MultiModalRequest,
        tenant: usize,
        objective: Objective,
        services: Vec<Service>,
    ) -> Result<Answered> {
        let spec = &m.entry.spec;
        let fusion = objective.fusion;
        let mut r = Refinement::new(objective, services, self.now_us());
        let mut done = Answered::new(fusion);
        let mut charged = false;
        let stop = loop {
            let now_us = self.now_us();
            // The instances' queues and health as they are now, not as they were at arrival.
            r.refresh(|s| {
                let part = m.parts[s.modality].as_ref()?;
                self.cluster.expected_service(part.model.index, s.variant, part.rows)
            });
            match r.poll(now_us) {
                Step::Done(stop) => break stop,
                Step::Wait => return Err(Error::internal("a refinement call is outstanding")),
                Step::Call { service, deadline: by } => {
                    let s = r.services()[service].clone();
                    let Some(part) = m.parts[s.modality].as_ref() else {
                        r.handle_failure(service, now_us);
                        continue;
                    };
                    let call = Self::member_call(
                        part,
                        Some(s.variant),
                        Duration::from_micros(by.saturating_sub(now_us)),
                    );
                    let charge = if charged { Charge::Free } else { Charge::Admit };
                    let result = self.infer_stage(call, tenant, charge).await;
                    // A tenant over its quota or queue share ends the request; anything else
                    // is one failed call (the quota was charged at admission).
                    if let Err(e) = &result
                        && e.code == ErrorCode::ResourceExhausted
                    {
                        return Err(e.clone());
                    }
                    charged = true;
                    match done.take(result, m, spec) {
                        Some(rows) => r.handle_answer(service, rows, self.now_us()),
                        None => r.handle_failure(service, self.now_us()),
                    }
                }
            }
        };
        done.fused = r.fused().to_vec();
        done.stop = stop;
        done.calls = r.calls();
        done.explainer = r.explain_with(self.now_us()).map(|k| {
            let base = r.answer(k).unwrap_or_default().iter().flatten().copied().collect();
            (k, base)
        });
        done.services = r.services().to_vec();
        Ok(done)
    }

    /// Every call of `calls` at once; the answers fused by `fusion` once all have ended.
    async fn run_fan_out(
        &self,
        m: &MultiModalRequest,
        tenant: usize,
        mut services: Vec<Service>,
        calls: &[(usize, bool)],
        fusion: Fusion,
        deadline: Instant,
    ) -> Result<Answered> {
        let spec = &m.entry.spec;
        let left = deadline.saturating_duration_since(Instant::now());
        let member_calls: Vec<(usize, ValidRequest)> = calls
            .iter()
            .filter_map(|&(service, pinned)| {
                let s = services.get(service)?;
                let part = m.parts[s.modality].as_ref()?;
                Some((service, Self::member_call(part, pinned.then_some(s.variant), left)))
            })
            .collect();
        // The tenant is charged once, by the first call, before any call runs: a refused
        // request costs no member any work.
        if let Some((_, first)) = member_calls.first() {
            self.admit_call(first, tenant)?;
        }
        let mut futures = Vec::with_capacity(member_calls.len());
        for (i, (service, call)) in member_calls.into_iter().enumerate() {
            let charge = if i == 0 { Charge::Admitted } else { Charge::Free };
            futures.push(async move {
                let r = self.infer_stage(call, tenant, charge).await;
                (Instant::now(), service, r)
            });
        }
        let mut ended = join_all(futures).await;
        ended.sort_by_key(|(at, _, _)| *at);
        if let Some((_, _, Err(e))) =
            ended.iter().find(|(_, _, r)| r.as_ref().is_err_and(|e| e.code == ErrorCode::ResourceExhausted))
        {
            return Err(e.clone());
        }
        let mut done = Answered::new(fusion);
        done.calls = ended.len();
        let mut rows_of: Vec<(Vec<Vec<f32>>, usize)> = Vec::new();
        for (_, service, result) in ended {
            // An unpinned call's answer is the variant that ran.
            let ran = result.as_ref().ok().and_then(|o| {
                let modality = services.get(service)?.modality;
                services.iter().position(|s| s.modality == modality && s.variant == o.variant)
            });
            if let Some(rows) = done.take(result, m, spec) {
                rows_of.push((rows, ran.unwrap_or(service)));
            }
        }
        let parts: Vec<(&[Vec<f32>], &Service)> =
            rows_of.iter().map(|(rows, s)| (rows.as_slice(), &services[*s])).collect();
        done.fused = fuse(fusion, &parts);
        done.stop = Stop::FannedOut;
        // The explanation's time as it is now, on the first answer's service.
        let now_us = self.now_us();
        let left_us = deadline.saturating_duration_since(Instant::now()).as_micros() as u64;
        let first = rows_of.first().map(|(_, s)| *s);
        done.explainer = fan_out_explainer(&services, first, now_us, now_us + left_us).and_then(|k| {
            let base = rows_of.first()?.0.iter().flatten().copied().collect();
            Some((k, base))
        });
        done.services = std::mem::take(&mut services);
        Ok(done)
    }

    /// Occlusion attribution of `targets` (per row) by service `s`: the masked copies of its
    /// modality's inputs go through the dispatcher pinned to `s`'s variant (in pieces of at
    /// most the model's batch size), not charged to the tenant again.
    async fn explanation(
        &self,
        m: &MultiModalRequest,
        s: &Service,
        base: &[f32],
        targets: &[usize],
        tenant: usize,
        deadline: Instant,
    ) -> Result<RawTensor> {
        let part = m.parts[s.modality].as_ref().ok_or_else(|| Error::internal("no such modality"))?;
        let x =
            part.model.spec.explain.clone().ok_or_else(|| Error::internal("the model does not explain"))?;
        let patches = x.patches();
        let masked = osprey_engine::explain::occlude(&part.inputs, &x)?;
        let total = part.rows as usize * patches;
        let piece = part.model.spec.max_batch_size.max(1) as usize;
        let mut probs: Vec<f32> = Vec::with_capacity(total * m.entry.labels.len());
        let mut start = 0;
        while start < total {
            let n = piece.min(total - start);
            let inputs = masked
                .iter()
                .map(|t| {
                    let per = t.data.len() / total;
                    let mut shape = t.shape.clone();
                    shape[0] = n as i64;
                    RawTensor::from_bytes(t.datatype, shape, t.data[start * per..(start + n) * per].to_vec())
                })
                .collect::<Result<Vec<_>>>()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorCode::DeadlineExceeded,
                    "the time budget ran out while explaining",
                ));
            }
            let call = Self::call_with(part, Some(s.variant), inputs, n as u32, left);
            let o = self.infer_stage(call, tenant, Charge::Free).await?;
            probs.extend(probabilities(&o, m.entry.labels.len())?.into_iter().flatten());
            start += n;
        }
        let a = osprey_engine::explain::attribution(base, &probs, m.entry.labels.len(), patches, targets)?;
        RawTensor::from_f32(vec![part.rows as i64, patches as i64], &a)
    }
}

/// The class probabilities of a member's answer, per row.
fn probabilities(o: &InferOutcome, classes: usize) -> Result<Vec<Vec<f32>>> {
    let (_, t) =
        o.outputs.first().ok_or_else(|| Error::internal("a modality answered without its output"))?;
    let values = t.to_f32()?;
    if classes == 0 || values.len() % classes != 0 {
        return Err(Error::internal(format!(
            "model '{}' answered {} values, not rows of {classes} class probabilities",
            o.model.name(),
            values.len()
        )));
    }
    Ok(values.chunks(classes).map(<[f32]>::to_vec).collect())
}

/// What the calls of one request came to, whichever way they were made.
struct Answered {
    /// The first answer's outcome (its model, variant and node stand for the request's).
    first: Option<InferOutcome>,
    answers: Vec<Answer>,
    fused: Vec<Vec<f32>>,
    fusion: Fusion,
    stop: Stop,
    calls: usize,
    /// The service to explain with and its own answer (flattened rows).
    explainer: Option<(usize, Vec<f32>)>,
    services: Vec<Service>,
    last_error: Option<Error>,
    queue: Duration,
    compute: Duration,
    batch: u32,
}

impl Answered {
    fn new(fusion: Fusion) -> Answered {
        Answered {
            first: None,
            answers: Vec::new(),
            fused: Vec::new(),
            fusion,
            stop: Stop::Exhausted,
            calls: 0,
            explainer: None,
            services: Vec::new(),
            last_error: None,
            queue: Duration::ZERO,
            compute: Duration::ZERO,
            batch: 1,
        }
    }

    /// Records one call's result; its class probabilities when it answered usably.
    fn take(
        &mut self,
        result: Result<InferOutcome>,
        m: &MultiModalRequest,
        spec: &MultiModalSpec,
    ) -> Option<Vec<Vec<f32>>> {
        let o = match result {
            Ok(o) => o,
            Err(e) => {
                self.last_error = Some(e);
                return None;
            }
        };
        // Every modality of a request has its rows (validated); an answer with other rows
        // cannot be fused with the rest and is a failed call.
        let want = m.parts.iter().flatten().next().map_or(0, |p| p.rows as usize);
        let rows = match probabilities(&o, m.entry.labels.len()) {
            Ok(rows) if rows.len() == want => rows,
            Ok(rows) => {
                self.last_error = Some(Error::internal(format!(
                    "model '{}' answered {} rows for a request of {want}",
                    o.model.name(),
                    rows.len()
                )));
                return None;
            }
            Err(e) => {
                self.last_error = Some(e);
                return None;
            }
        };
        self.queue += o.queue;
        self.compute += o.compute;
        self.batch = o.batch_size;
        let modality =
            spec.modalities.iter().find(|d| d.model == o.model.name()).map_or("", |d| d.name.as_str());
        self.answers.push(Answer {
            modality: modality.to_string(),
            model: o.model.name().to_string(),
            variant: o.model.variants[o.variant].spec.name.clone(),
            node: o.node.clone(),
            estimated_accuracy: o.estimated_accuracy,
        });
        if self.first.is_none() {
            self.first = Some(o);
        }
        Some(rows)
    }
}

/// Runs every future to completion, concurrently, on the calling task; outputs in the order
/// given.
async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().flatten().collect()
}
