//! Reading rule files: compile, run the top level once for the settings, validate everything, and
//! report every problem of a file at once with file, line and column. A broken file never stops
//! the others from loading.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rhai::{Dynamic, Engine, Map, Position, Scope};
use sha2::{Digest, Sha256};

use super::{Diagnostic, FilterTerm, Lists, Mode, Rule, RuleSet};
use crate::ids::RuleName;
use crate::schedule::Schedule;

/// Loads every `*.rhai` file of `dir`: the good rules, and the errors of the others.
pub fn load_dir(engine: &Engine, dir: &Path) -> (RuleSet, Vec<Diagnostic>) {
    let mut errors = Vec::new();
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "rhai") && !is_hidden(p))
            .filter(|p| {
                // Only regular files are read: a FIFO would block the daemon waiting for a writer.
                let regular = crate::files::is_regular(p);
                if !regular {
                    tracing::warn!(file = %p.display(), "rules folder entry skipped");
                }
                regular
            })
            .collect(),
        Err(e) => {
            errors.push(Diagnostic {
                rule: None,
                file: dir.into(),
                line: 0,
                col: 0,
                message: format!("cannot read the rules folder: {e}"),
            });
            return (RuleSet::default(), errors);
        }
    };
    paths.sort();
    let mut loaded: Vec<Rule> = Vec::new();
    for path in &paths {
        match load_file(engine, path) {
            Ok(rule) => loaded.push(rule),
            Err(mut e) => errors.append(&mut e),
        }
    }
    // Two rules fighting over one list would undo each other's work: refuse both.
    let mut by_list: BTreeMap<&str, Vec<&Rule>> = BTreeMap::new();
    for rule in loaded.iter().filter(|r| r.fills_its_list()) {
        by_list.entry(rule.list.as_str()).or_default().push(rule);
    }
    let mut clashing = Vec::new();
    for (list, rules) in by_list.iter().filter(|(_, r)| r.len() > 1) {
        for rule in rules {
            let others: Vec<String> =
                rules.iter().filter(|o| o.name != rule.name).map(|o| o.path.display().to_string()).collect();
            let (line, col) = const_position(&crate::files::read_text(&rule.path).unwrap_or_default(), "LIST");
            errors.push(Diagnostic {
                rule: None,
                file: rule.path.clone(),
                line,
                col,
                message: format!(
                    "LIST {list:?} is also the target of {}; each list belongs to one rule",
                    others.join(", ")
                ),
            });
            clashing.push(rule.name.clone());
        }
    }
    let loaded: Vec<Rule> = loaded.into_iter().filter(|r| !clashing.contains(&r.name)).collect();
    let broken: std::collections::BTreeSet<String> =
        errors.iter().filter_map(|e| e.rule_name().map(str::to_owned)).collect();
    let names: Vec<String> = loaded.iter().map(|r| r.name.to_string()).chain(broken.iter().cloned()).collect();
    let unknown_targets: Vec<String> = loaded
        .iter()
        .filter_map(|rule| {
            let unknown: Vec<&String> = rule.suppress_from.iter().flatten().filter(|n| !names.contains(n)).collect();
            let first = unknown.first()?;
            let close = names.iter().min_by_key(|n| strsim::damerau_levenshtein(n, first));
            let hint = match close {
                Some(c) if strsim::damerau_levenshtein(c, first) <= (first.len() / 3).max(2) => {
                    format!("; did you mean {c:?}?")
                }
                _ => format!(" (rules: {})", names.join(", ")),
            };
            let (line, col) = const_position(&crate::files::read_text(&rule.path).unwrap_or_default(), "SUPPRESS_FROM");
            let message = format!("SUPPRESS_FROM names {first:?}, which is no rule{hint}");
            errors.push(Diagnostic { rule: None, file: rule.path.clone(), line, col, message });
            Some(rule.name.to_string())
        })
        .collect();
    let loaded: Vec<Rule> = loaded.into_iter().filter(|r| !unknown_targets.contains(&r.name.to_string())).collect();
    let rules = super::segments::wire(loaded, &broken, &mut errors).into_iter().map(|r| (r.name.clone(), r)).collect();
    (RuleSet { rules }, errors)
}

/// Why there is nothing to run in `dir`, when no rule loaded: the folder has no rule file at all (a
/// fresh install: where the examples are), or every file was refused (`rejected` of them, reported
/// above the message).
pub fn nothing_to_run(dir: &Path, rejected: usize) -> String {
    if rejected == 0 {
        format!(
            "no rule in {}: the folder has no NAME.rhai file, so there is nothing to sync. Write one (man \
             segsync-rules), or copy an example from /usr/share/doc/segsync/examples/rules/ (the repository's rules/)",
            dir.display()
        )
    } else {
        format!("no usable rule in {}: all {rejected} rule file(s) were refused (see above)", dir.display())
    }
}

/// The suppression rules among the files that did not load, by name, with their first problem:
/// a file whose text sets `MODE = "suppress"`. While one does not load (and no earlier version of
/// it runs), the lists it may apply to must change nothing: its contacts cannot be kept out.
pub fn broken_suppressions(errors: &[Diagnostic]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for e in errors {
        let Some(name) = e.rule_name() else { continue };
        if out.iter().any(|(n, _)| n == name) {
            continue;
        }
        let path = e.rule.as_ref().unwrap_or(&e.file);
        let text = crate::files::read_text(path).unwrap_or_default();
        let suppresses = blank_literals_keeping_strings(&text).lines().any(|line| {
            let line = line.trim_start();
            line.strip_prefix("const").is_some_and(|rest| {
                let rest = rest.trim_start();
                rest.strip_prefix("MODE").is_some_and(|r| r.trim_start().starts_with('=') && r.contains("\"suppress\""))
            })
        });
        if suppresses {
            out.push((name.to_owned(), e.to_string()));
        }
    }
    out
}

