//! Request rate limits per sender: a token bucket per authenticated name.
//!
//! [`TokenBucket`] is pure arithmetic over a caller's clock (milliseconds),
//! so tests drive it with injected time. [`RateLimiter`] keeps one bucket
//! per sender name, with the operator's (`admin`) rate separate from the
//! backends'. The server consults it after authentication, so a forged or
//! replayed datagram never spends a real sender's tokens.

use std::collections::HashMap;

/// A token bucket: `rate` tokens a second, holding at most `rate` (one
/// second's worth: a sender idle for a second may send that many at once).
/// Tokens are kept in thousandths so that rates below 1000/s refill
/// smoothly with a millisecond clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens per second; 0 = no limit.
    rate: u32,
    /// Thousandths of a token held.
    milli: u64,
    /// Clock of the last refill (ms).
    at_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate: u32, now_ms: u64) -> TokenBucket {
        TokenBucket {
            rate,
            milli: Self::cap(rate),
            at_ms: now_ms,
        }
    }

    fn cap(rate: u32) -> u64 {
        u64::from(rate) * 1000
    }

    /// Tokens per second (0: no limit).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Changes the rate, keeping the tokens held up to the new capacity.
    pub fn set_rate(&mut self, rate: u32, now_ms: u64) {
        self.refill(now_ms);
        self.rate = rate;
        self.milli = self.milli.min(Self::cap(rate));
    }

    fn refill(&mut self, now_ms: u64) {
        // A clock that steps back refills nothing, and counts on from
        // where it is now (a step back never locks a sender out).
        if now_ms < self.at_ms {
            self.at_ms = now_ms;
        }
        let elapsed = now_ms - self.at_ms;
        if elapsed > 0 {
            // rate tokens per 1000 ms = rate thousandths per ms.
            let add = elapsed.saturating_mul(u64::from(self.rate));
            self.milli = self.milli.saturating_add(add).min(Self::cap(self.rate));
            self.at_ms = now_ms;
        }
    }

    /// Takes one token at `now_ms`; false when the bucket is empty.
    pub fn take(&mut self, now_ms: u64) -> bool {
        if self.rate == 0 {
            return true;
        }
        self.refill(now_ms);
        if self.milli >= 1000 {
            self.milli -= 1000;
            true
        } else {
            false
        }
    }

    /// Whole tokens held at the last take or refill.
    pub fn tokens(&self) -> u64 {
        self.milli / 1000
    }
}

/// The rates of `[control]`: requests per second per backend name, and the
/// operator's (`admin`) own. 0 = no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub per_sender: u32,
    pub admin: u32,
}

/// Requests per second a sender may make when the configuration says
/// nothing: far above what an application needs, below what the control
/// thread can answer (`dataplane-bench --scenario control` measures it).
pub const DEFAULT_MAX_REQUESTS_PER_SECOND: u32 = 20_000;
/// The operator's default: the CLI and automation run as `admin`.
pub const DEFAULT_ADMIN_MAX_REQUESTS_PER_SECOND: u32 = 50_000;

impl Default for RateLimits {
    fn default() -> RateLimits {
        RateLimits {
            per_sender: DEFAULT_MAX_REQUESTS_PER_SECOND,
            admin: DEFAULT_ADMIN_MAX_REQUESTS_PER_SECOND,
        }
    }
}

/// One bucket per sender name, and how many requests each had refused.
#[derive(Debug, Default)]
pub struct RateLimiter {
    limits: RateLimits,
    admin_name: &'static str,
    buckets: HashMap<String, (TokenBucket, u64)>,
}

