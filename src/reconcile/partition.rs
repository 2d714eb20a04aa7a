//! Stage 0, `partition`: a rule with `fn list(contact)` becomes, for the stages that follow, one
//! ordinary rule per list, named `rule:LIST` (its own binding, cache, removal grace and runs). Its
//! lists are those it filled before (the state's bindings) and those its contacts name now (one
//! read of its FILTER, `fn list` evaluated on each contact). So a contact whose value changes
//! leaves the old list and joins the new one in the same pass, and a list no contact names any
//! more is still reconciled: emptied under the guards, never deleted. A rule that would fill more
//! than its `MAX_LISTS` lists changes nothing, and says how many and which.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::judge::fold_pages;
use super::{Reconciler, RuleReport};
use crate::contact::ContactRecord;
use crate::gateway::{Meter, ScanQuery};
use crate::rules::{Date, Lists, Rule, thousands};

/// List names kept per rule beyond its `MAX_LISTS` while counting: enough to say "more than".
const NAMES_BEYOND_MAX: usize = 1_000;

/// The rules a pass runs once partitioned rules are split into their lists.
pub(super) struct Partitioned {
    /// Every ordinary rule, and one per list of each partitioned rule.
    pub rules: Vec<Arc<Rule>>,
    /// Partitioned rules that change nothing this pass (too many lists, a failed read), reported.
    pub refused: Vec<RuleReport>,
}

impl Reconciler {
    /// Splits each partitioned rule of `rules` into its lists; the reads are counted on `meter`.
    /// `loaded` are every rule the caller runs from (the daemon's or the folder's): a list another
    /// of them fills by `LIST` is not taken over, whether or not that rule runs in this pass.
    pub(super) async fn partition(
        &self,
        rules: &[Arc<Rule>],
        loaded: &[Arc<Rule>],
        today: Date,
        meter: &Arc<Meter>,
    ) -> Partitioned {
        let mut out = Partitioned { rules: Vec::new(), refused: Vec::new() };
        for rule in rules {
            let Lists::Partitioned { max } = rule.lists else {
                out.rules.push(rule.clone());
                continue;
            };
            let max = max.unwrap_or(self.max_lists_per_rule);
            // Two rules filling one list would undo each other's work, as two LISTs of one name would.
            let taken = |list: &String| rules.iter().chain(loaded).find(|r| r.fills_its_list() && &r.list == list);
            match self.lists_of(rule, max, today, meter).await {
                Ok(lists) => match lists.iter().find_map(|l| taken(l).map(|other| (l, other))) {
                    Some((list, other)) => out.refused.push(RuleReport::failed(
                        rule.clone(),
                        format!(
                            "fn list names {list:?}, which is the LIST of rule {} ({}); each list belongs to one \
                             rule; nothing changed",
                            other.name,
                            other.path.display()
                        ),
                    )),
                    None => out.rules.extend(lists.iter().map(|list| Arc::new(rule.partition(list)))),
                },
                Err(detail) => out.refused.push(RuleReport::failed(rule.clone(), detail)),
            }
        }
        out
    }

    /// The lists of a partitioned rule this pass: those it filled before and those its contacts
    /// name now, or why it changes nothing.
    async fn lists_of(
        &self,
        rule: &Arc<Rule>,
        max: u64,
        today: Date,
        meter: &Arc<Meter>,
    ) -> Result<Vec<String>, String> {
        let (state, account, name) = (self.state.clone(), self.account.clone(), rule.name.clone());
        let known = tokio::task::spawn_blocking(move || state.partition_lists(&account, &name))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| format!("its lists could not be recalled: {e}"))?;
        let (engine, work_rule) = (self.engine.clone(), rule.clone());
        // A native `fn list` reads only its fields: the records keep only those.
        let keep = super::judge::keep([(&**rule, &[][..])]);
        let query = ScanQuery { filters: rule.filter_query(), keep, ..ScanQuery::default() };
        let scan = self.gateway.metered(meter.clone()).scan_with(&query, move |records: Vec<ContactRecord>| {
            let mut named: BTreeMap<String, u64> = BTreeMap::new();
            for record in records.into_iter().filter(|r| work_rule.passes_filter(r)) {
                // A contact `fn list` cannot judge names no list here; its list's run counts the error.
                if let Ok(Some(list)) = work_rule.list_of_record(&engine, &record, today) {
                    *named.entry(list).or_default() += 1;
                }
            }
            named
        });
        let bound = max as usize + NAMES_BEYOND_MAX;
        let mut named: BTreeMap<String, u64> = BTreeMap::new();
        let mut more = false;
        fold_pages(scan, &self.cancel, |page| {
            for (list, n) in page {
                if named.len() < bound || named.contains_key(&list) {
                    *named.entry(list).or_default() += n;
                } else {
                    more = true;
                }
            }
        })
        .await
        .map_err(|e| format!("reading its contacts to find its lists failed: {e}"))?;
        let lists: BTreeSet<String> = known.into_iter().chain(named.keys().cloned()).collect();
        if lists.len() as u64 > max {
            let mut common: Vec<(&String, &u64)> = named.iter().collect();
            common.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let sample: Vec<String> =
                common.iter().take(5).map(|(l, n)| format!("{l:?} ({})", thousands(**n))).collect();
            return Err(format!(
                "fn list names {}{} lists, more than MAX_LISTS {max} (or [rules] max_lists_per_rule); nothing changed. \
                 Most contacts: {}",
                thousands(lists.len() as u64),
                if more { " or more" } else { "" },
                sample.join(", ")
            ));
        }
        Ok(lists.into_iter().collect())
    }
}

/// A partitioned rule's run as one report, from its lists' reports: the sums, the worst outcome
/// (failed, interrupted, partial, held, ok), and which lists. Its run record is what the daemon's
/// health, `status` and the overdue check read for the rule file.
pub(super) fn summary(parent: &Arc<Rule>, lists: &[&RuleReport]) -> RuleReport {
    use crate::outcome::Outcome;
    let rank = |o: Outcome| match o {
        Outcome::Failed => 4,
        Outcome::Interrupted => 3,
        Outcome::Partial => 2,
        Outcome::Held => 1,
        Outcome::Ok => 0,
    };
    let mut report = RuleReport::failed(parent.clone(), String::new());
    report.outcome = lists.iter().map(|r| r.outcome).max_by_key(|o| rank(*o)).unwrap_or(Outcome::Ok);
    for r in lists {
        report.members_before += r.members_before;
        report.scanned = report.scanned.max(r.scanned);
        report.matched += r.matched;
        report.eval_errors = report.eval_errors.max(r.eval_errors);
        report.first_error = report.first_error.take().or_else(|| r.first_error.clone());
        report.added += r.added;
        report.removed += r.removed;
        report.usage.absorb(&r.usage);
        report.duration = report.duration.max(r.duration);
        report.read = r.read;
        report.members_from = r.members_from;
    }
    let names: Vec<String> = lists.iter().map(|r| format!("{:?} {}", r.rule.list, r.outcome)).collect();
    report.detail = Some(format!("{} list(s): {}", lists.len(), names.join(", ")));
    report
}
