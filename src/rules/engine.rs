//! The one constructor of the Rhai `Engine` every rule runs in, and the helpers rules can call.
//!
//! The engine is a sandbox: `import` resolves only to `rules/lib/NAME.rhai` (see `helpers`), no `eval`, `print`/`debug`
//! to the log (never stdout), every limit set explicitly so debug and release builds behave the
//! same. Relational operators on mismatched types are errors, not a silent `false`, and reading a
//! missing property is an error: a rule that cannot judge a contact says so.

use chrono::{DateTime, NaiveDate};
use chrono_tz::Tz;
use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, NativeCallContext};

/// Operations one evaluation of `matches` may perform before it is stopped.
pub const MAX_OPERATIONS: u64 = 100_000;
pub const MAX_STRING_SIZE: usize = 64 * 1024;
pub const MAX_ARRAY_SIZE: usize = 10_000;
pub const MAX_MAP_SIZE: usize = 10_000;

/// A calendar date, as rules see it (`today()`, `date("2026-01-09")`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(pub NaiveDate);

type Fallible<T> = Result<T, Box<EvalAltResult>>;

/// Builds the engine. `tz` is the zone "today" and timestamps are read in.
pub fn build(tz: Tz) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_operations(MAX_OPERATIONS);
    engine.set_max_expr_depths(64, 32);
    engine.set_max_call_levels(16);
    engine.set_max_string_size(MAX_STRING_SIZE);
    engine.set_max_array_size(MAX_ARRAY_SIZE);
    engine.set_max_map_size(MAX_MAP_SIZE);
    engine.set_max_variables(256);
    engine.set_max_functions(256);
    engine.set_strict_variables(true);
    engine.set_fail_on_invalid_map_property(true);
    // No strings interner: it sits behind one lock for the whole engine, taken for writing by every
    // `let` of a text (`let last = contact.customFields.get("lastPurchaseDate")`), so the threads
    // judging pages queued on it and Rhai rules ran on one core. It only saves memory on strings
    // that live long, and a rule's strings live for one call.
    engine.set_max_strings_interned(0);
    // Registered operators must win over the built-in "different types compare false".
    engine.set_fast_operators(false);
    engine.disable_symbol("eval");
    // Rhai's default resolver reads any file: ours reads only the rules' helpers folder.
    engine.set_module_resolver(super::helpers::LibResolver);
    engine.on_print(|text| tracing::info!(target: "segsync::rule", text, "rule print"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(target: "segsync::rule", text, file = source.unwrap_or(""), line = pos.line().unwrap_or(0), "rule debug");
    });
    register_dates(&mut engine, tz);
    register_segments(&mut engine);
    register_strict_comparisons(&mut engine);
    // The zone, for what reads rules outside Rhai (the native evaluator); a call's own tag wins.
    engine.set_default_tag(Dynamic::from(Zone(tz)));
    engine
}

/// The time zone an engine reads dates in, kept as its default tag.
#[derive(Clone, Copy)]
struct Zone(Tz);

/// The zone `build` gave `engine` (UTC for an engine built elsewhere).
pub fn zone(engine: &Engine) -> Tz {
    engine.default_tag().read_lock::<Zone>().map_or(chrono_tz::UTC, |z| z.0)
}

/// What one call of a rule carries as its tag: the run's frozen date, and the rules this one may
/// name with `segment(…)` (`None` when it names none: then a call shares no reference count with
/// the other threads calling the same rule).
#[derive(Clone)]
pub(super) struct CallTag {
    pub today: Date,
    pub segments: Option<std::sync::Arc<super::Segments>>,
}

/// Today's date as the evaluation sees it: frozen per run and passed as the call's tag.
fn today(ctx: &NativeCallContext, tz: Tz) -> NaiveDate {
    let tag = ctx.tag();
    tag.and_then(|t| t.read_lock::<CallTag>().map(|c| c.today.0))
        .or_else(|| tag.and_then(|t| t.read_lock::<Date>().map(|d| d.0)))
        .unwrap_or_else(|| chrono::Utc::now().with_timezone(&tz).date_naive())
}

