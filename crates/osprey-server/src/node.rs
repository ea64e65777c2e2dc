//! The node side of the agent protocol: `osprey agent --join GATEWAY`.
//!
//! Dials the gateway's gRPC port, registers (capabilities and labels), heartbeats every
//! `cluster::HEARTBEAT`, runs the batches it is sent on a bounded pool of worker threads (its
//! thread budget) and returns raw tensors. Variants are loaded on first use and kept; nothing a
//! peer sends is trusted: model, variant, datatypes, shapes and byte sizes are checked against
//! the local model repository before a tensor is built. When the connection drops the agent
//! reconnects with backoff until it is told to stop.

use crate::agent_pb::{self, agent_message, gateway_message};
use crate::cluster::PROTOCOL_VERSION;
use osprey_core::error::{Error, Result};
use osprey_core::model::{ModelSpec, scan_repository};
use osprey_core::tensor::{DataType, RawTensor, byte_size};
use osprey_engine::Session;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

/// Everything `osprey agent` needs.
pub struct NodeConfig {
    pub name: String,
    pub join: String,
    /// The cluster join token (see [`crate::join`]).
    pub token: String,
    /// Dial the gateway over TLS, trusting this CA (PEM) for `tls_domain`.
    pub tls_ca: Option<PathBuf>,
    /// Name the gateway's certificate must carry (default: the host part of `join`).
    pub tls_domain: Option<String>,
    pub threads: u32,
    pub model_repository: PathBuf,
    /// Injected slowdown for tests and demos: each batch takes this many times longer.
    pub slowdown: f64,
    /// Speed relative to the machine that measured the profiles (1.0 = same).
    pub speed_hint: f64,
    pub labels: HashMap<String, String>,
    /// Largest message accepted from the gateway, bytes.
    pub max_message_bytes: usize,
    /// Memory this node offers for model variants, MB (placement budget).
    pub memory_mb: u64,
    /// Where to listen for split-inference peers (`None`: no layer ranges on this node).
    pub peer_listen: Option<String>,
    /// The address peers dial (default: the bound listen address).
    pub peer_advertise: Option<String>,
}

/// Memory available on this machine, MB (from /proc/meminfo; 1 GiB when unknown).
pub fn available_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

/// Backoff between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

struct Node {
    cfg: NodeConfig,
    /// The models of this node's repository, by name; a load re-reads the model's folder.
    models: std::sync::RwLock<HashMap<String, Arc<ModelSpec>>>,
    sessions: Mutex<HashMap<(String, String), Arc<Session>>>,
    busy: AtomicU32,
    errors: AtomicU64,
    /// "model/variant/batch" -> EWMA of service time, µs.
    latency: Mutex<HashMap<String, f64>>,
    /// Loads run one at a time, so that each one's memory growth is its own (batches running
    /// meanwhile still blur it by their buffers).
    loading: Mutex<()>,
    workers: Arc<Semaphore>,
    /// Split inference (layer ranges), when the node offers it.
    split: Option<Arc<crate::split_node::SplitNode>>,
    peer_addr: String,
    /// The emulated slowdown now (f64 bits): `--slowdown`, tripled by each SIGUSR1.
    slowdown: AtomicU64,
}

/// The memory in use, KiB: the live heap when the counting allocator is installed
/// ([`crate::heap`]), else the resident set (`/proc/self/statm`; `None` off Linux).
fn memory_in_use_kib() -> Option<u64> {
    if let Some(bytes) = crate::heap::live_bytes() {
        return Some(bytes as u64 / 1024);
    }
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4)
}

fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// 1-minute load average per core (0 when unknown).
fn cpu_load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |l| l / f64::from(cores()))
}

