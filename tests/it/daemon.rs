//! `segsync run` as a process against the real sandbox: rule edits, invalid edits, deleted rules,
//! SIGHUP with valid and invalid configs, coalescing, SIGTERM mid-apply, and systemd notifications.
use crate::support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use segsync_sandbox::{Faults, Sandbox, SandboxConfig};
use serde_json::Value;

use crate::support::KEY_VAR;

struct Daemon {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
    /// Reads the log until the daemon closes it.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(config: &Path, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
        cmd.arg("run").arg("--config").arg(config).arg("--log-format").arg("json");
        cmd.env(KEY_VAR, support::KEY).env("RUST_LOG", "info").env_remove("NOTIFY_SOCKET");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::piped()).spawn().expect("spawn");
        let stdout = child.stderr.take().expect("stderr");
        let logs: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = logs.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("lock").push(v);
                }
            }
        });
        Self { child, logs, reader: Some(reader) }
    }

    /// Log events with this message and all these field values.
    fn events(&self, message: &str, fields: &[(&str, &str)]) -> Vec<Value> {
        let logs = self.logs.lock().expect("lock");
        logs.iter()
            .filter(|e| e["message"] == message)
            .filter(|e| fields.iter().all(|(k, v)| e[*k].as_str() == Some(*v) || e[*k].to_string().as_str() == *v))
            .cloned()
            .collect()
    }

    /// Waits until `n` such events were logged; fails with the whole log after `secs`.
    async fn wait_for(&self, n: usize, message: &str, fields: &[(&str, &str)], secs: u64) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let found = self.events(message, fields);
            if found.len() >= n {
                return found;
            }
            if Instant::now() > deadline {
                let all: Vec<String> = self.logs.lock().expect("lock").iter().map(|v| v.to_string()).collect();
                panic!("timed out waiting for {n} × {message:?} {fields:?}; log:\n{}", all.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(ok.success());
    }

    async fn wait_exit(&mut self, secs: u64) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Every line it logged is read once the reader sees the end of the log.
                if let Some(reader) = self.reader.take() {
                    reader.join().expect("log reader");
                }
                return status.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "the daemon did not exit within {secs} s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Every event the daemon logged is in the documented schema (checked unless already failing).
        if !std::thread::panicking() {
            support::assert_log_schema(self.logs.lock().expect("lock").iter());
        }
    }
}

/// Runs a one-shot command (`sync`, `status`) beside the daemon, to its end.
async fn command(args: &[&str], config: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.args(args).arg("--config").arg(config).env(KEY_VAR, support::KEY);
    tokio::task::spawn_blocking(move || cmd.output().expect("runs")).await.expect("join")
}

/// A config folder with the shipped rules, pointing at the sandbox, cron far away (no surprises).
fn setup(sandbox: &Sandbox, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_shipped_rules(dir.path(), false, |text| text.replace("const SCHEDULE = \"0 */5 * * * *\";\n", ""));
    let config = dir.path().join("config.toml");
    write_config(&config, &sandbox.base_url(), extra);
    (dir, config)
}

fn write_config(config: &Path, base_url: &str, extra: &str) {
    std::fs::write(
        config,
        format!(
            "[api]\nbase_url = \"{base_url}\"\nkey_env = \"{KEY_VAR}\"\nplan = \"unlimited\"\nmax_retries = 2\n\
             [rules]\ndefault_schedule = \"0 0 3 1 1 *\"\ntime_zone = \"Europe/Rome\"\n{extra}"
        ),
    )
    .expect("write config");
}

fn list_members(sandbox: &Sandbox, name: &str) -> usize {
    sandbox.with_store(|s| s.lists().iter().filter(|l| l.name == name).map(|l| l.contact_count()).sum())
}

fn count_where(sandbox: &Sandbox, pred: impl Fn(&segsync_sandbox::store::Contact) -> bool) -> usize {
    sandbox.with_store(|s| {
        let ids: Vec<String> = s.contact_ids().map(str::to_owned).collect();
        ids.iter().filter(|id| s.get(id).is_some_and(&pred)).count()
    })
}

fn spent(c: &segsync_sandbox::store::Contact) -> f64 {
    support::spent(c).unwrap_or(0.0)
}

