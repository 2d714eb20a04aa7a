//! `check` and `test`: validating the config and the rules, and running the rules' own tests.

use std::sync::Arc;

use super::Exit;
use crate::config::Config;
use crate::ids::RuleName;
use crate::rules::{self, Diagnostic, Loaded, Rule, Unselectable};

/// How `check` and `test` print.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Output {
    pub json: bool,
    /// `check`: each rule's next firings too.
    pub verbose: bool,
    /// `check --sample N`: also run every rule on about N contacts read from the gateway.
    pub sample: Option<u64>,
}

/// One problem `check` found.
#[derive(Debug, serde::Serialize)]
struct Problem {
    /// `error` (fails the gate) or `warning` (a rule the daemon would not run; fails `--strict`).
    severity: &'static str,
    file: String,
    line: Option<usize>,
    col: Option<usize>,
    message: String,
}

impl Problem {
    fn of(severity: &'static str, d: &Diagnostic) -> Self {
        let at = |n: usize| (n > 0).then_some(n);
        Self {
            severity,
            file: d.file.display().to_string(),
            line: at(d.line),
            col: at(d.col),
            message: d.message.clone(),
        }
    }
}

/// The start gate and `check --strict`. Without `--strict` it refuses what `run` would refuse — an
/// unreadable key, a state it cannot write, no usable rule at all — and reports broken rules and
/// failing rule tests as warnings (the daemon runs the good rules, as it would). With `--strict`
/// every problem fails it.
pub(super) fn check(config: &Config, strict: bool, out: Output) -> Exit {
    let mut problems: Vec<Problem> = Vec::new();
    let whole = |message: String| Diagnostic::whole_file(&config.path, message);
    match config.credentials() {
        Err(e) => problems.push(Problem::of("error", &whole(e.to_string()))),
        Ok(credentials) if credentials.header().is_none() => problems.push(Problem::of(
            "error",
            &whole(format!(
                "the API key ({}) holds characters an HTTP header cannot carry (a line break or a control character \
                 inside it?)",
                config.key_source_name()
            )),
        )),
        Ok(_) => {}
    }
    if let Err(e) = crate::state::check_writable(&config.state_path) {
        problems.push(Problem::of("error", &whole(format!("[state] path: {e}"))));
    }
    if let Some(why) = crate::state::privacy_problem(&config.state_path) {
        problems.push(Problem::of("warning", &whole(format!("[state] path: {why}"))));
    }
    let engine = rules::engine::build(config.time_zone);
    let (set, errors, passed) = rules::load_tested(&engine, &config.rules_dir);
    let severity = if strict { "error" } else { "warning" };
    problems.extend(errors.iter().map(|e| Problem::of(severity, e)));
    problems.extend(set.iter().flat_map(|r| r.warnings.iter()).map(|w| Problem::of(severity, w)));
    if set.is_empty() {
        let message = format!(
            "{}; segsync run would refuse to start",
            rules::nothing_to_run(&config.rules_dir, errors.iter().filter_map(|e| e.rule_name()).count())
        );
        problems.push(Problem::of("error", &whole(message)));
    }
    let preview = match out.sample.filter(|_| !set.is_empty()) {
        None => None,
        Some(n) => match sample_preview(config, &set, n) {
            Ok(preview) => {
                problems.extend(preview_problems(&preview, severity));
                Some(preview)
            }
            Err(e) => {
                complain!("sample: {e:#}");
                return Exit::Failure;
            }
        },
    };
    let failing = problems.iter().filter(|p| p.severity == "error").count();
    let now = chrono::Utc::now();
    let schedules: Vec<serde_json::Value> = set
        .iter()
        .map(|rule| {
            let schedule = rule.schedule.clone().unwrap_or_else(|| config.default_schedule.clone());
            let next: Vec<String> = schedule
                .upcoming(now, config.time_zone, 3)
                .into_iter()
                .map(|t| t.with_timezone(&config.time_zone).to_rfc3339())
                .collect();
            serde_json::json!({ "rule": rule.name, "list": rule.list, "schedule": schedule.as_str(), "next_runs": next })
        })
        .collect();
    if out.json {
        let doc = serde_json::json!({
            "ok": failing == 0,
            "strict": strict,
            "config": config.path.display().to_string(),
            "problems": problems,
            "rules": schedules,
            "rule_tests_passed": passed,
            "sample": preview,
        });
        say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for (p, e) in problems.iter().zip(problems.iter().map(|p| p.severity)) {
            let label = if e == "warning" { "warning: " } else { "" };
            let d = Diagnostic {
                rule: None,
                file: p.file.clone().into(),
                line: p.line.unwrap_or(0),
                col: p.col.unwrap_or(0),
                message: p.message.clone(),
            };
            say!("{label}{d}");
        }
        if let Some(preview) = &preview {
            super::sample::print(preview);
        }
        let names: Vec<&str> = set.rules.keys().map(RuleName::as_str).collect();
        if failing == 0 {
            let warnings = problems.len();
            say!(
                "ok: config {}, {} rule(s) ({}), {passed} rule test(s) passed{}",
                config.path.display(),
                set.len(),
                names.join(", "),
                if warnings == 0 {
                    String::new()
                } else {
                    format!("; {warnings} warning(s) above (a broken rule is not run; `--strict` fails on any)")
                }
            );
        } else {
            say!("check: {failing} problem(s); {} valid rule(s) ({})", set.len(), names.join(", "));
        }
        if out.verbose {
            for s in &schedules {
                say!(
                    "{}: {} → next {}",
                    s["rule"].as_str().unwrap_or_default(),
                    s["schedule"].as_str().unwrap_or_default(),
                    s["next_runs"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                );
            }
        }
    }
    if failing == 0 { Exit::Ok } else { Exit::Invalid }
}

/// Runs `check --sample`'s live preview on its own runtime.
fn sample_preview(config: &Config, set: &rules::RuleSet, n: u64) -> anyhow::Result<super::sample::Preview> {
    let engine = rules::engine::build(config.time_zone);
    super::runtime()?.block_on(super::sample::preview(config, engine, set.iter().cloned().collect(), n))
}

/// The sample's findings and evaluation errors, as problems at each rule's file.
fn preview_problems(preview: &super::sample::Preview, severity: &'static str) -> Vec<Problem> {
    let mut problems = Vec::new();
    for r in &preview.rules {
        let at = |message: String| Problem::of(severity, &Diagnostic::whole_file(&r.path, message));
        problems.extend(r.warnings.iter().map(|w| {
            let d = Diagnostic {
                rule: None,
                file: r.path.clone(),
                line: w.line,
                col: w.col,
                message: format!("sample: {}", w.message),
            };
            Problem::of(severity, &d)
        }));
        if r.eval_errors > 0 {
            let first = r.first_eval_error.as_deref().unwrap_or_default();
            let n = rules::thousands(preview.contacts);
            problems.push(at(format!("sample: errored on {} of {n} contacts; first: {first}", r.eval_errors)));
        }
    }
    problems
}

/// The rules a command runs: the engine, the named rules (all when none are named), every loaded
/// rule (suppressions apply to every pass) and the suppression files that do not load, and whether
/// the named files all loaded.
pub(super) type Selected = (rhai::Engine, Vec<Arc<Rule>>, Suppressors, bool);

/// Every loaded rule, and the suppression files that do not load (name, why).
pub(super) type Suppressors = (Vec<Arc<Rule>>, Vec<(String, String)>);

/// Loads the rules, prints the broken ones, and picks the named ones (all when none are named);
/// `Err` is the exit code when a named rule is not among the valid ones.
pub(super) fn load_selected(config: &Config, names: &[String], tested: bool, quiet: bool) -> Result<Selected, Exit> {
    let loaded = Loaded::load(&config.rules_dir, config.time_zone, tested);
    // Named rules: only their own files' problems (another file's are not this command's).
    let relevant = relevant_errors(&loaded, names);
    for e in relevant.iter().filter(|_| !quiet) {
        complain!("{e}");
    }
    let suppressors = (loaded.set.iter().cloned().collect(), rules::broken_suppressions(&loaded.errors));
    match loaded.select(names) {
        Ok(selected) => Ok((loaded.engine, selected, suppressors, relevant.is_empty())),
        Err(e) => {
            complain!("{e}");
            Err(unselectable(&e))
        }
    }
}

/// The load problems a command naming `names` (every rule when none) reports.
fn relevant_errors(loaded: &Loaded, names: &[String]) -> Vec<Diagnostic> {
    let named = |e: &&Diagnostic| names.iter().any(|n| e.rule_name() == Some(n.as_str()));
    loaded.errors.iter().filter(|e| names.is_empty() || named(e)).cloned().collect()
}

/// The exit code when a named rule cannot be selected, the same for every command that names
/// rules: a name no rule file carries is wrong usage (2); when every name missing from the valid
/// rules is a file that is there but broken, the rules are invalid (3).
pub(super) fn unselectable(e: &Unselectable) -> Exit {
    if e.broken { Exit::Invalid } else { Exit::Usage }
}

pub(super) fn test(config: &Config, names: &[String], out: Output, junit: Option<&std::path::Path>) -> Exit {
    let (engine, selected, _, all_valid) = match load_selected(config, names, false, out.json) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let (mut passed, mut failed, mut untested) = (0, 0, Vec::new());
    // A rule file that does not load is a failure in the JUnit report too, so the XML agrees
    // with the exit code.
    let mut results: Vec<_> = relevant_errors(&Loaded::load(&config.rules_dir, config.time_zone, false), names)
        .into_iter()
        .map(|e| {
            let rule = e.rule_name().unwrap_or_default().to_owned();
            let cases = vec![("(the rule file)".to_owned(), Some(e.to_string()))];
            (rule, Some(e.file.clone()), rules::fixtures::TestReport { cases, ..Default::default() })
        })
        .collect();
    for rule in &selected {
        let report = match rules::fixtures::run(&engine, rule) {
            Ok(r) => r,
            Err(e) => {
                let message = e.to_string();
                if !out.json {
                    say!("{message}");
                }
                failed += 1;
                let cases = vec![("(the test file)".to_owned(), Some(message))];
                results.push((
                    rule.name.to_string(),
                    None,
                    rules::fixtures::TestReport { cases, ..Default::default() },
                ));
                continue;
            }
        };
        if report.file.is_none() {
            untested.push(rule.name.to_string());
        }
        // A rule without tests adds no line of its own (it is named once, below).
        if !out.json && report.file.is_some() {
            for f in &report.failures {
                say!("FAIL {f}");
            }
            say!("{}: {} passed, {} failed", rule.name, report.passed, report.failures.len());
        }
        passed += report.passed;
        failed += report.failures.len();
        results.push((rule.name.to_string(), report.file.clone(), report));
    }
    if out.json {
        let rules: Vec<serde_json::Value> = results
            .iter()
            .map(|(rule, file, r)| {
                serde_json::json!({
                    "rule": rule,
                    "file": file.as_ref().map(|f| f.display().to_string()),
                    "passed": r.cases.iter().filter(|c| c.1.is_none()).count(),
                    "failures": r.cases.iter().filter_map(|c| c.1.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = serde_json::json!({ "passed": passed, "failed": failed, "untested": untested, "rules": rules });
        say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        if !untested.is_empty() {
            say!("no tests for: {} (add rules/NAME.test.toml)", untested.join(", "));
        }
        say!("{passed} passed, {failed} failed");
    }
    if let Some(path) = junit
        && let Err(e) = std::fs::write(path, junit_xml(&results))
    {
        complain!("cannot write the JUnit report {}: {e}", path.display());
        return Exit::Failure;
    }
    if failed > 0 { Exit::Failure } else { Exit::Ok.unless_invalid(all_valid) }
}

/// The rule tests as a JUnit XML report (one test suite per rule, one test case per case), as CI
/// systems read them.
fn junit_xml(results: &[(String, Option<std::path::PathBuf>, rules::fixtures::TestReport)]) -> String {
    fn esc(s: &str) -> String {
        s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
    }
    let total: usize = results.iter().map(|r| r.2.cases.len()).sum();
    let failures: usize = results.iter().map(|r| r.2.cases.iter().filter(|c| c.1.is_some()).count()).sum();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites name=\"segsync rule tests\" tests=\"{total}\" failures=\"{failures}\">\n"
    );
    for (rule, file, report) in results {
        let failed = report.cases.iter().filter(|c| c.1.is_some()).count();
        let file = file.as_ref().map(|f| esc(&f.display().to_string())).unwrap_or_default();
        xml.push_str(&format!(
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failed}\" file=\"{file}\">\n",
            esc(rule),
            report.cases.len()
        ));
        for (case, failure) in &report.cases {
            match failure {
                None => xml.push_str(&format!("    <testcase classname=\"{}\" name=\"{}\"/>\n", esc(rule), esc(case))),
                Some(message) => xml.push_str(&format!(
                    "    <testcase classname=\"{0}\" name=\"{1}\">\n      <failure message=\"{2}\">{2}</failure>\n    </testcase>\n",
                    esc(rule),
                    esc(case),
                    esc(message)
                )),
            }
        }
        xml.push_str("  </testsuite>\n");
    }
    xml.push_str("</testsuites>\n");
    xml
}
