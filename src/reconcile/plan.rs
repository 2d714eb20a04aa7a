//! Stage 6, `plan`: the pure heart of reconciling, from what the rule said about each contact to
//! the changes a list needs, and the guards that hold or refuse them. `plan` has no I/O, no clock
//! and no randomness; the stage runs it on a blocking thread (sorting a million ids is real work).
//!
//! Invariants: a contact leaves a list only because its own member record evaluated to `false`;
//! a contact the rule errored on is neither added nor removed; output order is sorted.

use super::grace::Grace;
use super::settle::Judged;
use super::suppress::Suppression;
use super::{Flow, PassRequest, ReconcileError, Reconciler, Stopped};
use crate::ids::{ContactId, ContactIdSet};
use crate::rules::{EvalError, Facts, Mode, Observed, Rule};

/// The guards that hold or refuse a plan (`[guards]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Guards {
    /// Hold removals above this share of a list's members.
    pub max_removal_share: f64,
    /// Hold removals above this many members, if set.
    pub max_removals: Option<u64>,
    /// Change nothing when more than this share of evaluated contacts errored.
    pub max_error_share: f64,
    /// Removals of at most this many members are never held by the share rule (tiny lists).
    pub mass_removal_floor: u64,
}

/// What evaluating one rule produced, before any decision.
#[derive(Debug, Default, Clone)]
pub struct Evaluation {
    /// Every current member of the list.
    pub members: ContactIdSet,
    /// Members whose own record evaluated to `false`.
    pub members_failing: Vec<ContactId>,
    /// Why each failing member failed: the facts its record showed (for the history).
    pub reasons: Vec<(ContactId, String)>,
    /// Non-members that evaluated to `true`.
    pub candidates_matching: Vec<ContactId>,
    /// Contacts evaluated (members and candidates).
    pub evaluated: u64,
    /// Contacts that evaluated to `true` (members and candidates).
    pub matched: u64,
    pub errors: u64,
    pub first_error: Option<(ContactId, EvalError)>,
    /// Fields and FILTER values the judged records showed (for the rule's findings).
    pub observed: Observed,
}

impl Evaluation {
    pub fn error(&mut self, id: &ContactId, e: EvalError) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some((id.clone(), e));
        }
    }

    /// A member's `matches` verdict on its own current record, whose `facts` were read before.
    pub fn member_verdict(&mut self, rule: &Rule, id: &ContactId, verdict: Result<bool, EvalError>, facts: &Facts) {
        match verdict {
            Ok(true) => self.matched += 1,
            Ok(false) => self.member_fails(id, rule.describe(facts)),
            Err(e) => self.error(id, e),
        }
    }

    /// A member its rule says no to, and why.
    pub fn member_fails(&mut self, id: &ContactId, reason: String) {
        self.members_failing.push(id.clone());
        self.reasons.push((id.clone(), reason));
    }

    /// Folds in a part evaluated elsewhere (another page).
    pub fn merge(&mut self, other: Evaluation) {
        if self.members.is_empty() {
            self.members = other.members;
        } else if !other.members.is_empty() {
            self.members.extend_from(&other.members);
        }
        self.members_failing.extend(other.members_failing);
        self.reasons.extend(other.reasons);
        self.candidates_matching.extend(other.candidates_matching);
        self.evaluated += other.evaluated;
        self.matched += other.matched;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.observed.merge(other.observed);
    }
}

/// The changes for one list, and whether a guard stopped any of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub to_add: Vec<ContactId>,
    pub to_remove: Vec<ContactId>,
    /// Removals are held (adds still go): why.
    pub held: Option<String>,
    /// Nothing is applied: why.
    pub refused: Option<String>,
    /// Failing members still within their removal grace, with when each first failed (RFC 3339).
    pub pending: Vec<(ContactId, String)>,
    /// Of `to_remove`, the members a suppression rule removes at once (no grace).
    pub suppressed: Vec<ContactId>,
    /// Matching contacts a suppression rule keeps out (suppressed, or not judged by it).
    pub kept_out: u64,
}

