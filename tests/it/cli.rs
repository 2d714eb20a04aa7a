//! The `segsync` binary as users run it: `check`, `test`, `sync` exit codes, crash safety of a
//! killed sync, the instance lock, and the shipped config and rules.
use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use segsync_sandbox::{Faults, Sandbox, SandboxConfig};

use crate::support::KEY_VAR;

fn segsync() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.env(KEY_VAR, support::KEY).env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// A config folder with the shipped rules, pointing at `base_url` (or the bundled sandbox).
fn setup(base_url: Option<&str>) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_shipped_rules(dir.path(), true, |text| text);
    let api = match base_url {
        Some(url) => format!("base_url = \"{url}\"\nkey_env = \"{KEY_VAR}\"\nplan = \"unlimited\"\nmax_retries = 2\n"),
        None => "base_url = \"sandbox\"\nplan = \"unlimited\"\n".into(),
    };
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[api]\n{api}\n[rules]\ntime_zone = \"Europe/Rome\"\n[sandbox]\ncontacts = 2000\n"),
    )
    .expect("write");
    (dir, config)
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

// The shipped config.toml and rules load cleanly and their rule tests pass, so they never rot.
#[test]
fn shipped_config_and_rules_check_clean() {
    let config = segsync::config::Config::load(Path::new("config.toml")).expect("shipped config is valid");
    let engine = segsync::rules::engine::build(config.time_zone);
    let (set, errors) = segsync::rules::load_dir(&engine, &config.rules_dir);
    assert!(errors.is_empty(), "{errors:?}");
    let names: Vec<&str> = set.rules.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["geo-emilia-romagna", "geo-lombardia", "geo-veneto", "reengagement-90d", "vip"]);
    for rule in set.iter() {
        let report = segsync::rules::fixtures::run(&engine, rule).expect("fixture parses");
        assert!(report.file.is_some(), "{} has tests", rule.name);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        assert!(report.passed >= 3);
    }
    let (code, out) = run(segsync().args(["check", "--config", "config.toml"]));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: config"), "{out}");
}

// `check` names a broken rule as file:line:col: a warning for the start gate (the daemon runs the
// other rules), exit 3 with --strict; a bad config key fails both; no usable rule at all fails the gate.
#[test]
fn check_reports_broken_rule_and_config() {
    let (dir, config) = setup(None);
    std::fs::write(
        dir.path().join("rules/broken.rhai"),
        "const LIST = \"B\";\nfn matches(c) {\n  c.customFields.totalSpent >\n}\n",
    )
    .expect("write");
    let (code, out) = run(segsync().arg("check").arg("--config").arg(&config));
    assert_eq!(code, 0, "the gate lets the daemon run the good rules: {out}");
    assert!(out.contains("warning: ") && out.contains("broken.rhai:4:1: "), "{out}");
    let (code, out) = run(segsync().args(["check", "--strict"]).arg("--config").arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("broken.rhai:4:1: "), "{out}");
    assert!(out.contains("5 valid rule(s)"), "the others still load: {out}");

    // A rule whose own tests fail is refused like a broken one, naming the failing case.
    std::fs::write(dir.path().join("rules/vip.rhai"), "const LIST = \"VIP\";\nfn matches(c) { false }\n")
        .expect("write");
    let (code, out) = run(segsync().args(["check", "--strict"]).arg("--config").arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("vip.rhai: its test") && out.contains("expected true, got false"), "{out}");
    assert!(out.contains("4 valid rule(s)"), "{out}");

    for entry in std::fs::read_dir(dir.path().join("rules")).expect("rules") {
        std::fs::remove_file(entry.expect("entry").path()).expect("remove");
    }
    let (code, out) = run(segsync().arg("check").arg("--config").arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("no rule in") && out.contains("has no NAME.rhai file"), "{out}");

    std::fs::write(&config, "[api]\nbase_url = \"sandbox\"\npage_sise = 10\n").expect("write");
    let (code, out) = run(segsync().arg("check").arg("--config").arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("config.toml:3:1: unknown key `page_sise` in [api]"), "{out}");
}

// `segsync test` prints the contact, expected and actual answer of a failing case and exits 1.
#[test]
fn rule_test_failure_is_explained() {
    let (dir, config) = setup(None);
    let fixture = dir.path().join("rules/vip.test.toml");
    std::fs::write(&fixture, "today = \"2026-11-28\"\n[[case]]\nname = \"wrong on purpose\"\nexpect = true\ncontact = { id = \"x1\", customFields = { totalSpent = 10.0 } }\n").expect("write");
    let (code, out) = run(segsync().arg("test").arg("vip").arg("--config").arg(&config));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("case \"wrong on purpose\": expected true, got false"), "{out}");
    assert!(out.contains("\"totalSpent\":10.0"), "{out}");
    assert!(out.contains("0 passed, 1 failed"), "{out}");
}