/// A fake systemd notify socket: every datagram the daemon sends, with when it arrived.
struct NotifySocket {
    path: PathBuf,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

/// What the test sends itself to know every earlier datagram has been read (datagrams arrive in order).
const NOTIFY_END: &str = "TEST_END=1";

impl NotifySocket {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let end = message == NOTIFY_END;
                sink.lock().expect("lock").push((Instant::now(), message));
                if end {
                    return;
                }
            }
        });
        Self { path, got }
    }

    fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.display().to_string())
    }

    fn messages(&self) -> Vec<String> {
        self.got.lock().expect("lock").iter().map(|(_, m)| m.clone()).collect()
    }

    /// When each datagram containing `what` arrived.
    fn times_of(&self, what: &str) -> Vec<Instant> {
        self.got.lock().expect("lock").iter().filter(|(_, m)| m.contains(what)).map(|(t, _)| *t).collect()
    }

    /// Waits until the datagrams received satisfy `done`.
    async fn wait_until(&self, secs: u64, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(&self.messages()) {
            assert!(Instant::now() < deadline, "no {what} within {secs} s: {:?}", self.messages());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every datagram sent before now (the sender has exited): ends the reader with a marker.
    async fn drain(&self) -> Vec<String> {
        UnixDatagram::unbound().expect("socket").send_to(NOTIFY_END.as_bytes(), &self.path).expect("send");
        self.wait_until(10, "end marker", |m| m.last().is_some_and(|m| m == NOTIFY_END)).await;
        let mut all = self.messages();
        all.pop();
        all
    }
}

// Startup runs every rule; an edit runs the rule at once; an invalid edit keeps the old rule and logs
// file:line:col; a deleted rule stops being scheduled and its list is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_files_drive_runs() {
    let sandbox = support::start(support::sandbox_config(3_000)).await;
    // The last edit removes 40 % of the VIPs; this test is about files, not the mass-removal guard.
    let (dir, config) = setup(&sandbox, "[guards]\nmax_removal_share = 0.9\n");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 60).await;
    daemon.wait_for(1, "rule loaded", &[("rule", "vip")], 1).await;
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 5000.0));

    let vip = dir.path().join("rules/vip.rhai");
    std::fs::write(
        &vip,
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 4000.0 }\n",
    )
    .expect("edit");
    let runs = daemon.wait_for(1, "rule run", &[("rule", "vip"), ("trigger", "file")], 30).await;
    assert_eq!(runs[0]["outcome"], "ok", "{}", runs[0]);
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 4000.0));

    // An invalid edit: rejected with its position, the last good version keeps running.
    std::fs::write(
        &vip,
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) {\n  c.customFields.totalSpent >\n}\n",
    )
    .expect("edit");
    let rejected = daemon.wait_for(1, "rule rejected", &[], 30).await;
    assert!(rejected[0]["file"].as_str().expect("file").ends_with("vip.rhai"));
    assert_eq!(rejected[0]["line"], 4);
    daemon.wait_for(1, "rule kept", &[("rule", "vip")], 5).await;
    assert_eq!(daemon.events("rule run", &[("rule", "vip"), ("trigger", "file")]).len(), 1, "no run for a broken edit");

    // A deleted rule stops being scheduled; its list stays as it is.
    let veneto_before = list_members(&sandbox, "Geo - Veneto");
    std::fs::remove_file(dir.path().join("rules/geo-veneto.rhai")).expect("delete");
    daemon.wait_for(1, "rule removed", &[("rule", "geo-veneto")], 30).await;
    assert_eq!(list_members(&sandbox, "Geo - Veneto"), veneto_before);

    // SIGHUP re-reads everything: the repaired vip rule runs with trigger reload.
    std::fs::write(
        &vip,
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 5000.0 }\n",
    )
    .expect("edit");
    daemon.wait_for(2, "rule run", &[("rule", "vip"), ("trigger", "file")], 30).await;
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 5000.0));
    drop(daemon);
    sandbox.shutdown().await;
}

// An edit that breaks the rule's own tests (rules/NAME.test.toml) is rejected like a syntax error: the
// log names the failing case and the last good version keeps running, with no run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_failing_its_tests_is_rejected() {
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (dir, config) = setup(&sandbox, "");
    std::fs::copy("rules/vip.test.toml", dir.path().join("rules/vip.test.toml")).expect("copy the tests");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 60).await;
    let members = list_members(&sandbox, "VIP - Spend > 5000 EUR");
    std::fs::write(
        dir.path().join("rules/vip.rhai"),
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 50000.0 }\n",
    )
    .expect("edit");
    let rejected = daemon.wait_for(1, "rule rejected", &[], 30).await;
    let error = rejected[0]["error"].as_str().expect("error");
    assert!(error.contains("spent 6,800 EUR") && error.contains("expected true, got false"), "{}", rejected[0]);
    daemon.wait_for(1, "rule kept", &[("rule", "vip")], 5).await;
    assert!(daemon.events("rule run", &[("rule", "vip"), ("trigger", "file")]).is_empty(), "no run for it");
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), members);
    drop(daemon);
    sandbox.shutdown().await;
}

