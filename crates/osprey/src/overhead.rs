//! `osprey overhead`: what serving costs on top of the engine, measured side by side in one
//! run. For each model and batch size it times (1) `Session::run` called directly and
//! (2) sequential requests to an in-process `osprey serve` on loopback over HTTP (binary
//! tensors) and gRPC, pinned to the same variant and batch. Overhead = served − direct.

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
    /// Model repository (default: the bundled zoo).
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
}

pub fn run(args: OverheadArgs) -> Result<(), String> {
    let repo = args.model_repository.clone().unwrap_or_else(crate::default_repository);
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
                models: models.clone(),
                problems: Vec::new(),
                limits: Limits::default(),
                max_batch: 16,
                local_agents: vec![osprey_core::config::AgentConfig::new("local-0", 1)],
                selector: osprey_policy::instance::Selector::Predicted,
                tenants: Vec::new(),
                scheduler: Default::default(),
            },
            |_, v, _| osprey_core::profile::VariantProfile {
                name: v.name.clone(),
                swap_us: 0.0,
                batches: Vec::new(),
            },
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(osprey_server::serve(osprey_server::Listeners { http, grpc }, gw, async {
            let _ = stop_rx.await;
        }));
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
                let mut over_grpc = Vec::with_capacity(args.requests);
                for k in 0..args.requests + args.requests / 10 {
                    let t = Instant::now();
                    gclient.model_infer(req.clone()).await.map_err(|e| e.to_string())?;
                    if k >= args.requests / 10 {
                        over_grpc.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                for v in [&mut direct, &mut over_http, &mut over_grpc] {
                    v.sort_by(f64::total_cmp);
                }
                let (d, h, g) =
                    (quantile(&direct, 0.5), quantile(&over_http, 0.5), quantile(&over_grpc, 0.5));
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
        println!("{table}");
        println!(
            "(sequential requests, one agent thread, {} timed requests per cell, loopback)",
            args.requests
        );
        let _ = stop_tx.send(());
        let _ = server.await;
        Ok(())
    })
}
