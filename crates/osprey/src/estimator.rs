//! `osprey train-estimator`: trains each model's data-aware accuracy estimator and reports how
//! well every estimator predicts per-input correctness.
//!
//! The evaluation set is split by sample index: even samples train, odd samples test, so every
//! reported figure is on inputs the estimator never saw. The estimator written to
//! `<model>/estimator.json` is the one trained on the even half.
//!
//! Reported per estimator (on the test half):
//! - Brier score and expected calibration error (10 bins), averaged over variants;
//! - selection accuracy at equal cost: a fraction f of inputs may use the most accurate
//!   variant, the rest the cheapest. The data-aware estimator sends the inputs with the largest
//!   estimated gain; the profiled estimator cannot tell inputs apart, so its expected accuracy
//!   is the mix (1 − f)·acc_cheap + f·acc_best. An oracle bounds what any estimator can do.
//!
//! With `--rohe FILE` the same report runs on external data: ROHE's `group_count.csv`
//! (15 detector variants × 413 images). There the cheap peek is the smallest detector's own
//! output (confidence, count) plus the target class.

use comfy_table::Table;
use osprey_core::model::scan_repository;
use osprey_learn::estimator::TrainSettings;
use osprey_policy::estimate::{DataAware, Sample, brier, ece, features};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Model repository (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Also report on ROHE's group_count.csv (per-image correctness of 15 detectors).
    #[arg(long)]
    rohe: Option<PathBuf>,
    /// Report only; do not write estimator.json.
    #[arg(long)]
    dry_run: bool,
}

/// One evaluation problem: features per sample, correctness per variant.
pub struct Problem {
    pub name: String,
    pub variants: Vec<String>,
    pub x: Vec<Vec<f32>>,
    pub correct: Vec<Vec<bool>>,
    /// Index of the cheapest and the most accurate variant.
    pub cheap: usize,
    pub best: usize,
}

pub struct Report {
    pub rows: Vec<[String; 6]>,
}

fn subset<T: Clone>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i].clone()).collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Trains on even samples, evaluates on odd ones; returns the model and report rows.
pub fn evaluate(p: &Problem) -> Result<(DataAware, Report), String> {
    let n = p.x.len();
    let train: Vec<usize> = (0..n).step_by(2).collect();
    let test: Vec<usize> = (1..n).step_by(2).collect();
    let correct_train: Vec<Vec<bool>> = p.correct.iter().map(|c| subset(c, &train)).collect();
    let t = Instant::now();
    let model = osprey_learn::estimator::train(
        p.variants.clone(),
        &subset(&p.x, &train),
        &correct_train,
        &TrainSettings::default(),
    )
    .map_err(|e| format!("{}: {e}", p.name))?;
    println!("{}: trained in {:.0} ms ({} samples)", p.name, t.elapsed().as_secs_f64() * 1e3, train.len());
    let nv = p.variants.len();
    // Profiled estimate: the train half's mean correctness.
    let profiled: Vec<f64> = correct_train
        .iter()
        .map(|c| c.iter().filter(|&&b| b).count() as f64 / c.len().max(1) as f64)
        .collect();
    let mut da = vec![vec![0.0; test.len()]; nv];
    for (k, &i) in test.iter().enumerate() {
        let mut out = vec![0.0; nv];
        model.estimate_features(&p.x[i], &mut out);
        for v in 0..nv {
            da[v][k] = out[v];
        }
    }
    let outcome: Vec<Vec<bool>> = p.correct.iter().map(|c| subset(c, &test)).collect();
    let calib = |est: &dyn Fn(usize, usize) -> f64| {
        let mut b = Vec::new();
        let mut e = Vec::new();
        for (v, out) in outcome.iter().enumerate() {
            let pred: Vec<f64> = (0..test.len()).map(|k| est(v, k)).collect();
            b.push(brier(&pred, out));
            e.push(ece(&pred, out, 10));
        }
        (mean(&b), mean(&e))
    };
    let (pb, pe) = calib(&|v, _| profiled[v]);
    let (db, de) = calib(&|v, k| da[v][k]);
    let acc = |v: usize| outcome[v].iter().filter(|&&c| c).count() as f64 / test.len().max(1) as f64;
    let (ac, ab) = (acc(p.cheap), acc(p.best));
    let routed = |order: &[usize], f: f64| {
        let m = (f * test.len() as f64).round() as usize;
        let mut use_best = vec![false; test.len()];
        for &k in order.iter().take(m) {
            use_best[k] = true;
        }
        (0..test.len()).filter(|&k| outcome[if use_best[k] { p.best } else { p.cheap }][k]).count() as f64
            / test.len().max(1) as f64
    };
    let mut by_gain: Vec<usize> = (0..test.len()).collect();
    by_gain.sort_by(|&a, &b| (da[p.best][b] - da[p.cheap][b]).total_cmp(&(da[p.best][a] - da[p.cheap][a])));
    let gain = |k: usize| i32::from(outcome[p.best][k]) - i32::from(outcome[p.cheap][k]);
    let mut oracle: Vec<usize> = (0..test.len()).collect();
    oracle.sort_by_key(|&k| -gain(k));
    let mut rows = Vec::new();
    rows.push([
        p.name.clone(),
        "profiled".into(),
        format!("{pb:.4}"),
        format!("{pe:.4}"),
        format!("{:.3}", 0.75 * ac + 0.25 * ab),
        format!("{:.3}", 0.5 * ac + 0.5 * ab),
    ]);
    rows.push([
        p.name.clone(),
        "data-aware".into(),
        format!("{db:.4}"),
        format!("{de:.4}"),
        format!("{:.3}", routed(&by_gain, 0.25)),
        format!("{:.3}", routed(&by_gain, 0.5)),
    ]);
    rows.push([
        p.name.clone(),
        "oracle (bound)".into(),
        "0".into(),
        "0".into(),
        format!("{:.3}", routed(&oracle, 0.25)),
        format!("{:.3}", routed(&oracle, 0.5)),
    ]);
    Ok((model, Report { rows }))
}