/// `segment("vip", contact)`: rule `vip`'s verdict (its FILTER and `matches`) on this record, on
/// the same frozen today. An error there is an error here, so the contact is kept, never removed.
fn register_segments(engine: &mut Engine) {
    engine.register_type_with_name::<CallTag>("segsync call");
    engine.register_fn(
        "segment",
        |ctx: NativeCallContext, name: ImmutableString, contact: Dynamic| -> Fallible<bool> {
            let tag = ctx.tag().and_then(|t| t.read_lock::<CallTag>().map(|c| c.clone()));
            let Some(tag) = tag else { return Err(format!("segment({name:?}): not available here").into()) };
            let Some(rule) = tag.segments.as_ref().and_then(|s| s.get(name.as_str())) else {
                return Err(format!("segment({name:?}): no such rule is loaded").into());
            };
            let record = crate::contact::ContactRecord::from_fields(contact);
            rule.evaluate(ctx.engine(), &record, tag.today).map_err(|e| format!("segment({name:?}): {e}").into())
        },
    );
    // `segment_list("geo", contact)`: the list the partitioned rule `geo` puts this contact in, or ().
    engine.register_fn(
        "segment_list",
        |ctx: NativeCallContext, name: ImmutableString, contact: Dynamic| -> Fallible<Dynamic> {
            let tag = ctx.tag().and_then(|t| t.read_lock::<CallTag>().map(|c| c.clone()));
            let Some(tag) = tag else { return Err(format!("segment_list({name:?}): not available here").into()) };
            let Some(rule) = tag.segments.as_ref().and_then(|s| s.get(name.as_str())) else {
                return Err(format!("segment_list({name:?}): no such rule is loaded").into());
            };
            let record = crate::contact::ContactRecord::from_fields(contact);
            let listed = match rule.filter_verdict(&record) {
                Ok(true) => rule.list_of(ctx.engine(), record.into_full(), tag.today),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            };
            listed
                .map(|l| l.map_or(Dynamic::UNIT, Dynamic::from))
                .map_err(|e| format!("segment_list({name:?}): {e}").into())
        },
    );
}

/// Reads `YYYY-MM-DD`, or an RFC 3339 timestamp taken as its date in `tz`.
pub fn parse_date(text: &str, tz: Tz) -> Result<NaiveDate, String> {
    let text = text.trim();
    if let Some(d) = iso_day(text) {
        return Ok(d);
    }
    // `FromStr` reads ISO `YYYY-MM-DD` without interpreting a format string on every call.
    if text.len() == 10
        && let Ok(d) = text.parse::<NaiveDate>()
    {
        return Ok(d);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&tz).date_naive());
    }
    Err(format!("not an ISO date (YYYY-MM-DD) or timestamp: {text:?}"))
}

