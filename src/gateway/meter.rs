//! Request accounting: requests, retries, 429s and pacing waits per operation, so that a run can
//! report what it cost. Lock-free counters; a run takes a snapshot at its end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::error::Operation;

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    waited_us: AtomicU64,
}

#[derive(Debug, Default)]
pub struct Meter {
    ops: [Counters; Operation::ALL.len()],
}

/// What a run cost, by operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: BTreeMap<Operation, u64>,
    pub retries: u64,
    pub throttled: u64,
    pub waited_ms: u64,
}

impl Usage {
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    pub fn requests_of(&self, op: Operation) -> u64 {
        self.requests.get(&op).copied().unwrap_or(0)
    }

    /// Adds `other`'s counts to these.
    pub fn absorb(&mut self, other: &Usage) {
        for (op, n) in &other.requests {
            *self.requests.entry(*op).or_default() += n;
        }
        self.retries += other.retries;
        self.throttled += other.throttled;
        self.waited_ms += other.waited_ms;
    }
}

impl Meter {
    fn of(&self, op: Operation) -> &Counters {
        &self.ops[op as usize]
    }

    pub fn request(&self, op: Operation) {
        self.of(op).requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self, op: Operation) {
        self.of(op).retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn throttled(&self, op: Operation) {
        self.of(op).throttled.fetch_add(1, Ordering::Relaxed);
    }

    pub fn waited(&self, op: Operation, d: Duration) {
        self.of(op).waited_us.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for op in Operation::ALL {
            let c = self.of(op);
            let n = c.requests.load(Ordering::Relaxed);
            if n > 0 {
                usage.requests.insert(op, n);
            }
            usage.retries += c.retries.load(Ordering::Relaxed);
            usage.throttled += c.throttled.load(Ordering::Relaxed);
            usage.waited_ms += c.waited_us.load(Ordering::Relaxed) / 1000;
        }
        usage
    }
}
