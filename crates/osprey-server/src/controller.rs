//! The live control loop (OPD's Algorithm 1, per control interval) for every served pipeline:
//!
//! ```text
//! every second:  arrivals of the pipeline in that second → predictor.observe
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
//! `Dispatcher::configure`), so a change loses and duplicates nothing.
//!
//! The problem each decision solves is built from the served stage models: a stage variant's
//! accuracy from `model.toml`, its cost cₙ from its thread budget, its memory wₙ as declared, its
//! latency from the profile the gateway plans with.

use crate::gateway::Gateway;
use crate::pipeline::PipelineEntry;
use osprey_core::config::ControlSection;
use osprey_core::profile::Quantile;
use osprey_policy::configure::{
    ConfigPolicy, Observation, PipelineOptions, Problem, StageOptions, VariantOption, enforce, evaluate,
    minimal,
};
use osprey_policy::predict::LoadPredictor;
use osprey_policy::scheduler::Control;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The decision problem of a served pipeline under `[control]`.
pub fn problem_for(p: &PipelineEntry, c: &ControlSection) -> Problem {
    let stages = p
        .stages
        .iter()
        .zip(&p.spec.stages)
        .map(|(m, decl)| StageOptions {
            name: decl.name.clone(),
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
        pipeline: PipelineOptions { name: p.name().to_string(), stages, slo_s: p.spec.slo_ms / 1000.0 },
        limits: c.resources,
        weights: c.objective,
        reward: c.reward,
    }
}

/// One pipeline's loop state.
pub struct Loop {
    pub pipeline: Arc<PipelineEntry>,
    pub problem: Problem,
    pub policy: Box<dyn ConfigPolicy>,
    pub predictor: Box<dyn LoadPredictor>,
}

/// Starts the loop of every pipeline in `loops`; the gateway's drain stops it.
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
        let mut seen: Vec<u64> = loops.iter().map(|l| l.pipeline.arrivals.load(Ordering::Relaxed)).collect();
        let mut window: Vec<Vec<f64>> = vec![Vec::new(); loops.len()];
        let mut second = 0u64;
        loop {
            tick.tick().await;
            second += 1;
            for (k, l) in loops.iter_mut().enumerate() {
                let now = l.pipeline.arrivals.load(Ordering::Relaxed);
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

/// One control step of one pipeline.
pub fn decide_and_apply(gw: &Gateway, l: &mut Loop, load: f64) {
    let current = l
        .pipeline
        .applied
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_else(|| minimal(&l.problem));
    // Eq. 1-4 for the configuration that served the interval just measured, at its load.
    let ran = evaluate(&l.problem, &current, load);
    let obs = Observation { load_rps: load, predicted_rps: l.predictor.predict(), current };
    let t0 = std::time::Instant::now();
    let cfg = enforce(&l.problem, &l.policy.decide(&l.problem, &obs));
    let decision = t0.elapsed();
    for (stage, s) in l.pipeline.stages.iter().zip(&cfg) {
        let control = Control { variant: Some(s.variant), max_rows: Some(s.batch) };
        if let Err(e) = gw.cluster.configure(stage.name(), control, Some(s.replicas)) {
            tracing::warn!(
                pipeline = l.pipeline.name(),
                stage = stage.name(),
                "configuration not applied: {}",
                e.message
            );
        }
    }
    let text: Vec<String> = cfg
        .iter()
        .zip(&l.problem.pipeline.stages)
        .map(|(s, st)| format!("{}={}x{}/b{}", st.name, st.variants[s.variant].name, s.replicas, s.batch))
        .collect();
    tracing::info!(
        pipeline = l.pipeline.name(),
        policy = l.policy.name(),
        load = format!("{load:.1}"),
        predicted = format!("{:.1}", obs.predicted_rps),
        decision_us = decision.as_micros() as u64,
        ran_qos = format!("{:.4}", ran.q),
        ran_cost = format!("{:.2}", ran.c),
        ran_objective = format!("{:.4}", ran.objective),
        config = %text.join(" "),
        "configured"
    );
    gw.metrics.control_decision(l.pipeline.name(), decision.as_secs_f64());
    *l.pipeline.applied.lock().unwrap_or_else(|e| e.into_inner()) = Some(cfg);
}
