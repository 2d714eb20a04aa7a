//! The rate plans the sandbox plays (per API key), as the gateway's reference publishes them. The
//! client keeps its own copy: the sandbox shares no code with it, so each checks the other.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A plan's limits: at most `per_minute` requests in any minute and `per_second` in any second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimits {
    pub per_minute: u32,
    pub per_second: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RatePlan {
    #[default]
    Production,
    Trial,
    Unlimited,
}

impl RatePlan {
    /// The documented limits; `None` for the sandbox-only unlimited plan.
    pub fn limits(self) -> Option<RateLimits> {
        match self {
            Self::Production => Some(RateLimits { per_minute: 1_000, per_second: 50 }),
            Self::Trial => Some(RateLimits { per_minute: 100, per_second: 10 }),
            Self::Unlimited => None,
        }
    }
}

impl FromStr for RatePlan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "production" => Ok(Self::Production),
            "trial" => Ok(Self::Trial),
            "unlimited" => Ok(Self::Unlimited),
            other => Err(format!("unknown plan {other:?} (expected production, trial or unlimited)")),
        }
    }
}

impl fmt::Display for RatePlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Production => "production",
            Self::Trial => "trial",
            Self::Unlimited => "unlimited",
        })
    }
}
