//! Multi-modal scenarios (`multimodal = "digit_events"` in a scenario): every arrival is one
//! paired event of the multi-modal model's held-out set (one image and one clip of the same
//! class, `eval/pairs.csv`), answered by the policy under test through the same discrete-event
//! engine and `osprey_policy` dispatcher as single-model scenarios; each call a policy makes
//! is a request of one member model, batched, queued, slowed down and failed over like any.
//! What an answer says comes from the held-out set: the variant's kept class probabilities for
//! that sample (`eval/probabilities.bin`), so fusion fuses what the real models answered.
//!
//! # Policies
//! ```text
//! quality-driven  osprey_policy::refine with the tenant's objective: the cheapest service
//!                 whose per-input (data-aware) estimate meets the target first, then the
//!                 next modality or variant while the fused confidence is below the target
//!                 and time allows (the live gateway runs the same code)
//! no-refinement   the same first answer, max_ensemble = 1
//! profiled        single-modality profiled selection: one call, to the most accurate service
//!                 by profiled (per-variant held-out) accuracy that fits the whole budget
//! fixed-ensemble  every carried modality at once on its most accurate variant, fused by the
//!                 tenant's rule when all have answered
//! edf, llf, dream ROHE's legacy orchestrators: every carried modality at once (its phase 0),
//!                 each member queue ordered by the rule (earliest deadline on the scenario's
//!                 fixed variant; least laxity; DREAM's urgency with early drop), the variant
//!                 the rule picks, answers averaged (ROHE's aggregation)
//! oracle          hindsight upper bound: one call, to the cheapest service (by expected time)
//!                 that fits the deadline and is right on this input, else the cheapest that
//!                 fits
//! ```
//! Which calls each policy makes is `osprey_policy::refine::plan`, as live; the member
//! models' scheduling rule is `MultiModalPolicy::member_rule`.
//! An event's answer is the argmax of the fused probabilities; it is on time when it was
//! complete (every call the policy waits for ended) by arrival + budget (the tenant's
//! `quality.time_budget_ms`, else its `latency_slo_ms`), request overhead included.
//!
//! # Departures
//! ROHE's DREAM and LLF rank the tasks of one request inside a per-request orchestrator and
//! pick instances by measured response time; here they rank each member model's queue across
//! requests (the dispatcher's rules `Rule::Dream`/`Rule::Llf`, most accurate variant whose
//! response time with the queue behind fits the chosen request), which is how they schedule a
//! shared cluster.
//!
//! # Explanations
//! A tenant with `quality.explain = "always"` has every answer explained: after the answer,
//! the first answering service runs the occlusion batch (one masked copy per `[explain]`
//! patch, a request of that many rows on the same variant), when its expected time
//! x(s) = max(batch latency now, profiled `explain_us`) still fits the deadline; otherwise the
//! explanation is skipped (or, `explain_miss = "refuse"`, the quality-driven first call must
//! leave room for it, as live). The event ends when its explanation does.

use crate::engine::{Arrival, ModelContext, Sim, Summary};
use crate::scenario::Scenario;
use osprey_core::multimodal::{ExplainWhen, Fusion, MultiModalPolicy, MultiModalSpec, PairedEvent};
use osprey_policy::dispatch::Why;
use osprey_policy::instance::Selector;
use osprey_policy::refine::{
    Objective, Plan, Refinement, Service, Step, argmax, explain_estimate, fan_out_explainer, fuse, plan,
};
use osprey_policy::scheduler::Request;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// The policies a multi-modal scenario may list (`MultiModalPolicy` names).
pub const POLICIES: [&str; 8] =
    ["quality-driven", "no-refinement", "profiled", "fixed-ensemble", "edf", "llf", "dream", "oracle"];

/// A multi-modal scenario's model: its declaration, members (in modality order) and pairs.
pub struct MmContext {
    pub spec: MultiModalSpec,
    pub models: Vec<ModelContext>,
    /// The held-out paired events only (the other half trained the estimators).
    pub events: Vec<PairedEvent>,
}

