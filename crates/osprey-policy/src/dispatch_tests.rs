//! Dispatcher tests through a virtual-time driver that steps to the next thing due (the next
//! batch end, arrival or `poll_timeout`), like quinn-proto's `Pair::step`.

use super::*;
use crate::scheduler::{Rule, SchedulerConfig, VariantModel};
use osprey_core::profile::{BatchProfile, VariantProfile};
use proptest::prelude::*;

fn profile(us: f64) -> VariantProfile {
    let b = |batch: u32| BatchProfile {
        batch,
        p50_us: us * (1.0 + 0.25 * f64::from(batch - 1)),
        p90_us: us * 1.1 * (1.0 + 0.25 * f64::from(batch - 1)),
        p99_us: us * 1.2 * (1.0 + 0.25 * f64::from(batch - 1)),
        throughput_rps: 0.0,
    };
    VariantProfile { name: String::new(), swap_us: 0.0, explain_us: None, batches: vec![b(1), b(8)] }
}

fn model(name: &str, rule: Rule, base_us: f64) -> ModelSetup {
    let variants = vec![
        VariantModel { profile: profile(base_us), accuracy: 0.7, swap_us: 0.0 },
        VariantModel { profile: profile(base_us * 3.0), accuracy: 0.9, swap_us: 0.0 },
    ];
    let cfg = SchedulerConfig { max_queue: 10_000, ..SchedulerConfig::for_test(rule) };
    ModelSetup {
        name: name.into(),
        scheduler: Scheduler::new(cfg, variants),
        variants: vec![("small".into(), 10), ("large".into(), 30)],
    }
}

fn remote(name: &str, workers: u32, speed: f64, memory_mb: u64) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        workers,
        speed,
        memory_mb,
        models: None,
        preloaded: false,
        heartbeats: true,
        labels: BTreeMap::new(),
    }
}

fn request(id: u64, now: Micros, budget: Micros, pinned: Option<usize>) -> Request {
    Request {
        id,
        tenant: 0,
        rows: 1,
        arrival: now,
        deadline: now + budget,
        weight: 1.0,
        floor: 0.0,
        pinned,
        estimate: vec![0.7, 0.9],
    }
}

/// The driver: nodes run batches for `profile p50 / speed × true slowdown`; loads are
/// confirmed at once; heartbeats are sent every `HEARTBEAT` by live nodes.
struct Pair {
    d: Dispatcher,
    now: Micros,
    running: BTreeMap<BatchId, (Micros, Run)>,
    /// Per node: (true slowdown, alive).
    truth: BTreeMap<NodeId, (f64, bool)>,
    answers: HashMap<u64, u32>,
    admitted: Vec<u64>,
    runs: Vec<Run>,
    next_heartbeat: Micros,
    /// Memory of loads asked and not yet confirmed, per node.
    loading: BTreeMap<NodeId, Vec<u64>>,
    /// What a load measures, per variant index (MB); absent: as declared, not reported.
    measured: BTreeMap<usize, u64>,
    /// Loads and unloads in the order the dispatcher asked for them.
    changes: Vec<(&'static str, NodeId, ModelId, usize)>,
    /// Per node, what the link adds to every batch beyond the node's own time, µs.
    link: BTreeMap<NodeId, Micros>,
}

const HEARTBEAT: Micros = 200_000;

impl Pair {
    fn new(models: Vec<ModelSetup>) -> Pair {
        Pair {
            d: Dispatcher::new(DispatchConfig::default(), models),
            now: 0,
            running: BTreeMap::new(),
            truth: BTreeMap::new(),
            answers: HashMap::new(),
            admitted: Vec::new(),
            runs: Vec::new(),
            next_heartbeat: HEARTBEAT,
            loading: BTreeMap::new(),
            measured: BTreeMap::new(),
            changes: Vec::new(),
            link: BTreeMap::new(),
        }
    }

    fn join(&mut self, info: NodeInfo) -> NodeId {
        let id = self.d.handle_node_join(self.now, info);
        self.truth.insert(id, (1.0, true));
        self.drive();
        id
    }

