//! A function's asynchronous invocation settings per qualifier
//! (`PutFunctionEventInvokeConfig` and friends), kept in
//! `<state>/async/<key>/config.json` (written to a temporary file, fsynced,
//! renamed).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Retries after a failed run, as Lambda allows (and its default).
pub const RETRIES_MAX: u32 = 2;
/// Oldest event age accepted as a setting, and its default, seconds.
pub const EVENT_AGE_S_MAX: u64 = 21_600;
/// Youngest event age accepted as a setting, seconds.
pub const EVENT_AGE_S_MIN: u64 = 60;

/// How events of one qualifier are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// Runs after the first that fail before the event is given up (0–2).
    pub retries_max: u32,
    /// An event older than this is given up instead of run, seconds (60–21600).
    pub event_age_s_max: u64,
    /// When it was last set, ms since the epoch.
    pub modified_ms: u64,
}

impl Default for EventConfig {
    fn default() -> EventConfig {
        EventConfig {
            retries_max: RETRIES_MAX,
            event_age_s_max: EVENT_AGE_S_MAX,
            modified_ms: 0,
        }
    }
}

/// The settings of every qualifier of a function (`$LATEST` for the unqualified one).
pub type Configs = BTreeMap<String, EventConfig>;

/// Reads `config.json` in `dir` (none: no settings).
pub fn load(dir: &Path) -> io::Result<Configs> {
    match std::fs::read(dir.join("config.json")) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("config.json: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Configs::new()),
        Err(e) => Err(e),
    }
}

/// Replaces `config.json` in `dir` with `configs`, durably.
pub fn store(dir: &Path, configs: &Configs) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("config.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(configs).expect("json"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("config.json"))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_survive_a_store_and_load() {
        let d = std::env::temp_dir().join(format!("hearth-evcfg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        assert!(load(&d).unwrap().is_empty());
        let mut c = Configs::new();
        c.insert(
            "$LATEST".into(),
            EventConfig {
                retries_max: 0,
                event_age_s_max: 60,
                modified_ms: 5,
            },
        );
        store(&d, &c).unwrap();
        assert_eq!(load(&d).unwrap(), c);
        let _ = std::fs::remove_dir_all(&d);
    }
}
