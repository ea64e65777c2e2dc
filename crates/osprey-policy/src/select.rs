//! Variant selection for one request.
//!
//! Rule: among the variants whose profiled latency fits the time left before the deadline,
//! take the most accurate (ties go to the faster one). A pinned variant (`/versions/{v}`) is
//! always used. If nothing fits, the request cannot meet its deadline and is refused at once
//! (a request that cannot be served in time is told so immediately rather than after timing
//! out). This is the baseline "profiled accuracy" selection that the SneakPeek paper starts
//! from; data-aware estimates plug in through the `accuracy` field.

/// One variant as the selector sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub accuracy: f64,
    /// Expected service time for this request, microseconds (profile, batch 1, chosen quantile).
    pub latency_us: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Index into the candidates.
    Variant(usize),
    /// No variant can finish within the time left.
    CannotMeetDeadline,
}

/// Chooses a variant for a request with `time_left_us` before its deadline.
pub fn most_accurate_within(cands: &[Candidate], time_left_us: f64, pinned: Option<usize>) -> Selection {
    if let Some(p) = pinned {
        return if cands.get(p).is_some_and(|c| c.latency_us <= time_left_us) {
            Selection::Variant(p)
        } else {
            Selection::CannotMeetDeadline
        };
    }
    cands
        .iter()
        .enumerate()
        .filter(|(_, c)| c.latency_us <= time_left_us)
        .max_by(|(_, a), (_, b)| {
            a.accuracy.total_cmp(&b.accuracy).then_with(|| b.latency_us.total_cmp(&a.latency_us))
        })
        .map_or(Selection::CannotMeetDeadline, |(i, _)| Selection::Variant(i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(accuracy: f64, latency_us: f64) -> Candidate {
        Candidate { accuracy, latency_us }
    }

    #[test]
    fn picks_most_accurate_that_fits() {
        let cands = [c(0.6, 100.0), c(0.8, 500.0), c(0.9, 3000.0)];
        assert_eq!(most_accurate_within(&cands, 10_000.0, None), Selection::Variant(2));
        assert_eq!(most_accurate_within(&cands, 1_000.0, None), Selection::Variant(1));
        assert_eq!(most_accurate_within(&cands, 100.0, None), Selection::Variant(0));
        assert_eq!(most_accurate_within(&cands, 50.0, None), Selection::CannotMeetDeadline);
        assert_eq!(most_accurate_within(&cands, 1_000.0, Some(0)), Selection::Variant(0));
        assert_eq!(most_accurate_within(&cands, 1_000.0, Some(2)), Selection::CannotMeetDeadline);
    }

    proptest! {
        #[test]
        fn choice_fits_and_nothing_more_accurate_fits(
            v in proptest::collection::vec((0.0f64..1.0, 1.0f64..10_000.0), 1..8),
            budget in 0.0f64..12_000.0,
        ) {
            let cands: Vec<_> = v.iter().map(|&(a, l)| c(a, l)).collect();
            match most_accurate_within(&cands, budget, None) {
                Selection::Variant(i) => {
                    prop_assert!(cands[i].latency_us <= budget);
                    for o in &cands {
                        prop_assert!(o.latency_us > budget || o.accuracy <= cands[i].accuracy);
                    }
                }
                Selection::CannotMeetDeadline => prop_assert!(cands.iter().all(|o| o.latency_us > budget)),
            }
        }
    }
}
