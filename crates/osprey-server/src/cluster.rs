//! The cluster as the gateway sees it: in-process agents and remote agents (one
//! `osprey agent` process per node, attached over `osprey.agent.v1.AgentGateway` on the
//! gateway's gRPC port), membership with failure detection, instance selection per batch and
//! failover.
//!
//! ```text
//! agent ──Attach(stream)──> gateway: Register, then Heartbeat every HEARTBEAT, BatchResult
//! gateway ──────────────> agent:  Welcome, RunBatch
//! no heartbeat for DEAD_AFTER, or the stream ends  =>  node down:
//!     each batch in flight there is re-dispatched to another instance if some member's
//!     deadline still allows, otherwise its members get an explicit UNAVAILABLE; never silence,
//!     never a duplicate answer (a batch id is answered at most once).
//! a batch unanswered BATCH_TIMEOUT after its deadline counts as a failure of that node.
//! ```
//!
//! Instance selection is `osprey_policy::instance::select` (predicted completion, observed
//! slowdown, failure history); this module only keeps the views it reads up to date.
//!
//! Placement: when an agent joins, the gateway asks it to load the variants of the models it
//! has, cheapest in memory first, while their declared `memory_mb` fits the memory the agent
//! offers. A variant receives batches on a node only after the node reports it `Loaded`.
//! `unload` is refused unless another instance hosts the variant (load before unload), stops
//! dispatching there first, and sends `UnloadVariant` once that node has no batch of it in
//! flight, so no request meets a missing variant.

use crate::agent::{Job, LocalAgent, Member, Observation, deliver, fail_all};
use crate::agent_pb::{self, agent_message, gateway_message};
use crate::gateway::ModelEntry;
use crate::metrics::Metrics;
use osprey_core::error::{Error, Result};
use osprey_core::tensor::{DataType, RawTensor, byte_size};
use osprey_engine::batch;
use osprey_policy::instance::{InstanceView, Selector, select};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// How often agents report.
pub const HEARTBEAT: Duration = Duration::from_millis(200);
/// Missed heartbeats for this long mark a node down.
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// A batch still unanswered this long after dispatch counts as failed on its node.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Protocol version this gateway speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest tensor an agent may return, bytes (checked before allocation).
const MAX_TENSOR_BYTES: usize = 256 << 20;

/// Observed behaviour of one node, for instance selection.
#[derive(Debug, Clone)]
struct Health {
    slowdown: f64,
    mean_service_us: f64,
    failures: u32,
    successes: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health { slowdown: 1.0, mean_service_us: 0.0, failures: 0, successes: 0 }
    }
}

impl Health {
    fn success(&mut self, observed_us: f64, predicted_us: f64) {
        if predicted_us > 0.0 {
            self.slowdown = 0.8 * self.slowdown + 0.2 * (observed_us / predicted_us).clamp(0.1, 50.0);
        }
        self.mean_service_us = if self.mean_service_us == 0.0 {
            observed_us
        } else {
            0.8 * self.mean_service_us + 0.2 * observed_us
        };
        self.successes += 1;
        self.decay();
    }
    fn failure(&mut self) {
        self.failures += 1;
        self.decay();
    }
    fn decay(&mut self) {
        if self.failures + self.successes > 20 {
            self.failures /= 2;
            self.successes /= 2;
        }
    }
}

type VariantKey = (String, String);

struct RemoteBatch {
    model: Arc<ModelEntry>,
    variant: usize,
    members: Vec<Member>,
    dispatched: Instant,
    predicted_us: f64,
    feedback: Option<mpsc::UnboundedSender<Observation>>,
}

