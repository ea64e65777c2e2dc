//! OPD, the learned configuration policy (§IV-B/C, Algorithms 1 and 2), trained with PPO in
//! the simulator's pipeline environment (`osprey_sim::pipeline::Env`).
//!
//! # Network
//! ```text
//! s  (eq. 5) = [u, p, m, (lₙ, tₙ, zₙ, fₙ, bₙ, cₙ) for every stage n]
//!      u = 1 − max(memory/W_max, cores/cores_max) of the configuration in force
//!      p, m = predicted and last-interval load / load_scale
//!      lₙ/SLO, tₙ/load_scale (≤ 10), zₙ/(|Zₙ|−1), fₙ/F_max, bₙ/B_max, fₙ·cₙ/cores_max
//! x  = ReLU(W₀ s + b₀)                            fully connected, G units
//! x ← x + W₂ ReLU(W₁ x + b₁) + b₂                 K residual blocks
//! π  = one softmax per stage and decision         heads: zₙ ∈ Zₙ, fₙ ∈ 1..F_max, bₙ ∈ batch choices
//! V  = wᵥ·x + bᵥ                                  value
//! ```
//! # Training (PPO)
//! ```text
//! rₜ(θ) = π_θ(aₜ|sₜ) / π_old(aₜ|sₜ)               log π = Σ over heads
//! L^CLIP = Ê[min(rₜ Âₜ, clip(rₜ, 1−ε, 1+ε) Âₜ)]                               (eq. 12)
//!          (and, where Âₜ < 0, at least 3·Âₜ: dual-clip PPO, a departure that keeps a
//!          run-away ratio from exploding the loss; without it training diverged here)
//! L      = −(L^CLIP − c₁ (V(sₜ) − V̂ₜ)² + c₂ S[π_θ](sₜ))  minimised            (eq. 11)
//! Âₜ     = GAE(γ, λ) over the episode, normalised per update; V̂ₜ = Âₜ + V(sₜ)
//! ```
//! Adam, mini-batches, several epochs per episode; rewards are learned scaled by (1 − γ). Every `expert_every`-th episode the actions
//! come from the IPA solver at the predicted load (Algorithm 2's expert); they are stored and
//! learned from like the policy's own, with π_old their probability under the current policy.
//! Departure: the expert's steps also carry an imitation term, c_E · (−log π_θ(a_expert|s)),
//! as demonstration-augmented policy gradients do; the paper says only that expert experience
//! is stored and learned from. With the PPO loss alone the expert's actions, soon improbable
//! under the policy, sit outside the clip range and teach almost nothing.
//! At serving time the policy is deterministic: the most probable choice of every head.
//!
//! The reward is eq. 7 at the interval's measured load (`osprey_policy::configure::reward`).

use crate::{DTYPE, LearnError, Result, load_vars, read_json, save_vars, seeded_init, sidecar, write_json};
use candle_core::{D, Device, Module, Tensor};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap};
use osprey_policy::configure::{
    Config, ConfigPolicy, Observation, Problem, StageConfig, batch_choices, evaluate, solve_exact,
};
use osprey_sim::pipeline::Env;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Shapes and scales a saved policy needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpdMeta {
    /// The pipeline it was trained for (empty in weights saved before it was recorded).
    #[serde(default)]
    pub pipeline: String,
    /// Variants per stage.
    pub variants: Vec<usize>,
    pub f_max: u32,
    pub batches: Vec<u32>,
    pub load_scale: f64,
    pub hidden: usize,
    pub blocks: usize,
}

impl OpdMeta {
    pub fn for_problem(p: &Problem, load_scale: f64, hidden: usize, blocks: usize) -> Self {
        OpdMeta {
            pipeline: p.pipeline.name.clone(),
            variants: p.pipeline.stages.iter().map(|s| s.variants.len()).collect(),
            f_max: p.limits.f_max,
            batches: batch_choices(p.limits.b_max),
            load_scale: load_scale.max(1.0),
            hidden,
            blocks,
        }
    }
    fn state_dim(&self) -> usize {
        3 + 6 * self.variants.len()
    }
    /// (offset, width) of every head, stage by stage: variant, replicas, batch.
    fn heads(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut off = 0;
        for &z in &self.variants {
            for w in [z, self.f_max as usize, self.batches.len()] {
                out.push((off, w));
                off += w;
            }
        }
        out
    }
    fn logits(&self) -> usize {
        self.heads().iter().map(|h| h.1).sum()
    }
}

