//! segsync against gateways that misbehave on purpose (`support::hostile`), one test per way a
//! server can be wrong: sparse records, odd totals, endless bodies, long 429s, redirects, echoed
//! keys, unconfirmed writes, a missing bulk form, and two instances racing to create a list.
//! Every test runs the real binary and asserts its exit status, its message, and that no list
//! lost a member (the lists are compared whole, before and after), within bounded time and memory.
use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::hostile::{Behaviour, Hostile, Recorder, endless_body};
use segsync_sandbox::{Sandbox, SandboxConfig};
use serde_json::{Value, json};

use crate::support::KEY_VAR;

const GEO: &str =
    "const LIST = \"Geo - Lombardia\";\nconst FILTER = #{ region: \"Lombardia\" };\nfn matches(c) { true }\n";
const VIP: &str =
    "const LIST = \"VIP\";\nfn matches(c) { let s = c.customFields.get(\"totalSpent\") ?? 0.0; s > 5000.0 }\n";

/// A folder with rules, a state file and one config per gateway it talks to.
struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new(rules: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("rules")).expect("mkdir");
        for (name, text) in rules {
            std::fs::write(dir.path().join("rules").join(format!("{name}.rhai")), text).expect("write rule");
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A config named `name` pointing at `base_url`, with `extra` lines under [api].
    fn config(&self, name: &str, base_url: &str, extra: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(
            &path,
            format!(
                "[api]\nbase_url = \"{base_url}\"\nkey_env = \"{KEY_VAR}\"\nplan = \"unlimited\"\nmax_retries = 1\n\
                 timeout_secs = 10\n{extra}\n[rules]\ndefault_schedule = \"0 0 3 1 1 *\"\ntime_zone = \"Europe/Rome\"\n"
            ),
        )
        .expect("write config");
        path
    }
}

/// What a run of the binary did.
#[derive(Debug)]
struct Ran {
    code: i32,
    out: String,
    /// Peak resident memory of the segsync process (VmHWM), in MB.
    peak_mb: u64,
    elapsed: Duration,
}

fn segsync(args: &[&str], config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.args(args).arg("--config").arg(config).arg("--log-format").arg("json");
    cmd.env(KEY_VAR, support::KEY).env("RUST_LOG", "info").stdin(Stdio::null());
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Runs the binary to its end (killing it after `limit`), sending `signal` after `signal_after`.
async fn run_with(mut cmd: Command, limit: Duration, signal: Option<(&'static str, Duration)>) -> Ran {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn segsync");
        let pid = child.id();
        // Drain both pipes on threads so a chatty child never blocks on a full pipe.
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut s).ok();
            s
        });
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut stderr, &mut s).ok();
            s
        });
        let mut peak_kb = 0u64;
        let mut signalled = false;
        let code = loop {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM:"))
            {
                let kb = line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
                peak_kb = peak_kb.max(kb);
            }
            if let Some(status) = child.try_wait().expect("wait") {
                break status.code().unwrap_or(-1);
            }
            if let Some((name, after)) = signal
                && !signalled
                && started.elapsed() >= after
            {
                Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().expect("kill");
                signalled = true;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("segsync ran longer than {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = err.join().unwrap_or_default();
        let logs: Vec<serde_json::Value> = err.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        support::assert_log_schema(&logs);
        let text = format!("{}{err}", out.join().unwrap_or_default());
        Ran { code, out: text, peak_mb: peak_kb / 1024, elapsed: started.elapsed() }
    })
    .await
    .expect("join")
}

async fn run(args: &[&str], config: &Path) -> Ran {
    run_with(segsync(args, config), Duration::from_secs(120), None).await
}

/// Every list on the sandbox, by name and id, with its members.
type Lists = BTreeMap<(String, String), Vec<String>>;

fn lists(sandbox: &Sandbox) -> Lists {
    sandbox.with_store(|s| {
        let ids: Vec<(String, String)> = s.lists().iter().map(|l| (l.name.clone(), l.id.clone())).collect();
        ids.into_iter().map(|(name, id)| ((name, id.clone()), s.member_ids(&id).expect("list"))).collect()
    })
}

fn total_members(lists: &Lists) -> usize {
    lists.values().map(Vec::len).sum()
}

/// A sandbox whose lists were filled by a clean sync of `site`'s rules.
async fn primed(config: SandboxConfig, site: &Site) -> (Sandbox, Lists) {
    let sandbox = support::start(config).await;
    let direct = site.config("direct.toml", &sandbox.base_url(), "");
    let ran = run(&["sync"], &direct).await;
    assert_eq!(ran.code, 0, "the priming sync: {}", ran.out);
    let before = lists(&sandbox);
    assert!(total_members(&before) > 0, "primed lists have members");
    (sandbox, before)
}

