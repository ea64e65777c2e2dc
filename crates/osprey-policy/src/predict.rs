//! Load predictors for the control loop (OPD §IV-A): from the per-second load observed so far,
//! the load to provision the next interval for. OPD predicts the *maximum* load of the next
//! 20 s from the last 120 s with an LSTM (in `osprey-learn`, behind the same trait); the
//! baselines here are the last value and an exponentially weighted moving average.
//!
//! Sans-IO: the driver calls [`LoadPredictor::observe`] once per second of its clock with the
//! requests that arrived in that second, and [`LoadPredictor::predict`] at each control step.

use std::collections::VecDeque;

/// Seconds of history OPD's LSTM reads.
pub const HISTORY_S: usize = 120;
/// Seconds ahead whose maximum OPD's LSTM predicts.
pub const HORIZON_S: usize = 20;

pub trait LoadPredictor: Send {
    fn name(&self) -> &str;
    /// One second of observed load, req/s.
    fn observe(&mut self, rps: f64);
    /// The load to provision for, req/s.
    fn predict(&mut self) -> f64;
}

/// The last second's load.
#[derive(Debug, Default)]
pub struct LastValue {
    last: f64,
}

impl LoadPredictor for LastValue {
    fn name(&self) -> &str {
        "last"
    }
    fn observe(&mut self, rps: f64) {
        if rps.is_finite() {
            self.last = rps.max(0.0);
        }
    }
    fn predict(&mut self) -> f64 {
        self.last
    }
}

/// EWMA of the per-second load: m ← a·x + (1 − a)·m.
#[derive(Debug)]
pub struct Ewma {
    alpha: f64,
    mean: Option<f64>,
}

impl Ewma {
    pub fn new(alpha: f64) -> Self {
        Ewma { alpha: alpha.clamp(1e-6, 1.0), mean: None }
    }
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma::new(0.2)
    }
}

impl LoadPredictor for Ewma {
    fn name(&self) -> &str {
        "ewma"
    }
    fn observe(&mut self, rps: f64) {
        if !rps.is_finite() {
            return;
        }
        let x = rps.max(0.0);
        self.mean = Some(match self.mean {
            None => x,
            Some(m) => self.alpha * x + (1.0 - self.alpha) * m,
        });
    }
    fn predict(&mut self) -> f64 {
        self.mean.unwrap_or(0.0)
    }
}

/// The last `len` seconds, oldest first (what a window predictor reads). Until `len` seconds
/// have been seen, the window is padded at the start with the first second observed: a
/// controller that has just started knows nothing of the time before it, and zeros would read
/// as a ramp from idle (a window predictor trained on full windows then forecasts far too low;
/// the live twin's LSTM forecast 16 req/s at a measured 235 over its first interval).
#[derive(Debug, Clone)]
pub struct History {
    buf: VecDeque<f64>,
    len: usize,
}

impl History {
    pub fn new(len: usize) -> Self {
        History { buf: VecDeque::with_capacity(len), len }
    }
    pub fn push(&mut self, x: f64) {
        if self.buf.len() == self.len {
            self.buf.pop_front();
        }
        self.buf.push_back(if x.is_finite() { x.max(0.0) } else { 0.0 });
    }
    /// Exactly `len` values (all 0 before the first observation).
    pub fn window(&self) -> Vec<f64> {
        let first = self.buf.front().copied().unwrap_or(0.0);
        let mut w = vec![first; self.len - self.buf.len()];
        w.extend(self.buf.iter().copied());
        w
    }
}

/// Symmetric mean absolute percentage error, in percent: 100/n · Σ |p − a| / ((|a| + |p|)/2),
/// a term with both zero counting as 0.
pub fn smape(pred: &[f64], actual: &[f64]) -> f64 {
    let n = pred.len().min(actual.len());
    if n == 0 {
        return 0.0;
    }
    let s: f64 = pred
        .iter()
        .zip(actual)
        .map(|(p, a)| {
            let d = (a.abs() + p.abs()) / 2.0;
            if d == 0.0 { 0.0 } else { (p - a).abs() / d }
        })
        .sum();
    100.0 * s / n as f64
}

/// The targets a horizon predictor is scored on: for each second i, max(load[i+1 ..= i+h]).
pub fn future_max(load: &[f64], horizon: usize) -> Vec<f64> {
    (0..load.len().saturating_sub(horizon))
        .map(|i| load[i + 1..=i + horizon].iter().copied().fold(0.0, f64::max))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smape_is_zero_on_exact_and_200_on_opposite() {
        assert_eq!(smape(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((smape(&[0.0], &[5.0]) - 200.0).abs() < 1e-12);
        assert_eq!(smape(&[0.0], &[0.0]), 0.0);
    }

    #[test]
    fn ewma_and_last_track_a_step() {
        let mut e = Ewma::new(0.5);
        let mut l = LastValue::default();
        for x in [10.0, 10.0, 20.0] {
            e.observe(x);
            l.observe(x);
        }
        assert_eq!(l.predict(), 20.0);
        assert!((e.predict() - 15.0).abs() < 1e-12);
        e.observe(f64::NAN);
        assert!((e.predict() - 15.0).abs() < 1e-12);
    }

    #[test]
    fn future_max_looks_ahead() {
        assert_eq!(future_max(&[1.0, 5.0, 2.0, 0.0], 2), vec![5.0, 2.0]);
    }

    #[test]
    fn history_keeps_the_last_window() {
        let mut h = History::new(3);
        assert_eq!(h.window(), vec![0.0; 3]);
        h.push(7.0);
        h.push(8.0);
        assert_eq!(h.window(), vec![7.0, 7.0, 8.0], "padded with the first second seen");
        for x in 1..=5 {
            h.push(x as f64);
        }
        assert_eq!(h.window(), vec![3.0, 4.0, 5.0]);
    }
}