pub struct OpdNet {
    vm: VarMap,
    fc: Linear,
    blocks: Vec<(Linear, Linear)>,
    policy: Linear,
    value: Linear,
    pub meta: OpdMeta,
}

impl OpdNet {
    pub fn new(meta: OpdMeta, seed: u64) -> Result<OpdNet> {
        let net = OpdNet::build(meta)?;
        seeded_init(&net.vm, seed)?;
        Ok(net)
    }

    fn build(meta: OpdMeta) -> Result<OpdNet> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DTYPE, &Device::Cpu);
        let g = meta.hidden;
        let fc = candle_nn::linear(meta.state_dim(), g, vb.pp("fc"))?;
        let blocks = (0..meta.blocks)
            .map(|i| {
                Ok((
                    candle_nn::linear(g, g, vb.pp(format!("res{i}.a")))?,
                    candle_nn::linear(g, g, vb.pp(format!("res{i}.b")))?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let policy = candle_nn::linear(g, meta.logits(), vb.pp("policy"))?;
        let value = candle_nn::linear(g, 1, vb.pp("value"))?;
        Ok(OpdNet { vm, fc, blocks, policy, value, meta })
    }

    /// [b, state] -> ([b, logits], [b] values).
    fn forward(&self, s: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = self.fc.forward(s)?.relu()?;
        for (a, b) in &self.blocks {
            x = (&x + b.forward(&a.forward(&x)?.relu()?)?)?;
        }
        let b = s.dim(0)?;
        Ok((self.policy.forward(&x)?, self.value.forward(&x)?.reshape(b)?))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_vars(&self.vm, path)?;
        write_json(&sidecar(path), &self.meta)
    }

    pub fn load(path: &Path) -> Result<OpdNet> {
        let meta: OpdMeta = read_json(&sidecar(path))?;
        let mut net = OpdNet::build(meta)?;
        load_vars(&mut net.vm, path)?;
        Ok(net)
    }

    /// Eq. 5 for this network's shapes.
    pub fn features(&self, p: &Problem, obs: &Observation) -> Vec<f32> {
        let m = &self.meta;
        let scale = m.load_scale;
        let cur: Config = if obs.current.len() == p.pipeline.stages.len() {
            obs.current.clone()
        } else {
            osprey_policy::configure::minimal(p)
        };
        let ev = evaluate(p, &cur, obs.load_rps);
        let used = (ev.memory_mb / p.limits.w_max.max(1e-9)).max(ev.c / p.limits.cores_max.max(1e-9));
        let mut out =
            vec![(1.0 - used) as f32, (obs.predicted_rps / scale) as f32, (obs.load_rps / scale) as f32];
        for (stage, s) in p.pipeline.stages.iter().zip(&cur) {
            let v = &stage.variants[s.variant.min(stage.variants.len() - 1)];
            let l = v.latency(s.batch);
            let t = s.replicas as f64 * s.batch as f64 / l.max(1e-12);
            out.extend([
                (l / p.pipeline.slo_s.max(1e-9)).min(10.0) as f32,
                (t / scale).min(10.0) as f32,
                (s.variant as f64 / (stage.variants.len().max(2) - 1) as f64) as f32,
                (s.replicas as f64 / m.f_max.max(1) as f64) as f32,
                (s.batch as f64 / p.limits.b_max.max(1) as f64) as f32,
                (s.replicas as f64 * v.cores / p.limits.cores_max.max(1e-9)) as f32,
            ]);
        }
        out
    }

    fn check(&self, p: &Problem) -> Result<()> {
        let want = OpdMeta::for_problem(p, self.meta.load_scale, self.meta.hidden, self.meta.blocks);
        if !self.meta.pipeline.is_empty() && self.meta.pipeline != want.pipeline {
            return Err(LearnError::Invalid(format!(
                "the policy was trained for pipeline '{}', not '{}'",
                self.meta.pipeline, want.pipeline
            )));
        }
        if want.variants != self.meta.variants
            || want.f_max != self.meta.f_max
            || want.batches != self.meta.batches
        {
            return Err(LearnError::Invalid(format!(
                "the policy was trained for stages with {:?} variants, F_max {} and batches {:?}; this pipeline has {:?}, {} and {:?}",
                self.meta.variants,
                self.meta.f_max,
                self.meta.batches,
                want.variants,
                want.f_max,
                want.batches
            )));
        }
        Ok(())
    }

    /// Head indices -> a configuration.
    fn to_config(&self, a: &[usize]) -> Config {
        a.chunks(3)
            .map(|c| StageConfig {
                variant: c[0],
                replicas: c[1] as u32 + 1,
                batch: self.meta.batches[c[2].min(self.meta.batches.len() - 1)],
            })
            .collect()
    }

    /// A configuration -> head indices (the expert's answer as an action).
    fn to_action(&self, cfg: &[StageConfig]) -> Vec<usize> {
        cfg.iter()
            .flat_map(|s| {
                let b = self
                    .meta
                    .batches
                    .iter()
                    .position(|&x| x >= s.batch)
                    .unwrap_or(self.meta.batches.len() - 1);
                [s.variant, (s.replicas.max(1) - 1) as usize, b]
            })
            .collect()
    }

    /// Logits and value of one state.
    fn eval_one(&self, s: &[f32]) -> Result<(Vec<f32>, f32)> {
        let x = Tensor::from_vec(s.to_vec(), (1, s.len()), &Device::Cpu)?;
        let (l, v) = self.forward(&x)?;
        Ok((l.flatten_all()?.to_vec1::<f32>()?, v.to_vec1::<f32>()?[0]))
    }
}

fn log_softmax(xs: &[f32]) -> Vec<f64> {
    let m = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = xs.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    xs.iter().map(|&x| x as f64 - z).collect()
}

/// The trained policy behind `ConfigPolicy`.
pub struct OpdPolicy {
    net: OpdNet,
}

impl OpdPolicy {
    pub fn new(net: OpdNet) -> Self {
        OpdPolicy { net }
    }
    /// Loads weights and checks them against the pipeline they will configure.
    pub fn load(path: &Path, p: &Problem) -> Result<Self> {
        let net = OpdNet::load(path)?;
        net.check(p)?;
        Ok(OpdPolicy { net })
    }
    pub fn net(&self) -> &OpdNet {
        &self.net
    }
}

impl ConfigPolicy for OpdPolicy {
    fn name(&self) -> &str {
        "opd"
    }
    fn decide(&mut self, p: &Problem, obs: &Observation) -> Config {
        let s = self.net.features(p, obs);
        match self.net.eval_one(&s) {
            Ok((logits, _)) => {
                let a: Vec<usize> = self
                    .net
                    .meta
                    .heads()
                    .iter()
                    .map(|&(off, w)| {
                        let h = &logits[off..off + w];
                        (0..w).max_by(|&i, &j| h[i].total_cmp(&h[j]).then(j.cmp(&i))).unwrap_or(0)
                    })
                    .collect();
                self.net.to_config(&a)
            }
            // A tensor error here is a bug, not an input problem: keep what runs.
            Err(_) => obs.current.clone(),
        }
    }
}

/// PPO settings (defaults from the PPO paper's common choices; the OPD paper gives none).
#[derive(Debug, Clone)]
pub struct PpoConfig {
    pub episodes: usize,
    pub hidden: usize,
    pub blocks: usize,
    /// f of Algorithm 2: every f-th episode follows the expert.
    pub expert_every: usize,
    pub lr: f64,
    pub clip: f64,
    pub c1: f64,
    pub c2: f64,
    pub gamma: f64,
    pub gae_lambda: f64,
    pub epochs: usize,
    pub minibatch: usize,
    /// Episodes collected per update.
    pub rollout: usize,
    /// Weight of the imitation term on the expert's steps (0 = Algorithm 2 as written).
    pub c_expert: f64,
    pub seed: u64,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            episodes: 300,
            hidden: 64,
            blocks: 2,
            expert_every: 4,
            lr: 3e-4,
            clip: 0.2,
            c1: 0.5,
            c2: 0.01,
            gamma: 0.9,
            gae_lambda: 0.9,
            epochs: 4,
            minibatch: 120,
            rollout: 4,
            c_expert: 0.05,
            seed: 11,
        }
    }
}

