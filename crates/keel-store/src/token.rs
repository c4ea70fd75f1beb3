//! API key tokens: `keel_<prefix>_<secret>`.
//!
//! The prefix (8 characters) finds the key; the whole token is kept only as its SHA-256 hash,
//! compared in constant time.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const SCHEME: &str = "keel_";
/// Length of the public prefix.
pub(crate) const PREFIX_LEN: usize = 8;
/// Length of the secret part: 40 alphanumeric characters, about 238 bits.
const SECRET_LEN: usize = 40;

/// A freshly generated token and the parts that are stored.
pub(crate) struct NewToken {
    pub(crate) token: String,
    pub(crate) prefix: String,
    pub(crate) hash: String,
}

/// Generates a token from the thread-local CSPRNG.
pub(crate) fn generate() -> NewToken {
    let mut rng = rand::rng();
    let prefix: String = (&mut rng)
        .sample_iter(Alphanumeric)
        .take(PREFIX_LEN)
        .map(|b| char::from(b).to_ascii_lowercase())
        .collect();
    let secret: String = (&mut rng)
        .sample_iter(Alphanumeric)
        .take(SECRET_LEN)
        .map(char::from)
        .collect();
    let token = format!("{SCHEME}{prefix}_{secret}");
    let hash = hash(&token);
    NewToken {
        token,
        prefix,
        hash,
    }
}

/// The stored form of a token: hex SHA-256.
pub(crate) fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The prefix of a well-formed token.
pub(crate) fn prefix_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(SCHEME)?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == PREFIX_LEN && !secret.is_empty()).then_some(prefix)
}

/// Whether `token` hashes to `stored_hash`, compared in constant time.
pub(crate) fn matches(token: &str, stored_hash: &str) -> bool {
    hash(token).as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_verify() {
        let t = generate();
        assert!(t.token.starts_with("keel_"));
        assert_eq!(prefix_of(&t.token), Some(t.prefix.as_str()));
        assert!(t.token.len() >= SCHEME.len() + PREFIX_LEN + 1 + 32);
        assert!(matches(&t.token, &t.hash));
        assert!(!matches(&format!("{}x", t.token), &t.hash));
        assert_ne!(generate().token, t.token);
    }

    #[test]
    fn malformed_tokens_have_no_prefix() {
        for bad in [
            "",
            "keel_",
            "keel_abc_def",
            "other_abcdefgh_x",
            "keel_abcdefgh_",
            "keel_abcdefgh",
        ] {
            assert_eq!(prefix_of(bad), None, "{bad}");
        }
    }
}
