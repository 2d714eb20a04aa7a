//! The client's shared rate budget: one pacer per API key, awaited before every request by every
//! rule of the daemon, plus the global pause a 429 imposes.
//!
//! The plans are two sliding windows ("at most N requests in any minute and M in any second"), so
//! the pacer keeps a log of its own recent send times and admits a request exactly when both
//! windows have room: a pass of R requests takes the least time the windows allow. Each window is
//! counted a little longer than the plan's (1.05 s, 60.5 s), so arrival jitter on the network never
//! shows the server one request too many. `budget_share` scales both limits, leaving the rest of
//! the account's budget to its other software. It uses tokio's clock, so tests with paused time see
//! its waits.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::RateLimits;

/// The windows as counted: the plan's, plus a guard for arrival jitter.
const SECOND: Duration = Duration::from_millis(1050);
const MINUTE: Duration = Duration::from_millis(60_500);

#[derive(Debug)]
pub struct Pacer {
    /// `None`: unpaced (429 pauses still hold).
    caps: Option<Caps>,
    state: Mutex<Window>,
}

/// Requests admitted per window.
#[derive(Debug, Clone, Copy)]
struct Caps {
    per_second: usize,
    per_minute: usize,
}

#[derive(Debug)]
struct Window {
    /// Send times within the last minute window, oldest first.
    sent: VecDeque<Instant>,
    paused_until: Instant,
}

impl Pacer {
    /// A pacer for `share` (0 < share ≤ 1) of `limits`; `None` paces nothing (but still honours
    /// 429 pauses).
    pub fn new(limits: Option<RateLimits>, share: f64) -> Self {
        let caps = limits.map(|l| {
            let scaled = |n: u32| ((f64::from(n) * share).floor() as usize).max(1);
            Caps { per_second: scaled(l.per_second), per_minute: scaled(l.per_minute) }
        });
        let now = Instant::now();
        Self { caps, state: Mutex::new(Window { sent: VecDeque::new(), paused_until: now }) }
    }

    /// The least time `n` requests take under the windows, from a fresh budget; `None` unpaced.
    pub fn least_time(&self, n: u64) -> Option<Duration> {
        let caps = self.caps?;
        let (per_second, per_minute) = (caps.per_second as u64, caps.per_minute as u64);
        let full_minutes = n.saturating_sub(1) / per_minute;
        let rest = n - full_minutes * per_minute;
        Some(MINUTE * full_minutes as u32 + SECOND.mul_f64(rest.saturating_sub(1) as f64 / per_second as f64))
    }

    /// Waits for a slot; returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let start = Instant::now();
        loop {
            let now = Instant::now();
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if now < s.paused_until {
                    s.paused_until - now
                } else if let Some(caps) = self.caps {
                    while s.sent.front().is_some_and(|&t| now.duration_since(t) >= MINUTE) {
                        s.sent.pop_front();
                    }
                    let in_second = s.sent.iter().rev().take_while(|&&t| now.duration_since(t) < SECOND).count();
                    let mut wait = Duration::ZERO;
                    if s.sent.len() >= caps.per_minute {
                        let oldest = s.sent[s.sent.len() - caps.per_minute];
                        wait = wait.max(MINUTE.saturating_sub(now.duration_since(oldest)));
                    }
                    if in_second >= caps.per_second {
                        let oldest = s.sent[s.sent.len() - caps.per_second];
                        wait = wait.max(SECOND.saturating_sub(now.duration_since(oldest)));
                    }
                    if wait.is_zero() {
                        s.sent.push_back(now);
                    }
                    wait
                } else {
                    Duration::ZERO
                }
            };
            if wait.is_zero() {
                return start.elapsed();
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Holds every request of this client for `d` (the server said 429).
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.paused_until = s.paused_until.max(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRODUCTION: RateLimits = RateLimits { per_minute: 1000, per_second: 50 };

    /// Sends `n` requests through `pacer`; their send times.
    async fn send(pacer: &Pacer, n: usize) -> Vec<Instant> {
        let mut sent = Vec::with_capacity(n);
        for _ in 0..n {
            pacer.acquire().await;
            sent.push(Instant::now());
        }
        sent
    }

    /// The most requests in any window of `length` (sliding, as the plan reads).
    fn most_in(sent: &[Instant], length: Duration) -> usize {
        (0..sent.len()).map(|i| sent[i..].iter().take_while(|&&u| u - sent[i] < length).count()).max().unwrap_or(0)
    }

    // At the full plan, never more than 50 in any second or 1,000 in any minute, and a pass of 446
    // requests (S3's no-change pass) takes the least time the windows allow, within 10 %.
    #[tokio::test(start_paused = true)]
    async fn production_uses_both_windows_exactly() {
        let pacer = Pacer::new(Some(PRODUCTION), 1.0);
        let sent = send(&pacer, 1_200).await;
        assert!(most_in(&sent, Duration::from_secs(1)) <= 50);
        assert!(most_in(&sent, Duration::from_secs(60)) <= 1_000);
        // T_min(446) = 446 / 50 per second = 8.92 s.
        let pass = sent[445] - sent[0];
        assert!(pass <= Duration::from_secs_f64(8.92 * 1.10), "446 requests took {pass:?}");
        assert!(pass >= Duration::from_secs_f64(8.0), "446 requests took {pass:?}: faster than the plan allows");
        // The 1,001st waits for the minute window.
        assert!(sent[1_000] - sent[0] >= Duration::from_secs(60), "{:?}", sent[1_000] - sent[0]);
    }

    // A budget share scales both windows: at 0.8, 40 a second and 800 a minute.
    #[tokio::test(start_paused = true)]
    async fn budget_share_scales_both_windows() {
        let pacer = Pacer::new(Some(PRODUCTION), 0.8);
        let sent = send(&pacer, 1_000).await;
        assert_eq!(most_in(&sent, Duration::from_secs(1)), 40);
        assert_eq!(most_in(&sent, Duration::from_secs(60)), 800);
        let least = pacer.least_time(1_000).expect("paced");
        let took = sent[999] - sent[0];
        assert!(took <= least.mul_f64(1.10) && took + Duration::from_secs(2) >= least, "{took:?} vs {least:?}");
    }

    // A 429 pause holds every caller, not just the one that got it.
    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_caller() {
        let pacer = Pacer::new(None, 1.0);
        pacer.pause_for(Duration::from_secs(12));
        let waited = pacer.acquire().await;
        assert!(waited >= Duration::from_secs(12), "waited {waited:?}");
    }
}
