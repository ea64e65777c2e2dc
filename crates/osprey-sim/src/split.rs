//! Split inference in the simulator: a large model's layers over many nodes, driven by the
//! same planner, reviser and epoch machine as the live gateway (`osprey_policy::split`).
//!
//! Each request follows its epoch's chain: a transfer into each stage (a FIFO link: the
//! boundary's bytes over the link's bandwidth, then its latency), then the stage's compute on
//! its node (a FIFO server; each unit's profiled time times the node's current slowdown). The
//! reviser sees every stage's observed / profiled time when the stage ends; a new plan's
//! ranges load for `load_s_per_unit` per unit of a node's stage (nodes load in parallel), and
//! it becomes current when all have. A request that starts while no plan is current waits for
//! one. Departure from an exact queueing model: requests are served at each station in the
//! order they arrived at the system, which is exact for one chain and approximate while two
//! epochs' chains share a node.

use osprey_policy::split::{
    EpochAction, Epochs, Link, NodeCap, Objective, Reviser, RevisionRule, SplitProblem, Strategy, Trigger,
    assignments, evaluate, plan,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BinaryHeap};

/// A node of the simulated site.
#[derive(Clone, Debug)]
pub struct SimNode {
    pub name: String,
    pub trusted: bool,
    pub memory_mb: f64,
    /// Relative speed: a unit takes `unit_us / speed`.
    pub speed: f64,
    /// Wired (1 GbE) or wireless.
    pub wired: bool,
}

/// The scenario: a model profile, nodes and links, a load and one slowdown.
#[derive(Clone, Debug)]
pub struct SplitScenario {
    /// Per unit compute on a speed-1 node, µs, and memory, MB.
    pub unit_us: Vec<f64>,
    pub unit_mb: Vec<f64>,
    pub boundary_bytes: Vec<f64>,
    pub input_bytes: f64,
    pub nodes: Vec<SimNode>,
    pub wired: Link,
    pub wireless: Link,
    pub private_units: usize,
    /// Poisson arrivals per second for the latency run.
    pub rate: f64,
    pub duration_s: f64,
    /// `(node, at_s, factor)`: the node's units take `factor` times longer from `at_s`.
    pub slowdown: Option<(usize, f64, f64)>,
    pub load_s_per_unit: f64,
    pub seed: u64,
}

impl SplitScenario {
    /// Eight edge nodes and a 32-layer model scaled from MiniLM-L6 as measured here (0.93 ms and
    /// 7.3 MB per layer at 32 tokens, hidden 384) to hidden 2048 at 64 tokens: compute ×
    /// (64/32)·(2048/384)² ≈ 57, memory × (2048/384)² ≈ 28. Links: 1 GbE between wired
    /// boxes (0.3 ms, 125 MB/s), Wi-Fi otherwise (2 ms, 25 MB/s). The embedding and the first
    /// two layers are pinned to the two trusted boxes.
    pub fn edge_site() -> SplitScenario {
        let (compute, memory) = (57.0, 28.4);
        let layers = 32;
        let mut unit_us = vec![40.0 * compute];
        let mut unit_mb = vec![12.2 * 4.0];
        unit_us.extend(std::iter::repeat_n(930.0 * compute, layers));
        unit_mb.extend(std::iter::repeat_n(7.3 * memory, layers));
        let hidden_bytes = 64.0 * 2048.0 * 4.0;
        let node = |name: &str, trusted, memory_mb, speed, wired| SimNode {
            name: name.into(),
            trusted,
            memory_mb,
            speed,
            wired,
        };
        SplitScenario {
            boundary_bytes: vec![hidden_bytes + 64.0 * 8.0; layers + 1],
            input_bytes: 64.0 * 16.0,
            unit_us,
            unit_mb,
            nodes: vec![
                node("orin-a", true, 2500.0, 2.0, true),
                node("nuc-a", true, 1500.0, 1.0, true),
                node("orin-b", false, 2500.0, 2.0, true),
                node("nuc-b", false, 1500.0, 1.0, true),
                node("nuc-c", false, 1500.0, 1.0, false),
                node("tx2", false, 1500.0, 0.6, false),
                node("rpi-a", false, 1000.0, 0.3, false),
                node("rpi-b", false, 1000.0, 0.3, false),
            ],
            wired: Link { latency_us: 300.0, bytes_per_us: 125.0 },
            wireless: Link { latency_us: 2000.0, bytes_per_us: 25.0 },
            private_units: 3,
            rate: 1.0,
            duration_s: 120.0,
            slowdown: None,
            load_s_per_unit: 0.3,
            seed: 7,
        }
    }

