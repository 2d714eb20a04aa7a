//! The command line: one subcommand per user task, each a thin call into the library, and the
//! documented exit codes. Printing results for people happens here and nowhere else.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::logging::LogFormat;
use crate::plan::Plan;
use crate::sandbox::{Faults, Sandbox, SandboxConfig};

#[derive(Debug, Parser)]
#[command(name = "segsync", version, about = "Keeps partner-gateway contact lists in sync with Rhai segment rules")]
pub struct Cli {
    /// Log format: auto (JSON unless stdout is a terminal), json or text.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the bundled emulator of the partner-gateway API on localhost, seeded with demo contacts.
    Sandbox(SandboxArgs),
}

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Number of demo contacts to generate.
    #[arg(long, default_value_t = 20_000)]
    pub contacts: u64,
    /// Seed of the demo data: the same seed gives the same contacts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The API key clients must send (X-Api-Key, or as the Basic password).
    #[arg(long, default_value = "sandbox-key")]
    pub api_key: String,
    /// Rate plan to enforce per key.
    #[arg(long, default_value_t = Plan::Production)]
    pub plan: Plan,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Share of API requests that fail (split evenly: 500, 429, dropped connection), 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0)]
    pub fault_rate: f64,
    /// Contacts changed per minute (purchases, moves, sign-ups, deletions).
    #[arg(long, default_value_t = 0)]
    pub churn_per_minute: u32,
}

/// Exit codes, documented in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Failure = 1,
    Usage = 2,
    Invalid = 3,
    Held = 4,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

pub fn run(cli: Cli) -> anyhow::Result<Exit> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    match cli.command {
        Command::Sandbox(args) => runtime.block_on(sandbox(args)),
    }
}

async fn sandbox(args: SandboxArgs) -> anyhow::Result<Exit> {
    if !(0.0..=1.0).contains(&args.fault_rate) {
        anyhow::bail!("--fault-rate must be between 0.0 and 1.0, got {}", args.fault_rate);
    }
    let config = SandboxConfig {
        contacts: args.contacts,
        seed: args.seed,
        api_key: args.api_key,
        plan: args.plan,
        faults: Faults::split(args.fault_rate, Duration::from_millis(args.latency_ms)),
        churn_per_minute: args.churn_per_minute,
        ..SandboxConfig::default()
    };
    let started = std::time::Instant::now();
    let sandbox = Sandbox::start(config, args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        base_url = %sandbox.base_url(),
        contacts = args.contacts,
        plan = %args.plan,
        generate_ms = started.elapsed().as_millis() as u64,
        "sandbox ready (stats at /_sandbox/stats)"
    );
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    sandbox.serve_until(cancel).await;
    tracing::info!("sandbox stopped");
    Ok(Exit::Ok)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
