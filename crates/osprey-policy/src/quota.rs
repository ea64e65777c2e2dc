//! Per-tenant rate quotas: a token bucket on the driver's clock.
//!
//! The bucket holds at most `burst` tokens and refills at `rate` tokens per second; a request
//! costing `n` tokens takes them or is refused (HTTP 429 / `RESOURCE_EXHAUSTED`). A token is
//! one sample for a sample quota, one compute millisecond (by the profile) for a cost quota.
//! Because every tenant has its own bucket, one tenant's burst cannot spend another's share.

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
        TokenBucket::with_burst(rate_per_s, f64::from(burst.max(1)), now)
    }

    /// A full bucket of a fractional size (cost quotas), at least one token.
    pub fn with_burst(rate_per_s: f64, burst: f64, now: Micros) -> TokenBucket {
        let burst = if burst.is_finite() { burst.max(1.0) } else { 1.0 };
        TokenBucket { rate_per_s: rate_per_s.max(0.0), burst, tokens: burst, last: now }
    }

    /// Takes `n` tokens if available at `now`.
    pub fn try_take(&mut self, now: Micros, n: u32) -> bool {
        self.try_take_amount(now, f64::from(n))
    }

    /// Gives back what a request took when a later check refused it.
    pub fn refund(&mut self, amount: f64) {
        if amount.is_finite() && amount > 0.0 {
            self.tokens = (self.tokens + amount).min(self.burst);
        }
    }

    /// Takes `amount` tokens if available at `now`. A request costing more than the whole
    /// burst is admitted when the bucket is full (it would otherwise never be), leaving it in
    /// debt, so the long-run rate still holds.
    pub fn try_take_amount(&mut self, now: Micros, amount: f64) -> bool {
        let amount = if amount.is_finite() { amount.max(0.0) } else { return false };
        let elapsed = now.saturating_sub(self.last) as f64 / 1e6;
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.last = self.last.max(now);
        if self.tokens >= amount || (amount > self.burst && self.tokens >= self.burst) {
            self.tokens -= amount;
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
    fn costs_above_the_burst_are_admitted_from_a_full_bucket_and_paid_back() {
        let mut b = TokenBucket::with_burst(10.0, 5.0, 0);
        assert!(b.try_take_amount(0, 20.0), "a full bucket admits one oversized request");
        assert!(!b.try_take_amount(1_000_000, 1.0), "-15 + 10 tokens: still in debt");
        assert!(!b.try_take_amount(1_500_000, 20.0), "0 tokens at 1.5 s");
        assert!(b.try_take_amount(2_000_000, 20.0), "full again at 2 s: -15 + 20");
        assert!(!b.try_take_amount(4_000_000, f64::NAN));
    }

    #[test]
    fn over_a_long_window_admits_rate_times_time_plus_burst() {
        let mut b = TokenBucket::new(100.0, 10, 0);
        let admitted = (0..10_000u64).filter(|i| b.try_take(i * 1_000, 1)).count();
        // 10 s at 100/s plus the initial burst.
        assert!((1005..=1011).contains(&admitted), "{admitted}");
    }
}
