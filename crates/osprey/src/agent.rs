//! `osprey agent --join GATEWAY_GRPC_ADDR`: one node agent process (see `osprey_server::node`).

use osprey_server::node::{NodeConfig, run};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The gateway's gRPC address (host:port).
    #[arg(long)]
    join: String,
    /// The cluster join token the gateway printed or wrote to its token file (default:
    /// $OSPREY_JOIN_TOKEN).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the join token (e.g. the gateway's join-token file, or a mounted Secret).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Dial the gateway over TLS, trusting this CA certificate (PEM; the gateway's own
    /// certificate when self-signed).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Name the gateway's certificate must carry (default: the host in --join).
    #[arg(long, requires = "tls_ca")]
    tls_domain: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Worker threads (the node's thread budget).
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// ONNX Runtime library (libonnxruntime.so) for models tract cannot run (default:
    /// $OSPREY_ONNXRUNTIME, else beside the executable).
    #[arg(long)]
    onnxruntime: Option<PathBuf>,
    /// Model repository on this node (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Injected slowdown: every batch takes this many times longer (tests, demos).
    #[arg(long, default_value_t = 1.0)]
    slowdown: f64,
    /// Speed relative to the machine that measured the profiles.
    #[arg(long, default_value_t = 1.0)]
    speed_hint: f64,
    /// Memory offered for model variants, MB (default: what the machine has available).
    #[arg(long)]
    memory_mb: Option<u64>,
    /// Labels, e.g. --label zone=trusted (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where to listen for split-inference peers (activations from the previous layer range),
    /// e.g. 127.0.0.1:0 on one machine or 0.0.0.0:7100 between machines; "off" (default): this
    /// agent runs no layer ranges. Opened only when the repository has a split model.
    #[arg(long, default_value = "off")]
    peer_listen: String,
    /// The address other agents dial to reach --peer-listen (default: the bound address;
    /// set it when listening on 0.0.0.0 or behind NAT).
    #[arg(long)]
    peer_advertise: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label '{s}' must be key=value"))
}

pub fn run_agent(args: AgentArgs) -> Result<(), String> {
    let bad = |x: f64, min: f64| x.is_nan() || x < min;
    if args.threads == 0 || bad(args.slowdown, 1.0) || bad(args.speed_hint, 1e-6) {
        return Err("--threads must be positive, --slowdown at least 1 and --speed-hint positive".into());
    }
    crate::use_onnxruntime(args.onnxruntime.clone());
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(p)) => osprey_server::join::read_token_file(p).map_err(|e| e.to_string())?,
        (None, None) => std::env::var(osprey_server::join::ENV).ok().filter(|t| !t.is_empty()).ok_or_else(|| {
            format!(
                "a join token is needed: --token, --token-file or ${}; the gateway prints where it keeps one at start",
                osprey_server::join::ENV
            )
        })?,
    };
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "agent".into())
    });
    let cfg = NodeConfig {
        name: name.clone(),
        join: args.join.clone(),
        token,
        tls_ca: args.tls_ca.clone(),
        tls_domain: args.tls_domain.clone(),
        threads: args.threads,
        model_repository: crate::repository(args.model_repository.clone())?,
        slowdown: args.slowdown,
        speed_hint: args.speed_hint,
        labels: args.labels.iter().cloned().collect::<HashMap<_, _>>(),
        max_message_bytes: 64 << 20,
        memory_mb: args.memory_mb.unwrap_or_else(osprey_server::node::available_memory_mb),
        peer_listen: (args.peer_listen != "off").then(|| args.peer_listen.clone()),
        peer_advertise: args.peer_advertise.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = shutdown => {},
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {},
            }
        };
        run(cfg, shutdown, move |id| {
            use std::io::Write;
            println!("joined {id} as {name}");
            let _ = std::io::stdout().flush();
        })
        .await
        .map_err(|e| e.to_string())
    })
}
