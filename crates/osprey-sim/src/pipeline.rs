//! Pipeline configuration in the simulator (OPD's experiment): a pipeline from the model
//! repository, a per-second load, and a control step every `interval_s` at which a
//! configuration policy (the same `osprey_policy::configure::ConfigPolicy` objects the live
//! controller runs) sets every stage's variant, replicas and maximum batch.
//!
//! # The environment
//! Between control steps the configuration is fixed and the pipeline is a fluid queue advanced
//! one second at a time (the load predictors' resolution):
//! ```text
//! T = minₙ tₙ · speed          capacity, req/s       Lp = Σₙ lₙ / speed   service latency
//! room     = max(0, SLO − Lp) · T            what can still finish in time once queued
//! expired += max(0, backlog − room)          admitted work a capacity drop made late
//! admitted = min(arrivals, room − backlog + T)  refused = the rest (told at once, as live)
//! served   = min(backlog + admitted, T)      backlog ← backlog + admitted − served
//! ```
//! Every admitted request is served within its deadline or counted expired; nothing is lost,
//! and [`Totals::lost`] checks that conservation (arrivals = served + refused + expired +
//! backlog). `late_pct` counts refused and expired requests: the share not answered in time.
//! Per interval the paper's Q, C and J (eq. 1-4) and reward (eq. 7) are evaluated at the
//! interval's measured mean load; this is a departure from a per-request simulation, which the
//! single-model engine ([`crate::engine`]) does, because the control problem is posed per
//! interval and PPO needs many 120-step episodes.

use crate::workload::Workload;
use osprey_core::model::{ModelSpec, scan_repository};
use osprey_core::pipeline::PipelineSpec;
use osprey_core::profile::{ModelProfile, Quantile};
use osprey_policy::configure::{
    Config, ConfigPolicy, Evaluation, Limits, Observation, PipelineOptions, Problem, RewardWeights,
    StageOptions, VariantOption, Weights, enforce, evaluate, minimal, reward,
};
use osprey_policy::predict::LoadPredictor;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A pipeline scenario file (`scenarios/opd-*.toml`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineScenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub seed: u64,
    pub duration_s: f64,
    /// Control interval, seconds (OPD: 10).
    #[serde(default = "ten")]
    pub interval_s: f64,
    /// A pipeline folder of the model repository.
    pub pipeline: String,
    #[serde(default = "default_repo")]
    pub model_repository: String,
    /// Cluster speed relative to the host that measured the stages' profiles (latencies are
    /// divided by it).
    #[serde(default = "one")]
    pub speed: f64,
    /// Override of the pipeline's `slo_ms`.
    #[serde(default)]
    pub slo_ms: Option<f64>,
    #[serde(default)]
    pub resources: Limits,
    #[serde(default)]
    pub objective: Weights,
    #[serde(default)]
    pub reward: RewardWeights,
    pub workload: Workload,
    /// `random`, `greedy`, `ipa`, `opd`.
    pub policies: Vec<String>,
    /// `lstm`, `ewma` or `last`.
    #[serde(default = "default_predictor")]
    pub predictor: String,
    /// Trained weights, relative to this file.
    #[serde(default)]
    pub predictor_weights: Option<String>,
    #[serde(default)]
    pub opd_weights: Option<String>,
    /// Episodes `osprey train opd` runs.
    #[serde(default = "default_episodes")]
    pub train_episodes: usize,
}

fn ten() -> f64 {
    10.0
}
fn one() -> f64 {
    1.0
}
fn default_repo() -> String {
    "../models".into()
}
fn default_predictor() -> String {
    "lstm".into()
}
fn default_episodes() -> usize {
    300
}

pub const POLICIES: [&str; 4] = ["random", "greedy", "ipa", "opd"];

impl PipelineScenario {
    /// Whether a scenario file is a pipeline scenario (it names a `pipeline`).
    pub fn is_pipeline_file(text: &str) -> bool {
        toml::from_str::<toml::Table>(text).map(|t| t.contains_key("pipeline")).unwrap_or(false)
    }

