//! Identifiers that must not be mixed up: a contact's id, a list's id, a rule's name, and the
//! account the state's bindings belong to. The gateway's ids are opaque strings (numeric ids are
//! read as their decimal text).

use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
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

/// The account a state database's list bindings and estimates belong to: a real gateway's base
/// URL, or one run of the bundled sandbox (a new sandbox has none of an earlier one's lists).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Account(String);

impl Account {
    /// What every bundled-sandbox account's key starts with.
    pub const SANDBOX_PREFIX: &'static str = "sandbox@";

    /// A real gateway, named by its base URL.
    pub fn remote(base_url: &str) -> Self {
        Self(base_url.to_owned())
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