/// The summary events of a run's log.
fn summaries(out: &str) -> Vec<Value> {
    out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["message"] == "rule run").collect()
}

// 1. Members whose records lack the FILTER field (absent or null) are evaluation errors, kept; never removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_member_records_are_kept() {
    let site = Site::new(&[("geo", GEO)]);
    let (sandbox, before) = primed(support::sandbox_config(3000), &site).await;
    let behaviour = Behaviour::default().edit(|req, body| {
        if req.is_member_read()
            && let Some(contacts) = body["contacts"].as_array_mut()
        {
            // The first page's first member has no region; its second has region null.
            if req.offset() == 0 && contacts.len() >= 2 {
                contacts[0].as_object_mut().expect("object").remove("region");
                contacts[1]["region"] = Value::Null;
            }
        }
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let ran = run(&["sync"], &site.config("hostile.toml", &hostile.base_url, "")).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    let runs = summaries(&ran.out);
    assert_eq!(runs[0]["eval_errors"], 2, "{}", ran.out);
    assert_eq!(runs[0]["removed"], 0, "{}", ran.out);
    assert!(runs[0]["first_eval_error"].as_str().expect("text").contains("FILTER region"), "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "no member left the list");
    sandbox.shutdown().await;
}

// 2. The list directory is read with the server's pagination; a repeated page is an error, never a new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_directory_is_read_whole_before_any_create() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let sandbox = support::start(SandboxConfig { page_dialect: true, ..support::sandbox_config(2000) }).await;
    // 150 older lists whose names contain the rule's: the rule's own list lands on the second page.
    sandbox.with_store(|s| {
        for n in 0..150 {
            s.create_list(format!("Geo - Lombardia (archive {n:03})"), String::new(), "2020-01-01T00:00:00Z".into());
        }
    });
    let paged = site.config("paged.toml", &sandbox.base_url(), "pagination = \"page\"");
    let ran = run(&["sync"], &paged).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    let before = lists(&sandbox);
    assert_eq!(before.len(), 152);

    // A new state file (a fresh install) finds both lists on their pages; nothing is created.
    std::fs::remove_file(site.path("segsync.db")).expect("forget the bindings");
    let ran = run(&["sync"], &paged).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "no list created, no member lost");

    // Pinned to offsets, the page-based server repeats its first page: the read fails, nothing is created.
    std::fs::remove_file(site.path("segsync.db")).expect("forget the bindings");
    let offsets = site.config("offsets.toml", &sandbox.base_url(), "pagination = \"offset\"");
    let ran = run(&["sync"], &offsets).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(ran.out.contains("ignores `offset`"), "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "no list created, no member lost");

    // Left to detection, the same server is switched to `page` (said once) and read whole.
    std::fs::remove_file(site.path("segsync.db")).expect("forget the bindings");
    let detected = site.config("detected.toml", &sandbox.base_url(), "");
    let ran = run(&["sync"], &detected).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert!(ran.out.contains("paging learned"), "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "no list created, no member lost");
    sandbox.shutdown().await;
}

// 3. Two segsyncs creating the same list at once both bind the oldest; the segment is never split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_bind_the_same_list() {
    let site = Site::new(&[("vip", VIP)]);
    let sandbox = support::start(support::sandbox_config(2000)).await;
    // Creating a list takes a while, so both instances look, find nothing, and both create.
    let behaviour = Behaviour::default().delay(|req| {
        if req.method == axum::http::Method::POST && req.path == "/contacts/list" {
            Duration::from_millis(700)
        } else {
            Duration::ZERO
        }
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let a = site.config("a.toml", &hostile.base_url, "");
    let b_dir = Site::new(&[("vip", VIP)]);
    let b = b_dir.config("b.toml", &hostile.base_url, "");
    let (ran_a, ran_b) = tokio::join!(run(&["sync"], &a), run(&["sync"], &b));
    assert_eq!(ran_a.code, 0, "{}", ran_a.out);
    assert_eq!(ran_b.code, 0, "{}", ran_b.out);
    let after = lists(&sandbox);
    let named: Vec<(&(String, String), &Vec<String>)> = after.iter().filter(|((n, _), _)| n == "VIP").collect();
    assert_eq!(named.len(), 2, "both created (the race this test stages): {after:?}");
    let filled: Vec<_> = named.iter().filter(|(_, m)| !m.is_empty()).collect();
    assert_eq!(filled.len(), 1, "exactly one list holds the segment: {named:?}");
    // The instance whose re-read saw both lists says so (the other may have looked before the second create).
    let warned = [&ran_a, &ran_b].iter().filter(|r| r.out.contains("\"message\":\"list duplicates\"")).count();
    assert!(warned >= 1, "a warning names the duplicates:\n{}\n{}", ran_a.out, ran_b.out);
    // Both instances keep writing to that one list: a change reaches it whichever runs.
    let (bound_a, bound_b) = (summaries(&ran_a.out)[0]["list_id"].clone(), summaries(&ran_b.out)[0]["list_id"].clone());
    assert_eq!(bound_a, bound_b, "both bound the same list");
    assert_eq!(bound_a.as_str(), Some(filled[0].0.1.as_str()));
    sandbox.shutdown().await;
}

/// A proxy that rewrites the `total` of contact reads with `f(real total, request)`.
fn rewrite_total(f: impl Fn(u64, &support::hostile::Req) -> u64 + Send + Sync + 'static) -> Behaviour {
    Behaviour::default().edit(move |req, body| {
        if req.path == "/contacts"
            && req.method == axum::http::Method::GET
            && let Some(total) = body["total"].as_u64()
        {
            body["total"] = json!(f(total, req));
        }
    })
}

/// Runs a sync through `behaviour`, expecting it to fail before any write with `message`.
async fn fails_without_loss(behaviour: Behaviour, contacts: u64, message: &str) -> Ran {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let (sandbox, before) = primed(support::sandbox_config(contacts), &site).await;
    let writes = sandbox.stats().writes();
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let ran = run(&["sync"], &site.config("hostile.toml", &hostile.base_url, "")).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(ran.out.contains(message), "expected {message:?} in:\n{}", ran.out);
    assert_eq!(sandbox.stats().writes(), writes, "no write at all");
    assert_eq!(lists(&sandbox), before, "every list is exactly as it was");
    assert!(ran.elapsed < Duration::from_secs(30), "bounded time: {:?}", ran.elapsed);
    sandbox.shutdown().await;
    ran
}

// 4. An absurd total is refused at once; nothing is sized from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_total_fails_the_read_in_bounded_memory() {
    let ran = fails_without_loss(rewrite_total(|_, _| 1_000_000_000_000_000), 2000, "announces 1000000000000000").await;
    assert!(ran.peak_mb < 150, "peak memory {} MB", ran.peak_mb);
}

// 5a. A total that keeps growing ends the read with an error instead of reading forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_total_fails_the_read() {
    let ran = fails_without_loss(rewrite_total(|total, req| total + 1000 * req.seq), 2000, "the total changed").await;
    assert!(ran.peak_mb < 150, "peak memory {} MB", ran.peak_mb);
}

// 5b. Empty pages while the offset is below the total: the read ends and fails, never loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_pages_below_the_total_fail_the_read() {
    let behaviour = Behaviour::default().edit(|req, body| {
        if req.is_contact_scan() && req.offset() >= 500 {
            body["contacts"] = json!([]);
        }
    });
    let ran = fails_without_loss(behaviour, 2000, "the server stopped short").await;
    assert!(ran.peak_mb < 150, "peak memory {} MB", ran.peak_mb);
}

