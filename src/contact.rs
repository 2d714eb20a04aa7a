//! A contact as the API returns it, converted once into what rules read, plus the small trait the
//! gateway needs of any record type (its id). Neither the gateway nor the rules own this: it is
//! the one shape both speak.

use std::sync::Arc;

use bytes::Bytes;
use rhai::{Dynamic, Map};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::ids::ContactId;
use crate::slots::{Fields, Layout, Leaf, Lookup, Path, Slots};

/// A record the client can de-duplicate: anything deserializable that knows its contact id.
pub trait Record: DeserializeOwned + Send + 'static {
    fn contact_id(&self) -> Option<ContactId>;

    /// The record at the start of `text` (a slice of `page` that runs on to the page's end),
    /// keeping `keep`'s fields (`None`: every field), and the bytes it took. Records that cannot
    /// narrow parse it whole.
    fn parse_at(text: &str, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<(Self, usize)> {
        let _ = (page, keep);
        parse_one(text, |de| Self::deserialize(de))
    }

    /// The record that is the whole of `raw`, a slice of `page` (see [`Record::parse_at`]).
    fn from_raw(raw: &RawValue, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<Self> {
        whole(raw.get(), |text| Self::parse_at(text, page, keep))
    }
}

/// One JSON value at the start of `text`, read by `read`, and the bytes it took: what follows it
/// is left to the caller (a page's records are parsed where they lie, in one pass over the page).
pub fn parse_one<'a, T>(
    text: &'a str,
    read: impl FnOnce(&mut serde_json::Deserializer<serde_json::de::StrRead<'a>>) -> serde_json::Result<T>,
) -> serde_json::Result<(T, usize)> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = read(&mut de)?;
    Ok((value, de.into_iter::<serde::de::IgnoredAny>().byte_offset()))
}

/// What `read` makes of the start of `text`, which must be all of it (whitespace aside).
pub fn whole<T>(text: &str, read: impl FnOnce(&str) -> serde_json::Result<(T, usize)>) -> serde_json::Result<T> {
    let (value, used) = read(text)?;
    match text[used..].trim_start() {
        "" => Ok(value),
        _ => Err(serde::de::Error::custom(format!("trailing characters after byte {used}"))),
    }
}

impl Record for serde_json::Value {
    fn contact_id(&self) -> Option<ContactId> {
        match self.get("id")? {
            serde_json::Value::String(s) => Some(ContactId::from(s.as_str())),
            serde_json::Value::Number(n) => Some(ContactId::from(n.to_string())),
            _ => None,
        }
    }
}

/// The top-level fields a read keeps of each contact: those its rules read (`FILTER`, a natively
/// judged `matches` or `list`, the fields they mention), plus `id`. Only a read whose every rule is
/// judged natively narrows its records (`Rule::reads`); any other keeps every field.
///
/// A read whose rules are all judged natively, and that knows every path they read, also has a
/// [`Layout`]: its records are read into slots, not maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    names: Vec<String>,
    layout: Option<Layout>,
}

