//! Split inference planning: which nodes run which contiguous layers of a large model, when
//! to re-split, and how a new plan replaces the old one (the adaptive LFM orchestration
//! paper's adaptive orchestrator, split revision and reconfiguration broadcast). Sans-IO:
//! the live driver (`osprey-server`'s `split`) and the simulator (`osprey-sim`'s `split`) feed
//! it measurements and carry out what it returns.
//!
//! # The problem
//! A model of `U` units (unit 0 the embedding, then the layers) runs as a chain of stages
//! `s = 1..S`, each a distinct node `n_s` running units `[a_s, a_{s+1})` with `a_1 = 0`,
//! `a_{S+1} = U`. With `c_n(u)` the measured compute time of unit `u` on node `n`, `m(u)` its
//! memory, `M_n` the node's memory for layers, `x_u` the bytes the boundary after unit `u`
//! carries and a link `(i, j)` of latency `λ_ij` and bandwidth `β_ij` (the gateway is the
//! endpoint `g` of the first and last hop):
//!
//! ```text
//! C_s  = Σ_{u ∈ [a_s, a_{s+1})} c_{n_s}(u)                      compute of a stage
//! T_s  = λ(n_{s-1}, n_s) + x_{a_s - 1} / β(n_{s-1}, n_s)          transfer into it (n_0 = g)
//! latency    L = Σ_s (T_s + C_s) + λ(n_S, g) + x_out / β(n_S, g)  (one request, end to end)
//! bottleneck B = max_s max(C_s, x_{a_s - 1} / β(n_{s-1}, n_s))    (1/B: pipelined throughput)
//! subject to Σ_{u ∈ stage} m(u) ≤ M_{n_s}; n_s distinct; and privacy pinning: every unit
//! u < k runs on a node labelled with the trusted zone (raw tokens and the first k units'
//! activations never leave it).
//! ```
//! The planner minimises `L` (objective `latency`) or `B`, then `L` (objective
//! `throughput`), exactly, by dynamic programming over (nodes used, last node, units placed):
//! `f(S ∪ {k}, k, v) = min_{j ∈ S, u < v} f(S, j, u) ⊕ T(j→k, u) ⊕ C_k(u..v)` with `⊕` a sum
//! for latency and a max for the bottleneck. States `2^N · N · U`, transitions
//! `O(2^N · N² · U²)`: 8 nodes and 32 units are 17 M transitions (milliseconds). Above
//! [`MAX_DP_NODES`] nodes only the fastest ones are considered (a departure from
//! exactness that keeps the decision bounded; edge sites rarely have more).
//!
//! # Baselines, in the same code
//! - `single node`: the whole model on the node with the lowest latency that fits it.
//! - `even`: units spread evenly over every node, in order (trusted nodes first).
//! - `memory-weighted`: exo's ring partitioning: nodes by memory, largest first (trusted
//!   first, so that a baseline obeys the same privacy rule), each taking a share of the units
//!   proportional to its memory.
//!
//! # Revision (hysteresis)
//! [`Reviser`] keeps a plan while every node's observed speed factor (observed over profiled
//! time of its stage, EWMA) stays inside `[1/(1+h), 1+h]` of the factor the plan was made
//! with. Outside the band, or when a node leaves or joins, or the privacy rule changes, it
//! re-plans; a plan that is still feasible is replaced only if the new one is better by at
//! least `min_gain` (so that noise around the band's edge does not flap between two plans).
//! A check that keeps the plan is repeated while the node drifts on (every further 10%), so
//! that a slowdown seen first at the band's edge is judged again once it has settled.
//!
//! # Reconfiguration broadcast
//! [`Epochs`]: every plan has an epoch. A proposed plan's stages are loaded first (one
//! `Load` per stage); when every node has answered, the plan becomes current and new requests
//! start on it; a request runs wholly on the epoch it started in; an old epoch's ranges are
//! unloaded once its last request has finished.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Range;

/// Nodes the exact planner considers; beyond, the fastest ones.
pub const MAX_DP_NODES: usize = 12;

/// One node's capacity for the split model.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeCap {
    pub name: String,
    /// Labelled with the trusted zone.
    pub trusted: bool,
    /// Memory for layers, MB.
    pub memory_mb: f64,
    /// Measured compute time per unit on this node, µs (batch 1), times the node's current
    /// speed factor.
    pub unit_us: Vec<f64>,
}

/// A link's measured latency (µs, one way) and bandwidth (bytes per µs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    pub latency_us: f64,
    pub bytes_per_us: f64,
}

impl Link {
    pub fn transfer_us(&self, bytes: f64) -> f64 {
        self.latency_us + bytes / self.bytes_per_us.max(1e-9)
    }
}

/// What to minimise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Objective {
    /// End-to-end latency of one request.
    Latency,
    /// The slowest stage (pipelined throughput), then latency.
    Throughput,
}

#[derive(Clone, Debug)]
pub struct SplitProblem {
    pub unit_memory_mb: Vec<f64>,
    /// Bytes of the boundary after each unit (the last: the output to the gateway).
    pub boundary_bytes: Vec<f64>,
    /// Bytes of the first stage's input (token ids and mask).
    pub input_bytes: f64,
    pub nodes: Vec<NodeCap>,
    /// `links[i][j]`: node i to node j.
    pub links: Vec<Vec<Link>>,
    /// `gateway[i]`: between the gateway and node i (both ways).
    pub gateway: Vec<Link>,
    /// Units `[0, private_units)` run only on trusted nodes.
    pub private_units: usize,
    pub objective: Objective,
}