/// A date written exactly `YYYY-MM-DD` (ten ASCII characters, digits and two dashes), read
/// without chrono's format machinery: the common case of every date field, on every contact.
/// `None` for anything else, including an impossible day, which callers then read the slow way
/// (and refuse the same way).
pub fn iso_day(text: &str) -> Option<NaiveDate> {
    let b: &[u8; 10] = text.as_bytes().try_into().ok()?;
    let digits = |r: std::ops::Range<usize>| {
        b[r].iter().try_fold(0u32, |n, c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)
}

fn register_dates(engine: &mut Engine, tz: Tz) {
    engine.register_type_with_name::<Date>("date");
    engine.register_fn("today", move |ctx: NativeCallContext| Date(today(&ctx, tz)));
    engine.register_fn("date", move |s: ImmutableString| -> Fallible<Date> { Ok(Date(parse_date(&s, tz)?)) });
    engine.register_fn("to_string", |d: &mut Date| d.0.to_string());
    engine.register_fn("to_debug", |d: &mut Date| format!("date(\"{}\")", d.0));
    engine.register_get("year", |d: &mut Date| i64::from(chrono::Datelike::year(&d.0)));
    engine.register_get("month", |d: &mut Date| i64::from(chrono::Datelike::month(&d.0)));
    engine.register_get("day", |d: &mut Date| i64::from(chrono::Datelike::day(&d.0)));
    engine.register_fn("-", |a: Date, b: Date| (a.0 - b.0).num_days());
    engine.register_fn("+", |a: Date, days: i64| shift(a, days));
    engine.register_fn("-", |a: Date, days: i64| shift(a, days.checked_neg().unwrap_or(i64::MAX)));
    engine.register_fn("==", |a: Date, b: Date| a == b);
    engine.register_fn("!=", |a: Date, b: Date| a != b);
    engine.register_fn("<", |a: Date, b: Date| a < b);
    engine.register_fn("<=", |a: Date, b: Date| a <= b);
    engine.register_fn(">", |a: Date, b: Date| a > b);
    engine.register_fn(">=", |a: Date, b: Date| a >= b);

    // days_since / days_until: whole calendar days between a date (or ISO string) and today.
    engine.register_fn("days_since", move |ctx: NativeCallContext, d: Date| (today(&ctx, tz) - d.0).num_days());
    engine.register_fn("days_until", move |ctx: NativeCallContext, d: Date| (d.0 - today(&ctx, tz)).num_days());
    engine.register_fn("days_since", move |ctx: NativeCallContext, s: ImmutableString| -> Fallible<i64> {
        Ok((today(&ctx, tz) - parse_date(&s, tz)?).num_days())
    });
    engine.register_fn("days_until", move |ctx: NativeCallContext, s: ImmutableString| -> Fallible<i64> {
        Ok((parse_date(&s, tz)? - today(&ctx, tz)).num_days())
    });
    for name in ["days_since", "days_until", "date"] {
        engine.register_fn(name, move |_: ()| -> Fallible<i64> {
            Err(format!("{name}() got () — is the field missing? Expected a date or an ISO date string").into())
        });
    }
}

/// `date ± days`, checked: a date outside the calendar is an error, never a panic.
fn shift(d: Date, days: i64) -> Fallible<Date> {
    chrono::TimeDelta::try_days(days)
        .and_then(|delta| d.0.checked_add_signed(delta))
        .map(Date)
        .ok_or_else(|| format!("date {} + {days} days is outside the calendar", d.0).into())
}

/// `<`, `<=`, `>`, `>=` between a number and a non-number (or two different non-numbers) are
/// errors naming both types, so `"6800" > 5000.0` or `() > 5000.0` cannot quietly be `false`.
fn register_strict_comparisons(engine: &mut Engine) {
    macro_rules! refuse {
        ($engine:ident; $($a:ty, $b:ty);* $(;)?) => {$(
            for op in ["<", "<=", ">", ">="] {
                $engine.register_fn(op, move |a: $a, b: $b| -> Fallible<bool> {
                    Err(format!(
                        "cannot compare {} with {} using '{op}' (is a field missing or of another type?)",
                        type_label(&Dynamic::from(a)),
                        type_label(&Dynamic::from(b)),
                    )
                    .into())
                });
            }
        )*};
    }
    refuse!(engine;
        (), i64; (), f64; (), ImmutableString; (), bool; (), Date;
        i64, (); f64, (); ImmutableString, (); bool, (); Date, ();
        ImmutableString, i64; ImmutableString, f64; i64, ImmutableString; f64, ImmutableString;
        bool, i64; bool, f64; i64, bool; f64, bool; bool, ImmutableString; ImmutableString, bool;
        Date, i64; Date, f64; Date, ImmutableString; i64, Date; f64, Date; ImmutableString, Date;
    );
}

fn type_label(v: &Dynamic) -> String {
    if v.is_unit() {
        "() (nothing)".into()
    } else if v.is_string() {
        format!("string {v:?}")
    } else {
        format!("{} {v}", v.type_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;
    use rhai::{CallFnOptions, Scope};

    fn eval(src: &str, today: &str) -> Result<Dynamic, String> {
        let engine = build(chrono_tz::Europe::Rome);
        let ast = engine.compile(format!("fn f() {{ {src} }}")).map_err(|e| e.to_string())?;
        let day = Date(NaiveDate::parse_from_str(today, "%Y-%m-%d").expect("date"));
        engine
            .call_fn_with_options::<Dynamic>(
                CallFnOptions::new().eval_ast(false).with_tag(day),
                &mut Scope::new(),
                &ast,
                "f",
                (),
            )
            .map_err(|e| e.unwrap_inner().to_string())
    }

    // The fast reading of `YYYY-MM-DD` agrees with chrono's wherever it answers, refuses every
    // other shape, and answers on every well-formed date.
    #[test]
    fn iso_day_agrees_with_chrono() {
        let odd = [
            "2026-02-30",
            "2026-13-01",
            "2026-00-10",
            "2024-02-29",
            "2025-02-29",
            "0000-01-01",
            "9999-12-31",
            "2026-1-011",
            "2026/01/01",
            "+026-01-01",
            " 2026-01-0",
            "2026-01-01T",
            "26-01-2026",
            "२०२६-०१-०१",
        ];
        for text in odd {
            if let Some(d) = iso_day(text) {
                assert_eq!(Some(d), NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(), "{text}");
            }
        }
        assert_eq!(iso_day("2026-02-30"), None);
        assert_eq!(iso_day("2026/01/01"), None);
        let mut day = NaiveDate::from_ymd_opt(1999, 1, 1).expect("day");
        while day.year() < 2031 {
            assert_eq!(iso_day(&day.to_string()), Some(day), "{day}");
            day = day.succ_opt().expect("next");
        }
        assert_eq!(iso_day("2026-03-29"), NaiveDate::from_ymd_opt(2026, 3, 29));
    }

    // days_since counts whole calendar days across a month end and a DST switch.
    #[test]
    fn days_since_is_in_calendar_days() {
        assert_eq!(eval(r#"days_since("2026-01-31")"#, "2026-02-01").expect("ok").as_int(), Ok(1));
        // Europe/Rome springs forward on 2026-03-29: still one day per date.
        assert_eq!(eval(r#"days_since("2026-03-28")"#, "2026-03-30").expect("ok").as_int(), Ok(2));
        assert_eq!(eval(r#"days_since("2026-10-24")"#, "2026-10-26").expect("ok").as_int(), Ok(2));
        assert_eq!(eval(r#"days_until("2026-12-25")"#, "2026-11-28").expect("ok").as_int(), Ok(27));
        assert_eq!(eval(r#"days_since(date("2026-11-01"))"#, "2026-11-28").expect("ok").as_int(), Ok(27));
        // A timestamp late on the 28th UTC is already the 29th in Rome.
        assert_eq!(eval(r#"days_since("2026-03-28T23:30:00Z")"#, "2026-03-30").expect("ok").as_int(), Ok(1));
        assert_eq!(eval("today() - date(\"2026-11-01\")", "2026-11-28").expect("ok").as_int(), Ok(27));
    }

    // A missing or mistyped value is an error naming the types, never a quiet false.
    #[test]
    fn mismatched_comparisons_are_errors() {
        let err = eval(r#"let x = (); x > 5000.0"#, "2026-11-28").expect_err("unit vs float");
        assert!(err.contains("cannot compare () (nothing) with f64"), "{err}");
        let err = eval(r#""6800" > 5000.0"#, "2026-11-28").expect_err("string vs float");
        assert!(err.contains("string \"6800\""), "{err}");
        assert_eq!(eval("6800 > 5000.0", "2026-11-28").expect("int vs float is fine").as_bool(), Ok(true));
        let err = eval("days_since(())", "2026-11-28").expect_err("unit date");
        assert!(err.contains("is the field missing"), "{err}");
        let err = eval(r#"days_since("last tuesday")"#, "2026-11-28").expect_err("bad date");
        assert!(err.contains("last tuesday"), "{err}");
    }

    // Date arithmetic that leaves the calendar is a Rhai error, not a panic.
    #[test]
    fn date_overflow_is_an_error() {
        let err = eval("today() + 9999999999", "2026-11-28").expect_err("overflow");
        assert!(err.contains("outside the calendar"), "{err}");
        let err = eval("today() - 9223372036854775807", "2026-11-28").expect_err("overflow");
        assert!(err.contains("outside the calendar"), "{err}");
        assert_eq!(eval("(today() + 3).day", "2026-11-28").expect("ok").as_int(), Ok(1));
    }

    // The threads judging pages share one engine: nothing in it may be a lock that calls take.
    // Rhai's strings interner is one (written on every `let` of a text), so it is off.
    #[test]
    fn the_engine_has_no_lock_every_call_takes() {
        assert_eq!(build(chrono_tz::UTC).max_strings_interned(), 0);
    }

    // The sandbox holds: loops are bounded, strings are bounded, eval and import do not exist.
    #[test]
    fn sandbox_limits_hold() {
        let err = eval("loop { }", "2026-11-28").expect_err("endless loop");
        assert!(err.contains("Too many operations"), "{err}");
        let err = eval(r#"let s = "x"; loop { s += s; }"#, "2026-11-28").expect_err("huge string");
        assert!(err.contains("Length of string"), "{err}");
        let err = eval(r#"eval("1")"#, "2026-11-28").expect_err("eval");
        assert!(err.contains("eval"), "{err}");
        let err = eval(r#"import "x" as y; 1"#, "2026-11-28").expect_err("import");
        assert!(!err.is_empty());
    }
}
