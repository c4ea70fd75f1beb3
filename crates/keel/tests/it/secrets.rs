//! Secrets stay secret: file modes of what `keel serve` writes, and no token in its logs,
//! stdout or stderr (`keel config`: `cli.rs`).

use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::poll_until;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn the_data_directory_and_every_file_keel_writes_are_private_and_no_token_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    // Not created yet, and two levels deep: keel creates both.
    let data = dir.path().join("state").join("data");
    std::fs::write(
        dir.path().join("keel.toml"),
        format!(
            r#"data_dir = "{}"
[http]
listen = "127.0.0.1:0"
[log]
dir = "logs"
[[log.sinks]]
name = "all"
kind = "file"
streams = ["app", "audit", "access", "error"]
format = "json"
file = {{ path = "all.jsonl", max_size = "1GiB", compress = false }}
"#,
            data.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("KEEL_FAILPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first_line)
        .unwrap();
    let admin_token = data.join("admin-token");
    let log = data.join("logs").join("all.jsonl");
    poll_until(Duration::from_secs(10), || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("keel is listening"))
            && admin_token.exists()
    })
    .await;

    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("logs")), 0o700);
    for name in [
        "keel.db",
        "keel.db-wal",
        "keel.db-shm",
        "admin-token",
        "operator-key",
        "default-admin-key",
        "logs/all.jsonl",
    ] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }

    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    for name in ["admin-token", "operator-key", "default-admin-key"] {
        let token = std::fs::read_to_string(data.join(name)).unwrap();
        let token = token.trim();
        assert!(token.len() >= 32, "{name}");
        assert!(!logged.contains(token), "{name} is in the log");
        assert!(!first_line.contains(token), "{name} is on stdout");
        assert!(!stderr.contains(token), "{name} is on stderr");
    }
}
