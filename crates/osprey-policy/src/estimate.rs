//! Accuracy estimators: how likely is each variant to answer *this* input correctly?
//!
//! Three implementations behind [`AccuracyEstimator`]:
//! - [`Profiled`]: every input gets the variant's average accuracy on the held-out set — the
//!   baseline the SneakPeek paper criticises (it is biased toward the test set's label mix and
//!   blind to how hard an input is).
//! - [`PerClass`]: Σ_c p(c) · acc_v(c), with p(c) the label mix of recent answers (an
//!   exponentially decayed histogram fed by [`AccuracyEstimator::observe`]). It follows the
//!   workload's class mix, still not the individual input.
//! - [`DataAware`]: a "SneakPeek model" per task: cheap features φ(x) of the raw input
//!   ([`features`], one pass over the sample) and one logistic regression per variant,
//!   â_v(x) = σ(w_v · z(x) + b_v), z = (φ − μ)/σ, trained on per-sample correctness of each
//!   variant. It departs from the paper, whose SneakPeek models predict the class distribution
//!   and combine it with per-class accuracy: predicting each variant's correctness directly is
//!   what selection needs, and it also captures input quality (noise, occlusion) that a class
//!   distribution cannot.
//!
//! The estimators are pure computation; the drivers measure their cost and count it in the
//! request's time budget.

use osprey_core::tensor::DataType;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// One sample (one row of a request's first input) as raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub datatype: DataType,
    pub bytes: &'a [u8],
}

pub trait AccuracyEstimator: Send + Sync {
    fn name(&self) -> &'static str;
    /// Writes into `out[v]` the estimated probability that variant `v` answers `sample` right.
    fn estimate(&self, sample: Sample<'_>, out: &mut [f64]);
    /// Tells the estimator the label an answer carried (for workload-level estimators).
    fn observe(&self, _label: usize) {}
}

/// Average accuracy per variant, whatever the input.
pub struct Profiled {
    pub accuracy: Vec<f64>,
}

impl AccuracyEstimator for Profiled {
    fn name(&self) -> &'static str {
        "profiled"
    }
    fn estimate(&self, _: Sample<'_>, out: &mut [f64]) {
        out.copy_from_slice(&self.accuracy);
    }
}

/// Per-class profiled accuracy weighted by the recent label mix.
pub struct PerClass {
    /// `class_accuracy[v][c]`.
    pub class_accuracy: Vec<Vec<f64>>,
    mix: Mutex<Vec<f64>>,
    decay: f64,
}

impl PerClass {
    /// Starts from a uniform label mix; `half_life` answers halve an old label's weight.
    pub fn new(class_accuracy: Vec<Vec<f64>>, half_life: f64) -> PerClass {
        let classes = class_accuracy.first().map_or(0, Vec::len);
        let decay = 0.5f64.powf(1.0 / half_life.max(1.0));
        PerClass { class_accuracy, mix: Mutex::new(vec![1.0 / classes.max(1) as f64; classes]), decay }
    }
}

impl AccuracyEstimator for PerClass {
    fn name(&self) -> &'static str {
        "per-class"
    }
    fn estimate(&self, _: Sample<'_>, out: &mut [f64]) {
        let mix = self.mix.lock().map(|m| m.clone()).unwrap_or_default();
        let total: f64 = mix.iter().sum::<f64>().max(1e-12);
        for (o, acc) in out.iter_mut().zip(&self.class_accuracy) {
            *o = acc.iter().zip(&mix).map(|(a, p)| a * p).sum::<f64>() / total;
        }
    }
    fn observe(&self, label: usize) {
        if let Ok(mut mix) = self.mix.lock() {
            for p in mix.iter_mut() {
                *p *= self.decay;
            }
            if let Some(p) = mix.get_mut(label) {
                *p += 1.0 - self.decay;
            }
        }
    }
}

/// Number of features [`features`] returns.
pub const FEATURES: usize = 8 + 2 * SEGMENTS;
const SEGMENTS: usize = 8;

