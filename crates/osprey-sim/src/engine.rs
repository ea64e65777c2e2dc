//! The discrete-event engine.
//!
//! Virtual time in microseconds; events are taken from a heap in (time, sequence) order, so
//! time never goes back and ties resolve in insertion order. Events: arrival, batch end, node
//! failure, recovery and slowdown, and an interval tick for the time series. Batch start is
//! not an event of its own: whenever something changes, free workers on live nodes ask the
//! scheduler for a batch at once, exactly as the live gateway's loop does.
//!
//! The scheduler is an `osprey_policy::scheduler::Scheduler` built by `osprey_policy::setup`
//! from the policy name, the model's profile and its estimator: the same object the live
//! gateway drives. Service time of a batch on a node =
//! `profile_p50(rows) / speed × slowdown(node) × lognormal(jitter_cv)` plus the link's round
//! trip and transfer time; the scheduler sees observed times through `observe`, as live.
//!
//! Every request ends exactly once: answered (on time or late), rejected at admission, expired
//! in the queue, or failed (its node died and no retry could still meet the deadline).

use crate::scenario::{EventKind, Scenario};
use osprey_core::config::{PolicyName, SchedulerSection};
use osprey_core::model::{EvalSet, ModelSpec, scan_repository};
use osprey_core::profile::{ModelProfile, Quantile};
use osprey_policy::estimate::{AccuracyEstimator, DataAware, Sample};
use osprey_policy::instance::{InstanceView, Selector, select};
use osprey_policy::scheduler::{Request, Scheduler, SchedulerConfig, VariantModel};
use osprey_policy::setup::{estimator_for, rule_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;

/// The model a scenario serves: spec, evaluation set, profile and trained estimator.
pub struct ModelContext {
    pub spec: ModelSpec,
    pub eval: EvalSet,
    pub profile: ModelProfile,
    pub data_aware: Option<DataAware>,
}

impl ModelContext {
    pub fn load(scn: &Scenario, base: &Path) -> Result<ModelContext, String> {
        let repo = base.join(&scn.model_repository);
        let (models, _) = scan_repository(&repo).map_err(|e| e.to_string())?;
        let spec = models
            .into_iter()
            .find(|m| m.name == scn.model)
            .ok_or_else(|| format!("model '{}' not found in {}", scn.model, repo.display()))?;
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

/// One arrival: time, tenant, evaluation sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    pub t: u64,
    pub tenant: usize,
    pub sample: usize,
}

/// Draws the arrivals of a scenario (shared by every policy it compares).
pub fn arrivals(scn: &Scenario, base: &Path, samples: usize) -> Result<Vec<Arrival>, String> {
    let times = scn.workload.arrivals(scn.duration_s, scn.seed, base)?;
    let mut rng = StdRng::seed_from_u64(scn.seed ^ 0x9e37_79b9_7f4a_7c15);
    let total: f64 = scn.tenants.iter().map(|t| t.share.max(0.0)).sum::<f64>().max(1e-12);
    Ok(times
        .into_iter()
        .map(|t| {
            let mut x = rng.random::<f64>() * total;
            let mut tenant = scn.tenants.len() - 1;
            for (i, ts) in scn.tenants.iter().enumerate() {
                if x < ts.share.max(0.0) {
                    tenant = i;
                    break;
                }
                x -= ts.share.max(0.0);
            }
            Arrival { t, tenant, sample: rng.random_range(0..samples.max(1)) }
        })
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrival(usize),
    BatchDone(usize),
    Node(usize),
    Tick,
    Replan,
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
    /// Requests answered by each variant (model order).
    pub variants: Vec<u64>,
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

struct InFlight {
    worker: usize,
    /// Predicted service time on the node (profile / speed), µs.
    predicted_us: f64,
    variant: usize,
    members: Vec<Request>,
    service_us: f64,
    cancelled: bool,
}

struct Node {
    speed: f64,
    /// True slowdown from scenario events (the selector does not see it).
    slowdown: f64,
    /// Observed / predicted service time (EWMA): what the selector sees.
    observed: f64,
    mean_service_us: f64,
    recent_failures: u32,
    recent_successes: u32,
    up: bool,
    cost_per_s: f64,
    link_us: f64,
    bytes_per_us: Option<f64>,
}

struct Sim<'a> {
    scn: &'a Scenario,
    ctx: &'a ModelContext,
    sched: Scheduler,
    estimator: Box<dyn AccuracyEstimator>,
    cache: Vec<Option<Vec<f64>>>,
    heap: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    nodes: Vec<Node>,
    /// (node, busy batch id)
    workers: Vec<(usize, Option<usize>)>,
    batches: Vec<InFlight>,
    arrivals: &'a [Arrival],
    sample_of: std::collections::HashMap<u64, usize>,
    rng: StdRng,
    out: Summary,
    series: Vec<Interval>,
    replan_pending: bool,
    sample_bytes: usize,
    selector: Selector,
    turn: usize,
}

/// Runs one policy on the scenario's arrivals with Osprey's instance selection.
pub fn simulate(
    scn: &Scenario,
    ctx: &ModelContext,
    policy: PolicyName,
    arrivals: &[Arrival],
) -> (Summary, Vec<Interval>) {
    simulate_with(scn, ctx, policy, Selector::Predicted, arrivals)
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
    ctx: &ModelContext,
    policy: PolicyName,
    selector: Selector,
    arrivals: &[Arrival],
) -> (Summary, Vec<Interval>) {
    let section = SchedulerSection {
        policy,
        fixed_variant: scn.scheduler.fixed_variant.clone(),
        urgency_weight: scn.scheduler.urgency_weight,
        miss_penalty: scn.scheduler.miss_penalty,
    };
    let workers: Vec<(usize, Option<usize>)> =
        scn.nodes.iter().enumerate().flat_map(|(i, n)| (0..n.workers).map(move |_| (i, None))).collect();
    let cfg = SchedulerConfig {
        rule: rule_for(&section, &ctx.spec),
        max_rows: scn.max_batch.min(ctx.spec.max_batch_size).max(1),
        max_queue: 1 << 16,
        quantile: Quantile::P99,
        urgency_weight: section.urgency_weight,
        miss_penalty: section.miss_penalty,
        workers: workers.len() as u32,
    };
    let variants = ctx
        .spec
        .variants
        .iter()
        .map(|v| {
            let profile = ctx.profile.variant(&v.name).cloned().unwrap_or_default();
            VariantModel { accuracy: v.accuracy, swap_us: profile.swap_us, profile }
        })
        .collect();
    let (estimator, _) = estimator_for(policy, &ctx.spec, ctx.data_aware.clone());
    let nodes = scn
        .nodes
        .iter()
        .map(|n| Node {
            speed: n.speed,
            slowdown: 1.0,
            observed: 1.0,
            mean_service_us: 0.0,
            recent_failures: 0,
            recent_successes: 0,
            up: true,
            cost_per_s: n.cost_per_s,
            link_us: n.link_ms * 1000.0,
            bytes_per_us: n.bandwidth_mbps.map(|m| m * 1e6 / 8.0 / 1e6),
        })
        .collect();
    let intervals = (scn.duration_s / scn.interval_s).ceil() as usize;
    let input = &ctx.spec.inputs[0];
    let mut sim = Sim {
        scn,
        ctx,
        sched: Scheduler::new(cfg, variants),
        estimator,
        cache: vec![None; ctx.eval.len()],
        heap: BinaryHeap::new(),
        seq: 0,
        now: 0,
        nodes,
        workers,
        batches: Vec::new(),
        arrivals,
        sample_of: std::collections::HashMap::new(),
        rng: StdRng::seed_from_u64(scn.seed.wrapping_add(17)),
        out: Summary {
            policy: policy.as_str().into(),
            duration_s: scn.duration_s,
            variants: vec![0; ctx.spec.variants.len()],
            mean_slo_us: scn.tenants.iter().map(|t| t.latency_slo_ms * 1000.0).sum::<f64>()
                / scn.tenants.len().max(1) as f64,
            ..Summary::default()
        },
        series: (0..intervals.max(1))
            .map(|i| Interval { t_s: i as f64 * scn.interval_s, ..Interval::default() })
            .collect(),
        replan_pending: false,
        sample_bytes: input.sample_elements() * input.datatype.size(),
        selector,
        turn: 0,
    };
    sim.run();
    let total_workers = sim.workers.len() as f64;
    sim.out.capacity_s = total_workers * scn.duration_s;
    sim.out.latencies_us.sort_unstable();
    (sim.out, sim.series)
}

impl Sim<'_> {
    fn push(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, e)));
    }

    fn bucket(&mut self, t: u64) -> Option<&mut Interval> {
        let i = (t as f64 / 1e6 / self.scn.interval_s) as usize;
        self.series.get_mut(i)
    }

    fn run(&mut self) {
        for (i, a) in self.arrivals.iter().enumerate() {
            self.push(a.t, Event::Arrival(i));
        }
        for (k, e) in self.scn.events.iter().enumerate() {
            self.push((e.at_s * 1e6) as u64, Event::Node(k));
        }
        let end = (self.scn.duration_s * 1e6) as u64;
        let step = (self.scn.interval_s * 1e6) as u64;
        let mut t = step;
        while t <= end {
            self.push(t, Event::Tick);
            t += step;
        }
        while let Some(Reverse((t, _, e))) = self.heap.pop() {
            debug_assert!(t >= self.now, "time went back");
            self.now = t;
            self.out.events += 1;
            match e {
                Event::Arrival(i) => self.arrive(i),
                Event::BatchDone(b) => self.finish(b),
                Event::Node(k) => self.node_event(k),
                Event::Tick => {}
                Event::Replan => self.replan_pending = false,
            }
            self.dispatch();
        }
        // Drained: everything queued has run or expired, and nothing is in flight.
        debug_assert!(self.sched.is_empty());
    }

    fn estimate(&mut self, sample: usize) -> Vec<f64> {
        let nv = self.ctx.spec.variants.len();
        let cacheable = self.estimator.name() != "per-class";
        if cacheable && let Some(e) = &self.cache[sample] {
            return e.clone();
        }
        let mut out = vec![0.0; nv];
        let s = Sample { datatype: self.ctx.spec.inputs[0].datatype, bytes: self.ctx.eval.sample(sample) };
        self.estimator.estimate(s, &mut out);
        if cacheable {
            self.cache[sample] = Some(out.clone());
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
        let r = Request {
            id: i as u64,
            tenant: a.tenant,
            rows: 1,
            arrival: a.t,
            deadline: a.t + (t.latency_slo_ms * 1000.0) as u64,
            weight: t.weight,
            floor: t.accuracy_floor,
            pinned: None,
            estimate: self.estimate(a.sample),
        };
        self.sample_of.insert(r.id, a.sample);
        if self.sched.admit(self.now, r).is_err() {
            self.out.rejected += 1;
            self.not_on_time(self.now);
        }
    }

    fn not_on_time(&mut self, t: u64) {
        if let Some(b) = self.bucket(t) {
            b.not_on_time += 1;
        }
    }

    fn dispatch(&mut self) {
        loop {
            if self.sched.is_empty() {
                return;
            }
            let free_on =
                |sim: &Self, n: usize| sim.workers.iter().filter(|(m, b)| *m == n && b.is_none()).count();
            if !(0..self.nodes.len()).any(|n| self.nodes[n].up && free_on(self, n) > 0) {
                return;
            }
            let plan = self.sched.next_batch(self.now);
            for r in &plan.expired {
                self.out.expired += 1;
                self.sample_of.remove(&r.id);
                self.not_on_time(self.now);
            }
            let Some(batch) = plan.batch else {
                if !self.sched.is_empty() && !self.replan_pending {
                    self.replan_pending = true;
                    self.push(self.now + 500, Event::Replan);
                }
                return;
            };
            let rows: u32 = batch.members.iter().map(|m| m.rows).sum();
            let base = self
                .ctx
                .profile
                .variant(&self.ctx.spec.variants[batch.variant].name)
                .and_then(|p| p.latency_us(rows, Quantile::P50))
                .unwrap_or(0.0);
            // Instance selection among nodes with a free worker (osprey_policy::instance).
            let views: Vec<InstanceView> = (0..self.nodes.len())
                .map(|n| {
                    let node = &self.nodes[n];
                    let workers = self.workers.iter().filter(|(m, _)| *m == n).count() as u32;
                    let free = free_on(self, n) as u32;
                    InstanceView {
                        up: node.up && free > 0,
                        speed: node.speed,
                        slowdown: node.observed,
                        workers,
                        busy: workers - free,
                        mean_service_us: node.mean_service_us,
                        recent_failures: node.recent_failures,
                        recent_successes: node.recent_successes,
                    }
                })
                .collect();
            let Some(n) = select(self.selector, &views, base, &mut self.turn) else { return };
            let Some(w) =
                (0..self.workers.len()).find(|&w| self.workers[w].0 == n && self.workers[w].1.is_none())
            else {
                return;
            };
            let node = &self.nodes[n];
            let cv = self.scn.jitter_cv.max(0.0);
            let sigma = (1.0 + cv * cv).ln().sqrt();
            let z = {
                let (u1, u2) = (1.0 - self.rng.random::<f64>(), self.rng.random::<f64>());
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            };
            let noise = (sigma * z - sigma * sigma / 2.0).exp();
            let bytes = (rows as usize * self.sample_bytes) as f64;
            let transfer = 2.0 * node.link_us + node.bytes_per_us.map_or(0.0, |b| bytes / b.max(1e-9));
            let service = base / node.speed * node.slowdown * noise + transfer;
            let id = self.batches.len();
            let predicted_us = base / node.speed;
            self.batches.push(InFlight {
                worker: w,
                predicted_us,
                variant: batch.variant,
                members: batch.members,
                service_us: service,
                cancelled: false,
            });
            self.workers[w].1 = Some(id);
            let done = self.now + service.ceil().max(1.0) as u64;
            self.push(done, Event::BatchDone(id));
        }
    }

    fn finish(&mut self, id: usize) {
        if self.batches[id].cancelled {
            return;
        }
        let (w, variant, service) =
            (self.batches[id].worker, self.batches[id].variant, self.batches[id].service_us);
        self.workers[w].1 = None;
        let node = self.workers[w].0;
        let predicted = self.batches[id].predicted_us;
        {
            let n = &mut self.nodes[node];
            if predicted > 0.0 {
                n.observed = 0.8 * n.observed + 0.2 * (service / predicted).clamp(0.1, 50.0);
            }
            n.mean_service_us =
                if n.mean_service_us == 0.0 { service } else { 0.8 * n.mean_service_us + 0.2 * service };
            n.recent_successes += 1;
            if n.recent_successes + n.recent_failures > 20 {
                n.recent_successes /= 2;
                n.recent_failures /= 2;
            }
        }
        let cost = service / 1e6 * self.nodes[node].cost_per_s;
        self.out.cost += cost;
        self.out.busy_s += service / 1e6;
        let members = std::mem::take(&mut self.batches[id].members);
        let rows: u32 = members.iter().map(|m| m.rows).sum();
        self.sched.observe(variant, rows, service);
        let now = self.now;
        if let Some(b) = self.bucket(now) {
            b.cost += cost;
        }
        for m in members {
            let sample = self.sample_of.remove(&m.id).unwrap_or(0);
            let right = self.ctx.eval.correct[variant][sample];
            let on_time = now <= m.deadline;
            self.out.completed += 1;
            self.out.variants[variant] += 1;
            self.out.correct += u64::from(right);
            self.out.late += u64::from(!on_time);
            self.out.on_time_correct += u64::from(right && on_time);
            self.out.latencies_us.push(now - m.arrival + self.scn.request_overhead_us.max(0.0) as u64);
            if let Some(b) = self.bucket(now) {
                b.completed += 1;
                b.correct += u64::from(right);
                b.not_on_time += u64::from(!on_time);
            }
            let label = self.ctx.eval.labels[sample] as usize;
            let predicted = if right { label } else { (label + 1) % self.ctx.spec.labels.len().max(1) };
            self.estimator.observe(predicted);
        }
    }

    fn node_event(&mut self, k: usize) {
        let e = &self.scn.events[k];
        let Some(n) = self.scn.nodes.iter().position(|x| x.name == e.node) else { return };
        match e.kind {
            EventKind::Slowdown => self.nodes[n].slowdown = e.factor.max(1e-3),
            EventKind::Recover => self.nodes[n].up = true,
            EventKind::Fail => {
                self.nodes[n].up = false;
                // Work in flight there is retried if its deadline still allows, else failed.
                for w in 0..self.workers.len() {
                    if self.workers[w].0 != n {
                        continue;
                    }
                    let Some(id) = self.workers[w].1.take() else { continue };
                    self.batches[id].cancelled = true;
                    self.nodes[n].recent_failures += 1;
                    let members = std::mem::take(&mut self.batches[id].members);
                    for m in members {
                        let id = m.id;
                        self.out.retried += 1;
                        if self.sched.admit(self.now, m).is_err() {
                            self.out.failed += 1;
                            self.sample_of.remove(&id);
                            self.not_on_time(self.now);
                        }
                    }
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
