//! Per-control-interval pipeline configuration (the OPD paper, ../shared/seeds/003): for every
//! stage of a pipeline, which variant runs, how many replicas and which maximum batch size,
//! under the cluster's resource budget, for the load predicted for the next interval.
//!
//! # The model (OPD §III-B/C), as implemented
//! A pipeline has stages n ∈ N; stage n has variants z with accuracy vₙ(z), cost cₙ(z) (cores
//! of one replica: its thread budget), resource wₙ(z) (memory of one replica, MB, as measured
//! when it loads) and a latency profile lₙ(z, b) (p50 of one batch of b, seconds). A
//! configuration gives every stage (zₙ, fₙ, bₙ): variant, replicas, maximum batch.
//!
//! ```text
//! V = Σₙ vₙ(zₙ)                                          (eq. 1)
//! C = Σₙ fₙ · cₙ(zₙ)                                     (eq. 2)
//! tₙ = fₙ · bₙ / lₙ(zₙ, bₙ)       req/s a stage sustains with full batches; τ = minₙ tₙ
//! T = min(τ, load) / λref         throughput that meets demand, in units of the load
//! L = Σₙ lₙ(zₙ, bₙ) / SLO         end-to-end latency, in units of the time budget
//! E = (load − τ) / λref  if τ ≤ load   excess load: the unmet share of the demand (≥ 0)
//!   = (load − τ) / τ     if τ > load   spare capacity: minus the idle share of it (< 0)
//! Q = α·V + β·T − L − γ·E     if E ≥ 0                    (eq. 3)
//!   = α·V + β·T − L − δ·(−E)  if E < 0
//! J = Q − λ·C                     the objective, maximised under          (eq. 4)
//!     0 < fₙ ≤ F_max,  0 < bₙ ≤ B_max,  Σₙ wₙ(zₙ)·fₙ ≤ W_max,  Σₙ cₙ(zₙ)·fₙ ≤ cores_max
//! r = Q − β_r·C − γ_r·B,  B = maxₙ bₙ                     (eq. 7, the RL reward)
//! λref = max(load, 1 req/s)
//! ```
//!
//! **Definitions the paper leaves open.** The paper does not give units for T, L and E; taken
//! raw (req/s against seconds) one term swamps the others and the weights stop meaning
//! anything across loads. Osprey measures T in units of the offered load, counted up to the load
//! (T = 1 means "keeps up", whatever the rate; throughput nobody asks for is not rewarded), L in
//! units of the pipeline's latency budget (L = 1: the whole SLO spent computing), unmet demand
//! as a share of the demand and spare capacity as a share of the capacity. Both shares lie in
//! [0, 1], so a single replica that idles at night costs at most δ, not δ times how many times
//! the load it could carry. With these units Q, as a function of τ, rises up to the load and
//! falls (for δ > 0) beyond it. lₙ is the service time of a *full* batch bₙ, the
//! latency under load (Osprey's batcher does not wait for a batch to fill, so at low load
//! batches are smaller and faster; the model takes the loaded case). The reward's β and γ are
//! the paper's second use of those letters (weights of cost and of the batch size) and are
//! configured separately (`[reward] beta, gamma`) from eq. 3's.
//!
//! **Departure.** Eq. 4 has one resource constraint. An edge box runs out of memory or of cores,
//! whichever comes first, so Osprey checks both: W is memory (MB) and a second budget bounds
//! the cores the replicas' thread budgets take.
//!
//! # Policies (one trait, [`ConfigPolicy`])
//! - [`RandomPolicy`]: a uniformly random (z, f, b) per stage, repaired into the limits.
//! - [`GreedyPolicy`]: least cost within the constraints: per stage the cheapest option that
//!   serves the predicted load (the fastest among equally cheap: least resource time, blind to
//!   accuracy, as a cost-greedy rule is), else the one with the most throughput; then repaired
//!   into the limits.
//! - [`IpaPolicy`]: the exact optimum of J under every constraint (the paper's "IPA enhanced
//!   with resource constraints"), by branch and bound; see [`solve_exact`].
//! - OPD (PPO with expert guidance) lives in `osprey-learn` and implements the same trait.
//!
//! Whatever a policy proposes, [`enforce`] bounds replicas and batch sizes and repairs
//! resource overruns before anything is applied (OPD §VI, "Security of the OPD algorithm").