impl MmContext {
    pub fn load(scn: &Scenario, base: &Path) -> Result<MmContext, String> {
        let repo = base.join(&scn.model_repository);
        let spec = MultiModalSpec::load(&repo.join(&scn.multimodal)).map_err(|e| e.to_string())?;
        let models = spec
            .modalities
            .iter()
            .map(|m| ModelContext::load_named(&m.model, &repo))
            .collect::<Result<Vec<_>, _>>()?;
        let pairs = spec
            .load_pairs()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("multi-modal model '{}' has no [eval] pairs", spec.name))?;
        for (k, m) in models.iter().enumerate() {
            if m.eval.probabilities.is_none() {
                return Err(format!(
                    "model '{}' keeps no eval/probabilities.bin; the simulator fuses those",
                    m.spec.name
                ));
            }
            if let Some(p) = pairs.iter().find(|p| p.samples.get(k).is_none_or(|&i| i >= m.eval.len())) {
                return Err(format!("pair {p:?} names a sample model '{}' lacks", m.spec.name));
            }
        }
        let events: Vec<PairedEvent> = pairs.into_iter().filter(|p| p.held_out).collect();
        if events.is_empty() {
            return Err(format!("multi-modal model '{}' has no held-out pairs", spec.name));
        }
        for t in &scn.tenants {
            for m in t.quality.as_ref().map_or(&[][..], |q| &q.modalities[..]) {
                if !spec.modalities.iter().any(|d| &d.name == m) {
                    return Err(format!(
                        "tenant '{}' allows modality '{m}', which '{}' lacks",
                        t.name, spec.name
                    ));
                }
            }
        }
        Ok(MmContext { spec, models, events })
    }
}

/// The arrivals: times from the workload, tenants by share, events drawn uniformly from the
/// held-out pairs (`Arrival::sample` is the event's index in [`MmContext::events`]).
pub fn arrivals(scn: &Scenario, base: &Path, ctx: &MmContext) -> Result<Vec<Arrival>, String> {
    let times = scn.workload.arrivals(scn.duration_s, scn.seed, base)?;
    let mut rng = StdRng::seed_from_u64(scn.seed ^ 0x51ed_270b_b5c8_8d3f);
    let shares: Vec<f64> = scn.tenants.iter().map(|t| t.share).collect();
    Ok(times
        .into_iter()
        .map(|t| {
            let tenant = crate::engine::pick(&mut rng, &shares);
            let sample = rng.random_range(0..ctx.events.len());
            Arrival { t, tenant, model: 0, sample }
        })
        .collect())
}

/// Per-tenant totals of one run (index = tenant; one more, the last, for all tenants).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantTotals {
    pub requests: u64,
    pub completed: u64,
    pub correct: u64,
    /// Not answered on time (late, expired, failed or refused).
    pub not_on_time: u64,
    pub on_time_correct: u64,
    /// Answered with more than one fused answer.
    pub refined: u64,
    /// Member-model calls made (explanations not included).
    pub calls: u64,
    /// Answers that came with their explanation, and answers whose explanation was skipped.
    pub explained: u64,
    pub explain_skipped: u64,
}

/// One multi-modal run: the engine's summary (events as requests) and per-tenant totals.
#[derive(Debug, Clone)]
pub struct MmRun {
    pub summary: Summary,
    pub series: Vec<crate::engine::Interval>,
    pub tenants: Vec<TenantTotals>,
}