impl Plan {
    /// The removals that will really be sent.
    pub fn removals_to_apply(&self) -> &[ContactId] {
        if self.held.is_some() || self.refused.is_some() { &[] } else { &self.to_remove }
    }

    pub fn adds_to_apply(&self) -> &[ContactId] {
        if self.refused.is_some() { &[] } else { &self.to_add }
    }

    pub fn is_empty(&self) -> bool {
        self.to_add.is_empty() && self.to_remove.is_empty()
    }
}

/// Decides the changes for one list. The ids move from `eval` into the plan (a first sync of a
/// million contacts would otherwise hold them twice). Members within their removal grace are
/// pending, not removed, and the guards count only what is due.
pub fn plan(
    eval: &mut Evaluation,
    name: &str,
    mode: Mode,
    guards: &Guards,
    allow_mass_removal: bool,
    grace: &Grace,
    suppression: &Suppression,
) -> Plan {
    let members = &eval.members;
    let mut to_add: Vec<ContactId> =
        std::mem::take(&mut eval.candidates_matching).into_iter().filter(|id| !members.contains(id.as_str())).collect();
    to_add.sort();
    to_add.dedup();
    let matching = to_add.len();
    to_add.retain(|id| !suppression.blocks_add(id));
    let kept_out = (matching - to_add.len()) as u64;
    let mut to_remove = match mode {
        Mode::Mirror => std::mem::take(&mut eval.members_failing),
        Mode::AddOnly | Mode::Suppress => Vec::new(),
    };
    to_remove.sort();
    to_remove.dedup();
    let mut pending = Vec::new();
    if let Some(after) = grace.remove_after {
        let (due, waiting): (Vec<ContactId>, Vec<ContactId>) =
            to_remove.into_iter().partition(|id| grace.due(&grace.since(id), after));
        to_remove = due;
        pending = waiting
            .into_iter()
            .map(|id| {
                let since = grace.since(&id);
                (id, since)
            })
            .collect();
    }
    // Suppressed members leave at once, whatever the rule says of them and however young their grace.
    let mut suppressed: Vec<ContactId> = Vec::new();
    for (by, judged) in &suppression.by {
        for id in judged.ids.iter().filter(|id| eval.members.contains(id.as_str())) {
            suppressed.push(id.clone());
            eval.reasons.push((id.clone(), format!("suppressed by rule {by}")));
        }
    }
    suppressed.sort();
    suppressed.dedup();
    pending.retain(|(id, _)| suppressed.binary_search(id).is_err());
    to_remove.extend(suppressed.iter().cloned());
    to_remove.sort();
    to_remove.dedup();
    let mut plan = Plan { to_add, to_remove, held: None, refused: None, pending, suppressed, kept_out };
    if let Some(why) = &suppression.failed {
        plan.refused = Some(why.clone());
        return plan;
    }

    if eval.evaluated > 0 && eval.errors as f64 > guards.max_error_share * eval.evaluated as f64 {
        let (share, limit) = percents(eval.errors as f64 / eval.evaluated as f64, guards.max_error_share);
        plan.refused = Some(format!(
            "the rule errored on {} of {} contacts ({share} %), above guards.max_error_share {limit} %; nothing changed",
            eval.errors, eval.evaluated,
        ));
        return plan;
    }
    let members = eval.members.len() as u64;
    let removing = plan.to_remove.len() as u64;
    let over_share =
        removing > guards.mass_removal_floor && removing as f64 > guards.max_removal_share * members as f64;
    let over_count = guards.max_removals.is_some_and(|max| removing > max);
    if (over_share || over_count) && !allow_mass_removal {
        let share = if members == 0 { 1.0 } else { removing as f64 / members as f64 };
        let (share, limit) = percents(share, guards.max_removal_share);
        plan.held = Some(format!(
            "would remove {removing} of {members} members ({share} %), above the mass-removal guard ({limit} %{}); \
             confirm with `segsync sync {name} --allow-mass-removal`",
            guards.max_removals.map(|m| format!(" or {m} members")).unwrap_or_default()
        ));
    }
    plan
}

