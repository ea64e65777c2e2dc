//! Cross-modal refinement of one multi-modal request, sans-IO (the quality-driven
//! orchestration paper; its public code is rdsea/ROHE).
//!
//! A request observes one event through one or more modalities; every (modality, variant)
//! pair it may use is a [`Service`]. The driver builds a [`Refinement`] from the services, the
//! tenant's [`Objective`] and the time, then loops: [`Refinement::poll`] says which service to
//! call (or to wait, or that it is done), and the driver reports each call's answer
//! ([`Refinement::handle_answer`]) or failure ([`Refinement::handle_failure`]). [`plan`]
//! says, per [`MultiModalPolicy`], whether a request refines this way or fans out at once (the
//! baselines). The live gateway and the simulator drive this same code.
//!
//! # The rule
//! ```text
//! e(s)        = ℓ(s) / (1 − min(f(s), 0.9))      expected time of a call on service s: ℓ its
//!                                                 profiled latency on the instance it would run
//!                                                 on (slowdown, backlog and link included, by
//!                                                 the driver), f the recent failure share there
//!                                                 (each failure costs a retry: geometric)
//! fits(s, L)  = now + e(s) ≤ L  and  now + α(s) ≤ deadline
//!                                                 α(s) the least time to its deadline with
//!                                                 which the model's admission takes the call
//!                                                 now (its queue's backlog; the driver's)
//! spare(s)    = ℓ(s) − ℓ₀(s) ≤ SPARE_WAIT · ℓ₀(s) ℓ₀ the same call with nothing ahead of it:
//!                                                 the call would wait at most its own time
//! first call  : among untried s with fits(s, start + share·budget), the cheapest e(s) whose
//!               estimated accuracy a(s) ≥ min_accuracy; if none reaches it, the largest a(s);
//!               if nothing fits the share, the same over fits(s, deadline)
//! stop        : when conf(F) ≥ min_confidence (target met), when the calls made reach
//!               max_ensemble (failed calls count), when no untried service is left, when
//!               none fits(s, deadline) (no time), or when none that fits is spare (busy)
//! next call   : the untried s with fits(s, deadline) and spare(s) of highest score(s):
//!                 select_by_overall_accuracy : a(s)
//!                 enhance_confidence         : mean of accₛ(y) over the K classes most
//!                                              probable in F
//!                 enhance_generalization     : mean of accₛ(y) over the K classes least
//!                                              probable in F
//!               (K = max_ensemble, as ROHE uses its ensemble size; accₛ(y) is the held-out
//!               accuracy of s on class y; ties go to higher a(s), then lower e(s))
//! conf(F)     = minₙ maxᵧ Fₙ(y)   over the request's rows n
//! ```
//! Every call is planned to finish by the deadline by its expected time, as the driver
//! estimates it just before the decision ([`Refinement::refresh`]); a call that overruns is
//! the dispatcher's to expire, and what has answered by then is the answer.
//!
//! # Explanations
//! When the request is to be explained, x(s) is the expected time of explaining with service s
//! (its masked copies as one batch on the same instance; none if s's model declares no
//! explanation). The explanation is of the fused class, by the service that answered first, s₀:
//! ```text
//! refuse mode : the first call must satisfy fits(s, L) with e(s) + x(s) in place of e(s), and
//!               only services that can explain are candidates (none: refused at once)
//! both modes  : once s₀ answered and now + x(s₀) ≤ deadline, every refinement call must
//!               satisfy now + e(s) + x(s₀) ≤ deadline (the explanation's time stays reserved)
//! explain     : with s₀ when now + x(s₀) ≤ deadline after the refinement stops; else skipped
//! ```
//!
//! # Fusion ([`fuse`]), per row, of answers p₁..pₘ
//! ```text
//! product          F(y) ∝ Πᵢ max(pᵢ(y), 1e-12)
//!     Kittler, Hatef, Duin, Matas, "On Combining Classifiers", IEEE TPAMI 20(3), 1998, the
//!     product rule: P(y | x₁..xₘ) ∝ Πᵢ P(y | xᵢ) / P(y)^(m−1) for conditionally independent
//!     observations; the zoo's classes are balanced, so the prior term is constant.
//! weighted_average F(y) = Σᵢ wᵢ pᵢ(y) / Σᵢ wᵢ,  wᵢ = accᵢ(argmax pᵢ), at least 1e-3
//!     the same paper's weighted sum rule, weighting each answer by how often its variant is
//!     right on the class it predicts (the per-class accuracy profiles).
//! average          F(y) = Σᵢ pᵢ(y) / m      (ROHE's aggregation)
//! ```
//! Each rule returns a single answer unchanged (up to rounding).
//!
//! # Departures
//! ROHE selects a whole ensemble at once (one service per target class); here services are
//! chosen one at a time, each after the previous answer, so the score averages a service's
//! accuracy over the target classes instead of assigning one service per class. The paper's
//! formulas are not public; the expected-time rule above is Osprey's.

use crate::Micros;
use osprey_core::multimodal::{EnsembleStrategy, ExplainMiss, Fusion, MultiModalPolicy, QualityObjective};

/// How long a refinement call may wait behind other work, in multiples of its own expected
/// time on an idle instance (module docs, "next call").
pub const SPARE_WAIT: f64 = 1.0;