// SIGHUP with a valid config reloads (a changed rule runs with trigger reload); with an invalid one
// the daemon keeps running on the old config and still reacts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_or_keeps_running() {
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (dir, config) = setup(&sandbox, "");
    let mut daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup")], 60).await;

    std::fs::write(&config, "[api]\nbase_url = 42\n[nonsense]\n").expect("break config");
    daemon.signal("HUP");
    daemon.wait_for(1, "reload failed", &[], 30).await;
    let rejected = daemon.events("config rejected", &[]);
    assert_eq!(rejected.len(), 2, "every error at once: {rejected:?}");

    // A valid config that turns the watcher off, so the next edit is seen only through SIGHUP.
    write_config(&config, &sandbox.base_url(), "[daemon]\nwatch_rules = false\n");
    daemon.signal("HUP");
    let reloaded = daemon.wait_for(1, "reloaded", &[], 30).await;
    assert_eq!(reloaded[0]["watching"], false, "the reload stopped the watcher: {}", reloaded[0]);
    let lombardia = dir.path().join("rules/geo-lombardia.rhai");
    let text = std::fs::read_to_string(&lombardia).expect("read");
    std::fs::write(&lombardia, format!("// Edited while the watcher is off: only SIGHUP sees this.\n{text}"))
        .expect("edit");
    daemon.signal("HUP");
    daemon.wait_for(2, "reloaded", &[], 30).await;
    let run = daemon.wait_for(1, "rule run", &[("rule", "geo-lombardia"), ("trigger", "reload")], 30).await;
    assert_eq!(run[0]["outcome"], "ok");
    assert_eq!(daemon.events("rule run", &[("trigger", "reload")]).len(), 1, "only the changed rule runs");
    assert_eq!(
        list_members(&sandbox, "Geo - Lombardia"),
        count_where(&sandbox, |c| c.region.as_deref() == Some("Lombardia"))
    );
    // From the complete log: the edit was only ever seen by the reload.
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(15).await, 0);
    assert!(daemon.events("rule run", &[("trigger", "file")]).is_empty(), "the watcher was off");
    drop(daemon);
    sandbox.shutdown().await;
}

// A held mass removal is confirmed while the daemon runs: `sync RULE --allow-mass-removal` hands the
// confirmation to the daemon, which runs the rule once with removals allowed, and reports the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_removal_confirmed_while_running() {
    let sandbox = support::start(support::sandbox_config(3_000)).await;
    let (dir, config) = setup(&sandbox, "");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 60).await;
    let vip = dir.path().join("rules/vip.rhai");
    std::fs::write(
        &vip,
        "const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) { c.customFields.totalSpent > 20000.0 }\n",
    )
    .expect("edit");
    let held = daemon.wait_for(1, "rule run", &[("rule", "vip"), ("trigger", "file")], 30).await;
    assert_eq!(held[0]["outcome"], "held", "{}", held[0]);
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 5000.0));

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_segsync"))
            .args(["sync", "vip", "--allow-mass-removal", "--config"])
            .arg(&config)
            .env(KEY_VAR, support::KEY)
            .output()
            .expect("runs")
    })
    .await
    .expect("join");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("asked it to run vip once"), "{text}");
    assert!(text.contains("outcome ok"), "{text}");
    daemon.wait_for(1, "rule run", &[("rule", "vip"), ("trigger", "manual"), ("outcome", "ok")], 5).await;
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 20000.0));
    drop(daemon);
    sandbox.shutdown().await;
}

// `sync RULE` while the daemon runs hands the run to the daemon and prints its outcome; `status`
// shows the daemon running and the file on disk as the version it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_while_running_is_handed_to_the_daemon() {
    let sandbox = support::start(support::sandbox_config(1_000)).await;
    let (_dir, config) = setup(&sandbox, "");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 60).await;
    let out = command(&["sync", "geo-veneto"], &config).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("asked it to run geo-veneto once"), "{text}");
    assert!(text.contains("geo-veneto: added 0, removed 0, outcome ok"), "{text}");
    daemon.wait_for(1, "run requested", &[("rule", "geo-veneto")], 5).await;
    daemon.wait_for(1, "rule run", &[("rule", "geo-veneto"), ("trigger", "manual")], 5).await;

    let out = command(&["status", "--json"], &config).await;
    let doc: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(out.status.code(), Some(0), "{doc}");
    assert_eq!(doc["daemon"]["running"], true, "{doc}");
    let rules = doc["rules"].as_array().expect("rules");
    assert!(rules.iter().all(|r| r["file"] == "running"), "{doc}");
    drop(daemon);
    sandbox.shutdown().await;
}

// A long pass reports itself: `pass started`, `pass progress` every 10 s with the contacts read and
// an ETA, and the same progress on the systemd status line while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_passes_report_progress() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    // A plan of 3 requests a second: the first pass (~38 requests) lasts well over 10 s.
    let (dir, config) = setup(&sandbox, "");
    let slow = "plan = \"custom\"\nrequests_per_minute = 600\nrequests_per_second = 3\nbudget_share = 1.0";
    let text = std::fs::read_to_string(&config).expect("read").replace("plan = \"unlimited\"", slow);
    std::fs::write(&config, text).expect("write");
    let notify = NotifySocket::bind(dir.path());
    let daemon = Daemon::start(&config, &[notify.env()]);
    let started = daemon.wait_for(1, "pass started", &[("trigger", "startup")], 20).await;
    assert_eq!(started[0]["rules"], 5, "{}", started[0]);
    let progress = daemon.wait_for(1, "pass progress", &[("trigger", "startup")], 30).await;
    assert!(progress[0]["api_requests"].as_u64().is_some_and(|n| n > 0), "{}", progress[0]);
    assert!(progress[0]["contacts"].as_u64().is_some_and(|n| n > 0), "{}", progress[0]);
    let status = notify.messages();
    assert!(status.iter().any(|m| m.starts_with("STATUS=pass (startup, 5 rule(s)) ")), "{status:?}");
    daemon.wait_for(1, "pass finished", &[("trigger", "startup")], 60).await;
    drop(daemon);
    sandbox.shutdown().await;
}

