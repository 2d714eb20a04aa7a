//! `check --sample N`: the live preview before a rule goes live. Reads about N contacts from the
//! gateway (the bundled sandbox by default) and runs every rule on them: per rule, what it matched,
//! the fields no contact had, the FILTER values no contact held, its evaluation errors. Writes
//! nothing: no list, no state.

use std::sync::Arc;

use crate::config::Config;
use crate::connection::Connection;
use crate::contact::ContactRecord;
use crate::gateway::{Records, ScanQuery};
use crate::rules::{ABSENT_MIN_JUDGED, Date, Finding, Learned, Observed, Rule, thousands};

/// One rule on the sample.
#[derive(Debug, Default, Clone)]
struct Tally {
    matched: u64,
    errors: u64,
    first_error: Option<String>,
    observed: Observed,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.matched += other.matched;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.observed.merge(other.observed);
    }
}

/// One rule's preview, as `check` prints it.
#[derive(Debug, serde::Serialize)]
pub(super) struct RulePreview {
    pub rule: String,
    #[serde(skip)]
    pub path: std::path::PathBuf,
    pub list: String,
    pub matched: u64,
    /// `matched` ÷ the contacts read.
    pub share: f64,
    pub eval_errors: u64,
    pub first_eval_error: Option<String>,
    pub warnings: Vec<Finding>,
}

/// What the sample showed.
#[derive(Debug, serde::Serialize)]
pub(super) struct Preview {
    pub contacts: u64,
    pub api_requests: u64,
    pub rules: Vec<RulePreview>,
}

/// Reads about `n` contacts and judges every rule on each, as a pass would (FILTER, then `matches`).
pub(super) async fn preview(
    config: &Config,
    engine: rhai::Engine,
    rules: Vec<Arc<Rule>>,
    n: u64,
) -> anyhow::Result<Preview> {
    let connection = Connection::open(config, None).await?;
    let today = Date(chrono::Utc::now().with_timezone(&config.time_zone).date_naive());
    let (engine, work_rules) = (Arc::new(engine), Arc::new(rules.clone()));
    let learned: Vec<Learned> = rules.iter().map(|r| Learned::of(r)).collect();
    let mut scan = connection.gateway.scan_with(
        &ScanQuery { sample: Some(n), ..ScanQuery::default() },
        move |records: &mut Records<'_, ContactRecord>| {
            let mut tallies = vec![Tally::default(); work_rules.len()];
            for record in records.by_ref() {
                let record = &record;
                for ((rule, tally), learned) in work_rules.iter().zip(&mut tallies).zip(&learned) {
                    let passes = rule.passes_filter(record);
                    rule.observe(record, passes, &mut tally.observed, learned);
                    if !passes {
                        continue;
                    }
                    match rule.call_matches(&engine, record.full().into_owned(), today) {
                        Ok(true) => tally.matched += 1,
                        Ok(false) => {}
                        Err(e) => {
                            tally.errors += 1;
                            tally.first_error.get_or_insert_with(|| format!("contact {}: {e}", record.id));
                        }
                    }
                }
            }
            (records.fresh() as u64, tallies)
        },
    );
    let mut contacts = 0;
    let mut tallies = vec![Tally::default(); rules.len()];
    let read = async {
        while let Some(page) = scan.next().await {
            let (read, page) = page?.records;
            contacts += read;
            for (all, part) in tallies.iter_mut().zip(page) {
                all.merge(part);
            }
        }
        anyhow::Ok(())
    };
    let read = read.await;
    let api_requests = connection.gateway.usage().total_requests();
    connection.close().await;
    read?;
    let min_judged = ABSENT_MIN_JUDGED.min(contacts);
    let rules = rules
        .iter()
        .zip(tallies)
        .map(|(rule, t)| RulePreview {
            rule: rule.name.to_string(),
            path: rule.path.clone(),
            list: rule.list.clone(),
            matched: t.matched,
            share: if contacts == 0 { 0.0 } else { t.matched as f64 / contacts as f64 },
            eval_errors: t.errors,
            first_eval_error: t.first_error,
            warnings: rule.findings(&t.observed, min_judged),
        })
        .collect();
    Ok(Preview { contacts, api_requests, rules })
}

/// The preview as people read it (its warnings are printed with the other problems).
pub(super) fn print(p: &Preview) {
    say!("sample: {} contact(s) read in {} API request(s); nothing written", thousands(p.contacts), p.api_requests);
    for r in &p.rules {
        say!(
            "  {} → {:?}: matched {} ({:.1} %), eval errors {}",
            r.rule,
            r.list,
            thousands(r.matched),
            r.share * 100.0,
            thousands(r.eval_errors)
        );
        if let Some(e) = &r.first_eval_error {
            say!("    first evaluation error: {e}");
        }
    }
}