fn list_counts(sandbox: &Sandbox) -> Vec<(String, usize)> {
    sandbox.with_store(|s| s.lists().iter().map(|l| (l.name.clone(), l.contact_count())).collect())
}

// A sync killed (SIGKILL) in the middle of its adds is finished by the next sync: same end state,
// no duplicate list; a third sync writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sync_converges_without_duplicates() {
    let faults = Faults { latency: Duration::from_millis(15), ..Faults::default() };
    let sandbox = support::start(SandboxConfig { faults, ..support::sandbox_config(20_000) }).await;
    let (_dir, config) = setup(Some(&sandbox.base_url()));

    let mut child = segsync()
        .arg("sync")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sandbox.stats().count("POST /contacts/list/contacts") < 4 {
        assert!(std::time::Instant::now() < deadline, "the sync never reached its adds");
        assert!(child.try_wait().expect("wait").is_none(), "the sync finished before it could be killed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let partial: usize = list_counts(&sandbox).iter().map(|l| l.1).sum();

    let (code, out) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || run(segsync().arg("sync").arg("--config").arg(&config))
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{out}");
    let lists = list_counts(&sandbox);
    assert_eq!(lists.len(), 5, "no duplicate lists: {lists:?}");
    let total: usize = lists.iter().map(|l| l.1).sum();
    assert!(total > partial, "the second sync finished the job ({partial} → {total})");
    let expected_vip = support::ids_where(&sandbox, |c| support::spent(c).is_some_and(|v| v > 5000.0)).len();
    assert!(lists.contains(&("VIP - Spend > 5000 EUR".to_owned(), expected_vip)), "{lists:?}");

    let before = sandbox.stats();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().arg("sync").arg("--config").arg(&config)))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}");
    assert_eq!(sandbox.stats().since(&before).writes(), 0, "converged: nothing left to write");
    sandbox.shutdown().await;
}

// A second segsync on the same state file refuses to start, naming the holder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_instance_refuses() {
    let sandbox = support::start(support::sandbox_config(100)).await;
    let (dir, config) = setup(Some(&sandbox.base_url()));
    let _held = segsync::state::lock(&dir.path().join("segsync.db")).expect("lock");
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().arg("sync").arg("--config").arg(&config)))
        .await
        .expect("join");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("another segsync"), "{out}");
    assert_eq!(sandbox.stats().total, 0, "it refused before touching the API");
    sandbox.shutdown().await;
}

// `sync` exits 4 when the mass-removal guard holds, and 0 once confirmed; `status` shows the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_exit_codes_and_status() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    let (dir, config) = setup(Some(&sandbox.base_url()));
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip"]).arg("--config").arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}");
    // The stricter rule would fail the shipped tests (a rule failing its tests is not run): drop them.
    std::fs::remove_file(dir.path().join("rules/vip.test.toml")).expect("remove the tests");
    std::fs::write(
        dir.path().join("rules/vip.rhai"),
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 50000.0 }\n",
    )
    .expect("write");
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip"]).arg("--config").arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("outcome held"), "{out}");
    assert!(out.contains("confirm with `segsync sync vip --allow-mass-removal`"), "the rule's own name: {out}");
    assert!(!out.contains("RULE"), "{out}");
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || {
        run(segsync().args(["sync", "vip", "--allow-mass-removal"]).arg("--config").arg(&c))
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{out}");
    let c = config.clone();
    let (code, out) =
        tokio::task::spawn_blocking(move || run(segsync().args(["status", "--runs", "3"]).arg("--config").arg(&c)))
            .await
            .expect("join");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("vip ")).count(), 1, "one row per rule: {out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("  20")).count(), 3, "vip's three runs: {out}");
    assert!(out.contains("held"), "{out}");
    assert!(out.contains("daemon: not running"), "{out}");
    // The list's name beside the rule, and every time in the configured zone (Europe/Rome: +01:00 in
    // winter, +02:00 in summer), never UTC's `Z` beside it.
    let vip = out.lines().find(|l| l.starts_with("vip ")).expect("vip's row");
    assert!(vip.contains("VIP - Spend > 5000 EUR"), "{vip}");
    assert!(!out.contains("Z "), "one zone: {out}");
    assert!(out.contains("+01:00") || out.contains("+02:00"), "{out}");
    let c = config.clone();
    let (_, json) = tokio::task::spawn_blocking(move || {
        let out = segsync().args(["status", "--json", "--runs", "1"]).arg("--config").arg(&c).output().expect("runs");
        (out.status.code(), serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("JSON"))
    })
    .await
    .expect("join");
    let row = json["rules"].as_array().and_then(|r| r.iter().find(|r| r["rule"] == "vip")).expect("vip").clone();
    assert_eq!(row["list"], "VIP - Spend > 5000 EUR", "{row}");
    let rome = |field: &serde_json::Value| {
        let text = field.as_str().unwrap_or_default();
        let at = chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("ISO 8601: {text}: {e}"));
        let expected = at.with_timezone(&chrono_tz::Europe::Rome).offset().to_owned();
        let expected = chrono::Offset::fix(&expected);
        assert_eq!(*at.offset(), expected, "{text} is in Europe/Rome's offset");
    };
    for field in [&row["last_run"], &row["next_run"], &row["last_success"], &row["runs"][0]["finished_at"]] {
        rome(field);
    }
    assert_eq!(json["daemon"]["pid"], serde_json::Value::Null, "{json}");
    // `history` names the list too, with the same zone.
    let removed = |c: &segsync_sandbox::store::Contact| support::spent(c).is_some_and(|s| s > 5000.0 && s <= 50000.0);
    let member = support::ids_where(&sandbox, removed).into_iter().next().expect("a contact the stricter rule removed");
    let (code, out) =
        tokio::task::spawn_blocking(move || run(segsync().args(["history", &member]).arg("--config").arg(&config)))
            .await
            .expect("join");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("list \"VIP - Spend > 5000 EUR\" ("), "{out}");
    assert!(!out.contains("Z "), "{out}");
    sandbox.shutdown().await;
}

