//! A field path (`customFields.totalSpent`) and the two ways a contact answers it: an object map
//! walked name by name, or a record read into slots, one value for each path its read's rules
//! read, laid out when the read starts ([`Layout`]).
//!
//! Slots are what a read judged wholly natively parses each contact into: no map, no key
//! allocated, a short text held in place. Anything that needs the contact as a
//! Rhai value (a rule Rhai judges, a message quoting a value, facts) parses the record again, as
//! a narrowed record always did.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::NaiveDate;
use compact_str::CompactString;
use rhai::{Dynamic, ImmutableString, Map};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A path's number, process-wide: the same names always get the same number, so a layout finds a
/// path's slot by index, never by comparing names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PathId(u32);

/// Every path named so far (rules compile a handful each; reloading names the same ones again).
static PATHS: LazyLock<Mutex<HashMap<Arc<[String]>, u32>>> = LazyLock::new(Default::default);

/// Field names from the contact down: `["customFields", "totalSpent"]`.
#[derive(Debug, Clone)]
pub struct Path {
    names: Arc<[String]>,
    id: PathId,
}

impl PartialEq for Path {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Path {}

impl Path {
    pub fn new<S: AsRef<str>>(names: &[S]) -> Self {
        let names: Arc<[String]> = names.iter().map(|n| n.as_ref().to_owned()).collect();
        let mut paths = PATHS.lock().unwrap_or_else(|p| p.into_inner());
        let next = u32::try_from(paths.len()).unwrap_or(u32::MAX);
        let (names, id) = match paths.get_key_value(&names) {
            Some((known, id)) => (known.clone(), *id),
            None => {
                paths.insert(names.clone(), next);
                (names, next)
            }
        };
        Self { names, id: PathId(id) }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// Text a value holds: borrowed from the record, or shared with a Rhai value.
#[derive(Debug, Clone)]
pub enum Text<'a> {
    Ref(&'a str),
    Shared(ImmutableString),
}

impl Text<'_> {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Ref(s) => s,
            Self::Shared(s) => s.as_str(),
        }
    }
}

/// A value as rules compare it. Maps, arrays and anything else are `Other`.
#[derive(Debug, Clone, Default)]
pub enum Leaf<'a> {
    #[default]
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Text<'a>),
    Date(NaiveDate),
    Other,
}

impl Leaf<'static> {
    /// A Rhai value's leaf (its text shared, not copied).
    pub fn of(d: &Dynamic) -> Self {
        if d.is_unit() {
            Self::Unit
        } else if let Ok(b) = d.as_bool() {
            Self::Bool(b)
        } else if let Ok(i) = d.as_int() {
            Self::Int(i)
        } else if let Ok(f) = d.as_float() {
            Self::Float(f)
        } else if d.is_string() {
            d.clone().into_immutable_string().map_or(Self::Other, |s| Self::Str(Text::Shared(s)))
        } else if let Some(date) = d.read_lock::<crate::rules::Date>() {
            Self::Date(date.0)
        } else {
            Self::Other
        }
    }
}

impl Leaf<'_> {
    /// The value as Rhai holds it (`Other`, which has no value here, is `()`).
    pub fn to_dynamic(&self) -> Dynamic {
        match self {
            Self::Unit | Self::Other => Dynamic::UNIT,
            Self::Bool(b) => Dynamic::from_bool(*b),
            Self::Int(i) => Dynamic::from_int(*i),
            Self::Float(f) => Dynamic::from_float(*f),
            Self::Str(Text::Shared(s)) => Dynamic::from(s.clone()),
            Self::Str(Text::Ref(s)) => Dynamic::from(ImmutableString::from(*s)),
            Self::Date(d) => Dynamic::from(crate::rules::Date(*d)),
        }
    }

    /// The value, its text borrowed from `self` (a rule's literal is never reference-counted on
    /// the way to a verdict).
    pub fn borrowed(&self) -> Leaf<'_> {
        match self {
            Self::Str(s) => Leaf::Str(Text::Ref(s.as_str())),
            Self::Unit => Leaf::Unit,
            Self::Bool(b) => Leaf::Bool(*b),
            Self::Int(i) => Leaf::Int(*i),
            Self::Float(f) => Leaf::Float(*f),
            Self::Date(d) => Leaf::Date(*d),
            Self::Other => Leaf::Other,
        }
    }
}

