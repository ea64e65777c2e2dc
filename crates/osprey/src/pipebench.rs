//! `osprey bench` on a pipeline scenario (OPD's experiment, §VI): every configuration policy on
//! the same per-second load, a decision every control interval, side by side.
//!
//! Writes to `--out`: `summary.csv` (`policy,cost,qos,objective,decision_ms_p50,
//! decision_ms_p99,late_pct,lost,...`), `timeseries.csv`, `cost.svg` and `qos.svg` over time
//! (fig. 4), `cost_bars.svg`, `qos_bars.svg` and `objective_bars.svg` (fig. 5),
//! `decision_time.svg` + `decision_time.csv` against pipeline size up to 10 stages × 10
//! variants (fig. 6), and `training.svg` from the OPD weights' training curves (fig. 7).
//!
//! Decision time is the wall time of `decide` plus the limits check, per control step. For the
//! synthetic sizes of fig. 6 OPD runs a network of that shape with seeded, untrained weights: its
//! time depends on the shape only, not on what it learned.

use crate::plot;
use crate::train::{policy_for, predictor_for};
use comfy_table::Table;
use osprey_learn::opd::{OpdMeta, OpdNet, OpdPolicy};
use osprey_policy::configure::{
    ConfigPolicy, GreedyPolicy, IpaPolicy, Limits, Observation, Problem, RandomPolicy, enforce, minimal,
    synthetic,
};
use osprey_sim::pipeline::{PipelineScenario, Run, run};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

pub const SUMMARY_HEADER: &str = "policy,cost,qos,objective,decision_ms_p50,decision_ms_p99,late_pct,lost,reward,accuracy_sum,served_rps,predict_ms_p50";

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * q).round().max(0.0) as usize).copied().unwrap_or(0.0)
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

/// One summary row's values, in `SUMMARY_HEADER` order.
pub fn summary_line(r: &Run, duration_s: f64) -> String {
    let iv = &r.intervals;
    format!(
        "{},{:.4},{:.4},{:.4},{:.4},{:.4},{:.3},{:.0},{:.4},{:.4},{:.1},{:.4}",
        r.policy,
        mean(iv.iter().map(|i| i.eval.c)),
        mean(iv.iter().map(|i| i.eval.q)),
        mean(iv.iter().map(|i| i.eval.objective)),
        quantile(&r.decision_us, 0.5) / 1e3,
        quantile(&r.decision_us, 0.99) / 1e3,
        r.totals.late_pct(),
        r.totals.lost(),
        mean(iv.iter().map(|i| i.reward)),
        mean(iv.iter().map(|i| i.eval.v)),
        r.totals.served / duration_s.max(1e-9),
        quantile(&r.predict_us, 0.5) / 1e3,
    )
}

