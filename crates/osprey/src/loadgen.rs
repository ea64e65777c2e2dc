//! `osprey loadgen`: drives a server over HTTP (binary tensor extension) or gRPC, either
//! closed-loop at a fixed concurrency or open-loop at a fixed rate, for a bounded time, with
//! real inputs from the model's evaluation set when the local repository has one.
//!
//! Every request ends in exactly one bucket:
//! - `ok`: answered with outputs;
//! - `rejected`: refused explicitly for capacity or deadline (HTTP 429/503/504,
//!   gRPC RESOURCE_EXHAUSTED/UNAVAILABLE/DEADLINE_EXCEEDED);
//! - `failed`: any other explicit error;
//! - `lost`: sent but never answered (transport error, or no answer within `--timeout`).
//!
//! Every request carries a unique `id`; an answer whose `id` is not its request's, or an `id`
//! answered twice, counts in `duplicates` (must be 0). `expired` counts the rejections that
//! are deadline errors (504 / DEADLINE_EXCEEDED: the request waited and then gave up) among
//! `rejected`; `reject_p50_ms`/`reject_p99_ms` are how fast refusals came back.
//! `--timeseries FILE` writes one CSV row per second of the run (by answer time).
//!
//! A multi-modal model (`multimodal.toml`) is driven with its held-out paired events, every
//! modality's inputs in each request (`--modalities` to send only some); its answers also
//! count `refined_pct`, `calls_per_answer`, `explained_pct` and `explain_skipped_pct` from the
//! response parameters.
//!
//! Of the `ok` answers, `late` ones came back with the server's `deadline_met = false`.
//! `late_pct` counts every request not answered on time (late, rejected, failed, lost);
//! `accuracy` is over answered samples with a label; `utility` per request is +1 for a right
//! answer on time, 0 for a wrong one on time, −1 for anything not on time (the scheduler's
//! miss penalty λ = 1), averaged over requests sent.

