//! Suppression: a rule with `MODE = "suppress"` fills no list; the contacts its `matches` selects
//! (opt-outs, erasure requests) must be in none of the lists it applies to (`SUPPRESS_FROM`, or
//! every rule). At the start of a pass each suppression rule reads its `FILTER` once and judges
//! every contact returned; `plan` then keeps its contacts out of every list it applies to:
//! - a suppressed contact is never added, and a member is removed at once, without `REMOVE_AFTER`
//!   (withdrawn consent takes effect at once), under the mass-removal guard like any removal;
//! - a contact the suppression rule cannot judge is not added (privacy first) and is not removed
//!   on that error (it fails closed for adds and open for removals);
//! - a suppression rule whose read fails changes nothing in the lists it applies to.

use std::collections::HashSet;
use std::sync::Arc;

use super::judge::fold_pages;
use super::{Reconciler, RuleReport};
use crate::contact::ContactRecord;
use crate::gateway::{Meter, Records, ScanQuery};
use crate::ids::ContactId;
use crate::outcome::Outcome;
use crate::rules::{Date, Rule};

/// What one suppression rule judged this pass.
#[derive(Debug, Default)]
pub struct Suppressed {
    /// The contacts its FILTER and `matches` select.
    pub ids: HashSet<ContactId>,
    /// The contacts it could not judge.
    pub unjudged: HashSet<ContactId>,
    /// Contacts read.
    pub scanned: u64,
    pub first_error: Option<String>,
}

/// One suppression rule and what it judged, or why it could not.
pub(super) struct Suppressor {
    pub rule: Arc<Rule>,
    pub judged: Result<Arc<Suppressed>, String>,
}

/// The suppressions that apply to one rule's lists.
#[derive(Debug, Default, Clone)]
pub struct Suppression {
    /// By suppression rule name.
    pub by: Vec<(String, Arc<Suppressed>)>,
    /// A suppression rule that could not be read: the list changes nothing.
    pub failed: Option<String>,
}

impl Suppression {
    /// Whether `id` must not be added: suppressed, or not judged by a suppression rule.
    pub fn blocks_add(&self, id: &ContactId) -> bool {
        self.by.iter().any(|(_, s)| s.ids.contains(id) || s.unjudged.contains(id))
    }
}

impl Reconciler {
    /// Judges every suppression rule once for the pass.
    pub(super) async fn suppressors(&self, rules: &[Arc<Rule>], today: Date, meter: &Arc<Meter>) -> Vec<Suppressor> {
        let mut out = Vec::new();
        for rule in rules {
            let judged = self.judge_suppression(rule, today, meter).await.map(Arc::new);
            out.push(Suppressor { rule: rule.clone(), judged });
        }
        out
    }

    async fn judge_suppression(&self, rule: &Arc<Rule>, today: Date, meter: &Arc<Meter>) -> Result<Suppressed, String> {
        let (engine, work_rule) = (self.engine.clone(), rule.clone());
        let query = ScanQuery { filters: rule.filter_query(), ..ScanQuery::default() };
        let scan =
            self.gateway.metered(meter.clone()).scan_with(&query, move |records: &mut Records<'_, ContactRecord>| {
                let mut part = Suppressed::default();
                for record in records.by_ref() {
                    match work_rule.evaluate(&engine, &record, today) {
                        Ok(true) => {
                            part.ids.insert(record.id);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            part.first_error.get_or_insert_with(|| format!("contact {}: {e}", record.id));
                            part.unjudged.insert(record.id);
                        }
                    }
                }
                part.scanned = records.fresh() as u64;
                part
            });
        let mut all = Suppressed::default();
        fold_pages(scan, &self.cancel, |part| {
            all.scanned += part.scanned;
            all.ids.extend(part.ids);
            all.unjudged.extend(part.unjudged);
            all.first_error = all.first_error.take().or(part.first_error);
        })
        .await
        .map_err(|e| format!("the suppression rule {} could not read its contacts: {e}", rule.name))?;
        Ok(all)
    }
}

/// The suppressions that apply to `rule`.
pub(super) fn for_rule(suppressors: &[Suppressor], rule: &Rule) -> Suppression {
    let mut out = Suppression::default();
    for s in suppressors.iter().filter(|s| s.rule.suppresses(rule)) {
        match &s.judged {
            Ok(judged) => out.by.push((s.rule.name.to_string(), judged.clone())),
            Err(why) => {
                out.failed.get_or_insert_with(|| format!("{why}; nothing changed while it cannot be judged"));
            }
        }
    }
    out
}

/// A suppression rule's run, as its report: what it selected and could not judge.
pub(super) fn report(s: &Suppressor) -> RuleReport {
    let mut report = RuleReport::failed(s.rule.clone(), String::new());
    match &s.judged {
        Ok(judged) => {
            report.outcome = Outcome::Ok;
            report.detail = None;
            report.scanned = judged.scanned;
            report.matched = judged.ids.len() as u64;
            report.eval_errors = judged.unjudged.len() as u64;
            report.first_error = judged.first_error.clone();
        }
        Err(why) => report.detail = Some(why.clone()),
    }
    report
}
