//! OPD's LSTM load predictor (§IV-A): the per-second load of the last 120 s in, the maximum
//! load of the next 20 s out, through a 25-unit LSTM and a one-unit dense layer.
//!
//! ```text
//! m    = max(mean(x₁..x₁₂₀), 1 req/s)           window scale
//! n(v) = ln(v/m + 0.1)                           a load as the network sees it
//! h    = LSTM₂₅(n(x₁), …, n(x₁₂₀))               last hidden state
//! ŷ    = m · max(0, exp(dense(h)) − 0.1)         predicted max of the next 20 s
//! loss = mean((dense(h) − n(y))²)                Adam, mini-batches of windows
//! ```
//!
//! Departure: the paper does not say how loads are scaled. Dividing each window by its own mean
//! makes one model serve traces whose rates differ by orders of magnitude (an LLM trace at a few
//! req/s, a camera pipeline at thousands), and the product with m restores the unit. The log
//! makes the squared error a relative one (what SMAPE scores), so the bursts of a sparse trace
//! (50× its mean in one second) do not drown the smooth ones in training.
//!
//! Held out: the last 20% of every trace; [`TraceReport`] gives SMAPE there for the LSTM and, on
//! the same windows, for the last value, an EWMA and the window's maximum, so that the figure
//! can be judged.

use crate::{DTYPE, LearnError, Result, load_vars, read_json, save_vars, seeded_init, sidecar, write_json};
use candle_core::{Device, Module, Tensor};
use candle_nn::rnn::{LSTM, LSTMConfig, RNN};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap};
use osprey_policy::predict::{Ewma, HISTORY_S, HORIZON_S, History, LoadPredictor, smape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LstmMeta {
    pub hidden: usize,
    pub history_s: usize,
    pub horizon_s: usize,
}

impl Default for LstmMeta {
    fn default() -> Self {
        LstmMeta { hidden: 25, history_s: HISTORY_S, horizon_s: HORIZON_S }
    }
}

/// Training settings.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub meta: LstmMeta,
    pub iterations: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    /// Share of every trace kept for training; the rest is held out.
    pub train_share: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            meta: LstmMeta::default(),
            iterations: 800,
            batch: 64,
            lr: 5e-3,
            seed: 7,
            train_share: 0.8,
        }
    }
}

/// SMAPE on one trace's held-out windows, %.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceReport {
    pub name: String,
    pub windows: usize,
    pub lstm: f64,
    pub last_value: f64,
    pub ewma: f64,
    pub window_max: f64,
}

pub struct Lstm {
    vm: VarMap,
    lstm: LSTM,
    dense: Linear,
    pub meta: LstmMeta,
}

fn scale(window: &[f64]) -> f64 {
    // At least 1 req/s: below that a window is idle, and dividing by its near-zero mean would
    // turn the next burst into a target thousands of times its inputs.
    (window.iter().sum::<f64>() / window.len().max(1) as f64).max(1.0)
}

/// A load as the network sees it: n(v) = ln(v/m + 0.1).
fn norm(v: f64, m: f64) -> f32 {
    (v.max(0.0) / m + 0.1).ln() as f32
}

fn denorm(y: f32, m: f64) -> f64 {
    m * ((y as f64).min(10.0).exp() - 0.1).max(0.0)
}

impl Lstm {
    fn build(meta: LstmMeta) -> Result<Lstm> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DTYPE, &Device::Cpu);
        let lstm = candle_nn::lstm(1, meta.hidden, LSTMConfig::default(), vb.pp("lstm"))?;
        let dense = candle_nn::linear(meta.hidden, 1, vb.pp("dense"))?;
        Ok(Lstm { vm, lstm, dense, meta })
    }

    /// [b, history] of scaled loads -> [b] scaled predictions.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t) = x.dims2()?;
        let states = self.lstm.seq(&x.reshape((b, t, 1))?)?;
        let last = states.last().ok_or_else(|| LearnError::Invalid("empty window".into()))?;
        Ok(self.dense.forward(last.h())?.reshape(b)?)
    }

    /// The predicted maximum load of the next horizon after `window` (oldest first, any
    /// length; the last `history_s` seconds are used, zero-padded).
    pub fn predict_window(&self, window: &[f64]) -> Result<f64> {
        let h = self.meta.history_s;
        let mut w = vec![0.0; h.saturating_sub(window.len())];
        w.extend_from_slice(&window[window.len().saturating_sub(h)..]);
        let m = scale(&w);
        let x: Vec<f32> = w.iter().map(|&v| norm(v, m)).collect();
        let y = self.forward(&Tensor::from_vec(x, (1, h), &Device::Cpu)?)?.to_vec1::<f32>()?;
        Ok(denorm(y[0], m))
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        save_vars(&self.vm, path)?;
        write_json(&sidecar(path), &self.meta)
    }

    pub fn load(path: &Path) -> Result<Lstm> {
        let meta: LstmMeta = read_json(&sidecar(path))?;
        let mut m = Lstm::build(meta)?;
        load_vars(&mut m.vm, path)?;
        Ok(m)
    }
}

