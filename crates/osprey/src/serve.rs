//! `osprey serve`: loads the model repository, starts the gateway with an in-process agent,
//! serves HTTP and gRPC, and drains on SIGINT/SIGTERM.

use osprey_core::config::ServerConfig;
use osprey_core::model::scan_repository;
use osprey_core::profile::VariantProfile;
use osprey_engine::profile::{ProfileSettings, profile_variant};
use osprey_server::Listeners;
use osprey_server::gateway::{Gateway, GatewayConfig};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// HTTP address (default 0.0.0.0:8000, as Triton).
    #[arg(long)]
    http_addr: Option<String>,
    /// gRPC address (default 0.0.0.0:8001, as Triton).
    #[arg(long)]
    grpc_addr: Option<String>,
    /// Model repository (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// In-process agents standing for nodes (thread budgets from the config's [[agents]]);
    /// 0 means only remote agents (`osprey agent --join`) serve.
    #[arg(long)]
    local_agents: Option<usize>,
    /// Instance selection: predicted (default), round-robin or least-queue.
    #[arg(long, default_value = "predicted")]
    selector: String,
    /// Split models: how layers are placed, overriding split.toml's plan.strategy (planner,
    /// even, memory-weighted, single-node).
    #[arg(long)]
    split_strategy: Option<String>,
    /// Split models: what the planner minimises, overriding plan.objective (latency or
    /// throughput).
    #[arg(long)]
    split_objective: Option<String>,
    /// Model control, as Triton's: none (every model loaded at start, no load/unload), poll
    /// (the repository is rescanned: new folders loaded, changed ones reloaded, removed ones
    /// unloaded) or explicit (POST /v2/repository/models/M/load|unload, admin).
    #[arg(long, default_value = "none")]
    model_control_mode: String,
    /// Explicit mode: a model to load at start (repeatable; "*": all). Without it explicit
    /// mode starts with no model loaded.
    #[arg(long = "load-model")]
    load_model: Vec<String>,
    /// Poll mode: seconds between repository scans.
    #[arg(long, default_value_t = 15.0)]
    repository_poll_secs: f64,
    /// ONNX Runtime library (libonnxruntime.so) for models tract cannot run or whose
    /// model.toml says engine = "onnxruntime" (default: the config's, else $OSPREY_ONNXRUNTIME).
    #[arg(long)]
    onnxruntime: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<(), String> {
    let mut config = match &args.config {
        Some(p) => ServerConfig::load(p).map_err(|e| e.to_string())?,
        None => ServerConfig::default(),
    };
    if let Some(a) = args.http_addr {
        config.http_addr = a;
    }
    if let Some(a) = args.grpc_addr {
        config.grpc_addr = a;
    }
    if let Some(r) = args.model_repository {
        config.model_repository = Some(r);
    }
    crate::use_onnxruntime(args.onnxruntime.clone().or(config.onnxruntime.clone()));
    let repo = crate::repository(config.model_repository.clone())?;
    let mode = osprey_server::repository::Mode::parse(&args.model_control_mode)
        .ok_or_else(|| format!("--model-control-mode {}: none, poll or explicit", args.model_control_mode))?;
    if !args.load_model.is_empty() && mode != osprey_server::repository::Mode::Explicit {
        return Err("--load-model needs --model-control-mode explicit".into());
    }
    if !(args.repository_poll_secs.is_finite() && args.repository_poll_secs >= 0.1) {
        return Err("--repository-poll-secs must be at least 0.1".into());
    }
    let (mut models, problems) = scan_repository(&repo).map_err(|e| e.to_string())?;
    if mode == osprey_server::repository::Mode::Explicit && !args.load_model.iter().any(|m| m == "*") {
        for name in &args.load_model {
            if !models.iter().any(|m| &m.name == name) {
                return Err(format!("--load-model {name}: no such model in {}", repo.display()));
            }
        }
        models.retain(|m| args.load_model.contains(&m.name));
    }
    for p in &problems {
        tracing::error!(model = %p.model, "skipping model: {}", p.error);
    }
    let (pipelines, broken) = osprey_core::pipeline::scan_pipelines(&repo).map_err(|e| e.to_string())?;
    let mut problems = problems;
    for (name, error) in broken {
        tracing::error!(pipeline = %name, "skipping pipeline: {error}");
        problems.push(osprey_core::model::RepositoryProblem { model: name, error });
    }
    let (mut splits, broken) = osprey_core::split::scan_splits(&repo).map_err(|e| e.to_string())?;
    for s in &mut splits {
        if let Some(v) = &args.split_strategy {
            if osprey_policy::split::Strategy::parse(v).is_none() {
                return Err(format!("--split-strategy {v}: planner, even, memory-weighted or single-node"));
            }
            s.strategy = v.clone();
        }
        if let Some(v) = &args.split_objective {
            if v != "latency" && v != "throughput" {
                return Err(format!("--split-objective {v}: latency or throughput"));
            }
            s.objective = v.clone();
        }
    }
    for p in broken {
        tracing::error!(model = %p.model, "skipping split model: {}", p.error);
        problems.push(p);
    }
    let (multimodal, broken) = osprey_core::multimodal::scan_multimodal(&repo).map_err(|e| e.to_string())?;
    for p in broken {
        tracing::error!(model = %p.model, "skipping multi-modal model: {}", p.error);
        problems.push(p);
    }
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32).min(4);
    let wanted = args.local_agents.unwrap_or(config.agents.len().max(1));
    let local_agents: Vec<osprey_core::config::AgentConfig> = (0..wanted)
        .map(|i| {
            config.agents.get(i).cloned().unwrap_or_else(|| {
                osprey_core::config::AgentConfig::new(
                    &format!("local-{i}"),
                    if wanted == 1 { default_threads } else { 1 },
                )
            })
        })
        .collect();
    let selector = match args.selector.as_str() {
        "predicted" => osprey_policy::instance::Selector::Predicted,
        "round-robin" => osprey_policy::instance::Selector::RoundRobin,
        "least-queue" => osprey_policy::instance::Selector::LeastQueue,
        other => {
            return Err(format!("unknown --selector '{other}'; use predicted, round-robin or least-queue"));
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind(&config.http_addr)
            .await
            .map_err(|e| format!("binding HTTP {}: {e}", config.http_addr))?;
        let grpc = tokio::net::TcpListener::bind(&config.grpc_addr)
            .await
            .map_err(|e| format!("binding gRPC {}: {e}", config.grpc_addr))?;
        let tls = match &config.tls {
            Some(t) => Some(osprey_server::tls::ServerTls::load(&t.cert, &t.key).map_err(|e| e.to_string())?),
            None => None,
        };
        for (what, addr) in [("HTTP", http.local_addr()), ("gRPC", grpc.local_addr())] {
            if let Ok(a) = addr
                && tls.is_none()
                && !osprey_server::tls::is_loopback(&a)
            {
                tracing::warn!(
                    "{what} on {a} is plaintext: API keys, tensors and the agents' join token cross the network readable; configure [tls] cert and key"
                );
            }
        }
        let (join_token, source) =
            osprey_server::join::JoinToken::resolve(config.cluster.join_token_file.as_deref())
                .map_err(|e| e.to_string())?;
        let gw = Gateway::start(
            GatewayConfig {
                models,
                problems,
                limits: config.limits.clone(),
                max_batch: config.max_batch,
                local_agents,
                selector,
                tenants: config.tenants.clone(),
                scheduler: config.scheduler.clone(),
                join_token: Some(join_token),
                pipelines,
                splits,
                multimodal,
                repository: Some(repo.clone()),
                model_control: mode,
            },
            quick_profile,
        );
        for m in gw.models() {
            let names: Vec<&str> = m.variants.iter().map(|v| v.spec.name.as_str()).collect();
            tracing::info!(model = m.name(), variants = %names.join(","), "model ready");
        }
        for m in gw.multimodals() {
            tracing::info!(model = m.name(), modalities = %m.modalities_parameter(), "multi-modal model ready");
        }
        let http_addr = http.local_addr().map_err(|e| e.to_string())?;
        let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
        for p in gw.pipelines() {
            let stages: Vec<&str> = p.stages.iter().map(|s| s.name()).collect();
            tracing::info!(pipeline = p.name(), stages = %stages.join(" -> "), "pipeline ready");
        }
        if let Some(c) = &config.control {
            let mut loops = Vec::new();
            for t in osprey_server::controller::targets(&gw, c)? {
                let problem = t.problem(c);
                let (policy, predictor) = match crate::train::control_parts(c, &problem) {
                    // OPD's weights are trained for one pipeline; a target they were not
                    // trained for is configured by the exact solver instead, said once here.
                    Err(e) if c.policy == "opd" && e.starts_with("[control] opd_weights") => {
                        tracing::warn!(target = %t.name, "{e}; configuring it with ipa");
                        let ipa = osprey_core::config::ControlSection { policy: "ipa".into(), ..c.clone() };
                        crate::train::control_parts(&ipa, &problem)?
                    }
                    other => other?,
                };
                loops.push(osprey_server::controller::Loop::new(t, problem, policy, predictor));
            }
            if c.policy == "opd" && !loops.iter().any(|l| l.policy.name() == "opd") {
                return Err("[control] opd_weights fit none of the served pipelines and models".into());
            }
            let singles = loops.iter().filter(|l| l.target.single).count();
            tracing::info!(
                policy = %c.policy,
                predictor = %c.predictor,
                interval_s = c.interval_s,
                pipelines = loops.len() - singles,
                models = singles,
                "control loop on"
            );
            osprey_server::controller::start(gw.clone(), c.interval_s, loops);
        }
        println!(
            "osprey {} serving {} model(s) and {} pipeline(s) from {}",
            osprey_server::SERVER_VERSION,
            gw.models().len(),
            gw.pipelines().count(),
            repo.display()
        );
        for d in gw.splits() {
            println!(
                "split model {}: {} units over the agents that join with it (privacy: units 0..{} on {}={})",
                d.name(),
                d.spec.units(),
                d.spec.private_units,
                d.spec.trusted_label.0,
                d.spec.trusted_label.1
            );
        }
        for p in gw.problems().iter().filter(|p| p.error.code == osprey_core::error::ErrorCode::Unavailable) {
            println!("not served: {}: {}", p.model, p.error.message);
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!("HTTP  {scheme}://{http_addr}  (metrics at /metrics)");
        println!("gRPC  {grpc_addr}{}", if tls.is_some() { "  (TLS)" } else { "" });
        println!(
            "policy {}; tenants: {}",
            gw.policy.as_str(),
            gw.tenants.names().collect::<Vec<_>>().join(", ")
        );
        use osprey_server::join::TokenSource;
        match &source {
            TokenSource::Environment => {
                println!("agents join with the token in ${}", osprey_server::join::ENV)
            }
            TokenSource::File(p) | TokenSource::Generated(p) => println!(
                "join agents: osprey agent --join {grpc_addr} --token-file {}{}",
                p.display(),
                if matches!(source, TokenSource::Generated(_)) { "  (token generated now)" } else { "" }
            ),
        }
        match mode {
            osprey_server::repository::Mode::None => {}
            osprey_server::repository::Mode::Explicit => println!(
                "model control explicit: POST /v2/repository/models/MODEL/load | unload (admin)"
            ),
            osprey_server::repository::Mode::Poll => {
                println!("model control poll: {} rescanned every {} s", repo.display(), args.repository_poll_secs);
                osprey_server::repository::start_polling(
                    gw.clone(),
                    std::time::Duration::from_secs_f64(args.repository_poll_secs),
                );
            }
        }
        println!("ready http={http_addr} grpc={grpc_addr}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        osprey_server::serve(Listeners { http, grpc, tls }, gw, shutdown_signal())
            .await
            .map_err(|e| format!("server error: {e}"))?;
        tracing::info!("drained; bye");
        Ok(())
    })
}

/// Profile used when a model folder has no `profile.toml`: a short measurement at start-up.
fn quick_profile(
    model: &osprey_core::model::ModelSpec,
    v: &osprey_core::model::VariantSpec,
    s: &osprey_engine::Session,
) -> VariantProfile {
    let settings = ProfileSettings { batch_sizes: vec![1, 8], iterations: 10, warmup: 2 };
    match profile_variant(&v.name, s, &settings, |b| crate::profile::inputs_for(model, None, b), || {}) {
        Ok(p) => {
            tracing::info!(model = %model.name, variant = %v.name, "no profile.toml; measured at start-up");
            p
        }
        Err(e) => {
            tracing::warn!(model = %model.name, variant = %v.name, "could not profile: {e}");
            VariantProfile { name: v.name.clone(), swap_us: 0.0, explain_us: None, batches: Vec::new() }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight requests");
}
