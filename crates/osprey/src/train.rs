//! `osprey train`: the learned parts, trained here and loaded by the controller and the
//! benchmarks.
//!
//! - `osprey train predictor --trace FILE...`: OPD's LSTM load predictor on per-second loads
//!   (CSV traces, or the workload of a pipeline scenario drawn with several seeds); prints
//!   SMAPE on each trace's held-out last 20% beside the last-value, EWMA and window-max
//!   predictors, and the prediction time; writes safetensors + a JSON sidecar.
//! - `osprey train opd SCENARIO`: PPO with IPA as expert in the scenario's simulator, on the
//!   scenario's workload drawn with seeds other than the benchmark's; writes the weights,
//!   `curves.csv` and `training.svg` (loss, value loss, mean episode reward per episode).
//! - `osprey train estimator`: the data-aware accuracy estimators (also `train-estimator`).
//!
//! Seeds fix everything: the same command gives the same weights.

use indicatif::{ProgressBar, ProgressStyle};
use osprey_learn::lstm::{self, LstmPredictor, TrainConfig};
use osprey_learn::opd::{self, Episode, OpdPolicy, PpoConfig};
use osprey_policy::configure::{ConfigPolicy, GreedyPolicy, IpaPolicy, Problem, RandomPolicy};
use osprey_policy::predict::{Ewma, LastValue, LoadPredictor};
use osprey_sim::pipeline::{PipelineScenario, per_second};
use osprey_sim::workload::{TraceFormat, Workload};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum TrainCommand {
    /// Train OPD's LSTM load predictor and report SMAPE on held-out parts of the traces.
    Predictor(PredictorArgs),
    /// Train the OPD configuration policy (PPO + IPA expert) in the simulator.
    Opd(OpdArgs),
    /// Train the data-aware accuracy estimators (same as `osprey train-estimator`).
    Estimator(crate::estimator::TrainArgs),
}

