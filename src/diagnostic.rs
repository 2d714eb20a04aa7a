//! A problem in a file people write (config.toml, a rule, a rule's tests), with its position:
//! the one type `check`, the daemon's log and every loader report problems in.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The rule file this problem stops, when that is not `file`: a problem inside a helper
    /// (`rules/lib/money.rhai`) stops each rule importing it, and is reported once per rule.
    pub rule: Option<PathBuf>,
    pub file: PathBuf,
    /// 1-based; 0 when no position is known.
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem with the file as a whole (no position).
    pub fn whole_file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self { rule: None, file: file.into(), line: 0, col: 0, message: message.into() }
    }

    /// The name of the rule this problem stops: the stem of its rule file.
    pub fn rule_name(&self) -> Option<&str> {
        self.rule.as_ref().unwrap_or(&self.file).file_stem().and_then(|s| s.to_str())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // No position is known: `file:0:0:` would send people looking for line 0.
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}:{}: {}", self.file.display(), self.line, self.col, self.message)
        }
    }
}

impl std::error::Error for Diagnostic {}

/// The 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, col)
}

/// A Rhai message without the " (line L, position C)" Rhai appends: the position is reported
/// on its own.
pub fn without_rhai_position(mut message: String) -> String {
    if let Some(i) = message.rfind(" (line ")
        && message.ends_with(')')
    {
        message.truncate(i);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    // Positions are 1-based and a missing one is not printed as 0:0.
    #[test]
    fn positions() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(Diagnostic::whole_file("c.toml", "unreadable").to_string(), "c.toml: unreadable");
        let d = Diagnostic { rule: None, file: "r.rhai".into(), line: 3, col: 7, message: "bad".into() };
        assert_eq!(d.to_string(), "r.rhai:3:7: bad");
        assert_eq!(without_rhai_position("Unknown x (line 3, position 7)".into()), "Unknown x");
    }
}
