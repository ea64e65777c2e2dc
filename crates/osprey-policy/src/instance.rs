//! Instance selection: which node (agent) runs a batch.
//!
//! The quality-driven orchestration paper selects service instances across a heterogeneous
//! edge cluster while accounting for resource contention and runtime failures; its formula is
//! not public. Osprey predicts each candidate's completion time for the batch and takes the
//! earliest, skipping instances that are failing:
//!
//! ```text
//! finish_i = wait_i + ℓ(b) / speed_i · σ_i
//! wait_i   = 0 if a worker is free, else busy_i · ℓ̄_i / workers_i   (its backlog spread over workers)
//! σ_i      = EWMA of observed / predicted service time on instance i (contention)
//! skip i   if failures_i / (failures_i + successes_i) over its recent window > max_failure_rate,
//!          or if it is marked down
//! ```
//!
//! Ties go to the lower index (stable). Round-robin and least-queue are the baselines the
//! benchmark compares against.

/// What the selector knows of one instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    pub up: bool,
    /// Relative speed (1.0 = the machine that measured the profile).
    pub speed: f64,
    /// Observed slowdown σ (1.0 = as predicted).
    pub slowdown: f64,
    pub workers: u32,
    /// Batches running or waiting on it.
    pub busy: u32,
    /// Mean service time of its recent batches, µs.
    pub mean_service_us: f64,
    pub recent_failures: u32,
    pub recent_successes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// Earliest predicted completion, failure-aware (Osprey's rule).
    Predicted,
    /// Next instance in turn that is up, whatever its load or speed.
    RoundRobin,
    /// Fewest batches in flight per worker.
    LeastQueue,
}

/// Failure share above which an instance is avoided while another can serve.
pub const MAX_FAILURE_RATE: f64 = 0.5;

/// Predicted completion time of a batch of profiled latency `latency_us` on `v`, µs from now.
pub fn predicted_finish(v: &InstanceView, latency_us: f64) -> f64 {
    let service = latency_us / v.speed.max(1e-6) * v.slowdown.max(1e-6);
    let wait = if v.busy < v.workers {
        0.0
    } else {
        f64::from(v.busy + 1 - v.workers) * v.mean_service_us.max(service) / f64::from(v.workers.max(1))
    };
    wait + service
}

fn failing(v: &InstanceView) -> bool {
    let n = v.recent_failures + v.recent_successes;
    n > 0 && f64::from(v.recent_failures) / f64::from(n) > MAX_FAILURE_RATE
}

/// Picks an instance for a batch, or `None` if none is up. `turn` is the round-robin cursor
/// (the driver keeps it).
pub fn select(sel: Selector, views: &[InstanceView], latency_us: f64, turn: &mut usize) -> Option<usize> {
    let up: Vec<usize> = (0..views.len()).filter(|&i| views[i].up).collect();
    if up.is_empty() {
        return None;
    }
    match sel {
        Selector::RoundRobin => {
            let k = up.iter().position(|&i| i >= *turn % views.len()).unwrap_or(0);
            let i = up[k];
            *turn = i + 1;
            Some(i)
        }
        Selector::LeastQueue => up.into_iter().min_by(|&a, &b| {
            let q = |i: usize| f64::from(views[i].busy) / f64::from(views[i].workers.max(1));
            q(a).total_cmp(&q(b)).then(a.cmp(&b))
        }),
        Selector::Predicted => {
            let healthy: Vec<usize> = up.iter().copied().filter(|&i| !failing(&views[i])).collect();
            let pool = if healthy.is_empty() { up } else { healthy };
            pool.into_iter().min_by(|&a, &b| {
                predicted_finish(&views[a], latency_us)
                    .total_cmp(&predicted_finish(&views[b], latency_us))
                    .then(a.cmp(&b))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(speed: f64, workers: u32, busy: u32) -> InstanceView {
        InstanceView {
            up: true,
            speed,
            slowdown: 1.0,
            workers,
            busy,
            mean_service_us: 1000.0,
            recent_failures: 0,
            recent_successes: 10,
        }
    }

    #[test]
    fn prefers_the_earliest_finish_and_accounts_for_contention_and_failures() {
        let mut turn = 0;
        let views = vec![v(0.5, 1, 0), v(1.0, 1, 0), v(2.0, 1, 0)];
        assert_eq!(select(Selector::Predicted, &views, 1000.0, &mut turn), Some(2));
        // The fast node is slowed by co-located work: 4x slower than predicted.
        let mut c = views.clone();
        c[2].slowdown = 4.0;
        assert_eq!(select(Selector::Predicted, &c, 1000.0, &mut turn), Some(1));
        // The fast node is busy with a backlog: the idle medium one finishes first.
        let mut b = views.clone();
        b[2].busy = 3;
        assert_eq!(select(Selector::Predicted, &b, 1000.0, &mut turn), Some(1));
        // A node failing most of its batches is avoided while another can serve.
        let mut f = views.clone();
        f[2].recent_failures = 8;
        f[2].recent_successes = 2;
        assert_eq!(select(Selector::Predicted, &f, 1000.0, &mut turn), Some(1));
        // Down nodes are never chosen; none up means none.
        let mut d = views.clone();
        for x in &mut d {
            x.up = false;
        }
        assert_eq!(select(Selector::Predicted, &d, 1000.0, &mut turn), None);
    }

    #[test]
    fn baselines() {
        let mut turn = 0;
        let mut views = vec![v(0.5, 1, 0), v(1.0, 1, 2), v(2.0, 2, 1)];
        let picks: Vec<_> =
            (0..4).map(|_| select(Selector::RoundRobin, &views, 1.0, &mut turn).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
        views[0].up = false;
        let picks: Vec<_> =
            (0..3).map(|_| select(Selector::RoundRobin, &views, 1.0, &mut turn).unwrap()).collect();
        assert!(!picks.contains(&0));
        assert_eq!(select(Selector::LeastQueue, &views, 1.0, &mut turn), Some(2));
    }
}