/// Runs the agent until `shutdown` resolves. `on_joined` is called with the agent id each time
/// the gateway welcomes it.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
    on_joined: impl Fn(&str) + Send + Sync + 'static,
) -> Result<()> {
    let (models, problems) = scan_repository(&cfg.model_repository)?;
    for p in problems {
        tracing::warn!(model = %p.model, "skipping model: {}", p.error);
    }
    let workers = Arc::new(Semaphore::new(cfg.threads.max(1) as usize));
    let (mut split, mut peer_addr) = (None, String::new());
    if let Some(listen) = &cfg.peer_listen {
        let sn = crate::split_node::SplitNode::new(
            &cfg.model_repository,
            workers.clone(),
            cfg.token.clone(),
            cfg.slowdown,
            cfg.max_message_bytes,
        )?;
        if !sn.models().is_empty() {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| Error::invalid(format!("--peer-listen {listen}: {e}")))?;
            let bound = listener.local_addr().map_err(|e| Error::internal(e.to_string()))?;
            peer_addr = cfg.peer_advertise.clone().unwrap_or_else(|| bound.to_string());
            crate::split_node::serve_peers(
                sn.clone(),
                crate::join::JoinToken::new(&cfg.token),
                listener,
                cfg.max_message_bytes,
            );
            tracing::info!(%peer_addr, models = ?sn.models(), "serving layer ranges to peers");
            split = Some(sn);
        }
    }
    let node = Arc::new(Node {
        models: std::sync::RwLock::new(models.into_iter().map(|m| (m.name.clone(), Arc::new(m))).collect()),
        sessions: Mutex::new(HashMap::new()),
        busy: AtomicU32::new(0),
        errors: AtomicU64::new(0),
        latency: Mutex::new(HashMap::new()),
        loading: Mutex::new(()),
        workers,
        split,
        peer_addr,
        slowdown: AtomicU64::new(cfg.slowdown.to_bits()),
        cfg,
    });
    spawn_slowdown_signals(node.clone());
    let on_joined = Arc::new(on_joined);
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_MIN;
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = session(node.clone(), on_joined.clone()) => {
                match r {
                    // Retrying cannot fix a wrong token or a bad address or TLS setting: say so
                    // and stop.
                    Err(e) if matches!(e.code, osprey_core::error::ErrorCode::Unauthenticated | osprey_core::error::ErrorCode::InvalidArgument) => return Err(e),
                    Ok(()) => tracing::warn!("the gateway closed the session; reconnecting"),
                    Err(e) => tracing::warn!("session ended: {e}; reconnecting in {backoff:?}"),
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

/// Emulated contention for tests and demos (Unix): SIGUSR1 makes every batch and layer range
/// 3x slower than it is now, SIGUSR2 restores the agent's `--slowdown`.
fn spawn_slowdown_signals(node: Arc<Node>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut slower), Ok(mut restore)) =
            (signal(SignalKind::user_defined1()), signal(SignalKind::user_defined2()))
        else {
            return;
        };
        tokio::spawn(async move {
            loop {
                let factor = tokio::select! {
                    Some(()) = slower.recv() => node.slowdown() * 3.0,
                    Some(()) = restore.recv() => node.cfg.slowdown,
                    else => return,
                };
                node.slowdown.store(factor.to_bits(), Ordering::Relaxed);
                if let Some(split) = &node.split {
                    split.set_slowdown(factor);
                }
                tracing::info!(slowdown = factor, "emulated slowdown changed");
            }
        });
    }
    #[cfg(not(unix))]
    let _ = node;
}

