//! Watching the rules folder (not the files: editors replace files on save, which kills a watch
//! on the file itself). Bursts of events are debounced; the daemon reloads the whole folder and
//! compares content hashes, so a touched-but-unchanged file does nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};

/// Keeps the watch alive; dropping it stops watching.
pub struct RulesWatcher {
    _debouncer: Debouncer<notify_debouncer_full::notify::RecommendedWatcher, RecommendedCache>,
}

/// The rules folder cannot be watched (it is not there, or inotify is out of watches).
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {cause}", dir.display())]
pub struct WatchError {
    pub dir: PathBuf,
    cause: notify_debouncer_full::notify::Error,
}

/// Whether a change of `path` can change what the rules in `dir` do: a `*.rhai` rule in `dir`, or a
/// helper in `dir/lib` (a helper edit is an edit of every rule importing it). Hidden files are
/// editors' scratch.
fn is_rule_source(dir: &Path, path: &Path) -> bool {
    // The file may be gone (removed, renamed away); its folder is still there to compare.
    let folder = path.parent().and_then(|p| p.canonicalize().ok());
    let in_place = folder.is_some_and(|f| f == dir || f == crate::rules::lib_dir(&dir.join("x")));
    in_place
        && path.extension().is_some_and(|x| x == "rhai")
        && !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Calls `on_change` (from the watcher's own thread) after a quiet `debounce` following any
/// create, change, rename or removal of a `*.rhai` file in `dir` or in its helpers folder `dir/lib`.
pub fn watch(
    dir: &Path,
    debounce: Duration,
    on_change: impl Fn() + Send + 'static,
) -> Result<RulesWatcher, WatchError> {
    let failed = |cause| WatchError { dir: dir.to_path_buf(), cause };
    let root = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| match result {
        Ok(events) => {
            let relevant = events
                .iter()
                .any(|e| !matches!(e.kind, EventKind::Access(_)) && e.paths.iter().any(|p| is_rule_source(&root, p)));
            if relevant {
                on_change();
            }
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!(error = %e, "rules not watched");
            }
        }
    })
    .map_err(failed)?;
    // Recursive, so a `lib` folder created later is watched too; `is_rule_source` ignores the rest.
    debouncer.watch(dir, RecursiveMode::Recursive).map_err(failed)?;
    Ok(RulesWatcher { _debouncer: debouncer })
}
