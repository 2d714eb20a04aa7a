//! Derived push-down: a server filter read off a rule's `matches`, so the rule's own candidate
//! reads ask the server for fewer contacts.
//!
//! Only a few shapes are recognised, on the script as Rhai compacts it (no comments, no
//! insignificant spaces): a body of `let` statements, `if … { return false; }` guards and one
//! final expression whose `&&`-joined parts include
//!   `days_since(F) > N` / `>= N`, `days_until(F) < N` / `<= N`, `date(F) < date("D")` / `<=`
//!   on a custom field F (`contact.customFields.x`, `….get("x")`, or a `let` name for one), and
//!   `contact.region == "text"` (a standard field) or `contact.customFields.x == "text"`.
//! A derived term must hold for every contact `matches` says true of: the guards only ever say
//! false, and an `&&` is true only when each part is. So the filter can only narrow what is read
//! to contacts that could match; `matches` still decides every contact read, and members are
//! never read through it.
//!
//! Date bounds get two days of margin ([`DATE_MARGIN_DAYS`]), and that is enough in every zone:
//! `days_since` reads a timestamp as its date L in the configured zone, the server compares the
//! date W as written (the timestamp's own offset). The same instant's two dates differ by at most
//! the offsets' difference rounded up to whole days; every offset (RFC 3339's, and every zone's,
//! UTC−12 to UTC+14) lies strictly within ±24 h, so the difference is under 48 h and W ≤ L + 2.
//! A contact `matches` accepts has L < bound, so W < bound + 2: the server never excludes it.
//! (A date written without a time has W = L.) `margin_holds_in_every_zone` checks it.

use chrono::{Days, NaiveDate};

/// The days added to a derived date bound (see the module's note for why two suffice).
pub const DATE_MARGIN_DAYS: u64 = 2;

use super::Date;
use super::filter::{FilterTerm, STANDARD_FIELDS};

/// What a rule's `matches` lets segsync ask the server for, before "today" is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushDown {
    /// These terms hold for every contact `matches` accepts.
    Terms(Vec<Derived>),
    /// Why nothing can be derived.
    None(String),
}

/// One derived term, relative to the run's "today" where it is a day count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Derived {
    /// The custom date field is before `today - days` (`days_since(f) > days`).
    SinceMoreThan { field: String, days: i64 },
    /// The custom date field is before `today + days` (`days_until(f) < days`).
    UntilLessThan { field: String, days: i64 },
    /// The custom date field is before a fixed date.
    Before { field: String, date: NaiveDate },
    /// An exact match the server can filter on.
    Equals(FilterTerm),
}

impl PushDown {
    /// The server filter for a run whose "today" is `today`.
    pub fn terms(&self, today: Date) -> Vec<FilterTerm> {
        let PushDown::Terms(terms) = self else { return Vec::new() };
        let before = |field: &str, day: Option<NaiveDate>| {
            // The margin of the module's note; a bound off the calendar derives nothing.
            day.and_then(|d| d.checked_add_days(Days::new(DATE_MARGIN_DAYS)))
                .map(|d| FilterTerm::before(field, &d.format("%Y-%m-%d").to_string()))
        };
        let shift = |days: i64| chrono::TimeDelta::try_days(days).and_then(|delta| today.0.checked_add_signed(delta));
        terms
            .iter()
            .filter_map(|t| match t {
                Derived::SinceMoreThan { field, days } => before(field, days.checked_neg().and_then(shift)),
                Derived::UntilLessThan { field, days } => before(field, shift(*days)),
                Derived::Before { field, date } => before(field, Some(*date)),
                Derived::Equals(term) => Some(term.clone()),
            })
            .collect()
    }
}

/// Reads what a rule's `matches` lets the server filter, from the whole script as
/// [`rhai::Engine::compact_script`] writes it. A rule that defines functions of its own might
/// redefine `days_since` or `date`, so it derives nothing.
pub fn from_script(compact: &str) -> PushDown {
    match matches_body(compact) {
        Ok((param, body)) => derive(param, body),
        Err(why) => PushDown::None(why),
    }
}

/// `matches`' parameter and body, from the whole script as [`rhai::Engine::compact_script`]
/// writes it; an error when the rule defines other functions too (they might redefine
/// `days_since` or `date`) or has no readable `matches`.
pub fn matches_body(compact: &str) -> Result<(&str, &str), String> {
    fn_body(compact, "matches")
}

