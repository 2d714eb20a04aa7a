//! Binding each rule to its list, and reading the list's members when the cache cannot give them.
//!
//! A rule's list is its remembered binding, else the oldest list of that exact name found by a
//! complete directory read, else a new one. After creating a list the directory is read again, so
//! two segsyncs that created the same name at once both bind the oldest and never split a segment.

use std::sync::Arc;

use super::{MemberSource, ReconcileError, Reconciler, Slot, read};
use crate::gateway::{ListInfo, Meter, sort_oldest_first};
use crate::ids::ListId;
use crate::rules::{Date, Rule};

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

    /// Binds the slot's rule to its list (creating it when none exists). Any failure is recorded
    /// in the slot.
    pub(super) async fn bind(&self, slot: &mut Slot, dry_run: bool, directory: Option<&[ListInfo]>) {
        match self.bind_list(slot, dry_run, directory).await {
            Ok((list, created)) => {
                slot.list = list;
                slot.created = created;
                if created {
                    slot.members_from = MemberSource::NewList;
                }
            }
            Err(e) => slot.error = Some(e),
        }
    }

    /// Reads the slot's list's members and judges each on its own record. A list deleted since
    /// it was bound is found or created again.
    pub(super) async fn read_members(&self, slot: &mut Slot, dry_run: bool, today: Date) {
        let result = async {
            // At most twice: a list deleted since it was bound is replaced by another of its name.
            for _ in 0..2 {
                let Some(list) = slot.list.clone().filter(|_| !slot.created) else { return Ok(()) };
                match read::members(&self.cancel, &slot.gateway, &self.engine, &slot.rule, &list, today).await {
                    Ok(eval) => {
                        slot.eval = eval;
                        slot.members_from = MemberSource::Read;
                        return Ok(());
                    }
                    Err(ReconcileError::Gateway(e)) if e.is_unknown_list() => {
                        tracing::warn!(rule = %slot.rule.name, list_id = %list, list = %slot.rule.list, "list gone");
                        let (list, created) = self.find_or_create(slot, dry_run, None).await?;
                        slot.list = list;
                        slot.created = created;
                        slot.members_from = MemberSource::NewList;
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
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
        if let Some(id) = self.state.binding(&self.account, &rule.name, &rule.list)? {
            // A remembered id is written only while the directory shows it under the rule's
            // LIST name: the list may have been renamed by hand, or the id may be another
            // account's list at the same URL. Without the directory the name is looked up.
            let named = match directory {
                Some(all) => all.iter().find(|l| l.id == id).map(|l| l.name.clone()),
                None => Some(
                    slot.gateway
                        .find_lists(&rule.list)
                        .await?
                        .into_iter()
                        .find(|l| l.id == id)
                        .map_or_else(|| "(not listed under that name)".to_owned(), |l| l.name),
                ),
            };
            match named {
                Some(name) if name == rule.list => return Ok((Some(id), false)),
                Some(name) => {
                    tracing::warn!(rule = %rule.name, list = %rule.list, list_id = %id, found = %name,
                        "list binding invalid");
                }
                None => tracing::warn!(rule = %rule.name, list_id = %id, list = %rule.list, "list gone"),
            }
            // Bound again by name, exactly as a first binding; nothing remembered of the old id
            // (its cached members) is used again.
            if !dry_run {
                self.state.forget_list(&self.account, &rule.name, &rule.list, &id)?;
            }
            return self.find_or_create(slot, dry_run, directory).await;
        }
        if let Some((old_name, old_id)) = self.state.other_binding(&self.account, &rule.name, &rule.list)? {
            tracing::info!(rule = %rule.name, old_list = %old_name, old_list_id = %old_id, list = %rule.list, "list changed");
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
                tracing::info!(rule = %rule.name, list = %rule.list, list_id = %list.id, "list created");
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
            self.state.bind(&self.account, &rule.name, &rule.list, &id)?;
        }
        Ok((Some(id), created))
    }

    /// The oldest of the lists carrying the rule's exact name (`found` is sorted oldest first),
    /// with a warning naming every id when there are several.
    fn oldest_of(rule: &Rule, found: Vec<ListInfo>) -> ListId {
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|l| l.id.as_str()).collect();
            tracing::warn!(rule = %rule.name, list = %rule.list, list_id = %found[0].id, list_ids = %ids.join(","),
                "list duplicates");
        }
        found.into_iter().next().map(|l| l.id).unwrap_or_else(|| ListId::from(""))
    }
}
