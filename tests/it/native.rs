//! The native evaluator against Rhai, on generated records (issue 24): for every rule below and
//! every record, a native verdict is exactly Rhai's, and where Rhai errors the native evaluator
//! never answers (it defers the record to Rhai, whose error it then is). Records mix absent, null,
//! wrong-type and text fields, integers and decimals, dates and timestamps in many zones, and
//! engines in zones from UTC−11 to UTC+14.
use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use segsync::contact::{ContactRecord, Keep, Record};
use segsync::rules::{Date, Rule};

/// `matches` bodies the native evaluator compiles: the shipped and benchmark rules' shapes and
/// every operator it evaluates.
const NATIVE_RULES: [&str; 14] = [
    "contact.customFields.totalSpent > 2000.0",
    "let spent = contact.customFields.totalSpent;\n    spent >= 1000.0 && spent <= 5000.0",
    "days_since(contact.customFields.lastPurchaseDate) <= 30",
    "let days = days_since(contact.customFields.lastPurchaseDate);\n    days >= 60 && days <= 180",
    "let last = contact.customFields.get(\"lastPurchaseDate\");\n    if last == () {\n        return false;\n    }\n    \
     days_since(last) > 90",
    "let spent = contact.customFields.get(\"totalSpent\") ?? 0.0;\n    spent > 5000.0",
    "true",
    "contact.region == \"Lombardia\" || contact.customFields.get(\"preferredChannel\") != \"SMS\"",
    "!(contact.customFields.totalSpent < 100)",
    "date(contact.customFields.lastPurchaseDate) < date(\"2026-06-01\")",
    "days_until(contact.customFields.get(\"renewalDate\") ?? \"2099-01-01\") < 14",
    "contact.customFields.get(\"vip\") == true && contact.region != ()",
    "contact.customFields.totalSpent >= 5000",
    "return contact.region < \"M\";",
];

/// Zones from the furthest behind UTC to the furthest ahead.
const ZONES: [chrono_tz::Tz; 4] =
    [chrono_tz::Pacific::Pago_Pago, chrono_tz::UTC, chrono_tz::Europe::Rome, chrono_tz::Pacific::Kiritimati];

/// Each zone's engine and the rules compiled in it.
fn rules_per_zone(dir: &Path) -> Vec<(rhai::Engine, Vec<Arc<Rule>>)> {
    for (i, body) in NATIVE_RULES.iter().enumerate() {
        let text = format!("const LIST = \"L{i}\";\nfn matches(contact) {{\n    {body}\n}}\n");
        std::fs::write(dir.join(format!("r{i:02}.rhai")), text).expect("rule");
    }
    ZONES
        .iter()
        .map(|tz| {
            let engine = segsync::rules::engine::build(*tz);
            let rules: Vec<Arc<Rule>> = (0..NATIVE_RULES.len())
                .map(|i| {
                    let rule = segsync::rules::load_file(&engine, &dir.join(format!("r{i:02}.rhai"))).expect("loads");
                    assert!(rule.native.is_ok(), "{} compiles natively: {:?}", NATIVE_RULES[i], rule.native);
                    Arc::new(rule)
                })
                .collect();
            (engine, rules)
        })
        .collect()
}

/// Dates and timestamps around today, with offsets from −14:00 to +14:00 (and `Z`).
fn dates() -> impl Strategy<Value = serde_json::Value> {
    (-400i64..400, 0u32..24, 0u32..60, -14i32..15, 0..4u8).prop_map(|(days, h, m, offset, form)| {
        let day = chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("date") + chrono::Duration::days(days);
        serde_json::Value::from(match form {
            0 => day.to_string(),
            1 => format!("{day}T{h:02}:{m:02}:00Z"),
            2 => format!("{day}T{h:02}:{m:02}:00{:+03}:{:02}", offset, if offset % 2 == 0 { 0 } else { 30 }),
            _ => format!("{day}T{h:02}:{m:02}:00.123{:+03}:00", offset),
        })
    })
}

