//! Every function a rule calls must exist: defined in the file, a segsync helper, or a Rhai
//! built-in. Rhai resolves calls only when they run, so without this check `in_segment(…)`
//! loads cleanly and then fails on every contact. Methods stay dynamically typed: a method
//! name that exists on some type passes here and is checked when it runs.

use std::collections::BTreeSet;
use std::path::Path;

use rhai::{AST, ASTNode, Engine, Expr, FnCallExpr, Position, Stmt};

use super::Diagnostic;

/// Rhai's keyword functions: parsed as calls, never registered.
const KEYWORDS: [&str; 9] =
    ["print", "debug", "type_of", "Fn", "call", "curry", "is_shared", "is_def_var", "is_def_fn"];

/// Every function name a rule may call: the engine's (built-ins, segsync's helpers, and property
/// getters as `get$name`), the file's own, and Rhai's keyword functions.
pub(super) fn known(engine: &Engine, ast: &AST) -> BTreeSet<String> {
    let mut known: BTreeSet<String> =
        engine.collect_fn_metadata(None, |f| Some(f.metadata.name.to_string()), true).into_iter().collect();
    known.extend(ast.iter_functions().map(|f| f.name.to_owned()));
    known.extend(KEYWORDS.map(str::to_owned));
    known
}

/// Whether `.name` reads a property of a non-map type (`today().year`), not a contact's field.
pub(super) fn is_getter(known: &BTreeSet<String>, name: &str) -> bool {
    known.contains(&format!("get${name}"))
}

/// A helper as a rule imported it: its alias and the functions it defines.
pub(super) type Imported<'a> = (&'a str, &'a BTreeSet<String>);

/// One call of a function that exists nowhere, at its position, with the closest existing name.
/// `alias::name(…)` must name an imported helper and a function it defines.
pub(super) fn undefined(known: &BTreeSet<String>, ast: &AST, path: &Path, helpers: &[Imported]) -> Vec<Diagnostic> {
    let at = |pos: Position, message: String| Diagnostic {
        rule: None,
        file: path.into(),
        line: pos.line().unwrap_or(0),
        col: pos.position().unwrap_or(0),
        message,
    };
    let mut problems = Vec::new();
    // Every call of a name that exists nowhere: (name, where, whether it is a method call).
    let mut unknown: Vec<(String, Position, bool)> = Vec::new();
    let mut note = |call: &FnCallExpr, pos: Position, method: bool| {
        if call.is_qualified() {
            let root = call.namespace.root();
            match helpers.iter().find(|(alias, _)| *alias == root) {
                None => problems.push(at(
                    pos,
                    format!("{root}:: is not an imported helper; add `import \"{root}\" as {root};` at the top"),
                )),
                Some((_, functions)) if !functions.contains(call.name.as_str()) => {
                    let hint = closest(&call.name, functions).map(|f| format!("; did you mean {root}::{f}()?"));
                    problems.push(at(
                        pos,
                        format!("{root}::{}() is not defined in that helper{}", call.name, hint.unwrap_or_default()),
                    ));
                }
                Some(_) => {}
            }
        } else if !call.is_operator_call() && is_identifier(&call.name) && !known.contains(call.name.as_str()) {
            unknown.push((call.name.to_string(), pos, method));
        }
    };
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, pos)) | ASTNode::Stmt(Stmt::FnCall(call, pos))) => {
                note(call, *pos, false);
            }
            Some(ASTNode::Expr(Expr::MethodCall(call, pos))) => note(call, *pos, true),
            _ => {}
        }
        true
    });
    problems.extend(unknown.into_iter().map(|(name, pos, method)| {
        let name = name.as_str();
        let what =
            if method { format!("no type has a method {name}()") } else { format!("{name}() is not a function") };
        let hint = match closest(name, known) {
            Some(fix) => format!("; did you mean {fix}()?"),
            None => {
                format!("; define it in this file with `fn {name}(…) {{ … }}`, or see the README for segsync's helpers")
            }
        };
        at(pos, format!("{what}{hint}"))
    }));
    problems.sort_by_key(|d| (d.line, d.col));
    problems
}

fn is_identifier(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// The existing name `name` was most likely meant to be, if one is close enough to suggest.
fn closest<'a>(name: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    known
        .iter()
        .filter(|k| is_identifier(k) && !k.starts_with("get$") && !k.starts_with("set$"))
        .map(|k| (strsim::damerau_levenshtein(name, k), k.as_str()))
        .filter(|(distance, k)| *distance <= (k.len() / 3).max(2))
        .min()
        .map(|(_, k)| k)
}