/// (scaled window, scaled target) pairs of one span of a trace.
fn windows(load: &[f64], meta: &LstmMeta) -> Vec<(Vec<f32>, f32, f64)> {
    let (h, k) = (meta.history_s, meta.horizon_s);
    if load.len() < h + k + 1 {
        return Vec::new();
    }
    (h..load.len() - k)
        .map(|end| {
            let w = &load[end - h..end];
            let m = scale(w);
            let y = load[end..end + k].iter().copied().fold(0.0, f64::max);
            (w.iter().map(|&v| norm(v, m)).collect(), norm(y, m), m)
        })
        .collect()
}

/// Progress of training: (iteration, iterations, loss).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64);

/// Trains on the first `train_share` of every trace and reports SMAPE on the rest.
pub fn train(
    traces: &[(String, Vec<f64>)],
    cfg: &TrainConfig,
    progress: Progress,
) -> Result<(Lstm, Vec<TraceReport>)> {
    let model = Lstm::build(cfg.meta.clone())?;
    seeded_init(&model.vm, cfg.seed)?;
    let split = |t: &[f64]| ((t.len() as f64 * cfg.train_share) as usize).min(t.len());
    let mut pool = Vec::new();
    for (_, t) in traces {
        pool.extend(windows(&t[..split(t)], &cfg.meta));
    }
    if pool.is_empty() {
        return Err(LearnError::Invalid(format!(
            "no training window: every trace needs more than {} s in its first {:.0}%",
            cfg.meta.history_s + cfg.meta.horizon_s,
            cfg.train_share * 100.0
        )));
    }
    let mut opt = candle_nn::AdamW::new(
        model.vm.all_vars(),
        candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() },
    )?;
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
    let h = cfg.meta.history_s;
    for it in 0..cfg.iterations {
        let b = cfg.batch.min(pool.len()).max(1);
        let mut xs = Vec::with_capacity(b * h);
        let mut ys = Vec::with_capacity(b);
        for _ in 0..b {
            let (x, y, _) = &pool[rng.random_range(0..pool.len())];
            xs.extend_from_slice(x);
            ys.push(*y);
        }
        let x = Tensor::from_vec(xs, (b, h), &Device::Cpu)?;
        let y = Tensor::from_vec(ys, b, &Device::Cpu)?;
        let pred = model.forward(&x)?;
        let loss = pred.sub(&y)?.sqr()?.mean_all()?;
        opt.backward_step(&loss)?;
        if it % 10 == 0 || it + 1 == cfg.iterations {
            progress(it + 1, cfg.iterations, loss.to_scalar::<f32>()? as f64);
        }
    }
    let mut reports = Vec::new();
    for (name, t) in traces {
        reports.push(evaluate(&model, name, t, split(t))?);
    }
    Ok((model, reports))
}

/// SMAPE of the model and the baselines on the windows of `trace` that end after `from`.
pub fn evaluate(model: &Lstm, name: &str, trace: &[f64], from: usize) -> Result<TraceReport> {
    let meta = &model.meta;
    let (h, k) = (meta.history_s, meta.horizon_s);
    let start = from.max(h);
    let (mut pred, mut last, mut ewma_p, mut wmax, mut actual) = (vec![], vec![], vec![], vec![], vec![]);
    // Batched for speed: every held-out window in one forward pass per 256.
    let ends: Vec<usize> = (start..trace.len().saturating_sub(k)).collect();
    for chunk in ends.chunks(256) {
        let mut xs = Vec::with_capacity(chunk.len() * h);
        let mut ms = Vec::with_capacity(chunk.len());
        for &end in chunk {
            let w = &trace[end - h..end];
            let m = scale(w);
            xs.extend(w.iter().map(|&v| norm(v, m)));
            ms.push(m);
        }
        let y = model.forward(&Tensor::from_vec(xs, (chunk.len(), h), &Device::Cpu)?)?.to_vec1::<f32>()?;
        for ((&end, m), y) in chunk.iter().zip(ms).zip(y) {
            pred.push(denorm(y, m));
            let w = &trace[end - h..end];
            last.push(w[h - 1]);
            let mut e = Ewma::default();
            w.iter().for_each(|&v| e.observe(v));
            ewma_p.push(e.predict());
            wmax.push(w[h.saturating_sub(k)..].iter().copied().fold(0.0, f64::max));
            actual.push(trace[end..end + k].iter().copied().fold(0.0, f64::max));
        }
    }
    Ok(TraceReport {
        name: name.to_string(),
        windows: actual.len(),
        lstm: smape(&pred, &actual),
        last_value: smape(&last, &actual),
        ewma: smape(&ewma_p, &actual),
        window_max: smape(&wmax, &actual),
    })
}

