//! Pipelines served live: a `pipeline.toml` of the repository addressed as one model over the
//! Open Inference Protocol. Its inputs are the first stage's, its outputs the last stage's; each
//! stage is an ordinary served model with its own queue, batching and variant choice, and the
//! tensors between stages stay in the gateway (no round trip through the client).
//!
//! # The deadline split
//! A request's end-to-end deadline D is split as the stages run, each stage taking a share of
//! what is left in proportion to its expected work:
//! ```text
//! wₙ      = p50 of stage n's most accurate variant at batch 1 (profiled), at least 100 µs
//! budgetₖ = (D − now) · wₖ / Σ_{n ≥ k} wₙ          stage k's deadline = now + budgetₖ
//! ```
//! (`osprey_policy::configure::stage_budget`, the decision; this module only applies it.)
//! Slack that a fast stage leaves passes to the stages after it, and a slow one eats only its
//! own share: a late stage fails the request early (504) instead of letting the next stage
//! start work that cannot finish. The sample quota is charged once, at the first stage.
//!
//! The response says which variant and node ran every stage (`pipeline_stages`), and its
//! estimated accuracy is the product of the stages' estimates (each stage right, taken as
//! independent).

use crate::gateway::{Charge, Gateway, InferOutcome, ModelEntry, ValidRequest};
use osprey_core::error::{Error, Result};
use osprey_core::model::{ModelSpec, TensorSpec};
use osprey_core::pipeline::PipelineSpec;
use osprey_core::profile::Quantile;
use osprey_policy::configure::stage_budget;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A served pipeline: its spec, the stage models, and for every stage after the first, the
/// previous stage's output index feeding each of its inputs.
#[derive(Debug)]
pub struct PipelineEntry {
    pub spec: PipelineSpec,
    pub stages: Vec<Arc<ModelEntry>>,
    pub feeds: Vec<Vec<usize>>,
    /// wₙ of the module docs, µs.
    pub weights_us: Vec<f64>,
    /// Requests admitted since start (the control loop's load telemetry).
    pub arrivals: Arc<std::sync::atomic::AtomicU64>,
}

/// A pipeline's answer: the entry and what ran each stage.
#[derive(Debug, Clone)]
pub struct PipelineRun {
    pub entry: Arc<PipelineEntry>,
    pub stages: Vec<StageTrace>,
}

/// Which variant and node answered one stage.
#[derive(Debug, Clone)]
pub struct StageTrace {
    pub stage: String,
    pub model: String,
    pub variant: String,
    pub node: Arc<str>,
}

impl PipelineEntry {
    /// Builds the entry when every stage model is served; the chain was checked on load.
    pub fn new(spec: PipelineSpec, served: &[Arc<ModelEntry>]) -> Result<PipelineEntry> {
        let specs: Vec<ModelSpec> = served.iter().map(|m| m.spec.clone()).collect();
        spec.check(&specs)?;
        let mut stages = Vec::new();
        for s in &spec.stages {
            let m = served.iter().find(|m| m.name() == s.model).ok_or_else(|| {
                Error::unavailable(format!(
                    "pipeline '{}': stage model '{}' is not served",
                    spec.name, s.model
                ))
            })?;
            stages.push(m.clone());
        }
        let mut feeds = vec![Vec::new()];
        for k in 1..stages.len() {
            let prev = &stages[k - 1].spec.outputs;
            let decl = &spec.stages[k];
            let f = stages[k]
                .spec
                .inputs
                .iter()
                .map(|i| {
                    let from = decl.inputs.get(&i.name).unwrap_or(&i.name);
                    prev.iter().position(|o| &o.name == from).unwrap_or(0)
                })
                .collect();
            feeds.push(f);
        }
        let weights_us = stages
            .iter()
            .map(|m| {
                let best = (0..m.variants.len())
                    .max_by(|&a, &b| m.variants[a].spec.accuracy.total_cmp(&m.variants[b].spec.accuracy));
                best.and_then(|i| m.variants[i].profile.latency_us(1, Quantile::P50))
                    .unwrap_or(0.0)
                    .max(100.0)
            })
            .collect();
        Ok(PipelineEntry { spec, stages, feeds, weights_us, arrivals: Default::default() })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.stages[0].spec.inputs
    }
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.stages[self.stages.len() - 1].spec.outputs
    }

    /// Stage k's share of `left` (the module docs' rule, `osprey_policy::configure::stage_budget`).
    pub fn budget(&self, k: usize, left: Duration) -> Duration {
        Duration::from_secs_f64(stage_budget(&self.weights_us, k, left.as_secs_f64()))
    }
}