/// One training episode, for the curves (OPD fig. 7).
#[derive(Debug, Clone, PartialEq)]
pub struct EpisodeLog {
    pub episode: usize,
    pub expert: bool,
    pub mean_reward: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub entropy: f64,
    pub loss: f64,
}

/// One episode's workload: per-second loads and the predictor's forecast at each control step.
pub struct Episode {
    pub loads: Vec<f64>,
    pub predicted: Vec<f64>,
}

struct Step {
    s: Vec<f32>,
    a: Vec<usize>,
    expert: bool,
    logp: f64,
    v: f64,
    r: f64,
    raw: f64,
}

/// Trains OPD on `episodes` (cycled), `interval_s` apart control steps. `progress` gets every
/// episode's log as it ends.
pub fn train(
    p: &Problem,
    episodes: &[Episode],
    interval_s: f64,
    cfg: &PpoConfig,
    progress: &mut dyn FnMut(&EpisodeLog, usize),
) -> Result<(OpdPolicy, Vec<EpisodeLog>)> {
    if episodes.is_empty() {
        return Err(LearnError::Invalid("no training episodes".into()));
    }
    let scale = episodes.iter().flat_map(|e| e.loads.iter()).copied().fold(1.0, f64::max);
    let net = OpdNet::new(OpdMeta::for_problem(p, scale, cfg.hidden, cfg.blocks), cfg.seed)?;
    let mut opt = candle_nn::AdamW::new(
        net.vm.all_vars(),
        candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x0bd);
    let mut logs = Vec::new();
    let mut buffer: Vec<(Step, f64, f64)> = Vec::new(); // (step, advantage, return)
    let mut pending: Vec<EpisodeLog> = Vec::new();
    for e in 0..cfg.episodes {
        let expert = cfg.expert_every > 0 && (e + 1) % cfg.expert_every == 0;
        let steps = rollout(&net, p, &episodes[e % episodes.len()], interval_s, expert, cfg, &mut rng)?;
        let mean_reward = steps.iter().map(|s| s.raw).sum::<f64>() / steps.len().max(1) as f64;
        buffer.extend(gae(steps, cfg));
        pending.push(EpisodeLog {
            episode: e + 1,
            expert,
            mean_reward,
            policy_loss: 0.0,
            value_loss: 0.0,
            entropy: 0.0,
            loss: 0.0,
        });
        if pending.len() < cfg.rollout.max(1) && e + 1 < cfg.episodes {
            continue;
        }
        let (pl, vl, ent, tl) = update(&net, &mut opt, &mut buffer, cfg, &mut rng)?;
        for mut log in pending.drain(..) {
            (log.policy_loss, log.value_loss, log.entropy, log.loss) = (pl, vl, ent, tl);
            progress(&log, cfg.episodes);
            logs.push(log);
        }
        buffer.clear();
    }
    Ok((OpdPolicy::new(net), logs))
}