// Edits arriving while a rule runs coalesce into one follow-up run. vip's startup run is held in
// its commit (SEGSYNC_FAULT) until the test has seen the daemon load four edits; once released,
// exactly one file-triggered run follows, on the last edit. Counted from the complete log after
// the daemon exits, so a late extra run cannot escape the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn triggers_during_a_run_coalesce() {
    let sandbox = support::start(support::sandbox_config(4_000)).await;
    let (dir, config) = setup(&sandbox, "");
    let release = dir.path().join("release");
    let mut daemon = Daemon::start(&config, &[("SEGSYNC_FAULT", format!("hold-commit:vip:{}", release.display()))]);
    // The watcher is started before the startup pass.
    daemon.wait_for(1, "pass started", &[("trigger", "startup")], 30).await;
    let vip = dir.path().join("rules/vip.rhai");
    for (k, threshold) in [4000, 3000, 2000, 1000].into_iter().enumerate() {
        std::fs::write(&vip, format!("const LIST = \"VIP - Spend > 5000 EUR\";\nfn matches(c) {{ c.customFields.totalSpent > {threshold}.0 }}\n"))
            .expect("edit");
        // The startup load logged vip once; each edit is one more load.
        daemon.wait_for(k + 2, "rule loaded", &[("rule", "vip")], 30).await;
    }
    // The hold keeps vip's startup run from finishing until the release: the edits all came during it.
    assert!(daemon.events("rule run", &[("rule", "vip")]).is_empty(), "no vip run has finished yet");
    std::fs::write(&release, "").expect("release");
    daemon.wait_for(1, "rule run", &[("rule", "vip"), ("trigger", "file")], 60).await;
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 1000.0));
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(15).await, 0);
    let runs = daemon.events("rule run", &[("rule", "vip")]);
    let triggers: Vec<&str> = runs.iter().filter_map(|r| r["trigger"].as_str()).collect();
    assert_eq!(triggers, ["startup", "file"], "four edits during a run: one follow-up run");
    drop(daemon);
    sandbox.shutdown().await;
}

// SIGTERM during an apply exits 0 within the deadline, recording the interrupted runs; the next start converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_apply_then_restart_converges() {
    let faults = Faults { latency: Duration::from_millis(60), ..Faults::default() };
    let sandbox = support::start(SandboxConfig { faults, ..support::sandbox_config(20_000) }).await;
    let (_dir, config) = setup(&sandbox, "[daemon]\nshutdown_timeout_secs = 10\n");
    let mut daemon = Daemon::start(&config, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while sandbox.stats().count("POST /contacts/list/contacts") < 2 {
        assert!(Instant::now() < deadline, "never reached the adds");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent = Instant::now();
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(15).await, 0);
    assert!(sent.elapsed() < Duration::from_secs(11), "stopped within the deadline");
    daemon.wait_for(1, "stopped", &[], 2).await;
    let interrupted = daemon.events("rule run", &[("outcome", "interrupted")]);
    assert!(!interrupted.is_empty(), "interrupted runs are recorded and logged");
    for run in &interrupted {
        // `sync` prints "outcome interrupted: DETAIL": the detail says why, not the outcome again.
        let detail = run["detail"].as_str().unwrap_or_default();
        assert!(!detail.contains("interrupted") && detail.contains("stop"), "{run}");
    }
    assert!(daemon.events("rule run", &[("outcome", "failed")]).is_empty(), "a shutdown is not a failure");
    drop(daemon);

    let restarted = Daemon::start(&config, &[]);
    restarted.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 90).await;
    assert_eq!(list_members(&sandbox, "VIP - Spend > 5000 EUR"), count_where(&sandbox, |c| spent(c) > 5000.0));
    assert_eq!(
        list_members(&sandbox, "Geo - Veneto"),
        count_where(&sandbox, |c| c.region.as_deref() == Some("Veneto"))
    );
    assert_eq!(sandbox.with_store(|s| s.lists().len()), 5, "no duplicate lists");
    drop(restarted);
    sandbox.shutdown().await;
}

