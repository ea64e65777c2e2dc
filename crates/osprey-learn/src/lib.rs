//! Osprey's learned parts, on candle (CPU): trained in the simulator, saved as safetensors
//! (with a JSON sidecar for the shapes and scales a loader needs), loaded by the live
//! controller and the benchmarks.
//!
//! # Layout
//! - [`estimator`]: fits SneakPeek's data-aware accuracy estimators (one logistic regression
//!   per variant over cheap input features), evaluated per request by
//!   `osprey_policy::estimate::DataAware`.
//! - [`lstm`]: OPD's load predictor — 120 s of per-second load in, the maximum of the next
//!   20 s out, through a 25-unit LSTM and one dense unit; implements
//!   `osprey_policy::predict::LoadPredictor`.
//! - [`opd`]: OPD's configuration policy — PPO (clipped surrogate, value loss, entropy bonus,
//!   Adam, mini-batches) over eq. 5's state through a fully connected layer and residual
//!   blocks, one categorical head per stage and decision, with IPA's answer as the expert every
//!   f-th episode; implements `osprey_policy::configure::ConfigPolicy`.
//!
//! Every weight is initialised from a seeded generator (candle's own initialisers draw from an
//! unseeded one), so a training run is a function of its seed.

pub mod estimator;
pub mod lstm;
pub mod opd;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("tensor library: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, LearnError>;

/// Overwrites every variable of `vm` from a seeded generator, in name order: matrices uniform in
/// ±1/√fan_in (fan_in = the last dimension, as candle lays out weights), vectors zero.
pub(crate) fn seeded_init(vm: &VarMap, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let data = vm.data().lock().map_err(|_| LearnError::Invalid("variable map poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if dims.len() >= 2 {
            let bound = 1.0 / (dims[dims.len() - 1] as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        } else {
            vec![0.0; n]
        };
        var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}

/// `weights.safetensors` -> `weights.json`, the sidecar with what the loader needs.
pub fn sidecar(weights: &Path) -> PathBuf {
    weights.with_extension("json")
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| LearnError::Invalid(e.to_string()))?;
    std::fs::write(path, text)
        .map_err(|e| LearnError::File { path: path.display().to_string(), message: e.to_string() })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| LearnError::File { path: path.display().to_string(), message: e.to_string() })?;
    serde_json::from_str(&text)
        .map_err(|e| LearnError::File { path: path.display().to_string(), message: e.to_string() })
}

pub(crate) fn save_vars(vm: &VarMap, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| LearnError::File { path: dir.display().to_string(), message: e.to_string() })?;
    }
    vm.save(path).map_err(|e| LearnError::File { path: path.display().to_string(), message: e.to_string() })
}

pub(crate) fn load_vars(vm: &mut VarMap, path: &Path) -> Result<()> {
    vm.load(path).map_err(|e| LearnError::File { path: path.display().to_string(), message: e.to_string() })
}

pub(crate) const DTYPE: DType = DType::F32;
