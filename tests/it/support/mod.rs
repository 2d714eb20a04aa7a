//! Shared test fixtures: the real sandbox started in-process on 127.0.0.1:0, and clients for it.
#![allow(dead_code)]

pub mod hostile;

use std::time::Duration;

use segsync::gateway::RatePlan;
use segsync::gateway::{ClientSettings, Credentials, Gateway, GatewayConfig, Secret};
use segsync_sandbox::{Sandbox, SandboxConfig};

pub const KEY: &str = "test-key-5f2a9c";

/// The day demo data is generated relative to, so tests are reproducible.
pub fn today() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(2026, 11, 28).expect("valid date")
}

pub fn sandbox_config(contacts: u64) -> SandboxConfig {
    SandboxConfig { contacts, api_key: KEY.into(), today: Some(today()), ..SandboxConfig::default() }
}

pub async fn start(config: SandboxConfig) -> Sandbox {
    start_at(config, "127.0.0.1:0".parse().expect("addr")).await
}

/// A sandbox on a given address (another account behind the same URL).
pub async fn start_at(config: SandboxConfig, addr: std::net::SocketAddr) -> Sandbox {
    Sandbox::start(config, addr).await.expect("sandbox starts")
}

pub fn gateway_config(sandbox: &Sandbox, plan: RatePlan) -> GatewayConfig {
    GatewayConfig {
        base_url: sandbox.base_url().parse().expect("url"),
        credentials: Credentials::ApiKey(Secret::new(sandbox.api_key())),
        settings: ClientSettings {
            limits: plan.limits(),
            timeout: Duration::from_secs(10),
            max_retries: 8,
            ..ClientSettings::default()
        },
    }
}

pub fn gateway(sandbox: &Sandbox, plan: RatePlan) -> Gateway {
    Gateway::new(gateway_config(sandbox, plan)).expect("client builds")
}

/// A raw HTTP client for sending requests exactly as the seed writes them.
pub fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// The environment variable the tests' configs read the key from.
pub const KEY_VAR: &str = "SEGSYNC_TEST_API_KEY";

/// Copies the shipped active rules (`rules/*.rhai`, not `rules/examples/`) into `dir/rules` (with
/// their tests when `with_tests`), each file through `edit`.
pub fn copy_shipped_rules(dir: &std::path::Path, with_tests: bool, edit: impl Fn(String) -> String) {
    std::fs::create_dir_all(dir.join("rules")).expect("mkdir rules");
    for entry in std::fs::read_dir("rules").expect("shipped rules") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            continue;
        }
        let is_rule = path.extension().is_some_and(|x| x == "rhai");
        if !with_tests && !is_rule {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a shipped rule");
        std::fs::write(dir.join("rules").join(path.file_name().expect("name")), edit(text)).expect("write");
    }
}

/// A contact's recorded spend, if it has one.
pub fn spent(c: &segsync_sandbox::store::Contact) -> Option<f64> {
    c.custom_fields.get("totalSpent").and_then(serde_json::Value::as_f64)
}

/// The ids of the sandbox's contacts that `pred` selects, sorted.
pub fn ids_where(sandbox: &Sandbox, pred: impl Fn(&segsync_sandbox::store::Contact) -> bool) -> Vec<String> {
    sandbox.with_store(|s| {
        let mut ids: Vec<String> =
            s.contact_ids().filter(|id| s.get(id).is_some_and(&pred)).map(str::to_owned).collect();
        ids.sort();
        ids
    })
}

/// Asserts that every JSON log line is an event of the documented schema (`logging::SCHEMA`,
/// which README's event table is tested against) with only its declared fields, and that every
/// declared field is present (absent values are `null`).
pub fn assert_log_schema<'a>(lines: impl IntoIterator<Item = &'a serde_json::Value>) {
    for line in lines {
        let message = line["message"].as_str().unwrap_or_else(|| panic!("no message: {line}"));
        let level = line["level"].as_str().unwrap_or_default();
        if level == "DEBUG" || level == "TRACE" {
            continue;
        }
        let fields =
            segsync::logging::fields_of(message).unwrap_or_else(|| panic!("undocumented event {message:?}: {line}"));
        let object = line.as_object().expect("an object");
        for key in object.keys().filter(|k| !["timestamp", "level", "message"].contains(&k.as_str())) {
            assert!(fields.iter().any(|(f, _)| f == key), "undocumented field {key:?} of {message:?}: {line}");
        }
        for (field, _) in fields {
            assert!(object.contains_key(*field), "{message:?} lacks {field:?} (absent values are null): {line}");
        }
    }
}

/// A partitioned rule with two lists, `Geo - Lombardia` and `Geo - Veneto`.
pub const GEO_TWO_LISTS: &str =
    "fn list(c) {\n    if c.region in [\"Lombardia\", \"Veneto\"] { \"Geo - \" + c.region }\n}\n";

/// A folder holding `rules/NAME.rhai` for each of `rules`.
pub fn rule_files(rules: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("rules")).expect("rules");
    for (name, text) in rules {
        std::fs::write(dir.path().join(format!("rules/{name}.rhai")), text).expect("rule");
    }
    dir
}

/// A config folder for `base_url` (pages of 100, the unlimited plan) with `rules` written into its
/// rules folder and `extra` appended to its config.
pub fn rules_folder(base_url: &str, rules: &[(&str, &str)], extra: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = rule_files(rules);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nbase_url = \"{base_url}\"\nkey_env = \"{KEY_VAR}\"\nplan = \"unlimited\"\npage_size = 100\n\
             [rules]\ntime_zone = \"Europe/Rome\"\n{extra}"
        ),
    )
    .expect("config");
    (dir, config)
}

/// Runs `segsync ARGS --config CONFIG` off the async runtime: its exit code and all it printed.
pub async fn segsync(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.args(args)
        .arg("--config")
        .arg(config)
        .env(KEY_VAR, KEY)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("join");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}