/// A node agent attached over gRPC.
pub struct RemoteAgent {
    pub id: String,
    pub name: String,
    pub threads: u32,
    pub labels: HashMap<String, String>,
    speed: f64,
    tx: mpsc::Sender<std::result::Result<agent_pb::GatewayMessage, Status>>,
    alive: AtomicBool,
    busy: AtomicU32,
    last_seen: Mutex<Instant>,
    inflight: Mutex<HashMap<u64, RemoteBatch>>,
    health: Mutex<Health>,
    reported_busy: AtomicU32,
    memory_mb: u64,
    cores: u32,
    cpu_load: Mutex<f64>,
    /// What the node reports of its own service times ("model/variant/batch" -> µs).
    reported_latency: Mutex<HashMap<String, f64>>,
    models: Vec<String>,
    /// Variants loaded and ready on this node.
    hosted: Mutex<HashSet<VariantKey>>,
    /// Variants asked to load and not yet confirmed.
    loading: Mutex<HashSet<VariantKey>>,
}

impl RemoteAgent {
    fn hosts(&self, model: &str, variant: &str) -> bool {
        self.hosted.lock().map(|h| h.contains(&(model.to_string(), variant.to_string()))).unwrap_or(false)
    }

    fn send(&self, kind: gateway_message::Kind) -> bool {
        self.tx.try_send(Ok(agent_pb::GatewayMessage { kind: Some(kind) })).is_ok()
    }
}

/// The outcome of looking for an instance.
pub enum Take {
    Slot(Slot),
    /// Instances host the variant but none has a free worker now.
    Busy,
    /// No live instance hosts the variant.
    NoHost,
}

/// One free execution slot chosen for a batch.
pub enum Slot {
    Local(usize, tokio::sync::OwnedSemaphorePermit),
    Remote(Arc<RemoteAgent>),
}

/// What `osprey status` shows of a node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub kind: &'static str,
    pub up: bool,
    pub workers: u32,
    pub busy: u32,
    pub slowdown: f64,
    pub mean_service_ms: f64,
    pub recent_failures: u32,
    pub labels: HashMap<String, String>,
    /// `model/variant` loaded on the node (`*` = every served variant).
    pub instances: Vec<String>,
    pub memory_mb: u64,
    pub cores: u32,
    pub cpu_load: f64,
    /// The node's own recent service times per "model/variant/batch", ms.
    pub latency_ms: std::collections::BTreeMap<String, f64>,
}

/// Every agent the gateway can dispatch to.
pub struct Pool {
    local: Vec<(Arc<LocalAgent>, Mutex<Health>)>,
    remote: Mutex<Vec<Arc<RemoteAgent>>>,
    pub changed: Arc<Notify>,
    selector: Selector,
    turn: Mutex<usize>,
    next_batch: AtomicU64,
    next_agent: AtomicU64,
    metrics: Arc<Metrics>,
    models: Mutex<Vec<Arc<ModelEntry>>>,
}

impl Pool {
    pub fn new(
        local: Vec<Arc<LocalAgent>>,
        changed: Arc<Notify>,
        selector: Selector,
        metrics: Arc<Metrics>,
    ) -> Pool {
        Pool {
            local: local.into_iter().map(|a| (a, Mutex::new(Health::default()))).collect(),
            remote: Mutex::new(Vec::new()),
            changed,
            selector,
            turn: Mutex::new(0),
            next_batch: AtomicU64::new(1),
            next_agent: AtomicU64::new(1),
            metrics,
            models: Mutex::new(Vec::new()),
        }
    }

    /// The served models (placement reads their variants' memory needs).
    pub fn set_models(&self, models: Vec<Arc<ModelEntry>>) {
        if let Ok(mut m) = self.models.lock() {
            *m = models;
        }
    }

    /// Which variants of `model` some live instance hosts now.
    pub fn available(&self, model: &ModelEntry) -> Vec<bool> {
        if !self.local.is_empty() {
            return vec![true; model.variants.len()];
        }
        let remotes = self.remotes();
        model
            .variants
            .iter()
            .map(|v| {
                remotes.iter().any(|r| r.alive.load(Ordering::Relaxed) && r.hosts(model.name(), &v.spec.name))
            })
            .collect()
    }

