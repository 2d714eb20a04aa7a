//! People's slips in rules (issue 21), run as users run them against a real sandbox: a call of a
//! function that does not exist, a field one letter off, a FILTER value no contact holds, and the
//! live preview `check --sample`. Each is loud, at file:line, with the likely fix.
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::support::{self, KEY_VAR};

fn segsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.env(KEY_VAR, support::KEY).env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// Runs `cmd` off the async runtime: (exit code, stdout, stderr).
async fn run(mut cmd: Command) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("join");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// A config for `base_url` with pages of 100 (the sandbox's largest, so no probe request) and
/// `rules` written into its rules folder.
fn setup(base_url: &str, rules: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("rules")).expect("rules");
    for (name, text) in rules {
        std::fs::write(dir.path().join("rules").join(format!("{name}.rhai")), text).expect("rule");
    }
    let config = dir.path().join("config.toml");
    let text = format!(
        "[api]\nbase_url = \"{base_url}\"\nkey_env = \"{KEY_VAR}\"\nplan = \"unlimited\"\npage_size = 100\n\
         [rules]\ntime_zone = \"Europe/Rome\"\n[log]\nformat = \"json\"\n"
    );
    std::fs::write(&config, text).expect("config");
    (dir, config)
}

/// 2,000 demo contacts that do not change while a test counts them.
fn quiet_sandbox() -> segsync_sandbox::SandboxConfig {
    segsync_sandbox::SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(2_000) }
}

fn with_config(args: &[&str], config: &PathBuf) -> Command {
    let mut cmd = segsync();
    cmd.args(args).arg("--config").arg(config);
    cmd
}

const VIP_TYPO: &str =
    "const LIST = \"VIP\";\nfn matches(contact) {\n    (contact.customFields.get(\"totalSpend\") ?? 0.0) > 5000.0\n}\n";
const ER_TYPO: &str =
    "const LIST = \"Geo - ER\";\nconst FILTER = #{ region: \"Emilia Romagna\" };\nfn matches(contact) { true }\n";

/// The `rule run` event of `rule` among the JSON log lines of `stderr`.
fn rule_run(stderr: &str, rule: &str) -> serde_json::Value {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["message"] == "rule run" && e["rule"] == rule)
        .unwrap_or_else(|| panic!("no rule run for {rule}: {stderr}"))
}

// A call of a function that exists nowhere fails `check` at its file:line with the closest name;
// the other rules still load (the daemon runs them), and `--strict` fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_no_function_is_an_error_at_its_line() {
    let rules = [
        ("in-vip", "const LIST = \"In VIP\";\nfn matches(contact) {\n    in_segment(\"vip\", contact)\n}\n"),
        ("ends", "const LIST = \"Ends\";\nfn matches(contact) {\n    contact.email.endswith(\"@example.it\")\n}\n"),
        ("fine", "const LIST = \"Fine\";\nfn matches(contact) { contact.email.ends_with(\"@example.it\") }\n"),
    ];
    let (dir, config) = setup("sandbox", &rules);
    let (code, out, _) = run(with_config(&["check"], &config)).await;
    assert_eq!(code, 0, "broken rules are warnings without --strict: {out}");
    let in_vip = dir.path().join("rules/in-vip.rhai").display().to_string();
    assert!(out.contains(&format!("warning: {in_vip}:3:5: in_segment() is not a function")), "{out}");
    assert!(out.contains("ends.rhai:3:19: no type has a method endswith(); did you mean ends_with()?"), "{out}");
    assert!(out.contains("1 rule(s) (fine)"), "{out}");
    let (code, _, _) = run(with_config(&["check", "--strict"], &config)).await;
    assert_eq!(code, 3);
}

// A field one letter off and a FILTER value no contact holds select nobody without an error. On a
// shared scan both are warnings in `plan` (file:line and figures, with what was meant) and a WARN
// `rule run` in `sync`, at no extra request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absent_field_and_an_unmatched_filter_value_are_warnings() {
    let sandbox = support::start(quiet_sandbox()).await;
    let (dir, config) = setup(&sandbox.base_url(), &[("vip", VIP_TYPO), ("er", ER_TYPO)]);
    let (code, out, _) = run(with_config(&["plan"], &config)).await;
    assert_eq!(code, 0, "{out}");
    let vip = dir.path().join("rules/vip.rhai").display().to_string();
    assert!(
        out.contains(&format!("warning: {vip}:3:27: totalSpend is absent on all 2,000 contacts; seen: totalSpent")),
        "{out}"
    );
    let er_region = support::ids_where(&sandbox, |c| c.region.as_deref() == Some("Emilia-Romagna")).len();
    assert!(er_region > 0);
    assert!(
        out.contains(&format!(
            "er.rhai:2:1: FILTER region = \"Emilia Romagna\" matched none of 2,000 contacts read; did you mean \
             \"Emilia-Romagna\" ({er_region})?"
        )),
        "{out}"
    );
    // One shared scan of 2,000 contacts in pages of 100, nothing more.
    assert_eq!(sandbox.stats().count("GET /contacts"), 21, "{out}");

    let (code, _, log) = run(with_config(&["sync"], &config)).await;
    assert_eq!(code, 0, "{log}");
    let vip_run = rule_run(&log, "vip");
    assert_eq!(vip_run["level"], "WARN", "{vip_run}");
    assert_eq!(vip_run["absent_fields"], "totalSpend", "{vip_run}");
    assert_eq!(vip_run["outcome"], "ok", "{vip_run}");
    let er_run = rule_run(&log, "er");
    assert_eq!(er_run["level"], "WARN", "{er_run}");
    assert_eq!(er_run["filter_matched_none"], "region = \"Emilia Romagna\"", "{er_run}");
    sandbox.shutdown().await;
}