// `status` and `history` by a user who cannot read the state (the unit's 0700 folder) fail with an
// error naming the path and a non-zero exit: never "daemon: not running" and empty rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_state_is_an_error_not_an_empty_answer() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (dir, _) = setup(Some(&sandbox.base_url()));
    let state_dir = dir.path().join("state");
    let config = dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}[state]\npath = \"{}/segsync.db\"\n", state_dir.display())).expect("write");
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip"]).arg("--config").arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}");
    // Everyone may read the config and rules; only the service (here: this user) the state.
    for path in [dir.path().to_path_buf(), dir.path().join("rules")] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    // As root (CI), the other user is nobody; as anyone else, a folder even its owner cannot enter.
    let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).expect("stat")) == 0;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(if root { 0o700 } else { 0o000 }))
        .expect("chmod");
    for args in [vec!["status"], vec!["status", "--json"], vec!["history", "c-1"], vec!["history", "--rule", "vip"]] {
        let mut cmd = segsync();
        cmd.args(&args).arg("--config").arg(&config);
        if root {
            cmd.uid(65534).gid(65534);
        }
        let out = cmd.output().expect("runs");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains("cannot read the state database") && stderr.contains("segsync.db"),
            "{args:?}: {stderr}"
        );
        assert!(!stdout.contains("not running") && !stdout.contains("no history"), "{args:?}: {stdout}");
    }
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    sandbox.shutdown().await;
}

// Errors go to stderr, always: `plan --json` with a key it cannot read leaves stdout empty (so
// `| jq` sees nothing rather than text), and says why on stderr with exit 3.
#[test]
fn errors_go_to_stderr_even_with_json() {
    let (_dir, config) = setup(Some("http://127.0.0.1:9"));
    let out = segsync().args(["plan", "--json", "--config"]).arg(&config).env_remove(KEY_VAR).output().expect("runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "stdout is for the JSON only: {stdout}");
    assert!(stderr.contains(KEY_VAR) && stderr.contains("is not set"), "{stderr}");
    // The same for a config that does not load, and a rule that is not there.
    std::fs::write(&config, "[api]\nbase_url = \"sandbox\"\npage_sise = 10\n").expect("write");
    let out = segsync().args(["plan", "--json", "--config"]).arg(&config).output().expect("runs");
    assert_eq!(out.status.code(), Some(3));
    assert!(out.stdout.is_empty() && String::from_utf8_lossy(&out.stderr).contains("page_sise"));
}

// `status --json` is always JSON with a schema version: on a fresh install (no state yet) every rule
// on disk with no run and exit 0; with a held run, the held removals and exit 4; `--runs 0` lists none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_is_everything_fine() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    let (dir, config) = setup(Some(&sandbox.base_url()));
    let status = |config: PathBuf| async move {
        tokio::task::spawn_blocking(move || {
            let out = segsync()
                .args(["status", "--json", "--runs", "0"])
                .arg("--config")
                .arg(&config)
                .output()
                .expect("runs");
            let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("always JSON");
            (out.status.code().unwrap_or(-1), doc)
        })
        .await
        .expect("join")
    };
    let (code, doc) = status(config.clone()).await;
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["schema_version"], 1);
    assert_eq!(doc["daemon"]["running"], false);
    let rules = doc["rules"].as_array().expect("rules");
    assert_eq!(rules.len(), 5, "{doc}");
    assert!(rules.iter().all(|r| r["outcome"].is_null() && r["next_run"].is_string()), "{doc}");

    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip"]).arg("--config").arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}");
    std::fs::remove_file(dir.path().join("rules/vip.test.toml")).expect("remove the tests");
    std::fs::write(
        dir.path().join("rules/vip.rhai"),
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 50000.0 }\n",
    )
    .expect("write");
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip"]).arg("--config").arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 4, "{out}");
    let (code, doc) = status(config.clone()).await;
    assert_eq!(code, 4, "held removals make status fail: {doc}");
    let vip = doc["rules"].as_array().expect("rules").iter().find(|r| r["rule"] == "vip").expect("vip").clone();
    assert_eq!(vip["outcome"], "held", "{vip}");
    assert!(vip["held_removals"].as_u64().is_some_and(|n| n > 0), "{vip}");
    assert_eq!(vip["runs"].as_array().map(Vec::len), Some(0), "--runs 0 lists none");
    assert_eq!(vip["file"], serde_json::Value::Null, "no daemon, no running version");
    sandbox.shutdown().await;
}

