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

impl Installed {
    /// What the operator's guide says to do first: copy the VIP example into the empty rules folder.
    fn copy_example_rules(&self, into: &str) {
        let examples = self.at("/usr/share/doc/segsync/examples/rules");
        for entry in std::fs::read_dir(&examples).expect("examples") {
            let path = entry.expect("entry").path();
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            std::fs::copy(&path, self.at(into).join(&name)).expect("copy example");
        }
    }
}

// The package holds the binary, both units, the config as a conffile, an empty rules folder with a
// README, the examples, the copyright and changelog, a man page per command plus the config and rule
// pages, and completions. On the empty folder the installed binary's start gate refuses, saying
// exactly that; with the examples copied in, it passes on the installed config with a credential.
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
        "./etc/segsync/rules/README",
        "./usr/share/doc/segsync/examples/rules/vip.rhai",
        "./usr/share/doc/segsync/examples/rules-advanced/lib/money.rhai",
        "./usr/share/doc/segsync/examples/grafana-segsync.json",
        "./usr/share/doc/segsync/copyright",
        "./usr/share/doc/segsync/changelog.Debian.gz",
        "./usr/share/doc/segsync/README.md",
        "./usr/share/man/man1/segsync.1.gz",
        "./usr/share/man/man1/segsync-run.1.gz",
        "./usr/share/man/man1/segsync-status.1.gz",
        "./usr/share/man/man5/segsync.toml.5.gz",
        "./usr/share/man/man7/segsync-rules.7.gz",
        "./usr/share/bash-completion/completions/segsync",
        "./usr/share/zsh/vendor-completions/_segsync",
        "./usr/share/fish/vendor_completions.d/segsync.fish",
    ] {
        assert!(listing.lines().any(|l| l.ends_with(path)), "the package lacks {path}:\n{listing}");
    }
    let active: Vec<&str> =
        listing.lines().filter(|l| l.contains("./etc/segsync/rules/") && l.ends_with(".rhai")).collect();
    assert!(active.is_empty(), "no rule is active on install: {active:?}");
    let info = |part: &str| {
        let out = Command::new("dpkg-deb").arg("-I").arg(&installed.deb).arg(part).output().expect("dpkg-deb -I");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(info("conffiles").contains("/etc/segsync/config.toml"));
    let control = info("control");
    assert!(control.contains("Depends: libc6 (>= "), "Depends computed from the binary: {control}");
    let md5sums = info("md5sums");
    assert!(md5sums.contains("  usr/bin/segsync\n"), "{md5sums}");
    let guide = std::fs::read_to_string(installed.at("/usr/share/doc/segsync/README.md")).expect("guide");
    assert!(!guide.contains("cargo"), "the shipped README is the operator's guide, not the developer's");
    let copyright = std::fs::read_to_string(installed.at("/usr/share/doc/segsync/copyright")).expect("copyright");
    for crate_linked in ["vendor/rhai-", "vendor/tokio-", "vendor/rusqlite-"] {
        assert!(copyright.contains(crate_linked), "the copyright names {crate_linked}…");
    }

    // The start gate, exactly as the unit runs it, on the installed config (paths under the root).
    let config = installed.at("/etc/segsync/config.toml");
    let text = std::fs::read_to_string(&config).expect("installed config");
    assert!(text.contains("format = \"auto\""), "the journal gets native fields under systemd: {text}");
    std::fs::write(&config, installed.rooted(&text)).expect("write");
    let creds = installed.at("/run/credentials/segsync.service");
    std::fs::create_dir_all(&creds).expect("mkdir");
    std::fs::write(creds.join("api_key"), "k-installed-5521\n").expect("key");
    let check = || {
        let out = Command::new(installed.at("/usr/bin/segsync"))
            .args(["check", "--config"])
            .arg(&config)
            .env("CREDENTIALS_DIRECTORY", &creds)
            .output()
            .expect("the installed binary runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, text) = check();
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains("the folder has no NAME.rhai file") && text.contains("/usr/share/doc/segsync/examples"),
        "{text}"
    );
    installed.copy_example_rules("/etc/segsync/rules");
    let (code, text) = check();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("5 rule(s)"), "{text}");
    let version = Command::new(installed.at("/usr/bin/segsync")).arg("--version").output().expect("version");
    assert!(String::from_utf8_lossy(&version.stdout).contains("(git "), "--version names the commit");
}

// lintian, Debian's own package checker, finds no error and no warning in the package.
#[test]
fn lintian_accepts_the_package() {
    let installed = install();
    let out = Command::new("lintian").arg(&installed.deb).output().expect("lintian runs (apt-get install lintian)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let complaints: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ") || l.starts_with("W: ")).collect();
    assert!(complaints.is_empty(), "lintian:\n{text}");
    assert!(out.status.success(), "lintian:\n{text}");
}

/// The package's maintainer scripts, run as dpkg runs them, with the system's paths moved under a
/// temporary root and recording stand-ins for `systemctl`, `deb-systemd-invoke` and
/// `deb-systemd-helper` first on `PATH`.
struct Scripts {
    dir: tempfile::TempDir,
}