async fn session(node: Arc<Node>, on_joined: Arc<impl Fn(&str) + Send + Sync + 'static>) -> Result<()> {
    let scheme = if node.cfg.tls_ca.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", node.cfg.join))
        .map_err(|e| Error::invalid(format!("--join {}: {e}", node.cfg.join)))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(ca) = &node.cfg.tls_ca {
        let host = node.cfg.join.rsplit_once(':').map_or(node.cfg.join.as_str(), |(h, _)| h);
        let domain = node.cfg.tls_domain.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        endpoint = endpoint
            .tls_config(crate::tls::client(ca, &domain)?)
            .map_err(|e| Error::invalid(format!("TLS for {}: {e}", node.cfg.join)))?;
    }
    let channel = endpoint.connect().await.map_err(|e| Error::unavailable(format!("connecting: {e}")))?;
    let mut client = agent_pb::agent_gateway_client::AgentGatewayClient::new(channel)
        .max_decoding_message_size(node.cfg.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel::<agent_pb::AgentMessage>(256);
    let register = agent_pb::AgentMessage {
        kind: Some(agent_message::Kind::Register(agent_pb::Register {
            name: node.cfg.name.clone(),
            protocol_version: PROTOCOL_VERSION,
            threads: node.cfg.threads,
            memory_mb: node.cfg.memory_mb,
            labels: node.cfg.labels.clone(),
            models: node.models.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect(),
            speed_hint: node.cfg.speed_hint,
            cores: cores(),
            accelerator: String::new(),
            peer_addr: node.peer_addr.clone(),
            split_models: node.split.as_ref().map(|s| s.models()).unwrap_or_default(),
        })),
    };
    if let Some(s) = &node.split {
        s.attach(tx.clone());
    }
    tx.send(register).await.map_err(|_| Error::internal("outgoing stream closed"))?;
    let mut attach = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let token = tonic::metadata::MetadataValue::try_from(node.cfg.token.as_str())
        .map_err(|_| Error::invalid("the join token must be visible ASCII"))?;
    attach.metadata_mut().insert(crate::join::METADATA_KEY, token);
    let mut inbound = match client.attach(attach).await {
        Ok(r) => r.into_inner(),
        Err(e) if e.code() == tonic::Code::Unauthenticated => {
            return Err(Error::new(
                osprey_core::error::ErrorCode::Unauthenticated,
                format!("the gateway refused the join token: {}", e.message()),
            ));
        }
        Err(e) => return Err(Error::unavailable(format!("attach refused: {}", e.message()))),
    };
    let heartbeat = {
        let (tx, node) = (tx.clone(), node.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::cluster::HEARTBEAT).await;
                let hb = agent_pb::AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(agent_pb::Heartbeat {
                        busy: node.busy.load(Ordering::Relaxed),
                        cpu_load: cpu_load(),
                        errors: node.errors.load(Ordering::Relaxed),
                        latency_us: node.latency.lock().map(|l| l.clone()).unwrap_or_default(),
                        split_received: node.split.as_ref().map(|s| s.received()).unwrap_or_default(),
                    })),
                };
                if tx.send(hb).await.is_err() {
                    return;
                }
            }
        })
    };
    let workers = node.workers.clone();
    let result = loop {
        match inbound.message().await {
            Ok(Some(m)) => match m.kind {
                Some(gateway_message::Kind::Welcome(w)) => {
                    tracing::info!(agent_id = %w.agent_id, "joined {}", node.cfg.join);
                    on_joined(&w.agent_id);
                }
                Some(gateway_message::Kind::Load(l)) => {
                    let (node, tx) = (node.clone(), tx.clone());
                    tokio::spawn(async move {
                        let (m, v) = (l.model.clone(), l.variant.clone());
                        let n2 = node.clone();
                        let res = tokio::task::spawn_blocking(move || {
                            let _one = n2.loading.lock().unwrap_or_else(|e| e.into_inner());
                            let model = n2.reread(&m)?;
                            let before = memory_in_use_kib();
                            n2.load_fresh(&model, &v)?;
                            // At least 1 KiB when measured: 0 on the wire means "not measured".
                            Ok(before.zip(memory_in_use_kib()).map_or(0, |(b, a)| a.saturating_sub(b).max(1)))
                        })
                        .await
                        .unwrap_or_else(|_| Err(Error::internal("loading panicked")));
                        let (memory_kib, error) = match res {
                            Ok(kib) => (kib, String::new()),
                            Err(e) => (0, e.message),
                        };
                        tracing::info!(model = %l.model, variant = %l.variant, memory_kib, "loaded");
                        let loaded =
                            agent_pb::Loaded { model: l.model, variant: l.variant, error, memory_kib };
                        let _ = tx
                            .send(agent_pb::AgentMessage { kind: Some(agent_message::Kind::Loaded(loaded)) })
                            .await;
                    });
                }
                Some(gateway_message::Kind::Unload(u)) => {
                    if let Ok(mut m) = node.sessions.lock() {
                        m.remove(&(u.model.clone(), u.variant.clone()));
                    }
                    tracing::info!(model = %u.model, variant = %u.variant, "unloaded");
                }
                Some(gateway_message::Kind::Run(rb)) => {
                    let (node, tx, workers) = (node.clone(), tx.clone(), workers.clone());
                    tokio::spawn(async move {
                        let Ok(_permit) = workers.acquire_owned().await else { return };
                        node.busy.fetch_add(1, Ordering::Relaxed);
                        let n2 = node.clone();
                        let res = tokio::task::spawn_blocking(move || n2.execute(rb)).await;
                        node.busy.fetch_sub(1, Ordering::Relaxed);
                        if let Ok(res) = res {
                            if !res.error.is_empty() {
                                node.errors.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = tx
                                .send(agent_pb::AgentMessage { kind: Some(agent_message::Kind::Result(res)) })
                                .await;
                        }
                    });
                }
                Some(gateway_message::Kind::LoadRange(l)) => match &node.split {
                    Some(s) => s.handle_load(l),
                    None => tracing::warn!("asked to load a layer range; this node serves none"),
                },
                Some(gateway_message::Kind::UnloadRange(u)) => {
                    if let Some(s) = &node.split {
                        s.handle_unload(u)
                    }
                }
                Some(gateway_message::Kind::RunRange(r)) => {
                    if let Some(s) = &node.split {
                        s.handle_run(r)
                    }
                }
                Some(gateway_message::Kind::ProfileSplit(p)) => {
                    if let Some(s) = &node.split {
                        s.handle_profile(p)
                    }
                }
                None => {}
            },
            Ok(None) => break Ok(()),
            Err(e) => break Err(Error::unavailable(e.message().to_string())),
        }
    };
    heartbeat.abort();
    result
}

