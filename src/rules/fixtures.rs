//! Rule unit tests: `rules/<name>.test.toml` beside `rules/<name>.rhai` holds fixture contacts,
//! the expected answer for each, and a frozen "today".
//!
//! ```toml
//! today = "2026-11-28"
//! [[case]]
//! name = "spent 6,800 EUR"
//! expect = true            # or false, or "error"
//! contact = { id = "t1", customFields = { totalSpent = 6800.0 } }
//! ```

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use rhai::Engine;
use serde::Deserialize;

use super::{Date, Diagnostic, Rule};
use crate::contact::ContactRecord;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    today: String,
    #[serde(rename = "case", default)]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    expect: Expect,
    contact: toml::Table,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone)]
#[serde(untagged)]
enum Expect {
    Answer(bool),
    Error(ErrorWord),
    /// For a rule with `fn list`: the list the contact belongs to (`false` for none).
    List(String),
}

#[derive(Debug, Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ErrorWord {
    Error,
}

/// The outcome of one rule's tests.
#[derive(Debug, Default)]
pub struct TestReport {
    pub file: Option<PathBuf>,
    pub passed: usize,
    /// One message per failed case: the case, the contact, the expected and the actual answer.
    pub failures: Vec<String>,
    /// Every case by name, with its failure message if it failed (for JUnit reports).
    pub cases: Vec<(String, Option<String>)>,
}

/// The fixture file of a rule, if it has one.
pub fn fixture_path(rule_path: &Path) -> PathBuf {
    rule_path.with_extension("test.toml")
}

/// Runs the rule's tests; a missing fixture file is an empty report, a broken one an error.
pub fn run(engine: &Engine, rule: &Rule) -> Result<TestReport, Diagnostic> {
    let path = fixture_path(&rule.path);
    let text = match crate::files::read_text(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(TestReport::default()),
        Err(e) => {
            return Err(Diagnostic {
                rule: None,
                file: path.clone(),
                line: 0,
                col: 0,
                message: format!("cannot read: {e}"),
            });
        }
    };
    let fixture: FixtureFile = toml::from_str(&text).map_err(|e| {
        let (line, col) = e.span().map_or((0, 0), |s| crate::diagnostic::line_col(&text, s.start));
        Diagnostic { rule: None, file: path.clone(), line, col, message: e.message().to_owned() }
    })?;
    let today = NaiveDate::parse_from_str(&fixture.today, "%Y-%m-%d").map_err(|_| Diagnostic {
        rule: None,
        file: path.clone(),
        line: 1,
        col: 1,
        message: format!("today must be a date YYYY-MM-DD, got {:?}", fixture.today),
    })?;
    let mut report = TestReport { file: Some(path.clone()), ..TestReport::default() };
    for case in fixture.cases {
        let json = serde_json::to_value(&case.contact).unwrap_or_default();
        let contact: ContactRecord = match serde_json::from_value(json.clone()) {
            Ok(c) => c,
            Err(e) => {
                let failure = format!("{}: case {:?}: the contact is not valid: {e}", path.display(), case.name);
                report.cases.push((case.name.clone(), Some(failure.clone())));
                report.failures.push(failure);
                continue;
            }
        };
        // What the rule says: a verdict, or for a rule with `fn list` the list it names.
        let actual: Result<Option<String>, _> = if rule.is_partitioned() {
            match rule.filter_verdict(&contact) {
                Ok(true) => rule.list_of(engine, contact.full().into_owned(), Date(today)),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            }
        } else {
            rule.evaluate(engine, &contact, Date(today)).map(|b| b.then(String::new))
        };
        let ok = match (&case.expect, &actual) {
            (Expect::Answer(want), Ok(got)) if !rule.is_partitioned() => *want == got.is_some(),
            (Expect::Answer(false), Ok(got)) => got.is_none(),
            (Expect::List(want), Ok(Some(got))) => want == got,
            (Expect::Error(_), Err(_)) => true,
            _ => false,
        };
        if ok {
            report.passed += 1;
            report.cases.push((case.name.clone(), None));
        } else {
            let expected = match &case.expect {
                Expect::Answer(false) if rule.is_partitioned() => "no list".into(),
                Expect::Answer(b) => b.to_string(),
                Expect::Error(_) => "an evaluation error".into(),
                Expect::List(list) => format!("list {list:?}"),
            };
            let got = match actual {
                Ok(Some(list)) if rule.is_partitioned() => format!("list {list:?}"),
                Ok(None) if rule.is_partitioned() => "no list".into(),
                Ok(answer) => answer.is_some().to_string(),
                Err(e) => format!("error: {e}"),
            };
            let failure = format!(
                "{}: case {:?}: expected {expected}, got {got}\n    contact: {json}",
                path.display(),
                case.name
            );
            report.cases.push((case.name.clone(), Some(failure.clone())));
            report.failures.push(failure);
        }
    }
    Ok(report)
}
