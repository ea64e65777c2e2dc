//! The discrete-event engine: a thin driver of `osprey_policy::dispatch::Dispatcher`, the same
//! object the live gateway drives.
//!
//! Virtual time in microseconds; events are taken from a heap in (time, sequence) order, so
//! time never goes back and ties resolve in insertion order. Events: arrival, batch end, node
//! failure / recovery / slowdown, and the dispatcher's own timer (whatever `poll_timeout`
//! asks for: expiry, stale batches). Every decision — admission, batch and variant, node,
//! health, retry and failover — is the dispatcher's; this module only models time and nodes:
//!
//! ```text
//! service(batch on n) = ℓ₅₀(rows) / speed_n × slowdown_n × lognormal(jitter_cv) + 2·link_n + bytes / bandwidth_n
//! start(batch on n)   = the earliest time one of n's workers is free (batches queue on a node)
//! ```
//!
//! Several models share the nodes, as live. The schedulers and estimators are built by
//! `osprey_policy::setup` exactly as the gateway builds them. A request's per-input estimate
//! costs `estimator_us` before admission, and the scheduler plans with its deadline less
//! `request_overhead_us` (the time outside the worker that live serving spends after the
//! batch); an answer is on time when `end + request_overhead_us ≤ deadline`.
//!
//! Every request ends exactly once: answered (on time or late), rejected at admission, expired
//! in the queue, or failed (its node died and no retry could still meet the deadline).

use crate::scenario::{EventKind, Scenario};
use osprey_core::config::{PolicyName, SchedulerSection};
use osprey_core::model::{EvalSet, ModelSpec, scan_repository};
use osprey_core::profile::{ModelProfile, Quantile};
use osprey_policy::dispatch::{
    Action, BatchId, BatchOutcome, DispatchConfig, Dispatcher, ModelSetup, NodeId, NodeInfo, Run, Why,
};
use osprey_policy::estimate::{AccuracyEstimator, DataAware, Sample};
use osprey_policy::instance::Selector;
use osprey_policy::scheduler::Request;
use osprey_policy::setup::{Capacity, estimator_for, scheduler_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;

/// One model a scenario serves: spec, evaluation set, profile and trained estimator.
pub struct ModelContext {
    pub spec: ModelSpec,
    pub eval: EvalSet,
    pub profile: ModelProfile,
    pub data_aware: Option<DataAware>,
}

impl ModelContext {
    /// The scenario's first model.
    pub fn load(scn: &Scenario, base: &Path) -> Result<ModelContext, String> {
        load_models(scn, base)?.into_iter().next().ok_or_else(|| "the scenario names no model".to_string())
    }

    pub(crate) fn load_named(name: &str, repo: &Path) -> Result<ModelContext, String> {
        let (models, _) = scan_repository(repo).map_err(|e| e.to_string())?;
        let spec = models
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| format!("model '{name}' not found in {}", repo.display()))?;
        let eval = spec
            .load_eval()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("model '{}' has no evaluation set; the simulator needs one", spec.name))?;
        let profile = ModelProfile::load(&spec.dir.join("profile.toml"))
            .map_err(|e| format!("{e} (run `osprey profile --model {}`)", spec.name))?;
        let data_aware = std::fs::read_to_string(spec.dir.join("estimator.json"))
            .ok()
            .and_then(|t| DataAware::from_json(&t).ok());
        Ok(ModelContext { spec, eval, profile, data_aware })
    }
}

/// Every model the scenario serves, in its order.
pub fn load_models(scn: &Scenario, base: &Path) -> Result<Vec<ModelContext>, String> {
    let repo = base.join(&scn.model_repository);
    scn.model_shares().iter().map(|m| ModelContext::load_named(&m.name, &repo)).collect()
}

/// One arrival: time, tenant, model, evaluation sample (from the held-out half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub t: u64,
    pub tenant: usize,
    pub model: usize,
    pub sample: usize,
}

