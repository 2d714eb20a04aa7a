//! Log output, on stderr (journald captures it; stdout stays clean for command output such as
//! `plan --json`): JSON lines when stderr is not a terminal, readable text on a terminal,
//! and `RUST_LOG`-style filtering. Owns nothing else; events and their fields belong to callers.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, text when it is.
    #[default]
    Auto,
    Json,
    Text,
}

/// stderr, with every secret the process has read replaced by `***` (the formatter writes one
/// whole event per call, so a secret is never split across two writes).
struct Scrubbed;

impl std::io::Write for Scrubbed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(crate::gateway::scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the global subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(|| Scrubbed);
    let _ = if json {
        builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init()
    } else {
        builder.try_init()
    };
}