impl Keep {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut names: Vec<String> = names.into_iter().chain(["id".to_owned()]).collect();
        names.sort_unstable();
        names.dedup();
        Self { names, layout: None }
    }

    /// Records read into slots, one for each of `paths` (which must include every path judging
    /// reads; a path missing from them is answered by parsing the record again, correct but slow).
    pub fn with_layout(mut self, paths: impl IntoIterator<Item = Path>) -> Self {
        self.layout = Some(Layout::new(paths));
        self
    }

    /// Whether records are read into slots.
    pub fn has_layout(&self) -> bool {
        self.layout.is_some()
    }

    pub fn keeps(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

/// A contact parsed straight from JSON into a Rhai object map: parsed and converted in one step,
/// `customFields` nested. Either every field is in the map (unknown ones too), or (a narrowed
/// record, from a read whose rules are all judged natively) only the fields the read keeps, with
/// the record as read beside them: whatever hands a contact to Rhai ([`ContactRecord::contact`],
/// [`ContactRecord::full`]) gives every field, parsed again from that text when narrowed.
///
/// A record of a read with a [`Layout`] holds no map at all: its fields are slots.
#[derive(Debug, Clone)]
pub struct ContactRecord {
    pub id: ContactId,
    fields: Held,
    /// The record as read (a slice of its page) and what `fields` kept of it, when `fields` holds
    /// only the kept fields.
    narrowed: Option<(Bytes, Arc<Keep>)>,
}

#[derive(Debug, Clone)]
enum Held {
    Map(Dynamic),
    /// Only in a narrowed record whose `Keep` has a layout.
    Slots(Slots),
}

/// A contact as a rule's call receives it: the native evaluator reads its [`Fields`] (a narrowed
/// record's kept fields, which are every field it reads); [`Contact::into_full`] is what Rhai
/// receives (every field, always).
pub enum Contact<'a> {
    Owned(Dynamic),
    Borrowed(&'a Dynamic),
    Record(&'a ContactRecord),
}

impl Fields for Contact<'_> {
    fn lookup(&self, path: &Path) -> Lookup<'_> {
        match self {
            Self::Owned(d) => d.lookup(path),
            Self::Borrowed(d) => d.lookup(path),
            Self::Record(r) => r.lookup(path),
        }
    }

    fn whole(&self) -> Leaf<'_> {
        match self {
            Self::Owned(d) => d.whole(),
            Self::Borrowed(d) => d.whole(),
            Self::Record(r) => r.whole(),
        }
    }

    fn dynamic_at(&self, names: &[String]) -> Option<Dynamic> {
        match self {
            Self::Owned(d) => d.dynamic_at(names),
            Self::Borrowed(d) => d.dynamic_at(names),
            Self::Record(r) => r.dynamic_at(names),
        }
    }
}

impl Contact<'_> {
    /// The contact's id as text (for messages).
    pub fn id_text(&self) -> Option<String> {
        match self {
            Self::Owned(d) => d.dynamic_at(&["id".to_owned()]).map(|id| id.to_string()),
            Self::Borrowed(d) => d.dynamic_at(&["id".to_owned()]).map(|id| id.to_string()),
            Self::Record(r) => Some(r.id.to_string()),
        }
    }

    /// Every field, owned: the contact itself, a copy, or a narrowed record parsed again.
    pub fn into_full(self) -> Dynamic {
        match self {
            Self::Owned(d) => d,
            Self::Borrowed(d) => d.clone(),
            Self::Record(r) => r.full().into_owned(),
        }
    }

    /// What Rhai receives when its code reads at most `fields` (`None`: any field): a narrowed
    /// record's kept fields when they include all of `fields`, else [`Contact::into_full`].
    pub fn into_reading(self, fields: Option<&[String]>) -> Dynamic {
        match self {
            Self::Record(r @ ContactRecord { fields: Held::Map(d), .. }) if r.keeps_all(fields) => d.clone(),
            other => other.into_full(),
        }
    }
}

impl ContactRecord {
    /// A record from fields a rule already holds (the contact it passes on to `segment`).
    pub fn from_fields(fields: Dynamic) -> Self {
        let id = fields.dynamic_at(&["id".to_owned()]).map(|id| id.to_string()).unwrap_or_default();
        Self { id: ContactId::from(id), fields: Held::Map(fields), narrowed: None }
    }

    /// Whether the fields are an object map (every record read is).
    pub fn is_map(&self) -> bool {
        match &self.fields {
            Held::Map(d) => d.is_map(),
            Held::Slots(_) => true,
        }
    }

    /// Whether only the kept fields were parsed.
    /// The record's text as read, when narrowed (a slice of its page).
    #[cfg(test)]
    pub fn text(&self) -> Option<&[u8]> {
        self.narrowed.as_ref().map(|(raw, _)| &raw[..])
    }

    pub fn is_narrowed(&self) -> bool {
        self.narrowed.is_some()
    }

    /// How many top-level fields the record holds parsed in its map (none when read into slots).
    pub fn parsed_fields(&self) -> usize {
        match &self.fields {
            Held::Map(d) => d.read_lock::<Map>().map_or(0, |m| m.len()),
            Held::Slots(_) => 0,
        }
    }

