//! The recent past, per second: what each tenant got (answers on time, late, refused; the
//! estimated accuracy of its answers) and which variant answered, for the dashboard's charts
//! and the `osprey_tenant_slo_attainment` gauge.
//!
//! Prometheus keeps the full history when someone scrapes it; this keeps the last
//! [`HORIZON_S`] seconds in memory so that a person opening `/dashboard` on an edge box with
//! no monitoring stack still sees figures over time. Buckets are per whole second since the
//! gateway started and are rotated lazily by whoever records or reads, so no task runs for it.

use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

/// Seconds kept.
pub const HORIZON_S: u64 = 300;

/// What happened to one request of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Met,
    Late,
    /// Refused or failed (quota, capacity, deadline impossible, error).
    Error,
}

#[derive(Debug, Clone, Default)]
struct TenantSecond {
    met: u64,
    late: u64,
    errors: u64,
    accuracy_sum: f64,
    accuracy_n: u64,
}

#[derive(Debug, Clone, Default)]
struct Second {
    tenants: Vec<TenantSecond>,
    /// `model/variant` → answers.
    variants: BTreeMap<String, u64>,
}

struct Ring {
    /// `seconds[i]` is second `first + i` since `epoch`.
    first: u64,
    seconds: VecDeque<Second>,
}

pub struct Timeline {
    epoch: Instant,
    /// Unix time of `epoch`, seconds (the page shows wall-clock times).
    epoch_unix: f64,
    tenants: Vec<String>,
    ring: Mutex<Ring>,
}

/// Per-second series, oldest first, all the same length as `t`; the second in progress is
/// left out (it is incomplete).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Series {
    /// Unix time of each second's start.
    pub t: Vec<f64>,
    pub tenants: BTreeMap<String, TenantSeries>,
    /// `model/variant` → answers per second.
    pub variants: BTreeMap<String, Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TenantSeries {
    pub met: Vec<u64>,
    pub late: Vec<u64>,
    pub errors: Vec<u64>,
    /// Mean estimated accuracy of the second's answers; `None` where it had none.
    pub accuracy: Vec<Option<f64>>,
}

impl Timeline {
    pub fn new(tenants: Vec<String>) -> Timeline {
        let epoch_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        Timeline {
            epoch: Instant::now(),
            epoch_unix,
            tenants,
            ring: Mutex::new(Ring { first: 0, seconds: VecDeque::new() }),
        }
    }

    fn second_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `now` the last second of the ring, dropping what fell past the horizon.
    fn advance(&self, ring: &mut Ring, now: u64) {
        if ring.seconds.is_empty() {
            ring.first = now;
        }
        let last = ring.first + ring.seconds.len() as u64;
        if now >= last + HORIZON_S {
            // A silence longer than the horizon: every kept second is zero.
            ring.seconds.clear();
            ring.first = now.saturating_sub(HORIZON_S);
        }
        while ring.first + (ring.seconds.len() as u64) <= now {
            ring.seconds.push_back(Second {
                tenants: vec![TenantSecond::default(); self.tenants.len()],
                variants: BTreeMap::new(),
            });
        }
        while ring.seconds.len() as u64 > HORIZON_S + 1 {
            ring.seconds.pop_front();
            ring.first += 1;
        }
    }

    /// One answered or refused request of tenant `tenant` (its index in the configuration).
    /// `answered`: the model and variant that answered, and the answer's estimated accuracy.
    pub fn record(&self, at: Instant, tenant: usize, outcome: Outcome, answered: Option<(&str, &str, f64)>) {
        let now = self.second_of(at);
        let mut ring = self.lock();
        self.advance(&mut ring, now);
        // A record from a second already past (a clock read before a slow lock) lands in it
        // when it is still kept.
        let Some(idx) = now.checked_sub(ring.first) else { return };
        let Some(s) = ring.seconds.get_mut(idx as usize) else { return };
        if let Some(t) = s.tenants.get_mut(tenant) {
            match outcome {
                Outcome::Met => t.met += 1,
                Outcome::Late => t.late += 1,
                Outcome::Error => t.errors += 1,
            }
            if let Some((_, _, acc)) = answered
                && acc.is_finite()
            {
                t.accuracy_sum += acc;
                t.accuracy_n += 1;
            }
        }
        if let Some((model, variant, _)) = answered {
            *s.variants.entry(format!("{model}/{variant}")).or_default() += 1;
        }
    }