/// Runs `policy` on the arrivals.
pub fn simulate(scn: &Scenario, ctx: &MmContext, policy: MultiModalPolicy, arrivals: &[Arrival]) -> MmRun {
    let mut sim = Sim::new(scn, &ctx.models, policy.member_rule(), Selector::Predicted, arrivals);
    sim.out.policy = policy.as_str().into();
    let objectives = scn
        .tenants
        .iter()
        .map(|t| {
            let q = t.quality.clone().unwrap_or_default();
            let carried: Vec<usize> = (0..ctx.spec.modalities.len())
                .filter(|&k| q.modalities.is_empty() || q.modalities.contains(&ctx.spec.modalities[k].name))
                .collect();
            let budget_ms = q.time_budget_ms.map_or(t.latency_slo_ms, |b| b as f64);
            let fusion = q.fusion.unwrap_or(ctx.spec.fusion[0]);
            let explain = (q.explain == ExplainWhen::Always).then_some(q.explain_miss);
            let objective =
                Objective::from_quality(&q, (budget_ms * 1000.0) as u64, t.accuracy_floor, fusion, explain);
            TenantObjective { objective, carried }
        })
        .collect();
    sim.mm = Some(State {
        policy,
        events: ctx.events.clone(),
        objectives,
        runs: Vec::with_capacity(arrivals.len()),
        calls: Vec::new(),
        tenants: vec![TenantTotals::default(); scn.tenants.len() + 1],
    });
    sim.execute();
    let state = sim.mm.take();
    MmRun { summary: sim.out, series: sim.series, tenants: state.map(|s| s.tenants).unwrap_or_default() }
}

struct TenantObjective {
    objective: Objective,
    /// Member indices (modality order) this tenant's events carry.
    carried: Vec<usize>,
}

/// One event in flight.
struct EventRun {
    arrival: usize,
    tenant: usize,
    deadline: u64,
    label: u32,
    /// Per modality, the event's sample in that member's evaluation set.
    samples: Vec<usize>,
    services: Vec<Service>,
    refinement: Option<Refinement>,
    /// Parallel policies: answers so far (rows, service) and calls still out.
    answers: Vec<(Vec<Vec<f32>>, usize)>,
    outstanding: usize,
    /// Why the calls that did not answer ended.
    failures: Vec<Why>,
    calls: usize,
    /// The answer is to be explained (the tenant's objective).
    explain: bool,
    /// A fan-out's fusion rule.
    fusion: Fusion,
    /// The fused answer, once the policy is done, while its explanation runs.
    answer: Option<(Vec<Vec<f32>>, usize)>,
    explained: bool,
    done: bool,
}

struct Call {
    event: usize,
    service: usize,
    /// The occlusion batch of an answer, not an answer.
    explanation: bool,
}

/// The multi-modal part of the engine's state.
pub(crate) struct State {
    policy: MultiModalPolicy,
    events: Vec<PairedEvent>,
    objectives: Vec<TenantObjective>,
    runs: Vec<EventRun>,
    calls: Vec<Call>,
    tenants: Vec<TenantTotals>,
}

