//! The live control loop (OPD's Algorithm 1, per control interval) for every served pipeline,
//! and for single models as one-stage pipelines:
//!
//! ```text
//! every second:  arrivals of the target in that second → predictor.observe
//! every interval (`[control] interval_s`, 10 s by default):
//!   observation = (mean load of the interval, predictor.predict(), configuration in force)
//!   config      = enforce(policy.decide(problem, observation))      bounded by [control.resources]
//!   per stage n: Cluster::configure(stage model, variant zₙ, max batch bₙ, replicas fₙ)
//! ```
//! The policies and predictors are the same sans-IO objects the simulator drives
//! (`osprey_policy::configure`, `osprey_policy::predict`, and OPD / the LSTM from
//! `osprey-learn`, built by the binary). Applying a configuration changes only what is planned
//! next: batches in flight finish as they were, queued requests are planned under the new
//! configuration, a variant no node hosts yet is loaded first and used once it is (see
//! `Dispatcher::configure`), so a change loses and duplicates nothing. Where a node's memory
//! (as measured when each variant loaded) has no room for the chosen variant, the dispatcher
//! evicts the least recently used idle variant first (`Dispatcher::load`).
//!
//! # Single models
//! A served model that no pipeline uses as a stage, and that `[control] models` names (all by
//! default), is a [`Target`] of one stage named after the model: the same policy picks which of
//! its variants serves and how many replicas and rows per batch it gets; its latency objective
//! is the tightest among the tenants that may run it. Its load is the requests addressed to
//! it directly. Each target's decision is bounded by the whole of `[control.resources]` on its
//! own (the targets do not split the budget between them); what bounds them together is each
//! node's memory, enforced by the dispatcher.
//!
//! The problem each decision solves is built from the served stage models: a stage variant's
//! accuracy from `model.toml`, its cost cₙ from its thread budget, its memory wₙ as declared, its
//! latency lₙ(b) from the profile the gateway plans with plus what a batch of the stage has
//! been measured to cost beyond its node's own time (`Dispatcher::batch_overhead_us`: the gRPC
//! round trip to a remote agent, the hand-off to an in-process one), refreshed at every
//! decision. The paper's lₙ(b) is the profiled time alone; on remote agents a batch of a tiny
//! model costs several times its engine time in transport, and a plan that leaves it out puts a
//! stage at the edge of its capacity while the objective reads it as comfortable.

use crate::gateway::{Gateway, ModelEntry};
use crate::pipeline::PipelineEntry;
use osprey_core::config::ControlSection;
use osprey_core::profile::Quantile;
use osprey_policy::configure::{
    Config, ConfigPolicy, Observation, PipelineOptions, Problem, StageOptions, VariantOption, enforce,
    evaluate, minimal,
};
use osprey_policy::predict::LoadPredictor;
use osprey_policy::scheduler::Control;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What one loop configures: a pipeline, or a single model as a one-stage pipeline.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pipeline's or the model's name (the `model` label of the control metrics).
    pub name: String,
    /// (stage name, stage model), in order.
    pub stages: Vec<(String, Arc<ModelEntry>)>,
    /// End-to-end latency objective, ms.
    pub slo_ms: f64,
    /// Requests admitted since start.
    pub arrivals: Arc<AtomicU64>,
    /// Whether this is a single model.
    pub single: bool,
}

impl Target {
    pub fn pipeline(p: &PipelineEntry) -> Target {
        Target {
            name: p.name().to_string(),
            stages: p.spec.stages.iter().map(|d| d.name.clone()).zip(p.stages.iter().cloned()).collect(),
            slo_ms: p.spec.slo_ms,
            arrivals: p.arrivals.clone(),
            single: false,
        }
    }

    pub fn model(m: &Arc<ModelEntry>, slo_ms: f64) -> Target {
        Target {
            name: m.name().to_string(),
            stages: vec![(m.name().to_string(), m.clone())],
            slo_ms,
            arrivals: m.arrivals.clone(),
            single: true,
        }
    }

