//! Identifiers that must not be mixed up: a contact's id, a list's id, a rule's name, and the
//! account the state's bindings belong to. The gateway's ids are opaque strings (numeric ids are
//! read as their decimal text).

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(compact_str::CompactString);

        impl $name {
            pub fn new(id: impl Into<compact_str::CompactString>) -> Self {
                Self(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self::new(s)
            }
        }
    };
}

string_id!(
    /// A contact's id on the gateway (`cnt-001`, or a number read as text).
    ContactId
);
string_id!(
    /// A list's id on the gateway.
    ListId
);
string_id!(
    /// A rule's name: its file stem (`rules/vip.rhai` → `vip`).
    RuleName
);

/// The account a state database's list bindings, caches, paging, grace and estimates belong to:
/// a real gateway's base URL and a fingerprint of the key (see `state::account`), or one run of
/// the bundled sandbox (a new sandbox has none of an earlier one's lists).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Account(String);

impl Account {
    /// What every bundled-sandbox account's key starts with.
    pub const SANDBOX_PREFIX: &'static str = "sandbox@";
    /// What separates the base URL from the key's fingerprint.
    pub const KEY_MARK: &'static str = "#key=";

    /// A real gateway, named by its base URL alone (tests, and state written before segsync kept
    /// a key's fingerprint).
    pub fn remote(base_url: &str) -> Self {
        Self(base_url.to_owned())
    }

    /// A real gateway's account: its base URL and the fingerprint of the key that names it.
    pub fn keyed(base_url: &str, fingerprint: &str) -> Self {
        Self(format!("{base_url}{}{fingerprint}", Self::KEY_MARK))
    }

    /// One start of the bundled sandbox, named by the moment it started.
    pub fn sandbox_started_now() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self(format!("{}{nanos}", Self::SANDBOX_PREFIX))
    }

    pub fn is_sandbox(&self) -> bool {
        self.0.starts_with(Self::SANDBOX_PREFIX)
    }

    /// The base URL (without the key's fingerprint).
    pub fn base_url(&self) -> &str {
        self.0.split_once(Self::KEY_MARK).map_or(&self.0, |(url, _)| url)
    }

    /// The key the state stores.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A set of contact ids held compactly: the ids' text back to back in one string, and a hash
/// table of 4-byte indexes into it. About 20 bytes per id of the demo's form where a
/// `HashSet<ContactId>` takes about 50, so a million members fit in 20 MB.
///
/// A set filled in ascending order ([`ContactIdSet::push_ascending`], as the membership cache
/// loads) builds its table on its first lookup, if any: a pass that looks its cached members up
/// only through a [`SetsTable`] never builds it (a million random writes, and 9 MB, saved). Without
/// a table the ids are strictly ascending, hence distinct: the set is a set either way.
#[derive(Clone, Default)]
pub struct ContactIdSet {
    text: String,
    /// `ends[i]` is where id `i` ends in `text` (it starts where `i - 1` ends).
    ends: Vec<u32>,
    table: std::sync::OnceLock<hashbrown::HashTable<u32>>,
}

/// An id's hash, the same in every [`ContactIdSet`]: a contact read is hashed once and looked up
/// in each list's members (100 lists: 100 lookups, one hash).
#[derive(Debug, Clone, Copy)]
pub struct IdHash(u64);

/// One hasher for every set, seeded at random once per process (foldhash, hashbrown's default).
static ID_HASHER: std::sync::LazyLock<hashbrown::DefaultHashBuilder> = std::sync::LazyLock::new(Default::default);

impl IdHash {
    pub fn of(id: &str) -> Self {
        Self(std::hash::BuildHasher::hash_one(&*ID_HASHER, id))
    }

    /// The hash itself, for a table of ids kept elsewhere.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ContactIdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl PartialEq for ContactIdSet {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|id| other.contains(id))
    }
}