    fn link(&self, a: usize, b: usize) -> Link {
        if self.nodes[a].wired && self.nodes[b].wired { self.wired } else { self.wireless }
    }

    /// The planning problem as profiled (speed 1 everywhere the slowdown has not struck).
    pub fn problem(&self, objective: Objective) -> SplitProblem {
        let n = self.nodes.len();
        SplitProblem {
            unit_memory_mb: self.unit_mb.clone(),
            boundary_bytes: self.boundary_bytes.clone(),
            input_bytes: self.input_bytes,
            nodes: self
                .nodes
                .iter()
                .map(|s| NodeCap {
                    name: s.name.clone(),
                    trusted: s.trusted,
                    memory_mb: s.memory_mb,
                    unit_us: self.unit_us.iter().map(|u| u / s.speed).collect(),
                })
                .collect(),
            links: (0..n).map(|a| (0..n).map(|b| self.link(a, b)).collect()).collect(),
            gateway: self.nodes.iter().map(|s| if s.wired { self.wired } else { self.wireless }).collect(),
            private_units: self.private_units,
            objective,
        }
    }
}

/// One strategy's figures.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SplitSimResult {
    pub strategy: String,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Saturated: requests per second through the chain when all are queued at once.
    pub throughput: f64,
    pub completed: u64,
    pub lost: u64,
    /// Seconds from the slowdown to a plan that avoids it being current (`None`: no re-split).
    pub resplit_s: Option<f64>,
    pub plans: usize,
    /// The first plan, `node=start..end`.
    pub plan: String,
}

#[derive(PartialEq)]
struct Ev(f64, u64, EvKind);

#[derive(PartialEq)]
enum EvKind {
    /// A stage ended: node, observed / profiled, the request's epoch.
    Observe(String, f64, u64),
    Finish(u64),
    Loaded(u64, String),
}

impl Eq for Ev {}
impl PartialOrd for Ev {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ev {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Earliest first (BinaryHeap is a max-heap), then by insertion.
        o.0.total_cmp(&self.0).then(o.1.cmp(&self.1))
    }
}

struct Sim<'a> {
    sc: &'a SplitScenario,
    problem: SplitProblem,
    reviser: Reviser,
    epochs: Epochs,
    heap: BinaryHeap<Ev>,
    seq: u64,
    node_free: Vec<f64>,
    link_free: BTreeMap<(usize, usize), f64>,
    activations: Vec<(f64, u64, Trigger)>,
    proposed: BTreeMap<u64, Trigger>,
    adapt: bool,
    first_plan: String,
}

