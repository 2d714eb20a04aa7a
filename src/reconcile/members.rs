//! Stage 3, `members`: each list's members, and the read they choose.
//!
//! A list's cached members stand in for reading them only when the cache was filled by a complete
//! member read less than `verify_members_every` ago, no write since went unconfirmed, and the
//! directory read at the start of this pass counts no more members than the cache holds (fewer may
//! be deletions, which `settle` tells apart). Only a shared scan can judge cached members (on
//! their scan records), so the read is chosen here, with the cache in the count: one shared scan,
//! or each rule's own filtered read. Every other list is read, each member judged on its own
//! current record; a list deleted since it was bound is found or created again.

use futures_util::future::join_all;

use super::bind::Bound;
use super::cost::{self, RuleCost};
use super::{Evaluation, Flow, MemberSource, ReadKind, ReconcileError, Reconciler, Stopped, judge};
use crate::gateway::ListInfo;
use crate::ids::ListId;
use crate::rules::Date;
use crate::state::StateError;

/// A bound list's members.
pub(super) struct Members {
    pub bound: Bound,
    /// The members; read ones already judged on their member records.
    pub eval: Evaluation,
    pub from: MemberSource,
    /// The list's size as the directory gave it this pass.
    pub listed: Option<u64>,
}

/// A bound list, and whether its cache may stand in for a member read.
struct Consulted {
    bound: Bound,
    listed: Option<u64>,
    trusted: bool,
}

impl Reconciler {
    /// Gives every bound list its members (the cache's where trusted and the read is the shared
    /// scan, else a complete read) and returns the read the pass makes.
    pub(super) async fn members(
        &self,
        bound: Vec<Flow<Bound>>,
        directory: Option<&[ListInfo]>,
        contacts: Option<u64>,
        today: Date,
    ) -> (ReadKind, Vec<Flow<Members>>) {
        let consulted: Vec<Flow<Consulted>> =
            bound.into_iter().map(|b| b.map(|b| self.consult(b, directory))).collect();
        let read = self.choose(&consulted, contacts, today);
        let members = join_all(consulted.into_iter().map(|c| async move {
            let c = c?;
            let use_cache = c.trusted && read == ReadKind::SharedScan;
            self.give_members(c.bound, c.listed, use_cache, today).await
        }))
        .await;
        (read, members)
    }

    /// Whether the bound list's cache may stand in for a member read this pass.
    fn consult(&self, bound: Bound, directory: Option<&[ListInfo]>) -> Consulted {
        let Some(list) = bound.list.as_ref().filter(|_| !bound.created) else {
            return Consulted { bound, listed: None, trusted: false };
        };
        let listed = directory.and_then(|all| all.iter().find(|l| &l.id == list)).and_then(|l| l.contact_count);
        // A binding replaced this pass has no cache of its own yet.
        let cached = bound.job.recalled.cached.as_ref().filter(|_| bound.forget.is_none() && bound.bind.is_none());
        let Some(cached) = cached else { return Consulted { bound, listed, trusted: false } };
        let fresh = chrono::DateTime::parse_from_rfc3339(&cached.verified_at).is_ok_and(|at| {
            chrono::Utc::now().signed_duration_since(at).to_std().is_ok_and(|age| age < self.verify_members_every)
        });
        let trusted = cached.trusted && fresh && listed.is_some_and(|n| n <= cached.members);
        if !trusted {
            tracing::debug!(rule = %bound.job.rule.name, list_id = %list, trusted = cached.trusted, fresh,
                cached = cached.members, listed = ?listed, "cache not used; reading members");
        }
        Consulted { bound, listed, trusted }
    }

    /// Shared scan or own reads: whichever costs fewer requests, with the cache in the count.
    fn choose(&self, consulted: &[Flow<Consulted>], contacts: Option<u64>, today: Date) -> ReadKind {
        let costs: Vec<RuleCost> = consulted
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|c| {
                let (rule, recalled) = (&c.bound.job.rule, &c.bound.job.recalled);
                let members = c.listed.unwrap_or_else(|| recalled.members_estimate());
                RuleCost {
                    bound: c.bound.list.is_some() && !c.bound.created,
                    members,
                    cached: c.trusted,
                    own: cost::own_estimate(rule, recalled, members, contacts, today),
                }
            })
            .collect();
        cost::cheaper(&costs, contacts, self.page()).0
    }

    async fn give_members(&self, mut bound: Bound, listed: Option<u64>, use_cache: bool, today: Date) -> Flow<Members> {
        if let Some(list) = bound.list.clone().filter(|_| use_cache) {
            match self.load_cache(list).await {
                Ok(eval) => return Ok(Members { bound, eval, from: MemberSource::Cache, listed }),
                // The cache cannot be read: read the list instead.
                Err(error) => tracing::warn!(rule = %bound.job.rule.name, error = %error, "cache not readable"),
            }
        }
        match self.read_members(&mut bound, today).await {
            Ok((eval, from)) => Ok(Members { bound, eval, from, listed }),
            Err(e) => Err(Stopped::new(bound, e)),
        }
    }

    /// The cached members of `list`, read on a blocking thread.
    async fn load_cache(&self, list: ListId) -> Result<Evaluation, StateError> {
        let (state, account) = (self.state.clone(), self.account.clone());
        let loaded = tokio::task::spawn_blocking(move || state.cached_members(&account, &list)).await;
        let members = loaded.map_err(|e| StateError::Thread(e.to_string()))??;
        Ok(Evaluation { members, ..Evaluation::default() })
    }

    /// Reads the bound list's members and judges each on its own record. A list deleted since it
    /// was bound is found or created again (at most once).
    pub(super) async fn read_members(
        &self,
        bound: &mut Bound,
        today: Date,
    ) -> Result<(Evaluation, MemberSource), ReconcileError> {
        for _ in 0..2 {
            let Some(list) = bound.list.clone().filter(|_| !bound.created) else { break };
            let (gateway, rule) = (&bound.job.gateway, &bound.job.rule);
            match judge::members(&self.cancel, gateway, &self.engine, rule, &list, today).await {
                Ok(eval) => return Ok((eval, MemberSource::Read)),
                Err(ReconcileError::Gateway(e)) if e.is_unknown_list() => self.rebind_gone(bound).await?,
                Err(e) => return Err(e),
            }
        }
        Ok((Evaluation::default(), MemberSource::NewList))
    }
}