// On a fake notify socket: READY=1 after the first load, STATUS=, WATCHDOG=1 from the loop,
// RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, STOPPING=1 at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications() {
    let sandbox = support::start(support::sandbox_config(500)).await;
    let (dir, config) = setup(&sandbox, "");
    let notify = NotifySocket::bind(dir.path());
    let mut daemon = Daemon::start(&config, &[notify.env(), ("WATCHDOG_USEC", "300000".into())]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup")], 60).await;
    let pinged = |m: &[String]| m.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2;
    notify.wait_until(10, "two WATCHDOG=1", pinged).await;
    daemon.signal("HUP");
    daemon.wait_for(1, "reloaded", &[], 30).await;
    let ready_again = |m: &[String]| {
        m.iter().position(|m| m.contains("RELOADING=1")).is_some_and(|r| m[r..].iter().any(|m| m.contains("READY=1")))
    };
    notify.wait_until(10, "READY=1 after RELOADING=1", ready_again).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(15).await, 0);
    let got = notify.drain().await;
    let index = |pred: &dyn Fn(&String) -> bool| got.iter().position(pred);
    let ready = index(&|m| m.contains("READY=1")).expect("READY=1");
    assert!(got[ready].contains("STATUS="), "{got:?}");
    assert!(got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "{got:?}");
    assert!(got.iter().any(|m| m.starts_with("STATUS=") && m.contains("last pass")), "{got:?}");
    let reloading = index(&|m| m.contains("RELOADING=1")).expect("RELOADING=1");
    assert!(got[reloading].contains("MONOTONIC_USEC="), "{got:?}");
    assert!(got[reloading..].iter().any(|m| m.contains("READY=1")), "READY=1 after the reload: {got:?}");
    // STOPPING=1 comes after the reload's READY=1: the shutdown is the last state change.
    let stopping = index(&|m| m.contains("STOPPING=1")).expect("STOPPING=1");
    assert!(stopping > reloading, "{got:?}");
    drop(daemon);
    sandbox.shutdown().await;
}

// A pass's commit holding the state database (as a first sync's million history rows do; injected
// with SEGSYNC_FAULT, held until the test releases it) does not hold up the event loop: three more
// WATCHDOG=1 arrive while it is held, every gap under the 2 s WATCHDOG_USEC systemd would kill at.
// Before the daemon's state reads and writes moved off the loop, its 2-second request poll waited
// on the database for the whole commit, and no ping came until the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_is_fed_through_a_long_state_write() {
    let sandbox = support::start(support::sandbox_config(500)).await;
    let (dir, config) = setup(&sandbox, "");
    let notify = NotifySocket::bind(dir.path());
    let release = dir.path().join("release");
    let mut daemon = Daemon::start(
        &config,
        &[
            notify.env(),
            ("WATCHDOG_USEC", "2000000".into()),
            ("SEGSYNC_FAULT", format!("hold-commit:vip:{}", release.display())),
        ],
    );
    let held = dir.path().join("release.held");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !held.exists() {
        assert!(Instant::now() < deadline, "vip's commit never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held_at = Instant::now();
    let before = notify.times_of("WATCHDOG=1").len();
    notify
        .wait_until(15, "three WATCHDOG=1 while the commit is held", |m| {
            m.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= before + 3
        })
        .await;
    std::fs::write(&release, "").expect("release");
    let released_at = Instant::now();
    let run = daemon.wait_for(1, "rule run", &[("rule", "vip"), ("trigger", "startup")], 60).await;
    assert_eq!(run[0]["outcome"], "ok", "{run:?}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(15).await, 0);
    notify.drain().await;
    let pings = notify.times_of("WATCHDOG=1");
    let window: Vec<Instant> = std::iter::once(held_at)
        .chain(pings.iter().copied().filter(|t| (held_at..=released_at).contains(t)))
        .chain(std::iter::once(released_at))
        .collect();
    let worst = window.windows(2).map(|w| w[1] - w[0]).max().expect("a window");
    assert!(worst < Duration::from_secs(2), "the watchdog went {worst:?} unfed during the commit: {pings:?}");
    drop(daemon);
    sandbox.shutdown().await;
}

// The README's first command: the daemon on the shipped config.toml (bundled sandbox, production
// pacing, 20,000 demo contacts) fills the five shipped lists, then stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_config_runs_on_the_bundled_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy("config.toml", dir.path().join("config.toml")).expect("copy config");
    support::copy_shipped_rules(dir.path(), true, |text| text);
    let mut daemon = Daemon::start(&dir.path().join("config.toml"), &[]);
    daemon.wait_for(1, "bundled sandbox started", &[], 30).await;
    let runs = daemon.wait_for(5, "rule run", &[("trigger", "startup")], 90).await;
    for run in &runs {
        assert_eq!(run["outcome"], "ok", "{run}");
        assert!(run["added"].as_u64().expect("added") > 0, "{run}");
    }
    let pass = daemon.wait_for(1, "pass finished", &[("trigger", "startup")], 5).await;
    // 239 is the lower bound for the demo data: 200 pages and the empty page that ends the read,
    // 27 add batches, 5 creates, the directory read and one re-read after each create (no list
    // is ever split across two of one name). The churn may shift a page or a batch by one.
    let requests = pass[0]["api_requests"].as_u64().expect("api_requests");
    assert!((239..=242).contains(&requests), "the first pass is at its lower bound: {}", pass[0]);
    // Transparent huge pages are off for the daemon: with them its passes held 40 % more memory.
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.child.id())).expect("status");
    let thp = status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(str::trim);
    assert_eq!(thp, Some("0"), "the daemon runs with THP_enabled 0:\n{status}");
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(30).await, 0);
    assert!(dir.path().join("segsync.db").exists(), "state beside the config");
}

/// Every run the state database holds, all rules, newest first within a rule.
fn runs_in(db: &Path) -> Vec<segsync::state::RunRecord> {
    segsync::state::State::open(db).and_then(|s| s.last_runs(100)).unwrap_or_default()
}