impl Sim<'_> {
    fn push(&mut self, t: f64, k: EvKind) {
        self.seq += 1;
        self.heap.push(Ev(t, self.seq, k));
    }

    fn slow(&self, node: usize, t: f64) -> f64 {
        match self.sc.slowdown {
            Some((n, at, f)) if n == node && t >= at => f,
            _ => 1.0,
        }
    }

    fn index(&self, name: &str) -> usize {
        self.problem.nodes.iter().position(|n| n.name == name).unwrap_or(0)
    }

    /// Plans when the reviser asks, and turns epoch actions into events.
    fn pump(&mut self, t: f64) {
        if self.adapt
            && self.reviser.pending().is_some()
            && self.epochs.pending().is_none()
            && let Some((p, trigger)) = self.reviser.revise(&self.problem, (t * 1e6) as u64)
        {
            {
                let stages = assignments(&self.problem, &p);
                if self.first_plan.is_empty() {
                    self.first_plan = stages
                        .iter()
                        .map(|a| format!("{}={}..{}", a.node, a.units.start, a.units.end))
                        .collect::<Vec<_>>()
                        .join(" ");
                }
                let e = self.epochs.propose(stages);
                self.proposed.insert(e, trigger);
            }
        }
        while let Some(a) = self.epochs.poll_action() {
            match a {
                EpochAction::Load { epoch, stage } => {
                    let done = t + self.sc.load_s_per_unit * stage.units.len() as f64;
                    self.push(done, EvKind::Loaded(epoch, stage.node));
                }
                EpochAction::Activated { epoch } => {
                    let trig = self.proposed.remove(&epoch).unwrap_or(Trigger::First);
                    self.activations.push((t, epoch, trig));
                }
                EpochAction::Unload { .. } | EpochAction::Abandoned { .. } => {}
            }
        }
    }

    /// Handles every event up to `t`.
    fn advance(&mut self, t: f64) {
        while self.heap.peek().is_some_and(|e| e.0 <= t) {
            let Some(Ev(at, _, k)) = self.heap.pop() else { break };
            match k {
                // As live: only requests of the current plan count.
                EvKind::Observe(node, ratio, epoch) => {
                    if self.epochs.current().map(|(e, _)| e) == Some(epoch) {
                        self.reviser.observe(&node, ratio)
                    }
                }
                EvKind::Finish(epoch) => self.epochs.finish(epoch),
                EvKind::Loaded(epoch, node) => self.epochs.handle_loaded(epoch, &node, true),
            }
            self.pump(at);
        }
    }

    /// Runs one request arriving at `t` (seconds); returns its completion time.
    fn request(&mut self, t: f64) -> f64 {
        self.advance(t);
        let mut start = t;
        let (epoch, stages) = loop {
            if let Some((e, s)) = self.epochs.begin() {
                break (e, s.to_vec());
            }
            // No plan yet: wait for the next event that could bring one.
            let Some(next) = self.heap.peek().map(|e| e.0) else { return f64::NAN };
            start = start.max(next);
            self.advance(next);
        };
        let mut ready = start;
        let mut prev: Option<usize> = None;
        for st in &stages {
            let n = self.index(&st.node);
            let (link, bytes) = match prev {
                None => (self.problem.gateway[n], self.problem.input_bytes),
                Some(p) => (self.problem.links[p][n], self.problem.boundary_bytes[st.units.start - 1]),
            };
            let key = (prev.unwrap_or(usize::MAX), n);
            let lf = self.link_free.entry(key).or_insert(0.0);
            let send = ready.max(*lf);
            *lf = send + bytes / link.bytes_per_us / 1e6;
            let arrive = *lf + link.latency_us / 1e6;
            let begin = arrive.max(self.node_free[n]);
            let profiled: f64 = self.problem.nodes[n].unit_us[st.units.clone()].iter().sum::<f64>() / 1e6;
            let took = profiled * self.slow(n, begin);
            self.node_free[n] = begin + took;
            ready = begin + took;
            self.push(ready, EvKind::Observe(st.node.clone(), took / profiled, epoch));
            prev = Some(n);
        }
        if let Some(last) = prev {
            let out = self.problem.boundary_bytes[self.problem.units() - 1];
            ready += self.problem.gateway[last].transfer_us(out) / 1e6;
        }
        self.push(ready, EvKind::Finish(epoch));
        ready
    }
}

fn simulate<'a>(
    sc: &'a SplitScenario,
    strategy: Strategy,
    objective: Objective,
    arrivals: &[f64],
) -> (Vec<f64>, Sim<'a>) {
    let problem = sc.problem(objective);
    // Baselines plan once and keep their plan (a static split); the planner re-plans.
    let adapt = strategy == Strategy::Planner;
    let mut sim = Sim {
        sc,
        reviser: Reviser::new(strategy, RevisionRule::default()),
        epochs: Epochs::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        node_free: vec![0.0; sc.nodes.len()],
        link_free: BTreeMap::new(),
        activations: Vec::new(),
        proposed: BTreeMap::new(),
        adapt: true,
        first_plan: String::new(),
        problem,
    };
    // The first plan is in place before the first request (as live: requests wait for it).
    sim.pump(0.0);
    sim.advance(f64::INFINITY);
    sim.adapt = adapt;
    let start = sim.activations.first().map_or(0.0, |a| a.0);
    let ends: Vec<f64> = arrivals.iter().map(|&a| sim.request(start + a) - start).collect();
    sim.advance(f64::INFINITY);
    (ends, sim)
}

