//! Rule-engine micro-benchmark (release, one core): the cost of turning API JSON into what rules
//! read, and of one contact-rule evaluation for each shipped rule, next to the same predicates as
//! native Rust closures. Prints figures and ratios; asserts nothing.
//!
//! Run: `cargo bench --bench rules`

// A benchmark reports by printing.
#![allow(clippy::print_stdout)]

use std::hint::black_box;

// The same allocator as the segsync binary, so this measures what the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use segsync::contact::ContactRecord;
use segsync::rules::{self, Date};

fn main() {
    let today = chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("date");
    let n = 200_000;
    // Demo contacts exactly as the sandbox serves them.
    let store = segsync_sandbox::generate(n, 42, today);
    let texts: Vec<String> =
        store.contact_ids().map(|id| serde_json::to_string(store.get(id).expect("live")).expect("json")).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    println!("{n} contacts, {:.0} bytes of JSON each on average", bytes as f64 / n as f64);

    // Best of three: the first round also pays for the heap's first page faults, which a daemon
    // streaming pages through a warm heap does not.
    let best_of_3 = |f: &dyn Fn()| {
        (0..3)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e6 / n as f64
            })
            .fold(f64::MAX, f64::min)
    };
    let convert = best_of_3(&|| {
        let records: Vec<ContactRecord> = texts.iter().map(|t| serde_json::from_str(t).expect("record")).collect();
        black_box(records);
    });
    let parse_only = best_of_3(&|| {
        let values: Vec<serde_json::Value> = texts.iter().map(|t| serde_json::from_str(t).expect("value")).collect();
        black_box(values);
    });
    let records: Vec<ContactRecord> = texts.iter().map(|t| serde_json::from_str(t).expect("record")).collect();
    let values: Vec<serde_json::Value> = texts.iter().map(|t| serde_json::from_str(t).expect("value")).collect();
    println!(
        "JSON → rule record (parse + convert): {convert:.2} µs/contact (target ≤ 3); JSON → serde_json::Value alone: {parse_only:.2} µs"
    );

    let engine = rules::engine::build(chrono_tz::Europe::Rome);
    let (set, errors) = rules::load_dir(&engine, std::path::Path::new("rules"));
    assert!(errors.is_empty(), "{errors:?}");
    let day = Date(today);
    type Native = Box<dyn Fn(&serde_json::Value) -> bool>;
    let native: Vec<(&str, Native)> = vec![
        ("geo-emilia-romagna", Box::new(|c| c["region"] == "Emilia-Romagna")),
        ("geo-lombardia", Box::new(|c| c["region"] == "Lombardia")),
        ("geo-veneto", Box::new(|c| c["region"] == "Veneto")),
        (
            "reengagement-90d",
            Box::new(move |c| {
                let d = chrono::NaiveDate::parse_from_str(
                    c["customFields"]["lastPurchaseDate"].as_str().unwrap_or(""),
                    "%Y-%m-%d",
                );
                d.is_ok_and(|d| (today - d).num_days() > 90)
            }),
        ),
        ("vip", Box::new(|c| c["customFields"]["totalSpent"].as_f64().is_some_and(|s| s > 5000.0))),
    ];
    println!(
        "{:<20} {:>10} {:>13} {:>13} {:>13} {:>9}",
        "rule", "Rhai µs", "segsync's", "hand-written", "Rhai ÷", "matched"
    );
    println!("{:<20} {:>10} {:>13} {:>13} {:>13} {:>9}", "", "", "native µs", "Rust µs", "native", "");
    for (name, f) in &native {
        let rule = set.get(&segsync::ids::RuleName::from(*name)).expect("rule");
        let native_matched = values.iter().filter(|v| f(v)).count();
        let mut per_engine = Vec::new();
        for on in [false, true] {
            rules::native::set_enabled(on);
            let matched = records.iter().filter(|r| rule.evaluate(&engine, r, day).expect("evaluates")).count();
            assert_eq!(matched, native_matched, "{name} (native {on}): segsync and the hand-written closure disagree");
            per_engine.push(best_of_3(&|| {
                for r in &records {
                    black_box(rule.evaluate(&engine, r, day).expect("evaluates"));
                }
            }));
        }
        let hand = best_of_3(&|| {
            for v in &values {
                black_box(f(v));
            }
        });
        let (rhai, ours) = (per_engine[0], per_engine[1]);
        println!("{name:<20} {rhai:>10.3} {ours:>13.3} {hand:>13.3} {:>13.1} {native_matched:>9}", rhai / ours);
    }
}