impl Sim<'_> {
    /// Event `i` arrives: its services, then the policy's first call(s).
    pub(crate) fn mm_arrive(&mut self, i: usize) {
        let a = self.arrivals[i];
        self.out.requests += 1;
        if let Some(b) = self.bucket(a.t) {
            b.arrivals += 1;
        }
        let Some(mm) = self.mm.as_ref() else { return };
        let (policy, event) = (mm.policy, mm.events[a.sample].clone());
        let carried = mm.objectives[a.tenant].carried.clone();
        let obj = mm.objectives[a.tenant].objective.clone();
        let deadline = a.t + obj.budget_us;
        let mut services = Vec::new();
        for &k in &carried {
            let estimate = self.estimate(k, event.samples[k]);
            let m = &self.models[k];
            let patches = m.spec.explain.as_ref().map_or(0, |x| x.patches() as u32);
            for (v, spec) in m.spec.variants.iter().enumerate() {
                let Some(e) = self.d.expected_service(k, v, 1) else { continue };
                let explain_us = (patches > 0).then(|| {
                    let profiled = m.profile.variant(&spec.name).and_then(|p| p.explain_us).unwrap_or(0.0);
                    explain_estimate(self.d.expected_service(k, v, patches).map(|b| b.latency_us), profiled)
                });
                services.push(Service {
                    modality: k,
                    variant: v,
                    accuracy: estimate.get(v).copied().unwrap_or(spec.accuracy),
                    profiled_accuracy: spec.accuracy,
                    class_accuracy: spec.class_accuracy.clone(),
                    latency_us: e.latency_us,
                    idle_us: e.idle_us,
                    admit_us: e.admit_us,
                    failure_rate: e.failure_rate,
                    explain_us,
                });
            }
        }
        let run = EventRun {
            arrival: i,
            tenant: a.tenant,
            deadline,
            label: event.label,
            samples: event.samples.clone(),
            services,
            refinement: None,
            answers: Vec::new(),
            outstanding: 0,
            failures: Vec::new(),
            calls: 0,
            explain: obj.explain.is_some(),
            fusion: obj.fusion,
            answer: None,
            explained: false,
            done: false,
        };
        let e = match self.mm.as_mut() {
            Some(mm) => {
                mm.runs.push(run);
                mm.runs.len() - 1
            }
            None => return,
        };
        let services = match self.mm_run(e) {
            Some(run) => run.services.clone(),
            None => return,
        };
        match plan(policy, obj, &services) {
            Plan::Refine(obj) => {
                let Some(run) = self.mm_run(e) else { return };
                run.refinement = Some(Refinement::new(obj, services, a.t));
                self.mm_step(e);
            }
            Plan::Hindsight => {
                let pick = self.oracle_pick(e);
                match pick {
                    Some(s) => self.mm_call(e, s, true, false),
                    None => self.mm_finish(e),
                }
            }
            Plan::FanOut { calls, fusion } => {
                if let Some(run) = self.mm_run(e) {
                    run.fusion = fusion;
                }
                for (s, pinned) in calls {
                    self.mm_call(e, s, pinned, false);
                }
                if self.mm_run(e).is_some_and(|r| r.calls == 0) {
                    self.mm_finish(e);
                }
            }
        }
    }

    fn mm_run(&mut self, e: usize) -> Option<&mut EventRun> {
        self.mm.as_mut().and_then(|mm| mm.runs.get_mut(e))
    }

    /// The hindsight choice: cheapest fitting service right on this input, else cheapest
    /// fitting.
    fn oracle_pick(&mut self, e: usize) -> Option<usize> {
        let now = self.now as f64;
        let run = self.mm_run(e)?;
        let (samples, deadline) = (run.samples.clone(), run.deadline as f64);
        let services = run.services.clone();
        let fits: Vec<usize> =
            (0..services.len()).filter(|&s| now + services[s].expected_us() <= deadline).collect();
        let cheapest = |set: &mut dyn Iterator<Item = usize>| {
            set.min_by(|&a, &b| services[a].expected_us().total_cmp(&services[b].expected_us()))
        };
        let right = |s: &usize| {
            let svc = &services[*s];
            self.models[svc.modality].eval.correct[svc.variant][samples[svc.modality]]
        };
        cheapest(&mut fits.iter().copied().filter(right)).or_else(|| cheapest(&mut fits.iter().copied()))
    }

    /// Asks the refinement what to do next, until it waits on a call or is done.
    fn mm_step(&mut self, e: usize) {
        let now = self.now;
        let d = &self.d;
        let Some(run) = self.mm.as_mut().map(|mm| &mut mm.runs[e]) else { return };
        let Some(r) = run.refinement.as_mut() else { return };
        r.refresh(|s| d.expected_service(s.modality, s.variant, 1));
        let step = r.poll(now);
        match step {
            Step::Done(_) => self.mm_finish(e),
            Step::Wait => {}
            Step::Call { service, .. } => self.mm_call(e, service, true, false),
        }
    }

    /// One call of event `e` to `service`'s model (pinned to its variant unless `pin` is off);
    /// `explanation`: the occlusion batch of the answer (one row per patch) instead.
    fn mm_call(&mut self, e: usize, service: usize, pin: bool, explanation: bool) {
        let (model, variant, sample, tenant, deadline, arrival) = {
            let Some(run) = self.mm_run(e) else { return };
            let Some(s) = run.services.get(service) else { return };
            (s.modality, s.variant, run.samples[s.modality], run.tenant, run.deadline, run.arrival)
        };
        let rows = match explanation {
            true => self.models[model].spec.explain.as_ref().map_or(1, |x| x.patches().max(1) as u32),
            false => 1,
        };
        let estimate = self.estimate(model, sample);
        let t = &self.scn.tenants[tenant];
        let (weight, floor) = (t.weight, t.accuracy_floor);
        let overhead = self.scn.request_overhead_us as u64;
        let id = {
            let Some(mm) = self.mm.as_mut() else { return };
            mm.calls.push(Call { event: e, service, explanation });
            let run = &mut mm.runs[e];
            if !explanation {
                run.calls += 1;
                run.outstanding += 1;
            }
            (mm.calls.len() - 1) as u64
        };
        let r = Request {
            id,
            tenant,
            rows,
            arrival: self.arrivals[arrival].t,
            deadline: deadline.saturating_sub(overhead),
            weight,
            floor,
            pinned: pin.then_some(variant),
            estimate,
        };
        self.d.handle_arrival(self.now, model, r);
    }

    /// Call `id` was answered by `variant` of `model`.
    pub(crate) fn mm_answer(&mut self, id: u64, model: usize, variant: usize) {
        let Some(mm) = self.mm.as_ref() else { return };
        let Some(call) = mm.calls.get(id as usize) else { return };
        let (e, service, explanation) = (call.event, call.service, call.explanation);
        let run = &mm.runs[e];
        if run.done {
            return;
        }
        if explanation {
            if let Some(run) = self.mm_run(e) {
                run.explained = true;
            }
            self.mm_count(e);
            return;
        }
        let sample = run.samples[model];
        let rows = vec![
            self.models[model].eval.probabilities(variant, sample).map(<[f32]>::to_vec).unwrap_or_default(),
        ];
        // The service that actually ran (an unpinned call's variant is the rule's).
        let ran =
            run.services.iter().position(|s| s.modality == model && s.variant == variant).unwrap_or(service);
        self.out.variants[self.variant_base[model] + variant] += 1;
        let now = self.now;
        let Some(run) = self.mm_run(e) else { return };
        run.outstanding = run.outstanding.saturating_sub(1);
        match run.refinement.as_mut() {
            Some(r) => {
                r.handle_answer(service, rows, now);
                self.mm_step(e);
            }
            None => {
                run.answers.push((rows, ran));
                if run.outstanding == 0 {
                    self.mm_finish(e);
                }
            }
        }
    }

    /// Call `id` ended without an answer.
    pub(crate) fn mm_reply(&mut self, id: u64, why: Why) {
        let Some(mm) = self.mm.as_ref() else { return };
        let Some(call) = mm.calls.get(id as usize) else { return };
        let (e, service, explanation) = (call.event, call.service, call.explanation);
        if mm.runs[e].done {
            return;
        }
        if explanation {
            // The answer stands; its explanation is skipped.
            self.mm_count(e);
            return;
        }
        let now = self.now;
        let Some(run) = self.mm_run(e) else { return };
        run.outstanding = run.outstanding.saturating_sub(1);
        run.failures.push(why);
        match run.refinement.as_mut() {
            Some(r) => {
                r.handle_failure(service, now);
                self.mm_step(e);
            }
            None if run.outstanding == 0 => self.mm_finish(e),
            None => {}
        }
    }

    /// The policy is done with event `e`: fuse, then explain when wanted and it fits, else
    /// count it.
    fn mm_finish(&mut self, e: usize) {
        let now = self.now;
        let Some(mm) = self.mm.as_mut() else { return };
        let run = &mut mm.runs[e];
        if run.done || run.answer.is_some() {
            return;
        }
        let fused: Vec<Vec<f32>> = match &run.refinement {
            Some(r) => r.fused().to_vec(),
            None => {
                let rule = run.fusion;
                let parts: Vec<(&[Vec<f32>], &Service)> =
                    run.answers.iter().map(|(rows, s)| (rows.as_slice(), &run.services[*s])).collect();
                fuse(rule, &parts)
            }
        };
        let (answers, explainer) = match &run.refinement {
            Some(r) => (r.answered().len(), r.explain_with(now)),
            None => {
                let first = run.answers.first().map(|(_, s)| *s);
                (run.answers.len(), fan_out_explainer(&run.services, first, now, run.deadline))
            }
        };
        let answered = fused.first().is_some_and(|r| !r.is_empty());
        let explain = run.explain && answered;
        run.answer = Some((fused, answers));
        match explainer.filter(|_| explain) {
            Some(s) => self.mm_call(e, s, true, true),
            None => self.mm_count(e),
        }
    }

    /// Event `e` is over: count its answer (or why there is none).
    fn mm_count(&mut self, e: usize) {
        let now = self.now;
        let overhead = self.scn.request_overhead_us.max(0.0) as u64;
        let Some(mm) = self.mm.as_mut() else { return };
        let run = &mut mm.runs[e];
        if run.done {
            return;
        }
        run.done = true;
        let (fused, answers) = run.answer.take().unwrap_or_default();
        let (tenant, calls, deadline, label) = (run.tenant, run.calls, run.deadline, run.label);
        let (explain, explained) = (run.explain, run.explained);
        let failures = std::mem::take(&mut run.failures);
        let arrival_t = self.arrivals[run.arrival].t;
        let answer = fused.first().filter(|r| !r.is_empty()).map(|r| argmax(r) as u32);
        let on_time = now + overhead <= deadline;
        let totals = [tenant, mm.tenants.len() - 1];
        for &t in &totals {
            let s = &mut mm.tenants[t];
            s.requests += 1;
            s.calls += calls as u64;
            if let Some(y) = answer {
                s.completed += 1;
                s.correct += u64::from(y == label);
                s.on_time_correct += u64::from(y == label && on_time);
                s.not_on_time += u64::from(!on_time);
                s.refined += u64::from(answers > 1);
                s.explained += u64::from(explained);
                s.explain_skipped += u64::from(explain && !explained);
            } else {
                s.not_on_time += 1;
            }
        }
        match answer {
            Some(y) => {
                let right = y == label;
                self.out.completed += 1;
                self.out.correct += u64::from(right);
                self.out.late += u64::from(!on_time);
                self.out.on_time_correct += u64::from(right && on_time);
                self.out.latencies_us.push(now + overhead - arrival_t);
                if let Some(b) = self.bucket(now) {
                    b.completed += 1;
                    b.correct += u64::from(right);
                    b.not_on_time += u64::from(!on_time);
                }
            }
            None => {
                // Refused when nothing was sent or every call was refused at admission; else
                // expired or failed, as the last call ended.
                if failures.iter().all(|w| *w == Why::Rejected) {
                    self.out.rejected += 1;
                } else if failures.last() == Some(&Why::Expired) {
                    self.out.expired += 1;
                } else {
                    self.out.failed += 1;
                }
                self.not_on_time(now);
            }
        }
    }
}

