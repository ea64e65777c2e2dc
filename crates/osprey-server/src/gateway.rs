//! The gateway: the table of served models, request validation, per-model queues and the
//! scheduling loop that turns queued requests into batches on an agent.
//!
//! ```text
//! protocol edge --(InputTensor)--> Gateway::validate --(ValidRequest)--> Gateway::infer
//!   -> tenant: model allowed? quota (429)? deadline = now + min(SLO, timeout, deadline_ms)
//!   -> accuracy estimate per variant for this input (the model's estimator; cost measured)
//!   -> bounded channel to the model's scheduling loop (full => UNAVAILABLE)
//!   -> loop (an actor owning an osprey_policy::scheduler::Scheduler):
//!        admit -> refuse at once (504 cannot meet / 503 capacity) or queue
//!        worker free -> next_batch: expired answered 504 now, one batch + variant to run
//!   -> agent worker runs it and answers every member exactly once
//! ```

use crate::agent::{Job, LocalAgent, Member, Observation};
use crate::cluster::{Pool, Take};
use crate::metrics::{Metrics, ModelLabels};
use crate::tenants::Tenants;
use osprey_core::config::AgentConfig;
use osprey_core::config::{Limits, PolicyName, SchedulerSection, TenantConfig};
use osprey_core::error::{Error, ErrorCode, Result};
use osprey_core::model::{ModelSpec, RepositoryProblem, VariantSpec};
use osprey_core::profile::{ModelProfile, Quantile, VariantProfile};
use osprey_core::tensor::{DataType, RawTensor};
use osprey_engine::Session;
use osprey_policy::estimate::{AccuracyEstimator, DataAware, Sample};
use osprey_policy::instance::Selector;
use osprey_policy::scheduler::{Reject, Request, Scheduler, SchedulerConfig, VariantModel};
use osprey_policy::setup::{estimator_for, rule_for};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// A tensor as decoded from the wire, before it is checked against the model.
#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub tensor: RawTensor,
}

/// Request options from protocol parameters.
#[derive(Debug, Default, Clone)]
pub struct RequestOptions {
    /// Triton's `timeout` parameter, microseconds.
    pub timeout_us: Option<u64>,
    /// Osprey's `deadline_ms` parameter.
    pub deadline_ms: Option<u64>,
    /// Triton's `priority`: 1 is the highest; a level p >= 1 multiplies the tenant's weight
    /// by 1 + 1/p (0 or absent: the tenant's weight).
    pub priority: Option<u64>,
    /// Osprey's `min_accuracy`: raises the tenant's accuracy floor for this request.
    pub min_accuracy: Option<f64>,
}

/// A request that passed validation: only these enter a queue.
#[derive(Debug)]
pub struct ValidRequest {
    pub model: Arc<ModelEntry>,
    pub id: String,
    /// Variant pinned through `/versions/{v}`.
    pub pinned: Option<usize>,
    /// Inputs in the model's declared order.
    pub inputs: Vec<RawTensor>,
    pub rows: u32,
    /// Indices of the outputs to return, in the order requested (all when not specified).
    pub outputs: Vec<usize>,
    /// The tighter of the request's `timeout` and `deadline_ms`, if it named one.
    pub timeout: Option<Duration>,
}

/// What a successful inference returns to the protocol layer.
#[derive(Debug)]
pub struct InferOutcome {
    pub model: Arc<ModelEntry>,
    pub variant: usize,
    pub node: String,
    /// Requested outputs, in the requested order, with their declared index.
    pub outputs: Vec<(usize, RawTensor)>,
    pub queue: Duration,
    pub compute: Duration,
    pub deadline_met: bool,
    /// The estimate for this input on the variant that answered.
    pub estimated_accuracy: f64,
    pub batch_size: u32,
    pub tenant: String,
}

/// Cumulative duration, as the statistics extension reports it.
#[derive(Debug, Default, Clone, Copy)]
pub struct Duration2 {
    pub count: u64,
    pub ns: u64,
}

