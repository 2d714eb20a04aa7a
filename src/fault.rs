//! Fault injection for tests, compiled into debug builds only. `SEGSYNC_FAULT` names one fault:
//!
//! - `panic-in-pass:RULE` panics inside any pass that runs rule `RULE`, so a test can show what a
//!   panic there does;
//! - `hold-commit:RULE:PATH` holds the state database inside each commit of `RULE`'s run, as a
//!   first sync's million history rows do, until the file `PATH` exists (it creates `PATH.held`
//!   when it starts holding), so a test decides exactly how long a run is in progress;
//! - `native-wrong:RULE` makes the native evaluator of `RULE` answer the opposite of the truth, so a
//!   test can show the shadow check catching it.
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

/// Blocks the calling thread (which holds the state database) while the environment asks to hold
/// `rule`'s commit: until the release file exists, or a minute at most.
pub fn hold_commit(rule: &str) {
    let Some(arg) = asked("hold-commit") else { return };
    let Some((name, release)) = arg.split_once(':').filter(|(name, _)| *name == rule) else { return };
    let release = std::path::Path::new(release);
    let _ = std::fs::write(format!("{}.held", release.display()), name);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !release.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether the environment asks for a wrong native evaluator for `rule` (read once, at load).
pub fn native_wrong(rule: &str) -> bool {
    asked("native-wrong").as_deref() == Some(rule)
}

/// The text a panic carried.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
