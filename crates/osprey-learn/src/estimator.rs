//! Training of the data-aware accuracy estimators (SneakPeek's per-input estimates), on the
//! same tensor library as the other learned parts. The model itself, and its use per request,
//! stay sans-IO in `osprey_policy::estimate::DataAware`; this module only fits it.
//!
//! One L2-regularised logistic regression per variant over standardised features zᵢ:
//!
//! ```text
//! p̂ᵢᵥ = σ(zᵢ·wᵥ + bᵥ)
//! L(w, b) = Σᵥ (1/n) Σᵢ [ softplus(sᵢᵥ) − yᵢᵥ sᵢᵥ ] + (λ/2) Σᵥ ‖wᵥ‖²,   sᵢᵥ = zᵢ·wᵥ + bᵥ
//! ```
//!
//! minimised by full-batch gradient descent (candle's autograd, `SGD`), starting from w = 0
//! and bᵥ at the log-odds of variant v's training accuracy (Laplace-smoothed), so an
//! uninformative feature set leaves the profiled accuracy. All variants are fitted at once as
//! one n×d by d×V product; the per-variant losses are independent, so this is V separate
//! regressions. Written as `max(s, 0) + ln(1 + e^−|s|) − y·s`, the loss never overflows.

use crate::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use osprey_policy::estimate::{DataAware, standardise};

/// Gradient-descent settings of [`train`].
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub iterations: usize,
    pub learning_rate: f32,
    /// λ, on the weights only (not the biases).
    pub l2: f32,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings { iterations: 400, learning_rate: 0.5, l2: 1e-3 }
    }
}

/// Fits one logistic regression per variant: `x[i]` are feature rows ([`osprey_policy::estimate::features`]),
/// `correct[v][i]` whether variant `v` answered sample `i` correctly.
pub fn train(
    variants: Vec<String>,
    x: &[Vec<f32>],
    correct: &[Vec<bool>],
    settings: &TrainSettings,
) -> Result<DataAware> {
    let d = x.first().map_or(0, Vec::len);
    let rows = x.len();
    let n = rows.max(1) as f32;
    let nv = correct.len();
    if x.iter().any(|r| r.len() != d) || correct.iter().any(|c| c.len() != rows) {
        return Err(crate::LearnError::Invalid(
            "every feature row needs the same width and every variant one outcome per row".into(),
        ));
    }
    let mean: Vec<f32> = (0..d).map(|j| x.iter().map(|r| r[j]).sum::<f32>() / n).collect();
    let std: Vec<f32> = (0..d)
        .map(|j| (x.iter().map(|r| (r[j] - mean[j]).powi(2)).sum::<f32>() / n).sqrt().max(1e-6))
        .collect();
    if rows == 0 || d == 0 || nv == 0 {
        let bias = correct.iter().map(|_| 0.0).collect();
        return Ok(DataAware {
            features: "generic-v1".into(),
            variants,
            mean,
            std,
            weights: vec![vec![0.0; d]; nv],
            bias,
        });
    }
    let dev = Device::Cpu;
    let z: Vec<f32> = x
        .iter()
        .flat_map(|r| r.iter().enumerate().map(|(j, v)| standardise(*v, mean[j], std[j]) as f32))
        .collect();
    let z = Tensor::from_vec(z, (rows, d), &dev)?;
    let y: Vec<f32> =
        (0..rows).flat_map(|i| correct.iter().map(move |c| f32::from(u8::from(c[i])))).collect();
    let y = Tensor::from_vec(y, (rows, nv), &dev)?;
    let prior: Vec<f32> = correct
        .iter()
        .map(|c| {
            let pos = c.iter().filter(|&&t| t).count() as f32;
            let p = ((pos + 1.0) / (n + 2.0)).clamp(1e-3, 1.0 - 1e-3);
            (p / (1.0 - p)).ln()
        })
        .collect();
    let w = Var::from_tensor(&Tensor::zeros((d, nv), DType::F32, &dev)?)?;
    let b = Var::from_tensor(&Tensor::from_vec(prior, nv, &dev)?)?;
    let mut opt = candle_nn::SGD::new(vec![w.clone(), b.clone()], f64::from(settings.learning_rate))?;
    for _ in 0..settings.iterations {
        let s = z.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        let softplus = (s.relu()? + s.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
        let data = ((softplus - (&y * &s)?)?.sum_all()? / f64::from(n))?;
        let reg = (w.as_tensor().sqr()?.sum_all()? * f64::from(0.5 * settings.l2))?;
        opt.backward_step(&(data + reg)?)?;
    }
    // d×V → one row of d weights per variant.
    let weights = w.as_tensor().t()?.to_vec2::<f32>()?;
    let bias = b.as_tensor().to_vec1::<f32>()?;
    Ok(DataAware { features: "generic-v1".into(), variants, mean, std, weights, bias })
}

#[cfg(test)]
mod tests {
    use super::*;
    use osprey_policy::estimate::brier;

    #[test]
    fn learns_a_separable_rule_and_is_calibrated_on_it() {
        // Variant 0 is right when feature 0 is positive; variant 1 is always right.
        let x: Vec<Vec<f32>> = (0..200).map(|i| vec![(i as f32 - 100.0) / 50.0, (i % 7) as f32]).collect();
        let c0: Vec<bool> = x.iter().map(|r| r[0] > 0.0).collect();
        let c1 = vec![true; 200];
        let m =
            train(vec!["a".into(), "b".into()], &x, &[c0.clone(), c1], &TrainSettings::default()).unwrap();
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

    /// One step by hand: from w = 0 the gradient of the weights is Zᵀ(σ(b) − Y)/n.
    #[test]
    fn one_step_is_the_hand_computed_gradient_step() {
        let x = vec![vec![0.0f32], vec![2.0]];
        let correct = vec![vec![false, true]];
        let s = TrainSettings { iterations: 1, learning_rate: 0.1, l2: 0.0 };
        let m = train(vec!["a".into()], &x, &correct, &s).unwrap();
        // mean 1, std 1: z = [-1, 1]; prior (1+1)/(2+2) = 0.5 → b = 0, σ(b) = 0.5.
        // ∂L/∂w = ((0.5 − 0)(−1) + (0.5 − 1)(1)) / 2 = −0.5 → w = 0.05; ∂L/∂b = 0 → b = 0.
        assert!((m.weights[0][0] - 0.05).abs() < 1e-6, "{:?}", m.weights);
        assert!(m.bias[0].abs() < 1e-6, "{:?}", m.bias);
    }

    #[test]
    fn uninformative_features_keep_the_profiled_accuracy() {
        let x = vec![vec![1.0f32]; 40];
        let correct = vec![(0..40).map(|i| i % 4 != 0).collect::<Vec<_>>()];
        let m = train(vec!["a".into()], &x, &correct, &TrainSettings::default()).unwrap();
        let mut out = [0.0];
        m.estimate_features(&[1.0], &mut out);
        // The bias starts at the smoothed 31/42 and descends to the training accuracy, 30/40.
        assert!((out[0] - 0.75).abs() < 1e-3, "{out:?}");
    }

    #[test]
    fn ragged_input_is_refused() {
        let x = vec![vec![1.0f32, 2.0], vec![1.0]];
        assert!(train(vec!["a".into()], &x, &[vec![true, false]], &TrainSettings::default()).is_err());
    }
}
