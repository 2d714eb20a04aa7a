//! Stage 0, `partition`: a rule with `fn list(contact)` becomes, for the stages that follow, one
//! ordinary rule per list, named `rule:LIST` (its own binding, cache, removal grace and runs). Its
//! lists are those it filled before (the state's bindings) and those its contacts name now: the
//! pass's own read counts the names it has no part for ([`Unfolding`]), and [`unfold`] turns them
//! into a second round's parts (on a first sync, every list). So a contact
//! whose value changes leaves the old list and joins the new one in the same pass, and a list no
//! contact names any more is still reconciled: emptied under the guards, never deleted. A rule
//! that would fill more than its `MAX_LISTS` lists changes nothing, and says how many and which.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::judge::fold_pages;
use super::read::Candidates;
use super::{Flow, PassRequest, Reconciler, RuleReport};
use crate::contact::ContactRecord;
use crate::gateway::{Meter, Records, ScanQuery};
use crate::rules::{Date, Lists, Rule, thousands};

/// List names kept per rule beyond its `MAX_LISTS` while counting: enough to say "more than".
const NAMES_BEYOND_MAX: usize = 1_000;

/// The rules a pass runs once partitioned rules are split into their lists.
pub(super) struct Partitioned {
    /// Every ordinary rule, and one per list of each partitioned rule.
    pub rules: Vec<Arc<Rule>>,
    /// Partitioned rules that change nothing this pass (too many lists, a failed read), reported.
    pub refused: Vec<RuleReport>,
    /// Partitioned rules whose lists are known from earlier passes: their lists run now, and the
    /// pass's read tells which new lists their contacts name.
    pub unfolding: Vec<Unfolding>,
}

/// A partitioned rule that filled lists before. Its known lists run without a read of their own;
/// the candidate read counts the lists its contacts name that none of them is, and those lists
/// run in a second round of the same pass (or the rule changes nothing, when they are too many).
#[derive(Clone)]
pub(super) struct Unfolding {
    pub parent: Arc<Rule>,
    pub known: BTreeSet<String>,
    pub max: u64,
}

/// The lists a read's contacts name, with how many contacts name each: at most `max` +
/// [`NAMES_BEYOND_MAX`] names, and whether there were more.
#[derive(Debug, Clone, Default)]
pub(super) struct Named {
    pub lists: BTreeMap<String, u64>,
    pub more: bool,
}

impl Named {
    /// Counts `n` contacts naming `list`, within `bound` names.
    pub fn add(&mut self, list: &str, n: u64, max: u64) {
        if let Some(count) = self.lists.get_mut(list) {
            *count += n;
        } else if self.lists.len() < max as usize + NAMES_BEYOND_MAX {
            self.lists.insert(list.to_owned(), n);
        } else {
            self.more = true;
        }
    }

    pub fn merge(&mut self, other: Named, max: u64) {
        self.more |= other.more;
        for (list, n) in other.lists {
            self.add(&list, n, max);
        }
    }
}

impl Reconciler {
    /// Splits each partitioned rule of `rules` into the lists it filled before, which run now; the
    /// lists its contacts name that it has none for yet are learnt from the pass's read
    /// ([`Unfolding`]) and run in a second round. `loaded` are every rule the caller runs from (the
    /// daemon's or the folder's): a list another of them fills by `LIST` is not taken over, whether
    /// or not that rule runs in this pass.
    pub(super) async fn partition(&self, rules: &[Arc<Rule>], loaded: &[Arc<Rule>]) -> Partitioned {
        let mut out = Partitioned { rules: Vec::new(), refused: Vec::new(), unfolding: Vec::new() };
        for rule in rules {
            let Lists::Partitioned { max } = rule.lists else {
                out.rules.push(rule.clone());
                continue;
            };
            let max = max.unwrap_or(self.max_lists_per_rule);
            let lists = self.known_lists(rule).await.and_then(|known| {
                let lists = checked(max, rules, loaded, &known, &Named::default());
                if lists.is_ok() {
                    out.unfolding.push(Unfolding { parent: rule.clone(), known, max });
                }
                lists
            });
            match lists {
                Ok(lists) => out.rules.extend(lists.iter().map(|list| Arc::new(rule.partition(list)))),
                Err(detail) => out.refused.push(RuleReport::failed(rule.clone(), detail)),
            }
        }
        out
    }

