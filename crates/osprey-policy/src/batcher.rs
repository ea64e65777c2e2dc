//! Dynamic batching: which queued requests run together.
//!
//! The queue is FIFO. When a worker is free the driver asks [`next_batch`]: requests whose
//! deadline has already passed are expired (answered at once, never left queued); then the
//! oldest request's variant is taken and every queued request for the same variant joins, in
//! arrival order, while the batch stays within `max_rows`. Grouping by variant avoids
//! switching variants inside a batch; taking the oldest first bounds waiting time.

use crate::Micros;

/// A queued request as the batcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    pub variant: usize,
    /// Samples in the request (its batch dimension).
    pub rows: u32,
    pub deadline: Micros,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchPlan {
    /// Queue indices whose deadline has passed, in queue order.
    pub expired: Vec<usize>,
    /// Variant of the batch to run (meaningful when `members` is not empty).
    pub variant: usize,
    /// Queue indices forming the batch, in queue order.
    pub members: Vec<usize>,
}

/// Plans the next batch from `queue` (oldest first) at time `now`.
pub fn next_batch(queue: &[Queued], now: Micros, max_rows: u32) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut rows = 0u32;
    let mut head: Option<usize> = None;
    for (i, q) in queue.iter().enumerate() {
        if q.deadline <= now {
            plan.expired.push(i);
            continue;
        }
        let v = *head.get_or_insert(q.variant);
        if q.variant != v {
            continue;
        }
        // The oldest request always runs, even if larger than max_rows on its own.
        if plan.members.is_empty() || rows + q.rows <= max_rows {
            rows += q.rows;
            plan.members.push(i);
            plan.variant = v;
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(variant: usize, rows: u32, deadline: Micros) -> Queued {
        Queued { variant, rows, deadline }
    }

    #[test]
    fn groups_by_the_oldest_requests_variant_and_expires_the_late() {
        let queue = [q(1, 1, 5), q(0, 1, 100), q(1, 2, 100), q(0, 1, 100), q(1, 4, 100)];
        let p = next_batch(&queue, 10, 4);
        assert_eq!(p.expired, vec![0]);
        assert_eq!(p.variant, 0);
        assert_eq!(p.members, vec![1, 3]);
        let p = next_batch(&queue[2..], 10, 4);
        assert_eq!((p.variant, p.members), (1, vec![0]));
    }

    proptest! {
        #[test]
        fn every_index_is_used_at_most_once_and_batches_respect_limits(
            v in proptest::collection::vec((0usize..3, 1u32..5, 0u64..200), 0..40),
            now in 0u64..200,
            max_rows in 1u32..16,
        ) {
            let queue: Vec<_> = v.iter().map(|&(a, r, d)| q(a, r, d)).collect();
            let p = next_batch(&queue, now, max_rows);
            let mut seen = std::collections::HashSet::new();
            for &i in p.expired.iter().chain(&p.members) {
                prop_assert!(seen.insert(i));
            }
            for &i in &p.expired { prop_assert!(queue[i].deadline <= now); }
            let rows: u32 = p.members.iter().map(|&i| queue[i].rows).sum();
            prop_assert!(p.members.len() <= 1 || rows <= max_rows);
            for &i in &p.members {
                prop_assert_eq!(queue[i].variant, p.variant);
                prop_assert!(queue[i].deadline > now);
            }
            let live = queue.iter().any(|x| x.deadline > now);
            prop_assert_eq!(live, !p.members.is_empty());
        }
    }
}