impl SplitProblem {
    pub fn units(&self) -> usize {
        self.unit_memory_mb.len()
    }
}

/// One stage of a plan: a node (index into the problem's nodes) and its units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub node: usize,
    pub units: Range<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Plan {
    pub stages: Vec<Stage>,
}

/// A plan's predicted figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    pub latency_us: f64,
    pub bottleneck_us: f64,
}

impl Estimate {
    /// The figure the objective minimises, latency as a tie-break.
    fn key(&self, o: Objective) -> (f64, f64) {
        match o {
            Objective::Latency => (self.latency_us, self.bottleneck_us),
            Objective::Throughput => (self.bottleneck_us, self.latency_us),
        }
    }

    pub fn score(&self, o: Objective) -> f64 {
        self.key(o).0
    }
}

/// The strategies compared in benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    Planner,
    Even,
    MemoryWeighted,
    SingleNode,
}

impl Strategy {
    pub const ALL: [Strategy; 4] =
        [Strategy::Planner, Strategy::Even, Strategy::MemoryWeighted, Strategy::SingleNode];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Planner => "planner",
            Strategy::Even => "even",
            Strategy::MemoryWeighted => "memory-weighted",
            Strategy::SingleNode => "single node",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.name() == s || x.name().replace(' ', "-") == s)
    }
}

/// Why a plan is not acceptable.
pub fn check(p: &SplitProblem, plan: &Plan) -> Result<(), String> {
    let mut next = 0;
    let mut used = BTreeSet::new();
    for s in &plan.stages {
        if s.units.start != next || s.units.end <= s.units.start {
            return Err(format!("stage {:?} does not continue at unit {next}", s.units));
        }
        next = s.units.end;
        let Some(n) = p.nodes.get(s.node) else {
            return Err(format!("stage on unknown node {}", s.node));
        };
        if !used.insert(s.node) {
            return Err(format!("node {} runs two stages", n.name));
        }
        let mem: f64 = p.unit_memory_mb[s.units.clone()].iter().sum();
        if mem > n.memory_mb + 1e-9 {
            return Err(format!("node {} needs {mem:.1} MB of {:.1}", n.name, n.memory_mb));
        }
        if s.units.start < p.private_units && !n.trusted {
            return Err(format!("node {} is not trusted and runs pinned unit {}", n.name, s.units.start));
        }
    }
    if next != p.units() {
        return Err(format!("units end at {next}, the model has {}", p.units()));
    }
    Ok(())
}

/// The predicted latency and bottleneck of a plan (assumed valid).
pub fn evaluate(p: &SplitProblem, plan: &Plan) -> Estimate {
    let mut latency = 0.0;
    let mut bottleneck: f64 = 0.0;
    let mut prev: Option<usize> = None;
    for s in &plan.stages {
        let (link, bytes) = match prev {
            None => (p.gateway[s.node], p.input_bytes),
            Some(j) => (p.links[j][s.node], p.boundary_bytes[s.units.start - 1]),
        };
        let compute: f64 = p.nodes[s.node].unit_us[s.units.clone()].iter().sum();
        latency += link.transfer_us(bytes) + compute;
        bottleneck = bottleneck.max(compute).max(bytes / link.bytes_per_us.max(1e-9));
        prev = Some(s.node);
    }
    if let Some(last) = prev {
        let out = p.boundary_bytes[p.units() - 1];
        latency += p.gateway[last].transfer_us(out);
        bottleneck = bottleneck.max(out / p.gateway[last].bytes_per_us.max(1e-9));
    }
    Estimate { latency_us: latency, bottleneck_us: bottleneck }
}

/// The plan a strategy makes, or `None` when it cannot place the model.
pub fn plan(p: &SplitProblem, strategy: Strategy) -> Option<Plan> {
    let plan = match strategy {
        Strategy::Planner => optimal(p)?,
        Strategy::SingleNode => single_node(p)?,
        Strategy::Even => {
            let order = trusted_first(p, |_| 0.0);
            let n = order.len().min(p.units());
            let base = p.units() / n.max(1);
            let extra = p.units() % n.max(1);
            let sizes = (0..n).map(|i| base + usize::from(i < extra)).collect::<Vec<_>>();
            chain(&order, &sizes)
        }
        Strategy::MemoryWeighted => {
            let order = trusted_first(p, |n| -n.memory_mb);
            let total: f64 = order.iter().map(|&i| p.nodes[i].memory_mb.max(0.0)).sum();
            let mut cum = 0.0;
            let mut bounds = vec![0usize];
            for &i in &order {
                cum += p.nodes[i].memory_mb.max(0.0);
                let end = ((p.units() as f64) * cum / total.max(1e-9)).round() as usize;
                bounds.push(end.clamp(*bounds.last().unwrap_or(&0), p.units()));
            }
            if let Some(last) = bounds.last_mut() {
                *last = p.units();
            }
            let sizes: Vec<usize> = bounds.windows(2).map(|w| w[1] - w[0]).collect();
            chain(&order, &sizes)
        }
    };
    check(p, &plan).ok().map(|()| plan)
}

