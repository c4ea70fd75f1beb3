//! Classification: an event type gives a domain and a severity, by the organisation's rules
//! first, then by the built-in ones.

use keel_store::notifications::model::Severity;

use super::settings::Rule;

/// The built-in keywords, after the organisation's rules: the first found in the event type
/// gives its severity.
pub const DEFAULT_KEYWORDS: &[(&str, Severity)] = &[
    ("_error", Severity::Critical),
    ("_critical", Severity::Critical),
    ("_down", Severity::Critical),
    ("_failed", Severity::High),
    ("_alert", Severity::High),
    ("_timeout", Severity::High),
    ("_warning", Severity::Medium),
    ("_completed", Severity::Info),
    ("_created", Severity::Info),
    ("_updated", Severity::Info),
];

/// The severity of an event that no rule and no built-in keyword classifies.
pub const DEFAULT_SEVERITY: Severity = Severity::Low;

/// What classification gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The domain (`orders`, `billing`).
    pub domain: String,
    /// The severity.
    pub severity: Severity,
}

/// Classifies `event_type` by `rules` (oldest first), then by the built-in ones: the domain
/// defaults to the type up to its first `.` (or else its first `_`), the severity to the
/// first built-in keyword the type contains, else [`DEFAULT_SEVERITY`].
pub fn classify(event_type: &str, rules: &[Rule]) -> Classification {
    let matching = || {
        rules
            .iter()
            .filter(|rule| matches(&rule.pattern, event_type))
    };
    let domain = matching()
        .find_map(|rule| rule.domain.clone())
        .unwrap_or_else(|| default_domain(event_type));
    let severity = matching()
        .filter(|rule| {
            rule.keywords.is_empty()
                || rule
                    .keywords
                    .iter()
                    .any(|k| event_type.contains(k.as_str()))
        })
        .find_map(|rule| rule.severity)
        .or_else(|| {
            DEFAULT_KEYWORDS
                .iter()
                .find(|(keyword, _)| event_type.contains(keyword))
                .map(|(_, severity)| *severity)
        })
        .unwrap_or(DEFAULT_SEVERITY);
    Classification { domain, severity }
}

fn default_domain(event_type: &str) -> String {
    let end = event_type
        .find('.')
        .or_else(|| event_type.find('_'))
        .unwrap_or(event_type.len());
    event_type.get(..end).unwrap_or(event_type).to_owned()
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (none included)
/// and every other character itself. Written here because it is this one rule: a glob crate
/// brings classes, escapes and path semantics the API would then have to document.
pub fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return text.is_empty();
    };
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = rest.get(at + part.len()..).unwrap_or_default(),
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        pattern: &str,
        domain: Option<&str>,
        keywords: &[&str],
        severity: Option<Severity>,
    ) -> Rule {
        Rule {
            name: "r".to_owned(),
            pattern: pattern.to_owned(),
            domain: domain.map(str::to_owned),
            keywords: keywords.iter().map(|k| (*k).to_owned()).collect(),
            severity,
        }
    }

    #[test]
    fn the_built_in_keywords_follow_the_replaced_system() {
        for (event_type, severity) in [
            ("db_error", Severity::Critical),
            ("node_critical", Severity::Critical),
            ("site_down", Severity::Critical),
            ("payment_failed", Severity::High),
            ("cpu_alert", Severity::High),
            ("api_timeout", Severity::High),
            ("disk_warning", Severity::Medium),
            ("order_completed", Severity::Info),
            ("user_created", Severity::Info),
            ("user_updated", Severity::Info),
            ("something_else", DEFAULT_SEVERITY),
        ] {
            assert_eq!(classify(event_type, &[]).severity, severity, "{event_type}");
        }
        assert_eq!(classify("order_failed", &[]).domain, "order");
        assert_eq!(classify("billing.invoice_failed", &[]).domain, "billing");
        assert_eq!(classify("plain", &[]).domain, "plain");
    }

    #[test]
    fn rules_come_first_in_order() {
        let rules = [
            rule("pay*", Some("payments"), &[], None),
            rule("*", Some("other"), &["_failed"], Some(Severity::Critical)),
            rule("*", None, &[], Some(Severity::Low)),
        ];
        let c = classify("payment_failed", &rules);
        assert_eq!(c.domain, "payments");
        assert_eq!(c.severity, Severity::Critical);
        let c = classify("order_created", &rules);
        assert_eq!(c.domain, "other");
        assert_eq!(c.severity, Severity::Low);
    }

    #[test]
    fn patterns() {
        assert!(matches("*", ""));
        assert!(matches("*", "anything"));
        assert!(matches("order_*", "order_failed"));
        assert!(!matches("order_*", "orders_failed"));
        assert!(matches("*_failed", "order_failed"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(matches("a**", "a"));
        assert!(!matches("ab*ba", "aba"));
    }
}
