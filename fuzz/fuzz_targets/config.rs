//! The configuration file (`keel.toml`): TOML, merged over the defaults and validated by
//! `Config::load`, as `keel serve` and `keel config` read it.
//!
//! Input: the file's bytes.
//!
//! What an operator relies on:
//! - no panic: a bad file is an error naming what is wrong;
//! - a file that loads can be printed (`keel config`, `Config::to_redacted_toml`), and the
//!   printed file loads again to the same configuration (when it has no secrets, which print
//!   as `<redacted>`).
#![no_main]

use std::sync::OnceLock;

use keel::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

fn load(text: &[u8]) -> Result<Config, keel::config::ConfigError> {
    let path = dir().path().join("keel.toml");
    std::fs::write(&path, text).expect("writing the file");
    Config::load(Some(&path), &Overrides::default())
}

fuzz_target!(|data: &[u8]| {
    let Ok(config) = load(data) else {
        return;
    };
    let printed = config
        .to_redacted_toml()
        .unwrap_or_else(|e| panic!("a configuration that loaded cannot be printed: {e}"));
    if printed.contains("<redacted>") {
        return;
    }
    let again = load(printed.as_bytes())
        .unwrap_or_else(|e| panic!("the printed configuration does not load: {e}\n{printed}"));
    let reprinted = again.to_redacted_toml().expect("printing it again");
    assert_eq!(
        printed, reprinted,
        "the printed configuration loads to another one"
    );
});