/// `source` without its comments (string literals kept): a commented-out setting sets nothing.
fn blank_literals_keeping_strings(source: &str) -> String {
    source.lines().map(|l| if l.trim_start().starts_with("//") { "" } else { l }).collect::<Vec<_>>().join("\n")
}

/// Loads the folder like [`load_dir`], then runs each rule's own tests (`NAME.test.toml`): a rule
/// whose tests fail, or whose test file is broken, is refused like a syntax error, its
/// diagnostic naming the rule file and the failing case. What the daemon runs has passed its tests.
/// Returns the rules, the problems, and how many rule tests passed.
pub fn load_tested(engine: &Engine, dir: &Path) -> (RuleSet, Vec<Diagnostic>, usize) {
    let (set, mut errors) = load_dir(engine, dir);
    let mut passed = 0;
    let mut rules = std::collections::BTreeMap::new();
    for (name, rule) in set.rules {
        match super::fixtures::run(engine, &rule) {
            Ok(report) if report.failures.is_empty() => {
                passed += report.passed;
                rules.insert(name, rule);
            }
            Ok(report) => {
                let test_file = report.file.as_deref().unwrap_or(&rule.path).display().to_string();
                for failure in report.failures {
                    errors.push(Diagnostic::whole_file(&rule.path, format!("its test {test_file} fails: {failure}")));
                }
            }
            Err(e) => errors.push(Diagnostic::whole_file(&rule.path, format!("its test file is broken: {e}"))),
        }
    }
    (RuleSet { rules }, errors, passed)
}

fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Loads one rule file, or every problem found in it. A panic while loading (a bug in a helper
/// the file's top level calls) is that file's error only.
pub fn load_file(engine: &Engine, path: &Path) -> Result<Rule, Vec<Diagnostic>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_rule(engine, path))).unwrap_or_else(|panic| {
        let message = format!("loading the rule panicked: {}", crate::fault::panic_message(&*panic));
        Err(vec![Diagnostic { rule: None, file: path.into(), line: 0, col: 0, message }])
    })
}

fn read_rule(engine: &Engine, path: &Path) -> Result<Rule, Vec<Diagnostic>> {
    let at =
        |line: usize, col: usize, message: String| Diagnostic { rule: None, file: path.into(), line, col, message };
    let source =
        crate::files::read_text(path).map_err(|e| vec![at(0, 0, format!("cannot read the rule file: {e}"))])?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
    if stem.is_empty() || !stem.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(vec![at(0, 0, format!("rule file names may use letters, digits, '-' and '_' only, got {stem:?}"))]);
    }
    let mut ast =
        engine.compile(&source).map_err(|e| vec![at_pos(path, e.position(), compile_message(&e, &source))])?;
    ast.set_source(path.display().to_string());
    let imports = super::helpers::imports(&ast);
    let mut helpers = Vec::new();
    let mut helper_errors = Vec::new();
    for import in &imports {
        match super::helpers::load(engine, path, import) {
            Ok(helper) => helpers.push((import.alias.clone(), helper)),
            Err(mut problems) => helper_errors.append(&mut problems),
        }
    }
    if !helper_errors.is_empty() {
        return Err(helper_errors);
    }

    let mut scope = Scope::new();
    engine
        .run_ast_with_scope(&mut scope, &ast)
        .map_err(|e| vec![at_pos(path, e.position(), format!("at load: {}", e.unwrap_inner()))])?;

    let mut settings = Settings { path, source: &source, scope: &scope, errors: Vec::new() };
    let partitioned = ast.iter_functions().any(|f| f.name == "list");
    let mode = settings.mode();
    let suppress_from = settings.suppress_from(mode);
    let (list, lists) = if partitioned {
        if mode == Mode::Suppress {
            settings.error("MODE", "a suppression rule selects contacts with fn matches, not fn list".into());
        }
        (settings.no_list("fn list(contact)"), Lists::Partitioned { max: settings.max_lists() })
    } else if mode == Mode::Suppress {
        settings.no_max_lists();
        (settings.no_list("MODE = \"suppress\""), Lists::One)
    } else {
        settings.no_max_lists();
        (settings.list(), Lists::One)
    };
    let description = settings.text("DESCRIPTION");
    let schedule = settings.schedule();
    let remove_after = settings.remove_after();
    let filter = settings.filter();
    let warnings = frozen_filter(path, &source, &filter).into_iter().collect();
    settings.unknown();
    let mut errors = settings.errors;
    errors.extend(decider_problem(&ast, path, &source, partitioned));
    let (segment_refs, segment_problems) = super::segments::refs(&ast, path);
    errors.extend(segment_problems);
    let known = super::calls::known(engine, &ast);
    let imported: Vec<super::calls::Imported> = helpers.iter().map(|(a, h)| (a.as_str(), &h.functions)).collect();
    errors.extend(super::calls::undefined(&known, &ast, path, &imported));
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line, e.col));
        return Err(errors);
    }
    let compact = engine.compact_script(&source).map_err(|e| format!("not compacted: {e}"));
    // `today().year` reads a property of a date, not a contact's field.
    let (mentions, mentioned_at): (Vec<String>, _) =
        mentions_at(&source).into_iter().filter(|(m, _)| !super::calls::is_getter(&known, m)).unzip();
    let mention_paths = mentions
        .iter()
        .map(|m| [crate::slots::Path::new(&[m.as_str()]), crate::slots::Path::new(&["customFields", m.as_str()])])
        .collect();
    Ok(Rule {
        name: RuleName::from(stem),
        path: path.into(),
        list,
        lists,
        description: description.unwrap_or_default(),
        schedule,
        filter,
        mode,
        hash: content_hash(&source, &helpers),
        mentions,
        mention_paths,
        mentioned_at,
        filter_at: const_position(&source, "FILTER"),
        remove_after,
        pushdown: compact.as_deref().map_or_else(|e| super::PushDown::None(e.clone()), super::derive::from_script),
        native: match (&compact, helpers.is_empty(), segment_refs.is_empty()) {
            (Err(e), ..) => Err(e.clone()),
            (_, false, _) => Err("the rule imports helpers".into()),
            (_, _, false) => Err("the rule calls segment()".into()),
            (Ok(c), true, true) => super::native::compile(stem, c, super::engine::zone(engine)).map(Arc::new),
        },
        rhai_reads: super::fields::read_by(&ast),
        warnings,
        helpers: helpers.iter().map(|(_, h)| h.path.clone()).collect(),
        imports: !helpers.is_empty(),
        suppress_from,
        segment_refs,
        segments: Arc::default(),
        ast: callable(ast, &helpers).map_err(|e| vec![at_pos(path, e.position(), e.to_string())])?,
    })
}

