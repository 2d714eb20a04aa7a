//! The progress of a pass, for people waiting on a long one: the `pass started` event with the
//! requests the pass should cost and the time the rate plan implies, then a `pass progress` event
//! every 10 s while it reads and writes, and the same figures for a caller's sink every second
//! (the systemd status line, a terminal's progress bar).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Trigger;
use crate::gateway::{Meter, Usage};

/// How often `pass progress` is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often a sink hears of it.
const SINK_EVERY: Duration = Duration::from_secs(1);

/// Where a pass is and what it has cost so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub trigger: Trigger,
    /// `reading` (members and candidates) or `writing` (adds and removals).
    pub stage: &'static str,
    pub pages: u64,
    pub contacts: u64,
    pub api_requests: u64,
    pub throttled: u64,
    pub estimated_requests: Option<u64>,
    /// Seconds left at the rate seen so far (or the plan's, before any request).
    pub eta_s: Option<u64>,
}

/// A caller's view of a pass's progress (called from the pass's own task).
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

const READING: u8 = 0;
const WRITING: u8 = 1;

/// Watches a pass's meters until stopped.
pub(super) struct Reporter {
    stage: Arc<AtomicU8>,
    meters: Arc<Mutex<Vec<Arc<Meter>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The seconds `remaining` requests take at `rate` requests per second.
fn eta(remaining: u64, rate: Option<f64>) -> Option<u64> {
    rate.filter(|r| *r > 0.0).map(|r| (remaining as f64 / r).ceil() as u64)
}

impl Reporter {
    /// Logs `pass started` and starts reporting.
    pub(super) fn start(
        trigger: Trigger,
        rules: usize,
        read_plan: &str,
        estimated: Option<u64>,
        plan_eta: Option<Duration>,
        meters: Vec<Arc<Meter>>,
        sink: Option<ProgressSink>,
    ) -> Self {
        tracing::info!(
            trigger = %trigger,
            rules,
            read_plan,
            estimated_requests = estimated,
            eta_s = plan_eta.map(|d| d.as_secs()),
            "pass started"
        );
        let stage = Arc::new(AtomicU8::new(READING));
        let watched = stage.clone();
        let meters = Arc::new(Mutex::new(meters));
        let watched_meters = meters.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut last_log = Instant::now();
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + SINK_EVERY, SINK_EVERY);
            loop {
                tick.tick().await;
                let mut usage = Usage::default();
                for meter in watched_meters.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    usage.absorb(&meter.usage());
                }
                let done = usage.total_requests();
                let seen_rate = (done > 0).then(|| done as f64 / started.elapsed().as_secs_f64().max(0.001));
                let progress = Progress {
                    trigger,
                    stage: if watched.load(Ordering::Relaxed) == WRITING { "writing" } else { "reading" },
                    pages: usage.pages(),
                    contacts: usage.records,
                    api_requests: done,
                    throttled: usage.throttled,
                    estimated_requests: estimated,
                    eta_s: estimated.and_then(|e| eta(e.saturating_sub(done), seen_rate)),
                };
                if let Some(sink) = &sink {
                    sink(&progress);
                }
                if last_log.elapsed() >= LOG_EVERY {
                    last_log = Instant::now();
                    tracing::info!(
                        trigger = %progress.trigger,
                        stage = progress.stage,
                        pages = progress.pages,
                        contacts = progress.contacts,
                        api_requests = progress.api_requests,
                        throttled = progress.throttled,
                        estimated_requests = progress.estimated_requests,
                        eta_s = progress.eta_s,
                        "pass progress"
                    );
                }
            }
        });
        Self { stage, meters, task }
    }

    /// The reads are done; writes follow.
    pub(super) fn writing(&self) {
        self.stage.store(WRITING, Ordering::Relaxed);
    }

    /// A second round of the pass reads again; its requests count on `more`.
    pub(super) fn follow(&self, more: Vec<Arc<Meter>>) {
        self.meters.lock().unwrap_or_else(|p| p.into_inner()).extend(more);
        self.stage.store(READING, Ordering::Relaxed);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The ETA is the remaining requests at the rate, rounded up; no rate, no ETA.
    #[test]
    fn eta_from_rate() {
        assert_eq!(eta(100, Some(16.0)), Some(7));
        assert_eq!(eta(0, Some(16.0)), Some(0));
        assert_eq!(eta(100, None), None);
    }
}
