//! The per-model request scheduler: admission, priority, expiry, and batch + variant choice.
//!
//! A [`Scheduler`] owns one model's queue. The driver calls [`Scheduler::admit`] when a request
//! arrives and [`Scheduler::next_batch`] whenever a worker is free; both take the current time
//! and return decisions. Nothing else happens inside: no clock, no I/O, no randomness, so the
//! same inputs always give the same decisions.
//!
//! # Priority (design note)
//! SneakPeek orders requests by a priority that trades accuracy against deadlines; its formula
//! is not published. Osprey uses
//!
//! ```text
//! p_r(now) = w_r · ( â*_r + β · exp(−s_r / τ_r) + A · a_r )
//! ```
//!
//! - `w_r`: the tenant's weight (times Triton's `priority` boost, see the gateway);
//! - `â*_r`: the best estimated accuracy among variants that can still meet r's deadline;
//! - `s_r = d_r − now − ℓ_min,r`: slack, the time r can still wait and make its deadline
//!   with the fastest variant;
//! - `τ_r = ℓ_max,r`: the most accurate variant's service time for r, the natural time scale;
//! - `β = 1` by default (`urgency_weight`);
//! - `a_r = (now − arrival_r) / (d_r − arrival_r)`: the share of its time budget r has already
//!   waited, with `A` = [`AGING`] = 4.
//!
//! Rationale: both terms lie in [0, 1], so a request whose slack drops below one service time
//! of the best variant gains as much as a perfect accuracy swing and jumps ahead, while among
//! relaxed requests those that stand to get the most accurate answers go first. The weight
//! scales everything, so a heavier tenant wins ties. The aging term is what keeps a hard input
//! (low â*) from starving under sustained overload: without it, fresh easy inputs outranked it
//! until its slack fell below one service time, and it expired at its deadline in the queue
//! (seen at 3× capacity: admitted p99 equal to the 5 s deadline, and 504s after 5 s). With it,
//! a request that has waited half its budget outranks a fresh one unless their â* differ by
//! more than 0.5. Properties (tested): p is increasing in `w_r`, `â*_r` and the time waited,
//! and non-increasing in slack.
//!
//! # Batch and variant choice (utility policies)
//! For each variant v: the candidates are queued requests that v can still serve in time
//! (and whose accuracy floor v meets, unless no feasible variant meets it), ordered by
//! `p_r + (â_r(v) − â*_r)` — priority minus the accuracy r would lose on v, so the inputs that
//! lose least on a cheap variant go to it first (this is where per-input estimates matter).
//! Members join greedily while the batch still finishes, by the profile (plus the swap cost
//! when v differs from the last variant run), before every member's deadline, up to `max_rows`.
//! The batch's utility is a one-step look-ahead:
//!
//! ```text
//! U(v) = Σ_{r ∈ B_v} w_r · â_r(v)  −  Σ_{r ∉ B_v} w_r · ( val_r(now) − val_r(now + T_v) )
//! val_r(t) = max { â_r(u) : u can still finish r by its deadline if started at t },
//!            or −λ when no variant can
//! ```
//!
//! with `T_v` the batch's planned service time. The second term charges a batch for what it
//! costs the requests left waiting: accuracy they can no longer reach, or a miss (λ =
//! `miss_penalty`). It is what moves the scheduler to faster variants under load, and to the
//! cheap variant for the inputs that lose least on it. The variant with the largest U runs
//! (ties keep the last variant: no needless swap).
//!
//! # Observed slowdown
//! Profiles are measured on an idle machine; under load (co-located work, the serving stack
//! itself) batches take longer. The driver reports each batch's observed service time
//! ([`Scheduler::observe`]); the scheduler keeps a per-variant slowdown
//! `σ_v ← (1 − α)·σ_v + α·(observed / profiled)` (α = 0.2, clamped to [0.5, 20]) and plans with
//! `σ_v · ℓ_v(b)`. The same factor is what contention-aware instance selection uses.
//!
//! # Baselines
//! `MostAccurate`, `Fastest` and `Fixed` (Triton-like: one variant, FIFO, dynamic batching up
//! to `max_rows`) run one variant in arrival order, expire requests only once their deadline
//! has passed, and never refuse early.

use crate::Micros;
use osprey_core::profile::{Quantile, VariantProfile};
use rand::{Rng, SeedableRng};

/// Which scheduling rule to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Priority + utility-maximising batch and variant choice, early admission control.
    Utility,
    /// FIFO on the most accurate variant (by profiled accuracy).
    MostAccurate,
    /// FIFO on the fastest variant.
    Fastest,
    /// FIFO on one given variant (Triton-like dynamic batching without variant choice).
    Fixed(usize),
    /// Earliest deadline first on one given variant.
    Edf(usize),
    /// Least laxity first (laxity = deadline − now − exec time of the most accurate variant);
    /// runs the most accurate variant that still fits the chosen request with the queue behind
    /// it, else the fastest.
    Llf,
    /// DREAM, as the quality-driven paper's public code defines it: drop a request as soon as
    /// it cannot finish (now + min_exec > deadline); otherwise rank by
    /// urgency = min_exec / (remaining − min_exec), most urgent first; run the most accurate
    /// variant that fits the most urgent request with the queue behind it.
    Dream,
    /// FIFO, a uniformly random variant per batch (seeded: same seed, same choices).
    Random(u64),
    /// FIFO, the cheapest (fastest) variant that meets the head request's accuracy floor.
    Greedy,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub rule: Rule,
    /// Largest batch, in samples.
    pub max_rows: u32,
    /// Requests the queue may hold.
    pub max_queue: usize,
    /// Latency statistic planned with.
    pub quantile: Quantile,
    /// β in the priority.
    pub urgency_weight: f64,
    /// λ in the batch utility.
    pub miss_penalty: f64,
    /// Worker threads serving this model (for the admission backlog estimate).
    pub workers: u32,
    /// Per-tenant bound on queued requests (`tenant_queue[t]`, see [`tenant_queue_bounds`]);
    /// empty or missing entries: only `max_queue` bounds a tenant.
    pub tenant_queue: Vec<usize>,
}

/// Each tenant's share of a model queue of `max_queue` entries: ⌊max_queue · w_t / Σ w⌋, at
/// least 1. The shares add up to at most the queue, so a tenant that floods the queue fills
/// only its own share, and every other tenant finds its share free (per-tenant bounded queues
/// inside one model queue; the scheduler still orders and batches all of them together).
pub fn tenant_queue_bounds(max_queue: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    weights
        .iter()
        .map(|&w| {
            let share = if total > 0.0 && w.is_finite() && w > 0.0 { w / total } else { 0.0 };
            ((max_queue as f64 * share).floor() as usize).max(1)
        })
        .collect()
}

