//! What the data says about a rule, seen while it judges contacts, at no extra request: fields the
//! rule reads that no contact has (`totalSpend` for `totalSpent`), and `FILTER` values no contact
//! holds (`"Emilia Romagna"` for `"Emilia-Romagna"`). Both select nobody without any error, so
//! without this they would pass as "ok" on every run.
//!
//! The cost stays near nothing: a field is looked up only until one contact of the read has it, and
//! a filter term's values are tallied only until one contact of the read passes it (pages judged
//! in parallel tell each other through [`Learned`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

/// Tallies are hashed with foldhash (hashbrown's default): one lookup per contact judged.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

use rhai::Map;

use super::Rule;
use crate::contact::ContactRecord;
use crate::slots::{Fields, Lookup};

/// Field names kept from contacts lacking a field, to suggest the one meant: a bounded sample.
const NAMES_SAMPLED: usize = 256;
/// Distinct values tallied per filter term: enough for the most common, bounded for memory.
const VALUES_TALLIED: usize = 1_000;
/// A field is reported absent only when at least this many contacts were judged without it.
pub const ABSENT_MIN_JUDGED: u64 = 100;

/// One `FILTER` term as the contacts read showed it.
#[derive(Debug, Clone, Default)]
struct TermSeen {
    /// Some contact passed this term.
    matched: bool,
    /// The term's field values among contacts that did not pass it, until one did.
    values: HashMap<String, u64>,
}

/// What a rule's evaluation saw of the data (merged across pages like the evaluation).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Contacts that reached `matches`.
    judged: u64,
    /// Per field the rule reads (`Rule::mentions`): seen on at least one judged contact.
    present: Vec<bool>,
    /// Field names of judged contacts that lacked a field.
    names: BTreeSet<String>,
    /// Contacts the FILTER was checked on.
    filtered: u64,
    terms: Vec<TermSeen>,
    /// Every term was passed and every field seen: a contact can only add to the counts. Set
    /// by `Rule::observe` for its rule; a merge clears it (the next contact sets it again).
    settled: bool,
}

impl Observed {
    pub fn merge(&mut self, other: Observed) {
        self.settled = false;
        self.judged += other.judged;
        merge_flags(&mut self.present, &other.present);
        if self.names.len() < NAMES_SAMPLED {
            self.names.extend(other.names.into_iter().take(NAMES_SAMPLED));
        }
        self.filtered += other.filtered;
        if self.terms.len() < other.terms.len() {
            self.terms.resize_with(other.terms.len(), TermSeen::default);
        }
        for (mine, theirs) in self.terms.iter_mut().zip(other.terms) {
            mine.matched |= theirs.matched;
            if mine.matched {
                mine.values = HashMap::new();
                continue;
            }
            for (value, n) in theirs.values {
                if mine.values.len() < VALUES_TALLIED || mine.values.contains_key(&value) {
                    *mine.values.entry(value).or_default() += n;
                }
            }
        }
    }

    /// Takes off the counts of `records` contacts observed for `rule` (`judged` of them reaching
    /// `matches`) that were observed elsewhere too: a sibling group observes every record once
    /// for all its lists, and each list's members count as members, not candidates.
    pub fn discount(&mut self, rule: &Rule, records: u64, judged: u64) {
        if !rule.filter.is_empty() {
            self.filtered = self.filtered.saturating_sub(records);
        }
        self.judged = self.judged.saturating_sub(judged);
    }

    /// Contacts the FILTER was checked on.
    pub fn filtered(&self) -> u64 {
        self.filtered
    }

    /// Whether any contact passed every term of the FILTER seen so far (each term, at least).
    pub fn filter_matched(&self) -> bool {
        !self.terms.is_empty() && self.terms.iter().all(|t| t.matched)
    }
}

/// What one read has learned of a rule so far, shared by the pages it judges in parallel: the
/// `FILTER` terms some contact passed and the fields some judged contact had. A page takes up what
/// another page learned instead of learning it again (a term judged and its values tallied on
/// every contact until that page's own first match: most of what observing cost).
///
/// The findings come out the same: a flag is set only by a page that saw the match (or the field),
/// and the pages sharing a `Learned` all merge into one result, so the merged flag is set either
/// way; a term no page passed, or a field no page saw, is never learned, so its tally and the
/// names sampled for it are those of every page as before. One `Learned` serves the `Observed`
/// that merge into one rule's result: a target's candidates and its cached members, or a sibling
/// group. (When a cached list's count disagrees, its members are read again and their scan
/// observations dropped; a flag one of them set stands, true of a contact this read returned.)
#[derive(Debug, Default)]
pub struct Learned {
    terms: Vec<AtomicBool>,
    present: Vec<AtomicBool>,
}