impl RateLimiter {
    /// `admin_name` is the sender whose rate is `limits.admin`.
    pub fn new(limits: RateLimits, admin_name: &'static str) -> RateLimiter {
        RateLimiter {
            limits,
            admin_name,
            buckets: HashMap::new(),
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    fn rate_of(&self, sender: &str) -> u32 {
        if sender == self.admin_name {
            self.limits.admin
        } else {
            self.limits.per_sender
        }
    }

    /// New rates (configuration reload): each bucket keeps its tokens up
    /// to its new capacity.
    pub fn set_limits(&mut self, limits: RateLimits, now_ms: u64) {
        self.limits = limits;
        let admin = self.admin_name;
        for (name, (bucket, _)) in self.buckets.iter_mut() {
            let rate = if name == admin {
                limits.admin
            } else {
                limits.per_sender
            };
            bucket.set_rate(rate, now_ms);
        }
    }

    /// Makes `names` (the senders with a key) the senders with a bucket:
    /// a new name gets a full one, a name gone loses its bucket and its
    /// count, the others keep theirs. Memory stays bounded by the keyring.
    pub fn set_senders<'n>(&mut self, names: impl IntoIterator<Item = &'n str>, now_ms: u64) {
        let names: std::collections::HashSet<&str> = names.into_iter().collect();
        self.buckets.retain(|name, _| names.contains(name.as_str()));
        for name in names {
            if !self.buckets.contains_key(name) {
                let bucket = TokenBucket::new(self.rate_of(name), now_ms);
                self.buckets.insert(name.to_string(), (bucket, 0));
            }
        }
    }

    /// Whether `sender` (authenticated) may make one more request at
    /// `now_ms`; a refusal is counted against it.
    pub fn allow(&mut self, sender: &str, now_ms: u64) -> bool {
        let rate = self.rate_of(sender);
        let (bucket, refused) = match self.buckets.get_mut(sender) {
            Some(b) => b,
            None => self
                .buckets
                .entry(sender.to_string())
                .or_insert((TokenBucket::new(rate, now_ms), 0)),
        };
        if bucket.take(now_ms) {
            true
        } else {
            *refused += 1;
            false
        }
    }

    /// The requests refused so far, per sender with a bucket (every name
    /// given to [`set_senders`](Self::set_senders), and any other that
    /// made a request), in no particular order.
    pub fn refused(&self) -> impl Iterator<Item = (&str, u64)> {
        self.buckets
            .iter()
            .map(|(name, (_, n))| (name.as_str(), *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_gives_its_rate_then_refills_with_time() {
        let mut b = TokenBucket::new(10, 1_000);
        for i in 0..10 {
            assert!(b.take(1_000), "token {i}");
        }
        assert!(!b.take(1_000), "the eleventh in the same instant");
        // One token every 100 ms.
        assert!(!b.take(1_099));
        assert!(b.take(1_100));
        assert!(!b.take(1_100));
        // A long pause refills to the capacity, never beyond.
        assert!(b.take(100_000));
        assert_eq!(b.tokens(), 9);
    }

    #[test]
    fn slow_rates_refill_in_thousandths() {
        let mut b = TokenBucket::new(1, 0);
        assert!(b.take(0));
        for t in (100..1_000).step_by(100) {
            assert!(!b.take(t), "at {t} ms");
        }
        assert!(b.take(1_000));
    }

    #[test]
    fn a_clock_stepping_back_gives_nothing_and_locks_nobody_out() {
        let mut b = TokenBucket::new(2, 5_000);
        assert!(b.take(5_000) && b.take(5_000));
        assert!(!b.take(4_000), "stepping back an hour refills nothing");
        assert!(!b.take(4_499));
        assert!(b.take(4_500), "and refills from the new time on");
    }

    #[test]
    fn zero_rate_is_no_limit_and_rate_changes_cap_the_tokens() {
        let mut b = TokenBucket::new(0, 0);
        assert!((0..100_000).all(|_| b.take(0)));
        let mut b = TokenBucket::new(100, 0);
        b.set_rate(3, 0);
        assert_eq!(b.tokens(), 3);
        assert!(b.take(0) && b.take(0) && b.take(0) && !b.take(0));
        b.set_rate(0, 0);
        assert!(b.take(0));
    }

    #[test]
    fn senders_have_their_own_buckets_and_the_admin_its_own_rate() {
        let mut l = RateLimiter::new(
            RateLimits {
                per_sender: 3,
                admin: 5,
            },
            "admin",
        );
        let taken =
            |l: &mut RateLimiter, who: &str, t: u64| (0..10).filter(|_| l.allow(who, t)).count();
        assert_eq!(taken(&mut l, "be1", 0), 3);
        assert_eq!(taken(&mut l, "be2", 0), 3, "be1's flood leaves be2 alone");
        assert_eq!(taken(&mut l, "admin", 0), 5);
        let mut refused: Vec<_> = l.refused().collect();
        refused.sort_unstable();
        assert_eq!(refused, [("admin", 5), ("be1", 7), ("be2", 7)]);
        // Recovered a second later.
        assert_eq!(taken(&mut l, "be1", 1_000), 3);
        // A reload lowers the rate: tokens held are cut to it.
        l.set_limits(
            RateLimits {
                per_sender: 1,
                admin: 0,
            },
            2_000,
        );
        assert_eq!(taken(&mut l, "be2", 2_000), 1);
        assert_eq!(taken(&mut l, "admin", 2_000), 10, "0 = no limit");
        // The keyring changes: be2 goes, be3 comes with a full bucket.
        l.set_senders(["admin", "be1", "be3"], 2_000);
        let mut refused: Vec<_> = l.refused().collect();
        refused.sort_unstable();
        assert_eq!(refused, [("admin", 5), ("be1", 14), ("be3", 0)]);
        assert!(l.allow("be3", 2_000));
    }
}