use rand::{Rng, SeedableRng};
/// Seeded generators are ChaCha8: the same stream on every platform and `rand` release
/// (`rand`'s `StdRng` promises neither), so a seed names one run.
type SeededRng = rand_chacha::ChaCha8Rng;

/// One variant a stage can run.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantOption {
    pub name: String,
    /// vₙ(z): profiled accuracy of this stage's variant, 0..1.
    pub accuracy: f64,
    /// cₙ(z): cores of one replica (its thread budget).
    pub cores: f64,
    /// wₙ(z): memory of one replica, MB.
    pub memory_mb: f64,
    /// (batch, p50 seconds of one batch), ascending batch.
    pub latency_s: Vec<(u32, f64)>,
}

impl VariantOption {
    /// lₙ(z, b): interpolated linearly between profiled batch sizes, extrapolated with the
    /// per-item slope of the last two points beyond the largest.
    pub fn latency(&self, batch: u32) -> f64 {
        let pts = &self.latency_s;
        let b = batch.max(1) as f64;
        match pts.len() {
            0 => f64::INFINITY,
            1 => pts[0].1 * b / pts[0].0.max(1) as f64,
            _ => {
                let i = pts.iter().position(|&(pb, _)| pb as f64 >= b).unwrap_or(pts.len() - 1).max(1);
                let (b0, l0) = (pts[i - 1].0 as f64, pts[i - 1].1);
                let (b1, l1) = (pts[i].0 as f64, pts[i].1);
                let slope = if b1 > b0 { (l1 - l0) / (b1 - b0) } else { 0.0 };
                (l0 + slope * (b - b0)).max(l0.min(l1) * 0.5)
            }
        }
    }
}

/// One stage: a task and its variants.
#[derive(Debug, Clone, PartialEq)]
pub struct StageOptions {
    pub name: String,
    pub variants: Vec<VariantOption>,
}

/// The pipeline as the configuration policies see it.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineOptions {
    pub name: String,
    pub stages: Vec<StageOptions>,
    /// End-to-end latency budget, seconds.
    pub slo_s: f64,
}

pub use osprey_core::pipeline::{Limits, RewardWeights, Weights};

/// One stage's decision (eq. 6): variant index, replicas, maximum batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageConfig {
    pub variant: usize,
    pub replicas: u32,
    pub batch: u32,
}

pub type Config = Vec<StageConfig>;

/// The problem every policy solves.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub pipeline: PipelineOptions,
    pub limits: Limits,
    pub weights: Weights,
    pub reward: RewardWeights,
}

/// The batch sizes a policy chooses among: powers of two up to B_max, and B_max.
pub fn batch_choices(b_max: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut b = 1u32;
    while b <= b_max.max(1) {
        out.push(b);
        b = b.saturating_mul(2);
    }
    if out.last() != Some(&b_max.max(1)) {
        out.push(b_max.max(1));
    }
    out
}

/// Everything eq. 1-4 and 7 say about one configuration at one load.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Evaluation {
    pub v: f64,
    pub c: f64,
    /// minₙ tₙ, req/s.
    pub throughput_rps: f64,
    /// Σₙ lₙ, seconds.
    pub latency_s: f64,
    pub t: f64,
    pub l: f64,
    pub e: f64,
    pub q: f64,
    pub objective: f64,
    pub memory_mb: f64,
    pub max_batch: u32,
}

fn stage_throughput(v: &VariantOption, s: &StageConfig) -> f64 {
    s.replicas as f64 * s.batch as f64 / v.latency(s.batch).max(1e-12)
}

/// (T, E) of eq. 3 for a pipeline throughput `tput` (req/s) at `load` (see the module docs).
fn t_and_e(tput: f64, load: f64) -> (f64, f64) {
    let lref = load.max(1.0);
    let t = tput.min(load).max(0.0) / lref;
    let e = if tput <= load { (load - tput) / lref } else { (load - tput) / tput.max(1e-12) };
    (t, e)
}

/// The throughput terms of eq. 3, β·T − γ·E or β·T − δ·(−E), for `tput` at `load`.
fn g(w: &Weights, tput: f64, load: f64) -> f64 {
    let (t, e) = t_and_e(tput, load);
    let excess = if e >= 0.0 { w.gamma * e } else { w.delta * (-e) };
    w.beta * t - excess
}

