//! The rules a command works on: the folder loaded with the one engine, and the rules named on the
//! command line picked from it. `plan`, `sync`, `test` and `explain` all select through here, so a
//! name is refused the same way everywhere.

use std::path::Path;
use std::sync::Arc;

use chrono_tz::Tz;

use super::{Diagnostic, Rule, RuleSet, engine, load_dir, load_tested};
use crate::ids::RuleName;

/// A rules folder, loaded.
pub struct Loaded {
    pub engine: rhai::Engine,
    pub set: RuleSet,
    /// The files that did not load (or, when tested, whose own tests failed).
    pub errors: Vec<Diagnostic>,
}

/// Why named rules cannot be selected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no valid rule named {name:?} (loaded: {})", loaded.join(", "))]
pub struct Unselectable {
    /// The first name that is not a valid rule.
    pub name: String,
    /// The valid rules.
    pub loaded: Vec<String>,
    /// Every name missing from the valid rules is a file that is there but broken (or fails its
    /// tests): the rules are invalid, not the command line.
    pub broken: bool,
}

impl Loaded {
    /// Loads `dir` with the engine for `time_zone`: as the daemon does (rules whose own tests fail
    /// are refused) when `tested`, else every rule that compiles (for `test` and `explain`).
    pub fn load(dir: &Path, time_zone: Tz, tested: bool) -> Self {
        let engine = engine::build(time_zone);
        let (set, errors) = if tested {
            let (set, errors, _) = load_tested(&engine, dir);
            (set, errors)
        } else {
            load_dir(&engine, dir)
        };
        Self { engine, set, errors }
    }

    /// The rules named (all when none are).
    pub fn select(&self, names: &[String]) -> Result<Vec<Arc<Rule>>, Unselectable> {
        if names.is_empty() {
            return Ok(self.set.iter().cloned().collect());
        }
        let missing: Vec<&String> =
            names.iter().filter(|n| self.set.get(&RuleName::from(n.as_str())).is_none()).collect();
        let Some(first) = missing.first() else {
            return Ok(names.iter().filter_map(|n| self.set.get(&RuleName::from(n.as_str())).cloned()).collect());
        };
        let broken = |name: &String| self.errors.iter().any(|e| e.rule_name() == Some(name.as_str()));
        Err(Unselectable {
            name: (*first).clone(),
            loaded: self.set.rules.keys().map(|n| n.to_string()).collect(),
            broken: missing.iter().all(|n| broken(n)),
        })
    }

    /// The problems of the file behind rule `name`, if it is broken.
    pub fn errors_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Diagnostic> {
        self.errors.iter().filter(move |e| e.rule_name() == Some(name))
    }
}
