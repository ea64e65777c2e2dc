//! The live driver of `osprey_policy::dispatch::Dispatcher`: it turns I/O into dispatcher
//! events and the dispatcher's actions into I/O, and holds what the sans-IO side must not —
//! request payloads, reply channels, agents, clocks and timers. Every decision (which batch,
//! which node, health, retry and failover, placement, expiry) is the dispatcher's.
//!
//! ```text
//! gateway ──submit──┐                          ┌── Run      -> Agent::run(Work, Completer)
//! agents ──complete─┤   Mutex<Core>            ├── Reply    -> the request's oneshot (an error)
//! streams ─joined/  ├─> Dispatcher::handle_* ──┼── Load / Unload -> Agent::load / unload
//!   heartbeat/lost  │   then poll_action()     └── Disconnect    -> Agent::disconnect
//! timer ────────────┘   and poll_timeout() -> the timer task sleeps until exactly then
//! ```
//!
//! Actions are drained under the lock (their payloads are taken there) and carried out after
//! it is released, so an agent is never called with the lock held. Remote agents
//! (`osprey agent`, one process per node) attach over `osprey.agent.v1.AgentGateway` on the
//! gateway's gRPC port and dial in, so nodes behind NAT need no open port.

use crate::agent::{Agent, Completer, CompletionSink, Executed, Failure, Work, WorkUnit, concat_inputs};
use crate::agent_pb::{self, agent_message, gateway_message};
use crate::gateway::{InferOutcome, ModelEntry, ValidRequest, unix_ms};
use osprey_core::error::{Error, Result};
use osprey_core::tensor::{DataType, RawTensor, byte_size};
use osprey_policy::Micros;
use osprey_policy::dispatch::{
    Action, BatchId, BatchOutcome, Dispatcher, ModelId, NodeId, NodeInfo, Telemetry, Why,
};
use osprey_policy::scheduler::Request;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};
use tonic::{Request as TonicRequest, Response, Status, Streaming};

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
/// A joining agent must register within this long.
const REGISTER_WITHIN: Duration = Duration::from_secs(5);

/// A request admitted to the dispatcher, with what only the live side holds.
pub struct Waiting {
    pub model: ModelId,
    pub req: Arc<ValidRequest>,
    pub tenant: Arc<str>,
    pub estimate: Vec<f64>,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<InferOutcome>>,
}

struct AgentSlot {
    agent: Arc<dyn Agent>,
    /// `agent.name()`, shared by the answers it runs.
    name: Arc<str>,
    kind: &'static str,
    cores: u32,
}

struct Core {
    d: Dispatcher,
    waiting: HashMap<u64, Waiting>,
    agents: HashMap<NodeId, AgentSlot>,
    /// Dispatch time of each batch in flight (queue time of its members).
    dispatched: HashMap<BatchId, Instant>,
    next_request: u64,
}

/// What to do once the lock is released.
enum Todo {
    Run(Arc<dyn Agent>, Work, NodeId),
    Reply(Waiting, Error),
    Answer(Waiting, Result<InferOutcome>),
    Place { agent: Arc<dyn Agent>, load: bool, model: String, variant: String },
    Disconnect(Arc<dyn Agent>, String),
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
    pub labels: BTreeMap<String, String>,
    /// `model/variant` loaded on the node.
    pub instances: Vec<String>,
    pub memory_mb: u64,
    /// Memory its instances take, MB, as the node measured each one at load (else declared).
    pub memory_used_mb: u64,
    /// The control loop's replicas placed on the node, per model (each one a worker thread).
    pub replicas: BTreeMap<String, u32>,
    pub cores: u32,
    pub cpu_load: f64,
    /// The node's own recent service times per "model/variant/batch", ms.
    pub latency_ms: BTreeMap<String, f64>,
}

/// The live cluster: one dispatcher, its agents and its timer.
pub struct Cluster {
    core: Mutex<Core>,
    /// Every revision of every model, by the dispatcher's model id (append-only: model control
    /// adds revisions; a retired one is dropped, `None`, once the dispatcher says it is done).
    models: std::sync::RwLock<Vec<Option<Arc<ModelEntry>>>>,
    epoch: Instant,
    /// Wakes the timer task when the next timeout moved earlier.
    wake: Notify,
    /// Itself, for the completers of the batches it dispatches.
    me: std::sync::Weak<Cluster>,
    /// The time the timer task sleeps until (µs on `epoch`; `u64::MAX` = none).
    armed: AtomicU64,
    next_agent: AtomicU64,
    /// Drivers of split models, told of agents that offer them and of their messages.
    splits: Mutex<Vec<Arc<crate::split::SplitDriver>>>,
}

