//! Durations as people write them in config and on the command line: `90s`, `15m`, `24h`, `7d`, `2w`.

use std::time::Duration;

/// Parses a whole number followed by one unit: `s`, `m`, `h`, `d` or `w`.
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
    n.checked_mul(unit_secs).map(Duration::from_secs).ok_or_else(|| format!("the duration {text:?} is too long"))
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
    }
}
