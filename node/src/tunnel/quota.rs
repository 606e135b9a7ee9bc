//! Per-app registration rate on this node: a token bucket per app, so that one tenant's CVM
//! credentials cannot fill the Raft log (every registration that is not a fresh renewal is a
//! write) or race other tenants for the tunnel address pool.
//!
//! Node-local on purpose: an agent talks to one node at a time, so a tenant spreading over N
//! nodes gets at most N times the rate, still bounded. Cluster-wide limits are the data
//! plane's concern (issue 17), not registration's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most; past this, full (idle) buckets are dropped first. Apps are created by
/// operators, so this is only a guard against a state with very many apps.
const MAX_BUCKETS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Registration rate per app.
#[derive(Debug)]
pub struct RegistrationQuota {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RegistrationQuota {
    /// `rate` registrations per second with bursts of `burst` (`wg.registration_*_per_app`).
    pub fn new(rate: f64, burst: u32) -> Self {
        RegistrationQuota {
            rate: rate.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one registration for `app` at `now`; `Err(wait)` says how long until one is
    /// allowed. Never held across an await: a short critical section on a small map.
    pub fn take(&self, app: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(app) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
            if buckets.len() >= MAX_BUCKETS {
                return Err(Duration::from_secs(1));
            }
        }
        let b = buckets.entry(app.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(b, now, self.rate, self.burst);
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            b.at = now;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

/// The bucket's tokens at `now` (not stored).
fn refill(b: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_app() {
        let q = RegistrationQuota::new(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(q.take("evil", t0).is_ok());
        }
        let wait = q.take("evil", t0).expect_err("burst spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Another tenant is not held back by the first.
        assert!(q.take("bank", t0).is_ok());
        // Half a second later one more token has come (2 per second).
        assert!(q.take("evil", t0 + Duration::from_millis(500)).is_ok());
        assert!(q.take("evil", t0 + Duration::from_millis(500)).is_err());
        // Idle long enough, the bucket is full again, never more than the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(q.take("evil", later).is_ok());
        }
        assert!(q.take("evil", later).is_err());
    }
}