    fn arrive(&mut self, model: ModelId, r: Request) {
        self.admitted.push(r.id);
        self.d.handle_arrival(self.now, model, r);
        self.drive();
    }

    /// Carries out every pending action.
    fn drive(&mut self) {
        while let Some(a) = self.d.poll_action() {
            match a {
                Action::Run(r) => {
                    let (slow, alive) = self.truth[&r.node];
                    // Never to a node the dispatcher knows is gone.
                    let view = self
                        .d
                        .nodes()
                        .into_iter()
                        .find(|n| n.id == r.node)
                        .expect("sent to a known-dead node");
                    self.runs.push(r.clone());
                    if !alive {
                        continue; // lost with its node; found out by silence
                    }
                    let base = self
                        .d
                        .scheduler(r.model)
                        .profiled_us(r.variant, r.rows, Quantile::P50)
                        .unwrap_or(1.0);
                    // Batches on one node run one after another per worker: start after the
                    // node's latest batch when all its workers are taken.
                    let busy: Vec<Micros> =
                        self.running.values().filter(|(_, x)| x.node == r.node).map(|(t, _)| *t).collect();
                    let start = if (busy.len() as u32) < view.info.workers {
                        self.now
                    } else {
                        busy.iter().copied().min().unwrap_or(self.now).max(self.now)
                    };
                    let link = self.link.get(&r.node).copied().unwrap_or(0);
                    let end = start + (base / view.info.speed * slow).ceil() as Micros + 1 + link;
                    self.running.insert(r.batch, (end, r));
                }
                Action::Reply { request, .. } => *self.answers.entry(request).or_default() += 1,
                Action::Load { node, model, variant } => {
                    // Placement never exceeds a node's memory (hosted + this load; `model()`
                    // declares small = 10 MB, large = 30 MB; `measured` overrides).
                    self.changes.push(("load", node, model, variant));
                    let view = self.d.nodes().into_iter().find(|n| n.id == node).expect("known node");
                    let measured = self.measured.clone();
                    let mb = |v: usize| measured.get(&v).copied().unwrap_or(if v == 0 { 10 } else { 30 });
                    let used: u64 = view.hosted.iter().map(|(_, v)| mb(usize::from(v != "small"))).sum();
                    self.loading.entry(node).or_default().push(mb(variant));
                    let pending: u64 = self.loading[&node].iter().sum();
                    assert!(
                        used + pending <= view.info.memory_mb,
                        "node {node} over memory: {used} + {pending} MB"
                    );
                    if self.truth.get(&node).is_some_and(|t| t.1) {
                        let report = self.measured.get(&variant).copied();
                        self.d.handle_loaded(self.now, node, model, variant, "", report);
                        if let Some(l) = self.loading.get_mut(&node) {
                            l.pop();
                        }
                    }
                }
                Action::Unload { node, model, variant } => {
                    self.changes.push(("unload", node, model, variant))
                }
                Action::Retired { model } => self.changes.push(("retired", 0, model, 0)),
                Action::Disconnect { .. } => {}
            }
        }
    }

    /// Advances virtual time to the next thing due and handles it; false when nothing is.
    fn step(&mut self, until: Micros) -> bool {
        let batch = self.running.values().map(|(t, _)| *t).min();
        let timer = self.d.poll_timeout();
        let live = self.truth.values().any(|t| t.1);
        let hb = live.then_some(self.next_heartbeat);
        let Some(next) = [batch, timer, hb].into_iter().flatten().min() else { return false };
        if next > until {
            return false;
        }
        self.now = self.now.max(next);
        if hb == Some(next) {
            self.next_heartbeat += HEARTBEAT;
            for (&id, &(_, alive)) in &self.truth {
                if alive {
                    self.d.handle_heartbeat(self.now, id, Telemetry::default());
                }
            }
        }
        if batch == Some(next) {
            let ids: Vec<BatchId> =
                self.running.iter().filter(|(_, (t, _))| *t == next).map(|(id, _)| *id).collect();
            for id in ids {
                let (_, run) = self.running.remove(&id).expect("running");
                if !self.truth[&run.node].1 {
                    continue; // the node died with it: the dispatcher finds out by silence
                }
                let base = self
                    .d
                    .scheduler(run.model)
                    .profiled_us(run.variant, run.rows, Quantile::P50)
                    .unwrap_or(1.0);
                let speed = self.d.nodes().iter().find(|n| n.id == run.node).map_or(1.0, |n| n.info.speed);
                let service = base / speed * self.truth[&run.node].0;
                if let Some(done) = self.d.handle_batch_done(
                    self.now,
                    id,
                    BatchOutcome::Ok { service_us: service, engine_us: service },
                ) {
                    for r in done.members {
                        *self.answers.entry(r.id).or_default() += 1;
                    }
                }
            }
        }
        if timer == Some(next) {
            self.d.handle_timeout(self.now);
        }
        self.drive();
        true
    }