/// variant -> (confidence, count, correct) for one (image, target).
type PerVariant = BTreeMap<String, (f32, f32, bool)>;

/// Reads ROHE's group_count.csv into a problem: features are the cheapest detector's
/// confidence and count plus a one-hot target class.
pub fn rohe_problem(path: &PathBuf) -> Result<Problem, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // (image, target) -> variant -> (confidence, count, correct)
    let mut rows: BTreeMap<(String, String), PerVariant> = BTreeMap::new();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let col = |n: &str| {
        header.iter().position(|h| *h == n).ok_or_else(|| format!("{}: no column {n}", path.display()))
    };
    let (ct, cm, ci, cc, cn, ca) =
        (col("target")?, col("model")?, col("img")?, col("confidence")?, col("count")?, col("accuracy")?);
    for (ln, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').collect();
        let bad = || format!("{}:{}: malformed row", path.display(), ln + 2);
        let get = |i: usize| f.get(i).copied().ok_or_else(bad);
        rows.entry((get(ci)?.to_string(), get(ct)?.to_string())).or_default().insert(
            get(cm)?.to_string(),
            (
                get(cc)?.parse().map_err(|_| bad())?,
                get(cn)?.parse().map_err(|_| bad())?,
                get(ca)?.trim() == "1",
            ),
        );
    }
    let variants: Vec<String> = rows.values().next().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let targets: Vec<String> = {
        let mut t: Vec<String> = rows.keys().map(|(_, t)| t.clone()).collect();
        t.sort();
        t.dedup();
        t
    };
    let rows: Vec<_> = rows.into_iter().filter(|(_, m)| m.len() == variants.len()).collect();
    let mean_acc = |v: &String| rows.iter().filter(|(_, m)| m[v].2).count() as f64 / rows.len().max(1) as f64;
    // Cheapest: the nano model of the oldest family present; best: highest mean accuracy.
    let cheap = variants.iter().position(|v| v == "yolov5n").unwrap_or(0);
    let best = (0..variants.len())
        .max_by(|&a, &b| mean_acc(&variants[a]).total_cmp(&mean_acc(&variants[b])))
        .unwrap_or(0);
    let x = rows
        .iter()
        .map(|((_, t), m)| {
            let (conf, count, _) = m[&variants[cheap]];
            let mut f = vec![conf, count, (count == 0.0) as u8 as f32];
            f.extend(targets.iter().map(|x| (x == t) as u8 as f32));
            f
        })
        .collect();
    let correct = variants.iter().map(|v| rows.iter().map(|(_, m)| m[v].2).collect()).collect();
    Ok(Problem { name: format!("rohe ({} images)", rows.len()), variants, x, correct, cheap, best })
}

pub fn run(args: TrainArgs) -> Result<(), String> {
    let repo = crate::repository(args.model_repository.clone())?;
    let (models, _) = scan_repository(&repo).map_err(|e| e.to_string())?;
    let mut table = Table::new();
    table.set_header(["data", "estimator", "Brier", "ECE", "acc @25% best", "acc @50% best"]);
    for m in &models {
        let Some(ev) = m.load_eval().map_err(|e| e.to_string())? else {
            continue;
        };
        let dt = m.inputs[0].datatype;
        let t = Instant::now();
        let x: Vec<Vec<f32>> =
            (0..ev.len()).map(|i| features(Sample { datatype: dt, bytes: ev.sample(i) }).to_vec()).collect();
        let feature_us = t.elapsed().as_secs_f64() * 1e6 / ev.len().max(1) as f64;
        let acc = |v: &str| m.variant(v).map_or(0.0, |s| s.accuracy);
        let names = ev.variants.clone();
        let cheap = 0;
        let best = (0..names.len()).max_by(|&a, &b| acc(&names[a]).total_cmp(&acc(&names[b]))).unwrap_or(0);
        let p =
            Problem { name: m.name.clone(), variants: names, x, correct: ev.correct.clone(), cheap, best };
        let (model, report) = evaluate(&p)?;
        for r in report.rows {
            table.add_row(r);
        }
        println!("{}: features cost {feature_us:.1} us per sample (debug/release as built)", m.name);
        if !args.dry_run {
            let path = m.dir.join("estimator.json");
            let json = serde_json::to_string_pretty(&model).map_err(|e| e.to_string())?;
            std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if let Some(path) = &args.rohe {
        let p = rohe_problem(path)?;
        println!("rohe: cheap = {}, best = {}", p.variants[p.cheap], p.variants[p.best]);
        for r in evaluate(&p)?.1.rows {
            table.add_row(r);
        }
    }
    println!("{table}");
    println!(
        "(test half = odd samples, never seen in training; 'acc @f best' = accuracy when a fraction f of inputs may use the most accurate variant and the rest the cheapest)"
    );
    Ok(())
}