impl Duration2 {
    pub fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns += d.as_nanos() as u64;
    }
}

#[derive(Debug, Default, Clone)]
pub struct BatchStats {
    pub compute_input: Duration2,
    pub compute_infer: Duration2,
    pub compute_output: Duration2,
}

/// Statistics-extension counters of one variant.
#[derive(Debug, Default, Clone)]
pub struct VariantStats {
    pub last_inference_ms: u64,
    pub inference_count: u64,
    pub execution_count: u64,
    pub success: Duration2,
    pub fail: Duration2,
    pub queue: Duration2,
    pub compute_input: Duration2,
    pub compute_infer: Duration2,
    pub compute_output: Duration2,
    pub batches: BTreeMap<u64, BatchStats>,
}

pub struct VariantEntry {
    pub spec: VariantSpec,
    pub session: Arc<Session>,
    pub profile: VariantProfile,
    pub stats: Mutex<VariantStats>,
}

/// One served model: its spec, loaded variants and queue.
pub struct ModelEntry {
    pub spec: ModelSpec,
    pub variants: Vec<VariantEntry>,
    pub estimator: Box<dyn AccuracyEstimator>,
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry").field("name", &self.spec.name).finish()
    }
}

impl ModelEntry {
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn variant_index(&self, name: &str) -> Option<usize> {
        self.variants.iter().position(|v| v.spec.name == name)
    }

    /// Resolves an optional `/versions/{v}` to a variant index.
    pub fn resolve_version(&self, version: &str) -> Result<Option<usize>> {
        if version.is_empty() {
            return Ok(None);
        }
        self.variant_index(version).map(Some).ok_or_else(|| {
            let names: Vec<&str> = self.variants.iter().map(|v| v.spec.name.as_str()).collect();
            Error::not_found(format!(
                "model '{}' has no version '{version}'; versions are variants: {}",
                self.spec.name,
                names.join(", ")
            ))
        })
    }
}

/// A request on its way to a model's scheduling loop.
pub(crate) struct Pending {
    pub req: ValidRequest,
    pub tenant: usize,
    pub tenant_name: String,
    pub weight: f64,
    pub floor: f64,
    pub estimate: Vec<f64>,
    pub enqueued: Instant,
    pub deadline: Instant,
    pub reply: oneshot::Sender<Result<InferOutcome>>,
}

/// Everything the gateway needs to start.
pub struct GatewayConfig {
    pub models: Vec<ModelSpec>,
    pub problems: Vec<RepositoryProblem>,
    pub limits: Limits,
    pub max_batch: u32,
    /// In-process agents (each a pool of worker threads standing for one node); may be empty
    /// when only remote agents serve.
    pub local_agents: Vec<AgentConfig>,
    pub selector: Selector,
    pub tenants: Vec<TenantConfig>,
    pub scheduler: SchedulerSection,
}