/// A rule's plan, with the evaluation and grace it was made from.
pub(super) struct Planned {
    /// The evaluation, its ids moved into the plan (its members and reasons stay).
    pub judged: Judged,
    pub plan: Plan,
    pub grace: Grace,
}

impl Reconciler {
    /// Plans one rule's changes at the run's "now", with its removal grace and the guards.
    pub(super) async fn plan(&self, mut judged: Judged, req: &PassRequest, suppression: Suppression) -> Flow<Planned> {
        let rule = judged.bound.job.rule.clone();
        crate::fault::panic_in_pass(rule.name.as_str());
        let grace = Grace {
            remove_after: rule.remove_after.or(self.default_remove_after),
            since: std::mem::take(&mut judged.bound.job.recalled.pending_since),
            now: req.now.unwrap_or_else(chrono::Utc::now),
        };
        let (guards, allow) = (self.guards.clone(), req.allow_mass_removal);
        let shell = judged.bound.shell();
        // Verdicts judged natively before a shadow check caught a disagreement cannot be trusted.
        if rule.native.as_ref().is_ok_and(|n| n.retired_after(req.made)) {
            return Err(Stopped::new(shell, ReconcileError::NativeDisagreed));
        }
        let planned = tokio::task::spawn_blocking(move || {
            let plan =
                plan(&mut judged.eval, rule.file_rule().as_str(), rule.mode, &guards, allow, &grace, &suppression);
            Planned { judged, plan, grace }
        });
        planned.await.map_err(|e| Stopped::new(shell, ReconcileError::Planning(e.to_string())))
    }
}

