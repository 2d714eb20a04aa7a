//! The production install, as an operator gets it: the Debian package (`packaging/build-deb`) built
//! and extracted into a temporary root, the installed binary's start gate on the installed config,
//! and each installed unit played as systemd would play it (without systemd as PID 1): its own
//! `ExecStartPre=`, `ExecStart=` and `ExecReload=` lines, run with the environment systemd gives.
use crate::support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The package built from this checkout around the test binary, extracted into `root`.
struct Installed {
    _dir: tempfile::TempDir,
    deb: PathBuf,
    root: PathBuf,
    /// /etc/segsync/config.toml as the package installed it (the tests rewrite the file itself).
    shipped_config: String,
}

fn install() -> Installed {
    let dir = tempfile::tempdir().expect("tempdir");
    // Shipped binaries are stripped; stripping the test build also keeps the package small and quick.
    let binary = dir.path().join("segsync");
    let ok = Command::new("strip").arg("-o").arg(&binary).arg(env!("CARGO_BIN_EXE_segsync")).status().expect("strip");
    assert!(ok.success());
    let out = Command::new("packaging/build-deb")
        .arg(&binary)
        .arg(dir.path().join("out"))
        .stderr(Stdio::inherit())
        .output()
        .expect("packaging/build-deb runs");
    assert!(out.status.success(), "build-deb failed");
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(deb.exists(), "{deb:?}");
    let root = dir.path().join("root");
    let ok = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root).status().expect("dpkg-deb -x");
    assert!(ok.success());
    let shipped_config = std::fs::read_to_string(root.join("etc/segsync/config.toml")).expect("installed config");
    Installed { _dir: dir, deb, root, shipped_config }
}

impl Installed {
    /// An install path (`/etc/segsync/...`) inside the temporary root.
    fn at(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// A text with the install paths moved under the temporary root.
    fn rooted(&self, text: &str) -> String {
        let root = self.root.display().to_string();
        text.replace("/usr/bin/segsync", &format!("{root}/usr/bin/segsync"))
            .replace("/etc/segsync", &format!("{root}/etc/segsync"))
            .replace("/var/lib/segsync", &format!("{root}/var/lib/segsync"))
    }
}

// The package holds the binary, both units, the config as a conffile, the rules, the man page and
// completions; the installed binary's start gate passes on the installed config with a credential.
#[test]
fn package_installs_what_the_units_need() {
    let installed = install();
    let listing = Command::new("dpkg-deb").arg("-c").arg(&installed.deb).output().expect("dpkg-deb -c");
    let listing = String::from_utf8_lossy(&listing.stdout);
    for path in [
        "./usr/bin/segsync",
        "./lib/systemd/system/segsync.service",
        "./lib/systemd/system/segsync@.service",
        "./etc/segsync/config.toml",
        "./etc/segsync/rules/vip.rhai",
        "./etc/segsync/rules/vip.test.toml",
        "./usr/share/man/man1/segsync.1.gz",
        "./usr/share/bash-completion/completions/segsync",
        "./usr/share/zsh/vendor-completions/_segsync",
        "./usr/share/fish/vendor_completions.d/segsync.fish",
        "./usr/share/doc/segsync/README.md",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "the package lacks {path}:\n{listing}");
    }
    let control = Command::new("dpkg-deb").arg("-I").arg(&installed.deb).arg("conffiles").output().expect("conffiles");
    assert!(String::from_utf8_lossy(&control.stdout).contains("/etc/segsync/config.toml"));
    let postinst = Command::new("dpkg-deb").arg("-I").arg(&installed.deb).arg("postinst").output().expect("postinst");
    let postinst = String::from_utf8_lossy(&postinst.stdout);
    assert!(!postinst.contains("start") && !postinst.contains("enable"), "nothing starts on install: {postinst}");