/// A JSON value of any kind a custom field might hold, biased to the rules' thresholds.
fn field_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    let numbers = prop_oneof![
        (-10i64..10_000).prop_map(Value::from),
        prop::sample::select(vec![0i64, 100, 1000, 2000, 5000, 5001]).prop_map(Value::from),
        (-10.0f64..10_000.0).prop_map(Value::from),
        prop::sample::select(vec![99.99, 100.0, 999.5, 1000.0, 2000.0, 2000.01, 4999.99, 5000.0, 5000.5])
            .prop_map(Value::from),
    ];
    let dates = dates();
    let texts = prop::sample::select(vec![
        "6800",
        "5000.0",
        "last tuesday",
        "",
        "2026-02-30",
        "SMS",
        "WHATSAPP",
        "Lombardia",
        "Veneto",
        "2026-13-01",
    ])
    .prop_map(Value::from);
    prop_oneof![
        4 => numbers,
        4 => dates,
        2 => texts,
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(json!([1, 2])),
        1 => Just(json!({"nested": 1})),
    ]
}

/// What a field usually holds (its own type), else anything at all.
fn typical(name: &'static str) -> BoxedStrategy<serde_json::Value> {
    use serde_json::Value;
    let usual: BoxedStrategy<Value> = match name {
        "totalSpent" => prop_oneof![
            (0i64..10_000).prop_map(Value::from),
            (0.0f64..10_000.0).prop_map(Value::from),
            prop::sample::select(vec![100.0, 1000.0, 2000.0, 5000.0]).prop_map(Value::from),
            prop::sample::select(vec![100i64, 1000, 2000, 5000]).prop_map(Value::from),
        ]
        .boxed(),
        "preferredChannel" => prop::sample::select(vec!["SMS", "WHATSAPP", "EMAIL"]).prop_map(Value::from).boxed(),
        "vip" => any::<bool>().prop_map(Value::from).boxed(),
        // lastPurchaseDate, renewalDate: dates and timestamps.
        _ => dates().boxed(),
    };
    prop_oneof![4 => usual, 1 => field_value()].boxed()
}

/// A contact as the API returns it, with any field absent, null or of any type.
fn record() -> impl Strategy<Value = serde_json::Value> {
    let custom_names = ["totalSpent", "lastPurchaseDate", "preferredChannel", "renewalDate", "vip"];
    let customs: Vec<_> = custom_names.iter().map(|n| prop::option::weighted(0.85, typical(n))).collect();
    let region = prop::option::weighted(
        0.9,
        prop_oneof![
            6 => prop::sample::select(vec!["Lombardia", "Veneto", "Abruzzo", "Sicilia", "M", "lombardia", "Emilia\tRomagna"])
                .prop_map(serde_json::Value::from),
            1 => field_value(),
        ],
    );
    // customFields: usually an object, sometimes absent, null or not an object at all.
    let shape = prop_oneof![30 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)];
    (customs, region, shape, 0u32..1_000_000).prop_map(move |(values, region, shape, id)| {
        let mut custom = serde_json::Map::new();
        for (name, value) in custom_names.iter().zip(values) {
            if let Some(v) = value {
                custom.insert((*name).to_owned(), v);
            }
        }
        let mut contact = serde_json::Map::new();
        contact.insert("id".into(), format!("cnt-{id:06}").into());
        if let Some(r) = region {
            contact.insert("region".into(), r);
        }
        match shape {
            0 => {
                contact.insert("customFields".into(), custom.into());
            }
            1 => {}
            2 => {
                contact.insert("customFields".into(), serde_json::Value::Null);
            }
            _ => {
                contact.insert("customFields".into(), "not an object".into());
            }
        }
        contact.into()
    })
}

/// `json` parsed as a read judged by `rule` alone parses it: only the fields the rule reads, in a
/// map (`slotted`: false, as a read that also holds rules Rhai judges), or in slots (as a read
/// whose rules are all judged natively).
fn narrowed_as(rule: &Rule, json: &serde_json::Value, slotted: bool) -> ContactRecord {
    let keep = Keep::new(rule.reads().expect("the rule reads named fields"));
    let keep = Arc::new(if slotted { keep.with_layout(rule.read_paths().expect("native paths")) } else { keep });
    let page = bytes::Bytes::from(json.to_string());
    let raw: &serde_json::value::RawValue = serde_json::from_slice(&page).expect("json");
    let record = ContactRecord::from_raw(raw, &page, Some(&keep)).expect("a contact");
    assert!(record.is_narrowed() && record.is_slotted() == slotted);
    record
}

