//! Latency profiles: per variant and batch size, measured on the node that serves it.
//!
//! `osprey profile` writes `<model>/profile.toml`; policies read it through [`ModelProfile`].
//! Between measured batch sizes latency is interpolated linearly; beyond the largest measured
//! batch it is extrapolated with the last segment's per-item slope (never below the last point).

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchProfile {
    pub batch: u32,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// Samples per second at this batch size with one instance.
    pub throughput_rps: f64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariantProfile {
    pub name: String,
    /// Extra latency of the first batch after another variant ran on the same worker, µs
    /// (cold caches); the scheduler charges it to variant switches.
    #[serde(default)]
    pub swap_us: f64,
    /// Sorted by batch size.
    pub batches: Vec<BatchProfile>,
    /// p90 of one occlusion explanation of one sample (every masked copy run as one batch, and
    /// the attribution), µs; `osprey profile` writes it for models with `[explain]`. The
    /// gateway plans an explanation with the larger of this and the batch latency of the masked
    /// copies; absent, the batch latency alone counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explain_us: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelProfile {
    /// Free text: where and how it was measured.
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub variants: Vec<VariantProfile>,
}

/// Which latency statistic a caller plans with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantile {
    P50,
    P90,
    P99,
}

impl BatchProfile {
    fn at(&self, q: Quantile) -> f64 {
        match q {
            Quantile::P50 => self.p50_us,
            Quantile::P90 => self.p90_us,
            Quantile::P99 => self.p99_us,
        }
    }
}

impl VariantProfile {
    /// Expected latency in microseconds of one batch of `batch` samples.
    pub fn latency_us(&self, batch: u32, q: Quantile) -> Option<f64> {
        let pts = &self.batches;
        let first = pts.first()?;
        if pts.len() == 1 || batch <= first.batch {
            let per_item = first.at(q) / first.batch.max(1) as f64;
            return Some(if batch >= first.batch {
                first.at(q) + per_item * (batch - first.batch) as f64
            } else {
                first.at(q)
            });
        }
        for w in pts.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            if batch <= b.batch {
                let t = (batch - a.batch) as f64 / (b.batch - a.batch).max(1) as f64;
                return Some(a.at(q) + t * (b.at(q) - a.at(q)));
            }
        }
        let (a, b) = (&pts[pts.len() - 2], &pts[pts.len() - 1]);
        let slope = ((b.at(q) - a.at(q)) / (b.batch - a.batch).max(1) as f64).max(0.0);
        Some(b.at(q) + slope * (batch - b.batch) as f64)
    }
}

impl ModelProfile {
    pub fn variant(&self, name: &str) -> Option<&VariantProfile> {
        self.variants.iter().find(|v| v.name == name)
    }

    pub fn load(path: &Path) -> Result<ModelProfile> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
        let mut p: ModelProfile =
            toml::from_str(&text).map_err(|e| crate::model::toml_error(&text, path, &e))?;
        for v in &mut p.variants {
            v.batches.sort_by_key(|b| b.batch);
            if v.batches.iter().any(|b| b.batch == 0 || b.p50_us.is_nan() || b.p50_us < 0.0) {
                return Err(Error::invalid(format!(
                    "{}: variant '{}' has an invalid batch entry",
                    path.display(),
                    v.name
                )));
            }
        }
        Ok(p)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bp(batch: u32, us: f64) -> BatchProfile {
        BatchProfile { batch, p50_us: us, p90_us: us * 1.1, p99_us: us * 1.5, throughput_rps: 0.0 }
    }

    #[test]
    fn latency_interpolates_and_extrapolates() {
        let v = VariantProfile {
            name: "v".into(),
            swap_us: 0.0,
            explain_us: None,
            batches: vec![bp(1, 100.0), bp(4, 250.0), bp(8, 450.0)],
        };
        assert_eq!(v.latency_us(1, Quantile::P50), Some(100.0));
        assert_eq!(v.latency_us(2, Quantile::P50), Some(150.0));
        assert_eq!(v.latency_us(8, Quantile::P50), Some(450.0));
        assert_eq!(v.latency_us(10, Quantile::P50), Some(550.0));
        assert!(v.latency_us(4, Quantile::P99).unwrap() > v.latency_us(4, Quantile::P50).unwrap());
        let empty = VariantProfile { name: "e".into(), swap_us: 0.0, explain_us: None, batches: vec![] };
        assert_eq!(empty.latency_us(1, Quantile::P50), None);
    }

    #[test]
    fn round_trips_through_toml() {
        let p = ModelProfile {
            host: "h".into(),
            variants: vec![VariantProfile {
                name: "v".into(),
                swap_us: 0.0,
                explain_us: None,
                batches: vec![bp(1, 10.0)],
            }],
        };
        let back: ModelProfile = toml::from_str(&p.to_toml()).unwrap();
        assert_eq!(back, p);
    }
}
