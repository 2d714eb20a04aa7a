//! What a rules reload changes: the pure difference between the running rules and a fresh load of
//! the folder (as Vector's `ConfigDiff`). No I/O and no clock, so every case is a unit test.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::diagnostic::Diagnostic;
use crate::ids::RuleName;
use crate::rules::{Rule, RuleSet};

/// The outcome of comparing the running rules with a fresh load.
#[derive(Debug, Default)]
pub struct RuleSetDiff {
    /// The rules that run from now on.
    pub next: RuleSet,
    /// New or changed rules: they run now.
    pub to_run: Vec<RuleName>,
    /// Running rules whose file now has errors: their last good version keeps running.
    pub kept_broken: Vec<Arc<Rule>>,
    /// Running rules whose file is gone: no longer scheduled (their lists are left alone).
    pub removed: Vec<Arc<Rule>>,
}

/// Compares `running` with `loaded` (and the `errors` of the files that did not load).
/// An unchanged rule keeps its running value, unless `reload` (SIGHUP) asks for the freshly
/// compiled one (the engine may have changed with the config); either way it does not run.
pub fn diff(running: &RuleSet, loaded: RuleSet, errors: &[Diagnostic], reload: bool) -> RuleSetDiff {
    let broken = |name: &RuleName| errors.iter().any(|e| e.rule_name() == Some(name.as_str()));
    let mut out = RuleSetDiff::default();
    let mut next: BTreeMap<RuleName, Arc<Rule>> = BTreeMap::new();
    for (name, rule) in loaded.rules {
        match running.get(&name) {
            Some(old) if old.hash == rule.hash && !reload => {
                next.insert(name, old.clone());
            }
            Some(old) if old.hash == rule.hash => {
                next.insert(name, rule);
            }
            _ => {
                out.to_run.push(name.clone());
                next.insert(name, rule);
            }
        }
    }
    for (name, old) in &running.rules {
        if next.contains_key(name) {
            continue;
        }
        if broken(name) {
            out.kept_broken.push(old.clone());
            next.insert(name.clone(), old.clone());
        } else {
            out.removed.push(old.clone());
        }
    }
    out.next = RuleSet { rules: next };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> (RuleSet, Vec<Diagnostic>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(format!("{name}.rhai")), text).expect("write");
        }
        crate::rules::load_dir(&crate::rules::engine::build(chrono_tz::UTC), dir.path())
    }

    const A: &str = "const LIST = \"A\";\nfn matches(c) { true }\n";
    const A2: &str = "const LIST = \"A\";\nfn matches(c) { false }\n";
    const B: &str = "const LIST = \"B\";\nfn matches(c) { true }\n";
    const BROKEN: &str = "const LIST = ;";

    fn names(rules: &[Arc<Rule>]) -> Vec<&str> {
        rules.iter().map(|r| r.name.as_str()).collect()
    }

    // From nothing (startup), every loaded rule is new and runs.
    #[test]
    fn startup_runs_everything() {
        let (loaded, errors) = load(&[("a", A), ("b", B)]);
        let d = diff(&RuleSet::default(), loaded, &errors, false);
        assert_eq!(d.to_run, [RuleName::from("a"), RuleName::from("b")]);
        assert_eq!(d.next.len(), 2);
    }

    // An unchanged rule keeps running as it is; a changed one runs; a deleted one is removed.
    #[test]
    fn changed_runs_unchanged_stays_deleted_goes() {
        let (running, _) = load(&[("a", A), ("b", B)]);
        let (loaded, errors) = load(&[("a", A2)]);
        let d = diff(&running, loaded, &errors, false);
        assert_eq!(d.to_run, [RuleName::from("a")]);
        assert_eq!(names(&d.removed), ["b"]);
        assert_eq!(d.next.rules.keys().map(RuleName::as_str).collect::<Vec<_>>(), ["a"]);

        let (loaded, errors) = load(&[("a", A), ("b", B)]);
        let d = diff(&running, loaded, &errors, false);
        assert!(d.to_run.is_empty());
        let kept = d.next.get(&RuleName::from("a")).expect("a");
        assert!(Arc::ptr_eq(kept, running.get(&RuleName::from("a")).expect("a")), "the running value is kept");
    }

    // A reload takes the freshly compiled value of an unchanged rule, without running it.
    #[test]
    fn reload_refreshes_without_running() {
        let (running, _) = load(&[("a", A)]);
        let (loaded, errors) = load(&[("a", A)]);
        let d = diff(&running, loaded, &errors, true);
        assert!(d.to_run.is_empty());
        let fresh = d.next.get(&RuleName::from("a")).expect("a");
        assert!(!Arc::ptr_eq(fresh, running.get(&RuleName::from("a")).expect("a")));
    }

    // A rule whose file breaks keeps its last good version; a broken new file adds nothing.
    #[test]
    fn broken_files_keep_the_last_good_version() {
        let (running, _) = load(&[("a", A)]);
        let (loaded, errors) = load(&[("a", BROKEN), ("c", BROKEN)]);
        assert_eq!(errors.len(), 2);
        let d = diff(&running, loaded, &errors, false);
        assert_eq!(names(&d.kept_broken), ["a"]);
        assert!(d.to_run.is_empty() && d.removed.is_empty());
        assert_eq!(d.next.rules.keys().map(RuleName::as_str).collect::<Vec<_>>(), ["a"]);
    }
}