#[derive(clap::Args)]
pub struct PredictorArgs {
    /// A CSV trace (timestamps, or per-second counts with --format counts) or a pipeline
    /// scenario whose workload is drawn; repeat for several.
    #[arg(long, required = true)]
    trace: Vec<PathBuf>,
    /// How CSV traces are written.
    #[arg(long, default_value = "timestamps", value_parser = ["timestamps", "counts"])]
    format: String,
    /// Seconds of each trace to read (a scenario's own duration when absent).
    #[arg(long)]
    duration: Option<f64>,
    /// Replay CSV traces this many times faster (a sparse trace at 10x has fewer idle seconds).
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Draws of each scenario workload (seeds after the scenario's own).
    #[arg(long, default_value_t = 3)]
    draws: u64,
    /// Where the weights go (`.safetensors`; the sidecar `.json` beside it).
    #[arg(long, default_value = "models/predictor.safetensors")]
    out: PathBuf,
    #[arg(long, default_value_t = 800)]
    iterations: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(clap::Args)]
pub struct OpdArgs {
    /// A pipeline scenario, e.g. scenarios/opd-fluctuating.toml.
    scenario: PathBuf,
    /// Where the weights go (default: the scenario's `opd_weights`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Episodes (default: the scenario's `train_episodes`).
    #[arg(long)]
    episodes: Option<usize>,
    /// Distinct workload draws cycled through.
    #[arg(long, default_value_t = 8)]
    draws: u64,
    /// Seconds per episode (default: the scenario's duration).
    #[arg(long)]
    duration: Option<f64>,
    #[arg(long, default_value_t = 11)]
    seed: u64,
}

pub fn run(cmd: TrainCommand) -> Result<(), String> {
    match cmd {
        TrainCommand::Predictor(a) => predictor(a),
        TrainCommand::Opd(a) => train_opd(a),
        TrainCommand::Estimator(a) => crate::estimator::run(a),
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

/// Per-second loads of every `--trace`, named.
fn traces(a: &PredictorArgs) -> Result<Vec<(String, Vec<f64>)>, String> {
    let mut out = Vec::new();
    for path in &a.trace {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if PipelineScenario::is_pipeline_file(&text) {
            let (scn, base) = PipelineScenario::load(path)?;
            let d = a.duration.unwrap_or(scn.duration_s);
            for k in 1..=a.draws {
                out.push((format!("{}#{k}", scn.name), per_second(&scn.workload, d, scn.seed + k, &base)?));
            }
        } else {
            let format = if a.format == "counts" { TraceFormat::Counts } else { TraceFormat::Timestamps };
            let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let w = Workload::Trace { path: file.clone(), format, speedup: a.speedup };
            let name = if a.speedup == 1.0 { file } else { format!("{file} at {}x", a.speedup) };
            out.push((name, per_second(&w, a.duration.unwrap_or(86_400.0), a.seed, &base)?));
        }
    }
    // A timestamp trace read with a day's horizon ends where its last request is.
    for (_, t) in &mut out {
        while t.len() > 1 && t.last() == Some(&0.0) {
            t.pop();
        }
    }
    Ok(out)
}

fn predictor(a: PredictorArgs) -> Result<(), String> {
    let traces = traces(&a)?;
    let cfg = TrainConfig { iterations: a.iterations, seed: a.seed, ..Default::default() };
    let b = bar(cfg.iterations as u64, "training LSTM");
    let started = Instant::now();
    let (model, reports) = lstm::train(&traces, &cfg, &mut |i, _, loss| {
        b.set_position(i as u64);
        b.set_message(format!("loss {loss:.4}"));
    })
    .map_err(|e| e.to_string())?;
    b.finish_and_clear();
    let train_s = started.elapsed().as_secs_f64();
    model.save(&a.out).map_err(|e| e.to_string())?;
    // Prediction time: one window, as the controller asks every interval.
    let mut p = LstmPredictor::new(model);
    let mut times = Vec::new();
    for (i, x) in traces[0].1.iter().take(400).enumerate() {
        p.observe(*x);
        if i % 4 == 0 {
            let t0 = Instant::now();
            std::hint::black_box(p.predict());
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    let q = |f: f64| times.get(((times.len() as f64 - 1.0) * f).round() as usize).copied().unwrap_or(0.0);
    let mut table = comfy_table::Table::new();
    table.set_header(["trace", "held-out windows", "LSTM SMAPE %", "last value %", "EWMA %", "window max %"]);
    for r in &reports {
        table.add_row([
            r.name.clone(),
            r.windows.to_string(),
            format!("{:.2}", r.lstm),
            format!("{:.2}", r.last_value),
            format!("{:.2}", r.ewma),
            format!("{:.2}", r.window_max),
        ]);
    }
    println!("{table}");
    println!(
        "trained in {train_s:.1} s ({} iterations); prediction p50 {:.3} ms, p99 {:.3} ms; wrote {}",
        cfg.iterations,
        q(0.5),
        q(0.99),
        a.out.display()
    );
    Ok(())
}

/// The scenario's load predictor.
pub fn predictor_for(scn: &PipelineScenario, base: &Path) -> Result<Box<dyn LoadPredictor>, String> {
    Ok(match scn.predictor.as_str() {
        "last" => Box::new(LastValue::default()),
        "ewma" => Box::new(Ewma::default()),
        _ => {
            let path = scn.resolve(base, &scn.predictor_weights).ok_or_else(|| {
                format!("scenario '{}' uses the LSTM predictor but names no predictor_weights", scn.name)
            })?;
            Box::new(LstmPredictor::load(&path).map_err(|e| {
                format!(
                    "{e} (train it: osprey train predictor --trace scenarios/{}.toml --out {})",
                    scn.name,
                    path.display()
                )
            })?)
        }
    })
}

/// A configuration policy by name.
pub fn policy_for(
    name: &str,
    scn: &PipelineScenario,
    base: &Path,
    problem: &Problem,
) -> Result<Box<dyn ConfigPolicy>, String> {
    Ok(match name {
        "random" => Box::new(RandomPolicy::new(scn.seed)),
        "greedy" => Box::new(GreedyPolicy),
        "ipa" => Box::new(IpaPolicy::default()),
        "opd" => {
            let path = scn
                .resolve(base, &scn.opd_weights)
                .ok_or_else(|| format!("scenario '{}' runs opd but names no opd_weights", scn.name))?;
            Box::new(
                OpdPolicy::load(&path, problem)
                    .map_err(|e| format!("{e} (train it: osprey train opd scenarios/{}.toml)", scn.name))?,
            )
        }
        other => return Err(format!("unknown pipeline policy '{other}'")),
    })
}

/// A policy and the predictor that feeds it.
pub type ControlParts = (Box<dyn ConfigPolicy>, Box<dyn LoadPredictor>);

/// The live control loop's policy and predictor from `[control]`.
pub fn control_parts(
    c: &osprey_core::config::ControlSection,
    problem: &Problem,
) -> Result<ControlParts, String> {
    let policy: Box<dyn ConfigPolicy> = match c.policy.as_str() {
        "random" => Box::new(RandomPolicy::new(c.seed)),
        "greedy" => Box::new(GreedyPolicy),
        "opd" => {
            let path = c.opd_weights.as_ref().ok_or("[control] policy opd needs opd_weights")?;
            Box::new(OpdPolicy::load(path, problem).map_err(|e| format!("[control] opd_weights: {e}"))?)
        }
        _ => Box::new(IpaPolicy::default()),
    };
    let predictor: Box<dyn LoadPredictor> = match c.predictor.as_str() {
        "last" => Box::new(LastValue::default()),
        "lstm" => {
            let path =
                c.predictor_weights.as_ref().ok_or("[control] predictor lstm needs predictor_weights")?;
            Box::new(LstmPredictor::load(path).map_err(|e| format!("[control] predictor_weights: {e}"))?)
        }
        _ => Box::new(Ewma::default()),
    };
    Ok((policy, predictor))
}

/// The predictor's forecast at every control step of `loads`, as the controller would see it.
pub fn forecasts(predictor: &mut dyn LoadPredictor, loads: &[f64], interval_s: f64) -> Vec<f64> {
    let step = interval_s.round().max(1.0) as usize;
    let mut out = Vec::new();
    let mut fed = 0;
    let mut t = 0;
    while t < loads.len() {
        for &x in &loads[fed..t] {
            predictor.observe(x);
        }
        fed = t;
        out.push(if t == 0 { loads[0] } else { predictor.predict() });
        t += step;
    }
    out
}

fn train_opd(a: OpdArgs) -> Result<(), String> {
    let (scn, base) = PipelineScenario::load(&a.scenario)?;
    let problem = scn.problem(&base)?;
    let out = match &a.out {
        Some(p) => p.clone(),
        None => scn
            .resolve(&base, &scn.opd_weights)
            .ok_or_else(|| "the scenario names no opd_weights; pass --out".to_string())?,
    };
    let duration = a.duration.unwrap_or(scn.duration_s);
    let mut episodes = Vec::new();
    for k in 0..a.draws.max(1) {
        // Seeds after 1000 are never the benchmark's (which uses the scenario's seed).
        let loads = per_second(&scn.workload, duration, scn.seed + 1000 + k, &base)?;
        let mut pred = predictor_for(&scn, &base)?;
        let predicted = forecasts(pred.as_mut(), &loads, scn.interval_s);
        episodes.push(Episode { loads, predicted });
    }
    let cfg =
        PpoConfig { episodes: a.episodes.unwrap_or(scn.train_episodes), seed: a.seed, ..Default::default() };
    let b = bar(cfg.episodes as u64, "training OPD");
    let started = Instant::now();
    let (policy, logs) = opd::train(&problem, &episodes, scn.interval_s, &cfg, &mut |log, _| {
        b.inc(1);
        b.set_message(format!("reward {:.3} loss {:.3}", log.mean_reward, log.loss));
    })
    .map_err(|e| e.to_string())?;
    b.finish_and_clear();
    policy.net().save(&out).map_err(|e| e.to_string())?;
    let mut csv = String::from("episode,expert,mean_reward,loss,policy_loss,value_loss,entropy\n");
    for l in &logs {
        let _ = writeln!(
            csv,
            "{},{},{:.5},{:.5},{:.5},{:.5},{:.5}",
            l.episode, l.expert as u8, l.mean_reward, l.loss, l.policy_loss, l.value_loss, l.entropy
        );
    }
    let dir = out.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "opd".into());
    let write = |name: String, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
    };
    write(format!("{stem}.curves.csv"), csv)?;
    let series = |f: &dyn Fn(&opd::EpisodeLog) -> f64| {
        logs.iter().map(|l| (l.episode as f64, f(l))).collect::<Vec<_>>()
    };
    crate::plot::lines_with_x(
        &dir.join(format!("{stem}.training")),
        &format!("{}: OPD training (per episode)", scn.name),
        "episode",
        "value",
        &[
            ("loss".into(), series(&|l| l.loss.max(0.0))),
            ("value loss".into(), series(&|l| l.value_loss)),
            ("mean reward".into(), series(&|l| l.mean_reward.max(0.0))),
        ],
    )?;
    let last: Vec<&opd::EpisodeLog> = logs.iter().rev().filter(|l| !l.expert).take(10).collect();
    let first: Vec<&opd::EpisodeLog> = logs.iter().filter(|l| !l.expert).take(10).collect();
    let mean = |v: &[&opd::EpisodeLog]| v.iter().map(|l| l.mean_reward).sum::<f64>() / v.len().max(1) as f64;
    println!(
        "trained {} episodes in {:.1} s; mean reward of the policy's own episodes {:.4} (first 10) -> {:.4} (last 10); wrote {} and {stem}.curves.csv, {stem}.training.svg",
        cfg.episodes,
        started.elapsed().as_secs_f64(),
        mean(&first),
        mean(&last),
        out.display()
    );
    Ok(())
}