/// The AST `matches` is called on. A rule importing helpers gets, as its only top-level
/// statements, its `import`s with the helpers embedded (already loaded, so a call resolves them by
/// a table lookup, never from disk); its calls then run those statements first (`Rule::imports`).
/// A rule without imports is called as compiled, at no extra cost.
fn callable(
    ast: rhai::AST,
    helpers: &[(String, super::helpers::Helper)],
) -> Result<rhai::AST, Box<rhai::EvalAltResult>> {
    if helpers.is_empty() {
        return Ok(ast);
    }
    let mut embedded = rhai::module_resolvers::StaticModuleResolver::new();
    let mut statements = String::new();
    for (alias, helper) in helpers {
        let name = helper.path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        embedded.insert(name, (*helper.module).clone());
        statements.push_str(&format!("import {name:?} as {alias};\n"));
    }
    let mut resolver = Engine::new_raw();
    resolver.set_module_resolver(embedded);
    let imports = resolver.compile_into_self_contained(&Scope::new(), statements)?;
    let mut callable = imports.merge(&ast.clone_functions_only());
    if let Some(source) = ast.source() {
        callable.set_source(source.to_owned());
    }
    Ok(callable)
}

/// The rule's identity: its file and every helper it imports, so a helper edit is a rule edit.
fn content_hash(source: &str, helpers: &[(String, super::helpers::Helper)]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    for (alias, helper) in helpers {
        hasher.update(b"\0import\0");
        hasher.update(alias.as_bytes());
        hasher.update(b"\0");
        hasher.update(helper.source.as_bytes());
    }
    hex(&hasher.finalize())
}

/// Reads a rule's settings (its top-level constants) from the scope its top level left, each
/// problem at the setting's line.
struct Settings<'a> {
    path: &'a Path,
    source: &'a str,
    scope: &'a Scope<'a>,
    errors: Vec<Diagnostic>,
}

/// The settings a rule file may define as top-level constants.
pub const SETTINGS: [&str; 8] =
    ["LIST", "DESCRIPTION", "SCHEDULE", "FILTER", "MODE", "REMOVE_AFTER", "MAX_LISTS", "SUPPRESS_FROM"];

/// The most lists `MAX_LISTS` may allow: beyond it a rule is a slip, not a segmentation.
pub const MAX_LISTS_CEILING: u64 = 10_000;

/// The setting `name` was most likely meant to be, if one is close.
fn closest_setting(name: &str) -> Option<&'static str> {
    let upper = name.to_ascii_uppercase();
    SETTINGS
        .into_iter()
        .map(|s| (strsim::damerau_levenshtein(&upper, s), s))
        .filter(|(distance, s)| *distance <= (s.len() / 3).max(2))
        .min()
        .map(|(_, s)| s)
}