/// What a contact holds at a path.
#[derive(Debug, Clone)]
pub enum Lookup<'a> {
    /// The name at this index of the path is missing (from the contact, or from the map above it).
    Absent(usize),
    /// Something above the last name is not a map (the contact itself, or a field on the way).
    NotMap,
    Value(Leaf<'a>),
}

/// A contact whose fields rules read by path.
pub trait Fields {
    fn lookup(&self, path: &Path) -> Lookup<'_>;
    /// The contact itself as a value (a map: `Other`).
    fn whole(&self) -> Leaf<'_>;
    /// The Rhai value at `names` (`None`: absent, or under something that is not a map), for
    /// messages that quote it: a record read into slots is parsed again.
    fn dynamic_at(&self, names: &[String]) -> Option<Dynamic>;
}

impl Fields for Dynamic {
    fn lookup(&self, path: &Path) -> Lookup<'_> {
        walk(self, path.names(), 0)
    }

    fn whole(&self) -> Leaf<'_> {
        Leaf::of(self)
    }

    fn dynamic_at(&self, names: &[String]) -> Option<Dynamic> {
        let Some((first, rest)) = names.split_first() else { return Some(self.clone()) };
        self.read_lock::<Map>()?.get(first.as_str())?.dynamic_at(rest)
    }
}

impl Fields for Map {
    fn lookup(&self, path: &Path) -> Lookup<'_> {
        walk_map(self, path.names(), 0)
    }

    fn whole(&self) -> Leaf<'_> {
        Leaf::Other
    }

    fn dynamic_at(&self, names: &[String]) -> Option<Dynamic> {
        let (first, rest) = names.split_first()?;
        self.get(first.as_str())?.dynamic_at(rest)
    }
}

/// `names` from `d`, where `d` is at index `depth` of the whole path.
pub(crate) fn walk(d: &Dynamic, names: &[String], depth: usize) -> Lookup<'static> {
    if names.is_empty() {
        return Lookup::Value(Leaf::of(d));
    }
    match d.read_lock::<Map>() {
        Some(map) => walk_map(&map, names, depth),
        None => Lookup::NotMap,
    }
}

fn walk_map(map: &Map, names: &[String], depth: usize) -> Lookup<'static> {
    let Some((first, rest)) = names.split_first() else { return Lookup::Value(Leaf::Other) };
    match map.get(first.as_str()) {
        Some(v) => walk(v, rest, depth + 1),
        None => Lookup::Absent(depth),
    }
}

/// The paths a read keeps, as a tree of names: each path's slot, and per name the slots below it.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    root: Node,
    /// By [`PathId`]: the path's slot (`u32::MAX`: not in this layout).
    slot_of: Vec<u32>,
    paths: Vec<Path>,
    /// The slot of `id`.
    id: usize,
}

impl PartialEq for Layout {
    fn eq(&self, other: &Self) -> bool {
        self.paths == other.paths
    }
}

impl Eq for Layout {}

#[derive(Debug, Clone, Default)]
struct Node {
    slot: Option<usize>,
    /// The slots of the paths that go through this name.
    below: Range<usize>,
    children: Vec<(Box<str>, Node)>,
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|(n, _)| **n == *name).map(|(_, node)| node)
    }

    fn insert(&mut self, names: &[String]) {
        let Some((first, rest)) = names.split_first() else { return };
        let at = match self.children.iter().position(|(n, _)| **n == **first) {
            Some(at) => at,
            None => {
                self.children.push((first.as_str().into(), Node::default()));
                self.children.len() - 1
            }
        };
        let child = &mut self.children[at].1;
        if rest.is_empty() {
            child.slot = Some(usize::MAX);
        } else {
            child.insert(rest);
        }
    }

    /// Numbers the slots depth first: a node's own slot, then those below it.
    fn number(&mut self, next: &mut usize) {
        if self.slot.is_some() {
            self.slot = Some(*next);
            *next += 1;
        }
        let start = *next;
        for (_, child) in &mut self.children {
            child.number(next);
        }
        self.below = start..*next;
    }

    fn slot_of(&self, names: &[String]) -> Option<usize> {
        match names.split_first() {
            None => self.slot,
            Some((first, rest)) => self.child(first)?.slot_of(rest),
        }
    }
}

