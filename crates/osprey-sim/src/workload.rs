//! Arrival processes. Every generator is a pure function of its parameters, the duration and a
//! seeded RNG, so one scenario gives the same arrivals to every policy it compares.
//!
//! OPD's workload shapes (its evaluation uses steady-low, fluctuating and steady-high loads):
//! `steady-low` = `low` req/s, `steady-high` = `high` req/s, `fluctuating` =
//! `low + (high − low)·(1 − cos(2πt/period))/2`, drawn as a non-homogeneous Poisson process by
//! thinning.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Workload {
    /// Exponential inter-arrival times.
    Poisson { rate: f64 },
    /// Gamma inter-arrival times with coefficient of variation `cv` (cv > 1 is burstier).
    Gamma { rate: f64, cv: f64 },
    /// One of OPD's shapes.
    Shape {
        shape: Shape,
        low: f64,
        high: f64,
        #[serde(default = "default_period")]
        period_s: f64,
    },
    /// `base` req/s with bursts of `burst` req/s lasting `burst_s` every `every_s`.
    Bursty { base: f64, burst: f64, every_s: f64, burst_s: f64 },
    /// Replay of a CSV trace: `timestamps` (first column, seconds or `YYYY-MM-DD HH:MM:SS.f`)
    /// or `counts` (requests per second, one row per second, count in the last column).
    Trace {
        path: String,
        #[serde(default)]
        format: TraceFormat,
        /// Time compression: 2.0 replays twice as fast.
        #[serde(default = "one")]
        speedup: f64,
    },
}

