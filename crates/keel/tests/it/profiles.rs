//! `catch_unwind` is useless under `panic = "abort"`: every profile must unwind.

#[test]
fn every_cargo_profile_unwinds() {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.toml");
    let root: toml::Value = toml::from_str(&std::fs::read_to_string(manifest).unwrap()).unwrap();
    let profiles = root["profile"].as_table().unwrap();
    // `test` and `bench` inherit their panic strategy from `dev` and `release`.
    for name in ["dev", "release"] {
        let profile = profiles
            .get(name)
            .unwrap_or_else(|| panic!("profile.{name} must be declared with panic = \"unwind\""));
        assert_eq!(
            profile.get("panic").and_then(toml::Value::as_str),
            Some("unwind"),
            "profile.{name}"
        );
    }
    for (name, profile) in profiles {
        if let Some(strategy) = profile.get("panic") {
            assert_eq!(strategy.as_str(), Some("unwind"), "profile.{name}");
        }
    }
}

#[test]
fn this_build_unwinds() {
    let caught = std::panic::catch_unwind(|| panic!("unwinds"));
    assert!(caught.is_err());
}
