//! One reconcile pass over the rules due now: bind each rule to its list, read members and
//! candidates, plan, guard, apply in batches, record the run, and log one summary per rule.
//!
//! `plan` is pure; this module does the I/O around it. A failing rule never stops the others.

mod apply;
pub mod plan;
mod read;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono_tz::Tz;
use futures_util::future::join_all;
use rhai::Engine;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Guards;
use crate::gateway::{Gateway, GatewayError, ListInfo, Meter, ScanQuery, Usage, sort_oldest_first};
use crate::ids::{ContactId, ListId};
use crate::rules::{Date, Rule};
use crate::state::{RunRecord, State, StateError};
pub use plan::{Evaluation, Plan};

/// What started a run; logged and stored with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Startup,
    Cron,
    File,
    Reload,
    Manual,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Startup => "startup",
            Self::Cron => "cron",
            Self::File => "file",
            Self::Reload => "reload",
            Self::Manual => "manual",
        })
    }
}

/// How a rule's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Everything planned was done and confirmed.
    Ok,
    /// A guard held the removals (adds were applied).
    Held,
    /// Nothing was decided or the writes stopped on an error.
    Failed,
    /// The writes went through but the gateway did not confirm all of them.
    Partial,
    /// Shutdown stopped the run; the next run converges.
    Interrupted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Held => "held",
            Self::Failed => "failed",
            Self::Partial => "partial",
            Self::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Internal(String),
    #[error("interrupted by shutdown; the next run converges")]
    Interrupted,
}

impl ReconcileError {
    /// Shutdown, not a fault.
    pub fn is_interrupted(&self) -> bool {
        matches!(self, Self::Interrupted | Self::Gateway(GatewayError::Cancelled { .. }))
    }
}

/// How the candidates of a pass were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadKind {
    /// One scan of all contacts served every rule.
    SharedScan,
    /// Each rule read its own filtered non-members.
    OwnRead,
}

/// Everything a pass needs; cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    pub gateway: Gateway,
    pub engine: Arc<Engine>,
    pub state: State,
    /// Names the account, for list bindings.
    pub endpoint: String,
    pub guards: Guards,
    pub time_zone: Tz,
    /// Once cancelled, no further write batch starts.
    pub cancel: CancellationToken,
}

#[derive(Debug, Clone)]
pub struct PassRequest {
    pub rules: Vec<Arc<Rule>>,
    pub trigger: Trigger,
    /// Plan only: create nothing, write nothing, record nothing.
    pub dry_run: bool,
    pub allow_mass_removal: bool,
    /// The run's frozen "today"; `None` means today in the configured time zone.
    pub today: Option<Date>,
}

/// The result of one rule's run.
#[derive(Debug, Clone)]
pub struct RuleReport {
    pub rule: Arc<Rule>,
    pub list_id: Option<ListId>,
    pub list_created: bool,
    pub members_before: u64,
    pub scanned: u64,
    pub matched: u64,
    pub eval_errors: u64,
    pub first_error: Option<String>,
    pub plan: Plan,
    pub added: u64,
    pub removed: u64,
    /// Non-members passing the rule's FILTER (the size of the rule's own read; for lower bounds).
    pub in_filter: u64,
    /// Requests this rule's run needed (a shared scan counts for every rule it served).
    pub usage: Usage,
    pub read: ReadKind,
    pub outcome: Outcome,
    /// Why it failed or was held.
    pub detail: Option<String>,
    pub duration: Duration,
}

#[derive(Debug, Clone)]
pub struct PassReport {
    pub rules: Vec<RuleReport>,
    pub read: ReadKind,
    /// Every request of the pass, once.
    pub usage: Usage,
    pub duration: Duration,
}

impl PassReport {
    pub fn any(&self, outcome: Outcome) -> bool {
        self.rules.iter().any(|r| r.outcome == outcome)
    }
}

/// One rule's progress through a pass.
struct Slot {
    rule: Arc<Rule>,
    meter: Arc<Meter>,
    gateway: Gateway,
    list: Option<ListId>,
    created: bool,
    eval: Evaluation,
    /// Non-members passing the rule's FILTER: what its own read would return.
    in_filter: u64,
    error: Option<ReconcileError>,
}