    /// Asks `r` to load what fits its memory, cheapest variants first.
    fn place(&self, r: &Arc<RemoteAgent>) {
        let models = self.models.lock().map(|m| m.clone()).unwrap_or_default();
        // Cheapest in memory first; ties in model order, then in the model's variant order.
        let mut wanted: Vec<(u64, String, usize, String)> = models
            .iter()
            .filter(|m| r.models.iter().any(|n| n == m.name()))
            .flat_map(|m| {
                m.variants.iter().enumerate().map(move |(i, v)| {
                    (u64::from(v.spec.memory_mb), m.name().to_string(), i, v.spec.name.clone())
                })
            })
            .collect();
        wanted.sort();
        let mut used = 0u64;
        for (mb, model, _, variant) in wanted {
            if used + mb > r.memory_mb {
                tracing::info!(node = %r.name, %model, %variant, "not placed: needs {mb} MB, {} MB left", r.memory_mb - used);
                continue;
            }
            used += mb;
            if let Ok(mut l) = r.loading.lock() {
                l.insert((model.clone(), variant.clone()));
            }
            r.send(gateway_message::Kind::Load(agent_pb::LoadVariant { model, variant }));
        }
    }

    fn remote_by_name(&self, node: &str) -> Result<Arc<RemoteAgent>> {
        self.remotes()
            .into_iter()
            .find(|r| r.name == node && r.alive.load(Ordering::Relaxed))
            .ok_or_else(|| Error::not_found(format!("no live remote node '{node}'")))
    }

    /// Loads a variant on a node (checked against the node's memory).
    pub fn load(&self, node: &str, model: &str, variant: &str) -> Result<()> {
        let r = self.remote_by_name(node)?;
        let models = self.models.lock().map(|m| m.clone()).unwrap_or_default();
        let entry = models
            .iter()
            .find(|m| m.name() == model)
            .ok_or_else(|| Error::not_found(format!("unknown model '{model}'")))?;
        let need = u64::from(
            entry
                .variants
                .iter()
                .find(|v| v.spec.name == variant)
                .ok_or_else(|| Error::not_found(format!("unknown variant '{variant}'")))?
                .spec
                .memory_mb,
        );
        let used: u64 = r
            .hosted
            .lock()
            .map(|h| {
                h.iter()
                    .filter_map(|(m, v)| {
                        models
                            .iter()
                            .find(|e| e.name() == m)
                            .and_then(|e| e.variants.iter().find(|x| &x.spec.name == v))
                    })
                    .map(|v| u64::from(v.spec.memory_mb))
                    .sum()
            })
            .unwrap_or(0);
        if used + need > r.memory_mb {
            return Err(Error::new(
                osprey_core::ErrorCode::ResourceExhausted,
                format!(
                    "node '{node}' has {} MB free, {model}/{variant} needs {need} MB",
                    r.memory_mb.saturating_sub(used)
                ),
            ));
        }
        if let Ok(mut l) = r.loading.lock() {
            l.insert((model.to_string(), variant.to_string()));
        }
        r.send(gateway_message::Kind::Load(agent_pb::LoadVariant {
            model: model.into(),
            variant: variant.into(),
        }));
        Ok(())
    }