/// Eq. 1-4 for `cfg` at `load` req/s.
pub fn evaluate(p: &Problem, cfg: &[StageConfig], load: f64) -> Evaluation {
    let w = &p.weights;
    let mut ev = Evaluation { throughput_rps: f64::INFINITY, ..Default::default() };
    for (stage, s) in p.pipeline.stages.iter().zip(cfg) {
        let v = &stage.variants[s.variant.min(stage.variants.len() - 1)];
        ev.v += v.accuracy;
        ev.c += s.replicas as f64 * v.cores;
        ev.memory_mb += s.replicas as f64 * v.memory_mb;
        ev.latency_s += v.latency(s.batch);
        ev.throughput_rps = ev.throughput_rps.min(stage_throughput(v, s));
        ev.max_batch = ev.max_batch.max(s.batch);
    }
    if !ev.throughput_rps.is_finite() {
        ev.throughput_rps = 0.0;
    }
    (ev.t, ev.e) = t_and_e(ev.throughput_rps, load);
    ev.l = ev.latency_s / p.pipeline.slo_s.max(1e-9);
    ev.q = w.alpha * ev.v + g(w, ev.throughput_rps, load) - ev.l;
    ev.objective = ev.q - w.lambda * ev.c;
    ev
}

/// Eq. 7: r = Q − β_r·C − γ_r·B.
pub fn reward(p: &Problem, ev: &Evaluation) -> f64 {
    ev.q - p.reward.beta * ev.c - p.reward.gamma * ev.max_batch as f64
}

/// Whether `cfg` is a well-formed configuration of `p` within every limit.
pub fn within_limits(p: &Problem, cfg: &[StageConfig]) -> bool {
    if cfg.len() != p.pipeline.stages.len() {
        return false;
    }
    let (mut mem, mut cores) = (0.0, 0.0);
    for (stage, s) in p.pipeline.stages.iter().zip(cfg) {
        if s.variant >= stage.variants.len()
            || s.replicas == 0
            || s.replicas > p.limits.f_max
            || s.batch == 0
            || s.batch > p.limits.b_max
        {
            return false;
        }
        mem += s.replicas as f64 * stage.variants[s.variant].memory_mb;
        cores += s.replicas as f64 * stage.variants[s.variant].cores;
    }
    mem <= p.limits.w_max + 1e-9 && cores <= p.limits.cores_max + 1e-9
}

/// The smallest configuration: one replica of the least-memory variant at batch 1 per stage.
pub fn minimal(p: &Problem) -> Config {
    p.pipeline
        .stages
        .iter()
        .map(|s| {
            let variant = (0..s.variants.len())
                .min_by(|&a, &b| s.variants[a].memory_mb.total_cmp(&s.variants[b].memory_mb))
                .unwrap_or(0);
            StageConfig { variant, replicas: 1, batch: 1 }
        })
        .collect()
}

/// Bounds a proposed configuration by the security limits and repairs resource overruns:
/// replicas into 1..=F_max and batches into 1..=B_max; then, while over W_max or cores_max, one
/// replica is taken from the stage holding the most of the scarce resource; if every stage is
/// at one replica, that stage moves to its least-memory variant. A configuration that cannot be
/// repaired (the minimal one does not fit) is returned as [`minimal`] — the caller reports it.
pub fn enforce(p: &Problem, cfg: &[StageConfig]) -> Config {
    let n = p.pipeline.stages.len();
    let mut out: Config = (0..n)
        .map(|i| {
            let s = cfg.get(i).copied().unwrap_or(StageConfig { variant: 0, replicas: 1, batch: 1 });
            let nv = p.pipeline.stages[i].variants.len();
            StageConfig {
                variant: s.variant.min(nv.saturating_sub(1)),
                replicas: s.replicas.clamp(1, p.limits.f_max.max(1)),
                batch: s.batch.clamp(1, p.limits.b_max.max(1)),
            }
        })
        .collect();
    let fallback = minimal(p);
    for _ in 0..(n * (p.limits.f_max as usize + 2) + 1) {
        if within_limits(p, &out) {
            return out;
        }
        let use_of = |i: usize, s: &StageConfig| {
            let v = &p.pipeline.stages[i].variants[s.variant];
            let m = s.replicas as f64 * v.memory_mb / p.limits.w_max.max(1e-9);
            let c = s.replicas as f64 * v.cores / p.limits.cores_max.max(1e-9);
            m.max(c)
        };
        let worst = (0..n)
            .filter(|&i| out[i].replicas > 1)
            .max_by(|&a, &b| use_of(a, &out[a]).total_cmp(&use_of(b, &out[b])));
        match worst {
            Some(i) => out[i].replicas -= 1,
            None => {
                let changeable = (0..n).filter(|&i| out[i].variant != fallback[i].variant);
                match changeable.max_by(|&a, &b| use_of(a, &out[a]).total_cmp(&use_of(b, &out[b]))) {
                    Some(i) => out[i].variant = fallback[i].variant,
                    None => break,
                }
            }
        }
    }
    if within_limits(p, &out) { out } else { fallback }
}