    /// The decision problem of this target under `[control]`.
    pub fn problem(&self, c: &ControlSection) -> Problem {
        let stages = self
            .stages
            .iter()
            .map(|(name, m)| StageOptions {
                name: name.clone(),
                variants: m
                    .variants
                    .iter()
                    .map(|v| VariantOption {
                        name: v.spec.name.clone(),
                        accuracy: v.spec.accuracy,
                        cores: f64::from(v.spec.threads.max(1)),
                        memory_mb: f64::from(v.spec.memory_mb),
                        latency_s: v
                            .profile
                            .batches
                            .iter()
                            .filter_map(|b| {
                                v.profile.latency_us(b.batch, Quantile::P50).map(|us| (b.batch, us / 1e6))
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Problem {
            pipeline: PipelineOptions { name: self.name.clone(), stages, slo_s: self.slo_ms / 1000.0 },
            limits: c.resources,
            weights: c.objective,
            reward: c.reward,
        }
    }
}

/// The targets `[control]` configures: every pipeline, then every single model that no
/// pipeline uses as a stage and that `c.models` names (`"*"`: all). An unknown name is an error.
pub fn targets(gw: &Gateway, c: &ControlSection) -> Result<Vec<Target>, String> {
    let mut out: Vec<Target> = gw.pipelines().map(|p| Target::pipeline(p)).collect();
    let stages: std::collections::BTreeSet<&str> =
        gw.pipelines().flat_map(|p| p.stages.iter().map(|m| m.name())).collect();
    for name in &c.models {
        if name != "*" && gw.model(name).is_err() {
            return Err(format!("[control] models: no served model '{name}'"));
        }
    }
    let all = c.models.iter().any(|n| n == "*");
    for m in gw.models() {
        if stages.contains(m.name()) || !(all || c.models.iter().any(|n| n == m.name())) {
            continue;
        }
        let slo = gw.tenants.tightest_slo_ms(m.name()).unwrap_or(100);
        out.push(Target::model(&m, slo as f64));
    }
    Ok(out)
}

/// One target's loop state.
pub struct Loop {
    pub target: Target,
    pub problem: Problem,
    pub policy: Box<dyn ConfigPolicy>,
    pub predictor: Box<dyn LoadPredictor>,
    /// The configuration last applied, per stage.
    pub applied: Option<Config>,
}

impl Loop {
    pub fn new(
        target: Target,
        problem: Problem,
        policy: Box<dyn ConfigPolicy>,
        predictor: Box<dyn LoadPredictor>,
    ) -> Loop {
        Loop { target, problem, policy, predictor, applied: None }
    }
}

/// Starts every loop in `loops`; the gateway's drain stops it.
pub fn start(gw: Arc<Gateway>, interval_s: f64, mut loops: Vec<Loop>) {
    if loops.is_empty() {
        return;
    }
    let every = interval_s.round().max(1.0) as u64;
    let g = gw.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut seen: Vec<u64> = loops.iter().map(|l| l.target.arrivals.load(Ordering::Relaxed)).collect();
        let mut window: Vec<Vec<f64>> = vec![Vec::new(); loops.len()];
        let mut second = 0u64;
        loop {
            tick.tick().await;
            second += 1;
            for (k, l) in loops.iter_mut().enumerate() {
                let now = l.target.arrivals.load(Ordering::Relaxed);
                let rps = now.saturating_sub(seen[k]) as f64;
                seen[k] = now;
                l.predictor.observe(rps);
                window[k].push(rps);
            }
            if !second.is_multiple_of(every) {
                continue;
            }
            for (k, l) in loops.iter_mut().enumerate() {
                let load = window[k].iter().sum::<f64>() / window[k].len().max(1) as f64;
                window[k].clear();
                decide_and_apply(&g, l, load);
            }
        }
    });
    gw.add_task(task);
}

/// `p` with `overhead_s[k]` added to every latency of stage k.
pub fn with_overhead(p: &Problem, overhead_s: &[f64]) -> Problem {
    let mut p = p.clone();
    for (stage, &o) in p.pipeline.stages.iter_mut().zip(overhead_s) {
        for v in &mut stage.variants {
            for (_, l) in &mut v.latency_s {
                *l += o;
            }
        }
    }
    p
}

/// One control step of one target.
pub fn decide_and_apply(gw: &Gateway, l: &mut Loop, load: f64) {
    let current = l.applied.clone().unwrap_or_else(|| minimal(&l.problem));
    let overheads: Vec<f64> =
        l.target.stages.iter().map(|(_, m)| gw.cluster.batch_overhead_us(m.name()) / 1e6).collect();
    let problem = with_overhead(&l.problem, &overheads);
    // Eq. 1-4 for the configuration that served the interval just measured, at its load.
    let ran = evaluate(&problem, &current, load);
    let obs = Observation { load_rps: load, predicted_rps: l.predictor.predict(), current };
    let t0 = std::time::Instant::now();
    let cfg = enforce(&problem, &l.policy.decide(&problem, &obs));
    let decision = t0.elapsed();
    for ((_, stage), s) in l.target.stages.iter().zip(&cfg) {
        let control = Control { variant: Some(s.variant), max_rows: Some(s.batch) };
        if let Err(e) = gw.cluster.configure(stage.name(), control, Some(s.replicas)) {
            tracing::warn!(
                target = %l.target.name,
                stage = stage.name(),
                "configuration not applied: {}",
                e.message
            );
        }
    }
    // Per stage, once: the applied configuration and where its replicas run, for the log line
    // and the dashboard.
    let stages: Vec<serde_json::Value> = cfg
        .iter()
        .zip(&problem.pipeline.stages)
        .zip(&l.target.stages)
        .map(|((s, st), (_, model))| {
            let nodes: Vec<String> =
                gw.cluster.replica_nodes(model.name()).iter().map(|(n, q)| format!("{n}:{q}")).collect();
            serde_json::json!({
                "stage": st.name,
                "model": model.name(),
                "variant": st.variants[s.variant].name,
                "replicas": s.replicas,
                "batch": s.batch,
                "nodes": nodes,
            })
        })
        .collect();
    let text: Vec<String> = stages
        .iter()
        .map(|v| {
            let nodes: Vec<&str> =
                v["nodes"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
            format!(
                "{}={}x{}/b{}@{}",
                v["stage"].as_str().unwrap_or_default(),
                v["variant"].as_str().unwrap_or_default(),
                v["replicas"],
                v["batch"],
                nodes.join("+")
            )
        })
        .collect();
    tracing::info!(
        target = %l.target.name,
        policy = l.policy.name(),
        load = format!("{load:.1}"),
        predicted = format!("{:.1}", obs.predicted_rps),
        decision_us = decision.as_micros() as u64,
        ran_qos = format!("{:.4}", ran.q),
        ran_cost = format!("{:.2}", ran.c),
        ran_objective = format!("{:.4}", ran.objective),
        config = %text.join(" "),
        overhead_us = %overheads.iter().map(|o| format!("{:.0}", o * 1e6)).collect::<Vec<_>>().join(","),
        "configured"
    );
    gw.set_configuration(
        &l.target.name,
        serde_json::json!({
            "policy": l.policy.name(),
            "load_rps": load,
            "predicted_rps": obs.predicted_rps,
            "decision_us": decision.as_micros() as u64,
            "stages": stages,
        }),
    );
    gw.metrics.control_decision(&l.target.name, decision.as_secs_f64());
    l.applied = Some(cfg);
}
