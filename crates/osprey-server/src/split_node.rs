//! The agent's side of split inference: layer ranges loaded per epoch, run on the activations
//! a peer sends (`osprey.agent.v1.AgentPeer`), forwarded to the next range's agent, and the last
//! range's output returned to the gateway. Also the capacity profile: per unit compute time
//! and memory measured by running each unit here, and link latency and bandwidth to every peer
//! measured with real transfers.
//!
//! Nothing a peer sends is trusted: the epoch and boundary must name a range loaded here that
//! starts at that boundary, the shape must be `[1, seq, hidden]` and the byte lengths must match
//! before anything is converted. Peers present the cluster join token.
//!
//! What an agent received is counted per boundary unit (0: token ids) and reported in every
//! heartbeat, so that a test or an operator can check that an untrusted node never received
//! token ids or the activations of the pinned units.

use crate::agent_pb::{self, agent_message};
use osprey_core::error::{Error, Result};
use osprey_core::split::{SplitSpec, scan_splits};
use osprey_engine::split::{RangeInput, RangePlan, SplitGraph};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Peer calls give up after this long (a stalled peer fails the request, which the gateway
/// retries on a later epoch).
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// One loaded range of an epoch.
struct Held {
    plan: Arc<RangePlan>,
    /// The next range's agent; `None`: this is the last range.
    next: Option<String>,
}

pub struct SplitNode {
    specs: HashMap<String, SplitSpec>,
    graphs: Mutex<HashMap<String, Arc<SplitGraph>>>,
    held: Mutex<HashMap<(String, u64), Arc<Held>>>,
    peers: Mutex<HashMap<String, agent_pb::agent_peer_client::AgentPeerClient<Channel>>>,
    received: Mutex<BTreeMap<u32, u64>>,
    /// The current gateway session's outgoing stream.
    gateway: Mutex<Option<mpsc::Sender<agent_pb::AgentMessage>>>,
    workers: Arc<Semaphore>,
    token: String,
    /// Emulated slowdown factor (f64 bits): a range's run is stretched to this many times its
    /// compute. Changed at run time by `osprey agent`'s signal handlers (tests and demos).
    slowdown: AtomicU64,
    max_message_bytes: usize,
}

impl SplitNode {
    /// The split models of the repository whose weights are present.
    pub fn new(
        repository: &Path,
        workers: Arc<Semaphore>,
        token: String,
        slowdown: f64,
        max_message_bytes: usize,
    ) -> Result<Arc<SplitNode>> {
        let (specs, problems) = scan_splits(repository)?;
        for p in problems {
            tracing::warn!(model = %p.model, "skipping split model: {}", p.error);
        }
        let mut usable = HashMap::new();
        for s in specs {
            match s.missing() {
                Some(why) => tracing::info!(model = %s.name, "split model not offered: {why}"),
                None => {
                    usable.insert(s.name.clone(), s);
                }
            }
        }
        Ok(Arc::new(SplitNode {
            specs: usable,
            graphs: Mutex::default(),
            held: Mutex::default(),
            peers: Mutex::default(),
            received: Mutex::default(),
            gateway: Mutex::default(),
            workers,
            token,
            slowdown: AtomicU64::new(slowdown.max(1.0).to_bits()),
            max_message_bytes,
        }))
    }

    pub fn models(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    pub fn set_slowdown(&self, factor: f64) {
        self.slowdown.store(factor.max(1.0).to_bits(), Ordering::Relaxed);
        tracing::info!(factor, "emulated slowdown of layer ranges");
    }

    pub fn slowdown(&self) -> f64 {
        f64::from_bits(self.slowdown.load(Ordering::Relaxed))
    }

    pub fn attach(&self, tx: mpsc::Sender<agent_pb::AgentMessage>) {
        *self.gateway.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    pub fn received(&self) -> HashMap<u32, u64> {
        self.received.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn count(&self, boundary: u32) {
        *self.received.lock().unwrap_or_else(|e| e.into_inner()).entry(boundary).or_insert(0) += 1;
    }

    async fn to_gateway(&self, kind: agent_message::Kind) {
        let tx = self.gateway.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(tx) = tx {
            let _ = tx.send(agent_pb::AgentMessage { kind: Some(kind) }).await;
        }
    }

    fn graph(&self, model: &str) -> Result<Arc<SplitGraph>> {
        if let Some(g) = self.graphs.lock().unwrap_or_else(|e| e.into_inner()).get(model) {
            return Ok(g.clone());
        }
        let spec = self
            .specs
            .get(model)
            .ok_or_else(|| Error::not_found(format!("split model '{model}' is not on this node")))?;
        let g = Arc::new(SplitGraph::open(&spec.graph_path()?, &spec.boundaries, spec.seq_len, spec.hidden)?);
        self.graphs.lock().unwrap_or_else(|e| e.into_inner()).insert(model.to_string(), g.clone());
        Ok(g)
    }

    /// Builds a range for an epoch (blocking); returns the heap it added, KiB.
    fn load(&self, l: &agent_pb::LoadRange) -> Result<u64> {
        let graph = self.graph(&l.model)?;
        let before = crate::heap::live_bytes();
        let plan = Arc::new(graph.range(l.start as usize..l.end as usize)?);
        let kib =
            before.zip(crate::heap::live_bytes()).map_or(0, |(b, a)| (a.saturating_sub(b) / 1024).max(1));
        let next = (!l.next_addr.is_empty()).then(|| l.next_addr.clone());
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((l.model.clone(), l.epoch), Arc::new(Held { plan, next }));
        Ok(kib as u64)
    }

    pub fn handle_load(self: &Arc<Self>, l: agent_pb::LoadRange) {
        let me = self.clone();
        tokio::spawn(async move {
            let (m2, l2) = (me.clone(), l.clone());
            let res = tokio::task::spawn_blocking(move || m2.load(&l2))
                .await
                .unwrap_or_else(|_| Err(Error::internal("loading a range panicked")));
            let (memory_kib, error) = match res {
                Ok(k) => (k, String::new()),
                Err(e) => (0, e.message),
            };
            tracing::info!(model = %l.model, epoch = l.epoch, start = l.start, end = l.end, next = %l.next_addr, %error, "range loaded");
            me.to_gateway(agent_message::Kind::RangeLoaded(agent_pb::RangeLoaded {
                model: l.model,
                epoch: l.epoch,
                error,
                memory_kib,
            }))
            .await;
        });
    }

    pub fn handle_unload(&self, u: agent_pb::UnloadRange) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&(u.model.clone(), u.epoch));
        tracing::info!(model = %u.model, epoch = u.epoch, "range unloaded");
    }

    fn held(&self, model: &str, epoch: u64) -> Option<Arc<Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).get(&(model.to_string(), epoch)).cloned()
    }

    /// The first range's input, from the gateway.
    pub fn handle_run(self: &Arc<Self>, r: agent_pb::RunRange) {
        self.count(0);
        let me = self.clone();
        tokio::spawn(async move {
            let fail = |e: String| agent_pb::SplitResult {
                request_id: r.request_id,
                epoch: r.epoch,
                error: e,
                model: r.model.clone(),
                ..Default::default()
            };
            let Some(held) = me.held(&r.model, r.epoch).filter(|h| h.plan.range().start == 0) else {
                let msg = format!("no first range of '{}' for epoch {} here", r.model, r.epoch);
                return me.to_gateway(agent_message::Kind::SplitResult(fail(msg))).await;
            };
            let (Some(ids), Some(mask)) = (le_i64(&r.ids), le_i64(&r.mask)) else {
                return me
                    .to_gateway(agent_message::Kind::SplitResult(fail("token inputs are malformed".into())))
                    .await;
            };
            let step = Step {
                request_id: r.request_id,
                model: r.model,
                epoch: r.epoch,
                stage_us: vec![],
                link_us: vec![],
            };
            me.run_and_pass(held, step, Input::Tokens(ids), mask).await;
        });
    }

    /// A peer's activation (validated), run and passed on.
    fn accept(self: &Arc<Self>, a: agent_pb::Activation) -> std::result::Result<(), Status> {
        let held = self.held(&a.model, a.epoch).ok_or_else(|| {
            Status::failed_precondition(format!("no range of '{}' for epoch {}", a.model, a.epoch))
        })?;
        if held.plan.range().start != a.boundary as usize || a.boundary == 0 {
            return Err(Status::invalid_argument(format!(
                "the range here starts at unit {}, not {}",
                held.plan.range().start,
                a.boundary
            )));
        }
        let (seq, width) = held.plan.dims();
        if a.shape != [1, seq as i64, width as i64]
            || a.hidden.len() != seq * width * 4
            || a.mask.len() != seq * 8
        {
            return Err(Status::invalid_argument(format!(
                "activation shape {:?} with {} + {} bytes does not match the range",
                a.shape,
                a.hidden.len(),
                a.mask.len()
            )));
        }
        self.count(a.boundary);
        let hidden: Vec<f32> =
            a.hidden.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let Some(mask) = le_i64(&a.mask) else { return Err(Status::invalid_argument("malformed mask")) };
        let me = self.clone();
        let step = Step {
            request_id: a.request_id,
            model: a.model,
            epoch: a.epoch,
            stage_us: a.stage_us,
            link_us: a.link_us,
        };
        tokio::spawn(async move { me.run_and_pass(held, step, Input::Hidden(hidden), mask).await });
        Ok(())
    }

    async fn run_and_pass(self: Arc<Self>, held: Arc<Held>, mut step: Step, input: Input, mask: Vec<i64>) {
        let report = |step: &Step, error: String| agent_pb::SplitResult {
            request_id: step.request_id,
            epoch: step.epoch,
            error,
            model: step.model.clone(),
            ..Default::default()
        };
        let Ok(_permit) = self.workers.clone().acquire_owned().await else { return };
        let (plan, slow) = (held.plan.clone(), self.slowdown());
        let mask2 = mask.clone();
        let ran = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let out = match &input {
                Input::Tokens(ids) => plan.run(RangeInput::Tokens { ids, mask: &mask2 }),
                Input::Hidden(h) => plan.run(RangeInput::Hidden { hidden: h, mask: &mask2 }),
            };
            if slow > 1.0 {
                std::thread::sleep(t.elapsed().mul_f64(slow - 1.0));
            }
            out.map(|o| (o, t.elapsed().as_secs_f64() * 1e6))
        })
        .await
        .unwrap_or_else(|_| Err(Error::internal("the engine failed on this range")));
        drop(_permit);
        let (hidden, us) = match ran {
            Ok(r) => r,
            Err(e) => {
                return self.to_gateway(agent_message::Kind::SplitResult(report(&step, e.message))).await;
            }
        };
        step.stage_us.push(us);
        let seq = mask.len() as i64;
        let width = hidden.len() as i64 / seq.max(1);
        let hidden_bytes: Vec<u8> = hidden.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mask_bytes: Vec<u8> = mask.iter().flat_map(|x| x.to_le_bytes()).collect();
        match &held.next {
            None => {
                let done = agent_pb::SplitResult {
                    request_id: step.request_id,
                    epoch: step.epoch,
                    error: String::new(),
                    shape: vec![1, seq, width],
                    hidden: hidden_bytes,
                    stage_us: step.stage_us,
                    link_us: step.link_us,
                    model: step.model.clone(),
                };
                self.to_gateway(agent_message::Kind::SplitResult(done)).await;
            }
            Some(addr) => {
                let t = Instant::now();
                let act = agent_pb::Activation {
                    request_id: step.request_id,
                    model: step.model.clone(),
                    epoch: step.epoch,
                    boundary: held.plan.range().end as u32,
                    shape: vec![1, seq, width],
                    hidden: hidden_bytes,
                    mask: mask_bytes,
                    stage_us: step.stage_us.clone(),
                    link_us: step.link_us.clone(),
                };
                if let Err(e) = self.forward(addr, act).await {
                    let msg = format!("forwarding to {addr} failed: {e}");
                    tracing::warn!(request = step.request_id, "{msg}");
                    return self.to_gateway(agent_message::Kind::SplitResult(report(&step, msg))).await;
                }
                tracing::trace!(us = t.elapsed().as_secs_f64() * 1e6, "forwarded");
            }
        }
    }

    async fn client(&self, addr: &str) -> Result<agent_pb::agent_peer_client::AgentPeerClient<Channel>> {
        if let Some(c) = self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(addr) {
            return Ok(c.clone());
        }
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::invalid(format!("peer {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(PEER_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let c = agent_pb::agent_peer_client::AgentPeerClient::new(ch)
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes);
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn with_token<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(self.token.as_str()) {
            r.metadata_mut().insert(crate::join::METADATA_KEY, v);
        }
        r
    }

    async fn forward(&self, addr: &str, act: agent_pb::Activation) -> std::result::Result<(), String> {
        let mut c = self.client(addr).await.map_err(|e| e.message)?;
        c.forward(self.with_token(act)).await.map(|_| ()).map_err(|s| s.message().to_string())
    }

    /// Measures what the gateway asked: per unit compute and memory, and links to peers.
    pub fn handle_profile(self: &Arc<Self>, p: agent_pb::ProfileSplit) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut out = agent_pb::SplitProfile { model: p.model.clone(), ..Default::default() };
            if p.units {
                let m2 = me.clone();
                let model = p.model.clone();
                match tokio::task::spawn_blocking(move || m2.profile_units(&model)).await {
                    Ok(Ok((us, kib))) => {
                        out.unit_us = us;
                        out.unit_memory_kib = kib;
                    }
                    Ok(Err(e)) => out.error = e.message,
                    Err(_) => out.error = "profiling panicked".into(),
                }
            }
            for peer in p.peers {
                match me.probe(&peer).await {
                    Ok((latency_us, bytes_per_us)) => {
                        out.links.push(agent_pb::LinkFigure { peer, latency_us, bytes_per_us })
                    }
                    Err(e) => tracing::warn!(%peer, "link probe failed: {e}"),
                }
            }
            me.to_gateway(agent_message::Kind::SplitProfile(out)).await;
        });
    }

    /// Each unit built alone and run here (batch 1): median of 5 runs after one warm-up, with
    /// the emulated slowdown applied as in serving; the heap each unit's plan added.
    fn profile_units(&self, model: &str) -> Result<(Vec<f64>, Vec<u64>)> {
        let graph = self.graph(model)?;
        let (seq, width) = (graph.seq_len(), graph.hidden());
        let mut ids = vec![0i64; seq];
        let mut mask = vec![0i64; seq];
        for (i, id) in [101i64, 7592, 2088, 102].iter().enumerate().take(seq) {
            ids[i] = *id;
            mask[i] = 1;
        }
        let mut hidden = vec![0.0f32; seq * width];
        let (mut us, mut kib) = (Vec::new(), Vec::new());
        for u in 0..graph.units() {
            let before = crate::heap::live_bytes();
            let plan = graph.range(u..u + 1)?;
            kib.push(
                before.zip(crate::heap::live_bytes()).map_or(0, |(b, a)| (a.saturating_sub(b) / 1024).max(1))
                    as u64,
            );
            let run = |h: &[f32]| {
                if u == 0 {
                    plan.run(RangeInput::Tokens { ids: &ids, mask: &mask })
                } else {
                    plan.run(RangeInput::Hidden { hidden: h, mask: &mask })
                }
            };
            let out = run(&hidden)?;
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                run(&hidden)?;
                times.push(t.elapsed().as_secs_f64() * 1e6 * self.slowdown());
            }
            times.sort_by(f64::total_cmp);
            us.push(times[2]);
            hidden = out;
        }
        Ok((us, kib))
    }

    /// One-way latency (half the smallest round trip of a tiny payload) and bandwidth (a
    /// 1 MiB payload's round trip beyond that), over the same kind of connection as
    /// activations.
    async fn probe(&self, addr: &str) -> std::result::Result<(f64, f64), String> {
        let mut c = self.client(addr).await.map_err(|e| e.message)?;
        let mut rtt = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            c.probe(self.with_token(agent_pb::ProbeData { payload: vec![0; 64] }))
                .await
                .map_err(|s| s.message().to_string())?;
            rtt = rtt.min(t.elapsed().as_secs_f64() * 1e6);
        }
        let big = 1usize << 20;
        let mut bulk = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            c.probe(self.with_token(agent_pb::ProbeData { payload: vec![0; big] }))
                .await
                .map_err(|s| s.message().to_string())?;
            bulk = bulk.min(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok((rtt / 2.0, big as f64 / (bulk - rtt).max(1.0)))
    }
}