/// Converts raw little-endian elements to f32 (16-bit and 8-bit integers scaled to about
/// [-1, 1], as audio and pixels are), with the datatype dispatch outside the loop.
fn to_f32(dt: DataType, b: &[u8]) -> Vec<f32> {
    macro_rules! conv {
        ($t:ty, $n:expr, $scale:expr) => {
            b.chunks_exact($n)
                .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])) as f32 * $scale)
                .collect()
        };
    }
    match dt {
        DataType::Fp32 => conv!(f32, 4, 1.0),
        DataType::Fp64 => conv!(f64, 8, 1.0),
        DataType::Int16 => conv!(i16, 2, 1.0 / 32768.0),
        DataType::Uint16 => conv!(u16, 2, 1.0 / 65535.0),
        DataType::Uint8 => b.iter().map(|&v| f32::from(v) / 255.0).collect(),
        DataType::Int8 => b.iter().map(|&v| f32::from(v as i8) / 128.0).collect(),
        DataType::Bool => b.iter().map(|&v| f32::from(v)).collect(),
        DataType::Int32 => conv!(i32, 4, 1.0),
        DataType::Uint32 => conv!(u32, 4, 1.0),
        DataType::Int64 => conv!(i64, 8, 1.0),
        DataType::Uint64 => conv!(u64, 8, 1.0),
    }
}

/// Cheap, modality-agnostic features of one sample, in one pass:
/// mean, std, mean |x|, max, min, sparsity (share of |x| under 10% of the peak), zero-crossing
/// rate, roughness (mean |x_i − x_{i−1}|, high for noise); then mean |x| and std of each of 8
/// equal segments of the flattened sample (where the energy is).
pub fn features(s: Sample<'_>) -> [f32; FEATURES] {
    let size = s.datatype.size();
    let n = s.bytes.len() / size;
    let mut f = [0f32; FEATURES];
    if n == 0 {
        return f;
    }
    let x = to_f32(s.datatype, s.bytes);
    let nf = n as f32;
    let (mut sum, mut sum_sq, mut sum_abs) = (0f32, 0f32, 0f32);
    let (mut max, mut min) = (f32::MIN, f32::MAX);
    let (mut zc, mut rough) = (0u32, 0f32);
    let mut prev = x[0];
    for &v in &x {
        sum += v;
        sum_sq += v * v;
        sum_abs += v.abs();
        max = max.max(v);
        min = min.min(v);
        zc += u32::from((v >= 0.0) != (prev >= 0.0));
        rough += (v - prev).abs();
        prev = v;
    }
    let mean = sum / nf;
    let var = (sum_sq / nf - mean * mean).max(0.0);
    let abs_mean = sum_abs / nf;
    let peak = max.abs().max(min.abs()).max(1e-9);
    let sparse = x.iter().filter(|v| v.abs() < 0.1 * peak).count() as f32 / nf;
    let (zc, rough) = (zc as f32 / nf, rough / nf);
    f[..8].copy_from_slice(&[mean, var.sqrt(), abs_mean, max, min, sparse, zc, rough]);
    for k in 0..SEGMENTS {
        let seg = &x[k * n / SEGMENTS..((k + 1) * n / SEGMENTS).max(k * n / SEGMENTS + 1).min(n)];
        let m = seg.iter().sum::<f32>() / seg.len() as f32;
        f[8 + k] = seg.iter().map(|v| v.abs()).sum::<f32>() / seg.len() as f32;
        f[8 + SEGMENTS + k] = (seg.iter().map(|v| (v - m) * (v - m)).sum::<f32>() / seg.len() as f32).sqrt();
    }
    f
}