    /// Unloads a variant from a node once another instance hosts it (load before unload).
    pub fn unload(self: &Arc<Self>, node: &str, model: &str, variant: &str) -> Result<()> {
        let r = self.remote_by_name(node)?;
        if !r.hosts(model, variant) {
            return Err(Error::not_found(format!("node '{node}' does not host {model}/{variant}")));
        }
        let elsewhere = !self.local.is_empty()
            || self
                .remotes()
                .iter()
                .any(|o| !Arc::ptr_eq(o, &r) && o.alive.load(Ordering::Relaxed) && o.hosts(model, variant));
        if !elsewhere {
            return Err(Error::new(
                osprey_core::ErrorCode::Unavailable,
                format!(
                    "{model}/{variant} is hosted only on '{node}': load it on another node before unloading it"
                ),
            ));
        }
        if let Ok(mut h) = r.hosted.lock() {
            h.remove(&(model.to_string(), variant.to_string()));
        }
        let (model, variant) = (model.to_string(), variant.to_string());
        tokio::spawn(async move {
            // Batches already sent there finish first.
            let deadline = Instant::now() + BATCH_TIMEOUT;
            while Instant::now() < deadline {
                let busy = r
                    .inflight
                    .lock()
                    .map(|f| {
                        f.values().any(|b| {
                            b.model.name() == model && b.model.variants[b.variant].spec.name == variant
                        })
                    })
                    .unwrap_or(false);
                if !busy {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r.send(gateway_message::Kind::Unload(agent_pb::UnloadVariant { model, variant }));
        });
        Ok(())
    }

    fn remotes(&self) -> Vec<Arc<RemoteAgent>> {
        self.remote.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Whether any live instance has a free worker.
    pub fn has_free(&self) -> bool {
        self.local.iter().any(|(a, _)| a.free() > 0)
            || self
                .remotes()
                .iter()
                .any(|r| r.alive.load(Ordering::Relaxed) && r.busy.load(Ordering::Relaxed) < r.threads)
    }

    /// Waits until some instance has a free worker.
    pub async fn wait_free(&self) {
        loop {
            let notified = self.changed.notified();
            if self.has_free() {
                return;
            }
            // Also wake periodically: a remote node may come back without a batch finishing.
            let _ = tokio::time::timeout(HEARTBEAT, notified).await;
        }
    }

    pub fn local_agents(&self) -> impl Iterator<Item = &Arc<LocalAgent>> {
        self.local.iter().map(|(a, _)| a)
    }

    /// Chooses a free instance hosting `variant` of `model` for a batch whose profiled service
    /// time is `latency_us`.
    pub fn take(&self, model: &ModelEntry, variant: usize, latency_us: f64) -> Take {
        let vname = &model.variants[variant].spec.name;
        let hosted = !self.local.is_empty()
            || self.remotes().iter().any(|r| r.alive.load(Ordering::Relaxed) && r.hosts(model.name(), vname));
        if !hosted {
            return Take::NoHost;
        }
        match self.take_hosting(model.name(), vname, latency_us) {
            Some(s) => Take::Slot(s),
            None => Take::Busy,
        }
    }

    fn take_hosting(&self, model: &str, variant: &str, latency_us: f64) -> Option<Slot> {
        let remotes = self.remotes();
        let mut views = Vec::with_capacity(self.local.len() + remotes.len());
        for (a, h) in &self.local {
            let h = h.lock().map(|h| h.clone()).unwrap_or_default();
            let free = a.free() as u32;
            views.push(InstanceView {
                up: free > 0,
                speed: 1.0,
                slowdown: h.slowdown,
                workers: a.workers(),
                busy: a.workers().saturating_sub(free),
                mean_service_us: h.mean_service_us,
                recent_failures: h.failures,
                recent_successes: h.successes,
            });
        }
        for r in &remotes {
            let h = r.health.lock().map(|h| h.clone()).unwrap_or_default();
            let busy = r.busy.load(Ordering::Relaxed);
            views.push(InstanceView {
                up: r.alive.load(Ordering::Relaxed) && busy < r.threads && r.hosts(model, variant),
                speed: r.speed,
                slowdown: h.slowdown,
                workers: r.threads,
                busy,
                mean_service_us: h.mean_service_us,
                recent_failures: h.failures,
                recent_successes: h.successes,
            });
        }
        let i = {
            let mut turn = self.turn.lock().ok()?;
            select(self.selector, &views, latency_us, &mut turn)?
        };
        if i < self.local.len() {
            let permit = self.local[i].0.try_acquire()?;
            Some(Slot::Local(i, permit))
        } else {
            let r = remotes.get(i - self.local.len())?.clone();
            r.busy.fetch_add(1, Ordering::Relaxed);
            Some(Slot::Remote(r))
        }
    }

    /// Runs a batch on `slot`; the members are answered exactly once.
    pub fn dispatch(self: &Arc<Self>, slot: Slot, mut job: Job, predicted_us: f64) {
        match slot {
            Slot::Local(i, permit) => {
                job.permit = Some(permit);
                job.health = Some((self.clone(), i, predicted_us));
                self.local[i].0.submit(job);
            }
            Slot::Remote(r) => self.send_remote(r, job, predicted_us),
        }
    }

    pub(crate) fn local_done(&self, i: usize, ok: bool, observed_us: f64, predicted_us: f64) {
        if let Some((_, h)) = self.local.get(i)
            && let Ok(mut h) = h.lock()
        {
            if ok {
                h.success(observed_us, predicted_us);
            } else {
                h.failure();
            }
        }
    }

    fn send_remote(self: &Arc<Self>, r: Arc<RemoteAgent>, job: Job, predicted_us: f64) {
        let id = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let inputs = match concat_inputs(&job.model, &job.members) {
            Ok(t) => t,
            Err(e) => {
                r.busy.fetch_sub(1, Ordering::Relaxed);
                fail_all(job.members, e);
                return;
            }
        };
        let msg = agent_pb::GatewayMessage {
            kind: Some(gateway_message::Kind::Run(agent_pb::RunBatch {
                batch_id: id,
                model: job.model.name().to_string(),
                variant: job.model.variants[job.variant].spec.name.clone(),
                inputs: inputs
                    .into_iter()
                    .map(|t| agent_pb::Tensor {
                        datatype: t.datatype.as_str().into(),
                        shape: t.shape,
                        data: t.data,
                    })
                    .collect(),
            })),
        };
        if let Ok(mut f) = r.inflight.lock() {
            f.insert(
                id,
                RemoteBatch {
                    model: job.model,
                    variant: job.variant,
                    members: job.members,
                    dispatched: job.dispatched,
                    predicted_us,
                    feedback: job.feedback,
                },
            );
        }
        if r.tx.try_send(Ok(msg)).is_err() {
            // The stream is gone or saturated: treat it as this node failing the batch.
            self.fail_batch(&r, id, "its connection is closed");
        }
    }

    /// A remote batch failed on `r`: retry it elsewhere if time allows, else fail it.
    fn fail_batch(self: &Arc<Self>, r: &Arc<RemoteAgent>, id: u64, why: &str) {
        let Some(b) = r.inflight.lock().ok().and_then(|mut f| f.remove(&id)) else { return };
        r.busy.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut h) = r.health.lock() {
            h.failure();
        }
        self.changed.notify_waiters();
        self.retry(b, &format!("node '{}' failed: {why}", r.name));
    }

    /// Re-dispatches a failed node's batch on another instance hosting the variant, waiting for
    /// a free worker while the earliest member's deadline still allows; requests that can no
    /// longer finish in time are answered UNAVAILABLE at once (the bounded retry: one).
    fn retry(self: &Arc<Self>, b: RemoteBatch, why: &str) {
        let pool = self.clone();
        let why = why.to_string();
        tokio::spawn(async move {
            let service = Duration::from_micros(b.predicted_us as u64);
            let now = Instant::now();
            let (keep, late): (Vec<Member>, Vec<Member>) =
                b.members.into_iter().partition(|m| now + service <= m.deadline);
            fail_all(late, Error::unavailable(format!("{why}; no time left to retry")));
            let Some(latest_start) =
                keep.iter().map(|m| m.deadline).min().and_then(|d| d.checked_sub(service))
            else {
                fail_all(keep, Error::unavailable(format!("{why}; no time left to retry")));
                return;
            };
            loop {
                match pool.take(&b.model, b.variant, b.predicted_us) {
                    Take::Slot(slot) => {
                        tracing::info!("{why}; retrying {} request(s) on another instance", keep.len());
                        let job = Job {
                            model: b.model,
                            variant: b.variant,
                            members: keep,
                            dispatched: Instant::now(),
                            permit: None,
                            feedback: b.feedback,
                            health: None,
                        };
                        pool.dispatch(slot, job, b.predicted_us);
                        return;
                    }
                    Take::NoHost => {
                        fail_all(keep, Error::unavailable(format!("{why}; no other node hosts the variant")));
                        return;
                    }
                    Take::Busy => {
                        let left = latest_start.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            fail_all(
                                keep,
                                Error::unavailable(format!("{why}; no other instance was free in time")),
                            );
                            return;
                        }
                        let notified = pool.changed.notified();
                        let _ = tokio::time::timeout(left.min(HEARTBEAT), notified).await;
                    }
                }
            }
        });
    }

    fn finish_remote(self: &Arc<Self>, r: &Arc<RemoteAgent>, res: agent_pb::BatchResult) {
        let Some(b) = r.inflight.lock().ok().and_then(|mut f| f.remove(&res.batch_id)) else {
            return; // unknown or already answered: never a duplicate answer
        };
        r.busy.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        if !res.error.is_empty() {
            if let Ok(mut h) = r.health.lock() {
                h.failure();
            }
            fail_all(b.members, Error::internal(format!("node '{}': {}", r.name, res.error)));
            return;
        }
        let result = split_outputs(&b.model, &b.members, res.outputs);
        let observed = b.dispatched.elapsed().as_secs_f64() * 1e6;
        if let Ok(mut h) = r.health.lock() {
            if result.is_ok() {
                h.success(observed, b.predicted_us / r.speed.max(1e-6));
            } else {
                h.failure();
            }
        }
        let t = Duration::from_micros(res.service_us.max(0.0) as u64);
        let executed = result.map(|per| (per, Duration::ZERO, t, Duration::ZERO));
        deliver(
            &b.model,
            b.variant,
            &r.name,
            b.members,
            executed,
            b.dispatched,
            b.feedback.as_ref(),
            &self.metrics,
        );
    }

    /// Marks a node down and fails over everything in flight there.
    fn node_down(self: &Arc<Self>, r: &Arc<RemoteAgent>, why: &str) {
        if !r.alive.swap(false, Ordering::Relaxed) {
            return;
        }
        tracing::warn!(node = %r.name, "node down: {why}");
        let ids: Vec<u64> = r.inflight.lock().map(|f| f.keys().copied().collect()).unwrap_or_default();
        for id in ids {
            self.fail_batch(r, id, why);
        }
        if let Ok(mut v) = self.remote.lock() {
            v.retain(|x| !Arc::ptr_eq(x, r));
        }
        self.changed.notify_waiters();
    }

    /// Failure detection: missed heartbeats and batches far past their time.
    pub async fn watch(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            for r in self.remotes() {
                let silent = r.last_seen.lock().map(|t| t.elapsed() > DEAD_AFTER).unwrap_or(true);
                if silent {
                    self.node_down(&r, "missed heartbeats");
                    continue;
                }
                let stale: Vec<u64> = r
                    .inflight
                    .lock()
                    .map(|f| {
                        f.iter()
                            .filter(|(_, b)| b.dispatched.elapsed() > BATCH_TIMEOUT)
                            .map(|(id, _)| *id)
                            .collect()
                    })
                    .unwrap_or_default();
                for id in stale {
                    self.fail_batch(&r, id, "a batch timed out");
                }
            }
        }
    }