struct Step {
    request_id: u64,
    model: String,
    epoch: u64,
    stage_us: Vec<f64>,
    link_us: Vec<f64>,
}

enum Input {
    Tokens(Vec<i64>),
    Hidden(Vec<f32>),
}

fn le_i64(b: &[u8]) -> Option<Vec<i64>> {
    b.len()
        .is_multiple_of(8)
        .then(|| b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect())
}

/// `osprey.agent.v1.AgentPeer`, served on the agent's peer address.
pub struct PeerService {
    pub node: Arc<SplitNode>,
    pub token: crate::join::JoinToken,
}

impl PeerService {
    fn check(&self, metadata: &tonic::metadata::MetadataMap) -> std::result::Result<(), Status> {
        let presented = metadata.get(crate::join::METADATA_KEY).and_then(|v| v.to_str().ok());
        if self.token.verify(presented) {
            Ok(())
        } else {
            Err(Status::unauthenticated("peers present the cluster join token"))
        }
    }
}

#[tonic::async_trait]
impl agent_pb::agent_peer_server::AgentPeer for PeerService {
    async fn forward(
        &self,
        r: Request<agent_pb::Activation>,
    ) -> std::result::Result<Response<agent_pb::ForwardAck>, Status> {
        self.check(r.metadata())?;
        self.node.accept(r.into_inner())?;
        Ok(Response::new(agent_pb::ForwardAck {}))
    }

