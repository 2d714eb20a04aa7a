//! Cron expressions (5 or 6 fields, `@daily`-style aliases) and their next firing time in the
//! configured time zone, correct across daylight-saving changes (croner computes in local time).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let fields: Vec<&str> = text.split_whitespace().collect();
        if !text.trim_start().starts_with('@') {
            if !(5..=6).contains(&fields.len()) {
                return Err(format!(
                    "{text:?} has {} fields; a schedule has 5 (minute hour day month weekday) or 6 (second first)",
                    fields.len()
                ));
            }
            // Names are accepted only where they mean something: days in the weekday field (the
            // last), months in the month field (the one before it).
            const DAYS: [&str; 7] = ["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];
            const MONTHS: [&str; 12] =
                ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"];
            let n = fields.len();
            let names = ["second", "minute", "hour", "day of month", "month", "day of week"];
            let name_of = |i: usize| names[i + 6 - n];
            for (i, field) in fields.iter().enumerate() {
                let upper = field.to_ascii_uppercase();
                if i != n - 1 && DAYS.iter().any(|d| upper.contains(d)) {
                    return Err(format!(
                        "{text:?}: day names ({field}) in the {} field; they belong in the last field (day of week)",
                        name_of(i)
                    ));
                }
                if i != n - 2 && MONTHS.iter().any(|m| upper.contains(m)) {
                    return Err(format!(
                        "{text:?}: month names ({field}) in the {} field; they belong in the month field",
                        name_of(i)
                    ));
                }
            }
        }
        let cron = croner::Cron::from_str(text).map_err(|e| format!("invalid cron expression {text:?}: {e}"))?;
        let schedule = Self { text: text.to_owned(), cron };
        // A schedule that never fires (February 30th) would leave a rule silently idle.
        if schedule.next_after(Utc::now(), Tz::UTC).is_none() {
            return Err(format!("{text:?} never fires (no such date)"));
        }
        Ok(schedule)
    }

    /// The next `n` firings after `after`, for people checking a schedule.
    pub fn upcoming(&self, after: DateTime<Utc>, tz: Tz, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = after;
        while out.len() < n {
            match self.next_after(t, tz) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first firing strictly after `after`, computed on the wall clock of `tz`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&tz);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    /// The time between the first two occurrences after `after`: the interval a rule is judged
    /// overdue by.
    pub fn interval_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<std::time::Duration> {
        let first = self.next_after(after, tz)?;
        (self.next_after(first, tz)? - first).to_std().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rome(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        chrono_tz::Europe::Rome.with_ymd_and_hms(y, mo, d, h, mi, 0).single().expect("unambiguous").with_timezone(&Utc)
    }

    // A daily 06:00 Europe/Rome run fires at 06:00 local on both sides of both DST switches, once a day.
    #[test]
    fn daily_run_keeps_local_time_across_dst() {
        let s = Schedule::parse("0 6 * * *").expect("5-field cron");
        let tz = chrono_tz::Europe::Rome;
        for (before, expected) in [
            // Spring forward: 2026-03-29 02:00 → 03:00.
            (rome(2026, 3, 28, 7, 0), rome(2026, 3, 29, 6, 0)),
            (rome(2026, 3, 29, 7, 0), rome(2026, 3, 30, 6, 0)),
            // Fall back: 2026-10-25 03:00 → 02:00.
            (rome(2026, 10, 24, 7, 0), rome(2026, 10, 25, 6, 0)),
            (rome(2026, 10, 25, 7, 0), rome(2026, 10, 26, 6, 0)),
        ] {
            let next = s.next_after(before, tz).expect("next");
            assert_eq!(next, expected);
            assert_eq!(next.with_timezone(&tz).format("%H:%M").to_string(), "06:00");
        }
        // The UTC instants differ by an hour across the switch, as they must.
        assert_eq!(rome(2026, 3, 28, 6, 0).format("%H").to_string(), "05");
        assert_eq!(rome(2026, 3, 30, 6, 0).format("%H").to_string(), "04");
    }

    // A run in the repeated hour of the fall-back night fires once, not twice.
    #[test]
    fn repeated_hour_fires_once() {
        let s = Schedule::parse("0 30 2 * * *").expect("6-field cron");
        let tz = chrono_tz::Europe::Rome;
        let first = s.next_after(rome(2026, 10, 24, 12, 0), tz).expect("next");
        let second = s.next_after(first, tz).expect("next");
        assert_eq!(second - first, chrono::Duration::hours(25), "{first} then {second}");
    }

    // Five- and six-field forms and aliases parse; nonsense does not.
    #[test]
    fn parses_both_forms() {
        assert!(Schedule::parse("*/5 * * * *").is_ok());
        assert!(Schedule::parse("0 */15 * * * *").is_ok());
        assert!(Schedule::parse("@hourly").is_ok());
        let err = Schedule::parse("every tuesday").expect_err("invalid");
        assert!(err.contains("every tuesday"), "{err}");
        assert!(Schedule::parse("0 9 * * MON-FRI").is_ok(), "day names in the weekday field");
        assert!(Schedule::parse("0 0 1 JAN,JUL *").is_ok(), "month names in the month field");
    }

    // Schedules that would never fire, or fire where nobody meant, are refused with the reason.
    #[test]
    fn refuses_misleading_schedules() {
        let err = Schedule::parse("0 0 30 2 *").expect_err("February 30th");
        assert!(err.contains("never fires"), "{err}");
        let err = Schedule::parse("0 0 12 * * * 2027").expect_err("a year field");
        assert!(err.contains("7 fields"), "{err}");
        let err = Schedule::parse("0 */5 * * MON-FRI *").expect_err("days in the month field");
        assert!(err.contains("day names (MON-FRI) in the month field"), "{err}");
        let err = Schedule::parse("0 0 JAN * *").expect_err("months in the day field");
        assert!(err.contains("month names (JAN) in the day of month field"), "{err}");
    }

    // The next firings are listed in order.
    #[test]
    fn upcoming_lists_the_next_firings() {
        let s = Schedule::parse("0 6 * * *").expect("valid");
        let next = s.upcoming(rome(2026, 3, 28, 12, 0), chrono_tz::Europe::Rome, 3);
        assert_eq!(next, [rome(2026, 3, 29, 6, 0), rome(2026, 3, 30, 6, 0), rome(2026, 3, 31, 6, 0)]);
    }
}