// 6. A server that caps its total (says 1,000 of 3,000) cannot make a silent partial sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_total_is_not_a_partial_sync() {
    fails_without_loss(rewrite_total(|total, _| total.min(1000)), 3000, "more than the 1000 the first page announced")
        .await;
}

// 7. An endless body is cut at the size limit; memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_body_is_cut_at_the_limit() {
    let behaviour = Behaviour::default().answer(|req| req.is_contact_scan().then(endless_body));
    let ran = fails_without_loss(behaviour, 2000, "larger than 16777216 bytes").await;
    assert!(ran.peak_mb < 200, "peak memory {} MB", ran.peak_mb);
}

/// A proxy answering every contact read with a 429 asking for `secs`.
fn throttled(secs: u64) -> Behaviour {
    Behaviour::default().answer(move |req| {
        req.is_contact_scan().then(|| {
            support::hostile::json(
                429,
                json!({"status": 429, "error": "Too Many Requests", "message": "Rate limit exceeded", "retryAfter": secs}),
            )
        })
    })
}

// 8. A 300 s 429 wait ends within a second of SIGTERM or SIGINT, in sync, plan and run; it is logged at INFO.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_rate_limit_waits_end_on_signals() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let (sandbox, before) = primed(support::sandbox_config(2000), &site).await;
    let hostile = Hostile::start(&sandbox.base_url(), throttled(300)).await;
    let config = site.config("hostile.toml", &hostile.base_url, "");
    for (command, signal, code) in [("sync", "TERM", 1), ("sync", "INT", 1), ("plan", "TERM", 1), ("run", "TERM", 0)] {
        let after = Duration::from_secs(3);
        let ran = run_with(segsync(&[command], &config), Duration::from_secs(60), Some((signal, after))).await;
        assert_eq!(ran.code, code, "{command} on SIG{signal}: {}", ran.out);
        assert!(ran.elapsed < after + Duration::from_secs(1), "{command} on SIG{signal} took {:?}", ran.elapsed);
        assert!(ran.out.contains("\"wait_ms\":300000"), "the wait is logged with its length: {}", ran.out);
        assert!(ran.out.contains("\"message\":\"rate limited\""), "{}", ran.out);
    }
    assert_eq!(lists(&sandbox), before);
    sandbox.shutdown().await;
}