    fn run_until(&mut self, t: Micros) {
        let mut guard = 0;
        while self.step(t) {
            guard += 1;
            assert!(guard < 1_000_000, "the driver did not settle");
        }
        self.now = self.now.max(t);
    }

    fn kill(&mut self, node: NodeId) {
        if let Some(t) = self.truth.get_mut(&node) {
            t.1 = false;
        }
    }

    fn assert_each_answered_once(&self) {
        for id in &self.admitted {
            assert_eq!(self.answers.get(id).copied().unwrap_or(0), 1, "request {id} answered wrongly");
        }
    }
}

#[test]
fn pinned_request_waits_for_a_busy_host_without_spinning() {
    // Node a has free workers but does not host `large`; node b hosts it and is busy. The
    // pinned request must not make the dispatcher re-plan in a loop: no action, and the next
    // wake-up is a real deadline, not `now`.
    let mut p = Pair::new(vec![model("m", Rule::Utility, 1000.0)]);
    let a = p.join(NodeInfo { memory_mb: 10, ..remote("a", 2, 1.0, 10) });
    let b = p.join(remote("b", 1, 1.0, 100));
    assert_eq!(p.d.available(0), vec![true, true]);
    // Fill b's worker and its backlog with pinned `large` batches.
    for i in 0..2 {
        p.arrive(0, request(i, 0, 100_000, Some(1)));
    }
    assert!(p.running.values().all(|(_, r)| r.node == b));
    p.arrive(0, request(9, 0, 100_000, Some(1)));
    assert!(p.d.poll_action().is_none());
    assert_eq!(p.d.scheduler(0).len(), 1);
    let wake = p.d.poll_timeout().unwrap();
    assert!(wake > p.now, "would spin: wake at {wake}, now {}", p.now);
    // Once b finishes, the waiting request runs there, never on a.
    p.run_until(50_000);
    assert!(p.runs.iter().all(|r| r.node != a || r.variant == 0));
    p.assert_each_answered_once();
}

#[test]
fn a_busy_fast_node_can_beat_a_free_slow_one() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    let fast = p.join(remote("fast", 1, 4.0, 100));
    let slow = p.join(remote("slow", 1, 0.1, 100));
    p.arrive(0, request(1, 0, 1_000_000, None));
    assert_eq!(p.runs[0].node, fast);
    // fast is busy for ~250 µs; slow would need ~10 ms: queueing on fast wins.
    p.arrive(0, request(2, 0, 1_000_000, None));
    assert_eq!(p.runs[1].node, fast, "the backlog term should prefer the fast node");
    // With fast's backlog full, the slow one takes the next.
    p.arrive(0, request(3, 0, 1_000_000, None));
    assert_eq!(p.runs[2].node, slow);
    p.run_until(1_000_000);
    p.assert_each_answered_once();
}

#[test]
fn observed_slowdown_reads_the_injected_factor() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    let n = p.join(remote("n", 1, 1.0, 100));
    p.truth.get_mut(&n).unwrap().0 = 10.0;
    for i in 0..40 {
        let t = p.now;
        p.arrive(0, request(i, t, 1_000_000, None));
        p.run_until(t + 20_000);
    }
    let s = p.d.nodes()[0].health.slowdown;
    assert!((s - 10.0).abs() < 0.5, "observed slowdown {s} for an injected 10");
}