pub fn run_bench(path: &Path, out: &Path, duration: Option<f64>, only: &[String]) -> Result<(), String> {
    let (mut scn, base) = PipelineScenario::load(path)?;
    if let Some(d) = duration {
        if d.is_nan() || d < scn.interval_s {
            return Err(format!("--duration must be at least the control interval ({} s)", scn.interval_s));
        }
        scn.duration_s = d;
    }
    if !only.is_empty() {
        scn.policies = only.to_vec();
        scn.check()?;
    }
    let problem = scn.problem(&base)?;
    let loads = scn.loads(&base, scn.seed)?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let bar = indicatif::ProgressBar::new(scn.policies.len() as u64);
    let mut runs = Vec::new();
    for name in &scn.policies {
        bar.set_message(name.clone());
        let mut policy = policy_for(name, &scn, &base, &problem)?;
        let mut predictor = predictor_for(&scn, &base)?;
        runs.push(run(&problem, &loads, scn.interval_s, policy.as_mut(), predictor.as_mut()));
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mut csv = String::from(SUMMARY_HEADER);
    csv.push('\n');
    let mut table = Table::new();
    table.set_header([
        "policy",
        "cost (cores)",
        "QoS",
        "objective",
        "decision p50 ms",
        "decision p99 ms",
        "late %",
        "lost",
        "reward",
    ]);
    for r in &runs {
        let line = summary_line(r, scn.duration_s);
        let f: Vec<&str> = line.split(',').collect();
        table.add_row([f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8]]);
        csv.push_str(&line);
        csv.push('\n');
    }
    let total: f64 = loads.iter().sum();
    println!(
        "scenario {} (pipeline {}, {} stages; {} s, interval {} s, {:.0} requests, seed {}, predictor {})",
        scn.name,
        problem.pipeline.name,
        problem.pipeline.stages.len(),
        scn.duration_s,
        scn.interval_s,
        total,
        scn.seed,
        scn.predictor
    );
    println!("{table}");
    if let (Some(ipa), Some(opd)) =
        (runs.iter().find(|r| r.policy == "ipa"), runs.iter().find(|r| r.policy == "opd"))
    {
        let c = |r: &Run| mean(r.intervals.iter().map(|i| i.eval.c));
        let j = |r: &Run| mean(r.intervals.iter().map(|i| i.eval.objective));
        println!(
            "opd / ipa: cost {:.3}x, objective {:+.4} ({:.4} vs {:.4})",
            c(opd) / c(ipa).max(1e-9),
            j(opd) - j(ipa),
            j(opd),
            j(ipa)
        );
    }
    let write = |name: &str, text: String| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    let csv_for_report = csv.clone();
    write("summary.csv", csv)?;
    let mut ts = String::from("policy,t_s,load_rps,predicted_rps,cost,qos,objective,reward,late_pct\n");
    for r in &runs {
        for i in &r.intervals {
            let late = 100.0 * (i.totals.refused + i.totals.expired) / i.totals.arrivals.max(1e-9);
            let _ = writeln!(
                ts,
                "{},{},{:.1},{:.1},{:.4},{:.4},{:.4},{:.4},{:.3}",
                r.policy,
                i.start_s,
                i.load_rps,
                i.predicted_rps,
                i.eval.c,
                i.eval.q,
                i.eval.objective,
                i.reward,
                late
            );
        }
    }
    write("timeseries.csv", ts)?;
    let line = |f: &dyn Fn(&osprey_sim::pipeline::IntervalStats) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        runs.iter()
            .map(|r| (r.policy.clone(), r.intervals.iter().map(|i| (i.start_s as f64, f(i))).collect()))
            .collect()
    };
    plot::lines(
        &out.join("cost"),
        &format!("{}: cost (cores) per interval", scn.name),
        "cores",
        &line(&|i| i.eval.c),
    )?;
    plot::lines(
        &out.join("qos"),
        &format!("{}: QoS (eq. 3) per interval", scn.name),
        "Q",
        &line(&|i| i.eval.q.max(0.0)),
    )?;
    let mut with_load = line(&|i| i.load_rps);
    with_load.truncate(1);
    if let Some(l) = with_load.first_mut() {
        l.0 = "load".into();
    }
    if let Some(r) = runs.first() {
        with_load.push((
            "predicted".into(),
            r.intervals.iter().map(|i| (i.start_s as f64, i.predicted_rps)).collect(),
        ));
    }
    plot::lines(
        &out.join("load"),
        &format!("{}: load and {} forecast", scn.name, scn.predictor),
        "req/s",
        &with_load,
    )?;
    let bars = |f: &dyn Fn(&Run) -> f64| runs.iter().map(|r| (r.policy.clone(), f(r))).collect::<Vec<_>>();
    plot::bars(
        &out.join("cost_bars"),
        &format!("{}: mean cost (cores)", scn.name),
        &bars(&|r| mean(r.intervals.iter().map(|i| i.eval.c))),
    )?;
    plot::bars(
        &out.join("qos_bars"),
        &format!("{}: mean QoS", scn.name),
        &bars(&|r| mean(r.intervals.iter().map(|i| i.eval.q))),
    )?;
    plot::bars(
        &out.join("objective_bars"),
        &format!("{}: mean objective Q - lambda C", scn.name),
        &bars(&|r| mean(r.intervals.iter().map(|i| i.eval.objective))),
    )?;
    let dt_csv = decision_times(&problem, &out.join("decision_time"))?;
    write("decision_time.csv", dt_csv)?;
    let mut plots = vec!["cost", "qos", "load", "cost_bars", "qos_bars", "objective_bars", "decision_time"];
    if let Some(w) = scn.resolve(&base, &scn.opd_weights) {
        let curves = w.with_extension("curves.csv");
        if let Ok(text) = std::fs::read_to_string(&curves) {
            write("training.csv", text.clone())?;
            training_plot(&scn.name, &text, &out.join("training"))?;
            plots.push("training");
        }
    }
    plot::report(
        out,
        &format!("Osprey pipeline bench: {}", scn.name),
        &[format!("policies side by side on the same workload; predictor {}", scn.predictor)],
        &csv_for_report,
        &plots,
    )?;
    println!("wrote summary.csv, timeseries.csv, report.html and plots (SVG, PNG) to {}", out.display());
    Ok(())
}

