//! `[metrics] listen`: the daemon's Prometheus endpoint scraped during and after a pass and checked
//! against the pass's own summary events, `/healthz`, and the shipped alert rules.
use crate::support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segsync_sandbox::{Faults, SandboxConfig};
use serde_json::Value;

/// The daemon, killed if the test fails before stopping it.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound and released; the daemon binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The value of the sample `name{labels}` in a scrape (labels in any order, all given must match).
fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
        let matches = metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

fn sum(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// A config for `sandbox` (unlimited plan, rules due once a year unless they say otherwise) serving
/// metrics on `port`, with `metrics` added to its `[metrics]` section.
fn write_config(config: &std::path::Path, sandbox: &segsync_sandbox::Sandbox, port: u16, metrics: &str) {
    let text = format!(
        "[api]\nbase_url = \"{}\"\nkey_env = \"{}\"\nplan = \"unlimited\"\n[rules]\ndefault_schedule = \"0 0 3 1 1 *\"\n\
         [metrics]\nlisten = \"{port}\"\n{metrics}",
        sandbox.base_url(),
        support::KEY_VAR
    );
    std::fs::write(config, text).expect("config");
}

/// `segsync run` on `config`, and its JSON log events as they come.
fn spawn(config: &std::path::Path) -> (Killed, Arc<Mutex<Vec<Value>>>) {
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_segsync"))
            .args(["run", "--log-format", "json", "--config"])
            .arg(config)
            .env(support::KEY_VAR, support::KEY)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let logs: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = logs.clone();
    let stderr = child.0.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                sink.lock().expect("lock").push(v);
            }
        }
    });
    (child, logs)
}

