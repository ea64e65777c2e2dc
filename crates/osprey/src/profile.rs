//! `osprey profile`: measures every variant's latency per batch size (p50/p90/p99) and
//! single-instance throughput on this machine, with a progress bar, and writes
//! `<model>/profile.toml`, which the gateway's policies read.

use comfy_table::Table;
use indicatif::{ProgressBar, ProgressStyle};
use osprey_core::error::{Error, Result};
use osprey_core::model::{EvalSet, ModelSpec, scan_repository};
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
    let total: u64 = models.iter().map(|m| m.variants.len() as u64).sum::<u64>()
        * (settings.batch_sizes.len() * settings.iterations) as u64;
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
    for m in &models {
        let eval = m.load_eval().map_err(|e| e.to_string())?;
        let mut profile = ModelProfile { host: host.clone(), variants: Vec::new() };
        for v in &m.variants {
            bar.set_message(format!("{}/{}", m.name, v.name));
            let s = Session::load(m, v).map_err(|e| e.to_string())?;
            let vp =
                profile_variant(&v.name, &s, &settings, |b| inputs_for(m, eval.as_ref(), b), || bar.inc(1))
                    .map_err(|e: Error| e.to_string())?;
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
    if !args.dry_run {
        println!("wrote profile.toml for {} model(s) under {}", models.len(), repo.display());
    }
    Ok(())
}