    /// The lists a partitioned rule filled before (its partitions' bindings).
    async fn known_lists(&self, rule: &Arc<Rule>) -> Result<BTreeSet<String>, String> {
        let (state, account, name) = (self.state.clone(), self.account.clone(), rule.name.clone());
        tokio::task::spawn_blocking(move || state.partition_lists(&account, &name))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map(|lists| lists.into_iter().collect())
            .map_err(|e| format!("its lists could not be recalled: {e}"))
    }

    /// The lists a partitioned rule's contacts name now: one read of its FILTER, `fn list`
    /// evaluated on each contact.
    pub(super) async fn named_lists(
        &self,
        rule: &Arc<Rule>,
        max: u64,
        today: Date,
        meter: &Arc<Meter>,
    ) -> Result<Named, String> {
        let (engine, work_rule) = (self.engine.clone(), rule.clone());
        // A native `fn list` reads only its fields: the records keep only those.
        let keep = super::judge::keep([(&**rule, &[][..])]);
        let query = ScanQuery { filters: rule.filter_query(), keep, ..ScanQuery::default() };
        let scan =
            self.gateway.metered(meter.clone()).scan_with(&query, move |records: &mut Records<'_, ContactRecord>| {
                let mut named = Named::default();
                for record in records.into_iter().filter(|r| work_rule.passes_filter(r)) {
                    // A contact `fn list` cannot judge names no list here; its list's run counts the error.
                    if let Ok(Some(list)) = work_rule.list_of_record(&engine, &record, today) {
                        named.add(&list, 1, max);
                    }
                }
                named
            });
        let mut named = Named::default();
        fold_pages(scan, &self.cancel, |page| named.merge(page, max)).await.map_err(|e| e.to_string())?;
        Ok(named)
    }
}

/// What the read found of each unfolding rule's new lists, before anything is planned: the parts
/// to run in a second round, or (too many lists, a list another rule fills, a failed read) the
/// rule refused whole, its known lists' runs dropped unplanned so that nothing changes.
pub(super) fn unfold(
    mut candidates: Vec<Flow<Candidates>>,
    unfolding: &[Unfolding],
    named: super::read::NamedLists,
    req: &PassRequest,
) -> (Vec<Flow<Candidates>>, Vec<Arc<Rule>>, Vec<RuleReport>) {
    let (mut unfolded, mut refused) = (Vec::new(), Vec::new());
    for (u, named) in unfolding.iter().zip(named) {
        let lists = named
            .map_err(|e| format!("reading its contacts to find its lists failed: {e}"))
            .and_then(|named| checked(u.max, &req.rules, &req.loaded, &u.known, &named));
        match lists {
            Ok(lists) => unfolded
                .extend(lists.iter().filter(|l| !u.known.contains(*l)).map(|list| Arc::new(u.parent.partition(list)))),
            Err(detail) => {
                candidates.retain(|flow| {
                    let rule = match flow {
                        Ok(c) => &c.members.bound.job.rule,
                        Err(stopped) => &stopped.bound.job.rule,
                    };
                    rule.file_rule() != &u.parent.name
                });
                refused.push(RuleReport::failed(u.parent.clone(), detail));
            }
        }
    }
    (candidates, unfolded, refused)
}

/// A partitioned rule's lists, `known` and `named`, or why it changes nothing: more than `max`
/// lists, or a list that is another rule's `LIST` (two rules filling one list would undo each
/// other's work, as two LISTs of one name would).
pub(super) fn checked(
    max: u64,
    rules: &[Arc<Rule>],
    loaded: &[Arc<Rule>],
    known: &BTreeSet<String>,
    named: &Named,
) -> Result<Vec<String>, String> {
    let lists: BTreeSet<&String> = known.iter().chain(named.lists.keys()).collect();
    if lists.len() as u64 > max {
        let mut common: Vec<(&String, &u64)> = named.lists.iter().collect();
        common.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let sample: Vec<String> = common.iter().take(5).map(|(l, n)| format!("{l:?} ({})", thousands(**n))).collect();
        return Err(format!(
            "fn list names {}{} lists, more than MAX_LISTS {max} (or [rules] max_lists_per_rule); nothing changed. \
             Most contacts: {}",
            thousands(lists.len() as u64),
            if named.more { " or more" } else { "" },
            sample.join(", ")
        ));
    }
    let taken = |list: &String| rules.iter().chain(loaded).find(|r| r.fills_its_list() && &r.list == list);
    if let Some((list, other)) = lists.iter().find_map(|l| taken(l).map(|other| (l, other))) {
        return Err(format!(
            "fn list names {list:?}, which is the LIST of rule {} ({}); each list belongs to one rule; nothing changed",
            other.name,
            other.path.display()
        ));
    }
    Ok(lists.into_iter().cloned().collect())
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
