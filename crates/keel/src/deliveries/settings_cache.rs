//! The channels and senders that sends read, kept for a second: a burst of deliveries through
//! one channel reads it once, not once per delivery, and a change of a channel or a sender
//! reaches the sends within [`SETTINGS_TTL`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::notifications::model::{Setting, SettingId, SettingKind};
use keel_store::{OrgId, Store, StoreError};
use parking_lot::Mutex;

/// How long a setting read by a send is used before it is read again.
pub const SETTINGS_TTL: Duration = Duration::from_secs(1);

/// The most settings kept; beyond that the cache starts again empty.
const MAX_ENTRIES: usize = 10_000;

type Key = (OrgId, SettingKind, SettingId);

/// When a setting was read, and what it was (`None`: there was none).
type Entry = (Instant, Option<Arc<Setting>>);

/// Settings as sends last read them (a deleted one as `None`), with when.
#[derive(Default)]
pub struct SettingsCache {
    entries: Mutex<HashMap<Key, Entry>>,
}

impl SettingsCache {
    /// The setting as it was at most [`SETTINGS_TTL`] ago.
    pub async fn get(
        &self,
        store: &dyn Store,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> Result<Option<Arc<Setting>>, StoreError> {
        let key = (org, kind, id);
        if let Some((read_at, setting)) = self.entries.lock().get(&key)
            && read_at.elapsed() < SETTINGS_TTL
        {
            return Ok(setting.clone());
        }
        let setting = store
            .notifications()
            .get_setting(org, kind, id)
            .await?
            .map(Arc::new);
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (Instant::now(), setting.clone()));
        Ok(setting)
    }
}
