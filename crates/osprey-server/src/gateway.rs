//! The gateway: the table of served models, request validation, tenant admission, per-input
//! accuracy estimates, and the hand-off to the cluster's dispatcher.
//!
//! ```text
//! protocol edge --(InputTensor)--> Gateway::validate --(ValidRequest)--> Gateway::infer
//!   -> tenant: model allowed? quota (429)? deadline = now + min(SLO, timeout, deadline_ms)
//!   -> accuracy estimate per variant for this input (the model's estimator; its cost is
//!      spent before admission, so the policy decides with it already paid)
//!   -> Cluster::submit -> osprey_policy::dispatch::Dispatcher: admit or refuse at once,
//!      queue, batch, instance, retry — see `cluster`
//!   -> the answer (or an explicit error) arrives on the request's oneshot
//! ```
//! The request's in-flight count and pending gauge are held by a guard dropped with the
//! request, and a client that goes away cancels its queued request, so drain never waits on
//! a request no one will answer.

use crate::agent::{Agent, LocalAgent};
use crate::cluster::{self, Cluster, Waiting};
use crate::join::JoinToken;
use crate::metrics::{Metrics, ModelMetrics};
use crate::pipeline::{PipelineEntry, PipelineRun};
use crate::tenants::Tenants;
use osprey_core::config::AgentConfig;
use osprey_core::config::{Limits, PolicyName, SchedulerSection, TenantConfig};
use osprey_core::error::{Error, Result};
use osprey_core::model::{ModelSpec, RepositoryProblem, VariantSpec};
use osprey_core::pipeline::PipelineSpec;
use osprey_core::profile::{ModelProfile, VariantProfile};
use osprey_core::tensor::{DataType, RawTensor};
use osprey_engine::Session;
use osprey_policy::dispatch::{DispatchConfig, Dispatcher, ModelSetup, NodeInfo};
use osprey_policy::estimate::{AccuracyEstimator, DataAware, Sample};
use osprey_policy::instance::Selector;
use osprey_policy::scheduler::Request;
use osprey_policy::setup::{Capacity, estimator_for, scheduler_for};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{Notify, oneshot};

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
    /// Osprey's `max_ensemble` (multi-modal models): lowers the tenant's ensemble size.
    pub max_ensemble: Option<u64>,
    /// Osprey's `min_confidence` (multi-modal models): the fused confidence target of this
    /// request, instead of the tenant's.
    pub min_confidence: Option<f64>,
    /// Osprey's `explain` (multi-modal models): explain the answer.
    pub explain: Option<bool>,
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
    /// Triton's `priority` (1 = highest; 0 = the tenant's weight).
    pub priority: Option<u64>,
    /// Raises the tenant's accuracy floor for this request.
    pub min_accuracy: Option<f64>,
    /// Set when the address names a pipeline: `model` is then its first stage and `outputs`
    /// index the last stage's outputs.
    pub pipeline: Option<Arc<PipelineEntry>>,
    /// Set when the address names a multi-modal model: its parts per modality (`model`,
    /// `rows` and `outputs` are then the first part's, `inputs` empty).
    pub multimodal: Option<Box<crate::multimodal::MultiModalRequest>>,
}

/// What a successful inference returns to the protocol layer.
#[derive(Debug)]
pub struct InferOutcome {
    pub model: Arc<ModelEntry>,
    pub variant: usize,
    pub node: Arc<str>,
    /// Requested outputs, in the requested order, with their declared index.
    pub outputs: Vec<(usize, RawTensor)>,
    pub queue: Duration,
    pub compute: Duration,
    pub deadline_met: bool,
    /// The estimate for this input on the variant that answered.
    pub estimated_accuracy: f64,
    pub batch_size: u32,
    pub tenant: Arc<str>,
    /// When a pipeline answered: what ran each stage (`model` is then its last stage).
    pub pipeline: Option<PipelineRun>,
    /// When a multi-modal model answered: what answered and how it was fused (`model` and
    /// `variant` are then the first answer's, `outputs` the fused probabilities).
    pub multimodal: Option<Box<crate::multimodal::MultiModalRun>>,
}

impl InferOutcome {
    /// The name of output `idx` of [`InferOutcome::outputs`]: the multi-modal model's outputs,
    /// or the answering model's.
    pub fn output_name(&self, idx: usize) -> &str {
        match &self.multimodal {
            Some(m) => m.entry.outputs.get(idx).map_or("", |t| t.name.as_str()),
            None => self.model.spec.outputs.get(idx).map_or("", |t| t.name.as_str()),
        }
    }

