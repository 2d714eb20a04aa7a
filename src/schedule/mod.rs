//! Triggers: cron schedules and rule-file changes. Producers only report; they never run a rule.

mod cron;
pub mod timer;
pub mod watch;

pub use cron::Schedule;
pub use timer::{Clock, CronTable};
