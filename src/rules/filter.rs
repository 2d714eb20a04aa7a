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

    /// The server's semantics, applied to a record: strings exactly, numbers numerically.
    pub fn passes(&self, record: &Map) -> bool {
        let custom = |field: &str| {
            record.get("customFields").and_then(|c| c.read_lock::<Map>()).and_then(|m| m.get(field).cloned())
        };
        match self {
            Self::Standard { field, value } => record.get(field.as_str()).is_some_and(|v| text_equals(v, value)),
            Self::Custom { field, value } => custom(field).is_some_and(|v| text_equals(&v, value)),
            Self::Before { field, date } => custom(field)
                .and_then(|v| v.into_immutable_string().ok())
                .is_some_and(|s| s.get(..10).is_some_and(|day| day < date.as_str())),
        }
    }
}

fn text_equals(v: &Dynamic, want: &str) -> bool {
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        return s.as_str() == want;
    }
    if let Ok(i) = v.as_int() {
        return want.parse::<f64>().is_ok_and(|w| w == i as f64);
    }
    if let Ok(f) = v.as_float() {
        return want.parse::<f64>().is_ok_and(|w| w == f);
    }
    if let Ok(b) = v.as_bool() {
        return want == if b { "true" } else { "false" };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Map {
        serde_json::from_str::<rhai::Dynamic>(json).expect("json").try_cast::<Map>().expect("map")
    }

    // Client-side filtering agrees with the server's semantics on strings, numbers and dates.
    #[test]
    fn passes_like_the_server() {
        let r = record(
            r#"{"region":"Lombardia","customFields":{"totalSpent":6800,"lastPurchaseDate":"2025-12-01","vip":true}}"#,
        );
        assert!(FilterTerm::parse("region", "Lombardia").expect("ok").passes(&r));
        assert!(!FilterTerm::parse("region", "lombardia").expect("ok").passes(&r));
        assert!(FilterTerm::parse("customFields.totalSpent", "6800.0").expect("ok").passes(&r));
        assert!(FilterTerm::parse("customFields.vip", "true").expect("ok").passes(&r));
        assert!(FilterTerm::parse("customFields.lastPurchaseDate.before", "2026-01-09").expect("ok").passes(&r));
        assert!(!FilterTerm::parse("customFields.lastPurchaseDate.before", "2025-12-01").expect("ok").passes(&r));
        assert!(!FilterTerm::parse("city", "Milano").expect("ok").passes(&r), "a missing field never passes");
    }

    // Keys the API would refuse are refused at load time, naming the key.
    #[test]
    fn unsupported_keys_are_refused() {
        let err = FilterTerm::parse("shoeSize", "42").expect_err("unsupported");
        assert!(err.contains("\"shoeSize\""), "{err}");
        assert!(FilterTerm::parse("customFields.lastPurchaseDate.before", "soon").is_err());
    }
}