    /// The name the client addressed: the pipeline's, the multi-modal model's, or the model's.
    pub fn addressed_name(&self) -> &str {
        if let Some(m) = &self.multimodal {
            return m.entry.name();
        }
        self.pipeline.as_ref().map_or(self.model.name(), |r| r.entry.name())
    }
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
    /// Index in the dispatcher's model list.
    pub index: usize,
    /// The series its requests update.
    pub metrics: ModelMetrics,
    /// Requests addressed to it directly (not as a pipeline stage) since start: the control
    /// loop's load telemetry when it configures the model as a one-stage pipeline.
    pub arrivals: Arc<AtomicU64>,
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

    /// The backend the model config reports: `osprey-tract`, `osprey-onnxruntime`, or both
    /// joined by `+` when its variants run on different engines.
    pub fn backend(&self) -> String {
        let mut engines: Vec<&str> = self.variants.iter().map(|v| v.session.engine().as_str()).collect();
        engines.sort_unstable();
        engines.dedup();
        format!("osprey-{}", engines.join("+"))
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

/// A split model request's deadline when it names none.
pub const SPLIT_DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A split model's answer.
pub struct SplitOutcome {
    pub model: String,
    pub embedding: RawTensor,
    /// The epoch each sentence ran on.
    pub epochs: Vec<u64>,
    /// Most attempts any sentence needed (1: no retry).
    pub attempts: usize,
    pub latency: Duration,
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
    /// What remote agents must present to attach; `None`: a token nobody knows (no remote
    /// agent can attach).
    pub join_token: Option<JoinToken>,
    /// Pipelines of the repository; one whose stage models are not all served is a problem.
    pub pipelines: Vec<PipelineSpec>,
    /// Split models of the repository (`split.toml`); one without its weights is a problem
    /// that says how to add them.
    pub splits: Vec<osprey_core::split::SplitSpec>,
    /// Multi-modal models of the repository (`multimodal.toml`); one whose members do not
    /// check against the served models is a problem.
    pub multimodal: Vec<osprey_core::multimodal::MultiModalSpec>,
    /// The repository the models came from, for model control (`None`: no model can be
    /// loaded at run time).
    pub repository: Option<std::path::PathBuf>,
    pub model_control: crate::repository::Mode,
}

impl GatewayConfig {
    /// The given models with default limits, no local agents (tests join their own), the
    /// default tenant and policy.
    pub fn for_test(models: Vec<ModelSpec>) -> GatewayConfig {
        GatewayConfig {
            models,
            problems: Vec::new(),
            limits: Limits::default(),
            max_batch: 8,
            local_agents: Vec::new(),
            selector: Selector::Predicted,
            tenants: Vec::new(),
            scheduler: SchedulerSection::default(),
            join_token: None,
            pipelines: Vec::new(),
            splits: Vec::new(),
            multimodal: Vec::new(),
            repository: None,
            model_control: crate::repository::Mode::None,
        }
    }
}

/// How one call through [`Gateway::infer_stage`] counts against its tenant. A composite
/// request (a pipeline, a multi-modal request) is one request to its tenant: one call admits
/// it and stands for it on the timeline, the others are free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Charge {
    /// Admit it now (quotas) and record its outcome as the request's.
    Admit,
    /// Already admitted by the caller ([`Gateway::admit_call`]); record its outcome.
    Admitted,
    /// Part of a request counted by another call.
    Free,
}

pub struct Gateway {
    /// The served models by name (model control replaces and removes entries at run time).
    pub(crate) models: std::sync::RwLock<BTreeMap<String, Arc<ModelEntry>>>,
    pipelines: BTreeMap<String, Arc<PipelineEntry>>,
    splits: BTreeMap<String, Arc<crate::split::SplitDriver>>,
    multimodals: BTreeMap<String, Arc<crate::multimodal::MultiModalEntry>>,
    pub tenants: Tenants,
    pub policy: PolicyName,
    /// How multi-modal requests are answered (`[scheduler] multimodal`).
    pub multimodal_policy: osprey_core::multimodal::MultiModalPolicy,
    epoch: Instant,
    pub(crate) problems: std::sync::RwLock<Vec<RepositoryProblem>>,
    /// What building a model at run time needs (model control).
    pub(crate) builder: Builder,
    /// Model control: the repository, the mode, one operation at a time.
    pub(crate) control: crate::repository::Control,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    pub cluster: Arc<Cluster>,
    /// Checked on every agent `Attach`.
    pub join_token: JoinToken,
    locals: Vec<Arc<LocalAgent>>,
    /// Admitted requests not yet answered (held by [`InFlight`] guards).
    inflight: Arc<AtomicUsize>,
    /// Notified when `inflight` drops to zero.
    idle: Arc<Notify>,
    /// The dispatcher's timer and the idle memory trimmer, stopped by the drain.
    timer: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Admitted requests since start (the idle trimmer watches it).
    admitted: Arc<std::sync::atomic::AtomicU64>,
    /// The last minutes per second, for the dashboard.
    pub timeline: crate::timeline::Timeline,
    /// The control loop's last applied configuration per target (pipeline or model).
    configurations: Mutex<BTreeMap<String, serde_json::Value>>,
}

/// Hands freed heap memory back to the operating system once the gateway has been idle for
/// a tick after serving: glibc's allocator keeps what a burst used (a 3× overload left the
/// process at ~130 MB against ~30 MB idle), and on an edge box other processes need it.
async fn return_memory_when_idle(inflight: Arc<AtomicUsize>, admitted: Arc<std::sync::atomic::AtomicU64>) {
    let mut seen = 0;
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let now = admitted.load(Ordering::Relaxed);
        if now != seen && inflight.load(Ordering::Acquire) == 0 {
            seen = now;
            trim_heap();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim only releases free pages of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Counts one admitted request until it is answered or its client goes away; the pending
/// gauge moves with it. Dropped with the request, so no path can leak the count.
struct InFlight {
    count: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl InFlight {
    fn new(
        count: Arc<AtomicUsize>,
        idle: Arc<Notify>,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        gauge.inc();
        InFlight { count, idle, gauge }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Cancels a queued request when its client goes away (the future is dropped).
struct CancelOnDrop {
    cluster: Arc<Cluster>,
    model: usize,
    id: Option<u64>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.cluster.cancel(self.model, id);
        }
    }
}

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

/// Builds a served model from its spec: at start for every model, and at run time for model
/// control (the same code, so a model loaded later is served exactly as one loaded at start).
pub(crate) struct Builder {
    scheduler: SchedulerSection,
    cap: Capacity,
    weights: Vec<f64>,
    tenant_names: Vec<String>,
    measure: Box<Measure>,
}

/// Supplies a variant's latency profile when its folder has no `profile.toml`.
type Measure = dyn Fn(&ModelSpec, &VariantSpec, &Session) -> VariantProfile + Send + Sync;

impl Builder {
    /// Loads every variant of `spec` with its latency profile (`profile.toml`, else
    /// measured): the slow part, done before anything served changes.
    pub(crate) fn load(&self, spec: &ModelSpec) -> Result<Vec<VariantEntry>> {
        let path = spec.dir.join("profile.toml");
        let profile = if path.exists() { ModelProfile::load(&path)? } else { ModelProfile::default() };
        spec.variants
            .iter()
            .map(|v| {
                let session = Session::load(spec, v)?;
                let vp = match profile.variant(&v.name) {
                    Some(p) if !p.batches.is_empty() => p.clone(),
                    _ => (self.measure)(spec, v, &session),
                };
                Ok(VariantEntry {
                    spec: v.clone(),
                    session: Arc::new(session),
                    profile: vp,
                    stats: Mutex::default(),
                })
            })
            .collect()
    }

    /// The dispatcher's view of the model.
    pub(crate) fn setup(&self, spec: &ModelSpec, variants: &[VariantEntry]) -> ModelSetup {
        let profiles = variants.iter().map(|v| v.profile.clone()).collect();
        ModelSetup {
            name: spec.name.clone(),
            scheduler: scheduler_for(&self.scheduler, spec, profiles, self.cap, &self.weights),
            variants: variants.iter().map(|v| (v.spec.name.clone(), u64::from(v.spec.memory_mb))).collect(),
        }
    }

    /// The served model under dispatcher id `index`.
    pub(crate) fn entry(
        &self,
        spec: ModelSpec,
        variants: Vec<VariantEntry>,
        index: usize,
        metrics: &Metrics,
    ) -> ModelEntry {
        let estimator = estimator(self.scheduler.policy, &spec);
        let names: Vec<String> = variants.iter().map(|v| v.spec.name.clone()).collect();
        let metrics = metrics.for_model(&spec.name, &names, &self.tenant_names);
        ModelEntry { spec, variants, estimator, index, metrics, arrivals: Default::default() }
    }
}

impl Gateway {
    /// Loads every model's variants (a variant that fails to load makes its model a problem,
    /// reported like a broken folder), then starts the dispatcher, its timer and the local
    /// agents. `measure(model, variant, session)` supplies a latency profile when the model
    /// folder has no `profile.toml`.
    pub fn start(
        config: GatewayConfig,
        measure: impl Fn(&ModelSpec, &VariantSpec, &Session) -> VariantProfile + Send + Sync + 'static,
    ) -> Arc<Gateway> {
        let metrics = Arc::new(Metrics::new());
        let mut problems = config.problems;
        let workers: u32 = config.local_agents.iter().map(|a| a.threads.max(1)).sum();
        let cap = Capacity { max_batch: config.max_batch, max_queue: config.limits.max_queue, workers };
        let tenants = Tenants::new(&config.tenants, config.limits.default_timeout_ms, 0);
        let tenant_names: Vec<String> = tenants.names().map(String::from).collect();
        let weights: Vec<f64> = (0..tenant_names.len()).map(|t| tenants.get(t).config.weight).collect();
        let builder = Builder {
            scheduler: config.scheduler.clone(),
            cap,
            weights,
            tenant_names,
            measure: Box::new(measure),
        };
        let mut models = BTreeMap::new();
        let mut setups = Vec::new();
        // In dispatcher id order.
        let mut entries: Vec<Arc<ModelEntry>> = Vec::new();
        for spec in config.models {
            let name = spec.name.clone();
            let variants = match builder.load(&spec) {
                Ok(v) => v,
                Err(error) => {
                    tracing::error!(model = %name, "not served: {}", error.message);
                    problems.push(RepositoryProblem { model: name, error });
                    continue;
                }
            };
            setups.push(builder.setup(&spec, &variants));
            let entry = Arc::new(builder.entry(spec, variants, setups.len() - 1, &metrics));
            entries.push(entry.clone());
            models.insert(name, entry);
        }
        let dispatch = DispatchConfig {
            selector: config.selector,
            dead_after_us: cluster::DEAD_AFTER.as_micros() as u64,
            batch_timeout_us: cluster::BATCH_TIMEOUT.as_micros() as u64,
            ..DispatchConfig::default()
        };
        let mut pipelines = BTreeMap::new();
        for spec in config.pipelines {
            let name = spec.name.clone();
            if models.contains_key(&name) {
                let error = Error::invalid(format!("pipeline '{name}' has the name of a model"));
                problems.push(RepositoryProblem { model: name, error });
                continue;
            }
            match PipelineEntry::new(spec, &entries) {
                Ok(p) => {
                    pipelines.insert(name, Arc::new(p));
                }
                Err(error) => {
                    tracing::error!(pipeline = %name, "not served: {}", error.message);
                    problems.push(RepositoryProblem { model: name, error });
                }
            }
        }
        let mut multimodals = BTreeMap::new();
        for spec in config.multimodal {
            let name = spec.name.clone();
            if models.contains_key(&name) || pipelines.contains_key(&name) {
                let error =
                    Error::invalid(format!("multi-modal model '{name}' has the name of a model or pipeline"));
                problems.push(RepositoryProblem { model: name, error });
                continue;
            }
            match crate::multimodal::MultiModalEntry::new(spec, &entries) {
                Ok(m) => {
                    multimodals.insert(name, Arc::new(m));
                }
                Err(error) => {
                    tracing::error!(model = %name, "multi-modal model not served: {}", error.message);
                    problems.push(RepositoryProblem { model: name, error });
                }
            }
        }
        let cluster = Cluster::new(Dispatcher::new(dispatch, setups), entries);
        let mut splits = BTreeMap::new();
        for spec in config.splits {
            let name = spec.name.clone();
            if models.contains_key(&name) || pipelines.contains_key(&name) || multimodals.contains_key(&name)
            {
                let error =
                    Error::invalid(format!("split model '{name}' has the name of a model or pipeline"));
                problems.push(RepositoryProblem { model: name, error });
                continue;
            }
            if let Some(why) = spec.missing() {
                tracing::warn!(model = %name, "split model not served: {why}");
                problems.push(RepositoryProblem { model: name, error: Error::unavailable(why) });
                continue;
            }
            match crate::split::SplitDriver::new(spec) {
                Ok(d) => {
                    cluster.add_split(d.clone());
                    splits.insert(name, d);
                }
                Err(error) => {
                    tracing::error!(model = %name, "split model not served: {}", error.message);
                    problems.push(RepositoryProblem { model: name, error });
                }
            }
        }
        let timer = tokio::spawn(cluster.clone().run_timer());
        let inflight = Arc::new(AtomicUsize::new(0));
        let admitted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let trimmer = tokio::spawn(return_memory_when_idle(inflight.clone(), admitted.clone()));
        let locals: Vec<Arc<LocalAgent>> = config
            .local_agents
            .iter()
            .map(|a| Arc::new(LocalAgent::start(&a.name, a.threads, a.speed)))
            .collect();
        for a in &locals {
            let agent: Arc<dyn Agent> = a.clone();
            let info = NodeInfo { speed: a.speed(), ..NodeInfo::local(a.name(), a.workers()) };
            cluster.join(info, agent, a.workers());
        }
        let timeline = crate::timeline::Timeline::new(tenants.names().map(String::from).collect());
        Arc::new(Gateway {
            timeline,
            configurations: Mutex::default(),
            models: std::sync::RwLock::new(models),
            pipelines,
            splits,
            multimodals,
            tenants,
            policy: config.scheduler.policy,
            multimodal_policy: config.scheduler.multimodal,
            epoch: Instant::now(),
            problems: std::sync::RwLock::new(problems),
            builder,
            control: crate::repository::Control::new(config.repository, config.model_control),
            limits: config.limits.clone(),
            metrics,
            draining: AtomicBool::new(false),
            cluster,
            join_token: config.join_token.clone().unwrap_or_else(JoinToken::unguessable),
            locals,
            inflight,
            admitted,
            idle: Arc::new(Notify::new()),
            timer: Mutex::new(vec![timer, trimmer]),
        })
    }

    /// The served models now, by name.
    pub fn models(&self) -> Vec<Arc<ModelEntry>> {
        self.models.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// The repository's problems now (broken folders, models that failed to load).
    pub fn problems(&self) -> Vec<RepositoryProblem> {
        self.problems.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn agent_name(&self) -> &str {
        self.locals.first().map_or("remote", |a| a.name())
    }

    /// Ready: not draining, and every served model has a live node hosting some variant.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed) && {
            let models = self.models.read().unwrap_or_else(|e| e.into_inner());
            !models.is_empty() && models.keys().all(|m| self.cluster.model_ready(m))
        }
    }

    /// Ready to answer `model`: not draining and some live node hosts one of its variants (for
    /// a pipeline: of every stage's model).
    pub fn model_is_ready(&self, model: &str) -> bool {
        if let Some(s) = self.splits.get(model) {
            return !self.draining.load(Ordering::Relaxed) && s.is_ready();
        }
        if let Some(p) = self.pipelines.get(model) {
            return !self.draining.load(Ordering::Relaxed)
                && p.stages.iter().all(|s| self.cluster.model_ready(s.name()));
        }
        if let Some(m) = self.multimodals.get(model) {
            return !self.draining.load(Ordering::Relaxed)
                && m.members().any(|s| self.cluster.model_ready(s));
        }
        !self.draining.load(Ordering::Relaxed) && self.cluster.model_ready(model)
    }

    /// The served split model of that name.
    pub fn split(&self, name: &str) -> Option<&Arc<crate::split::SplitDriver>> {
        self.splits.get(name)
    }

    pub fn splits(&self) -> impl Iterator<Item = &Arc<crate::split::SplitDriver>> {
        self.splits.values()
    }

    /// The served multi-modal model of that name.
    pub fn multimodal(&self, name: &str) -> Option<&Arc<crate::multimodal::MultiModalEntry>> {
        self.multimodals.get(name)
    }

    pub fn multimodals(&self) -> impl Iterator<Item = &Arc<crate::multimodal::MultiModalEntry>> {
        self.multimodals.values()
    }

    /// The served pipeline of that name.
    pub fn pipeline(&self, name: &str) -> Option<&Arc<PipelineEntry>> {
        self.pipelines.get(name)
    }

    pub fn pipelines(&self) -> impl Iterator<Item = &Arc<PipelineEntry>> {
        self.pipelines.values()
    }

    /// Records the control loop's configuration of `target` (shown by the dashboard).
    pub fn set_configuration(&self, target: &str, configuration: serde_json::Value) {
        self.configurations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_string(), configuration);
    }

    /// The control loop's last configuration of `target`, if it has applied one.
    pub fn configuration(&self, target: &str) -> Option<serde_json::Value> {
        self.configurations.lock().unwrap_or_else(|e| e.into_inner()).get(target).cloned()
    }

    /// Seconds since the gateway started.
    pub fn uptime_s(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// A background task the drain stops with the dispatcher's timer (the control loop).
    pub fn add_task(&self, task: tokio::task::JoinHandle<()>) {
        self.timer.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }

    /// Admitted requests not yet answered.
    pub fn in_flight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub fn model(&self, name: &str) -> Result<Arc<ModelEntry>> {
        let models = self.models.read().unwrap_or_else(|e| e.into_inner());
        models.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = models
                .keys()
                .chain(self.pipelines.keys())
                .chain(self.multimodals.keys())
                .map(String::as_str)
                .collect();
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
        if let Some(mm) = self.multimodals.get(model) {
            return self.validate_multimodal(mm.clone(), version, id, inputs, outputs, opts);
        }
        let pipeline = self.pipelines.get(model).cloned();
        let (entry, pinned) = match &pipeline {
            Some(p) => {
                if !version.is_empty() {
                    return Err(Error::not_found(format!(
                        "pipeline '{model}' has no versions; address it as /v2/models/{model}"
                    )));
                }
                (p.stages[0].clone(), None)
            }
            None => {
                let entry = self.model(model)?;
                let pinned = entry.resolve_version(version)?;
                (entry, pinned)
            }
        };
        let spec = &entry.spec;
        let out_specs =
            pipeline.as_ref().map_or(&spec.outputs, |p| &p.stages[p.stages.len() - 1].spec.outputs);
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
            let i = out_specs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| Error::invalid(format!("model '{model}' has no output '{name}'")))?;
            if out_idx.contains(&i) {
                return Err(Error::invalid(format!("output '{name}' is requested twice")));
            }
            out_idx.push(i);
        }
        if out_idx.is_empty() {
            out_idx = (0..out_specs.len()).collect();
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
            priority: opts.priority,
            min_accuracy: opts.min_accuracy,
            pipeline,
            multimodal: None,
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

    /// A split model's inference: one `BYTES` input of sentences (`[n]` or `[n, 1]`), one
    /// `FP32 [n, hidden]` embedding output. The deadline is the request's `timeout` or
    /// `deadline_ms`, else [`SPLIT_DEFAULT_TIMEOUT`] (tenant latency SLOs are written for the
    /// zoo's small models, not for a transformer across nodes).
    pub async fn infer_split(
        &self,
        model: &str,
        version: &str,
        inputs: Vec<InputTensor>,
        requested: &[String],
        opts: &RequestOptions,
        tenant: usize,
    ) -> Result<SplitOutcome> {
        let d = self
            .splits
            .get(model)
            .ok_or_else(|| Error::not_found(format!("unknown model '{model}'")))?
            .clone();
        if !version.is_empty() {
            return Err(Error::not_found(format!("split model '{model}' has no versions")));
        }
        let [input] = &inputs[..] else {
            return Err(Error::invalid(format!("model '{model}' takes one input, 'text' (BYTES)")));
        };
        if input.name != "text" || input.tensor.datatype != osprey_core::tensor::DataType::Bytes {
            return Err(Error::invalid(format!(
                "model '{model}' takes one input 'text' of BYTES, got '{}' of {}",
                input.name, input.tensor.datatype
            )));
        }
        let shape = &input.tensor.shape;
        if !(shape.len() == 1 || (shape.len() == 2 && shape[1] == 1)) || shape[0] < 1 {
            return Err(Error::invalid(format!(
                "input 'text' must be [n] or [n, 1] with n >= 1, got {shape:?}"
            )));
        }
        if shape[0] > i64::from(d.spec.max_batch_size) {
            return Err(Error::invalid(format!(
                "at most {} sentences per request, got {}",
                d.spec.max_batch_size, shape[0]
            )));
        }
        if let Some(o) = requested.iter().find(|o| o.as_str() != "embedding") {
            return Err(Error::invalid(format!("model '{model}' has no output '{o}'; it has 'embedding'")));
        }
        let texts = input
            .tensor
            .byte_elements()?
            .into_iter()
            .map(|b| {
                std::str::from_utf8(b)
                    .map(str::to_string)
                    .map_err(|_| Error::invalid("every 'text' element must be UTF-8"))
            })
            .collect::<Result<Vec<_>>>()?;
        if self.draining.load(Ordering::Relaxed) {
            return Err(Error::unavailable("server is shutting down"));
        }
        let now = Instant::now();
        self.tenants.admit(tenant, model, texts.len() as u32, 0.0, micros(self.epoch, now))?;
        let timeout = opts
            .timeout_us
            .map(Duration::from_micros)
            .into_iter()
            .chain(opts.deadline_ms.map(Duration::from_millis))
            .min()
            .unwrap_or(SPLIT_DEFAULT_TIMEOUT);
        let _guard = InFlight::new(
            self.inflight.clone(),
            self.idle.clone(),
            prometheus_client::metrics::gauge::Gauge::default(),
        );
        let t0 = Instant::now();
        let result = d.embed(&texts, now + timeout).await;
        let label = result.as_ref().map_or_else(|e| e.code.label(), |_| "ok");
        self.metrics.request(model, "", label);
        let (embeddings, replies) = result?;
        let width = d.spec.hidden;
        let flat: Vec<f32> = embeddings.into_iter().flatten().collect();
        let tensor = RawTensor::from_f32(vec![texts.len() as i64, width as i64], &flat)?;
        Ok(SplitOutcome {
            model: model.to_string(),
            embedding: tensor,
            epochs: replies.iter().map(|r| r.epoch).collect(),
            attempts: replies.iter().map(|r| r.attempts).max().unwrap_or(1),
            latency: t0.elapsed(),
        })
    }

    /// Admits, queues and awaits one request of `tenant`. Every admitted request ends in
    /// exactly one answer: the outcome or an explicit error.
    pub async fn infer(&self, mut req: ValidRequest, tenant: usize) -> Result<InferOutcome> {
        if let Some(m) = req.multimodal.take() {
            return self.infer_multimodal(*m, req, tenant).await;
        }
        match req.pipeline.take() {
            Some(p) => self.infer_pipeline(p, req, tenant).await,
            None => {
                req.model.arrivals.fetch_add(1, Ordering::Relaxed);
                self.infer_stage(req, tenant, Charge::Admit).await
            }
        }
    }

    /// Charges `tenant`'s quotas for `req` (rate, concurrency, cost) as its admission would,
    /// without running it: a composite request that starts several calls at once is admitted
    /// (or refused) before any of them runs. A refusal is counted as the request's outcome.
    pub(crate) fn admit_call(&self, req: &ValidRequest, tenant: usize) -> Result<()> {
        let entry = &req.model;
        let fail = |e: Error| {
            let tcfg = &self.tenants.get(tenant).config;
            self.metrics.request(entry.name(), "", e.code.label());
            self.metrics.tenant_outcome(&tcfg.name, entry.name(), e.code.label());
            self.timeline.record(Instant::now(), tenant, crate::timeline::Outcome::Error, None);
            e
        };
        if self.draining.load(Ordering::Relaxed) {
            return Err(fail(Error::unavailable("server is shutting down")));
        }
        let now = Instant::now();
        self.tenants
            .admit(tenant, entry.name(), req.rows, cost_ms(entry, req), micros(self.epoch, now))
            .map_err(fail)
    }

    /// One model's inference, counted against its tenant as `charge` says.
    pub(crate) async fn infer_stage(
        &self,
        req: ValidRequest,
        tenant: usize,
        charge: Charge,
    ) -> Result<InferOutcome> {
        if charge == Charge::Admit {
            self.admit_call(&req, tenant)?;
        }
        // Its outcome stands for the tenant's request on the timeline.
        let admit = charge != Charge::Free;
        let entry = req.model.clone();
        let tcfg = &self.tenants.get(tenant).config;
        let fail = |e: Error| {
            self.metrics.request(entry.name(), "", e.code.label());
            self.metrics.tenant_outcome(&tcfg.name, entry.name(), e.code.label());
            if admit {
                self.timeline.record(Instant::now(), tenant, crate::timeline::Outcome::Error, None);
            }
            e
        };
        if charge != Charge::Admit && self.draining.load(Ordering::Relaxed) {
            return Err(fail(Error::unavailable("server is shutting down")));
        }
        let now = Instant::now();
        let slo = Duration::from_millis(tcfg.latency_slo_ms);
        let deadline = now + req.timeout.map_or(slo, |t| t.min(slo));
        let floor = tcfg.accuracy_floor.max(req.min_accuracy.unwrap_or(0.0));
        let weight = osprey_policy::scheduler::request_weight(tcfg.weight, req.priority);
        let guard = InFlight::new(self.inflight.clone(), self.idle.clone(), entry.metrics.pending.clone());
        self.admitted.fetch_add(1, Ordering::Relaxed);
        // Per-input accuracy estimate, averaged over the request's samples. Its time is spent
        // here, before the dispatcher decides at its own `now`: admission sees it as paid.
        let t0 = Instant::now();
        let estimate = estimate(&entry, &req);
        entry.metrics.estimator.observe(t0.elapsed().as_secs_f64());
        let (tx, rx) = oneshot::channel();
        // Held through the submission: model control swaps a revision under the write side
        // and retires the old one after, so a request reaches either the revision it was
        // validated against before its retirement, or the one serving now.
        let submitted: Result<(u64, usize)> = {
            let served = self.models.read().unwrap_or_else(|e| e.into_inner());
            let mut req = req;
            let moved = match served.get(entry.name()) {
                Some(current) if !Arc::ptr_eq(current, &entry) => {
                    let same = current.spec.inputs == entry.spec.inputs
                        && current.spec.outputs == entry.spec.outputs
                        && current
                            .variants
                            .iter()
                            .map(|v| &v.spec.name)
                            .eq(entry.variants.iter().map(|v| &v.spec.name));
                    if same {
                        req.model = current.clone();
                        Ok(())
                    } else {
                        Err(Error::unavailable(format!(
                            "model '{}' was reloaded with other tensors or variants while this request was \
                             being admitted; send it again",
                            entry.name()
                        )))
                    }
                }
                Some(_) => Ok(()),
                None => Err(Error::not_found(format!("unknown model '{}' (it was unloaded)", entry.name()))),
            };
            moved.map(|()| {
                let policy_req = Request {
                    id: 0,
                    tenant,
                    rows: req.rows,
                    arrival: self.cluster.to_us_pub(now),
                    deadline: self.cluster.to_us_pub(deadline),
                    weight,
                    floor,
                    pinned: req.pinned,
                    estimate: estimate.clone(),
                };
                let index = req.model.index;
                let waiting = Waiting {
                    model: index,
                    req: Arc::new(req),
                    tenant: self.tenants.get(tenant).name.clone(),
                    estimate,
                    enqueued: now,
                    deadline,
                    reply: tx,
                };
                (self.cluster.submit(policy_req, waiting), index)
            })
        };
        // Metrics stay with `entry`: a compatible revision has the same name and variants.
        let (id, index) = submitted.map_err(fail)?;
        let mut cancel = CancelOnDrop { cluster: self.cluster.clone(), model: index, id: Some(id) };
        let res = rx.await.unwrap_or_else(|_| Err(Error::internal("the request was dropped by its worker")));
        cancel.id = None;
        drop(guard);
        match &res {
            Ok(o) => {
                entry.metrics.variants[o.variant].success.inc();
                if let Some(t) = entry.metrics.tenants.get(tenant) {
                    if o.deadline_met { &t.met } else { &t.late }.inc();
                    t.accuracy.observe(o.estimated_accuracy);
                }
                let outcome = if o.deadline_met {
                    crate::timeline::Outcome::Met
                } else {
                    crate::timeline::Outcome::Late
                };
                let variant = entry.variants.get(o.variant).map_or("", |v| v.spec.name.as_str());
                // The timeline counts what tenants sent: a pipeline's first stage stands for
                // the request (its later stages run with `admit` false).
                if admit {
                    self.timeline.record(
                        Instant::now(),
                        tenant,
                        outcome,
                        Some((entry.name(), variant, o.estimated_accuracy)),
                    );
                }
            }
            Err(e) => {
                self.metrics.request(entry.name(), "", e.code.label());
                self.metrics.tenant_outcome(&tcfg.name, entry.name(), e.code.label());
                if admit {
                    self.timeline.record(Instant::now(), tenant, crate::timeline::Outcome::Error, None);
                }
            }
        }
        res
    }

    /// Stops admitting, lets every admitted request finish (each ends by its deadline at the
    /// latest), then stops the agents.
    pub async fn drain(&self) {
        self.drain_within(Duration::MAX).await;
    }

    /// [`Gateway::drain`], waiting at most `grace` for admitted requests; returns how many were
    /// still unanswered when it gave up (their clients' connections close with the process).
    pub async fn drain_within(&self, grace: Duration) -> usize {
        self.draining.store(true, Ordering::Relaxed);
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.inflight.load(Ordering::Acquire) == 0 {
                    break;
                }
                idle.await;
            }
        };
        let left = match tokio::time::timeout(grace, wait).await {
            Ok(()) => 0,
            Err(_) => self.inflight.load(Ordering::Acquire),
        };
        for t in self.timer.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            t.abort();
        }
        self.cluster.stop_agents();
        left
    }
}

/// What a request costs a cost quota: the profiled p50 latency, in milliseconds, of its batch
/// alone on its pinned variant, else on the cheapest variant (the least it will occupy).
fn cost_ms(entry: &ModelEntry, req: &ValidRequest) -> f64 {
    let at = |v: &VariantEntry| {
        v.profile.latency_us(req.rows, osprey_core::profile::Quantile::P50).unwrap_or(0.0) / 1e3
    };
    match req.pinned.and_then(|p| entry.variants.get(p)) {
        Some(v) => at(v),
        None => {
            let c = entry.variants.iter().map(at).fold(f64::INFINITY, f64::min);
            if c.is_finite() { c } else { 0.0 }
        }
    }
}

/// The estimated accuracy of each variant on this request's input, averaged over its samples.
pub(crate) fn estimate(entry: &ModelEntry, req: &ValidRequest) -> Vec<f64> {
    let nv = entry.variants.len();
    let mut estimate = vec![0.0; nv];
    let mut row = vec![0.0; nv];
    let input = &req.inputs[0];
    let rows = req.rows.max(1) as usize;
    let per = input.data.len() / rows;
    for chunk in input.data.chunks(per.max(1)).take(rows) {
        entry.estimator.estimate(Sample { datatype: input.datatype, bytes: chunk }, &mut row);
        for (e, r) in estimate.iter_mut().zip(&row) {
            *e += r / rows as f64;
        }
    }
    estimate
}

/// Microseconds since `epoch`.
fn micros(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_micros() as u64
}

/// Milliseconds since the Unix epoch (statistics' `last_inference`).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Parses a datatype named by a client.
pub fn parse_datatype(s: &str, input: &str) -> Result<DataType> {
    DataType::parse(s).map_err(|e| Error::invalid(format!("input '{input}': {}", e.message)))
}