impl Reconciler {
    /// Runs one pass over `req.rules`; every rule gets a report, failed or not.
    pub async fn run_pass(&self, req: PassRequest) -> PassReport {
        // Every request of the pass ends when `cancel` fires, however the Reconciler was built.
        let linked = Self { gateway: self.gateway.cancelled_by(self.cancel.clone()), ..self.clone() };
        linked.pass(req).await
    }

    async fn pass(&self, req: PassRequest) -> PassReport {
        let started = Instant::now();
        let started_at = crate::state::now();
        let today = req.today.unwrap_or_else(|| Date(chrono::Utc::now().with_timezone(&self.time_zone).date_naive()));
        let pass_meter = Arc::new(Meter::default());
        let mut slots: Vec<Slot> = req
            .rules
            .iter()
            .map(|rule| {
                let meter = Arc::new(Meter::default());
                Slot {
                    rule: rule.clone(),
                    gateway: self.gateway.metered(meter.clone()),
                    meter,
                    list: None,
                    created: false,
                    eval: Evaluation::default(),
                    in_filter: 0,
                    error: None,
                }
            })
            .collect();

        // 1. Bind each rule to its list and judge the current members on their own records.
        let directory = self.list_directory(&slots, &pass_meter).await;
        join_all(slots.iter_mut().map(|slot| self.read_members(slot, req.dry_run, today, directory.as_deref()))).await;

        // 2. Read candidates: one shared scan, or each rule's own filtered read of non-members.
        let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].error.is_none()).collect();
        let read = self.choose_read(&slots, &live);
        let shared_meter = Arc::new(Meter::default());
        self.read_candidates(&mut slots, &live, read, &shared_meter, today).await;

        // 3. Plan, guard and apply each rule; one rule's failure is not another's.
        let shared_usage = shared_meter.usage();
        let meters: Vec<Arc<Meter>> = slots.iter().map(|s| s.meter.clone()).collect();
        let reports =
            join_all(slots.into_iter().map(|slot| self.finish(slot, &req, read, &shared_usage, started))).await;
        let mut usage = shared_usage.clone();
        for meter in meters.iter().chain([&pass_meter]) {
            add(&mut usage, &meter.usage());
        }
        for report in &reports {
            self.record(report, req.trigger, &started_at, req.dry_run).await;
        }
        let report = PassReport { rules: reports, read, usage, duration: started.elapsed() };
        tracing::info!(
            trigger = %req.trigger,
            rules = report.rules.len(),
            read_plan = ?read,
            api_requests = report.usage.total_requests(),
            requests = %serde_json::to_string(&report.usage.requests).unwrap_or_default(),
            retries = report.usage.retries,
            duration_ms = report.duration.as_millis() as u64,
            dry_run = req.dry_run,
            "pass finished"
        );
        report
    }

    /// Every list of the account (a complete directory read), when several rules need a lookup;
    /// `None` means "look each name up".
    async fn list_directory(&self, slots: &[Slot], meter: &Arc<Meter>) -> Option<Vec<ListInfo>> {
        let unbound = slots
            .iter()
            .filter(|s| !matches!(self.state.binding(&self.endpoint, &s.rule.name, &s.rule.list), Ok(Some(_))))
            .count();
        if unbound < 2 {
            return None;
        }
        match self.gateway.metered(meter.clone()).lists(None).await {
            Ok(lists) => Some(lists),
            Err(e) => {
                tracing::debug!(error = %e, "listing all lists failed; looking each name up instead");
                None
            }
        }
    }

    async fn read_members(&self, slot: &mut Slot, dry_run: bool, today: Date, directory: Option<&[ListInfo]>) {
        let result = async {
            let (list, created) = self.bind_list(slot, dry_run, directory).await?;
            slot.list = list.clone();
            slot.created = created;
            let Some(list) = list.filter(|_| !created) else { return Ok(()) };
            match read::members(&self.cancel, &slot.gateway, &self.engine, &slot.rule, &list, today).await {
                Ok(eval) => {
                    slot.eval = eval;
                    Ok(())
                }
                Err(ReconcileError::Gateway(e)) if e.is_unknown_list() => {
                    tracing::warn!(rule = %slot.rule.name, list_id = %list, list = %slot.rule.list, "the rule's list no longer exists on the gateway; binding it again");
                    let (list, created) = self.find_or_create(slot, dry_run, None).await?;
                    slot.list = list;
                    slot.created = created;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        }
        .await;
        if let Err(e) = result {
            slot.error = Some(e);
        }
    }

    /// The rule's list: its binding, else an existing list of that exact name, else a new one.
    async fn bind_list(
        &self,
        slot: &Slot,
        dry_run: bool,
        directory: Option<&[ListInfo]>,
    ) -> Result<(Option<ListId>, bool), ReconcileError> {
        let rule = &slot.rule;
        if let Some(id) = self.state.binding(&self.endpoint, &rule.name, &rule.list)? {
            return Ok((Some(id), false));
        }
        if let Some((old_name, old_id)) = self.state.other_binding(&self.endpoint, &rule.name, &rule.list)? {
            tracing::info!(rule = %rule.name, old_list = %old_name, old_list_id = %old_id, list = %rule.list,
                "the rule's LIST changed; binding the new list and leaving the old one untouched");
        }
        self.find_or_create(slot, dry_run, directory).await
    }

    async fn find_or_create(
        &self,
        slot: &Slot,
        dry_run: bool,
        directory: Option<&[ListInfo]>,
    ) -> Result<(Option<ListId>, bool), ReconcileError> {
        let rule = &slot.rule;
        let found = match directory {
            Some(all) => {
                let mut named: Vec<ListInfo> = all.iter().filter(|l| l.name == rule.list).cloned().collect();
                sort_oldest_first(&mut named);
                named
            }
            None => slot.gateway.find_lists(&rule.list).await?,
        };
        let (id, created) = match found.first() {
            Some(_) => (Self::oldest_of(rule, found), false),
            None if dry_run => return Ok((None, true)),
            None => {
                let list = slot.gateway.create_list(&rule.list, &rule.description).await?;
                tracing::info!(rule = %rule.name, list = %rule.list, list_id = %list.id, "created the rule's list");
                // Another segsync may have created the same list meanwhile: read the directory
                // again and bind the oldest of that name, so a segment is never split.
                let mut again = slot.gateway.find_lists(&rule.list).await?;
                if !again.iter().any(|l| l.id == list.id) {
                    again.push(list.clone());
                    sort_oldest_first(&mut again);
                }
                let oldest = Self::oldest_of(rule, again);
                let created = oldest == list.id;
                (oldest, created)
            }
        };
        if !dry_run {
            self.state.bind(&self.endpoint, &rule.name, &rule.list, &id)?;
        }
        Ok((Some(id), created))
    }

    /// The oldest of the lists carrying the rule's exact name (`found` is sorted oldest first),
    /// with a warning naming every id when there are several.
    fn oldest_of(rule: &Rule, found: Vec<ListInfo>) -> ListId {
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|l| l.id.as_str()).collect();
            tracing::warn!(rule = %rule.name, list = %rule.list, list_id = %found[0].id, list_ids = %ids.join(","),
                "several lists carry this exact name; using the oldest and writing only to it");
        }
        found.into_iter().next().map(|l| l.id).unwrap_or_else(|| ListId::from(""))
    }

    /// Evaluates the candidates of the `live` slots, read the `read` way, into each slot.
    async fn read_candidates(
        &self,
        slots: &mut [Slot],
        live: &[usize],
        read: ReadKind,
        shared: &Arc<Meter>,
        today: Date,
    ) {
        // Members are shared with the evaluating threads, then handed back (no copy of big sets).
        let members: Vec<Arc<HashSet<ContactId>>> =
            live.iter().map(|&i| Arc::new(std::mem::take(&mut slots[i].eval.members))).collect();
        let found: Vec<(Vec<usize>, Result<read::Candidates, ReconcileError>)> = match read {
            ReadKind::SharedScan => {
                let targets = live
                    .iter()
                    .zip(&members)
                    .map(|(&i, m)| read::Target { rule: slots[i].rule.clone(), members: m.clone() })
                    .collect();
                let gw = self.gateway.metered(shared.clone());
                let result =
                    read::candidates(&self.cancel, &gw, &self.engine, &ScanQuery::default(), targets, today).await;
                vec![(live.to_vec(), result)]
            }
            ReadKind::OwnRead => {
                let reads = live.iter().zip(&members).map(|(&i, m)| self.own_read(&slots[i], m.clone(), today));
                live.iter().map(|&i| vec![i]).zip(join_all(reads).await).collect()
            }
        };
        for (&i, m) in live.iter().zip(members) {
            slots[i].eval.members = Arc::try_unwrap(m).unwrap_or_else(|shared| (*shared).clone());
        }
        let mut estimates = Vec::new();
        for (indexes, result) in found {
            match result {
                Ok(found) => {
                    estimates.extend(Self::estimates(slots, &indexes, &found, read));
                    for ((&i, part), in_filter) in indexes.iter().zip(found.per_target).zip(found.in_filter) {
                        slots[i].eval.merge(part);
                        slots[i].in_filter = in_filter;
                    }
                }
                Err(e) if e.is_interrupted() => {
                    for &i in &indexes {
                        slots[i].error = Some(ReconcileError::Interrupted);
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    for &i in &indexes {
                        slots[i].error = Some(ReconcileError::Internal(format!("reading contacts: {text}")));
                    }
                }
            }
        }
        let (state, endpoint) = (self.state.clone(), self.endpoint.clone());
        match tokio::task::spawn_blocking(move || state.set_estimates(&endpoint, &estimates)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not store the read-planning estimates"),
            Err(e) => tracing::warn!(error = %e, "could not store the read-planning estimates"),
        }
    }

    /// Shared scan or own reads: whichever the last-seen counts say costs fewer requests.
    fn choose_read(&self, slots: &[Slot], live: &[usize]) -> ReadKind {
        let page = u64::from(self.gateway.page_size());
        let pages = |n: u64| n.div_ceil(page).max(1);
        let contacts = self.state.estimate(&self.endpoint, "contacts").ok().flatten();
        let mut own_total = 0;
        for &i in live {
            let slot = &slots[i];
            let own = if slot.rule.filter.is_empty() {
                match contacts {
                    Some(n) => pages(n.saturating_sub(slot.eval.members.len() as u64)),
                    // Unknown size and a rule that must see everyone: only a scan will tell.
                    None => return ReadKind::SharedScan,
                }
            } else {
                let key = format!("candidates:{}", slot.rule.name);
                pages(self.state.estimate(&self.endpoint, &key).ok().flatten().unwrap_or(0))
            };
            own_total += own;
        }
        match contacts {
            Some(n) if own_total > pages(n) => ReadKind::SharedScan,
            _ => ReadKind::OwnRead,
        }
    }

    /// A rule's own read: its FILTER plus `notListIds` (when its list exists).
    async fn own_read(
        &self,
        slot: &Slot,
        members: Arc<HashSet<ContactId>>,
        today: Date,
    ) -> Result<read::Candidates, ReconcileError> {
        let query = ScanQuery {
            filters: slot.rule.filter_query(),
            not_list_ids: slot.list.iter().filter(|_| !slot.created).cloned().collect(),
            ..ScanQuery::default()
        };
        let target = read::Target { rule: slot.rule.clone(), members };
        read::candidates(&self.cancel, &slot.gateway, &self.engine, &query, vec![target], today).await
    }

    /// The counts the next pass plans its reads with, from what this read found.
    fn estimates(slots: &[Slot], indexes: &[usize], found: &read::Candidates, read: ReadKind) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        match (read, indexes) {
            (ReadKind::SharedScan, _) => out.push(("contacts".to_owned(), found.total)),
            // A rule's own unfiltered read of its non-members, plus its members, is everyone.
            (ReadKind::OwnRead, &[i]) if slots[i].rule.filter.is_empty() && !slots[i].created => {
                out.push(("contacts".to_owned(), found.total + slots[i].eval.members.len() as u64))
            }
            _ => {}
        }
        for (k, &i) in indexes.iter().enumerate() {
            if !slots[i].rule.filter.is_empty() {
                out.push((format!("candidates:{}", slots[i].rule.name), found.in_filter[k]));
            }
        }
        out
    }

    async fn finish(
        &self,
        slot: Slot,
        req: &PassRequest,
        read: ReadKind,
        shared: &Usage,
        started: Instant,
    ) -> RuleReport {
        let rule = slot.rule.clone();
        let members_before = slot.eval.members.len() as u64;
        let mut report = RuleReport {
            rule: rule.clone(),
            list_id: slot.list.clone(),
            list_created: slot.created,
            members_before,
            scanned: slot.eval.evaluated,
            matched: slot.eval.matched,
            eval_errors: slot.eval.errors,
            first_error: slot.eval.first_error.as_ref().map(|(id, e)| format!("contact {id}: {e}")),
            plan: Plan::default(),
            in_filter: slot.in_filter,
            added: 0,
            removed: 0,
            usage: Usage::default(),
            read,
            outcome: Outcome::Ok,
            detail: None,
            duration: Duration::ZERO,
        };
        if let Some(e) = slot.error {
            report.outcome = if e.is_interrupted() { Outcome::Interrupted } else { Outcome::Failed };
            report.detail = Some(e.to_string());
        } else {
            // Sorting a million ids is real CPU work: off the async workers.
            let (eval, mode, guards, allow) = (slot.eval, rule.mode, self.guards.clone(), req.allow_mass_removal);
            report.plan = tokio::task::spawn_blocking(move || plan::plan(&eval, mode, &guards, allow))
                .await
                .unwrap_or_else(|e| Plan { refused: Some(format!("planning failed: {e}")), ..Plan::default() });
            if let Some(why) = &report.plan.refused {
                report.outcome = Outcome::Failed;
                report.detail = Some(why.clone());
            } else if let (Some(list), false) = (&slot.list, req.dry_run) {
                let (done, error) = match apply::apply(&slot.gateway, list, &report.plan, &self.cancel).await {
                    Ok(done) => (done, None),
                    Err((done, e)) => (done, Some(e)),
                };
                report.added = done.added.done;
                report.removed = done.removed.done;
                if let Some(e) = error {
                    report.outcome = if e.is_interrupted() { Outcome::Interrupted } else { Outcome::Failed };
                    report.detail = Some(e.to_string());
                } else if let Some(why) = done.unconfirmed() {
                    tracing::warn!(rule = %rule.name, list_id = %list, detail = %why, "the gateway did not confirm every write");
                    report.outcome = Outcome::Partial;
                    report.detail = Some(why);
                }
            }
            if report.outcome == Outcome::Ok
                && let Some(why) = &report.plan.held
            {
                report.outcome = Outcome::Held;
                report.detail = Some(why.clone());
            }
        }
        report.usage = slot.meter.usage();
        if read == ReadKind::SharedScan {
            add(&mut report.usage, shared);
        }
        report.duration = started.elapsed();
        report
    }

    /// Stores the run and logs its one summary event.
    async fn record(&self, r: &RuleReport, trigger: Trigger, started_at: &str, dry_run: bool) {
        let record = RunRecord {
            rule: r.rule.name.to_string(),
            list_id: r.list_id.as_ref().map(ToString::to_string).unwrap_or_default(),
            trigger: trigger.to_string(),
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
            outcome: r.outcome.to_string(),
            detail: r.detail.clone().unwrap_or_default(),
        };
        if dry_run {
            return;
        }
        let state = self.state.clone();
        let stored = record.clone();
        match tokio::task::spawn_blocking(move || state.record_run(&stored)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(rule = %record.rule, error = %e, "could not record the run"),
            Err(e) => tracing::error!(rule = %record.rule, error = %e, "could not record the run"),
        }
        macro_rules! summary {
            ($level:ident) => {
                tracing::$level!(
                    rule = %record.rule,
                    list_id = %record.list_id,
                    trigger = %record.trigger,
                    rule_hash = %record.rule_hash,
                    scanned = record.scanned,
                    matched = record.matched,
                    members_before = record.members_before,
                    added = record.added,
                    removed = record.removed,
                    to_add = r.plan.to_add.len(),
                    to_remove = r.plan.to_remove.len(),
                    eval_errors = record.eval_errors,
                    first_eval_error = r.first_error.as_deref().unwrap_or(""),
                    api_requests = record.api_requests,
                    retries = record.retries,
                    read_plan = ?r.read,
                    duration_ms = record.duration_ms,
                    outcome = %record.outcome,
                    detail = %record.detail,
                    "rule run"
                )
            };
        }
        match r.outcome {
            Outcome::Ok => summary!(info),
            Outcome::Held | Outcome::Partial | Outcome::Interrupted => summary!(warn),
            Outcome::Failed => summary!(error),
        }
    }
}

fn add(into: &mut Usage, other: &Usage) {
    for (k, v) in &other.requests {
        *into.requests.entry(k).or_default() += v;
    }
    into.retries += other.retries;
    into.throttled += other.throttled;
    into.waited_ms += other.waited_ms;
}

/// A few ids, for people.
pub fn sample(ids: &[ContactId], n: usize) -> Vec<&str> {
    ids.iter().take(n).map(ContactId::as_str).collect()
}