impl Settings<'_> {
    /// Every top-level constant that is not a setting is an error: a slip such as `FILTERS` would
    /// otherwise be ignored, and the rule would select everyone.
    fn unknown(&mut self) {
        let unknown: Vec<String> = self
            .scope
            .iter_raw()
            .filter(|(name, constant, _)| *constant && !SETTINGS.contains(name))
            .map(|(name, _, _)| name.to_owned())
            .collect();
        for name in unknown {
            let hint = match closest_setting(&name) {
                Some(setting) => format!("did you mean {setting}?"),
                None => format!("the settings are {}.", SETTINGS.join(", ")),
            };
            let message = format!(
                "{name} is not a setting; {hint} A top-level constant is not visible inside `fn matches` either: \
                 to name a value there, use a `let` inside the function"
            );
            self.error(&name, message);
        }
    }

    fn error(&mut self, name: &str, message: String) {
        let (line, col) = const_position(self.source, name);
        self.errors.push(Diagnostic { rule: None, file: self.path.into(), line, col, message });
    }

    /// A text setting: absent, or a string (anything else is an error).
    fn string(&self, name: &str) -> Result<Option<String>, String> {
        match self.scope.get(name) {
            None => Ok(None),
            Some(v) if v.is_string() => Ok(Some(v.clone().into_string().unwrap_or_default())),
            Some(v) => Err(format!("{name} must be a string, got {} {v}", v.type_name())),
        }
    }

    /// A text setting, its problem recorded.
    fn text(&mut self, name: &str) -> Option<String> {
        self.string(name).unwrap_or_else(|e| {
            self.error(name, e);
            None
        })
    }

    fn list(&mut self) -> String {
        match self.string("LIST") {
            Ok(Some(l)) if !l.trim().is_empty() => l.trim().to_owned(),
            Ok(Some(_)) => {
                self.error("LIST", "LIST is empty; name the list this rule fills".into());
                String::new()
            }
            Ok(None) => {
                let message = "LIST is missing: add `const LIST = \"List name\";`".into();
                self.errors.push(Diagnostic { rule: None, file: self.path.into(), line: 1, col: 1, message });
                String::new()
            }
            Err(e) => {
                self.error("LIST", e);
                String::new()
            }
        }
    }

    /// A rule that fills no one list (`fn list` names its lists; a suppression fills none) has no
    /// `LIST`: one would be ambiguous.
    fn no_list(&mut self, because: &str) -> String {
        if self.scope.contains("LIST") {
            let message = if because.starts_with("fn list") {
                "LIST and fn list(contact) both name the lists: keep `const LIST` with `fn matches` for one \
                 list, or `fn list` alone for one list per value"
                    .to_owned()
            } else {
                format!(
                    "a rule with {because} fills no list: remove LIST (its contacts are kept out of the other rules' lists)"
                )
            };
            self.error("LIST", message);
        }
        String::new()
    }

    /// `SUPPRESS_FROM = ["vip", …]`: the rules a suppression applies to (only with `MODE = "suppress"`).
    fn suppress_from(&mut self, mode: Mode) -> Option<Vec<String>> {
        let value = self.scope.get("SUPPRESS_FROM")?;
        if mode != Mode::Suppress {
            self.error("SUPPRESS_FROM", "SUPPRESS_FROM needs MODE = \"suppress\"".into());
            return None;
        }
        let names: Option<Vec<String>> =
            value.read_lock::<rhai::Array>().and_then(|a| a.iter().map(|v| v.clone().into_string().ok()).collect());
        match names {
            Some(names) if !names.is_empty() => Some(names),
            _ => {
                self.error(
                    "SUPPRESS_FROM",
                    format!("SUPPRESS_FROM must be a list of rule names such as [\"vip\"], got {value}"),
                );
                None
            }
        }
    }

    /// `MAX_LISTS`: how many lists a partitioned rule may fill, a whole number from 1.
    fn max_lists(&mut self) -> Option<u64> {
        let value = self.scope.get("MAX_LISTS")?;
        match value.as_int().ok().and_then(|n| u64::try_from(n).ok()) {
            Some(n @ 1..=MAX_LISTS_CEILING) => Some(n),
            _ => {
                let message = format!("MAX_LISTS must be a whole number from 1 to {MAX_LISTS_CEILING}, got {value}");
                self.error("MAX_LISTS", message);
                None
            }
        }
    }

    /// `MAX_LISTS` bounds `fn list`; on a rule with one `LIST` it means nothing.
    fn no_max_lists(&mut self) {
        if self.scope.contains("MAX_LISTS") {
            self.error(
                "MAX_LISTS",
                "MAX_LISTS bounds the lists of a rule with fn list(contact); this rule has one LIST".into(),
            );
        }
    }

    fn schedule(&mut self) -> Option<Schedule> {
        let text = self.text("SCHEDULE")?;
        Schedule::parse(text.trim()).map_err(|e| self.error("SCHEDULE", format!("SCHEDULE: {e}"))).ok()
    }

    fn mode(&mut self) -> Mode {
        match self.text("MODE").as_deref() {
            None | Some("mirror") => Mode::Mirror,
            Some("add_only") => Mode::AddOnly,
            Some("suppress") => Mode::Suppress,
            Some(m) => {
                self.error("MODE", format!("MODE must be \"mirror\", \"add_only\" or \"suppress\", got {m:?}"));
                Mode::Mirror
            }
        }
    }

    fn remove_after(&mut self) -> Option<std::time::Duration> {
        let text = self.text("REMOVE_AFTER")?;
        crate::duration::parse(&text).map_err(|e| self.error("REMOVE_AFTER", format!("REMOVE_AFTER: {e}"))).ok()
    }

    fn filter(&mut self) -> Vec<FilterTerm> {
        let Some(value) = self.scope.get("FILTER") else { return Vec::new() };
        read_filter(value).unwrap_or_else(|problems| {
            for p in problems {
                self.error("FILTER", p);
            }
            Vec::new()
        })
    }
}