async fn get(url: &str) -> (u16, String) {
    match support::http().get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

// During a pass the endpoint answers and counts requests; after it, every per-rule value and the
// request total equal what the pass's own `rule run` and `pass finished` events say; /healthz is 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_matches_the_pass_summary() {
    let faults = Faults { latency: Duration::from_millis(40), ..Faults::default() };
    let sandbox = support::start(SandboxConfig { faults, ..support::sandbox_config(3_000) }).await;
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_shipped_rules(dir.path(), false, |t| t.replace("const SCHEDULE = \"0 */5 * * * *\";\n", ""));
    let (port, config) = (free_port(), dir.path().join("config.toml"));
    write_config(&config, &sandbox, port, "");
    let (mut child, logs) = spawn(&config);
    let base = format!("http://127.0.0.1:{port}");
    let events = |message: &str| -> Vec<Value> {
        logs.lock().expect("lock").iter().filter(|v| v["message"] == message).cloned().collect()
    };

    // During the pass: requests are counted before the summaries exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    let during = loop {
        let (status, text) = get(&format!("{base}/metrics")).await;
        if status == 200 && events("pass finished").is_empty() {
            if sum(&text, "segsync_api_requests_total") > 0.0 {
                break Some(text);
            }
        } else if !events("pass finished").is_empty() {
            break None;
        }
        assert!(Instant::now() < deadline, "no scrape during the pass");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    while events("pass finished").is_empty() {
        assert!(Instant::now() < deadline, "the first pass never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = during.expect("a scrape while the pass ran (the sandbox's latency makes it last about a second)");
    assert_eq!(sample(&during, "segsync_rules_loaded", &[]), Some(5.0), "{during}");
    assert!(during.contains("segsync_api_throttled_total{op=\"scan_contacts\"} 0"), "zero-initialised: {during}");

    let (status, after) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let pass = &events("pass finished")[0];
    assert_eq!(sum(&after, "segsync_api_requests_total"), pass["api_requests"].as_f64().expect("requests"), "{after}");
    for run in events("rule run") {
        let rule = run["rule"].as_str().expect("rule");
        let labels = [("rule", rule)];
        assert_eq!(sample(&after, "segsync_rule_added_total", &labels), run["added"].as_f64(), "{rule}: {after}");
        assert_eq!(sample(&after, "segsync_rule_removed_total", &labels), run["removed"].as_f64());
        let members = run["members_before"].as_f64().expect("members") + run["added"].as_f64().expect("added")
            - run["removed"].as_f64().expect("removed");
        assert_eq!(sample(&after, "segsync_rule_members", &labels), Some(members), "{rule}");
        assert_eq!(sample(&after, "segsync_rule_eval_errors", &labels), run["eval_errors"].as_f64());
        assert_eq!(sample(&after, "segsync_rule_outcome", &[("rule", rule), ("outcome", "ok")]), Some(1.0));
        assert_eq!(sample(&after, "segsync_rule_held", &labels), Some(0.0));
        assert!(sample(&after, "segsync_rule_last_success_timestamp_seconds", &labels).is_some_and(|t| t > 1.7e9));
    }
    assert_eq!(sample(&after, "segsync_pass_duration_seconds_count", &[]), Some(1.0), "{after}");
    assert!(after.contains("segsync_build_info{version=\""), "{after}");
    let (status, body) = get(&format!("{base}/healthz")).await;
    assert_eq!(status, 200, "{body}");
    check_alert_rules(&after);
    check_dashboard(&after);

    Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().expect("kill");
    let status = child.0.wait().expect("exit");
    assert_eq!(status.code(), Some(0));
    sandbox.shutdown().await;
}

// `status` and `/healthz` judge "overdue" by one rule (`schedule::is_overdue`): a rule that has
// never succeeded is overdue once `overdue_factor` of its intervals have passed since the daemon
// loaded it, in both; a rule that succeeded is overdue in neither. (`status` used to need a last
// success, so it never called a rule that had none overdue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_healthz_agree_on_overdue() {
    let sandbox = support::start(support::sandbox_config(200)).await;
    // broken errors on every contact, so every run fails; due every second.
    let dir = fine_and_broken("const SCHEDULE = \"* * * * * *\";\n");
    let (port, config) = (free_port(), dir.path().join("config.toml"));
    write_config(&config, &sandbox, port, "overdue_factor = 1\n");
    let (mut child, logs) = spawn(&config);
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let overdue_in = |body: &str| -> Vec<String> {
        let doc: Value = serde_json::from_str(body).unwrap_or_default();
        let problems = doc["problems"].as_array().cloned().unwrap_or_default();
        problems
            .iter()
            .filter(|p| p["problem"] == "rule overdue")
            .filter_map(|p| p["rule"].as_str().map(str::to_owned))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&healthz).await;
        let fine_ran = logs.lock().expect("lock").iter().any(|v| v["message"] == "rule run" && v["rule"] == "fine");
        if status == 503 && fine_ran && overdue_in(&body) == ["broken"] {
            break;
        }
        assert!(Instant::now() < deadline, "/healthz never called broken overdue: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_segsync"))
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("status");
    let doc: Value = serde_json::from_slice(&out.stdout).expect("status json");
    let overdue = |rule: &str| {
        doc["rules"].as_array().and_then(|r| r.iter().find(|r| r["rule"] == rule)).map(|r| r["overdue"].clone())
    };
    assert_eq!(overdue("broken"), Some(Value::Bool(true)), "{doc}");
    assert_eq!(overdue("fine"), Some(Value::Bool(false)), "{doc}");
    assert_eq!(out.status.code(), Some(1), "an overdue rule is a failure");
    let (_, body) = get(&healthz).await;
    assert_eq!(overdue_in(&body), ["broken"], "still the same verdict: {body}");
    Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().expect("kill");
    assert_eq!(child.0.wait().expect("exit").code(), Some(0));
    sandbox.shutdown().await;
}

/// The metric families a scrape declares (`# TYPE` lines).
fn families(scrape: &str) -> Vec<&str> {
    scrape.lines().filter_map(|l| l.strip_prefix("# TYPE ").and_then(|t| t.split_whitespace().next())).collect()
}

/// Every `segsync_…` name in a PromQL expression that no declared family has (a counter's
/// `_total`, a histogram's `_bucket`, `_sum` and `_count` belong to their family).
fn unexposed<'a>(expr: &'a str, exposed: &[&str]) -> Vec<&'a str> {
    let words = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
    words
        .filter(|w| w.starts_with("segsync_"))
        .filter(|word| {
            let base = ["_bucket", "_sum", "_count"].iter().fold(*word, |w, s| w.strip_suffix(s).unwrap_or(w));
            ![*word, base, word.trim_end_matches("_total")].iter().any(|n| exposed.contains(n))
        })
        .collect()
}

