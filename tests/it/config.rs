//! config.toml as documented: the README's configuration table and the keys the reader accepts
//! are the same set, and `key_credential` reads a systemd credential as the units give it.
use crate::support;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

/// `section.key` for every key README.md's configuration table documents.
fn documented_keys() -> BTreeSet<String> {
    let readme = std::fs::read_to_string("README.md").expect("README.md");
    let table = readme.split("## Configuration").nth(1).expect("a Configuration section");
    let mut keys = BTreeSet::new();
    for row in table.lines().take_while(|l| !l.starts_with("## ")).filter(|l| l.starts_with("| `[")) {
        let cell = row.split('|').nth(1).expect("a first cell");
        let names: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
        let (first, rest) = names.split_first().expect("a key");
        let (section, key) = first.trim_start_matches('[').split_once("] ").expect("`[section] key`");
        keys.insert(format!("{section}.{key}"));
        keys.extend(rest.iter().map(|k| format!("{section}.{k}")));
    }
    keys
}

// Every key the README documents is accepted, and every accepted key is documented.
#[test]
fn readme_table_matches_the_accepted_keys() {
    let documented = documented_keys();
    let accepted: BTreeSet<String> = segsync::config::accepted_keys().into_iter().collect();
    assert!(accepted.contains("api.key_credential"), "{accepted:?}");
    let undocumented: Vec<&String> = accepted.difference(&documented).collect();
    let unknown: Vec<&String> = documented.difference(&accepted).collect();
    assert!(undocumented.is_empty(), "accepted but not in README's table: {undocumented:?}");
    assert!(unknown.is_empty(), "in README's table but refused: {unknown:?}");
    // And each documented key really parses: a config naming them all (with valid values) has no unknown key.
    for key in &documented {
        let (section, name) = key.split_once('.').expect("section.key");
        let text = format!("[{section}]\n{name} = 0\n");
        if let Err(errors) = segsync::config::Config::parse(std::path::Path::new("c.toml"), &text) {
            assert!(!errors.to_string().contains("unknown key"), "{key}: {errors}");
        }
    }
}

fn check(config: &std::path::Path, credentials: Option<&std::path::Path>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segsync"));
    cmd.arg("check").arg("--config").arg(config).stdin(Stdio::null()).env_remove("CREDENTIALS_DIRECTORY");
    if let Some(dir) = credentials {
        cmd.env("CREDENTIALS_DIRECTORY", dir);
    }
    let out = cmd.output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

// key_credential reads $CREDENTIALS_DIRECTORY/<name>; a missing variable or file is named in the error.
#[test]
fn key_credential_reads_the_systemd_credential() {
    let dir = tempfile::tempdir().expect("tempdir");
    support::copy_shipped_rules(dir.path(), true, |text| text);
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[api]\nbase_url = \"https://lora-api.agiletelecom.com/api\"\nkey_credential = \"api_key\"\n",
    )
    .expect("write");
    let (code, out) = check(&config, None);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("$CREDENTIALS_DIRECTORY") && out.contains("\"api_key\""), "{out}");

    let creds = tempfile::tempdir().expect("tempdir");
    let (code, out) = check(&config, Some(creds.path()));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&creds.path().join("api_key").display().to_string()), "names the file: {out}");

    std::fs::write(creds.path().join("api_key"), "k-credential-7781\n").expect("write");
    let (code, out) = check(&config, Some(creds.path()));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("k-credential-7781"), "{out}");
}
