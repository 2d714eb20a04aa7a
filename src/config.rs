//! `config.toml` → a validated [`Config`]: every error of the file at once, each with its line,
//! key and value. Unknown keys are errors. The API key is never in this file: it comes from an
//! environment variable or a file (a systemd credential), read by [`Config::credentials`].
//!
//! The only module that reads the environment or the config file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono_tz::Tz;
use reqwest::Url;
use toml::Value;

use crate::diagnostic::Diagnostic;
use crate::gateway::{ClientSettings, Credentials, GatewayConfig, Pagination, Secret};
use crate::gateway::{RateLimits, RatePlan};
use crate::logging::LogFormat;
use crate::reconcile::Guards;
use crate::schedule::Schedule;
use segsync_sandbox::SandboxConfig;

/// The bundled sandbox, instead of a real gateway URL.
pub const SANDBOX: &str = "sandbox";

/// Where the API lives and how to reach it.
#[derive(Debug, Clone)]
pub enum Server {
    /// The bundled sandbox, started in-process with demo data.
    Sandbox,
    Remote {
        base_url: Url,
        key: KeySource,
        basic_user: Option<String>,
    },
}

/// Where the secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/<name>` (from `LoadCredential=`).
    Credential(String),
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub server: Server,
    pub plan: RatePlan,
    pub client: ClientSettings,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from; relative paths in it are relative to its folder.
    pub path: PathBuf,
    pub api: ApiConfig,
    pub rules_dir: PathBuf,
    pub default_schedule: Schedule,
    pub time_zone: Tz,
    pub state_path: PathBuf,
    /// A list's cached members are read again after this long, however well the counts agree.
    pub verify_members_every: Duration,
    /// Membership history older than this is pruned.
    pub history_retention: Duration,
    /// Whether a removal's history entry keeps the values of the fields that made the rule say
    /// no (`false` is the data-minimal setting: movements and reasons without values).
    pub history_facts: bool,
    /// The removal grace of rules without their own `REMOVE_AFTER`.
    pub default_remove_after: Option<Duration>,
    /// The most lists a rule with `fn list` may fill, unless its `MAX_LISTS` says otherwise.
    pub max_lists_per_rule: u64,
    /// `[rules] native`: judge recognised `matches` shapes natively (false: every rule on Rhai).
    pub native_eval: bool,
    pub guards: Guards,
    pub shutdown_timeout: Duration,
    pub watch_rules: bool,
    pub log_format: LogFormat,
    pub sandbox: SandboxConfig,
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the Prometheus endpoint and the health check of `segsync run` (off by default).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Where `/metrics` and `/healthz` are served; `None` when off.
    pub listen: Option<std::net::SocketAddr>,
    /// A rule is overdue when its last success is older than this many schedule intervals.
    pub overdue_factor: f64,
}

/// Why the API key could not be read. Names where it was looked for, never what it is.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the environment variable {var} (api.key_env) is not set")]
    EnvUnset { var: String },
    #[error(
        "api.key_credential = {name:?} needs $CREDENTIALS_DIRECTORY, which systemd sets for LoadCredential= \
         (run it from the unit, or set the variable to a folder holding a file named {name:?})"
    )]
    NoCredentialsDirectory { name: String },
    #[error("cannot read the key from {source_name}: {cause}")]
    Unreadable { source_name: String, cause: std::io::Error },
    #[error("the key from {source_name} is empty")]
    Empty { source_name: String },
}

/// Every problem found in one read of the file.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<Diagnostic>);

/// config.toml as written: the one declaration of its sections and keys. Serde reports every key
/// not declared here (`serde_ignored`), so the accepted keys and the read keys cannot drift apart.
/// Every value is read as a TOML value and checked by [`Reader`], so one wrong value never hides
/// the others: every problem is reported at once.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawConfig {
    api: RawApi,
    rules: RawRules,
    state: RawState,
    guards: RawGuards,
    daemon: RawDaemon,
    log: RawLog,
    sandbox: RawSandbox,
    metrics: RawMetrics,
}