    /// Nodes for `osprey status`.
    pub fn status(&self) -> Vec<NodeStatus> {
        let mut out = Vec::new();
        for (a, h) in &self.local {
            let h = h.lock().map(|h| h.clone()).unwrap_or_default();
            out.push(NodeStatus {
                name: a.name().to_string(),
                kind: "local",
                up: true,
                workers: a.workers(),
                busy: a.workers().saturating_sub(a.free() as u32),
                slowdown: h.slowdown,
                mean_service_ms: h.mean_service_us / 1000.0,
                recent_failures: h.failures,
                labels: HashMap::new(),
                instances: vec!["*".into()],
                memory_mb: 0,
                cores: a.workers(),
                cpu_load: 0.0,
                latency_ms: Default::default(),
            });
        }
        for r in self.remotes() {
            let h = r.health.lock().map(|h| h.clone()).unwrap_or_default();
            out.push(NodeStatus {
                name: r.name.clone(),
                kind: "remote",
                up: r.alive.load(Ordering::Relaxed),
                workers: r.threads,
                busy: r.busy.load(Ordering::Relaxed).max(r.reported_busy.load(Ordering::Relaxed)),
                slowdown: h.slowdown,
                mean_service_ms: h.mean_service_us / 1000.0,
                recent_failures: h.failures,
                labels: r.labels.clone(),
                instances: {
                    let mut v: Vec<String> = r
                        .hosted
                        .lock()
                        .map(|h| h.iter().map(|(m, v)| format!("{m}/{v}")).collect())
                        .unwrap_or_default();
                    v.sort();
                    v
                },
                memory_mb: r.memory_mb,
                cores: r.cores,
                cpu_load: r.cpu_load.lock().map(|c| *c).unwrap_or(0.0),
                latency_ms: r
                    .reported_latency
                    .lock()
                    .map(|l| l.iter().map(|(k, v)| (k.clone(), v / 1000.0)).collect())
                    .unwrap_or_default(),
            });
        }
        out
    }
}

