//! A rule's `FILTER`: the contract's server-side filters, and the same test done client-side so
//! a member that no longer passes the filter is judged exactly as the server would have judged it.

use rhai::Dynamic;

use crate::slots::{Fields, Leaf, Lookup, Path};

/// The standard fields the contract lets `GET /contacts` filter on.
pub const STANDARD_FIELDS: [&str; 6] = ["region", "city", "firstName", "lastName", "email", "phoneNumber"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterTerm {
    /// `region=Lombardia`: exact match on a standard field.
    Standard { field: String, value: String, path: Path },
    /// `customFields.<name>=<value>`: exact match on a custom field.
    Custom { field: String, value: String, path: Path },
    /// `customFields.<name>.before=<YYYY-MM-DD>`: a date strictly before.
    Before { field: String, date: String, path: Path },
}

impl FilterTerm {
    pub fn standard(field: &str, value: &str) -> Self {
        Self::Standard { field: field.into(), value: value.into(), path: Path::new(&[field]) }
    }

    pub fn custom(field: &str, value: &str) -> Self {
        Self::Custom { field: field.into(), value: value.into(), path: Path::new(&["customFields", field]) }
    }

    pub fn before(field: &str, date: &str) -> Self {
        Self::Before { field: field.into(), date: date.into(), path: Path::new(&["customFields", field]) }
    }

    /// The path of the field this term reads.
    pub fn path(&self) -> &Path {
        match self {
            Self::Standard { path, .. } | Self::Custom { path, .. } | Self::Before { path, .. } => path,
        }
    }

    /// Reads one `FILTER` entry; the error names the key or value that the API would refuse.
    pub fn parse(key: &str, value: &str) -> Result<Self, String> {
        if STANDARD_FIELDS.contains(&key) {
            return Ok(Self::standard(key, value));
        }
        let Some(custom) = key.strip_prefix("customFields.").filter(|c| !c.is_empty()) else {
            return Err(format!(
                "FILTER key {key:?} is not a filter the API supports (use one of {} or customFields.<name>[.before])",
                STANDARD_FIELDS.join(", ")
            ));
        };
        match custom.strip_suffix(".before") {
            Some(field) => {
                if chrono::NaiveDate::parse_from_str(value, "%Y-%m-%d").is_err() {
                    return Err(format!("FILTER {key:?} needs a date YYYY-MM-DD, got {value:?}"));
                }
                Ok(Self::before(field, value))
            }
            None => Ok(Self::custom(custom, value)),
        }
    }

    pub fn query_pair(&self) -> (String, String) {
        match self {
            Self::Standard { field, value, .. } => (field.clone(), value.clone()),
            Self::Custom { field, value, .. } => (format!("customFields.{field}"), value.clone()),
            Self::Before { field, date, .. } => (format!("customFields.{field}.before"), date.clone()),
        }
    }

    /// The contact's top-level field this term reads.
    pub fn top_field(&self) -> &str {
        match self {
            Self::Standard { field, .. } => field,
            Self::Custom { .. } | Self::Before { .. } => "customFields",
        }
    }

    /// The field's value on `record` as people read it: the text itself, a number, `(absent)`.
    pub fn value_of(&self, record: &(impl Fields + ?Sized)) -> String {
        match record.lookup(self.path()) {
            Lookup::Absent(_) => "(absent)".into(),
            Lookup::NotMap => "(customFields not a map)".into(),
            Lookup::Value(Leaf::Str(text)) => text.as_str().to_owned(),
            Lookup::Value(Leaf::Unit) => "(null)".into(),
            Lookup::Value(_) => record.dynamic_at(self.path().names()).map(|v| v.to_string()).unwrap_or_default(),
        }
    }

    /// Adds one to `tally`'s count of the field's value on `record`, allocating only for a value
    /// not tallied yet (`value_of` text).
    pub fn tally(&self, record: &(impl Fields + ?Sized), tally: &mut hashbrown::HashMap<String, u64>) {
        if let Lookup::Value(Leaf::Str(text)) = record.lookup(self.path())
            && let Some(n) = tally.get_mut(text.as_str())
        {
            *n += 1;
            return;
        }
        *tally.entry(self.value_of(record)).or_default() += 1;
    }

    /// The server's semantics, applied to a record: strings exactly, numbers numerically, dates
    /// by day. A record that lacks the field, holds null there, or holds a value of another kind
    /// cannot be judged: that is an error (the contact is kept as it is), never "does not match".
    /// The field is read in place: a verdict copies nothing (a message quoting a value may).
    pub fn judge(&self, record: &(impl Fields + ?Sized)) -> Result<bool, String> {
        // The key is for messages only: built when one is needed, never on the way to a verdict.
        let key = || self.query_pair().0;
        let quoted = |names: &[String]| record.dynamic_at(names).map_or_else(|| "nothing".into(), |v| kind(&v));
        let value = match record.lookup(self.path()) {
            Lookup::Absent(_) => return Err(format!("FILTER {}: the record has no such field", key())),
            Lookup::NotMap => {
                let above = &self.path().names()[..1];
                return Err(format!("FILTER {}: customFields is {}, not a map", key(), quoted(above)));
            }
            Lookup::Value(Leaf::Unit) => return Err(format!("FILTER {}: the field is null", key())),
            Lookup::Value(value) => value,
        };
        let mismatch = || {
            format!(
                "FILTER {}: the field holds {}, which this filter cannot compare",
                key(),
                quoted(self.path().names())
            )
        };
        match self {
            Self::Standard { value: want, .. } => match value {
                Leaf::Str(s) => Ok(s.as_str() == want),
                _ => Err(mismatch()),
            },
            Self::Custom { value: want, .. } => text_equals(&value, want).ok_or_else(mismatch),
            Self::Before { date, .. } => {
                let Leaf::Str(text) = value else { return Err(mismatch()) };
                let text = text.as_str();
                let day = text.get(..10).filter(|d| {
                    super::engine::iso_day(d).is_some() || chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").is_ok()
                });
                match day {
                    Some(day) => Ok(day < date.as_str()),
                    None => Err(format!("FILTER {}: the field holds {text:?}, not an ISO date", key())),
                }
            }
        }
    }
}

fn kind(v: &Dynamic) -> String {
    if v.is_string() { format!("the text {v:?}") } else { format!("{} {v}", v.type_name()) }
}

/// Exact equality with the filter's text: strings as text, numbers numerically, booleans as
/// `true`/`false`; `None` when the two are not of comparable kinds.
fn text_equals(v: &Leaf<'_>, want: &str) -> Option<bool> {
    match v {
        Leaf::Str(s) => Some(s.as_str() == want),
        Leaf::Int(i) => want.parse::<f64>().ok().map(|w| w == *i as f64),
        Leaf::Float(f) => want.parse::<f64>().ok().map(|w| w == *f),
        Leaf::Bool(b) => match want {
            "true" => Some(*b),
            "false" => Some(!*b),
            _ => None,
        },
        Leaf::Unit | Leaf::Date(_) | Leaf::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> rhai::Map {
        serde_json::from_str::<rhai::Dynamic>(json).expect("json").try_cast::<rhai::Map>().expect("map")
    }

    fn passes(term: &FilterTerm, r: &rhai::Map) -> bool {
        term.judge(r).expect("judgeable")
    }

    // Client-side filtering agrees with the server's semantics on strings, numbers and dates.
    #[test]
    fn passes_like_the_server() {
        let r = record(
            r#"{"region":"Lombardia","customFields":{"totalSpent":6800,"lastPurchaseDate":"2025-12-01","vip":true}}"#,
        );
        let t = |k: &str, v: &str| FilterTerm::parse(k, v).expect("ok");
        assert!(passes(&t("region", "Lombardia"), &r));
        assert!(!passes(&t("region", "lombardia"), &r));
        assert!(passes(&t("customFields.totalSpent", "6800.0"), &r));
        assert!(passes(&t("customFields.vip", "true"), &r));
        assert!(passes(&t("customFields.lastPurchaseDate.before", "2026-01-09"), &r));
        assert!(!passes(&t("customFields.lastPurchaseDate.before", "2025-12-01"), &r));
    }

    // A missing, null or differently typed field cannot be judged: an error naming the filter, never false.
    #[test]
    fn unjudgeable_records_are_errors() {
        let t = |k: &str, v: &str| FilterTerm::parse(k, v).expect("ok");
        let sparse = record(r#"{"id":"c1","region":null,"city":7,"customFields":{"d":"soon","n":5}}"#);
        let err = t("email", "a@b.c").judge(&sparse).expect_err("missing");
        assert!(err.contains("FILTER email") && err.contains("no such field"), "{err}");
        assert!(t("region", "Lombardia").judge(&sparse).expect_err("null").contains("null"));
        assert!(t("city", "Milano").judge(&sparse).expect_err("number").contains("i64 7"));
        assert!(t("customFields.d.before", "2026-01-01").judge(&sparse).expect_err("not a date").contains("soon"));
        assert!(t("customFields.n", "five").judge(&sparse).is_err());
        assert!(t("customFields.x", "1").judge(&record(r#"{"id":"c2"}"#)).is_err());
    }

    // Keys the API would refuse are refused at load time, naming the key.
    #[test]
    fn unsupported_keys_are_refused() {
        let err = FilterTerm::parse("shoeSize", "42").expect_err("unsupported");
        assert!(err.contains("\"shoeSize\""), "{err}");
        assert!(FilterTerm::parse("customFields.lastPurchaseDate.before", "soon").is_err());
    }
}