/// The shipped alert rules are well-formed Prometheus rule groups, and every segsync metric they use
/// is one `scrape` (a daemon's, after a pass) exposes.
fn check_alert_rules(scrape: &str) {
    let text = std::fs::read_to_string("monitoring/alerts.yml").expect("monitoring/alerts.yml");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("valid YAML");
    let exposed = families(scrape);
    let mut alerts = 0;
    for group in doc["groups"].as_sequence().expect("groups") {
        assert!(group["name"].as_str().is_some());
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            let expr = rule["expr"].as_str().expect("expr");
            assert!(rule["labels"]["severity"].as_str().is_some(), "{name} has a severity");
            assert!(rule["annotations"]["summary"].as_str().is_some(), "{name} has a summary");
            let missing = unexposed(expr, &exposed);
            assert!(missing.is_empty(), "{name} uses {missing:?}, which the daemon does not expose: {exposed:?}");
            alerts += 1;
        }
    }
    assert!(alerts >= 5);
}

/// The shipped Grafana dashboard has the panels operators look for, each with a query, and every
/// segsync metric it queries (panels and the rule variable) is one `scrape` exposes.
fn check_dashboard(scrape: &str) {
    let text = std::fs::read_to_string("monitoring/grafana/segsync.json").expect("monitoring/grafana/segsync.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    let exposed = families(scrape);
    let panels = doc["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Rule outcomes",
        "Members per list",
        "Adds and removals",
        "Pending removals and held rules",
        "API requests by class, and 429s",
        "Pass duration",
        "Rate budget used",
    ] {
        assert!(titles.contains(&wanted), "the dashboard lacks {wanted:?}: {titles:?}");
    }
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default().to_owned();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        queries.extend(targets.iter().map(|t| (title.clone(), t["expr"].as_str().expect("expr").to_owned())));
    }
    for variable in doc["templating"]["list"].as_array().expect("variables") {
        queries.push(("variable".into(), variable["definition"].as_str().expect("definition").to_owned()));
    }
    for (title, expr) in &queries {
        let missing = unexposed(expr, &exposed);
        assert!(missing.is_empty(), "{title} queries {missing:?}, which the daemon does not expose: {exposed:?}");
        assert!(expr.contains("segsync_"), "{title} queries no segsync metric: {expr}");
    }
}