/// The parameter and body of the rule's one function `name` (`matches`, or a partitioned rule's
/// `list`), from the compacted script.
pub fn fn_body<'a>(compact: &'a str, name: &str) -> Result<(&'a str, &'a str), String> {
    let head = format!("fn {name}(");
    let Some(start) = compact.find(&head) else { return Err(format!("no {name} function")) };
    if compact.matches("fn ").count() > 1 {
        return Err(format!("the rule defines functions besides {name}"));
    }
    let after = &compact[start + head.len()..];
    let Some((param, rest)) = after.split_once(')') else { return Err(format!("unreadable {name}")) };
    let Some(close) = rest.starts_with('{').then(|| matching(rest, 0)).flatten() else {
        return Err(format!("unreadable {name}"));
    };
    Ok((param.trim(), &rest[1..close]))
}

/// Reads what `matches` (its parameter `param`, its compacted body `body`) lets the server filter.
pub fn derive(param: &str, body: &str) -> PushDown {
    let mut aliases: Vec<(String, String)> = Vec::new();
    let mut rest = body.trim();
    // Statements before the final expression: `let` names and guards that can only say false.
    loop {
        if let Some(after) = rest.strip_prefix("let ") {
            let Some((statement, tail)) = split_statement(after) else {
                return PushDown::None("matches has a `let` segsync cannot read".into());
            };
            let Some((name, value)) = statement.split_once('=') else {
                return PushDown::None("matches has a `let` segsync cannot read".into());
            };
            let name = name.trim();
            if name == param {
                return PushDown::None(format!("matches rebinds `{param}`"));
            }
            let field = custom_field(param, value, &aliases);
            aliases.retain(|(known, _)| known != name);
            if let Some(field) = field {
                aliases.push((name.to_owned(), field));
            }
            rest = tail;
        } else if let Some(after) = rest.strip_prefix("if ") {
            let Some(tail) = after.find('{').and_then(|open| {
                let block = &after[open..];
                let close = matching(block, 0)?;
                let inner = &block[1..close];
                matches!(inner, "return false;" | "return false").then(|| &block[close + 1..])
            }) else {
                return PushDown::None("matches has an `if` that does not only `return false`".into());
            };
            rest = tail.trim_start_matches(';');
        } else {
            break;
        }
    }
    let expression = rest.strip_prefix("return ").unwrap_or(rest).trim_end_matches(';');
    if expression.contains(';') || expression.contains('{') {
        return PushDown::None("matches has statements segsync does not analyse".into());
    }
    let Some(parts) = top_level_and(expression) else {
        return PushDown::None("matches joins its tests with `||` (or unbalanced brackets)".into());
    };
    let terms: Vec<Derived> = parts.iter().filter_map(|part| term(param, part, &aliases)).collect();
    if terms.is_empty() {
        return PushDown::None(format!(
            "no part of `{expression}` is a day count or date bound on a custom field, or an exact text match on a \
             filterable field"
        ));
    }
    PushDown::Terms(terms)
}

/// `name=value;` → (`name=value`, the rest).
fn split_statement(text: &str) -> Option<(&str, &str)> {
    let end = text.find(';')?;
    Some((&text[..end], &text[end + 1..]))
}

