//! The cluster dispatcher: one sans-IO object that owns every model's scheduler, the nodes
//! (membership, health, placement, free workers and backlog), the batches in flight, and
//! retry and failover. The live gateway and the simulator both drive it, so no cluster
//! decision is written twice (quinn-proto's shape: events in, actions out).
//!
//! ```text
//! driver ── handle_arrival / handle_cancel / handle_batch_done / handle_node_join /
//!           handle_heartbeat / handle_loaded / handle_node_down / handle_timeout(now) ──> Dispatcher
//! driver <── poll_action():  Run(batch on a node) | Reply(request, error) | Load | Unload | Disconnect
//! driver <── poll_timeout(): the next time anything is due (expiry, a heartbeat deadline, a
//!                            batch timeout); the driver sleeps exactly until then
//! ```
//!
//! # When a batch forms, and where it runs
//! A model plans a batch (its [`Scheduler::next_batch`]) only when some live node that hosts
//! one of its available variants has a free worker, so batches grow while every worker is
//! busy. The batch then goes to the instance that [`instance::select`] prefers among the live
//! nodes hosting its variant that have room: a free worker, or a backlog slot (up to
//! `backlog_per_worker` batches per worker waiting on the node). Offering busy instances with
//! their backlog is what lets queueing briefly on a fast node beat a free slow one
//! (`wait_i` in the selector's formula). Models take turns for free workers (a rotating
//! start), so one busy model cannot starve another on shared nodes.
//!
//! # Replicas, memory and eviction (the control loop's configuration)
//! [`Dispatcher::configure`] sets a model's variant, batch limit and replicas f. The f
//! replicas are placed on nodes (`Dispatcher::assign_replicas`): each is one worker thread of
//! a node that hosts the variant, given one at a time to the most `speed / slowdown` per
//! replica there, within the threads other models' replicas have not taken; a batch of the
//! model starts on a node only while fewer of its batches run there than its replicas there.
//! A node's memory is checked by what each variant measured when the node loaded it (declared
//! until then). A load that does not fit first evicts, least recently used first, variants
//! that run no batch there, that the control loop has not chosen, and whose model stays served
//! without them (INFaaS's policy, with load before unload); when that cannot make room the load
//! is refused and nothing is evicted.
//!
//! # Health (the quality-driven paper's contention- and failure-awareness)
//! Per node, from every finished batch: the engine time the node measured `e` (what profiles
//! measure), and the profile's median for that batch `ℓ₅₀(b)` on the node (`/ speed`):
//! ```text
//! σ_n ← 0.8·σ_n + 0.2·clamp((e + J) / (ℓ₅₀(b) / speed_n + J), 0.1, 50)   observed slowdown
//! t̄_n ← 0.8·t̄_n + 0.2·e                                              mean service time
//! o_n ← 0.8·o_n + 0.2·max(0, turnaround − t)       per-batch overhead (link, driver), from
//!                                                  batches sent to a free worker only
//! failures_n, successes_n counted over a window halved past 20 batches
//! ```
//! `J` (= [`JITTER_US`], 20 µs) is timing jitter no node is judged by: a 2 µs batch that a
//! page fault or a preemption stretches to 20 µs is not a 10× slower node (without it, one
//! such hiccup on a tiny model steered traffic off a healthy node for several batches), while a
//! 1.7 ms batch that takes 10× longer still reads as ~10×. This departs from the paper's plain
//! ratio; on tiny models it under-reports real contention, which there costs microseconds.
//! The scheduler's own per-variant slowdown is fed the node's whole time on the batch `t`
//! (engine plus assembling and splitting) as `t · speed_n / σ_n` (the node's factors taken
//! out), so a slow node does not make every node look slow, while the serving stack's own
//! cost still reaches the plan.
//!
//! # Retry and failover (one meaning, both drivers)
//! A node that stops heartbeating for `dead_after_us` (or whose connection ends) is down: it
//! leaves the pool, the driver is told to close its connection (so a live agent reconnects),
//! and every batch in flight there fails over. A batch unanswered `batch_timeout_us` after
//! dispatch fails over the same way. Failing over puts the batch's requests back into their
//! model's queue (no admission check), where they are planned again, on any live instance,
//! possibly in other batches or on another variant; a request that has already been retried
//! `max_retries` times, or whose deadline no variant can still meet, is answered
//! `UNAVAILABLE` at once. A late answer from a batch that failed over is ignored
//! ([`Dispatcher::handle_batch_done`] returns `None`): never a duplicate answer.
//!
//! # Models added and retired at run time (model control)
//! [`Dispatcher::add_model`] appends a model under the next id (ids are never reused, so a
//! batch or a queued request always names the revision it was admitted to): in-process nodes
//! host it at once, placement asks the others to load it. [`Dispatcher::retire_model`] stops a
//! model's admissions (its name then resolves to nothing, or to the revision added to replace
//! it, which the driver adds first: load before unload); what it has queued and running still
//! completes on its variants, and once nothing is left its variants are unloaded everywhere and
//! [`Action::Retired`] tells the driver it may free the revision.

use crate::Micros;
use crate::instance::{self, InstanceView, Selector};
use crate::placement::{self, Need, NodeCapacity, Plan};
use crate::scheduler::{Reject, Request, Scheduler};
use osprey_core::error::{Error, ErrorCode};
use osprey_core::profile::Quantile;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

pub use crate::placement::NodeId;
/// A batch's id, unique for the dispatcher's lifetime.
pub type BatchId = u64;
/// A model's index in the order the dispatcher was given them.
pub type ModelId = usize;

/// Named timing and bounds of the dispatcher.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchConfig {
    pub selector: Selector,
    /// A heartbeating node silent this long is down.
    pub dead_after_us: Micros,
    /// A batch unanswered this long after dispatch counts as failed on its node.
    pub batch_timeout_us: Micros,
    /// Batches that may wait on a node beyond its running ones, per worker.
    pub backlog_per_worker: u32,
    /// How often a request may be re-planned after its node failed.
    pub max_retries: u32,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            selector: Selector::Predicted,
            dead_after_us: 1_000_000,
            batch_timeout_us: 10_000_000,
            backlog_per_worker: 1,
            max_retries: 1,
        }
    }
}

/// One model as the dispatcher serves it.
pub struct ModelSetup {
    pub name: String,
    pub scheduler: Scheduler,
    /// Per variant: name and declared memory (placement).
    pub variants: Vec<(String, u64)>,
}

