//! `osprey`: the one binary.
//!
//! # Layout
//! - [`serve`]: `osprey serve`, the gateway with in-process agents and the bundled zoo.
//! - [`profile`]: `osprey profile`, latency per variant and batch size -> `profile.toml`.
//! - [`loadgen`]: `osprey loadgen`, closed- or open-loop load over HTTP or gRPC.
//! - [`agent`]: `osprey agent --join`, a node agent process.
//! - [`status`]: `osprey status`, the cluster's nodes.
//! - [`bench`]: `osprey bench`, policies compared on a scenario in the simulator.
//! - [`pipebench`]: `osprey bench` on a pipeline scenario (OPD's experiment).
//! - [`train`]: `osprey train predictor | opd | estimator`, the learned parts.
//! - [`estimator`]: `osprey train-estimator`, data-aware accuracy estimators and their report.
//! - [`overhead`]: `osprey overhead`, serving cost over direct engine calls, side by side.
//!
//! Only this crate reads the environment and the command line.

mod agent;
mod bench;
mod estimator;
mod loadgen;
mod overhead;
mod pipebench;
mod plot;
mod profile;
mod serve;
mod splitsim;
mod status;
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "osprey", version, about = "Inference orchestrator for heterogeneous edge clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model repository over the Open Inference Protocol (HTTP and gRPC).
    Serve(serve::ServeArgs),
    /// Measure each variant's latency per batch size and write `<model>/profile.toml`.
    Profile(profile::ProfileArgs),
    /// Drive a server with requests for a bounded time and summarise what came back.
    Loadgen(loadgen::LoadgenArgs),
    /// Compare policies on a scenario in the simulator (table, CSV, plots).
    Bench(bench::BenchArgs),
    /// Draw the charts and report.html of a multi-modal run from its CSVs (the live bench).
    Report(bench::ReportArgs),
    /// Split inference of a large model over eight edge nodes in the simulator: every
    /// placement strategy side by side, and the re-split after a slowdown.
    SplitSim(splitsim::SplitSimArgs),
    /// Run a node agent that joins a gateway and executes batches for it.
    Agent(agent::AgentArgs),
    /// Show the cluster: nodes, health, load, recent latency.
    Status(status::StatusArgs),
    /// Measure per-request serving overhead over calling the engine directly.
    Overhead(overhead::OverheadArgs),
    /// Train a learned part: the LSTM load predictor, the OPD policy, the accuracy estimators.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Train the data-aware accuracy estimators and report calibration and selection accuracy.
    TrainEstimator(estimator::TrainArgs),
    /// Print the `sha256:...` form of an API key for a tenant's `api_keys`.
    HashKey {
        /// The key (read from standard input when absent, so it stays out of shell history).
        key: Option<String>,
    },
}

/// The model repository to use: the one given, else `$OSPREY_MODEL_REPOSITORY`, else
/// `./models` (run from a checkout: the bundled zoo), else `models/` beside the executable or
/// `../share/osprey/models` from it (an installed tree). No path of the machine the binary was
/// built on is compiled in, so a copied or `cargo install`ed binary looks only at these.
pub fn repository(given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("OSPREY_MODEL_REPOSITORY").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut candidates = vec![PathBuf::from("models")];
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(PathBuf::from)) {
        candidates.push(dir.join("models"));
        candidates.push(dir.join("../share/osprey/models"));
    }
    let is_repository = |p: &PathBuf| {
        std::fs::read_dir(p).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().join("model.toml").is_file() || e.path().join("pipeline.toml").is_file())
        })
    };
    candidates.iter().find(|p| is_repository(p)).cloned().ok_or_else(|| {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        format!(
            "no model repository: pass --model-repository DIR (or set OSPREY_MODEL_REPOSITORY); looked in {} \
             (the bundled zoo is models/ in the source tree)",
            looked.join(", ")
        )
    })
}

/// Names the ONNX Runtime library for models tract cannot run (`--onnxruntime`, or the
/// config's `onnxruntime`); without one the engine looks at `$OSPREY_ONNXRUNTIME`, then beside
/// the executable, when such a model first loads.
pub fn use_onnxruntime(path: Option<PathBuf>) {
    if let Some(p) = path {
        osprey_engine::onnxruntime::set_library(p);
    }
}

fn hash_key(key: Option<String>) -> Result<(), String> {
    let key = match key {
        Some(k) => k,
        None => {
            let mut k = String::new();
            std::io::stdin().read_line(&mut k).map_err(|e| e.to_string())?;
            k.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    if key.is_empty() {
        return Err("empty key".into());
    }
    println!("{}", osprey_server::tenants::hash_key(&key));
    Ok(())
}

/// Counts live heap bytes, so that an agent can measure what each variant it loads takes.
#[global_allocator]
static ALLOCATOR: osprey_server::heap::Counting = osprey_server::heap::Counting;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // The learned policies' tensors are tiny: handing each operation to a thread pool costs
        // more than the work (OPD training ran 7x faster on one thread here). Set before any
        // thread exists, which is what makes the call sound.
        // SAFETY: no other thread is running yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OSPREY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Loadgen(a) => loadgen::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Report(a) => bench::report(a),
        Command::Agent(a) => agent::run_agent(a),
        Command::SplitSim(a) => splitsim::run_split_sim(a),
        Command::Status(a) => status::run(a),
        Command::Overhead(a) => overhead::run(a),
        Command::Train(c) => train::run(c),
        Command::TrainEstimator(a) => estimator::run(a),
        Command::HashKey { key } => hash_key(key),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