fn narrowed(rule: &Rule, json: &serde_json::Value) -> ContactRecord {
    narrowed_as(rule, json, true)
}

/// How many cases the test runs: each one rule, in one zone, on one day, on one generated record.
const CASES: u32 = 100_000;

// The same verdict, error-ness included, on 100,000 generated cases (14 rules, 4 zones, 60 days):
// a native verdict always equals Rhai's, Rhai's errors are never answered natively, and most
// cases are judged natively (so the comparison is not vacuous).
#[test]
fn native_verdicts_equal_rhai_on_generated_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let zones = rules_per_zone(dir.path());
    let case = (record(), 0usize..ZONES.len(), 0usize..NATIVE_RULES.len(), -30i64..30);
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    let counts = std::cell::RefCell::new([0u64; 3]);
    runner
        .run(&case, |(json, zone, rule, shift)| {
            let (engine, rules) = &zones[zone];
            let rule = &rules[rule];
            let today =
                Date(chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("date") + chrono::Duration::days(shift));
            // Natively on the record as a read of this rule narrows it (slots, and a map: the same
            // answer); Rhai on every field.
            let narrowed = narrowed(rule, &json);
            let native = rule.native.as_ref().expect("native").judge(&narrowed.contact(), today.0);
            let in_map = narrowed_as(rule, &json, false);
            prop_assert_eq!(native, rule.native.as_ref().expect("native").judge(&in_map.contact(), today.0));
            // The facts a removal is recorded with read the same from slots, a map and the whole record.
            let whole: ContactRecord = serde_json::from_str(&json.to_string()).expect("a contact");
            let facts = rule.describe(&rule.facts(&whole));
            prop_assert_eq!(&rule.describe(&rule.facts(&narrowed)), &facts, "{}", json);
            prop_assert_eq!(&rule.describe(&rule.facts(&in_map)), &facts, "{}", json);
            let rhai = rule.rhai_matches(engine, narrowed.into_full(), today);
            let mut counts = counts.borrow_mut();
            match (native, &rhai) {
                (Ok(verdict), Ok(expected)) => {
                    prop_assert_eq!(verdict, *expected, "{} on {} in {}", rule.name, json, ZONES[zone]);
                    counts[0] += 1;
                }
                (Ok(verdict), Err(e)) => {
                    prop_assert!(false, "{} answered {} where Rhai errs ({}) on {}", rule.name, verdict, e, json)
                }
                (Err(_), Ok(_)) => counts[1] += 1,
                (Err(_), Err(_)) => counts[2] += 1,
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let [native, deferred_ok, deferred_err] = *counts.borrow();
    let total = native + deferred_ok + deferred_err;
    assert_eq!(total, u64::from(CASES));
    // Most verdicts are native; the records left to Rhai are mostly those it errs on.
    assert!(
        native * 10 > total * 6,
        "native {native}, deferred {deferred_ok} (ok) + {deferred_err} (errors) of {total}"
    );
    assert!(deferred_err > deferred_ok, "native {native}, deferred {deferred_ok} (ok) + {deferred_err} (errors)");
}

/// `fn list` bodies the native evaluator compiles (a partitioned rule names each contact's list).
const NATIVE_LISTS: [&str; 7] = [
    "\"Region - \" + contact.region",
    "contact.region",
    "contact.customFields.get(\"preferredChannel\")",
    "let channel = contact.customFields.get(\"preferredChannel\") ?? \"none\";\n    \"Channel \" + channel",
    "if contact.region == () {\n        return false;\n    }\n    \"  \" + contact.region + \" \"",
    "if contact.customFields.totalSpent > 3000.0 { \"Spenders - \" + contact.region }",
    "if contact.region == \"Veneto\" { \"North\" } else if contact.customFields.vip { \"VIP\" } else { () }",
];

// A partitioned rule's `fn list`, natively: the same list name (or none) as Rhai's on every
// generated record, Rhai's errors never answered, and most cases answered natively.
#[test]
fn native_lists_equal_rhai_on_generated_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = segsync::rules::engine::build(chrono_tz::Europe::Rome);
    let rules: Vec<Rule> = NATIVE_LISTS
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let path = dir.path().join(format!("p{i}.rhai"));
            std::fs::write(&path, format!("fn list(contact) {{\n    {body}\n}}\n")).expect("rule");
            let rule = segsync::rules::load_file(&engine, &path).expect("loads");
            assert!(rule.native.is_ok(), "{body} compiles natively: {:?}", rule.native);
            rule
        })
        .collect();
    let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("date"));
    let mut runner = TestRunner::new(Config { cases: 20_000, failure_persistence: None, ..Config::default() });
    let counts = std::cell::RefCell::new([0u64; 2]);
    runner
        .run(&(record(), 0usize..rules.len()), |(json, rule)| {
            let rule = &rules[rule];
            let narrowed = narrowed(rule, &json);
            let native = rule.native.as_ref().expect("native").list(&narrowed.contact(), today.0);
            let in_map = narrowed_as(rule, &json, false);
            prop_assert_eq!(&native, &rule.native.as_ref().expect("native").list(&in_map.contact(), today.0));
            let rhai = rule.rhai_list(&engine, narrowed.into_full(), today);
            match (native, &rhai) {
                (Ok(named), Ok(expected)) => {
                    prop_assert_eq!(&named, expected, "{} on {}", rule.name, json);
                    counts.borrow_mut()[0] += 1;
                }
                (Ok(named), Err(e)) => {
                    prop_assert!(false, "{} answered {:?} where Rhai errs ({}) on {}", rule.name, named, e, json)
                }
                (Err(_), _) => counts.borrow_mut()[1] += 1,
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let [native, deferred] = *counts.borrow();
    assert!(native * 10 > (native + deferred) * 6, "native {native}, deferred {deferred}");
}

/// Rhai bodies the native evaluator does not compile, each reading only properties it names, so a
/// read judged by one of them keeps only those fields; two of them `fn list` bodies.
const RHAI_NARROWED: [&str; 7] = [
    "fn matches(contact) { contact.customFields.totalSpent * 1.0 > 3000.0 }",
    "fn matches(contact) { contact.email.ends_with(\"@example.it\") }",
    "fn matches(contact) { let n = contact.region.len(); n > 6 && contact?.city != () }",
    "fn matches(contact) { contact.customFields.keys().len() > 3 }",
    "fn matches(contact) { contact.region.to_upper() == \"LOMBARDIA\" || contact.city in [\"Roma\", \"Bari\"] }",
    "fn list(contact) {\n    let spent = contact.customFields.totalSpent * 1.0;\n    \
     if spent > 3000.0 { \"Spenders - \" + contact.region }\n}",
    "fn list(contact) { if contact.email == () { () } else { contact.email.split(\"@\")[1] } }",
];

/// A generated record with the fields no rule above reads beside it, each sometimes absent.
fn wide_record() -> impl Strategy<Value = serde_json::Value> {
    let text = |values: Vec<&'static str>| prop::option::weighted(0.8, prop::sample::select(values));
    (
        record(),
        text(vec!["ada@example.it", "bo@mail.com", "no-at-sign"]),
        text(vec!["Roma", "Bari", "Milano"]),
        text(vec!["Ada", "Bo"]),
    )
        .prop_map(|(mut json, email, city, first)| {
            for (name, value) in [("email", email), ("city", city), ("firstName", first)] {
                if let Some(v) = value {
                    json[name] = v.into();
                }
            }
            json
        })
}

// Rhai on a record narrowed to the fields its code names judges exactly as Rhai on every field,
// errors included (a property absent from the record is absent from both), and the records are
// really narrowed: fields the rule does not read are gone from what Rhai receives.
#[test]
fn rhai_on_narrowed_records_equals_rhai_on_whole_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = segsync::rules::engine::build(chrono_tz::Europe::Rome);
    let rules: Vec<Rule> = RHAI_NARROWED
        .iter()
        .enumerate()
        .map(|(i, body)| {
            let path = dir.path().join(format!("n{i}.rhai"));
            let list = if body.starts_with("fn list") { String::new() } else { format!("const LIST = \"N{i}\";\n") };
            std::fs::write(&path, format!("{list}{body}\n")).expect("rule");
            let rule = segsync::rules::load_file(&engine, &path).expect("loads");
            assert!(rule.native.is_err(), "{body} is left to Rhai");
            assert!(rule.reads().is_some(), "{body} reads named fields only");
            rule
        })
        .collect();
    let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("date"));
    let mut runner = TestRunner::new(Config { cases: 20_000, failure_persistence: None, ..Config::default() });
    let (narrower, errors) = (std::cell::Cell::new(0u64), std::cell::Cell::new(0u64));
    runner
        .run(&(wide_record(), 0usize..rules.len()), |(json, rule)| {
            let rule = &rules[rule];
            let narrowed = narrowed_as(rule, &json, false);
            let whole: ContactRecord = serde_json::from_str(&json.to_string()).expect("a contact");
            let (kept, all) = (narrowed.parsed_fields(), whole.parsed_fields());
            narrower.set(narrower.get() + u64::from(kept < all));
            if rule.is_partitioned() {
                let got = rule.list_of_record(&engine, &narrowed, today);
                let expected = rule.rhai_list(&engine, whole.into_full(), today);
                errors.set(errors.get() + u64::from(expected.is_err()));
                prop_assert_eq!(got, expected, "{} on {}", rule.name, json);
            } else {
                let got = rule.call_record(&engine, &narrowed, today);
                let expected = rule.rhai_matches(&engine, whole.into_full(), today);
                errors.set(errors.get() + u64::from(expected.is_err()));
                prop_assert_eq!(got, expected, "{} on {}", rule.name, json);
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Most records lost a field to narrowing, and the comparison covered Rhai's errors too.
    assert!(narrower.get() > 15_000, "narrowed {} of 20,000", narrower.get());
    assert!(errors.get() > 1_000 && errors.get() < 19_000, "errors {} of 20,000", errors.get());
}

// `FILTER` on a record read into slots judges exactly as on the whole record: the same verdict,
// the same error message (absent, null, another type, `customFields` not a map, not a date), and
// the same value shown for it.
#[test]
fn filters_judge_slotted_records_as_whole_ones() {
    use segsync::rules::FilterTerm;
    let terms: Vec<FilterTerm> = [
        ("region", "Lombardia"),
        ("email", "a@b.it"),
        ("customFields.totalSpent", "2000"),
        ("customFields.vip", "true"),
        ("customFields.preferredChannel", "SMS"),
        ("customFields.lastPurchaseDate.before", "2026-06-01"),
        ("customFields.renewalDate.before", "2026-12-01"),
    ]
    .iter()
    .map(|(k, v)| FilterTerm::parse(k, v).expect("a filter"))
    .collect();
    let keep = Arc::new(
        Keep::new(terms.iter().map(|t| t.top_field().to_owned())).with_layout(terms.iter().map(|t| t.path().clone())),
    );
    let mut runner = TestRunner::new(Config { cases: 20_000, failure_persistence: None, ..Config::default() });
    let outcomes = std::cell::RefCell::new(std::collections::BTreeSet::new());
    runner
        .run(&(record(), 0usize..terms.len()), |(json, term)| {
            let term = &terms[term];
            let page = bytes::Bytes::from(json.to_string());
            let raw: &serde_json::value::RawValue = serde_json::from_slice(&page).expect("json");
            let slotted = ContactRecord::from_raw(raw, &page, Some(&keep)).expect("a contact");
            prop_assert!(slotted.is_slotted());
            let whole: ContactRecord = serde_json::from_str(&json.to_string()).expect("a contact");
            let verdict = term.judge(&slotted);
            prop_assert_eq!(&verdict, &term.judge(&whole), "{:?} on {}", term, json);
            prop_assert_eq!(term.value_of(&slotted), term.value_of(&whole), "{:?} on {}", term, json);
            outcomes.borrow_mut().insert(match verdict {
                Ok(v) => v.to_string(),
                Err(e) => e.split(": ").nth(1).unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" "),
            });
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Both verdicts and every kind of error were compared.
    let outcomes = outcomes.into_inner();
    for seen in ["true", "false", "the record has", "the field is", "the field holds", "customFields is the"] {
        assert!(outcomes.contains(seen), "{seen:?} never came up: {outcomes:?}");
    }
}

// Rules outside the recognised shapes stay on Rhai and say why; `[rules] native = false` would run
// every rule on Rhai (the escape hatch), which `engine_name` reports.
#[test]
fn unrecognised_rules_keep_the_rhai_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = segsync::rules::engine::build(chrono_tz::Europe::Rome);
    for (i, body) in [
        "let s = contact.customFields.totalSpent * 2;\n    s > 10",
        "contact.region in [\"Lombardia\", \"Veneto\"]",
        "helper(contact)\n}\nfn helper(c) {\n    true",
        "let x = contact.customFields;\n    x.totalSpent > 1.0",
    ]
    .iter()
    .enumerate()
    {
        let path = dir.path().join(format!("u{i}.rhai"));
        std::fs::write(&path, format!("const LIST = \"U{i}\";\nfn matches(contact) {{\n    {body}\n}}\n"))
            .expect("rule");
        let rule = segsync::rules::load_file(&engine, &path).expect("loads");
        assert!(rule.native.is_err(), "{body} is not native");
        assert!(rule.engine_name().starts_with("rhai ("), "{}", rule.engine_name());
        let record: ContactRecord =
            serde_json::from_str(r#"{"id":"c1","region":"Veneto","customFields":{"totalSpent":20.0}}"#).expect("json");
        let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 12, 1).expect("date"));
        assert_eq!(rule.call_matches(&engine, record.full().into_owned(), today), Ok(true), "{body}");
    }
}

/// `segsync ARGS` with the environment `env` added, off the async runtime: exit code and output.
async fn segsync_with(args: &[&str], config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .args(["--log-format", "json"])
        .env(crate::support::KEY_VAR, crate::support::KEY)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("join");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

// The shadow check over HTTP: a native evaluator that answers wrongly (the `native-wrong` test
// fault) is caught on the first record it judges, an ERROR event names the rule, and the run
// changes nothing (verdicts judged before the catch are not trusted); the next run is exact. A
// correct evaluator never trips the check, and `plan` says which engine judges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_check_catches_a_wrong_native_verdict_and_nothing_changes() {
    let sandbox = crate::support::start(crate::support::sandbox_config(2_000)).await;
    let vip = "const LIST = \"VIP\";\nfn matches(contact) {\n    let s = contact.customFields.get(\"totalSpent\") ?? 0.0;\n    s > 5000.0\n}\n";
    let (_dir, config) = crate::support::rules_folder(&sandbox.base_url(), &[("vip", vip)], "");
    let members = || {
        sandbox.with_store(|s| s.lists().iter().filter(|l| l.name == "VIP").map(|l| l.contact_count()).sum::<usize>())
    };
    let expected = crate::support::ids_where(&sandbox, |c| crate::support::spent(c).unwrap_or(0.0) > 5000.0).len();
    assert!(expected > 10);

    let (code, out) = segsync_with(&["sync", "vip"], &config, &[("SEGSYNC_FAULT", "native-wrong:vip")]).await;
    assert_eq!(code, 1, "{out}");
    let differs: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "native verdict differs")
        .collect();
    assert_eq!(differs.len(), 1, "one ERROR per rule, not one per contact: {out}");
    assert_eq!(differs[0]["level"], "ERROR");
    assert_eq!(differs[0]["rule"], "vip");
    assert!(out.contains("the native evaluator disagreed with Rhai during this run"), "{out}");
    assert_eq!(members(), 0, "nothing was added on verdicts judged before the catch");

    let (code, out) = segsync_with(&["plan", "vip"], &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("judged by native"), "{out}");
    let (code, out) = segsync_with(&["sync", "vip"], &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("native verdict differs"), "a correct evaluator never trips the check: {out}");
    assert_eq!(members(), expected, "the list holds exactly the rule's contacts");
    sandbox.shutdown().await;
}

// A partitioned rule's native `fn list` is shadow-checked as `matches` is: a wrong answer is one
// ERROR and the run creates and fills nothing; `plan` and `explain` say the rule is judged natively;
// a correct run fills one list per region with exactly that region's contacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_fn_list_is_shadow_checked_and_explained() {
    let sandbox = crate::support::start(crate::support::sandbox_config(2_000)).await;
    let geo = "fn list(contact) {\n    \"Region - \" + contact.region\n}\n";
    let (_dir, config) = crate::support::rules_folder(&sandbox.base_url(), &[("geo", geo)], "");
    let region_lists = || lists(&sandbox).into_iter().filter(|(name, _)| name.starts_with("Region - ")).count();

    let (code, out) = segsync_with(&["sync", "geo"], &config, &[("SEGSYNC_FAULT", "native-wrong:geo")]).await;
    assert_eq!(code, 1, "{out}");
    let differs = out.lines().filter(|l| l.contains("\"native verdict differs\"")).count();
    assert_eq!(differs, 1, "one ERROR, not one per contact: {out}");
    assert_eq!(region_lists(), 0, "no list was created or filled on answers judged before the catch");

    let (code, out) = segsync_with(&["plan", "geo"], &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("judged by native"), "{out}");
    let contact = crate::support::ids_where(&sandbox, |c| c.region.is_some()).remove(0);
    let (code, out) = segsync_with(&["explain", "geo", &contact], &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("engine") && l.trim_end().ends_with("native")), "{out}");

    let (code, out) = segsync_with(&["sync", "geo"], &config, &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("native verdict differs"), "{out}");
    let filled = lists(&sandbox);
    assert!(region_lists() > 5, "{:?}", filled.keys());
    for (name, members) in filled.iter().filter(|(name, _)| name.starts_with("Region - ")) {
        let region = name.trim_start_matches("Region - ").to_owned();
        let expected = crate::support::ids_where(&sandbox, |c| c.region.as_deref() == Some(region.as_str()));
        assert_eq!(members, &expected, "{name} holds exactly that region's contacts");
    }
    sandbox.shutdown().await;
}