/// Node indices, trusted ones first, then by `key` (stable: equal keys keep their order).
fn trusted_first(p: &SplitProblem, key: impl Fn(&NodeCap) -> f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.nodes.len()).collect();
    order.sort_by(|&a, &b| {
        let (na, nb) = (&p.nodes[a], &p.nodes[b]);
        nb.trusted.cmp(&na.trusted).then(key(na).total_cmp(&key(nb)))
    });
    order
}

/// Stages of the given sizes on the given nodes (empty stages skipped).
fn chain(order: &[usize], sizes: &[usize]) -> Plan {
    let mut start = 0;
    let mut stages = Vec::new();
    for (&node, &n) in order.iter().zip(sizes) {
        if n > 0 {
            stages.push(Stage { node, units: start..start + n });
            start += n;
        }
    }
    Plan { stages }
}

fn single_node(p: &SplitProblem) -> Option<Plan> {
    (0..p.nodes.len())
        .map(|n| Plan { stages: vec![Stage { node: n, units: 0..p.units() }] })
        .filter(|plan| check(p, plan).is_ok())
        .min_by(|a, b| {
            let (ea, eb) = (evaluate(p, a), evaluate(p, b));
            let (ka, kb) = (ea.key(p.objective), eb.key(p.objective));
            ka.0.total_cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
        })
}

/// The exact dynamic programme of the module docs.
fn optimal(p: &SplitProblem) -> Option<Plan> {
    let u_n = p.units();
    if u_n == 0 || p.nodes.is_empty() {
        return None;
    }
    // Candidates: every node, or the fastest MAX_DP_NODES (trusted ones kept first).
    let mut cand: Vec<usize> = (0..p.nodes.len()).collect();
    if cand.len() > MAX_DP_NODES {
        let total = |n: usize| p.nodes[n].unit_us.iter().sum::<f64>();
        cand.sort_by(|&a, &b| {
            p.nodes[b].trusted.cmp(&p.nodes[a].trusted).then(total(a).total_cmp(&total(b)))
        });
        let trusted = cand.iter().filter(|&&n| p.nodes[n].trusted).count().min(MAX_DP_NODES / 2);
        let mut keep: Vec<usize> = cand[..trusted].to_vec();
        let mut rest: Vec<usize> = cand[trusted..].to_vec();
        rest.sort_by(|&a, &b| total(a).total_cmp(&total(b)));
        keep.extend(rest.into_iter().take(MAX_DP_NODES - trusted));
        cand = keep;
    }
    let k = cand.len();
    // Prefix sums of compute and memory per candidate.
    let pre = |v: &[f64]| {
        let mut s = vec![0.0; v.len() + 1];
        for (i, x) in v.iter().enumerate() {
            s[i + 1] = s[i] + x;
        }
        s
    };
    let compute: Vec<Vec<f64>> = cand.iter().map(|&n| pre(&p.nodes[n].unit_us)).collect();
    let memory = pre(&p.unit_memory_mb);
    let fits = |c: usize, r: &Range<usize>| {
        let n = &p.nodes[cand[c]];
        memory[r.end] - memory[r.start] <= n.memory_mb + 1e-9 && (r.start >= p.private_units || n.trusted)
    };
    let combine = |acc: (f64, f64), transfer: f64, serial: f64, compute: f64| -> (f64, f64) {
        // (latency, bottleneck) after adding a hop and a stage.
        (acc.0 + transfer + compute, acc.1.max(serial).max(compute))
    };
    let better = |a: (f64, f64), b: (f64, f64)| match p.objective {
        Objective::Latency => a.0 < b.0 - 1e-9 || ((a.0 - b.0).abs() <= 1e-9 && a.1 < b.1 - 1e-9),
        Objective::Throughput => a.1 < b.1 - 1e-9 || ((a.1 - b.1).abs() <= 1e-9 && a.0 < b.0 - 1e-9),
    };
    // f[mask][last][units placed] = best (latency, bottleneck); back-pointers alongside.
    let states = 1usize << k;
    let idx = |mask: usize, last: usize, u: usize| (mask * k + last) * (u_n + 1) + u;
    let mut f = vec![None::<(f64, f64)>; states * k * (u_n + 1)];
    let mut back = vec![usize::MAX; states * k * (u_n + 1)];
    for c in 0..k {
        for v in 1..=u_n {
            let r = 0..v;
            if !fits(c, &r) {
                continue;
            }
            let link = p.gateway[cand[c]];
            let val = combine(
                (0.0, 0.0),
                link.transfer_us(p.input_bytes),
                p.input_bytes / link.bytes_per_us.max(1e-9),
                compute[c][v],
            );
            f[idx(1 << c, c, v)] = Some(val);
        }
    }
    for mask in 1..states {
        for last in 0..k {
            if mask & (1 << last) == 0 {
                continue;
            }
            for u in 1..u_n {
                let Some(acc) = f[idx(mask, last, u)] else { continue };
                let bytes = p.boundary_bytes[u - 1];
                for c in 0..k {
                    if mask & (1 << c) != 0 {
                        continue;
                    }
                    let link = p.links[cand[last]][cand[c]];
                    let transfer = link.transfer_us(bytes);
                    let serial = bytes / link.bytes_per_us.max(1e-9);
                    for v in u + 1..=u_n {
                        if !fits(c, &(u..v)) {
                            // Memory only grows with v; privacy does not change with v.
                            break;
                        }
                        let val = combine(acc, transfer, serial, compute[c][v] - compute[c][u]);
                        let at = idx(mask | (1 << c), c, v);
                        if f[at].is_none_or(|old| better(val, old)) {
                            f[at] = Some(val);
                            back[at] = idx(mask, last, u);
                        }
                    }
                }
            }
        }
    }
    // Close the chain with the hop back to the gateway.
    let out = p.boundary_bytes[u_n - 1];
    let mut best: Option<((f64, f64), usize)> = None;
    for mask in 1..states {
        for (last, &node) in cand.iter().enumerate() {
            let at = idx(mask, last, u_n);
            let Some(acc) = f[at] else { continue };
            let link = p.gateway[node];
            let val = combine(acc, link.transfer_us(out), out / link.bytes_per_us.max(1e-9), 0.0);
            if best.is_none_or(|(b, _)| better(val, b)) {
                best = Some((val, at));
            }
        }
    }
    let (_, mut at) = best?;
    let mut stages = Vec::new();
    loop {
        let u = at % (u_n + 1);
        let last = (at / (u_n + 1)) % k;
        let prev = back[at];
        let start = if prev == usize::MAX { 0 } else { prev % (u_n + 1) };
        stages.push(Stage { node: cand[last], units: start..u });
        if prev == usize::MAX {
            break;
        }
        at = prev;
    }
    stages.reverse();
    Some(Plan { stages })
}

