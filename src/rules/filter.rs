//! A rule's `FILTER`: the contract's server-side filters, and the same test done client-side so
//! a member that no longer passes the filter is judged exactly as the server would have judged it.

use rhai::{Dynamic, Map};

/// The standard fields the contract lets `GET /contacts` filter on.
pub const STANDARD_FIELDS: [&str; 6] = ["region", "city", "firstName", "lastName", "email", "phoneNumber"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterTerm {
    /// `region=Lombardia`: exact match on a standard field.
    Standard { field: String, value: String },
    /// `customFields.<name>=<value>`: exact match on a custom field.
    Custom { field: String, value: String },
    /// `customFields.<name>.before=<YYYY-MM-DD>`: a date strictly before.
    Before { field: String, date: String },
}

impl FilterTerm {
    /// Reads one `FILTER` entry; the error names the key or value that the API would refuse.
    pub fn parse(key: &str, value: &str) -> Result<Self, String> {
        if STANDARD_FIELDS.contains(&key) {
            return Ok(Self::Standard { field: key.into(), value: value.into() });
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
                Ok(Self::Before { field: field.into(), date: value.into() })
            }
            None => Ok(Self::Custom { field: custom.into(), value: value.into() }),
        }
    }

    pub fn query_pair(&self) -> (String, String) {
        match self {
            Self::Standard { field, value } => (field.clone(), value.clone()),
            Self::Custom { field, value } => (format!("customFields.{field}"), value.clone()),
            Self::Before { field, date } => (format!("customFields.{field}.before"), date.clone()),
        }
    }

    /// The contact's top-level field this term reads.
    pub fn top_field(&self) -> &str {
        match self {
            Self::Standard { field, .. } => field,
            Self::Custom { .. } | Self::Before { .. } => "customFields",
        }
    }

    /// `f` on the value of the field this term reads (`None` when the record lacks it), read in
    /// place: a verdict copies nothing.
    fn with_field<T>(&self, record: &Map, f: impl FnOnce(Option<&Dynamic>) -> T) -> Result<T, String> {
        Ok(match self {
            Self::Standard { field, .. } => f(record.get(field.as_str())),
            Self::Custom { field, .. } | Self::Before { field, .. } => match record.get("customFields") {
                None => f(None),
                Some(c) => match c.read_lock::<Map>() {
                    Some(m) => f(m.get(field.as_str())),
                    None => {
                        return Err(format!("FILTER {}: customFields is {}, not a map", self.query_pair().0, kind(c)));
                    }
                },
            },
        })
    }

    /// The field's value on `record` as people read it: the text itself, a number, `(absent)`.
    pub fn value_of(&self, record: &Map) -> String {
        self.with_field(record, |v| match v {
            Some(v) if v.is_string() => v.clone().into_string().unwrap_or_default(),
            Some(v) if v.is_unit() => "(null)".into(),
            Some(v) => v.to_string(),
            None => "(absent)".into(),
        })
        .unwrap_or_else(|_| "(customFields not a map)".into())
    }

    /// Adds one to `tally`'s count of the field's value on `record`, allocating only for a value
    /// not tallied yet (`value_of` text).
    pub fn tally(&self, record: &Map, tally: &mut hashbrown::HashMap<String, u64>) {
        let counted = self.with_field(record, |v| {
            let text = v.and_then(|v| v.read_lock::<rhai::ImmutableString>());
            let count = text.and_then(|t| tally.get_mut(t.as_str()));
            count.map(|n| *n += 1).is_some()
        });
        if counted != Ok(true) {
            *tally.entry(self.value_of(record)).or_default() += 1;
        }
    }

    /// The server's semantics, applied to a record: strings exactly, numbers numerically, dates
    /// by day. A record that lacks the field, holds null there, or holds a value of another kind
    /// cannot be judged: that is an error (the contact is kept as it is), never "does not match".
    pub fn judge(&self, record: &Map) -> Result<bool, String> {
        self.with_field(record, |value| self.judge_value(value))?
    }

    fn judge_value(&self, value: Option<&Dynamic>) -> Result<bool, String> {
        // The key is for messages only: built when one is needed, never on the way to a verdict.
        let key = || self.query_pair().0;
        let Some(value) = value else {
            return Err(format!("FILTER {}: the record has no such field", key()));
        };
        if value.is_unit() {
            return Err(format!("FILTER {}: the field is null", key()));
        }
        let mismatch =
            || format!("FILTER {}: the field holds {}, which this filter cannot compare", key(), kind(value));
        match self {
            Self::Standard { value: want, .. } => match value.read_lock::<rhai::ImmutableString>() {
                Some(s) => Ok(s.as_str() == want),
                None => Err(mismatch()),
            },
            Self::Custom { value: want, .. } => text_equals(value, want).ok_or_else(mismatch),
            Self::Before { date, .. } => {
                let Some(text) = value.read_lock::<rhai::ImmutableString>() else { return Err(mismatch()) };
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
fn text_equals(v: &Dynamic, want: &str) -> Option<bool> {
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        return Some(s.as_str() == want);
    }
    if let Ok(i) = v.as_int() {
        return want.parse::<f64>().ok().map(|w| w == i as f64);
    }
    if let Ok(f) = v.as_float() {
        return want.parse::<f64>().ok().map(|w| w == f);
    }
    if let Ok(b) = v.as_bool() {
        return match want {
            "true" => Some(b),
            "false" => Some(!b),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Map {
        serde_json::from_str::<rhai::Dynamic>(json).expect("json").try_cast::<Map>().expect("map")
    }

    fn passes(term: &FilterTerm, r: &Map) -> bool {
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
