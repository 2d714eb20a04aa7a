//! The `segsync` binary: parse the command line, set up logging, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = segsync::cli::Cli::parse();
    segsync::logging::init(cli.log_format);
    match segsync::cli::run(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "segsync failed");
            eprintln!("error: {e:#}");
            segsync::cli::Exit::Failure.into()
        }
    }
}