/// One (modality, variant) pair a request may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub modality: usize,
    pub variant: usize,
    /// Estimated accuracy for this input (data-aware or profiled), 0..1.
    pub accuracy: f64,
    /// The variant's held-out (profiled) accuracy, whatever the estimator says of this input.
    pub profiled_accuracy: f64,
    /// Held-out accuracy per class; empty: `accuracy` for every class.
    pub class_accuracy: Vec<f64>,
    /// Expected latency of one call on the instance it would run on, µs (see the module docs).
    pub latency_us: f64,
    /// The same call there with nothing ahead of it, µs (`latency_us` when unknown):
    /// `latency_us − idle_us` is its expected wait.
    pub idle_us: f64,
    /// The least time to its deadline with which the model's admission takes the call now,
    /// µs (0 when unknown; see [`crate::dispatch::Expected::admit_us`]).
    pub admit_us: f64,
    /// Recent share of failed batches on that instance, 0..1.
    pub failure_rate: f64,
    /// x(s) of the module docs, µs; `None`: this service cannot explain.
    pub explain_us: Option<f64>,
}

impl Service {
    /// e(s) of the module docs, µs.
    pub fn expected_us(&self) -> f64 {
        self.latency_us.max(0.0) / (1.0 - self.failure_rate.clamp(0.0, 0.9))
    }

    /// The call would wait at most [`SPARE_WAIT`] times its own time (module docs).
    fn spare(&self) -> bool {
        let idle = self.idle_us.max(0.0);
        self.latency_us - idle <= SPARE_WAIT * idle
    }

    fn class_acc(&self, y: usize) -> f64 {
        self.class_accuracy.get(y).copied().unwrap_or(self.accuracy)
    }
}

/// What a tenant asks of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    pub max_ensemble: usize,
    pub strategy: EnsembleStrategy,
    pub min_accuracy: f64,
    pub min_confidence: f64,
    pub budget_us: Micros,
    pub first_share: f64,
    pub fusion: Fusion,
    /// The request is to be explained, and what to do when that cannot fit.
    pub explain: Option<ExplainMiss>,
}

impl Objective {
    /// A tenant's `[tenants.quality]` for one request of `budget_us`: the accuracy target at
    /// least `floor` (the tenant's accuracy floor, a request's `min_accuracy`), fused by
    /// `fusion`, explained as `explain` says. The live gateway and the simulator both build it
    /// here; the gateway then narrows it by the request's own options.
    pub fn from_quality(
        q: &QualityObjective,
        budget_us: Micros,
        floor: f64,
        fusion: Fusion,
        explain: Option<ExplainMiss>,
    ) -> Objective {
        Objective {
            max_ensemble: q.max_ensemble,
            strategy: q.strategy,
            min_accuracy: q.min_accuracy.max(floor),
            min_confidence: q.min_confidence,
            budget_us: budget_us.max(1),
            first_share: q.first_share,
            fusion,
            explain,
        }
    }
}

/// Why a refinement stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The fused confidence reached the target.
    TargetMet,
    /// As many calls as the ensemble may have were made.
    EnsembleFull,
    /// Every service was tried.
    Exhausted,
    /// No untried service can finish before the deadline.
    NoTime,
    /// Refinement would only queue: every untried service that fits would wait longer than
    /// [`SPARE_WAIT`] times its own service time (refinement uses spare capacity only).
    Busy,
    /// A fan-out ([`Plan::FanOut`]): every call it made has ended.
    FannedOut,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::TargetMet => "target_met",
            Stop::EnsembleFull => "ensemble_full",
            Stop::Exhausted => "exhausted",
            Stop::NoTime => "no_time",
            Stop::Busy => "busy",
            Stop::FannedOut => "fanned_out",
        }
    }
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Call `service`; it must answer by `deadline`.
    Call {
        service: usize,
        deadline: Micros,
    },
    /// A call is outstanding.
    Wait,
    Done(Stop),
}

/// One request's refinement state (see the module docs).
#[derive(Debug, Clone)]
pub struct Refinement {
    obj: Objective,
    services: Vec<Service>,
    deadline: Micros,
    first_by: Micros,
    tried: Vec<bool>,
    calls: usize,
    pending: Option<usize>,
    /// Services that answered, in order, with their answers (rows x classes).
    answered: Vec<usize>,
    answers: Vec<Vec<Vec<f32>>>,
    fused: Vec<Vec<f32>>,
    stop: Option<Stop>,
}

impl Refinement {
    pub fn new(obj: Objective, services: Vec<Service>, now: Micros) -> Refinement {
        let deadline = now.saturating_add(obj.budget_us);
        let first_by = now.saturating_add((obj.budget_us as f64 * obj.first_share.clamp(0.0, 1.0)) as Micros);
        let n = services.len();
        Refinement {
            obj,
            services,
            deadline,
            first_by,
            tried: vec![false; n],
            calls: 0,
            pending: None,
            answered: Vec::new(),
            answers: Vec::new(),
            fused: Vec::new(),
            stop: None,
        }
    }

    pub fn deadline(&self) -> Micros {
        self.deadline
    }
    pub fn services(&self) -> &[Service] {
        &self.services
    }