    /// Whether the record was read into slots (see [`Keep::with_layout`]).
    pub fn is_slotted(&self) -> bool {
        matches!(self.fields, Held::Slots(_))
    }

    /// Whether `fields` (top-level names; `None`: any field) are all in this record's map: every
    /// record read whole has them, a narrowed one when its read kept each; one read into slots has
    /// no map.
    pub fn keeps_all(&self, fields: Option<&[String]>) -> bool {
        match (&self.fields, &self.narrowed, fields) {
            (Held::Slots(_), ..) => false,
            (_, None, _) => true,
            (_, Some(_), None) => false,
            (_, Some((_, keep)), Some(fields)) => fields.iter().all(|f| keep.keeps(f)),
        }
    }

    /// Every field of the contact (a narrowed record is parsed again from the record as read).
    pub fn full(&self) -> std::borrow::Cow<'_, Dynamic> {
        match (&self.narrowed, &self.fields) {
            (None, Held::Map(d)) => std::borrow::Cow::Borrowed(d),
            (Some((raw, _)), held) => {
                std::borrow::Cow::Owned(serde_json::from_slice::<Dynamic>(raw).unwrap_or_else(|_| match held {
                    Held::Map(d) => d.clone(),
                    Held::Slots(_) => Dynamic::from_map(Map::new()),
                }))
            }
            (None, Held::Slots(_)) => std::borrow::Cow::Owned(Dynamic::from_map(Map::new())),
        }
    }

    /// Every field, taking the map rather than copying it when the record holds them all.
    pub fn take_full(&mut self) -> Dynamic {
        self.take_reading(None)
    }

    /// [`Contact::into_reading`] for the record's last use: the map taken rather than copied
    /// whenever it holds `fields`.
    pub fn take_reading(&mut self, fields: Option<&[String]>) -> Dynamic {
        if self.keeps_all(fields)
            && let Held::Map(d) = &mut self.fields
        {
            return std::mem::take(d);
        }
        self.full().into_owned()
    }

    /// The contact for a rule's call, read in place.
    pub fn contact(&self) -> Contact<'_> {
        match (&self.narrowed, &self.fields) {
            (None, Held::Map(d)) => Contact::Borrowed(d),
            _ => Contact::Record(self),
        }
    }

    /// Every field, owned.
    pub fn into_full(mut self) -> Dynamic {
        self.take_full()
    }
}

impl Fields for ContactRecord {
    fn lookup(&self, path: &Path) -> Lookup<'_> {
        match (&self.fields, &self.narrowed) {
            (Held::Map(d), _) => d.lookup(path),
            (Held::Slots(slots), Some((_, keep))) => {
                let answered = keep.layout.as_ref().and_then(|layout| slots.lookup(layout, path));
                // A path the read did not lay out: from the record parsed again (never in a pass,
                // whose layout holds every path its rules read).
                answered.unwrap_or_else(|| crate::slots::walk(&self.full(), path.names(), 0))
            }
            (Held::Slots(_), None) => Lookup::NotMap,
        }
    }

    fn whole(&self) -> Leaf<'_> {
        match &self.fields {
            Held::Map(d) => d.whole(),
            Held::Slots(_) => Leaf::Other,
        }
    }

    fn dynamic_at(&self, names: &[String]) -> Option<Dynamic> {
        match &self.fields {
            Held::Map(d) if self.keeps_all(names.get(..1)) => d.dynamic_at(names),
            _ => self.full().dynamic_at(names),
        }
    }
}

/// A narrowed contact's map: the kept top-level keys, each value parsed as Rhai parses it.
struct Narrow<'k>(&'k Keep);

impl<'de> serde::de::Visitor<'de> for Narrow<'_> {
    type Value = Map;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a contact (a JSON object)")
    }

    fn visit_map<M: serde::de::MapAccess<'de>>(self, mut entries: M) -> Result<Map, M::Error> {
        let mut map = Map::new();
        while let Some(crate::slots::Key(key)) = entries.next_key::<crate::slots::Key<'de>>()? {
            if self.0.keeps(&key) {
                map.insert(key.as_ref().into(), entries.next_value::<Dynamic>()?);
            } else {
                entries.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(map)
    }
}

