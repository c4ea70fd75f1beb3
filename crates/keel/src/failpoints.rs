//! Every failpoint in keel, by name: `KEEL_FAILPOINTS` may set only these (a typo stops keel at
//! start-up instead of being ignored). `docs/failpoints.md` describes each; a test checks that
//! this list, the code's `fail_point!` calls and the document agree.

/// The names of all failpoints in keel's crates.
pub const KNOWN: &[&str] = &[
    // keel-guard
    "supervisor.task",
    "periodic.tick",
    // keel-log
    "log.format",
    "log.sink",
    "log.writer",
    "log.writer.exit",
    // keel-store
    "store.claim",
    "store.heartbeat",
    "store.complete",
    "store.write",
    "store.commit",
    "store.create_group",
    "store.report_group",
    "store.crash",
    // keel
    "http.handler",
    "http.delay",
    "http.route_panic",
    "job.telemetry",
    "commands.release_stuck",
    "commands.scheduler",
    "overload.pressure",
    "deliveries.item",
    "deliveries.cleanup",
    "channels.webhook.send",
    "channels.telegram.send",
    "channels.email.send",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::KNOWN;

    fn failpoints_in(dir: &Path, found: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                failpoints_in(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    if let Some((_, rest)) = line.split_once("fail_point!(\"") {
                        found.insert(rest.split('"').next().unwrap().to_owned());
                    }
                }
            }
        }
    }

    #[test]
    fn the_list_the_code_and_the_document_agree() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut in_code = BTreeSet::new();
        for krate in ["keel", "keel-guard", "keel-log", "keel-store"] {
            failpoints_in(&crates.join(krate).join("src"), &mut in_code);
        }
        let listed: BTreeSet<String> = KNOWN.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            listed, in_code,
            "failpoints::KNOWN against the fail_point! calls"
        );
        let doc = std::fs::read_to_string(crates.join("../docs/failpoints.md")).unwrap();
        for name in KNOWN {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/failpoints.md lacks `{name}`"
            );
        }
    }
}