/// One episode in the environment: the policy's sampled actions, or the expert's.
fn rollout(
    net: &OpdNet,
    p: &Problem,
    ep: &Episode,
    interval_s: f64,
    expert: bool,
    cfg: &PpoConfig,
    rng: &mut StdRng,
) -> Result<Vec<Step>> {
    let heads = net.meta.heads();
    let gamma_scale = 1.0 - cfg.gamma;
    let mut env = Env::new(p, &ep.loads, interval_s);
    let mut steps = Vec::new();
    let mut k = 0;
    while !env.done() {
        let predicted = ep.predicted.get(k).copied().unwrap_or_else(|| env.last_load());
        let obs = Observation {
            load_rps: env.last_load(),
            predicted_rps: predicted,
            current: env.config().clone(),
        };
        let s = net.features(p, &obs);
        let (logits, v) = net.eval_one(&s)?;
        let a: Vec<usize> = if expert {
            net.to_action(&solve_exact(p, predicted).0)
        } else {
            heads
                .iter()
                .map(|&(off, w)| {
                    let lp = log_softmax(&logits[off..off + w]);
                    let mut u = rng.random::<f64>();
                    for (i, l) in lp.iter().enumerate() {
                        u -= l.exp();
                        if u <= 0.0 {
                            return i;
                        }
                    }
                    w - 1
                })
                .collect()
        };
        let logp: f64 =
            heads.iter().zip(&a).map(|(&(off, w), &i)| log_softmax(&logits[off..off + w])[i]).sum();
        let st = env.step(&net.to_config(&a), predicted);
        // Rewards are learned scaled by (1 − γ), so that returns and values stay near the
        // reward's own scale and the value loss does not swamp the shared trunk.
        steps.push(Step { s, a, expert, logp, v: v as f64, r: st.reward * gamma_scale, raw: st.reward });
        k += 1;
    }
    Ok(steps)
}

