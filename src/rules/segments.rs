//! Segments built from segments: `segment("vip", contact)` in one rule is rule `vip`'s verdict on
//! the same record, in the same pass, on the same frozen today. The graph is checked when the
//! folder loads: an unknown rule, a rule that does not load, or a cycle is an error at the call's
//! file:line, and a rule's hash covers the rules it names, so editing `vip` reruns its dependents.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rhai::{AST, ASTNode, Expr, Stmt};
use sha2::{Digest, Sha256};

use super::{Diagnostic, Rule};

/// The rules a rule may name with `segment`, by name.
pub type Segments = BTreeMap<String, Arc<Rule>>;

/// One `segment("name", …)` or `segment_list("name", …)` call in a rule file.
#[derive(Debug, Clone)]
pub struct SegmentRef {
    pub name: String,
    /// `segment_list`: the named rule must have `fn list`; `segment`: it must not.
    pub list: bool,
    pub line: usize,
    pub col: usize,
}

/// Every `segment(…)` call of `ast`; a first argument that is not a literal rule name is an error
/// (the graph must be known before any contact is judged).
pub(super) fn refs(ast: &AST, path: &std::path::Path) -> (Vec<SegmentRef>, Vec<Diagnostic>) {
    let (mut found, mut problems) = (Vec::new(), Vec::new());
    ast.walk(&mut |nodes: &[ASTNode]| {
        let call = match nodes.last() {
            Some(ASTNode::Expr(Expr::FnCall(call, pos)) | ASTNode::Stmt(Stmt::FnCall(call, pos))) => Some((call, *pos)),
            _ => None,
        };
        let named = |c: &rhai::FnCallExpr| (c.name == "segment" || c.name == "segment_list") && !c.is_qualified();
        if let Some((call, pos)) = call.filter(|(c, _)| named(c)) {
            let (line, col) = (pos.line().unwrap_or(0), pos.position().unwrap_or(0));
            let list = call.name == "segment_list";
            match call.args.first() {
                Some(Expr::StringConstant(name, _)) if call.args.len() == 2 => {
                    found.push(SegmentRef { name: name.to_string(), list, line, col });
                }
                _ => problems.push(Diagnostic {
                    rule: None,
                    file: path.into(),
                    line,
                    col,
                    message: format!(
                        "{} takes the rule's name as a literal and the contact: {}(\"vip\", contact)",
                        call.name, call.name
                    ),
                }),
            }
        }
        true
    });
    (found, problems)
}

