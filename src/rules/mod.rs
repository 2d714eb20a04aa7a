//! Segment rules: loading and validating rule files, evaluating them on contacts, and rule tests.
//!
//! Owns the only Rhai `Engine` (`engine::build`). Knows nothing about HTTP: contacts arrive as
//! JSON-shaped records and verdicts leave as booleans or errors.

mod calls;
mod derive;
pub mod engine;
mod eval;
mod fields;
mod filter;
pub mod fixtures;
mod helpers;
mod load;
pub mod native;
mod observe;
mod segments;
mod select;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use derive::{Derived, PushDown};
pub use engine::Date;
pub use eval::{EvalError, Facts};
pub use filter::FilterTerm;
pub use helpers::{LIB, lib_dir};
pub use load::{MAX_LISTS_CEILING, broken_suppressions, load_dir, load_file, load_tested, nothing_to_run};
pub use observe::{ABSENT_MIN_JUDGED, Finding, Learned, Observed, thousands};
pub use segments::{SegmentRef, Segments};
pub use select::{Loaded, Unselectable};

pub use crate::diagnostic::Diagnostic;

use crate::ids::RuleName;
use crate::schedule::Schedule;

/// What a rule may do to its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Add matches and remove members that stop matching (the default).
    Mirror,
    /// Add matches; never remove.
    AddOnly,
    /// Fill no list: the contacts `matches` selects must be in no managed list (opt-outs,
    /// erasure requests): never added, and removed at once, without `REMOVE_AFTER`.
    Suppress,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mirror => "mirror",
            Self::AddOnly => "add_only",
            Self::Suppress => "suppress",
        })
    }
}

/// How a rule names its lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lists {
    /// `const LIST` and `fn matches`: one list.
    One,
    /// `fn list(contact)` names the list each contact belongs to (or `()`): at most `max` lists
    /// (`MAX_LISTS`; else `[rules] max_lists_per_rule`). A pass runs one `Partition` per list.
    Partitioned { max: Option<u64> },
    /// One list of the partitioned rule `parent`, as a pass runs it: its contacts are those whose
    /// `fn list` returns this rule's `list`.
    Partition { parent: RuleName },
}

/// A compiled, validated rule file.
#[derive(Clone)]
pub struct Rule {
    pub name: RuleName,
    pub path: PathBuf,
    /// The target list's name (empty for a partitioned rule, whose lists come from `fn list`).
    pub list: String,
    pub lists: Lists,
    pub description: String,
    pub schedule: Option<Schedule>,
    pub filter: Vec<FilterTerm>,
    pub mode: Mode,
    /// SHA-256 of the file's bytes, hex: tells "changed" from "touched".
    pub hash: String,
    /// Words the `matches` function reads as properties (for `explain`).
    pub mentions: Vec<String>,
    /// Where each of `mentions` is read from: top level, or in `customFields`.
    pub mention_paths: Vec<[crate::slots::Path; 2]>,
    /// Where each of `mentions` is first read (line, column), for findings about it.
    pub mentioned_at: Vec<(usize, usize)>,
    /// Where `FILTER` is declared (line, column).
    pub filter_at: (usize, usize),
    /// `REMOVE_AFTER`: a member is removed only after failing the rule continuously this long.
    pub remove_after: Option<std::time::Duration>,
    /// The server filter `matches` implies, for the rule's own candidate reads.
    pub pushdown: PushDown,
    /// What loads but is likely not what the author meant (`check` shows them).
    pub warnings: Vec<Diagnostic>,
    /// The helper files (`rules/lib/*.rhai`) the rule imports.
    pub helpers: Vec<PathBuf>,
    /// The rule imports helpers: each call first runs its `import`s (embedded in `ast`).
    imports: bool,
    /// `MODE = "suppress"`: the rules whose lists it keeps its contacts out of (`SUPPRESS_FROM`;
    /// `None`: every rule).
    pub suppress_from: Option<Vec<String>>,
    /// The `segment("name", …)` calls in the file.
    pub segment_refs: Vec<SegmentRef>,
    /// The rules those calls name, wired when the folder loads.
    pub segments: Arc<Segments>,
    /// `matches` compiled natively, or why it runs on Rhai.
    pub native: Result<Arc<native::Native>, String>,
    /// The top-level contact fields the Rhai code of `matches` / `fn list` can read, when only
    /// properties it names (`fields::read_by`); `None`: any field.
    rhai_reads: Option<Vec<String>>,
    ast: rhai::AST,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("list", &self.list)
            .field("hash", &self.short_hash())
            .finish()
    }
}

/// The separator between a partitioned rule's name and a list's in a partition's name.
pub const PARTITION_SEPARATOR: char = ':';

impl Rule {
    /// The rule a pass runs for one list of this partitioned rule: named `rule:list`, so its
    /// binding, cache, grace and runs are its own.
    pub fn partition(&self, list: &str) -> Rule {
        let mut part = self.clone();
        part.name = RuleName::from(format!("{}{PARTITION_SEPARATOR}{list}", self.name));
        part.list = list.to_owned();
        part.lists = Lists::Partition { parent: self.name.clone() };
        part
    }

    /// The rule file's name: a partition's parent, else the rule's own (what the daemon schedules).
    pub fn file_rule(&self) -> &RuleName {
        match &self.lists {
            Lists::Partition { parent } => parent,
            _ => &self.name,
        }
    }

    /// Whether this suppression rule keeps its contacts out of `rule`'s lists.
    pub fn suppresses(&self, rule: &Rule) -> bool {
        self.mode == Mode::Suppress
            && rule.mode != Mode::Suppress
            && self.suppress_from.as_ref().is_none_or(|names| names.iter().any(|n| n == rule.file_rule().as_str()))
    }

    /// Whether the rule fills exactly the one list its `LIST` names.
    pub fn fills_its_list(&self) -> bool {
        !self.is_partitioned() && self.mode != Mode::Suppress
    }

    /// Whether the rule names its lists with `fn list` (a partitioned rule or one of its lists).
    pub fn is_partitioned(&self) -> bool {
        self.lists != Lists::One
    }

    /// The first 12 hex digits of the content hash, as logs show it.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12.min(self.hash.len())]
    }

    /// The server-side filters, as query pairs.
    pub fn filter_query(&self) -> Vec<(String, String)> {
        self.filter.iter().map(FilterTerm::query_pair).collect()
    }

    /// The filter derived from `matches` for a run on `today`, without the keys `FILTER` sets.
    pub fn derived_filter(&self, today: Date) -> Vec<FilterTerm> {
        let set: Vec<String> = self.filter.iter().map(|t| t.query_pair().0).collect();
        self.pushdown.terms(today).into_iter().filter(|t| !set.contains(&t.query_pair().0)).collect()
    }

    /// Whether the rule's own read asks the server for less than everyone.
    pub fn narrowed(&self, today: Date) -> bool {
        !self.filter.is_empty() || !self.derived_filter(today).is_empty()
    }

    /// `FILTER` and the derived filter, as the query of the rule's own candidate read.
    pub fn own_read_query(&self, today: Date) -> Vec<(String, String)> {
        let mut query = self.filter_query();
        query.extend(self.derived_filter(today).iter().map(FilterTerm::query_pair));
        query
    }
}

/// The loaded rules, by name.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    pub rules: BTreeMap<RuleName, Arc<Rule>>,
}

impl RuleSet {
    pub fn get(&self, name: &RuleName) -> Option<&Arc<Rule>> {
        self.rules.get(name)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.rules.values()
    }
}