impl Learned {
    /// Nothing learned yet of `rule`. (`Learned::default()` shares nothing: each page learns alone.)
    pub fn of(rule: &Rule) -> Self {
        let flags = |n: usize| (0..n).map(|_| AtomicBool::new(false)).collect();
        Self { terms: flags(rule.filter.len()), present: flags(rule.mentions.len()) }
    }

    fn knows(flags: &[AtomicBool], i: usize) -> bool {
        flags.get(i).is_some_and(|f| f.load(Ordering::Relaxed))
    }

    fn learn(flags: &[AtomicBool], i: usize) {
        if let Some(f) = flags.get(i) {
            f.store(true, Ordering::Relaxed);
        }
    }
}

fn merge_flags(into: &mut Vec<bool>, from: &[bool]) {
    if into.len() < from.len() {
        into.resize(from.len(), false);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a |= *b;
    }
}

/// A field or filter value the data never showed: for `plan`/`sync` output and the `rule run` event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// `absent_field` or `filter_matched_none`.
    pub kind: &'static str,
    /// The field (`totalSpend`) or the filter term (`region = "Emilia Romagna"`).
    pub subject: String,
    /// Where in the rule file: the field's first read, or the FILTER.
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl Rule {
    /// Notes what `record` shows for this rule. `judged`: the record reaches `matches` (it passed
    /// the FILTER), so the fields `matches` reads are looked for on it.
    pub fn observe(&self, record: &ContactRecord, judged: bool, seen: &mut Observed, learned: &Learned) {
        if seen.settled && record.is_map() {
            // What the steps below would do once nothing is left to learn (100 lists, 100 calls a contact).
            seen.filtered += u64::from(!self.filter.is_empty());
            seen.judged += u64::from(judged);
            return;
        }
        if !record.is_map() {
            return;
        }
        if !self.filter.is_empty() {
            seen.filtered += 1;
            seen.terms.resize_with(self.filter.len(), TermSeen::default);
            for (k, (term, t)) in self.filter.iter().zip(&mut seen.terms).enumerate().filter(|(_, (_, t))| !t.matched) {
                let by_another = Learned::knows(&learned.terms, k);
                if by_another || term.judge(record) == Ok(true) {
                    t.matched = true;
                    t.values = HashMap::new();
                    if !by_another {
                        Learned::learn(&learned.terms, k);
                    }
                } else if t.values.len() < VALUES_TALLIED {
                    term.tally(record, &mut t.values);
                }
            }
        }
        if !judged {
            return;
        }
        seen.judged += 1;
        seen.present.resize(self.mentions.len(), false);
        if seen.present.iter().all(|p| *p) {
            seen.settled = seen.terms.len() == self.filter.len() && seen.terms.iter().all(|t| t.matched);
            return;
        }
        let mut lacking = false;
        for (j, (paths, present)) in
            self.mention_paths.iter().zip(&mut seen.present).enumerate().filter(|(_, (_, p))| !**p)
        {
            let by_another = Learned::knows(&learned.present, j);
            *present = by_another || paths.iter().any(|path| matches!(record.lookup(path), Lookup::Value(_)));
            if *present && !by_another {
                Learned::learn(&learned.present, j);
            }
            lacking |= !*present;
        }
        if lacking && seen.names.len() < NAMES_SAMPLED {
            // Every field name, not only those a narrowed record kept: they are the suggestions.
            let full = record.full();
            let Some(map) = full.read_lock::<Map>() else { return };
            seen.names.extend(map.keys().map(|k| k.to_string()));
            if let Some(c) = map.get("customFields").and_then(|c| c.read_lock::<Map>()) {
                seen.names.extend(c.keys().map(|k| k.to_string()));
            }
        }
    }

    /// What the data showed that is likely a mistake: fields absent on every judged contact (at
    /// least `min_judged` of them) and FILTER terms no contact passed.
    pub fn findings(&self, seen: &Observed, min_judged: u64) -> Vec<Finding> {
        let mut out = Vec::new();
        if seen.judged >= min_judged.max(1) {
            let fields = self.mentions.iter().zip(&self.mentioned_at);
            for ((field, &(line, col)), _) in fields.zip(&seen.present).filter(|(_, p)| !**p) {
                let closest = closest_names(field, &seen.names);
                let hint = if closest.is_empty() { String::new() } else { format!("; seen: {}", closest.join(", ")) };
                out.push(Finding {
                    kind: "absent_field",
                    subject: field.clone(),
                    line,
                    col,
                    message: format!("{field} is absent on all {} contacts{hint}", thousands(seen.judged)),
                });
            }
        }
        if seen.filtered > 0 {
            for (term, t) in self.filter.iter().zip(&seen.terms).filter(|(_, t)| !t.matched) {
                let (key, value) = term.query_pair();
                let subject = format!("{key} = {value:?}");
                let mut common: Vec<(&String, &u64)> = t.values.iter().collect();
                common.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
                let shown: Vec<String> =
                    common.iter().take(5).map(|(v, n)| format!("{v} ({})", thousands(**n))).collect();
                let more = if common.len() > 5 { " …" } else { "" };
                let mut values =
                    if shown.is_empty() { String::new() } else { format!("; most common: {}{more}", shown.join(", ")) };
                let near = closest_names(&value, &t.values.keys().cloned().collect());
                if let Some(meant) = near.first() {
                    values = format!(
                        "; did you mean {meant:?} ({})?{}",
                        thousands(t.values[meant]),
                        values.replacen(';', "", 1)
                    );
                }
                out.push(Finding {
                    kind: "filter_matched_none",
                    line: self.filter_at.0,
                    col: self.filter_at.1,
                    message: format!(
                        "FILTER {subject} matched none of {} contacts read{values}",
                        thousands(seen.filtered)
                    ),
                    subject,
                });
            }
        }
        out
    }
}

