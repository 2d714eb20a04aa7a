//! Log output, on stderr (stdout stays clean for command output such as `plan --json`): JSON lines
//! when stderr is not a terminal, readable text on a terminal, native journald entries when stderr
//! is the journal, and `RUST_LOG`-style filtering. Every line is scrubbed of secrets.
//!
//! [`SCHEMA`] is the log's contract: every event at INFO and above, with its fields. The JSON
//! formatter writes every declared field of an event, `null` when the event did not record it, so
//! an absent value looks the same everywhere; README's event table is tested against it.

use std::io::{IsTerminal, Write};

use clap::ValueEnum;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Native journald entries when stderr is the journal, else JSON when stderr is not a terminal,
    /// text when it is.
    #[default]
    Auto,
    Json,
    Text,
}

/// The type of a field, as the README documents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Integer,
    Bool,
    /// A JSON object (recorded as its JSON text, written as the object).
    Object,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "string",
            Self::Integer => "integer",
            Self::Bool => "bool",
            Self::Object => "object",
        }
    }
}

use Kind::{Bool, Integer, Object, Text};

/// Every event segsync logs at INFO and above, and its fields. Fields marked in README as nullable
/// are written as `null` when absent. The contract for people who alert on the logs.
pub const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    ("segsync started", &[("version", Text), ("config", Text), ("pid", Integer)]),
    (
        "bundled sandbox started",
        &[("base_url", Text), ("contacts", Integer), ("churn_per_minute", Integer), ("plan", Text)],
    ),
    (
        "rule loaded",
        &[("rule", Text), ("list", Text), ("mode", Text), ("schedule", Text), ("rule_hash", Text), ("next_run", Text)],
    ),
    ("rule rejected", &[("rule", Text), ("file", Text), ("line", Integer), ("col", Integer), ("error", Text)]),
    ("rule kept", &[("rule", Text), ("rule_hash", Text)]),
    ("rule restored", &[("rule", Text), ("rule_hash", Text), ("file", Text)]),
    ("rule removed", &[("rule", Text), ("list", Text)]),
    ("rules folder entry skipped", &[("file", Text)]),
    ("rules not watched", &[("error", Text)]),
    ("reload requested", &[("config", Text)]),
    ("config rejected", &[("file", Text), ("line", Integer), ("col", Integer), ("error", Text)]),
    ("reload failed", &[("error", Text)]),
    ("reloaded", &[("rules", Integer), ("watching", Bool)]),
    ("account changed", &[("account", Text)]),
    ("metrics served", &[("listen", Text)]),
    ("metrics stopped", &[("listen", Text)]),
    ("metrics not moved", &[("error", Text)]),
    ("run requested", &[("rule", Text), ("allow_mass_removal", Bool)]),
    ("run request ignored", &[("rule", Text), ("reason", Text)]),
    (
        "pass started",
        &[
            ("trigger", Text),
            ("rules", Integer),
            ("read_plan", Text),
            ("estimated_requests", Integer),
            ("eta_s", Integer),
        ],
    ),
    (
        "pass progress",
        &[
            ("trigger", Text),
            ("stage", Text),
            ("pages", Integer),
            ("contacts", Integer),
            ("api_requests", Integer),
            ("throttled", Integer),
            ("estimated_requests", Integer),
            ("eta_s", Integer),
        ],
    ),
    (
        "rule run",
        &[
            ("rule", Text),
            ("list_id", Text),
            ("trigger", Text),
            ("rule_hash", Text),
            ("scanned", Integer),
            ("matched", Integer),
            ("members_before", Integer),
            ("added", Integer),
            ("removed", Integer),
            ("to_add", Integer),
            ("to_remove", Integer),
            ("pending_removal", Integer),
            ("eval_errors", Integer),
            ("first_eval_error", Text),
            ("absent_fields", Text),
            ("filter_matched_none", Text),
            ("api_requests", Integer),
            ("retries", Integer),
            ("read_plan", Text),
            ("members_from", Text),
            ("duration_ms", Integer),
            ("outcome", Text),
            ("detail", Text),
        ],
    ),
    (
        "pass finished",
        &[
            ("trigger", Text),
            ("rules", Integer),
            ("read_plan", Text),
            ("api_requests", Integer),
            ("requests", Object),
            ("retries", Integer),
            ("throttled", Integer),
            ("duration_ms", Integer),
            ("dry_run", Bool),
        ],
    ),
    ("pass panicked", &[("trigger", Text), ("rules", Integer), ("error", Text)]),
    ("daemon task failed", &[("task", Text), ("error", Text)]),
    ("list created", &[("rule", Text), ("list", Text), ("list_id", Text)]),
    ("list duplicates", &[("rule", Text), ("list", Text), ("list_id", Text), ("list_ids", Text)]),
    ("list gone", &[("rule", Text), ("list", Text), ("list_id", Text)]),
    ("list binding invalid", &[("rule", Text), ("list", Text), ("list_id", Text), ("found", Text)]),
    (
        "state set aside",
        &[
            ("base_url", Text),
            ("key_fingerprint", Text),
            ("bindings", Integer),
            ("cached_lists", Integer),
            ("pending_removals", Integer),
        ],
    ),
    ("list changed", &[("rule", Text), ("list", Text), ("old_list", Text), ("old_list_id", Text)]),
    ("writes unconfirmed", &[("rule", Text), ("list_id", Text), ("detail", Text)]),
    ("run not recorded", &[("rule", Text), ("error", Text)]),
    ("cache not readable", &[("rule", Text), ("error", Text)]),
    ("history not pruned", &[("error", Text)]),
    ("paging learned", &[("endpoint", Text), ("page_size", Integer), ("pagination", Text), ("reason", Text)]),
    ("rate limited", &[("op", Text), ("wait_ms", Integer)]),
    ("bulk removal refused", &[("status", Integer), ("error", Text)]),
    ("shutting down", &[("in_flight_rules", Integer), ("deadline_s", Integer)]),
    ("shutdown deadline passed", &[]),
    ("stopped", &[]),
    ("state warning", &[("error", Text)]),
    ("native verdict differs", &[("rule", Text), ("contact_id", Text), ("native", Text), ("rhai", Text)]),
    ("notify failed", &[("error", Text)]),
    ("rule print", &[("text", Text)]),
    ("segsync failed", &[("error", Text)]),
    ("sandbox ready", &[("base_url", Text), ("contacts", Integer), ("plan", Text), ("generate_ms", Integer)]),
    ("sandbox stopped", &[]),
];