/// The batch's inputs, concatenated per declared input.
fn concat_inputs(model: &ModelEntry, members: &[Member]) -> Result<Vec<RawTensor>> {
    (0..model.spec.inputs.len())
        .map(|i| {
            let parts: Vec<&RawTensor> = members.iter().map(|m| &m.req.inputs[i]).collect();
            if parts.len() == 1 { Ok(parts[0].clone()) } else { batch::concat(&parts) }
        })
        .collect()
}

/// Checks a peer's output tensors against the model before using them, then splits them.
fn split_outputs(
    model: &ModelEntry,
    members: &[Member],
    outputs: Vec<agent_pb::Tensor>,
) -> Result<Vec<Vec<RawTensor>>> {
    let rows: i64 = members.iter().map(|m| i64::from(m.req.rows)).sum();
    if outputs.len() != model.spec.outputs.len() {
        return Err(Error::internal("a node returned the wrong number of outputs"));
    }
    let sizes: Vec<i64> = members.iter().map(|m| i64::from(m.req.rows)).collect();
    let mut per_member: Vec<Vec<RawTensor>> = (0..members.len()).map(|_| Vec::new()).collect();
    for (t, spec) in outputs.into_iter().zip(&model.spec.outputs) {
        let dt = DataType::parse(&t.datatype)
            .map_err(|_| Error::internal("a node returned an unknown datatype"))?;
        if dt != spec.datatype || t.shape.first() != Some(&rows) || t.shape[1..] != *spec.sample_shape() {
            return Err(Error::internal("a node returned a tensor that does not match the model"));
        }
        let want = byte_size(dt, &t.shape)?;
        if want > MAX_TENSOR_BYTES || want != t.data.len() {
            return Err(Error::internal("a node returned a tensor of the wrong size"));
        }
        let tensor = RawTensor::from_bytes(dt, t.shape, t.data)?;
        let parts = if sizes.len() == 1 { vec![tensor] } else { batch::split(&tensor, &sizes)? };
        for (k, p) in parts.into_iter().enumerate() {
            per_member[k].push(p);
        }
    }
    Ok(per_member)
}