/// Wires every rule to the rules it names and folds their hashes into its own, in dependency
/// order. A rule naming an unknown rule, a rule that did not load, or itself through a cycle is
/// refused with an error at the call (and so is every rule depending on a refused one).
pub(super) fn wire(loaded: Vec<Rule>, broken: &BTreeSet<String>, errors: &mut Vec<Diagnostic>) -> Vec<Arc<Rule>> {
    let mut pending: BTreeMap<String, Rule> = loaded.into_iter().map(|r| (r.name.to_string(), r)).collect();
    let names: Vec<String> = pending.keys().cloned().collect();
    let partitioned: BTreeSet<String> =
        pending.values().filter(|r| r.is_partitioned()).map(|r| r.name.to_string()).collect();
    // Problems of the names themselves.
    let mut refused: BTreeSet<String> = BTreeSet::new();
    for rule in pending.values() {
        for r in &rule.segment_refs {
            let problem = if r.name == rule.name.as_str() {
                Some("a rule cannot name itself".to_owned())
            } else if !r.list && partitioned.contains(&r.name) {
                Some(format!(
                    "rule {} names a list per contact (fn list), not a yes or no; segment needs a rule with fn \
                     matches (segment_list gives the list it names)",
                    r.name
                ))
            } else if r.list && names.contains(&r.name) && !partitioned.contains(&r.name) {
                Some(format!(
                    "rule {} has one LIST; segment_list needs a rule with fn list (segment gives its verdict)",
                    r.name
                ))
            } else if broken.contains(&r.name) {
                Some(format!("rule {} does not load (see its errors)", r.name))
            } else if !names.contains(&r.name) {
                let close = names.iter().min_by_key(|n| strsim::damerau_levenshtein(n, &r.name));
                Some(match close {
                    Some(c) if strsim::damerau_levenshtein(c, &r.name) <= (r.name.len() / 3).max(2) => {
                        format!("there is no rule {:?}; did you mean {c:?}?", r.name)
                    }
                    _ => format!("there is no rule {:?} (rules: {})", r.name, names.join(", ")),
                })
            } else {
                None
            };
            if let Some(why) = problem {
                errors.push(at(rule, r, format!("{}({:?}): {why}", call_name(r), r.name)));
                refused.insert(rule.name.to_string());
            }
        }
    }
    // Build in dependency order; what is left when nothing more can be built is a cycle (or
    // depends on a refused rule).
    let mut built: Segments = BTreeMap::new();
    loop {
        let ready: Vec<String> = pending
            .iter()
            .filter(|(name, rule)| {
                !refused.contains(*name) && rule.segment_refs.iter().all(|r| built.contains_key(&r.name))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if ready.is_empty() {
            break;
        }
        for name in ready {
            let Some(mut rule) = pending.remove(&name) else { continue };
            let deps: Segments = rule.segment_refs.iter().map(|r| (r.name.clone(), built[&r.name].clone())).collect();
            let mut hasher = Sha256::new();
            hasher.update(rule.hash.as_bytes());
            for (dep, dep_rule) in &deps {
                hasher.update(format!("\0segment\0{dep}\0{}", dep_rule.hash).as_bytes());
            }
            if !deps.is_empty() {
                rule.hash = super::load::hex(&hasher.finalize());
            }
            rule.segments = Arc::new(deps);
            built.insert(name, Arc::new(rule));
        }
    }
    for rule in pending.values() {
        if refused.contains(rule.name.as_str()) {
            continue;
        }
        let r = rule.segment_refs.iter().find(|r| !built.contains_key(&r.name));
        if let Some(r) = r {
            let why = if refused.contains(&r.name) || !pending.contains_key(&r.name) {
                format!("rule {} is refused", r.name)
            } else {
                format!("{} depends on itself through {} (a cycle)", rule.name, r.name)
            };
            errors.push(at(rule, r, format!("{}({:?}): {why}", call_name(r), r.name)));
        }
    }
    built.into_values().collect()
}

fn call_name(r: &SegmentRef) -> &'static str {
    if r.list { "segment_list" } else { "segment" }
}

fn at(rule: &Rule, r: &SegmentRef, message: String) -> Diagnostic {
    Diagnostic { rule: None, file: rule.path.clone(), line: r.line, col: r.col, message }
}

#[cfg(test)]
mod tests {
    use crate::rules::{Date, Diagnostic, RuleSet, engine, load_dir};

    fn folder(files: &[(&str, &str)]) -> (RuleSet, Vec<Diagnostic>) {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(format!("{name}.rhai")), text).expect("write");
        }
        load_dir(&engine::build(chrono_tz::Europe::Rome), dir.path())
    }

    const VIP: &str = "const LIST = \"VIP\";\nfn matches(c) { c.customFields.totalSpent > 5000.0 }\n";
    const VIP_LOMBARDIA: &str =
        "const LIST = \"VIP Lombardia\";\nfn matches(c) {\n    segment(\"vip\", c) && c.region == \"Lombardia\"\n}\n";

    fn judge(set: &RuleSet, rule: &str, json: &str) -> Result<bool, String> {
        let contact = serde_json::from_str(json).expect("contact");
        let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("date"));
        let rule = set.get(&rule.into()).expect("loaded");
        rule.evaluate(&engine::build(chrono_tz::Europe::Rome), &contact, today).map_err(|e| e.to_string())
    }

    // `segment` is the named rule's verdict on the same record; its error is the caller's error.
    #[test]
    fn a_segment_of_a_segment() {
        let (set, errors) = folder(&[("vip", VIP), ("vip-lombardia", VIP_LOMBARDIA)]);
        assert!(errors.is_empty(), "{errors:?}");
        let rich_milan = r#"{"id":"a","region":"Lombardia","customFields":{"totalSpent":6000.0}}"#;
        let rich_rome = r#"{"id":"b","region":"Lazio","customFields":{"totalSpent":6000.0}}"#;
        let poor_milan = r#"{"id":"c","region":"Lombardia","customFields":{"totalSpent":10.0}}"#;
        assert_eq!(judge(&set, "vip-lombardia", rich_milan), Ok(true));
        assert_eq!(judge(&set, "vip-lombardia", rich_rome), Ok(false));
        assert_eq!(judge(&set, "vip-lombardia", poor_milan), Ok(false));
        let err = judge(&set, "vip-lombardia", r#"{"id":"d","region":"Lombardia","customFields":{}}"#)
            .expect_err("vip cannot judge it, so neither can its dependent");
        assert!(err.contains("segment(\"vip\")") && err.contains("totalSpent"), "{err}");
        // The dependent's hash covers vip's: an edit of vip is an edit of vip-lombardia.
        let (edited, _) = folder(&[("vip", &VIP.replace("5000.0", "4000.0")), ("vip-lombardia", VIP_LOMBARDIA)]);
        let hash = |s: &RuleSet, r: &str| s.get(&r.into()).expect("loaded").hash.clone();
        assert_ne!(hash(&edited, "vip-lombardia"), hash(&set, "vip-lombardia"));
    }

    // An unknown rule, a cycle and a name that is not a literal are errors at the call's line.
    #[test]
    fn the_graph_is_checked_at_load() {
        let (set, errors) = folder(&[
            ("vip", VIP),
            ("typo", "const LIST = \"T\";\nfn matches(c) { segment(\"vpi\", c) }\n"),
            ("a", "const LIST = \"A\";\nfn matches(c) {\n    segment(\"b\", c)\n}\n"),
            ("b", "const LIST = \"B\";\nfn matches(c) { segment(\"a\", c) }\n"),
            ("dynamic", "const LIST = \"D\";\nfn matches(c) { let n = \"vip\"; segment(n, c) }\n"),
            ("geo", "fn list(c) { if c.region == \"Veneto\" { \"Geo - Veneto\" } }\n"),
            ("on-geo", "const LIST = \"G\";\nfn matches(c) { segment(\"geo\", c) }\n"),
            ("in-geo", "const LIST = \"I\";\nfn matches(c) { segment_list(\"geo\", c) == \"Geo - Veneto\" }\n"),
            ("list-of-vip", "const LIST = \"L\";\nfn matches(c) { segment_list(\"vip\", c) == () }\n"),
        ]);
        let names: Vec<&str> = set.rules.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["geo", "in-geo", "vip"], "{errors:?}");
        let find = |file: &str| errors.iter().find(|e| e.file.ends_with(file)).unwrap_or_else(|| panic!("{errors:?}"));
        assert!(find("on-geo.rhai").message.contains("names a list per contact (fn list)"));
        assert!(find("list-of-vip.rhai").message.contains("segment_list(\"vip\"): rule vip has one LIST"));
        let in_geo = set.get(&"in-geo".into()).expect("loaded");
        let engine = engine::build(chrono_tz::Europe::Rome);
        let today = Date(chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("date"));
        let contact =
            |region: &str| serde_json::from_str(&format!(r#"{{"id":"x","region":"{region}"}}"#)).expect("json");
        assert_eq!(in_geo.evaluate(&engine, &contact("Veneto"), today), Ok(true));
        assert_eq!(in_geo.evaluate(&engine, &contact("Lazio"), today), Ok(false));
        let e = find("typo.rhai");
        assert_eq!((e.line, e.col), (2, 17), "{e}");
        assert!(e.message.contains("there is no rule \"vpi\"; did you mean \"vip\"?"), "{e}");
        let e = find("a.rhai");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("a depends on itself through b (a cycle)"), "{e}");
        assert!(find("b.rhai").message.contains("(a cycle)"));
        assert!(find("dynamic.rhai").message.contains("as a literal"));
    }
}