#[test]
fn a_silent_node_fails_over_and_is_told_to_reconnect() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    let a = p.join(remote("a", 1, 1.0, 100));
    let b = p.join(remote("b", 1, 1.0, 100));
    p.arrive(0, request(1, 0, 5_000_000, None));
    let first = p.runs[0].node;
    p.kill(first);
    p.run_until(3_000_000);
    p.assert_each_answered_once();
    assert_eq!(p.runs.len(), 2, "retried once");
    assert_ne!(p.runs[1].node, first);
    assert!(p.d.node_id(if first == a { "a" } else { "b" }).is_none());
    let _ = b;
}

#[test]
fn readiness_follows_hosting() {
    let mut p = Pair::new(vec![model("m", Rule::Utility, 1000.0), model("n", Rule::Utility, 1000.0)]);
    assert!(!p.d.model_ready(0));
    let mut info = remote("a", 1, 1.0, 100);
    info.models = Some(vec!["n".into()]);
    let a = p.join(info);
    assert!(!p.d.model_ready(0));
    assert!(p.d.model_ready(1));
    p.kill(a);
    p.run_until(2_000_000);
    assert!(!p.d.model_ready(1));
}

#[test]
fn unload_waits_for_the_variants_batches_and_needs_another_host() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    p.join(remote("a", 1, 1.0, 100));
    assert!(p.d.unload(p.now, "a", "m", "small").is_err(), "only host");
    p.join(remote("b", 1, 1.0, 100));
    p.arrive(0, request(1, 0, 1_000_000, None));
    let on = p.d.nodes().iter().find(|n| n.id == p.runs[0].node).unwrap().info.name.clone();
    p.d.unload(p.now, &on, "m", "small").unwrap();
    // Its batch is in flight: no Unload yet.
    assert!(!std::iter::from_fn(|| p.d.poll_action()).any(|a| matches!(a, Action::Unload { .. })));
    p.run_until(100_000);
    p.assert_each_answered_once();
}

#[test]
fn a_reload_adds_a_revision_first_and_the_old_one_finishes_its_queue_before_it_is_released() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    let a = p.join(remote("a", 1, 1.0, 100));
    for id in 1..=5 {
        p.arrive(0, request(id, 0, 10_000_000, None));
    }
    // The new revision takes id 1 and is placed (loaded) while the old one still serves.
    let new = p.d.add_model(p.now, model("m", Rule::Fixed(0), 1000.0));
    p.drive();
    assert_eq!((new, p.d.model_id("m")), (1, Some(1)), "the name resolves to the newest revision");
    assert!(p.changes.contains(&("load", a, 1, 0)), "{:?}", p.changes);
    p.d.retire_model(p.now, 0);
    p.drive();
    assert_eq!(p.d.model_id("m"), Some(1));
    // An arrival at the retired revision is refused (the driver sends new ones to id 1).
    p.d.handle_arrival(p.now, 0, request(99, p.now, 1_000_000, None));
    assert!(matches!(p.d.poll_action(), Some(Action::Reply { request: 99, .. })));
    assert!(!p.changes.iter().any(|c| c.0 == "retired"), "queued requests remain: not released yet");
    p.arrive(1, request(6, p.now, 10_000_000, None));
    p.run_until(1_000_000);
    p.assert_each_answered_once();
    let unload = p.changes.iter().position(|c| *c == ("unload", a, 0, 0)).expect("old revision unloaded");
    let retired = p.changes.iter().position(|c| *c == ("retired", 0, 0, 0)).expect("released");
    assert!(unload < retired, "{:?}", p.changes);
    assert!(!p.changes.iter().any(|c| c.0 == "unload" && c.2 == 1), "the new revision stays loaded");
    // Retiring twice changes nothing.
    let before = p.changes.len();
    p.d.retire_model(p.now, 0);
    p.drive();
    assert_eq!(p.changes.len(), before);
}