// 8. A retryAfter above the cap fails the run at once, saying how long the server asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_above_the_cap_fails_at_once() {
    let site = Site::new(&[("geo", GEO)]);
    let (sandbox, before) = primed(support::sandbox_config(2000), &site).await;
    let hostile = Hostile::start(&sandbox.base_url(), throttled(100_000)).await;
    let ran = run(&["sync"], &site.config("hostile.toml", &hostile.base_url, "")).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(ran.out.contains("asked to wait 100000s"), "{}", ran.out);
    assert!(ran.out.contains("max_retry_after_secs (600s)"), "{}", ran.out);
    assert!(ran.elapsed < Duration::from_secs(10), "{:?}", ran.elapsed);
    assert_eq!(lists(&sandbox), before);
    sandbox.shutdown().await;
}

// 9. A FIFO in the rules folder is skipped with a warning: check returns, the daemon stops on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_in_the_rules_folder_blocks_nothing() {
    let site = Site::new(&[("geo", GEO)]);
    let made = Command::new("mkfifo").arg(site.path("rules/zz.rhai")).status().expect("mkfifo");
    assert!(made.success());
    let sandbox = support::start(support::sandbox_config(500)).await;
    let config = site.config("config.toml", &sandbox.base_url(), "");
    let ran = run_with(segsync(&["check"], &config), Duration::from_secs(20), None).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert!(ran.out.contains("\"message\":\"rules folder entry skipped\""), "{}", ran.out);
    assert!(ran.out.contains("zz.rhai"), "{}", ran.out);
    let ran =
        run_with(segsync(&["run"], &config), Duration::from_secs(30), Some(("TERM", Duration::from_secs(4)))).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert!(ran.out.contains("\"rule\":\"geo\""), "the good rule ran: {}", ran.out);
    assert!(ran.elapsed < Duration::from_secs(6), "{:?}", ran.elapsed);
    sandbox.shutdown().await;
}