/// What is wrong with the function that decides, if anything: `fn matches` (or, for a partitioned
/// rule, `fn list` and no `fn matches`) exists once, with one parameter.
fn decider_problem(ast: &rhai::AST, path: &Path, source: &str, partitioned: bool) -> Option<Diagnostic> {
    let at =
        |(line, col): (usize, usize), message: String| Diagnostic { rule: None, file: path.into(), line, col, message };
    let name = if partitioned { "list" } else { "matches" };
    if partitioned && ast.iter_functions().any(|f| f.name == "matches") {
        let message = "fn matches and fn list(contact) both decide: a rule with fn list fills the list it returns \
                       for each contact; fold the condition into fn list (return () for no list)";
        return Some(at(fn_position(source, "matches"), message.into()));
    }
    let found: Vec<_> = ast.iter_functions().filter(|f| f.name == name).collect();
    match found.as_slice() {
        [] => Some(at((1, 1), "fn matches(contact) is missing: the rule needs it to decide".into())),
        [one] if one.params.len() == 1 => None,
        _ => {
            let arities: Vec<String> = found.iter().map(|f| f.params.len().to_string()).collect();
            let message =
                format!("{name} must take exactly one parameter (the contact), found arity {}", arities.join(", "));
            Some(at(fn_position(source, name), message))
        }
    }
}

/// A `FILTER` computed from `today()`: its dates are fixed when the file loads, so a "last 90 days"
/// filter silently stops moving. A warning showing the value it was fixed at.
fn frozen_filter(path: &Path, source: &str, filter: &[FilterTerm]) -> Option<Diagnostic> {
    let (line, col) = const_position(source, "FILTER");
    let declaration: String = source.lines().skip(line.saturating_sub(1)).collect::<Vec<_>>().join("\n");
    let declaration = &declaration[..declaration.find(';').unwrap_or(declaration.len())];
    let uses_today = declaration.match_indices("today").any(|(i, _)| {
        let before = declaration[..i].chars().next_back();
        let after = declaration[i + 5..].trim_start();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && after.starts_with('(')
    });
    if filter.is_empty() || !uses_today {
        return None;
    }
    let values: Vec<String> = filter.iter().map(|t| t.query_pair()).map(|(k, v)| format!("{k}={v}")).collect();
    let message = format!(
        "FILTER is computed from today() when the file loads, so its value is fixed at {} until the file is \
         reloaded; put relative dates in `fn matches` (e.g. `days_since(contact.customFields.lastPurchaseDate) > 90`): \
         segsync derives the server filter from `matches` itself",
        values.join(", ")
    );
    Some(Diagnostic { rule: None, file: path.into(), line, col, message })
}

/// A compile error as people need it: an undefined variable says why it is not visible.
fn compile_message(e: &rhai::ParseError, source: &str) -> String {
    match e.err_type() {
        rhai::ParseErrorType::VariableUndefined(name) if const_declared(source, name) => format!(
            "{}: {name} is a top-level constant, and top-level constants are not visible inside functions; \
             declare it with `let {name} = …;` inside the function that uses it",
            e.err_type()
        ),
        rhai::ParseErrorType::VariableUndefined(name) => format!(
            "{}: declare {name} with `let` in the function that uses it (top-level names are not visible there)",
            e.err_type()
        ),
        other => other.to_string(),
    }
}

/// Whether `source` declares a top-level `const name`.
fn const_declared(source: &str, name: &str) -> bool {
    source.lines().any(|line| {
        line.trim_start().strip_prefix("const ").is_some_and(|rest| {
            rest.trim_start()
                .strip_prefix(name)
                .is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'))
        })
    })
}

fn at_pos(path: &Path, pos: Position, message: String) -> Diagnostic {
    let message = crate::diagnostic::without_rhai_position(message);
    Diagnostic {
        rule: None,
        file: path.into(),
        line: pos.line().unwrap_or(0),
        col: pos.position().unwrap_or(0),
        message,
    }
}

/// `FILTER = #{ region: "Lombardia", "customFields.x.before": "2026-01-09" }`; a nested
/// `customFields: #{ x: "y" }` is accepted too.
fn read_filter(value: &Dynamic) -> Result<Vec<FilterTerm>, Vec<String>> {
    let Some(map) = value.read_lock::<Map>() else {
        return Err(vec![format!(
            "FILTER must be a map such as #{{ region: \"Lombardia\" }}, got {}",
            value.type_name()
        )]);
    };
    let mut flat = Vec::new();
    for (key, v) in map.iter() {
        match v.read_lock::<Map>() {
            Some(nested) if key.as_str() == "customFields" => {
                flat.extend(nested.iter().map(|(k, v)| (format!("customFields.{k}"), v.clone())));
            }
            _ => flat.push((key.to_string(), v.clone())),
        }
    }
    let mut terms = Vec::new();
    let mut problems = Vec::new();
    for (key, v) in flat {
        let text = if v.is_string() || v.is_int() || v.is_float() || v.is_bool() {
            v.to_string()
        } else if let Some(d) = v.read_lock::<super::Date>() {
            d.0.to_string()
        } else {
            problems.push(format!("FILTER {key:?} must be a string, number or boolean, got {}", v.type_name()));
            continue;
        };
        match FilterTerm::parse(&key, &text) {
            Ok(t) => terms.push(t),
            Err(e) => problems.push(e),
        }
    }
    if problems.is_empty() { Ok(terms) } else { Err(problems) }
}

/// Where `const NAME` is declared (1-based), or the top of the file.
fn const_position(source: &str, name: &str) -> (usize, usize) {
    for (i, line) in source.lines().enumerate() {
        if let Some(col) = line.find("const ") {
            let rest = line[col + 6..].trim_start();
            if rest.strip_prefix(name).is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_')) {
                return (i + 1, col + 1);
            }
        }
    }
    (1, 1)
}

fn fn_position(source: &str, name: &str) -> (usize, usize) {
    let needle = format!("fn {name}");
    source.lines().enumerate().find_map(|(i, l)| l.find(&needle).map(|c| (i + 1, c + 1))).unwrap_or((1, 1))
}