/// What a policy sees at a control step (eq. 5's ingredients).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// mₜ: the load of the last interval, req/s.
    pub load_rps: f64,
    /// pₜ: the predicted load for the next interval, req/s.
    pub predicted_rps: f64,
    /// The configuration in force.
    pub current: Config,
}

/// A configuration policy: sans-IO, driven per control interval by the live controller and by
/// the simulator alike.
pub trait ConfigPolicy: Send {
    fn name(&self) -> &str;
    /// The configuration for the next interval (the driver passes it through [`enforce`]).
    fn decide(&mut self, p: &Problem, obs: &Observation) -> Config;
}

/// Random: uniformly random choices per stage, seeded (ChaCha8).
pub struct RandomPolicy {
    rng: SeededRng,
}

impl RandomPolicy {
    pub fn new(seed: u64) -> Self {
        RandomPolicy { rng: SeededRng::seed_from_u64(seed) }
    }
}

impl ConfigPolicy for RandomPolicy {
    fn name(&self) -> &str {
        "random"
    }
    fn decide(&mut self, p: &Problem, _obs: &Observation) -> Config {
        let batches = batch_choices(p.limits.b_max);
        let cfg: Config = p
            .pipeline
            .stages
            .iter()
            .map(|s| StageConfig {
                variant: self.rng.random_range(0..s.variants.len().max(1)),
                replicas: self.rng.random_range(1..=p.limits.f_max.max(1)),
                batch: batches[self.rng.random_range(0..batches.len())],
            })
            .collect();
        enforce(p, &cfg)
    }
}

/// Greedy: least cost within the constraints that serves the predicted load.
#[derive(Default)]
pub struct GreedyPolicy;

impl ConfigPolicy for GreedyPolicy {
    fn name(&self) -> &str {
        "greedy"
    }
    fn decide(&mut self, p: &Problem, obs: &Observation) -> Config {
        let load = obs.predicted_rps;
        let batches = batch_choices(p.limits.b_max);
        let cfg: Config = p
            .pipeline
            .stages
            .iter()
            .map(|stage| {
                let mut best: Option<(f64, f64, StageConfig)> = None; // (cost, latency)
                let mut fastest: Option<(f64, StageConfig)> = None;
                for (z, v) in stage.variants.iter().enumerate() {
                    for &b in &batches {
                        for f in 1..=p.limits.f_max.max(1) {
                            let s = StageConfig { variant: z, replicas: f, batch: b };
                            let t = stage_throughput(v, &s);
                            if fastest.is_none_or(|(ft, _)| t > ft) {
                                fastest = Some((t, s));
                            }
                            if t >= load {
                                let key = (f as f64 * v.cores, v.latency(b));
                                if best.is_none_or(|(c, a, _)| key < (c, a)) {
                                    best = Some((key.0, key.1, s));
                                }
                                break; // more replicas only cost more
                            }
                        }
                    }
                }
                best.map(|b| b.2).or(fastest.map(|f| f.1)).unwrap_or(StageConfig {
                    variant: 0,
                    replicas: 1,
                    batch: 1,
                })
            })
            .collect();
        enforce(p, &cfg)
    }
}

/// IPA with resource constraints: the exact optimum of J at the predicted load.
#[derive(Default)]
pub struct IpaPolicy {
    /// Search nodes visited by the last solve (reported by the benchmark).
    pub last_nodes: u64,
}

impl ConfigPolicy for IpaPolicy {
    fn name(&self) -> &str {
        "ipa"
    }
    fn decide(&mut self, p: &Problem, obs: &Observation) -> Config {
        let (cfg, nodes) = solve_exact(p, obs.predicted_rps);
        self.last_nodes = nodes;
        cfg
    }
}

#[derive(Debug, Clone, Copy)]
struct Opt {
    cfg: StageConfig,
    /// The separable part of J: α·v − l/SLO − λ·f·c.
    h: f64,
    t: f64,
    mem: f64,
    cores: f64,
}