// 10. A redirect to another host is an error naming it; the key never reaches that host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_not_followed() {
    let other = Recorder::start("127.0.0.2").await;
    let site = Site::new(&[("geo", GEO)]);
    let (sandbox, before) = primed(support::sandbox_config(500), &site).await;
    let target = other.base_url.clone();
    let behaviour = Behaviour::default().answer(move |req| {
        let location = format!("{target}/api/partner-gateway/v1{}", req.path);
        Some(
            axum::response::Response::builder()
                .status(307)
                .header("location", location)
                .body(Default::default())
                .expect("response"),
        )
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let ran = run(&["sync"], &site.config("hostile.toml", &hostile.base_url, "")).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(ran.out.contains("redirecting to 127.0.0.2"), "{}", ran.out);
    assert!(other.seen.lock().expect("lock").is_empty(), "the other host received nothing");
    assert_eq!(lists(&sandbox), before);
    sandbox.shutdown().await;
}

// 11. A 401 that echoes the key (or the Basic password) never shows it: not in logs, errors or output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_secrets_are_scrubbed() {
    let site = Site::new(&[("geo", GEO)]);
    let sandbox = support::start(support::sandbox_config(200)).await;
    let behaviour = Behaviour::default().answer(|req| {
        Some(support::hostile::json(
            401,
            json!({"status": "fail", "data": {"authentication": format!("Invalid API key '{}' for {}", support::KEY, req.path)}}),
        ))
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let config = site.config("hostile.toml", &hostile.base_url, "");
    for args in [&["sync"][..], &["plan"], &["plan", "--json"], &["explain", "geo", "cnt-000001"]] {
        let ran = run(args, &config).await;
        assert_ne!(ran.code, 0, "{args:?}: {}", ran.out);
        assert!(ran.out.contains("Invalid API key '***'"), "{args:?}: {}", ran.out);
        assert!(!ran.out.contains(support::KEY), "{args:?} leaked the key: {}", ran.out);
    }
    // The Basic password and its base64 header form are scrubbed too.
    std::fs::write(site.path("password"), "basic-pass-9c1e7d\n").expect("write");
    let basic = site.config("basic.toml", &hostile.base_url, "");
    let text = std::fs::read_to_string(&basic)
        .expect("read")
        .replace(&format!("key_env = \"{KEY_VAR}\""), "key_file = \"password\"\nbasic_user = \"ops\"");
    std::fs::write(&basic, text).expect("write");
    let behaviour_basic = Behaviour::default().answer(|_| {
        Some(support::hostile::json(
            401,
            json!({"status": "fail", "data": {"authentication": "bad password basic-pass-9c1e7d (b3BzOmJhc2ljLXBhc3MtOWMxZTdk)"}}),
        ))
    });
    let hostile_basic = Hostile::start(&sandbox.base_url(), behaviour_basic).await;
    let basic_text = std::fs::read_to_string(&basic).expect("read").replace(&hostile.base_url, &hostile_basic.base_url);
    std::fs::write(&basic, basic_text).expect("write");
    let ran = run(&["sync"], &basic).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(!ran.out.contains("basic-pass-9c1e7d"), "{}", ran.out);
    assert!(!ran.out.contains("b3BzOmJhc2ljLXBhc3MtOWMxZTdk"), "{}", ran.out);
    sandbox.shutdown().await;
}

// 12. Date overflow in a constant is that file's error; inside matches it is that rule's evaluation error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_that_overflow_dates_fail_alone() {
    let in_const = "const LIST = \"Later\";\nconst LATER = today() + 9999999999;\nfn matches(c) { true }\n";
    let in_matches = "const LIST = \"Overflow\";\nfn matches(c) { today() + 9999999999 > today() }\n";
    let site = Site::new(&[("geo", GEO), ("later", in_const), ("overflow", in_matches)]);
    let sandbox = support::start(support::sandbox_config(500)).await;
    let config = site.config("config.toml", &sandbox.base_url(), "");
    let ran = run(&["check", "--strict"], &config).await;
    assert_eq!(ran.code, 3, "{}", ran.out);
    assert!(ran.out.contains("later.rhai:2:") && ran.out.contains("outside the calendar"), "{}", ran.out);
    assert!(ran.out.contains("2 valid rule(s) (geo, overflow)"), "{}", ran.out);
    let ran = run(&["sync", "geo", "overflow"], &config).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    let runs = summaries(&ran.out);
    let outcome = |rule: &str| runs.iter().find(|r| r["rule"] == rule).map(|r| r["outcome"].clone());
    assert_eq!(outcome("geo"), Some(json!("ok")), "{}", ran.out);
    assert_eq!(outcome("overflow"), Some(json!("failed")), "{}", ran.out);
    assert!(ran.out.contains("outside the calendar"), "{}", ran.out);
    sandbox.shutdown().await;
}

// 13. Writes the server does not confirm make the run `partial`, not `ok`, and the membership
// cache is not trusted: the next run reads the list and completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfirmed_writes_are_partial() {
    for (name, reply) in
        [("empty", json!({})), ("short", json!({"addedContacts": 1, "duplicateContacts": 0, "invalidContacts": 0}))]
    {
        let site = Site::new(&[("vip", VIP)]);
        let sandbox = support::start(support::sandbox_config(2000)).await;
        let lying = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let lies = lying.clone();
        let behaviour = Behaviour::default().answer(move |req| {
            (lies.load(std::sync::atomic::Ordering::SeqCst)
                && req.method == axum::http::Method::POST
                && req.path == "/contacts/list/contacts")
                .then(|| support::hostile::json(200, reply.clone()))
        });
        let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
        let config = site.config("hostile.toml", &hostile.base_url, "");
        let ran = run(&["sync"], &config).await;
        assert_eq!(ran.code, 1, "{name}: {}", ran.out);
        let runs = summaries(&ran.out);
        assert_eq!(runs[0]["outcome"], "partial", "{name}: {}", ran.out);
        assert!(runs[0]["detail"].as_str().expect("detail").contains("did not confirm"), "{name}: {}", ran.out);
        assert!(ran.out.contains("\"level\":\"WARN\""), "{name}: a warning: {}", ran.out);

        lying.store(false, std::sync::atomic::Ordering::SeqCst);
        let ran = run(&["sync"], &config).await;
        assert_eq!(ran.code, 0, "{name}: {}", ran.out);
        let runs = summaries(&ran.out);
        assert_eq!((runs[0]["outcome"].as_str(), runs[0]["members_from"].as_str()), (Some("ok"), Some("read")));
        let vips = sandbox.with_store(|s| {
            let ids: Vec<String> = s.contact_ids().map(str::to_owned).collect();
            ids.into_iter().filter(|id| s.get(id).and_then(support::spent).is_some_and(|x| x > 5000.0)).count()
        });
        let listed = lists(&sandbox).into_values().next().expect("the VIP list");
        assert_eq!(listed.len(), vips, "{name}: the list is complete");
        sandbox.shutdown().await;
    }
}