/// Every list on `sandbox` by name, with its members' ids (sorted).
fn lists(sandbox: &segsync_sandbox::Sandbox) -> std::collections::BTreeMap<String, Vec<String>> {
    sandbox.with_store(|s| {
        let named: Vec<(String, String)> = s.lists().iter().map(|l| (l.name.clone(), l.id.clone())).collect();
        named.into_iter().map(|(name, id)| (name, s.member_ids(&id).expect("members"))).collect()
    })
}

// The shipped rules synced three ways on three copies of the same data: natively on all cores (4
// pages in flight, judged by a worker per core), natively one page at a time, and through Rhai alone. Every list holds
// exactly the same contacts each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_parallel_judging_give_the_lists_rhai_gives_on_one_thread() {
    let mut outcomes = Vec::new();
    for (how, extra) in [
        ("native, 4 pages at once", "[api]\nconcurrency = 4\n"),
        ("native, one page at a time", "[api]\nconcurrency = 1\n"),
        ("rhai, one page at a time", "[api]\nconcurrency = 1\n[rules]\nnative = false\n"),
    ] {
        let sandbox = crate::support::start(crate::support::sandbox_config(5_000)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        crate::support::copy_shipped_rules(dir.path(), false, |t| t);
        let (api, rules) = extra.split_once("[rules]\n").map_or((extra, ""), |(a, r)| (a, r));
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "{api}base_url = \"{}\"\nkey_env = \"{}\"\nplan = \"unlimited\"\n[rules]\ntime_zone = \"Europe/Rome\"\n{rules}",
                sandbox.base_url(),
                crate::support::KEY_VAR
            ),
        )
        .expect("config");
        let (code, out) = segsync_with(&["plan"], &config, &[]).await;
        assert_eq!(code, 0, "{how}: {out}");
        let natively = out.matches("judged by native").count();
        assert_eq!(natively, if how.starts_with("native") { 5 } else { 0 }, "{how}: {out}");
        let (code, out) = segsync_with(&["sync"], &config, &[]).await;
        assert_eq!(code, 0, "{how}: {out}");
        outcomes.push((how, lists(&sandbox)));
        sandbox.shutdown().await;
    }
    let (_, reference) = &outcomes[2];
    assert_eq!(reference.len(), 5, "{:?}", reference.keys());
    assert!(reference.values().all(|members| !members.is_empty()));
    for (how, lists) in &outcomes[..2] {
        assert!(lists == reference, "{how} differs from Rhai on one thread");
    }
}