/// A node joining the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub workers: u32,
    /// Relative speed hint (1.0 = the machine that measured the profiles).
    pub speed: f64,
    pub memory_mb: u64,
    /// Models whose files the node has; `None` = all.
    pub models: Option<Vec<String>>,
    /// Every variant is already loaded (in-process agents share the gateway's sessions);
    /// otherwise placement asks the node to load what fits.
    pub preloaded: bool,
    /// The node heartbeats (remote agents); one that does not is never timed out for silence.
    pub heartbeats: bool,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// An in-process node with every variant loaded.
    pub fn local(name: &str, workers: u32) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            workers,
            speed: 1.0,
            memory_mb: u64::MAX,
            models: None,
            preloaded: true,
            heartbeats: false,
            labels: BTreeMap::new(),
        }
    }
}

/// What a node reports of itself between batches.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Telemetry {
    pub busy: u32,
    pub cpu_load: f64,
    /// The node's own recent service times, "model/variant/batch" -> µs.
    pub latency_us: BTreeMap<String, f64>,
}

/// One batch to run: the driver sends it to `node` and reports its end with
/// [`Dispatcher::handle_batch_done`].
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub batch: BatchId,
    pub node: NodeId,
    pub model: ModelId,
    pub variant: usize,
    /// The members' request ids, in batch order.
    pub members: Vec<u64>,
    pub rows: u32,
    /// The scheduler's planned service time, µs.
    pub planned_us: f64,
}

/// Why a request is answered with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Refused at admission.
    Rejected,
    /// Could no longer meet its deadline in the queue.
    Expired,
    /// Its node failed and it could not be retried in time.
    Failed,
    /// Its batch failed on the node (an engine error).
    BatchError,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Run(Run),
    /// Answer request `request` of `model` with `error`, now.
    Reply {
        model: ModelId,
        request: u64,
        why: Why,
        error: Error,
    },
    Load {
        node: NodeId,
        model: ModelId,
        variant: usize,
    },
    Unload {
        node: NodeId,
        model: ModelId,
        variant: usize,
    },
    /// Close the node's connection (it left the pool; a live agent reconnects and joins anew).
    Disconnect {
        node: NodeId,
        reason: String,
    },
    /// A retired model has finished its last request and is unloaded everywhere: the driver
    /// may drop what it holds for it.
    Retired {
        model: ModelId,
    },
}

/// How a batch ended on its node.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOutcome {
    /// Answers are ready. `service_us`: the node's whole time on the batch (assembling,
    /// running, splitting; what the scheduler plans with); `engine_us`: the engine's part of it
    /// (what the profile measured; the node's observed slowdown compares it).
    Ok { service_us: f64, engine_us: f64 },
    /// The node ran the batch and it failed (an engine error): its members are answered
    /// with this error, not retried.
    Error(String),
    /// The node could not take or finish the batch (connection lost, stopped): fail over.
    Lost(String),
}

/// A finished batch whose members the driver now answers.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub model: ModelId,
    pub variant: usize,
    pub node: NodeId,
    pub members: Vec<Request>,
}

/// [`Dispatcher::expected_service`]: a call's expected time on the best instance now, and
/// that instance's recent failure share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expected {
    pub latency_us: f64,
    /// The same call on the same instance with nothing ahead of it (no busy worker, no queue):
    /// `latency_us − idle_us` is the time it would wait.
    pub idle_us: f64,
    /// The least time to its deadline, µs, with which the model's admission takes such a call
    /// now ([`crate::scheduler::Scheduler::admit_within_us`]); infinite when it takes none.
    pub admit_us: f64,
    pub failure_rate: f64,
}

/// Observed behaviour of one node, for instance selection.
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub slowdown: f64,
    pub mean_service_us: f64,
    /// What a batch costs beyond the node's own time on it (dispatch to answer, minus the
    /// node's service time: the link and the driver), µs, EWMA.
    pub overhead_us: f64,
    pub failures: u32,
    pub successes: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health { slowdown: 1.0, mean_service_us: 0.0, overhead_us: 0.0, failures: 0, successes: 0 }
    }
}

/// Timing jitter (µs) added to both sides of the observed-slowdown ratio (module docs).
pub const JITTER_US: f64 = 20.0;