/// Property names the file reads (`contact.customFields.totalSpent` → customFields, totalSpent),
/// each with the line and column (1-based) of its first use.
fn mentions_at(source: &str) -> Vec<(String, (usize, usize))> {
    let code = blank_literals(source);
    let bytes = code.as_bytes();
    let mut words: Vec<(String, (usize, usize))> = Vec::new();
    for (i, _) in code.match_indices('.') {
        let start = i + 1;
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |n| start + n);
        if end > start && bytes[start].is_ascii_alphabetic() {
            let word = &code[start..end];
            // A method call (`.len()`) is not a field, but `.get("name")` reads the field `name`
            // (its name is read from the source, where the literal is not blanked).
            let word = if bytes.get(end) == Some(&b'(') {
                match (word, source.get(end + 1..).and_then(|rest| rest.trim_start().strip_prefix('"'))) {
                    ("get", Some(rest)) => rest.split('"').next().unwrap_or_default(),
                    _ => "",
                }
            } else {
                word
            };
            if !word.is_empty() && !words.iter().any(|(w, _)| w == word) {
                let line_start = code[..start].rfind('\n').map_or(0, |n| n + 1);
                let line = code[..start].matches('\n').count() + 1;
                words.push((word.to_owned(), (line, start - line_start + 1)));
            }
        }
    }
    words
}

