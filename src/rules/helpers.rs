//! Shared helpers: `rules/lib/NAME.rhai` are modules, not rules. `import "money" as money;` in a
//! rule resolves to `rules/lib/money.rhai` beside it and to nothing else: no other path, no network,
//! the same engine and limits. A helper imports nothing itself, so what a rule runs is the rule and
//! the helpers it names, all inside the rules folder.
//!
//! A helper is checked when each rule that imports it loads, and its problems are reported at the
//! helper's own file and line for that rule. Its text is part of the importing rule's hash, so a
//! helper edit is a rule edit: reloaded, retested, rerun, and visible in the history.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rhai::{AST, ASTNode, Engine, EvalAltResult, Expr, Module, Position, Scope, Stmt};

/// A compiled helper, shared by the rules that import it (`rhai::Shared` under the `sync` feature).
type SharedModule = std::sync::Arc<Module>;

use super::Diagnostic;

/// The folder of helpers, inside the rules folder.
pub const LIB: &str = "lib";

/// One `import "name" as alias;` of a rule file.
#[derive(Debug, Clone)]
pub(super) struct Import {
    pub name: String,
    pub alias: String,
    pub line: usize,
    pub col: usize,
}

/// A helper as one rule imports it.
pub(super) struct Helper {
    pub path: PathBuf,
    pub source: String,
    /// The functions it defines (what `alias::name(…)` may call).
    pub functions: BTreeSet<String>,
    pub module: SharedModule,
}

/// Every `import` statement of `ast`, in order; a path that is not a literal string is named as it is.
pub(super) fn imports(ast: &AST) -> Vec<Import> {
    let mut found = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Import(import, pos))) = path.last() {
            let (expr, alias) = &**import;
            let name = match expr {
                Expr::StringConstant(s, _) => s.to_string(),
                _ => "(not a literal string)".into(),
            };
            found.push(Import {
                name,
                alias: alias.name.to_string(),
                line: pos.line().unwrap_or(0),
                col: pos.position().unwrap_or(0),
            });
        }
        true
    });
    found
}

/// The helpers folder for a file: `rules/lib` beside a rule.
pub fn lib_dir(importer: &Path) -> PathBuf {
    importer.parent().unwrap_or(Path::new(".")).join(LIB)
}