    async fn probe(
        &self,
        r: Request<agent_pb::ProbeData>,
    ) -> std::result::Result<Response<agent_pb::ProbeAck>, Status> {
        self.check(r.metadata())?;
        Ok(Response::new(agent_pb::ProbeAck { received: r.into_inner().payload.len() as u64 }))
    }
}

/// Serves the peer service on `listener` until the process ends.
pub fn serve_peers(
    node: Arc<SplitNode>,
    token: crate::join::JoinToken,
    listener: tokio::net::TcpListener,
    max_message_bytes: usize,
) {
    let svc = agent_pb::agent_peer_server::AgentPeerServer::new(PeerService { node, token })
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(async move {
        if let Err(e) =
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await
        {
            tracing::error!("peer service stopped: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a peer sends is checked before anything is converted: unknown epoch, wrong
    /// boundary, wrong shape or byte lengths are refused with the reason.
    #[test]
    fn malformed_activations_are_refused_before_conversion() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let node = SplitNode::new(&repo, Arc::new(Semaphore::new(1)), "t".into(), 1.0, 1 << 20).unwrap();
        assert!(node.models().contains(&"minilm".to_string()), "run scripts/fetch_minilm.py");
        let load = agent_pb::LoadRange {
            model: "minilm".into(),
            epoch: 1,
            start: 2,
            end: 4,
            next_addr: String::new(),
        };
        node.load(&load).unwrap();
        let good = agent_pb::Activation {
            request_id: 1,
            model: "minilm".into(),
            epoch: 1,
            boundary: 2,
            shape: vec![1, 32, 384],
            hidden: vec![0; 32 * 384 * 4],
            mask: vec![0; 32 * 8],
            stage_us: vec![],
            link_us: vec![],
        };
        let refused = |a: agent_pb::Activation| node.accept(a).unwrap_err();
        assert_eq!(
            refused(agent_pb::Activation { epoch: 2, ..good.clone() }).code(),
            tonic::Code::FailedPrecondition
        );
        assert!(
            refused(agent_pb::Activation { boundary: 3, ..good.clone() })
                .message()
                .contains("starts at unit 2")
        );
        assert!(
            refused(agent_pb::Activation { boundary: 0, ..good.clone() })
                .message()
                .contains("starts at unit 2")
        );
        let bad_shapes = [
            agent_pb::Activation { shape: vec![1, 16, 768], ..good.clone() },
            agent_pb::Activation { hidden: vec![0; 7], ..good.clone() },
            agent_pb::Activation { mask: vec![0; 16 * 8], ..good.clone() },
            agent_pb::Activation { shape: vec![i64::MAX, 32, 384], ..good.clone() },
        ];
        for a in bad_shapes {
            assert_eq!(refused(a).code(), tonic::Code::InvalidArgument);
        }
        assert!(node.received().is_empty(), "nothing refused is counted as received");
    }
}