impl ContactIdSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `ids` ids of `bytes` bytes in all, so filling it never doubles (and never holds
    /// the old and the new copy at once).
    pub fn with_capacity(ids: usize, bytes: usize) -> Self {
        Self {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(ids),
            table: hashbrown::HashTable::with_capacity(ids).into(),
        }
    }

    /// Room for `ids` ids of `bytes` bytes in all, filled by [`ContactIdSet::push_ascending`]: no
    /// table until a lookup needs one.
    pub fn with_capacity_ascending(ids: usize, bytes: usize) -> Self {
        Self { text: String::with_capacity(bytes), ends: Vec::with_capacity(ids), table: std::sync::OnceLock::new() }
    }

    /// Gives back the room it does not use.
    pub fn shrink_to_fit(&mut self) {
        let (text, ends) = (&self.text, &self.ends);
        if let Some(table) = self.table.get_mut() {
            table.shrink_to_fit(|&i| IdHash::of(id_at(text, ends, i)).0);
        }
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }

    /// The index table, built now if the set has none yet (its ids are then distinct, so each
    /// goes in without a lookup).
    fn table(&self) -> &hashbrown::HashTable<u32> {
        self.table.get_or_init(|| {
            let mut table = hashbrown::HashTable::with_capacity(self.ends.len());
            for i in 0..self.ends.len() as u32 {
                let hash = IdHash::of(self.get(i)).0;
                table.insert_unique(hash, i, |&j| IdHash::of(self.get(j)).0);
            }
            table
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    fn get(&self, index: u32) -> &str {
        id_at(&self.text, &self.ends, index)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.index_of(id).is_some()
    }

    /// Where `id` sits in insertion order (0-based), if it is in the set.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.index_of_hashed(id, IdHash::of(id))
    }

    /// [`ContactIdSet::index_of`] with the id's hash already known.
    pub fn index_of_hashed(&self, id: &str, hash: IdHash) -> Option<u32> {
        self.table().find(hash.0, |&i| self.get(i) == id).copied()
    }

    /// The id at `index` (insertion order).
    pub fn at(&self, index: u32) -> Option<&str> {
        ((index as usize) < self.ends.len()).then(|| self.get(index))
    }

    /// Adds `id`; `false` when it was there already.
    ///
    /// # Panics
    /// When the ids' text passes 4 GiB (hundreds of millions of ids, far beyond
    /// [`crate::gateway::MAX_RECORDS_PER_READ`]).
    pub fn insert(&mut self, id: &str) -> bool {
        let hash = IdHash::of(id);
        if self.index_of_hashed(id, hash).is_some() {
            return false;
        }
        let index = self.push(id);
        let (text, ends) = (&self.text, &self.ends);
        let table = self.table.get_mut().expect("index_of_hashed built the table");
        table.insert_unique(hash.0, index, |&i| IdHash::of(id_at(text, ends, i)).0);
        true
    }

    /// Adds `id`, which the caller has in ascending order (a sorted read of the cache): while
    /// every id is greater than the last and no lookup has built the table, it is only appended.
    /// Otherwise it goes in as [`ContactIdSet::insert`] puts it (a duplicate is dropped).
    pub fn push_ascending(&mut self, id: &str) -> bool {
        let after_last = self.ends.is_empty() || self.get(self.ends.len() as u32 - 1) < id;
        if self.table.get().is_none() && after_last {
            self.push(id);
            return true;
        }
        self.insert(id)
    }

    /// Makes room for a next id of `len` bytes, and when the text has to grow, for `left` more
    /// ids as long: a load that knows its count sizes ids of one length in one allocation from the
    /// first, without reading them twice, and never doubles (which holds the old and the new copy
    /// at once). With no count left it grows as a `String` does.
    pub fn reserve_like(&mut self, len: usize, left: usize) {
        if self.text.capacity() - self.text.len() >= len {
            return;
        }
        match left {
            0 => self.text.reserve(len),
            _ => self.text.reserve_exact(len * left),
        }
    }

    /// Appends `id`'s text; returns its index.
    fn push(&mut self, id: &str) -> u32 {
        let index = u32::try_from(self.ends.len()).expect("fewer than 4 billion ids");
        self.text.push_str(id);
        self.ends.push(u32::try_from(self.text.len()).expect("ids' text under 4 GiB"));
        index
    }

    /// The ids, in the order they were first inserted.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.ends.len() as u32).map(|i| self.get(i))
    }

    /// Adds every id of `other`.
    pub fn extend_from(&mut self, other: &ContactIdSet) {
        for id in other.iter() {
            self.insert(id);
        }
    }
}

fn id_at<'a>(text: &'a str, ends: &[u32], index: u32) -> &'a str {
    let i = index as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    &text[start..ends[i] as usize]
}

