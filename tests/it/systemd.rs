//! The shipped systemd units: `systemd-analyze verify` accepts them and `systemd-analyze security`
//! rates their exposure at 2.0 or lower. `.ci/run` installs systemd's tools where they are missing.

use std::path::Path;
use std::process::Command;

/// Copies the units into a temp folder with ExecStart pointing at the built binary (verify checks it
/// exists), and the man pages their `Documentation=` names into `man/` (verify runs `man` on each).
fn staged() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let man = dir.path().join("man");
    let ok = Command::new(env!("CARGO_BIN_EXE_segsync"))
        .args(["man", "--out-dir"])
        .arg(man.join("man1"))
        .status()
        .expect("segsync man");
    assert!(ok.success());
    for (page, section) in [("segsync.toml.5", "man5"), ("segsync-rules.7", "man7")] {
        std::fs::create_dir_all(man.join(section)).expect("mkdir");
        std::fs::copy(Path::new("packaging/man").join(page), man.join(section).join(page)).expect("copy page");
    }
    for (unit, as_name) in [("segsync.service", "segsync.service"), ("segsync@.service", "segsync@demo.service")] {
        let text = std::fs::read_to_string(Path::new("systemd").join(unit)).expect("unit");
        std::fs::write(dir.path().join(as_name), text.replace("/usr/bin/segsync", env!("CARGO_BIN_EXE_segsync")))
            .expect("write");
    }
    dir
}

fn analyze(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .current_dir(dir)
        .env("MANPATH", dir.join("man"))
        .output()
        .expect("systemd-analyze runs (apt-get install systemd)");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

// Both units pass `systemd-analyze verify` without a word of complaint: their commands exist and
// every page their `Documentation=` names is one segsync ships.
#[test]
fn units_verify() {
    let dir = staged();
    let (ok, out) = analyze(&["verify", "segsync.service", "segsync@demo.service"], dir.path());
    assert!(ok && out.trim().is_empty(), "{out}");
}

// Both units are hardened: exposure 2.0 or lower.
#[test]
fn units_are_hardened() {
    let dir = staged();
    for unit in ["segsync.service", "segsync@demo.service"] {
        let (_, out) = analyze(&["security", "--offline=true", unit], dir.path());
        let line = out.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{out}"));
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .expect("score");
        assert!(score <= 2.0, "{unit}: {line}");
    }
}

// The units run `segsync check` before start and reload, reload by SIGHUP, and notify systemd.
#[test]
fn units_wire_the_product() {
    for unit in ["segsync.service", "segsync@.service"] {
        let text = std::fs::read_to_string(Path::new("systemd").join(unit)).expect("unit");
        for needle in [
            "Type=notify",
            "ExecStartPre=/usr/bin/segsync check",
            "ExecReload=/usr/bin/segsync check",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "WatchdogSec=",
            "StateDirectory=",
            "LoadCredential=api_key:",
            "DynamicUser=yes",
        ] {
            assert!(text.contains(needle), "{unit} lacks {needle}");
        }
    }
}

// The allocator setting the units give the daemon is one mimalloc reads, with the value they set:
// the binary started with each unit's `Environment=` lines (as systemd would give them) reports
// `purge_delay` 0 in mimalloc's own option listing, where without them it reports its default.
#[test]
fn units_set_the_allocator_the_binary_reads() {
    let purge_delay = |env: &[(String, String)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_segsync"))
            .arg("--version")
            .env_remove("MIMALLOC_PURGE_DELAY")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MIMALLOC_VERBOSE", "1")
            .output()
            .expect("segsync --version");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        let line = text.lines().find(|l| l.contains("option 'purge_delay'")).map(str::to_owned);
        line.unwrap_or_else(|| panic!("mimalloc listed no purge_delay: {text}"))
    };
    assert!(!purge_delay(&[]).contains(": 0"), "mimalloc's own default is not 0");
    for unit in ["segsync.service", "segsync@.service"] {
        let text = std::fs::read_to_string(Path::new("systemd").join(unit)).expect("unit");
        let env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert!(env.iter().any(|(k, _)| k == "MIMALLOC_PURGE_DELAY"), "{unit}: {env:?}");
        let line = purge_delay(&env);
        assert!(line.trim_end().ends_with(": 0"), "{unit}: {line}");
    }
}