    /// The complete seconds before `at`, at most [`HORIZON_S`].
    pub fn series(&self, at: Instant) -> Series {
        let now = self.second_of(at);
        let mut ring = self.lock();
        self.advance(&mut ring, now);
        let complete: Vec<(u64, &Second)> = ring
            .seconds
            .iter()
            .enumerate()
            .map(|(i, s)| (ring.first + i as u64, s))
            .filter(|(k, _)| *k < now)
            .collect();
        let t = complete.iter().map(|(k, _)| self.epoch_unix + *k as f64).collect();
        let mut tenants = BTreeMap::new();
        for (i, name) in self.tenants.iter().enumerate() {
            let col =
                |f: &dyn Fn(&TenantSecond) -> u64| complete.iter().map(|(_, s)| f(&s.tenants[i])).collect();
            tenants.insert(
                name.clone(),
                TenantSeries {
                    met: col(&|t| t.met),
                    late: col(&|t| t.late),
                    errors: col(&|t| t.errors),
                    accuracy: complete
                        .iter()
                        .map(|(_, s)| {
                            let t = &s.tenants[i];
                            (t.accuracy_n > 0).then(|| t.accuracy_sum / t.accuracy_n as f64)
                        })
                        .collect(),
                },
            );
        }
        let mut variants: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for name in complete.iter().flat_map(|(_, s)| s.variants.keys()) {
            variants.entry(name.clone()).or_default();
        }
        for (name, col) in variants.iter_mut() {
            *col = complete.iter().map(|(_, s)| s.variants.get(name).copied().unwrap_or(0)).collect();
        }
        Series { t, tenants, variants }
    }

    /// Each tenant's SLO attainment over the last `window_s` complete seconds: answers on
    /// time over all its requests (refusals count as misses); `None` without requests.
    pub fn attainment(&self, at: Instant, window_s: usize) -> BTreeMap<String, Option<f64>> {
        let s = self.series(at);
        s.tenants
            .into_iter()
            .map(|(name, t)| {
                let from = t.met.len().saturating_sub(window_s);
                let met: u64 = t.met[from..].iter().sum();
                let all = met + t.late[from..].iter().sum::<u64>() + t.errors[from..].iter().sum::<u64>();
                (name, (all > 0).then(|| met as f64 / all as f64))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn seconds_are_counted_apart_and_the_current_one_is_left_out() {
        let tl = Timeline::new(vec!["a".into(), "b".into()]);
        let t0 = tl.epoch;
        tl.record(t0, 0, Outcome::Met, Some(("digits", "small", 0.9)));
        tl.record(t0 + Duration::from_millis(500), 0, Outcome::Late, Some(("digits", "large", 0.7)));
        tl.record(t0 + Duration::from_millis(1200), 1, Outcome::Error, None);
        tl.record(t0 + Duration::from_millis(3100), 1, Outcome::Met, Some(("digits", "small", 0.5)));
        let s = tl.series(t0 + Duration::from_millis(3500));
        assert_eq!(s.t.len(), 3, "seconds 0, 1, 2 complete; 3 in progress");
        assert_eq!(s.tenants["a"].met, vec![1, 0, 0]);
        assert_eq!(s.tenants["a"].late, vec![1, 0, 0]);
        assert_eq!(s.tenants["b"].errors, vec![0, 1, 0]);
        let acc = s.tenants["a"].accuracy[0].unwrap();
        assert!((acc - 0.8).abs() < 1e-12, "{acc}");
        assert_eq!(s.tenants["a"].accuracy[1], None);
        assert_eq!(s.variants["digits/small"], vec![1, 0, 0]);
        assert_eq!(s.variants["digits/large"], vec![1, 0, 0]);
        let att = tl.attainment(t0 + Duration::from_millis(4500), 60);
        assert_eq!(att["a"], Some(0.5));
        assert_eq!(att["b"], Some(0.5), "one refusal, one on time");
    }

    #[test]
    fn only_the_horizon_is_kept_and_a_long_silence_starts_over() {
        let tl = Timeline::new(vec!["a".into()]);
        let t0 = tl.epoch;
        for k in 0..(HORIZON_S + 50) {
            tl.record(t0 + Duration::from_secs(k), 0, Outcome::Met, None);
        }
        let s = tl.series(t0 + Duration::from_secs(HORIZON_S + 50));
        assert_eq!(s.t.len() as u64, HORIZON_S);
        assert!(s.tenants["a"].met.iter().all(|&m| m == 1));
        let later = t0 + Duration::from_secs(10 * HORIZON_S);
        let s = tl.series(later);
        assert_eq!(s.t.len() as u64, HORIZON_S);
        assert!(s.tenants["a"].met.iter().all(|&m| m == 0), "nothing recorded in the last horizon");
        assert_eq!(tl.attainment(later, 60)["a"], None);
    }
}