/// `source` with the inside of every string and character literal and every comment replaced by
/// spaces, byte for byte (so positions still match `source`): `"@example.it"` names no field. The
/// `${…}` of a backtick string is code, and is kept.
fn blank_literals(source: &str) -> String {
    #[derive(Clone, Copy, PartialEq)]
    enum In {
        /// Code; inside `${…}` when the count of open braces is `Some`.
        Code(Option<u32>),
        Text(u8),
        LineComment,
        BlockComment(u32),
    }
    let bytes = source.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    // Nested states: a `${…}` inside a backtick string returns to that string.
    let mut stack = vec![In::Code(None)];
    let mut i = 0;
    while i < bytes.len() {
        let (b, next) = (bytes[i], bytes.get(i + 1).copied());
        let state = *stack.last().unwrap_or(&In::Code(None));
        let mut set = |to: In| {
            if let Some(top) = stack.last_mut() {
                *top = to;
            }
        };
        // How many bytes this step covers, and whether they are kept.
        let (len, keep) = match state {
            In::Code(braces) => match (b, next) {
                (b'"' | b'`' | b'\'', _) => {
                    stack.push(In::Text(b));
                    (1, true)
                }
                (b'/', Some(b'/')) => {
                    stack.push(In::LineComment);
                    (2, false)
                }
                (b'/', Some(b'*')) => {
                    stack.push(In::BlockComment(0));
                    (2, false)
                }
                (b'{', _) if braces.is_some() => {
                    set(In::Code(braces.map(|n| n + 1)));
                    (1, true)
                }
                (b'}', _) if braces == Some(0) => {
                    stack.pop();
                    (1, true)
                }
                (b'}', _) if braces.is_some() => {
                    set(In::Code(braces.map(|n| n - 1)));
                    (1, true)
                }
                _ => (1, true),
            },
            In::Text(b'`') if (b, next) == (b'$', Some(b'{')) => {
                stack.push(In::Code(Some(0)));
                (2, true)
            }
            In::Text(_) if b == b'\\' && next.is_some() => (2, false),
            In::Text(quote) => {
                if b == quote {
                    stack.pop();
                }
                (1, b == quote)
            }
            In::LineComment => {
                if b == b'\n' {
                    stack.pop();
                }
                (1, b == b'\n')
            }
            // Rhai's block comments nest.
            In::BlockComment(depth) => match (b, next) {
                (b'*', Some(b'/')) => {
                    if depth == 0 {
                        stack.pop();
                    } else {
                        set(In::BlockComment(depth - 1));
                    }
                    (2, false)
                }
                (b'/', Some(b'*')) => {
                    set(In::BlockComment(depth + 1));
                    (2, false)
                }
                _ => (1, b == b'\n'),
            },
        };
        let len = len.min(bytes.len() - i);
        if keep {
            out.extend_from_slice(&bytes[i..i + len]);
        } else {
            out.extend(std::iter::repeat_n(b' ', len));
        }
        i += len;
    }
    // Only whole characters were kept; every byte of the others became an ASCII space.
    String::from_utf8(out).unwrap_or_default()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(src: &str) -> Result<Rule, Vec<Diagnostic>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("r.rhai");
        std::fs::write(&path, src).expect("write");
        load_file(&super::super::engine::build(chrono_tz::Europe::Rome), &path)
    }

    fn messages(src: &str) -> Vec<(usize, usize, String)> {
        load(src).expect_err("must fail").into_iter().map(|e| (e.line, e.col, e.message)).collect()
    }

    // A top-level constant that is not a setting is an error at its line, naming the setting it was
    // most likely meant to be and why a constant cannot carry a value into `matches`.
    #[test]
    fn unknown_settings_are_errors_with_the_likely_fix() {
        let got = messages(
            "const LIST = \"Geo - Lazio\";\nconst FILTERS = #{ region: \"Lazio\" };\nconst SCHEDUEL = \"0 9 * * *\";\n\
             const NORTH = [\"Lombardia\"];\nfn matches(c) { true }\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].1), (2, 1), "{got:?}");
        assert!(got[0].2.starts_with("FILTERS is not a setting; did you mean FILTER?"), "{got:?}");
        assert!(got[0].2.contains("use a `let` inside the function"), "{got:?}");
        assert_eq!(got[1].0, 3);
        assert!(got[1].2.starts_with("SCHEDUEL is not a setting; did you mean SCHEDULE?"), "{got:?}");
        assert_eq!(got[2].0, 4);
        assert!(got[2].2.starts_with("NORTH is not a setting; the settings are LIST, DESCRIPTION"), "{got:?}");
        assert_eq!(closest_setting("list"), Some("LIST"));
        assert_eq!(closest_setting("REMOVE_AFTR"), Some("REMOVE_AFTER"));
    }

    // A top-level constant used inside `matches` is an undefined variable there: the error says so
    // and how to fix it, at the line of the use.
    #[test]
    fn an_undefined_variable_says_why() {
        let got = messages(
            "const LIST = \"North\";\nconst NORTH = [\"Lombardia\"];\nfn matches(c) {\n    c.region in NORTH\n}\n",
        );
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 4, "{got:?}");
        assert!(got[0].2.contains("NORTH is a top-level constant"), "{got:?}");
        assert!(got[0].2.contains("`let NORTH = …;` inside the function"), "{got:?}");
        let got = messages("const LIST = \"X\";\nfn matches(c) { threshold > 1 }\n");
        assert!(got[0].2.contains("declare threshold with `let`"), "{got:?}");
    }

    // A FILTER computed from today() loads, with a warning at its line showing the frozen value; a
    // literal FILTER has none.
    #[test]
    fn a_filter_from_today_is_a_warning() {
        let rule = load(
            "const LIST = \"Lapsed\";\nconst FILTER = #{ \"customFields.lastPurchaseDate.before\": `${today() - 90}` };\nfn matches(c) { true }\n",
        )
        .expect("loads");
        assert_eq!(rule.warnings.len(), 1, "{:?}", rule.warnings);
        let w = &rule.warnings[0];
        assert_eq!(w.line, 2);
        assert!(w.message.starts_with("FILTER is computed from today() when the file loads"), "{}", w.message);
        assert!(w.message.contains("customFields.lastPurchaseDate.before=20"), "the frozen value: {}", w.message);
        let plain = load("const LIST = \"V\";\nconst FILTER = #{ region: \"Veneto\" };\nfn matches(c) { true }\n");
        assert!(plain.expect("loads").warnings.is_empty());
    }

    // A call to a function that exists nowhere is an error at its line with the closest name; a
    // method that no type has is one too. A method some type has is left to run time.
    #[test]
    fn undefined_functions_and_methods_are_errors() {
        let got = messages(
            "const LIST = \"VIP\";\nfn spent(c) { c.customFields.get(\"totalSpent\") ?? 0.0 }\nfn matches(c) {\n    \
             in_segment(\"vip\", c) || spnet(c) > 1.0\n        || c.email.endswith(\"@x.it\")\n}\n",
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].0, got[0].1), (4, 5), "{got:?}");
        assert!(got[0].2.starts_with("in_segment() is not a function; define it in this file"), "{got:?}");
        assert_eq!(got[1].0, 4, "{got:?}");
        assert_eq!(got[1].2, "spnet() is not a function; did you mean spent()?", "{got:?}");
        assert_eq!(got[2].0, 5, "{got:?}");
        assert_eq!(got[2].2, "no type has a method endswith(); did you mean ends_with()?", "{got:?}");
        // Built-ins, helpers, keywords and methods of some type all pass.
        load(
            "const LIST = \"ok\";\nfn matches(c) { let t = type_of(c); days_since(today()) == 0 && c.email.len() > 0 \
             && c.tags.contains(\"x\") && `${c.id}`.to_upper() != \"\" && is_def_var(\"t\") }\n",
        )
        .expect("every call exists");
    }

    // A rule with fn list fills the lists it names: LIST or fn matches beside it is an error, and
    // MAX_LISTS bounds it (and only it).
    #[test]
    fn partitioned_rules_are_checked() {
        let rule = load("const MAX_LISTS = 3;\nfn list(c) { if c.region == \"Veneto\" { \"Geo - Veneto\" } }\n")
            .expect("a partitioned rule");
        assert_eq!(rule.lists, Lists::Partitioned { max: Some(3) });
        let part = rule.partition("Geo - Veneto");
        assert_eq!((part.name.as_str(), part.list.as_str()), ("r:Geo - Veneto", "Geo - Veneto"));
        let engine = super::super::engine::build(chrono_tz::Europe::Rome);
        let today = super::super::Date(chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("date"));
        let contact = |region: &str| -> rhai::Dynamic {
            serde_json::from_str(&format!(r#"{{"id":"a","region":"{region}"}}"#)).expect("json")
        };
        assert_eq!(rule.list_of(&engine, contact("Veneto"), today), Ok(Some("Geo - Veneto".into())));
        assert_eq!(rule.list_of(&engine, contact("Lazio"), today), Ok(None));
        assert_eq!(part.call_matches(&engine, contact("Veneto"), today), Ok(true));
        assert_eq!(part.call_matches(&engine, contact("Lazio"), today), Ok(false));

        let got = messages("const LIST = \"X\";\nfn list(c) { \"A\" }\n");
        assert!(got[0].2.starts_with("LIST and fn list(contact) both name the lists"), "{got:?}");
        let got = messages("fn list(c) { \"A\" }\nfn matches(c) { true }\n");
        assert_eq!(got[0].0, 2, "{got:?}");
        assert!(got[0].2.starts_with("fn matches and fn list(contact) both decide"), "{got:?}");
        let got = messages("const MAX_LISTS = 0;\nfn list(c) { \"A\" }\n");
        assert!(got[0].2.starts_with("MAX_LISTS must be a whole number from 1"), "{got:?}");
        let got = messages("const LIST = \"X\";\nconst MAX_LISTS = 5;\nfn matches(c) { true }\n");
        assert_eq!(got[0].0, 2, "{got:?}");
        assert!(got[0].2.contains("this rule has one LIST"), "{got:?}");
        let odd = load("fn list(c) { 42 }\n").expect("loads");
        let err = odd.list_of(&engine, contact("Veneto"), today).expect_err("not a name");
        assert!(err.message.contains("list must return a list name"), "{err}");
    }

    // A valid rule loads with its settings, filter, mode and hash.
    #[test]
    fn loads_a_valid_rule() {
        let rule = load(
            "const LIST = \"Geo - Lombardia\";\nconst FILTER = #{ region: \"Lombardia\", customFields: #{ preferredChannel: \"SMS\" } };\nconst MODE = \"add_only\";\nconst SCHEDULE = \"0 */15 * * * *\";\nfn matches(contact) { true }\n",
        )
        .expect("valid");
        assert_eq!(rule.list, "Geo - Lombardia");
        assert_eq!(rule.mode, Mode::AddOnly);
        assert_eq!(rule.hash.len(), 64);
        let mut q = rule.filter_query();
        q.sort();
        assert_eq!(q, [("customFields.preferredChannel".into(), "SMS".into()), ("region".into(), "Lombardia".into())]);
    }

    // The fields a rule reads, and nothing that only looks like one: words inside string
    // literals and comments are not fields (removal facts hold only what the rule read).
    #[test]
    fn mentions_only_fields_read() {
        let source = "const LIST = \"x.y\"; // contact.comment\n/* c.block /* nested.z */ c.still */\n\
                      fn matches(c) { c.email.ends_with(\"@example.it\") && c.customFields.get(\"tier\") == 'a' \
                      && `v.${c.region}` != \"\\\".q\" }";
        let (names, at): (Vec<String>, Vec<(usize, usize)>) = mentions_at(source).into_iter().unzip();
        assert_eq!(names, ["email", "customFields", "tier", "region"]);
        assert_eq!(at, [(3, 19), (3, 55), (3, 68), (3, 97)]);
    }

    // Every problem of a file is reported at once, each at its line and column.
    #[test]
    fn reports_every_problem_with_position() {
        let got = messages(
            "const LIST = \"\";\nconst SCHEDULE = \"every day\";\n  const FILTER = #{ shoeSize: \"42\" };\nconst MODE = \"sometimes\";\nfn matches(a, b) { true }\n",
        );
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!((got[0].0, got[0].1), (1, 1));
        assert!(got[0].2.contains("LIST is empty"));
        assert_eq!((got[1].0, got[1].1), (2, 1));
        assert!(got[1].2.contains("every day"));
        assert_eq!((got[2].0, got[2].1), (3, 3));
        assert!(got[2].2.contains("shoeSize"));
        assert_eq!(got[3].0, 4);
        assert!(got[3].2.contains("sometimes"));
        assert_eq!((got[4].0, got[4].1), (5, 1));
        assert!(got[4].2.contains("exactly one parameter"));
    }

    // Syntax errors and misspelled variables are reported at their position.
    #[test]
    fn syntax_and_strict_variables() {
        let got = messages("const LIST = \"x\";\nfn matches(contact) {\n  contact.region == \n}\n");
        assert_eq!(got[0].0, 4, "{got:?}");
        let got = messages("const LIST = \"x\";\nfn matches(contact) {\n  contcat.region == \"L\"\n}\n");
        assert_eq!((got[0].0, got[0].1), (3, 3), "{got:?}");
        assert!(got[0].2.contains("contcat"), "{got:?}");
    }

    // Missing LIST and missing matches are both named.
    #[test]
    fn missing_list_and_matches() {
        let got = messages("const DESCRIPTION = \"no list\";\n");
        assert!(got.iter().any(|e| e.2.contains("LIST is missing")), "{got:?}");
        assert!(got.iter().any(|e| e.2.contains("fn matches(contact) is missing")), "{got:?}");
    }

    // Two rules naming one list are both refused; a broken file does not stop the others.
    #[test]
    fn directory_load_isolates_problems() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.rhai"), "const LIST = \"Same\";\nfn matches(c) { true }").expect("write");
        std::fs::write(dir.path().join("b.rhai"), "const LIST = \"Same\";\nfn matches(c) { false }").expect("write");
        std::fs::write(dir.path().join("c.rhai"), "const LIST = \"Other\";\nfn matches(c) { true }").expect("write");
        std::fs::write(dir.path().join("d.rhai"), "const LIST = ;").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "not a rule").expect("write");
        let (set, errors) = load_dir(&super::super::engine::build(chrono_tz::Europe::Rome), dir.path());
        assert_eq!(set.rules.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().filter(|e| e.message.contains("also the target of")).count() == 2);
        assert!(errors.iter().any(|e| e.file.ends_with("d.rhai") && e.line == 1));
    }

    // An endless loop at the top level fails the load, not the process.
    #[test]
    fn endless_top_level_is_stopped() {
        let got = messages("const LIST = \"x\";\nloop { }\nfn matches(c) { true }");
        assert!(got[0].2.contains("Too many operations"), "{got:?}");
    }
}
