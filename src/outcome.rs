//! What a rule's run is, as every part of segsync names it: what started it ([`Trigger`]) and
//! how it ended ([`Outcome`]). Stored in the state, logged, printed, matched on: one type each.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

/// What started a run; logged and stored with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    Startup,
    Cron,
    File,
    Reload,
    #[default]
    Manual,
}

impl Trigger {
    pub const ALL: [Trigger; 5] = [Self::Startup, Self::Cron, Self::File, Self::Reload, Self::Manual];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Startup => "startup",
            Self::Cron => "cron",
            Self::File => "file",
            Self::Reload => "reload",
            Self::Manual => "manual",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a rule's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Everything planned was done and confirmed.
    #[default]
    Ok,
    /// A guard held the removals (adds were applied).
    Held,
    /// Nothing was decided or the writes stopped on an error.
    Failed,
    /// The writes went through but the gateway did not confirm all of them.
    Partial,
    /// Shutdown stopped the run; the next run converges.
    Interrupted,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [Self::Ok, Self::Held, Self::Failed, Self::Partial, Self::Interrupted];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Held => "held",
            Self::Failed => "failed",
            Self::Partial => "partial",
            Self::Interrupted => "interrupted",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Both enums are stored as their names; reading a name this version does not know is an error.
macro_rules! stored_as_name {
    ($($t:ty),*) => {$(
        impl FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| format!("unknown {} {s:?}", stringify!($t)))
            }
        }

        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value.as_str()?.parse().map_err(|e: String| FromSqlError::Other(e.into()))
            }
        }
    )*};
}

stored_as_name!(Trigger, Outcome);
