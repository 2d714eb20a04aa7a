//! Benchmark plumbing: the sandbox as a child process (so this process is segsync alone), and
//! this process's CPU time and peak memory from /proc.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "bench-key";

pub struct SandboxChild {
    pub child: Child,
    pub base_url: String,
    pub port: u16,
    /// Milliseconds the sandbox took to generate its contacts, as it logged.
    pub generate_ms: u64,
}

impl SandboxChild {
    pub fn start(contacts: u64, plan: &str) -> Self {
        Self::start_with(contacts, plan, &[])
    }

    /// With more `segsync sandbox` arguments (e.g. `--page-dialect`).
    pub fn start_with(contacts: u64, plan: &str, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_segsync"))
            .args(["sandbox", "--log-format", "json", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--contacts", &contacts.to_string(), "--plan", plan, "--api-key", KEY])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sandbox starts");
        let logs = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(logs).lines();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut generate_ms = 0;
        for line in lines.by_ref() {
            let line = line.expect("line");
            if line.contains("sandbox ready") {
                let v: serde_json::Value = serde_json::from_str(&line).expect("json log");
                generate_ms = v["generate_ms"].as_u64().unwrap_or_default();
                break;
            }
            assert!(Instant::now() < deadline, "the sandbox did not start");
        }
        std::thread::spawn(move || for _ in lines {});
        Self { child, base_url: format!("http://127.0.0.1:{port}/api"), port, generate_ms }
    }

    pub fn rss_mb(&self) -> f64 {
        status_kb(&format!("/proc/{}/status", self.child.id()), "VmRSS:") as f64 / 1024.0
    }

    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{}/_sandbox/stats", self.port)]).output();
        out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default()
    }
}

impl Drop for SandboxChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kb(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// This process's user + system CPU time.
pub fn cpu_time() -> Duration {
    let (user, system) = cpu_times();
    user + system
}

/// This process's CPU time so far: (user, system).
pub fn cpu_times() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |at: usize| Duration::from_millis(fields.get(at).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 10);
    (ticks(11), ticks(12))
}

/// Peak resident memory of this process since the last [`reset_peak`], in MB.
pub fn peak_mb() -> f64 {
    status_kb("/proc/self/status", "VmHWM:") as f64 / 1024.0
}

/// Resident memory of this process now, in MB.
pub fn rss_now_mb() -> f64 {
    status_kb("/proc/self/status", "VmRSS:") as f64 / 1024.0
}

/// Resets the peak-RSS counter (Linux: write 5 to clear_refs).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn gateway(base_url: &str, plan: segsync::gateway::RatePlan, concurrency: usize) -> segsync::gateway::Gateway {
    segsync::gateway::Gateway::new(segsync::gateway::GatewayConfig {
        base_url: base_url.parse().expect("url"),
        credentials: segsync::gateway::Credentials::ApiKey(segsync::gateway::Secret::new(KEY)),
        settings: segsync::gateway::ClientSettings {
            limits: plan.limits(),
            concurrency,
            ..segsync::gateway::ClientSettings::default()
        },
    })
    .expect("client")
}