pub struct Gateway {
    models: BTreeMap<String, Arc<ModelEntry>>,
    pub tenants: Tenants,
    pub policy: PolicyName,
    epoch: Instant,
    problems: Vec<RepositoryProblem>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    pub pool: Arc<Pool>,
    inflight: AtomicUsize,
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Planning quantile: the scheduler plans with p99 service time (p90 left ~2% late answers
/// under overload in `bench/scheduling.sh`).
const PLAN_QUANTILE: Quantile = Quantile::P99;

/// Loads a model's trained data-aware estimator, if it has one.
fn load_data_aware(spec: &ModelSpec) -> Option<DataAware> {
    let path = spec.dir.join("estimator.json");
    let text = std::fs::read_to_string(&path).ok()?;
    match DataAware::from_json(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(model = %spec.name, "{}: {e}", path.display());
            None
        }
    }
}

fn estimator(policy: PolicyName, spec: &ModelSpec) -> Box<dyn AccuracyEstimator> {
    let (e, fell_back) = estimator_for(policy, spec, load_data_aware(spec));
    if fell_back {
        tracing::warn!(model = %spec.name, "no usable estimator.json (run `osprey train-estimator`); using profiled accuracy");
    }
    e
}

impl Gateway {
    /// Loads every model's variants (a variant that fails to load makes its model a problem,
    /// reported like a broken folder), then starts the agent and one scheduling loop per model.
    /// `measure(model, variant, session)` supplies a latency profile when the model folder has
    /// no `profile.toml`.
    pub fn start(
        config: GatewayConfig,
        mut measure: impl FnMut(&ModelSpec, &VariantSpec, &Session) -> VariantProfile,
    ) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::new());
        let changed = Arc::new(tokio::sync::Notify::new());
        let locals: Vec<Arc<LocalAgent>> = config
            .local_agents
            .iter()
            .map(|a| Arc::new(LocalAgent::start(&a.name, a.threads, metrics.clone(), changed.clone())))
            .collect();
        let total_workers: u32 = config.local_agents.iter().map(|a| a.threads).sum::<u32>().max(1);
        let pool = Arc::new(Pool::new(locals, changed, config.selector, metrics.clone()));
        tokio::spawn(pool.clone().watch());
        let mut models = BTreeMap::new();
        let mut problems = config.problems;
        let mut receivers = Vec::new();
        for spec in config.models {
            let profile = spec.dir.join("profile.toml");
            let profile = if profile.exists() {
                match ModelProfile::load(&profile) {
                    Ok(p) => p,
                    Err(error) => {
                        problems.push(RepositoryProblem { model: spec.name.clone(), error });
                        continue;
                    }
                }
            } else {
                ModelProfile::default()
            };
            let mut variants = Vec::new();
            let mut failed = None;
            for v in &spec.variants {
                match Session::load(&spec, v) {
                    Ok(session) => {
                        let vp = match profile.variant(&v.name) {
                            Some(p) if !p.batches.is_empty() => p.clone(),
                            _ => measure(&spec, v, &session),
                        };
                        variants.push(VariantEntry {
                            spec: v.clone(),
                            session: Arc::new(session),
                            profile: vp,
                            stats: Mutex::default(),
                        });
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(error) = failed {
                problems.push(RepositoryProblem { model: spec.name.clone(), error });
                continue;
            }
            let (tx, rx) = mpsc::channel(config.limits.max_queue);
            let estimator = estimator(config.scheduler.policy, &spec);
            let entry = Arc::new(ModelEntry { spec, variants, estimator, queue: tx });
            receivers.push((entry.clone(), rx));
            models.insert(entry.spec.name.clone(), entry);
        }
        let epoch = Instant::now();
        let gw = Arc::new(Gateway {
            models,
            tenants: Tenants::new(&config.tenants, config.limits.default_timeout_ms, 0),
            policy: config.scheduler.policy,
            epoch,
            problems,
            limits: config.limits.clone(),
            metrics,
            draining: AtomicBool::new(false),
            pool,
            inflight: AtomicUsize::new(0),
            loops: Mutex::default(),
        });
        gw.pool.set_models(gw.models.values().cloned().collect());
        let max_batch = config.max_batch;
        let handles = receivers
            .into_iter()
            .map(|(entry, rx)| {
                let cfg = SchedulerConfig {
                    rule: rule_for(&config.scheduler, &entry.spec),
                    max_rows: max_batch.min(entry.spec.max_batch_size).max(1),
                    max_queue: config.limits.max_queue,
                    quantile: PLAN_QUANTILE,
                    urgency_weight: config.scheduler.urgency_weight,
                    miss_penalty: config.scheduler.miss_penalty,
                    workers: total_workers,
                };
                let variants = entry
                    .variants
                    .iter()
                    .map(|v| VariantModel {
                        profile: v.profile.clone(),
                        accuracy: v.spec.accuracy,
                        swap_us: v.profile.swap_us,
                    })
                    .collect();
                let ctx = LoopContext { entry, pool: gw.pool.clone(), metrics: gw.metrics.clone(), epoch };
                tokio::spawn(schedule_loop(ctx, rx, Scheduler::new(cfg, variants)))
            })
            .collect();
        *gw.loops.lock().unwrap_or_else(|e| e.into_inner()) = handles;
        gw
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<ModelEntry>> {
        self.models.values()
    }

    pub fn problems(&self) -> &[RepositoryProblem] {
        &self.problems
    }

    pub fn agent_name(&self) -> &str {
        self.pool.local_agents().next().map_or("remote", |a| a.name())
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.models.is_empty()
    }

    pub fn model(&self, name: &str) -> Result<&Arc<ModelEntry>> {
        self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            Error::not_found(format!("unknown model '{name}'; served models: {}", known.join(", ")))
        })
    }

    /// Checks decoded inputs against the model: every declared input exactly once, matching
    /// datatype and per-sample shape, one batch size for all, within limits.
    pub fn validate(
        &self,
        model: &str,
        version: &str,
        id: String,
        inputs: Vec<InputTensor>,
        outputs: &[String],
        opts: &RequestOptions,
    ) -> Result<ValidRequest> {
        let entry = self.model(model)?.clone();
        let pinned = entry.resolve_version(version)?;
        let spec = &entry.spec;
        let mut slots: Vec<Option<RawTensor>> = vec![None; spec.inputs.len()];
        for it in inputs {
            let Some(i) = spec.inputs.iter().position(|s| s.name == it.name) else {
                let names: Vec<&str> = spec.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "model '{model}' has no input '{}'; its inputs are: {}",
                    it.name,
                    names.join(", ")
                )));
            };
            if slots[i].is_some() {
                return Err(Error::invalid(format!("input '{}' is given twice", it.name)));
            }
            slots[i] = Some(it.tensor);
        }
        let mut rows: Option<i64> = None;
        let mut tensors = Vec::with_capacity(slots.len());
        for (slot, s) in slots.into_iter().zip(&spec.inputs) {
            let t = slot.ok_or_else(|| Error::invalid(format!("input '{}' is missing", s.name)))?;
            if t.datatype != s.datatype {
                return Err(Error::invalid(format!(
                    "input '{}' must be {}, got {}",
                    s.name, s.datatype, t.datatype
                )));
            }
            if t.shape.len() != s.shape.len() || t.shape[1..] != *s.sample_shape() {
                return Err(Error::invalid(format!(
                    "input '{}' must have shape {:?} (-1 = batch), got {:?}",
                    s.name, s.shape, t.shape
                )));
            }
            let n = t.shape[0];
            if n < 1 || n > i64::from(self.limits.max_request_batch) {
                return Err(Error::invalid(format!(
                    "input '{}': batch size {n} must be within 1..={}",
                    s.name, self.limits.max_request_batch
                )));
            }
            if *rows.get_or_insert(n) != n {
                return Err(Error::invalid("all inputs must have the same batch size"));
            }
            tensors.push(t);
        }
        let mut out_idx = Vec::with_capacity(outputs.len());
        for name in outputs {
            let i = spec
                .outputs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| Error::invalid(format!("model '{model}' has no output '{name}'")))?;
            out_idx.push(i);
        }
        if out_idx.is_empty() {
            out_idx = (0..spec.outputs.len()).collect();
        }
        let mut timeout: Option<Duration> = None;
        if let Some(us) = opts.timeout_us.filter(|&us| us > 0) {
            timeout = Some(Duration::from_micros(us));
        }
        if let Some(ms) = opts.deadline_ms {
            if ms == 0 {
                return Err(Error::invalid("deadline_ms must be positive"));
            }
            let d = Duration::from_millis(ms);
            timeout = Some(timeout.map_or(d, |t| t.min(d)));
        }
        if let Some(a) = opts.min_accuracy
            && !(0.0..=1.0).contains(&a)
        {
            return Err(Error::invalid("min_accuracy must be within 0..1"));
        }
        Ok(ValidRequest {
            model: entry,
            id,
            pinned,
            inputs: tensors,
            rows: rows.unwrap_or(1) as u32,
            outputs: out_idx,
            timeout,
        })
    }

    /// Microseconds on the gateway's clock.
    pub fn now_us(&self) -> u64 {
        micros(self.epoch, Instant::now())
    }

    /// Resolves the caller of a request from its `Authorization` value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<usize> {
        self.tenants.authenticate(authorization)
    }

    /// Admits, queues and awaits one request of `tenant`. Every admitted request ends in
    /// exactly one answer: the outcome or an explicit error.
    pub async fn infer(
        &self,
        req: ValidRequest,
        tenant: usize,
        opts: &RequestOptions,
    ) -> Result<InferOutcome> {
        let entry = req.model.clone();
        let model = entry.name().to_string();
        let tcfg = &self.tenants.get(tenant).config;
        let tenant_name = tcfg.name.clone();
        let fail = |e: Error| {
            self.metrics.request(&model, "", e.code.label());
            self.metrics.tenant_outcome(&tenant_name, &model, e.code.label());
            e
        };
        if self.draining.load(Ordering::Relaxed) {
            return Err(fail(Error::unavailable("server is shutting down")));
        }
        let now = Instant::now();
        self.tenants.admit(tenant, &model, req.rows, micros(self.epoch, now)).map_err(fail)?;
        let slo = Duration::from_millis(tcfg.latency_slo_ms);
        let deadline = now + req.timeout.map_or(slo, |t| t.min(slo));
        let floor = tcfg.accuracy_floor.max(opts.min_accuracy.unwrap_or(0.0));
        let boost = match opts.priority {
            Some(p) if p > 0 => 1.0 + 1.0 / p as f64,
            _ => 1.0,
        };
        let weight = tcfg.weight * boost;
        // Per-input accuracy estimate, averaged over the request's samples.
        let t0 = Instant::now();
        let nv = entry.variants.len();
        let mut estimate = vec![0.0; nv];
        let mut row = vec![0.0; nv];
        let input = &req.inputs[0];
        let per = input.data.len() / (req.rows.max(1) as usize);
        for chunk in input.data.chunks(per.max(1)).take(req.rows as usize) {
            entry.estimator.estimate(Sample { datatype: input.datatype, bytes: chunk }, &mut row);
            for (e, r) in estimate.iter_mut().zip(&row) {
                *e += r / f64::from(req.rows.max(1));
            }
        }
        self.metrics
            .estimator
            .get_or_create(&ModelLabels { model: model.clone() })
            .observe(t0.elapsed().as_secs_f64());
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            req,
            tenant,
            tenant_name: tenant_name.clone(),
            weight,
            floor,
            estimate,
            enqueued: now,
            deadline,
            reply: tx,
        };
        let gauge = self.metrics.pending.get_or_create(&ModelLabels { model: model.clone() }).clone();
        match entry.queue.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(fail(Error::unavailable(format!(
                    "model '{model}' has {} requests waiting; retry later",
                    self.limits.max_queue
                ))));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(fail(Error::unavailable("server is shutting down")));
            }
        }
        gauge.inc();
        self.inflight.fetch_add(1, Ordering::Relaxed);
        let res = rx.await.unwrap_or_else(|_| Err(Error::internal("the request was dropped by its worker")));
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        gauge.dec();
        match &res {
            Ok(o) => {
                let vname = &entry.variants[o.variant].spec.name;
                self.metrics.request(&model, vname, "success");
                self.metrics.tenant_outcome(
                    &tenant_name,
                    &model,
                    if o.deadline_met { "met" } else { "late" },
                );
                self.metrics.tenant_accuracy(&tenant_name, &model, o.estimated_accuracy);
            }
            Err(e) => {
                self.metrics.request(&model, "", e.code.label());
                self.metrics.tenant_outcome(&tenant_name, &model, e.code.label());
            }
        }
        res
    }

    /// Stops admitting, lets every queued request finish, then stops the agent.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        // Scheduling loops end when their queue closes; queues close when the last sender
        // (held by ModelEntry) is gone, so wait instead for the queues to empty.
        // Every admitted request holds `inflight` until it is answered; requests end by their
        // deadlines at the latest, so this wait is bounded.
        while self.inflight.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let loops = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|e| e.into_inner()));
        for h in loops {
            h.abort();
        }
        for a in self.pool.local_agents() {
            a.stop();
        }
    }
}

