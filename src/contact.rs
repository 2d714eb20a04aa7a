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

/// A record the client can de-duplicate: anything deserializable that knows its contact id.
pub trait Record: DeserializeOwned + Send + 'static {
    fn contact_id(&self) -> Option<ContactId>;

    /// The record from its text `raw`, a slice of `page`, keeping `keep`'s fields (`None`: every
    /// field). Records that cannot narrow parse it whole.
    fn from_raw(raw: &RawValue, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<Self> {
        let _ = (page, keep);
        serde_json::from_str(raw.get())
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    names: Vec<String>,
}

impl Keep {
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        let mut names: Vec<String> = names.into_iter().chain(["id".to_owned()]).collect();
        names.sort_unstable();
        names.dedup();
        Self { names }
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
#[derive(Debug, Clone)]
pub struct ContactRecord {
    pub id: ContactId,
    fields: Dynamic,
    /// The record as read (a slice of its page) and what `fields` kept of it, when `fields` holds
    /// only the kept fields.
    narrowed: Option<(Bytes, Arc<Keep>)>,
}

/// A contact as a rule's call receives it: `view` is what the native evaluator reads (a narrowed
/// record's kept fields, which are every field it reads); [`Contact::into_full`] is what Rhai
/// receives (every field, always).
pub enum Contact<'a> {
    Owned(Dynamic),
    Borrowed(&'a Dynamic),
    Record(&'a ContactRecord),
}

impl Contact<'_> {
    pub fn view(&self) -> &Dynamic {
        match self {
            Self::Owned(d) => d,
            Self::Borrowed(d) => d,
            Self::Record(r) => &r.fields,
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
            Self::Record(r) if r.keeps_all(fields) => r.fields.clone(),
            other => other.into_full(),
        }
    }
}

impl ContactRecord {
    /// The fields as parsed: every field, or a narrowed record's kept fields. For code that reads
    /// only fields a read keeps (`FILTER`, facts, the fields a rule mentions).
    pub fn map(&self) -> Option<impl std::ops::Deref<Target = Map> + '_> {
        self.fields.read_lock::<Map>()
    }

    /// A record from fields a rule already holds (the contact it passes on to `segment`).
    pub fn from_fields(fields: Dynamic) -> Self {
        let id = fields.read_lock::<Map>().and_then(|m| m.get("id").map(ToString::to_string)).unwrap_or_default();
        Self { id: ContactId::from(id), fields, narrowed: None }
    }

    /// Whether the fields are an object map (every record read is; [`ContactRecord::map`] is `Some`).
    pub fn is_map(&self) -> bool {
        self.fields.is_map()
    }

    /// Whether only the kept fields were parsed.
    pub fn is_narrowed(&self) -> bool {
        self.narrowed.is_some()
    }

    /// Whether `fields` (top-level names; `None`: any field) are all in this record: every record
    /// read whole has them, a narrowed one when its read kept each.
    pub fn keeps_all(&self, fields: Option<&[String]>) -> bool {
        match (&self.narrowed, fields) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some((_, keep)), Some(fields)) => fields.iter().all(|f| keep.keeps(f)),
        }
    }

    /// Every field of the contact (a narrowed record is parsed again from the record as read).
    pub fn full(&self) -> std::borrow::Cow<'_, Dynamic> {
        match &self.narrowed {
            None => std::borrow::Cow::Borrowed(&self.fields),
            Some((raw, _)) => {
                std::borrow::Cow::Owned(serde_json::from_slice::<Dynamic>(raw).unwrap_or_else(|_| self.fields.clone()))
            }
        }
    }

    /// Every field, taking the map rather than copying it when the record holds them all.
    pub fn take_full(&mut self) -> Dynamic {
        self.take_reading(None)
    }

    /// [`Contact::into_reading`] for the record's last use: the map taken rather than copied
    /// whenever it holds `fields`.
    pub fn take_reading(&mut self, fields: Option<&[String]>) -> Dynamic {
        if self.keeps_all(fields) { std::mem::take(&mut self.fields) } else { self.full().into_owned() }
    }

    /// The contact for a rule's call, read in place.
    pub fn contact(&self) -> Contact<'_> {
        match self.narrowed {
            None => Contact::Borrowed(&self.fields),
            Some(_) => Contact::Record(self),
        }
    }

    /// Every field, owned.
    pub fn into_full(mut self) -> Dynamic {
        self.take_full()
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
        while let Some(key) = entries.next_key::<std::borrow::Cow<'de, str>>()? {
            if self.0.keeps(&key) {
                map.insert(key.as_ref().into(), entries.next_value::<Dynamic>()?);
            } else {
                entries.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(map)
    }
}

fn id_of<E: serde::de::Error>(map: &Map) -> Result<ContactId, E> {
    match map.get("id") {
        Some(v) if v.is_string() => Ok(ContactId::from(v.clone().into_string().unwrap_or_default())),
        Some(v) if v.is_int() => Ok(ContactId::from(v.to_string())),
        _ => Err(E::custom("a contact without an id (string or integer)")),
    }
}

impl<'de> Deserialize<'de> for ContactRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let map = Dynamic::deserialize(d)?
            .try_cast::<Map>()
            .ok_or_else(|| D::Error::custom("a contact must be a JSON object"))?;
        Ok(Self { id: id_of(&map)?, fields: Dynamic::from_map(map), narrowed: None })
    }
}

impl Record for ContactRecord {
    fn contact_id(&self) -> Option<ContactId> {
        Some(self.id.clone())
    }

    /// A narrowed record holds the kept fields, parsed, and its text as a slice of the page (shared,
    /// not copied; a text from elsewhere is copied).
    fn from_raw(raw: &RawValue, page: &Bytes, keep: Option<&Arc<Keep>>) -> serde_json::Result<Self> {
        use serde::de::Error;
        let Some(keep) = keep else { return serde_json::from_str(raw.get()) };
        let map = serde_json::Deserializer::from_str(raw.get())
            .deserialize_map(Narrow(keep))
            .map_err(|_| serde_json::Error::custom("a contact must be a JSON object"))?;
        let text = raw.get().as_bytes();
        let (whole, part) = (page.as_ptr_range(), text.as_ptr_range());
        let within = whole.start <= part.start && part.end <= whole.end;
        let raw = if within { page.slice_ref(text) } else { Bytes::copy_from_slice(text) };
        Ok(Self { id: id_of(&map)?, fields: Dynamic::from_map(map), narrowed: Some((raw, keep.clone())) })
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
        let keys = |r: &ContactRecord| r.map().expect("map").keys().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(keys(&narrow), ["customFields", "id", "region"]);
        assert_eq!(keys(&whole).len(), 5);
        assert_eq!(narrow.full().to_string(), whole.full().to_string());
        assert_eq!(narrow.contact().into_full().to_string(), whole.fields.to_string());
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
}