/// GAE(γ, λ) over one episode (its last step is terminal): (step, Â, V̂ = Â + V).
fn gae(steps: Vec<Step>, cfg: &PpoConfig) -> Vec<(Step, f64, f64)> {
    let n = steps.len();
    let mut adv = vec![0.0; n];
    let (mut next_v, mut acc) = (0.0, 0.0);
    for t in (0..n).rev() {
        let delta = steps[t].r + cfg.gamma * next_v - steps[t].v;
        acc = delta + cfg.gamma * cfg.gae_lambda * acc;
        adv[t] = acc;
        next_v = steps[t].v;
    }
    steps
        .into_iter()
        .zip(adv)
        .map(|(s, a)| {
            let v = s.v;
            (s, a, a + v)
        })
        .collect()
}

/// PPO epochs over the buffer (advantages normalised over it). Returns the mean policy loss,
/// value loss, entropy and total loss.
fn update(
    net: &OpdNet,
    opt: &mut candle_nn::AdamW,
    buffer: &mut [(Step, f64, f64)],
    cfg: &PpoConfig,
    rng: &mut StdRng,
) -> Result<(f64, f64, f64, f64)> {
    let n = buffer.len();
    if n == 0 {
        return Ok((0.0, 0.0, 0.0, 0.0));
    }
    let mean = buffer.iter().map(|b| b.1).sum::<f64>() / n as f64;
    let sd = (buffer.iter().map(|b| (b.1 - mean).powi(2)).sum::<f64>() / n as f64).sqrt().max(1e-8);
    for b in buffer.iter_mut() {
        b.1 = (b.1 - mean) / sd;
    }
    let heads = net.meta.heads();
    let (mut pl, mut vl, mut ent, mut tl, mut updates) = (0.0, 0.0, 0.0, 0.0, 0usize);
    let mut order: Vec<usize> = (0..n).collect();
    let sdim = buffer[0].0.s.len();
    for _ in 0..cfg.epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for mb in order.chunks(cfg.minibatch.max(1)) {
            let b = mb.len();
            let cpu = &Device::Cpu;
            let s = Tensor::from_vec(
                mb.iter().flat_map(|&i| buffer[i].0.s.clone()).collect::<Vec<f32>>(),
                (b, sdim),
                cpu,
            )?;
            let old =
                Tensor::from_vec(mb.iter().map(|&i| buffer[i].0.logp as f32).collect::<Vec<f32>>(), b, cpu)?;
            let at = Tensor::from_vec(mb.iter().map(|&i| buffer[i].1 as f32).collect::<Vec<f32>>(), b, cpu)?;
            let rt = Tensor::from_vec(mb.iter().map(|&i| buffer[i].2 as f32).collect::<Vec<f32>>(), b, cpu)?;
            let (logits, values) = net.forward(&s)?;
            let mut logp = Tensor::zeros(b, DTYPE, cpu)?;
            let mut entropy = Tensor::zeros(b, DTYPE, cpu)?;
            for (h, &(off, w)) in heads.iter().enumerate() {
                let lp = candle_nn::ops::log_softmax(&logits.narrow(1, off, w)?, D::Minus1)?;
                let idx = Tensor::from_vec(
                    mb.iter().map(|&i| buffer[i].0.a[h] as u32).collect::<Vec<u32>>(),
                    (b, 1),
                    cpu,
                )?;
                logp = (logp + lp.gather(&idx, 1)?.reshape(b)?)?;
                entropy = (entropy - (lp.exp()? * &lp)?.sum(1)?)?;
            }
            // The log-ratio is bounded before exp: an expert action the policy had all but ruled
            // out must not overflow the ratio (the clip takes over well inside it).
            let logp_now = logp.clone();
            let ratio = (logp - old)?.clamp(-20.0, 20.0)?.exp()?;
            let surr1 = (&ratio * &at)?;
            let surr2 = (ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip)? * &at)?;
            // Dual clip (Ye et al. 2020): for Â < 0 the surrogate is also bounded below by 3·Â,
            // so a sample whose ratio has run away cannot blow the update up.
            let floor = (at.minimum(0.0)? * 3.0)?;
            let clip_obj = surr1.minimum(&surr2)?.maximum(&floor)?.mean_all()?;
            let vloss = (values - rt)?.sqr()?.mean_all()?;
            let ment = entropy.mean_all()?;
            let mut loss = ((vloss.affine(cfg.c1, 0.0)? - &clip_obj)? - ment.affine(cfg.c2, 0.0)?)?;
            let experts = mb.iter().filter(|&&i| buffer[i].0.expert).count();
            if experts > 0 && cfg.c_expert > 0.0 {
                let mask = Tensor::from_vec(
                    mb.iter().map(|&i| if buffer[i].0.expert { 1f32 } else { 0.0 }).collect::<Vec<f32>>(),
                    b,
                    cpu,
                )?;
                let bc = (logp_now.mul(&mask)?.sum_all()? / -(experts as f64))?;
                loss = (loss + bc.affine(cfg.c_expert, 0.0)?)?;
            }
            opt.backward_step(&loss)?;
            pl += -(clip_obj.to_scalar::<f32>()? as f64);
            vl += vloss.to_scalar::<f32>()? as f64;
            ent += ment.to_scalar::<f32>()? as f64;
            tl += loss.to_scalar::<f32>()? as f64;
            updates += 1;
        }
    }
    let u = updates.max(1) as f64;
    Ok((pl / u, vl / u, ent / u, tl / u))
}

