//! The client's shared rate budget: one pacer per API key, awaited before every request by every
//! rule of the daemon, plus the global pause a 429 imposes.
//!
//! A GCRA (virtual scheduling) pacer with rate `r` and burst `b` sends at most `b + r·t` requests in
//! any interval `t`. Choosing `b + 60·r ≤ 98 %` of the per-minute limit and `b + r ≤` the per-second
//! limit keeps us inside the plan under every reading of it (sliding window, fixed window, token
//! bucket), while a long scan still runs at 97 % of the sustained rate. It uses tokio's clock, so
//! tests with paused time see its waits.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::RateLimits;

#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    tolerance: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Theoretical arrival time of the next request.
    tat: Instant,
    paused_until: Instant,
}

impl Pacer {
    /// A pacer for `limits`; `None` paces nothing (but still honours 429 pauses).
    pub fn new(limits: Option<RateLimits>) -> Self {
        let (interval, burst) = match limits {
            None => (Duration::ZERO, 1),
            Some(l) => {
                let rate = 0.97 * f64::from(l.per_minute) / 60.0;
                let burst_for_minute = 0.98 * f64::from(l.per_minute) - 60.0 * rate;
                let burst_for_second = f64::from(l.per_second) - rate;
                let burst = burst_for_minute.min(burst_for_second).floor().max(1.0) as u32;
                (Duration::from_secs_f64(1.0 / rate), burst)
            }
        };
        let now = Instant::now();
        Self { interval, tolerance: interval * (burst - 1), state: Mutex::new(State { tat: now, paused_until: now }) }
    }

    /// The sustained rate in requests per second, `None` when unpaced.
    pub fn rate(&self) -> Option<f64> {
        (!self.interval.is_zero()).then(|| 1.0 / self.interval.as_secs_f64())
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
                } else {
                    let tat = s.tat.max(now);
                    let earliest = tat.checked_sub(self.tolerance).unwrap_or(now);
                    if earliest > now {
                        earliest - now
                    } else {
                        s.tat = tat + self.interval;
                        Duration::ZERO
                    }
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

    // Production pacing never puts more than 50 requests in a second or 980 in a minute.
    #[tokio::test(start_paused = true)]
    async fn production_stays_inside_both_windows() {
        let pacer = Pacer::new(Some(RateLimits { per_minute: 1000, per_second: 50 }));
        let mut sent = Vec::new();
        for _ in 0..1200 {
            pacer.acquire().await;
            sent.push(Instant::now());
        }
        for (i, &t) in sent.iter().enumerate() {
            let in_second = sent[i..].iter().take_while(|&&u| u - t < Duration::from_secs(1)).count();
            let in_minute = sent[i..].iter().take_while(|&&u| u - t < Duration::from_secs(60)).count();
            assert!(in_second <= 50, "{in_second} requests in one second");
            assert!(in_minute <= 980, "{in_minute} requests in one minute");
        }
        // ...and a long run still goes at about 97 % of the sustained rate.
        let span = *sent.last().expect("sent") - sent[0];
        assert!(span < Duration::from_secs(75), "1200 requests took {span:?}");
    }

    // A 429 pause holds every caller, not just the one that got it.
    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_caller() {
        let pacer = Pacer::new(None);
        pacer.pause_for(Duration::from_secs(12));
        let waited = pacer.acquire().await;
        assert!(waited >= Duration::from_secs(12), "waited {waited:?}");
    }
}