/// Microseconds since `epoch` (the scheduling loop's clock for the sans-IO policy).
fn micros(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

struct LoopContext {
    entry: Arc<ModelEntry>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    epoch: Instant,
}

/// A request admitted by the scheduler, waiting for its batch.
struct Waiting {
    req: ValidRequest,
    tenant_name: String,
    estimate: Vec<f64>,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<InferOutcome>>,
}

/// How often a loop whose queue cannot run checks it for requests past saving.
const EXPIRY_CHECK: Duration = Duration::from_millis(10);

/// How long a loop with queued work but nothing runnable waits before planning again.
const REPLAN_INTERVAL: Duration = Duration::from_micros(500);

impl LoopContext {
    /// Answers requests that can no longer meet their deadline, at once.
    fn answer_expired(&self, expired: Vec<Request>, waiting: &mut HashMap<u64, Waiting>, now: Instant) {
        for r in expired {
            if let Some(w) = waiting.remove(&r.id) {
                let waited = now.saturating_duration_since(w.enqueued);
                if let Some(vs) = self.entry.variants.first()
                    && let Ok(mut s) = vs.stats.lock()
                {
                    s.fail.add(waited);
                }
                let _ = w.reply.send(Err(Error::new(
                    ErrorCode::DeadlineExceeded,
                    format!("deadline can no longer be met after {} us in the queue", waited.as_micros()),
                )));
            }
        }
    }

    fn admit(
        &self,
        sched: &mut Scheduler,
        waiting: &mut HashMap<u64, Waiting>,
        next_id: &mut u64,
        p: Pending,
    ) {
        let id = *next_id;
        *next_id += 1;
        let r = Request {
            id,
            tenant: p.tenant,
            rows: p.req.rows,
            arrival: micros(self.epoch, p.enqueued),
            deadline: micros(self.epoch, p.deadline),
            weight: p.weight,
            floor: p.floor,
            pinned: p.req.pinned,
            estimate: p.estimate.clone(),
        };
        let t = Instant::now();
        let admitted = sched.admit(micros(self.epoch, t), r);
        self.metrics.decision.observe(t.elapsed().as_secs_f64());
        match admitted {
            Ok(()) => {
                waiting.insert(
                    id,
                    Waiting {
                        req: p.req,
                        tenant_name: p.tenant_name,
                        estimate: p.estimate,
                        enqueued: p.enqueued,
                        deadline: p.deadline,
                        reply: p.reply,
                    },
                );
            }
            Err((why, r)) => {
                let fastest = sched.min_latency(&r);
                let left = r.deadline.saturating_sub(r.arrival);
                let e = match why {
                    Reject::QueueFull => Error::unavailable(format!(
                        "model '{}' queue is full ({} waiting); retry later",
                        self.entry.name(),
                        sched.len()
                    )),
                    Reject::Capacity => Error::unavailable(format!(
                        "not enough capacity to answer within {left} us: {} requests are ahead; retry later or allow more time",
                        sched.len()
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
                };
                let _ = p.reply.send(Err(e));
            }
        }
    }
}

async fn schedule_loop(ctx: LoopContext, mut rx: mpsc::Receiver<Pending>, mut sched: Scheduler) {
    let (feedback, mut observed) = mpsc::unbounded_channel::<Observation>();
    // An interval, not a per-iteration sleep: a steady stream of arrivals must not keep
    // postponing it.
    let mut expiry = tokio::time::interval(EXPIRY_CHECK);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut waiting: HashMap<u64, Waiting> = HashMap::new();
    let mut next_id = 0u64;
    let mut stalled = false;
    loop {
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(p) => {
                    ctx.admit(&mut sched, &mut waiting, &mut next_id, p);
                    stalled = false;
                }
                None => break,
            },
            _ = ctx.pool.wait_free(), if !sched.is_empty() && !stalled => {
                while let Ok(p) = rx.try_recv() {
                    ctx.admit(&mut sched, &mut waiting, &mut next_id, p);
                }
                // Clients that went away are dropped before planning.
                let gone: Vec<u64> = waiting.iter().filter(|(_, w)| w.reply.is_closed()).map(|(id, _)| *id).collect();
                for id in gone {
                    sched.remove(id);
                    waiting.remove(&id);
                }
                                sched.set_available(&ctx.pool.available(&ctx.entry));
                let t = Instant::now();
                let plan = sched.next_batch(micros(ctx.epoch, t));
                ctx.metrics.decision.observe(t.elapsed().as_secs_f64());
                                ctx.answer_expired(plan.expired, &mut waiting, t);
                match plan.batch {
                    Some(b) => {
                        let rows: u32 = b.members.iter().map(|m| m.rows).sum();
                        let predicted = sched.latency(b.variant, rows);
                        // Instance selection; another model's loop may have taken the free
                        // worker since we woke, in which case the batch goes back to the queue.
                                                let slot = match ctx.pool.take(&ctx.entry, b.variant, predicted) {
                            Take::Slot(s) => s,
                            Take::Busy => {
                                sched.requeue(b.members);
                                continue;
                            }
                            Take::NoHost => {
                                // Placement changed since planning: the next plan avoids it.
                                sched.requeue(b.members);
                                stalled = true;
                                continue;
                            }
                        };
                        let members = b
                            .members
                            .iter()
                            .filter_map(|r| waiting.remove(&r.id))
                            .map(|w| Member {
                                estimate: w.estimate.get(b.variant).copied().unwrap_or(0.0),
                                tenant: w.tenant_name,
                                req: w.req,
                                enqueued: w.enqueued,
                                deadline: w.deadline,
                                reply: w.reply,
                            })
                            .collect::<Vec<_>>();
                        let job = Job {
                            model: ctx.entry.clone(),
                            variant: b.variant,
                            members,
                            dispatched: t,
                            permit: None,
                            feedback: Some(feedback.clone()),
                            health: None,
                        };
                        ctx.pool.dispatch(slot, job, predicted);
                    }
                    None => stalled = !sched.is_empty(),
                }
            },
                        Some(o) = observed.recv() => sched.observe(o.variant, o.rows, o.service_us),
                        _ = tokio::time::sleep(REPLAN_INTERVAL), if stalled => stalled = false,
            // No worker free (or none left): queued requests still end at their deadlines.
                        _ = expiry.tick(), if !sched.is_empty() => {
                let t = Instant::now();
                let expired = sched.expire(micros(ctx.epoch, t));
                ctx.answer_expired(expired, &mut waiting, t);
            },
        }
    }
    // The channel closed (shutdown): nothing queued may be left unanswered.
    for w in waiting.into_values() {
        let _ = w.reply.send(Err(Error::unavailable("server is shutting down")));
    }
}

/// Milliseconds since the Unix epoch (statistics' `last_inference`).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Parses a datatype named by a client.
pub fn parse_datatype(s: &str, input: &str) -> Result<DataType> {
    DataType::parse(s).map_err(|e| Error::invalid(format!("input '{input}': {}", e.message)))
}
