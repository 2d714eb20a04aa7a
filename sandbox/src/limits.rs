//! What stands between a request and the sandbox's data: the per-key rate limiter, the injected
//! faults, and the request statistics served at `/_sandbox/stats`.
//!
//! The limiter reads the plan literally as two sliding windows ("at most N in any minute, at most M
//! in any second"); that is the strictest reading of the contract, so a client that passes here
//! passes a fixed-window or token-bucket server too.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::rate_plan::RateLimits;

/// Sliding-window log of one key's accepted requests.
#[derive(Default)]
struct Window {
    sent: VecDeque<Instant>,
}

pub struct Limiter {
    limits: Option<RateLimits>,
    keys: HashMap<String, Window>,
}

/// The limiter's answer for one request.
pub enum Admission {
    Allowed { limit: u32, remaining: u32 },
    Unlimited,
    Throttled { limit: u32, retry_after_secs: u64 },
}

const MINUTE: Duration = Duration::from_secs(60);
const SECOND: Duration = Duration::from_secs(1);

impl Limiter {
    pub fn new(limits: Option<RateLimits>) -> Self {
        Self { limits, keys: HashMap::new() }
    }

    pub fn admit(&mut self, key: &str, now: Instant) -> Admission {
        let Some(limits) = self.limits else { return Admission::Unlimited };
        let window = self.keys.entry(key.to_owned()).or_default();
        while window.sent.front().is_some_and(|&t| now.duration_since(t) >= MINUTE) {
            window.sent.pop_front();
        }
        let in_minute = window.sent.len();
        let in_second = window.sent.iter().rev().take_while(|&&t| now.duration_since(t) < SECOND).count();
        let mut wait = Duration::ZERO;
        if in_minute >= limits.per_minute as usize {
            let oldest = window.sent[in_minute - limits.per_minute as usize];
            wait = wait.max(MINUTE - now.duration_since(oldest));
        }
        if in_second >= limits.per_second as usize {
            let oldest = window.sent[in_minute - limits.per_second as usize];
            wait = wait.max(SECOND - now.duration_since(oldest));
        }
        if wait > Duration::ZERO {
            // Whole seconds, rounded up, as the documented body carries them.
            let retry_after_secs = wait.as_millis().div_ceil(1000).max(1) as u64;
            return Admission::Throttled { limit: limits.per_minute, retry_after_secs };
        }
        window.sent.push_back(now);
        Admission::Allowed { limit: limits.per_minute, remaining: limits.per_minute - window.sent.len() as u32 }
    }
}

/// Faults injected on demand, each a share of requests in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub latency: Duration,
    pub error_rate: f64,
    pub throttle_rate: f64,
    pub drop_rate: f64,
}

impl Faults {
    /// A bad day: `rate` of all requests fail, split evenly between 500s, 429s and dropped connections.
    pub fn split(rate: f64, latency: Duration) -> Self {
        Self { latency, error_rate: rate / 3.0, throttle_rate: rate / 3.0, drop_rate: rate / 3.0 }
    }

    pub fn any(&self) -> bool {
        self.error_rate > 0.0 || self.throttle_rate > 0.0 || self.drop_rate > 0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    ServerError,
    Throttle,
    Drop,
}

impl Faults {
    /// Which fault (if any) hits a request, given one uniform draw in `0.0..1.0`.
    pub fn pick(&self, draw: f64) -> Option<Injected> {
        let mut edge = self.error_rate;
        if draw < edge {
            return Some(Injected::ServerError);
        }
        edge += self.throttle_rate;
        if draw < edge {
            return Some(Injected::Throttle);
        }
        edge += self.drop_rate;
        (draw < edge).then_some(Injected::Drop)
    }
}

/// Request counts by route ("GET /contacts") and status ("200", or "dropped").
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub total: u64,
    pub routes: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Stats {
    pub fn record(&mut self, route: &str, outcome: &str) {
        self.total += 1;
        *self.routes.entry(route.to_owned()).or_default().entry(outcome.to_owned()).or_default() += 1;
    }

    /// Requests to `route` with any outcome.
    pub fn count(&self, route: &str) -> u64 {
        self.routes.get(route).map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Requests to `route` that ended with `outcome`.
    pub fn count_outcome(&self, route: &str, outcome: &str) -> u64 {
        self.routes.get(route).and_then(|m| m.get(outcome)).copied().unwrap_or(0)
    }

    /// Requests of any route ending with `outcome`.
    pub fn outcome_total(&self, outcome: &str) -> u64 {
        self.routes.values().filter_map(|m| m.get(outcome)).sum()
    }

    /// Requests that changed (or tried to change) data: every method but GET.
    pub fn writes(&self) -> u64 {
        self.routes.iter().filter(|(r, _)| !r.starts_with("GET ")).map(|(_, m)| m.values().sum::<u64>()).sum()
    }

    /// The counts added since `earlier` was taken.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut out = Stats { total: self.total - earlier.total, routes: BTreeMap::new() };
        for (route, outcomes) in &self.routes {
            for (outcome, n) in outcomes {
                let before = earlier.count_outcome(route, outcome);
                if *n > before {
                    out.routes.entry(route.clone()).or_default().insert(outcome.clone(), n - before);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The per-second window throttles the 51st request in a second and names a 1 s wait.
    #[test]
    fn second_window_throttles_burst() {
        let mut limiter = Limiter::new(Some(RateLimits { per_minute: 1000, per_second: 50 }));
        let now = Instant::now();
        for _ in 0..50 {
            assert!(matches!(limiter.admit("k", now), Admission::Allowed { .. }));
        }
        match limiter.admit("k", now) {
            Admission::Throttled { retry_after_secs, .. } => assert_eq!(retry_after_secs, 1),
            _ => panic!("the 51st request in one second must be throttled"),
        }
        assert!(matches!(limiter.admit("k", now + SECOND), Admission::Allowed { .. }));
    }

    // The per-minute window throttles once the minute's budget is spent, even at a slow pace.
    #[test]
    fn minute_window_throttles() {
        let mut limiter = Limiter::new(Some(RateLimits { per_minute: 100, per_second: 10 }));
        let start = Instant::now();
        for i in 0..100u64 {
            let t = start + Duration::from_millis(i * 200);
            assert!(matches!(limiter.admit("k", t), Admission::Allowed { .. }), "request {i}");
        }
        let t = start + Duration::from_millis(100 * 200);
        match limiter.admit("k", t) {
            Admission::Throttled { retry_after_secs, .. } => assert_eq!(retry_after_secs, 40),
            _ => panic!("the 101st request within a minute must be throttled"),
        }
    }
}