#[test]
fn an_added_model_is_hosted_at_once_by_preloaded_nodes() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    p.join(NodeInfo::local("local", 1));
    let id = p.d.add_model(p.now, model("n", Rule::Fixed(0), 1000.0));
    assert!(p.d.model_ready(id));
    p.arrive(id, request(1, p.now, 1_000_000, None));
    p.run_until(100_000);
    p.assert_each_answered_once();
}

#[test]
fn two_models_share_the_workers() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0), model("n", Rule::Fixed(0), 1000.0)]);
    p.join(remote("a", 1, 1.0, 100));
    for i in 0..20 {
        p.arrive(0, request(i, 0, 1_000_000, None));
        p.arrive(1, request(100 + i, 0, 1_000_000, None));
    }
    p.run_until(1_000_000);
    p.assert_each_answered_once();
    let ms: Vec<ModelId> = p.runs.iter().map(|r| r.model).collect();
    assert!(ms.contains(&0) && ms.contains(&1));
}

#[derive(Debug, Clone)]
enum Ev {
    Arrive { model: usize, budget_ms: u64, pinned: Option<usize> },
    Join { workers: u32, speed_x10: u32, memory_mb: u64 },
    Kill(usize),
    Slow { node: usize, factor: u32 },
    Wait(u64),
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        6 => (0usize..2, 1u64..50, proptest::option::weighted(0.2, 0usize..2))
            .prop_map(|(model, budget_ms, pinned)| Ev::Arrive { model, budget_ms, pinned }),
        1 => (1u32..3, 2u32..40, prop_oneof![Just(10u64), Just(40), Just(100)])
            .prop_map(|(workers, speed_x10, memory_mb)| Ev::Join { workers, speed_x10, memory_mb }),
        1 => (0usize..6).prop_map(Ev::Kill),
        1 => (0usize..6, 1u32..10).prop_map(|(node, factor)| Ev::Slow { node, factor }),
        3 => (0u64..5_000).prop_map(Ev::Wait),
    ]
}

fn play(events: &[Ev], rule: Rule) -> (Vec<Run>, HashMap<u64, u32>, Vec<u64>) {
    let mut p = Pair::new(vec![model("m", rule, 500.0), model("n", rule, 800.0)]);
    let mut joined: Vec<NodeId> = Vec::new();
    let mut id = 0;
    for e in events {
        match *e {
            Ev::Arrive { model, budget_ms, pinned } => {
                id += 1;
                let now = p.now;
                p.arrive(model, request(id, now, budget_ms * 1000, pinned));
            }
            Ev::Join { workers, speed_x10, memory_mb } => {
                let n = joined.len();
                joined.push(p.join(remote(
                    &format!("n{n}"),
                    workers,
                    f64::from(speed_x10) / 10.0,
                    memory_mb,
                )));
            }
            Ev::Kill(i) => {
                if let Some(&n) = joined.get(i) {
                    p.kill(n);
                }
            }
            Ev::Slow { node, factor } => {
                if let Some(n) = joined.get(node)
                    && let Some(t) = p.truth.get_mut(n)
                {
                    t.0 = f64::from(factor);
                }
            }
            Ev::Wait(us) => {
                let t = p.now + us;
                p.run_until(t);
            }
        }
    }
    // Everything ends: deadlines are at most 50 ms away, dead nodes are found within a second.
    let t = p.now + 15_000_000;
    p.run_until(t);
    assert_eq!(p.d.queued(), 0);
    assert_eq!(p.d.in_flight(), 0, "in flight after the end");
    (p.runs, p.answers, p.admitted)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn every_request_answered_once_and_runs_are_deterministic(
        events in proptest::collection::vec(ev(), 1..80),
        utility in any::<bool>(),
    ) {
        let rule = if utility { Rule::Utility } else { Rule::Fixed(0) };
        let (runs, answers, admitted) = play(&events, rule);
        for id in &admitted {
            prop_assert_eq!(answers.get(id).copied().unwrap_or(0), 1, "request {}", id);
        }
        prop_assert_eq!(answers.len(), admitted.len());
        // Same events, same actions.
        let (again, _, _) = play(&events, rule);
        prop_assert_eq!(runs, again);
    }
}

