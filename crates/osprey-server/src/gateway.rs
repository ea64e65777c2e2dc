//! The gateway: the table of served models, request validation, per-model queues and the
//! scheduling loop that turns queued requests into batches on an agent.
//!
//! ```text
//! protocol edge --(InputTensor)--> Gateway::validate --(ValidRequest)--> Gateway::infer
//!   -> variant chosen now (osprey_policy::select), or refused at once if no variant can
//!      meet the deadline
//!   -> bounded per-model queue (full => UNAVAILABLE)
//!   -> scheduling loop: waits for a free worker, then osprey_policy::batcher::next_batch
//!      expires late requests and groups the oldest request's variant into one batch
//!   -> agent worker runs it and answers every member exactly once
//! ```

use crate::agent::{Job, LocalAgent, Member};
use crate::metrics::{Metrics, ModelLabels};
use osprey_core::config::Limits;
use osprey_core::error::{Error, ErrorCode, Result};
use osprey_core::model::{ModelSpec, RepositoryProblem, VariantSpec};
use osprey_core::profile::{ModelProfile, Quantile, VariantProfile};
use osprey_core::tensor::{DataType, RawTensor};
use osprey_engine::Session;
use osprey_policy::batcher::{Queued, next_batch};
use osprey_policy::select::{Candidate, Selection, most_accurate_within};
use std::collections::{BTreeMap, VecDeque};
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
    /// Triton's `priority` (accepted; ordering by priority comes with tenant scheduling).
    pub priority: Option<u64>,
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
    pub timeout: Duration,
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
    pub estimated_accuracy: f64,
    pub batch_size: u32,
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
    queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for ModelEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelEntry")
            .field("name", &self.spec.name)
            .finish()
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

/// A request waiting in a model's queue.
pub(crate) struct Pending {
    pub req: ValidRequest,
    pub variant: usize,
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
    pub agent_threads: u32,
    pub agent_name: String,
}