impl Node {
    /// The emulated slowdown factor now (1: none).
    fn slowdown(&self) -> f64 {
        f64::from_bits(self.slowdown.load(Ordering::Relaxed))
    }

    /// The model's spec as its folder says now (a model reloaded by the gateway's model control
    /// may have changed on this node too); the one read at start when the folder cannot be
    /// read now, and an error for a model this node never had.
    fn reread(&self, name: &str) -> Result<Arc<ModelSpec>> {
        let known = self.models.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        let known = known.ok_or_else(|| Error::not_found(format!("model '{name}' is not on this node")))?;
        match ModelSpec::load(&self.cfg.model_repository.join(name)) {
            Ok(spec) => {
                let spec = Arc::new(spec);
                self.models.write().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), spec.clone());
                Ok(spec)
            }
            Err(e) => {
                tracing::warn!(model = %name, "re-reading the model folder failed ({}); using the one read at start", e.message);
                Ok(known)
            }
        }
    }

    /// Loads `variant` from disk, replacing any session of it held now (a load is also how a
    /// reloaded model reaches this node).
    fn load_fresh(&self, model: &ModelSpec, variant: &str) -> Result<()> {
        let v = model.variant(variant).ok_or_else(|| Error::not_found(format!("no variant '{variant}'")))?;
        let s = Arc::new(Session::load(model, v)?);
        if let Ok(mut m) = self.sessions.lock() {
            m.insert((model.name.clone(), variant.to_string()), s);
        }
        Ok(())
    }

    fn session(&self, model: &ModelSpec, variant: &str) -> Result<Arc<Session>> {
        let key = (model.name.clone(), variant.to_string());
        if let Some(s) = self.sessions.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(s);
        }
        let v = model.variant(variant).ok_or_else(|| Error::not_found(format!("no variant '{variant}'")))?;
        let s = Arc::new(Session::load(model, v)?);
        if let Ok(mut m) = self.sessions.lock() {
            m.insert(key, s.clone());
        }
        Ok(s)
    }

    fn execute(&self, rb: agent_pb::RunBatch) -> agent_pb::BatchResult {
        let t = Instant::now();
        let key = format!(
            "{}/{}/{}",
            rb.model,
            rb.variant,
            rb.inputs.first().and_then(|i| i.shape.first()).copied().unwrap_or(0)
        );
        let mut out = agent_pb::BatchResult {
            batch_id: rb.batch_id,
            error: String::new(),
            outputs: Vec::new(),
            service_us: 0.0,
        };
        match self.run_checked(rb) {
            Ok(tensors) => {
                out.outputs = tensors
                    .into_iter()
                    .map(|t| agent_pb::Tensor {
                        datatype: t.datatype.as_str().into(),
                        shape: t.shape,
                        data: t.data,
                    })
                    .collect()
            }
            Err(e) => out.error = e.message,
        }
        let elapsed = t.elapsed();
        let slowdown = self.slowdown();
        if slowdown > 1.0 {
            std::thread::sleep(elapsed.mul_f64(slowdown - 1.0));
        }
        out.service_us = t.elapsed().as_secs_f64() * 1e6;
        if out.error.is_empty()
            && let Ok(mut l) = self.latency.lock()
        {
            let e = l.entry(key).or_insert(out.service_us);
            *e = 0.8 * *e + 0.2 * out.service_us;
        }
        out
    }

    fn run_checked(&self, rb: agent_pb::RunBatch) -> Result<Vec<RawTensor>> {
        let model = self
            .models
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&rb.model)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("model '{}' is not on this node", rb.model)))?;
        if rb.inputs.len() != model.inputs.len() {
            return Err(Error::invalid("wrong number of inputs"));
        }
        let mut rows = None;
        let mut inputs = Vec::with_capacity(rb.inputs.len());
        for (t, spec) in rb.inputs.into_iter().zip(&model.inputs) {
            let dt = DataType::parse(&t.datatype)?;
            if dt != spec.datatype
                || t.shape.len() != spec.shape.len()
                || t.shape[1..] != *spec.sample_shape()
            {
                return Err(Error::invalid(format!("input '{}' does not match the model", spec.name)));
            }
            if *rows.get_or_insert(t.shape[0]) != t.shape[0] || t.shape[0] < 1 {
                return Err(Error::invalid("inputs disagree on the batch size"));
            }
            if byte_size(dt, &t.shape)? != t.data.len() {
                return Err(Error::invalid(format!("input '{}' has the wrong byte size", spec.name)));
            }
            inputs.push(RawTensor::from_bytes(dt, t.shape, t.data)?);
        }
        let session = self.session(&model, &rb.variant)?;
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.run(&inputs)))
            .unwrap_or_else(|_| Err(Error::internal("the engine failed on this batch")))
    }
}