// The real event loop, in-process, on a clock set just before the spring DST switch in Rome: a rule
// scheduled at 03:00 fires at 01:00 UTC (02:00 CET does not exist that night), through the timer, the
// event loop and a pass; a rule due at 04:00 does not fire; the stop token ends the loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_fires_through_the_loop_across_dst() {
    let sandbox = support::start(support::sandbox_config(300)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("rules")).expect("mkdir");
    let rule = |list: &str, schedule: &str| {
        format!("const LIST = \"{list}\";\nconst SCHEDULE = \"{schedule}\";\nfn matches(c) {{ true }}\n")
    };
    std::fs::write(dir.path().join("rules/at3.rhai"), rule("At three", "0 0 3 * * *")).expect("write");
    std::fs::write(dir.path().join("rules/at4.rhai"), rule("At four", "0 0 4 * * *")).expect("write");
    let config_path = dir.path().join("config.toml");
    write_config(&config_path, &sandbox.base_url(), "[daemon]\nwatch_rules = false\n");
    // SAFETY of the environment: the key variable is read by this process's config only.
    let config = {
        let text = std::fs::read_to_string(&config_path).expect("read").replace(
            &format!("key_env = \"{KEY_VAR}\""),
            &format!("key_file = \"{}\"", dir.path().join("key").display()),
        );
        std::fs::write(dir.path().join("key"), support::KEY).expect("key");
        std::fs::write(&config_path, text).expect("write");
        segsync::config::Config::load(&config_path).expect("config")
    };
    // 01:59:57 CET; three seconds later it is 03:00:00 CEST.
    let base = chrono::DateTime::parse_from_rfc3339("2026-03-29T00:59:57Z").expect("time").to_utc();
    let clock = segsync::schedule::Clock::tokio_at(base);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut daemon = tokio::spawn(segsync::daemon::run(config, clock, stop.clone()));

    let db = dir.path().join("segsync.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    let cron_run = loop {
        let runs = runs_in(&db);
        if let Some(run) = runs.iter().find(|r| r.trigger == segsync::outcome::Trigger::Cron) {
            break run.clone();
        }
        if daemon.is_finished() {
            panic!("the daemon ended early: {:?}", (&mut daemon).await);
        }
        assert!(Instant::now() < deadline, "no cron run within 30 s: {runs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(cron_run.rule.as_str(), "at3", "{cron_run:?}");
    assert_eq!(cron_run.outcome, segsync::outcome::Outcome::Ok, "{cron_run:?}");
    let runs = runs_in(&db);
    assert_eq!(runs.iter().filter(|r| r.trigger == segsync::outcome::Trigger::Startup).count(), 2, "{runs:?}");
    assert!(!runs.iter().any(|r| r.rule.as_str() == "at4" && r.trigger == segsync::outcome::Trigger::Cron), "{runs:?}");
    stop.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(10), daemon).await.expect("stops").expect("joins");
    assert!(ended.is_ok(), "{ended:?}");
    sandbox.shutdown().await;
}

// A panic inside a pass (injected: debug builds only) is that pass's failure: every rule of it is
// recorded and logged as failed, naming the panic, and the daemon goes on running rules (a file
// edit runs its rule, ok) and stops cleanly with nothing in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_pass_fails_that_pass_and_the_daemon_goes_on() {
    let sandbox = support::start(support::sandbox_config(500)).await;
    let (dir, config) = setup(&sandbox, "");
    let mut daemon = Daemon::start(&config, &[("SEGSYNC_FAULT", "panic-in-pass:vip".into())]);
    let failed = daemon.wait_for(5, "rule run", &[("trigger", "startup"), ("outcome", "failed")], 60).await;
    assert!(failed.iter().all(|r| r["detail"].as_str().is_some_and(|d| d.contains("panicked"))), "{failed:?}");
    daemon.wait_for(1, "pass panicked", &[], 5).await;
    let geo = dir.path().join("rules/geo-lombardia.rhai");
    let text = std::fs::read_to_string(&geo).expect("read");
    std::fs::write(&geo, format!("{text}\n// edited\n")).expect("edit");
    let runs = daemon.wait_for(1, "rule run", &[("rule", "geo-lombardia"), ("trigger", "file")], 30).await;
    assert_eq!(runs[0]["outcome"], "ok", "{}", runs[0]);
    assert_eq!(
        list_members(&sandbox, "Geo - Lombardia"),
        count_where(&sandbox, |c| c.region.as_deref() == Some("Lombardia"))
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(30).await, 0);
    let stopping = daemon.events("shutting down", &[]);
    assert_eq!(stopping[0]["in_flight_rules"], 0, "no rule left in flight: {stopping:?}");
}

