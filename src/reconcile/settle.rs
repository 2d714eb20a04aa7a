//! Stage 5, `settle`: every rule's evaluation made whole. A read list's members were judged on
//! their member records; its candidates join them. A cached list is confirmed when the members the
//! shared scan returned are exactly as many as the directory counted: the others were deleted and
//! left the list by themselves (`unseen`), and the scan's verdicts on the rest stand. If not,
//! someone changed the list by hand: it is read now, its members judged on their member records,
//! and a cached "member" that is not one is a candidate again, judged on its scan record. So a hand
//! edit is corrected in the same pass, and deleted contacts (churn) cost no read.

use futures_util::future::join_all;

use super::bind::Bound;
use super::read::Candidates;
use super::{Evaluation, Flow, MemberSource, Reconciler, Stopped};
use crate::ids::ContactId;
use crate::rules::Date;
use crate::state::Estimate;

/// A rule's whole evaluation: every member and every candidate judged.
pub(super) struct Judged {
    pub bound: Bound,
    pub eval: Evaluation,
    pub from: MemberSource,
    pub in_filter: u64,
    /// Cached members the scan did not return: deleted contacts, gone from the list by themselves.
    pub unseen: Vec<ContactId>,
    pub estimates: Vec<(Estimate, u64)>,
}

impl Reconciler {
    pub(super) async fn settle(&self, candidates: Vec<Flow<Candidates>>, today: Date) -> Vec<Flow<Judged>> {
        join_all(candidates.into_iter().map(|c| async move { self.settle_one(c?, today).await })).await
    }

    async fn settle_one(&self, c: Candidates, today: Date) -> Flow<Judged> {
        let Candidates { members, found, in_filter, seen, estimates } = c;
        let (mut bound, mut eval, mut from) = (members.bound, members.eval, members.from);
        let mut unseen = Vec::new();
        match seen.filter(|_| from == MemberSource::Cache) {
            None => eval.merge(found),
            Some(seen) if members.listed == Some(seen.seen.count()) => {
                let cached = &eval.members;
                unseen = (0..cached.len() as u32)
                    .filter(|&i| !seen.seen.get(i))
                    .filter_map(|i| cached.at(i).map(ContactId::from))
                    .collect();
                eval.merge(seen.eval);
                eval.merge(found);
            }
            Some(seen) => {
                tracing::debug!(rule = %bound.job.rule.name, listed = ?members.listed, seen = seen.seen.count(),
                    "the list's count disagrees with the cache; reading its members");
                let cached = std::mem::take(&mut eval.members);
                (eval, from) = match self.read_members(&mut bound, today).await {
                    Ok(read) => read,
                    Err(error) => return Err(Box::new(Stopped { bound, eval: found, error })),
                };
                eval.merge(found);
                // A cached "member" that is not one is a candidate, judged on its scan record.
                for i in 0..cached.len() as u32 {
                    let Some(id) = cached.at(i).filter(|id| seen.matched.get(i) && !eval.members.contains(id)) else {
                        continue;
                    };
                    eval.matched += 1;
                    eval.candidates_matching.push(ContactId::from(id));
                }
            }
        }
        Ok(Judged { bound, eval, from, in_filter, unseen, estimates })
    }
}