/// Re-planning rules: the hysteresis band on speed and the gain a replacement must bring.
#[derive(Clone, Copy, Debug)]
pub struct RevisionRule {
    /// Relative speed change that triggers a re-plan (`h`: factor outside `[1/(1+h), 1+h]`).
    pub threshold: f64,
    /// Relative improvement a new plan must bring over a still-feasible current one.
    pub min_gain: f64,
    /// EWMA weight of a new observation of a node's speed factor.
    pub alpha: f64,
    /// A plan stays at least this long before a speed change may replace it (µs). Nodes that
    /// share contended resources slow down with the work they are given: without a dwell, the
    /// work chases whichever node looks faster and flaps. Membership and privacy changes are
    /// acted on at once.
    pub min_dwell_us: u64,
}

impl Default for RevisionRule {
    fn default() -> Self {
        RevisionRule { threshold: 0.5, min_gain: 0.1, alpha: 0.3, min_dwell_us: 3_000_000 }
    }
}

/// Why the reviser re-planned.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    First,
    Speed { node: String, factor: f64 },
    Membership,
    Privacy,
}

/// How far (×) a node's factor must move from the last check before it triggers again.
pub const RECHECK: f64 = 1.1;

/// Keeps the current plan and decides when to replace it.
#[derive(Clone, Debug)]
pub struct Reviser {
    pub rule: RevisionRule,
    pub strategy: Strategy,
    /// Current speed factor per node (observed / profiled compute), EWMA.
    factor: BTreeMap<String, f64>,
    /// Factors the current plan was made with (the band's centre).
    planned: BTreeMap<String, f64>,
    /// Factors at the last check that kept the plan: outside the band, a node triggers again
    /// only once its factor has moved [`RECHECK`] beyond this (a slow drift is re-examined as
    /// it goes, not once at the band's edge).
    checked: BTreeMap<String, f64>,
    current: Option<(Plan, Vec<String>)>,
    dirty: Option<Trigger>,
    /// When the current plan was adopted (µs on the driver's clock).
    adopted_us: Option<u64>,
}

impl Reviser {
    pub fn new(strategy: Strategy, rule: RevisionRule) -> Reviser {
        Reviser {
            rule,
            strategy,
            factor: BTreeMap::new(),
            planned: BTreeMap::new(),
            checked: BTreeMap::new(),
            current: None,
            dirty: Some(Trigger::First),
            adopted_us: None,
        }
    }

    /// A node's speed factor now (1.0 until observed).
    pub fn factor(&self, node: &str) -> f64 {
        self.factor.get(node).copied().unwrap_or(1.0)
    }

    /// An observation of a stage on `node`: it took `observed / expected` of its profile.
    pub fn observe(&mut self, node: &str, ratio: f64) {
        if !ratio.is_finite() || ratio <= 0.0 {
            return;
        }
        let a = self.rule.alpha;
        let f = self.factor.entry(node.to_string()).or_insert(1.0);
        *f = (1.0 - a) * *f + a * ratio;
        let f = *f;
        let base = self.planned.get(node).copied().unwrap_or(1.0);
        let h = 1.0 + self.rule.threshold;
        let uses = self.current.as_ref().is_some_and(|(_, names)| names.iter().any(|n| n == node));
        let moved = self.checked.get(node).is_none_or(|&c| f / c > RECHECK || c / f > RECHECK);
        if (f / base > h || base / f > h) && moved && self.dirty.is_none() && (uses || f < base) {
            self.dirty = Some(Trigger::Speed { node: node.to_string(), factor: f });
        }
    }