impl<'a> FromIterator<&'a str> for ContactIdSet {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut set = Self::new();
        for id in iter {
            set.insert(id);
        }
        set
    }
}

/// Several [`ContactIdSet`]s' ids in one hash table: which of the sets hold an id, in one lookup
/// instead of one per set. An entry is four bytes, the set's position and the id's index in that
/// set packed together; each hit is confirmed against that set's own text, so the answer is the
/// sets' own answer, never a hash's guess.
pub struct SetsTable {
    table: hashbrown::HashTable<u32>,
    /// How many low bits of an entry hold the index.
    index_bits: u32,
}

impl SetsTable {
    /// A table of `sets` (positions in the order given), or `None` when a position and an index
    /// do not fit in four bytes together (then look the sets up one by one).
    pub fn new(sets: &[&ContactIdSet]) -> Option<Self> {
        let position_bits = usize::BITS - sets.len().saturating_sub(1).leading_zeros();
        let index_bits = 32u32.checked_sub(position_bits)?;
        if sets.iter().any(|s| (s.len() as u64) > 1u64 << index_bits) {
            return None;
        }
        let mut table = hashbrown::HashTable::with_capacity(sets.iter().map(|s| s.len()).sum());
        for (position, set) in (0u64..).zip(sets) {
            for (index, id) in (0u64..).zip(set.iter()) {
                let entry = u32::try_from(position << index_bits | index).ok()?;
                table.insert_unique(IdHash::of(id).get(), entry, |_| {
                    unreachable!("the table was made for every id, so it never grows")
                });
            }
        }
        Some(Self { table, index_bits })
    }

    /// An entry's set position and index in that set.
    fn unpack(&self, entry: u32) -> (usize, u32) {
        let mask = (1u64 << self.index_bits) - 1;
        ((u64::from(entry) >> self.index_bits) as usize, (u64::from(entry) & mask) as u32)
    }

    /// Every set holding `id` (its `hash`), as (position, index in that set), into `out`.
    /// `set_at(position)` is the set given at that position.
    pub fn holders<'a>(
        &self,
        set_at: impl Fn(usize) -> &'a ContactIdSet,
        id: &str,
        hash: IdHash,
        out: &mut Vec<(usize, u32)>,
    ) {
        out.clear();
        for &entry in self.table.iter_hash(hash.get()) {
            let (position, index) = self.unpack(entry);
            if set_at(position).at(index) == Some(id) {
                out.push((position, index));
            }
        }
    }

    /// [`SetsTable::holders`] of several ids at once: every holder of `ids[k]` appended to `out`
    /// (cleared first), and `ends[k]` (cleared first) the end of its holders in `out`. The lookups
    /// run in two loops, every id's candidate entries and then each candidate confirmed against
    /// its set's text, so the processor overlaps the ids' cache misses (the table and the texts
    /// are larger than any cache) instead of waiting for each in turn.
    pub fn holders_of_each<'a>(
        &self,
        set_at: impl Fn(usize) -> &'a ContactIdSet,
        ids: &[(&str, IdHash)],
        out: &mut Vec<(usize, u32)>,
        ends: &mut Vec<usize>,
    ) {
        let mut candidates: Vec<(usize, u32)> = Vec::with_capacity(ids.len() + ids.len() / 2);
        for (k, (_, hash)) in ids.iter().enumerate() {
            candidates.extend(self.table.iter_hash(hash.get()).map(|&entry| (k, entry)));
        }
        out.clear();
        ends.clear();
        let mut next = candidates.iter().peekable();
        for (k, (id, _)) in ids.iter().enumerate() {
            while let Some(&(_, entry)) = next.next_if(|(of, _)| *of == k) {
                let (position, index) = self.unpack(entry);
                if set_at(position).at(index) == Some(*id) {
                    out.push((position, index));
                }
            }
            ends.push(out.len());
        }
    }
}

/// A fixed set of small numbers (indexes into a [`ContactIdSet`]): one bit each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BitSet(Vec<u64>);