/// Two shares as percentages, with as many decimals as it takes to tell them apart (at least one).
fn percents(a: f64, b: f64) -> (String, String) {
    let (a, b) = (100.0 * a, 100.0 * b);
    for digits in 1..6 {
        let (x, y) = (format!("{a:.digits$}"), format!("{b:.digits$}"));
        if x != y {
            return (x, y);
        }
    }
    (format!("{a:.6}"), format!("{b:.6}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<ContactId> {
        names.iter().map(|n| ContactId::from(*n)).collect()
    }

    fn guards() -> Guards {
        Guards { max_removal_share: 0.2, max_removals: None, max_error_share: 0.01, mass_removal_floor: 2 }
    }

    struct Case {
        name: &'static str,
        members: &'static [&'static str],
        failing: &'static [&'static str],
        matching: &'static [&'static str],
        evaluated: u64,
        errors: u64,
        mode: Mode,
        allow: bool,
        add: &'static [&'static str],
        remove: &'static [&'static str],
        held: bool,
        refused: bool,
    }

    const BASE: Case = Case {
        name: "",
        members: &[],
        failing: &[],
        matching: &[],
        evaluated: 100,
        errors: 0,
        mode: Mode::Mirror,
        allow: false,
        add: &[],
        remove: &[],
        held: false,
        refused: false,
    };

    fn check(c: &Case) {
        let eval = Evaluation {
            members: c.members.iter().copied().collect(),
            members_failing: ids(c.failing),
            candidates_matching: ids(c.matching),
            evaluated: c.evaluated,
            errors: c.errors,
            ..Evaluation::default()
        };
        let mut eval = eval;
        let p = plan(&mut eval, "vip", c.mode, &guards(), c.allow, &Grace::none(), &Suppression::default());
        assert_eq!(p.to_add, ids(c.add), "{}: to_add", c.name);
        assert_eq!(p.to_remove, ids(c.remove), "{}: to_remove", c.name);
        assert_eq!(p.held.is_some(), c.held, "{}: held {:?}", c.name, p.held);
        assert_eq!(p.refused.is_some(), c.refused, "{}: refused {:?}", c.name, p.refused);
    }

    // The planner's decisions, table-driven: sorted output, guards, modes.
    #[test]
    fn plans_are_sorted_guarded_and_follow_the_mode() {
        let cases = [
            Case { name: "empty list fills, sorted", matching: &["c", "a", "b", "a"], add: &["a", "b", "c"], ..BASE },
            Case {
                name: "members are never re-added",
                members: &["a", "b"],
                matching: &["a", "c"],
                add: &["c"],
                ..BASE
            },
            Case {
                name: "a failing member leaves",
                members: &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
                failing: &["b"],
                remove: &["b"],
                ..BASE
            },
            Case {
                name: "add_only never removes",
                members: &["a", "b"],
                failing: &["a", "b"],
                mode: Mode::AddOnly,
                ..BASE
            },
            Case {
                name: "mass removal is held, adds still go",
                members: &["a", "b", "c", "d", "e"],
                failing: &["a", "b", "c", "d"],
                matching: &["z"],
                add: &["z"],
                remove: &["a", "b", "c", "d"],
                held: true,
                ..BASE
            },
            Case {
                name: "confirmed mass removal is applied",
                members: &["a", "b", "c", "d", "e"],
                failing: &["a", "b", "c", "d"],
                allow: true,
                remove: &["a", "b", "c", "d"],
                ..BASE
            },
            Case {
                name: "small removals below the floor are never held",
                members: &["a", "b", "c"],
                failing: &["a", "b"],
                remove: &["a", "b"],
                ..BASE
            },
            Case {
                name: "too many evaluation errors refuse every change",
                members: &["a"],
                failing: &["a"],
                matching: &["b"],
                errors: 2,
                add: &["b"],
                remove: &["a"],
                refused: true,
                ..BASE
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    // A suppression removes members past their grace, but under the mass-removal guard: a broken
    // suppression rule selecting everyone cannot empty the list; the contacts it selects are never added.
    #[test]
    fn suppression_is_guarded() {
        use super::super::suppress::{Suppressed, Suppression};
        let everyone =
            Suppressed { ids: ids(&["a", "b", "c", "d", "n"]).into_iter().collect(), ..Suppressed::default() };
        let suppression = Suppression { by: vec![("optout".into(), std::sync::Arc::new(everyone))], failed: None };
        let mut eval = Evaluation {
            members: ["a", "b", "c", "d"].into_iter().collect(),
            candidates_matching: ids(&["n", "m"]),
            evaluated: 6,
            ..Evaluation::default()
        };
        let p = plan(&mut eval, "vip", Mode::Mirror, &guards(), false, &Grace::none(), &suppression);
        assert_eq!(p.to_add, ids(&["m"]), "the suppressed candidate is kept out");
        assert_eq!(p.kept_out, 1);
        assert_eq!(p.suppressed, ids(&["a", "b", "c", "d"]));
        assert!(p.held.is_some(), "removing every member is held: {p:?}");
        assert!(p.removals_to_apply().is_empty());
        let failed = Suppression { failed: Some("optout could not be read".into()), ..Suppression::default() };
        let mut eval = Evaluation { candidates_matching: ids(&["m"]), evaluated: 1, ..Evaluation::default() };
        let p = plan(&mut eval, "vip", Mode::Mirror, &guards(), false, &Grace::none(), &failed);
        assert!(p.refused.is_some() && p.adds_to_apply().is_empty(), "nothing changes while it cannot be judged");
    }

    // A refused plan applies nothing; a held plan applies only adds.
    #[test]
    fn what_gets_applied() {
        let p = Plan { to_add: ids(&["a"]), to_remove: ids(&["b"]), held: Some("x".into()), ..Plan::default() };
        assert_eq!(p.adds_to_apply(), ids(&["a"]).as_slice());
        assert!(p.removals_to_apply().is_empty());
        let p = Plan { refused: Some("x".into()), ..p };
        assert!(p.adds_to_apply().is_empty());
    }

    // Shares that differ are printed with enough digits to show it.
    #[test]
    fn percentages_show_the_difference() {
        assert_eq!(percents(0.0102, 0.01), ("1.02".into(), "1.00".into()));
        assert_eq!(percents(0.25, 0.2), ("25.0".into(), "20.0".into()));
        assert_eq!(percents(0.010004, 0.01), ("1.0004".into(), "1.0000".into()));
    }
}