use bytes::Bytes;
use comfy_table::Table;
use http_body_util::{BodyExt, Full};
use osprey_core::model::{EvalSet, ModelSpec, scan_repository};
use osprey_server::pb;
use osprey_server::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct LoadgenArgs {
    /// Model to drive.
    #[arg(long)]
    model: String,
    /// Pin one variant (`/versions/{v}`).
    #[arg(long)]
    version: Option<String>,
    #[arg(long, value_enum, default_value = "http")]
    protocol: Protocol,
    /// Server address (host:port); default 127.0.0.1:8000 for HTTP, :8001 for gRPC.
    #[arg(long)]
    target: Option<String>,
    /// Closed loop: this many requests in flight at all times.
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: this many requests per second, whatever the answers.
    #[arg(long)]
    rate: Option<f64>,
    /// With --rate: OPD's fluctuating shape, from --rate up to this many requests per second
    /// and back, rate(t) = low + (high − low)·(1 − cos(2πt/period))/2.
    #[arg(long, requires = "rate")]
    high: Option<f64>,
    /// Period of the fluctuating shape, seconds.
    #[arg(long, default_value_t = 60.0)]
    period_s: f64,
    /// How long to send, seconds.
    #[arg(long)]
    duration: f64,
    /// Samples per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Request deadline sent as the `deadline_ms` parameter.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Give up on an answer after this many seconds (counted as lost).
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Model repository holding the evaluation set (default: $OSPREY_MODEL_REPOSITORY, else ./models, else models/ beside the executable).
    #[arg(long)]
    model_repository: Option<PathBuf>,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// API key of the tenant to send as (`Authorization: Bearer`).
    #[arg(long)]
    api_key: Option<String>,
    /// A multi-modal model: send only these modalities' inputs (comma-separated; default all).
    #[arg(long)]
    modalities: Option<String>,
    /// Write a per-second CSV time series here (second, sent, ok, goodput, rejected, expired,
    /// failed, lost, ok_p99_ms, reject_p99_ms).
    #[arg(long)]
    timeseries: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Protocol {
    Http,
    Grpc,
}

/// A prepared request body: sample index range and encoded payloads.
struct Sample {
    labels: Vec<u32>,
    /// The JSON header without its opening brace (the request's `id` goes first).
    http_rest: Vec<u8>,
    http_data: Bytes,
    grpc: pb::ModelInferRequest,
}

impl Sample {
    /// The HTTP body for request `id` and its JSON header's length.
    fn http_body(&self, id: u64) -> (Bytes, usize) {
        let mut b = Vec::with_capacity(self.http_rest.len() + self.http_data.len() + 24);
        b.extend_from_slice(format!("{{\"id\":\"{id}\",").as_bytes());
        b.extend_from_slice(&self.http_rest);
        let header_len = b.len();
        b.extend_from_slice(&self.http_data);
        (Bytes::from(b), header_len)
    }
}

/// One second of the run, by answer time.
#[derive(Default, Clone)]
struct Second {
    sent: u64,
    ok: u64,
    goodput: u64,
    rejected: u64,
    expired: u64,
    failed: u64,
    lost: u64,
    ok_ms: Vec<f64>,
    reject_ms: Vec<f64>,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    ok: u64,
    rejected: u64,
    failed: u64,
    lost: u64,
    late: u64,
    on_time_correct: u64,
    correct: u64,
    labelled: u64,
    latencies_ms: Vec<f64>,
    reject_ms: Vec<f64>,
    expired: u64,
    duplicates: u64,
    answered_ids: std::collections::HashSet<u64>,
    seconds: Vec<Second>,
    variants: std::collections::BTreeMap<String, u64>,
    nodes: std::collections::BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Multi-modal answers: how many, refined, member calls, explained, explanation skipped.
    mm_answers: u64,
    refined: u64,
    calls: u64,
    explained: u64,
    explain_skipped: u64,
}

/// What a multi-modal answer says of how it was made.
#[derive(Default)]
struct MmAnswer {
    refined: bool,
    calls: u64,
    /// `Some(true)`: explained; `Some(false)`: its explanation was skipped.
    explained: Option<bool>,
}

enum Outcome {
    Ok {
        latency: Duration,
        argmax: Vec<usize>,
        variant: String,
        node: String,
        met: bool,
        id: String,
        mm: Option<MmAnswer>,
    },
    Rejected {
        msg: String,
        latency: Duration,
        expired: bool,
    },
    Failed(String),
    Lost(String),
}

pub fn run(args: LoadgenArgs) -> Result<(), String> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    if args.concurrency.is_none() && args.rate.is_none() {
        return Err("give --concurrency N (closed loop) or --rate R (open loop)".into());
    }
    if args.concurrency == Some(0) || args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err("--concurrency and --rate must be positive".into());
    }
    if args.batch == 0 {
        return Err("--batch must be positive".into());
    }
    if args.high.is_some_and(|h| !(h > 0.0 && h.is_finite()))
        || !(args.period_s.is_finite() && args.period_s > 0.0)
    {
        return Err("--high and --period-s must be positive".into());
    }
    let repo = crate::repository(args.model_repository.clone())?;
    if repo.join(&args.model).join("multimodal.toml").is_file() {
        let mm = osprey_core::multimodal::MultiModalSpec::load(&repo.join(&args.model))
            .map_err(|e| e.to_string())?;
        let samples = Arc::new(prepare_multimodal(&repo, &mm, &args)?);
        let rt =
            tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
        let tally = rt.block_on(drive(args.clone(), samples))?;
        report(&args, &tally);
        return Ok(());
    }
    let spec = match scan_repository(&repo)
        .ok()
        .and_then(|(models, _)| models.into_iter().find(|m| m.name == args.model))
    {
        Some(m) => m,
        None => pipeline_as_model(&repo, &args.model)
            .or_else(|| split_as_model(&repo, &args.model))
            .ok_or_else(|| {
                format!(
                    "model '{}' not found in {} (needed for its input shapes)",
                    args.model,
                    repo.display()
                )
            })?,
    };
    let eval = spec.load_eval().map_err(|e| e.to_string())?;
    let samples = Arc::new(prepare(&spec, eval.as_ref(), &args));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    let tally = rt.block_on(drive(args.clone(), samples))?;
    report(&args, &tally);
    Ok(())
}