// A partitioned rule's series carry its file's name and each list (issue 22): one series per list,
// its members exactly the list's; the rule's summary adds no series of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_rule_has_a_series_per_list() {
    let sandbox = support::start(SandboxConfig { churn_per_minute: 0, ..support::sandbox_config(1_000) }).await;
    let dir = support::rule_files(&[("geo", support::GEO_TWO_LISTS)]);
    let (port, config) = (free_port(), dir.path().join("config.toml"));
    write_config(&config, &sandbox, port, "");
    let (mut child, logs) = spawn(&config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !logs.lock().expect("lock").iter().any(|v| v["message"] == "pass finished") {
        assert!(Instant::now() < deadline, "the first pass never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, scrape) = get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(status, 200);
    for region in ["Lombardia", "Veneto"] {
        let list = format!("Geo - {region}");
        let expected = support::ids_where(&sandbox, |c| c.region.as_deref() == Some(region)).len() as f64;
        let labels = [("rule", "geo"), ("list", list.as_str())];
        assert_eq!(sample(&scrape, "segsync_rule_members", &labels), Some(expected), "{scrape}");
        assert_eq!(sample(&scrape, "segsync_rule_outcome", &[("list", list.as_str()), ("outcome", "ok")]), Some(1.0));
    }
    assert_eq!(sample(&scrape, "segsync_rule_added_total", &[("rule", "geo"), ("list", "")]), None, "{scrape}");
    child.0.kill().expect("kill");
    sandbox.shutdown().await;
}

/// Two rules: `fine` (everyone) and `broken` (errors on every contact, so every run fails), with
/// `broken_settings` added to broken's settings.
fn fine_and_broken(broken_settings: &str) -> tempfile::TempDir {
    let broken =
        format!("const LIST = \"Broken\";\n{broken_settings}fn matches(c) {{ c.customFields.noSuchField > 1 }}\n");
    support::rule_files(&[("fine", "const LIST = \"Everyone\";\nfn matches(c) { true }\n"), ("broken", &broken)])
}

/// Waits until `logs` holds `n` events named `message` with every field in `with`.
async fn wait_events(logs: &Arc<Mutex<Vec<Value>>>, n: usize, message: &str, with: &[(&str, &str)]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: Vec<Value> = logs
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["message"] == message && with.iter().all(|(k, want)| v[*k] == *want))
            .cloned()
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(Instant::now() < deadline, "no {n} × {message} {with:?} within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn status_json(config: &std::path::Path) -> (Option<i32>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_segsync"))
        .args(["status", "--json", "--config"])
        .arg(config)
        .env(support::KEY_VAR, support::KEY)
        .output()
        .expect("status");
    (out.status.code(), serde_json::from_slice(&out.stdout).expect("status JSON"))
}

fn rows(doc: &Value) -> Vec<String> {
    let rules = doc["rules"].as_array().cloned().unwrap_or_default();
    rules.iter().filter_map(|r| r["rule"].as_str().map(str::to_owned)).collect()
}

// A deleted rule leaves `/metrics` (no `outcome="failed"` firing an alert forever) and `status`
// (whose exit code it would fail forever), while the daemon runs and after it stops. `status --json`
// gives the running daemon's pid as the integer the log has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_rule_leaves_metrics_and_status() {
    let sandbox = support::start(support::sandbox_config(200)).await;
    let dir = fine_and_broken("");
    let rules = dir.path().join("rules");
    let (port, config) = (free_port(), dir.path().join("config.toml"));
    write_config(&config, &sandbox, port, "");
    let (mut child, logs) = spawn(&config);
    wait_events(&logs, 1, "rule run", &[("rule", "broken"), ("outcome", "failed")]).await;
    wait_events(&logs, 1, "rule run", &[("rule", "fine"), ("outcome", "ok")]).await;
    let metrics = format!("http://127.0.0.1:{port}/metrics");
    let (_, before) = get(&metrics).await;
    assert_eq!(sample(&before, "segsync_rule_outcome", &[("rule", "broken"), ("outcome", "failed")]), Some(1.0));
    let (code, doc) = status_json(&config);
    assert_eq!(code, Some(1), "broken failed: {doc}");
    let started = wait_events(&logs, 1, "segsync started", &[]).await;
    assert_eq!(doc["daemon"]["pid"], started[0]["pid"], "the pid is the log's integer: {doc}");
    assert!(doc["daemon"]["pid"].is_u64(), "{doc}");

    std::fs::remove_file(rules.join("broken.rhai")).expect("delete");
    wait_events(&logs, 1, "rule removed", &[("rule", "broken")]).await;
    let (_, after) = get(&metrics).await;
    assert!(!after.contains("rule=\"broken\""), "a deleted rule's series go:\n{after}");
    assert_eq!(sample(&after, "segsync_rule_outcome", &[("rule", "fine"), ("outcome", "ok")]), Some(1.0), "{after}");
    let (code, doc) = status_json(&config);
    assert_eq!(rows(&doc), ["fine"], "{doc}");
    assert_eq!(code, Some(0), "{doc}");

    Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().expect("kill");
    assert_eq!(child.0.wait().expect("exit").code(), Some(0));
    let (code, doc) = status_json(&config);
    assert_eq!((code, rows(&doc)), (Some(0), vec!["fine".to_owned()]), "after the daemon stopped too: {doc}");
    sandbox.shutdown().await;
}

