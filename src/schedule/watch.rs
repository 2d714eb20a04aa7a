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

/// Calls `on_change` (from the watcher's own thread) after a quiet `debounce` following any
/// create, change, rename or removal of a `*.rhai` file in `dir`.
pub fn watch(
    dir: &Path,
    debounce: Duration,
    on_change: impl Fn() + Send + 'static,
) -> Result<RulesWatcher, WatchError> {
    let failed = |cause| WatchError { dir: dir.to_path_buf(), cause };
    let mut debouncer = new_debouncer(debounce, None, move |result: DebounceEventResult| match result {
        Ok(events) => {
            let relevant = events.iter().any(|e| {
                !matches!(e.kind, EventKind::Access(_))
                    && e.paths.iter().any(|p| {
                        p.extension().is_some_and(|x| x == "rhai")
                            && !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
                    })
            });
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
    debouncer.watch(dir, RecursiveMode::NonRecursive).map_err(failed)?;
    Ok(RulesWatcher { _debouncer: debouncer })
}