impl Scripts {
    fn extract(installed: &Installed, systemd_running: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("control");
        let ok = Command::new("dpkg-deb").arg("-e").arg(&installed.deb).arg(&control).status().expect("dpkg-deb -e");
        assert!(ok.success());
        let root = dir.path().join("root");
        for script in ["postinst", "prerm", "postrm"] {
            let text = std::fs::read_to_string(control.join(script)).expect("script");
            let moved = text
                .replace("/run/systemd/system", &format!("{}/run/systemd/system", root.display()))
                .replace("/var/lib/", &format!("{}/var/lib/", root.display()))
                .replace("/etc/segsync", &format!("{}/etc/segsync", root.display()));
            std::fs::write(dir.path().join(script), moved).expect("write");
        }
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        for tool in ["systemctl", "deb-systemd-invoke", "deb-systemd-helper"] {
            let record = format!("#!/bin/sh\necho \"{tool} $*\" >> {}/calls\n", dir.path().display());
            std::fs::write(bin.join(tool), record).expect("stand-in");
            let ok = Command::new("chmod").arg("+x").arg(bin.join(tool)).status().expect("chmod");
            assert!(ok.success());
        }
        if systemd_running {
            std::fs::create_dir_all(root.join("run/systemd/system")).expect("mkdir");
        }
        Self { dir }
    }

    fn root(&self, path: &str) -> PathBuf {
        self.dir.path().join("root").join(path.trim_start_matches('/'))
    }

    /// Runs one script with dpkg's arguments; returns the stand-ins' calls it made.
    fn run(&self, script: &str, args: &[&str]) -> Vec<String> {
        let calls = self.dir.path().join("calls");
        let _ = std::fs::remove_file(&calls);
        let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.dir.path().join("bin").display());
        let out = Command::new("sh")
            .arg("-e")
            .arg(self.dir.path().join(script))
            .args(args)
            .env("PATH", path)
            .output()
            .expect("sh");
        assert!(out.status.success(), "{script} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&calls).map(|t| t.lines().map(str::to_owned).collect()).unwrap_or_default()
    }
}

// The maintainer scripts do what dh_installsystemd's would: nothing starts on a first install (there
// is no key yet), an upgrade try-restarts what runs, remove stops the service and every instance,
// purge deletes the state (contact ids, history) and the keys but not the operator's own rules.
#[test]
fn maintainer_scripts_do_what_dh_installsystemd_does() {
    let installed = install();
    let scripts = Scripts::extract(&installed, true);
    let reload = "systemctl --system daemon-reload".to_owned();

    assert_eq!(
        scripts.run("postinst", &["configure", ""]),
        std::slice::from_ref(&reload),
        "a first install starts nothing"
    );
    assert_eq!(
        scripts.run("postinst", &["configure", "0.0.9-1"]),
        [reload.clone(), "deb-systemd-invoke try-restart segsync.service segsync@*.service".to_owned()],
        "an upgrade restarts what runs"
    );
    assert_eq!(scripts.run("prerm", &["upgrade", "0.2.0-1"]), Vec::<String>::new(), "an upgrade stops nothing");
    assert_eq!(
        scripts.run("prerm", &["remove"]),
        ["deb-systemd-invoke stop segsync.service segsync@*.service".to_owned()],
        "remove stops the service and its instances"
    );

    // What segsync and the operator wrote: state (DynamicUser's private folder and its link), keys, rules.
    for path in ["/var/lib/private/segsync/segsync.db", "/var/lib/private/segsync/acme/segsync.db"] {
        std::fs::create_dir_all(scripts.root(path).parent().expect("parent")).expect("mkdir");
        std::fs::write(scripts.root(path), "state").expect("state");
    }
    std::os::unix::fs::symlink(scripts.root("/var/lib/private/segsync"), scripts.root("/var/lib/segsync"))
        .expect("link");
    std::fs::create_dir_all(scripts.root("/etc/segsync/acme/rules")).expect("mkdir");
    std::fs::create_dir_all(scripts.root("/etc/segsync/rules")).expect("mkdir");
    for path in ["/etc/segsync/api_key", "/etc/segsync/acme/api_key", "/etc/segsync/rules/mine.rhai"] {
        std::fs::write(scripts.root(path), "x").expect("write");
    }
    assert_eq!(scripts.run("postrm", &["remove"]), std::slice::from_ref(&reload));
    assert!(scripts.root("/var/lib/segsync/segsync.db").exists(), "remove keeps the state");
    assert!(scripts.root("/etc/segsync/api_key").exists(), "remove keeps the key");

    let calls = scripts.run("postrm", &["purge"]);
    assert_eq!(calls, [reload, "deb-systemd-helper purge segsync.service".to_owned()]);
    for gone in ["/var/lib/segsync", "/var/lib/private/segsync", "/etc/segsync/api_key", "/etc/segsync/acme"] {
        assert!(!scripts.root(gone).exists() && !scripts.root(gone).is_symlink(), "purge leaves {gone}");
    }
    assert!(scripts.root("/etc/segsync/rules/mine.rhai").exists(), "purge keeps the operator's own rule files");

    // Without systemd running (a chroot, a container), the scripts call no systemctl.
    let offline = Scripts::extract(&installed, false);
    assert!(offline.run("postinst", &["configure", "0.0.9-1"]).is_empty());
    assert!(offline.run("prerm", &["remove"]).is_empty());
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
    installed.copy_example_rules("/etc/segsync/rules");
    let url = sandbox.base_url();
    let played = tokio::task::spawn_blocking(move || {
        play(&installed, "segsync.service", "", &url);
        play(&installed, "segsync@.service", "acme", &url);
    })
    .await;
    assert!(played.is_ok(), "{played:?}");
    sandbox.shutdown().await;
}