impl SchedulerConfig {
    pub fn for_test(rule: Rule) -> SchedulerConfig {
        SchedulerConfig {
            rule,
            max_rows: 8,
            max_queue: 64,
            quantile: Quantile::P90,
            urgency_weight: 1.0,
            miss_penalty: 1.0,
            workers: 1,
            tenant_queue: Vec::new(),
        }
    }
}

/// One variant as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct VariantModel {
    pub profile: VariantProfile,
    /// Profiled average accuracy (baseline rules pick variants by it).
    pub accuracy: f64,
    /// Extra time when a batch of this variant follows one of another variant, µs.
    pub swap_us: f64,
}

/// A request as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Driver-chosen identifier, unique among live requests.
    pub id: u64,
    pub tenant: usize,
    pub rows: u32,
    pub arrival: Micros,
    pub deadline: Micros,
    /// Tenant weight (with any priority boost).
    pub weight: f64,
    /// Accuracy floor; 0 when none.
    pub floor: f64,
    pub pinned: Option<usize>,
    /// Estimated accuracy per variant for this request.
    pub estimate: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The queue is at its bound.
    QueueFull,
    /// The request's tenant holds its whole share of the queue.
    TenantShare,
    /// No variant can finish before the deadline even with an idle worker.
    CannotMeetDeadline,
    /// The backlog ahead makes the deadline unreachable now.
    Capacity,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub variant: usize,
    pub members: Vec<Request>,
    /// Planned service time, µs (profile at the batch's size, plus swap).
    pub planned_us: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Requests that can no longer meet their deadline: answer them now.
    pub expired: Vec<Request>,
    pub batch: Option<Batch>,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    variants: Vec<VariantModel>,
    queue: Vec<Request>,
    last_variant: Option<usize>,
    /// Observed / profiled service time per variant (EWMA).
    slowdown: Vec<f64>,
    /// `Rule::Random`'s generator: ChaCha8, seeded, the same stream on every platform and
    /// `rand` release (what reproducible simulator runs need).
    rng: rand_chacha::ChaCha8Rng,
    /// Variants some instance can run now (the driver reports placement).
    available: Vec<bool>,
    /// Worker-equivalents serving the model (see [`Scheduler::set_capacity`]).
    capacity: f64,
    /// Cached [`Scheduler::poll_timeout`] (`None` = to recompute): drivers ask after every
    /// event, the queue changes far less often.
    next_expiry: std::cell::Cell<Option<Option<Micros>>>,
    /// The control loop's configuration for this model.
    control: Control,
}

/// What the per-interval control loop sets for a model (a pipeline stage): the variant every
/// unpinned request runs on, and a smaller batch limit. The variant applies only while some
/// instance hosts it — until then the rule chooses as before, so a switch never leaves requests
/// with nothing to run on (load before unload); a request pinned to a version keeps its pin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    pub variant: Option<usize>,
    pub max_rows: Option<u32>,
}

/// Weight of a new observation in the slowdown average.
const SLOWDOWN_ALPHA: f64 = 0.2;

/// A request's weight `w_r`: its tenant's weight, times `1 + 1/p` for Triton's `priority`
/// level p ≥ 1 (1 = the highest); 0 or none leaves the tenant's weight.
pub fn request_weight(tenant_weight: f64, priority: Option<u64>) -> f64 {
    match priority {
        Some(p) if p > 0 => tenant_weight * (1.0 + 1.0 / p as f64),
        _ => tenant_weight,
    }
}

/// Share of a request's time budget that the predicted wait plus its own service may take at
/// admission (see [`Scheduler::admit`]).
pub const ADMIT_WITHIN: f64 = 0.5;

/// `A` in the priority: weight of the share of its budget a request has waited.
pub const AGING: f64 = 4.0;