/// A pipeline of the repository seen as the model a client addresses: the first stage's
/// inputs, the last stage's outputs, the pipeline's own end-to-end evaluation set.
fn pipeline_as_model(repo: &std::path::Path, name: &str) -> Option<ModelSpec> {
    let p = osprey_core::pipeline::PipelineSpec::load(&repo.join(name)).ok()?;
    let (models, _) = scan_repository(repo).ok()?;
    let chain = p.check(&models).ok()?;
    let (first, last) = (chain.first()?, chain.last()?);
    let samples =
        std::fs::read_to_string(p.dir.join("eval/labels.csv")).ok()?.lines().count().saturating_sub(1);
    Some(ModelSpec {
        name: p.name.clone(),
        dir: p.dir.clone(),
        outputs: last.outputs.clone(),
        variants: Vec::new(),
        eval: Some(osprey_core::model::EvalSpec {
            inputs: "eval/inputs.bin".into(),
            labels: "eval/labels.csv".into(),
            samples,
            probabilities: None,
        }),
        ..(*first).clone()
    })
}

/// A split model (`split.toml`) as the model a client addresses: sentences in (BYTES), the
/// embedding out; requests take their sentences from its `eval/sentences.txt`.
fn split_as_model(repo: &std::path::Path, name: &str) -> Option<ModelSpec> {
    let s = osprey_core::split::SplitSpec::load(&repo.join(name)).ok()?;
    use osprey_core::model::TensorSpec;
    use osprey_core::tensor::DataType;
    Some(ModelSpec {
        name: s.name.clone(),
        dir: s.dir.clone(),
        task: s.task.clone(),
        modality: s.modality.clone(),
        description: s.description.clone(),
        labels: Vec::new(),
        max_batch_size: s.max_batch_size,
        inputs: vec![TensorSpec { name: "text".into(), datatype: DataType::Bytes, shape: vec![-1] }],
        outputs: vec![TensorSpec {
            name: "embedding".into(),
            datatype: DataType::Fp32,
            shape: vec![-1, s.hidden as i64],
        }],
        variants: Vec::new(),
        eval: None,
        engine: None,
        explain: None,
    })
}

/// Sentences for a text model's requests (its `eval/sentences.txt`, else one fixed sentence),
/// in the protocol's BYTES serialisation.
fn sentences(spec: &ModelSpec, first: usize, n: usize) -> Vec<u8> {
    let text = std::fs::read_to_string(spec.dir.join("eval/sentences.txt")).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        lines.push("The conveyor on line three stopped.");
    }
    let mut out = Vec::new();
    for k in 0..n {
        let l = lines[(first + k) % lines.len()].as_bytes();
        out.extend_from_slice(&(l.len() as u32).to_le_bytes());
        out.extend_from_slice(l);
    }
    out
}

fn prepare(spec: &ModelSpec, eval: Option<&EvalSet>, args: &LoadgenArgs) -> Vec<Sample> {
    let input = &spec.inputs[0];
    let per = input.sample_elements() * input.datatype.size();
    // Only the held-out half: the other half trained the model's estimator.
    let held: Vec<usize> = eval.map_or_else(|| vec![0], EvalSet::held_out);
    let n_samples = held.len().max(1);
    let requests =
        if input.datatype.is_variable() { 64 } else { n_samples.div_ceil(args.batch).clamp(1, 256) };
    (0..requests)
        .map(|r| {
            let idx: Vec<usize> = (0..args.batch)
                .map(|k| held.get((r * args.batch + k) % n_samples).copied().unwrap_or(0))
                .collect();
            let data: Vec<u8> = match eval {
                Some(e) => idx.iter().flat_map(|&i| e.sample(i).to_vec()).collect(),
                None if input.datatype.is_variable() => sentences(spec, r * args.batch, args.batch),
                None => vec![0u8; per * args.batch],
            };
            let labels = eval.map(|e| idx.iter().map(|&i| e.labels[i]).collect()).unwrap_or_default();
            sample(&spec.name, &spec.outputs[0].name, vec![(input, data)], labels, args)
        })
        .collect()
}