    /// Replaces each service's expected latency, idle latency and failure share with
    /// `now_of`'s figures (the dispatcher's [`crate::dispatch::Expected`]), where it has them:
    /// queues, contention and failures change while a request refines, so the driver asks its
    /// dispatcher again before each decision.
    pub fn refresh(&mut self, mut now_of: impl FnMut(&Service) -> Option<crate::dispatch::Expected>) {
        for s in &mut self.services {
            if let Some(e) = now_of(s) {
                s.latency_us = e.latency_us;
                s.idle_us = e.idle_us;
                s.admit_us = e.admit_us;
                s.failure_rate = e.failure_rate;
            }
        }
    }
    /// Services that answered, in the order they did.
    pub fn answered(&self) -> &[usize] {
        &self.answered
    }
    /// Calls made (answered, failed or outstanding).
    pub fn calls(&self) -> usize {
        self.calls
    }
    /// The fused answer so far (rows x classes); empty before the first answer.
    pub fn fused(&self) -> &[Vec<f32>] {
        &self.fused
    }
    /// conf(F) of the module docs; 0 before the first answer.
    pub fn confidence(&self) -> f64 {
        confidence(&self.fused)
    }
    /// `service`'s own answer (rows x classes), if it answered.
    pub fn answer(&self, service: usize) -> Option<&[Vec<f32>]> {
        let k = self.answered.iter().position(|&s| s == service)?;
        Some(&self.answers[k])
    }

    /// More than one answer was fused.
    pub fn refined(&self) -> bool {
        self.answered.len() > 1
    }
    pub fn stop(&self) -> Option<Stop> {
        self.stop
    }

    /// The next step at `now`.
    pub fn poll(&mut self, now: Micros) -> Step {
        if let Some(s) = self.stop {
            return Step::Done(s);
        }
        if self.pending.is_some() {
            return Step::Wait;
        }
        let stop = if !self.answered.is_empty() && self.confidence() >= self.obj.min_confidence {
            Some(Stop::TargetMet)
        } else if self.calls >= self.obj.max_ensemble.max(1) {
            Some(Stop::EnsembleFull)
        } else if self.tried.iter().all(|&t| t) {
            Some(Stop::Exhausted)
        } else {
            None
        };
        if let Some(s) = stop {
            self.stop = Some(s);
            return Step::Done(s);
        }
        let pick = if self.answered.is_empty() { self.pick_first(now) } else { self.pick_next(now) };
        match pick {
            Some(s) => {
                self.tried[s] = true;
                self.calls += 1;
                self.pending = Some(s);
                Step::Call { service: s, deadline: self.deadline }
            }
            None => {
                let stop = if !self.answered.is_empty()
                    && self.untried_fitting(now, self.deadline).next().is_some()
                {
                    Stop::Busy
                } else {
                    Stop::NoTime
                };
                self.stop = Some(stop);
                Step::Done(stop)
            }
        }
    }

    /// `service` answered with `rows` (per row, class probabilities). An answer whose shape
    /// disagrees with the earlier ones counts as a failure.
    pub fn handle_answer(&mut self, service: usize, rows: Vec<Vec<f32>>, _now: Micros) {
        if self.pending != Some(service) {
            return;
        }
        self.pending = None;
        let same_shape = self
            .answers
            .first()
            .is_none_or(|a| a.len() == rows.len() && a.iter().zip(&rows).all(|(x, y)| x.len() == y.len()));
        if rows.is_empty() || !same_shape {
            return;
        }
        self.answered.push(service);
        self.answers.push(rows);
        let parts: Vec<(&[Vec<f32>], &Service)> = self
            .answered
            .iter()
            .zip(&self.answers)
            .map(|(&s, a)| (a.as_slice(), &self.services[s]))
            .collect();
        self.fused = fuse(self.obj.fusion, &parts);
    }

    /// `service`'s call failed (its retries, if any, are the dispatcher's and are spent).
    pub fn handle_failure(&mut self, service: usize, _now: Micros) {
        if self.pending == Some(service) {
            self.pending = None;
        }
    }