    // The start gate, exactly as the unit runs it, on the installed config (paths under the root).
    let config = installed.at("/etc/segsync/config.toml");
    let text = std::fs::read_to_string(&config).expect("installed config");
    std::fs::write(&config, installed.rooted(&text)).expect("write");
    let creds = installed.at("/run/credentials/segsync.service");
    std::fs::create_dir_all(&creds).expect("mkdir");
    std::fs::write(creds.join("api_key"), "k-installed-5521\n").expect("key");
    let out = Command::new(installed.at("/usr/bin/segsync"))
        .args(["check", "--config"])
        .arg(&config)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .expect("the installed binary runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("5 rule(s)"), "{text}");
    let version = Command::new(installed.at("/usr/bin/segsync")).arg("--version").output().expect("version");
    assert!(String::from_utf8_lossy(&version.stdout).contains("(git "), "--version names the commit");
}

/// The values of `Key=` lines of a unit, in order, with `%i` expanded.
fn unit_values(unit: &str, key: &str, instance: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(|v| v.replace("%i", instance)).collect()
}

/// One command line of a unit as systemd would run it: split on spaces (the units use no
/// quoting), `$MAINPID` expanded, in `env` and nothing else.
fn command(line: &str, env: &[(String, String)], main_pid: Option<u32>) -> Command {
    let expanded = line.replace("$MAINPID", &main_pid.map(|p| p.to_string()).unwrap_or_default());
    let mut words = expanded.split_whitespace();
    let mut cmd = Command::new(words.next().expect("a program"));
    cmd.args(words).env_clear().env("PATH", "/usr/bin:/bin").envs(env.iter().cloned()).stdin(Stdio::null());
    cmd
}

fn run_line(line: &str, env: &[(String, String)], main_pid: Option<u32>) {
    let out = command(line, env, main_pid).output().unwrap_or_else(|e| panic!("{line}: {e}"));
    assert!(
        out.status.success(),
        "{line} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Collects the notify socket's messages and the service's log lines.
struct Watch {
    notes: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Watch {
    fn wait(&self, what: &str, found: impl Fn(&[String], &[String]) -> bool, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let (notes, logs) = (self.notes.lock().expect("lock").clone(), self.logs.lock().expect("lock").clone());
            if found(&notes, &logs) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {secs} s; notes {notes:?}; logs:\n{}",
                logs.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Plays `unit` (installed under the package root) for `instance`, against `sandbox`; prints a
/// transcript (visible with `--nocapture`).
#[allow(clippy::print_stdout)]
fn play(installed: &Installed, unit: &str, instance: &str, sandbox_url: &str) {
    let text = std::fs::read_to_string(installed.at(&format!("/lib/systemd/system/{unit}"))).expect("installed unit");
    let rooted = installed.rooted(&text);
    // The config the unit reads: the installed one, pointed at the sandbox (and, for an instance,
    // copied to its folder with its own state path, as README says).
    let config_dir = if instance.is_empty() { "/etc/segsync".to_owned() } else { format!("/etc/segsync/{instance}") };
    let state_dir =
        if instance.is_empty() { "/var/lib/segsync".to_owned() } else { format!("/var/lib/segsync/{instance}") };
    let config = installed
        .shipped_config
        .replace("https://lora-api.agiletelecom.com/api", sandbox_url)
        .replace("/var/lib/segsync/segsync.db", &format!("{state_dir}/segsync.db"));
    std::fs::create_dir_all(installed.at(&format!("{config_dir}/rules"))).expect("mkdir");
    std::fs::write(installed.at(&format!("{config_dir}/config.toml")), installed.rooted(&config)).expect("config");
    if !instance.is_empty() {
        for entry in std::fs::read_dir(installed.at("/etc/segsync/rules")).expect("rules") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, installed.at(&format!("{config_dir}/rules")).join(path.file_name().expect("name")))
                .expect("copy rule");
        }
    }

    // The environment systemd gives the service.
    let unit_name = if instance.is_empty() { unit.to_owned() } else { unit.replace('@', &format!("@{instance}")) };
    let creds = installed.at(&format!("/run/credentials/{unit_name}"));
    std::fs::create_dir_all(&creds).expect("mkdir");
    let credential = unit_values(&rooted, "LoadCredential", instance);
    let name = credential[0].split(':').next().expect("a credential name");
    std::fs::write(creds.join(name), support::KEY).expect("credential");
    let state = installed.at(&state_dir);
    std::fs::create_dir_all(&state).expect("state dir");
    let socket_path = installed.root.join(format!("notify-{unit_name}.sock"));
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let watchdog = unit_values(&rooted, "WatchdogSec", instance);
    let watchdog_usec = watchdog[0].trim_end_matches('s').parse::<u64>().expect("seconds") * 1_000_000;
    let mut env: Vec<(String, String)> = vec![
        ("CREDENTIALS_DIRECTORY".into(), creds.display().to_string()),
        ("STATE_DIRECTORY".into(), state.display().to_string()),
        ("NOTIFY_SOCKET".into(), socket_path.display().to_string()),
        ("WATCHDOG_USEC".into(), watchdog_usec.to_string()),
    ];
    for assignment in unit_values(&rooted, "Environment", instance) {
        let (k, v) = assignment.split_once('=').expect("KEY=value");
        env.push((k.into(), v.into()));
    }
    let watch = Watch { notes: Arc::default(), logs: Arc::default() };
    let notes = watch.notes.clone();
    let stop_listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = stop_listening.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = socket.recv(&mut buf) {
                notes.lock().expect("lock").push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    });

    // ExecStartPre=, then ExecStart= as the main process.
    for line in unit_values(&rooted, "ExecStartPre", instance) {
        run_line(&line, &env, None);
    }
    let start = unit_values(&rooted, "ExecStart", instance);
    assert_eq!(start.len(), 1, "{start:?}");
    let mut main: Child = command(&start[0], &env, None).stderr(Stdio::piped()).spawn().expect("ExecStart");
    let stderr = main.stderr.take().expect("stderr");
    let logs = watch.logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            logs.lock().expect("lock").push(line);
        }
    });
    watch.wait("READY=1", |n, _| n.iter().any(|m| m.contains("READY=1")), 30);
    watch.wait(
        "a first pass",
        |_, logs| {
            logs.iter().any(|l| l.contains("\"message\":\"pass finished\"") && l.contains("\"trigger\":\"startup\""))
        },
        60,
    );

