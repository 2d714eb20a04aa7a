//! The cron timer: one task that sleeps until the next rule is due and reports the due rules.
//! It only reports; the daemon decides what runs. Each wait is capped so a wall-clock jump (NTP,
//! suspend) is noticed within a minute, and the clock is injectable so tests use paused time.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Schedule;
use crate::ids::RuleName;

/// The longest single sleep: a jumped wall clock is noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Where "now" comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system's wall clock.
    System,
    /// `base` plus the time tokio says has passed since `start` (follows paused time in tests).
    Tokio { base: DateTime<Utc>, start: tokio::time::Instant },
}

impl Clock {
    pub fn tokio_at(base: DateTime<Utc>) -> Self {
        Self::Tokio { base, start: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Self::System => Utc::now(),
            Self::Tokio { base, start } => *base + chrono::Duration::from_std(start.elapsed()).unwrap_or_default(),
        }
    }
}

/// Every scheduled rule and its cron, in one time zone.
#[derive(Debug, Clone, Default)]
pub struct CronTable {
    pub entries: BTreeMap<RuleName, Schedule>,
    pub tz: Option<Tz>,
}

impl CronTable {
    /// Next firing of every rule strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> BTreeMap<RuleName, DateTime<Utc>> {
        let tz = self.tz.unwrap_or(Tz::UTC);
        self.entries.iter().filter_map(|(name, s)| Some((name.clone(), s.next_after(after, tz)?))).collect()
    }
}

/// Runs until `cancel`: whenever rules fall due, calls `on_due` with their names (sorted).
/// A new table (a reload) replaces the schedule from that moment on.
pub async fn run(
    mut table: watch::Receiver<CronTable>,
    clock: Clock,
    cancel: CancellationToken,
    on_due: impl Fn(Vec<RuleName>),
) {
    let mut current = table.borrow_and_update().clone();
    let mut next = current.next_after(clock.now());
    loop {
        let now = clock.now();
        let due: Vec<RuleName> = next.iter().filter(|(_, t)| **t <= now).map(|(n, _)| n.clone()).collect();
        if !due.is_empty() {
            for name in &due {
                if let Some(s) = current.entries.get(name) {
                    match s.next_after(now, current.tz.unwrap_or(Tz::UTC)) {
                        Some(t) => next.insert(name.clone(), t),
                        None => next.remove(name),
                    };
                }
            }
            on_due(due);
        }
        let wait = next.values().min().map_or(MAX_SLEEP, |t| (*t - now).to_std().unwrap_or_default()).min(MAX_SLEEP);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = table.changed() => {
                if changed.is_err() {
                    return;
                }
                current = table.borrow_and_update().clone();
                next = current.next_after(clock.now());
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use chrono::TimeZone;

    use super::*;

    fn table(entries: &[(&str, &str)]) -> CronTable {
        CronTable {
            entries: entries.iter().map(|(n, s)| (RuleName::from(*n), Schedule::parse(s).expect("cron"))).collect(),
            tz: Some(chrono_tz::Europe::Rome),
        }
    }

    // With paused time, an every-15-minutes rule fires exactly at :00/:15/:30/:45, and a daily one once.
    #[tokio::test(start_paused = true)]
    async fn fires_on_schedule_without_waiting() {
        let base = Utc.with_ymd_and_hms(2026, 11, 28, 10, 7, 0).single().expect("time");
        let clock = Clock::tokio_at(base);
        type Fired = Arc<Mutex<Vec<(String, DateTime<Utc>)>>>;
        let fired: Fired = Arc::default();
        let (_tx, rx) = watch::channel(table(&[("often", "0 */15 * * * *"), ("daily", "0 0 6 * * *")]));
        let cancel = CancellationToken::new();
        let log = fired.clone();
        let task = tokio::spawn(run(rx, clock, cancel.clone(), move |due| {
            let now = clock.now();
            log.lock().expect("lock").extend(due.into_iter().map(|n| (n.to_string(), now)));
        }));
        tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
        cancel.cancel();
        task.await.expect("timer ends");
        let fired = fired.lock().expect("lock").clone();
        let often: Vec<_> = fired.iter().filter(|f| f.0 == "often").collect();
        assert_eq!(often.len(), 96, "every 15 minutes for a day");
        assert_eq!(often[0].1, Utc.with_ymd_and_hms(2026, 11, 28, 10, 15, 0).single().expect("time"));
        let daily: Vec<_> = fired.iter().filter(|f| f.0 == "daily").collect();
        assert_eq!(daily.len(), 1);
        // 06:00 in Rome is 05:00 UTC in November.
        assert_eq!(daily[0].1, Utc.with_ymd_and_hms(2026, 11, 29, 5, 0, 0).single().expect("time"));
    }

    // A new table replaces the old schedule: a removed rule stops firing, an added one starts.
    #[tokio::test(start_paused = true)]
    async fn reload_replaces_the_schedule() {
        let base = Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 30).single().expect("time");
        let clock = Clock::tokio_at(base);
        let fired: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = watch::channel(table(&[("old", "0 * * * * *")]));
        let cancel = CancellationToken::new();
        let log = fired.clone();
        let task = tokio::spawn(run(rx, clock, cancel.clone(), move |due| {
            log.lock().expect("lock").extend(due.into_iter().map(|n| n.to_string()));
        }));
        tokio::time::sleep(Duration::from_secs(140)).await;
        tx.send(table(&[("new", "0 * * * * *")])).expect("send");
        tokio::time::sleep(Duration::from_secs(125)).await;
        cancel.cancel();
        task.await.expect("timer ends");
        let fired = fired.lock().expect("lock").clone();
        assert_eq!(fired, ["old", "old", "new", "new"]);
    }
}
