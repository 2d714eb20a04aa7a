//! Triggers: cron schedules and rule-file changes. Producers only report; they never run a rule.

mod cron;
pub mod timer;
pub mod watch;

pub use cron::Schedule;
pub use timer::{Clock, CronTable};

use chrono::{DateTime, Utc};

/// Whether a rule is overdue at `now`: its last success (or, when it never had one, the time a
/// daemon first loaded it) lies more than `factor` of its schedule's intervals back. The one
/// judgement `status` and `/healthz` share.
pub fn is_overdue(
    interval: std::time::Duration,
    factor: f64,
    last_success: Option<DateTime<Utc>>,
    loaded_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> bool {
    let allowed = chrono::Duration::from_std(interval.mul_f64(factor)).unwrap_or(chrono::Duration::MAX);
    now.signed_duration_since(last_success.unwrap_or(loaded_at)) > allowed
}
