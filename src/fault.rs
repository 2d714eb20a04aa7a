//! Fault injection for tests, compiled into debug builds only. `SEGSYNC_FAULT` names one fault:
//!
//! - `panic-in-pass:RULE` panics inside any pass that runs rule `RULE`, so a test can show what a
//!   panic there does;
//! - `slow-commit:RULE:MILLIS` holds the state database for `MILLIS` inside `RULE`'s commit, as a
//!   first sync's million history rows do, so a test can show the daemon's loop does not wait.
//!
//! A release build ignores the variable (the check is `cfg!(debug_assertions)`, a constant).

/// The argument of fault `name`, when the environment asks for it (debug builds only).
fn asked(name: &str) -> Option<String> {
    if !cfg!(debug_assertions) {
        return None;
    }
    let fault = std::env::var("SEGSYNC_FAULT").ok()?;
    fault.strip_prefix(name)?.strip_prefix(':').map(str::to_owned)
}

/// Panics when the environment asks for a panic in `rule`'s pass.
pub fn panic_in_pass(rule: &str) {
    if asked("panic-in-pass").as_deref() == Some(rule) {
        panic!("injected fault: a panic in the pass of rule {rule}");
    }
}

/// Blocks the calling thread (which holds the state database) when the environment asks for a
/// slow commit of `rule`.
pub fn slow_commit(rule: &str) {
    let Some(arg) = asked("slow-commit") else { return };
    if let Some((name, millis)) = arg.split_once(':')
        && name == rule
        && let Ok(millis) = millis.parse()
    {
        std::thread::sleep(std::time::Duration::from_millis(millis));
    }
}

/// The text a panic carried.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