/// Priority of a request (see the module docs); `waited` is `a_r`, within [0, 1].
pub fn priority(weight: f64, best_accuracy: f64, slack_us: f64, tau_us: f64, beta: f64, waited: f64) -> f64 {
    let urgency = (-(slack_us.max(0.0)) / tau_us.max(1.0)).exp();
    let waited = if waited.is_nan() { 0.0 } else { waited.clamp(0.0, 1.0) };
    weight * (best_accuracy + beta * urgency + AGING * waited)
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, variants: Vec<VariantModel>) -> Scheduler {
        let slowdown = vec![1.0; variants.len()];
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(match cfg.rule {
            Rule::Random(seed) => seed,
            _ => 1,
        });
        let available = vec![true; variants.len()];
        Scheduler {
            capacity: f64::from(cfg.workers.max(1)),
            cfg,
            variants,
            queue: Vec::new(),
            last_variant: None,
            slowdown,
            rng,
            available,
            next_expiry: std::cell::Cell::new(Some(None)),
            control: Control::default(),
        }
    }

    /// Applies the control loop's configuration (see [`Control`]).
    pub fn set_control(&mut self, c: Control) {
        self.control = c;
        self.next_expiry.set(None);
    }

    pub fn control(&self) -> Control {
        self.control
    }

    /// The batch limit in force: the configured one, lowered by the control loop.
    fn max_rows(&self) -> u32 {
        self.control.max_rows.map_or(self.cfg.max_rows, |m| m.min(self.cfg.max_rows)).max(1)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Planned service time of `rows` samples on variant `v`, µs (profile × slowdown).
    pub fn latency(&self, v: usize, rows: u32) -> f64 {
        self.variants[v].profile.latency_us(rows, self.cfg.quantile).unwrap_or(0.0) * self.slowdown[v]
    }

    /// Feeds back a batch's observed service time (dispatch to answers ready), µs.
    pub fn observe(&mut self, v: usize, rows: u32, observed_us: f64) {
        let Some(profiled) = self.variants.get(v).and_then(|m| m.profile.latency_us(rows, self.cfg.quantile))
        else {
            return;
        };
        if profiled <= 0.0 || !observed_us.is_finite() {
            return;
        }
        let ratio = (observed_us / profiled).clamp(0.5, 20.0);
        self.slowdown[v] = (1.0 - SLOWDOWN_ALPHA) * self.slowdown[v] + SLOWDOWN_ALPHA * ratio;
        self.next_expiry.set(None);
    }

    /// Profiled service time of `rows` samples on `v` at quantile `q`, µs, without the observed
    /// slowdown (the reference a node's own slowdown is measured against).
    pub fn profiled_us(&self, v: usize, rows: u32, q: Quantile) -> Option<f64> {
        self.variants.get(v)?.profile.latency_us(rows, q)
    }

    /// Number of variants.
    pub fn variant_count(&self) -> usize {
        self.variants.len()
    }

    /// Worker threads that serve this model now (membership changes move it).
    pub fn set_workers(&mut self, workers: u32) {
        self.cfg.workers = workers.max(1);
        self.capacity = f64::from(self.cfg.workers);
    }

    /// Worker-equivalents at the profile's speed serving this model: Σ workers · speed /
    /// slowdown over its live hosts. Admission divides the backlog by it, so a slow or
    /// degraded node counts for what it serves (taking every node at the profile's speed
    /// admitted ten times too much on a node a tenth as fast, and the excess expired in the
    /// queue).
    pub fn set_capacity(&mut self, worker_equivalents: f64) {
        self.capacity = if worker_equivalents.is_finite() && worker_equivalents > 0.0 {
            worker_equivalents.max(1e-3)
        } else {
            1e-3
        };
    }

    /// The queued requests' ids, in queue order.
    pub fn queued_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue.iter().map(|r| r.id)
    }

    /// Whether request `id` is queued here.
    pub fn contains(&self, id: u64) -> bool {
        self.queue.iter().any(|r| r.id == id)
    }

    /// The earliest time at which [`Scheduler::expire`] would remove a queued request, if any:
    /// the driver wakes then (and not on a fixed interval). Under the utility rule and DREAM a
    /// request expires once `now + ℓ_min > d`, i.e. at `⌊d − ℓ_min⌋ + 1`; under the FIFO
    /// baselines at its deadline `d`.
    pub fn poll_timeout(&self) -> Option<Micros> {
        if let Some(t) = self.next_expiry.get() {
            return t;
        }
        let t = self.queue.iter().map(|r| self.expiry_of(r)).min();
        self.next_expiry.set(Some(t));
        t
    }

    fn expiry_of(&self, r: &Request) -> Micros {
        if matches!(self.cfg.rule, Rule::Utility | Rule::Dream) {
            let at = r.deadline as f64 - self.min_latency(r);
            if at.is_finite() { (at.max(0.0).floor() as Micros).saturating_add(1) } else { 0 }
        } else {
            r.deadline
        }
    }

    /// Keeps the cached next expiry right as `r` joins the queue.
    fn note_queued(&self, r: &Request) {
        if let Some(cached) = self.next_expiry.get() {
            let e = self.expiry_of(r);
            self.next_expiry.set(Some(Some(cached.map_or(e, |c| c.min(e)))));
        }
    }

    /// Current slowdown factor of each variant.
    pub fn slowdown(&self) -> &[f64] {
        &self.slowdown
    }

    fn swap(&self, v: usize) -> f64 {
        match self.last_variant {
            Some(l) if l != v => self.variants[v].swap_us,
            _ => 0.0,
        }
    }

    /// The variant the control loop set (while hosted), else the one a baseline rule runs.
    fn fixed_variant(&self) -> Option<usize> {
        if let Some(v) = self.control.variant
            && self.available.get(v).copied().unwrap_or(false)
        {
            return Some(v);
        }
        let by = |f: &dyn Fn(&VariantModel) -> f64| {
            (0..self.variants.len()).max_by(|&a, &b| f(&self.variants[a]).total_cmp(&f(&self.variants[b])))
        };
        match self.cfg.rule {
            Rule::Utility | Rule::Llf | Rule::Dream | Rule::Random(_) | Rule::Greedy => None,
            Rule::Edf(v) => Some(v.min(self.variants.len().saturating_sub(1))),
            Rule::MostAccurate => by(&|v| v.accuracy),
            Rule::Fastest => by(&|v| -v.profile.latency_us(1, Quantile::P50).unwrap_or(0.0)),
            Rule::Fixed(v) => Some(v.min(self.variants.len().saturating_sub(1))),
        }
    }

    /// Tells the scheduler which variants some instance hosts now; the others are not
    /// planned (a request that can only run on one of them expires at its deadline).
    pub fn set_available(&mut self, available: &[bool]) {
        for (a, &b) in self.available.iter_mut().zip(available) {
            if *a != b {
                *a = b;
                self.next_expiry.set(None);
            }
        }
    }

    /// Variants a request may run on.
    fn allowed(&self, r: &Request) -> impl Iterator<Item = usize> + '_ {
        self.allowed_of(r.pinned)
    }

    /// Variants a request pinned to `pinned` (or not pinned) may run on.
    fn allowed_of(&self, pinned: Option<usize>) -> impl Iterator<Item = usize> + '_ {
        let only = pinned.or_else(|| self.fixed_variant());
        (0..self.variants.len()).filter(move |&v| self.available[v] && only.is_none_or(|p| p == v))
    }

    /// Planned service time of `r` on its fastest allowed variant (infinite if none is).
    pub fn min_latency(&self, r: &Request) -> f64 {
        self.min_latency_of(r.pinned, r.rows)
    }

    fn min_latency_of(&self, pinned: Option<usize>, rows: u32) -> f64 {
        self.allowed_of(pinned).map(|v| self.latency(v, rows)).fold(f64::INFINITY, f64::min)
    }

    /// Admits `r` into the queue or refuses it now.
    pub fn admit(&mut self, now: Micros, mut r: Request) -> Result<(), (Reject, Request)> {
        // Decisions compare estimates; one NaN would make every comparison false and leave the
        // request unplanned until it expired. Whatever an estimator returned, plan with
        // probabilities.
        for e in &mut r.estimate {
            *e = if e.is_nan() { 0.0 } else { e.clamp(0.0, 1.0) };
        }
        r.floor = if r.floor.is_nan() { 0.0 } else { r.floor.clamp(0.0, 1.0) };
        if !r.weight.is_finite() {
            r.weight = 1.0;
        }
        if self.queue.len() >= self.cfg.max_queue {
            return Err((Reject::QueueFull, r));
        }
        if let Some(&bound) = self.cfg.tenant_queue.get(r.tenant)
            && bound < self.cfg.max_queue
            && self.queue.iter().filter(|q| q.tenant == r.tenant).count() >= bound
        {
            return Err((Reject::TenantShare, r));
        }
        if self.cfg.rule == Rule::Utility {
            let need = self.min_latency(&r);
            if now as f64 + need > r.deadline as f64 {
                return Err((Reject::CannotMeetDeadline, r));
            }
            // Queue only what the backlog estimate says can finish within half the budget
            // (an idle model takes anything that can meet its deadline alone): the estimate
            // is optimistic (full batches) and the priority is not FIFO, so a queue filled to
            // the whole budget let its hard inputs expire in it.
            let wait = self.backlog_wait();
            let budget = r.deadline.saturating_sub(now) as f64;
            if wait > 0.0 && wait + need > ADMIT_WITHIN * budget {
                return Err((Reject::Capacity, r));
            }
        }
        self.note_queued(&r);
        self.queue.push(r);
        Ok(())
    }

    /// The least time to its deadline, µs, with which [`Scheduler::admit`] would take a
    /// request of `rows` rows pinned to `pinned` (any allowed variant when `None`) now:
    /// ```text
    /// utility rule : need                              when the queue is empty of work
    ///                max(need, (wait + need) / ADMIT_WITHIN)  otherwise
    /// other rules  : 0
    /// ```
    /// infinite when the queue is full or no such variant is available. Tenant shares are
    /// not checked. Plans that choose variants themselves (cross-modal refinement) keep to
    /// calls the admission takes.
    pub fn admit_within_us(&self, pinned: Option<usize>, rows: u32) -> f64 {
        if self.queue.len() >= self.cfg.max_queue {
            return f64::INFINITY;
        }
        if self.cfg.rule != Rule::Utility {
            return 0.0;
        }
        let need = self.min_latency_of(pinned, rows);
        let wait = self.backlog_wait();
        if wait > 0.0 { need.max((wait + need) / ADMIT_WITHIN) } else { need }
    }

    /// The queue's backlog, µs of the model's capacity, as admission estimates it.
    fn backlog_wait(&self) -> f64 {
        // Optimistic backlog: every queued request runs on its fastest allowed variant
        // (its pinned one, when pinned) at full batches. Assuming the model's fastest
        // variant for all once admitted far more pinned requests than could be served:
        // they waited out their deadlines in the queue instead of being refused at once.
        let rows = self.max_rows();
        let per_row: Vec<f64> = (0..self.variants.len())
            .map(|v| if self.available[v] { self.latency(v, rows) / f64::from(rows) } else { f64::INFINITY })
            .collect();
        let fastest = per_row.iter().copied().fold(f64::INFINITY, f64::min);
        let backlog: f64 = self
            .queue
            .iter()
            .map(|q| {
                let cost = match q.pinned {
                    Some(p) => per_row.get(p).copied().unwrap_or(fastest),
                    None => fastest,
                };
                f64::from(q.rows) * if cost.is_finite() { cost } else { 0.0 }
            })
            .sum();
        backlog / self.capacity
    }

    /// Puts planned requests back (the driver could not run their batch after all), without
    /// admission checks, in arrival order.
    pub fn requeue(&mut self, reqs: Vec<Request>) {
        for r in &reqs {
            self.note_queued(r);
        }
        self.queue.extend(reqs);
        self.queue.sort_by_key(|r| (r.arrival, r.id));
    }

    /// Removes a queued request (its client went away).
    pub fn remove(&mut self, id: u64) -> Option<Request> {
        let i = self.queue.iter().position(|r| r.id == id)?;
        self.next_expiry.set(None);
        Some(self.queue.remove(i))
    }

    /// Removes and returns every queued request (shutdown, tests).
    pub fn drain(&mut self) -> Vec<Request> {
        self.next_expiry.set(Some(None));
        std::mem::take(&mut self.queue)
    }

    /// Decides what a free worker runs next.
    /// Removes and returns the queued requests that can no longer be served in time (the
    /// utility rule and DREAM drop as soon as no variant can finish; the others once the
    /// deadline has passed). `next_batch` does this first; drivers also call it while no
    /// worker is free, so nothing waits past its deadline for a worker that never comes.
    pub fn expire(&mut self, now: Micros) -> Vec<Request> {
        let early = matches!(self.cfg.rule, Rule::Utility | Rule::Dream);
        let mut expired = Vec::new();
        let mut keep = Vec::with_capacity(self.queue.len());
        for r in std::mem::take(&mut self.queue) {
            let dead =
                if early { now as f64 + self.min_latency(&r) > r.deadline as f64 } else { r.deadline <= now };
            if dead { expired.push(r) } else { keep.push(r) }
        }
        self.queue = keep;
        self.next_expiry.set(None);
        expired
    }

    pub fn next_batch(&mut self, now: Micros) -> Plan {
        let mut plan = Plan { expired: self.expire(now), batch: None };
        if self.queue.is_empty() {
            return plan;
        }
        let chosen =
            if self.cfg.rule == Rule::Utility { self.plan_utility(now) } else { self.plan_ordered(now) };
        if let Some((variant, idx, planned_us)) = chosen {
            let mut members = Vec::with_capacity(idx.len());
            let mut sorted = idx.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            for i in sorted {
                members.push(self.queue.remove(i));
                self.next_expiry.set(None);
            }
            members.reverse();
            // Keep the members in the order they were picked for the batch.
            let mut order: Vec<(usize, usize)> = idx.iter().enumerate().map(|(k, &i)| (i, k)).collect();
            order.sort_unstable();
            let mut picked: Vec<Option<Request>> = vec![None; members.len()];
            for ((_, k), m) in order.into_iter().zip(members) {
                picked[k] = Some(m);
            }
            self.last_variant = Some(variant);
            plan.batch = Some(Batch { variant, members: picked.into_iter().flatten().collect(), planned_us });
        }
        plan
    }

    /// The most accurate variant (by profile) that can finish `r` by its deadline from `now`,
    /// else the fastest allowed one (LLF's and DREAM's variant choice).
    ///
    /// "Fits" counts the queue behind `r`: ROHE's orchestrators keep an instance only while its
    /// measured response time (queueing included) is within the task's allocated time, so a
    /// slow variant drops out as load builds. From the queue, that response time is
    /// ```text
    /// resp(v) = ℓ_v(rows) + ⌈Q / b⌉ · ℓ_v(b) / W     Q: rows queued besides r, b: largest
    ///                                                 batch, W: workers
    /// ```
    /// and v fits when now + resp(v) ≤ deadline(r). Without the queue term a sustained load
    /// sends every batch to the most accurate variant and the queue grows without bound.
    fn best_fit(&self, r: &Request, now: f64) -> Option<usize> {
        let others: u32 = self.queue.iter().filter(|q| q.id != r.id).map(|q| q.rows).sum();
        let b = self.cfg.max_rows.max(1);
        let backlog = |v: usize| {
            if others == 0 {
                0.0
            } else {
                f64::from(others.div_ceil(b)) * self.latency(v, b) / f64::from(self.cfg.workers.max(1))
            }
        };
        let fits = self
            .allowed(r)
            .filter(|&v| now + self.latency(v, r.rows) + backlog(v) <= r.deadline as f64)
            .max_by(|&a, &b| self.variants[a].accuracy.total_cmp(&self.variants[b].accuracy));
        fits.or_else(|| {
            self.allowed(r).min_by(|&a, &b| self.latency(a, r.rows).total_cmp(&self.latency(b, r.rows)))
        })
    }

    /// One-variant batches in a rule-specific order (every rule but `Utility`).
    fn plan_ordered(&mut self, now: Micros) -> Option<(usize, Vec<usize>, f64)> {
        let now_f = now as f64;
        let n = self.queue.len();
        let mut order: Vec<usize> = (0..n).collect();
        let min_exec = |s: &Self, r: &Request| s.min_latency(r);
        match self.cfg.rule {
            Rule::Edf(_) => order.sort_by_key(|&i| (self.queue[i].deadline, i)),
            Rule::Llf => {
                let laxity = |i: usize| {
                    let r = &self.queue[i];
                    let exec = self
                        .allowed(r)
                        .max_by(|&a, &b| self.variants[a].accuracy.total_cmp(&self.variants[b].accuracy))
                        .map_or(0.0, |v| self.latency(v, r.rows));
                    r.deadline as f64 - now_f - exec
                };
                order.sort_by(|&a, &b| laxity(a).total_cmp(&laxity(b)).then(a.cmp(&b)));
            }
            Rule::Dream => {
                let urgency = |i: usize| {
                    let r = &self.queue[i];
                    let m = min_exec(self, r);
                    m / (r.deadline as f64 - now_f - m).max(1e-9)
                };
                order.sort_by(|&a, &b| urgency(b).total_cmp(&urgency(a)).then(a.cmp(&b)));
            }
            _ => {}
        }
        let head = &self.queue[*order.first()?];
        let v = match self.cfg.rule {
            Rule::Llf | Rule::Dream => self.best_fit(head, now_f)?,
            Rule::Random(_) => {
                let allowed: Vec<usize> = self.allowed(head).collect();
                let k = self.rng.random_range(0..allowed.len().max(1));
                *allowed.get(k)?
            }
            Rule::Greedy => {
                let floor = head.floor;
                let by_speed = |a: &usize, b: &usize| {
                    self.latency(*a, head.rows).total_cmp(&self.latency(*b, head.rows))
                };
                self.allowed(head).filter(|&v| self.variants[v].accuracy >= floor).min_by(by_speed).or_else(
                    || {
                        self.allowed(head)
                            .max_by(|&a, &b| self.variants[a].accuracy.total_cmp(&self.variants[b].accuracy))
                    },
                )?
            }
            _ => self.allowed(head).next()?,
        };
        let mut rows = 0u32;
        let mut idx = Vec::new();
        for i in order {
            let r = &self.queue[i];
            if !self.allowed(r).any(|a| a == v) {
                continue;
            }
            if idx.is_empty() || rows + r.rows <= self.max_rows() {
                rows += r.rows;
                idx.push(i);
            }
        }
        Some((v, idx, self.swap(v) + self.latency(v, rows)))
    }

    /// Best estimated accuracy `r` can still get if started at `t`, or −λ if none.
    fn value(&self, r: &Request, t: f64) -> f64 {
        self.allowed(r)
            .filter(|&u| t + self.latency(u, r.rows) <= r.deadline as f64)
            .map(|u| r.estimate[u])
            .fold(-self.cfg.miss_penalty, f64::max)
    }

    fn plan_utility(&self, now: Micros) -> Option<(usize, Vec<usize>, f64)> {
        let now_f = now as f64;
        // Per request: feasible variants, best feasible accuracy, priority.
        struct View {
            best: f64,
            prio: f64,
        }
        let views: Vec<View> = self
            .queue
            .iter()
            .map(|r| {
                let mut best = 0.0f64;
                let mut min_lat = f64::INFINITY;
                let mut max_lat: f64 = 1.0;
                let mut best_lat = 0.0;
                for v in self.allowed(r) {
                    let l = self.latency(v, r.rows);
                    min_lat = min_lat.min(l);
                    max_lat = max_lat.max(l);
                    if now_f + l <= r.deadline as f64 && r.estimate[v] >= best {
                        best = r.estimate[v];
                        best_lat = l;
                    }
                }
                let tau = if best_lat > 0.0 { best_lat } else { max_lat };
                let slack = r.deadline as f64 - now_f - min_lat;
                let budget = r.deadline.saturating_sub(r.arrival).max(1) as f64;
                let waited = (now_f - r.arrival as f64) / budget;
                View { best, prio: priority(r.weight, best, slack, tau, self.cfg.urgency_weight, waited) }
            })
            .collect();
        let mut best_plan: Option<(f64, usize, Vec<usize>, f64)> = None;
        for v in 0..self.variants.len() {
            let swap = self.swap(v);
            let mut cands: Vec<usize> = (0..self.queue.len())
                .filter(|&i| {
                    let r = &self.queue[i];
                    if !self.allowed(r).any(|a| a == v) {
                        return false;
                    }
                    if now_f + swap + self.latency(v, r.rows) > r.deadline as f64 {
                        return false;
                    }
                    // Respect the floor when some feasible variant meets it.
                    r.estimate[v] >= r.floor || views[i].best < r.floor
                })
                .collect();
            if cands.is_empty() {
                continue;
            }
            let key = |i: usize| views[i].prio + (self.queue[i].estimate[v] - views[i].best);
            cands.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            let mut rows = 0u32;
            let mut min_deadline = f64::INFINITY;
            let mut members = Vec::new();
            for i in cands {
                let r = &self.queue[i];
                let new_rows = rows + r.rows;
                if !members.is_empty() && new_rows > self.max_rows() {
                    continue;
                }
                let d = min_deadline.min(r.deadline as f64);
                if now_f + swap + self.latency(v, new_rows) <= d {
                    rows = new_rows;
                    min_deadline = d;
                    members.push(i);
                }
            }
            if members.is_empty() {
                continue;
            }
            let service = swap + self.latency(v, rows);
            let gain: f64 = members.iter().map(|&i| self.queue[i].weight * self.queue[i].estimate[v]).sum();
            let done = now_f + service;
            let loss: f64 = (0..self.queue.len())
                .filter(|i| !members.contains(i))
                .map(|i| {
                    let r = &self.queue[i];
                    r.weight * (self.value(r, now_f) - self.value(r, done))
                })
                .sum();
            let u = gain - loss;
            let better = match &best_plan {
                None => true,
                Some((bu, bv, _, _)) => {
                    u > bu + 1e-9
                        || ((u - bu).abs() <= 1e-9
                            && Some(v) == self.last_variant
                            && Some(*bv) != self.last_variant)
                }
            };
            if better {
                best_plan = Some((u, v, members, service));
            }
        }
        best_plan.map(|(_, v, m, s)| (v, m, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use osprey_core::profile::BatchProfile;
    use proptest::prelude::*;

    fn profile(per_batch_us: &[(u32, f64)]) -> VariantProfile {
        VariantProfile {
            name: "v".into(),
            swap_us: 0.0,
            explain_us: None,
            batches: per_batch_us
                .iter()
                .map(|&(b, us)| BatchProfile {
                    batch: b,
                    p50_us: us,
                    p90_us: us,
                    p99_us: us,
                    throughput_rps: 0.0,
                })
                .collect(),
        }
    }

    /// small: 100 µs + 20/row, acc 0.6; medium: 400 + 100/row, 0.8; large: 2000 + 1000/row, 0.95.
    fn zoo() -> Vec<VariantModel> {
        let v = |base: f64, per: f64, acc: f64| VariantModel {
            profile: profile(&[(1, base + per), (16, base + 16.0 * per)]),
            accuracy: acc,
            swap_us: 50.0,
        };
        vec![v(100.0, 20.0, 0.6), v(400.0, 100.0, 0.8), v(2000.0, 1000.0, 0.95)]
    }

    fn req(id: u64, now: Micros, budget: Micros, est: [f64; 3]) -> Request {
        Request {
            id,
            tenant: 0,
            rows: 1,
            arrival: now,
            deadline: now + budget,
            weight: 1.0,
            floor: 0.0,
            pinned: None,
            estimate: est.to_vec(),
        }
    }

    #[test]
    fn poll_timeout_is_exactly_when_expire_first_removes() {
        for rule in [Rule::Utility, Rule::Fixed(1)] {
            let mut s = Scheduler::new(SchedulerConfig::for_test(rule), zoo());
            assert_eq!(s.poll_timeout(), None);
            s.admit(0, req(1, 0, 20_000, [0.6, 0.8, 0.95])).unwrap();
            s.admit(0, req(2, 0, 50_000, [0.6, 0.8, 0.95])).unwrap();
            let t = s.poll_timeout().unwrap();
            assert!(t > 0 && t <= 20_000, "{rule:?}: {t}");
            assert!(s.expire(t - 1).is_empty(), "{rule:?}: nothing is due before the timeout");
            let gone = s.expire(t);
            assert_eq!(gone.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1], "{rule:?}");
            assert!(s.poll_timeout().unwrap() > t);
        }
    }

    #[test]
    fn a_tenant_fills_only_its_share_of_the_queue() {
        let mut cfg = SchedulerConfig::for_test(Rule::Fixed(0));
        cfg.tenant_queue = tenant_queue_bounds(cfg.max_queue, &[1.0, 3.0]);
        assert_eq!(cfg.tenant_queue, vec![16, 48]);
        let mut s = Scheduler::new(cfg, zoo());
        let of = |tenant, id| Request { tenant, ..req(id, 0, 1_000_000, [0.6, 0.8, 0.95]) };
        let admitted = (0..100).filter(|&i| s.admit(0, of(0, i)).is_ok()).count();
        assert_eq!(admitted, 16, "the aggressor stops at its share");
        assert_eq!(s.admit(0, of(0, 500)).unwrap_err().0, Reject::TenantShare);
        let admitted = (0..48).filter(|&i| s.admit(0, of(1, 1000 + i)).is_ok()).count();
        assert_eq!(admitted, 48, "the victim finds its whole share free");
        assert_eq!(tenant_queue_bounds(10, &[1.0]), vec![10]);
        assert_eq!(tenant_queue_bounds(10, &[1.0, f64::NAN, 0.0]), vec![10, 1, 1]);
    }

    #[test]
    fn the_admission_backlog_counts_pinned_requests_at_their_own_variant() {
        // Pinned to the large variant (1000 µs/row beyond its base), 100 requests are ~100 ms
        // of work; counting them at the small variant's speed (20 µs/row) admitted them all.
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        let pinned = |id| Request { pinned: Some(2), ..req(id, 0, 30_000, [0.6, 0.8, 0.95]) };
        let admitted = (0..100).filter(|&i| s.admit(0, pinned(i)).is_ok()).count();
        // Large at full batches of 8: 1.25 ms a row; admitted while the wait plus its own
        // service fits half of the 30 ms budget: about 12.
        assert!((8..=16).contains(&admitted), "{admitted} admitted for a 30 ms budget");
    }

    #[test]
    fn admit_within_is_the_least_budget_the_admission_takes() {
        // Whatever the queue holds, a pinned request with `admit_within_us` (rounded up) to
        // its deadline is admitted and one with a tenth less is refused.
        let with_queue = |n: u64| {
            let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
            for id in 0..n {
                s.admit(0, Request { pinned: Some(2), ..req(id, 0, 1_000_000, [0.6, 0.8, 0.95]) }).unwrap();
            }
            s
        };
        for queued in 0..12u64 {
            for v in 0..3 {
                let least = with_queue(queued).admit_within_us(Some(v), 1);
                assert!(least.is_finite() && least > 0.0, "{queued} queued, variant {v}: {least}");
                let at = |budget: f64| Request {
                    pinned: Some(v),
                    ..req(10_000, 0, budget.ceil() as Micros, [0.6, 0.8, 0.95])
                };
                assert!(with_queue(queued).admit(0, at(least)).is_ok(), "{queued} queued, variant {v}");
                assert!(
                    with_queue(queued).admit(0, at(least * 0.9)).is_err(),
                    "{queued} queued, variant {v}"
                );
            }
        }
        let fixed = Scheduler::new(SchedulerConfig::for_test(Rule::Fixed(0)), zoo());
        assert_eq!(fixed.admit_within_us(None, 1), 0.0);
    }

    #[test]
    fn non_finite_estimates_cannot_stall_a_request() {
        // A NaN estimate once made every candidate filter false: the request sat until expiry.
        for est in [[f64::NAN; 3], [f64::INFINITY, f64::NEG_INFINITY, f64::NAN], [-3.0, 7.0, f64::NAN]] {
            let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
            let mut r = req(1, 0, 10_000, est);
            r.floor = f64::NAN;
            s.admit(0, r).unwrap();
            let b = s.next_batch(0).batch.expect("planned at once");
            assert_eq!(b.members.len(), 1, "{est:?}");
        }
    }

    #[test]
    fn priority_properties() {
        let p = |w, a, s| priority(w, a, s, 1000.0, 1.0, 0.0);
        assert!(priority(1.0, 0.5, 5000.0, 1000.0, 1.0, 0.6) > priority(1.0, 0.9, 5000.0, 1000.0, 1.0, 0.0));
        assert!(priority(1.0, 0.5, 5000.0, 1000.0, 1.0, 0.2) > priority(1.0, 0.5, 5000.0, 1000.0, 1.0, 0.1));
        assert!(priority(1.0, 0.5, 5000.0, 1000.0, 1.0, f64::NAN).is_finite());
        assert!(p(2.0, 0.8, 500.0) > p(1.0, 0.8, 500.0));
        assert!(p(1.0, 0.9, 500.0) > p(1.0, 0.8, 500.0));
        assert!(p(1.0, 0.8, 100.0) > p(1.0, 0.8, 5000.0));
        assert_eq!(p(1.0, 0.8, -5.0), p(1.0, 0.8, 0.0));
    }

    #[test]
    fn idle_server_gives_the_most_accurate_variant_that_fits() {
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        s.admit(0, req(1, 0, 10_000, [0.6, 0.8, 0.95])).unwrap();
        let b = s.next_batch(0).batch.unwrap();
        assert_eq!(b.variant, 2);
        s.admit(0, req(2, 0, 1_000, [0.6, 0.8, 0.95])).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().variant, 1);
    }

    #[test]
    fn impossible_deadlines_are_refused_at_once() {
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        let (why, _) = s.admit(0, req(1, 0, 50, [0.6, 0.8, 0.95])).unwrap_err();
        assert_eq!(why, Reject::CannotMeetDeadline);
        // Fill the backlog, then a tight request is refused for capacity.
        for i in 0..40 {
            s.admit(0, req(10 + i, 0, 100_000, [0.6, 0.8, 0.95])).unwrap();
        }
        let (why, _) = s.admit(0, req(2, 0, 400, [0.6, 0.8, 0.95])).unwrap_err();
        assert_eq!(why, Reject::Capacity);
    }

    #[test]
    fn under_load_easy_inputs_go_to_the_cheap_variant_first() {
        // Two requests, too tight for large, and for medium twice in a row; 'easy' loses
        // almost nothing on small, 'hard' loses a lot.
        let mut s = Scheduler::new(
            SchedulerConfig { max_rows: 1, ..SchedulerConfig::for_test(Rule::Utility) },
            zoo(),
        );
        s.admit(0, req(1, 0, 800, [0.55, 0.85, 0.95])).unwrap(); // hard
        s.admit(0, req(2, 0, 800, [0.95, 0.96, 0.97])).unwrap(); // easy
        let first = s.next_batch(0).batch.unwrap();
        // Running 'easy' on small first leaves time for 'hard' on medium afterwards.
        assert_eq!((first.variant, first.members[0].id), (0, 2));
        let second = s.next_batch(first.planned_us as u64).batch.unwrap();
        assert_eq!((second.variant, second.members[0].id), (1, 1));
    }

    #[test]
    fn observed_slowdown_moves_plans_to_faster_variants() {
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        // Idle, large fits a 4 ms budget (3 ms by profile).
        s.admit(0, req(1, 0, 4_000, [0.6, 0.8, 0.95])).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().variant, 2);
        // Large has been running twice as slow as profiled: it no longer fits.
        for _ in 0..30 {
            s.observe(2, 1, 6_000.0);
        }
        assert!((s.slowdown()[2] - 2.0).abs() < 0.01);
        s.admit(0, req(2, 0, 4_000, [0.6, 0.8, 0.95])).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().variant, 1);
        // Nonsense observations are ignored or clamped.
        s.observe(9, 1, 1.0);
        s.observe(0, 1, f64::NAN);
        assert_eq!(s.slowdown()[0], 1.0);
    }

    #[test]
    fn expire_drops_only_what_cannot_make_it() {
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        s.admit(0, req(1, 0, 10_000, [0.6, 0.8, 0.95])).unwrap();
        s.admit(0, req(2, 0, 500, [0.6, 0.8, 0.95])).unwrap();
        // At 400 µs even small (120 µs) cannot finish request 2 by 500 µs.
        let gone: Vec<u64> = s.expire(400).iter().map(|r| r.id).collect();
        assert_eq!(gone, vec![2]);
        assert_eq!(s.len(), 1);
        // Nothing runs anywhere: the utility rule drops a request once no variant is available.
        s.set_available(&[false, false, false]);
        assert_eq!(s.expire(400).len(), 1);
        assert!(s.is_empty());
    }

    #[test]
    fn classic_orderings() {
        // EDF serves the earliest deadline first, whatever the arrival order.
        let mut s =
            Scheduler::new(SchedulerConfig { max_rows: 1, ..SchedulerConfig::for_test(Rule::Edf(0)) }, zoo());
        s.admit(0, req(1, 0, 5_000, [0.6, 0.8, 0.95])).unwrap();
        s.admit(0, req(2, 0, 1_000, [0.6, 0.8, 0.95])).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().members[0].id, 2);
        // DREAM drops a request that cannot finish and serves the most urgent one with the most
        // accurate variant that still fits it with the queue behind it (medium: 500 µs for it
        // and 500 µs for request 1 behind it, by 1200 µs).
        let dream = || {
            Scheduler::new(SchedulerConfig { max_rows: 1, ..SchedulerConfig::for_test(Rule::Dream) }, zoo())
        };
        let mut s = dream();
        s.admit(0, req(1, 0, 10_000, [0.6, 0.8, 0.95])).unwrap();
        s.admit(0, req(2, 0, 1_200, [0.6, 0.8, 0.95])).unwrap();
        s.admit(0, req(3, 0, 200, [0.6, 0.8, 0.95])).unwrap();
        let p = s.next_batch(100);
        assert_eq!(p.expired.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3]);
        let b = p.batch.unwrap();
        assert_eq!((b.members[0].id, b.variant), (2, 1));
        // A longer queue behind it: medium would leave it late, so the fastest variant.
        let mut s = dream();
        for i in 10..16 {
            s.admit(0, req(i, 0, 10_000, [0.6, 0.8, 0.95])).unwrap();
        }
        s.admit(0, req(2, 0, 1_200, [0.6, 0.8, 0.95])).unwrap();
        let b = s.next_batch(100).batch.unwrap();
        assert_eq!((b.members[0].id, b.variant), (2, 0));
        // Greedy takes the cheapest variant meeting the floor.
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Greedy), zoo());
        let mut r = req(1, 0, 10_000, [0.6, 0.8, 0.95]);
        r.floor = 0.7;
        s.admit(0, r).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().variant, 1);
        // Random is reproducible for a seed and uses more than one variant.
        let pick = |seed| {
            let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Random(seed)), zoo());
            (0..20)
                .map(|i| {
                    s.admit(0, req(i, 0, 100_000, [0.6, 0.8, 0.95])).unwrap();
                    s.next_batch(0).batch.unwrap().variant
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(7), pick(7));
        assert!(pick(7).iter().any(|&v| v != pick(7)[0]));
    }

    #[test]
    fn floors_are_respected_when_a_variant_can() {
        let mut s = Scheduler::new(SchedulerConfig::for_test(Rule::Utility), zoo());
        let mut r = req(1, 0, 1_000, [0.9, 0.6, 0.95]);
        r.floor = 0.85;
        s.admit(0, r).unwrap();
        assert_eq!(s.next_batch(0).batch.unwrap().variant, 0);
    }

    #[test]
    fn baselines_run_their_fixed_variant_fifo() {
        for (rule, want) in [(Rule::MostAccurate, 2), (Rule::Fastest, 0), (Rule::Fixed(1), 1)] {
            let mut s = Scheduler::new(SchedulerConfig::for_test(rule), zoo());
            for i in 0..3 {
                s.admit(0, req(i, 0, 100, [0.6, 0.8, 0.95])).unwrap();
            }
            let p = s.next_batch(0);
            let b = p.batch.unwrap();
            assert_eq!(b.variant, want);
            assert_eq!(b.members.iter().map(|m| m.id).collect::<Vec<_>>(), vec![0, 1, 2]);
            s.admit(0, req(9, 0, 10, [0.6, 0.8, 0.95])).unwrap();
            assert_eq!(s.next_batch(20).expired.len(), 1);
        }
    }

    #[derive(Debug, Clone)]
    struct Arrival {
        gap_us: u64,
        budget_us: u64,
        rows: u32,
        est: [f64; 3],
        floor: f64,
        pinned: Option<usize>,
    }

    fn arrival() -> impl Strategy<Value = Arrival> {
        (
            0u64..800,
            200u64..20_000,
            1u32..4,
            [0.0f64..1.0, 0.0f64..1.0, 0.0f64..1.0],
            0.0f64..1.0,
            proptest::option::weighted(0.1, 0usize..3),
        )
            .prop_map(|(gap_us, budget_us, rows, est, floor, pinned)| Arrival {
                gap_us,
                budget_us,
                rows,
                est,
                floor,
                pinned,
            })
    }

    /// Drives a scheduler with one worker in virtual time; returns the decision log.
    fn simulate(rule: Rule, arrivals: &[Arrival], max_rows: u32) -> Vec<String> {
        let cfg = SchedulerConfig { max_rows, max_queue: 16, ..SchedulerConfig::for_test(rule) };
        let mut s = Scheduler::new(cfg, zoo());
        let times: Vec<u64> = arrivals
            .iter()
            .scan(0u64, |t, a| {
                *t += a.gap_us;
                Some(*t)
            })
            .collect();
        let mut log = Vec::new();
        let mut ended = std::collections::HashMap::new();
        let mut end = |id: u64, how: &str| {
            assert!(ended.insert(id, how.to_string()).is_none(), "request {id} ended twice");
        };
        let (mut now, mut busy_until, mut k) = (0u64, 0u64, 0usize);
        loop {
            let mut idle_with_work = false;
            if busy_until <= now && !s.is_empty() {
                let p = s.next_batch(now);
                for r in &p.expired {
                    end(r.id, "expired");
                    log.push(format!("{now} expire {}", r.id));
                }
                match p.batch {
                    Some(b) => {
                        let rows: u32 = b.members.iter().map(|m| m.rows).sum();
                        assert!(b.members.len() == 1 || rows <= max_rows, "batch over max_rows");
                        for m in &b.members {
                            if let Some(pv) = m.pinned {
                                assert_eq!(pv, b.variant, "pinned request on another variant");
                            }
                            if rule == Rule::Utility {
                                assert!(
                                    now as f64 + b.planned_us <= m.deadline as f64 + 1e-6,
                                    "batch violates a member's deadline by profile"
                                );
                            }
                            end(m.id, "batched");
                        }
                        log.push(format!(
                            "{now} run v{} {:?}",
                            b.variant,
                            b.members.iter().map(|m| m.id).collect::<Vec<_>>()
                        ));
                        busy_until = now + b.planned_us.ceil().max(1.0) as u64;
                    }
                    None => idle_with_work = !s.is_empty(),
                }
            }
            let next_arrival = times.get(k).copied();
            let next_free = (busy_until > now).then_some(busy_until);
            let next = match (next_arrival, next_free) {
                (Some(a), Some(f)) => a.min(f),
                (Some(a), None) => a,
                (None, Some(f)) => f,
                (None, None) if idle_with_work => now + 1,
                (None, None) if s.is_empty() => break,
                (None, None) => now,
            };
            now = now.max(next);
            while k < times.len() && times[k] <= now {
                let a = &arrivals[k];
                let r = Request {
                    id: k as u64,
                    tenant: 0,
                    rows: a.rows,
                    arrival: times[k],
                    deadline: times[k] + a.budget_us,
                    weight: 1.0,
                    floor: a.floor,
                    pinned: a.pinned,
                    estimate: a.est.to_vec(),
                };
                if let Err((why, r)) = s.admit(now, r) {
                    end(r.id, "rejected");
                    log.push(format!("{now} reject {} {why:?}", r.id));
                }
                assert!(s.len() <= 16, "queue bound");
                k += 1;
            }
        }

        assert_eq!(ended.len(), arrivals.len(), "every request ends exactly once");
        log
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
        #[test]
        fn invariants_hold_for_every_rule(arrivals in proptest::collection::vec(arrival(), 1..60), max_rows in 1u32..10) {
                        for rule in [
                Rule::Utility,
                Rule::MostAccurate,
                Rule::Fastest,
                Rule::Fixed(1),
                Rule::Edf(2),
                Rule::Llf,
                Rule::Dream,
                Rule::Random(42),
                Rule::Greedy,
            ] {
                let a = simulate(rule, &arrivals, max_rows);
                let b = simulate(rule, &arrivals, max_rows);
                prop_assert_eq!(a, b, "same inputs, same decisions");
            }
        }
    }
}
