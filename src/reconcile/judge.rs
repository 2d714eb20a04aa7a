//! Judging records as their pages arrive: a list's members (each on its own member record), and
//! candidates for several rules at once (each record converted once), on the gateway's blocking
//! threads. Contacts are streamed, never all held at once. A list whose members come from the
//! cache has them judged on the shared scan's records.

use std::sync::Arc;

use rhai::Engine;
use tokio_util::sync::CancellationToken;

use super::ReconcileError;
use super::partition::{Named, Unfolding};
use super::plan::Evaluation;
use crate::contact::{ContactRecord, Keep};
use crate::gateway::{Gateway, RECORD_BATCH, Records, Scan, ScanQuery};
use crate::ids::RuleName;
use crate::ids::{BitSet, ContactIdSet, IdHash, ListId, SetsTable};
use crate::rules::{Date, EvalError, Facts, FilterTerm, Learned, Lists, Mode, Observed, Rule};

/// Sibling groups' list names are hashed with foldhash (hashbrown's default), as findings' tallies.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// Folds a scan's page results in page order (the pages were judged on the gateway's blocking
/// threads as they were parsed). Returns the server's last reported total.
pub(super) async fn fold_pages<R>(
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
            part.member_fails(&record.id, rule.filter_failure(record));
            false
        }
        Err(e) => {
            part.error(&record.id, e);
            false
        }
    }
}

/// A cached member's record in a candidate read: seen, and in mirror mode judged (due a verdict
/// when it passes FILTER). A member judged on its member record, or an add_only member: nothing.
fn member_seen(
    target: &Target,
    record: &ContactRecord,
    (i, index): (usize, u32),
    seen: Option<&mut PageSeen>,
    learned: &Learned,
    due: &mut Vec<(usize, Option<u32>)>,
) {
    let Some(seen) = seen else { return };
    seen.seen.push(index);
    if target.rule.mode == Mode::Mirror {
        seen.eval.evaluated += 1;
        let judged = member_filter(&target.rule, record, &mut seen.eval);
        target.rule.observe(record, judged, &mut seen.eval.observed, learned);
        if judged {
            due.push((i, Some(index)));
        }
    }
}

/// The lists of one partitioned rule in a candidate read (its parts, sharing one `FILTER`, one
/// `fn list` and the fields they mention), judged as a group: a contact that is not a member of a
/// list is that list's candidate, and `fn list` names at most one list, so a record costs the group
/// one `FILTER` verdict, one finding and one `fn list` call, plus a membership lookup per list.
struct Siblings {
    /// The partitioned rule's slot (`named`).
    slot: usize,
    /// The parts, by target index.
    targets: Vec<usize>,
    /// Each part's list name, to its target index.
    by_list: HashMap<String, usize>,
    /// Every part's members in one table (positions in `targets`): one lookup a record instead of
    /// one per list.
    members: SetsTable,
    /// What the read learned of the group's rule, from every record (the group's findings).
    learned: Learned,
}

impl Siblings {
    /// The groups of `targets`: parts of one partitioned rule (`parent_slot`) without a derived
    /// filter (which is per target), whose `FILTER` and mentioned fields are their rule's.
    fn of(targets: &[Target], parent_slot: &[Option<usize>]) -> Vec<Siblings> {
        let mut groups: Vec<(usize, Vec<usize>, HashMap<String, usize>)> = Vec::new();
        for (i, target) in targets.iter().enumerate() {
            let Some(slot) = parent_slot[i].filter(|_| target.derived.is_empty()) else { continue };
            let same = |(s, parts, _): &(usize, Vec<usize>, HashMap<String, usize>)| {
                let first = &targets[parts[0]].rule;
                *s == slot && first.filter == target.rule.filter && first.mentions == target.rule.mentions
            };
            match groups.iter_mut().find(|g| same(g)) {
                Some((_, parts, by_list)) if !by_list.contains_key(&target.rule.list) => {
                    parts.push(i);
                    by_list.insert(target.rule.list.clone(), i);
                }
                Some(_) => {}
                None => groups.push((slot, vec![i], HashMap::from([(target.rule.list.clone(), i)]))),
            }
        }
        // Parts beyond what a table entry can name are judged one by one.
        groups
            .into_iter()
            .filter_map(|(slot, parts, by_list)| {
                let members = SetsTable::new(&parts.iter().map(|&i| &*targets[i].members).collect::<Vec<_>>())?;
                let learned = Learned::of(&targets[parts[0]].rule);
                Some(Siblings { slot, targets: parts, by_list, members, learned })
            })
            .collect()
    }