/// An index drawn with probability proportional to its (non-negative) share.
pub(crate) fn pick(rng: &mut StdRng, shares: &[f64]) -> usize {
    let total: f64 = shares.iter().map(|s| s.max(0.0)).sum::<f64>().max(1e-12);
    let mut x = rng.random::<f64>() * total;
    for (i, s) in shares.iter().enumerate() {
        if x < s.max(0.0) {
            return i;
        }
        x -= s.max(0.0);
    }
    shares.len().saturating_sub(1)
}

/// Draws the arrivals of a scenario (shared by every policy it compares). Inputs come only
/// from each model's held-out half ([`EvalSet::held_out`]), never from what trained the
/// estimators.
pub fn arrivals(scn: &Scenario, base: &Path, models: &[ModelContext]) -> Result<Vec<Arrival>, String> {
    let times = scn.workload.arrivals(scn.duration_s, scn.seed, base)?;
    let mut rng = StdRng::seed_from_u64(scn.seed ^ 0x9e37_79b9_7f4a_7c15);
    let tenant_shares: Vec<f64> = scn.tenants.iter().map(|t| t.share).collect();
    let model_shares: Vec<f64> = scn.model_shares().iter().map(|m| m.share).collect();
    let held: Vec<Vec<usize>> = models.iter().map(|m| m.eval.held_out()).collect();
    Ok(times
        .into_iter()
        .map(|t| {
            let tenant = pick(&mut rng, &tenant_shares);
            let model = if model_shares.len() > 1 { pick(&mut rng, &model_shares) } else { 0 };
            let h = &held[model.min(held.len().saturating_sub(1))];
            let sample = h.get(rng.random_range(0..h.len().max(1))).copied().unwrap_or(0);
            Arrival { t, tenant, model, sample }
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Event {
    Arrival(usize),
    BatchDone(BatchId),
    Node(usize),
    Timer,
}

/// Totals of one policy's run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub policy: String,
    pub requests: u64,
    /// Answered (on time or late).
    pub completed: u64,
    pub late: u64,
    pub rejected: u64,
    pub expired: u64,
    pub failed: u64,
    pub retried: u64,
    pub correct: u64,
    pub on_time_correct: u64,
    /// Latency of answered requests, µs, sorted.
    pub latencies_us: Vec<u64>,
    /// Σ busy worker-seconds × node cost.
    pub cost: f64,
    /// Worker-seconds available (for utilisation).
    pub capacity_s: f64,
    pub busy_s: f64,
    pub events: u64,
    pub duration_s: f64,
    pub mean_slo_us: f64,
    /// Requests answered by each variant, models in order, each model's variants in order
    /// (names in `variant_names`).
    pub variants: Vec<u64>,
    /// `model/variant` for each entry of `variants`.
    pub variant_names: Vec<String>,
}

/// One time-series bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Interval {
    pub t_s: f64,
    pub arrivals: u64,
    pub completed: u64,
    pub not_on_time: u64,
    pub correct: u64,
    pub cost: f64,
}

/// One decision the dispatcher made, as a log line (the live/sim cross-check compares these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub t_us: u64,
    pub model: usize,
    pub variant: usize,
    pub node: String,
    pub rows: u32,
}

pub(crate) struct SimNode {
    name: String,
    spec: usize,
    /// True slowdown from scenario events (the dispatcher only sees its effect).
    slowdown: f64,
    /// When each worker is free next.
    free_at: Vec<u64>,
}

pub(crate) struct Running {
    node: NodeId,
    model: usize,
    variant: usize,
    /// Time the node itself spent (what it reports), µs.
    service_us: f64,
}

pub(crate) struct Sim<'a> {
    pub(crate) scn: &'a Scenario,
    pub(crate) models: &'a [ModelContext],
    pub(crate) d: Dispatcher,
    pub(crate) estimators: Vec<Box<dyn AccuracyEstimator>>,
    pub(crate) cache: Vec<Vec<Option<Vec<f64>>>>,
    pub(crate) heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    pub(crate) seq: u64,
    pub(crate) now: u64,
    pub(crate) nodes: HashMap<NodeId, SimNode>,
    /// Scenario node index -> its current dispatcher id (a recovered node joins anew).
    pub(crate) live: Vec<Option<NodeId>>,
    pub(crate) running: HashMap<BatchId, Running>,
    pub(crate) arrivals: &'a [Arrival],
    pub(crate) ran: HashSet<u64>,
    pub(crate) rng: StdRng,
    pub(crate) out: Summary,
    pub(crate) series: Vec<Interval>,
    pub(crate) timer_at: Option<u64>,
    pub(crate) sample_bytes: Vec<usize>,
    pub(crate) variant_base: Vec<usize>,
    pub(crate) decisions: Vec<Decision>,
    /// A multi-modal run: arrivals are paired events, answered through `crate::multimodal`.
    pub(crate) mm: Option<crate::multimodal::State>,
}

