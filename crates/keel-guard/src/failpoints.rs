//! Named fault-injection points, set at start-up from `KEEL_FAILPOINTS`.
//!
//! The points themselves are `fail::fail_point!("name")` calls in the code; `docs/failpoints.md`
//! lists every one. The variable holds `name=action` pairs separated by `;`, where `action` is
//! what the [`fail`] crate accepts: `panic`, `panic(msg)`, `return`, `sleep(ms)`, `off`,
//! optionally with a probability and a count (`20%3*panic`).

/// The environment variable read at start-up.
pub const ENV_VAR: &str = "KEEL_FAILPOINTS";

/// A failpoint setting that could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum FailpointError {
    /// No failpoint has this name (a typo would otherwise be silently ignored).
    #[error("{ENV_VAR}: there is no failpoint named `{0}`")]
    Unknown(String),
    /// A pair without `=`.
    #[error("{ENV_VAR}: `{0}` is not of the form name=action")]
    Malformed(String),
    /// The action was refused by the failpoint registry.
    #[error("{ENV_VAR}: failpoint `{name}`: {reason}")]
    BadAction {
        /// The failpoint name.
        name: String,
        /// Why the action was refused.
        reason: String,
    },
}

/// Applies `spec` (`name=action;name=action`); every name must be one of `known`. Returns the
/// names it configured. Nothing is applied when one pair is wrong.
pub fn configure(spec: &str, known: &[&str]) -> Result<Vec<String>, FailpointError> {
    let mut pairs = Vec::new();
    for pair in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, action) = pair
            .split_once('=')
            .ok_or_else(|| FailpointError::Malformed(pair.to_owned()))?;
        let name = name.trim();
        if !known.contains(&name) {
            return Err(FailpointError::Unknown(name.to_owned()));
        }
        pairs.push((name, action.trim()));
    }
    apply(&pairs)
}

fn apply(pairs: &[(&str, &str)]) -> Result<Vec<String>, FailpointError> {
    let mut names = Vec::new();
    for &(name, action) in pairs {
        fail::cfg(name, action).map_err(|reason| FailpointError::BadAction {
            name: name.to_owned(),
            reason,
        })?;
        names.push(name.to_owned());
    }
    Ok(names)
}

/// Applies `KEEL_FAILPOINTS` when it is set; returns the names it configured.
pub fn configure_from_env(known: &[&str]) -> Result<Vec<String>, FailpointError> {
    match std::env::var(ENV_VAR) {
        Ok(spec) => configure(&spec, known),
        Err(_) => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &[
        "guard.test.a",
        "guard.test.b",
        "guard.test.c",
        "guard.test.d",
    ];

    #[test]
    fn pairs_are_applied_and_bad_ones_named() {
        assert_eq!(
            configure("guard.test.a=return; guard.test.b=off", KNOWN).unwrap(),
            vec!["guard.test.a", "guard.test.b"]
        );
        assert!(matches!(
            configure("guard.test.c", KNOWN),
            Err(FailpointError::Malformed(_))
        ));
        assert!(matches!(
            configure("guard.test.d=explode", KNOWN),
            Err(FailpointError::BadAction { .. })
        ));
        assert!(matches!(
            configure("guard.test.typo=panic", KNOWN),
            Err(FailpointError::Unknown(name)) if name == "guard.test.typo"
        ));
        fail::remove("guard.test.a");
    }
}