    /// The parts `id` is a member of, each with its index in that part's set, into `out`.
    fn member_of(&self, targets: &[Target], id: &str, hash: IdHash, out: &mut Vec<(usize, u32)>) {
        self.members.holders(|p| &targets[self.targets[p]].members, id, hash, out);
        for (i, _) in out.iter_mut() {
            *i = self.targets[*i];
        }
    }
}

/// One page's record of a sibling group's candidates: every record read, counted once.
#[derive(Default, Clone)]
struct GroupPage {
    records: u64,
    /// Records passing the group's `FILTER`.
    in_filter: u64,
    /// Findings on every record read (each list's members' share is taken off per list).
    observed: Observed,
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
    let learned = Learned::of(rule);
    let mut eval = Evaluation::default();
    let scan = gw.scan_with(
        &ScanQuery { list_ids: vec![list.clone()], keep: keep([(&**rule, &[][..])]), ..ScanQuery::default() },
        move |records: &mut Records<'_, ContactRecord>| {
            let mut part = Evaluation::default();
            for mut record in records {
                part.members.insert(record.id.as_str());
                // add_only never removes, so its members need no verdict.
                if rule_for_work.mode == Mode::Mirror {
                    part.evaluated += 1;
                    let judged = member_filter(&rule_for_work, &record, &mut part);
                    rule_for_work.observe(&record, judged, &mut part.observed, &learned);
                    if judged {
                        // The member's last use: Rhai may take the record instead of a copy.
                        let (verdict, facts) = rule_for_work.judge_member(&engine, &mut record, true, today);
                        part.member_verdict(&rule_for_work, &record.id, verdict, &facts);
                    }
                }
            }
            part
        },
    );
    fold_pages(scan, cancel, |part| eval.merge(part)).await?;
    Ok(eval)
}

/// What a read judged by `rules` (each with the derived filter it counts) keeps of each contact:
/// the fields they read, when every one is judged natively or reads only named fields; else every
/// field (`None`). When every one is judged natively, its records are read into slots of the paths
/// they read ([`Keep::with_layout`]), not maps.
pub(super) fn keep<'a>(rules: impl IntoIterator<Item = (&'a Rule, &'a [FilterTerm])>) -> Option<Arc<Keep>> {
    let mut names = Vec::new();
    let mut paths = Some(Vec::new());
    for (rule, derived) in rules {
        names.extend(rule.reads()?);
        names.extend(derived.iter().map(|t| t.top_field().to_owned()));
        if let (Some(all), Some(read)) = (&mut paths, rule.read_paths()) {
            all.extend(read);
            all.extend(derived.iter().map(|t| t.path().clone()));
        } else {
            paths = None;
        }
    }
    let keep = Keep::new(names);
    Some(Arc::new(match paths {
        Some(paths) => keep.with_layout(paths),
        None => keep,
    }))
}

/// Whether a record passes every term, as the server would judge it.
fn passes(terms: &[FilterTerm], record: &ContactRecord) -> bool {
    terms.iter().all(|t| t.judge(record) == Ok(true))
}

/// A rule reading candidates.
pub struct Target {
    pub rule: Arc<Rule>,
    pub members: Arc<ContactIdSet>,
    /// The members come from the cache: each one the read returns is marked seen and (in mirror
    /// mode) judged on that record. Otherwise they were judged on their member records already,
    /// and are skipped.
    pub cached: bool,
    /// The filter derived from `matches`: not applied here (`matches` decides), only counted, so
    /// the planner knows how large the rule's own read would be.
    pub derived: Vec<FilterTerm>,
}

/// What a read saw of a cached list's members (indexes into the cached set).
#[derive(Debug, Clone, Default)]
pub struct CachedSeen {
    /// Verdicts on the members' records from this read (mirror mode).
    pub eval: Evaluation,
    pub seen: BitSet,
    /// `matches` said true: were one of them not a member after all, it is a candidate to add.
    pub matched: BitSet,
}

/// One page's part of a [`CachedSeen`]: indexes, not bit sets the size of the list.
#[derive(Default)]
struct PageSeen {
    eval: Evaluation,
    seen: Vec<u32>,
    matched: Vec<u32>,
}

impl CachedSeen {
    fn merge(&mut self, page: PageSeen) {
        self.eval.merge(page.eval);
        for i in page.seen {
            self.seen.set(i);
        }
        for i in page.matched {
            self.matched.set(i);
        }
    }
}

