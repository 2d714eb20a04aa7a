//! Reading for a pass: each list's members, and the candidates (one shared scan of all contacts,
//! or per-rule reads of filtered non-members, whichever costs fewer requests), evaluated page by
//! page on blocking threads as the pages arrive. Contacts are streamed, never all held at once.
//! A list whose members come from the cache has them judged on the shared scan's records.

use std::sync::Arc;

use rhai::Engine;
use tokio_util::sync::CancellationToken;

use super::ReconcileError;
use super::plan::Evaluation;
use crate::contact::ContactRecord;
use crate::gateway::{Gateway, Scan, ScanQuery};
use crate::ids::{ContactIdSet, ListId};
use crate::rules::{Date, Mode, Rule};

/// Folds a scan's page results in page order (the pages were judged on the gateway's blocking
/// threads as they were parsed). Returns the server's last reported total.
async fn fold_pages<R>(
    mut scan: Scan<R>,
    cancel: &CancellationToken,
    mut fold: impl FnMut(R),
) -> Result<u64, ReconcileError> {
    let mut total = 0;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return Err(ReconcileError::Interrupted),
            next = scan.next() => next,
        };
        let Some(page) = next else { break };
        let page = page?;
        total = page.total;
        fold(page.records);
    }
    Ok(total)
}

/// A member's verdict on its own current record. A member the FILTER cannot judge is an
/// evaluation error (kept), exactly as a field `matches` cannot read; only a clear "no" can
/// remove it. `Ok(true)` from the FILTER still needs `matches`: the caller runs it.
fn member_filter(rule: &Rule, record: &ContactRecord, part: &mut Evaluation) -> bool {
    match rule.filter_verdict(record) {
        Ok(true) => true,
        Ok(false) => {
            part.members_failing.push(record.id.clone());
            false
        }
        Err(e) => {
            part.error(&record.id, e);
            false
        }
    }
}

/// Reads a list's members and judges each on its own current record.
pub async fn members(
    cancel: &CancellationToken,
    gw: &Gateway,
    engine: &Arc<Engine>,
    rule: &Arc<Rule>,
    list: &ListId,
    today: Date,
) -> Result<Evaluation, ReconcileError> {
    let (engine, rule_for_work) = (engine.clone(), rule.clone());
    let mut eval = Evaluation::default();
    let scan = gw.scan_with(
        &ScanQuery { list_ids: vec![list.clone()], ..ScanQuery::default() },
        move |records: Vec<ContactRecord>| {
            let mut part = Evaluation::default();
            for record in records {
                part.members.insert(record.id.as_str());
                // add_only never removes, so its members need no verdict.
                if rule_for_work.mode == Mode::Mirror {
                    part.evaluated += 1;
                    if member_filter(&rule_for_work, &record, &mut part) {
                        // The member's last use: hand the record over instead of cloning it.
                        let ContactRecord { id, fields } = record;
                        part.member_verdict(&id, rule_for_work.call_matches(&engine, fields, today));
                    }
                }
            }
            part
        },
    );
    fold_pages(scan, cancel, |part| eval.merge(part)).await?;
    Ok(eval)
}

/// A rule reading candidates.
pub struct Target {
    pub rule: Arc<Rule>,
    pub members: Arc<ContactIdSet>,
    /// The members come from the cache: judge each on the record this read returns. Otherwise
    /// they were judged on their member records already, and are skipped.
    pub judge_members: bool,
}

/// What a candidate read found, per target, plus counts the planner remembers.
pub struct Candidates {
    pub per_target: Vec<Evaluation>,
    /// Per target: non-members passing its FILTER (the size of its own filtered read).
    pub in_filter: Vec<u64>,
    pub total: u64,
}

/// Reads `query` once and evaluates every target on each contact (converted once): members of a
/// cached list as members, everyone else as a candidate.
pub async fn candidates(
    cancel: &CancellationToken,
    gw: &Gateway,
    engine: &Arc<Engine>,
    query: &ScanQuery,
    targets: Vec<Target>,
    today: Date,
) -> Result<Candidates, ReconcileError> {
    let n = targets.len();
    let targets = Arc::new(targets);
    let mut out = Candidates { per_target: vec![Evaluation::default(); n], in_filter: vec![0; n], total: 0 };
    let (engine, work_targets) = (engine.clone(), targets.clone());
    let scan = gw.scan_with(query, move |records: Vec<ContactRecord>| {
        let mut parts = vec![Evaluation::default(); work_targets.len()];
        let mut in_filter = vec![0u64; work_targets.len()];
        // (target, judged as a member) for each `matches` call this record needs.
        let mut due: Vec<(usize, bool)> = Vec::with_capacity(work_targets.len());
        for record in records {
            due.clear();
            for (i, target) in work_targets.iter().enumerate() {
                if target.members.contains(record.id.as_str()) {
                    if target.judge_members && target.rule.mode == Mode::Mirror {
                        parts[i].evaluated += 1;
                        if member_filter(&target.rule, &record, &mut parts[i]) {
                            due.push((i, true));
                        }
                    }
                    continue;
                }
                parts[i].evaluated += 1;
                if target.rule.passes_filter(&record) {
                    in_filter[i] += 1;
                    due.push((i, false));
                }
            }
            // Each evaluation consumes a copy of the contact; the last one takes the record itself.
            let ContactRecord { id, fields } = record;
            let mut fields = Some(fields);
            for (k, &(i, as_member)) in due.iter().enumerate() {
                let arg = if k + 1 == due.len() {
                    fields.take().unwrap_or_default()
                } else {
                    fields.clone().unwrap_or_default()
                };
                let verdict = work_targets[i].rule.call_matches(&engine, arg, today);
                let part = &mut parts[i];
                if as_member {
                    part.member_verdict(&id, verdict);
                    continue;
                }
                match verdict {
                    Ok(true) => {
                        part.matched += 1;
                        part.candidates_matching.push(id.clone());
                    }
                    Ok(false) => {}
                    Err(e) => part.error(&id, e),
                }
            }
        }
        (parts, in_filter)
    });
    out.total = fold_pages(scan, cancel, |(parts, in_filter)| {
        for (i, part) in parts.into_iter().enumerate() {
            out.per_target[i].merge(part);
            out.in_filter[i] += in_filter[i];
        }
    })
    .await?;
    Ok(out)
}