// 14. Against a server without the bulk removal form, every rule of a pass falls back; none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_removal_fallback_serves_every_rule() {
    let rules: Vec<(String, String)> = (1..=8)
        .map(|i| {
            let rule = format!(
                "const LIST = \"Spend {i}\";\nfn matches(c) {{ let s = c.customFields.get(\"totalSpent\") ?? 0.0; s > {}.0 }}\n",
                i * 500
            );
            (format!("spend-{i}"), rule)
        })
        .collect();
    let refs: Vec<(&str, &str)> = rules.iter().map(|(n, r)| (n.as_str(), r.as_str())).collect();
    let site = Site::new(&refs);
    let (sandbox, _) = primed(SandboxConfig { bulk_remove: false, ..support::sandbox_config(2000) }, &site).await;
    // Three members of every list stop qualifying: every rule has removals in the same pass.
    let spent: Vec<String> =
        support::ids_where(&sandbox, |c| support::spent(c).is_some_and(|v| v > 4000.0)).into_iter().take(3).collect();
    sandbox.with_store(|s| {
        for id in &spent {
            s.update(id, |c| {
                c.custom_fields.insert("totalSpent".into(), json!(0.0));
            })
            .expect("update");
        }
    });
    let ran = run(&["sync"], &site.path("direct.toml")).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    let runs = summaries(&ran.out);
    assert_eq!(runs.len(), 8);
    for run in &runs {
        assert_eq!(run["outcome"], "ok", "{run}");
        assert!(run["removed"].as_u64().expect("removed") >= 3, "{run}");
    }
    assert_eq!(ran.out.matches("\"message\":\"bulk removal refused\"").count(), 1, "decided once: {}", ran.out);
    sandbox.shutdown().await;
}

// 15. The shipped rules on data where 1 % of contacts have no totalSpent or purchase date fill their lists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_rules_fill_lists_on_sparse_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_shipped_rules(dir.path(), true, |text| text);
    let sandbox = support::start(support::sandbox_config(6000)).await;
    let sparse = sandbox.with_store(|s| {
        let ids: Vec<String> = s.contact_ids().step_by(100).map(str::to_owned).collect();
        for id in &ids {
            s.update(id, |c| {
                c.custom_fields.remove("totalSpent");
                c.custom_fields.remove("lastPurchaseDate");
            })
            .expect("update");
        }
        ids.len()
    });
    assert_eq!(sparse, 60);
    let site = Site { dir };
    let ran = run(&["sync"], &site.config("config.toml", &sandbox.base_url(), "")).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    for run in summaries(&ran.out) {
        assert_eq!(run["outcome"], "ok", "{run}");
        assert_eq!(run["eval_errors"], 0, "{run}");
    }
    let vip = support::ids_where(&sandbox, |c| support::spent(c).is_some_and(|v| v > 5000.0)).len();
    let after = lists(&sandbox);
    let vip_members = after.iter().find(|((n, _), _)| n == "VIP - Spend > 5000 EUR").map(|(_, m)| m.len());
    assert_eq!(vip_members, Some(vip));
    site.dir.close().expect("cleanup");
    sandbox.shutdown().await;
}

// 16. Messages say what happened: a failed sync is not "synced", an unresolved list is not "would be created".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_messages_do_not_mislead() {
    let site = Site::new(&[("geo", GEO)]);
    let (sandbox, _) = primed(support::sandbox_config(500), &site).await;
    std::fs::remove_file(site.path("segsync.db")).expect("forget the bindings");
    let behaviour = Behaviour::default().answer(|req| {
        (req.path == "/contacts/list")
            .then(|| support::hostile::json(500, json!({"status": "error", "message": "boom"})))
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let config = site.config("hostile.toml", &hostile.base_url, "");
    let ran = run(&["sync"], &config).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    assert!(ran.out.contains("list not resolved"), "{}", ran.out);
    assert!(!ran.out.contains("would be created"), "{}", ran.out);
    assert!(!ran.out.contains("members 0"), "{}", ran.out);
    assert!(ran.out.contains("ran 1 rule(s) (1 failed)"), "{}", ran.out);
    let ran = run(&["plan"], &config).await;
    assert!(ran.out.contains("list not resolved"), "{}", ran.out);
    sandbox.shutdown().await;
}

// 16. check refuses what run would refuse: a key a header cannot carry, a state folder it cannot write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_what_run_would() {
    let site = Site::new(&[("geo", GEO)]);
    let config = site.config("config.toml", "https://gateway.invalid/api", "");
    let mut cmd = segsync(&["check"], &config);
    cmd.env(KEY_VAR, "abc\u{1}def");
    let ran = run_with(cmd, Duration::from_secs(20), None).await;
    assert_eq!(ran.code, 3, "{}", ran.out);
    assert!(ran.out.contains("characters an HTTP header cannot carry"), "{}", ran.out);
    assert!(ran.out.contains(&format!("environment variable {KEY_VAR}")), "{}", ran.out);
    assert!(!ran.out.contains(":0:0:"), "no position when none is known: {}", ran.out);

    std::fs::write(site.path("not-a-folder"), "x").expect("write");
    let text = std::fs::read_to_string(&config).expect("read") + "[state]\npath = \"not-a-folder/segsync.db\"\n";
    std::fs::write(&config, text).expect("write");
    let ran = run(&["check"], &config).await;
    assert_eq!(ran.code, 3, "{}", ran.out);
    assert!(ran.out.contains("not-a-folder is not a folder"), "{}", ran.out);
    let ran = run(&["sync"], &config).await;
    assert_eq!(ran.code, 1, "{}", ran.out);
    let error_line = ran.out.lines().find(|l| l.starts_with("error:")).unwrap_or_default().to_owned();
    let repeats = error_line.matches("os error").count();
    assert_eq!(repeats, 1, "the cause is said once: {error_line}");
}

