//! Stage 8, `commit`: a rule's run becomes its report, its state writes (binding, removal grace,
//! membership history, cache, learned paging and counts, the run record) go in one transaction on
//! a blocking thread, and its one summary event is logged. A stopped rule commits its binding
//! and its run. A dry run writes and logs nothing.

use std::collections::HashMap;
use std::time::Instant;

use super::apply::{Applied, Written};
use super::bind::Bound;
use super::plan::Planned;
use super::settle::Judged;
use super::{
    Evaluation, Flow, MemberSource, Outcome, PassRequest, Plan, ReadKind, Reconciler, RuleReport, Stopped, Trigger,
};
use crate::gateway::{Resource, Usage};
use crate::ids::{ContactId, ContactIdSet};
use crate::state::{BindingWrite, CacheWrite, CacheWrites, Commit, Estimate, Movements, RunRecord};

/// What every rule of a pass shares: the request, the read, the shared scan's requests, and when
/// the pass started.
pub(super) type PassRun<'a> = (&'a PassRequest, ReadKind, &'a Usage, (Instant, &'a str));

/// What a rule's commit writes beyond its run record (a stopped rule has none of it).
struct Outcomes {
    members: ContactIdSet,
    from: MemberSource,
    reasons: Vec<(ContactId, String)>,
    unseen: Vec<ContactId>,
    estimates: Vec<(Estimate, u64)>,
    pending: Option<Vec<(ContactId, String)>>,
    /// Whether the history and cache may take the plan's writes (no write failed).
    writes_known: bool,
    confirmed: bool,
}

impl Reconciler {
    /// Reports, records and logs one rule's run.
    pub(super) async fn commit(&self, written: Flow<Written>, run: PassRun<'_>) -> RuleReport {
        let (req, read, shared, (started, started_at)) = run;
        let (mut report, bound, outcomes) = match written {
            Ok(written) => {
                let (report, bound, outcomes) = self.report(written, read, req);
                (report, bound, Some(outcomes))
            }
            Err(stopped) => {
                let Stopped { bound, eval, error } = *stopped;
                let mut report = RuleReport::failed(bound.job.rule.clone(), error.to_string());
                if error.is_interrupted() {
                    report.outcome = Outcome::Interrupted;
                }
                report.list_id = bound.list.clone();
                report.list_created = bound.created;
                count(&mut report, &eval);
                (report, bound, None)
            }
        };
        report.usage = bound.job.meter.usage();
        if read == ReadKind::SharedScan {
            report.usage.absorb(shared);
        }
        report.read = read;
        report.duration = started.elapsed();
        let record = run_record(&report, req.trigger, started_at);
        if req.dry_run {
            return report;
        }
        report.plan = self.write(&bound, record.clone(), outcomes, req, std::mem::take(&mut report.plan)).await;
        log_summary(&report, &record);
        report
    }

    /// Records a run that has only its record: one that failed before it could say more (a panic in
    /// the pass, a partitioned rule refused whole), or a partitioned rule's summary of its lists.
    pub(super) async fn record_alone(&self, report: &RuleReport, trigger: Trigger, started_at: &str, dry_run: bool) {
        if dry_run {
            return;
        }
        let record = run_record(report, trigger, started_at);
        let (state, account, rule) = (self.state.clone(), self.account.clone(), report.rule.clone());
        let stored = record.clone();
        let written = tokio::task::spawn_blocking(move || {
            state.commit(&Commit {
                account: &account,
                rule: &rule.name,
                list_name: &rule.list,
                binding: BindingWrite::default(),
                pending: None,
                movements: None,
                cache: None,
                paging: &[],
                estimates: &[],
                run: &stored,
            })
        })
        .await;
        log_commit_error(&record, written);
        log_summary(report, &record);
    }