/// What a candidate read found, per target, plus counts the planner remembers.
pub struct Found {
    /// Per target: its candidates (non-members) only.
    pub per_target: Vec<Evaluation>,
    /// Per target with a cached list: its members as this read saw them.
    pub cached: Vec<Option<CachedSeen>>,
    /// Per target: non-members passing its FILTER and derived filter (the size of its own read).
    pub in_filter: Vec<u64>,
    /// Per unfolding partitioned rule: the lists its contacts name that it has no part for yet.
    pub named: Vec<Named>,
    pub total: u64,
}

/// Reads `query` once and evaluates every target on each contact (converted once): members of a
/// cached list as members, everyone else as a candidate. For each `unfolding` partitioned rule,
/// counts the lists its contacts (those passing its FILTER) name that it has no part for.
pub async fn candidates(
    cancel: &CancellationToken,
    gw: &Gateway,
    engine: &Arc<Engine>,
    query: &ScanQuery,
    targets: Vec<Target>,
    unfolding: &[Unfolding],
    today: Date,
) -> Result<Found, ReconcileError> {
    let n = targets.len();
    let reading = targets.iter().map(|t| (&*t.rule, &t.derived[..]));
    let keep = keep(reading.chain(unfolding.iter().map(|u| (&*u.parent, &[][..]))));
    let query = &ScanQuery { keep, ..query.clone() };
    let targets = Arc::new(targets);
    let unfolding = Arc::new(unfolding.to_vec());
    let mut out = Found {
        per_target: vec![Evaluation::default(); n],
        cached: targets
            .iter()
            .map(|t| {
                t.cached.then(|| CachedSeen {
                    seen: BitSet::with_len(t.members.len()),
                    matched: BitSet::with_len(t.members.len()),
                    ..CachedSeen::default()
                })
            })
            .collect(),
        in_filter: vec![0; n],
        named: vec![Named::default(); unfolding.len()],
        total: 0,
    };
    // Targets (and unfolding rules) with one FILTER, such as a partitioned rule's lists, judge it
    // once per record: `filter_group[k]` is the first of them, whose verdict the others reuse.
    let filters: Vec<&[FilterTerm]> =
        targets.iter().map(|t| &t.rule.filter[..]).chain(unfolding.iter().map(|u| &u.parent.filter[..])).collect();
    let filter_group: Vec<usize> =
        filters.iter().map(|f| filters.iter().position(|g| g == f).unwrap_or_default()).collect();
    // Each partitioned rule whose `fn list` the read calls has a slot: the unfolding rules' first
    // (in their order), then the parents of the other parts. `parent_slot[i]`: target `i`'s.
    let mut parents: Vec<&RuleName> = unfolding.iter().map(|u| &u.parent.name).collect();
    let parent_slot: Vec<Option<usize>> = targets
        .iter()
        .map(|t| match &t.rule.lists {
            Lists::Partition { parent } => Some(parents.iter().position(|p| *p == parent).unwrap_or_else(|| {
                parents.push(parent);
                parents.len() - 1
            })),
            _ => None,
        })
        .collect();
    let slots = parents.len();
    let siblings = Siblings::of(&targets, &parent_slot);
    // The targets judged one by one: every one not in a sibling group.
    let single: Vec<usize> = (0..n).filter(|i| !siblings.iter().any(|s| s.targets.contains(i))).collect();
    // Their members in one table too (positions in `single`), unless too many to pack.
    let single_members = SetsTable::new(&single.iter().map(|&i| &*targets[i].members).collect::<Vec<_>>());
    // What the read learned of each target's rule, from its candidates and its cached members alike
    // (their findings merge into one): a FILTER term every member passes is not tallied on every
    // candidate of a pass that changes nothing, where no candidate passes it.
    let learned: Vec<Learned> = targets.iter().map(|t| Learned::of(&t.rule)).collect();
    let (engine, work_targets, work_unfolding) = (engine.clone(), targets.clone(), unfolding.clone());
    let scan = gw.scan_with(query, move |records: &mut Records<'_, ContactRecord>| {
        let targets = &work_targets;
        let mut filtered: Vec<Option<bool>> = vec![None; filter_group.len()];
        let mut new_lists = vec![Named::default(); work_unfolding.len()];
        let mut parts = vec![Evaluation::default(); targets.len()];
        let mut cached: Vec<Option<PageSeen>> = targets.iter().map(|t| t.cached.then(PageSeen::default)).collect();
        let mut in_filter = vec![0u64; targets.len()];
        // (target, cached member index) for each `matches` call this record needs.
        let mut due: Vec<(usize, Option<u32>)> = Vec::with_capacity(targets.len());
        // What each partitioned rule's `fn list` said of this record, by slot.
        let mut named: Vec<Option<Result<Option<String>, EvalError>>> = vec![None; slots];
        let mut groups = vec![GroupPage::default(); siblings.len()];
        // Per target: the page's records it holds as members, and of those, how many pass FILTER.
        let mut hits = vec![(0u64, 0u64); targets.len()];
        // The targets of one group this record is a member of, with its index in each.
        let mut members_here: Vec<(usize, u32)> = Vec::new();
        // A batch of records, their ids' hashes, and the single targets each is a member of (the
        // `at`th one's: `single_held[single_ends[at - 1]..single_ends[at]]`, by position in
        // `single`), looked up for the batch at once, so the lookups' cache misses overlap.
        let mut batch: Vec<ContactRecord> = Vec::with_capacity(RECORD_BATCH);
        let (mut single_held, mut single_ends) = (Vec::new(), Vec::new());
        loop {
            batch.extend(records.by_ref().take(RECORD_BATCH));
            if batch.is_empty() {
                break;
            }
            let hashes: Vec<IdHash> = batch.iter().map(|r| IdHash::of(r.id.as_str())).collect();
            if let Some(table) = &single_members {
                let ids: Vec<(&str, IdHash)> =
                    batch.iter().map(|r| r.id.as_str()).zip(hashes.iter().copied()).collect();
                table.holders_of_each(|p| &targets[single[p]].members, &ids, &mut single_held, &mut single_ends);
            }
            for (at, mut record) in batch.drain(..).enumerate() {
                due.clear();
                filtered.fill(None);
                let hash = hashes[at];
                let mut passes_filter = |k: usize, rule: &Rule| {
                    *filtered[filter_group[k]].get_or_insert_with(|| rule.passes_filter(&record))
                };
                let single_here = match at {
                    _ if single_members.is_none() => &[][..],
                    0 => &single_held[..single_ends[0]],
                    _ => &single_held[single_ends[at - 1]..single_ends[at]],
                };
                for (p, &i) in single.iter().enumerate() {
                    let target = &targets[i];
                    let member = match &single_members {
                        Some(_) => single_here.iter().find(|(q, _)| *q == p).map(|&(_, index)| index),
                        None => target.members.index_of_hashed(record.id.as_str(), hash),
                    };
                    let Some(index) = member else {
                        parts[i].evaluated += 1;
                        let in_filter_now = passes_filter(i, &target.rule);
                        target.rule.observe(&record, in_filter_now, &mut parts[i].observed, &learned[i]);
                        if in_filter_now {
                            if target.derived.is_empty() || passes(&target.derived, &record) {
                                in_filter[i] += 1;
                            }
                            due.push((i, None));
                        }
                        continue;
                    };
                    member_seen(target, &record, (i, index), cached[i].as_mut(), &learned[i], &mut due);
                }
                // A rule read by Rhai copies the contact, except the last, which takes the record itself.
                named.fill(None);
                // Which list each unfolding rule's `fn list` names (shared with its parts below).
                for (k, (u, new)) in work_unfolding.iter().zip(&mut new_lists).enumerate() {
                    if !passes_filter(targets.len() + k, &u.parent) {
                        continue;
                    }
                    let listed = u.parent.list_of_record(&engine, &record, today);
                    if let Ok(Some(list)) = &listed
                        && !u.known.contains(list)
                    {
                        new.add(list, 1, u.max);
                    }
                    named[k] = Some(listed);
                }
                // Each sibling group: its members as above, and its candidates as one, since `fn list`
                // names at most one of its lists.
                for (group, page) in siblings.iter().zip(&mut groups) {
                    let first = &targets[group.targets[0]].rule;
                    let in_filter_now = passes_filter(group.targets[0], first);
                    page.records += 1;
                    page.in_filter += u64::from(in_filter_now);
                    first.observe(&record, in_filter_now, &mut page.observed, &group.learned);
                    group.member_of(targets, record.id.as_str(), hash, &mut members_here);
                    for &(i, index) in &members_here {
                        hits[i].0 += 1;
                        hits[i].1 += u64::from(in_filter_now);
                        member_seen(&targets[i], &record, (i, index), cached[i].as_mut(), &learned[i], &mut due);
                    }
                    if !in_filter_now {
                        continue;
                    }
                    match named[group.slot].get_or_insert_with(|| first.list_of_record(&engine, &record, today)) {
                        Ok(Some(list)) => {
                            if let Some(&i) = group.by_list.get(list.as_str())
                                && members_here.iter().all(|(m, _)| *m != i)
                            {
                                parts[i].matched += 1;
                                parts[i].candidates_matching.push(record.id.clone());
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            for &i in group.targets.iter().filter(|&&i| members_here.iter().all(|(m, _)| *m != i)) {
                                parts[i].error(&record.id, e.clone());
                            }
                        }
                    }
                }
                for (k, (i, member)) in due.iter().enumerate() {
                    let (i, last) = (*i, k + 1 == due.len());
                    let rule = &targets[i].rule;
                    // The lists of one partitioned rule share one `fn list` call per record, whether
                    // the record is a member of the list or a candidate.
                    let listed = parent_slot[i].map(|slot| {
                        match named[slot].get_or_insert_with(|| rule.list_of_record(&engine, &record, today)) {
                            Ok(listed) => Ok(listed.as_deref() == Some(rule.list.as_str())),
                            Err(e) => Err(e.clone()),
                        }
                    });
                    if let (Some(index), Some(seen)) = (member, cached[i].as_mut()) {
                        let (verdict, facts) = match listed {
                            Some(verdict) => {
                                let facts = if verdict == Ok(false) { rule.facts(&record) } else { Facts::default() };
                                (verdict, facts)
                            }
                            None => rule.judge_member(&engine, &mut record, last, today),
                        };
                        if verdict == Ok(true) {
                            seen.matched.push(*index);
                        }
                        seen.eval.member_verdict(rule, &record.id, verdict, &facts);
                        continue;
                    }
                    let verdict = match listed {
                        Some(verdict) => verdict,
                        None if last && !rule.reads_in_place() => {
                            rule.call_matches(&engine, rule.take_record(&mut record), today)
                        }
                        None => rule.call_record(&engine, &record, today),
                    };
                    let part = &mut parts[i];
                    match verdict {
                        Ok(true) => {
                            part.matched += 1;
                            part.candidates_matching.push(record.id.clone());
                        }
                        Ok(false) => {}
                        Err(e) => part.error(&record.id, e),
                    }
                }
            }
        }
        // A group's candidates are the page's records but each list's members.
        for (group, page) in siblings.iter().zip(groups) {
            for &i in &group.targets {
                let (records, passing) = hits[i];
                parts[i].evaluated += page.records - records;
                in_filter[i] += page.in_filter - passing;
                let mut observed = page.observed.clone();
                observed.discount(&targets[i].rule, records, passing);
                parts[i].observed.merge(observed);
            }
        }
        (parts, cached, in_filter, new_lists)
    });
    out.total = fold_pages(scan, cancel, |(parts, cached, in_filter, new_lists)| {
        for ((all, new), u) in out.named.iter_mut().zip(new_lists).zip(unfolding.iter()) {
            all.merge(new, u.max);
        }
        for (i, (part, seen)) in parts.into_iter().zip(cached).enumerate() {
            out.per_target[i].merge(part);
            if let (Some(all), Some(seen)) = (out.cached[i].as_mut(), seen) {
                all.merge(seen);
            }
            out.in_filter[i] += in_filter[i];
        }
    })
    .await?;
    Ok(out)
}

/// What one unfiltered page of contacts shows about `rule`'s FILTER: one request, never a decision.
pub async fn filter_sample(
    cancel: &CancellationToken,
    gw: &Gateway,
    rule: &Arc<Rule>,
) -> Result<Observed, ReconcileError> {
    let page = u64::from(gw.paging(crate::gateway::Resource::Contacts).page_size);
    let (work_rule, learned) = (rule.clone(), Learned::of(rule));
    let scan = gw.scan_with(
        &ScanQuery { sample: Some(page), ..ScanQuery::default() },
        move |records: &mut Records<'_, ContactRecord>| {
            let mut seen = Observed::default();
            for record in records {
                work_rule.observe(&record, false, &mut seen, &learned);
            }
            seen
        },
    );
    let mut seen = Observed::default();
    fold_pages(scan, cancel, |part| seen.merge(part)).await?;
    Ok(seen)
}
