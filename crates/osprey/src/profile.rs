//! `osprey profile`: measures every variant's latency per batch size (p50/p90/p99) and
//! single-instance throughput on this machine, with a progress bar, and writes
//! `<model>/profile.toml`, which the gateway's policies read. A model with `[explain]` also
//! has one sample's occlusion explanation timed per variant (`explain_us`, p90: every masked
//! copy as one batch, then the attribution). `--compare-engines` runs every
//! variant on tract and on onnxruntime instead, one engine after the other on the same inputs,
//! and prints both with their ratio and the largest output difference.

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use osprey_core::error::{Error, Result};
use osprey_core::model::{Engine, EvalSet, ModelSpec, scan_repository};
use osprey_core::profile::ModelProfile;
use osprey_core::tensor::RawTensor;
use osprey_engine::Session;
use osprey_engine::profile::{ProfileSettings, profile_variant};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Model repository (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Only this model (default: all).
    #[arg(long)]
    model: Option<String>,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    batch_sizes: Vec<u32>,
    /// Timed runs per batch size.
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// Print the table without writing profile.toml.
    #[arg(long)]
    dry_run: bool,
    /// Run every variant on both engines (tract and onnxruntime) and print them side by side,
    /// with the largest difference between their outputs; writes no profile.toml.
    #[arg(long)]
    compare_engines: bool,
    /// ONNX Runtime library (libonnxruntime.so; default: $OSPREY_ONNXRUNTIME, else beside the
    /// executable).
    #[arg(long)]
    onnxruntime: Option<PathBuf>,
}

/// One batch of real inputs (from the eval set, cycling) or zeros when there is none.
pub fn inputs_for(model: &ModelSpec, eval: Option<&EvalSet>, batch: u32) -> Result<Vec<RawTensor>> {
    model
        .inputs
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let mut shape = spec.shape.clone();
            shape[0] = batch as i64;
            let per = spec.sample_elements() * spec.datatype.size();
            let data: Vec<u8> = match eval {
                Some(ev) if k == 0 && !ev.is_empty() => {
                    // The held-out half (the other half trained the estimator).
                    let held = ev.held_out();
                    (0..batch as usize).flat_map(|i| ev.sample(held[i % held.len()]).to_vec()).collect()
                }
                _ => vec![0u8; per * batch as usize],
            };
            RawTensor::from_bytes(spec.datatype, shape, data)
        })
        .collect()
}