#[cfg(test)]
mod tests {
    use super::*;
    use osprey_policy::configure::{Limits, RewardWeights, Weights, synthetic, within_limits};

    fn problem() -> Problem {
        Problem {
            pipeline: synthetic(2, 3, 4),
            limits: Limits { f_max: 3, b_max: 8, w_max: 1000.0, cores_max: 8.0 },
            weights: Weights::default(),
            reward: RewardWeights::default(),
        }
    }

    fn episode(seed: u64) -> Episode {
        let loads: Vec<f64> =
            (0..200).map(|s| 300.0 + 200.0 * ((s as f64 + seed as f64 * 7.0) / 30.0).sin()).collect();
        let predicted = loads.chunks(10).map(|c| c.iter().copied().fold(0.0, f64::max)).collect();
        Episode { loads, predicted }
    }

    #[test]
    fn a_few_episodes_train_save_load_and_decide_the_same() {
        let p = problem();
        let eps = vec![episode(0), episode(1)];
        let cfg = PpoConfig { episodes: 6, hidden: 16, blocks: 1, expert_every: 3, ..Default::default() };
        let mut seen = 0;
        let (mut pol, logs) = train(&p, &eps, 10.0, &cfg, &mut |_, _| seen += 1).unwrap();
        assert_eq!((seen, logs.len()), (6, 6));
        assert!(logs.iter().all(|l| l.loss.is_finite() && l.value_loss.is_finite() && l.entropy > 0.0));
        assert!(logs.iter().filter(|l| l.expert).count() == 2);
        let dir = std::env::temp_dir().join(format!("osprey-opd-{}", std::process::id()));
        let path = dir.join("opd.safetensors");
        pol.net().save(&path).unwrap();
        let mut back = OpdPolicy::load(&path, &p).unwrap();
        for load in [50.0, 300.0, 900.0] {
            let obs = Observation {
                load_rps: load,
                predicted_rps: load,
                current: osprey_policy::configure::minimal(&p),
            };
            let a = pol.decide(&p, &obs);
            assert_eq!(a, back.decide(&p, &obs));
            assert!(within_limits(&p, &osprey_policy::configure::enforce(&p, &a)));
        }
        // Weights for another pipeline shape are refused with the reason.
        let mut other = problem();
        other.limits.f_max = 5;
        let err = OpdPolicy::load(&path, &other).err().unwrap().to_string();
        assert!(err.contains("F_max"), "{err}");
        // And so are weights for another pipeline of the same shape.
        let mut renamed = problem();
        renamed.pipeline.name = format!("{}-other", p.pipeline.name);
        let err = OpdPolicy::load(&path, &renamed).err().unwrap().to_string();
        assert!(err.contains("trained for pipeline"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn training_is_seed_deterministic() {
        let p = problem();
        let eps = vec![episode(0)];
        let cfg = PpoConfig { episodes: 3, hidden: 8, blocks: 1, ..Default::default() };
        let (_, a) = train(&p, &eps, 10.0, &cfg, &mut |_, _| {}).unwrap();
        let (_, b) = train(&p, &eps, 10.0, &cfg, &mut |_, _| {}).unwrap();
        assert_eq!(a, b);
    }
}
