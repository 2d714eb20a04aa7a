//! Fault injection for tests, compiled into debug builds only: `SEGSYNC_FAULT=panic-in-pass:RULE`
//! panics inside any pass that runs rule `RULE`, so a test can show what a panic there does. A
//! release build ignores the variable (the check is `cfg!(debug_assertions)`, a constant).

/// Panics when the environment asks for a panic in `rule`'s pass (debug builds only).
pub fn panic_in_pass(rule: &str) {
    if cfg!(debug_assertions)
        && std::env::var("SEGSYNC_FAULT").is_ok_and(|v| v.strip_prefix("panic-in-pass:") == Some(rule))
    {
        panic!("injected fault: a panic in the pass of rule {rule}");
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