/// Fig. 7 from a `curves.csv` written by `osprey train opd`.
fn training_plot(name: &str, csv: &str, stem: &Path) -> Result<(), String> {
    let rows: Vec<Vec<f64>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').filter_map(|x| x.parse::<f64>().ok()).collect())
        .filter(|r: &Vec<f64>| r.len() >= 6)
        .collect();
    let col = |k: usize| rows.iter().map(|r| (r[0], r[k].max(0.0))).collect::<Vec<_>>();
    plot::lines_with_x(
        stem,
        &format!("{name}: OPD training per episode"),
        "episode",
        "value",
        &[("loss".into(), col(3)), ("value loss".into(), col(5)), ("mean reward".into(), col(2))],
    )
}

/// Fig. 6: decision time per policy against pipeline size (synthetic stages × variants).
fn decision_times(problem: &Problem, stem: &Path) -> Result<String, String> {
    let sizes = [(2usize, 3usize), (4, 5), (7, 7), (10, 10)];
    let limits =
        Limits { f_max: problem.limits.f_max, b_max: problem.limits.b_max, w_max: 1e9, cores_max: 1e9 };
    let mut csv = String::from("stages,variants,policy,decision_ms_p50,decision_ms_p99,ipa_nodes_p50\n");
    let mut lines: Vec<(String, Vec<(f64, f64)>)> =
        ["random", "greedy", "ipa", "opd"].iter().map(|p| (p.to_string(), Vec::new())).collect();
    for (k, &(n, v)) in sizes.iter().enumerate() {
        let mut p = problem.clone();
        p.pipeline = synthetic(n, v, 17 + k as u64);
        // Capacity for about half the replicas every stage could take.
        p.limits =
            Limits { cores_max: (n as f64) * limits.f_max as f64 * 0.5, w_max: n as f64 * 2000.0, ..limits };
        let net = OpdNet::new(OpdMeta::for_problem(&p, 2000.0, 64, 2), 1).map_err(|e| e.to_string())?;
        let mut policies: Vec<Box<dyn ConfigPolicy>> = vec![
            Box::new(RandomPolicy::new(1)),
            Box::new(GreedyPolicy),
            Box::new(IpaPolicy::default()),
            Box::new(OpdPolicy::new(net)),
        ];
        for (pi, pol) in policies.iter_mut().enumerate() {
            let mut times = Vec::new();
            let mut nodes = Vec::new();
            let reps = if pol.name() == "ipa" && n * v >= 49 { 5 } else { 20 };
            for r in 0..reps {
                let load = 200.0 + 150.0 * r as f64;
                let obs = Observation { load_rps: load, predicted_rps: load, current: minimal(&p) };
                let t0 = Instant::now();
                let cfg = enforce(&p, &pol.decide(&p, &obs));
                times.push(t0.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(cfg);
                if pol.name() == "ipa" {
                    nodes.push(osprey_policy::configure::solve_exact(&p, load).1 as f64);
                }
            }
            let _ = writeln!(
                csv,
                "{n},{v},{},{:.4},{:.4},{:.0}",
                pol.name(),
                quantile(&times, 0.5),
                quantile(&times, 0.99),
                quantile(&nodes, 0.5)
            );
            lines[pi].1.push(((n * v) as f64, quantile(&times, 0.5)));
        }
    }
    plot::lines_with_x(
        stem,
        "decision time (ms, p50) against stages x variants",
        "stages x variants (2x3, 4x5, 7x7, 10x10)",
        "ms",
        &lines,
    )?;
    Ok(csv)
}
