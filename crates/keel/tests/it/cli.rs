//! The command line: `--version`, `keel config`, and configuration errors that name the key.

use std::process::Command;

fn keel(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .current_dir(dir)
        .env_remove("KEEL_FAILPOINTS")
        .output()
        .unwrap()
}

#[test]
fn version_prints_the_crate_version() {
    let dir = tempfile::tempdir().unwrap();
    let output = keel(dir.path(), &["--version"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        format!("keel {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_prints_the_effective_configuration_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("keel.toml"),
        "[admin]\ntoken = \"super-secret-admin-token\"\n[http]\nbody_limit = 2097152\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["config", "--listen", "127.0.0.1:9999"])
        .current_dir(dir.path())
        .env("KEEL_SHUTDOWN__GRACE", "7s")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    assert!(!shown.contains("super-secret"), "{shown}");
    let parsed: toml::Value = toml::from_str(&shown).unwrap();
    assert_eq!(parsed["admin"]["token"].as_str(), Some("<redacted>"));
    assert_eq!(parsed["http"]["body_limit"].as_integer(), Some(2_097_152));
    assert_eq!(
        parsed["commands"]["limits"]["result_bytes"].as_integer(),
        Some(65536)
    );
    assert_eq!(parsed["http"]["listen"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(parsed["shutdown"]["grace"].as_str(), Some("7s"));
}

#[test]
fn an_unknown_key_or_a_bad_value_is_an_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keel.toml"), "[http]\nlisten_at = \"x\"\n").unwrap();
    let output = keel(dir.path(), &["config"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("listen_at"), "{stderr}");

    std::fs::write(
        dir.path().join("keel.toml"),
        "[http]\nbody_limit = \"big\"\n",
    )
    .unwrap();
    let output = keel(dir.path(), &["serve"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("body_limit"), "{stderr}");
}

#[test]
fn a_misspelt_failpoint_stops_keel_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .env("KEEL_FAILPOINTS", "http.handlr=panic")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("http.handlr"), "{stderr}");
}
