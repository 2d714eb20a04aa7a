//! The contact fields a rule's Rhai code provably reads, so a read may keep only those even when
//! Rhai judges the rule.
//!
//! A Rhai function sees a contact only through its parameter: no closures, no `eval`, and a
//! function never sees its caller's variables. So when every use of the parameter of `matches`
//! and `fn list` is a property read (`contact.region`, `contact.customFields.totalSpent`,
//! `contact?.city`), the top-level properties named are every field the call can reach, and a map
//! holding just those judges exactly as the whole contact does. Any other use hands the contact
//! on or reads it whole (`helper(contact)`, `contact.keys()`, `contact["x"]`, `let c = contact`,
//! `segment("vip", contact)`, `this`): then the answer is `None` and the rule gets every field.
//! Every variable of the file with a parameter's name counts, in every function: a variable
//! that only shares the name can make the answer `None` or longer, never shorter.

use rhai::{AST, ASTNode, Expr};

/// The top-level contact fields `matches` and `fn list` read, sorted; `None` when they may read
/// more than properties named in the code.
pub(super) fn read_by(ast: &AST) -> Option<Vec<String>> {
    let params: Vec<String> = ast
        .iter_functions()
        .filter(|f| f.name == "matches" || f.name == "list")
        .flat_map(|f| f.params.into_iter().map(str::to_owned))
        .collect();
    let mut fields: Vec<String> = Vec::new();
    let mut provable = true;
    ast.walk(&mut |path: &[ASTNode]| {
        let Some(node) = path.last() else { return true };
        match node {
            ASTNode::Expr(Expr::ThisPtr(..)) => provable = false,
            ASTNode::Expr(Expr::Variable(v, ..)) if params.iter().any(|p| p == v.1.as_str()) => {
                match property_read(path) {
                    Some(name) => fields.push(name),
                    None => provable = false,
                }
            }
            _ => {}
        }
        provable
    });
    fields.sort_unstable();
    fields.dedup();
    provable.then_some(fields)
}

/// The top-level property read when the last node of `path` (a variable) is the left side of a
/// `.` whose right side starts with a property.
fn property_read(path: &[ASTNode]) -> Option<String> {
    let [.., ASTNode::Expr(Expr::Dot(dot, ..)), ASTNode::Expr(variable)] = path else { return None };
    if !std::ptr::eq(&dot.lhs, *variable) {
        return None;
    }
    leading_property(&dot.rhs).map(str::to_owned)
}

/// The first link of a chain (`region` in `region.len()`, `customFields` in `customFields.x[0]`),
/// when it is a property rather than a method call.
fn leading_property(chain: &Expr) -> Option<&str> {
    match chain {
        Expr::Property(p, _) => Some(p.2.as_str()),
        Expr::Dot(link, ..) | Expr::Index(link, ..) => leading_property(&link.lhs),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(script: &str) -> Option<Vec<String>> {
        let engine = crate::rules::engine::build(chrono_tz::UTC);
        read_by(&engine.compile(script).expect("compiles"))
    }

    #[test]
    fn property_reads_are_the_fields_read() {
        let got = read(
            "fn list(contact) { let spent = contact.customFields.totalSpent * 1.0; \
             if spent > 3000.0 { \"Spenders - \" + contact.region } }",
        );
        assert_eq!(got, Some(vec!["customFields".to_owned(), "region".to_owned()]));
        let got = read("fn matches(c) { c?.city == \"Roma\" && c.email.ends_with(\"@x.it\") || c.tags[0] == 1 }");
        assert_eq!(got, Some(vec!["city".to_owned(), "email".to_owned(), "tags".to_owned()]));
        assert_eq!(read("fn matches(c) { true }"), Some(vec![]));
    }

    #[test]
    fn any_other_use_of_the_contact_reads_it_whole() {
        for script in [
            "fn big(c) { c.totalSpent > 5.0 } fn matches(contact) { big(contact) }",
            "fn matches(contact) { contact.keys().len() > 3 }",
            "fn matches(contact) { contact[\"region\"] == \"Lazio\" }",
            "fn matches(contact) { let c = contact; c.region == \"Lazio\" }",
            "fn matches(contact) { \"region\" in contact }",
            "fn matches(contact) { `${contact}`.len() > 3 }",
            "fn matches(contact) { contact.region == \"Lazio\" && segment(\"vip\", contact) }",
            "fn big() { this.totalSpent > 5.0 } fn matches(contact) { contact.region == \"x\" }",
            "fn list(contact) { contact }",
        ] {
            assert_eq!(read(script), None, "{script}");
        }
    }
}