/// A key as written: absent, or any TOML value (its type is checked by [`Reader`]).
type Raw = Option<Value>;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawApi {
    base_url: Raw,
    key_env: Raw,
    key_file: Raw,
    key_credential: Raw,
    basic_user: Raw,
    plan: Raw,
    requests_per_minute: Raw,
    requests_per_second: Raw,
    page_size: Raw,
    timeout_secs: Raw,
    max_retries: Raw,
    concurrency: Raw,
    pagination: Raw,
    max_response_bytes: Raw,
    max_retry_after_secs: Raw,
    budget_share: Raw,
}

/// The folder of the packaged config and key.
pub const PACKAGED_DIR: &str = "/etc/segsync";

/// `[rules] max_lists_per_rule` when unset.
pub const DEFAULT_MAX_LISTS: u64 = 50;

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawRules {
    dir: Raw,
    default_schedule: Raw,
    time_zone: Raw,
    default_remove_after: Raw,
    max_lists_per_rule: Raw,
    native: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawState {
    path: Raw,
    verify_members_every: Raw,
    history_retention: Raw,
    history_facts: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawGuards {
    max_removal_share: Raw,
    max_removals: Raw,
    max_error_share: Raw,
    mass_removal_floor: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawDaemon {
    shutdown_timeout_secs: Raw,
    watch_rules: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawLog {
    format: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawMetrics {
    listen: Raw,
    overdue_factor: Raw,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RawSandbox {
    contacts: Raw,
    seed: Raw,
    churn_per_minute: Raw,
}

/// Every key config.toml accepts, as `section.key`, from the declaration above (for the README's
/// table and its test).
pub fn accepted_keys() -> Vec<String> {
    sections().iter().flat_map(|(section, fields)| fields.iter().map(move |f| format!("{section}.{f}"))).collect()
}

/// Every section config.toml accepts, with its keys, from the declaration above.
fn sections() -> [(&'static str, &'static [&'static str]); 8] {
    [
        ("api", field_names::<RawApi>()),
        ("rules", field_names::<RawRules>()),
        ("state", field_names::<RawState>()),
        ("guards", field_names::<RawGuards>()),
        ("daemon", field_names::<RawDaemon>()),
        ("log", field_names::<RawLog>()),
        ("sandbox", field_names::<RawSandbox>()),
        ("metrics", field_names::<RawMetrics>()),
    ]
}

/// The field names serde would accept for `T`, asked of its `Deserialize` impl itself.
fn field_names<'de, T: serde::Deserialize<'de>>() -> &'static [&'static str] {
    struct Names(&'static [&'static str]);
    #[derive(Debug)]
    struct Done(&'static [&'static str]);
    impl std::fmt::Display for Done {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names collected")
        }
    }
    impl std::error::Error for Done {}
    impl serde::de::Error for Done {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Done(&[])
        }
    }
    impl<'de> serde::Deserializer<'de> for Names {
        type Error = Done;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Done> {
            Err(Done(self.0))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Done> {
            Err(Done(fields))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    match T::deserialize(Names(&[])) {
        Err(Done(fields)) => fields,
        Ok(_) => &[],
    }
}

/// Checks values and collects every problem, each at its key's position.
struct Reader<'a> {
    file: &'a Path,
    spans: HashMap<String, (usize, usize)>,
    errors: Vec<Diagnostic>,
}

impl Reader<'_> {
    fn error(&mut self, key: &str, message: String) {
        let (line, col) = self.spans.get(key).copied().unwrap_or((1, 1));
        self.errors.push(Diagnostic { rule: None, file: self.file.into(), line, col, message });
    }

    fn string(&mut self, value: &Raw, key: &str) -> Option<String> {
        match value.as_ref()? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(key, format!("{key} must be a string, got {} {other}", other.type_str()));
                None
            }
        }
    }

    fn integer(&mut self, value: &Raw, key: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
        match value.as_ref()? {
            Value::Integer(i) if range.contains(i) => Some(*i),
            Value::Integer(i) => {
                self.error(key, format!("{key} must be between {} and {}, got {i}", range.start(), range.end()));
                None
            }
            other => {
                self.error(key, format!("{key} must be an integer, got {} {other}", other.type_str()));
                None
            }
        }
    }

    fn share(&mut self, value: &Raw, key: &str) -> Option<f64> {
        let v = match value.as_ref()? {
            Value::Float(f) => *f,
            Value::Integer(i) => *i as f64,
            other => {
                self.error(key, format!("{key} must be a number between 0 and 1, got {} {other}", other.type_str()));
                return None;
            }
        };
        if (0.0..=1.0).contains(&v) {
            Some(v)
        } else {
            self.error(key, format!("{key} must be between 0 and 1 (a share, 0.2 = 20 %), got {v}"));
            None
        }
    }

    fn boolean(&mut self, value: &Raw, key: &str) -> Option<bool> {
        match value.as_ref()? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.error(key, format!("{key} must be true or false, got {} {other}", other.type_str()));
                None
            }
        }
    }

    /// A duration written as people write one (`"24h"`, `"7d"`), at least `min`.
    fn duration(&mut self, value: &Raw, key: &str, min: Duration) -> Option<Duration> {
        let text = self.string(value, key)?;
        match crate::duration::parse(&text) {
            Ok(d) if d >= min => Some(d),
            Ok(_) => {
                self.error(key, format!("{key} must be at least {}s, got {text:?}", min.as_secs()));
                None
            }
            Err(e) => {
                self.error(key, format!("{key}: {e}"));
                None
            }
        }
    }

    /// A string whose value must be one of `choices`.
    fn choice<T: Copy>(&mut self, value: &Raw, key: &str, choices: &[(&str, T)]) -> Option<T> {
        let s = self.string(value, key)?;
        match choices.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<&str> = choices.iter().map(|c| c.0).collect();
                self.error(key, format!("{key} must be one of {}, got {s:?}", names.join(", ")));
                None
            }
        }
    }

    /// Every key the declaration does not know, with the keys its section does.
    fn unknown(&mut self, keys: Vec<String>) {
        for key in keys {
            let message = match key.split_once('.') {
                Some((section, name)) => {
                    let known: Vec<String> = accepted_keys()
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(&format!("{section}.")).map(str::to_owned))
                        .collect();
                    format!("unknown key `{name}` in [{section}] (known keys: {})", known.join(", "))
                }
                None => format!(
                    "unknown section or key `{key}` (known: {})",
                    sections().map(|(s, _)| format!("[{s}]")).join(", ")
                ),
            };
            self.error(&key, message);
        }
    }

    /// `[api]`'s server: the sandbox, or a base URL with exactly one source for its key.
    fn server(&mut self, raw: &RawApi, base: &Path) -> Option<Server> {
        let relative = |p: String| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { base.join(p) };

        let base_url = self.string(&raw.base_url, "api.base_url").unwrap_or_else(|| SANDBOX.into());
        let key_env = self.string(&raw.key_env, "api.key_env");
        let key_file = self.string(&raw.key_file, "api.key_file");
        let key_credential = self.string(&raw.key_credential, "api.key_credential");
        let basic_user = self.string(&raw.basic_user, "api.basic_user");
        if base_url == SANDBOX {
            Some(Server::Sandbox)
        } else {
            let url = match Url::parse(&base_url) {
                Ok(u) if matches!(u.scheme(), "https" | "http") && u.has_host() => Some(u),
                Ok(_) => {
                    self.error(
                        "api.base_url",
                        format!("api.base_url must be an http(s) URL or \"sandbox\", got {base_url:?}"),
                    );
                    None
                }
                Err(e) => {
                    self.error("api.base_url", format!("api.base_url {base_url:?} is not a URL: {e}"));
                    None
                }
            };
            let key = match (key_env, key_file, key_credential) {
                (Some(env), None, None) => Some(KeySource::Env(env)),
                (None, Some(file), None) => Some(KeySource::File(relative(file))),
                (None, None, Some(name)) => Some(KeySource::Credential(name)),
                (None, None, None) => {
                    self.error(
                        "api.base_url",
                        "a real gateway needs a key: set api.key_env (an environment variable), api.key_file (a file) \
                         or api.key_credential (a systemd credential)"
                            .into(),
                    );
                    None
                }
                _ => {
                    self.error("api.key_env", "set only one of api.key_env, api.key_file, api.key_credential".into());
                    None
                }
            };
            match (url, key) {
                (Some(base_url), Some(key)) => Some(Server::Remote { base_url, key, basic_user }),
                _ => None,
            }
        }
    }

    /// `[api]`: the server, its key, the rate plan and the client's settings.
    fn api(&mut self, raw: &RawApi, base: &Path) -> ApiConfig {
        let server = self.server(raw, base);
        let plans = [
            ("production", Some(RatePlan::Production)),
            ("trial", Some(RatePlan::Trial)),
            ("unlimited", Some(RatePlan::Unlimited)),
            ("custom", None),
        ];
        let plan = self.choice(&raw.plan, "api.plan", &plans).unwrap_or(Some(RatePlan::Production));
        let per_minute = self.integer(&raw.requests_per_minute, "api.requests_per_minute", 1..=1_000_000);
        let per_second = self.integer(&raw.requests_per_second, "api.requests_per_second", 1..=100_000);
        let limits = match (plan, per_minute, per_second) {
            (None, Some(m), Some(s)) => Some(RateLimits { per_minute: m as u32, per_second: s as u32 }),
            (None, _, _) => {
                self.error(
                    "api.plan",
                    "plan = \"custom\" needs api.requests_per_minute and api.requests_per_second".into(),
                );
                None
            }
            (Some(p), None, None) => p.limits(),
            (Some(_), _, _) => {
                self.error(
                    "api.requests_per_minute",
                    "requests_per_minute / requests_per_second apply only with plan = \"custom\"".into(),
                );
                None
            }
        };
        let defaults = ClientSettings::default();
        let client = ClientSettings {
            limits,
            page_size: self.integer(&raw.page_size, "api.page_size", 1..=1000).map_or(defaults.page_size, |n| n as u32),
            timeout: self
                .integer(&raw.timeout_secs, "api.timeout_secs", 1..=600)
                .map_or(defaults.timeout, |n| Duration::from_secs(n as u64)),
            max_retries: self
                .integer(&raw.max_retries, "api.max_retries", 0..=20)
                .map_or(defaults.max_retries, |n| n as u32),
            concurrency: self
                .integer(&raw.concurrency, "api.concurrency", 1..=32)
                .map_or(defaults.concurrency, |n| n as usize),
            pagination: self
                .choice(
                    &raw.pagination,
                    "api.pagination",
                    &[("auto", None), ("offset", Some(Pagination::Offset)), ("page", Some(Pagination::Page))],
                )
                .unwrap_or(defaults.pagination),
            max_response_bytes: self
                .integer(&raw.max_response_bytes, "api.max_response_bytes", 65_536..=1_073_741_824)
                .map_or(defaults.max_response_bytes, |n| n as u64),
            max_retry_after: self
                .integer(&raw.max_retry_after_secs, "api.max_retry_after_secs", 1..=86_400)
                .map_or(defaults.max_retry_after, |n| Duration::from_secs(n as u64)),
            budget_share: match self.share(&raw.budget_share, "api.budget_share") {
                Some(share) if share > 0.0 => share,
                Some(_) => {
                    self.error("api.budget_share", "api.budget_share must be above 0 (a share, 0.8 = 80 %)".into());
                    defaults.budget_share
                }
                None => defaults.budget_share,
            },
        };
        ApiConfig { plan: plan.unwrap_or(RatePlan::Production), client, server: server.unwrap_or(Server::Sandbox) }
    }

    /// `[rules]`: the folder, the default schedule, the time zone and the default removal grace.
    fn rules(&mut self, raw: &RawRules, base: &Path) -> (PathBuf, Schedule, Tz, Option<Duration>) {
        let relative = |p: String| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        let rules_dir = relative(self.string(&raw.dir, "rules.dir").unwrap_or_else(|| "rules".into()));
        let schedule_text =
            self.string(&raw.default_schedule, "rules.default_schedule").unwrap_or_else(|| "0 */15 * * * *".into());
        let default_schedule = Schedule::parse(&schedule_text).unwrap_or_else(|e| {
            self.error("rules.default_schedule", format!("rules.default_schedule: {e}"));
            Schedule::parse("0 */15 * * * *").unwrap_or_else(|_| unreachable!("a constant, valid expression"))
        });
        let tz_text = self.string(&raw.time_zone, "rules.time_zone").unwrap_or_else(|| "UTC".into());
        let time_zone = tz_text.parse::<Tz>().unwrap_or_else(|_| {
            self.error(
                "rules.time_zone",
                format!("rules.time_zone {tz_text:?} is not an IANA time zone (e.g. \"Europe/Rome\")"),
            );
            Tz::UTC
        });

        let default_remove_after =
            self.duration(&raw.default_remove_after, "rules.default_remove_after", Duration::ZERO);
        (rules_dir, default_schedule, time_zone, default_remove_after)
    }

    /// `[state]`: the database, the cache's verification age and the history's retention and facts.
    fn state(&mut self, raw: &RawState, base: &Path) -> (PathBuf, Duration, Duration, bool) {
        let relative = |p: String| if Path::new(&p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
        let state_path = relative(self.string(&raw.path, "state.path").unwrap_or_else(|| "segsync.db".into()));
        let verify_members_every = self
            .duration(&raw.verify_members_every, "state.verify_members_every", Duration::from_secs(60))
            .unwrap_or(Duration::from_secs(24 * 3600));
        let history_retention = self
            .duration(&raw.history_retention, "state.history_retention", Duration::from_secs(86_400))
            .unwrap_or(Duration::from_secs(180 * 86_400));
        let history_facts = self.boolean(&raw.history_facts, "state.history_facts").unwrap_or(true);
        (state_path, verify_members_every, history_retention, history_facts)
    }

    /// `[guards]`.
    fn guards(&mut self, raw: &RawGuards) -> Guards {
        Guards {
            max_removal_share: self.share(&raw.max_removal_share, "guards.max_removal_share").unwrap_or(0.20),
            max_removals: self.integer(&raw.max_removals, "guards.max_removals", 0..=i64::MAX).map(|n| n as u64),
            max_error_share: self.share(&raw.max_error_share, "guards.max_error_share").unwrap_or(0.01),
            mass_removal_floor: self
                .integer(&raw.mass_removal_floor, "guards.mass_removal_floor", 0..=i64::MAX)
                .unwrap_or(10) as u64,
        }
    }

    /// `[daemon]`: the shutdown deadline and whether the rules folder is watched.
    fn daemon(&mut self, raw: &RawDaemon) -> (Duration, bool) {
        let shutdown_timeout = Duration::from_secs(
            self.integer(&raw.shutdown_timeout_secs, "daemon.shutdown_timeout_secs", 1..=3600).unwrap_or(30) as u64,
        );
        let watch_rules = self.boolean(&raw.watch_rules, "daemon.watch_rules").unwrap_or(true);

        (shutdown_timeout, watch_rules)
    }

    /// `[log]`.
    fn log(&mut self, raw: &RawLog) -> LogFormat {
        self.choice(
            &raw.format,
            "log.format",
            &[("auto", LogFormat::Auto), ("json", LogFormat::Json), ("text", LogFormat::Text)],
        )
        .unwrap_or_default()
    }

    /// `[sandbox]`: the bundled sandbox's demo data, on the configured plan.
    fn sandbox(&mut self, raw: &RawSandbox, plan: RatePlan) -> SandboxConfig {
        let defaults = SandboxConfig::default();
        SandboxConfig {
            contacts: self
                .integer(&raw.contacts, "sandbox.contacts", 0..=5_000_000)
                .map_or(defaults.contacts, |n| n as u64),
            seed: self.integer(&raw.seed, "sandbox.seed", 0..=i64::MAX).map_or(defaults.seed, |n| n as u64),
            churn_per_minute: self
                .integer(&raw.churn_per_minute, "sandbox.churn_per_minute", 0..=1_000_000)
                .map_or(defaults.churn_per_minute, |n| n as u32),
            plan: sandbox_plan(plan),
            ..defaults
        }
    }

    /// `[metrics]`: where to serve, and when a rule is overdue.
    fn metrics(&mut self, raw: &RawMetrics) -> MetricsConfig {
        let listen = self.string(&raw.listen, "metrics.listen").and_then(|text| {
            // A bare port (or ":port") means loopback: metrics are not published by accident.
            let port_only = text.trim_start_matches(':').parse::<u16>().ok();
            match port_only.map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p))).or_else(|| text.parse().ok()) {
                Some(addr) => Some(addr),
                None => {
                    self.error(
                        "metrics.listen",
                        format!("metrics.listen must be \"HOST:PORT\" or a port, got {text:?}"),
                    );
                    None
                }
            }
        });
        let overdue_factor = match raw.overdue_factor.as_ref() {
            None => 3.0,
            Some(Value::Float(f)) if *f >= 1.0 => *f,
            Some(Value::Integer(i)) if *i >= 1 => *i as f64,
            Some(other) => {
                self.error(
                    "metrics.overdue_factor",
                    format!("metrics.overdue_factor must be a number of at least 1, got {other}"),
                );
                3.0
            }
        };
        MetricsConfig { listen, overdue_factor }
    }
}