impl Cluster {
    pub fn new(d: Dispatcher, models: Vec<Arc<ModelEntry>>) -> Arc<Cluster> {
        Arc::new_cyclic(|me| Cluster {
            me: me.clone(),
            core: Mutex::new(Core {
                d,
                waiting: HashMap::new(),
                agents: HashMap::new(),
                dispatched: HashMap::new(),
                next_request: 1,
            }),
            models: std::sync::RwLock::new(models.into_iter().map(Some).collect()),
            epoch: Instant::now(),
            wake: Notify::new(),
            armed: AtomicU64::new(u64::MAX),
            splits: Mutex::new(Vec::new()),
            next_agent: AtomicU64::new(1),
        })
    }

    /// µs on the dispatcher's clock.
    pub fn now_us(&self) -> Micros {
        self.to_us(Instant::now())
    }

    /// µs on the dispatcher's clock of instant `t`.
    pub fn to_us_pub(&self, t: Instant) -> Micros {
        self.to_us(t)
    }

    fn to_us(&self, t: Instant) -> Micros {
        t.saturating_duration_since(self.epoch).as_micros() as Micros
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic elsewhere never leaves requests stranded: the state is still served.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision of model `id`, while it is not dropped.
    pub fn entry(&self, id: ModelId) -> Option<Arc<ModelEntry>> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).get(id).cloned().flatten()
    }

    /// Adds a model revision at run time: the dispatcher takes it under the next id, which
    /// `entry` (built by `make` with that id) is registered under before any batch of it runs.
    pub fn add_model(
        self: &Arc<Self>,
        make: impl FnOnce(ModelId) -> Arc<ModelEntry>,
        setup: osprey_policy::dispatch::ModelSetup,
    ) -> Arc<ModelEntry> {
        self.with(|core, now| {
            let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
            let entry = make(models.len());
            models.push(Some(entry.clone()));
            drop(models);
            let id = core.d.add_model(now, setup);
            debug_assert_eq!(id, entry.index);
            entry
        })
    }

    /// Retires model revision `id`: no new request reaches it, queued and running ones finish.
    pub fn retire_model(self: &Arc<Self>, id: ModelId) {
        self.with(|core, now| core.d.retire_model(now, id));
    }

    /// Runs `f` on the dispatcher, then carries out what it decided.
    fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut Core, Micros) -> R) -> R {
        let mut todo = Vec::new();
        let r = {
            let mut core = self.lock();
            let now = self.now_us();
            let r = f(&mut core, now);
            self.drain(&mut core, &mut todo);
            if let Some(t) = core.d.poll_timeout()
                && t < self.armed.load(Ordering::Acquire)
            {
                self.wake.notify_one();
            }
            r
        };
        self.apply(todo);
        r
    }

    /// Takes the dispatcher's actions and their payloads (under the lock).
    fn drain(&self, core: &mut Core, todo: &mut Vec<Todo>) {
        while let Some(a) = core.d.poll_action() {
            match a {
                Action::Run(run) => {
                    let members: Vec<Arc<ValidRequest>> = run
                        .members
                        .iter()
                        .filter_map(|id| core.waiting.get(id).map(|w| w.req.clone()))
                        .collect();
                    core.dispatched.insert(run.batch, Instant::now());
                    let Some(slot) = core.agents.get(&run.node) else { continue };
                    let work = Work {
                        batch: run.batch,
                        unit: WorkUnit::Variant {
                            model: match self.entry(run.model) {
                                Some(m) => m,
                                None => continue,
                            },
                            variant: run.variant,
                        },
                        members,
                        planned_us: run.planned_us,
                    };
                    todo.push(Todo::Run(slot.agent.clone(), work, run.node));
                }
                Action::Reply { request, error, why, .. } => {
                    if let Some(w) = core.waiting.remove(&request) {
                        if why == Why::Expired
                            && let Some(m) = self.entry(w.model)
                            && let Some(v) = m.variants.first()
                        {
                            v.stats.lock().unwrap_or_else(|e| e.into_inner()).fail.add(w.enqueued.elapsed());
                        }
                        todo.push(Todo::Reply(w, error));
                    }
                }
                Action::Load { node, model, variant } | Action::Unload { node, model, variant } => {
                    if let Some(s) = core.agents.get(&node)
                        && let Some(m) = self.entry(model)
                    {
                        let load = matches!(a, Action::Load { .. });
                        let v = m.variants[variant].spec.name.clone();
                        todo.push(Todo::Place {
                            agent: s.agent.clone(),
                            load,
                            model: m.name().into(),
                            variant: v,
                        });
                    }
                }
                Action::Retired { model } => {
                    let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
                    if let Some(m) = models.get_mut(model).and_then(Option::take) {
                        tracing::info!(model = %m.name(), revision = model, "retired revision released");
                    }
                }
                Action::Disconnect { node, reason } => {
                    tracing::warn!("{reason}");
                    if let Some(s) = core.agents.remove(&node) {
                        todo.push(Todo::Disconnect(s.agent, reason));
                    }
                }
            }
        }
    }

    fn apply(self: &Arc<Self>, todo: Vec<Todo>) {
        for t in todo {
            match t {
                Todo::Run(agent, work, node) => {
                    let done = Completer::new(self.clone(), node, work.batch);
                    agent.run(work, done);
                }
                Todo::Reply(w, e) => {
                    let _ = w.reply.send(Err(e));
                }
                Todo::Answer(w, r) => {
                    let _ = w.reply.send(r);
                }
                Todo::Place { agent, load: true, model, variant } => agent.load(&model, &variant),
                Todo::Place { agent, load: false, model, variant } => agent.unload(&model, &variant),
                Todo::Disconnect(a, why) => a.disconnect(&why),
            }
        }
    }

    /// Hands a request to the dispatcher: it is queued, or answered at once through `reply`.
    pub fn submit(self: &Arc<Self>, mut r: Request, w: Waiting) -> u64 {
        self.with(|core, now| {
            let id = core.next_request;
            core.next_request += 1;
            r.id = id;
            let model = w.model;
            core.waiting.insert(id, w);
            core.d.handle_arrival(now, model, r);
            id
        })
    }

    /// The client of request `id` went away.
    pub fn cancel(self: &Arc<Self>, model: ModelId, id: u64) {
        self.with(|core, now| {
            if core.d.handle_cancel(now, model, id) {
                core.waiting.remove(&id);
            }
        });
    }

    /// Adds a node; in-process agents are preloaded, remote ones get placement.
    pub fn join(self: &Arc<Self>, info: NodeInfo, agent: Arc<dyn Agent>, cores: u32) -> NodeId {
        let kind = if info.preloaded { "local" } else { "remote" };
        let name = info.name.clone();
        let id = self.with(|core, now| {
            // The id the dispatcher will assign is only known after the join; register the
            // agent under it before any action for it is drained.
            let id = core.d.handle_node_join(now, info);
            let name = agent.name().into();
            core.agents.insert(id, AgentSlot { agent, name, kind, cores });
            id
        });
        tracing::info!(node = %name, "{kind} agent joined as node {id}");
        id
    }

    /// Registers the driver of a split model.
    pub fn add_split(&self, d: Arc<crate::split::SplitDriver>) {
        self.splits.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }

    pub fn splits(&self) -> Vec<Arc<crate::split::SplitDriver>> {
        self.splits.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn split(&self, model: &str) -> Option<Arc<crate::split::SplitDriver>> {
        self.splits().into_iter().find(|d| d.name() == model)
    }

    fn node_down(self: &Arc<Self>, node: NodeId, why: &str) {
        self.with(|core, now| core.d.handle_node_down(now, node, why));
    }

    fn heartbeat(self: &Arc<Self>, node: NodeId, t: Telemetry) {
        self.with(|core, now| core.d.handle_heartbeat(now, node, t));
    }

    /// A node's answer to a load; `memory_kib` is what it measured the load took (0: unknown).
    fn loaded(self: &Arc<Self>, node: NodeId, model: &str, variant: &str, error: &str, memory_kib: u64) {
        let Some(m) = self.lock().d.model_id(model) else { return };
        let Some(v) = self.entry(m).and_then(|e| e.variant_index(variant)) else { return };
        if !error.is_empty() {
            tracing::warn!(node, model, variant, "load failed: {error}");
        }
        let memory_mb = (memory_kib > 0).then(|| memory_kib.div_ceil(1024));
        self.with(|core, now| core.d.handle_loaded(now, node, m, v, error, memory_mb));
    }

    /// Loads a variant on a node (checked against its memory).
    pub fn load(self: &Arc<Self>, node: &str, model: &str, variant: &str) -> Result<()> {
        self.with(|core, now| core.d.load(now, node, model, variant))
    }

    /// Applies the control loop's configuration of a model (see `Dispatcher::configure`).
    pub fn configure(
        self: &Arc<Self>,
        model: &str,
        control: osprey_policy::scheduler::Control,
        replicas: Option<u32>,
    ) -> Result<()> {
        self.with(|core, now| {
            let id =
                core.d.model_id(model).ok_or_else(|| Error::not_found(format!("unknown model '{model}'")))?;
            core.d.configure(now, id, control, replicas);
            Ok(())
        })
    }

    /// Unloads a variant from a node once another hosts it.
    pub fn unload(self: &Arc<Self>, node: &str, model: &str, variant: &str) -> Result<()> {
        self.with(|core, now| core.d.unload(now, node, model, variant))
    }

    /// Whether some live node hosts a variant of `model`.
    pub fn model_ready(&self, model: &str) -> bool {
        let core = self.lock();
        core.d.model_id(model).is_some_and(|m| core.d.model_ready(m))
    }

    /// A call's expected time on `variant` of the model with dispatcher id `model` if sent
    /// now, with the failure share of the instance it would run on
    /// (`Dispatcher::expected_service`); `None` when no live node hosts it.
    pub fn expected_service(
        &self,
        model: ModelId,
        variant: usize,
        rows: u32,
    ) -> Option<osprey_policy::dispatch::Expected> {
        self.lock().d.expected_service(model, variant, rows)
    }

    /// Requests queued or in flight.
    pub fn outstanding(&self) -> usize {
        self.lock().waiting.len()
    }

    /// What a batch of `model` costs beyond its node's time on it, µs (mean over its hosts;
    /// `Dispatcher::batch_overhead_us`).
    pub fn batch_overhead_us(&self, model: &str) -> f64 {
        let core = self.lock();
        core.d.model_id(model).map_or(0.0, |m| core.d.batch_overhead_us(m))
    }

    /// Where the control loop's replicas of `model` are: (node, replicas there).
    pub fn replica_nodes(&self, model: &str) -> Vec<(String, u32)> {
        let core = self.lock();
        core.d.model_id(model).map_or_else(Vec::new, |m| core.d.replica_nodes(m))
    }

    /// Nodes for `osprey status`.
    pub fn status(&self) -> Vec<NodeStatus> {
        let core = self.lock();
        let mut replicas: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
        let live: Vec<Arc<ModelEntry>> =
            self.models.read().unwrap_or_else(|e| e.into_inner()).iter().flatten().cloned().collect();
        for m in &live {
            if let Some(k) = core.d.model_id(m.name()) {
                for (node, q) in core.d.replica_nodes(k) {
                    replicas.entry(node).or_default().insert(m.name().to_string(), q);
                }
            }
        }
        core.d
            .nodes()
            .into_iter()
            .map(|n| {
                let slot = core.agents.get(&n.id);
                NodeStatus {
                    name: n.info.name.clone(),
                    kind: slot.map_or("remote", |s| s.kind),
                    up: true,
                    workers: n.info.workers,
                    busy: n.running.min(n.info.workers).max(n.telemetry.busy),
                    slowdown: n.health.slowdown,
                    mean_service_ms: n.health.mean_service_us / 1000.0,
                    recent_failures: n.health.failures,
                    labels: n.info.labels.clone(),
                    instances: {
                        let mut v: Vec<String> = n.hosted.iter().map(|(m, v)| format!("{m}/{v}")).collect();
                        v.sort();
                        v
                    },
                    memory_mb: if n.info.preloaded { 0 } else { n.info.memory_mb },
                    memory_used_mb: if n.info.preloaded { 0 } else { n.memory_used_mb },
                    replicas: replicas.remove(&n.info.name).unwrap_or_default(),
                    cores: slot.map_or(0, |s| s.cores),
                    cpu_load: n.telemetry.cpu_load,
                    latency_ms: n.telemetry.latency_us.iter().map(|(k, v)| (k.clone(), v / 1000.0)).collect(),
                }
            })
            .collect()
    }

    /// Wakes exactly when the dispatcher asks (`poll_timeout`), never on a fixed interval.
    pub async fn run_timer(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = self.lock().d.poll_timeout();
            self.armed.store(next.unwrap_or(u64::MAX), Ordering::Release);
            match next {
                Some(t) => {
                    let at = self.epoch + Duration::from_micros(t);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {
                            self.armed.store(u64::MAX, Ordering::Release);
                            self.with(|core, now| core.d.handle_timeout(now));
                        }
                        _ = &mut notified => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Stops every agent after its current batches.
    pub fn stop_agents(&self) {
        let agents: Vec<Arc<dyn Agent>> = self.lock().agents.values().map(|s| s.agent.clone()).collect();
        for a in agents {
            a.stop();
        }
    }

    /// Answers a finished batch's members (outside the lock) and records statistics.
    fn answer(&self, a: Answered) -> Vec<Todo> {
        let model = &a.model;
        let ve = &model.variants[a.variant];
        let series = &model.metrics.variants[a.variant];
        let rows: u32 = a.pairs.iter().map(|(w, _)| w.req.rows).sum();
        let [t_in, t_infer, t_out] = a.times;
        let compute = t_in + t_infer + t_out;
        series.batch_size.observe(f64::from(rows));
        series.compute_input.observe(t_in.as_secs_f64());
        series.compute_infer.observe(t_infer.as_secs_f64());
        series.compute_output.observe(t_out.as_secs_f64());
        {
            let mut s = ve.stats.lock().unwrap_or_else(|e| e.into_inner());
            s.execution_count += 1;
            s.last_inference_ms = unix_ms();
            let b = s.batches.entry(u64::from(rows)).or_default();
            b.compute_input.add(t_in);
            b.compute_infer.add(t_infer);
            b.compute_output.add(t_out);
            for (w, _) in &a.pairs {
                s.inference_count += u64::from(w.req.rows);
                s.success.add(w.enqueued.elapsed());
                s.queue.add(a.dispatched.saturating_duration_since(w.enqueued));
                s.compute_input.add(t_in);
                s.compute_infer.add(t_infer);
                s.compute_output.add(t_out);
            }
        }
        let now = Instant::now();
        let classes = model.spec.labels.len();
        let mut todo = Vec::with_capacity(a.pairs.len());
        for (w, outputs) in a.pairs {
            if let Some(first) = outputs.first()
                && classes > 0
                && let Ok(p) = first.to_f32()
            {
                for row in p.chunks_exact(classes) {
                    let arg = (0..classes).max_by(|&x, &y| row[x].total_cmp(&row[y])).unwrap_or(0);
                    model.estimator.observe(arg);
                }
            }
            let queue = a.dispatched.saturating_duration_since(w.enqueued);
            series.queue.observe(queue.as_secs_f64());
            // Outputs move into the answer; one requested twice is copied.
            let mut outputs: Vec<Option<RawTensor>> = outputs.into_iter().map(Some).collect();
            let mut selected = Vec::with_capacity(w.req.outputs.len());
            for (k, &i) in w.req.outputs.iter().enumerate() {
                let again = w.req.outputs[k + 1..].contains(&i);
                let t = match outputs.get_mut(i) {
                    Some(slot) if again => slot.clone(),
                    Some(slot) => slot.take(),
                    None => None,
                };
                selected.extend(t.map(|t| (i, t)));
            }
            let outcome = InferOutcome {
                model: model.clone(),
                variant: a.variant,
                node: a.node.clone(),
                outputs: selected,
                queue,
                compute,
                deadline_met: now <= w.deadline,
                estimated_accuracy: w.estimate.get(a.variant).copied().unwrap_or(0.0),
                batch_size: rows,
                tenant: w.tenant.clone(),
                pipeline: None,
                multimodal: None,
            };
            todo.push(Todo::Answer(w, Ok(outcome)));
        }
        todo
    }
}

/// A finished batch on its way to its members.
struct Answered {
    /// Taken before the dispatcher may release a retired revision.
    model: Arc<ModelEntry>,
    variant: usize,
    pairs: Vec<(Waiting, Vec<RawTensor>)>,
    /// Compute input, infer, output.
    times: [Duration; 3],
    node: Arc<str>,
    dispatched: Instant,
}

impl CompletionSink for Cluster {
    fn complete(&self, node: NodeId, batch: BatchId, result: std::result::Result<Executed, Failure>) {
        let Some(cluster) = self.me.upgrade() else { return };
        let mut answer = None;
        let outcome = match &result {
            Ok(ex) => BatchOutcome::Ok { service_us: ex.service_us, engine_us: ex.engine_us },
            Err(Failure::Engine(e)) => BatchOutcome::Error(e.message.clone()),
            Err(Failure::Lost(why)) => BatchOutcome::Lost(why.clone()),
        };
        let mut todo = Vec::new();
        {
            let mut core = cluster.lock();
            let now = cluster.now_us();
            let dispatched = core.dispatched.remove(&batch);
            if let Some(done) = core.d.handle_batch_done(now, batch, outcome)
                && let Ok(ex) = result
                && let Some(entry) = cluster.entry(done.model)
            {
                let name =
                    core.agents.get(&node).map_or_else(|| format!("node-{node}").into(), |s| s.name.clone());
                let Executed { outputs, compute_input, compute_infer, compute_output, .. } = ex;
                let pairs: Vec<(Waiting, Vec<RawTensor>)> = done
                    .members
                    .iter()
                    .zip(outputs)
                    .filter_map(|(r, out)| core.waiting.remove(&r.id).map(|w| (w, out)))
                    .collect();
                let times = [compute_input, compute_infer, compute_output];
                answer =
                    Some((entry, done.variant, pairs, times, name, dispatched.unwrap_or_else(Instant::now)));
            }
            cluster.drain(&mut core, &mut todo);
            if let Some(t) = core.d.poll_timeout()
                && t < cluster.armed.load(Ordering::Acquire)
            {
                cluster.wake.notify_one();
            }
        }
        if let Some((model, variant, pairs, times, name, dispatched)) = answer {
            todo.extend(cluster.answer(Answered { model, variant, pairs, times, node: name, dispatched }));
        }
        cluster.apply(todo);
    }
}

// ----- remote agents -----

/// A batch sent to a remote node: its model and members (to check and split the outputs) and
/// its completer.
type Sent = (Arc<ModelEntry>, Vec<Arc<ValidRequest>>, Completer);

/// A node agent attached over gRPC.
pub struct RemoteAgent {
    name: String,
    tx: Mutex<Option<mpsc::Sender<std::result::Result<agent_pb::GatewayMessage, Status>>>>,
    /// Batches sent and not answered: their members (to split outputs) and completers.
    pending: Mutex<HashMap<BatchId, Sent>>,
}

impl RemoteAgent {
    /// Sends a message on the agent's stream; false when it is closed or saturated.
    pub fn send_kind(&self, kind: gateway_message::Kind) -> bool {
        self.send(kind)
    }

    fn send(&self, kind: gateway_message::Kind) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        tx.is_some_and(|tx| tx.try_send(Ok(agent_pb::GatewayMessage { kind: Some(kind) })).is_ok())
    }

    fn on_result(&self, res: agent_pb::BatchResult) {
        let Some((model, members, done)) =
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&res.batch_id)
        else {
            return; // unknown or already failed over: never a duplicate answer
        };
        if !res.error.is_empty() {
            done.complete(Err(Failure::Engine(Error::internal(res.error))));
            return;
        }
        let service = Duration::from_secs_f64(res.service_us.max(0.0) / 1e6);
        let result = check_outputs(&model, &members, res.outputs)
            .map(|outputs| Executed {
                outputs,
                compute_input: Duration::ZERO,
                compute_infer: service,
                compute_output: Duration::ZERO,
                service_us: res.service_us.max(0.0),
                engine_us: res.service_us.max(0.0),
            })
            .map_err(Failure::Engine);
        done.complete(result);
    }
}

impl Agent for RemoteAgent {
    fn name(&self) -> &str {
        &self.name
    }

    fn run(&self, work: Work, done: Completer) {
        let WorkUnit::Variant { model, variant } = &work.unit else {
            done.complete(Err(Failure::Engine(Error::internal("remote agents run whole variants only"))));
            return;
        };
        let inputs = match concat_inputs(model, &work.members) {
            Ok(t) => t,
            Err(e) => return done.complete(Err(Failure::Engine(e))),
        };
        let msg = gateway_message::Kind::Run(agent_pb::RunBatch {
            batch_id: work.batch,
            model: model.name().to_string(),
            variant: model.variants[*variant].spec.name.clone(),
            inputs: inputs
                .into_iter()
                .map(|t| agent_pb::Tensor {
                    datatype: t.datatype.as_str().into(),
                    shape: t.shape,
                    data: t.data,
                })
                .collect(),
        });
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(work.batch, (model.clone(), work.members, done));
        if !self.send(msg) {
            // The stream is gone or saturated: this node loses the batch (fail over). The
            // entry is taken out before completing: completing re-enters the dispatcher, which
            // may send this agent another batch (a held `pending` lock would deadlock).
            let sent = self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&work.batch);
            if let Some((_, _, done)) = sent {
                done.complete(Err(Failure::Lost("its connection is closed or saturated".into())));
            }
        }
    }

    fn load(&self, model: &str, variant: &str) {
        self.send(gateway_message::Kind::Load(agent_pb::LoadVariant {
            model: model.into(),
            variant: variant.into(),
        }));
    }

    fn unload(&self, model: &str, variant: &str) {
        self.send(gateway_message::Kind::Unload(agent_pb::UnloadVariant {
            model: model.into(),
            variant: variant.into(),
        }));
    }

    fn stop(&self) {
        // At shutdown, after the drain: end the stream so that the gRPC server's graceful
        // shutdown is not held open by attached agents.
        self.disconnect("the gateway is shutting down");
    }

    fn disconnect(&self, _reason: &str) {
        // Dropping the sender ends the gateway's half of the stream; the agent sees the end
        // and reconnects. Pending completers drop as lost (the dispatcher already failed
        // those batches over, so they are ignored).
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Taken out first, dropped after the lock is released (a dropped completer re-enters
        // the dispatcher).
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        drop(pending);
    }
}

/// Checks a peer's output tensors against the model before using them, then splits them.
fn check_outputs(
    model: &ModelEntry,
    members: &[Arc<ValidRequest>],
    outputs: Vec<agent_pb::Tensor>,
) -> Result<Vec<Vec<RawTensor>>> {
    let rows: i64 = members.iter().map(|m| i64::from(m.rows)).sum();
    if outputs.len() != model.spec.outputs.len() {
        return Err(Error::internal("a node returned the wrong number of outputs"));
    }
    let mut tensors = Vec::with_capacity(outputs.len());
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
        tensors.push(RawTensor::from_bytes(dt, t.shape, t.data)?);
    }
    crate::agent::split_outputs(members, tensors)
}