/// `multimodal.csv`: per policy and tenant (and `all`), what the summary cannot say.
pub fn tenants_csv(runs: &[(String, &MmRun)], scn: &Scenario, oracle_goodput: Option<u64>) -> String {
    use std::fmt::Write as _;
    let mut out = String::from(
        "policy,tenant,requests,accuracy,late_pct,refined_pct,calls_per_request,explained_pct,goodput,goodput_of_oracle\n",
    );
    for (policy, run) in runs {
        for (t, s) in run.tenants.iter().enumerate() {
            let name = scn.tenants.get(t).map_or("all", |x| x.name.as_str());
            let n = s.requests.max(1) as f64;
            let acc = if s.completed > 0 { s.correct as f64 / s.completed as f64 } else { 0.0 };
            let share = |k: u64| if s.completed > 0 { 100.0 * k as f64 / s.completed as f64 } else { 0.0 };
            let (refined, explained) = (share(s.refined), share(s.explained));
            let of_oracle = match oracle_goodput {
                Some(o) if t + 1 == run.tenants.len() && o > 0 => {
                    format!("{:.4}", s.on_time_correct as f64 / o as f64)
                }
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{policy},{name},{},{acc:.4},{:.3},{refined:.2},{:.3},{explained:.2},{},{of_oracle}",
                s.requests,
                100.0 * s.not_on_time as f64 / n,
                s.calls as f64 / n,
                s.on_time_correct
            );
        }
    }
    out
}