impl BitSet {
    pub fn with_len(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }

    /// Sets bit `i` (ignored past the length it was made with).
    pub fn set(&mut self, i: u32) {
        if let Some(word) = self.0.get_mut(i as usize / 64) {
            *word |= 1 << (i % 64);
        }
    }

    pub fn get(&self, i: u32) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Sets every bit `other` has.
    pub fn union(&mut self, other: &BitSet) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The compact set behaves as a set: membership, duplicates, order of first insertion, equality.
    #[test]
    fn compact_set_is_a_set() {
        let mut set = ContactIdSet::new();
        assert!(set.insert("cnt-1"));
        assert!(set.insert("cnt-22"));
        assert!(!set.insert("cnt-1"), "a duplicate is not inserted twice");
        assert!(set.insert(""), "an empty id is still an id");
        assert_eq!(set.len(), 3);
        assert!(set.contains("cnt-22") && set.contains("cnt-1") && set.contains(""));
        assert!(!set.contains("cnt-2"), "a prefix is not a member");
        assert!(!set.contains("cnt-222"));
        assert_eq!(set.iter().collect::<Vec<_>>(), ["cnt-1", "cnt-22", ""]);
        assert_eq!((set.index_of("cnt-22"), set.at(1), set.at(3)), (Some(1), Some("cnt-22"), None));
        let many: ContactIdSet =
            (0..10_000).map(|i| format!("cnt-{i}")).collect::<Vec<_>>().iter().map(String::as_str).collect();
        assert_eq!(many.len(), 10_000);
        assert!((0..10_000).all(|i| many.contains(&format!("cnt-{i}"))));
        assert!(!many.contains("cnt-10000"));
        let reversed: ContactIdSet = many.iter().collect::<Vec<_>>().into_iter().rev().collect();
        assert_eq!(reversed, many, "equality ignores order");
    }

    // A set filled in ascending order has no table until a lookup builds one, and is the same set
    // as one filled by `insert`: an id out of order or repeated goes in as `insert` puts it.
    #[test]
    fn an_ascending_fill_is_the_same_set() {
        let ids: Vec<String> = (0..5_000).map(|i| format!("cnt-{i:05}")).collect();
        let mut ascending = ContactIdSet::with_capacity_ascending(ids.len(), 0);
        for id in &ids {
            assert!(ascending.push_ascending(id));
        }
        assert!(ascending.table.get().is_none(), "no table while ids only ascend");
        assert_eq!(ascending.at(4_999), Some("cnt-04999"));
        let inserted: ContactIdSet = ids.iter().map(String::as_str).collect();
        assert_eq!(inserted, ascending, "every id of one is in the other (looked up in `ascending`)");
        assert!(ascending.table.get().is_some(), "a lookup built it");
        assert_eq!(ascending.index_of("cnt-01234"), Some(1_234));
        assert!(!ascending.contains("cnt-5000"));
        // Out of order, repeated, and after the table was built: each as `insert` would.
        let mut mixed = ContactIdSet::with_capacity_ascending(0, 0);
        assert!(mixed.push_ascending("b") && mixed.push_ascending("c"));
        assert!(!mixed.push_ascending("c"), "a repeat is no new id");
        assert!(mixed.push_ascending("a"), "out of order still goes in");
        assert!(!mixed.push_ascending("b"), "nor is a repeat after it");
        assert!(mixed.push_ascending("d"));
        assert_eq!(mixed.iter().collect::<Vec<_>>(), ["b", "c", "a", "d"]);
        assert_eq!(mixed, ["a", "b", "c", "d"].into_iter().collect());
    }

    // A load that knows its count sizes ids of one length in one allocation, exactly; ids longer
    // than the first, or more than counted, still all go in.
    #[test]
    fn a_counted_load_is_sized_from_its_first_id() {
        let fill = |ids: &[String], count: usize| {
            let mut set = ContactIdSet::with_capacity_ascending(count, 0);
            let mut left = count;
            let mut grew = 0;
            for id in ids {
                let before = set.text.capacity();
                set.reserve_like(id.len(), left);
                grew += usize::from(set.text.capacity() != before);
                set.push_ascending(id);
                left = left.saturating_sub(1);
            }
            (set, grew)
        };
        let uniform: Vec<String> = (0..3_000).map(|i| format!("cnt-{i:05}")).collect();
        let (set, grew) = fill(&uniform, uniform.len());
        assert_eq!((grew, set.text.capacity(), set.len()), (1, 9 * 3_000, 3_000));
        let mixed: Vec<String> = ["a", "bb", "ccc", "dddd"].iter().map(|s| s.repeat(3)).collect();
        let (set, _) = fill(&mixed, 1);
        assert_eq!(set.iter().collect::<Vec<_>>(), mixed.iter().map(String::as_str).collect::<Vec<_>>());
    }

