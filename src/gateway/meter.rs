//! Request accounting: requests, retries, 429s and pacing waits per operation, so that a run can
//! report what it cost. Lock-free counters; a run takes a snapshot at its end.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::error::Operation;

#[derive(Debug)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    throttled: AtomicU64,
    waited_us: AtomicU64,
    records: AtomicU64,
    /// Answers by status class, in [`StatusClass::ALL`] order.
    statuses: [AtomicU64; StatusClass::ALL.len()],
}

/// How an attempt ended, for the request counts by status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum StatusClass {
    #[serde(rename = "2xx")]
    Success,
    #[serde(rename = "3xx")]
    Redirect,
    #[serde(rename = "4xx")]
    Client,
    #[serde(rename = "5xx")]
    Server,
    /// No answer: refused, dropped, timed out.
    #[serde(rename = "none")]
    NoAnswer,
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [Self::Success, Self::Redirect, Self::Client, Self::Server, Self::NoAnswer];

    pub fn of(status: u16) -> Self {
        match status {
            200..=299 => Self::Success,
            300..=399 => Self::Redirect,
            400..=499 => Self::Client,
            _ => Self::Server,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "2xx",
            Self::Redirect => "3xx",
            Self::Client => "4xx",
            Self::Server => "5xx",
            Self::NoAnswer => "none",
        }
    }
}

#[derive(Debug)]
pub struct Meter {
    ops: [Counters; Operation::ALL.len()],
}

/// Every request this process made, whichever run or client made it: what `/metrics` counts, live.
pub static PROCESS: Meter = Meter::new();

impl Counters {
    const fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
            records: AtomicU64::new(0),
            statuses: [const { AtomicU64::new(0) }; StatusClass::ALL.len()],
        }
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

/// What a run cost, by operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: BTreeMap<Operation, u64>,
    pub retries: u64,
    pub throttled: u64,
    pub waited_ms: u64,
    /// Records (contacts or lists) the reads returned.
    pub records: u64,
    /// Answers by operation and status class.
    pub statuses: BTreeMap<(Operation, StatusClass), u64>,
    /// Time waited on the rate limit (pacing and 429 pauses), by operation.
    pub waited_ms_by_op: BTreeMap<Operation, u64>,
    /// Retries and 429s by operation.
    pub retries_by_op: BTreeMap<Operation, u64>,
    pub throttled_by_op: BTreeMap<Operation, u64>,
}

impl Usage {
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    pub fn requests_of(&self, op: Operation) -> u64 {
        self.requests.get(&op).copied().unwrap_or(0)
    }

    /// Pages read (contacts, members and the list directory).
    pub fn pages(&self) -> u64 {
        [Operation::ScanContacts, Operation::ReadMembers, Operation::FindList]
            .into_iter()
            .map(|op| self.requests_of(op))
            .sum()
    }

    /// Adds `other`'s counts to these.
    pub fn absorb(&mut self, other: &Usage) {
        fn add<K: Ord + Copy>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
            for (k, n) in from {
                *into.entry(*k).or_default() += n;
            }
        }
        add(&mut self.requests, &other.requests);
        add(&mut self.statuses, &other.statuses);
        add(&mut self.waited_ms_by_op, &other.waited_ms_by_op);
        add(&mut self.retries_by_op, &other.retries_by_op);
        add(&mut self.throttled_by_op, &other.throttled_by_op);
        self.retries += other.retries;
        self.throttled += other.throttled;
        self.waited_ms += other.waited_ms;
        self.records += other.records;
    }
}

impl Meter {
    pub const fn new() -> Self {
        Self { ops: [const { Counters::new() }; Operation::ALL.len()] }
    }

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

    /// `n` records arrived in one page.
    pub fn records(&self, op: Operation, n: u64) {
        self.of(op).records.fetch_add(n, Ordering::Relaxed);
    }

    /// An attempt ended with `class`.
    pub fn answered(&self, op: Operation, class: StatusClass) {
        let i = StatusClass::ALL.iter().position(|c| *c == class).unwrap_or(0);
        self.of(op).statuses[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn usage(&self) -> Usage {
        let mut usage = Usage::default();
        for op in Operation::ALL {
            let c = self.of(op);
            let n = c.requests.load(Ordering::Relaxed);
            if n > 0 {
                usage.requests.insert(op, n);
            }
            let (retries, throttled) = (c.retries.load(Ordering::Relaxed), c.throttled.load(Ordering::Relaxed));
            let waited_ms = c.waited_us.load(Ordering::Relaxed) / 1000;
            usage.retries += retries;
            usage.throttled += throttled;
            usage.waited_ms += waited_ms;
            usage.records += c.records.load(Ordering::Relaxed);
            for (nonzero, map, value) in [
                (retries > 0, &mut usage.retries_by_op, retries),
                (throttled > 0, &mut usage.throttled_by_op, throttled),
                (waited_ms > 0, &mut usage.waited_ms_by_op, waited_ms),
            ] {
                if nonzero {
                    map.insert(op, value);
                }
            }
            for (class, count) in StatusClass::ALL.iter().zip(&c.statuses) {
                let n = count.load(Ordering::Relaxed);
                if n > 0 {
                    usage.statuses.insert((op, *class), n);
                }
            }
        }
        usage
    }
}
