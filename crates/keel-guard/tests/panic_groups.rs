//! Grouping of panics by fingerprint, in a process of its own: a hundred panics would push other
//! tests' reports out of the shared list of recent panics.
// Test code: a failed expectation is meant to fail the test.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

#[test]
fn a_hundred_panics_at_one_location_are_one_group_of_a_hundred() {
    keel_guard::panic::install_hook();
    for i in 0..100 {
        let scope = keel_guard::Scope::new("group-test").with_request_id(format!("req-{i}"));
        let _ = keel_guard::isolate(scope, || panic!("order {i} of 0x{:x} failed", i * 7919));
    }
    let groups: Vec<_> = keel_guard::panic::groups()
        .into_iter()
        .filter(|g| g.component == "group-test")
        .collect();
    assert_eq!(groups.len(), 1, "{groups:?}");
    let group = &groups[0];
    assert_eq!(group.count, 100);
    assert_eq!(group.message_shape, "order <n> of <hex> failed");
    assert_eq!(group.last_message, "order 99 of 0xbf66d failed");
    assert!(group.first_seen <= group.last_seen);
    assert_eq!(
        Vec::from(group.recent_request_ids.clone()),
        ["req-95", "req-96", "req-97", "req-98", "req-99"]
    );
    assert!(
        group
            .location
            .as_deref()
            .unwrap()
            .contains("panic_groups.rs")
    );
    let fingerprints: std::collections::BTreeSet<_> = keel_guard::panic::recent()
        .into_iter()
        .filter(|r| r.component == "group-test")
        .map(|r| r.fingerprint)
        .collect();
    assert_eq!(fingerprints.len(), 1);
}