/// Whether `name` names a helper file: letters, digits, `-` and `_`, so no path can leave the folder.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The helper names in `dir`, for "did you mean".
fn available(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rhai"))
        .filter_map(|p| p.file_stem().and_then(|s| s.to_str()).map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// Loads the helper `import` names for the rule at `importer`: compiled, its top level run, its
/// calls checked. Problems of the import itself are at the rule's line; problems inside the helper
/// at the helper's.
pub(super) fn load(engine: &Engine, importer: &Path, import: &Import) -> Result<Helper, Vec<Diagnostic>> {
    let at_import = |message: String| {
        vec![Diagnostic { rule: None, file: importer.into(), line: import.line, col: import.col, message }]
    };
    let dir = lib_dir(importer);
    if !valid_name(&import.name) {
        return Err(at_import(format!(
            "import {:?}: a helper is named by its file in {} (letters, digits, '-' and '_'; no path)",
            import.name,
            dir.display()
        )));
    }
    let path = dir.join(format!("{}.rhai", import.name));
    if !crate::files::is_regular(&path) {
        let names = available(&dir);
        let hint = match names.iter().min_by_key(|n| strsim::damerau_levenshtein(n, &import.name)) {
            Some(close) if strsim::damerau_levenshtein(close, &import.name) <= (import.name.len() / 3).max(2) => {
                format!("; did you mean {close:?}?")
            }
            _ if names.is_empty() => String::new(),
            _ => format!("; the helpers are {}", names.join(", ")),
        };
        return Err(at_import(format!("import {:?}: there is no helper {}{hint}", import.name, path.display())));
    }
    let in_helper = |line: usize, col: usize, message: String| Diagnostic {
        rule: Some(importer.into()),
        file: path.clone(),
        line,
        col,
        message: format!("{message} (in a helper imported by {})", importer.display()),
    };
    let source = crate::files::read_text(&path).map_err(|e| vec![in_helper(0, 0, format!("cannot read: {e}"))])?;
    let mut ast = engine.compile(&source).map_err(|e| {
        let pos = e.position();
        vec![in_helper(pos.line().unwrap_or(0), pos.position().unwrap_or(0), e.err_type().to_string())]
    })?;
    ast.set_source(path.display().to_string());
    if let Some(nested) = imports(&ast).first() {
        return Err(vec![in_helper(nested.line, nested.col, "a helper imports nothing; import it in the rule".into())]);
    }
    let known = super::calls::known(engine, &ast);
    let problems = super::calls::undefined(&known, &ast, &path, &[]);
    if !problems.is_empty() {
        return Err(problems.into_iter().map(|d| in_helper(d.line, d.col, d.message)).collect());
    }
    let module = Module::eval_ast_as_new(Scope::new(), &ast, engine).map_err(|e| {
        let pos = e.position();
        vec![in_helper(pos.line().unwrap_or(0), pos.position().unwrap_or(0), format!("at load: {}", e.unwrap_inner()))]
    })?;
    let functions = ast.iter_functions().map(|f| f.name.to_owned()).collect();
    Ok(Helper { path, source, functions, module: module.into() })
}

/// Resolves `import "name"` to the helper beside the importing rule, and nothing else.
pub(super) struct LibResolver;

impl rhai::ModuleResolver for LibResolver {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let Some(importer) = source.map(Path::new) else {
            return Err(EvalAltResult::ErrorModuleNotFound(path.into(), pos).into());
        };
        let import = Import { name: path.into(), alias: String::new(), line: 0, col: 0 };
        load(engine, importer, &import).map(|h| h.module).map_err(|problems| {
            let message = problems.first().map(ToString::to_string).unwrap_or_default();
            EvalAltResult::ErrorInModule(path.into(), message.into(), pos).into()
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::rules::{Date, Diagnostic, Rule, engine, load_file};

    /// A rules folder with `files` (paths relative to it).
    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("lib")).expect("lib");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    fn load(dir: &tempfile::TempDir, rule: &str) -> Result<Rule, Vec<Diagnostic>> {
        load_file(&engine::build(chrono_tz::Europe::Rome), &dir.path().join(rule))
    }

    fn verdict(rule: &Rule, json: &str) -> bool {
        let contact = serde_json::from_str(json).expect("contact");
        let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("date"));
        rule.evaluate(&engine::build(chrono_tz::Europe::Rome), &contact, today).expect("judged")
    }

    const MONEY: &str =
        "fn spent(c) { c.customFields.get(\"totalSpent\") ?? 0.0 }\nfn is_vip(c) { spent(c) > 5000.0 }\n";

    // A rule calls a helper's functions through its alias, and the helper's own calls work; the
    // helper's text is part of the rule's hash.
    #[test]
    fn a_rule_uses_a_helper() {
        let dir = folder(&[
            ("lib/money.rhai", MONEY),
            ("vip.rhai", "import \"money\" as m;\nconst LIST = \"VIP\";\nfn matches(c) { m::is_vip(c) }\n"),
        ]);
        let rule = load(&dir, "vip.rhai").expect("loads");
        assert!(verdict(&rule, r#"{"id":"a","customFields":{"totalSpent":6000.0}}"#));
        assert!(!verdict(&rule, r#"{"id":"b","customFields":{}}"#));
        std::fs::write(dir.path().join("lib/money.rhai"), MONEY.replace("5000.0", "7000.0")).expect("edit");
        let edited = load(&dir, "vip.rhai").expect("loads");
        assert_ne!(edited.hash, rule.hash, "a helper edit is a rule edit");
        assert!(!verdict(&edited, r#"{"id":"a","customFields":{"totalSpent":6000.0}}"#));
    }

    // A missing helper, a path, a function the helper lacks and a namespace never imported are
    // errors at the rule's line; a problem inside the helper is at the helper's line, naming the rule.
    #[test]
    fn import_problems_point_at_the_right_file() {
        let dir = folder(&[
            ("lib/money.rhai", MONEY),
            ("lib/broken.rhai", "fn spent(c) {\n    c.customFields.totalSpent +\n}\n"),
            ("missing.rhai", "import \"mony\" as money;\nconst LIST = \"A\";\nfn matches(c) { true }\n"),
            ("escape.rhai", "import \"../secrets\" as s;\nconst LIST = \"B\";\nfn matches(c) { true }\n"),
            (
                "lacking.rhai",
                "import \"money\" as money;\nconst LIST = \"C\";\nfn matches(c) {\n    money::is_vp(c)\n}\n",
            ),
            ("broken-user.rhai", "import \"broken\" as b;\nconst LIST = \"D\";\nfn matches(c) { b::spent(c) > 1.0 }\n"),
        ]);
        let first = |rule: &str| load(&dir, rule).expect_err("refused").remove(0);
        let e = first("missing.rhai");
        assert_eq!((e.file.ends_with("missing.rhai"), e.line), (true, 1), "{e}");
        assert!(e.message.contains("there is no helper") && e.message.contains("did you mean \"money\"?"), "{e}");
        let e = first("escape.rhai");
        assert!(e.message.contains("no path"), "{e}");
        let e = first("lacking.rhai");
        assert_eq!(e.line, 4, "{e}");
        assert_eq!(e.message, "money::is_vp() is not defined in that helper; did you mean money::is_vip()?");
        let e = first("broken-user.rhai");
        assert!(e.file.ends_with("lib/broken.rhai"), "at the helper: {e}");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("imported by") && e.message.contains("broken-user.rhai"), "{e}");
    }
}
