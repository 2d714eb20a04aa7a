//! Identifiers that must not be mixed up: a contact's id, a list's id, a rule's name.
//! The gateway's ids are opaque strings (numeric ids are read as their decimal text).

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(Box<str>);

        impl $name {
            pub fn new(id: impl Into<Box<str>>) -> Self {
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