/// The trained data-aware estimator of one task (serialised as JSON beside the model).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataAware {
    /// Feature set version; only `generic-v1` ([`features`]) exists.
    pub features: String,
    pub variants: Vec<String>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// `weights[v]`, one per feature.
    pub weights: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl DataAware {
    /// Parses the JSON form written by `osprey train-estimator`.
    pub fn from_json(text: &str) -> Result<DataAware, String> {
        let m: DataAware = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let d = m.mean.len();
        if m.features != "generic-v1"
            || m.std.len() != d
            || m.weights.len() != m.variants.len()
            || m.bias.len() != m.variants.len()
            || m.weights.iter().any(|w| w.len() != d)
        {
            return Err("estimator file is inconsistent (feature set, sizes)".into());
        }
        Ok(m)
    }

    /// Estimates from precomputed features (also used by training and evaluation).
    pub fn estimate_features(&self, f: &[f32], out: &mut [f64]) {
        for (v, o) in out.iter_mut().enumerate() {
            let (Some(w), Some(b)) = (self.weights.get(v), self.bias.get(v)) else {
                continue;
            };
            let z: f64 = f
                .iter()
                .zip(&self.mean)
                .zip(&self.std)
                .zip(w)
                .map(|(((x, m), s), w)| f64::from((x - m) / s * w))
                .sum::<f64>()
                + f64::from(*b);
            *o = sigmoid(z);
        }
    }

    /// Fits one L2-regularised logistic regression per variant by full-batch gradient descent.
    /// `x[i]` are feature rows, `correct[v][i]` whether variant `v` was right on sample `i`.
    pub fn train(
        variants: Vec<String>,
        x: &[Vec<f32>],
        correct: &[Vec<bool>],
        settings: &TrainSettings,
    ) -> DataAware {
        let d = x.first().map_or(0, Vec::len);
        let n = x.len().max(1) as f32;
        let mean: Vec<f32> = (0..d).map(|j| x.iter().map(|r| r[j]).sum::<f32>() / n).collect();
        let std: Vec<f32> = (0..d)
            .map(|j| (x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f32>() / n).sqrt().max(1e-6))
            .collect();
        let z: Vec<Vec<f32>> =
            x.iter().map(|r| r.iter().enumerate().map(|(j, v)| (v - mean[j]) / std[j]).collect()).collect();
        let mut weights = Vec::new();
        let mut bias = Vec::new();
        for y in correct {
            let mut w = vec![0f32; d];
            let pos = y.iter().filter(|&&c| c).count() as f32;
            let prior = ((pos + 1.0) / (n + 2.0)).clamp(1e-3, 1.0 - 1e-3);
            let mut b = (prior / (1.0 - prior)).ln();
            for _ in 0..settings.iterations {
                let mut gw = vec![0f32; d];
                let mut gb = 0f32;
                for (row, &t) in z.iter().zip(y) {
                    let s: f32 = row.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>() + b;
                    let p = 1.0 / (1.0 + (-s).exp());
                    let err = p - f32::from(u8::from(t));
                    for (g, a) in gw.iter_mut().zip(row) {
                        *g += err * a;
                    }
                    gb += err;
                }
                for (wj, g) in w.iter_mut().zip(&gw) {
                    *wj -= settings.learning_rate * (g / n + settings.l2 * *wj);
                }
                b -= settings.learning_rate * gb / n;
            }
            weights.push(w);
            bias.push(b);
        }
        DataAware { features: "generic-v1".into(), variants, mean, std, weights, bias }
    }
}

pub struct TrainSettings {
    pub iterations: usize,
    pub learning_rate: f32,
    pub l2: f32,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings { iterations: 400, learning_rate: 0.5, l2: 1e-3 }
    }
}

impl AccuracyEstimator for DataAware {
    fn name(&self) -> &'static str {
        "data-aware"
    }
    fn estimate(&self, sample: Sample<'_>, out: &mut [f64]) {
        self.estimate_features(&features(sample), out);
    }
}

/// Brier score: mean squared error of probabilities against outcomes (lower is better).
pub fn brier(pred: &[f64], outcome: &[bool]) -> f64 {
    let n = pred.len().max(1) as f64;
    pred.iter().zip(outcome).map(|(p, &o)| (p - f64::from(u8::from(o))).powi(2)).sum::<f64>() / n
}

