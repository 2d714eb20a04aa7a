//! The command line: one subcommand per user task, each a thin call into the library, and the
//! documented exit codes. Printing results for people happens here and nowhere else.
//!
//! `mod.rs` holds the arguments, the low-level args → settings step and the exit codes; each
//! subcommand lives in its own file.
#![allow(clippy::print_stdout)]

/// Prints one line for people, scrubbed of every secret the process has read: what is shown
/// here includes the gateway's own words, and a server may echo the key back.
macro_rules! say {
    ($($arg:tt)*) => {
        crate::cli::write_out(crate::gateway::scrub(&format!($($arg)*)).as_bytes(), true)
    };
}

/// Prints one error line to standard error, scrubbed like [`say!`]: errors never mix with a
/// command's output (`segsync plan --json | jq` sees JSON or nothing).
macro_rules! complain {
    ($($arg:tt)*) => {
        crate::cli::write_err(&crate::gateway::scrub(&format!($($arg)*)))
    };
}

mod check;
mod explain;
mod man;
mod pass;
mod sample;
mod sandbox;
mod show;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use segsync_sandbox::{RatePlan, SandboxConfig};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors};
use crate::logging::LogFormat;
use crate::outcome::Outcome;

#[derive(Debug, Parser)]
#[command(
    name = "segsync",
    version = env!("SEGSYNC_VERSION"),
    about = "Keeps partner-gateway contact lists in sync with Rhai segment rules"
)]
pub struct Cli {
    /// Log format: auto (JSON unless stderr is a terminal), json or text. Overrides [log] format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// The configuration file [default: $SEGSYNC_CONFIG, else ./config.toml, else /etc/segsync/config.toml].
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: run every rule now, then on its schedule and whenever its file changes.
    Run,
    /// The start gate: validate config.toml, the key, the state path and every rule (with its tests);
    /// no network. Fails on what `run` would refuse; broken rules are warnings unless --strict.
    Check {
        /// Fail on any problem, broken rules and failing rule tests included (for CI and people).
        #[arg(long)]
        strict: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also print each rule's schedule and its next three firings.
        #[arg(long, short)]
        verbose: bool,
        /// The live preview: read about N contacts from the gateway (the bundled sandbox by default)
        /// and run every rule on them; report matches, absent fields, FILTER values never seen and
        /// evaluation errors. Writes nothing.
        #[arg(long, value_name = "N")]
        sample: Option<u64>,
    },
    /// Run rule unit tests (rules/NAME.test.toml beside rules/NAME.rhai).
    Test {
        /// Rules to test (default: all).
        rules: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also write a JUnit XML report to this file (for CI pipelines).
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Fetch one contact and show why it is or is not in RULE's segment.
    Explain {
        rule: String,
        contact_id: String,
        /// Also show the server filter segsync derives from `matches` (or why there is none).
        #[arg(long)]
        verbose: bool,
    },
    /// Dry run: per rule, what a sync would add and remove (with a sample of ids); changes nothing.
    Plan {
        /// Rules to plan (default: all).
        rules: Vec<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 5 when changes are pending (0 only when there is nothing to do), as terraform's.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// One reconcile pass now, then exit (exit 4 if a guard held a change, 1 if a rule failed).
    Sync {
        /// Rules to sync (default: all).
        rules: Vec<String>,
        /// Confirm, once, removals the mass-removal guard would hold.
        #[arg(long)]
        allow_mass_removal: bool,
        /// Read every list's members instead of trusting the membership cache.
        #[arg(long)]
        full: bool,
    },
    /// The last runs per rule: when, trigger, added, removed, outcome.
    Status {
        /// Print JSON instead of text (always JSON, with a schema version).
        #[arg(long)]
        json: bool,
        /// Past runs to list under each rule (0: none).
        #[arg(long, default_value_t = 0)]
        runs: usize,
    },
    /// Membership history: every entry and exit of CONTACT_ID, newest first, with the reason; or,
    /// with --rule, that rule's movements and changes.
    #[command(group = clap::ArgGroup::new("whose").required(true).args(["contact_id", "rule"]))]
    History {
        /// The contact whose entries and exits to show.
        contact_id: Option<String>,
        /// Show this rule's adds, removals and changes instead.
        #[arg(long)]
        rule: Option<String>,
        /// Only entries this recent, e.g. 7d, 24h (default: everything kept).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve the bundled emulator of the partner-gateway API on localhost, seeded with demo contacts.
    Sandbox(SandboxArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write every page to a folder.
    #[command(hide = true)]
    Man {
        /// Write segsync.1 and one page per subcommand (segsync-run.1, …) here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of demo contacts to generate.
    #[arg(long, default_value_t = SandboxConfig::default().contacts)]
    pub contacts: u64,
    /// Seed of the demo data: the same seed gives the same contacts.
    #[arg(long, default_value_t = SandboxConfig::default().seed)]
    pub seed: u64,
    /// The API key clients must send (X-Api-Key, or as the Basic password).
    #[arg(long, default_value_t = SandboxConfig::default().api_key)]
    pub api_key: String,
    /// Rate plan to enforce per key.
    #[arg(long, default_value_t = RatePlan::Production)]
    pub plan: RatePlan,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of API requests that fail (split evenly: 500, 429, dropped connection), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Contacts changed per minute (purchases, moves, sign-ups, deletions).
    #[arg(long, default_value_t = SandboxConfig::default().churn_per_minute)]
    pub churn_per_minute: u32,
    /// Play the reference's page-based server: `page` instead of `offset`, pages of up to 1,000.
    #[arg(long)]
    pub page_dialect: bool,
}

/// Exit codes, documented in the README: the one table every command uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything done.
    Ok = 0,
    /// A runtime failure: the API, the state database, a failed, partial or interrupted rule run,
    /// a failed rule test.
    Failure = 1,
    /// Wrong command-line usage (clap's own code).
    Usage = 2,
    /// Invalid config.toml or rules.
    Invalid = 3,
    /// A guard held a change (mass removal); nothing failed.
    Held = 4,
    /// `plan --detailed-exitcode`: changes are pending.
    Pending = 5,
    /// `sync` stopped waiting for the daemon's runs (SIGINT or SIGTERM); the daemon still runs
    /// what it took.
    Interrupted = 130,
}

impl Exit {
    /// The exit code for runs that ended so: any failure wins over a held change.
    pub fn for_outcomes(outcomes: impl IntoIterator<Item = Outcome>) -> Self {
        let mut exit = Self::Ok;
        for outcome in outcomes {
            let this = match outcome {
                Outcome::Ok => Self::Ok,
                Outcome::Held => Self::Held,
                Outcome::Failed | Outcome::Partial | Outcome::Interrupted => Self::Failure,
            };
            // A failure outranks a held change, which outranks success.
            if this == Self::Failure || (this == Self::Held && exit == Self::Ok) {
                exit = this;
            }
        }
        exit
    }

    /// `Invalid` instead of `Ok` when some rule files were broken (the rest ran fine).
    pub(super) fn unless_invalid(self, all_valid: bool) -> Self {
        if self == Self::Ok && !all_valid { Self::Invalid } else { self }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

impl Cli {
    /// The log format: `--log-format`, else the config's `[log] format`, else auto.
    fn log_format(&self, config: Option<&Config>) -> LogFormat {
        self.log_format.or(config.map(|c| c.log_format)).unwrap_or_default()
    }
}

/// Writes to standard output (with a newline when `line`). A reader that went away
/// (`segsync history --rule vip | head -1`) ends the command quietly with exit 0: what it
/// wanted was written, and a panic message would only be noise.
pub(crate) fn write_out(bytes: &[u8], line: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_all(bytes).and_then(|()| if line { out.write_all(b"\n") } else { Ok(()) });
    match written.and_then(|()| out.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        // Any other failure to write (a full disk) is as quiet: there is nowhere to say it.
        Err(_) => std::process::exit(Exit::Failure as i32),
    }
}

/// Writes one line to standard error (an error, a warning, a note): never mixed into the output.
pub(crate) fn write_err(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    // Commands that need no config.
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut command, "segsync", &mut text);
            write_out(&text, false);
            return Ok(Exit::Ok);
        }
        Command::Man { out_dir } => return man::man(out_dir.as_deref()),
        _ => {}
    }
    if let Command::Sandbox(args) = &cli.command {
        crate::logging::init(cli.log_format(None));
        return runtime()?.block_on(sandbox::serve(args.clone()));
    }
    let path = match locate_config(cli.config.clone(), std::env::var_os(CONFIG_VAR), Path::new(PACKAGED_CONFIG)) {
        Ok(path) => path,
        Err(why) => {
            crate::logging::init(cli.log_format(None));
            complain!("{why}");
            return Ok(Exit::Invalid);
        }
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(ConfigErrors(errors)) => {
            crate::logging::init(cli.log_format(None));
            for e in &errors {
                complain!("{e}");
            }
            complain!("config: {} problem(s) in {}", errors.len(), path.display());
            return Ok(Exit::Invalid);
        }
    };
    crate::logging::init(cli.log_format(Some(&config)));
    crate::rules::native::set_enabled(config.native_eval);
    match cli.command {
        Command::Run => {
            runtime()?.block_on(crate::daemon::run(
                config,
                crate::schedule::Clock::System,
                CancellationToken::new(),
            ))?;
            Ok(Exit::Ok)
        }
        Command::Check { strict, json, verbose, sample } => {
            Ok(check::check(&config, strict, check::Output { json, verbose, sample }))
        }
        Command::Test { rules, json, junit } => {
            Ok(check::test(&config, &rules, check::Output { json, ..Default::default() }, junit.as_deref()))
        }
        Command::Explain { rule, contact_id, verbose } => {
            runtime()?.block_on(explain::explain(&config, &rule, &contact_id, verbose))
        }
        Command::Plan { rules, json, detailed_exitcode } => {
            runtime()?.block_on(pass::pass(&config, &rules, pass::PassCommand::Plan { json, detailed_exitcode }))
        }
        Command::Sync { rules, allow_mass_removal, full } => {
            runtime()?.block_on(pass::pass(&config, &rules, pass::PassCommand::Sync { allow_mass_removal, full }))
        }
        Command::Status { json, runs } => show::status(&config, json, runs),
        Command::History { contact_id, rule, since, json } => {
            show::history(&config, contact_id.as_deref(), rule.as_deref(), since.as_deref(), json)
        }
        Command::Sandbox(_) | Command::Completions { .. } | Command::Man { .. } => unreachable!("handled above"),
    }
}

/// The environment variable naming the config when `--config` is not given.
pub const CONFIG_VAR: &str = "SEGSYNC_CONFIG";
/// Where the Debian package installs the config.
pub const PACKAGED_CONFIG: &str = "/etc/segsync/config.toml";

/// The config a command uses: `--config`, else `$SEGSYNC_CONFIG`, else `./config.toml`, else the
/// packaged `/etc/segsync/config.toml`. One found by the last two steps is named on stderr, so
/// `cd /tmp && segsync status` says whose state it shows; none found says where it looked.
fn locate_config(given: Option<PathBuf>, env: Option<std::ffi::OsString>, packaged: &Path) -> Result<PathBuf, String> {
    if let Some(path) = given {
        return Ok(path);
    }
    if let Some(path) = env.filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let local = PathBuf::from("config.toml");
    if local.exists() {
        return Ok(local);
    }
    if packaged.exists() {
        eprintln!("segsync: using {} (no ./config.toml, ${CONFIG_VAR} unset)", packaged.display());
        return Ok(packaged.to_path_buf());
    }
    Err(format!(
        "no config: --config not given, ${CONFIG_VAR} unset, and neither ./config.toml nor {} exists; \
         pass --config PATH",
        packaged.display()
    ))
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    crate::runtime().context("starting the async runtime")
}