/// Up to three seen names closest to `field`, nearest first, when close enough to be the one meant.
fn closest_names(field: &str, names: &BTreeSet<String>) -> Vec<String> {
    let lower = field.to_lowercase();
    let mut near: BTreeMap<(usize, &str), ()> = BTreeMap::new();
    for name in names.iter().filter(|n| *n != field) {
        let distance = strsim::damerau_levenshtein(&lower, &name.to_lowercase());
        if distance <= (field.len() / 3).max(2) {
            near.insert((distance, name), ());
        }
    }
    near.into_keys().take(3).map(|(_, n)| n.to_owned()).collect()
}

/// `20000` → `20,000`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::engine;

    fn rule(src: &str) -> Rule {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.rhai");
        std::fs::write(&path, src).expect("write");
        crate::rules::load_file(&engine::build(chrono_tz::Europe::Rome), &path).expect("loads")
    }

    fn contact(i: usize, json: &str) -> ContactRecord {
        serde_json::from_str(&format!(r#"{{"id":"c{i}",{json}}}"#)).expect("contact")
    }

    // A field no judged contact has is a finding naming the closest field seen; a field some
    // contact has is not, and neither is anything below the minimum count.
    #[test]
    fn absent_fields_name_the_closest_seen() {
        let r = rule(
            "const LIST = \"VIP\";\nfn matches(c) { (c.customFields.get(\"totalSpend\") ?? 0.0) > 5000.0 && c.region != \"\" }\n",
        );
        let mut seen = Observed::default();
        for i in 0..150 {
            let record = contact(i, r#""region":"Veneto","customFields":{"totalSpent":10.0}"#);
            let mut page = Observed::default();
            r.observe(&record, true, &mut page, &Learned::default());
            seen.merge(page);
        }
        let found = r.findings(&seen, ABSENT_MIN_JUDGED);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].subject, "totalSpend");
        assert_eq!((found[0].line, found[0].col), (2, 33), "where the field is read");
        assert_eq!(found[0].message, "totalSpend is absent on all 150 contacts; seen: totalSpent");
        assert!(r.findings(&seen, 151).is_empty(), "below the minimum nothing is claimed");
        r.observe(
            &contact(999, r#""region":"Veneto","customFields":{"totalSpend":1.0}"#),
            true,
            &mut seen,
            &Learned::default(),
        );
        assert!(r.findings(&seen, ABSENT_MIN_JUDGED).is_empty(), "one contact has it");
    }

    // Once every term was passed and every field seen, a contact only adds to the counts: the
    // same counts, term tallies and findings as observing every contact in full.
    #[test]
    fn a_settled_observation_counts_exactly_as_a_full_one() {
        let r = rule(
            "const LIST = \"L\";\nconst FILTER = #{ region: \"Veneto\" };\nfn matches(c) { c.customFields.totalSpent > 1.0 }\n",
        );
        let records = [
            r#""region":"Veneto","customFields":{"totalSpent":10.0}"#,
            r#""region":"Lazio","customFields":{"totalSpent":10.0}"#,
            r#""region":"Veneto","customFields":{}"#,
            r#""region":"Veneto","customFields":{"totalSpent":2.0}"#,
        ];
        let (mut fast, mut full) = (Observed::default(), Observed::default());
        for i in 0..200 {
            let record = contact(i, records[i % records.len()]);
            let judged = r.passes_filter(&record);
            r.observe(&record, judged, &mut fast, &Learned::default());
            full.settled = false;
            r.observe(&record, judged, &mut full, &Learned::default());
        }
        assert!(fast.settled, "the first contact leaves nothing to learn");
        assert_eq!((fast.judged, fast.filtered), (full.judged, full.filtered));
        assert_eq!((fast.judged, fast.filtered), (150, 200));
        assert_eq!(fast.present, full.present);
        assert_eq!(r.findings(&fast, 1), r.findings(&full, 1));
    }

    // Pages sharing what the read learned give the findings and counts of pages learning alone,
    // and stop judging and tallying a term once any page passed it.
    #[test]
    fn pages_sharing_what_they_learned_find_what_pages_alone_find() {
        let r = rule(
            "const LIST = \"L\";\nconst FILTER = #{ region: \"Veneto\", \"customFields.channel\": \"SMS\" };\n\
             fn matches(c) { (c.customFields.get(\"totalSpent\") ?? 0.0) > 1.0 && (c.customFields.get(\"tier\") ?? \"\") == \"gold\" }\n",
        );
        // Page 3 holds the one contact in Veneto, page 5 the only ones with `totalSpent`; `tier`
        // is never there (`tire` is), and no contact's channel is SMS.
        let page_of = |p: usize| -> Vec<ContactRecord> {
            (0..30)
                .map(|i| {
                    let region = if p == 3 && i == 10 { "Veneto" } else { ["Lazio", "Lombardia"][i % 2] };
                    let spent = if p == 5 { r#""totalSpent":9.0,"# } else { "" };
                    let channel = ["EMAIL", "WHATSAPP"][(i / 2) % 2];
                    contact(
                        p * 100 + i,
                        &format!(
                            r#""region":"{region}","customFields":{{{spent}"channel":"{channel}","tire":"gold"}}"#
                        ),
                    )
                })
                .collect()
        };
        let observe_all = |learned: &Learned| -> (Observed, Vec<Observed>) {
            let mut all = Observed::default();
            let mut pages = Vec::new();
            for p in 0..10 {
                let mut page = Observed::default();
                for record in page_of(p) {
                    r.observe(&record, true, &mut page, learned);
                }
                pages.push(page.clone());
                all.merge(page);
            }
            (all, pages)
        };
        let (shared, shared_pages) = observe_all(&Learned::of(&r));
        let (alone, alone_pages) = observe_all(&Learned::default());
        assert_eq!((shared.judged, shared.filtered), (alone.judged, alone.filtered));
        assert_eq!(shared.present, alone.present);
        assert_eq!(r.mentions, ["customFields", "totalSpent", "tier"]);
        assert_eq!(shared.present, [true, true, false], "totalSpent seen on page 5 only, tier nowhere");
        let found = r.findings(&shared, ABSENT_MIN_JUDGED);
        assert_eq!(found, r.findings(&alone, ABSENT_MIN_JUDGED));
        let messages: Vec<&str> = found.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "tier is absent on all 300 contacts; seen: tire",
                "FILTER customFields.channel = \"SMS\" matched none of 300 contacts read; most common: EMAIL (160), WHATSAPP (140)",
            ]
        );
        // After page 3, a page sharing knows Veneto was passed: it tallies no regions, while a
        // page alone tallies them all over again. The channel, never passed, is tallied by both.
        // (Terms in key order: the channel, then the region.)
        assert!(shared_pages[9].terms[1].values.is_empty() && shared_pages[9].terms[1].matched);
        assert_eq!(alone_pages[9].terms[1].values.len(), 2);
        assert!(!alone_pages[9].terms[1].matched);
        assert_eq!(shared_pages[9].terms[0].values.len(), 2);
    }

    // A FILTER value nobody holds is a finding with the field's most common values; once one
    // contact passes, there is none.
    #[test]
    fn filter_values_matching_nothing_show_the_common_ones() {
        let r = rule("const LIST = \"ER\";\nconst FILTER = #{ region: \"Emilia Romagna\" };\nfn matches(c) { true }\n");
        let mut seen = Observed::default();
        for (i, region) in
            ["Lombardia", "Lombardia", "Lombardia", "Veneto", "Veneto", "Emilia-Romagna"].iter().enumerate()
        {
            let mut page = Observed::default();
            r.observe(&contact(i, &format!(r#""region":"{region}""#)), false, &mut page, &Learned::default());
            seen.merge(page);
        }
        let found = r.findings(&seen, ABSENT_MIN_JUDGED);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].message,
            "FILTER region = \"Emilia Romagna\" matched none of 6 contacts read; did you mean \"Emilia-Romagna\" (1)? \
             most common: Lombardia (3), Veneto (2), Emilia-Romagna (1)"
        );
        r.observe(&contact(9, r#""region":"Emilia Romagna""#), true, &mut seen, &Learned::default());
        assert!(r.findings(&seen, ABSENT_MIN_JUDGED).is_empty());
        assert_eq!(thousands(20_000), "20,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
