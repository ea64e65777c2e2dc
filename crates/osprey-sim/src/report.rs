//! Results: one summary row per policy, a per-interval time series, and SVG plots. Every number
//! is written with a fixed precision, so the same seed gives byte-identical files.

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

const COLORS: [&str; 11] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#000000",
];

/// A line chart of one metric over time, one line per policy.
pub fn line_svg(title: &str, y_label: &str, lines: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, l, r, t, b) = (760.0, 380.0, 60.0, 170.0, 30.0, 40.0);
    let xs = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.0));
    let ys = lines.iter().flat_map(|(_, p)| p.iter().map(|q| q.1));
    let xmax = xs.fold(1e-9, f64::max);
    let ymax = ys.fold(1e-9, f64::max) * 1.05;
    let sx = |x: f64| l + (w - l - r) * x / xmax;
    let sy = |y: f64| h - b - (h - t - b) * y / ymax;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"18\" font-size=\"14\">{title}</text>\n"
    );
    let _ =
        writeln!(s, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - b, w - r, h - b);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>", h - b);
    for k in 0..=4 {
        let y = ymax * k as f64 / 4.0;
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>", l - 4.0, sy(y) + 4.0);
        let x = xmax * k as f64 / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x:.0}</text>",
            sx(x),
            h - b + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">time (s)</text>",
        (l + w - r) / 2.0,
        h - 6.0
    );
    let _ = writeln!(
        s,
        "<text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{y_label}</text>",
        h / 2.0,
        h / 2.0
    );
    for (k, (name, pts)) in lines.iter().enumerate() {
        let c = COLORS[k % COLORS.len()];
        let path: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = t + 14.0 * k as f64 + 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly:.1}\" x2=\"{}\" y2=\"{ly:.1}\" stroke=\"{c}\" stroke-width=\"3\"/>",
            w - r + 10.0,
            w - r + 28.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\">{name}</text>", w - r + 32.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}

/// A bar chart of one summary column per policy (negative values drawn below the axis).
pub fn bars_svg(title: &str, bars: &[(String, f64)]) -> String {
    let (w, h, l, t, b) = (760.0, 360.0, 60.0, 30.0, 90.0);
    let maxabs = bars.iter().map(|x| x.1.abs()).fold(1e-9, f64::max) * 1.1;
    let zero = t + (h - t - b) / 2.0;
    let scale = (h - t - b) / 2.0 / maxabs;
    let bw = (w - l - 20.0) / bars.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{l}\" y=\"18\" font-size=\"14\">{title}</text>\n<line x1=\"{l}\" y1=\"{zero:.1}\" x2=\"{}\" y2=\"{zero:.1}\" stroke=\"black\"/>\n",
        w - 20.0
    );
    for (k, (name, v)) in bars.iter().enumerate() {
        let x = l + bw * k as f64 + bw * 0.15;
        let hgt = v.abs() * scale;
        let y = if *v >= 0.0 { zero - hgt } else { zero };
        let c = COLORS[k % COLORS.len()];
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{hgt:.1}\" fill=\"{c}\"/>",
            bw * 0.7
        );
        let ty = if *v >= 0.0 { y - 4.0 } else { y + hgt + 12.0 };
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{ty:.1}\" text-anchor=\"middle\">{v:.3}</text>",
            x + bw * 0.35
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" transform=\"rotate(-35 {:.1} {:.1})\">{name}</text>",
            x + bw * 0.35,
            h - b + 16.0,
            x + bw * 0.35,
            h - b + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
