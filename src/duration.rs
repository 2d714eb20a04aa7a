//! Durations as people write them in config and on the command line: `90s`, `15m`, `24h`, `7d`, `2w`.

use std::time::Duration;

/// The longest duration segsync accepts anywhere: 100 years. Every duration is added to or
/// subtracted from a date somewhere (a grace's end, a retention's cut-off, `--since`), and
/// bounding it where it is read is what makes that arithmetic unable to overflow.
pub const MAX: Duration = Duration::from_secs(100 * 366 * 86_400);

/// Parses a whole number followed by one unit: `s`, `m`, `h`, `d` or `w`, at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "expected a duration such as \"90s\", \"15m\", \"24h\", \"7d\" or \"2w\", got {text:?}"
            ));
        }
    };
    let n: u64 = number.parse().map_err(|_| format!("expected a whole number before {unit:?}, got {text:?}"))?;
    match n.checked_mul(unit_secs).map(Duration::from_secs) {
        Some(d) if d <= MAX => Ok(d),
        _ => Err(format!("the duration {text:?} is too long (at most 100 years, e.g. \"5200w\")")),
    }
}

/// `d` as a calendar span, for date arithmetic; never fails for a duration [`parse`] accepted.
pub fn to_chrono(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d.min(MAX)).unwrap_or(chrono::TimeDelta::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each unit, and the mistakes people make.
    #[test]
    fn parses_durations() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse(" 24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert!(parse("24").expect_err("no unit").contains("\"24\""));
        assert!(parse("1.5h").is_err());
        assert!(parse("h").expect_err("no number").contains("whole number"));
        assert!(parse("3 days").is_err());
        assert!(parse("99999999999999999999d").is_err());
        // Bounded where it is read, so no date arithmetic downstream can overflow.
        assert!(parse("999999999w").expect_err("too long").contains("at most 100 years"));
        assert_eq!(parse("5200w"), Ok(Duration::from_secs(5200 * 7 * 86_400)));
        assert!(parse("5300w").is_err());
    }
}
