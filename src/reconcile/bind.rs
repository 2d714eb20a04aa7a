//! Stage 2, `bind`: each rule's list. Its remembered binding while the directory shows that id
//! under the rule's `LIST` name, else the oldest list of that exact name found by a complete
//! directory read, else a new one. After creating a list the directory is read again, so two
//! segsyncs that created the same name at once both bind the oldest and never split a segment.
//! What changed in the binding is written by `commit`.

use std::sync::Arc;

use super::{Flow, Job, ReconcileError, Reconciler, Stopped};
use crate::gateway::{ListInfo, Meter, sort_oldest_first};
use crate::ids::ListId;
use crate::rules::Rule;

/// A rule bound to its list.
pub(super) struct Bound {
    pub job: Job,
    /// `None` only in a dry run whose list does not exist yet (or a rule stopped before binding).
    pub list: Option<ListId>,
    /// The list is new this run (or would be, in a dry run): it has no members.
    pub created: bool,
    /// A remembered id the directory no longer shows under the rule's name (forgotten at commit).
    pub forget: Option<ListId>,
    /// A binding made this run (stored at commit).
    pub bind: Option<ListId>,
}

impl Bound {
    /// A job that stopped before it was bound.
    pub fn unbound(job: Job) -> Self {
        Self { job, list: None, created: false, forget: None, bind: None }
    }

    /// A copy of what a report needs (the rule, its meter and list), to report a stage that lost
    /// the rest.
    pub fn shell(&self) -> Self {
        let job = Job {
            rule: self.job.rule.clone(),
            meter: self.job.meter.clone(),
            gateway: self.job.gateway.clone(),
            recalled: Default::default(),
        };
        Self {
            job,
            list: self.list.clone(),
            created: self.created,
            forget: self.forget.clone(),
            bind: self.bind.clone(),
        }
    }

    /// Takes the list `found` (by name, or created).
    fn rebind(&mut self, found: (Option<ListId>, bool)) {
        let (list, created) = found;
        self.bind = list.clone();
        self.list = list;
        self.created = created;
    }
}

impl Reconciler {
    /// Every list of the account (a complete directory read): it binds new rules without a
    /// lookup each, and its member counts tell which cached lists still hold. `None` when it
    /// failed: each name is then looked up, and no cache is trusted.
    pub(super) async fn list_directory(&self, meter: &Arc<Meter>) -> Option<Vec<ListInfo>> {
        match self.gateway.metered(meter.clone()).lists(None).await {
            Ok(lists) => Some(lists),
            Err(e) => {
                tracing::debug!(error = %e, "listing all lists failed; looking each name up instead");
                None
            }
        }
    }

    /// Binds the job's rule to its list, or marks the list new (created when the run writes).
    pub(super) async fn bind(&self, job: Flow<Job>, directory: Option<&[ListInfo]>) -> Flow<Bound> {
        let mut bound = Bound::unbound(job?);
        match self.bind_list(&mut bound, directory).await {
            Ok(()) => Ok(bound),
            Err(e) => Err(Stopped::new(bound, e)),
        }
    }

