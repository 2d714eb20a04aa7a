//! `check` and `test`: validating the config and the rules, and running the rules' own tests.

use std::sync::Arc;

use super::Exit;
use crate::config::Config;
use crate::ids::RuleName;
use crate::rules::{self, Diagnostic, Rule, RuleSet};

/// Loads the rules of `config` with the one engine: as the daemon does (rules whose own tests
/// fail are refused) when `tested`, else every rule that compiles (for `test` and `explain`).
pub(super) fn load_rules(config: &Config, tested: bool) -> (rhai::Engine, RuleSet, Vec<Diagnostic>) {
    let engine = rules::engine::build(config.time_zone);
    let (set, errors) = if tested {
        let (set, errors, _) = rules::load_tested(&engine, &config.rules_dir);
        (set, errors)
    } else {
        rules::load_dir(&engine, &config.rules_dir)
    };
    (engine, set, errors)
}

/// The start gate and `check --strict`. Without `--strict` it refuses what `run` would refuse — an
/// unreadable key, a state it cannot write, no usable rule at all — and reports broken rules and
/// failing rule tests as warnings (the daemon runs the good rules, as it would). With `--strict`
/// every problem fails it.
pub(super) fn check(config: &Config, strict: bool) -> Exit {
    let mut fatal = 0;
    match config.credentials() {
        Err(e) => {
            say!("{}: {e}", config.path.display());
            fatal += 1;
        }
        Ok(credentials) if credentials.header().is_none() => {
            say!(
                "{}: the API key ({}) holds characters an HTTP header cannot carry (a line break or a control \
                 character inside it?)",
                config.path.display(),
                config.key_source_name()
            );
            fatal += 1;
        }
        Ok(_) => {}
    }
    if let Err(e) = crate::state::check_writable(&config.state_path) {
        say!("{}: [state] path: {e}", config.path.display());
        fatal += 1;
    }
    let engine = rules::engine::build(config.time_zone);
    let (set, errors, passed) = rules::load_tested(&engine, &config.rules_dir);
    let label = if strict { "" } else { "warning: " };
    for e in &errors {
        say!("{label}{e}");
    }
    if set.is_empty() {
        say!(
            "{}: no usable rule in {}; segsync run would refuse to start",
            config.path.display(),
            config.rules_dir.display()
        );
        fatal += 1;
    }
    let names: Vec<&str> = set.rules.keys().map(RuleName::as_str).collect();
    let problems = fatal + if strict { errors.len() } else { 0 };
    if problems == 0 {
        say!(
            "ok: config {}, {} rule(s) ({}), {passed} rule test(s) passed{}",
            config.path.display(),
            set.len(),
            names.join(", "),
            if errors.is_empty() {
                String::new()
            } else {
                format!("; {} rule problem(s) above, not run", errors.len())
            }
        );
        Exit::Ok
    } else {
        say!("check: {problems} problem(s); {} valid rule(s) ({})", set.len(), names.join(", "));
        Exit::Invalid
    }
}

/// The rules named on the command line (all when none), or the names that do not exist.
pub(super) fn select(set: &RuleSet, names: &[String]) -> Result<Vec<Arc<Rule>>, String> {
    if names.is_empty() {
        return Ok(set.iter().cloned().collect());
    }
    let mut out = Vec::new();
    for name in names {
        match set.get(&RuleName::from(name.as_str())) {
            Some(rule) => out.push(rule.clone()),
            None => {
                let known: Vec<&str> = set.rules.keys().map(RuleName::as_str).collect();
                return Err(format!("no valid rule named {name:?} (loaded: {})", known.join(", ")));
            }
        }
    }
    Ok(out)
}

/// Loads the rules, prints the broken ones, and picks the named ones (all when none are named);
/// `Err` is the exit code when a named rule is not among the valid ones.
pub(super) fn load_selected(
    config: &Config,
    names: &[String],
    tested: bool,
) -> Result<(rhai::Engine, Vec<Arc<Rule>>, bool), Exit> {
    let (engine, set, errors) = load_rules(config, tested);
    for e in &errors {
        say!("{e}");
    }
    match select(&set, names) {
        Ok(selected) => Ok((engine, selected, errors.is_empty())),
        Err(e) => {
            say!("{e}");
            Err(Exit::Invalid)
        }
    }
}

pub(super) fn test(config: &Config, names: &[String]) -> Exit {
    let (engine, selected, all_valid) = match load_selected(config, names, false) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let (mut passed, mut failed, mut untested) = (0, 0, Vec::new());
    for rule in &selected {
        let report = match rules::fixtures::run(&engine, rule) {
            Ok(r) => r,
            Err(e) => {
                say!("{e}");
                failed += 1;
                continue;
            }
        };
        if report.file.is_none() {
            untested.push(rule.name.as_str());
        }
        for f in &report.failures {
            say!("FAIL {f}");
        }
        say!("{}: {} passed, {} failed", rule.name, report.passed, report.failures.len());
        passed += report.passed;
        failed += report.failures.len();
    }
    if !untested.is_empty() {
        say!("no tests for: {} (add rules/NAME.test.toml)", untested.join(", "));
    }
    say!("{passed} passed, {failed} failed");
    if failed > 0 { Exit::Failure } else { Exit::Ok.unless_invalid(all_valid) }
}