    /// Untried services whose call (plus the time kept for the explanation) fits by `limit`.
    fn untried_fitting(&self, now: Micros, limit: Micros) -> impl Iterator<Item = usize> + '_ {
        let first = self.answered.is_empty();
        let refuse = self.obj.explain == Some(ExplainMiss::Refuse);
        let reserve = if first { None } else { self.explain_reserve(now) };
        (0..self.services.len()).filter(move |&s| {
            let svc = &self.services[s];
            let extra = if first && refuse {
                match svc.explain_us {
                    Some(x) => x.max(0.0),
                    None => return false,
                }
            } else {
                reserve.unwrap_or(0.0)
            };
            !self.tried[s]
                && now as f64 + svc.expected_us() + extra <= limit as f64
                && now as f64 + svc.admit_us <= self.deadline as f64
        })
    }

    /// x(s₀) when an explanation is wanted and still fits by the deadline.
    fn explain_reserve(&self, now: Micros) -> Option<f64> {
        self.obj.explain?;
        let x = self.services[*self.answered.first()?].explain_us?.max(0.0);
        (now as f64 + x <= self.deadline as f64).then_some(x)
    }

    /// After the refinement stopped: the service to explain the answer with, if the request is
    /// to be explained and that fits by the deadline (module docs).
    pub fn explain_with(&self, now: Micros) -> Option<usize> {
        self.explain_reserve(now).and(self.answered.first().copied())
    }

    fn pick_first(&self, now: Micros) -> Option<usize> {
        for limit in [self.first_by, self.deadline] {
            let feasible: Vec<usize> = self.untried_fitting(now, limit).collect();
            if feasible.is_empty() {
                continue;
            }
            let s = &self.services;
            let cheapest_meeting =
                feasible.iter().copied().filter(|&i| s[i].accuracy >= self.obj.min_accuracy).min_by(
                    |&a, &b| {
                        s[a].expected_us()
                            .total_cmp(&s[b].expected_us())
                            .then(s[b].accuracy.total_cmp(&s[a].accuracy))
                    },
                );
            return cheapest_meeting.or_else(|| {
                feasible.iter().copied().max_by(|&a, &b| {
                    s[a].accuracy
                        .total_cmp(&s[b].accuracy)
                        .then(s[b].expected_us().total_cmp(&s[a].expected_us()))
                })
            });
        }
        None
    }

    fn pick_next(&self, now: Micros) -> Option<usize> {
        let classes = self.target_classes();
        let s = &self.services;
        let score = |i: usize| -> f64 {
            if classes.is_empty() {
                return s[i].accuracy;
            }
            classes.iter().map(|&y| s[i].class_acc(y)).sum::<f64>() / classes.len() as f64
        };
        self.untried_fitting(now, self.deadline).filter(|&i| s[i].spare()).max_by(|&a, &b| {
            score(a)
                .total_cmp(&score(b))
                .then(s[a].accuracy.total_cmp(&s[b].accuracy))
                .then(s[b].expected_us().total_cmp(&s[a].expected_us()))
        })
    }

    /// The classes the strategy targets, from the fused answer (mean over rows).
    fn target_classes(&self) -> Vec<usize> {
        let Some(first) = self.fused.first() else { return Vec::new() };
        let mut mean = vec![0.0f64; first.len()];
        for row in &self.fused {
            for (m, &p) in mean.iter_mut().zip(row) {
                *m += f64::from(p);
            }
        }
        let mut order: Vec<usize> = (0..mean.len()).collect();
        let k = self.obj.max_ensemble.clamp(1, mean.len().max(1));
        match self.obj.strategy {
            EnsembleStrategy::SelectByOverallAccuracy => Vec::new(),
            EnsembleStrategy::EnhanceConfidence => {
                order.sort_by(|&a, &b| mean[b].total_cmp(&mean[a]).then(a.cmp(&b)));
                order.truncate(k);
                order
            }
            EnsembleStrategy::EnhanceGeneralization => {
                order.sort_by(|&a, &b| mean[a].total_cmp(&mean[b]).then(a.cmp(&b)));
                order.truncate(k);
                order
            }
        }
    }
}

/// How one request is answered under a [`MultiModalPolicy`] (see [`plan`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Drive a [`Refinement`] under this objective.
    Refine(Objective),
    /// Make these calls at once, each `(service, pinned)`: pinned to the service's variant, or
    /// left to the member model's scheduling rule (the answer is then the variant that ran);
    /// fuse the answers by `fusion` once every call has ended.
    FanOut { calls: Vec<(usize, bool)>, fusion: Fusion },
    /// The hindsight oracle: the simulator picks, knowing which answers are right.
    Hindsight,
}

/// The calls of one request under `policy`, given the tenant's objective and the request's
/// services (the live gateway and the simulator both ask here):
/// ```text
/// quality-driven  Refine(objective)
/// no-refinement   Refine(objective, max_ensemble = 1)
/// profiled        Refine(objective, max_ensemble = 1, min_accuracy = 1, first_share = 1):
///                 no target is reachable, so the first-call rule takes the most accurate
///                 service (by its estimate: the profile under the profiled estimator) that
///                 fits the whole budget
/// fixed-ensemble  FanOut: per carried modality, the service of highest profiled accuracy
///                 (ties: lower e(s)), pinned; fused by the tenant's rule
/// edf, llf, dream FanOut: one unpinned call per carried modality, averaged (ROHE's phase 0
///                 sends every task at once and aggregates by mean)
/// oracle          Hindsight
/// ```
pub fn plan(policy: MultiModalPolicy, mut obj: Objective, services: &[Service]) -> Plan {
    let mut modalities: Vec<usize> = services.iter().map(|s| s.modality).collect();
    modalities.sort_unstable();
    modalities.dedup();
    match policy {
        MultiModalPolicy::QualityDriven => Plan::Refine(obj),
        MultiModalPolicy::NoRefinement => {
            obj.max_ensemble = 1;
            Plan::Refine(obj)
        }
        MultiModalPolicy::Profiled => {
            obj.max_ensemble = 1;
            obj.min_accuracy = 1.0;
            obj.first_share = 1.0;
            Plan::Refine(obj)
        }
        MultiModalPolicy::FixedEnsemble => {
            let calls = modalities
                .iter()
                .filter_map(|&k| {
                    (0..services.len()).filter(|&i| services[i].modality == k).max_by(|&a, &b| {
                        let (x, y) = (&services[a], &services[b]);
                        x.profiled_accuracy
                            .total_cmp(&y.profiled_accuracy)
                            .then(y.expected_us().total_cmp(&x.expected_us()))
                    })
                })
                .map(|i| (i, true))
                .collect();
            Plan::FanOut { calls, fusion: obj.fusion }
        }
        MultiModalPolicy::Edf | MultiModalPolicy::Llf | MultiModalPolicy::Dream => {
            let calls = modalities
                .iter()
                .filter_map(|&k| services.iter().position(|s| s.modality == k))
                .map(|i| (i, false))
                .collect();
            Plan::FanOut { calls, fusion: Fusion::Average }
        }
        MultiModalPolicy::Oracle => Plan::Hindsight,
    }
}