    // ExecReload= lines in order, with $MAINPID.
    for line in unit_values(&rooted, "ExecReload", instance) {
        run_line(&line, &env, Some(main.id()));
    }
    watch.wait("RELOADING=1", |n, _| n.iter().any(|m| m.contains("RELOADING=1")), 30);
    watch.wait("the reload", |_, logs| logs.iter().any(|l| l.contains("\"message\":\"reloaded\"")), 30);

    // systemctl stop: SIGTERM to the main process.
    let ok = Command::new("kill").arg("-TERM").arg(main.id().to_string()).status().expect("kill");
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(45);
    let status = loop {
        if let Some(status) = main.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within TimeoutStopSec");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "clean exit on SIGTERM");
    watch.wait("STOPPING=1", |n, _| n.iter().any(|m| m.contains("STOPPING=1")), 5);
    stop_listening.store(true, std::sync::atomic::Ordering::Relaxed);
    let notes = watch.notes.lock().expect("lock").clone();
    let ready = notes.iter().position(|m| m.contains("READY=1")).expect("READY");
    let reloading = notes.iter().position(|m| m.contains("RELOADING=1")).expect("RELOADING");
    let stopping = notes.iter().position(|m| m.contains("STOPPING=1")).expect("STOPPING");
    assert!(ready < reloading && reloading < stopping, "{notes:?}");
    assert!(notes[reloading..stopping].iter().any(|m| m.contains("READY=1")), "READY=1 after the reload: {notes:?}");
    let logs = watch.logs.lock().expect("lock").clone();
    assert!(!logs.iter().any(|l| l.contains(support::KEY)), "the key never reaches the log");
    println!("== {unit_name}: notify socket");
    for note in &notes {
        println!("   {}", note.replace('\n', " "));
    }
    println!("== {unit_name}: events");
    for line in logs.iter().filter(|l| !l.contains("\"rule loaded\"") && !l.contains("\"rule run\"")) {
        println!("   {line}");
    }
    let db = state.join("segsync.db");
    assert!(db.exists(), "state under STATE_DIRECTORY: no {db:?}; logs:\n{}", logs.join("\n"));
}

// Each shipped unit, played from the installed package against the bundled sandbox through the
// shipped production config: READY, a first pass, reload through its own reload lines, STOPPING,
// and exit 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn played_units_start_reload_and_stop() {
    let sandbox = support::start(support::sandbox_config(2_000)).await;
    let installed = install();
    let url = sandbox.base_url();
    let played = tokio::task::spawn_blocking(move || {
        play(&installed, "segsync.service", "", &url);
        play(&installed, "segsync@.service", "acme", &url);
    })
    .await;
    assert!(played.is_ok(), "{played:?}");
    sandbox.shutdown().await;
}