pub struct Gateway {
    models: BTreeMap<String, Arc<ModelEntry>>,
    problems: Vec<RepositoryProblem>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    agent: Arc<LocalAgent>,
    loops: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Planning quantile: the selector plans with p90 service time.
const PLAN_QUANTILE: Quantile = Quantile::P90;

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
        let agent = Arc::new(LocalAgent::start(
            &config.agent_name,
            config.agent_threads,
            metrics.clone(),
        ));
        let mut models = BTreeMap::new();
        let mut problems = config.problems;
        let mut receivers = Vec::new();
        for spec in config.models {
            let profile = spec.dir.join("profile.toml");
            let profile = if profile.exists() {
                match ModelProfile::load(&profile) {
                    Ok(p) => p,
                    Err(error) => {
                        problems.push(RepositoryProblem {
                            model: spec.name.clone(),
                            error,
                        });
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
                problems.push(RepositoryProblem {
                    model: spec.name.clone(),
                    error,
                });
                continue;
            }
            let (tx, rx) = mpsc::channel(config.limits.max_queue);
            let entry = Arc::new(ModelEntry {
                spec,
                variants,
                queue: tx,
            });
            receivers.push((entry.clone(), rx));
            models.insert(entry.spec.name.clone(), entry);
        }
        let gw = Arc::new(Gateway {
            models,
            problems,
            limits: config.limits,
            metrics,
            draining: AtomicBool::new(false),
            agent,
            loops: Mutex::default(),
        });
        let max_batch = config.max_batch;
        let handles = receivers
            .into_iter()
            .map(|(entry, rx)| {
                let rows = max_batch.min(entry.spec.max_batch_size).max(1);
                tokio::spawn(schedule_loop(
                    entry,
                    rx,
                    gw.agent.clone(),
                    gw.metrics.clone(),
                    rows,
                ))
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
        self.agent.name()
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && !self.models.is_empty()
    }

    pub fn model(&self, name: &str) -> Result<&Arc<ModelEntry>> {
        self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            Error::not_found(format!(
                "unknown model '{name}'; served models: {}",
                known.join(", ")
            ))
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
                return Err(Error::invalid(format!(
                    "input '{}' is given twice",
                    it.name
                )));
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
        let default_ms = self.limits.default_timeout_ms;
        let mut timeout = Duration::from_millis(default_ms);
        if let Some(us) = opts.timeout_us.filter(|&us| us > 0) {
            timeout = timeout.min(Duration::from_micros(us));
        }
        if let Some(ms) = opts.deadline_ms {
            if ms == 0 {
                return Err(Error::invalid("deadline_ms must be positive"));
            }
            timeout = timeout.min(Duration::from_millis(ms));
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

    /// Admits, queues and awaits one request. Every admitted request ends in exactly one
    /// answer: the outcome or an explicit error.
    pub async fn infer(&self, req: ValidRequest) -> Result<InferOutcome> {
        let entry = req.model.clone();
        let model = entry.name().to_string();
        let fail = |e: Error, variant: &str| {
            self.metrics.request(&model, variant, e.code.label());
            e
        };
        if self.draining.load(Ordering::Relaxed) {
            return Err(fail(Error::unavailable("server is shutting down"), ""));
        }
        let now = Instant::now();
        let deadline = now + req.timeout;
        let cands: Vec<Candidate> = entry
            .variants
            .iter()
            .map(|v| Candidate {
                accuracy: v.spec.accuracy,
                latency_us: v.profile.latency_us(req.rows, PLAN_QUANTILE).unwrap_or(0.0),
            })
            .collect();
        let variant = match most_accurate_within(&cands, req.timeout.as_micros() as f64, req.pinned)
        {
            Selection::Variant(v) => v,
            Selection::CannotMeetDeadline => {
                let fastest = cands
                    .iter()
                    .map(|c| c.latency_us)
                    .fold(f64::INFINITY, f64::min);
                let which = match req.pinned {
                    Some(p) => format!("variant '{}' needs", entry.variants[p].spec.name),
                    None => "the fastest variant needs".into(),
                };
                let need = req.pinned.map_or(fastest, |p| cands[p].latency_us);
                return Err(fail(
                    Error::new(
                        ErrorCode::DeadlineExceeded,
                        format!(
                            "cannot meet the deadline: {which} ~{:.0} us for {} sample(s), the request allows {} us",
                            need,
                            req.rows,
                            req.timeout.as_micros()
                        ),
                    ),
                    "",
                ));
            }
        };
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            req,
            variant,
            enqueued: now,
            deadline,
            reply: tx,
        };
        let gauge = self
            .metrics
            .pending
            .get_or_create(&ModelLabels {
                model: model.clone(),
            })
            .clone();
        match entry.queue.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(fail(
                    Error::unavailable(format!(
                        "model '{model}' queue is full ({} waiting); retry later",
                        self.limits.max_queue
                    )),
                    &entry.variants[variant].spec.name,
                ));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(fail(Error::unavailable("server is shutting down"), ""));
            }
        }
        gauge.inc();
        let res = rx
            .await
            .unwrap_or_else(|_| Err(Error::internal("the request was dropped by its worker")));
        gauge.dec();
        let vname = &entry.variants[variant].spec.name;
        match &res {
            Ok(_) => self.metrics.request(&model, vname, "success"),
            Err(e) => self.metrics.request(&model, vname, e.code.label()),
        }
        res
    }

    /// Stops admitting, lets every queued request finish, then stops the agent.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        // Scheduling loops end when their queue closes; queues close when the last sender
        // (held by ModelEntry) is gone, so wait instead for the queues to empty.
        loop {
            let busy = self
                .models
                .values()
                .any(|m| m.queue.capacity() < m.queue.max_capacity())
                || self.agent.busy();
            if !busy {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let loops = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|e| e.into_inner()));
        for h in loops {
            h.abort();
        }
        self.agent.stop();
    }
}

/// Microseconds since `epoch` (the scheduling loop's clock for the sans-IO policy).
fn micros(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

async fn schedule_loop(
    entry: Arc<ModelEntry>,
    mut rx: mpsc::Receiver<Pending>,
    agent: Arc<LocalAgent>,
    metrics: Arc<Metrics>,
    max_rows: u32,
) {
    let epoch = Instant::now();
    let mut local: VecDeque<Pending> = VecDeque::new();
    loop {
        if local.is_empty() {
            match rx.recv().await {
                Some(p) => local.push_back(p),
                None => return,
            }
        }
        let Some(permit) = agent.acquire().await else {
            return;
        };
        while let Ok(p) = rx.try_recv() {
            local.push_back(p);
        }
        // Clients that went away are dropped before planning.
        local.retain(|p| !p.reply.is_closed());
        let now = Instant::now();
        let view: Vec<Queued> = local
            .iter()
            .map(|p| Queued {
                variant: p.variant,
                rows: p.req.rows,
                deadline: micros(epoch, p.deadline),
            })
            .collect();
        let plan = next_batch(&view, micros(epoch, now), max_rows);
        let mut taken: Vec<(usize, bool)> = plan
            .expired
            .iter()
            .map(|&i| (i, false))
            .chain(plan.members.iter().map(|&i| (i, true)))
            .collect();
        taken.sort_unstable_by_key(|t| std::cmp::Reverse(t.0));
        let mut members = Vec::with_capacity(plan.members.len());
        for (i, run) in taken {
            let Some(p) = local.remove(i) else { continue };
            if run {
                members.push(p);
            } else {
                let waited = now.saturating_duration_since(p.enqueued);
                let vs = &entry.variants[p.variant];
                if let Ok(mut s) = vs.stats.lock() {
                    s.fail.add(waited);
                }
                let _ = p.reply.send(Err(Error::new(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "deadline exceeded after {} us in the queue",
                        waited.as_micros()
                    ),
                )));
            }
        }
        if members.is_empty() {
            continue;
        }
        members.reverse();
        let members = members
            .into_iter()
            .map(|p| Member {
                req: p.req,
                enqueued: p.enqueued,
                deadline: p.deadline,
                reply: p.reply,
            })
            .collect();
        let _ = &metrics;
        agent.submit(Job {
            model: entry.clone(),
            variant: plan.variant,
            members,
            dispatched: now,
            permit,
        });
    }
}

/// Milliseconds since the Unix epoch (statistics' `last_inference`).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Parses a datatype named by a client.
pub fn parse_datatype(s: &str, input: &str) -> Result<DataType> {
    DataType::parse(s).map_err(|e| Error::invalid(format!("input '{input}': {}", e.message)))
}