// One exit-code table: a missing key variable is 3 in check and plan alike; an unknown rule is a
// usage error (2); `plan --detailed-exitcode` is 5 when changes are pending and 0 when there are none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_agree_across_commands() {
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (_dir, config) = setup(Some(&sandbox.base_url()));
    let c = config.clone();
    let codes = tokio::task::spawn_blocking(move || {
        let without_key = |args: &[&str]| run(segsync().args(args).arg("--config").arg(&c).env_remove(KEY_VAR));
        let with_key = |args: &[&str]| run(segsync().args(args).arg("--config").arg(&c));
        (
            without_key(&["check"]),
            without_key(&["plan"]),
            with_key(&["plan", "nosuchrule"]),
            with_key(&["plan", "vip", "--detailed-exitcode"]),
            with_key(&["sync", "vip"]),
            with_key(&["plan", "vip", "--detailed-exitcode"]),
        )
    })
    .await
    .expect("join");
    assert_eq!(codes.0.0, 3, "{}", codes.0.1);
    assert_eq!(codes.1.0, 3, "{}", codes.1.1);
    assert!(codes.1.1.contains(KEY_VAR), "{}", codes.1.1);
    assert_eq!(codes.2.0, 2, "{}", codes.2.1);
    assert!(codes.2.1.contains("no valid rule named \"nosuchrule\""), "{}", codes.2.1);
    assert_eq!(codes.3.0, 5, "a new list and its members are pending: {}", codes.3.1);
    assert_eq!(codes.4.0, 0, "{}", codes.4.1);
    assert_eq!(codes.5.0, 0, "nothing left to do: {}", codes.5.1);
    sandbox.shutdown().await;
}

// `check --json`, `check --verbose` (next firings), `test --json` and `test --junit FILE` for CI.
#[test]
fn check_and_test_speak_json_and_junit() {
    let (dir, config) = setup(None);
    std::fs::write(
        dir.path().join("rules/bad-cron.rhai"),
        "const LIST = \"C\";\nconst SCHEDULE = \"0 0 30 2 *\";\nfn matches(c) { true }\n",
    )
    .expect("write");
    let out = segsync().args(["check", "--json"]).arg("--config").arg(&config).output().expect("runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_eq!(doc["ok"], true);
    let problem = &doc["problems"][0];
    assert_eq!(problem["severity"], "warning", "{doc}");
    assert!(problem["message"].as_str().expect("message").contains("never fires"), "{doc}");
    assert_eq!(problem["line"], 2, "{doc}");
    assert_eq!(doc["rules"].as_array().map(Vec::len), Some(5));
    assert_eq!(doc["rules"][0]["next_runs"].as_array().map(Vec::len), Some(3), "{doc}");

    let (code, out) = run(segsync().args(["check", "--verbose"]).arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.lines().any(|l| l.starts_with("vip: 0 */5 * * * * → next ")), "{out}");

    let junit = dir.path().join("junit.xml");
    let out =
        segsync().args(["test", "--json", "--junit"]).arg(&junit).arg("--config").arg(&config).output().expect("runs");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["failed"], 0, "{doc}");
    assert_eq!(doc["passed"], 21, "{doc}");
    let xml = std::fs::read_to_string(&junit).expect("the JUnit report");
    assert!(xml.contains("<testsuite name=\"vip\" tests=\"6\" failures=\"0\""), "{xml}");
    assert!(xml.contains("<testcase classname=\"vip\" name=\"exactly 5,000 EUR is not above\"/>"), "{xml}");
}