    // One lookup names every set holding an id, with its index there; ids that only share a
    // prefix or nothing are in none; too many sets for the packing is refused.
    #[test]
    fn sets_table_names_every_holder() {
        let a: ContactIdSet = ["cnt-1", "cnt-2", "cnt-3"].into_iter().collect();
        let b: ContactIdSet = ["cnt-3", "cnt-1"].into_iter().collect();
        let c: ContactIdSet =
            (0..5_000).map(|i| format!("x-{i}")).collect::<Vec<_>>().iter().map(String::as_str).collect();
        let sets = [&a, &b, &c];
        let table = SetsTable::new(&sets).expect("fits");
        let mut out = Vec::new();
        let mut holders = |id: &str| {
            table.holders(|p| sets[p], id, IdHash::of(id), &mut out);
            let mut found = out.clone();
            found.sort_unstable();
            found
        };
        assert_eq!(holders("cnt-1"), [(0, 0), (1, 1)]);
        assert_eq!(holders("cnt-3"), [(0, 2), (1, 0)]);
        assert_eq!(holders("cnt-2"), [(0, 1)]);
        assert_eq!(holders("x-4999"), [(2, 4999)]);
        assert_eq!(holders("cnt-"), []);
        assert_eq!(holders("cnt-11"), []);
        assert!((0..5_000).all(|i| holders(&format!("x-{i}")) == [(2, i)]));
        // Looked up together, each id has the holders it has alone, in the same order: ids held by
        // several sets, by none, and twice in one batch.
        let batch: Vec<String> = ["cnt-1", "nobody", "cnt-3", "cnt-1", "cnt-2", ""]
            .into_iter()
            .map(str::to_owned)
            .chain((0..5_000).step_by(7).map(|i| format!("x-{i}")))
            .collect();
        let ids: Vec<(&str, IdHash)> = batch.iter().map(|id| (id.as_str(), IdHash::of(id))).collect();
        let (mut all, mut ends) = (vec![(9, 9)], vec![9]);
        table.holders_of_each(|p| sets[p], &ids, &mut all, &mut ends);
        assert_eq!(ends.len(), ids.len());
        let mut start = 0;
        for ((id, hash), &end) in ids.iter().zip(&ends) {
            table.holders(|p| sets[p], id, *hash, &mut out);
            assert_eq!(all[start..end], out[..], "{id}");
            start = end;
        }
        assert_eq!((all.len(), start), (2 + 2 + 2 + 1 + 715, all.len()), "nothing else, nothing left over");
        // 2^20 + 1 sets take 21 bits of position, leaving 11 (2,048 ids) for the index.
        let empty = ContactIdSet::new();
        let mut crowded = vec![&empty; 1 << 20];
        let fits: ContactIdSet =
            (0..2_048).map(|i| i.to_string()).collect::<Vec<_>>().iter().map(String::as_str).collect();
        crowded.push(&fits);
        assert!(SetsTable::new(&crowded).is_some());
        crowded.pop();
        crowded.push(&c);
        assert!(SetsTable::new(&crowded).is_none(), "5,000 ids need 13 bits, 11 are left");
    }

    // Bits set, read, counted and merged; out of range is ignored.
    #[test]
    fn bit_set_counts() {
        let mut a = BitSet::with_len(130);
        a.set(0);
        a.set(64);
        a.set(129);
        a.set(500);
        assert!(a.get(64) && a.get(129) && !a.get(1) && !a.get(500));
        let mut b = BitSet::with_len(130);
        b.set(1);
        b.set(64);
        a.union(&b);
        assert_eq!(a.count(), 4);
    }
}