/// `osprey.agent.v1.AgentGateway`, served beside the inference service.
pub struct AgentService {
    pool: Arc<Pool>,
}

impl AgentService {
    pub fn new(pool: Arc<Pool>) -> Self {
        AgentService { pool }
    }
}

type OutStream =
    Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<agent_pb::GatewayMessage, Status>> + Send>>;

#[tonic::async_trait]
impl agent_pb::agent_gateway_server::AgentGateway for AgentService {
    type AttachStream = OutStream;

    async fn attach(
        &self,
        req: Request<Streaming<agent_pb::AgentMessage>>,
    ) -> std::result::Result<Response<OutStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(DEAD_AFTER * 5, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("register within 5 s of attaching"))??
            .ok_or_else(|| Status::invalid_argument("the stream ended before registering"))?;
        let Some(agent_message::Kind::Register(reg)) = first.kind else {
            return Err(Status::invalid_argument("the first message must be Register"));
        };
        if reg.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol {}, this gateway speaks {PROTOCOL_VERSION}",
                reg.protocol_version
            )));
        }
        if reg.threads == 0 || reg.threads > 1024 || reg.name.is_empty() || reg.name.len() > 128 {
            return Err(Status::invalid_argument("register needs a name (≤ 128 bytes) and 1..=1024 threads"));
        }
        let (tx, rx) = mpsc::channel(256);
        let id = format!("agent-{}", self.pool.next_agent.fetch_add(1, Ordering::Relaxed));
        let agent = Arc::new(RemoteAgent {
            id: id.clone(),
            name: reg.name.clone(),
            threads: reg.threads,
            labels: reg.labels.clone(),
            speed: if reg.speed_hint > 0.0 && reg.speed_hint.is_finite() { reg.speed_hint } else { 1.0 },
            tx: tx.clone(),
            alive: AtomicBool::new(true),
            busy: AtomicU32::new(0),
            last_seen: Mutex::new(Instant::now()),
            inflight: Mutex::new(HashMap::new()),
            health: Mutex::new(Health::default()),
            reported_busy: AtomicU32::new(0),
            memory_mb: reg.memory_mb,
            cores: reg.cores,
            cpu_load: Mutex::new(0.0),
            reported_latency: Mutex::new(HashMap::new()),
            models: reg.models.clone(),
            hosted: Mutex::new(HashSet::new()),
            loading: Mutex::new(HashSet::new()),
        });
        let welcome = agent_pb::GatewayMessage {
            kind: Some(gateway_message::Kind::Welcome(agent_pb::Welcome {
                agent_id: id.clone(),
                heartbeat_ms: HEARTBEAT.as_millis() as u32,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        if let Ok(mut v) = self.pool.remote.lock() {
            v.push(agent.clone());
        }
        tracing::info!(node = %reg.name, threads = reg.threads, memory_mb = reg.memory_mb, "agent joined as {id}");
        self.pool.place(&agent);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => {
                        if let Ok(mut t) = agent.last_seen.lock() {
                            *t = Instant::now();
                        }
                        match m.kind {
                            Some(agent_message::Kind::Heartbeat(h)) => {
                                agent.reported_busy.store(h.busy, Ordering::Relaxed);
                                if let Ok(mut c) = agent.cpu_load.lock() {
                                    *c = h.cpu_load;
                                }
                                if let Ok(mut l) = agent.reported_latency.lock() {
                                    *l = h.latency_us;
                                }
                            }
                            Some(agent_message::Kind::Result(r)) => pool.finish_remote(&agent, r),
                            Some(agent_message::Kind::Loaded(l)) => {
                                let key = (l.model.clone(), l.variant.clone());
                                let asked = agent.loading.lock().map(|mut s| s.remove(&key)).unwrap_or(false);
                                if !l.error.is_empty() {
                                    tracing::warn!(node = %agent.name, model = %l.model, variant = %l.variant, "load failed: {}", l.error);
                                } else if asked {
                                    if let Ok(mut h) = agent.hosted.lock() {
                                        h.insert(key);
                                    }
                                    pool.changed.notify_waiters();
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(None) => {
                        pool.node_down(&agent, "its connection closed");
                        break;
                    }
                    Err(e) => {
                        pool.node_down(&agent, &format!("connection error: {}", e.message()));
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