/// After a fan-out: the service to explain the answer with, the one that answered first,
/// when it can explain and now + x(s) ≤ deadline (the same rule as
/// [`Refinement::explain_with`]).
pub fn fan_out_explainer(
    services: &[Service],
    first: Option<usize>,
    now: Micros,
    deadline: Micros,
) -> Option<usize> {
    let s = first?;
    let x = services.get(s)?.explain_us?.max(0.0);
    (now as f64 + x <= deadline as f64).then_some(s)
}

/// x(s) of the module docs: the masked copies as one batch on the instance the call would run
/// on (`batch_us`, the dispatcher's expected time for that many rows), or the profiled
/// explanation time when that is slower (or when there is no batch figure).
pub fn explain_estimate(batch_us: Option<f64>, profiled_us: f64) -> f64 {
    batch_us.map_or(profiled_us, |b| b.max(profiled_us))
}

/// conf(F): the smallest over rows of the largest class probability; 0 when empty.
pub fn confidence(rows: &[Vec<f32>]) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter().map(|r| r.iter().copied().fold(0.0f32, f32::max) as f64).fold(f64::INFINITY, f64::min)
}

/// Fuses answers (each rows x classes, with the service that gave it) by `rule` (module docs).
/// Every answer must have the same shape; the result has it too.
pub fn fuse(rule: Fusion, answers: &[(&[Vec<f32>], &Service)]) -> Vec<Vec<f32>> {
    let Some((first, _)) = answers.first() else { return Vec::new() };
    (0..first.len())
        .map(|n| {
            let classes = first[n].len();
            match rule {
                Fusion::Product => {
                    let logs: Vec<f64> = (0..classes)
                        .map(|y| answers.iter().map(|(a, _)| f64::from(a[n][y]).max(1e-12).ln()).sum())
                        .collect();
                    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = logs.iter().map(|l| (l - top).exp()).collect();
                    let z: f64 = e.iter().sum();
                    e.iter().map(|v| (v / z) as f32).collect()
                }
                Fusion::WeightedAverage | Fusion::Average => {
                    let w: Vec<f64> = answers
                        .iter()
                        .map(|(a, s)| match rule {
                            Fusion::Average => 1.0,
                            _ => s.class_acc(argmax(&a[n])).max(1e-3),
                        })
                        .collect();
                    let z: f64 = w.iter().sum();
                    (0..classes)
                        .map(|y| {
                            (answers.iter().zip(&w).map(|((a, _), w)| w * f64::from(a[n][y])).sum::<f64>()
                                / z) as f32
                        })
                        .collect()
                }
            }
        })
        .collect()
}