/// The index of the bracket closing the one at `open`.
fn matching(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0i32;
    let mut in_string = false;
    for (i, &b) in bytes.iter().enumerate().skip(open) {
        match b {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_string = !in_string,
            _ if in_string => {}
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The `&&`-joined parts of `expression` at bracket depth 0; `None` if it has a top-level `||`
/// or unbalanced brackets. A part wrapped whole in brackets is unwrapped.
fn top_level_and(expression: &str) -> Option<Vec<&str>> {
    let bytes = expression.as_bytes();
    let (mut depth, mut in_string, mut start) = (0i32, false, 0);
    let mut parts = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'"' if i == 0 || bytes[i - 1] != b'\\' => in_string = !in_string,
            _ if in_string => {}
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            b'|' if depth == 0 && bytes.get(i + 1) == Some(&b'|') => return None,
            b'&' if depth == 0 && bytes.get(i + 1) == Some(&b'&') => {
                parts.push(&expression[start..i]);
                start = i + 2;
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    if depth != 0 || in_string {
        return None;
    }
    parts.push(&expression[start..]);
    Some(
        parts
            .into_iter()
            .map(|p| match p.strip_prefix('(') {
                Some(inner) if matching(p, 0) == Some(p.len() - 1) => &inner[..inner.len() - 1],
                _ => p,
            })
            .collect(),
    )
}

/// The custom field an accessor reads: `contact.customFields.x`, `contact.customFields.get("x")`,
/// `contact.customFields["x"]`, or a `let` name bound to one of those.
fn custom_field(param: &str, accessor: &str, aliases: &[(String, String)]) -> Option<String> {
    let accessor = accessor.trim();
    if let Some((_, field)) = aliases.iter().find(|(name, _)| name == accessor) {
        return Some(field.clone());
    }
    let rest = accessor.strip_prefix(param)?.strip_prefix(".customFields")?;
    let field = if let Some(name) = rest.strip_prefix('.') {
        name.strip_prefix("get(\"").and_then(|n| n.strip_suffix("\")")).unwrap_or(name)
    } else {
        rest.strip_prefix("[\"")?.strip_suffix("\"]")?
    };
    field.chars().all(|c| c.is_alphanumeric() || c == '_').then(|| field.to_owned()).filter(|f| !f.is_empty())
}

/// `text` as a Rhai string literal's content, if it is one without escapes.
fn string_literal(text: &str) -> Option<&str> {
    text.strip_prefix('"')?.strip_suffix('"').filter(|s| !s.contains(['"', '\\']))
}

/// One recognised comparison.
fn term(param: &str, part: &str, aliases: &[(String, String)]) -> Option<Derived> {
    let call = |name: &str, text: &str| -> Option<String> {
        let inner = text.strip_prefix(name)?.strip_prefix('(')?.strip_suffix(')')?;
        custom_field(param, inner, aliases)
    };
    for (op, strict) in [(">=", false), (">", true), ("<=", false), ("<", true)] {
        let Some((left, right)) = part.split_once(op) else { continue };
        if op.len() == 1 && right.starts_with('=') {
            continue;
        }
        if let (Some(field), Ok(n)) = (call("days_since", left), right.parse::<i64>()) {
            // > n: before today - n; >= n: before today - n + 1.
            return match op.starts_with('>') {
                true => Some(Derived::SinceMoreThan { field, days: if strict { n } else { n.checked_sub(1)? } }),
                false => None,
            };
        }
        if let (Some(field), Ok(n)) = (call("days_until", left), right.parse::<i64>()) {
            // < n: before today + n; <= n: before today + n + 1.
            return match op.starts_with('<') {
                true => Some(Derived::UntilLessThan { field, days: if strict { n } else { n.checked_add(1)? } }),
                false => None,
            };
        }
        let fixed = right
            .strip_prefix("date(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(string_literal)
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok());
        if let (Some(field), Some(date), true) = (call("date", left), fixed, op.starts_with('<')) {
            let date = if strict { date } else { date.checked_add_days(Days::new(1))? };
            return Some(Derived::Before { field, date });
        }
        return None;
    }
    let (left, right) = part.split_once("==")?;
    let (accessor, value) = match (string_literal(left), string_literal(right)) {
        (None, Some(value)) => (left, value),
        (Some(value), None) => (right, value),
        _ => return None,
    };
    if let Some(field) = accessor.strip_prefix(param).and_then(|a| a.strip_prefix('.'))
        && STANDARD_FIELDS.contains(&field)
    {
        return Some(Derived::Equals(FilterTerm::standard(field, value)));
    }
    let field = custom_field(param, accessor, &[])?;
    Some(Derived::Equals(FilterTerm::custom(&field, value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> Date {
        Date(NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("date"))
    }

    fn derived(body: &str) -> Result<Vec<(String, String)>, String> {
        match derive("c", body) {
            PushDown::Terms(_) => {
                Ok(derive("c", body).terms(day("2026-11-28")).iter().map(FilterTerm::query_pair).collect())
            }
            PushDown::None(why) => Err(why),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    // Each recognised shape, with its bound (two days of margin on dates).
    #[test]
    fn recognised_shapes() {
        let cases: &[(&str, &[(&str, &str)])] = &[
            ("days_since(c.customFields.last)>90", &[("customFields.last.before", "2026-09-01")]),
            ("days_since(c.customFields.last)>=90", &[("customFields.last.before", "2026-09-02")]),
            ("days_until(c.customFields.renewal)<30", &[("customFields.renewal.before", "2026-12-30")]),
            ("days_until(c.customFields.renewal)<=30", &[("customFields.renewal.before", "2026-12-31")]),
            ("date(c.customFields.signup)<date(\"2026-01-01\")", &[("customFields.signup.before", "2026-01-03")]),
            ("date(c.customFields.signup)<=date(\"2026-01-01\")", &[("customFields.signup.before", "2026-01-04")]),
            ("c.region==\"Veneto\"", &[("region", "Veneto")]),
            ("\"WHATSAPP\"==c.customFields.preferredChannel", &[("customFields.preferredChannel", "WHATSAPP")]),
            (
                "c.city==\"Milano\"&&(days_since(c.customFields.get(\"last\"))>30)&&c.customFields.totalSpent>10.0",
                &[("city", "Milano"), ("customFields.last.before", "2026-10-31")],
            ),
            (
                "let last=c.customFields.get(\"lastPurchaseDate\");if last==(){return false;}days_since(last)>90",
                &[("customFields.lastPurchaseDate.before", "2026-09-01")],
            ),
        ];
        for (body, want) in cases {
            assert_eq!(derived(body), Ok(pairs(want)), "{body}");
        }
    }

    // The whole script as Rhai compacts it: `matches` is found, and a rule with functions of its
    // own derives nothing (it could redefine `days_since`).
    #[test]
    fn reads_compacted_scripts() {
        let engine = crate::rules::engine::build(chrono_tz::Europe::Rome);
        let compact = |src: &str| engine.compact_script(src).expect("compacts");
        let script = "const LIST = \"x\"; // a comment\nfn matches(contact) {\n  contact.region == \"Veneto\"  \n}\n";
        assert_eq!(
            from_script(&compact(script)),
            PushDown::Terms(vec![Derived::Equals(FilterTerm::standard("region", "Veneto"))])
        );
        let own = "fn days_since(d) { 1000 }\nfn matches(c) { days_since(c.customFields.x) > 90 }";
        assert!(matches!(from_script(&compact(own)), PushDown::None(why) if why.contains("functions")));
        assert!(
            matches!(derive("c", "let c=#{region:\"X\"};c.region==\"X\""), PushDown::None(why) if why.contains("rebinds"))
        );
        // A name rebound to something else is no longer the field.
        assert!(matches!(derive("c", "let d=c.customFields.last;let d=today();days_since(d)>3"), PushDown::None(_)));
    }

    // The shipped rules and the S2 benchmark rules: what each derives, or why nothing.
    #[test]
    fn shipped_rules_derive() {
        let engine = crate::rules::engine::build(chrono_tz::Europe::Rome);
        let today = day("2026-11-28");
        type Want = Result<&'static [(&'static str, &'static str)], &'static str>;
        let cases: &[(&str, Want)] = &[
            ("geo-emilia-romagna", Err("no part of `true`")),
            ("geo-lombardia", Err("no part of `true`")),
            ("geo-veneto", Err("no part of `true`")),
            // No purchase date is "not lapsed" (the guard says false), so every match has a date
            // before today - 90 (two days of margin).
            ("reengagement-90d", Ok(&[("customFields.lastPurchaseDate.before", "2026-09-01")])),
            ("vip", Err("no part of `spent>5000.0`")),
            ("big-spenders-lombardia", Err("no part")),
            ("ever-vip", Err("no part")),
            ("mid-spenders", Err("no part")),
            ("recent-buyers-30d", Err("no part")),
            ("whatsapp-lapsing", Err("no part")),
        ];
        let mut rules = crate::rules::load_dir(&engine, std::path::Path::new("rules")).0;
        rules.rules.extend(crate::rules::load_dir(&engine, std::path::Path::new("benches/rules-s2")).0.rules);
        assert_eq!(rules.len(), cases.len());
        for (name, want) in cases {
            let rule = rules.get(&crate::ids::RuleName::from(*name)).expect(name);
            match (&rule.pushdown, want) {
                (PushDown::Terms(_), Ok(pairs_wanted)) => {
                    let got: Vec<_> = rule.derived_filter(today).iter().map(FilterTerm::query_pair).collect();
                    assert_eq!(got, pairs(pairs_wanted), "{name}");
                }
                (PushDown::None(why), Err(reason)) => assert!(why.contains(reason), "{name}: {why}"),
                (got, want) => panic!("{name}: derived {got:?}, wanted {want:?}"),
            }
        }
    }

    // Shapes that must derive nothing, each with its reason.
    #[test]
    fn unrecognised_shapes_say_why() {
        let cases = [
            ("days_since(c.customFields.last)>90||c.region==\"Veneto\"", "||"),
            ("days_since(c.customFields.last)<90", "no part"),
            ("days_until(c.customFields.renewal)>30", "no part"),
            ("c.customFields.totalSpent>5000.0", "no part"),
            ("true", "no part"),
            ("c.nickname==\"Bo\"", "no part"),
            ("if c.vip{return true;}false", "`if`"),
            ("let x=1;x=2;true", "statements"),
            ("c.region!=\"Veneto\"", "no part"),
        ];
        for (body, why) in cases {
            let got = derived(body).expect_err(body);
            assert!(got.contains(why), "{body}: {got}");
        }
    }

    // No contact `matches` selects is ever excluded by the derived filter, in any zone: every
    // IANA zone as the configured one (at its offsets around the bound), timestamps written in
    // every offset from UTC−12 to UTC+14 by half hours, the quarter-hour ones in use (+5:45,
    // +12:45) and RFC 3339's extremes (±23:59), at
    // every quarter hour of the days around the bound. Rule side: `parse_date` (what
    // `days_since` and `date` read); server side: `FilterTerm::judge` (the date as written).
    #[test]
    fn margin_holds_in_every_zone() {
        use chrono::{FixedOffset, NaiveTime, Offset, TimeZone};
        let today = day("2026-11-28");
        let bodies = [
            "days_since(c.customFields.last)>90",
            "days_since(c.customFields.last)>=90",
            "days_until(c.customFields.last)<-85",
            "date(c.customFields.last)<date(\"2026-08-30\")",
        ];
        let terms: Vec<FilterTerm> = bodies.iter().flat_map(|b| derive("c", b).terms(today)).collect();
        assert_eq!(terms.len(), bodies.len());
        // The rule's own verdict on a local date, per body.
        let selects = |body: usize, local: NaiveDate| match body {
            0 => (today.0 - local).num_days() > 90,
            1 => (today.0 - local).num_days() >= 90,
            2 => (local - today.0).num_days() < -85,
            _ => local < NaiveDate::from_ymd_opt(2026, 8, 30).expect("date"),
        };
        // Zones that share their offsets around the bound judge alike: one of each.
        let mut zones: Vec<chrono_tz::Tz> = Vec::new();
        let mut signatures = std::collections::HashSet::new();
        for tz in chrono_tz::TZ_VARIANTS {
            let offsets: Vec<i32> = (0..6)
                .map(|d| {
                    let at = chrono::Utc.from_utc_datetime(
                        &NaiveDate::from_ymd_opt(2026, 8, 26 + d).expect("date").and_hms_opt(12, 0, 0).expect("time"),
                    );
                    tz.offset_from_utc_datetime(&at.naive_utc()).fix().local_minus_utc()
                })
                .collect();
            if signatures.insert(offsets) {
                zones.push(tz);
            }
        }
        assert!(zones.len() > 30, "{} zones", zones.len());
        let mut stamp_offsets: Vec<i32> = (-24..=28).map(|h| h * 30 * 60).collect();
        stamp_offsets.extend([-(23 * 3600 + 59 * 60), 5 * 3600 + 45 * 60, 12 * 3600 + 45 * 60, 23 * 3600 + 59 * 60]);
        let (mut checked, mut selected) = (0u64, 0u64);
        for tz in &zones {
            for &offset in &stamp_offsets {
                let fixed = FixedOffset::east_opt(offset).expect("offset");
                // From three days before the earliest bound to three days after the latest.
                for written in 0..9 {
                    let date = NaiveDate::from_ymd_opt(2026, 8, 26).expect("date") + Days::new(written);
                    for half in 0..48 {
                        let time = NaiveTime::from_num_seconds_from_midnight_opt(half * 1800, 0).expect("time");
                        let stamp = fixed.from_local_datetime(&date.and_time(time)).single().expect("stamp");
                        let text = stamp.to_rfc3339();
                        let local = crate::rules::engine::parse_date(&text, *tz).expect("parses");
                        let mut custom = rhai::Map::new();
                        custom.insert("last".into(), text.clone().into());
                        let mut record = rhai::Map::new();
                        record.insert("customFields".into(), custom.into());
                        for (body, term) in terms.iter().enumerate() {
                            checked += 1;
                            if selects(body, local) {
                                selected += 1;
                                assert_eq!(
                                    term.judge(&record),
                                    Ok(true),
                                    "{} excludes {text} (local date {local} in {tz}), which {} selects",
                                    term.query_pair().1,
                                    bodies[body]
                                );
                            }
                        }
                    }
                }
            }
        }
        // The grid straddles every bound: some stamps are selected, some are not.
        assert!(selected > 0 && selected < checked, "{selected} of {checked}");
    }
}