// `plan` writes nothing (not even a list); `explain` shows the fields the rule reads and the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_is_dry_and_explain_explains() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    let (_dir, config) = setup(Some(&sandbox.base_url()));
    let c = config.clone();
    let out = tokio::task::spawn_blocking(move || {
        segsync().args(["plan", "--json"]).arg("--config").arg(&c).output().expect("runs")
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let stats = sandbox.stats();
    assert_eq!(stats.writes(), 0, "a plan writes nothing: {stats:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is exactly the plan's JSON");
    let vip = rows.as_array().expect("rows").iter().find(|r| r["rule"] == "vip").expect("vip row");
    assert_eq!(vip["list_exists"], false);
    let vip_ids = support::ids_where(&sandbox, |c| support::spent(c).is_some_and(|v| v > 5000.0));
    assert_eq!(vip["to_add"].as_u64(), Some(vip_ids.len() as u64));

    let explain = |args: Vec<String>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || run(segsync().arg("explain").args(args).arg("--config").arg(&config)))
    };
    let id = vip_ids[0].clone();
    let (code, out) = explain(vec!["vip".into(), id.clone()]).await.expect("join");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("reads     customFields.totalSpent = "), "{out}");
    assert!(out.contains("answer    IN the segment"), "{out}");
    assert!(out.contains("list now  the list does not exist yet"), "{out}");
    assert!(!out.contains("derived"), "internal wording only with --verbose: {out}");
    let (_, out) = explain(vec!["vip".into(), id.clone(), "--verbose".into()]).await.expect("join");
    assert!(out.contains("derived   "), "{out}");

    // After a sync the contact is in the list, and explain says so (from a read of the list).
    let c = config.clone();
    let (code, out) = tokio::task::spawn_blocking(move || run(segsync().args(["sync", "vip", "--config"]).arg(&c)))
        .await
        .expect("join");
    assert_eq!(code, 0, "{out}");
    let (_, out) = explain(vec!["vip".into(), id]).await.expect("join");
    assert!(out.contains("list now  IN the list (") && out.contains("as it should be"), "{out}");
    let outsider = support::ids_where(&sandbox, |c| support::spent(c).is_some_and(|v| v < 100.0))[0].clone();
    let (_, out) = explain(vec!["vip".into(), outsider]).await.expect("join");
    assert!(out.contains("list now  not in the list (") && out.contains("as it should be"), "{out}");
    sandbox.shutdown().await;
}

