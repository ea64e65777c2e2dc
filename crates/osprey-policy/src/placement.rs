//! Placement: which variants each node loads, as a pure function of the problem and the
//! previous plan (the shape of quickwit's `scheduling_logic::solve(problem, previous)`).
//!
//! ```text
//! for each node n (any order; nodes do not compete, every node serves from its own memory):
//!   keep    previous(n) ∩ allowed(n), in (model, variant) order, while Σ memory ≤ M_n
//!   add     the other allowed variants, cheapest memory first (ties: model, then variant
//!           order), while Σ memory ≤ M_n
//! ```
//!
//! Keeping what a node already hosts first is what makes a re-solve stable: a join, a leave or
//! a new model never moves a variant that still fits (nothing is unloaded under a request).
//! Every node loads all it can, so that the most instances can serve; the per-interval
//! configuration policies (replicas under a budget) will narrow this. [`check`] states the
//! post-conditions and `solve` is tested against them on random problems.

use std::collections::{BTreeMap, BTreeSet};

/// A node id (the dispatcher's).
pub type NodeId = u64;
/// (model index, variant index).
pub type Slot = (usize, usize);

/// One node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCapacity {
    pub node: NodeId,
    pub memory_mb: u64,
    /// Models the node can serve (it has their files); `None` = all.
    pub models: Option<BTreeSet<usize>>,
}

/// One variant to place.
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    pub model: usize,
    pub variant: usize,
    pub memory_mb: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Problem {
    pub nodes: Vec<NodeCapacity>,
    pub variants: Vec<Need>,
}

/// What each node hosts.
pub type Plan = BTreeMap<NodeId, BTreeSet<Slot>>;

impl Problem {
    fn memory(&self, s: Slot) -> Option<u64> {
        self.variants.iter().find(|n| (n.model, n.variant) == s).map(|n| n.memory_mb)
    }

    fn allowed(&self, node: &NodeCapacity, s: Slot) -> bool {
        self.memory(s).is_some() && node.models.as_ref().is_none_or(|m| m.contains(&s.0))
    }
}

/// The placement for `problem`, keeping what `previous` placed where it still fits.
pub fn solve(problem: &Problem, previous: &Plan) -> Plan {
    let mut plan = Plan::new();
    let mut wanted: Vec<&Need> = problem.variants.iter().collect();
    wanted.sort_by_key(|n| (n.memory_mb, n.model, n.variant));
    for node in &problem.nodes {
        let mut used = 0u64;
        let mut hosted = BTreeSet::new();
        let kept = previous.get(&node.node).into_iter().flatten().filter(|&&s| problem.allowed(node, s));
        for &s in kept {
            let mb = problem.memory(s).unwrap_or(0);
            if used + mb <= node.memory_mb {
                used += mb;
                hosted.insert(s);
            }
        }
        for n in &wanted {
            let s = (n.model, n.variant);
            if hosted.contains(&s) || !problem.allowed(node, s) {
                continue;
            }
            if used + n.memory_mb <= node.memory_mb {
                used += n.memory_mb;
                hosted.insert(s);
            }
        }
        plan.insert(node.node, hosted);
    }
    plan
}

/// The post-conditions of [`solve`]: every node within its memory, every slot allowed there,
/// and every previous slot kept when the previous slots that are still allowed fit together.
pub fn check(problem: &Problem, previous: &Plan, plan: &Plan) -> Result<(), String> {
    for node in &problem.nodes {
        let hosted = plan.get(&node.node).cloned().unwrap_or_default();
        let used: u64 = hosted.iter().map(|&s| problem.memory(s).unwrap_or(u64::MAX / 4)).sum();
        if used > node.memory_mb {
            return Err(format!("node {} uses {used} MB of {} MB", node.node, node.memory_mb));
        }
        if let Some(s) = hosted.iter().find(|&&s| !problem.allowed(node, s)) {
            return Err(format!("node {} hosts {s:?}, which it may not", node.node));
        }
        let before: Vec<Slot> = previous
            .get(&node.node)
            .into_iter()
            .flatten()
            .copied()
            .filter(|&s| problem.allowed(node, s))
            .collect();
        let before_mb: u64 = before.iter().map(|&s| problem.memory(s).unwrap_or(0)).sum();
        if before_mb <= node.memory_mb
            && let Some(s) = before.iter().find(|s| !hosted.contains(s))
        {
            return Err(format!("node {} dropped {s:?}, which still fits", node.node));
        }
    }
    if let Some(n) = plan.keys().find(|n| !problem.nodes.iter().any(|x| x.node == **n)) {
        return Err(format!("the plan names unknown node {n}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn problem(mem: &[u64], needs: &[(usize, usize, u64)]) -> Problem {
        Problem {
            nodes: mem
                .iter()
                .enumerate()
                .map(|(i, &m)| NodeCapacity { node: i as u64, memory_mb: m, models: None })
                .collect(),
            variants: needs
                .iter()
                .map(|&(model, variant, memory_mb)| Need { model, variant, memory_mb })
                .collect(),
        }
    }

    #[test]
    fn cheapest_first_within_memory_and_stable() {
        let p = problem(&[100, 30], &[(0, 0, 10), (0, 1, 40), (0, 2, 80), (1, 0, 20)]);
        let plan = solve(&p, &Plan::new());
        check(&p, &Plan::new(), &plan).unwrap();
        assert_eq!(plan[&0], BTreeSet::from([(0, 0), (1, 0), (0, 1)]));
        assert_eq!(plan[&1], BTreeSet::from([(0, 0), (1, 0)]));
        // A node that hosts the big variant keeps it when re-solved.
        let prev = Plan::from([(0, BTreeSet::from([(0, 2)]))]);
        let again = solve(&p, &prev);
        check(&p, &prev, &again).unwrap();
        assert!(again[&0].contains(&(0, 2)));
    }

    #[test]
    fn a_node_only_hosts_the_models_it_has() {
        let mut p = problem(&[100], &[(0, 0, 10), (1, 0, 10)]);
        p.nodes[0].models = Some(BTreeSet::from([1]));
        let plan = solve(&p, &Plan::new());
        assert_eq!(plan[&0], BTreeSet::from([(1, 0)]));
    }

    proptest! {
        #[test]
        fn post_conditions_hold(
            mem in proptest::collection::vec(0u64..200, 1..5),
            needs in proptest::collection::vec((0usize..3, 0usize..3, 1u64..90), 0..9),
            prev in proptest::collection::vec((0u64..5, 0usize..3, 0usize..3), 0..8),
        ) {
            let mut seen = BTreeSet::new();
            let needs: Vec<_> = needs.into_iter().filter(|n| seen.insert((n.0, n.1))).collect();
            let p = problem(&mem, &needs);
            let mut previous = Plan::new();
            for (n, m, v) in prev {
                previous.entry(n).or_default().insert((m, v));
            }
            let plan = solve(&p, &previous);
            prop_assert_eq!(check(&p, &previous, &plan), Ok(()));
            // Solving again from the result changes nothing (a fixed point).
            prop_assert_eq!(solve(&p, &plan), plan);
        }
    }
}
