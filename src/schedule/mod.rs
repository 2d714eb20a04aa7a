//! Triggers: cron schedules and rule-file changes. Producers only send events; they never run a
//! rule themselves.

mod cron;

pub use cron::Schedule;