/// The fields `event` declares, if it is in the schema.
pub fn fields_of(event: &str) -> Option<&'static [(&'static str, Kind)]> {
    SCHEMA.iter().find(|(name, _)| *name == event).map(|(_, fields)| *fields)
}

/// Installs the global subscriber, writing to stderr (or to the journal when stderr is it).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    if format == LogFormat::Auto
        && stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        // Fields under their own names (RULE=vip), not the crate's default `F_` prefix, so that
        // `journalctl RULE=vip` works; levels become journald priorities.
        let journald = journald.with_syslog_identifier("segsync".into()).with_field_prefix(None);
        let _ = tracing_subscriber::registry().with(filter).with(journald).try_init();
        return;
    }
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !terminal,
    };
    let layer = tracing_subscriber::fmt::layer().with_writer(|| Scrubbed).with_ansi(terminal && !json);
    let _ = if json {
        tracing_subscriber::registry().with(filter).with(layer.event_format(JsonLines).boxed()).try_init()
    } else {
        tracing_subscriber::registry().with(filter).with(layer.with_target(false).boxed()).try_init()
    };
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM=dev:inode` of it.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
    journal_stream_matches(&stream.to_string_lossy(), meta.dev(), meta.ino())
}

/// `JOURNAL_STREAM` ("dev:inode") names the file `dev`/`ino` identify.
pub fn journal_stream_matches(stream: &str, dev: u64, ino: u64) -> bool {
    stream.split_once(':').is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
}

/// stderr, with every secret the process has read replaced by `***` (the formatter writes one
/// whole event per call, so a secret is never split across two writes).
struct Scrubbed;

impl Write for Scrubbed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(crate::gateway::scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One JSON object per event: `timestamp`, `level`, `message`, then the event's declared fields
/// (`null` when not recorded), then any other field it recorded.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut fields = fields.0;
        let message = match fields.remove("message") {
            Some(Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        let mut out = Map::new();
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        out.insert("timestamp".into(), Value::String(now));
        out.insert("level".into(), Value::String(event.metadata().level().to_string()));
        out.insert("message".into(), Value::String(message.clone()));
        if let Some(declared) = fields_of(&message) {
            for (name, kind) in declared {
                let value = match fields.remove(*name) {
                    Some(Value::String(text)) if *kind == Object => {
                        serde_json::from_str(&text).unwrap_or(Value::String(text))
                    }
                    Some(value) => value,
                    None => Value::Null,
                };
                out.insert((*name).into(), value);
            }
        }
        out.extend(fields);
        writeln!(writer, "{}", Value::Object(out))
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::String(value.into()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::Bool(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // JOURNAL_STREAM is "device:inode" of stderr; anything else is not the journal.
    #[test]
    fn journal_stream_is_matched_exactly() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 12346));
        assert!(!journal_stream_matches("garbage", 8, 12345));
    }

    // Event names are unique and every field is named once.
    #[test]
    fn schema_is_well_formed() {
        let mut names: Vec<&str> = SCHEMA.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SCHEMA.len());
        for (event, fields) in SCHEMA {
            let mut f: Vec<&str> = fields.iter().map(|(n, _)| *n).collect();
            f.sort_unstable();
            f.dedup();
            assert_eq!(f.len(), fields.len(), "{event}");
        }
    }
}