    /// The report of a rule that went through every stage, and what its commit writes.
    fn report(&self, written: Written, read: ReadKind, req: &PassRequest) -> (RuleReport, Bound, Outcomes) {
        let Written { planned: Planned { judged, plan, grace }, applied, error } = written;
        let Judged { bound, eval, from, in_filter, unseen, estimates } = judged;
        let rule = bound.job.rule.clone();
        let today =
            req.today.unwrap_or_else(|| crate::rules::Date(grace.now.with_timezone(&self.time_zone).date_naive()));
        let mut report = RuleReport::failed(rule.clone(), String::new());
        report.list_id = bound.list.clone();
        report.list_created = bound.created;
        count(&mut report, &eval);
        report.in_filter = in_filter;
        report.read = read;
        report.members_from = from;
        report.derived_filter = rule.derived_filter(today).iter().map(crate::rules::FilterTerm::query_pair).collect();
        report.remove_after = grace.remove_after;
        report.added = applied.added.done;
        report.removed = applied.removed.done;
        (report.outcome, report.detail) = outcome(&plan, &applied, error.as_ref());
        let write_failed = error.is_some();
        let applied_all = !write_failed && plan.refused.is_none();
        let outcomes = Outcomes {
            pending: grace.still_pending(&plan, applied_all && plan.held.is_none()),
            confirmed: !write_failed
                && applied.unconfirmed().is_none()
                && agrees(&bound, &eval, &plan, &unseen, &applied),
            writes_known: !write_failed,
            members: eval.members,
            reasons: eval.reasons,
            from,
            unseen,
            estimates,
        };
        report.plan = plan;
        (report, bound, outcomes)
    }

    /// Writes the run in one transaction on a blocking thread. The plan goes to the writing thread
    /// and comes back (no copy of a first sync's million adds).
    async fn write(
        &self,
        bound: &Bound,
        record: RunRecord,
        outcomes: Option<Outcomes>,
        req: &PassRequest,
        plan: Plan,
    ) -> Plan {
        let (state, account, rule) = (self.state.clone(), self.account.clone(), bound.job.rule.clone());
        let (list, forget, bind) = (bound.list.clone(), bound.forget.clone(), bound.bind.clone());
        let paging: Vec<_> = Resource::ALL.into_iter().map(|r| (r, self.gateway.paging(r))).collect();
        let note = change_note(bound, &plan);
        let (trigger, at, facts) =
            (req.trigger, crate::state::at(req.now.unwrap_or_else(chrono::Utc::now)), self.history_facts);
        let stored = record.clone();
        let written = tokio::task::spawn_blocking(move || {
            let binding = BindingWrite { forget: forget.as_ref(), bind: bind.as_ref() };
            let mut commit = Commit {
                account: &account,
                rule: &rule.name,
                list_name: &rule.list,
                binding,
                pending: None,
                movements: None,
                cache: None,
                paging: &paging,
                estimates: &[],
                run: &stored,
            };
            let (Some(outcomes), Some(list)) = (&outcomes, &list) else { return (state.commit(&commit), plan) };
            commit.estimates = &outcomes.estimates;
            commit.pending = outcomes.pending.as_deref().map(|p| (rule.hash.as_str(), p));
            let reasons: HashMap<&ContactId, &str> =
                outcomes.reasons.iter().map(|(id, why)| (id, why.as_str())).collect();
            let removed: Vec<(&ContactId, &str)> = plan
                .removals_to_apply()
                .iter()
                .map(|id| {
                    let reason = reasons.get(id).copied().unwrap_or("the rule said no");
                    (id, if facts { reason } else { without_values(reason) })
                })
                .collect();
            if outcomes.writes_known {
                commit.movements = Some(Movements {
                    at: &at,
                    rule: &rule.name,
                    rule_hash: rule.short_hash(),
                    list,
                    trigger,
                    note,
                    added: plan.adds_to_apply(),
                    removed,
                });
            }
            // Only what was sent: a held removal is not applied; a failed run may have sent a
            // part. Deleted members left by themselves.
            let mut gone = plan.removals_to_apply().to_vec();
            gone.extend(outcomes.unseen.iter().cloned());
            if outcomes.from != MemberSource::Unknown {
                commit.cache = Some(CacheWrite {
                    list,
                    read: (outcomes.from != MemberSource::Cache).then_some(&outcomes.members),
                    writes: CacheWrites { added: plan.adds_to_apply(), removed: &gone, confirmed: outcomes.confirmed },
                });
            }
            let result = state.commit(&commit);
            drop(commit);
            (result, plan)
        })
        .await;
        match written {
            Ok((result, plan)) => {
                log_commit_error(&record, Ok(result));
                plan
            }
            Err(e) => {
                log_commit_error(&record, Err(e));
                Plan::default()
            }
        }
    }