/// Runs one policy on the scenario's arrivals with Osprey's instance selection.
pub fn simulate(
    scn: &Scenario,
    models: &[ModelContext],
    policy: PolicyName,
    arrivals: &[Arrival],
) -> (Summary, Vec<Interval>) {
    simulate_with(scn, models, policy, Selector::Predicted, arrivals)
}

/// Parses an instance selector name: `predicted`, `round-robin`, `least-queue`.
pub fn selector(name: &str) -> Option<Selector> {
    match name {
        "predicted" => Some(Selector::Predicted),
        "round-robin" => Some(Selector::RoundRobin),
        "least-queue" => Some(Selector::LeastQueue),
        _ => None,
    }
}

/// Runs one policy with one instance selector on the scenario's arrivals.
pub fn simulate_with(
    scn: &Scenario,
    models: &[ModelContext],
    policy: PolicyName,
    selector: Selector,
    arrivals: &[Arrival],
) -> (Summary, Vec<Interval>) {
    let (s, i, _) = simulate_logged(scn, models, policy, selector, arrivals);
    (s, i)
}

/// Like [`simulate_with`], also returning every batch decision in order.
pub fn simulate_logged(
    scn: &Scenario,
    models: &[ModelContext],
    policy: PolicyName,
    selector: Selector,
    arrivals: &[Arrival],
) -> (Summary, Vec<Interval>, Vec<Decision>) {
    let mut sim = Sim::new(scn, models, policy, selector, arrivals);
    sim.execute();
    (sim.out, sim.series, sim.decisions)
}

impl<'a> Sim<'a> {
    /// The engine for one policy, its nodes joined, nothing run yet.
    pub(crate) fn new(
        scn: &'a Scenario,
        models: &'a [ModelContext],
        policy: PolicyName,
        selector: Selector,
        arrivals: &'a [Arrival],
    ) -> Sim<'a> {
        let section = SchedulerSection {
            policy,
            fixed_variant: scn.scheduler.fixed_variant.clone(),
            urgency_weight: scn.scheduler.urgency_weight,
            miss_penalty: scn.scheduler.miss_penalty,
            ..SchedulerSection::default()
        };
        let workers: u32 = scn.nodes.iter().map(|n| n.workers).sum();
        let cap = Capacity { max_batch: scn.max_batch, max_queue: 1 << 16, workers };
        let weights: Vec<f64> = scn.tenants.iter().map(|t| t.weight).collect();
        let setups = models
            .iter()
            .map(|m| {
                let profiles = m
                    .spec
                    .variants
                    .iter()
                    .map(|v| m.profile.variant(&v.name).cloned().unwrap_or_default())
                    .collect();
                ModelSetup {
                    name: m.spec.name.clone(),
                    scheduler: scheduler_for(&section, &m.spec, profiles, cap, &weights),
                    variants: m
                        .spec
                        .variants
                        .iter()
                        .map(|v| (v.name.clone(), u64::from(v.memory_mb)))
                        .collect(),
                }
            })
            .collect();
        let d = Dispatcher::new(DispatchConfig { selector, ..DispatchConfig::default() }, setups);
        let estimators =
            models.iter().map(|m| estimator_for(policy, &m.spec, m.data_aware.clone()).0).collect();
        let intervals = (scn.duration_s / scn.interval_s).ceil() as usize;
        let mut variant_base = Vec::new();
        let mut names = Vec::new();
        for m in models {
            variant_base.push(names.len());
            names.extend(m.spec.variants.iter().map(|v| format!("{}/{}", m.spec.name, v.name)));
        }
        let mut sim = Sim {
            scn,
            models,
            d,
            estimators,
            cache: models.iter().map(|m| vec![None; m.eval.len()]).collect(),
            heap: BinaryHeap::new(),
            seq: 0,
            now: 0,
            nodes: HashMap::new(),
            live: vec![None; scn.nodes.len()],
            running: HashMap::new(),
            arrivals,
            ran: HashSet::new(),
            rng: StdRng::seed_from_u64(scn.seed.wrapping_add(17)),
            out: Summary {
                policy: policy.as_str().into(),
                duration_s: scn.duration_s,
                variants: vec![0; names.len()],
                variant_names: names,
                mean_slo_us: scn.tenants.iter().map(|t| t.latency_slo_ms * 1000.0).sum::<f64>()
                    / scn.tenants.len().max(1) as f64,
                ..Summary::default()
            },
            series: (0..intervals.max(1))
                .map(|i| Interval { t_s: i as f64 * scn.interval_s, ..Interval::default() })
                .collect(),
            timer_at: None,
            sample_bytes: models
                .iter()
                .map(|m| m.spec.inputs[0].sample_elements() * m.spec.inputs[0].datatype.size())
                .collect(),
            variant_base,
            decisions: Vec::new(),
            mm: None,
        };
        sim.out.capacity_s = f64::from(workers) * scn.duration_s;
        for k in 0..scn.nodes.len() {
            sim.join(k);
        }
        sim
    }

    /// Runs every arrival to its end.
    pub(crate) fn execute(&mut self) {
        self.run();
        self.out.latencies_us.sort_unstable();
    }
}