impl Gateway {
    /// Runs `req` (validated against the pipeline's inputs and outputs) through every stage.
    pub(crate) async fn infer_pipeline(
        &self,
        p: Arc<PipelineEntry>,
        req: ValidRequest,
        tenant: usize,
    ) -> Result<InferOutcome> {
        let started = Instant::now();
        p.arrivals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slo = Duration::from_millis(self.tenants.get(tenant).config.latency_slo_ms);
        let total = req.timeout.map_or(slo, |t| t.min(slo));
        let deadline = started + total;
        let mut inputs = req.inputs;
        let mut traces = Vec::with_capacity(p.stages.len());
        let (mut queue, mut compute, mut accuracy) = (Duration::ZERO, Duration::ZERO, 1.0);
        let last = p.stages.len() - 1;
        for (k, stage) in p.stages.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    osprey_core::ErrorCode::DeadlineExceeded,
                    format!(
                        "pipeline '{}' ran out of time before stage '{}'",
                        p.name(),
                        p.spec.stages[k].name
                    ),
                ));
            }
            let stage_req = ValidRequest {
                model: stage.clone(),
                id: req.id.clone(),
                pinned: None,
                inputs,
                rows: req.rows,
                outputs: if k == last {
                    req.outputs.clone()
                } else {
                    (0..stage.spec.outputs.len()).collect()
                },
                timeout: Some(p.budget(k, left).max(Duration::from_micros(1))),
                priority: req.priority,
                min_accuracy: req.min_accuracy,
                pipeline: None,
                multimodal: None,
            };
            let mut o = self
                .infer_stage(stage_req, tenant, if k == 0 { Charge::Admit } else { Charge::Free })
                .await?;
            queue += o.queue;
            compute += o.compute;
            accuracy *= o.estimated_accuracy;
            traces.push(StageTrace {
                stage: p.spec.stages[k].name.clone(),
                model: stage.name().to_string(),
                variant: stage.variants[o.variant].spec.name.clone(),
                node: o.node.clone(),
            });
            if k == last {
                o.queue = queue;
                o.compute = compute;
                o.estimated_accuracy = accuracy;
                o.deadline_met = Instant::now() <= deadline;
                o.pipeline = Some(PipelineRun { entry: p.clone(), stages: traces });
                return Ok(o);
            }
            let mut outs: Vec<Option<osprey_core::tensor::RawTensor>> = vec![None; stage.spec.outputs.len()];
            for (i, t) in o.outputs {
                outs[i] = Some(t);
            }
            inputs = p.feeds[k + 1]
                .iter()
                .map(|&i| outs[i].clone().ok_or_else(|| Error::internal("a stage output went missing")))
                .collect::<Result<Vec<_>>>()?;
        }
        Err(Error::internal("a pipeline without stages"))
    }
}

/// `stage=model/variant@node` for every stage, comma-separated (a response parameter).
pub fn stages_parameter(traces: &[StageTrace]) -> String {
    traces
        .iter()
        .map(|t| format!("{}={}/{}@{}", t.stage, t.model, t.variant, t.node))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_stages_expected_work() {
        let p = PipelineEntry {
            spec: PipelineSpec {
                name: "p".into(),
                dir: "/p".into(),
                description: String::new(),
                slo_ms: 10.0,
                stages: Vec::new(),
            },
            stages: Vec::new(),
            feeds: Vec::new(),
            weights_us: vec![100.0, 300.0, 600.0],
            arrivals: Default::default(),
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        assert!((ms(p.budget(0, Duration::from_millis(10))) - 1.0).abs() < 1e-6);
        assert!((ms(p.budget(1, Duration::from_millis(9))) - 3.0).abs() < 1e-6);
        assert!((ms(p.budget(2, Duration::from_millis(4))) - 4.0).abs() < 1e-6);
    }
}