    /// Prunes history older than the retention.
    pub(super) async fn prune_history(&self) {
        let (state, retention) = (self.state.clone(), self.history_retention);
        let Some(cut) = chrono::Utc::now().checked_sub_signed(crate::duration::to_chrono(retention)) else { return };
        let before = crate::state::at(cut);
        match tokio::task::spawn_blocking(move || state.prune_history(&before)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(pruned = n, "history pruned"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "history not pruned"),
            Err(e) => tracing::warn!(error = %e, "history not pruned"),
        }
    }
}

/// The evaluation's counts, as a report gives them.
fn count(report: &mut RuleReport, eval: &Evaluation) {
    report.members_before = eval.members.len() as u64;
    report.scanned = eval.evaluated;
    report.matched = eval.matched;
    report.eval_errors = eval.errors;
    report.first_error = eval.first_error.as_ref().map(|(id, e)| format!("contact {id}: {e}"));
    report.findings = report.rule.findings(&eval.observed, crate::rules::ABSENT_MIN_JUDGED);
    // A partitioned rule's list no contact names any more is kept, and said so.
    if matches!(report.rule.lists, crate::rules::Lists::Partition { .. }) && eval.matched == 0 && eval.errors == 0 {
        report.findings.push(crate::rules::Finding {
            kind: "list_not_named",
            subject: report.rule.list.clone(),
            line: 0,
            col: 0,
            message: format!(
                "no contact is named into {:?} any more: the list is kept (emptied under the guards), never deleted",
                report.rule.list
            ),
        });
    }
}

/// How a run that went through every stage ended, and why if not `ok`.
fn outcome(plan: &Plan, applied: &Applied, error: Option<&super::ReconcileError>) -> (Outcome, Option<String>) {
    if let Some(why) = &plan.refused {
        return (Outcome::Failed, Some(why.clone()));
    }
    if let Some(e) = error {
        return (if e.is_interrupted() { Outcome::Interrupted } else { Outcome::Failed }, Some(e.to_string()));
    }
    if let Some(why) = applied.unconfirmed() {
        return (Outcome::Partial, Some(why));
    }
    match &plan.held {
        Some(why) => (Outcome::Held, Some(why.clone())),
        None => (Outcome::Ok, None),
    }
}

/// Whether the list's count as the last write answered it is what the cache predicts.
fn agrees(bound: &Bound, eval: &Evaluation, plan: &Plan, unseen: &[ContactId], applied: &Applied) -> bool {
    let removed = plan.removals_to_apply().len() + unseen.len();
    let expected = (eval.members.len() + plan.adds_to_apply().len()).saturating_sub(removed) as u64;
    let agrees = applied.list_total().is_none_or(|total| total == expected);
    if !agrees {
        tracing::debug!(rule = %bound.job.rule.name, list_id = ?bound.list, expected, answered = ?applied.list_total(),
            "list count differs from the cache; reading it next pass");
    }
    agrees
}

/// The history's note when the rule's file changed since its previous run.
fn change_note(bound: &Bound, plan: &Plan) -> Option<String> {
    let rule = &bound.job.rule;
    let before = bound.job.recalled.last_run.as_ref()?;
    (!before.rule_hash.is_empty() && before.rule_hash != rule.short_hash()).then(|| {
        format!(
            "rule {} changed: hash {} → {}; {} added and {} removed by this run",
            rule.name,
            before.rule_hash,
            rule.short_hash(),
            plan.adds_to_apply().len(),
            plan.removals_to_apply().len()
        )
    })
}

