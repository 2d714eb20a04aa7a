//! segsync keeps contact lists on the Qlara / LORA partner gateway in sync with segment rules
//! written in Rhai. The modules, in reading order (blank lines keep rustfmt from sorting them):
//! what segsync handles, how a rule decides, how the gateway is spoken to, how a pass reconciles,
//! how the daemon runs passes, and the edges where configuration, files and people come in.

pub mod ids; // ContactId, ListId, RuleName, Account, the compact ContactIdSet

pub mod duration; // "24h", "7d": durations as people write them

pub mod contact; // the contact record both the gateway and the rules speak

pub mod slots; // field paths, and a record read into one value per path its rules read

pub mod rules; // Rhai rule files: load, validate, evaluate, test; knows nothing of HTTP

pub mod gateway; // the partner-gateway client: paged reads, rate budget, retries, writes

pub mod outcome; // a run's trigger and outcome

pub mod reconcile; // one pass: bind lists, read, plan (pure), guard, apply, report

pub mod state; // SQLite: bindings, run history, estimates, membership cache, paging, instance lock

pub mod schedule; // cron schedules and rule-file watching; producers only report

pub mod daemon; // `segsync run`: events, reload, shutdown, systemd

pub mod signals; // SIGHUP, SIGTERM, SIGINT as values

pub mod metrics; // Prometheus metrics and /healthz of the daemon

pub mod diagnostic; // a problem in a file people write, with its position

pub mod config; // config.toml → validated Config

pub mod files; // reading config, rule and key files without blocking

pub mod connection; // Config → a gateway: the real one or the bundled sandbox

pub mod logging; // JSON or text logs, RUST_LOG filtering, secrets scrubbed

pub mod cli; // clap subcommands and their exit codes

pub mod fault; // test-only fault injection (debug builds), and a panic's message

/// The async runtime every command runs on. Blocking work (parsing and judging pages, SQLite) is
/// capped at `SEGSYNC_BLOCKING_THREADS` threads (default 8): each thread keeps its own allocator
/// heap, so an unbounded pool holds more memory than the work needs.
///
/// It first turns transparent huge pages off for the process ([`small_pages`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    small_pages();
    let blocking = std::env::var("SEGSYNC_BLOCKING_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(blocking).build()
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`, as
/// `MIMALLOC_ALLOW_THP=0` would). mimalloc asks the kernel for huge pages on its arenas, and a
/// 2 MiB page stays resident while any of its 4 KiB holds a live block: a 1M-contact pass peaked
/// at 186–208 MB with them and 122–130 MB without, for the same CPU (BENCHMARKS.md). The kernel
/// reports the setting as `THP_enabled: 0` in `/proc/<pid>/status`. Refused (an old kernel, a
/// seccomp filter), the process runs on as before: memory, not correctness.
pub fn small_pages() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}