// SIGHUP moves `/metrics` to a changed `[metrics] listen`; a changed `[state] path` is said to need a
// restart, and restoring it is not; a rule file refused and then repaired logs `rule restored`.
// `/metrics` speaks Prometheus text 0.0.4 unless the scraper asks for OpenMetrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_moves_metrics_and_tells_the_truth() {
    let sandbox = support::start(support::sandbox_config(200)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).expect("rules");
    let good = "const LIST = \"Everyone\";\nfn matches(c) { true }\n";
    std::fs::write(rules.join("fine.rhai"), good).expect("fine");
    let (port, config) = (free_port(), dir.path().join("config.toml"));
    write_config(&config, &sandbox, port, "");
    let (mut child, logs) = spawn(&config);
    wait_events(&logs, 1, "pass finished", &[]).await;

    // Content negotiation, as the Prometheus client libraries do it.
    let url = format!("http://127.0.0.1:{port}/metrics");
    let plain = support::http().get(&url).send().await.expect("scrape");
    let kind = plain.headers()["content-type"].to_str().expect("ascii").to_owned();
    let body = plain.text().await.expect("body");
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    assert!(!body.contains("# EOF") && body.contains("# TYPE segsync_rule_added_total counter"), "{body}");
    let open = support::http()
        .get(&url)
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .expect("scrape");
    let kind = open.headers()["content-type"].to_str().expect("ascii").to_owned();
    let body = open.text().await.expect("body");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(body.ends_with("# EOF\n") && body.contains("# TYPE segsync_rule_added counter"), "{body}");

    let hup = |n: usize| {
        Command::new("kill").arg("-HUP").arg(child.0.id().to_string()).status().expect("kill");
        wait_events(&logs, n, "reloaded", &[])
    };
    let text = std::fs::read_to_string(&config).expect("config");
    let moved = free_port();
    std::fs::write(&config, text.replace(&format!("listen = \"{port}\""), &format!("listen = \"{moved}\"")))
        .expect("write");
    hup(1).await;
    wait_events(&logs, 1, "metrics served", &[("listen", &format!("127.0.0.1:{moved}"))]).await;
    let (status, _) = get(&format!("http://127.0.0.1:{moved}/metrics")).await;
    assert_eq!(status, 200, "served on the new address");
    let (status, _) = get(&url).await;
    assert_eq!(status, 0, "no longer on the old one");

    // The state path: away (a restart is needed), then back (nothing to say).
    let current = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{current}[state]\npath = \"elsewhere.db\"\n")).expect("write");
    hup(2).await;
    std::fs::write(&config, &current).expect("write");
    hup(3).await;
    let warnings = wait_events(&logs, 1, "state warning", &[]).await;
    let restarts: Vec<&Value> =
        warnings.iter().filter(|w| w["error"].as_str().is_some_and(|e| e.contains("restart"))).collect();
    assert_eq!(restarts.len(), 1, "only the change away needs a restart: {warnings:?}");
    assert!(restarts[0]["error"].as_str().is_some_and(|e| e.contains("elsewhere.db")), "{restarts:?}");

    // A refused rule, then repaired.
    std::fs::write(rules.join("fine.rhai"), "const LIST = \"Everyone\";\nfn matches(c) { true \n").expect("break");
    wait_events(&logs, 1, "rule rejected", &[("rule", "fine")]).await;
    std::fs::write(rules.join("fine.rhai"), good).expect("repair");
    let restored = wait_events(&logs, 1, "rule restored", &[("rule", "fine")]).await;
    assert!(restored[0]["file"].as_str().is_some_and(|f| f.ends_with("fine.rhai")), "{restored:?}");
    support::assert_log_schema(logs.lock().expect("lock").iter());

    Command::new("kill").arg("-TERM").arg(child.0.id().to_string()).status().expect("kill");
    assert_eq!(child.0.wait().expect("exit").code(), Some(0));
    sandbox.shutdown().await;
}