fn run_record(r: &RuleReport, trigger: Trigger, started_at: &str) -> RunRecord {
    RunRecord {
        rule: r.rule.name.clone(),
        list_id: r.list_id.clone(),
        trigger,
        rule_hash: r.rule.short_hash().to_owned(),
        started_at: started_at.to_owned(),
        finished_at: crate::state::now(),
        scanned: r.scanned,
        matched: r.matched,
        members_before: r.members_before,
        added: r.added,
        removed: r.removed,
        eval_errors: r.eval_errors,
        api_requests: r.usage.total_requests(),
        retries: r.usage.retries,
        duration_ms: r.duration.as_millis() as u64,
        outcome: r.outcome,
        detail: r.detail.clone(),
        to_remove: r.plan.to_remove.len() as u64,
    }
}

fn log_commit_error(record: &RunRecord, written: Result<Result<(), crate::state::StateError>, tokio::task::JoinError>) {
    let error = match written {
        Ok(Ok(())) => return,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    tracing::error!(rule = %record.rule, error = %error, "run not recorded");
}

/// The rule run's one summary event.
fn log_summary(r: &RuleReport, record: &RunRecord) {
    let subjects = |kind: &str| {
        let found: Vec<&str> = r.findings.iter().filter(|f| f.kind == kind).map(|f| f.subject.as_str()).collect();
        (!found.is_empty()).then(|| found.join(", "))
    };
    let (absent_fields, filter_matched_none) = (subjects("absent_field"), subjects("filter_matched_none"));
    macro_rules! summary {
        ($level:ident) => {
            tracing::$level!(
                rule = %record.rule,
                list_id = record.list_id.as_ref().map(|l| l.as_str()),
                trigger = %record.trigger,
                rule_hash = %record.rule_hash,
                scanned = record.scanned,
                matched = record.matched,
                members_before = record.members_before,
                added = record.added,
                removed = record.removed,
                to_add = r.plan.to_add.len(),
                to_remove = r.plan.to_remove.len(),
                pending_removal = r.plan.pending.len(),
                eval_errors = record.eval_errors,
                first_eval_error = r.first_error.as_deref(),
                absent_fields = absent_fields.as_deref(),
                filter_matched_none = filter_matched_none.as_deref(),
                api_requests = record.api_requests,
                retries = record.retries,
                read_plan = r.read.as_str(),
                members_from = r.members_from.as_str(),
                duration_ms = record.duration_ms,
                outcome = %record.outcome,
                detail = record.detail.as_deref(),
                "rule run"
            )
        };
    }
    match r.outcome {
        // A rule reading a field no contact has selects nobody without an error: a warning.
        Outcome::Ok if r.findings.is_empty() => summary!(info),
        Outcome::Ok => summary!(warn),
        Outcome::Held | Outcome::Partial | Outcome::Interrupted => summary!(warn),
        Outcome::Failed => summary!(error),
    }
}

/// A few ids, for people.
pub fn sample(ids: &[ContactId], n: usize) -> Vec<&str> {
    ids.iter().take(n).map(ContactId::as_str).collect()
}

/// A removal's reason without the contact's field values (`[state] history_facts = false`): the
/// rule's verdict stays, what the record held does not.
fn without_values(reason: &str) -> &str {
    match reason.split_once(": ") {
        Some((verdict, _)) if verdict == "matches returned false" => verdict,
        _ if reason.starts_with("FILTER ") => "FILTER fails",
        _ => reason,
    }
}

#[cfg(test)]
mod tests {
    use super::without_values;

    // The data-minimal setting keeps the verdict and drops every value the record held.
    #[test]
    fn reasons_without_values() {
        assert_eq!(
            without_values("matches returned false: customFields.totalSpent = 4200.0, email = \"a@b.it\""),
            "matches returned false"
        );
        assert_eq!(without_values("FILTER region = \"Veneto\" fails"), "FILTER fails");
        assert_eq!(without_values("the rule said no"), "the rule said no");
    }
}
