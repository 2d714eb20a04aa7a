//! The `segsync` binary: parse the command line, run, map the outcome to an exit code.
//! Logging is set up by the command (after the config is read, so its [log] format applies).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = segsync::cli::Cli::parse();
    match segsync::cli::run(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "segsync failed");
            eprintln!("error: {e:#}");
            segsync::cli::Exit::Failure.into()
        }
    }
}
