//! A contact as the API returns it, converted once into what rules read, plus the small trait the
//! gateway needs of any record type (its id). Neither the gateway nor the rules own this: it is
//! the one shape both speak.

use rhai::{Dynamic, Map};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use crate::ids::ContactId;

/// A record the client can de-duplicate: anything deserializable that knows its contact id.
pub trait Record: DeserializeOwned + Send + 'static {
    fn contact_id(&self) -> Option<ContactId>;
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

/// A contact parsed straight from JSON into a Rhai object map: parsed and converted in one step,
/// every field kept (unknown ones too), `customFields` nested.
#[derive(Debug, Clone)]
pub struct ContactRecord {
    pub id: ContactId,
    pub fields: Dynamic,
}

impl ContactRecord {
    pub fn map(&self) -> Option<impl std::ops::Deref<Target = Map> + '_> {
        self.fields.read_lock::<Map>()
    }

    /// A record from fields a rule already holds (the contact it passes on to `segment`).
    pub fn from_fields(fields: Dynamic) -> Self {
        let id = fields.read_lock::<Map>().and_then(|m| m.get("id").map(ToString::to_string)).unwrap_or_default();
        Self { id: ContactId::from(id), fields }
    }
}

impl<'de> Deserialize<'de> for ContactRecord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = Dynamic::deserialize(d)?
            .try_cast::<Map>()
            .ok_or_else(|| serde::de::Error::custom("a contact must be a JSON object"))?;
        let id = match map.get("id") {
            Some(v) if v.is_string() => ContactId::from(v.clone().into_string().unwrap_or_default()),
            Some(v) if v.is_int() => ContactId::from(v.to_string()),
            _ => return Err(serde::de::Error::custom("a contact without an id (string or integer)")),
        };
        Ok(Self { id, fields: Dynamic::from_map(map) })
    }
}

impl Record for ContactRecord {
    fn contact_id(&self) -> Option<ContactId> {
        Some(self.id.clone())
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
}