// A run request the daemon cannot take is answered, not timed out: `sync` for a rule added after
// start (with watch_rules = false) prints the daemon's reason and exits 2 as soon as it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_daemon_cannot_take_is_answered() {
    let sandbox = support::start(support::sandbox_config(500)).await;
    let (dir, config) = setup(&sandbox, "[daemon]\nwatch_rules = false\n");
    let daemon = Daemon::start(&config, &[]);
    daemon.wait_for(5, "rule run", &[("trigger", "startup")], 60).await;
    std::fs::write(dir.path().join("rules/newrule.rhai"), "const LIST = \"New\";\nfn matches(c) { true }\n")
        .expect("write");
    let out = command(&["sync", "newrule"], &config).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("newrule: not run: the daemon runs no rule named \"newrule\""), "{text}");
    assert!(text.contains("watch_rules is false"), "the way out: {text}");
    let ignored = daemon.wait_for(1, "run request ignored", &[("rule", "newrule")], 5).await;
    assert!(ignored[0]["reason"].as_str().is_some_and(|r| r.contains("SIGHUP")), "{ignored:?}");
    assert!(!sandbox.with_store(|s| s.lists().iter().any(|l| l.name == "New")), "nothing ran");
    drop(daemon);
    sandbox.shutdown().await;
}

// A helper edit is a rule edit (issue 22): changing rules/lib/money.rhai reloads, retests and reruns
// every rule importing it, and only those, with a new hash; a broken helper is rejected at the
// helper's own line for each importer, and the last good versions keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helper_edit_reruns_its_importers() {
    let sandbox = support::start(support::sandbox_config(3_000)).await;
    let (dir, config) = setup(&sandbox, "");
    let lib = dir.path().join("rules/lib");
    std::fs::create_dir(&lib).expect("lib");
    let money = lib.join("money.rhai");
    let helper = |threshold: &str| {
        format!("fn spent(c) {{ c.customFields.get(\"totalSpent\") ?? 0.0 }}\nfn threshold() {{ {threshold} }}\n")
    };
    std::fs::write(&money, helper("5000.0")).expect("helper");
    for (name, list, factor) in [("big", "Big spenders", "1.0"), ("half", "Half big spenders", "0.5")] {
        std::fs::write(
            dir.path().join(format!("rules/{name}.rhai")),
            format!(
                "import \"money\" as money;\nconst LIST = \"{list}\";\n\
                 fn matches(c) {{ money::spent(c) > money::threshold() * {factor} }}\n"
            ),
        )
        .expect("rule");
    }
    // A segment of a segment: rerun when the helper under `big` changes.
    std::fs::write(
        dir.path().join("rules/big-lombardy.rhai"),
        "const LIST = \"Big spenders Lombardia\";\nfn matches(c) { segment(\"big\", c) && c.region == \"Lombardia\" }\n",
    )
    .expect("rule");
    let lombard = |c: &segsync_sandbox::store::Contact| c.region.as_deref() == Some("Lombardia");
    let daemon = Daemon::start(&config, &[]);
    let started = daemon.wait_for(8, "rule run", &[("trigger", "startup"), ("outcome", "ok")], 60).await;
    assert_eq!(list_members(&sandbox, "Big spenders"), count_where(&sandbox, |c| spent(c) > 5000.0));
    let big_lombardy = count_where(&sandbox, |c| spent(c) > 5000.0 && lombard(c));
    assert!(big_lombardy > 0);
    assert_eq!(list_members(&sandbox, "Big spenders Lombardia"), big_lombardy);
    assert_eq!(list_members(&sandbox, "Half big spenders"), count_where(&sandbox, |c| spent(c) > 2500.0));

    std::fs::write(&money, helper("4000.0")).expect("edit");
    let big = daemon.wait_for(1, "rule run", &[("rule", "big"), ("trigger", "file")], 30).await;
    daemon.wait_for(1, "rule run", &[("rule", "half"), ("trigger", "file")], 30).await;
    daemon.wait_for(1, "rule run", &[("rule", "big-lombardy"), ("trigger", "file")], 30).await;
    assert_eq!(list_members(&sandbox, "Big spenders"), count_where(&sandbox, |c| spent(c) > 4000.0));
    assert_eq!(
        list_members(&sandbox, "Big spenders Lombardia"),
        count_where(&sandbox, |c| spent(c) > 4000.0 && lombard(c))
    );
    assert_eq!(list_members(&sandbox, "Half big spenders"), count_where(&sandbox, |c| spent(c) > 2000.0));
    let before = started.iter().find(|e| e["rule"] == "big").expect("big ran at startup");
    assert_ne!(big[0]["rule_hash"], before["rule_hash"], "the helper is part of the rule's hash");
    let rerun = daemon.events("rule run", &[("trigger", "file")]);
    assert!(rerun.iter().all(|e| ["big", "half", "big-lombardy"].iter().any(|r| e["rule"] == *r)), "only importers");

    std::fs::write(&money, "fn spent(c) {\n    c.customFields.totalSpent +\n}\n").expect("break");
    // Each importer at the helper's line, and the segment built on one of them at its own call.
    let rejected = daemon.wait_for(3, "rule rejected", &[], 30).await;
    let at_helper: Vec<&serde_json::Value> =
        rejected.iter().filter(|e| e["file"].as_str().is_some_and(|f| f.ends_with("lib/money.rhai"))).collect();
    assert!(at_helper.iter().all(|e| e["line"] == 3), "{at_helper:?}");
    let mut stopped: Vec<&str> = at_helper.iter().filter_map(|e| e["rule"].as_str()).collect();
    stopped.sort_unstable();
    assert_eq!(stopped, ["big", "half"], "reported once for each importer");
    let dependent = rejected.iter().find(|e| e["rule"] == "big-lombardy").expect("the dependent is refused too");
    assert_eq!(dependent["line"], 2, "{dependent}");
    daemon.wait_for(1, "rule kept", &[("rule", "big-lombardy")], 5).await;
    daemon.wait_for(1, "rule kept", &[("rule", "big")], 5).await;
    daemon.wait_for(1, "rule kept", &[("rule", "half")], 5).await;
    assert_eq!(
        daemon.events("rule run", &[("rule", "big"), ("trigger", "file")]).len(),
        1,
        "no run for a broken helper"
    );
    drop(daemon);
    sandbox.shutdown().await;
}