    /// A node joined or left.
    pub fn membership_changed(&mut self) {
        // Overrides a pending speed trigger: a membership change is acted on at once, dwell or
        // not (a plan on a departed node cannot wait).
        if !matches!(self.dirty, Some(Trigger::Privacy)) {
            self.dirty = Some(Trigger::Membership);
        }
    }

    /// The privacy rule (trusted labels or pinned units) changed.
    pub fn privacy_changed(&mut self) {
        self.dirty = Some(Trigger::Privacy);
    }

    /// Whether [`Reviser::revise`] has something to decide.
    pub fn pending(&self) -> Option<&Trigger> {
        self.dirty.as_ref()
    }

    /// The current plan (node names per stage).
    pub fn current(&self) -> Option<&(Plan, Vec<String>)> {
        self.current.as_ref()
    }

    /// Scales each node's profiled unit times by its current speed factor.
    pub fn apply_factors(&self, p: &mut SplitProblem) {
        for n in &mut p.nodes {
            let f = self.factor(&n.name);
            n.unit_us.iter_mut().for_each(|u| *u *= f);
        }
    }

    /// Decides at `now_us`: `Some(plan)` to switch to, `None` to keep the current one. `p`
    /// holds the profiled capacities (the factors are applied here). A speed trigger inside the
    /// current plan's dwell is left pending (decided on a later call).
    pub fn revise(&mut self, p: &SplitProblem, now_us: u64) -> Option<(Plan, Trigger)> {
        if matches!(self.dirty, Some(Trigger::Speed { .. }))
            && self.adopted_us.is_some_and(|t| now_us.saturating_sub(t) < self.rule.min_dwell_us)
        {
            return None;
        }
        let trigger = self.dirty.take()?;
        let mut scaled = p.clone();
        self.apply_factors(&mut scaled);
        let candidate = plan(&scaled, self.strategy);
        // The current plan, re-indexed into this problem's nodes, if still feasible.
        let current = self.current.as_ref().and_then(|(plan, names)| {
            let stages = plan
                .stages
                .iter()
                .zip(names)
                .map(|(s, name)| {
                    scaled
                        .nodes
                        .iter()
                        .position(|n| &n.name == name)
                        .map(|node| Stage { node, units: s.units.clone() })
                })
                .collect::<Option<Vec<_>>>()?;
            let plan = Plan { stages };
            check(&scaled, &plan).ok().map(|()| plan)
        });
        let adopt = match (&current, &candidate) {
            (_, None) => false,
            (None, Some(_)) => true,
            // A baseline follows its own rule whenever it gives another plan (it does not
            // optimise, so it has no gain to weigh); the planner replaces a feasible plan only
            // for a gain of at least `min_gain`.
            (Some(cur), Some(new)) if self.strategy != Strategy::Planner => cur != new,
            (Some(cur), Some(new)) => {
                let (c, n) =
                    (evaluate(&scaled, cur).score(p.objective), evaluate(&scaled, new).score(p.objective));
                cur != new && n < c * (1.0 - self.rule.min_gain)
            }
        };
        // A new plan re-centres the band on the factors seen now; a kept one records them, so
        // that a node drifting further is examined again.
        let now: BTreeMap<String, f64> =
            scaled.nodes.iter().map(|n| (n.name.clone(), self.factor(&n.name))).collect();
        if adopt || self.current.is_none() {
            self.planned = now.clone();
            self.checked.clear();
        } else {
            self.checked = now;
        }
        match (adopt, candidate, current) {
            (true, Some(new), _) => {
                let names = new.stages.iter().map(|s| scaled.nodes[s.node].name.clone()).collect();
                self.current = Some((new.clone(), names));
                self.adopted_us = Some(now_us);
                Some((new, trigger))
            }
            (_, _, Some(cur)) => {
                let names = cur.stages.iter().map(|s| scaled.nodes[s.node].name.clone()).collect();
                self.current = Some((cur, names));
                None
            }
            (_, _, None) => {
                // Nothing feasible: keep trying on the next change.
                self.current = None;
                None
            }
        }
    }
}

/// A stage as broadcast: node name and units.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub node: String,
    pub units: Range<usize>,
    /// The node the stage's output goes to; `None`: back to the gateway.
    pub next: Option<String>,
}

/// What the epoch state machine asks the driver to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EpochAction {
    /// Load `units` for `epoch` on `node` (before any request of the epoch reaches it).
    Load { epoch: u64, stage: Assignment },
    /// The epoch is now current: new requests start on it.
    Activated { epoch: u64 },
    /// Drop the ranges of `epoch` from `node`: its last request finished.
    Unload { epoch: u64, node: String },
    /// A proposed epoch could not be loaded (a node failed or left): re-plan.
    Abandoned { epoch: u64, node: String },
}

#[derive(Clone, Debug)]
struct EpochState {
    stages: Vec<Assignment>,
    waiting: BTreeSet<String>,
    inflight: usize,
}

/// Epoch-versioned plan broadcast.
#[derive(Clone, Debug, Default)]
pub struct Epochs {
    next: u64,
    current: Option<u64>,
    pending: Option<u64>,
    states: BTreeMap<u64, EpochState>,
    actions: VecDeque<EpochAction>,
}

impl Epochs {
    pub fn new() -> Epochs {
        Epochs { next: 1, ..Default::default() }
    }

