//! The `segsync` binary: parse the command line, run, map the outcome to an exit code.
//! Logging is set up by the command (after the config is read, so its [log] format applies).

use std::process::ExitCode;

use clap::Parser;

// segsync allocates and frees millions of small maps per pass; glibc's malloc spent a quarter of
// the CPU of a 1M-contact pass in bookkeeping (see BENCHMARKS.md), mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = segsync::cli::Cli::parse();
    match segsync::cli::run(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            let message = format!("{e:#}");
            let message = segsync::gateway::scrub(&message);
            tracing::error!(error = %message, "segsync failed");
            eprintln!("error: {message}");
            segsync::cli::Exit::Failure.into()
        }
    }
}