// A partitioned rule in the daemon (issue 22): each list runs and is logged on its own (`geo:LIST`),
// and the rule file gets one summary run, so health and `status` see the file as run, not overdue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_rule_runs_per_list_and_as_a_file() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    let dir = support::rule_files(&[("geo", support::GEO_TWO_LISTS)]);
    let config = dir.path().join("config.toml");
    write_config(&config, &sandbox.base_url(), "");
    let daemon = Daemon::start(&config, &[]);
    let summary = daemon.wait_for(1, "rule run", &[("rule", "geo"), ("trigger", "startup")], 60).await;
    assert_eq!(summary[0]["outcome"], "ok", "{}", summary[0]);
    for region in ["Lombardia", "Veneto"] {
        let list = format!("Geo - {region}");
        let runs = daemon.events("rule run", &[("rule", &format!("geo:{list}"))]);
        assert_eq!(runs.len(), 1, "one run for {list}");
        assert_eq!(list_members(&sandbox, &list), count_where(&sandbox, |c| c.region.as_deref() == Some(region)));
    }
    let out = command(&["status", "--json"], &config).await;
    let status: Value = serde_json::from_slice(&out.stdout).expect("status --json");
    let geo = status["rules"].as_array().expect("rules").iter().find(|r| r["rule"] == "geo").expect("geo").clone();
    assert_eq!(geo["outcome"], "ok", "{geo}");
    assert_eq!(out.status.code(), Some(0), "{status}");
    drop(daemon);
    sandbox.shutdown().await;
}

// The daemon with a suppression rule (issue 22): broken at startup, no list changes (fails closed);
// once it loads, its contacts are kept out; broken again by an edit, its last good version keeps
// suppressing and the lists go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suppression_rule_broken_at_startup_changes_no_list() {
    let sandbox = support::start(support::sandbox_config(500)).await;
    let everyone = "const LIST = \"Everyone\";\nfn matches(c) { true }\n";
    let good = "const MODE = \"suppress\";\nfn matches(c) { c.customFields.get(\"gdprOptOut\") ?? false }\n";
    let broken = "const MODE = \"suppress\";\nfn matches(c) { c.customFields.gdprOptOut == }\n";
    let dir = support::rule_files(&[("everyone", everyone), ("optout", broken)]);
    let config = dir.path().join("config.toml");
    write_config(&config, &sandbox.base_url(), "");
    let daemon = Daemon::start(&config, &[]);
    let run = daemon.wait_for(1, "rule run", &[("rule", "everyone"), ("trigger", "startup")], 60).await;
    assert_eq!(run[0]["outcome"], "failed", "{}", run[0]);
    assert!(
        run[0]["detail"].as_str().is_some_and(|d| d.contains("suppression rule optout does not load")),
        "{}",
        run[0]
    );
    assert_eq!(list_members(&sandbox, "Everyone"), 0);

    let optout = dir.path().join("rules/optout.rhai");
    std::fs::write(&optout, good).expect("fix");
    daemon.wait_for(1, "rule run", &[("rule", "optout"), ("trigger", "file")], 30).await;
    std::fs::write(dir.path().join("rules/everyone.rhai"), format!("// edited\n{everyone}")).expect("edit");
    let run = daemon.wait_for(1, "rule run", &[("rule", "everyone"), ("trigger", "file")], 30).await;
    assert_eq!(run[0]["outcome"], "ok", "{}", run[0]);
    let opted = |c: &segsync_sandbox::store::Contact| c.custom_fields.get("gdprOptOut").is_some();
    assert_eq!(list_members(&sandbox, "Everyone"), count_where(&sandbox, |c| !opted(c)));

    std::fs::write(&optout, broken).expect("break");
    daemon.wait_for(1, "rule kept", &[("rule", "optout")], 30).await;
    std::fs::write(dir.path().join("rules/everyone.rhai"), format!("// edited again\n{everyone}")).expect("edit");
    let runs = daemon.wait_for(2, "rule run", &[("rule", "everyone"), ("trigger", "file")], 30).await;
    assert_eq!(runs[1]["outcome"], "ok", "the kept version still suppresses: {}", runs[1]);
    assert_eq!(list_members(&sandbox, "Everyone"), count_where(&sandbox, |c| !opted(c)));
    drop(daemon);
    sandbox.shutdown().await;
}