    /// Proposes a plan; returns its epoch. A still-pending older proposal is abandoned.
    pub fn propose(&mut self, stages: Vec<Assignment>) -> u64 {
        if let Some(old) = self.pending.take() {
            self.retire(old);
        }
        let epoch = self.next;
        self.next += 1;
        for s in &stages {
            self.actions.push_back(EpochAction::Load { epoch, stage: s.clone() });
        }
        let waiting = stages.iter().map(|s| s.node.clone()).collect();
        self.states.insert(epoch, EpochState { stages, waiting, inflight: 0 });
        self.pending = Some(epoch);
        epoch
    }

    /// A node answered a load of `epoch`.
    pub fn handle_loaded(&mut self, epoch: u64, node: &str, ok: bool) {
        if self.pending != Some(epoch) {
            return;
        }
        if !ok {
            self.pending = None;
            self.retire(epoch);
            self.actions.push_back(EpochAction::Abandoned { epoch, node: node.to_string() });
            return;
        }
        let Some(st) = self.states.get_mut(&epoch) else { return };
        st.waiting.remove(node);
        if st.waiting.is_empty() {
            self.pending = None;
            if let Some(old) = self.current.replace(epoch) {
                self.retire(old);
            }
            self.actions.push_back(EpochAction::Activated { epoch });
        }
    }

    /// A node is gone: a pending epoch that needs it is abandoned, and a current one that
    /// runs on it stops taking requests (until a new plan is active, [`Epochs::begin`] returns
    /// `None`). Requests in flight on it fail and are retried by the driver on a later epoch.
    pub fn node_lost(&mut self, node: &str) {
        if let Some(c) = self.current
            && self.states.get(&c).is_some_and(|s| s.stages.iter().any(|a| a.node == node))
        {
            self.current = None;
            self.retire(c);
        }
        if let Some(p) = self.pending
            && self.states.get(&p).is_some_and(|s| s.stages.iter().any(|a| a.node == node))
        {
            self.pending = None;
            self.retire(p);
            self.actions.push_back(EpochAction::Abandoned { epoch: p, node: node.to_string() });
        }
    }

    /// An epoch stops taking requests; its ranges go once it is idle.
    fn retire(&mut self, epoch: u64) {
        let idle = self.states.get(&epoch).is_some_and(|s| s.inflight == 0);
        if idle && let Some(st) = self.states.remove(&epoch) {
            for a in st.stages {
                self.actions.push_back(EpochAction::Unload { epoch, node: a.node });
            }
        }
    }

    /// A request starts: on the current epoch, whose stages it runs through.
    pub fn begin(&mut self) -> Option<(u64, &[Assignment])> {
        let e = self.current?;
        let st = self.states.get_mut(&e)?;
        st.inflight += 1;
        Some((e, &st.stages))
    }

    /// A request of `epoch` finished (answered or failed).
    pub fn finish(&mut self, epoch: u64) {
        let Some(st) = self.states.get_mut(&epoch) else { return };
        st.inflight = st.inflight.saturating_sub(1);
        if st.inflight == 0 && self.current != Some(epoch) && self.pending != Some(epoch) {
            self.retire(epoch);
        }
    }

    pub fn current(&self) -> Option<(u64, &[Assignment])> {
        let e = self.current?;
        Some((e, &self.states.get(&e)?.stages))
    }

    pub fn pending(&self) -> Option<u64> {
        self.pending
    }

    /// Requests in flight per epoch still held.
    pub fn inflight(&self) -> BTreeMap<u64, usize> {
        self.states.iter().map(|(e, s)| (*e, s.inflight)).collect()
    }

    pub fn poll_action(&mut self) -> Option<EpochAction> {
        self.actions.pop_front()
    }
}