/// Key path ("api.page_size") → 1-based line and column, from the parser's spans.
fn key_spans(text: &str) -> HashMap<String, (usize, usize)> {
    fn walk(text: &str, prefix: &str, table: &toml::de::DeTable<'_>, out: &mut HashMap<String, (usize, usize)>) {
        for (key, value) in table.iter() {
            let path =
                if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
            out.insert(path.clone(), crate::diagnostic::line_col(text, key.span().start));
            if let toml::de::DeValue::Table(inner) = value.get_ref() {
                walk(text, &path, inner, out);
            }
        }
    }
    let mut out = HashMap::new();
    if let Ok(root) = toml::de::DeTable::parse(text) {
        walk(text, "", root.get_ref(), &mut out);
    }
    out
}

/// The sandbox plays the plan the client paces for (its own copy of the same plans).
fn sandbox_plan(plan: RatePlan) -> segsync_sandbox::RatePlan {
    match plan {
        RatePlan::Production => segsync_sandbox::RatePlan::Production,
        RatePlan::Trial => segsync_sandbox::RatePlan::Trial,
        RatePlan::Unlimited => segsync_sandbox::RatePlan::Unlimited,
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = crate::files::read_text(path).map_err(|e| {
            ConfigErrors(vec![Diagnostic {
                rule: None,
                file: path.into(),
                line: 0,
                col: 0,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigErrors> {
        let at = |e: &toml::de::Error| {
            let (line, col) = e.span().map_or((0, 0), |s| crate::diagnostic::line_col(text, s.start));
            ConfigErrors(vec![Diagnostic {
                rule: None,
                file: path.into(),
                line,
                col,
                message: e.message().trim().to_owned(),
            }])
        };
        let document = toml::Deserializer::parse(text).map_err(|e| at(&e))?;
        let mut unknown = Vec::new();
        let raw: RawConfig =
            serde_ignored::deserialize(document, |key| unknown.push(key.to_string())).map_err(|e| at(&e))?;
        let mut r = Reader { file: path, spans: key_spans(text), errors: Vec::new() };
        r.unknown(unknown);
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let api = r.api(&raw.api, &base);
        let (rules_dir, default_schedule, time_zone, default_remove_after) = r.rules(&raw.rules, &base);
        let max_lists_per_rule = r
            .integer(
                &raw.rules.max_lists_per_rule,
                "rules.max_lists_per_rule",
                1..=crate::rules::MAX_LISTS_CEILING as i64,
            )
            .map_or(DEFAULT_MAX_LISTS, |n| n as u64);
        let native_eval = r.boolean(&raw.rules.native, "rules.native").unwrap_or(true);
        let (state_path, verify_members_every, history_retention, history_facts) = r.state(&raw.state, &base);
        let guards = r.guards(&raw.guards);
        let (shutdown_timeout, watch_rules) = r.daemon(&raw.daemon);
        let log_format = r.log(&raw.log);
        let sandbox = r.sandbox(&raw.sandbox, api.plan);
        let metrics = r.metrics(&raw.metrics);
        if !r.errors.is_empty() {
            let mut errors = r.errors;
            errors.sort_by_key(|e| (e.line, e.col));
            return Err(ConfigErrors(errors));
        }
        Ok(Self {
            path: path.into(),
            api,
            rules_dir,
            default_schedule,
            time_zone,
            state_path,
            verify_members_every,
            history_retention,
            history_facts,
            default_remove_after,
            max_lists_per_rule,
            native_eval,
            guards,
            shutdown_timeout,
            watch_rules,
            log_format,
            sandbox,
            metrics,
        })
    }

    /// Where the key comes from, for messages (never the key).
    pub fn key_source_name(&self) -> String {
        match &self.api.server {
            Server::Sandbox => "the sandbox's demo key".into(),
            Server::Remote { key: KeySource::Env(var), .. } => format!("environment variable {var} (api.key_env)"),
            Server::Remote { key: KeySource::File(path), .. } => format!("file {} (api.key_file)", path.display()),
            Server::Remote { key: KeySource::Credential(name), .. } => {
                format!("systemd credential {name} (api.key_credential)")
            }
        }
    }

    /// Reads the secret from its source. Errors name the source, never the secret.
    pub fn credentials(&self) -> Result<Credentials, KeyError> {
        let Server::Remote { key, basic_user, .. } = &self.api.server else {
            return Ok(Credentials::ApiKey(Secret::new(self.sandbox.api_key.clone())));
        };
        let secret = match key {
            KeySource::Env(var) => std::env::var(var).map_err(|_| KeyError::EnvUnset { var: var.clone() })?,
            KeySource::File(path) => crate::files::read_text(path)
                .map_err(|cause| KeyError::Unreadable { source_name: self.key_source_name(), cause })?,
            KeySource::Credential(name) => {
                let (dir, whence) = self
                    .credential_dir(std::env::var_os("CREDENTIALS_DIRECTORY"), Path::new(PACKAGED_DIR))
                    .ok_or_else(|| KeyError::NoCredentialsDirectory { name: name.clone() })?;
                let path = dir.join(name);
                crate::files::read_text(&path).map_err(|cause| KeyError::Unreadable {
                    source_name: format!("systemd credential {name} ({}, {whence})", path.display()),
                    cause,
                })?
            }
        };
        let secret = secret.trim().to_owned();
        if secret.is_empty() {
            return Err(KeyError::Empty { source_name: self.key_source_name() });
        }
        Ok(match basic_user {
            Some(user) => Credentials::Basic { user: user.clone(), password: Secret::new(secret) },
            None => Credentials::ApiKey(Secret::new(secret)),
        })
    }

    /// Where `key_credential` is read: `$CREDENTIALS_DIRECTORY` (systemd's), or, by hand without
    /// it, the packaged config's own folder, where the package keeps the key (`/etc/segsync/api_key`),
    /// so `plan`/`sync`/`explain` work as root with the packaged config.
    fn credential_dir(
        &self,
        from_systemd: Option<std::ffi::OsString>,
        packaged: &Path,
    ) -> Option<(PathBuf, &'static str)> {
        if let Some(dir) = from_systemd {
            return Some((PathBuf::from(dir), "from $CREDENTIALS_DIRECTORY"));
        }
        let folder = self.path.parent()?;
        (folder == packaged).then(|| {
            (folder.to_path_buf(), "read directly: $CREDENTIALS_DIRECTORY is unset and the config is the packaged one")
        })
    }

    /// The client settings for `base_url` (the sandbox's URL when the server is the sandbox).
    pub fn gateway(&self, base_url: Url, credentials: Credentials) -> GatewayConfig {
        GatewayConfig { base_url, credentials, settings: self.api.client.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        Config::parse(Path::new("config.toml"), text)
            .expect_err("invalid")
            .0
            .into_iter()
            .map(|e| e.to_string())
            .collect()
    }

    // Every problem is reported at once, each with its line, key and value.
    #[test]
    fn every_error_at_once() {
        let got = errors(
            "[api]\nbase_url = \"ftp://x\"\npage_size = 1001\nshoe = 1\n[rules]\ntime_zone = \"Mars/Olympus\"\n[guards]\nmax_removal_share = 20\n[extra]\n",
        );
        assert_eq!(got.len(), 7, "{got:#?}");
        assert!(got[0].starts_with("config.toml:2:1: api.base_url must be an http(s) URL"), "{got:#?}");
        assert!(got[1].contains("needs a key"), "{got:#?}");
        assert!(got[2].starts_with("config.toml:3:1: api.page_size must be between 1 and 1000, got 1001"), "{got:#?}");
        assert!(got[3].starts_with("config.toml:4:1: unknown key `shoe` in [api]"), "{got:#?}");
        assert!(got[4].contains("Mars/Olympus"), "{got:#?}");
        assert!(got[5].contains("max_removal_share must be between 0 and 1"), "{got:#?}");
        assert!(got[6].starts_with("config.toml:9:2: unknown section or key `extra`"), "{got:#?}");
    }

    // key_credential is read from $CREDENTIALS_DIRECTORY, or by hand from the packaged config's own
    // folder (as root with /etc/segsync/config.toml); any other config without it has none.
    #[test]
    fn a_credential_outside_systemd_is_read_beside_the_packaged_config() {
        let text = "[api]\nbase_url = \"https://lora-api.agiletelecom.com/api\"\nkey_credential = \"api_key\"\n";
        let packaged = Config::parse(Path::new("/etc/segsync/config.toml"), text).expect("valid");
        let systemd = packaged.credential_dir(Some("/run/credentials/segsync.service".into()), Path::new(PACKAGED_DIR));
        assert_eq!(systemd.map(|(d, _)| d), Some(PathBuf::from("/run/credentials/segsync.service")));
        let by_hand = packaged.credential_dir(None, Path::new(PACKAGED_DIR)).expect("the packaged folder");
        assert_eq!(by_hand.0, PathBuf::from("/etc/segsync"));
        assert!(by_hand.1.contains("the config is the packaged one"), "{}", by_hand.1);
        let elsewhere = Config::parse(Path::new("/home/ops/segsync/config.toml"), text).expect("valid");
        assert!(elsewhere.credential_dir(None, Path::new(PACKAGED_DIR)).is_none(), "only the packaged config");
    }

    // A real gateway needs a key source; the sandbox does not.
    #[test]
    fn remote_needs_a_key() {
        let got = errors("[api]\nbase_url = \"https://lora-api.agiletelecom.com/api\"\n");
        assert!(got[0].contains("needs a key"), "{got:?}");
        let config = Config::parse(
            Path::new("/etc/segsync/config.toml"),
            "[api]\nbase_url = \"https://lora-api.agiletelecom.com/api\"\nkey_file = \"key\"\n",
        )
        .expect("valid");
        match config.api.server {
            Server::Remote { key: KeySource::File(p), .. } => assert_eq!(p, Path::new("/etc/segsync/key")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(Config::parse(Path::new("c.toml"), "").expect("empty is valid").api.server, Server::Sandbox));
    }

    // A syntax error is reported with its position.
    #[test]
    fn syntax_error_has_position() {
        let got = errors("[api]\nplan = production\n");
        assert!(got[0].starts_with("config.toml:2:8:"), "{got:?}");
    }
}