impl Sim<'_> {
    pub(crate) fn push(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, e)));
    }

    pub(crate) fn bucket(&mut self, t: u64) -> Option<&mut Interval> {
        let i = (t as f64 / 1e6 / self.scn.interval_s) as usize;
        self.series.get_mut(i)
    }

    fn join(&mut self, k: usize) {
        let n = &self.scn.nodes[k];
        let info = NodeInfo { speed: n.speed, ..NodeInfo::local(&n.name, n.workers) };
        let id = self.d.handle_node_join(self.now, info);
        self.nodes.insert(
            id,
            SimNode {
                name: n.name.clone(),
                spec: k,
                slowdown: 1.0,
                free_at: vec![self.now; n.workers as usize],
            },
        );
        self.live[k] = Some(id);
        self.actions();
    }

    fn run(&mut self) {
        for (i, a) in self.arrivals.iter().enumerate() {
            self.push(a.t + self.scn.estimator_us as u64, Event::Arrival(i));
        }
        for (k, e) in self.scn.events.iter().enumerate() {
            self.push((e.at_s * 1e6) as u64, Event::Node(k));
        }
        self.arm();
        while let Some(Reverse((t, _, e))) = self.heap.pop() {
            debug_assert!(t >= self.now, "time went back");
            self.now = t;
            self.out.events += 1;
            match e {
                Event::Arrival(i) if self.mm.is_some() => self.mm_arrive(i),
                Event::Arrival(i) => self.arrive(i),
                Event::BatchDone(b) => self.finish(b),
                Event::Node(k) => self.node_event(k),
                // Only the armed timer counts; one superseded by an earlier wake-up is stale
                // (re-arming from stale timers would multiply them).
                Event::Timer if self.timer_at == Some(self.now) => {
                    self.timer_at = None;
                    self.d.handle_timeout(self.now);
                }
                Event::Timer => {}
            }
            self.actions();
            self.arm();
        }
        debug_assert_eq!(self.d.queued(), 0, "drained");
    }

    /// Schedules the dispatcher's next wake-up, if it moved earlier.
    fn arm(&mut self) {
        if let Some(t) = self.d.poll_timeout() {
            let t = t.max(self.now);
            if self.timer_at.is_none_or(|a| t < a) {
                self.timer_at = Some(t);
                self.push(t, Event::Timer);
            }
        }
    }

    pub(crate) fn estimate(&mut self, model: usize, sample: usize) -> Vec<f64> {
        let nv = self.models[model].spec.variants.len();
        let cacheable = self.estimators[model].name() != "per-class";
        if cacheable && let Some(e) = &self.cache[model][sample] {
            return e.clone();
        }
        let mut out = vec![0.0; nv];
        let m = &self.models[model];
        let s = Sample { datatype: m.spec.inputs[0].datatype, bytes: m.eval.sample(sample) };
        self.estimators[model].estimate(s, &mut out);
        if cacheable {
            self.cache[model][sample] = Some(out.clone());
        }
        out
    }

    fn arrive(&mut self, i: usize) {
        let a = self.arrivals[i];
        self.out.requests += 1;
        if let Some(b) = self.bucket(a.t) {
            b.arrivals += 1;
        }
        let t = &self.scn.tenants[a.tenant];
        let deadline = a.t + (t.latency_slo_ms * 1000.0) as u64;
        let r = Request {
            id: i as u64,
            tenant: a.tenant,
            rows: 1,
            arrival: a.t,
            // The time answers need after the batch is charged where the decision is made.
            deadline: deadline.saturating_sub(self.scn.request_overhead_us as u64),
            weight: t.weight,
            floor: t.accuracy_floor,
            pinned: None,
            estimate: self.estimate(a.model, a.sample),
        };
        self.d.handle_arrival(self.now, a.model, r);
    }

    pub(crate) fn not_on_time(&mut self, t: u64) {
        if let Some(b) = self.bucket(t) {
            b.not_on_time += 1;
        }
    }

    /// Carries out the dispatcher's actions.
    fn actions(&mut self) {
        while let Some(a) = self.d.poll_action() {
            match a {
                Action::Run(run) => self.start(run),
                Action::Reply { request, why, .. } if self.mm.is_some() => self.mm_reply(request, why),
                Action::Reply { why, .. } => {
                    match why {
                        Why::Rejected => self.out.rejected += 1,
                        Why::Expired => self.out.expired += 1,
                        Why::Failed | Why::BatchError => self.out.failed += 1,
                    }
                    self.not_on_time(self.now);
                }
                // Simulated nodes host every variant and need no connection.
                Action::Load { .. }
                | Action::Unload { .. }
                | Action::Disconnect { .. }
                | Action::Retired { .. } => {}
            }
        }
    }

    fn start(&mut self, run: Run) {
        for id in &run.members {
            if !self.ran.insert(*id) {
                self.out.retried += 1;
            }
        }
        let Some(node) = self.nodes.get(&run.node) else { return };
        let spec = &self.scn.nodes[node.spec];
        let m = &self.models[run.model];
        let base = m
            .profile
            .variant(&m.spec.variants[run.variant].name)
            .and_then(|p| p.latency_us(run.rows, Quantile::P50))
            .unwrap_or(0.0);
        let cv = self.scn.jitter_cv.max(0.0);
        let sigma = (1.0 + cv * cv).ln().sqrt();
        let z = {
            let (u1, u2) = (1.0 - self.rng.random::<f64>(), self.rng.random::<f64>());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let noise = (sigma * z - sigma * sigma / 2.0).exp();
        let bytes = (run.rows as usize * self.sample_bytes[run.model]) as f64;
        let bandwidth = spec.bandwidth_mbps.map(|m| m / 8.0);
        let transfer = 2.0 * spec.link_ms * 1000.0 + bandwidth.map_or(0.0, |b| bytes / b.max(1e-9));
        let service = base / spec.speed * node.slowdown * noise;
        self.decisions.push(Decision {
            t_us: self.now,
            model: run.model,
            variant: run.variant,
            node: node.name.clone(),
            rows: run.rows,
        });
        let Some(node) = self.nodes.get_mut(&run.node) else { return };
        // The earliest free worker takes it (batches beyond the workers queue on the node).
        let w = (0..node.free_at.len()).min_by_key(|&w| node.free_at[w]).unwrap_or(0);
        let begin = node.free_at.get(w).copied().unwrap_or(self.now).max(self.now);
        let end = begin + (service + transfer).ceil().max(1.0) as u64;
        if let Some(f) = node.free_at.get_mut(w) {
            *f = end;
        }
        self.running.insert(
            run.batch,
            Running { node: run.node, model: run.model, variant: run.variant, service_us: service },
        );
        self.push(end, Event::BatchDone(run.batch));
    }

    fn finish(&mut self, id: BatchId) {
        let Some(b) = self.running.remove(&id) else { return };
        let Some(node) = self.nodes.get(&b.node) else { return }; // died with its node
        let cost = b.service_us / 1e6 * self.scn.nodes[node.spec].cost_per_s;
        let Some(done) = self.d.handle_batch_done(
            self.now,
            id,
            BatchOutcome::Ok { service_us: b.service_us, engine_us: b.service_us },
        ) else {
            return; // failed over already
        };
        self.out.cost += cost;
        self.out.busy_s += b.service_us / 1e6;
        let now = self.now;
        if let Some(bk) = self.bucket(now) {
            bk.cost += cost;
        }
        let overhead = self.scn.request_overhead_us.max(0.0) as u64;
        if self.mm.is_some() {
            for r in done.members {
                self.mm_answer(r.id, b.model, b.variant);
            }
            return;
        }
        let m = &self.models[b.model];
        for r in done.members {
            let a = self.arrivals[r.id as usize];
            let right = m.eval.correct[b.variant][a.sample];
            let deadline = a.t + (self.scn.tenants[a.tenant].latency_slo_ms * 1000.0) as u64;
            let on_time = now + overhead <= deadline;
            self.out.completed += 1;
            self.out.variants[self.variant_base[b.model] + b.variant] += 1;
            self.out.correct += u64::from(right);
            self.out.late += u64::from(!on_time);
            self.out.on_time_correct += u64::from(right && on_time);
            self.out.latencies_us.push(now - a.t + overhead);
            if let Some(bk) = self.bucket(now) {
                bk.completed += 1;
                bk.correct += u64::from(right);
                bk.not_on_time += u64::from(!on_time);
            }
            let label = m.eval.labels[a.sample] as usize;
            let predicted = if right { label } else { (label + 1) % m.spec.labels.len().max(1) };
            self.estimators[b.model].observe(predicted);
        }
    }

    fn node_event(&mut self, k: usize) {
        let e = &self.scn.events[k];
        let Some(n) = self.scn.nodes.iter().position(|x| x.name == e.node) else { return };
        match e.kind {
            EventKind::Slowdown => {
                if let Some(id) = self.live[n]
                    && let Some(node) = self.nodes.get_mut(&id)
                {
                    node.slowdown = e.factor.max(1e-3);
                }
            }
            EventKind::Recover => {
                if self.live[n].is_none() {
                    self.join(n);
                }
            }
            EventKind::Fail => {
                if let Some(id) = self.live[n].take() {
                    self.nodes.remove(&id);
                    // Batches there are failed over by the dispatcher (retried if their
                    // deadline still allows, else answered).
                    self.d.handle_node_down(self.now, id, "failed");
                }
            }
        }
    }
}

/// OPD's QoS (eq. 3) over a run, with Osprey's normalisation of each term:
/// V = accuracy of answers; T = requests answered on time / requests offered;
/// L = median latency / mean latency objective; E = (offered − answered on time) / offered
/// when demand went unmet, else −(1 − utilisation) (spare capacity, weighted by δ).
pub fn qos(s: &Summary, w: &crate::scenario::QosWeights) -> f64 {
    let offered = s.requests.max(1) as f64;
    let on_time = (s.completed - s.late) as f64;
    let v = if s.completed > 0 { s.correct as f64 / s.completed as f64 } else { 0.0 };
    let t = on_time / offered;
    let p50 = quantile(&s.latencies_us, 0.5);
    let l = if s.mean_slo_us > 0.0 { p50 / s.mean_slo_us } else { 0.0 };
    let unmet = (offered - on_time) / offered;
    let base = w.alpha * v + w.beta * t - l;
    if unmet > 0.0 {
        base - w.gamma * unmet
    } else {
        let util = if s.capacity_s > 0.0 { s.busy_s / s.capacity_s } else { 0.0 };
        base - w.delta * (1.0 - util)
    }
}

/// Nearest-rank quantile of sorted values.
pub fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64
}