/// The broadcast form of a plan: node names and next hops.
pub fn assignments(p: &SplitProblem, plan: &Plan) -> Vec<Assignment> {
    plan.stages
        .iter()
        .enumerate()
        .map(|(i, s)| Assignment {
            node: p.nodes[s.node].name.clone(),
            units: s.units.clone(),
            next: plan.stages.get(i + 1).map(|n| p.nodes[n.node].name.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn problem(speeds: &[f64], mems: &[f64], trusted: &[bool], units: usize, k: usize) -> SplitProblem {
        let n = speeds.len();
        SplitProblem {
            unit_memory_mb: vec![10.0; units],
            boundary_bytes: vec![24_576.0; units],
            input_bytes: 512.0,
            nodes: (0..n)
                .map(|i| NodeCap {
                    name: format!("n{i}"),
                    trusted: trusted[i],
                    memory_mb: mems[i],
                    unit_us: vec![4000.0 / speeds[i]; units],
                })
                .collect(),
            links: vec![vec![Link { latency_us: 500.0, bytes_per_us: 12.5 }; n]; n],
            gateway: vec![Link { latency_us: 100.0, bytes_per_us: 125.0 }; n],
            private_units: k,
            objective: Objective::Latency,
        }
    }

    #[test]
    fn the_planner_uses_one_fast_node_when_links_are_slow_and_splits_when_memory_forces_it() {
        let p = problem(&[1.0, 2.0, 1.0], &[1000.0, 1000.0, 1000.0], &[true, true, true], 7, 0);
        let plan = super::plan(&p, Strategy::Planner).unwrap();
        assert_eq!(plan.stages, vec![Stage { node: 1, units: 0..7 }]);
        // The fast node holds only 3 units: the rest goes to the next fastest.
        let mut p = problem(&[1.0, 2.0, 1.5], &[1000.0, 30.0, 1000.0], &[true, true, true], 7, 0);
        p.links.iter_mut().flatten().for_each(|l| l.bytes_per_us = 1250.0);
        let plan = super::plan(&p, Strategy::Planner).unwrap();
        check(&p, &plan).unwrap();
        assert!(plan.stages.iter().any(|s| s.node == 1 && s.units.len() == 3), "{plan:?}");
        let ev = |s| evaluate(&p, &super::plan(&p, s).unwrap()).latency_us;
        assert!(ev(Strategy::Planner) <= ev(Strategy::Even));
        assert!(ev(Strategy::Planner) <= ev(Strategy::MemoryWeighted));
    }

    #[test]
    fn throughput_spreads_the_units_so_that_the_slowest_stage_is_short() {
        let mut p = problem(&[1.0, 1.0], &[1000.0, 1000.0], &[true, true], 6, 0);
        p.objective = Objective::Throughput;
        let plan = super::plan(&p, Strategy::Planner).unwrap();
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.stages[0].units, 0..3);
        let e = evaluate(&p, &plan);
        assert!((e.bottleneck_us - 12_000.0).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn pinned_units_stay_on_trusted_nodes_and_an_impossible_pin_is_no_plan() {
        let p = problem(&[1.0, 5.0], &[1000.0, 1000.0], &[true, false], 7, 3);
        for s in Strategy::ALL {
            let plan = super::plan(&p, s).unwrap();
            check(&p, &plan).unwrap();
            assert_eq!(p.nodes[plan.stages[0].node].name, "n0", "{s:?}");
        }
        let p = problem(&[1.0, 5.0], &[20.0, 1000.0], &[true, false], 7, 3);
        assert!(super::plan(&p, Strategy::Planner).is_none());
    }

    #[test]
    fn epochs_switch_after_every_load_and_unload_the_old_ranges_after_its_last_request() {
        let mut e = Epochs::new();
        let a = |n: &str, r: Range<usize>, next: Option<&str>| Assignment {
            node: n.into(),
            units: r,
            next: next.map(String::from),
        };
        let e1 = e.propose(vec![a("x", 0..7, None)]);
        assert!(matches!(e.poll_action(), Some(EpochAction::Load { .. })));
        assert!(e.begin().is_none(), "no request before the first epoch is loaded");
        e.handle_loaded(e1, "x", true);
        assert_eq!(e.poll_action(), Some(EpochAction::Activated { epoch: e1 }));
        let (started, _) = e.begin().unwrap();
        assert_eq!(started, e1);
        let e2 = e.propose(vec![a("x", 0..3, Some("y")), a("y", 3..7, None)]);
        assert_eq!(e.poll_action().map(|a| matches!(a, EpochAction::Load { .. })), Some(true));
        assert_eq!(e.poll_action().map(|a| matches!(a, EpochAction::Load { .. })), Some(true));
        e.handle_loaded(e2, "y", true);
        assert_eq!(e.begin().unwrap().0, e1, "still on the old epoch until every load answered");
        e.handle_loaded(e2, "x", true);
        assert_eq!(e.poll_action(), Some(EpochAction::Activated { epoch: e2 }));
        assert_eq!(e.poll_action(), None, "the old epoch has two requests in flight");
        e.finish(e1);
        assert_eq!(e.poll_action(), None);
        e.finish(e1);
        assert_eq!(e.poll_action(), Some(EpochAction::Unload { epoch: e1, node: "x".into() }));
        // A load that fails abandons the proposal; the current epoch stays.
        let e3 = e.propose(vec![a("z", 0..7, None)]);
        e.poll_action();
        e.handle_loaded(e3, "z", false);
        assert_eq!(e.poll_action(), Some(EpochAction::Unload { epoch: e3, node: "z".into() }));
        assert!(matches!(e.poll_action(), Some(EpochAction::Abandoned { .. })));
        assert_eq!(e.current().unwrap().0, e2);
        // Losing a node of the current epoch stops new requests on it.
        let (_, _) = e.begin().unwrap();
        e.node_lost("y");
        assert!(e.begin().is_none());
        assert_eq!(e.poll_action(), None, "unloaded only once its request finished");
        e.finish(e2);
        assert!(matches!(e.poll_action(), Some(EpochAction::Unload { epoch, .. }) if epoch == e2));
    }

    fn arb_problem() -> impl proptest::strategy::Strategy<Value = SplitProblem> {
        (1usize..6, 2usize..12, 0usize..4).prop_flat_map(|(n, units, k)| {
            (
                proptest::collection::vec(0.2f64..4.0, n),
                proptest::collection::vec(5.0f64..200.0, n),
                proptest::collection::vec(any::<bool>(), n),
                proptest::collection::vec(1.0f64..20.0, units),
                proptest::collection::vec(1.0f64..200.0, n * n),
                Just((n, units, k.min(units))),
                any::<bool>(),
            )
                .prop_map(|(speeds, mems, trusted, umem, bw, (n, units, k), tput)| {
                    let mut p = problem(&speeds, &mems, &trusted, units, k);
                    p.unit_memory_mb = umem;
                    for i in 0..n {
                        for j in 0..n {
                            p.links[i][j].bytes_per_us = bw[i * n + j];
                        }
                    }
                    if tput {
                        p.objective = Objective::Throughput;
                    }
                    p
                })
        })
    }

    use super::Strategy;
    use proptest::strategy::Strategy as _;

    /// Every plan exhaustively enumerated (small problems): the optimum the DP must equal.
    fn brute(p: &SplitProblem) -> Option<f64> {
        fn rec(
            p: &SplitProblem,
            start: usize,
            used: u32,
            stages: &mut Vec<super::Stage>,
            best: &mut Option<f64>,
        ) {
            if start == p.units() {
                let plan = Plan { stages: stages.clone() };
                if check(p, &plan).is_ok() {
                    let s = evaluate(p, &plan).score(p.objective);
                    if best.is_none_or(|b| s < b) {
                        *best = Some(s);
                    }
                }
                return;
            }
            for n in 0..p.nodes.len() {
                if used & (1 << n) != 0 {
                    continue;
                }
                for end in start + 1..=p.units() {
                    stages.push(super::Stage { node: n, units: start..end });
                    rec(p, end, used | (1 << n), stages, best);
                    stages.pop();
                }
            }
        }
        let mut best = None;
        rec(p, 0, 0, &mut Vec::new(), &mut best);
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn every_plan_places_each_unit_once_in_order_within_memory_and_pins(p in arb_problem()) {
            for s in Strategy::ALL {
                if let Some(plan) = super::plan(&p, s) {
                    prop_assert!(check(&p, &plan).is_ok(), "{s:?}: {:?}", check(&p, &plan));
                    let placed: Vec<usize> = plan.stages.iter().flat_map(|st| st.units.clone()).collect();
                    prop_assert_eq!(placed, (0..p.units()).collect::<Vec<_>>());
                    for st in &plan.stages {
                        let mem: f64 = p.unit_memory_mb[st.units.clone()].iter().sum();
                        prop_assert!(mem <= p.nodes[st.node].memory_mb + 1e-9);
                        if st.units.start < p.private_units {
                            prop_assert!(p.nodes[st.node].trusted);
                        }
                    }
                }
            }
        }

        #[test]
        fn the_planner_is_optimal_and_never_worse_than_a_baseline(p in arb_problem()) {
            let best = brute(&p);
            let got = super::plan(&p, Strategy::Planner).map(|pl| evaluate(&p, &pl).score(p.objective));
            prop_assert_eq!(best.is_some(), got.is_some());
            if let (Some(b), Some(g)) = (best, got) {
                prop_assert!((g - b).abs() <= 1e-6 * b.max(1.0), "dp {g} vs brute force {b}");
                for s in [Strategy::Even, Strategy::MemoryWeighted, Strategy::SingleNode] {
                    if let Some(pl) = super::plan(&p, s) {
                        prop_assert!(g <= evaluate(&p, &pl).score(p.objective) + 1e-6);
                    }
                }
            }
        }

        #[test]
        fn a_plan_is_kept_while_speed_changes_stay_inside_the_band(
            p in arb_problem(),
            noise in proptest::collection::vec((0usize..6, 0.75f64..1.3), 1..40),
        ) {
            let mut r = Reviser::new(Strategy::Planner, RevisionRule::default());
            let first = r.revise(&p, 0);
            prop_assume!(first.is_some());
            for (node, ratio) in noise {
                if let Some(n) = p.nodes.get(node % p.nodes.len()) {
                    r.observe(&n.name, ratio);
                }
                prop_assert!(r.pending().is_none(), "{:?}", r.pending());
                prop_assert!(r.revise(&p, 10_000_000).is_none());
            }
        }
    }

    #[test]
    fn a_three_times_slower_node_triggers_a_re_split_away_from_it() {
        let p = problem(&[2.0, 1.0, 1.0], &[40.0, 1000.0, 1000.0], &[true, true, true], 7, 0);
        let mut r = Reviser::new(Strategy::Planner, RevisionRule::default());
        let (first, _) = r.revise(&p, 0).unwrap();
        assert!(first.stages.iter().any(|s| s.node == 0));
        for _ in 0..10 {
            r.observe("n0", 3.0);
        }
        assert!(matches!(r.pending(), Some(Trigger::Speed { .. })));
        assert!(r.revise(&p, 1_000_000).is_none(), "inside the first plan's dwell");
        assert!(r.pending().is_some(), "still pending");
        // A membership change inside the dwell is decided at once.
        let mut m = r.clone();
        m.membership_changed();
        assert!(matches!(m.pending(), Some(Trigger::Membership)));
        let (next, _) = r.revise(&p, 3_500_000).unwrap();
        let before = first.stages.iter().find(|s| s.node == 0).map_or(0, |s| s.units.len());
        let after = next.stages.iter().find(|s| s.node == 0).map_or(0, |s| s.units.len());
        assert!(after < before, "{first:?} -> {next:?}");
        // Settled at the new speed: no further change.
        for _ in 0..10 {
            r.observe("n0", 3.0);
        }
        assert!(r.revise(&p, 10_000_000).is_none());
    }
}