pub fn run(args: ProfileArgs) -> std::result::Result<(), String> {
    crate::use_onnxruntime(args.onnxruntime.clone());
    let repo = crate::repository(args.model_repository.clone())?;
    let (models, problems) = scan_repository(&repo).map_err(|e| e.to_string())?;
    for p in &problems {
        eprintln!("skipping model {}: {}", p.model, p.error);
    }
    let models: Vec<ModelSpec> =
        models.into_iter().filter(|m| args.model.as_ref().is_none_or(|n| &m.name == n)).collect();
    if models.is_empty() {
        return Err(format!("no model to profile in {}", repo.display()));
    }
    if args.batch_sizes.is_empty() || args.batch_sizes.contains(&0) || args.iterations == 0 {
        return Err("batch sizes and iterations must be positive".into());
    }
    let settings =
        ProfileSettings { batch_sizes: args.batch_sizes.clone(), iterations: args.iterations, warmup: 5 };
    if args.compare_engines {
        return compare_engines(&models, &settings);
    }
    let total: u64 = models
        .iter()
        .map(|m| {
            m.variants.len() as u64 * (settings.batch_sizes.len() + usize::from(m.explain.is_some())) as u64
        })
        .sum::<u64>()
        * settings.iterations as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:40}] {pos}/{len} runs, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let host = format!(
        "{} logical cores, {} {}; measured by `osprey profile`, one thread per instance",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    let mut table = Table::new();
    table.set_header(["model", "variant", "batch", "p50 us", "p90 us", "p99 us", "samples/s"]);
    let mut explained = Table::new();
    explained.set_header(["model", "variant", "patches", "explanation p90 us (one sample)"]);
    for m in &models {
        let eval = m.load_eval().map_err(|e| e.to_string())?;
        let mut profile = ModelProfile { host: host.clone(), variants: Vec::new() };
        for v in &m.variants {
            bar.set_message(format!("{}/{}", m.name, v.name));
            let s = Session::load(m, v).map_err(|e| e.to_string())?;
            let vp =
                profile_variant(&v.name, &s, &settings, |b| inputs_for(m, eval.as_ref(), b), || bar.inc(1))
                    .map_err(|e: Error| e.to_string())?;
            let mut vp = vp;
            if let Some(x) = &m.explain {
                let one = inputs_for(m, eval.as_ref(), 1).map_err(|e| e.to_string())?;
                let us =
                    time_explanation(&s, &one, x, &settings, || bar.inc(1)).map_err(|e| e.to_string())?;
                explained.add_row([
                    m.name.clone(),
                    v.name.clone(),
                    x.patches().to_string(),
                    format!("{us:.0}"),
                ]);
                vp.explain_us = Some(us);
            }
            for b in &vp.batches {
                table.add_row([
                    m.name.clone(),
                    v.name.clone(),
                    b.batch.to_string(),
                    format!("{:.0}", b.p50_us),
                    format!("{:.0}", b.p90_us),
                    format!("{:.0}", b.p99_us),
                    format!("{:.0}", b.throughput_rps),
                ]);
            }
            profile.variants.push(vp);
        }
        if !args.dry_run {
            let path = m.dir.join("profile.toml");
            let text =
                format!("# Latency profile of {}; microseconds per batch.\n{}", m.name, profile.to_toml());
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    bar.finish_and_clear();
    println!("{table}");
    if !explained.is_empty() {
        println!("{explained}");
    }
    if !args.dry_run {
        println!("wrote profile.toml for {} model(s) under {}", models.len(), repo.display());
    }
    Ok(())
}

/// p90 of `settings.iterations` occlusion explanations of `one` (after the warm-up), µs.
fn time_explanation(
    session: &Session,
    one: &[RawTensor],
    x: &osprey_core::model::ExplainSpec,
    settings: &ProfileSettings,
    mut tick: impl FnMut(),
) -> Result<f64> {
    for _ in 0..settings.warmup {
        osprey_engine::explain::explain(session, one, x, 0)?;
    }
    let mut us: Vec<f64> = (0..settings.iterations)
        .map(|_| {
            let t = std::time::Instant::now();
            let r = osprey_engine::explain::explain(session, one, x, 0);
            tick();
            r.map(|_| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect::<Result<_>>()?;
    us.sort_by(f64::total_cmp);
    let k = ((us.len() as f64 * 0.9).ceil() as usize).clamp(1, us.len()) - 1;
    Ok(us[k])
}

/// The largest absolute difference between two engines' outputs (floats compared as numbers,
/// anything else byte for byte: 0 or infinity).
fn max_difference(a: &[RawTensor], b: &[RawTensor]) -> f64 {
    let mut worst = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        if x.shape != y.shape || x.datatype != y.datatype {
            return f64::INFINITY;
        }
        match (x.to_f32(), y.to_f32()) {
            (Ok(p), Ok(q)) => {
                for (p, q) in p.iter().zip(&q) {
                    worst = worst.max(f64::from((p - q).abs()));
                }
            }
            _ if x.data == y.data => {}
            _ => return f64::INFINITY,
        }
    }
    worst
}

/// `osprey profile --compare-engines`: both engines per variant and batch size, side by side.
fn compare_engines(models: &[ModelSpec], settings: &ProfileSettings) -> std::result::Result<(), String> {
    if !osprey_engine::onnxruntime::available() {
        return Err("--compare-engines needs the ONNX Runtime library: --onnxruntime PATH or \
                    $OSPREY_ONNXRUNTIME (pip install onnxruntime: site-packages/onnxruntime/capi/)"
            .into());
    }
    let runs: u64 = models.iter().map(|m| m.variants.len() as u64).sum::<u64>()
        * (2 * settings.batch_sizes.len() * settings.iterations) as u64;
    let bar = ProgressBar::new(runs);
    bar.set_style(
        ProgressStyle::with_template("{msg:32} [{bar:40}] {pos}/{len} runs, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut table = Table::new();
    table.set_header([
        "model",
        "variant",
        "batch",
        "tract p50 us",
        "onnxruntime p50 us",
        "onnxruntime/tract",
        "tract samples/s",
        "onnxruntime samples/s",
        "max |diff|",
    ]);
    let mut skipped = Vec::new();
    for m in models {
        let eval = m.load_eval().map_err(|e| e.to_string())?;
        for v in &m.variants {
            let path = m.variant_path(v).map_err(|e| e.to_string())?;
            let load = |e: Engine| Session::load_on(e, &path, &m.inputs, &m.outputs);
            let (tract, ort) = match (load(Engine::Tract), load(Engine::Onnxruntime)) {
                (Ok(t), Ok(o)) => (t, o),
                (t, o) => {
                    let why: Vec<String> = [("tract", t.err()), ("onnxruntime", o.err())]
                        .into_iter()
                        .filter_map(|(n, e)| e.map(|e| format!("{n}: {}", e.message)))
                        .collect();
                    skipped.push(format!("{}/{}: {}", m.name, v.name, why.join("; ")));
                    bar.inc((2 * settings.batch_sizes.len() * settings.iterations) as u64);
                    continue;
                }
            };
            let mut measured = Vec::new();
            for (engine, s) in [("tract", &tract), ("onnxruntime", &ort)] {
                bar.set_message(format!("{}/{} {engine}", m.name, v.name));
                let vp =
                    profile_variant(&v.name, s, settings, |b| inputs_for(m, eval.as_ref(), b), || bar.inc(1))
                        .map_err(|e: Error| e.to_string())?;
                measured.push(vp);
            }
            for (t, o) in measured[0].batches.iter().zip(&measured[1].batches) {
                let x = inputs_for(m, eval.as_ref(), t.batch).map_err(|e| e.to_string())?;
                let diff = match (tract.run(&x), ort.run(&x)) {
                    (Ok(a), Ok(b)) => max_difference(&a, &b),
                    _ => f64::INFINITY,
                };
                table.add_row([
                    m.name.clone(),
                    v.name.clone(),
                    t.batch.to_string(),
                    format!("{:.0}", t.p50_us),
                    format!("{:.0}", o.p50_us),
                    format!("{:.2}", o.p50_us / t.p50_us.max(1e-9)),
                    format!("{:.0}", t.throughput_rps),
                    format!("{:.0}", o.throughput_rps),
                    format!("{diff:.1e}"),
                ]);
            }
        }
    }
    bar.finish_and_clear();
    println!("{table}");
    for s in &skipped {
        println!("not compared: {s}");
    }
    println!(
        "one thread per call on both engines; onnxruntime {}",
        osprey_engine::onnxruntime::library().map_or("?".into(), |p| p.display().to_string())
    );
    Ok(())
}