    pub fn load(path: &Path) -> Result<(PipelineScenario, PathBuf), String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let s: PipelineScenario =
            toml::from_str(&text).map_err(|e| osprey_core::model::toml_error(&text, path, &e).to_string())?;
        s.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((s, path.parent().map(Path::to_path_buf).unwrap_or_default()))
    }

    pub fn check(&self) -> Result<(), String> {
        if !(self.duration_s >= 1.0 && self.interval_s >= 1.0 && self.interval_s <= self.duration_s) {
            return Err(
                "duration_s and interval_s must be at least 1 s, the interval within the duration".into()
            );
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return Err("speed must be positive".into());
        }
        let l = &self.resources;
        if l.f_max == 0
            || l.b_max == 0
            || l.w_max.is_nan()
            || l.w_max <= 0.0
            || l.cores_max.is_nan()
            || l.cores_max <= 0.0
        {
            return Err("[resources] f_max, b_max, w_max and cores_max must be positive".into());
        }
        if self.policies.is_empty() {
            return Err("name at least one policy".into());
        }
        for p in &self.policies {
            if !POLICIES.contains(&p.as_str()) {
                return Err(format!("unknown pipeline policy '{p}'; known: {}", POLICIES.join(", ")));
            }
        }
        if !["lstm", "ewma", "last"].contains(&self.predictor.as_str()) {
            return Err(format!("unknown predictor '{}'; known: lstm, ewma, last", self.predictor));
        }
        Ok(())
    }

    /// The problem the policies solve: stages and variants from the repository's models and
    /// their `profile.toml`, limits and weights from the scenario.
    pub fn problem(&self, base: &Path) -> Result<Problem, String> {
        let repo = base.join(&self.model_repository);
        let mut pipeline = load_pipeline(&repo, &self.pipeline)?;
        if let Some(slo) = self.slo_ms {
            pipeline.slo_s = slo / 1000.0;
        }
        for st in &mut pipeline.stages {
            for v in &mut st.variants {
                for (_, l) in &mut v.latency_s {
                    *l /= self.speed;
                }
            }
        }
        Ok(Problem { pipeline, limits: self.resources, weights: self.objective, reward: self.reward })
    }

    /// The per-second load of the scenario's workload for `seed`.
    pub fn loads(&self, base: &Path, seed: u64) -> Result<Vec<f64>, String> {
        per_second(&self.workload, self.duration_s, seed, base)
    }

    pub fn resolve(&self, base: &Path, rel: &Option<String>) -> Option<PathBuf> {
        rel.as_ref().map(|r| base.join(r))
    }
}

/// Requests per second of a workload, bucketed from its arrival process.
pub fn per_second(w: &Workload, duration_s: f64, seed: u64, base: &Path) -> Result<Vec<f64>, String> {
    let secs = duration_s.ceil().max(1.0) as usize;
    let mut out = vec![0.0; secs];
    for t in w.arrivals(duration_s, seed, base)? {
        let s = (t / 1_000_000) as usize;
        if s < secs {
            out[s] += 1.0;
        }
    }
    Ok(out)
}

/// A pipeline of the repository as configuration options: each stage's variants with their
/// profiled accuracy, thread budget (cores), memory and p50 latency per batch.
pub fn load_pipeline(repo: &Path, name: &str) -> Result<PipelineOptions, String> {
    let spec = PipelineSpec::load(&repo.join(name)).map_err(|e| e.to_string())?;
    let (models, _) = scan_repository(repo).map_err(|e| e.to_string())?;
    let chain = spec.check(&models).map_err(|e| e.to_string())?;
    let stages = spec
        .stages
        .iter()
        .zip(chain)
        .map(|(decl, m)| stage_options(&decl.name, m))
        .collect::<Result<Vec<_>, String>>()?;
    Ok(PipelineOptions { name: spec.name, stages, slo_s: spec.slo_ms / 1000.0 })
}