impl Layout {
    /// A layout of `paths` and the contact's `id`.
    pub fn new(paths: impl IntoIterator<Item = Path>) -> Self {
        let mut paths: Vec<Path> = paths.into_iter().chain([Path::new(&["id"])]).collect();
        paths.sort_by(|a, b| a.names.cmp(&b.names));
        paths.dedup();
        let mut root = Node::default();
        for path in &paths {
            root.insert(path.names());
        }
        root.number(&mut 0);
        let top = paths.iter().map(|p| p.id.0 as usize + 1).max().unwrap_or(0);
        let mut slot_of = vec![u32::MAX; top];
        for path in &paths {
            let slot = root.slot_of(path.names()).and_then(|s| u32::try_from(s).ok()).unwrap_or(u32::MAX);
            slot_of[path.id.0 as usize] = slot;
        }
        let id = root.slot_of(&["id".to_owned()]).unwrap_or(0);
        Self { root, slot_of, paths, id }
    }

    /// The slot of `path`, when this layout has one.
    fn slot(&self, path: &Path) -> Option<usize> {
        self.slot_of.get(path.id.0 as usize).filter(|s| **s != u32::MAX).map(|s| *s as usize)
    }

    /// Reads the contact `text` (a JSON object) into its slots.
    pub fn read(&self, text: &str) -> serde_json::Result<Slots> {
        crate::contact::whole(text, |text| self.read_at(text))
    }

    /// The record at the start of `text` into slots, and the bytes it took (what follows is the
    /// caller's: the rest of a page).
    pub fn read_at(&self, text: &str) -> serde_json::Result<(Slots, usize)> {
        let mut values = vec![Slot::Absent(0); self.root.below.end];
        let ((), used) = crate::contact::parse_one(text, |de| {
            de.deserialize_map(Fill { node: &self.root, values: &mut values, depth: 0 })
        })?;
        Ok((Slots(values), used))
    }

    /// The record's id from its slots: text, or an integer written as text.
    pub fn id_text<'s>(&self, slots: &'s Slots) -> Option<std::borrow::Cow<'s, str>> {
        match slots.0.get(self.id)? {
            Slot::Text(s) => Some(s.as_str().into()),
            Slot::Int(i) => Some(i.to_string().into()),
            _ => None,
        }
    }
}

/// One path's value in a record.
#[derive(Debug, Clone)]
enum Slot {
    Absent(u32),
    NotMap,
    Unit,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Text, unescaped: up to 24 bytes held in place (no allocation).
    Text(CompactString),
    Other,
}

/// A record's values, one per slot of its read's [`Layout`].
#[derive(Debug, Clone, Default)]
pub struct Slots(Vec<Slot>);

impl Slots {
    /// What the record holds at `path`; `None` when the layout has no slot for it.
    pub fn lookup<'a>(&'a self, layout: &Layout, path: &Path) -> Option<Lookup<'a>> {
        let slot = &self.0[layout.slot(path)?];
        Some(match slot {
            Slot::Absent(depth) => Lookup::Absent(*depth as usize),
            Slot::NotMap => Lookup::NotMap,
            Slot::Unit => Lookup::Value(Leaf::Unit),
            Slot::Bool(b) => Lookup::Value(Leaf::Bool(*b)),
            Slot::Int(i) => Lookup::Value(Leaf::Int(*i)),
            Slot::Float(f) => Lookup::Value(Leaf::Float(*f)),
            Slot::Text(s) => Lookup::Value(Leaf::Str(Text::Ref(s))),
            Slot::Other => Lookup::Value(Leaf::Other),
        })
    }
}

/// Fills `node`'s slots from the value being read; `depth`: the index of the names below `node`.
/// A map's key, borrowed from the text when it has no escapes (serde's own `Cow<str>` always
/// copies: an allocation for every key of every record).
pub(crate) struct Key<'de>(pub std::borrow::Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(v.into()))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(v.to_owned().into()))
            }
        }
        d.deserialize_str(Text)
    }
}

struct Fill<'l, 'v> {
    node: &'l Node,
    values: &'v mut [Slot],
    depth: u32,
}