// 19. Learned paging is probed again by every process: an episode of `offset` ignored (which
//     taught `page` and failed the run, changing nothing) does not lock segsync out of the server
//     once it recovers and pages by `offset` (ignoring `page`) again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_learned_in_an_episode_is_probed_again() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let (sandbox, before) = primed(support::sandbox_config(3000), &site).await;
    let episode = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let during = episode.clone();
    let behaviour = Behaviour::default().rewrite(move |query| {
        query.retain(|(k, _)| k != "page");
        if during.load(std::sync::atomic::Ordering::SeqCst) {
            query.retain(|(k, v)| k != "offset" || v.parse::<u64>().is_ok_and(|o| o < 1000));
        }
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    // The priming sync's state, now reached through the misbehaving server.
    let config = site.config("direct.toml", &hostile.base_url, "");
    let ran = run(&["sync", "--full"], &config).await;
    assert_eq!(ran.code, 1, "the episode fails the run: {}", ran.out);
    assert!(ran.out.contains("paging learned"), "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "nothing changed on a failed read");
    episode.store(false, std::sync::atomic::Ordering::SeqCst);
    let ran = run(&["sync", "--full"], &config).await;
    assert_eq!(ran.code, 0, "recovered: {}", ran.out);
    assert!(summaries(&ran.out).iter().all(|r| r["outcome"] == "ok"), "{}", ran.out);
    assert_eq!(lists(&sandbox), before, "every list exactly as the rules select");
    sandbox.shutdown().await;
}

/// The members each of `names`' lists ought to hold: GEO's and VIP's predicates, written here.
fn expected_members(sandbox: &Sandbox, list: &str) -> Vec<String> {
    let mut ids = match list {
        "Geo - Lombardia" => support::ids_where(sandbox, |c| c.region.as_deref() == Some("Lombardia")),
        "VIP" => support::ids_where(sandbox, |c| support::spent(c).is_some_and(|s| s > 5000.0)),
        other => panic!("no predicate for {other}"),
    };
    ids.sort();
    ids
}

fn members_of(lists: &Lists, name: &str) -> Vec<String> {
    let mut found: Vec<&Vec<String>> = lists.iter().filter(|((n, _), _)| n == name).map(|(_, m)| m).collect();
    assert_eq!(found.len(), 1, "one list named {name:?}: {:?}", lists.keys());
    let mut ids = found.remove(0).clone();
    ids.sort();
    ids
}

// 20. State belongs to one account: the same URL and state file with another account's key,
//     whose hand-made lists carry the first account's list ids, writes none of them. The old
//     state is set aside with a warning; the rules bind (and here create) by name, as on a first run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_lists_are_never_written() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let (a, primed_lists) = primed(support::sandbox_config(3000), &site).await;
    let url = reqwest::Url::parse(&a.base_url()).expect("url");
    let addr: std::net::SocketAddr =
        format!("{}:{}", url.host_str().expect("host"), url.port().expect("port")).parse().expect("addr");
    a.shutdown().await;
    let key_b = "key-of-account-b-7c1e";
    let b = support::start_at(SandboxConfig { api_key: key_b.into(), seed: 7, ..support::sandbox_config(2000) }, addr)
        .await;
    // B's own lists, made by hand, with exactly A's list ids (created in A's order, then named).
    let mut a_lists: Vec<(String, String)> = primed_lists.keys().cloned().collect();
    a_lists.sort_by(|x, y| x.1.rsplit('-').next().cmp(&y.1.rsplit('-').next()));
    let hand_made: Vec<(String, Vec<String>)> = b.with_store(|s| {
        let mut picked: Vec<String> = s.contact_ids().map(str::to_owned).collect();
        picked.sort();
        a_lists
            .iter()
            .enumerate()
            .map(|(i, (name, id))| {
                let created = s.create_list(name.clone(), String::new(), "2026-01-01T00:00:00Z".into()).id.clone();
                assert_eq!(&created, id, "B's list carries A's id");
                let own = ["Newsletter subscribers", "Staff", "Partners"][i % 3];
                s.rename_list(id, own);
                let members: Vec<String> = picked.iter().skip(i * 7).take(5 + i).cloned().collect();
                s.add_members(id, &members).expect("hand-picked members");
                (id.clone(), members)
            })
            .collect()
    });
    let config = site.config("direct.toml", &b.base_url(), "");
    let mut cmd = segsync(&["sync"], &config);
    cmd.env(KEY_VAR, key_b);
    let ran = run_with(cmd, Duration::from_secs(120), None).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    assert!(ran.out.contains("\"message\":\"state set aside\""), "a warning: {}", ran.out);
    let after = lists(&b);
    for (id, members) in &hand_made {
        let (_, now) = after.iter().find(|((_, i), _)| i == id).expect("B's list");
        let (mut now, mut members) = (now.clone(), members.clone());
        now.sort();
        members.sort();
        assert_eq!(now, members, "B's hand-made list {id} is exactly as made");
    }
    for name in ["Geo - Lombardia", "VIP"] {
        assert_eq!(members_of(&after, name), expected_members(&b, name), "{name} holds exactly its rule's");
    }
    b.shutdown().await;
}

// 21. A list renamed by hand is never rewritten: its bound id no longer carries the rule's LIST
//     name, so the rule binds by name again (here: a new list) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_renamed_by_hand_is_left_alone() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let (sandbox, before) = primed(support::sandbox_config(3000), &site).await;
    let ((_, geo_id), geo_members) = before.iter().find(|((n, _), _)| n == "Geo - Lombardia").expect("geo");
    sandbox.with_store(|s| s.rename_list(geo_id, "Staff"));
    let ran = run(&["sync"], &site.config("direct.toml", &sandbox.base_url(), "")).await;
    assert_eq!(ran.code, 0, "{}", ran.out);
    let invalid = ran
        .out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "list binding invalid")
        .unwrap_or_else(|| panic!("no `list binding invalid`: {}", ran.out));
    assert_eq!((invalid["list_id"].as_str(), invalid["found"].as_str()), (Some(geo_id.as_str()), Some("Staff")));
    let after = lists(&sandbox);
    let mut staff = members_of(&after, "Staff");
    let mut was = geo_members.clone();
    staff.sort();
    was.sort();
    assert_eq!(staff, was, "the renamed list is exactly as it was");
    for name in ["Geo - Lombardia", "VIP"] {
        assert_eq!(members_of(&after, name), expected_members(&sandbox, name), "{name} holds exactly its rule's");
    }
    sandbox.shutdown().await;
}