impl Health {
    fn success(&mut self, service_us: f64, reference_us: f64) {
        if reference_us > 0.0 && service_us.is_finite() {
            let ratio = (service_us + JITTER_US) / (reference_us + JITTER_US);
            self.slowdown = 0.8 * self.slowdown + 0.2 * ratio.clamp(0.1, 50.0);
        }
        self.mean_service_us = if self.mean_service_us == 0.0 {
            service_us
        } else {
            0.8 * self.mean_service_us + 0.2 * service_us
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

/// A node as `osprey status` and the simulator's reports see it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: NodeId,
    pub info: NodeInfo,
    pub health: Health,
    /// Batches sent there and not finished (running or in its backlog).
    pub running: u32,
    /// `(model, variant)` names loaded there.
    pub hosted: Vec<(String, String)>,
    /// Memory its loaded variants take, MB: as the node measured each at load, else as
    /// declared.
    pub memory_used_mb: u64,
    pub telemetry: Telemetry,
}

struct Node {
    info: NodeInfo,
    last_seen: Micros,
    health: Health,
    running: u32,
    hosted: BTreeSet<(ModelId, usize)>,
    loading: BTreeSet<(ModelId, usize)>,
    /// Unloads waiting for the node's batches of that variant to finish.
    unloading: BTreeSet<(ModelId, usize)>,
    /// Resident memory each variant added when the node loaded it, MB.
    measured: BTreeMap<(ModelId, usize), u64>,
    /// When each hosted variant last got a batch (or was loaded): eviction goes least recently
    /// used first.
    last_used: BTreeMap<(ModelId, usize), Micros>,
    telemetry: Telemetry,
}

impl Node {
    fn room(&self, backlog_per_worker: u32) -> bool {
        self.running < self.info.workers.saturating_mul(1 + backlog_per_worker)
    }
    fn free(&self) -> bool {
        self.running < self.info.workers
    }
}

struct InFlight {
    node: NodeId,
    model: ModelId,
    variant: usize,
    members: Vec<Request>,
    rows: u32,
    dispatched: Micros,
    /// It waited in the node's backlog (every worker was busy when it was sent), so its
    /// turnaround includes queueing, not only the per-batch overhead.
    backlogged: bool,
}

struct Model {
    name: String,
    sched: Scheduler,
    variants: Vec<(String, u64)>,
    /// Per variant, the memory a node last measured it takes, MB.
    measured_mb: Vec<Option<u64>>,
    /// Batches of this model that may run at once (the control loop's replicas); `None`:
    /// as many as there are free workers.
    replicas: Option<u32>,
    /// Where those replicas are: per node, how many of the model's batches may run there at
    /// once (each one a worker thread of the node; [`Dispatcher::assign_replicas`]).
    quota: BTreeMap<NodeId, u32>,
    /// When its last batch was dispatched.
    last_batch: Option<Micros>,
    /// Batches of this model in flight.
    running: u32,
    /// Retired ([`Dispatcher::retire_model`]): takes no request, finishes what it has.
    retired: bool,
    /// Retired, finished and unloaded everywhere.
    gone: bool,
}

/// Errors of the admin operations (load, unload).
pub type AdminResult = Result<(), Error>;

pub struct Dispatcher {
    cfg: DispatchConfig,
    models: Vec<Model>,
    nodes: BTreeMap<NodeId, Node>,
    inflight: BTreeMap<BatchId, InFlight>,
    /// Times each live request was re-planned after a failure.
    retries: HashMap<u64, u32>,
    actions: VecDeque<Action>,
    next_node: NodeId,
    next_batch: BatchId,
    /// Round-robin cursor of the selector.
    turn: usize,
    /// The model that plans first at the next free worker.
    first_model: usize,
    /// The latest time the dispatcher was told of.
    last_now: Micros,
}

/// A model that dispatched no batch for this long holds no thread budget
/// (`Dispatcher::assign_replicas`), µs.
pub const ACTIVE_US: Micros = 10_000_000;

impl Model {
    fn new(m: ModelSetup) -> Model {
        Model {
            name: m.name,
            sched: m.scheduler,
            measured_mb: vec![None; m.variants.len()],
            variants: m.variants,
            replicas: None,
            quota: BTreeMap::new(),
            last_batch: None,
            running: 0,
            retired: false,
            gone: false,
        }
    }
}

impl Dispatcher {
    pub fn new(cfg: DispatchConfig, models: Vec<ModelSetup>) -> Dispatcher {
        let models = models.into_iter().map(Model::new).collect();
        let mut d = Dispatcher {
            cfg,
            models,
            nodes: BTreeMap::new(),
            inflight: BTreeMap::new(),
            retries: HashMap::new(),
            actions: VecDeque::new(),
            next_node: 1,
            next_batch: 1,
            turn: 0,
            first_model: 0,
            last_now: 0,
        };
        d.refresh_capacity();
        d
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.cfg
    }

    /// The model index of `name`: its newest revision that is not retired.
    pub fn model_id(&self, name: &str) -> Option<ModelId> {
        self.models.iter().rposition(|m| m.name == name && !m.retired)
    }

    /// Adds a model at run time under the next id (see the module docs): in-process nodes
    /// that may hold it host it at once, placement asks the others to load it.
    pub fn add_model(&mut self, now: Micros, setup: ModelSetup) -> ModelId {
        let id = self.models.len();
        let name = setup.name.clone();
        let variants = setup.variants.len();
        self.models.push(Model::new(setup));
        for n in self.nodes.values_mut() {
            let allowed = n.info.models.as_ref().is_none_or(|names| names.contains(&name));
            if n.info.preloaded && allowed {
                n.hosted.extend((0..variants).map(|v| (id, v)));
            }
        }
        self.place();
        self.refresh_capacity();
        self.pump(now);
        id
    }

    /// Retires `model`: no new request is admitted to it; what it has queued and running
    /// completes; then its variants are unloaded from every node and [`Action::Retired`]
    /// follows. Retiring an unknown or retired model does nothing.
    pub fn retire_model(&mut self, now: Micros, model: ModelId) {
        let Some(m) = self.models.get_mut(model) else { return };
        if m.retired {
            return;
        }
        m.retired = true;
        m.replicas = None;
        m.quota.clear();
        for n in self.nodes.values_mut() {
            // Loads still under way are answered later and then dropped (`handle_loaded`).
            n.loading.retain(|&(mm, _)| mm != model);
        }
        self.refresh_capacity();
        self.pump(now);
    }

    /// Whether `model` was retired.
    pub fn is_retired(&self, model: ModelId) -> bool {
        self.models.get(model).is_none_or(|m| m.retired)
    }

    /// Unloads every retired model that has nothing left to run.
    fn finish_retired(&mut self) {
        for k in 0..self.models.len() {
            let m = &self.models[k];
            if !m.retired || m.gone || !m.sched.is_empty() || m.running > 0 {
                continue;
            }
            if self.inflight.values().any(|b| b.model == k) {
                continue;
            }
            self.models[k].gone = true;
            for (&id, n) in self.nodes.iter_mut() {
                let held: Vec<(ModelId, usize)> =
                    n.hosted.iter().chain(&n.unloading).copied().filter(|&(m, _)| m == k).collect();
                for s in held {
                    n.hosted.remove(&s);
                    n.unloading.remove(&s);
                    n.last_used.remove(&s);
                    n.measured.remove(&s);
                    if !n.info.preloaded {
                        self.actions.push_back(Action::Unload { node: id, model: s.0, variant: s.1 });
                    }
                }
            }
            self.actions.push_back(Action::Retired { model: k });
        }
    }

    pub fn scheduler(&self, model: ModelId) -> &Scheduler {
        &self.models[model].sched
    }

    /// Requests queued over every model.
    pub fn queued(&self) -> usize {
        self.models.iter().map(|m| m.sched.len()).sum()
    }

    /// Batches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Whether some live node hosts some variant of `model` (readiness).
    pub fn model_ready(&self, model: ModelId) -> bool {
        self.nodes.values().any(|n| n.hosted.iter().any(|&(m, _)| m == model))
    }

    /// Which variants of `model` some live node hosts now.
    pub fn available(&self, model: ModelId) -> Vec<bool> {
        (0..self.models[model].variants.len())
            .map(|v| self.nodes.values().any(|n| n.hosted.contains(&(model, v))))
            .collect()
    }

    pub fn node_id(&self, name: &str) -> Option<NodeId> {
        self.nodes.iter().find(|(_, n)| n.info.name == name).map(|(id, _)| *id)
    }

    pub fn nodes(&self) -> Vec<NodeView> {
        self.nodes
            .iter()
            .map(|(&id, n)| NodeView {
                id,
                info: n.info.clone(),
                health: n.health.clone(),
                running: n.running,
                hosted: n
                    .hosted
                    .iter()
                    .map(|&(m, v)| (self.models[m].name.clone(), self.models[m].variants[v].0.clone()))
                    .collect(),
                memory_used_mb: self.used_mb(n),
                telemetry: n.telemetry.clone(),
            })
            .collect()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next time [`Dispatcher::handle_timeout`] has something to do, if any.
    pub fn poll_timeout(&self) -> Option<Micros> {
        let expiry = self.models.iter().filter_map(|m| m.sched.poll_timeout());
        let silence = self
            .nodes
            .values()
            .filter(|n| n.info.heartbeats)
            .map(|n| n.last_seen.saturating_add(self.cfg.dead_after_us).saturating_add(1));
        let stale = self
            .inflight
            .values()
            .map(|b| b.dispatched.saturating_add(self.cfg.batch_timeout_us).saturating_add(1));
        expiry.chain(silence).chain(stale).min()
    }

    // ----- membership -----

    /// A node joins; placement asks it to load what fits (unless it is preloaded).
    pub fn handle_node_join(&mut self, now: Micros, info: NodeInfo) -> NodeId {
        let id = self.next_node;
        self.next_node += 1;
        let hosted = if info.preloaded {
            let allowed = self.allowed_models(&info);
            self.models
                .iter()
                .enumerate()
                .filter(|(m, _)| allowed.as_ref().is_none_or(|a| a.contains(m)))
                .flat_map(|(m, model)| (0..model.variants.len()).map(move |v| (m, v)))
                .collect()
        } else {
            BTreeSet::new()
        };
        self.nodes.insert(
            id,
            Node {
                info,
                last_seen: now,
                health: Health::default(),
                running: 0,
                hosted,
                loading: BTreeSet::new(),
                unloading: BTreeSet::new(),
                measured: BTreeMap::new(),
                last_used: BTreeMap::new(),
                telemetry: Telemetry::default(),
            },
        );
        self.place();
        self.refresh_capacity();
        self.pump(now);
        id
    }

    fn allowed_models(&self, info: &NodeInfo) -> Option<BTreeSet<ModelId>> {
        info.models
            .as_ref()
            .map(|names| names.iter().filter_map(|n| self.model_id(n)).collect::<BTreeSet<_>>())
    }

    /// Asks nodes to load what [`placement::solve`] places on them (never unloads: unloading
    /// is an explicit, checked operation).
    fn place(&mut self) {
        let problem = placement::Problem {
            nodes: self
                .nodes
                .iter()
                .filter(|(_, n)| !n.info.preloaded)
                .map(|(&id, n)| NodeCapacity {
                    node: id,
                    memory_mb: n.info.memory_mb,
                    models: self.allowed_models(&n.info),
                })
                .collect(),
            variants: self
                .models
                .iter()
                .enumerate()
                .filter(|(_, model)| !model.retired)
                .flat_map(|(m, model)| {
                    model.variants.iter().enumerate().map(move |(v, (_, mb))| Need {
                        model: m,
                        variant: v,
                        memory_mb: model.measured_mb[v].unwrap_or(*mb),
                    })
                })
                .collect(),
        };
        let previous: Plan = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.info.preloaded)
            .map(|(&id, n)| (id, n.hosted.union(&n.loading).copied().collect()))
            .collect();
        let plan = placement::solve(&problem, &previous);
        debug_assert_eq!(placement::check(&problem, &previous, &plan), Ok(()));
        for (id, slots) in plan {
            let Some(node) = self.nodes.get_mut(&id) else { continue };
            for s in slots {
                if !node.hosted.contains(&s) && node.loading.insert(s) {
                    self.actions.push_back(Action::Load { node: id, model: s.0, variant: s.1 });
                }
            }
        }
    }

    /// A node answered a load request; `error` is empty on success, `memory_mb` is the
    /// resident memory the load added as the node measured it (`None`: not measured). A
    /// measurement replaces the declared size in every later memory check of that variant.
    pub fn handle_loaded(
        &mut self,
        now: Micros,
        node: NodeId,
        model: ModelId,
        variant: usize,
        error: &str,
        memory_mb: Option<u64>,
    ) {
        let retired = self.is_retired(model);
        let Some(n) = self.nodes.get_mut(&node) else { return };
        n.last_seen = n.last_seen.max(now);
        if retired {
            // Loaded after its model was retired: unloaded again at once.
            n.loading.remove(&(model, variant));
            if error.is_empty() && !n.info.preloaded {
                self.actions.push_back(Action::Unload { node, model, variant });
            }
            return;
        }
        if n.loading.remove(&(model, variant)) && error.is_empty() {
            n.hosted.insert((model, variant));
            n.last_used.insert((model, variant), now);
            if let Some(mb) = memory_mb {
                n.measured.insert((model, variant), mb);
                if let Some(slot) = self.models.get_mut(model).and_then(|m| m.measured_mb.get_mut(variant)) {
                    *slot = Some(mb);
                }
            }
            self.refresh_capacity();
            self.pump(now);
        }
    }

    /// Memory variant `(m, v)` takes on node `n`, MB: measured there, else measured on any
    /// node, else declared.
    fn need_mb(&self, n: &Node, m: ModelId, v: usize) -> u64 {
        n.measured
            .get(&(m, v))
            .copied()
            .or(self.models[m].measured_mb[v])
            .unwrap_or(self.models[m].variants[v].1)
    }

    /// Memory resident on node `n`: hosted, loading, and unloads still waiting for batches.
    fn used_mb(&self, n: &Node) -> u64 {
        n.hosted.iter().chain(&n.loading).chain(&n.unloading).map(|&(m, v)| self.need_mb(n, m, v)).sum()
    }

    /// Whether variant `(m, v)` may be evicted from `node` to make room, with `gone` evicted
    /// from it already: no batch of it runs there, the control loop has not chosen it, and its
    /// model stays served by some other hosted variant or copy (load before unload).
    fn evictable(&self, node: NodeId, m: ModelId, v: usize, gone: &[(ModelId, usize)]) -> bool {
        let busy = self.inflight.values().any(|b| b.node == node && b.model == m && b.variant == v);
        let chosen = self.models[m].sched.control().variant == Some(v);
        let others = self.nodes.iter().any(|(&id, n)| {
            n.hosted.range((m, 0)..(m + 1, 0)).any(|&s| id != node || (s != (m, v) && !gone.contains(&s)))
        });
        !busy && !chosen && others
    }

    pub fn handle_heartbeat(&mut self, now: Micros, node: NodeId, telemetry: Telemetry) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.last_seen = n.last_seen.max(now);
            n.telemetry = telemetry;
        }
    }

