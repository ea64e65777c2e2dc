//! Profiling a variant: latency per batch size and throughput on this machine.
//!
//! For each batch size the session is warmed up, then run `iterations` times on real inputs
//! (drawn from the evaluation set when there is one); p50/p90/p99 come from the sorted
//! samples (nearest rank), throughput is `batch / mean latency` for one instance.

use crate::session::Session;
use osprey_core::error::Result;
use osprey_core::profile::{BatchProfile, VariantProfile};
use osprey_core::tensor::RawTensor;
use std::time::Instant;

pub struct ProfileSettings {
    pub batch_sizes: Vec<u32>,
    pub iterations: usize,
    pub warmup: usize,
}

impl Default for ProfileSettings {
    fn default() -> Self {
        ProfileSettings { batch_sizes: vec![1, 2, 4, 8, 16], iterations: 50, warmup: 5 }
    }
}

/// Nearest-rank quantile of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Measures `session` at every batch size. `sample_input(batch)` builds one batch of inputs;
/// `tick()` is called after every timed run (for a progress bar).
pub fn profile_variant(
    name: &str,
    session: &Session,
    settings: &ProfileSettings,
    mut sample_input: impl FnMut(u32) -> Result<Vec<RawTensor>>,
    mut tick: impl FnMut(),
) -> Result<VariantProfile> {
    let mut batches = Vec::new();
    for &b in &settings.batch_sizes {
        let inputs = sample_input(b)?;
        for _ in 0..settings.warmup {
            session.run(&inputs)?;
        }
        let mut us = Vec::with_capacity(settings.iterations);
        for _ in 0..settings.iterations {
            let t = Instant::now();
            session.run(&inputs)?;
            us.push(t.elapsed().as_secs_f64() * 1e6);
            tick();
        }
        us.sort_by(f64::total_cmp);
        let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
        batches.push(BatchProfile {
            batch: b,
            p50_us: quantile(&us, 0.50),
            p90_us: quantile(&us, 0.90),
            p99_us: quantile(&us, 0.99),
            throughput_rps: if mean > 0.0 { b as f64 * 1e6 / mean } else { 0.0 },
        });
    }
    Ok(VariantProfile { name: name.to_string(), swap_us: 0.0, explain_us: None, batches })
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