impl Fill<'_, '_> {
    /// The value is not a map: it is the node's own value, and nothing below it can be reached.
    fn leaf(self, slot: Slot) {
        if let Some(s) = self.node.slot {
            self.values[s] = slot;
        }
        self.values[self.node.below.clone()].fill(Slot::NotMap);
    }
}

impl<'de> DeserializeSeed<'de> for Fill<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Numbers as Rhai reads JSON: integers that fit `i64` are integers, every other number a float.
impl<'de> Visitor<'de> for Fill<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.leaf(Slot::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.leaf(Slot::Int(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.leaf(i64::try_from(v).map_or(Slot::Float(v as f64), Slot::Int));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        self.leaf(Slot::Float(v));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.leaf(Slot::Text(v.into()));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.leaf(Slot::Unit);
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.leaf(Slot::Unit);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.leaf(Slot::Other);
        Ok(())
    }

    /// A map: the node's own value is `Other`; each name below it is absent until read (a name
    /// read twice: the last one counts, as in a Rhai map).
    fn visit_map<M: MapAccess<'de>>(self, mut entries: M) -> Result<(), M::Error> {
        let Fill { node, values, depth } = self;
        if let Some(s) = node.slot {
            values[s] = Slot::Other;
        }
        values[node.below.clone()].fill(Slot::Absent(depth));
        while let Some(Key(key)) = entries.next_key::<Key<'de>>()? {
            match node.child(&key) {
                Some(child) => entries.next_value_seed(Fill { node: child, values: &mut *values, depth: depth + 1 })?,
                None => {
                    entries.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Path {
        Path::new(&s.split('.').collect::<Vec<_>>())
    }

    // A key without escapes is borrowed from the text (no allocation a key, a record); one with
    // escapes is unescaped into its own text.
    #[test]
    fn keys_are_borrowed_unless_escaped() {
        let Key(plain) = serde_json::from_str::<Key<'_>>(r#""region""#).expect("key");
        let Key(escaped) = serde_json::from_str::<Key<'_>>(r#""re\u0067ion""#).expect("key");
        assert!(matches!(plain, std::borrow::Cow::Borrowed("region")), "{plain:?}");
        assert!(matches!(&escaped, std::borrow::Cow::Owned(s) if s == "region"), "{escaped:?}");
        assert!(serde_json::from_str::<Key<'_>>("1").is_err());
    }

    // Slots answer every path as the parsed map does: values, absent names (at the right depth),
    // values under something that is not a map, escaped text, numbers as Rhai reads them, the
    // last of a name written twice, and a path the layout lacks is not answered.
    #[test]
    fn slots_answer_as_the_map_does() {
        let paths = ["region", "city", "customFields", "customFields.totalSpent", "customFields.d", "a.b.c", "n", "id"];
        let layout = Layout::new(paths.iter().map(|p| path(p)));
        let records = [
            r#"{"id":"c1","region":"Veneto","customFields":{"totalSpent":6800,"d":"2026-01-01"},"n":null}"#,
            r#"{"id":7,"region":"Emilia\u002dRomagna","city":["x"],"customFields":"text","a":{"b":{"c":1.5}}}"#,
            r#"{"id":"c3","customFields":{"totalSpent":18446744073709551615},"a":{"b":3},"n":{"k":1}}"#,
            r#"{"id":"c4","region":"A","region":"B","customFields":{"d":1},"customFields":{"totalSpent":-2}}"#,
            r#"{"id":"c5","a":{"x":1},"city":true}"#,
        ];
        let show = |l: Lookup<'_>| match l {
            Lookup::Value(Leaf::Str(t)) => format!("Str({})", t.as_str()),
            other => format!("{other:?}"),
        };
        for text in records {
            let slots = layout.read(text).expect("reads");
            let map: Dynamic = serde_json::from_str(text).expect("json");
            for p in paths {
                let from_slots = slots.lookup(&layout, &path(p)).expect("in the layout");
                assert_eq!(show(from_slots), show(map.lookup(&path(p))), "{p} in {text}");
            }
            assert!(slots.lookup(&layout, &path("email")).is_none());
        }
        let slots = layout.read(records[1]).expect("reads");
        assert_eq!(layout.id_text(&slots).as_deref(), Some("7"));
        assert!(layout.read("[1]").is_err() && layout.read(r#"{"id":"c1","region":"#).is_err());
    }
}