/// `osprey.agent.v1.AgentGateway`, served beside the inference service.
pub struct AgentService {
    cluster: Arc<Cluster>,
    token: crate::join::JoinToken,
}

impl AgentService {
    pub fn new(cluster: Arc<Cluster>, token: crate::join::JoinToken) -> Self {
        AgentService { cluster, token }
    }
}

type OutStream =
    Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<agent_pb::GatewayMessage, Status>> + Send>>;

#[tonic::async_trait]
impl agent_pb::agent_gateway_server::AgentGateway for AgentService {
    type AttachStream = OutStream;

    async fn attach(
        &self,
        req: TonicRequest<Streaming<agent_pb::AgentMessage>>,
    ) -> std::result::Result<Response<OutStream>, Status> {
        let presented = req.metadata().get(crate::join::METADATA_KEY).and_then(|v| v.to_str().ok());
        if !self.token.verify(presented) {
            tracing::warn!(peer = ?req.remote_addr(), "refused an agent without a valid join token");
            return Err(Status::unauthenticated(format!(
                "attaching needs the cluster join token in '{}' (osprey agent --token)",
                crate::join::METADATA_KEY
            )));
        }
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_WITHIN, inbound.message())
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
        let seq = self.cluster.next_agent.fetch_add(1, Ordering::Relaxed);
        let welcome = agent_pb::GatewayMessage {
            kind: Some(gateway_message::Kind::Welcome(agent_pb::Welcome {
                agent_id: format!("agent-{seq}"),
                heartbeat_ms: HEARTBEAT.as_millis() as u32,
            })),
        };
        let _ = tx.send(Ok(welcome)).await;
        let agent = Arc::new(RemoteAgent {
            name: reg.name.clone(),
            tx: Mutex::new(Some(tx)),
            pending: Mutex::new(HashMap::new()),
        });
        let info = NodeInfo {
            name: reg.name.clone(),
            workers: reg.threads,
            speed: if reg.speed_hint > 0.0 && reg.speed_hint.is_finite() { reg.speed_hint } else { 1.0 },
            memory_mb: reg.memory_mb,
            models: Some(reg.models.clone()),
            preloaded: false,
            heartbeats: true,
            labels: reg.labels.clone().into_iter().collect(),
        };
        let node = self.cluster.join(info, agent.clone(), reg.cores);
        let cluster = self.cluster.clone();
        let name = reg.name.clone();
        let splits: Vec<_> = if reg.peer_addr.is_empty() {
            Vec::new()
        } else {
            reg.split_models.iter().filter_map(|m| cluster.split(m)).collect()
        };
        for d in &splits {
            d.node_joined(&name, agent.clone(), reg.peer_addr.clone(), &reg.labels, reg.memory_mb);
        }
        tokio::spawn(async move {
            let down = |why: &str| {
                cluster.node_down(node, why);
                for d in &splits {
                    d.node_left(&name, &agent);
                }
            };
            loop {
                match inbound.message().await {
                    Ok(Some(m)) => match m.kind {
                        Some(agent_message::Kind::Heartbeat(h)) => {
                            for d in &splits {
                                d.on_heartbeat(&name, &h.split_received);
                            }
                            cluster.heartbeat(
                                node,
                                Telemetry {
                                    busy: h.busy,
                                    cpu_load: h.cpu_load,
                                    latency_us: h.latency_us.into_iter().collect(),
                                },
                            )
                        }
                        Some(agent_message::Kind::Result(r)) => agent.on_result(r),
                        Some(agent_message::Kind::Loaded(l)) => {
                            cluster.loaded(node, &l.model, &l.variant, &l.error, l.memory_kib)
                        }
                        Some(agent_message::Kind::RangeLoaded(l)) => {
                            if let Some(d) = splits.iter().find(|d| d.name() == l.model) {
                                d.on_range_loaded(&name, l)
                            }
                        }
                        Some(agent_message::Kind::SplitResult(r)) => {
                            if let Some(d) = splits.iter().find(|d| d.name() == r.model) {
                                d.on_result(r)
                            }
                        }
                        Some(agent_message::Kind::SplitProfile(p)) => {
                            if let Some(d) = splits.iter().find(|d| d.name() == p.model) {
                                d.on_profile(&name, p)
                            }
                        }
                        _ => {}
                    },
                    Ok(None) => break down("its connection closed"),
                    Err(e) => break down(&format!("connection error: {}", e.message())),
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::{Gateway, GatewayConfig, InputTensor, RequestOptions};
    use osprey_core::tensor::DataType;

    /// A remote node whose connection closed before the gateway noticed: every send fails, the
    /// dispatcher retries on the same node (it is still the only one), and the request must be
    /// answered, not deadlock on the agent's own `pending` lock.
    #[test]
    fn a_closed_remote_stream_fails_requests_instead_of_deadlocking() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let r = rt.block_on(async {
                let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
                let (models, _) = osprey_core::model::scan_repository(&repo).unwrap();
                let gw = Gateway::start(GatewayConfig::for_test(models), |_, _, _| {
                    osprey_core::profile::VariantProfile::default()
                });
                let (tx, rx) = mpsc::channel(4);
                drop(rx);
                let agent = Arc::new(RemoteAgent {
                    name: "gone".into(),
                    tx: Mutex::new(Some(tx)),
                    pending: Mutex::new(HashMap::new()),
                });
                let info = NodeInfo { heartbeats: true, ..NodeInfo::local("gone", 1) };
                gw.cluster.join(info, agent, 1);
                let t = RawTensor::from_bytes(DataType::Fp32, vec![1, 8, 8], vec![0; 256]).unwrap();
                let input = InputTensor { name: "image".into(), tensor: t };
                let req = gw.validate(
                    "digits",
                    "small",
                    String::new(),
                    vec![input],
                    &[],
                    &RequestOptions::default(),
                );
                gw.infer(req.unwrap(), 0).await
            });
            let _ = done_tx.send(r);
        });
        let r = done_rx.recv_timeout(Duration::from_secs(20)).expect("answered, not deadlocked");
        let e = r.unwrap_err();
        assert_eq!(e.code, osprey_core::ErrorCode::Unavailable, "{e:?}");
    }
}
