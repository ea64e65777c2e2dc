//! Results: one summary row per policy and a per-interval time series (the binary draws the
//! plots). Every number is written with a fixed precision, so the same seed gives
//! byte-identical files.

use crate::engine::{Interval, Summary, qos, quantile};
use crate::scenario::QosWeights;
use std::fmt::Write as _;

pub const SUMMARY_HEADER: &str =
    "policy,requests,completed,late_pct,rejected_pct,accuracy,utility,throughput_rps,cost,qos,p50_ms,p99_ms";

/// The summary row's values.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub policy: String,
    pub requests: u64,
    pub completed: u64,
    /// Not answered on time among requests (late answers, expired, failed), %.
    pub late_pct: f64,
    /// Refused at admission, %.
    pub rejected_pct: f64,
    /// Right answers among answered requests.
    pub accuracy: f64,
    /// (+1 right on time, 0 wrong on time, −1 otherwise) per request.
    pub utility: f64,
    /// Answers on time per second.
    pub throughput_rps: f64,
    pub cost: f64,
    pub qos: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

pub fn row(s: &Summary, w: &QosWeights) -> Row {
    let n = s.requests.max(1) as f64;
    let not_on_time = s.late + s.expired + s.failed;
    Row {
        policy: s.policy.clone(),
        requests: s.requests,
        completed: s.completed,
        late_pct: 100.0 * not_on_time as f64 / n,
        rejected_pct: 100.0 * s.rejected as f64 / n,
        accuracy: if s.completed > 0 { s.correct as f64 / s.completed as f64 } else { 0.0 },
        utility: (s.on_time_correct as f64 - (not_on_time + s.rejected) as f64) / n,
        throughput_rps: (s.completed - s.late) as f64 / s.duration_s.max(1e-9),
        cost: s.cost,
        qos: qos(s, w),
        p50_ms: quantile(&s.latencies_us, 0.5) / 1000.0,
        p99_ms: quantile(&s.latencies_us, 0.99) / 1000.0,
    }
}

pub fn summary_csv(rows: &[Row]) -> String {
    let mut out = String::from(SUMMARY_HEADER);
    out.push('\n');
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{:.3},{:.4},{:.4},{:.2},{:.3},{:.4},{:.3},{:.3}",
            r.policy,
            r.requests,
            r.completed,
            r.late_pct,
            r.rejected_pct,
            r.accuracy,
            r.utility,
            r.throughput_rps,
            r.cost,
            r.qos,
            r.p50_ms,
            r.p99_ms
        );
    }
    out
}

pub fn timeseries_csv(series: &[(String, Vec<Interval>)]) -> String {
    let mut out = String::from("policy,t_s,arrivals,completed,late_pct,accuracy,cost\n");
    for (p, s) in series {
        for i in s {
            let late = if i.arrivals > 0 { 100.0 * i.not_on_time as f64 / i.arrivals as f64 } else { 0.0 };
            let acc = if i.completed > 0 { i.correct as f64 / i.completed as f64 } else { 0.0 };
            let _ = writeln!(
                out,
                "{p},{:.3},{},{},{late:.3},{acc:.4},{:.4}",
                i.t_s, i.arrivals, i.completed, i.cost
            );
        }
    }
    out
}