/// Expected calibration error over `bins` equal-width bins (lower is better).
pub fn ece(pred: &[f64], outcome: &[bool], bins: usize) -> f64 {
    let bins = bins.max(1);
    let mut sum_p = vec![0.0; bins];
    let mut sum_o = vec![0.0; bins];
    let mut count = vec![0usize; bins];
    for (&p, &o) in pred.iter().zip(outcome) {
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sum_p[b] += p;
        sum_o[b] += f64::from(u8::from(o));
        count[b] += 1;
    }
    let n = pred.len().max(1) as f64;
    (0..bins).filter(|&b| count[b] > 0).map(|b| (sum_p[b] - sum_o[b]).abs() / n).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn features_see_noise_and_energy() {
        let clean: Vec<f32> = (0..64).map(|i| if (20..40).contains(&i) { 1.0 } else { 0.0 }).collect();
        let noisy: Vec<f32> =
            clean.iter().enumerate().map(|(i, v)| v + if i % 2 == 0 { 0.3 } else { -0.3 }).collect();
        let (a, b) = (f32s(&clean), f32s(&noisy));
        let fc = features(Sample { datatype: DataType::Fp32, bytes: &a });
        let fnz = features(Sample { datatype: DataType::Fp32, bytes: &b });
        assert!(fnz[7] > fc[7], "roughness");
        assert!(fnz[6] > fc[6], "zero crossings");
        assert!(fc[8 + 3] > fc[8], "energy sits in the middle segments");
        let empty = features(Sample { datatype: DataType::Int16, bytes: &[] });
        assert!(empty.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn logistic_learns_a_separable_rule_and_is_calibrated_on_it() {
        // Variant 0 is right when feature 0 is positive; variant 1 is always right.
        let x: Vec<Vec<f32>> = (0..200).map(|i| vec![(i as f32 - 100.0) / 50.0, (i % 7) as f32]).collect();
        let c0: Vec<bool> = x.iter().map(|r| r[0] > 0.0).collect();
        let c1 = vec![true; 200];
        let m =
            DataAware::train(vec!["a".into(), "b".into()], &x, &[c0.clone(), c1], &TrainSettings::default());
        let mut out = [0.0; 2];
        m.estimate_features(&[1.5, 0.0], &mut out);
        assert!(out[0] > 0.8 && out[1] > 0.9, "{out:?}");
        m.estimate_features(&[-1.5, 0.0], &mut out);
        assert!(out[0] < 0.2, "{out:?}");
        let preds: Vec<f64> = x
            .iter()
            .map(|r| {
                let mut o = [0.0; 2];
                m.estimate_features(r, &mut o);
                o[0]
            })
            .collect();
        assert!(brier(&preds, &c0) < 0.1);
        let avg = vec![0.5; 200];
        assert!(brier(&preds, &c0) < brier(&avg, &c0));
    }

    #[test]
    fn calibration_metrics() {
        assert_eq!(brier(&[1.0, 0.0], &[true, false]), 0.0);
        assert_eq!(brier(&[0.0], &[true]), 1.0);
        assert!(ece(&[0.7; 10], &[true, true, true, true, true, true, true, false, false, false], 10) < 1e-9);
        assert!((ece(&[0.9; 4], &[false; 4], 10) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn per_class_follows_the_label_mix() {
        let pc = PerClass::new(vec![vec![1.0, 0.0], vec![0.5, 0.5]], 4.0);
        let s = Sample { datatype: DataType::Fp32, bytes: &[] };
        let mut out = [0.0; 2];
        pc.estimate(s, &mut out);
        assert!((out[0] - 0.5).abs() < 1e-9 && (out[1] - 0.5).abs() < 1e-9);
        for _ in 0..50 {
            pc.observe(0);
        }
        pc.estimate(s, &mut out);
        assert!(out[0] > 0.95, "{out:?}");
        assert!((out[1] - 0.5).abs() < 1e-9);
    }
}