/// Whether throughput `a` is never worse than `b` for g at `load`: g rises up to the load and
/// does not rise beyond it, so a value between `b` and the load (inclusive) is as good.
fn t_no_worse(a: f64, b: f64, load: f64) -> bool {
    (a >= b.min(load) - 1e-12) && (a <= b.max(load) + 1e-12)
}

/// The exact optimum of eq. 4 at `load`, by branch and bound over stages.
///
/// J = Σₙ hₙ + g(minₙ tₙ) with hₙ = α·vₙ − lₙ/SLO − λ·fₙ·cₙ separable and g unimodal in the
/// pipeline throughput (rising to the load, not rising beyond it). Per stage, the options
/// (z, f, b) are first reduced to the Pareto set: an option is dropped when another has h, memory
/// and cores no worse and a throughput no worse for g (between the dropped one's and the load).
/// Depth-first search then takes stages in order and options by h, and prunes a branch when
/// Σ h so far + Σ max h of the remaining stages + max g over [0, min(t so far, max t remaining)]
/// cannot beat the incumbent (seeded with the greedy answer), or when the memory or cores left
/// cannot hold the remaining stages' smallest options. Exact: only dominated options and
/// branches whose bound is no better than a known configuration are cut. Worst case
/// exponential in the number of stages (the problem is a multiple-choice knapsack with a
/// bottleneck term), which is the paper's point about IPA's decision time; a maintained MILP
/// crate would need the min and the piecewise g linearised with big-M constraints and gives no
/// better bound on instances of this size, at the cost of a native solver dependency.
///
/// Returns the configuration and the number of search nodes visited. When no configuration fits
/// the limits, returns [`minimal`].
pub fn solve_exact(p: &Problem, load: f64) -> (Config, u64) {
    let w = &p.weights;
    let slo = p.pipeline.slo_s.max(1e-9);
    let batches = batch_choices(p.limits.b_max);
    let mut stages: Vec<Vec<Opt>> = Vec::new();
    for stage in &p.pipeline.stages {
        let mut opts = Vec::new();
        for (z, v) in stage.variants.iter().enumerate() {
            for &b in &batches {
                let l = v.latency(b);
                for f in 1..=p.limits.f_max.max(1) {
                    let cfg = StageConfig { variant: z, replicas: f, batch: b };
                    opts.push(Opt {
                        cfg,
                        h: w.alpha * v.accuracy - l / slo - w.lambda * f as f64 * v.cores,
                        t: stage_throughput(v, &cfg),
                        mem: f as f64 * v.memory_mb,
                        cores: f as f64 * v.cores,
                    });
                }
            }
        }
        opts.sort_by(|a, b| b.h.total_cmp(&a.h));
        let mut kept: Vec<Opt> = Vec::new();
        for o in opts {
            let dominated = kept.iter().any(|k| {
                k.h >= o.h - 1e-12
                    && k.mem <= o.mem + 1e-9
                    && k.cores <= o.cores + 1e-9
                    && t_no_worse(k.t, o.t, load)
            });
            if !dominated {
                kept.push(o);
            }
        }
        stages.push(kept);
    }
    let n = stages.len();
    // Suffix bounds over stages i.. .
    let mut best_h = vec![0.0; n + 1];
    let mut min_mem = vec![0.0; n + 1];
    let mut min_cores = vec![0.0; n + 1];
    let mut max_t = vec![f64::INFINITY; n + 1];
    for i in (0..n).rev() {
        let s = &stages[i];
        best_h[i] = best_h[i + 1] + s.iter().map(|o| o.h).fold(f64::NEG_INFINITY, f64::max);
        min_mem[i] = min_mem[i + 1] + s.iter().map(|o| o.mem).fold(f64::INFINITY, f64::min);
        min_cores[i] = min_cores[i + 1] + s.iter().map(|o| o.cores).fold(f64::INFINITY, f64::min);
        max_t[i] = max_t[i + 1].min(s.iter().map(|o| o.t).fold(0.0, f64::max));
    }
    // max of g over τ ∈ [0, upper]: g peaks at the load (weights are non-negative).
    let g_max = |upper: f64| -> f64 { g(w, upper.min(load), load) };
    let incumbent =
        GreedyPolicy.decide(p, &Observation { load_rps: load, predicted_rps: load, current: Vec::new() });
    let mut best = if within_limits(p, &incumbent) {
        evaluate(p, &incumbent, load).objective
    } else {
        f64::NEG_INFINITY
    };
    let mut best_cfg = if best.is_finite() { Some(incumbent) } else { None };
    let mut path: Vec<StageConfig> = Vec::with_capacity(n);
    let mut nodes = 0u64;
    struct Ctx<'a> {
        stages: &'a [Vec<Opt>],
        best_h: &'a [f64],
        min_mem: &'a [f64],
        min_cores: &'a [f64],
        max_t: &'a [f64],
        limits: Limits,
    }
    let ctx = Ctx {
        stages: &stages,
        best_h: &best_h,
        min_mem: &min_mem,
        min_cores: &min_cores,
        max_t: &max_t,
        limits: p.limits,
    };
    #[allow(clippy::too_many_arguments)]
    fn dfs(
        c: &Ctx,
        i: usize,
        h: f64,
        mem: f64,
        cores: f64,
        t: f64,
        path: &mut Vec<StageConfig>,
        best: &mut f64,
        best_cfg: &mut Option<Config>,
        nodes: &mut u64,
        g_fin: &dyn Fn(f64) -> f64,
        g_max: &dyn Fn(f64) -> f64,
    ) {
        *nodes += 1;
        if i == c.stages.len() {
            let value = h + g_fin(t);
            if value > *best + 1e-12 {
                *best = value;
                *best_cfg = Some(path.clone());
            }
            return;
        }
        let loosest = g_max(t.min(c.max_t[i]));
        for o in &c.stages[i] {
            let rest = h + o.h + c.best_h[i + 1];
            if rest + loosest <= *best + 1e-12 {
                break; // options are sorted by h: no later one can do better
            }
            let t2 = t.min(o.t);
            if rest + g_max(t2.min(c.max_t[i + 1])) <= *best + 1e-12 {
                continue;
            }
            if mem + o.mem + c.min_mem[i + 1] > c.limits.w_max + 1e-9
                || cores + o.cores + c.min_cores[i + 1] > c.limits.cores_max + 1e-9
            {
                continue;
            }
            path.push(o.cfg);
            dfs(
                c,
                i + 1,
                h + o.h,
                mem + o.mem,
                cores + o.cores,
                t2,
                path,
                best,
                best_cfg,
                nodes,
                g_fin,
                g_max,
            );
            path.pop();
        }
    }
    let g_fin = |t: f64| g(w, if t.is_finite() { t } else { 0.0 }, load);
    dfs(
        &ctx,
        0,
        0.0,
        0.0,
        0.0,
        f64::INFINITY,
        &mut path,
        &mut best,
        &mut best_cfg,
        &mut nodes,
        &g_fin,
        &g_max,
    );
    (best_cfg.unwrap_or_else(|| minimal(p)), nodes)
}

