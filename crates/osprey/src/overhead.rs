//! `osprey overhead`: what serving costs on top of the engine, measured side by side in one
//! run. For each model and batch size it times (1) `Session::run` called directly and
//! (2) sequential requests to an in-process `osprey serve` on loopback over HTTP (binary
//! tensors) and gRPC, pinned to the same variant and batch. Overhead = served − direct.
//! Server time is read from the server's own `osprey_request_duration_seconds` histogram
//! (request routed to response handed back, so the client and the kernel's loopback are not
//! in it), as the change of its buckets over each cell; `server_us_p50` is its p50 minus the
//! engine's. The transport floor is the same client's round trip to the liveness route
//! (`GET /v2/health/live`, gRPC `ServerLive`): what any request costs here before Osprey does
//! anything (client, loopback, connection task), measured in the same run.

use bytes::Bytes;
use comfy_table::Table;
use http_body_util::{BodyExt, Full};
use osprey_core::config::Limits;
use osprey_core::model::scan_repository;
use osprey_engine::Session;
use osprey_engine::profile::quantile;
use osprey_server::gateway::{Gateway, GatewayConfig};
use osprey_server::pb;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct OverheadArgs {
    /// Model repository (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Variant to pin in every model (default: each model's first, the cheapest, so that
    /// overhead is not hidden under compute).
    #[arg(long)]
    variant: Option<String>,
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch_sizes: Vec<u32>,
    /// Requests per measurement.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// One JSON object per model, variant and batch size instead of the table.
    #[arg(long)]
    json: bool,
}

/// Cumulative bucket counts `(le, count)` of one protocol's server-time histogram.
fn server_buckets(gw: &Gateway, protocol: &str) -> Vec<(f64, u64)> {
    let want = format!("protocol=\"{protocol}\"");
    gw.metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("osprey_request_duration_seconds_bucket{") && l.contains(&want))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The q-quantile (µs) of what was observed between two snapshots, interpolated in its bucket.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let delta: Vec<(f64, u64)> =
        after.iter().zip(before).map(|(&(le, a), &(_, b))| (le, a.saturating_sub(b))).collect();
    let Some(&(_, total)) = delta.last() else { return f64::NAN };
    if total == 0 {
        return f64::NAN;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, c) in &delta {
        if c as f64 >= rank {
            if !le.is_finite() {
                return lower.0 * 1e6;
            }
            let frac = (rank - lower.1 as f64) / ((c - lower.1).max(1)) as f64;
            return (lower.0 + frac * (le - lower.0)) * 1e6;
        }
        lower = (le, c);
    }
    f64::NAN
}