const NO_ID: &str = "a contact without an id (string or integer)";

fn id_of<E: serde::de::Error>(map: &Map) -> Result<ContactId, E> {
    match map.get("id") {
        Some(v) if v.is_string() => Ok(ContactId::from(v.clone().into_string().unwrap_or_default())),
        Some(v) if v.is_int() => Ok(ContactId::from(v.to_string())),
        _ => Err(E::custom(NO_ID)),
    }
}

impl<'de> Deserialize<'de> for ContactRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = Dynamic::deserialize(d)?
            .try_cast::<Map>()
            .ok_or_else(|| D::Error::custom("a contact must be a JSON object"))?;
        Ok(Self { id: id_of(&map)?, fields: Held::Map(Dynamic::from_map(map)), narrowed: None })
    }
}

impl Record for ContactRecord {
    fn contact_id(&self) -> Option<ContactId> {
        Some(self.id.clone())
    }

    /// A narrowed record holds the kept fields, parsed, and its text as a slice of the page (shared,
    /// not copied; a text from elsewhere is copied).
    fn parse_at(text: &str, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<(Self, usize)> {
        use serde::de::Error;
        let Some(keep) = keep else { return parse_one(text, |de| Self::deserialize(de)) };
        // The record's own text, once parsed: a slice of the page, shared (text from elsewhere is copied).
        let shared = |used: usize| {
            let text = &text.as_bytes()[..used];
            let (whole, part) = (page.as_ptr_range(), text.as_ptr_range());
            let within = whole.start <= part.start && part.end <= whole.end;
            if within { page.slice_ref(text) } else { Bytes::copy_from_slice(text) }
        };
        // Broken JSON keeps its own message; well-formed JSON that is not an object gets this one.
        let not_an_object = |e: serde_json::Error| match e.classify() {
            serde_json::error::Category::Data => serde_json::Error::custom("a contact must be a JSON object"),
            _ => e,
        };
        if let Some(layout) = &keep.layout {
            let (slots, used) = layout.read_at(text).map_err(not_an_object)?;
            let id = layout.id_text(&slots).map(|id| ContactId::from(id.as_ref()));
            let id = id.ok_or_else(|| serde_json::Error::custom(NO_ID))?;
            return Ok((Self { id, fields: Held::Slots(slots), narrowed: Some((shared(used), keep.clone())) }, used));
        }
        let (map, used) = parse_one(text, |de| de.deserialize_map(Narrow(keep))).map_err(not_an_object)?;
        let record = Self {
            id: id_of(&map)?,
            fields: Held::Map(Dynamic::from_map(map)),
            narrowed: Some((shared(used), keep.clone())),
        };
        Ok((record, used))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // String and numeric ids are both accepted and read as text; a record without id is refused.
    #[test]
    fn ids_are_opaque_text() {
        let a: ContactRecord = serde_json::from_str(r#"{"id":"cnt-001","customFields":{"x":1}}"#).expect("string id");
        let b: ContactRecord = serde_json::from_str(r#"{"id":12345,"region":"Veneto"}"#).expect("numeric id");
        assert_eq!(a.id.as_str(), "cnt-001");
        assert_eq!(b.id.as_str(), "12345");
        assert!(serde_json::from_str::<ContactRecord>(r#"{"region":"Veneto"}"#).is_err());
    }

    // A read that keeps some fields parses only those (and the id), and still hands every field,
    // exactly as a full parse has them, to whatever needs them all.
    #[test]
    fn a_narrowed_record_keeps_its_fields_and_gives_them_all() {
        let json = r#"{"id":"c1","firstName":"Anna","region":"Veneto","customFields":{"totalSpent":6800,"d":"2026-01-01"},"email":null}"#;
        let keep = Arc::new(Keep::new(["region".to_owned(), "customFields".to_owned()]));
        let page = Bytes::from(json);
        let raw: &RawValue = serde_json::from_slice(&page).expect("json");
        let narrow = ContactRecord::from_raw(raw, &page, Some(&keep)).expect("parses");
        let whole: ContactRecord = serde_json::from_str(json).expect("parses");
        assert!(narrow.is_narrowed() && !whole.is_narrowed());
        // The record's text is the page's own bytes, not a copy.
        let text = narrow.narrowed.as_ref().map(|(raw, _)| raw.as_ptr_range()).expect("narrowed");
        assert_eq!(text, page.as_ptr_range());
        let keys = |r: &ContactRecord| match &r.fields {
            Held::Map(d) => d.read_lock::<Map>().expect("map").keys().map(ToString::to_string).collect::<Vec<_>>(),
            Held::Slots(_) => Vec::new(),
        };
        assert_eq!(keys(&narrow), ["customFields", "id", "region"]);
        assert_eq!(keys(&whole).len(), 5);
        assert_eq!(narrow.full().to_string(), whole.full().to_string());
        assert_eq!(narrow.contact().into_full().to_string(), whole.full().to_string());
        assert_eq!(narrow.id.as_str(), "c1");
        // Without a `Keep`, every field.
        assert!(!ContactRecord::from_raw(raw, &page, None).expect("parses").is_narrowed());
        // Not an object, or no id: refused as before.
        let refused = |text: &'static str| {
            let page = Bytes::from(text);
            let raw: &RawValue = serde_json::from_slice(&page).expect("json");
            ContactRecord::from_raw(raw, &page, Some(&keep)).is_err()
        };
        assert!(refused("[1]") && refused(r#"{"region":"Veneto"}"#));
    }

    // A read with a layout reads records into slots: the paths it laid out answer from them, any
    // other path and every field Rhai needs from the record as read.
    #[test]
    fn a_slotted_record_answers_its_paths_and_gives_every_field() {
        let json = r#"{"id":42,"region":"Veneto","customFields":{"totalSpent":6800.5,"d":"2026-01-01"},"email":null}"#;
        let paths = [Path::new(&["region"]), Path::new(&["customFields", "totalSpent"])];
        let keep = Arc::new(Keep::new(["region".to_owned(), "customFields".to_owned()]).with_layout(paths.clone()));
        let page = Bytes::from(json);
        let raw: &RawValue = serde_json::from_slice(&page).expect("json");
        let record = ContactRecord::from_raw(raw, &page, Some(&keep)).expect("parses");
        let whole: ContactRecord = serde_json::from_str(json).expect("parses");
        assert!(record.is_slotted() && record.is_narrowed() && !record.keeps_all(Some(&["region".to_owned()])));
        assert_eq!(record.id.as_str(), "42");
        assert!(matches!(record.lookup(&paths[0]), Lookup::Value(Leaf::Str(t)) if t.as_str() == "Veneto"));
        assert!(matches!(record.lookup(&paths[1]), Lookup::Value(Leaf::Float(f)) if f == 6800.5));
        // Not laid out: answered from the record as read.
        let d = Path::new(&["customFields", "d"]);
        assert!(matches!(record.lookup(&d), Lookup::Value(Leaf::Str(t)) if t.as_str() == "2026-01-01"));
        assert!(matches!(record.lookup(&Path::new(&["email"])), Lookup::Value(Leaf::Unit)));
        assert!(matches!(record.lookup(&Path::new(&["city"])), Lookup::Absent(0)));
        assert_eq!(record.contact().into_full().to_string(), whole.full().to_string());
        assert_eq!(record.dynamic_at(&["region".to_owned()]).map(|v| v.to_string()).as_deref(), Some("Veneto"));
        // No id, or not an object: refused as before.
        for text in [r#"{"region":"Veneto"}"#, r#"{"id":1.5}"#, "[1]"] {
            let page = Bytes::from(text);
            let raw: &RawValue = serde_json::from_slice(&page).expect("json");
            assert!(ContactRecord::from_raw(raw, &page, Some(&keep)).is_err(), "{text}");
        }
    }
}