/// The share of the time left that stage `k` of a pipeline may spend, when `weights[n]` is the
/// expected work of stage n (the live gateway uses the p50 at batch 1 of each stage's most
/// accurate variant): left · wₖ / Σ_{n ≥ k} wₙ. Applied at each stage to what is left, so the
/// slack of a fast stage passes on and a slow stage eats only its own share.
pub fn stage_budget(weights: &[f64], k: usize, left: f64) -> f64 {
    let rest: f64 = weights.get(k..).map_or(0.0, |w| w.iter().map(|x| x.max(0.0)).sum());
    let own = weights.get(k).copied().unwrap_or(0.0).max(0.0);
    if rest > 0.0 { left * own / rest } else { left }
}

/// A synthetic pipeline of `stages` × `variants` for decision-time measurements (OPD fig. 6):
/// variant k of a stage is (k+1)× slower per item than variant 0 and 0.05 more accurate per step,
/// with a fixed per-batch overhead, seeded jitter on every figure.
pub fn synthetic(stages: usize, variants: usize, seed: u64) -> PipelineOptions {
    let mut rng = SeededRng::seed_from_u64(seed);
    PipelineOptions {
        name: format!("synthetic-{stages}x{variants}"),
        slo_s: 0.2,
        stages: (0..stages)
            .map(|s| StageOptions {
                name: format!("stage{s}"),
                variants: (0..variants)
                    .map(|k| {
                        let per_item = 2e-4 * (k as f64 + 1.0) * rng.random_range(0.8..1.2);
                        let fixed = 1e-3 * rng.random_range(0.5..1.5);
                        VariantOption {
                            name: format!("v{k}"),
                            accuracy: (0.5 + 0.45 * k as f64 / variants.max(2) as f64
                                - 0.02 * rng.random::<f64>())
                            .min(1.0),
                            cores: 1.0,
                            memory_mb: 20.0 * (k as f64 + 1.0),
                            latency_s: [1u32, 8, 32]
                                .iter()
                                .map(|&b| (b, fixed + per_item * b as f64))
                                .collect(),
                        }
                    })
                    .collect(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn problem(pipeline: PipelineOptions, limits: Limits) -> Problem {
        Problem { pipeline, limits, weights: Weights::default(), reward: RewardWeights::default() }
    }

    /// Every configuration of `p` within its limits, by enumeration.
    fn all_configs(p: &Problem) -> Vec<Config> {
        let batches = batch_choices(p.limits.b_max);
        let mut out: Vec<Config> = vec![Vec::new()];
        for stage in &p.pipeline.stages {
            let mut next = Vec::new();
            for prefix in &out {
                for z in 0..stage.variants.len() {
                    for &b in &batches {
                        for f in 1..=p.limits.f_max {
                            let mut c = prefix.clone();
                            c.push(StageConfig { variant: z, replicas: f, batch: b });
                            next.push(c);
                        }
                    }
                }
            }
            out = next;
        }
        out.into_iter().filter(|c| within_limits(p, c)).collect()
    }

    #[test]
    fn equations_on_a_hand_worked_case() {
        let v = |acc, lat| VariantOption {
            name: "v".into(),
            accuracy: acc,
            cores: 1.0,
            memory_mb: 10.0,
            latency_s: vec![(1, lat), (4, lat * 2.0)],
        };
        let p = problem(
            PipelineOptions {
                name: "p".into(),
                slo_s: 0.1,
                stages: vec![
                    StageOptions { name: "a".into(), variants: vec![v(0.9, 0.01)] },
                    StageOptions { name: "b".into(), variants: vec![v(0.8, 0.02)] },
                ],
            },
            Limits::default(),
        );
        let cfg = vec![
            StageConfig { variant: 0, replicas: 2, batch: 1 },
            StageConfig { variant: 0, replicas: 1, batch: 4 },
        ];
        let ev = evaluate(&p, &cfg, 100.0);
        // t_a = 2·1/0.01 = 200, t_b = 1·4/0.04 = 100 → T = 100 req/s = 1.0 load.
        assert!((ev.v - 1.7).abs() < 1e-12);
        assert!((ev.c - 3.0).abs() < 1e-12);
        assert!((ev.throughput_rps - 100.0).abs() < 1e-9);
        assert!((ev.l - (0.01 + 0.04) / 0.1).abs() < 1e-12);
        assert!(ev.e.abs() < 1e-12);
        let w = Weights::default();
        assert!((ev.q - (w.alpha * 1.7 + w.beta * 1.0 - 0.5)).abs() < 1e-9);
        assert!((ev.objective - (ev.q - w.lambda * 3.0)).abs() < 1e-12);
        // Unmet demand at 200 req/s: E = 0.5 weighted by γ.
        let hi = evaluate(&p, &cfg, 200.0);
        assert!((hi.e - 0.5).abs() < 1e-12);
        assert!((hi.q - (w.alpha * 1.7 + w.beta * 0.5 - 0.5 - w.gamma * 0.5)).abs() < 1e-9);
        // Spare at 50 req/s: T counts up to the load (1.0), E = −(100 − 50)/100 by δ.
        let lo = evaluate(&p, &cfg, 50.0);
        assert!((lo.e + 0.5).abs() < 1e-12);
        assert!((lo.q - (w.alpha * 1.7 + w.beta * 1.0 - 0.5 - w.delta * 0.5)).abs() < 1e-9);
        let r = reward(&p, &ev);
        assert!((r - (ev.q - p.reward.beta * 3.0 - p.reward.gamma * 4.0)).abs() < 1e-12);
    }

    #[test]
    fn latency_interpolates_and_extrapolates() {
        let v = VariantOption {
            name: "v".into(),
            accuracy: 1.0,
            cores: 1.0,
            memory_mb: 1.0,
            latency_s: vec![(1, 1.0), (8, 8.0)],
        };
        assert!((v.latency(4) - 4.0).abs() < 1e-12);
        assert!((v.latency(16) - 16.0).abs() < 1e-12);
        assert!((v.latency(1) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn stage_budgets_follow_the_work_and_use_all_the_time() {
        let w = [100.0, 300.0, 600.0];
        assert!((stage_budget(&w, 0, 10.0) - 1.0).abs() < 1e-12);
        assert!((stage_budget(&w, 1, 9.0) - 3.0).abs() < 1e-12);
        assert!((stage_budget(&w, 2, 6.0) - 6.0).abs() < 1e-12);
        assert_eq!(stage_budget(&[0.0, 0.0], 0, 4.0), 4.0);
    }

    #[test]
    fn batch_choices_end_at_the_limit() {
        assert_eq!(batch_choices(32), vec![1, 2, 4, 8, 16, 32]);
        assert_eq!(batch_choices(12), vec![1, 2, 4, 8, 12]);
        assert_eq!(batch_choices(1), vec![1]);
    }

    #[test]
    fn synthetic_ten_by_ten_solves() {
        let p = problem(synthetic(10, 10, 1), Limits { f_max: 4, b_max: 32, w_max: 4000.0, cores_max: 24.0 });
        let (cfg, nodes) = solve_exact(&p, 500.0);
        assert!(within_limits(&p, &cfg));
        assert!(nodes > 0);
    }

    fn small_problem() -> impl Strategy<Value = (Problem, f64)> {
        let variant = (0.3f64..1.0, 0.5f64..3.0, 5f64..60.0, 1e-4f64..5e-3, 1e-4f64..2e-3).prop_map(
            |(acc, cores, mem, fixed, per)| VariantOption {
                name: "v".into(),
                accuracy: acc,
                cores: cores.round().max(1.0),
                memory_mb: mem,
                latency_s: vec![(1, fixed + per), (4, fixed + 4.0 * per)],
            },
        );
        let stage = prop::collection::vec(variant, 1..=3)
            .prop_map(|variants| StageOptions { name: "s".into(), variants });
        (
            prop::collection::vec(stage, 1..=3),
            1u32..=3,
            prop::sample::select(vec![1u32, 2, 4]),
            40f64..300.0,
            2f64..10.0,
            10f64..3000.0,
            0.005f64..0.05,
            0.0f64..1.5,
        )
            .prop_map(|(stages, f_max, b_max, w_max, cores_max, load, slo, delta)| {
                let mut p = problem(
                    PipelineOptions { name: "p".into(), slo_s: slo, stages },
                    Limits { f_max, b_max, w_max, cores_max },
                );
                p.weights.delta = delta; // with and without a penalty on spare capacity
                (p, load)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// IPA's answer is the optimum found by enumerating every configuration.
        #[test]
        fn ipa_is_optimal_by_enumeration((p, load) in small_problem()) {
            let all = all_configs(&p);
            let (cfg, _) = solve_exact(&p, load);
            match all.iter().map(|c| evaluate(&p, c, load).objective).max_by(f64::total_cmp) {
                Some(best) => {
                    prop_assert!(within_limits(&p, &cfg));
                    let got = evaluate(&p, &cfg, load).objective;
                    prop_assert!((got - best).abs() < 1e-9, "ipa {got} vs enumeration {best}");
                }
                None => prop_assert_eq!(cfg, minimal(&p)),
            }
        }

        /// No policy ever returns a configuration over F_max, B_max, W_max or the cores, when one
        /// exists within them.
        #[test]
        fn policies_stay_within_limits((p, load) in small_problem(), seed in 0u64..1000) {
            prop_assume!(within_limits(&p, &minimal(&p)));
            let obs = Observation { load_rps: load, predicted_rps: load, current: minimal(&p) };
            let mut policies: Vec<Box<dyn ConfigPolicy>> =
                vec![Box::new(RandomPolicy::new(seed)), Box::new(GreedyPolicy), Box::new(IpaPolicy::default())];
            for pol in &mut policies {
                let cfg = pol.decide(&p, &obs);
                prop_assert!(within_limits(&p, &cfg), "{} returned {:?}", pol.name(), cfg);
            }
        }

        /// `enforce` bounds arbitrary proposals, however wild.
        #[test]
        fn enforce_bounds_any_proposal(
            (p, _load) in small_problem(),
            raw in prop::collection::vec((0usize..10, 0u32..100, 0u32..1000), 0..5),
        ) {
            prop_assume!(within_limits(&p, &minimal(&p)));
            let cfg: Config = raw.iter().map(|&(variant, replicas, batch)| StageConfig { variant, replicas, batch }).collect();
            prop_assert!(within_limits(&p, &enforce(&p, &cfg)));
        }
    }
}