    /// The rule's list: its binding, else an existing list of that exact name, else a new one.
    async fn bind_list(&self, bound: &mut Bound, directory: Option<&[ListInfo]>) -> Result<(), ReconcileError> {
        let (rule, recalled) = (&bound.job.rule, &bound.job.recalled);
        if let Some(id) = recalled.binding.clone() {
            // A remembered id is written only while the directory shows it under the rule's
            // LIST name: the list may have been renamed by hand, or the id may be another
            // account's list at the same URL. Without the directory the name is looked up.
            let named = match directory {
                Some(all) => all.iter().find(|l| l.id == id).map(|l| l.name.clone()),
                None => Some(
                    bound
                        .job
                        .gateway
                        .find_lists(&rule.list)
                        .await?
                        .into_iter()
                        .find(|l| l.id == id)
                        .map_or_else(|| "(not listed under that name)".to_owned(), |l| l.name),
                ),
            };
            match named {
                Some(name) if name == rule.list => {
                    bound.list = Some(id);
                    return Ok(());
                }
                Some(name) => {
                    tracing::warn!(rule = %rule.name, list = %rule.list, list_id = %id, found = %name,
                        "list binding invalid");
                }
                None => tracing::warn!(rule = %rule.name, list_id = %id, list = %rule.list, "list gone"),
            }
            // Bound again by name, exactly as a first binding; nothing remembered of the old id
            // (its cached members) is used again.
            bound.forget = Some(id);
        } else if let Some((old_name, old_id)) = &recalled.other_binding {
            tracing::info!(rule = %rule.name, old_list = %old_name, old_list_id = %old_id, list = %rule.list, "list changed");
        }
        let found = self.find(bound, directory).await?;
        bound.rebind(found);
        Ok(())
    }

    /// The list of the rule's exact name (the oldest, if several); else `(None, true)`: a new list,
    /// created by `apply` only when the run writes (a rule that cannot judge creates nothing).
    pub(super) async fn find(
        &self,
        bound: &Bound,
        directory: Option<&[ListInfo]>,
    ) -> Result<(Option<ListId>, bool), ReconcileError> {
        let (rule, gateway) = (&bound.job.rule, &bound.job.gateway);
        let found = match directory {
            Some(all) => {
                let mut named: Vec<ListInfo> = all.iter().filter(|l| l.name == rule.list).cloned().collect();
                sort_oldest_first(&mut named);
                named
            }
            None => gateway.find_lists(&rule.list).await?,
        };
        if found.is_empty() {
            return Ok((None, true));
        }
        Ok((Some(oldest_of(rule, found)), false))
    }

    /// Creates the rule's new list, just before its first write. Another segsync may have created
    /// one of the same name meanwhile: the directory is read again and the oldest of that name is
    /// bound, so a segment is never split.
    pub(super) async fn create(&self, bound: &mut Bound) -> Result<(), ReconcileError> {
        let (rule, gateway) = (&bound.job.rule, &bound.job.gateway);
        let list = gateway.create_list(&rule.list, &rule.description).await?;
        tracing::info!(rule = %rule.name, list = %rule.list, list_id = %list.id, "list created");
        // Another segsync may have created the same list meanwhile: read the directory again and
        // bind the oldest of that name, so a segment is never split.
        let mut again = gateway.find_lists(&rule.list).await?;
        if !again.iter().any(|l| l.id == list.id) {
            again.push(list.clone());
            sort_oldest_first(&mut again);
        }
        let oldest = oldest_of(rule, again);
        let created = oldest == list.id;
        bound.rebind((Some(oldest), created));
        Ok(())
    }

    /// After a member read found the bound list gone: binds the rule again by name.
    pub(super) async fn rebind_gone(&self, bound: &mut Bound) -> Result<(), ReconcileError> {
        let rule = &bound.job.rule;
        if let Some(list) = &bound.list {
            tracing::warn!(rule = %rule.name, list_id = %list, list = %rule.list, "list gone");
        }
        let found = self.find(bound, None).await?;
        bound.rebind(found);
        Ok(())
    }
}

/// The oldest of the lists carrying the rule's exact name (`found` is sorted oldest first, and
/// not empty), with a warning naming every id when there are several.
fn oldest_of(rule: &Rule, found: Vec<ListInfo>) -> ListId {
    if found.len() > 1 {
        let ids: Vec<&str> = found.iter().map(|l| l.id.as_str()).collect();
        tracing::warn!(rule = %rule.name, list = %rule.list, list_id = %found[0].id, list_ids = %ids.join(","),
            "list duplicates");
    }
    found.into_iter().next().map(|l| l.id).unwrap_or_else(|| ListId::from(""))
}