// 22. Records repeated within a page (past the client's batches of 32) and across pages (one
//     contact on every page) are read once: a first sync and a pass on the cache through such a
//     server fill each list with exactly its rule's contacts. A record without an id deep in a
//     page fails the read, and no list changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_records_are_read_once() {
    let site = Site::new(&[("geo", GEO), ("vip", VIP)]);
    let sandbox = support::start(support::sandbox_config(3000)).await;
    let repeated = sandbox.with_store(|s| {
        let id = s.contact_ids().find(|id| s.get(id).and_then(|c| c.region.as_deref()) == Some("Lombardia"));
        serde_json::to_value(s.get(id.expect("a Lombardia contact")).expect("contact")).expect("json")
    });
    let behaviour = Behaviour::default().edit(move |req, body| {
        let contacts = body.get_mut("contacts").and_then(Value::as_array_mut);
        if let Some(contacts) = contacts.filter(|c| !c.is_empty() && req.is_contact_scan()) {
            let again: Vec<Value> = contacts.iter().take(40).cloned().collect();
            contacts.extend(again);
            contacts.insert(contacts.len() / 2, repeated.clone());
        }
    });
    let hostile = Hostile::start(&sandbox.base_url(), behaviour).await;
    let config = site.config("hostile.toml", &hostile.base_url, "");
    for pass in ["first sync", "on the cache"] {
        let ran = run(&["sync"], &config).await;
        assert_eq!(ran.code, 0, "{pass}: {}", ran.out);
        let runs = summaries(&ran.out);
        assert_eq!(runs.len(), 2, "{pass}: a summary a rule: {}", ran.out);
        for run in runs {
            assert_eq!((run["outcome"].as_str(), run["eval_errors"].as_u64()), (Some("ok"), Some(0)), "{pass}: {run}");
        }
        let after = lists(&sandbox);
        for name in ["Geo - Lombardia", "VIP"] {
            assert_eq!(members_of(&after, name), expected_members(&sandbox, name), "{pass}: {name}");
        }
    }
    sandbox.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_without_an_id_fails_the_read() {
    let behaviour = Behaviour::default().edit(|req, body| {
        if req.is_contact_scan()
            && req.offset() == 100
            && let Some(record) = body["contacts"].get_mut(90).and_then(Value::as_object_mut)
        {
            record.remove("id");
        }
    });
    fails_without_loss(behaviour, 3000, "a record at offset 100: a contact without an id").await;
}
