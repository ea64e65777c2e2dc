//! Per-tenant rate quotas: a token bucket on the driver's clock.
//!
//! The bucket holds at most `burst` tokens and refills at `rate` tokens per second; a request
//! of `n` samples takes `n` tokens or is refused (HTTP 429 / `RESOURCE_EXHAUSTED`). Because
//! every tenant has its own bucket, one tenant's burst cannot spend another's share.

use crate::Micros;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Micros,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate_per_s: f64, burst: u32, now: Micros) -> TokenBucket {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate_per_s: rate_per_s.max(0.0), burst, tokens: burst, last: now }
    }

    /// Takes `n` tokens if available at `now`.
    pub fn try_take(&mut self, now: Micros, n: u32) -> bool {
        let elapsed = now.saturating_sub(self.last) as f64 / 1e6;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.last = self.last.max(now);
        if self.tokens >= f64::from(n) {
            self.tokens -= f64::from(n);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_at_rate() {
        let mut b = TokenBucket::new(10.0, 3, 0);
        assert!(b.try_take(0, 1) && b.try_take(0, 1) && b.try_take(0, 1));
        assert!(!b.try_take(0, 1));
        assert!(!b.try_take(50_000, 1)); // 0.5 token
        assert!(b.try_take(100_000, 1)); // 1 token after 100 ms
        assert!(b.try_take(10_000_000, 3)); // capped at burst
        assert!(!b.try_take(10_000_000, 1));
        // Time going backwards does not mint tokens.
        assert!(!b.try_take(5_000_000, 1));
    }

    #[test]
    fn over_a_long_window_admits_rate_times_time_plus_burst() {
        let mut b = TokenBucket::new(100.0, 10, 0);
        let admitted = (0..10_000u64).filter(|i| b.try_take(i * 1_000, 1)).count();
        // 10 s at 100/s plus the initial burst.
        assert!((1005..=1011).contains(&admitted), "{admitted}");
    }
}