#[test]
fn microsecond_jitter_is_not_a_slow_node_but_a_slow_long_batch_is() {
    // A 2 µs batch stretched to 20 µs (a preemption, a page fault): barely moves the estimate.
    let mut tiny = Health::default();
    tiny.success(20.0, 2.0);
    assert!(tiny.slowdown < 1.2, "{}", tiny.slowdown);
    // A 1.7 ms batch taking 10× longer reads as ~10× within a few batches.
    let mut long = Health::default();
    for _ in 0..15 {
        long.success(17_000.0, 1_700.0);
    }
    assert!(long.slowdown > 9.0, "{}", long.slowdown);
    // A healthy node stays at ~1.
    let mut ok = Health::default();
    for _ in 0..15 {
        ok.success(1_700.0, 1_700.0);
    }
    assert!((ok.slowdown - 1.0).abs() < 1e-9);
}

#[test]
fn a_configuration_bounds_replicas_and_batches_and_switches_variants_without_loss() {
    // Four workers, but the control loop allows two batches of the model at once, of at most
    // two rows, on the large variant; then it switches to small with one replica.
    let mut p = Pair::new(vec![model("m", Rule::Utility, 1000.0)]);
    p.join(remote("a", 4, 1.0, 100));
    p.d.configure(p.now, 0, crate::scheduler::Control { variant: Some(1), max_rows: Some(2) }, Some(2));
    for i in 0..40 {
        p.arrive(0, request(i, p.now, 5_000_000, None));
        let running = p.running.len();
        assert!(running <= 2, "{running} batches run at once under 2 replicas");
    }
    p.run_until(p.now + 20_000);
    assert!(p.runs.iter().all(|r| r.variant == 1 && r.rows <= 2), "{:?}", p.runs);
    let before = p.runs.len();
    p.d.configure(p.now, 0, crate::scheduler::Control { variant: Some(0), max_rows: None }, Some(1));
    assert_eq!(
        p.d.configuration(0),
        Some((crate::scheduler::Control { variant: Some(0), max_rows: None }, Some(1)))
    );
    let (mut t, end) = (p.now, p.now + 5_000_000);
    while t < end {
        t += 1_000;
        p.run_until(t);
        assert!(p.running.len() <= 2, "the old batches finish, no more than one new one starts");
    }
    // Batches planned after the switch run the new variant; every request answered once.
    assert!(p.runs[before..].iter().skip(2).all(|r| r.variant == 0), "{:?}", &p.runs[before..]);
    p.assert_each_answered_once();
}