/// One strategy on the scenario: latency under Poisson load, saturated throughput, and the
/// re-split after the slowdown (planner only; baselines keep their first plan).
pub fn run(sc: &SplitScenario, strategy: Strategy, objective: Objective) -> Option<SplitSimResult> {
    plan(&sc.problem(objective), strategy)?;
    let mut rng = StdRng::seed_from_u64(sc.seed);
    if sc.rate.is_nan() || sc.rate <= 0.0 {
        return None;
    }
    let mut arrivals = Vec::new();
    let mut t = 0.0;
    while t < sc.duration_s {
        // Exponential inter-arrival times: −ln(U) / rate.
        t += -(1.0 - rng.random::<f64>()).ln() / sc.rate;
        arrivals.push(t);
    }
    let (ends, sim) = simulate(sc, strategy, objective, &arrivals);
    let mut lat: Vec<f64> =
        ends.iter().zip(&arrivals).filter(|(e, _)| e.is_finite()).map(|(e, a)| (e - a) * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat.get(((lat.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
    let resplit_s = sc.slowdown.and_then(|(_, at, _)| {
        sim.activations
            .iter()
            .find(|(t, _, tr)| *t >= at && matches!(tr, Trigger::Speed { .. }))
            .map(|(t, _, _)| t - at)
    });
    let lost = ends.iter().filter(|e| !e.is_finite()).count() as u64;
    let plans = sim.activations.len();
    let first_plan = sim.first_plan.clone();
    // Saturated throughput: the same plan, 400 requests queued at once, no slowdown.
    let calm = SplitScenario { slowdown: None, ..sc.clone() };
    let burst = vec![0.0; 400];
    let (ends, _) = simulate(&calm, strategy, objective, &burst);
    let makespan = ends.iter().copied().filter(|e| e.is_finite()).fold(0.0, f64::max);
    Some(SplitSimResult {
        strategy: strategy.name().to_string(),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        throughput: if makespan > 0.0 { burst.len() as f64 / makespan } else { 0.0 },
        completed: lat.len() as u64,
        lost,
        resplit_s,
        plans,
        plan: first_plan,
    })
}

/// The predicted latency of each strategy's plan (no queueing), ms.
pub fn predicted_ms(sc: &SplitScenario, strategy: Strategy, objective: Objective) -> Option<f64> {
    let p = sc.problem(objective);
    plan(&p, strategy).map(|pl| evaluate(&p, &pl).latency_us / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_planner_beats_the_baselines_and_re_splits_after_a_slowdown_with_nothing_lost() {
        let mut sc = SplitScenario::edge_site();
        sc.duration_s = 60.0;
        let planner = run(&sc, Strategy::Planner, Objective::Latency).unwrap();
        let even = run(&sc, Strategy::Even, Objective::Latency).unwrap();
        assert!(planner.p50_ms < even.p50_ms, "{planner:?} vs {even:?}");
        assert_eq!(planner.lost, 0);
        assert!(planner.completed > 30, "{planner:?}");
        assert!(planner.throughput > even.throughput, "{planner:?} vs {even:?}");
        // Slow the node with the most units three times at 20 s.
        let first = plan(&sc.problem(Objective::Latency), Strategy::Planner).unwrap();
        let big = first.stages.iter().max_by_key(|s| s.units.len()).unwrap().node;
        sc.slowdown = Some((big, 20.0, 3.0));
        let r = run(&sc, Strategy::Planner, Objective::Latency).unwrap();
        assert_eq!(r.lost, 0);
        assert!(r.resplit_s.is_some_and(|s| s < 30.0), "{r:?}");
        assert!(r.plans >= 2);
    }
}
