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
fn config_prints_every_key_with_its_effective_value() {
    let dir = tempfile::tempdir().unwrap();
    let output = keel(dir.path(), &["config"]);
    assert!(output.status.success(), "{output:?}");
    let shown = String::from_utf8(output.stdout).unwrap();
    assert!(shown.ends_with('\n'), "the last line is complete: {shown}");
    assert!(
        shown.contains("agent_online_window = \"1m 30s\"\n"),
        "{shown}"
    );
    assert!(shown.contains("# token is unset"), "{shown}");
    let printed: toml::Value = toml::from_str(&shown).unwrap();
    let effective = toml::Value::try_from(keel::config::Config::default()).unwrap();
    assert_eq!(printed, effective);
}

#[test]
fn admin_takes_its_options_after_the_subcommand_and_refuses_listen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let created = keel(
        dir.path(),
        &["admin", "create-org", "acme", "--data-dir", data],
    );
    assert!(created.status.success(), "{created:?}");
    let listed = keel(dir.path(), &["admin", "list-orgs", "--data-dir", data]);
    assert!(listed.status.success(), "{listed:?}");
    assert!(String::from_utf8(listed.stdout).unwrap().contains("\tacme"));
    // Before the subcommand too.
    let listed = keel(dir.path(), &["admin", "--data-dir", data, "list-orgs"]);
    assert!(String::from_utf8(listed.stdout).unwrap().contains("\tacme"));

    let refused = keel(
        dir.path(),
        &[
            "admin",
            "--listen",
            "127.0.0.1:1",
            "list-orgs",
            "--data-dir",
            data,
        ],
    );
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8(refused.stderr)
            .unwrap()
            .contains("--listen")
    );
}

#[test]
fn create_key_help_lists_every_scope() {
    let dir = tempfile::tempdir().unwrap();
    let output = keel(dir.path(), &["admin", "create-key", "--help"]);
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for scope in keel_store::Scope::ALL {
        assert!(
            help.contains(scope.as_str()),
            "{scope:?} missing from {help}"
        );
    }
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
    assert!(stderr.contains("`http.body_limit`"), "{stderr}");

    // From the environment, the key is named as keel.toml spells it.
    std::fs::remove_file(dir.path().join("keel.toml")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("config")
        .current_dir(dir.path())
        .env("KEEL_HTTP__BODY_LIMIT", "big")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("`http.body_limit`"), "{stderr}");
    assert!(!stderr.contains("BODY_LIMIT"), "{stderr}");
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

#[tokio::test]
async fn serve_starts_in_a_shell_set_up_for_an_agent() {
    let server = crate::harness::Server::start_with(crate::harness::Options {
        env: &[
            ("KEEL_AGENT_TOKEN", "x"),
            ("KEEL_AGENT_SERVER", "http://127.0.0.1:1"),
            ("KEEL_COMMAND_ID", "y"),
        ],
        ..Default::default()
    })
    .await;
    let response = server.get("/healthz").await;
    assert_eq!(response.status(), 200);
}

#[test]
fn an_unknown_keel_variable_stops_serve_with_one_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--data-dir", "data", "--listen", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("KEEL_FAILPOINTS")
        .env("KEEL_AGENT_TOKEN", "x")
        .env("KEEL_HTTP__NOPE", "1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(stderr.matches("`http.nope`").count(), 1, "{stderr}");
    assert!(!stderr.contains("agent"), "{stderr}");
    assert!(output.stdout.is_empty(), "{:?}", output.stdout);
}