fn default_period() -> f64 {
    60.0
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    SteadyLow,
    Fluctuating,
    SteadyHigh,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TraceFormat {
    #[default]
    Timestamps,
    Counts,
}

fn exp(rng: &mut StdRng, rate: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() / rate
}

fn normal(rng: &mut StdRng) -> f64 {
    let (u1, u2) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Gamma(shape k, scale 1) by Marsaglia and Tsang (k < 1 boosted by U^(1/k)).
fn gamma(rng: &mut StdRng, k: f64) -> f64 {
    if k < 1.0 {
        return gamma(rng, k + 1.0) * rng.random::<f64>().powf(1.0 / k);
    }
    let d = k - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u = rng.random::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

impl Workload {
    /// Instantaneous rate of the shaped processes (req/s at time `t` seconds).
    fn rate_at(&self, t: f64) -> f64 {
        match self {
            Workload::Shape { shape: Shape::SteadyLow, low, .. } => *low,
            Workload::Shape { shape: Shape::SteadyHigh, high, .. } => *high,
            Workload::Shape { shape: Shape::Fluctuating, low, high, period_s } => {
                low + (high - low) * (1.0 - (2.0 * std::f64::consts::PI * t / period_s).cos()) / 2.0
            }
            Workload::Bursty { base, burst, every_s, burst_s } => {
                if t % every_s < *burst_s {
                    *burst
                } else {
                    *base
                }
            }
            _ => 0.0,
        }
    }

    /// Arrival times in microseconds within `[0, duration_s)`. `base_dir` resolves trace paths.
    pub fn arrivals(&self, duration_s: f64, seed: u64, base_dir: &Path) -> Result<Vec<u64>, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        let mut t = 0.0;
        match self {
            Workload::Poisson { rate } | Workload::Gamma { rate, .. } if *rate <= 0.0 => {
                return Err("workload rate must be positive".into());
            }
            Workload::Poisson { rate } => loop {
                t += exp(&mut rng, *rate);
                if t >= duration_s {
                    break;
                }
                out.push((t * 1e6) as u64);
            },
            Workload::Gamma { rate, cv } => {
                let k = 1.0 / (cv * cv).max(1e-6);
                loop {
                    t += gamma(&mut rng, k) / (k * rate);
                    if t >= duration_s {
                        break;
                    }
                    out.push((t * 1e6) as u64);
                }
            }
            Workload::Shape { low, high, .. } | Workload::Bursty { base: low, burst: high, .. } => {
                let peak = low.max(*high);
                if peak <= 0.0 {
                    return Err("workload rates must be positive".into());
                }
                loop {
                    t += exp(&mut rng, peak);
                    if t >= duration_s {
                        break;
                    }
                    if rng.random::<f64>() * peak < self.rate_at(t) {
                        out.push((t * 1e6) as u64);
                    }
                }
            }
            Workload::Trace { path, format, speedup } => {
                let p = base_dir.join(path);
                let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                out = parse_trace(&text, *format, *speedup, duration_s, &mut rng)
                    .map_err(|e| format!("{}: {e}", p.display()))?;
            }
        }
        Ok(out)
    }
}

/// Seconds since midnight of `YYYY-MM-DD HH:MM:SS.f` (days counted from the year's start,
/// enough for traces shorter than a year), or a plain number of seconds.
fn parse_time(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Ok(v) = s.parse::<f64>() {
        return Some(v);
    }
    let (date, time) = s.split_once(' ')?;
    let mut d = date.split('-');
    let (_, m, day): (u32, u32, u32) =
        (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let mut tt = time.split(':');
    let (h, mi, sec): (f64, f64, f64) =
        (tt.next()?.parse().ok()?, tt.next()?.parse().ok()?, tt.next()?.parse().ok()?);
    let days = f64::from((m - 1) * 31 + day);
    Some(days * 86400.0 + h * 3600.0 + mi * 60.0 + sec)
}

fn parse_trace(
    text: &str,
    format: TraceFormat,
    speedup: f64,
    duration_s: f64,
    rng: &mut StdRng,
) -> Result<Vec<u64>, String> {
    let speedup = if speedup > 0.0 { speedup } else { 1.0 };
    let mut out = Vec::new();
    let rows = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    match format {
        TraceFormat::Timestamps => {
            let mut first = None;
            for (n, line) in rows {
                let field = line.split(',').next().unwrap_or_default();
                let Some(t) = parse_time(field) else {
                    if n == 0 {
                        continue; // header
                    }
                    return Err(format!("line {}: cannot read a time from '{field}'", n + 1));
                };
                let t0 = *first.get_or_insert(t);
                let rel = (t - t0) / speedup;
                if rel >= duration_s {
                    break;
                }
                out.push((rel * 1e6) as u64);
            }
            out.sort_unstable();
        }
        TraceFormat::Counts => {
            let mut sec = 0.0;
            for (n, line) in rows {
                let field = line.rsplit(',').next().unwrap_or_default();
                let Ok(c) = field.trim().parse::<f64>() else {
                    if n == 0 {
                        continue;
                    }
                    return Err(format!("line {}: cannot read a count from '{field}'", n + 1));
                };
                let span = 1.0 / speedup;
                let mut ts: Vec<u64> = (0..c.max(0.0) as u64)
                    .map(|_| ((sec + rng.random::<f64>() * span) * 1e6) as u64)
                    .collect();
                ts.sort_unstable();
                out.extend(ts.into_iter().filter(|&t| (t as f64) < duration_s * 1e6));
                sec += span;
                if sec >= duration_s {
                    break;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate_of(w: &Workload, d: f64) -> f64 {
        w.arrivals(d, 1, Path::new(".")).unwrap().len() as f64 / d
    }

    #[test]
    fn processes_hit_their_mean_rates_and_are_reproducible() {
        let p = Workload::Poisson { rate: 200.0 };
        assert!((rate_of(&p, 100.0) - 200.0).abs() < 10.0);
        let g = Workload::Gamma { rate: 200.0, cv: 3.0 };
        assert!((rate_of(&g, 200.0) - 200.0).abs() < 25.0);
        assert_eq!(p.arrivals(5.0, 9, Path::new(".")).unwrap(), p.arrivals(5.0, 9, Path::new(".")).unwrap());
        assert_ne!(p.arrivals(5.0, 9, Path::new(".")).unwrap(), p.arrivals(5.0, 10, Path::new(".")).unwrap());
        let low = Workload::Shape { shape: Shape::SteadyLow, low: 50.0, high: 500.0, period_s: 60.0 };
        let high = Workload::Shape { shape: Shape::SteadyHigh, low: 50.0, high: 500.0, period_s: 60.0 };
        let fl = Workload::Shape { shape: Shape::Fluctuating, low: 50.0, high: 500.0, period_s: 60.0 };
        assert!((rate_of(&low, 60.0) - 50.0).abs() < 6.0);
        assert!((rate_of(&high, 60.0) - 500.0).abs() < 20.0);
        assert!((rate_of(&fl, 60.0) - 275.0).abs() < 20.0);
        let arr = Workload::Bursty { base: 10.0, burst: 1000.0, every_s: 10.0, burst_s: 1.0 }
            .arrivals(10.0, 3, Path::new("."))
            .unwrap();
        let in_burst = arr.iter().filter(|&&t| t < 1_000_000).count();
        assert!(in_burst > 800 && arr.len() - in_burst < 150, "{in_burst} {}", arr.len());
        // Arrival times never go back.
        assert!(arr.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn traces_replay_timestamps_and_counts() {
        let mut rng = StdRng::seed_from_u64(0);
        let ts = "TIMESTAMP,x\n2023-11-16 18:17:03.5,1\n2023-11-16 18:17:04.0,2\n2023-11-16 18:17:06.5,3\n";
        assert_eq!(
            parse_trace(ts, TraceFormat::Timestamps, 1.0, 100.0, &mut rng).unwrap(),
            vec![0, 500_000, 3_000_000]
        );
        assert_eq!(
            parse_trace(ts, TraceFormat::Timestamps, 2.0, 100.0, &mut rng).unwrap(),
            vec![0, 250_000, 1_500_000]
        );
        let counts = "second,count\n0,3\n1,0\n2,2\n";
        let c = parse_trace(counts, TraceFormat::Counts, 1.0, 100.0, &mut rng).unwrap();
        assert_eq!(c.len(), 5);
        assert!(
            c[..3].iter().all(|&t| t < 1_000_000)
                && c[3..].iter().all(|&t| (2_000_000..3_000_000).contains(&t))
        );
        assert!(parse_trace("t\nabc\n", TraceFormat::Timestamps, 1.0, 10.0, &mut rng).is_err());
    }

    #[test]
    fn bundled_azure_trace_replays() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let w = Workload::Trace {
            path: "data/azure-llm-2023/AzureLLMInferenceTrace_code.csv".into(),
            format: TraceFormat::Timestamps,
            speedup: 1.0,
        };
        let a = w.arrivals(600.0, 1, &dir).unwrap();
        assert!(a.len() > 100, "{}", a.len());
    }
}
