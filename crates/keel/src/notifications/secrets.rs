//! Senders' credentials at rest: sealed with XChaCha20-Poly1305 (the `chacha20poly1305` crate)
//! under a 32-byte key from `notifications.secret_key`, or from `<data_dir>/notification-key`,
//! generated (mode 0600) at first start. The organisation's id is the associated data, so a
//! sealed secret copied into another organisation's row does not open.
//!
//! A sealed secret is a random 24-byte nonce followed by the ciphertext and its tag.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use keel_store::notifications::model::SealedSecret;
use keel_store::{ExposeSecret, OrgId, SecretString};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// Name of the key file in the data directory.
pub const KEY_FILE: &str = "notification-key";

const NONCE_LEN: usize = 24;

/// Why a secret could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key is not 32 bytes of base64.
    #[error("the notification key must be 32 bytes, base64-encoded")]
    BadKey,
    /// The key file could not be read or written.
    #[error("notification key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The sealed bytes do not open with this key (another key, or altered bytes).
    #[error("a sealed secret does not open with the notification key")]
    Open,
    /// Sealing failed.
    #[error("sealing failed")]
    Seal,
    /// The opened secret is not what was sealed.
    #[error("a sealed secret is not readable: {0}")]
    Format(String),
}

/// Seals and opens senders' secrets. Prints without its key.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox([REDACTED])")
    }
}

/// A sender's secrets in clear, as sealed (JSON inside the seal).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct OpenSecrets {
    /// Webhook signing secrets (`whsec_…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signing_secrets: Vec<String>,
    /// The SMTP password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The Telegram bot token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_token: Option<String>,
}

impl OpenSecrets {
    /// Whether there is nothing to seal.
    pub fn is_empty(&self) -> bool {
        self.signing_secrets.is_empty() && self.password.is_none() && self.bot_token.is_none()
    }
}

impl From<&super::settings::SenderSecrets> for OpenSecrets {
    fn from(secrets: &super::settings::SenderSecrets) -> Self {
        Self {
            signing_secrets: secrets
                .signing_secrets
                .iter()
                .map(|s| s.expose_secret().to_owned())
                .collect(),
            password: secrets
                .password
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
            bot_token: secrets
                .bot_token
                .as_ref()
                .map(|s| s.expose_secret().to_owned()),
        }
    }
}

impl std::fmt::Debug for OpenSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenSecrets([REDACTED])")
    }
}

impl SecretBox {
    /// A box with the key `key` (32 bytes, base64).
    pub fn from_base64(key: &SecretString) -> Result<Self, SecretError> {
        let bytes = STANDARD
            .decode(key.expose_secret().trim())
            .map_err(|_| SecretError::BadKey)?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| SecretError::BadKey)?;
        Ok(Self { cipher })
    }

    /// The configured key, or the one in `data_dir`'s key file, created (0600) when absent.
    pub fn load(configured: Option<&SecretString>, data_dir: &Path) -> Result<Self, SecretError> {
        if let Some(key) = configured {
            return Self::from_base64(key);
        }
        let path = data_dir.join(KEY_FILE);
        let file_error = |source| SecretError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::from_base64(&SecretString::from(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0_u8; 32];
                rand::rng().fill_bytes(&mut key);
                let encoded = SecretString::from(STANDARD.encode(key));
                crate::server::write_secret_file(&path, &encoded)
                    .map_err(|e| file_error(std::io::Error::other(format!("{e:#}"))))?;
                Self::from_base64(&encoded)
            }
            Err(error) => Err(file_error(error)),
        }
    }

    /// Seals `secrets` for `org`.
    pub fn seal(&self, org: OrgId, secrets: &OpenSecrets) -> Result<SealedSecret, SecretError> {
        let plain = serde_json::to_vec(secrets).map_err(|_| SecretError::Seal)?;
        let mut nonce = [0_u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: org.0.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Seal)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(SealedSecret(out))
    }

    /// Opens what [`SecretBox::seal`] sealed for `org`.
    pub fn open(&self, org: OrgId, sealed: &SealedSecret) -> Result<OpenSecrets, SecretError> {
        let Some((nonce, ciphertext)) = sealed.0.split_at_checked(NONCE_LEN) else {
            return Err(SecretError::Open);
        };
        let plain = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: org.0.as_bytes(),
                },
            )
            .map_err(|_| SecretError::Open)?;
        serde_json::from_slice(&plain).map_err(|e| SecretError::Format(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> OpenSecrets {
        OpenSecrets {
            password: Some("hunter2-smtp".to_owned()),
            ..OpenSecrets::default()
        }
    }

    #[test]
    fn sealed_secrets_open_only_for_their_organisation_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let secret_box = SecretBox::load(None, dir.path()).unwrap();
        let org = OrgId::new();
        let sealed = secret_box.seal(org, &secrets()).unwrap();
        assert!(!sealed.0.windows(b"hunter2".len()).any(|w| w == b"hunter2"));
        assert_eq!(
            secret_box.open(org, &sealed).unwrap().password.as_deref(),
            Some("hunter2-smtp")
        );
        assert!(matches!(
            secret_box.open(OrgId::new(), &sealed),
            Err(SecretError::Open)
        ));
        // The same file gives the same key; another key does not open it.
        let again = SecretBox::load(None, dir.path()).unwrap();
        assert!(again.open(org, &sealed).is_ok());
        let other = SecretBox::load(None, tempfile::tempdir().unwrap().path()).unwrap();
        assert!(matches!(other.open(org, &sealed), Err(SecretError::Open)));
        // Nothing prints the secret.
        assert!(!format!("{:?} {:?} {sealed:?}", secrets(), secret_box).contains("hunter2"));
        // The key file is the owner's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            SecretBox::from_base64(&SecretString::from("c2hvcnQ=")),
            Err(SecretError::BadKey)
        ));
    }
}
