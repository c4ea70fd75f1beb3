//! Agent labels and label selectors.
//!
//! Labels are a string map on each agent (`env=prod`, `os=linux`). A selector picks agents by
//! their labels, in the grammar of Kubernetes label selectors, requirements separated by commas
//! and all of them required:
//!
//! | form | matches an agent whose labels |
//! |---|---|
//! | `env=prod`, `env==prod` | have `env` equal to `prod` |
//! | `env!=prod` | do not have `env` equal to `prod` (also: no `env` at all) |
//! | `os in (linux,bsd)` | have `os` equal to one of the values |
//! | `os notin (linux,bsd)` | do not have `os` equal to any of them (also: no `os`) |
//! | `canary` | have the key `canary` |
//! | `!canary` | do not have the key `canary` |
//!
//! Spaces around names, operators and parentheses are ignored. The empty selector matches every
//! agent. No crate parses this grammar without pulling in a Kubernetes client, so it is written
//! here, small and tested one form at a time.

use std::collections::BTreeMap;
use std::fmt;

/// The most labels one agent carries (reported and assigned, each).
pub const MAX_LABELS: usize = 64;

/// The longest label key.
pub const MAX_LABEL_KEY_LEN: usize = 63;

/// The longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;

/// The longest selector, in bytes.
pub const MAX_SELECTOR_LEN: usize = 1024;

/// An agent's labels, by key.
pub type Labels = BTreeMap<String, String>;

/// Whether a key or value character is allowed: `a-z A-Z 0-9 _ . - /`.
fn is_label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/')
}

/// A label key: 1 to [`MAX_LABEL_KEY_LEN`] characters of `a-z A-Z 0-9 _ . - /`, beginning and
/// ending with a letter or digit.
pub fn check_label_key(key: &str) -> Result<(), String> {
    let edges_ok = key.starts_with(|c: char| c.is_ascii_alphanumeric())
        && key.ends_with(|c: char| c.is_ascii_alphanumeric());
    if (1..=MAX_LABEL_KEY_LEN).contains(&key.len()) && edges_ok && key.chars().all(is_label_char) {
        Ok(())
    } else {
        Err(format!(
            "label key `{}`: 1 to {MAX_LABEL_KEY_LEN} characters of a-z, A-Z, 0-9, _ . - /, \
             beginning and ending with a letter or digit",
            key.escape_debug()
        ))
    }
}

/// A label value: empty, or up to [`MAX_LABEL_VALUE_LEN`] characters of `a-z A-Z 0-9 _ . - /`
/// beginning and ending with a letter or digit.
pub fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    let edges_ok = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if value.len() <= MAX_LABEL_VALUE_LEN && edges_ok && value.chars().all(is_label_char) {
        Ok(())
    } else {
        Err(format!(
            "label value `{}`: up to {MAX_LABEL_VALUE_LEN} characters of a-z, A-Z, 0-9, \
             _ . - /, beginning and ending with a letter or digit",
            value.escape_debug()
        ))
    }
}

/// Checks a whole label map: at most [`MAX_LABELS`] entries, each key and value valid.
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!("at most {MAX_LABELS} labels"));
    }
    for (key, value) in labels {
        check_label_key(key)?;
        check_label_value(value)?;
    }
    Ok(())
}

/// What one requirement of a selector asks of a label.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// `key in (values)`, `key=value`, `key==value`.
    In(String, Vec<String>),
    /// `key notin (values)`, `key!=value`.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists(key) => labels.contains_key(key),
            Self::DoesNotExist(key) => !labels.contains_key(key),
        }
    }
}