/// Index of the largest element (the first on ties); 0 when empty.
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &p) in row.iter().enumerate() {
        if p > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc(modality: usize, variant: usize, accuracy: f64, latency_us: f64) -> Service {
        Service {
            modality,
            variant,
            accuracy,
            profiled_accuracy: accuracy,
            class_accuracy: Vec::new(),
            latency_us,
            idle_us: latency_us,
            admit_us: 0.0,
            failure_rate: 0.0,
            explain_us: None,
        }
    }

    #[test]
    fn plans_of_the_baselines() {
        // Two modalities: image (0) with a cheap and an accurate variant, audio (1) with one.
        let mut services = vec![svc(0, 0, 0.9, 100.0), svc(0, 1, 0.6, 400.0), svc(1, 0, 0.7, 200.0)];
        services[1].profiled_accuracy = 0.95;
        let o = obj(3, EnsembleStrategy::EnhanceConfidence);
        assert_eq!(plan(MultiModalPolicy::QualityDriven, o.clone(), &services), Plan::Refine(o.clone()));
        let Plan::Refine(n) = plan(MultiModalPolicy::NoRefinement, o.clone(), &services) else { panic!() };
        assert_eq!(n.max_ensemble, 1);
        let Plan::Refine(p) = plan(MultiModalPolicy::Profiled, o.clone(), &services) else { panic!() };
        assert_eq!((p.max_ensemble, p.min_accuracy, p.first_share), (1, 1.0, 1.0));
        // Fixed ensemble: the profile's best per modality, pinned, whatever this input's
        // estimate says; the tenant's fusion.
        assert_eq!(
            plan(MultiModalPolicy::FixedEnsemble, o.clone(), &services),
            Plan::FanOut { calls: vec![(1, true), (2, true)], fusion: o.fusion }
        );
        for legacy in [MultiModalPolicy::Edf, MultiModalPolicy::Llf, MultiModalPolicy::Dream] {
            assert_eq!(
                plan(legacy, o.clone(), &services),
                Plan::FanOut { calls: vec![(0, false), (2, false)], fusion: Fusion::Average }
            );
        }
        assert_eq!(plan(MultiModalPolicy::Oracle, o, &services), Plan::Hindsight);
        // The profiled policy's single call is the most accurate that fits the whole budget.
        let Plan::Refine(p) =
            plan(MultiModalPolicy::Profiled, obj(3, EnsembleStrategy::EnhanceConfidence), &services)
        else {
            panic!()
        };
        let mut r = Refinement::new(p, services.clone(), 0);
        assert_eq!(r.poll(0), Step::Call { service: 0, deadline: 10_000 });
    }

    #[test]
    fn fan_out_explains_with_the_first_answer_when_it_fits() {
        let mut services = vec![svc(0, 0, 0.9, 100.0), svc(1, 0, 0.7, 200.0)];
        assert_eq!(fan_out_explainer(&services, Some(0), 0, 1000), None, "cannot explain");
        services[0].explain_us = Some(800.0);
        assert_eq!(fan_out_explainer(&services, Some(0), 100, 1000), Some(0));
        assert_eq!(fan_out_explainer(&services, Some(0), 300, 1000), None, "does not fit");
        assert_eq!(fan_out_explainer(&services, None, 0, 1000), None);
        assert_eq!(explain_estimate(Some(500.0), 300.0), 500.0);
        assert_eq!(explain_estimate(Some(200.0), 300.0), 300.0);
        assert_eq!(explain_estimate(None, 300.0), 300.0);
    }

    fn obj(max_ensemble: usize, strategy: EnsembleStrategy) -> Objective {
        Objective {
            max_ensemble,
            strategy,
            min_accuracy: 0.8,
            min_confidence: 0.9,
            budget_us: 10_000,
            first_share: 0.5,
            fusion: Fusion::Product,
            explain: None,
        }
    }

    fn one_hot(classes: usize, y: usize, p: f32) -> Vec<f32> {
        let rest = (1.0 - p) / (classes - 1) as f32;
        (0..classes).map(|c| if c == y { p } else { rest }).collect()
    }

    #[test]
    fn the_first_answer_is_the_cheapest_that_meets_the_accuracy_target() {
        let services = vec![svc(0, 0, 0.6, 500.0), svc(0, 1, 0.85, 2_000.0), svc(1, 0, 0.95, 4_000.0)];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::SelectByOverallAccuracy), services.clone(), 0);
        assert_eq!(r.poll(0), Step::Call { service: 1, deadline: 10_000 });
        // Nothing reaches 0.99: the most accurate service that fits half the budget.
        let mut o = obj(2, EnsembleStrategy::SelectByOverallAccuracy);
        o.min_accuracy = 0.99;
        let mut r2 = Refinement::new(o.clone(), services.clone(), 0);
        assert_eq!(r2.poll(0), Step::Call { service: 2, deadline: 10_000 });
        // A slow service does not fit the first share: the next most accurate that does.
        let mut slow = services;
        slow[2].latency_us = 6_000.0;
        let mut r3 = Refinement::new(o, slow, 0);
        assert_eq!(r3.poll(0), Step::Call { service: 1, deadline: 10_000 });
        assert_eq!(r.poll(1), Step::Wait);
    }

    #[test]
    fn a_confident_first_answer_is_not_refined() {
        let services = vec![svc(0, 0, 0.85, 500.0), svc(1, 0, 0.9, 500.0)];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::EnhanceConfidence), services, 0);
        let Step::Call { service, .. } = r.poll(0) else { panic!("calls") };
        r.handle_answer(service, vec![one_hot(10, 3, 0.95)], 600);
        assert_eq!(r.poll(600), Step::Done(Stop::TargetMet));
        assert!(!r.refined());
        assert_eq!(r.calls(), 1);
    }

    #[test]
    fn a_weak_answer_is_refined_by_the_other_modality_and_fused() {
        let services = vec![svc(0, 0, 0.85, 500.0), svc(1, 0, 0.9, 800.0)];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::SelectByOverallAccuracy), services, 0);
        let Step::Call { service: a, .. } = r.poll(0) else { panic!("calls") };
        r.handle_answer(a, vec![one_hot(10, 3, 0.6)], 600);
        let Step::Call { service: b, .. } = r.poll(600) else { panic!("refines") };
        assert_ne!(a, b);
        r.handle_answer(b, vec![one_hot(10, 3, 0.7)], 1_500);
        // Product of two agreeing answers is more confident than either.
        assert!(r.confidence() > 0.7, "{}", r.confidence());
        assert!(r.refined());
        assert_eq!(r.poll(1_500), Step::Done(Stop::TargetMet));
    }

    #[test]
    fn refinement_uses_spare_capacity_only() {
        // The other modality's instance is busy: its call would wait three times its own time.
        let mut busy = svc(1, 0, 0.9, 800.0);
        busy.idle_us = 200.0;
        let services = vec![svc(0, 0, 0.85, 500.0), busy];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::SelectByOverallAccuracy), services, 0);
        let Step::Call { service: a, .. } = r.poll(0) else { panic!("calls") };
        assert_eq!(a, 0);
        r.handle_answer(a, vec![one_hot(10, 3, 0.6)], 600);
        assert_eq!(r.poll(600), Step::Done(Stop::Busy));
        assert!(!r.refined());
        // The same wait on a slower call is within its own time: spare, so it refines.
        let mut slow = svc(1, 0, 0.9, 800.0);
        slow.idle_us = 400.0;
        let mut r = Refinement::new(
            obj(2, EnsembleStrategy::SelectByOverallAccuracy),
            vec![svc(0, 0, 0.85, 500.0), slow],
            0,
        );
        let Step::Call { service: a, .. } = r.poll(0) else { panic!("calls") };
        r.handle_answer(a, vec![one_hot(10, 3, 0.6)], 600);
        assert_eq!(r.poll(600), Step::Call { service: 1, deadline: 10_000 });
    }

    #[test]
    fn a_call_the_admission_would_refuse_is_not_made() {
        // The accurate service's model queue asks for more time than is left: the first call
        // goes to the cheaper one, and refinement does not try the refused one.
        let mut refused = svc(1, 0, 0.95, 500.0);
        refused.admit_us = 20_000.0;
        let services = vec![svc(0, 0, 0.6, 500.0), refused];
        let mut o = obj(2, EnsembleStrategy::SelectByOverallAccuracy);
        o.min_accuracy = 0.9;
        let mut r = Refinement::new(o, services.clone(), 0);
        assert_eq!(r.poll(0), Step::Call { service: 0, deadline: 10_000 });
        r.handle_answer(0, vec![one_hot(10, 3, 0.5)], 600);
        assert_eq!(r.poll(600), Step::Done(Stop::NoTime));
        // Once the queue drains (the driver refreshes), the same service is taken.
        let mut o = obj(2, EnsembleStrategy::SelectByOverallAccuracy);
        o.min_accuracy = 0.9;
        let mut r = Refinement::new(o, services, 0);
        r.refresh(|_| {
            Some(crate::dispatch::Expected {
                latency_us: 500.0,
                idle_us: 500.0,
                admit_us: 1_000.0,
                failure_rate: 0.0,
            })
        });
        assert_eq!(r.poll(0), Step::Call { service: 1, deadline: 10_000 });
    }

    #[test]
    fn strategies_target_the_classes_they_name() {
        // Service 1 is strong on class 3 only, service 2 on class 7 only.
        let mut s1 = svc(1, 0, 0.7, 500.0);
        s1.class_accuracy = (0..10).map(|c| if c == 3 { 0.99 } else { 0.5 }).collect();
        let mut s2 = svc(1, 1, 0.7, 500.0);
        s2.class_accuracy = (0..10).map(|c| if c == 7 { 0.99 } else { 0.5 }).collect();
        let services = vec![svc(0, 0, 0.9, 100.0), s1, s2];
        // First answer: class 3 most probable, class 7 least.
        let mut first = vec![0.1f32; 10];
        first[3] = 0.5;
        first[7] = 0.0;
        let z: f32 = first.iter().sum();
        first.iter_mut().for_each(|p| *p /= z);
        let run = |strategy| {
            let mut o = obj(1, strategy);
            o.max_ensemble = 2;
            let mut r = Refinement::new(o, services.clone(), 0);
            assert_eq!(r.poll(0), Step::Call { service: 0, deadline: 10_000 });
            r.handle_answer(0, vec![first.clone()], 100);
            match r.poll(100) {
                Step::Call { service, .. } => service,
                s => panic!("{s:?}"),
            }
        };
        // K = 2: the top-2 classes are 3 and one of the 0.1s; the worst two include 7.
        assert_eq!(run(EnsembleStrategy::EnhanceConfidence), 1);
        assert_eq!(run(EnsembleStrategy::EnhanceGeneralization), 2);
    }

    #[test]
    fn failures_count_as_calls_and_a_failing_instance_costs_more() {
        let mut flaky = svc(0, 0, 0.9, 1_000.0);
        flaky.failure_rate = 0.5;
        assert!((flaky.expected_us() - 2_000.0).abs() < 1e-9);
        let services = vec![flaky, svc(1, 0, 0.9, 1_500.0)];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::SelectByOverallAccuracy), services, 0);
        // The healthy service is cheaper by expected time.
        assert_eq!(r.poll(0), Step::Call { service: 1, deadline: 10_000 });
        r.handle_failure(1, 1_500);
        assert_eq!(r.poll(1_500), Step::Call { service: 0, deadline: 10_000 });
        r.handle_answer(0, vec![one_hot(10, 1, 0.5)], 3_000);
        assert_eq!(r.poll(3_000), Step::Done(Stop::EnsembleFull));
        assert_eq!(r.answered(), &[0]);
    }

    #[test]
    fn nothing_is_called_that_cannot_finish_in_time() {
        let services = vec![svc(0, 0, 0.9, 20_000.0)];
        let mut r = Refinement::new(obj(2, EnsembleStrategy::EnhanceConfidence), services, 0);
        assert_eq!(r.poll(0), Step::Done(Stop::NoTime));
        assert!(r.fused().is_empty());
    }

    #[test]
    fn an_explanation_keeps_its_time_or_is_refused_or_skipped() {
        let mut cheap = svc(0, 0, 0.9, 1_000.0);
        cheap.explain_us = Some(9_500.0);
        let mut other = svc(1, 0, 0.9, 2_000.0);
        other.explain_us = Some(2_000.0);
        let services = vec![cheap, other, svc(1, 1, 0.95, 500.0)];
        // Refuse: only services that can explain and fit with it: `other` (2 000 + 2 000), as
        // the cheap one needs 1 000 + 9 500 of the 10 000.
        let mut o = obj(3, EnsembleStrategy::SelectByOverallAccuracy);
        o.explain = Some(ExplainMiss::Refuse);
        o.first_share = 1.0;
        let mut r = Refinement::new(o.clone(), services.clone(), 0);
        assert_eq!(r.poll(0), Step::Call { service: 1, deadline: 10_000 });
        r.handle_answer(1, vec![one_hot(10, 2, 0.5)], 2_000);
        // Refinement by the most accurate service, which need not explain.
        assert_eq!(r.poll(2_000), Step::Call { service: 2, deadline: 10_000 });
        r.handle_answer(2, vec![one_hot(10, 2, 0.5)], 7_600);
        // At 7 600 service 0 (1 000) would leave too little for the explanation (2 000).
        assert_eq!(r.poll(7_600), Step::Done(Stop::NoTime));
        assert_eq!(r.explain_with(7_600), Some(1));
        assert_eq!(r.explain_with(8_500), None, "too late to explain");
        // Refuse with nothing able to explain in time: refused before any call.
        let mut o2 = o.clone();
        o2.budget_us = 3_000;
        let mut r2 = Refinement::new(o2, services.clone(), 0);
        assert_eq!(r2.poll(0), Step::Done(Stop::NoTime));
        // Skip: the cheapest answers whether or not it can explain.
        o.explain = Some(ExplainMiss::Skip);
        o.min_accuracy = 0.0;
        let mut r3 = Refinement::new(o, services, 0);
        assert_eq!(r3.poll(0), Step::Call { service: 2, deadline: 10_000 });
        r3.handle_answer(2, vec![one_hot(10, 2, 0.5)], 500);
        assert_eq!(r3.explain_with(500), None, "service 2 cannot explain: skipped");
    }

    fn probs(raw: Vec<f32>) -> Vec<f32> {
        let z: f32 = raw.iter().sum();
        raw.iter().map(|p| p / z).collect()
    }

    proptest! {
        #[test]
        fn fusing_one_answer_gives_that_answer(raw in prop::collection::vec(0.001f32..1.0, 2..12), acc in 0.0f64..1.0) {
            let p = probs(raw);
            let s = Service { class_accuracy: vec![acc; p.len()], ..svc(0, 0, acc, 1.0) };
            let rows = vec![p.clone()];
            for rule in [Fusion::Product, Fusion::WeightedAverage, Fusion::Average] {
                let f = fuse(rule, &[(rows.as_slice(), &s)]);
                for (a, b) in f[0].iter().zip(&p) {
                    prop_assert!((a - b).abs() < 1e-5, "{:?}: {} vs {}", rule, a, b);
                }
            }
        }

        #[test]
        fn refinement_keeps_to_the_deadline_and_the_ensemble_size(
            latencies in prop::collection::vec(10.0f64..6_000.0, 1..7),
            failures in prop::collection::vec(0.0f64..0.8, 7),
            budget in 100u64..20_000,
            max_ensemble in 1usize..5,
            share in 0.05f64..1.0,
            target in 0.0f64..1.0,
            // Per call: how long it really took (a share of its expected time, may overrun),
            // whether it failed, and the confidence of its answer.
            outcomes in prop::collection::vec((0.0f64..1.5, prop::bool::weighted(0.2), 0.1f32..1.0), 7),
            strategy in prop::sample::select(vec![
                EnsembleStrategy::SelectByOverallAccuracy,
                EnsembleStrategy::EnhanceConfidence,
                EnsembleStrategy::EnhanceGeneralization,
            ]),
            k_explain in 0usize..3,
        ) {
            let services: Vec<Service> = latencies.iter().enumerate().map(|(i, &l)| Service {
                failure_rate: failures[i],
                explain_us: (i % 3 != 2).then_some(l * 4.0),
                class_accuracy: (0..4).map(|c| 0.5 + 0.1 * ((i + c) % 5) as f64).collect(),
                ..svc(i % 2, i, 0.5 + 0.07 * i as f64, l)
            }).collect();
            let explain = [None, Some(ExplainMiss::Skip), Some(ExplainMiss::Refuse)][k_explain];
            let o = Objective { max_ensemble, strategy, min_accuracy: 0.6, min_confidence: target,
                budget_us: budget, first_share: share, fusion: Fusion::Product, explain };
            let start = 1_000;
            let mut r = Refinement::new(o, services.clone(), start);
            let mut now = start;
            let mut k = 0;
            loop {
                match r.poll(now) {
                    Step::Call { service, deadline } => {
                        prop_assert_eq!(deadline, start + budget);
                        // Never past the deadline by the profile.
                        prop_assert!(now as f64 + services[service].expected_us() <= deadline as f64);
                        let (took, failed, conf) = outcomes[k % outcomes.len()];
                        k += 1;
                        now += (services[service].expected_us() * took) as u64;
                        if failed {
                            r.handle_failure(service, now);
                        } else {
                            r.handle_answer(service, vec![probs(vec![conf, 1.0 - conf + 0.01, 0.01, 0.01])], now);
                        }
                    }
                    Step::Wait => prop_assert!(false, "nothing is outstanding"),
                    Step::Done(stop) => {
                        if stop == Stop::TargetMet {
                            prop_assert!(r.confidence() >= target);
                        }
                        // An explanation is only planned when it fits by the profile.
                        if let Some(s) = r.explain_with(now) {
                            prop_assert!(explain.is_some());
                            prop_assert_eq!(Some(s), r.answered().first().copied());
                            prop_assert!(now as f64 + services[s].explain_us.unwrap() <= (start + budget) as f64);
                        }
                        // Refuse mode: the first service could explain.
                        if explain == Some(ExplainMiss::Refuse) && !r.answered().is_empty() {
                            prop_assert!(services[r.answered()[0]].explain_us.is_some());
                        }
                        break;
                    }
                }
                prop_assert!(k <= services.len());
            }
            // Never more calls than the ensemble size, and every answer came from a call.
            prop_assert!(r.calls() <= max_ensemble);
            prop_assert!(r.answered().len() <= r.calls());
            let mut seen = r.answered().to_vec();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), r.answered().len());
        }
    }
}