    /// Any sign of life from a node other than a heartbeat (a result, a load answer).
    pub fn handle_seen(&mut self, now: Micros, node: NodeId) {
        if let Some(n) = self.nodes.get_mut(&node) {
            n.last_seen = n.last_seen.max(now);
        }
    }

    /// A node left (its connection closed, or the driver stopped it): it leaves the pool and
    /// its batches fail over.
    pub fn handle_node_down(&mut self, now: Micros, node: NodeId, why: &str) {
        let Some(n) = self.nodes.remove(&node) else { return };
        let reason = format!("node '{}' is down: {why}", n.info.name);
        self.actions.push_back(Action::Disconnect { node, reason: reason.clone() });
        let lost: Vec<BatchId> =
            self.inflight.iter().filter(|(_, b)| b.node == node).map(|(id, _)| *id).collect();
        for id in lost {
            if let Some(b) = self.inflight.remove(&id) {
                self.models[b.model].running = self.models[b.model].running.saturating_sub(1);
                self.fail_over(now, b, &reason);
            }
        }
        self.refresh_capacity();
        self.pump(now);
    }

    // ----- admin -----

    /// Loads a variant on a node, checked against the node's memory (as measured at load,
    /// else as declared). When it does not fit, the least recently used variants that may go
    /// (`Dispatcher::evictable`) are unloaded first, oldest first and the larger of equally
    /// old ones first, as INFaaS evicts; when even that cannot make room nothing is evicted
    /// and the load is refused.
    pub fn load(&mut self, now: Micros, node: &str, model: &str, variant: &str) -> AdminResult {
        let (id, m, v) = self.resolve(node, model, variant)?;
        let n = &self.nodes[&id];
        if n.info.preloaded || n.hosted.contains(&(m, v)) || n.loading.contains(&(m, v)) {
            return Ok(());
        }
        let need = self.need_mb(n, m, v);
        let free = n.info.memory_mb.saturating_sub(self.used_mb(n));
        if need > free {
            let mut victims: Vec<(Micros, std::cmp::Reverse<u64>, (ModelId, usize))> = n
                .hosted
                .iter()
                .map(|&s| {
                    (
                        n.last_used.get(&s).copied().unwrap_or(0),
                        std::cmp::Reverse(self.need_mb(n, s.0, s.1)),
                        s,
                    )
                })
                .collect();
            victims.sort();
            let mut freed = 0;
            let mut chosen = Vec::new();
            for (_, std::cmp::Reverse(mb), s) in victims {
                if free + freed >= need {
                    break;
                }
                if self.evictable(id, s.0, s.1, &chosen) {
                    freed += mb;
                    chosen.push(s);
                }
            }
            if free + freed < need {
                return Err(Error::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "node '{node}' has {free} MB free, {model}/{variant} needs {need} MB, and evicting \
                         every idle variant the control loop has not chosen would free only {freed} MB"
                    ),
                ));
            }
            for s in chosen {
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.hosted.remove(&s);
                    n.last_used.remove(&s);
                }
                self.actions.push_back(Action::Unload { node: id, model: s.0, variant: s.1 });
            }
            self.refresh_capacity();
        }
        if let Some(n) = self.nodes.get_mut(&id)
            && n.loading.insert((m, v))
        {
            self.actions.push_back(Action::Load { node: id, model: m, variant: v });
        }
        self.pump(now);
        Ok(())
    }

    /// Unloads a variant from a node once another live node hosts it (load before unload):
    /// the node gets no new batch of it at once, and the unload is sent when its batches of
    /// that variant have finished.
    pub fn unload(&mut self, now: Micros, node: &str, model: &str, variant: &str) -> AdminResult {
        let (id, m, v) = self.resolve(node, model, variant)?;
        if !self.nodes[&id].hosted.contains(&(m, v)) {
            return Err(Error::not_found(format!("node '{node}' does not host {model}/{variant}")));
        }
        if !self.nodes.iter().any(|(&o, n)| o != id && n.hosted.contains(&(m, v))) {
            return Err(Error::new(
                ErrorCode::Unavailable,
                format!(
                    "{model}/{variant} is hosted only on '{node}': load it on another node before unloading it"
                ),
            ));
        }
        if let Some(n) = self.nodes.get_mut(&id) {
            n.hosted.remove(&(m, v));
            n.unloading.insert((m, v));
        }
        self.send_unloads(id);
        self.refresh_capacity();
        self.pump(now);
        Ok(())
    }

    fn resolve(&self, node: &str, model: &str, variant: &str) -> Result<(NodeId, ModelId, usize), Error> {
        let id = self.node_id(node).ok_or_else(|| Error::not_found(format!("no live node '{node}'")))?;
        let m = self.model_id(model).ok_or_else(|| Error::not_found(format!("unknown model '{model}'")))?;
        let v = self.models[m]
            .variants
            .iter()
            .position(|(n, _)| n == variant)
            .ok_or_else(|| Error::not_found(format!("unknown variant '{variant}' of '{model}'")))?;
        Ok((id, m, v))
    }

    fn send_unloads(&mut self, node: NodeId) {
        let Some(n) = self.nodes.get(&node) else { return };
        let ready: Vec<(ModelId, usize)> = n
            .unloading
            .iter()
            .copied()
            .filter(|&(m, v)| {
                !self.inflight.values().any(|b| b.node == node && b.model == m && b.variant == v)
            })
            .collect();
        for (m, v) in ready {
            if let Some(n) = self.nodes.get_mut(&node) {
                n.unloading.remove(&(m, v));
            }
            self.actions.push_back(Action::Unload { node, model: m, variant: v });
        }
    }

    // ----- requests -----

    /// A validated request arrives for `model`: it is queued, or answered at once with why not.
    pub fn handle_arrival(&mut self, now: Micros, model: ModelId, r: Request) {
        let Some(m) = self.models.get_mut(model).filter(|m| !m.retired) else {
            self.actions.push_back(Action::Reply {
                model,
                request: r.id,
                why: Why::Rejected,
                error: Error::not_found("unknown model (it was unloaded)"),
            });
            return;
        };
        if let Err((why, r)) = m.sched.admit(now, r) {
            let error = refusal(m, why, &r);
            self.actions.push_back(Action::Reply { model, request: r.id, why: Why::Rejected, error });
            return;
        }
        self.pump(now);
    }

    /// The client of a queued request went away: it is dropped from its queue. (A request
    /// already in a batch runs; its answer finds no one.)
    pub fn handle_cancel(&mut self, now: Micros, model: ModelId, request: u64) -> bool {
        self.retries.remove(&request);
        let removed = self.models.get_mut(model).and_then(|m| m.sched.remove(request)).is_some();
        if removed {
            self.pump(now);
        }
        removed
    }

    /// A batch ended on its node. Returns the members to answer with the node's outputs, or
    /// `None` when there is nothing to answer (unknown batch, one that failed over already,
    /// or a failure the dispatcher answers itself).
    pub fn handle_batch_done(&mut self, now: Micros, batch: BatchId, outcome: BatchOutcome) -> Option<Done> {
        let b = self.inflight.remove(&batch)?;
        self.models[b.model].running = self.models[b.model].running.saturating_sub(1);
        let node = b.node;
        if let Some(n) = self.nodes.get_mut(&node) {
            n.running = n.running.saturating_sub(1);
            n.last_seen = n.last_seen.max(now);
        }
        let done = match outcome {
            BatchOutcome::Ok { service_us, engine_us } => {
                let model = &mut self.models[b.model];
                if let Some(n) = self.nodes.get_mut(&node) {
                    if !b.backlogged {
                        let over = (now.saturating_sub(b.dispatched) as f64 - service_us).max(0.0);
                        n.health.overhead_us = if n.health.successes == 0 {
                            over
                        } else {
                            0.8 * n.health.overhead_us + 0.2 * over
                        };
                    }
                    let speed = n.info.speed.max(1e-6);
                    let factor = n.health.slowdown / speed;
                    if let Some(reference) = model.sched.profiled_us(b.variant, b.rows, Quantile::P50) {
                        n.health.success(engine_us, reference / speed);
                    }
                    model.sched.observe(b.variant, b.rows, service_us / factor.max(1e-6));
                    self.refresh_speed(b.model);
                } else {
                    model.sched.observe(b.variant, b.rows, service_us);
                }
                for r in &b.members {
                    self.retries.remove(&r.id);
                }
                Some(Done { model: b.model, variant: b.variant, node, members: b.members })
            }
            BatchOutcome::Error(msg) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.health.failure();
                }
                let name = self.nodes.get(&node).map_or("?", |n| n.info.name.as_str()).to_string();
                for r in b.members {
                    self.retries.remove(&r.id);
                    self.actions.push_back(Action::Reply {
                        model: b.model,
                        request: r.id,
                        why: Why::BatchError,
                        error: Error::internal(format!("node '{name}': {msg}")),
                    });
                }
                None
            }
            BatchOutcome::Lost(why) => {
                if let Some(n) = self.nodes.get_mut(&node) {
                    n.health.failure();
                }
                let name = self.nodes.get(&node).map_or("?", |n| n.info.name.as_str()).to_string();
                self.fail_over(now, b, &format!("node '{name}' failed: {why}"));
                None
            }
        };
        self.send_unloads(node);
        self.pump(now);
        done
    }

    /// Expiry, silent nodes and stale batches, as of `now`.
    pub fn handle_timeout(&mut self, now: Micros) {
        for k in 0..self.models.len() {
            let gone = self.models[k].sched.expire(now);
            self.answer_expired(now, k, gone);
        }
        let silent: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.info.heartbeats && now > n.last_seen.saturating_add(self.cfg.dead_after_us))
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            self.handle_node_down(now, id, "missed heartbeats");
        }
        let stale: Vec<BatchId> = self
            .inflight
            .iter()
            .filter(|(_, b)| now > b.dispatched.saturating_add(self.cfg.batch_timeout_us))
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.handle_batch_done(now, id, BatchOutcome::Lost("a batch timed out".into()));
        }
        self.pump(now);
    }

    /// Answers requests that can no longer meet their deadline.
    fn answer_expired(&mut self, now: Micros, model: ModelId, gone: Vec<Request>) {
        for r in gone {
            self.retries.remove(&r.id);
            let error = expired(now, &r);
            self.actions.push_back(Action::Reply { model, request: r.id, why: Why::Expired, error });
        }
    }

    /// Puts a failed batch's requests back into their queue, or answers them when they may not
    /// be retried.
    /// (The caller has already taken the batch off its node.)
    fn fail_over(&mut self, now: Micros, b: InFlight, why: &str) {
        let m = &mut self.models[b.model];
        let mut back = Vec::new();
        for r in b.members {
            let tries = self.retries.entry(r.id).or_insert(0);
            let in_time = now as f64 + m.sched.min_latency(&r) <= r.deadline as f64;
            if *tries < self.cfg.max_retries && in_time {
                *tries += 1;
                back.push(r);
            } else {
                self.retries.remove(&r.id);
                let what = if in_time { "it was retried already" } else { "no time left to retry" };
                self.actions.push_back(Action::Reply {
                    model: b.model,
                    request: r.id,
                    why: Why::Failed,
                    error: Error::unavailable(format!("{why}; {what}")),
                });
            }
        }
        m.sched.requeue(back);
    }

    /// Capacity the schedulers plan with: live workers and hosted variants.
    fn refresh_capacity(&mut self) {
        self.reassign_replicas();
        for k in 0..self.models.len() {
            let available = self.available(k);
            let workers: u32 = self
                .nodes
                .values()
                .filter(|n| n.hosted.iter().any(|&(m, _)| m == k))
                .map(|n| n.info.workers)
                .sum();
            let m = &mut self.models[k];
            m.sched.set_available(&available);
            m.sched.set_workers(workers);
            self.refresh_speed(k);
        }
    }

    /// What model `k`'s hosts serve in profile-speed workers: Σ workers · speed / slowdown
    /// (the admission estimate's divisor); refreshed as node health moves.
    fn refresh_speed(&mut self, k: usize) {
        let effective: f64 = self
            .nodes
            .values()
            .filter(|n| n.hosted.iter().any(|&(m, _)| m == k))
            .map(|n| f64::from(n.info.workers) * n.info.speed.max(1e-6) / n.health.slowdown.max(0.1))
            .sum();
        if let Some(m) = self.models.get_mut(k) {
            m.sched.set_capacity(effective);
        }
    }

    /// Forms batches while some model has a free worker for it (see the module docs).
    fn pump(&mut self, now: Micros) {
        self.last_now = self.last_now.max(now);
        let n = self.models.len();
        if n == 0 {
            return;
        }
        let mut stuck = vec![false; n];
        loop {
            let mut progressed = false;
            for step in 0..n {
                let k = (self.first_model + step) % n;
                if stuck[k] || self.models[k].sched.is_empty() || !self.has_free_worker(k) {
                    continue;
                }
                let plan = self.models[k].sched.next_batch(now);
                self.answer_expired(now, k, plan.expired);
                let Some(batch) = plan.batch else {
                    stuck[k] = true;
                    continue;
                };
                let rows: u32 = batch.members.iter().map(|r| r.rows).sum();
                let Some(node) = self.choose(k, batch.variant, rows) else {
                    // Every host of this variant is full: the batch waits for the next change
                    // (a finished batch, a join); no spinning.
                    self.models[k].sched.requeue(batch.members);
                    stuck[k] = true;
                    continue;
                };
                let id = self.next_batch;
                self.next_batch += 1;
                let mut backlogged = false;
                if let Some(nd) = self.nodes.get_mut(&node) {
                    backlogged = !nd.free();
                    nd.running += 1;
                    nd.last_used.insert((k, batch.variant), now);
                }
                self.actions.push_back(Action::Run(Run {
                    batch: id,
                    node,
                    model: k,
                    variant: batch.variant,
                    members: batch.members.iter().map(|r| r.id).collect(),
                    rows,
                    planned_us: batch.planned_us,
                }));
                self.inflight.insert(
                    id,
                    InFlight {
                        node,
                        model: k,
                        variant: batch.variant,
                        members: batch.members,
                        rows,
                        dispatched: now,
                        backlogged,
                    },
                );
                self.models[k].running += 1;
                self.models[k].last_batch = Some(now);
                self.first_model = (k + 1) % n;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        self.finish_retired();
    }

    /// Some live node hosting a variant of `model` has a free worker and a free replica of
    /// the model, and the model runs fewer batches than its replicas allow.
    fn has_free_worker(&self, model: ModelId) -> bool {
        let m = &self.models[model];
        m.replicas.is_none_or(|r| m.running < r)
            && self.nodes.iter().any(|(&id, n)| {
                n.free()
                    && n.hosted.range((model, 0)..(model + 1, 0)).next().is_some()
                    && self.replica_free(model, id)
            })
    }

    /// Whether `model` may start another batch on `node` under its replica quota there.
    fn replica_free(&self, model: ModelId, node: NodeId) -> bool {
        let m = &self.models[model];
        if m.replicas.is_none() {
            return true;
        }
        let here = self.inflight.values().filter(|b| b.model == model && b.node == node).count() as u32;
        here < m.quota.get(&node).copied().unwrap_or(0)
    }

    /// Places `model`'s replicas on nodes: one at a time, each to the live node that hosts the
    /// variant in force (any variant while it loads) and has the most speed per replica
    /// already there, `speed / slowdown / (assigned + 1)`, among the nodes whose workers are
    /// not all budgeted to replicas yet; when every host's threads are budgeted, to the host
    /// with the most speed per replica of any model, `speed / slowdown · workers / (all its
    /// replicas + 1)` (replicas then share threads, spread by speed). Replicas of a model that
    /// dispatched no batch in the last [`ACTIVE_US`] take no threads from others: an idle
    /// model's replica holds its memory, not a core.
    fn assign_replicas(&mut self, model: ModelId) {
        let Some(total) = self.models[model].replicas else {
            self.models[model].quota.clear();
            return;
        };
        let variant = self.models[model].sched.control().variant;
        let hosted_somewhere =
            variant.is_some_and(|v| self.available(model).get(v).copied().unwrap_or(false));
        let hosts = |n: &Node| match variant {
            Some(v) if hosted_somewhere => n.hosted.contains(&(model, v)),
            _ => n.hosted.range((model, 0)..(model + 1, 0)).next().is_some(),
        };
        let mut budget: BTreeMap<NodeId, (f64, u32, u32)> = BTreeMap::new();
        for (&id, n) in &self.nodes {
            if !hosts(n) {
                continue;
            }
            let others: u32 = self
                .models
                .iter()
                .enumerate()
                .filter(|&(k, m)| {
                    k != model && m.last_batch.is_some_and(|t| self.last_now.saturating_sub(t) <= ACTIVE_US)
                })
                .filter_map(|(_, m)| m.quota.get(&id))
                .sum();
            let speed = n.info.speed.max(1e-6) / n.health.slowdown.max(0.1);
            budget.insert(id, (speed, n.info.workers, others));
        }
        let mut quota: BTreeMap<NodeId, u32> = BTreeMap::new();
        let own = |quota: &BTreeMap<NodeId, u32>, id: &NodeId| quota.get(id).copied().unwrap_or(0);
        for _ in 0..total {
            let free = |id: &NodeId, w: u32, others: u32| own(&quota, id) + others < w;
            let open = budget.iter().any(|(id, &(_, w, o))| free(id, w, o));
            let score = |id: &NodeId, s: f64, w: u32, o: u32| {
                if open {
                    s / (f64::from(own(&quota, id)) + 1.0)
                } else {
                    s * f64::from(w) / (f64::from(own(&quota, id) + o) + 1.0)
                }
            };
            let best = budget
                .iter()
                .filter(|&(id, &(_, w, o))| !open || free(id, w, o))
                .max_by(|&(a, &(sa, wa, oa)), &(b, &(sb, wb, ob))| {
                    score(a, sa, wa, oa).total_cmp(&score(b, sb, wb, ob)).then(b.cmp(a))
                })
                .map(|(id, _)| *id);
            let Some(id) = best else { break };
            *quota.entry(id).or_default() += 1;
        }
        self.models[model].quota = quota;
    }

    /// Re-places every configured model's replicas (membership or hosting changed).
    fn reassign_replicas(&mut self) {
        for m in &mut self.models {
            m.quota.clear();
        }
        for k in 0..self.models.len() {
            if self.models[k].replicas.is_some() {
                self.assign_replicas(k);
            }
        }
    }

    /// The per-batch cost beyond the engine of the nodes that host `model` (mean of their
    /// [`Health::overhead_us`]), µs: what the control loop adds to the profiled latency.
    pub fn batch_overhead_us(&self, model: ModelId) -> f64 {
        let o: Vec<f64> = self
            .nodes
            .values()
            .filter(|n| n.hosted.range((model, 0)..(model + 1, 0)).next().is_some())
            .map(|n| n.health.overhead_us)
            .collect();
        o.iter().sum::<f64>() / o.len().max(1) as f64
    }

    /// What one call of `rows` samples on `variant` of `model` is expected to take if sent
    /// now, for plans that span models (cross-modal refinement, [`crate::refine`]):
    /// ```text
    /// over live nodes i hosting the variant:
    ///   tᵢ = predicted_finishᵢ(ℓ(rows))  + overheadᵢ  + ℓ(queued) / hosts
    ///        (instance::predicted_finish: speed, slowdown σ and backlog; overheadᵢ the link and
    ///         driver cost per batch; the last term the model's queue ahead, as one batch spread
    ///         over the hosting nodes' workers)
    /// expected = min tᵢ, with that node's recent failure share
    /// ```
    /// and, beside it, the same call with nothing ahead (`idle_us`) and what the model's
    /// admission asks of a call pinned to this variant (`admit_us`), so that a plan can keep
    /// to calls the dispatcher will take.
    /// `None` when no live node hosts it.
    pub fn expected_service(&self, model: ModelId, variant: usize, rows: u32) -> Option<Expected> {
        let m = self.models.get(model)?;
        if variant >= m.variants.len() {
            return None;
        }
        let latency = m.sched.latency(variant, rows.max(1));
        let hosts: Vec<&Node> =
            self.nodes.values().filter(|n| n.hosted.contains(&(model, variant))).collect();
        let workers: u32 = hosts.iter().map(|n| n.info.workers.max(1)).sum();
        let queued = m.sched.len() as u32;
        let admit_us = m.sched.admit_within_us(Some(variant), rows.max(1));
        let ahead =
            if queued == 0 { 0.0 } else { m.sched.latency(variant, queued) / f64::from(workers.max(1)) };
        hosts
            .iter()
            .map(|n| {
                let view = InstanceView {
                    up: true,
                    speed: n.info.speed,
                    slowdown: n.health.slowdown,
                    workers: n.info.workers,
                    busy: n.running,
                    mean_service_us: n.health.mean_service_us,
                    recent_failures: n.health.failures,
                    recent_successes: n.health.successes,
                };
                let tries = n.health.failures + n.health.successes;
                let failure_rate =
                    if tries == 0 { 0.0 } else { f64::from(n.health.failures) / f64::from(tries) };
                let idle = InstanceView { busy: 0, ..view };
                Expected {
                    latency_us: instance::predicted_finish(&view, latency) + n.health.overhead_us + ahead,
                    idle_us: instance::predicted_finish(&idle, latency) + n.health.overhead_us,
                    admit_us,
                    failure_rate,
                }
            })
            .min_by(|a, b| a.latency_us.total_cmp(&b.latency_us))
    }

    /// Where `model`'s replicas are: (node name, replicas there), empty when unbounded.
    pub fn replica_nodes(&self, model: ModelId) -> Vec<(String, u32)> {
        self.models.get(model).map_or_else(Vec::new, |m| {
            m.quota
                .iter()
                .filter_map(|(id, &q)| self.nodes.get(id).map(|n| (n.info.name.clone(), q)))
                .collect()
        })
    }

    /// Applies the control loop's configuration of `model`: the variant its unpinned requests
    /// run on and its batch limit ([`crate::scheduler::Control`]), and how many of its batches
    /// may run at once (`replicas`; `None` lifts the bound). Batches already planned or running
    /// finish as they were; queued requests are planned under the new configuration, so a change
    /// loses and duplicates nothing. A variant no live node hosts is asked for first (each
    /// placement-managed node that has room loads it) and takes effect once loaded.
    pub fn configure(
        &mut self,
        now: Micros,
        model: ModelId,
        control: crate::scheduler::Control,
        replicas: Option<u32>,
    ) {
        self.last_now = self.last_now.max(now);
        let Some(m) = self.models.get_mut(model) else { return };
        let variant = control.variant.filter(|&v| v < m.variants.len());
        m.sched.set_control(crate::scheduler::Control { variant, ..control });
        m.replicas = replicas.map(|r| r.max(1));
        self.reassign_replicas();
        if let Some(v) = variant
            && !self.available(model).get(v).copied().unwrap_or(false)
        {
            let name = self.models[model].name.clone();
            let vname = self.models[model].variants[v].0.clone();
            let nodes: Vec<String> =
                self.nodes.values().filter(|n| !n.info.preloaded).map(|n| n.info.name.clone()).collect();
            for node in nodes {
                if self.load(now, &node, &name, &vname).is_ok() {
                    break;
                }
            }
        }
        self.pump(now);
    }

    /// The control loop's configuration of `model` in force: (control, replicas).
    pub fn configuration(&self, model: ModelId) -> Option<(crate::scheduler::Control, Option<u32>)> {
        self.models.get(model).map(|m| (m.sched.control(), m.replicas))
    }

    /// The instance for a batch: among live nodes hosting the variant with room.
    fn choose(&mut self, model: ModelId, variant: usize, rows: u32) -> Option<NodeId> {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let views: Vec<InstanceView> = ids
            .iter()
            .map(|id| {
                let n = &self.nodes[id];
                InstanceView {
                    up: n.hosted.contains(&(model, variant))
                        && n.room(self.cfg.backlog_per_worker)
                        && self.replica_free(model, *id),
                    speed: n.info.speed,
                    slowdown: n.health.slowdown,
                    workers: n.info.workers,
                    busy: n.running,
                    mean_service_us: n.health.mean_service_us,
                    recent_failures: n.health.failures,
                    recent_successes: n.health.successes,
                }
            })
            .collect();
        let latency = self.models[model].sched.latency(variant, rows);
        instance::select(self.cfg.selector, &views, latency, &mut self.turn).map(|i| ids[i])
    }
}

fn expired(now: Micros, r: &Request) -> Error {
    Error::new(
        ErrorCode::DeadlineExceeded,
        format!("deadline can no longer be met after {} us in the queue", now.saturating_sub(r.arrival)),
    )
}

fn refusal(m: &Model, why: Reject, r: &Request) -> Error {
    let fastest = m.sched.min_latency(r);
    let left = r.deadline.saturating_sub(r.arrival);
    match why {
        Reject::QueueFull => Error::unavailable(format!(
            "model '{}' queue is full ({} waiting); retry later",
            m.name,
            m.sched.len()
        )),
        Reject::TenantShare => Error::new(
            ErrorCode::ResourceExhausted,
            format!(
                "this tenant holds its whole share of model '{}' queue ({} of {} waiting); retry later",
                m.name,
                m.sched.len(),
                m.sched.config().max_queue
            ),
        ),
        Reject::Capacity => Error::unavailable(format!(
            "not enough capacity to answer within {left} us: {} requests are ahead; retry later or allow more time",
            m.sched.len()
        )),
        Reject::CannotMeetDeadline if fastest.is_infinite() => Error::unavailable(
            "no live instance hosts a variant this request may use; retry later or pin another version",
        ),
        Reject::CannotMeetDeadline => Error::new(
            ErrorCode::DeadlineExceeded,
            format!(
                "cannot meet the deadline: the fastest allowed variant needs ~{fastest:.0} us for {} sample(s), the request allows {left} us",
                r.rows
            ),
        ),
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