#[test]
fn under_memory_pressure_the_least_recently_used_idle_variant_is_evicted_before_the_load() {
    // 70 MB; placement loads m0/small, m1/small and m0/large (50 MB as declared), but a large
    // variant measures 35 MB when it loads, so 55 MB are in use.
    let mut p = Pair::new(vec![model("m0", Rule::Utility, 1000.0), model("m1", Rule::Utility, 1000.0)]);
    p.measured.insert(1, 35);
    let a = p.join(remote("a", 2, 1.0, 70));
    let hosted = |p: &Pair| p.d.nodes()[0].hosted.clone();
    let pair = |m: &str, v: &str| (m.to_string(), v.to_string());
    assert_eq!(hosted(&p), vec![pair("m0", "small"), pair("m0", "large"), pair("m1", "small")]);
    assert_eq!(p.d.nodes()[0].memory_used_mb, 55, "measured, not declared");
    // m0/small and m1/small serve; m0/large idles.
    p.now += 1_000_000;
    for i in 0..10 {
        p.arrive(0, request(i, p.now, 5_000_000, Some(0)));
        p.arrive(1, request(100 + i, p.now, 5_000_000, Some(0)));
    }
    p.run_until(p.now + 100_000);
    // The control loop moves m1 to its large variant: 30 MB do not fit in 15, so the least
    // recently used variant that may go (m0/large; m0 stays served by small) is unloaded first.
    p.changes.clear();
    p.d.configure(p.now, 1, crate::scheduler::Control { variant: Some(1), max_rows: None }, None);
    p.drive();
    assert_eq!(p.changes, vec![("unload", a, 0, 1), ("load", a, 1, 1)]);
    assert_eq!(hosted(&p), vec![pair("m0", "small"), pair("m1", "small"), pair("m1", "large")]);
    for i in 0..10 {
        p.arrive(1, request(200 + i, p.now, 5_000_000, None));
    }
    p.run_until(p.now + 100_000);
    assert!(p.runs.iter().filter(|r| r.model == 1).rev().take(3).all(|r| r.variant == 1), "{:?}", p.runs);
    // m0 back to large (35 MB as measured, 15 free): evicting m1/small would free 10, not
    // enough, and m0/small is m0's only copy and m1/large is chosen: refused, nothing evicted.
    p.d.configure(p.now, 0, crate::scheduler::Control { variant: Some(1), max_rows: None }, None);
    p.changes.clear();
    let refused = p.d.load(p.now, "a", "m0", "large");
    assert!(matches!(&refused, Err(e) if e.code == ErrorCode::ResourceExhausted), "{refused:?}");
    p.drive();
    assert!(p.changes.is_empty(), "{:?}", p.changes);
    assert_eq!(hosted(&p), vec![pair("m0", "small"), pair("m1", "small"), pair("m1", "large")]);
    p.assert_each_answered_once();
}

#[test]
fn replicas_are_placed_on_nodes_by_speed_within_their_threads() {
    // a: 2 workers at speed 1; b: 2 workers at speed 2.
    let mut p = Pair::new(vec![model("m0", Rule::Utility, 1000.0), model("m1", Rule::Utility, 1000.0)]);
    p.join(remote("a", 2, 1.0, 1000));
    p.join(remote("b", 2, 2.0, 1000));
    let control = crate::scheduler::Control { variant: Some(0), max_rows: Some(1) };
    // Three replicas of m0, each to the most speed per replica: b (2/1), then a (1/1, tying
    // b's 2/2; the lower id wins a tie), then b (2/2 over a's 1/2).
    p.d.configure(p.now, 0, control, Some(3));
    let names = |p: &Pair, m| p.d.replica_nodes(m);
    assert_eq!(names(&p, 0), vec![("a".to_string(), 1), ("b".to_string(), 2)]);
    // m1's two: b's threads are all budgeted to m0 and a has one left, so a first; then every
    // host is budgeted and they share threads, b (2/1) over a (1/2).
    p.d.configure(p.now, 1, control, Some(2));
    assert_eq!(names(&p, 1), vec![("a".to_string(), 1), ("b".to_string(), 1)]);
    // Under load, no node ever runs more of a model's batches than its replicas there.
    for i in 0..200 {
        p.arrive((i % 2) as usize, request(i, p.now, 5_000_000, None));
        for (m, quota) in [(0usize, names(&p, 0)), (1, names(&p, 1))] {
            for (node, q) in quota {
                let id = p.d.node_id(&node).expect("live");
                let here = p.running.values().filter(|(_, r)| r.model == m && r.node == id).count() as u32;
                assert!(here <= q, "model {m} runs {here} batches on {node}, {q} replicas there");
            }
        }
        if i % 10 == 9 {
            p.run_until(p.now + 2_000);
        }
    }
    p.run_until(p.now + 5_000_000);
    p.assert_each_answered_once();
    // A node leaving takes its replicas elsewhere.
    let b = p.d.node_id("b").expect("live");
    p.d.handle_node_down(p.now, b, "test");
    p.drive();
    assert_eq!(names(&p, 0), vec![("a".to_string(), 3)]);
}