/// A parsed label selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    text: String,
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses a selector; `Err` says what is wrong and where.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_SELECTOR_LEN {
            return Err(format!("at most {MAX_SELECTOR_LEN} bytes"));
        }
        let mut parser = Parser {
            text,
            chars: text.char_indices().peekable(),
        };
        let mut requirements = Vec::new();
        parser.skip_spaces();
        if parser.at_end() {
            return Ok(Self {
                text: String::new(),
                requirements,
            });
        }
        loop {
            requirements.push(parser.requirement()?);
            parser.skip_spaces();
            match parser.next() {
                None => break,
                Some((_, ',')) => parser.skip_spaces(),
                Some((at, c)) => {
                    return Err(format!(
                        "unexpected `{}` at byte {at}; requirements are separated by commas",
                        c.escape_debug()
                    ));
                }
            }
        }
        Ok(Self {
            text: text.trim().to_owned(),
            requirements,
        })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether it has no requirement (and so matches every agent).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The selector as it was given (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

struct Parser<'a> {
    text: &'a str,
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
}

impl Parser<'_> {
    fn next(&mut self) -> Option<(usize, char)> {
        self.chars.next()
    }

    fn peek(&mut self) -> Option<char> {
        self.chars.peek().map(|&(_, c)| c)
    }

    fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    fn offset(&mut self) -> usize {
        self.chars.peek().map_or(self.text.len(), |&(at, _)| at)
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(|c| c == ' ') {
            self.chars.next();
        }
    }

    /// A run of label characters (possibly empty).
    fn word(&mut self) -> String {
        let mut word = String::new();
        while let Some(c) = self.peek().filter(|&c| is_label_char(c)) {
            word.push(c);
            self.chars.next();
        }
        word
    }

    fn key(&mut self) -> Result<String, String> {
        let at = self.offset();
        let key = self.word();
        if key.is_empty() {
            return Err(match self.peek() {
                Some(c) => format!(
                    "expected a label key at byte {at}, found `{}`",
                    c.escape_debug()
                ),
                None => format!("expected a label key at byte {at}, found the end"),
            });
        }
        check_label_key(&key)?;
        Ok(key)
    }

    fn value(&mut self) -> Result<String, String> {
        let value = self.word();
        check_label_value(&value)?;
        Ok(value)
    }

    fn expect(&mut self, wanted: char) -> Result<(), String> {
        let at = self.offset();
        match self.next() {
            Some((_, c)) if c == wanted => Ok(()),
            Some((_, c)) => Err(format!(
                "expected `{wanted}` at byte {at}, found `{}`",
                c.escape_debug()
            )),
            None => Err(format!("expected `{wanted}` at byte {at}, found the end")),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.peek() == Some('!') {
            self.chars.next();
            self.skip_spaces();
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        self.skip_spaces();
        match self.peek() {
            None | Some(',') => Ok(Requirement::Exists(key)),
            Some('=') => {
                self.chars.next();
                if self.peek() == Some('=') {
                    self.chars.next();
                }
                self.skip_spaces();
                Ok(Requirement::In(key, vec![self.value()?]))
            }
            Some('!') => {
                self.chars.next();
                self.expect('=')?;
                self.skip_spaces();
                Ok(Requirement::NotIn(key, vec![self.value()?]))
            }
            Some(_) => {
                let at = self.offset();
                let operator = self.word();
                let negated = match operator.as_str() {
                    "in" => false,
                    "notin" => true,
                    _ => {
                        return Err(format!(
                            "expected `=`, `==`, `!=`, `in` or `notin` after `{key}` at byte {at}"
                        ));
                    }
                };
                self.skip_spaces();
                let values = self.value_set()?;
                Ok(if negated {
                    Requirement::NotIn(key, values)
                } else {
                    Requirement::In(key, values)
                })
            }
        }
    }

    /// `( value, value, … )`, at least one value.
    fn value_set(&mut self) -> Result<Vec<String>, String> {
        self.expect('(')?;
        let mut values = Vec::new();
        loop {
            self.skip_spaces();
            values.push(self.value()?);
            self.skip_spaces();
            let at = self.offset();
            match self.next() {
                Some((_, ',')) => {}
                Some((_, ')')) => return Ok(values),
                Some((_, c)) => {
                    return Err(format!(
                        "expected `,` or `)` at byte {at}, found `{}`",
                        c.escape_debug()
                    ));
                }
                None => return Err(format!("expected `)` at byte {at}, found the end")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn matches(selector: &str, pairs: &[(&str, &str)]) -> bool {
        match LabelSelector::parse(selector) {
            Ok(selector) => selector.matches(&labels(pairs)),
            Err(err) => panic!("`{selector}` does not parse: {err}"),
        }
    }

    fn refusal(selector: &str) -> String {
        match LabelSelector::parse(selector) {
            Ok(parsed) => panic!("`{selector}` parsed as {parsed:?}"),
            Err(err) => err,
        }
    }

    #[test]
    fn equality_with_one_or_two_equals_signs() {
        assert!(matches("env=prod", &[("env", "prod")]));
        assert!(matches("env==prod", &[("env", "prod")]));
        assert!(!matches("env=prod", &[("env", "dev")]));
        assert!(!matches("env=prod", &[]));
    }

    #[test]
    fn inequality_matches_other_values_and_absent_keys() {
        assert!(matches("env!=prod", &[("env", "dev")]));
        assert!(matches("env!=prod", &[]));
        assert!(!matches("env!=prod", &[("env", "prod")]));
    }

    #[test]
    fn set_membership() {
        assert!(matches("os in (linux,bsd)", &[("os", "bsd")]));
        assert!(matches("os in ( linux , bsd )", &[("os", "linux")]));
        assert!(!matches("os in (linux,bsd)", &[("os", "windows")]));
        assert!(!matches("os in (linux,bsd)", &[]));
    }

    #[test]
    fn set_exclusion_matches_absent_keys() {
        assert!(matches("os notin (linux,bsd)", &[("os", "windows")]));
        assert!(matches("os notin (linux)", &[]));
        assert!(!matches("os notin (linux,bsd)", &[("os", "linux")]));
    }

    #[test]
    fn existence_and_absence() {
        assert!(matches("canary", &[("canary", "")]));
        assert!(!matches("canary", &[]));
        assert!(matches("!canary", &[("env", "prod")]));
        assert!(!matches("! canary", &[("canary", "yes")]));
    }

    #[test]
    fn every_requirement_must_hold() {
        let selector = "env=prod,os in (linux,bsd),!canary";
        assert!(matches(selector, &[("env", "prod"), ("os", "linux")]));
        assert!(!matches(
            selector,
            &[("env", "prod"), ("os", "linux"), ("canary", "")]
        ));
        assert!(!matches(selector, &[("env", "prod"), ("os", "mac")]));
        assert!(!matches(selector, &[("env", "dev"), ("os", "linux")]));
    }

    #[test]
    fn the_empty_selector_matches_everything() {
        assert!(matches("", &[]));
        assert!(matches("  ", &[("a", "b")]));
        assert!(LabelSelector::parse("").is_ok_and(|s| s.is_empty()));
    }

    #[test]
    fn values_may_be_empty() {
        assert!(matches("role=", &[("role", "")]));
        assert!(!matches("role=", &[("role", "db")]));
    }

    #[test]
    fn malformed_selectors_say_what_is_wrong() {
        assert!(refusal("env=prod,").contains("expected a label key"));
        assert!(refusal("env in prod").contains("expected `(`"));
        assert!(refusal("os in (linux").contains("expected `)`"));
        assert!(refusal("env >= 3").contains("expected `=`, `==`, `!=`, `in` or `notin`"));
        assert!(refusal("env=prod;os=linux").contains("unexpected `;`"));
        assert!(refusal("-env=prod").contains("label key"));
        assert!(refusal(",").contains("expected a label key"));
        assert!(refusal(&"a".repeat(MAX_SELECTOR_LEN + 1)).contains("at most"));
        assert!(refusal(&format!("{}=x", "k".repeat(64))).contains("1 to 63"));
    }

    #[test]
    fn label_maps_are_checked() {
        assert!(check_labels(&labels(&[("env", "prod"), ("team/x", "a.b-c_d")])).is_ok());
        assert!(check_labels(&labels(&[("env", "-prod")])).is_err());
        assert!(check_labels(&labels(&[("", "x")])).is_err());
        assert!(check_labels(&labels(&[("a b", "x")])).is_err());
        let many: Labels = (0..=MAX_LABELS)
            .map(|n| (format!("k{n}"), String::new()))
            .collect();
        assert!(check_labels(&many).is_err());
    }
}