// `segsync sandbox` serves the API standalone on the address it is given, with the given key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_command_serves_the_api() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    let mut child = segsync()
        .args(["sandbox", "--contacts", "250", "--plan", "trial", "--api-key", "k-cli", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let url = format!("http://127.0.0.1:{port}/api/partner-gateway/v1/contacts?limit=1");
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let response = loop {
        if let Ok(r) = http.get(&url).header("X-Api-Key", "k-cli").send().await {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "the sandbox never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(response.headers()["x-ratelimit-limit"], "100", "the trial plan");
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["total"], 250);
    child.kill().expect("kill");
    child.wait().expect("reaped");
}

// `sync` draws a progress bar on a terminal (a pty from `script`), and never when stderr is a pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_only_on_a_terminal() {
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (_dir, config) = setup(Some(&sandbox.base_url()));
    // A plan of 3 requests a second paces the pass over a few seconds, so the bar has time to draw.
    let slow = "plan = \"custom\"\nrequests_per_minute = 600\nrequests_per_second = 3\nbudget_share = 1.0";
    let text = std::fs::read_to_string(&config).expect("read").replace("plan = \"unlimited\"", slow);
    std::fs::write(&config, text).expect("write");
    let c = config.clone();
    let (piped, tty) = tokio::task::spawn_blocking(move || {
        let piped =
            segsync().args(["sync", "vip", "--log-format", "text"]).arg("--config").arg(&c).output().expect("runs");
        let line = format!("{} sync vip --log-format text --config {}", env!("CARGO_BIN_EXE_segsync"), c.display());
        let tty = Command::new("script")
            .args(["-qec", &line, "/dev/null"])
            .env(KEY_VAR, support::KEY)
            .stdin(Stdio::null())
            .output()
            .expect("script runs");
        (piped, tty)
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert_eq!(piped.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('\u{1b}'), "no bar, no colours on a pipe: {stderr:?}");
    assert!(!stderr.contains("reading: "), "no progress message on a pipe: {stderr}");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert_eq!(tty.status.code(), Some(0), "{screen}");
    assert!(screen.contains("reading: ") && screen.contains(" requests"), "a bar on the terminal: {screen:?}");
    sandbox.shutdown().await;
}

/// A contact who qualifies for the shipped VIP rule.
fn a_vip(sandbox: &Sandbox) -> String {
    sandbox.with_store(|s| {
        let ids: Vec<String> = s.contact_ids().map(str::to_owned).collect();
        ids.into_iter().find(|id| s.get(id).and_then(support::spent).is_some_and(|x| x > 5000.0)).expect("a VIP")
    })
}

/// Sets a contact's total spend through the sandbox's contact update, as a user's shop would.
async fn spends(sandbox: &Sandbox, contact: &str, amount: f64) {
    let url = format!("{}/partner-gateway/v1/contacts/{contact}", sandbox.base_url());
    let updated = support::http()
        .put(url)
        .header("X-Api-Key", support::KEY)
        .json(&serde_json::json!({"customFields": {"totalSpent": amount}}))
        .send()
        .await
        .expect("sent");
    assert!(updated.status().is_success());
}

// The Marco question, on the sandbox: a VIP stops qualifying (the sandbox's contact update), the
// next sync removes him, and `history` says when and why, as text and as JSON, by contact and by rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_answers_why_marco_left_vip() {
    let sandbox = support::start(support::sandbox_config(2000)).await;
    let (dir, config) = setup(Some(&sandbox.base_url()));
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    let marco = a_vip(&sandbox);
    let (code, out) = run(segsync().args(["history", &marco, "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("added {marco}")) && out.contains("vip"), "{out}");

    spends(&sandbox, &marco, 4200.0).await;
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");

    let (code, out) = run(segsync().args(["history", &marco, "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    let removed = out.lines().position(|l| l.contains(&format!("removed {marco}"))).expect("a removal");
    let added = out.lines().position(|l| l.contains(&format!("added {marco}"))).expect("an add");
    assert!(removed < added, "newest first: {out}");
    assert!(out.contains("totalSpent = 4200.0"), "the fact that made vip say no: {out}");

    let (code, out) = run(segsync().args(["history", &marco, "--json", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    let entry = &json["entries"][0];
    assert_eq!((entry["action"].as_str(), entry["rule"].as_str()), (Some("removed"), Some("vip")), "{json}");
    // A time in the configured zone (its date may not be UTC's): the instant is a moment ago.
    let at = entry["at"].as_str().and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok()).expect("an ISO time");
    let ago = chrono::Utc::now().signed_duration_since(at);
    assert!(ago >= chrono::Duration::zero() && ago < chrono::Duration::minutes(10), "{at} is not a moment ago");
    assert!(entry["reason"].as_str().is_some_and(|r| r.contains("4200")), "{json}");

    let (code, out) =
        run(segsync().args(["history", "--rule", "vip", "--since", "7d", "--json", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    let entries = json["entries"].as_array().expect("entries");
    assert!(entries.iter().any(|e| e["contact"] == marco.as_str() && e["action"] == "removed"), "{json}");
    assert!(entries.iter().all(|e| e["rule"] == "vip"));
    let (code, out) = run(segsync().args(["history", "--config"]).arg(&config));
    assert_eq!(code, 2, "a contact or --rule is required: {out}");

    // A changed rule file is itself in the rule's history.
    let vip = dir.path().join("rules/vip.rhai");
    let text = std::fs::read_to_string(&vip).expect("read") + "// edited\n";
    std::fs::write(&vip, text).expect("write");
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    let (code, out) = run(segsync().args(["history", "--rule", "vip", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("changed") && out.contains("rule vip changed: hash "), "{out}");

    // The cache serves a plain sync; `sync --full` reads every list's members instead.
    let members_from = |out: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == "rule run")
            .map(|v| v["members_from"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    assert_eq!(members_from(&out), ["cache"; 5], "{out}");
    let (code, out) = run(segsync().args(["sync", "--full", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert_eq!(members_from(&out), ["read"; 5], "{out}");
    sandbox.shutdown().await;
}

// `[rules] default_remove_after`: a VIP who stops qualifying is not removed by the next sync but
// pending; `plan` shows when he is due, `status` counts him, and the history has no removal yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_grace_keeps_a_failing_member_pending() {
    let sandbox = support::start(support::sandbox_config(2000)).await;
    let (_dir, config) = setup(Some(&sandbox.base_url()));
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text.replace("[rules]\n", "[rules]\ndefault_remove_after = \"3d\"\n")).expect("write");
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    let marco = a_vip(&sandbox);
    spends(&sandbox, &marco, 4200.0).await;
    let (code, out) = run(segsync().args(["sync", "vip", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("pending removal 1") && out.contains(&marco), "{out}");
    let stdout = |cmd: &mut Command| {
        let out = cmd.output().expect("runs");
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("stdout is JSON")
    };
    let plan = stdout(segsync().args(["plan", "vip", "--json", "--config"]).arg(&config));
    let rule = &plan[0];
    assert_eq!((rule["to_remove"].as_u64(), rule["pending_removal"].as_u64()), (Some(0), Some(1)), "{plan}");
    assert_eq!(rule["sample_pending"][0]["contact"], marco.as_str());
    assert!(rule["sample_pending"][0]["due"].as_str().is_some(), "{plan}");
    let status = stdout(segsync().args(["status", "--json", "--config"]).arg(&config));
    let vip = status["rules"].as_array().expect("rules").iter().find(|r| r["rule"] == "vip").expect("vip");
    assert_eq!(vip["pending_removal"], 1, "{status}");
    let in_list = sandbox.with_store(|s| {
        let id = s.lists().iter().find(|l| l.name.starts_with("VIP")).map(|l| l.id.clone()).expect("list");
        s.member_ids(&id).expect("members").contains(&marco)
    });
    assert!(in_list, "kept within the grace");
    let (code, out) = run(segsync().args(["history", &marco, "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("removed"), "{out}");
    sandbox.shutdown().await;
}

// Inputs that used to panic are refused where they are read, with the key or file:line; output
// into a closed pipe ends quietly; the state is private whatever the umask, and `check` and
// `status` warn about one that is not; an unknown rule is exit 2 for `explain` as for `plan`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_and_the_state_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let sandbox = support::start(support::sandbox_config(3000)).await;
    let (dir, config) = setup(Some(&sandbox.base_url()));
    let text = std::fs::read_to_string(&config).expect("read");

    // Durations are bounded when read.
    std::fs::write(&config, format!("{text}[state]\nhistory_retention = \"999999999w\"\n")).expect("write");
    let (code, out) = run(segsync().arg("check").arg("--config").arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("state.history_retention") && out.contains("at most 100 years"), "{out}");
    std::fs::write(&config, &text).expect("write");
    let grace = dir.path().join("rules/forever.rhai");
    std::fs::write(&grace, "const LIST = \"F\";\nconst REMOVE_AFTER = \"999999999w\";\nfn matches(c) { true }\n")
        .expect("write");
    let (code, out) = run(segsync().args(["check", "--strict", "--config"]).arg(&config));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("forever.rhai:2:") && out.contains("at most 100 years"), "{out}");
    std::fs::remove_file(&grace).expect("remove");
    let (code, out) =
        run(segsync().args(["history", "--rule", "vip", "--since", "999999999w", "--config"]).arg(&config));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("at most 100 years") && !out.contains("panicked"), "{out}");

    // The state is created private under umask 022 (the test process's).
    let (code, out) = run(segsync().arg("sync").arg("--config").arg(&config));
    assert_eq!(code, 0, "{out}");
    let db = dir.path().join("segsync.db");
    let mode = std::fs::metadata(&db).expect("state").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");

    // A reader that goes away after one line: the command ends quietly (thousands of lines follow).
    let mut child = segsync()
        .args(["history", "--rule", "reengagement-90d", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut first)
        .expect("a line");
    let out = child.wait_with_output().expect("exits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!first.is_empty());
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A state others can read is warned about by `check` and `status`.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, out) = run(segsync().arg("check").arg("--config").arg(&config));
    assert_eq!(code, 0, "a warning, not an error: {out}");
    assert!(out.contains("readable by other users") && out.contains("chmod 600"), "{out}");
    let (_, out) = run(segsync().arg("status").arg("--config").arg(&config));
    assert!(out.contains("warning: the state") && out.contains("readable by other users"), "{out}");

    // An unknown rule is usage (2) for explain as for plan and sync.
    let (code, out) = run(segsync().args(["explain", "nosuchrule", "cnt-00001", "--config"]).arg(&config));
    assert_eq!(code, 2, "{out}");
    sandbox.shutdown().await;
}

// Without --config the command finds its config: $SEGSYNC_CONFIG, else ./config.toml (else the
// packaged one); with none of them it says where it looked (issue 23).
#[test]
fn the_config_is_found_without_config() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let (_dir, config) = setup(None);
    let mut cmd = segsync();
    cmd.arg("check").current_dir(elsewhere.path()).env("SEGSYNC_CONFIG", &config);
    let (code, out) = run(&mut cmd);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("ok: config {}", config.display())), "{out}");

    std::fs::copy(&config, elsewhere.path().join("config.toml")).expect("copy");
    std::fs::create_dir(elsewhere.path().join("rules")).expect("rules");
    std::fs::write(elsewhere.path().join("rules/all.rhai"), "const LIST = \"All\";\nfn matches(c) { true }\n")
        .expect("rule");
    let mut cmd = segsync();
    cmd.arg("check").current_dir(elsewhere.path()).env_remove("SEGSYNC_CONFIG");
    let (code, out) = run(&mut cmd);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: config config.toml, 1 rule(s) (all)"), "./config.toml: {out}");

    if !Path::new("/etc/segsync/config.toml").exists() {
        let nowhere = tempfile::tempdir().expect("tempdir");
        let mut cmd = segsync();
        cmd.arg("status").current_dir(nowhere.path()).env_remove("SEGSYNC_CONFIG");
        let (code, out) = run(&mut cmd);
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("no config: --config not given, $SEGSYNC_CONFIG unset"), "{out}");
        assert!(out.contains("/etc/segsync/config.toml"), "{out}");
    }
}

// The shipped examples (a helper, a segment built on a segment, one list per value) load and pass
// their own tests.
#[test]
fn shipped_examples_check_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let examples = std::fs::canonicalize("rules/examples").expect("examples");
    std::fs::write(
        &config,
        format!("[api]\nbase_url = \"sandbox\"\n[rules]\ndir = {:?}\n", examples.display().to_string()),
    )
    .expect("config");
    let (code, out) = run(segsync().args(["check", "--strict", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 rule(s) (geo, optout, vip, vip-lombardia)"), "{out}");
    assert!(out.contains("16 rule test(s) passed"), "{out}");
}

// A rule failing its own tests (issue 21): `plan RULE` still previews it, marked with the failing
// case, and exits 3; `sync RULE` refuses it with exit 3, naming the case; an unknown rule stays 2.
#[test]
fn a_rule_failing_its_tests_is_previewed_not_synced() {
    let (dir, config) = setup(None);
    let rules = dir.path().join("rules");
    std::fs::write(
        rules.join("luxury-vip.rhai"),
        "const LIST = \"Luxury VIP\";\nfn matches(c) { (c.customFields.get(\"totalSpent\") ?? 0.0) > 9000.0 }\n",
    )
    .expect("rule");
    std::fs::write(
        rules.join("luxury-vip.test.toml"),
        "today = \"2026-11-28\"\n\n[[case]]\nname = \"a 6,000 EUR customer is luxury\"\nexpect = true\n\
         contact = { id = \"t1\", customFields = { totalSpent = 6000.0 } }\n",
    )
    .expect("tests");
    let (code, text) = run(segsync().args(["plan", "luxury-vip", "--config"]).arg(&config));
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("luxury-vip → \"Luxury VIP\""), "previewed: {text}");
    assert!(
        text.contains("luxury-vip: fails its tests: ") && text.contains("a 6,000 EUR customer is luxury"),
        "{text}"
    );
    let out = segsync().args(["plan", "luxury-vip", "--json", "--config"]).arg(&config).output().expect("runs");
    assert_eq!(out.status.code(), Some(3));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("plan --json");
    assert!(rows[0]["fails_tests"][0].as_str().is_some_and(|f| f.contains("a 6,000 EUR customer is luxury")), "{rows}");
    let (code, text) = run(segsync().args(["sync", "luxury-vip", "--config"]).arg(&config));
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("a 6,000 EUR customer is luxury"), "sync names the case: {text}");
    let (code, _) = run(segsync().args(["plan", "no-such-rule", "--config"]).arg(&config));
    assert_eq!(code, 2);
}

// `segsync test RULE` reports only that rule; a rule without tests adds no line of its own; the
// JUnit report counts a rule file that does not load as a failure, so it agrees with the exit code.
#[test]
fn test_reports_only_the_named_rule_and_junit_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).expect("rules");
    std::fs::write(rules.join("plain.rhai"), "const LIST = \"Plain\";\nfn matches(c) { true }\n").expect("plain");
    std::fs::write(rules.join("broken.rhai"), "const LIST = \"Broken\";\nfn matches(c) {\n").expect("broken");
    std::fs::write(rules.join("picky.rhai"), "const LIST = \"Picky\";\nfn matches(c) { false }\n").expect("picky");
    std::fs::write(
        rules.join("picky.test.toml"),
        "today = \"2026-11-28\"\n\n[[case]]\nname = \"everyone is picked\"\nexpect = true\ncontact = { id = \"t1\" }\n",
    )
    .expect("tests");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[api]\nbase_url = \"sandbox\"\n").expect("config");
    let (code, text) = run(segsync().args(["test", "picky", "--config"]).arg(&config));
    assert_eq!(code, 1, "{text}");
    assert!(!text.contains("broken.rhai"), "another rule's problem is not this command's: {text}");
    assert_eq!(text.matches("everyone is picked").count(), 1, "each failing case once: {text}");
    let junit = dir.path().join("junit.xml");
    let (code, text) = run(segsync().args(["test", "--config"]).arg(&config).arg("--junit").arg(&junit));
    assert_eq!(code, 1, "{text}");
    assert!(!text.contains("plain:"), "a rule without tests adds no line: {text}");
    let xml = std::fs::read_to_string(&junit).expect("junit");
    assert!(xml.contains("failures=\"2\""), "the broken file and the failing case: {xml}");
    assert!(xml.contains("<testsuite name=\"broken\" tests=\"1\" failures=\"1\""), "{xml}");
}