pub fn run(args: OverheadArgs) -> Result<(), String> {
    let repo = crate::repository(args.model_repository.clone())?;
    let (models, _) = scan_repository(&repo).map_err(|e| e.to_string())?;
    if args.requests == 0 || args.batch_sizes.contains(&0) {
        return Err("--requests and --batch-sizes must be positive".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let (haddr, gaddr) =
            (http.local_addr().map_err(|e| e.to_string())?, grpc.local_addr().map_err(|e| e.to_string())?);
        let gw = Gateway::start(
            GatewayConfig {
                splits: Vec::new(),
                multimodal: Vec::new(),
                models: models.clone(),
                problems: Vec::new(),
                limits: Limits::default(),
                max_batch: 16,
                local_agents: vec![osprey_core::config::AgentConfig::new("local-0", 1)],
                selector: osprey_policy::instance::Selector::Predicted,
                tenants: Vec::new(),
                scheduler: Default::default(),
                join_token: None,
                pipelines: Vec::new(),
                repository: None,
                model_control: Default::default(),
            },
            |_, v, _| osprey_core::profile::VariantProfile {
                name: v.name.clone(),
                swap_us: 0.0,
                explain_us: None,
                batches: Vec::new(),
            },
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server_gw = gw.clone();
        let server = tokio::spawn(osprey_server::serve(
            osprey_server::Listeners { http, grpc, tls: None },
            server_gw,
            async {
                let _ = stop_rx.await;
            },
        ));
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, Full<Bytes>>({
                let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
                c.set_nodelay(true);
                c
            });
        let mut gclient =
            pb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(format!("http://{gaddr}"))
                .await
                .map_err(|e| e.to_string())?;
        let mut table = Table::new();
        table.set_header([
            "model",
            "variant",
            "batch",
            "engine p50 us",
            "HTTP p50 us",
            "gRPC p50 us",
            "HTTP overhead us",
            "gRPC overhead us",
            "HTTP ratio",
            "gRPC ratio",
        ]);
        // Transport floor: the same clients on the cheapest route.
        let live = format!("http://{haddr}/v2/health/live");
        let mut floor_http = Vec::with_capacity(args.requests);
        let mut floor_grpc = Vec::with_capacity(args.requests);
        for k in 0..args.requests + args.requests / 10 {
            let req = hyper::Request::get(live.as_str())
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            let t = Instant::now();
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let _ = resp.into_body().collect().await.map_err(|e| e.to_string())?;
            let dt = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            gclient.server_live(pb::ServerLiveRequest {}).await.map_err(|e| e.to_string())?;
            if k >= args.requests / 10 {
                floor_http.push(dt);
                floor_grpc.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        floor_http.sort_by(f64::total_cmp);
        floor_grpc.sort_by(f64::total_cmp);
        let (fh, fg) = (quantile(&floor_http, 0.5), quantile(&floor_grpc, 0.5));
        for m in &models {
            let v = match &args.variant {
                Some(name) => m.variant(name).ok_or_else(|| format!("{} has no variant {name}", m.name))?,
                None => &m.variants[0],
            };
            let session = Session::load(m, v).map_err(|e| e.to_string())?;
            let eval = m.load_eval().map_err(|e| e.to_string())?;
            for &b in &args.batch_sizes {
                let inputs = crate::profile::inputs_for(m, eval.as_ref(), b).map_err(|e| e.to_string())?;
                let x = &inputs[0];
                // Direct engine calls.
                let mut direct = Vec::with_capacity(args.requests);
                for _ in 0..args.requests / 10 {
                    session.run(&inputs).map_err(|e| e.to_string())?;
                }
                for _ in 0..args.requests {
                    let t = Instant::now();
                    session.run(&inputs).map_err(|e| e.to_string())?;
                    direct.push(t.elapsed().as_secs_f64() * 1e6);
                }
                // HTTP, binary tensors.
                let header = serde_json::json!({
                    "inputs": [{ "name": m.inputs[0].name, "shape": x.shape, "datatype": x.datatype.as_str(),
                                 "parameters": { "binary_data_size": x.data.len() } }],
                    "parameters": { "binary_data_output": true },
                });
                let mut body = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
                let hl = body.len();
                body.extend_from_slice(&x.data);
                let body = Bytes::from(body);
                let uri = format!("http://{haddr}/v2/models/{}/versions/{}/infer", m.name, v.name);
                let http_before = server_buckets(&gw, "http");
                let mut over_http = Vec::with_capacity(args.requests);
                for k in 0..args.requests + args.requests / 10 {
                    let req = hyper::Request::post(uri.as_str())
                        .header("inference-header-content-length", hl)
                        .body(Full::new(body.clone()))
                        .map_err(|e| e.to_string())?;
                    let t = Instant::now();
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let ok = resp.status().is_success();
                    let _ = resp.into_body().collect().await.map_err(|e| e.to_string())?;
                    if !ok {
                        return Err(format!("{} answered an error over HTTP", m.name));
                    }
                    if k >= args.requests / 10 {
                        over_http.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                // gRPC, raw contents.
                let req = pb::ModelInferRequest {
                    model_name: m.name.clone(),
                    model_version: v.name.clone(),
                    inputs: vec![pb::model_infer_request::InferInputTensor {
                        name: m.inputs[0].name.clone(),
                        datatype: x.datatype.as_str().into(),
                        shape: x.shape.clone(),
                        ..Default::default()
                    }],
                    raw_input_contents: vec![x.data.clone()],
                    ..Default::default()
                };
                let http_after = server_buckets(&gw, "http");
                let grpc_before = server_buckets(&gw, "grpc");
                let mut over_grpc = Vec::with_capacity(args.requests);
                for k in 0..args.requests + args.requests / 10 {
                    let t = Instant::now();
                    gclient.model_infer(req.clone()).await.map_err(|e| e.to_string())?;
                    if k >= args.requests / 10 {
                        over_grpc.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                let grpc_after = server_buckets(&gw, "grpc");
                for v in [&mut direct, &mut over_http, &mut over_grpc] {
                    v.sort_by(f64::total_cmp);
                }
                let (d, h, g) =
                    (quantile(&direct, 0.5), quantile(&over_http, 0.5), quantile(&over_grpc, 0.5));
                // Warm-up requests are in the server's histogram too; a tenth of the cell
                // barely moves its p50.
                let server_http = bucket_quantile(&http_before, &http_after, 0.5);
                let server_grpc = bucket_quantile(&grpc_before, &grpc_after, 0.5);
                if args.json {
                    let row = serde_json::json!({
                        "model": m.name, "variant": v.name, "batch": b,
                        "engine_us_p50": d, "engine_us_p99": quantile(&direct, 0.99),
                        "http_us_p50": h, "http_us_p99": quantile(&over_http, 0.99),
                        "grpc_us_p50": g, "grpc_us_p99": quantile(&over_grpc, 0.99),
                        "http_overhead_us_p50": h - d, "http_overhead_us_p99": quantile(&over_http, 0.99) - d,
                        "grpc_overhead_us_p50": g - d, "grpc_overhead_us_p99": quantile(&over_grpc, 0.99) - d,
                        "server_us_p50": server_http - d, "server_grpc_us_p50": server_grpc - d,
                        "server_total_us_p50": server_http, "requests": args.requests,
                        "http_floor_us_p50": fh, "grpc_floor_us_p50": fg,
                        "http_over_floor_us_p50": h - d - fh, "grpc_over_floor_us_p50": g - d - fg,
                    });
                    println!("{row}");
                    continue;
                }
                table.add_row([
                    m.name.clone(),
                    v.name.clone(),
                    b.to_string(),
                    format!("{d:.0}"),
                    format!("{h:.0}"),
                    format!("{g:.0}"),
                    format!("{:.0}", h - d),
                    format!("{:.0}", g - d),
                    format!("{:.2}", h / d),
                    format!("{:.2}", g / d),
                ]);
            }
        }
        if !args.json {
            println!("{table}");
            println!(
                "(sequential requests, one agent thread, {} timed requests per cell, loopback; \
                 transport floor (liveness route) p50: HTTP {fh:.0} us, gRPC {fg:.0} us)",
                args.requests
            );
        }
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok(())
    })
}