/// The LSTM behind `LoadPredictor`: keeps the last `history_s` seconds.
pub struct LstmPredictor {
    model: Lstm,
    history: History,
    /// Wall time of the last prediction, µs.
    pub last_predict_us: f64,
}

impl LstmPredictor {
    pub fn new(model: Lstm) -> Self {
        let history = History::new(model.meta.history_s);
        LstmPredictor { model, history, last_predict_us: 0.0 }
    }
    pub fn load(path: &Path) -> Result<Self> {
        Ok(LstmPredictor::new(Lstm::load(path)?))
    }
}

impl LoadPredictor for LstmPredictor {
    fn name(&self) -> &str {
        "lstm"
    }
    fn observe(&mut self, rps: f64) {
        self.history.push(rps);
    }
    fn predict(&mut self) -> f64 {
        let t0 = Instant::now();
        // A tensor error on a well-formed window is a bug; fall back to the last second rather
        // than stop the control loop.
        let w = self.history.window();
        let p = self.model.predict_window(&w).unwrap_or_else(|_| w.last().copied().unwrap_or(0.0));
        self.last_predict_us = t0.elapsed().as_secs_f64() * 1e6;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wave(n: usize, phase: f64) -> Vec<f64> {
        (0..n).map(|s| 500.0 + 400.0 * ((s as f64 + phase) * std::f64::consts::TAU / 90.0).sin()).collect()
    }

    #[test]
    fn trains_saves_and_loads_the_same_predictions() {
        let traces = vec![("a".to_string(), wave(700, 0.0)), ("b".to_string(), wave(700, 17.0))];
        let cfg = TrainConfig {
            meta: LstmMeta { hidden: 8, history_s: 30, horizon_s: 5 },
            iterations: 60,
            batch: 16,
            ..Default::default()
        };
        let mut losses = Vec::new();
        let (m, reports) = train(&traces, &cfg, &mut |_, _, l| losses.push(l)).unwrap();
        assert!(losses.iter().all(|l| l.is_finite()));
        assert!(losses.last().unwrap() < losses.first().unwrap(), "{losses:?}");
        assert_eq!(reports.len(), 2);
        assert!(reports.iter().all(|r| r.windows > 0 && r.lstm.is_finite()));
        let dir = std::env::temp_dir().join(format!("osprey-lstm-{}", std::process::id()));
        let path = dir.join("p.safetensors");
        m.save(&path).unwrap();
        let back = Lstm::load(&path).unwrap();
        let w = wave(40, 3.0);
        assert_eq!(m.predict_window(&w).unwrap(), back.predict_window(&w).unwrap());
        let mut p = LstmPredictor::new(back);
        w.iter().for_each(|&x| p.observe(x));
        assert!(p.predict().is_finite());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_same_seed_trains_the_same_model() {
        let traces = vec![("a".to_string(), wave(300, 0.0))];
        let cfg = TrainConfig {
            meta: LstmMeta { hidden: 4, history_s: 20, horizon_s: 5 },
            iterations: 10,
            batch: 8,
            ..Default::default()
        };
        let (a, _) = train(&traces, &cfg, &mut |_, _, _| {}).unwrap();
        let (b, _) = train(&traces, &cfg, &mut |_, _, _| {}).unwrap();
        let w = wave(20, 1.0);
        assert_eq!(a.predict_window(&w).unwrap(), b.predict_window(&w).unwrap());
    }

    #[test]
    fn too_short_traces_are_refused_with_the_reason() {
        let err =
            train(&[("x".into(), vec![1.0; 10])], &TrainConfig::default(), &mut |_, _, _| {}).err().unwrap();
        assert!(err.to_string().contains("no training window"), "{err}");
    }
}