fn stage_options(stage: &str, m: &ModelSpec) -> Result<StageOptions, String> {
    let profile = ModelProfile::load(&m.dir.join("profile.toml"))
        .map_err(|e| format!("stage '{stage}': {e} (run `osprey profile --model {}`)", m.name))?;
    let variants = m
        .variants
        .iter()
        .map(|v| {
            let p = profile.variant(&v.name).ok_or_else(|| {
                format!("stage '{stage}': {}/profile.toml lacks variant '{}'", m.name, v.name)
            })?;
            let latency_s = p
                .batches
                .iter()
                .filter_map(|b| p.latency_us(b.batch, Quantile::P50).map(|us| (b.batch, us / 1e6)))
                .collect();
            Ok(VariantOption {
                name: v.name.clone(),
                accuracy: v.accuracy,
                cores: v.threads as f64,
                memory_mb: v.memory_mb as f64,
                latency_s,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(StageOptions { name: stage.to_string(), variants })
}

/// Requests through the whole run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub arrivals: f64,
    pub served: f64,
    pub refused: f64,
    pub expired: f64,
    pub backlog: f64,
}

impl Totals {
    /// Requests neither served, refused, expired nor still queued (0 unless the model is wrong).
    pub fn lost(&self) -> f64 {
        let l = self.arrivals - self.served - self.refused - self.expired - self.backlog;
        if l.abs() < 1e-6 * self.arrivals.max(1.0) { 0.0 } else { l }
    }
    pub fn late_pct(&self) -> f64 {
        100.0 * (self.refused + self.expired) / self.arrivals.max(1e-9)
    }
}

/// One control interval's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct IntervalStats {
    pub start_s: usize,
    pub load_rps: f64,
    pub predicted_rps: f64,
    pub config: Config,
    /// Eq. 1-4 at the interval's measured load.
    pub eval: Evaluation,
    /// Eq. 7.
    pub reward: f64,
    pub totals: Totals,
}

/// The fluid pipeline between control steps (see the module docs).
#[derive(Debug, Clone)]
pub struct Env<'a> {
    pub problem: &'a Problem,
    pub loads: &'a [f64],
    pub interval: usize,
    now: usize,
    backlog: f64,
    totals: Totals,
    config: Config,
}

impl<'a> Env<'a> {
    pub fn new(problem: &'a Problem, loads: &'a [f64], interval_s: f64) -> Self {
        Env {
            problem,
            loads,
            interval: interval_s.round().max(1.0) as usize,
            now: 0,
            backlog: 0.0,
            totals: Totals::default(),
            config: minimal(problem),
        }
    }

    pub fn done(&self) -> bool {
        self.now >= self.loads.len()
    }
    /// Seconds elapsed.
    pub fn now(&self) -> usize {
        self.now
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn totals(&self) -> Totals {
        Totals { backlog: self.backlog, ..self.totals }
    }
    /// Mean load of the last interval (the first interval sees the first second).
    pub fn last_load(&self) -> f64 {
        let end = self.now.max(1).min(self.loads.len());
        let start = end.saturating_sub(self.interval);
        let s = &self.loads[start..end];
        s.iter().sum::<f64>() / s.len().max(1) as f64
    }

    /// Applies `cfg` (bounded by [`enforce`]) and runs one interval.
    pub fn step(
        &mut self,
        cfg: &[osprey_policy::configure::StageConfig],
        predicted_rps: f64,
    ) -> IntervalStats {
        self.config = enforce(self.problem, cfg);
        let start = self.now;
        let end = (start + self.interval).min(self.loads.len());
        let ev0 = evaluate(self.problem, &self.config, 0.0);
        let cap = ev0.throughput_rps;
        let service = ev0.latency_s;
        let room = (self.problem.pipeline.slo_s - service).max(0.0) * cap;
        let before = self.totals;
        for s in start..end {
            let a = self.loads[s];
            self.totals.arrivals += a;
            if self.backlog > room {
                self.totals.expired += self.backlog - room;
                self.backlog = room;
            }
            let admitted =
                if service > self.problem.pipeline.slo_s { 0.0 } else { a.min(room - self.backlog + cap) };
            self.totals.refused += a - admitted;
            let served = (self.backlog + admitted).min(cap);
            self.totals.served += served;
            self.backlog += admitted - served;
        }
        self.now = end;
        let n = (end - start).max(1) as f64;
        let load = self.loads[start..end].iter().sum::<f64>() / n;
        let p = self.problem;
        let eval = evaluate(p, &self.config, load);
        let d = self.totals;
        IntervalStats {
            start_s: start,
            load_rps: load,
            predicted_rps,
            config: self.config.clone(),
            reward: reward(p, &eval),
            eval,
            totals: Totals {
                arrivals: d.arrivals - before.arrivals,
                served: d.served - before.served,
                refused: d.refused - before.refused,
                expired: d.expired - before.expired,
                backlog: self.backlog,
            },
        }
    }
}

/// One policy's whole run.
#[derive(Debug, Clone)]
pub struct Run {
    pub policy: String,
    pub intervals: Vec<IntervalStats>,
    pub totals: Totals,
    /// Wall time of each decision, µs (the policy's `decide` and the limits check).
    pub decision_us: Vec<f64>,
    /// Wall time of each load prediction, µs.
    pub predict_us: Vec<f64>,
}

/// Drives `policy` through the loads: each second feeds the predictor; each interval the
/// predictor is asked, the policy decides, the configuration is bounded and applied.
pub fn run(
    problem: &Problem,
    loads: &[f64],
    interval_s: f64,
    policy: &mut dyn ConfigPolicy,
    predictor: &mut dyn LoadPredictor,
) -> Run {
    let mut env = Env::new(problem, loads, interval_s);
    let mut out = Run {
        policy: policy.name().to_string(),
        intervals: Vec::new(),
        totals: Totals::default(),
        decision_us: Vec::new(),
        predict_us: Vec::new(),
    };
    let mut fed = 0;
    while !env.done() {
        // The controller knows the loads up to now; at t = 0 it has seen nothing.
        for &x in &loads[fed..env.now()] {
            predictor.observe(x);
        }
        fed = env.now();
        let t0 = Instant::now();
        let predicted =
            if env.now() == 0 { loads.first().copied().unwrap_or(0.0) } else { predictor.predict() };
        out.predict_us.push(t0.elapsed().as_secs_f64() * 1e6);
        let obs = Observation {
            load_rps: env.last_load(),
            predicted_rps: predicted,
            current: env.config().clone(),
        };
        let t1 = Instant::now();
        let cfg = enforce(problem, &policy.decide(problem, &obs));
        out.decision_us.push(t1.elapsed().as_secs_f64() * 1e6);
        out.intervals.push(env.step(&cfg, predicted));
    }
    out.totals = env.totals();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use osprey_policy::configure::{GreedyPolicy, IpaPolicy, RandomPolicy, StageConfig, synthetic};
    use osprey_policy::predict::LastValue;

    fn problem() -> Problem {
        Problem {
            pipeline: synthetic(3, 3, 5),
            limits: Limits { f_max: 4, b_max: 16, w_max: 2000.0, cores_max: 12.0 },
            weights: Weights::default(),
            reward: RewardWeights::default(),
        }
    }

    #[test]
    fn nothing_is_lost_and_overload_is_refused_not_dropped() {
        let p = problem();
        let loads: Vec<f64> = (0..300).map(|s| if s < 150 { 100.0 } else { 50_000.0 }).collect();
        for pol in
            [&mut RandomPolicy::new(1) as &mut dyn ConfigPolicy, &mut GreedyPolicy, &mut IpaPolicy::default()]
        {
            let r = run(&p, &loads, 10.0, pol, &mut LastValue::default());
            assert_eq!(r.intervals.len(), 30);
            assert_eq!(r.totals.lost(), 0.0, "{}", r.policy);
            assert!((r.totals.arrivals - loads.iter().sum::<f64>()).abs() < 1e-6);
            assert!(r.totals.refused > 0.0, "{} refused nothing at 50k req/s", r.policy);
        }
    }

    #[test]
    fn a_capacity_drop_expires_the_backlog_it_can_no_longer_serve() {
        let p = problem();
        let loads = vec![2000.0; 20];
        let mut env = Env::new(&p, &loads, 10.0);
        let big: Config = (0..3).map(|_| StageConfig { variant: 0, replicas: 4, batch: 16 }).collect();
        env.step(&big, 2000.0);
        let small = minimal(&p);
        let s = env.step(&small, 2000.0);
        assert!(s.totals.refused > 0.0);
        assert_eq!(env.totals().lost(), 0.0);
    }

    #[test]
    fn ipa_scores_at_least_greedy_and_random_on_the_objective() {
        let p = problem();
        let loads: Vec<f64> = (0..600).map(|s| 300.0 + 250.0 * ((s as f64) / 60.0).sin()).collect();
        let mean =
            |r: &Run| r.intervals.iter().map(|i| i.eval.objective).sum::<f64>() / r.intervals.len() as f64;
        let ipa = run(&p, &loads, 10.0, &mut IpaPolicy::default(), &mut LastValue::default());
        let greedy = run(&p, &loads, 10.0, &mut GreedyPolicy, &mut LastValue::default());
        let random = run(&p, &loads, 10.0, &mut RandomPolicy::new(3), &mut LastValue::default());
        assert!(
            mean(&ipa) >= mean(&greedy) - 1e-9 && mean(&ipa) > mean(&random),
            "{} {} {}",
            mean(&ipa),
            mean(&greedy),
            mean(&random)
        );
    }
}