/// Requests to a multi-modal model (`multimodal.toml`): each row one held-out paired event
/// (`[eval] pairs`), carrying every modality's inputs (a tenant limited to some modalities
/// has the others refused, so such a tenant's load names only those: `--modalities`).
fn prepare_multimodal(
    repo: &std::path::Path,
    mm: &osprey_core::multimodal::MultiModalSpec,
    args: &LoadgenArgs,
) -> Result<Vec<Sample>, String> {
    let (models, _) = scan_repository(repo).map_err(|e| e.to_string())?;
    let members = mm.check(&models).map_err(|e| e.to_string())?;
    let pairs = mm
        .load_pairs()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("multi-modal model '{}' has no [eval] pairs to send", mm.name))?;
    let events: Vec<_> = pairs.into_iter().filter(|p| p.held_out).collect();
    if events.is_empty() {
        return Err(format!("multi-modal model '{}' has no held-out pairs", mm.name));
    }
    let carried: Vec<usize> = match &args.modalities {
        None => (0..mm.modalities.len()).collect(),
        Some(list) => list
            .split(',')
            .map(|name| {
                mm.modalities.iter().position(|d| d.name == name.trim()).ok_or_else(|| {
                    format!("--modalities: '{}' is not a modality of '{}'", name.trim(), mm.name)
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let evals = carried
        .iter()
        .map(|&k| {
            members[k]
                .load_eval()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("model '{}' has no evaluation set", members[k].name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let requests = events.len().div_ceil(args.batch).clamp(1, 1024);
    Ok((0..requests)
        .map(|r| {
            let rows: Vec<_> =
                (0..args.batch).map(|k| &events[(r * args.batch + k) % events.len()]).collect();
            let inputs = carried
                .iter()
                .zip(&evals)
                .map(|(&k, e)| {
                    let data = rows.iter().flat_map(|p| e.sample(p.samples[k]).to_vec()).collect();
                    (&members[k].inputs[0], data)
                })
                .collect();
            let labels = rows.iter().map(|p| p.label).collect();
            sample(&mm.name, &mm.output, inputs, labels, args)
        })
        .collect())
}

/// One prepared request of `model` carrying `inputs` (each with its rows' bytes), asking for
/// `output`.
fn sample(
    model: &str,
    output: &str,
    inputs: Vec<(&osprey_core::model::TensorSpec, Vec<u8>)>,
    labels: Vec<u32>,
    args: &LoadgenArgs,
) -> Sample {
    let mut params = serde_json::Map::new();
    if let Some(d) = args.deadline_ms {
        params.insert("deadline_ms".into(), d.into());
    }
    let shape_of = |t: &osprey_core::model::TensorSpec| {
        let mut shape = t.shape.clone();
        shape[0] = args.batch as i64;
        shape
    };
    let header = serde_json::json!({
        "inputs": inputs.iter().map(|(t, data)| serde_json::json!({
            "name": t.name, "shape": shape_of(t), "datatype": t.datatype.as_str(),
            "parameters": { "binary_data_size": data.len() } })).collect::<Vec<_>>(),
        "outputs": [{ "name": output, "parameters": { "binary_data": true } }],
        "parameters": params,
    });
    let header = serde_json::to_vec(&header).unwrap_or_default();
    let http_rest = header.get(1..).unwrap_or_default().to_vec();
    let http_data = Bytes::from(inputs.iter().flat_map(|(_, d)| d.iter().copied()).collect::<Vec<u8>>());
    let mut gparams = std::collections::HashMap::new();
    if let Some(d) = args.deadline_ms {
        gparams.insert(
            "deadline_ms".to_string(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::Int64Param(d as i64)),
            },
        );
    }
    let grpc = pb::ModelInferRequest {
        model_name: model.to_string(),
        model_version: args.version.clone().unwrap_or_default(),
        id: String::new(),
        parameters: gparams,
        inputs: inputs
            .iter()
            .map(|(t, _)| pb::model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.datatype.as_str().into(),
                shape: shape_of(t),
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
        outputs: vec![],
        raw_input_contents: inputs.into_iter().map(|(_, d)| d).collect(),
    };
    Sample { labels, http_rest, http_data, grpc }
}

type HttpClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(Clone)]
enum Conn {
    Http { client: HttpClient, uri: String, auth: Option<String> },
    Grpc(GrpcInferenceServiceClient<tonic::transport::Channel>, Option<String>),
}

async fn drive(args: LoadgenArgs, samples: Arc<Vec<Sample>>) -> Result<Tally, String> {
    let conn = match args.protocol {
        Protocol::Http => {
            let target = args.target.clone().unwrap_or_else(|| "127.0.0.1:8000".into());
            let path = match &args.version {
                Some(v) => format!("/v2/models/{}/versions/{v}/infer", args.model),
                None => format!("/v2/models/{}/infer", args.model),
            };
            let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                .build({
                    let mut c = hyper_util::client::legacy::connect::HttpConnector::new();
                    c.set_nodelay(true);
                    c
                });
            Conn::Http {
                client,
                uri: format!("http://{target}{path}"),
                auth: args.api_key.as_ref().map(|k| format!("Bearer {k}")),
            }
        }
        Protocol::Grpc => {
            let target = args.target.clone().unwrap_or_else(|| "127.0.0.1:8001".into());
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .map_err(|e| format!("connecting to {target}: {e}"))?;
            Conn::Grpc(
                GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20),
                args.api_key.as_ref().map(|k| format!("Bearer {k}")),
            )
        }
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next_id = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(args.duration);
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let mut tasks = tokio::task::JoinSet::new();
    let progress = !args.json;
    if let Some(c) = args.concurrency {
        for w in 0..c {
            let (conn, samples, tally, ids) = (conn.clone(), samples.clone(), tally.clone(), next_id.clone());
            tasks.spawn(async move {
                let mut i = w;
                while Instant::now() < end {
                    let s = &samples[i % samples.len()];
                    i += c;
                    let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sent(&tally, start);
                    let o = one(&conn, s, id, timeout).await;
                    record(&tally, s, id, o, start);
                }
            });
        }
    } else if let Some(rate) = args.rate {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut next = start;
        let mut i = 0usize;
        while next < end {
            tokio::time::sleep_until(next.into()).await;
            let (conn, samples, tally) = (conn.clone(), samples.clone(), tally.clone());
            sent(&tally, start);
            let k = i;
            let id = next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tasks.spawn(async move {
                let s = &samples[k % samples.len()];
                let o = one(&conn, s, id, timeout).await;
                record(&tally, s, id, o, start);
            });
            i += 1;
            next += match args.high {
                // OPD's fluctuating shape at the elapsed time.
                Some(high) => {
                    let t = next.duration_since(start).as_secs_f64();
                    let r = rate
                        + (high - rate) * (1.0 - (std::f64::consts::TAU * t / args.period_s).cos()) / 2.0;
                    Duration::from_secs_f64(1.0 / r.max(1e-3))
                }
                None => interval,
            };
            // Reap finished tasks so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
    }
    if progress {
        eprintln!("sending for {:.1} s ...", args.duration);
    }
    while tasks.join_next().await.is_some() {}
    let mut t = std::mem::take(&mut *tally.lock().map_err(|_| "tally poisoned")?);
    t.latencies_ms.sort_by(f64::total_cmp);
    t.reject_ms.sort_by(f64::total_cmp);
    // Throughput over the sending window (answers that arrive after it still count).
    t.latencies_ms.shrink_to_fit();
    Ok(t)
}

fn argmax_rows(data: &[u8], rows: usize) -> Vec<usize> {
    let f: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if rows == 0 || f.is_empty() {
        return Vec::new();
    }
    let k = f.len() / rows;
    (0..rows)
        .map(|r| {
            let row = &f[r * k..(r + 1) * k];
            (0..k).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap_or(0)
        })
        .collect()
}

async fn one(conn: &Conn, s: &Sample, id: u64, timeout: Duration) -> Outcome {
    let t = Instant::now();
    let rows = s.labels.len().max(1);
    let rejected = |msg: String, expired: bool| Outcome::Rejected { msg, latency: t.elapsed(), expired };
    match conn {
        Conn::Http { client, uri, auth } => {
            let mut req = hyper::Request::post(uri.as_str());
            if let Some(a) = auth {
                req = req.header("authorization", a.as_str());
            }
            let (body, header_len) = s.http_body(id);
            let req = req
                .header("content-type", "application/octet-stream")
                .header("inference-header-content-length", header_len)
                .body(Full::new(body));
            let req = match req {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(e.to_string()),
            };
            let fut = async {
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let hl = resp
                    .headers()
                    .get("inference-header-content-length")
                    .and_then(|h| h.to_str().ok())
                    .and_then(|s| s.parse::<usize>().ok());
                let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                Ok::<_, String>((status, hl, body))
            };
            match tokio::time::timeout(timeout, fut).await {
                Err(_) => Outcome::Lost("no answer within --timeout".into()),
                Ok(Err(e)) => Outcome::Lost(e),
                Ok(Ok((status, hl, body))) => {
                    if status.is_success() {
                        let hl = hl.unwrap_or(body.len()).min(body.len());
                        let head = serde_json::from_slice::<serde_json::Value>(&body[..hl]).ok();
                        let param = |k: &str| head.as_ref().map(|v| v["parameters"][k].clone());
                        let variant =
                            param("variant").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                        let met = param("deadline_met").and_then(|v| v.as_bool()).unwrap_or(true);
                        let node =
                            param("node").and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
                        let id = head
                            .as_ref()
                            .and_then(|v| v["id"].as_str().map(String::from))
                            .unwrap_or_default();
                        let mm = param("refined").and_then(|r| r.as_bool()).map(|refined| MmAnswer {
                            refined,
                            calls: param("calls").and_then(|c| c.as_u64()).unwrap_or(0),
                            explained: match (param("explained"), param("explanation_skipped")) {
                                (Some(v), _) if !v.is_null() => Some(true),
                                (_, Some(v)) if !v.is_null() => Some(false),
                                _ => None,
                            },
                        });
                        Outcome::Ok {
                            latency: t.elapsed(),
                            argmax: argmax_rows(&body[hl..], rows),
                            variant,
                            node,
                            met,
                            id,
                            mm,
                        }
                    } else {
                        let msg = format!("HTTP {}: {}", status.as_u16(), String::from_utf8_lossy(&body));
                        match status.as_u16() {
                            429 | 503 => rejected(msg, false),
                            504 => rejected(msg, true),
                            _ => Outcome::Failed(msg),
                        }
                    }
                }
            }
        }
        Conn::Grpc(client, auth) => {
            let mut client = client.clone();
            let mut request =
                tonic::Request::new(pb::ModelInferRequest { id: id.to_string(), ..s.grpc.clone() });
            if let Some(a) = auth.as_ref().and_then(|a| a.parse().ok()) {
                request.metadata_mut().insert("authorization", a);
            }
            match tokio::time::timeout(timeout, client.model_infer(request)).await {
                Err(_) => Outcome::Lost("no answer within --timeout".into()),
                Ok(Ok(resp)) => {
                    let r = resp.into_inner();
                    let variant = r.model_version.clone();
                    let met = match r.parameters.get("deadline_met").and_then(|p| p.parameter_choice.as_ref())
                    {
                        Some(pb::infer_parameter::ParameterChoice::BoolParam(b)) => *b,
                        _ => true,
                    };
                    let argmax =
                        r.raw_output_contents.first().map(|d| argmax_rows(d, rows)).unwrap_or_default();
                    let node = match r.parameters.get("node").and_then(|p| p.parameter_choice.as_ref()) {
                        Some(pb::infer_parameter::ParameterChoice::StringParam(s)) => s.clone(),
                        _ => String::new(),
                    };
                    use pb::infer_parameter::ParameterChoice as P;
                    let p = |k: &str| r.parameters.get(k).and_then(|p| p.parameter_choice.as_ref());
                    let mm = match p("refined") {
                        Some(P::BoolParam(refined)) => Some(MmAnswer {
                            refined: *refined,
                            calls: match p("calls") {
                                Some(P::Int64Param(c)) => (*c).max(0) as u64,
                                _ => 0,
                            },
                            explained: if p("explained").is_some() {
                                Some(true)
                            } else if p("explanation_skipped").is_some() {
                                Some(false)
                            } else {
                                None
                            },
                        }),
                        _ => None,
                    };
                    Outcome::Ok { latency: t.elapsed(), argmax, variant, node, met, id: r.id, mm }
                }
                Ok(Err(st)) => {
                    use tonic::Code;
                    let msg = format!("{:?}: {}", st.code(), st.message());
                    match st.code() {
                        Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded => {
                            // A transport failure also surfaces as UNAVAILABLE, with no server message.
                            if st.code() == Code::Unavailable && st.message().contains("transport") {
                                Outcome::Lost(msg)
                            } else {
                                let expired = st.code() == Code::DeadlineExceeded;
                                rejected(msg, expired)
                            }
                        }
                        Code::Unknown | Code::Cancelled => Outcome::Lost(msg),
                        _ => Outcome::Failed(msg),
                    }
                }
            }
        }
    }
}

fn second(t: &mut Tally, start: Instant) -> &mut Second {
    let k = start.elapsed().as_secs() as usize;
    if t.seconds.len() <= k {
        t.seconds.resize(k + 1, Second::default());
    }
    &mut t.seconds[k]
}

fn sent(tally: &Mutex<Tally>, start: Instant) {
    if let Ok(mut t) = tally.lock() {
        t.sent += 1;
        second(&mut t, start).sent += 1;
    }
}

fn record(tally: &Mutex<Tally>, s: &Sample, sent_id: u64, o: Outcome, start: Instant) {
    let Ok(mut t) = tally.lock() else { return };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    match o {
        Outcome::Ok { latency, argmax, variant, node, met, id, mm } => {
            if let Some(m) = mm {
                t.mm_answers += 1;
                t.refined += u64::from(m.refined);
                t.calls += m.calls;
                t.explained += u64::from(m.explained == Some(true));
                t.explain_skipped += u64::from(m.explained == Some(false));
            }
            // An answer that is not this request's, or a request answered twice.
            if id != sent_id.to_string() || !t.answered_ids.insert(sent_id) {
                t.duplicates += 1;
            }
            let sec = second(&mut t, start);
            sec.ok += 1;
            sec.goodput += u64::from(met);
            sec.ok_ms.push(ms(latency));
            *t.nodes.entry(node).or_default() += 1;
            t.ok += 1;
            t.late += u64::from(!met);
            t.latencies_ms.push(latency.as_secs_f64() * 1e3);
            *t.variants.entry(variant).or_default() += 1;
            let mut all_right = !s.labels.is_empty() && argmax.len() == s.labels.len();
            for (p, &l) in argmax.iter().zip(&s.labels) {
                t.labelled += 1;
                t.correct += u64::from(*p == l as usize);
                all_right &= *p == l as usize;
            }
            t.on_time_correct += u64::from(met && all_right);
        }
        Outcome::Rejected { msg, latency, expired } => {
            t.rejected += 1;
            t.expired += u64::from(expired);
            t.reject_ms.push(ms(latency));
            let sec = second(&mut t, start);
            sec.rejected += 1;
            sec.expired += u64::from(expired);
            sec.reject_ms.push(ms(latency));
            t.first_error.get_or_insert(msg);
        }
        Outcome::Failed(e) => {
            t.failed += 1;
            second(&mut t, start).failed += 1;
            t.first_error.get_or_insert(e);
        }
        Outcome::Lost(e) => {
            t.lost += 1;
            second(&mut t, start).lost += 1;
            t.first_error.get_or_insert(e);
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    osprey_engine::profile::quantile(sorted, q)
}

/// Writes the per-second series (`--timeseries`).
fn write_timeseries(path: &std::path::Path, t: &Tally) -> Result<(), String> {
    let mut out =
        String::from("second,sent,ok,goodput,rejected,expired,failed,lost,ok_p99_ms,reject_p99_ms\n");
    for (k, s) in t.seconds.iter().enumerate() {
        let mut ok = s.ok_ms.clone();
        ok.sort_by(f64::total_cmp);
        let mut rej = s.reject_ms.clone();
        rej.sort_by(f64::total_cmp);
        out.push_str(&format!(
            "{k},{},{},{},{},{},{},{},{:.3},{:.3}\n",
            s.sent,
            s.ok,
            s.goodput,
            s.rejected,
            s.expired,
            s.failed,
            s.lost,
            quantile(&ok, 0.99),
            quantile(&rej, 0.99)
        ));
    }
    std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn report(args: &LoadgenArgs, t: &Tally) {
    if let Some(p) = &args.timeseries
        && let Err(e) = write_timeseries(p, t)
    {
        eprintln!("{e}");
    }
    let throughput = t.ok as f64 / args.duration;
    let goodput = (t.ok - t.late.min(t.ok)) as f64 / args.duration;
    let (rp50, rp99) = (quantile(&t.reject_ms, 0.5), quantile(&t.reject_ms, 0.99));
    let p50 = quantile(&t.latencies_ms, 0.5);
    let p99 = quantile(&t.latencies_ms, 0.99);
    let not_on_time = t.late + t.rejected + t.failed + t.lost;
    let late_pct = 100.0 * not_on_time as f64 / t.sent.max(1) as f64;
    let utility = (t.on_time_correct as f64 - not_on_time as f64) / t.sent.max(1) as f64;
    let accuracy = if t.labelled > 0 { Some(t.correct as f64 / t.labelled as f64) } else { None };
    if args.json {
        let line = serde_json::json!({
            "model": args.model,
            "protocol": format!("{:?}", args.protocol).to_lowercase(),
            "concurrency": args.concurrency,
            "rate": args.rate,
            "duration_s": args.duration,
            "sent": t.sent, "ok": t.ok, "rejected": t.rejected, "failed": t.failed, "lost": t.lost, "late": t.late, "late_pct": late_pct, "utility": utility,
            "throughput_rps": throughput, "goodput_rps": goodput, "p50_ms": p50, "p99_ms": p99,
            "expired": t.expired, "duplicates": t.duplicates,
            "reject_p50_ms": rp50, "reject_p99_ms": rp99,
            "accuracy": accuracy, "correct": t.correct, "labelled": t.labelled,
            "inputs": if t.labelled > 0 { EvalSet::HELD_OUT } else { "zeros (the model has no evaluation set)" },
            "variants": t.variants,
            "nodes": t.nodes,
            "first_error": t.first_error,
        });
        let mut line = line;
        if t.mm_answers > 0 {
            let share = |k: u64| 100.0 * k as f64 / t.mm_answers as f64;
            line["refined_pct"] = share(t.refined).into();
            line["calls_per_answer"] = (t.calls as f64 / t.mm_answers as f64).into();
            line["explained_pct"] = share(t.explained).into();
            line["explain_skipped_pct"] = share(t.explain_skipped).into();
            line["on_time_correct"] = t.on_time_correct.into();
            line["multimodal_answers"] = t.mm_answers.into();
            line["refined"] = t.refined.into();
            line["calls"] = t.calls.into();
            line["explained"] = t.explained.into();
        }
        println!("{line}");
        return;
    }
    let mut table = Table::new();
    table.set_header([
        "sent",
        "ok",
        "rejected",
        "failed",
        "lost",
        "late",
        "late %",
        "utility",
        "throughput/s",
        "p50 ms",
        "p99 ms",
        "accuracy",
    ]);
    table.add_row([
        t.sent.to_string(),
        t.ok.to_string(),
        t.rejected.to_string(),
        t.failed.to_string(),
        t.lost.to_string(),
        t.late.to_string(),
        format!("{late_pct:.1}"),
        format!("{utility:.3}"),
        format!("{throughput:.1}"),
        format!("{p50:.2}"),
        format!("{p99:.2}"),
        accuracy.map_or("-".into(), |a| format!("{a:.3}")),
    ]);
    println!("{table}");
    let v: Vec<String> = t.variants.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    if !v.is_empty() {
        println!("answered by variant: {}", v.join(", "));
    }
    if t.labelled > 0 {
        println!("inputs: {}", EvalSet::HELD_OUT);
    }
    if t.mm_answers > 0 {
        let share = |k: u64| 100.0 * k as f64 / t.mm_answers as f64;
        println!(
            "multi-modal answers: {:.1}% refined, {:.2} calls each, {:.1}% explained, {:.1}% explanation skipped",
            share(t.refined),
            t.calls as f64 / t.mm_answers as f64,
            share(t.explained),
            share(t.explain_skipped)
        );
    }
    if t.rejected > 0 {
        println!(
            "refusals answered in p50 {rp50:.2} ms, p99 {rp99:.2} ms; {} of them expired after waiting",
            t.expired
        );
    }
    if t.duplicates > 0 {
        println!("DUPLICATE or crossed answers: {}", t.duplicates);
    }
    if let Some(e) = &t.first_error {
        println!("first error: {e}");
    }
}