// A rule reading its own candidates asks the server with its FILTER, which answers only "no one":
// one unfiltered page (one request) then says what the field holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_read_explains_an_empty_filter_with_one_page() {
    let sandbox = support::start(quiet_sandbox()).await;
    let (_dir, config) = setup(&sandbox.base_url(), &[("er", ER_TYPO)]);
    let (code, out, _) = run(with_config(&["plan", "er"], &config)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("FILTER region = \"Emilia Romagna\" matched none of 100 contacts read"), "{out}");
    assert!(out.contains("most common: "), "{out}");
    // The filtered read (one empty page) and the one unfiltered page.
    assert_eq!(sandbox.stats().count("GET /contacts"), 2, "{out}");

    // A FILTER that matches costs no extra page.
    let (_dir, config) = setup(&sandbox.base_url(), &[("er", &ER_TYPO.replace("Emilia Romagna", "Emilia-Romagna"))]);
    let before = sandbox.stats().count("GET /contacts");
    let (code, out, _) = run(with_config(&["plan", "er"], &config)).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    let pages =
        (support::ids_where(&sandbox, |c| c.region.as_deref() == Some("Emilia-Romagna")).len() / 100 + 1) as u64;
    assert_eq!(sandbox.stats().count("GET /contacts") - before, pages, "{out}");
    sandbox.shutdown().await;
}

// `check --sample N` reads about N contacts, runs every rule on them, reports matches, absent
// fields, unmatched FILTER values and evaluation errors, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_sample_previews_every_rule_and_writes_nothing() {
    let sandbox = support::start(quiet_sandbox()).await;
    // Fails on the big spenders: a city is not a number.
    let strict = "const LIST = \"Strict\";\nfn matches(contact) {\n    contact.customFields.totalSpent > 4000.0 \
                  && parse_int(contact.city) > 0\n}\n";
    let everyone = "const LIST = \"Everyone\";\nfn matches(contact) { true }\n";
    let (dir, config) =
        setup(&sandbox.base_url(), &[("vip", VIP_TYPO), ("er", ER_TYPO), ("strict", strict), ("everyone", everyone)]);
    let (code, out, _) = run(with_config(&["check", "--sample", "300"], &config)).await;
    assert_eq!(code, 0, "findings are warnings: {out}");
    assert!(out.contains("sample: 300 contact(s) read in 3 API request(s); nothing written"), "{out}");
    assert!(out.contains("everyone → \"Everyone\": matched 300 (100.0 %), eval errors 0"), "{out}");
    assert!(out.contains("vip.rhai:3:27: sample: totalSpend is absent on all 300 contacts; seen: totalSpent"), "{out}");
    assert!(out.contains("er.rhai:2:1: sample: FILTER region = \"Emilia Romagna\" matched none of 300"), "{out}");
    // `strict` fails on every big spender read: the count and the first one.
    let failing = sandbox.with_store(|s| {
        let first: Vec<&str> = s.contact_ids().take(300).collect();
        first.iter().filter(|id| s.get(id).and_then(support::spent).is_some_and(|v| v > 4000.0)).count()
    });
    assert!(failing > 0, "the demo data has big spenders");
    assert!(
        out.contains(&format!("strict.rhai: sample: errored on {failing} of 300 contacts; first: contact ")),
        "{out}"
    );
    assert!(out.contains(&format!("strict → \"Strict\": matched 0 (0.0 %), eval errors {failing}")), "{out}");
    assert_eq!(sandbox.stats().count("GET /contacts"), 3);
    assert_eq!(sandbox.stats().total, 3, "nothing but the three pages read");
    assert!(!dir.path().join("segsync.db").exists(), "no state written");

    let (code, out, _) = run(with_config(&["check", "--sample", "300", "--strict"], &config)).await;
    assert_eq!(code, 3, "--strict fails on the findings: {out}");
    let out = with_config(&["check", "--sample", "300", "--json"], &config).output().expect("runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(doc["sample"]["contacts"], 300);
    let vip = doc["sample"]["rules"].as_array().expect("rules").iter().find(|r| r["rule"] == "vip").expect("vip");
    assert_eq!(vip["warnings"][0]["kind"], "absent_field", "{vip}");
    assert_eq!(vip["warnings"][0]["subject"], "totalSpend", "{vip}");
    sandbox.shutdown().await;
}