#[test]
fn the_per_batch_overhead_beyond_the_node_is_measured_per_node() {
    // a's link adds 300 µs to every batch; b's nothing. One request at a time, so no batch
    // waits in a node's backlog.
    let mut p = Pair::new(vec![model("m", Rule::Utility, 1000.0)]);
    let a = p.join(remote("a", 1, 1.0, 100));
    let b = p.join(remote("b", 1, 1.0, 100));
    p.link.insert(a, 300);
    for i in 0..60 {
        p.arrive(0, request(i, p.now, 5_000_000, Some(0)));
        p.run_until(p.now + 10_000);
    }
    p.assert_each_answered_once();
    let overhead =
        |id| p.d.nodes().into_iter().find(|n| n.id == id).map(|n| n.health.overhead_us).unwrap_or(-1.0);
    assert!((295.0..=310.0).contains(&overhead(a)), "a: {}", overhead(a));
    assert!(overhead(b) < 5.0, "b: {}", overhead(b));
    let mean = p.d.batch_overhead_us(0);
    assert!((overhead(a) + overhead(b) - 2.0 * mean).abs() < 1e-9, "{mean}");
}

#[test]
fn replicas_of_more_models_than_threads_spread_over_the_nodes() {
    // Four single-replica models in use, two nodes of one thread each, b a little faster: once
    // both threads are budgeted, replicas go where speed per replica of any model is highest,
    // so each node serves two (not all four on the fastest).
    let mut p = Pair::new((0..4).map(|k| model(&format!("s{k}"), Rule::Utility, 1000.0)).collect());
    p.join(remote("a", 1, 1.0, 1000));
    p.join(remote("b", 1, 1.2, 1000));
    let control = crate::scheduler::Control { variant: Some(1), max_rows: Some(1) };
    let on = |p: &Pair, node: &str| {
        (0..4).filter(|&m| p.d.replica_nodes(m).iter().any(|(n, _)| n == node)).count()
    };
    for i in 0..4u64 {
        p.arrive(i as usize, request(i, p.now, 5_000_000, None));
    }
    p.run_until(p.now + 100_000);
    for _ in 0..2 {
        for m in 0..4 {
            p.d.configure(p.now, m, control, Some(1));
        }
        assert_eq!((on(&p, "a"), on(&p, "b")), (2, 2));
    }
    // Idle for longer than ACTIVE_US, their replicas hold no threads: all four on the fastest.
    p.run_until(p.now + ACTIVE_US + 1_000_000);
    for m in 0..4 {
        p.d.configure(p.now, m, control, Some(1));
    }
    assert_eq!((on(&p, "a"), on(&p, "b")), (0, 4));
    p.assert_each_answered_once();
}

#[test]
fn the_expected_service_time_sees_speed_contention_and_failures() {
    let mut p = Pair::new(vec![model("m", Rule::Fixed(0), 1000.0)]);
    assert_eq!(p.d.expected_service(0, 0, 1), None, "nothing hosts it yet");
    let n = p.join(remote("n", 1, 2.0, 100));
    let e = p.d.expected_service(0, 0, 1).expect("hosted");
    // The scheduler plans by p90 (1100 us here), at speed 2.
    assert!((e.latency_us - 550.0).abs() < 1.0, "{e:?}");
    assert_eq!(e.failure_rate, 0.0);
    assert!(p.d.expected_service(0, 1, 1).unwrap().latency_us > e.latency_us, "the large variant costs more");
    // Contention: an injected 4x slowdown is seen after a few batches.
    p.truth.get_mut(&n).unwrap().0 = 4.0;
    for i in 0..30 {
        let t = p.now;
        p.arrive(0, request(i, t, 1_000_000, None));
        p.run_until(t + 20_000);
    }
    let slow = p.d.expected_service(0, 0, 1).unwrap();
    assert!(slow.latency_us > 3.0 * e.latency_us, "{slow:?} vs {e:?}");
    // A node that fails is gone; the other node's figure is what remains.
    let m = p.join(remote("m", 1, 1.0, 100));
    let fresh = p.d.expected_service(0, 0, 1).unwrap();
    assert!(fresh.latency_us < slow.latency_us, "the healthy node is the best instance now");
    p.kill(m);
    p.kill(n);
    p.run_until(p.now + 5_000_000);
    assert_eq!(p.d.expected_service(0, 0, 1), None);
}
