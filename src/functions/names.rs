//! How a request names a function: its id, its name (`$LATEST`), a published
//! version (`name:3`) or an alias (`name:live`), as Lambda qualifies names.
//!
//! [`Index`] maps ids to functions and qualified names to ids. A published
//! version is a function of its own (own code copy, own snapshot) whose spec
//! carries the version number. Aliases point at one version, or split
//! requests between two by weight (`RoutingConfig`); they are kept in
//! `<state>/aliases/<name>.json`, written whole and renamed into place.
//!
//! Lambda never gives a version number twice to one function, even after the
//! newest version was deleted; the highest number ever published is kept in
//! `<state>/versions/<name>` (decimal text, written the same way) until the
//! whole function is deleted.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::functions::{valid_id, Function};
use crate::util::random::random_u64;

/// Aliases per function.
pub const ALIASES_PER_FUNCTION_MAX: usize = 100;
/// Published versions per function.
pub const VERSIONS_PER_FUNCTION_MAX: u32 = 1000;

/// One alias: a version and, optionally, a second one taking a share of requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    /// The version (`"3"`) or `$LATEST`.
    pub version: String,
    /// A second version and the fraction of requests (0–1) it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<(String, f64)>,
    #[serde(default)]
    pub description: String,
}

impl Alias {
    /// The version a request goes to; `draw` is uniform in [0, 1).
    pub fn pick(&self, draw: f64) -> &str {
        match &self.extra {
            Some((v, weight)) if draw < *weight => v,
            _ => &self.version,
        }
    }
}

/// The key a function is found under: its name, plus `:<version>` for a
/// published version.
pub fn qualified_key(f: &Function) -> Option<String> {
    let name = f.spec.name.as_ref()?;
    Some(match f.spec.service.version {
        Some(v) => format!("{name}:{v}"),
        None => name.clone(),
    })
}

/// Functions by id, the ids of named ones by qualified name, and aliases.
#[derive(Default)]
pub struct Index {
    pub by_id: HashMap<String, Arc<Function>>,
    by_key: HashMap<String, String>,
    aliases: HashMap<String, BTreeMap<String, Alias>>,
    /// Highest version number ever published, by name (as stored).
    versions_published: HashMap<String, u32>,
}

impl Index {
    /// Adds `f`; returns the function that held its key before, now unlisted
    /// and marked deleted. Marked here, by whoever holds the index (the
    /// registry, under its lock): a reader that finds `f` in its place finds
    /// the old one deleted, never a live function that is no longer listed.
    pub fn insert(&mut self, f: Arc<Function>) -> Option<Arc<Function>> {
        let replaced = qualified_key(&f).and_then(|key| {
            self.by_key
                .insert(key, f.spec.id.clone())
                .and_then(|old| self.by_id.remove(&old))
        });
        if let Some(old) = &replaced {
            old.deleted.store(true, Ordering::Release);
        }
        self.by_id.insert(f.spec.id.clone(), f);
        replaced
    }

    /// Removes a function by id; its key goes too.
    pub fn remove_id(&mut self, id: &str) -> Option<Arc<Function>> {
        let f = self.by_id.remove(id)?;
        if let Some(key) = qualified_key(&f) {
            if self.by_key.get(&key).is_some_and(|k| k == id) {
                self.by_key.remove(&key);
            }
        }
        Some(f)
    }

    /// The id that `key` names: an id, `name`, `name:$LATEST`, `name:<version>`
    /// or `name:<alias>` (a weighted alias draws at random).
    pub fn resolve(&self, key: &str) -> Option<String> {
        if valid_id(key) {
            return self.by_id.contains_key(key).then(|| key.to_string());
        }
        let (name, qualifier) = match key.split_once(':') {
            Some((n, q)) => (n, Some(q)),
            None => (key, None),
        };
        match qualifier {
            None | Some("$LATEST") => self.by_key.get(name).cloned(),
            Some(q) if q.bytes().all(|b| b.is_ascii_digit()) => self.by_key.get(key).cloned(),
            Some(alias) => {
                let a = self.aliases.get(name)?.get(alias)?;
                let draw = (random_u64() >> 11) as f64 / (1u64 << 53) as f64;
                let version = a.pick(draw);
                if version == "$LATEST" {
                    self.by_key.get(name).cloned()
                } else {
                    self.by_key.get(&format!("{name}:{version}")).cloned()
                }
            }
        }
    }

    /// The published versions of `name`, in order.
    pub fn versions(&self, name: &str) -> Vec<Arc<Function>> {
        let mut v: Vec<_> = self
            .by_id
            .values()
            .filter(|f| f.spec.name.as_deref() == Some(name) && f.spec.service.version.is_some())
            .cloned()
            .collect();
        v.sort_by_key(|f| f.spec.service.version);
        v
    }

    /// The highest version number `name` has ever published (0: none): the
    /// stored count, or a version that exists beyond it (a state dir from
    /// before the count was kept).
    pub fn version_high(&self, name: &str) -> u32 {
        let stored = self.versions_published.get(name).copied().unwrap_or(0);
        let existing = self
            .versions(name)
            .last()
            .and_then(|f| f.spec.service.version)
            .unwrap_or(0);
        stored.max(existing)
    }

    /// Records the highest version number of `name` (in memory; the caller
    /// stores it); `None` forgets it.
    pub fn set_version_high(&mut self, name: &str, high: Option<u32>) {
        match high {
            Some(h) => self.versions_published.insert(name.to_string(), h),
            None => self.versions_published.remove(name),
        };
    }

    /// The aliases of `name`.
    pub fn aliases(&self, name: &str) -> BTreeMap<String, Alias> {
        self.aliases.get(name).cloned().unwrap_or_default()
    }

    /// Replaces the aliases of `name` (in memory; the caller stores them).
    pub fn set_aliases(&mut self, name: &str, aliases: BTreeMap<String, Alias>) {
        if aliases.is_empty() {
            self.aliases.remove(name);
        } else {
            self.aliases.insert(name.to_string(), aliases);
        }
    }
}

/// `<state>/aliases`, beside the functions directory.
pub fn aliases_dir(functions_dir: &Path) -> PathBuf {
    functions_dir
        .parent()
        .unwrap_or(functions_dir)
        .join("aliases")
}

/// `<state>/versions`, beside the functions directory.
pub fn versions_dir(functions_dir: &Path) -> PathBuf {
    functions_dir
        .parent()
        .unwrap_or(functions_dir)
        .join("versions")
}

/// Reads every stored highest version number (an unreadable file is
/// reported and skipped: numbering goes on from the versions that exist).
pub fn load_version_highs(dir: &Path) -> io::Result<HashMap<String, u32>> {
    let mut out = HashMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        match fs::read_to_string(&path).map(|t| t.trim().parse::<u32>()) {
            Ok(Ok(high)) => {
                out.insert(name.to_string(), high);
            }
            _ => eprintln!(
                "hearth: ignoring unreadable version count {}",
                path.display()
            ),
        }
    }
    Ok(out)
}

/// Stores the highest version number of `name` atomically and durably;
/// `None` removes it (the function is deleted: a new one of that name starts
/// again from 1, as on Lambda).
pub fn store_version_high(dir: &Path, name: &str, high: Option<u32>) -> io::Result<()> {
    let text = high.map(|high| format!("{high}\n"));
    store_file(dir, name, text.as_ref().map(String::as_bytes))
}

/// Replaces `dir/file` with `bytes` atomically and durably (through a
/// temporary file, renamed once synced), or removes it durably (`None`).
fn store_file(dir: &Path, file: &str, bytes: Option<&[u8]>) -> io::Result<()> {
    let path = dir.join(file);
    let Some(bytes) = bytes else {
        return match fs::remove_file(&path) {
            Ok(()) => fs::File::open(dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
    };
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{file}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    fs::File::open(dir)?.sync_all()
}

/// Reads every stored alias file (a name's file that does not parse is
/// reported and skipped: its aliases are gone, its functions stay).
pub fn load_aliases(dir: &Path) -> io::Result<HashMap<String, BTreeMap<String, Alias>>> {
    let mut out = HashMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        match fs::read(&path).map(|b| serde_json::from_slice(&b)) {
            Ok(Ok(aliases)) => {
                out.insert(name.to_string(), aliases);
            }
            _ => eprintln!("hearth: ignoring unreadable alias file {}", path.display()),
        }
    }
    Ok(out)
}

/// Stores the aliases of `name` atomically and durably (none: the file goes;
/// a deleted function's aliases must not come back after a crash, routing to
/// the versions of a new function of that name).
pub fn store_aliases(dir: &Path, name: &str, aliases: &BTreeMap<String, Alias>) -> io::Result<()> {
    let json = (!aliases.is_empty())
        .then(|| serde_json::to_vec_pretty(aliases).expect("json of plain data"));
    store_file(dir, &format!("{name}.json"), json.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function `id` named `name` (no code on disk).
    fn named(id: &str, name: &str) -> Arc<Function> {
        let spec: crate::spec::FunctionSpec = serde_json::from_value(serde_json::json!({
            "id": id, "handler": "index.handler", "memory_mb": 128, "timeout_ms": 1000,
            "concurrency": 1, "env": [], "created_ms": 0, "code_bytes": 0,
            "backend": "process", "name": name,
        }))
        .unwrap();
        let memory = crate::functions::budget::Budget::new("memory", "MiB", 1024);
        Arc::new(Function::new(spec, PathBuf::from("/nonexistent"), memory))
    }

    #[test]
    fn a_function_replaced_under_its_name_is_deleted_as_it_is_unlisted() {
        let (old, new) = (
            named("00000000000000a1", "f"),
            named("00000000000000a2", "f"),
        );
        let mut index = Index::default();
        assert!(index.insert(old.clone()).is_none());
        assert!(!old.deleted.load(Ordering::Acquire));
        let replaced = index.insert(new.clone()).expect("the old one is replaced");
        assert!(Arc::ptr_eq(&replaced, &old));
        assert!(old.deleted.load(Ordering::Acquire));
        assert!(!new.deleted.load(Ordering::Acquire));
        assert_eq!(index.resolve("f").as_deref(), Some("00000000000000a2"));
    }

    #[test]
    fn weighted_aliases_split_by_the_draw() {
        let a = Alias {
            version: "1".into(),
            extra: Some(("2".into(), 0.25)),
            description: String::new(),
        };
        assert_eq!(a.pick(0.0), "2");
        assert_eq!(a.pick(0.2499), "2");
        assert_eq!(a.pick(0.25), "1");
        assert_eq!(a.pick(0.99), "1");
    }

    #[test]
    fn alias_files_round_trip_and_empty_sets_remove_them() {
        let dir = std::env::temp_dir().join(format!("hearth-aliases-{}", random_u64()));
        let mut set = BTreeMap::new();
        set.insert(
            "live".to_string(),
            Alias {
                version: "3".into(),
                extra: Some(("4".into(), 0.1)),
                description: "canary".into(),
            },
        );
        store_aliases(&dir, "f", &set).unwrap();
        assert_eq!(load_aliases(&dir).unwrap()["f"], set);
        store_aliases(&dir, "f", &BTreeMap::new()).unwrap();
        assert!(load_aliases(&dir).unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn version_counts_round_trip_and_none_removes_them() {
        let dir = std::env::temp_dir().join(format!("hearth-versions-{}", random_u64()));
        store_version_high(&dir, "f", Some(3)).unwrap();
        store_version_high(&dir, "g", Some(1)).unwrap();
        store_version_high(&dir, "f", Some(4)).unwrap();
        let loaded = load_version_highs(&dir).unwrap();
        assert_eq!(loaded.get("f"), Some(&4));
        assert_eq!(loaded.get("g"), Some(&1));
        store_version_high(&dir, "f", None).unwrap();
        assert_eq!(load_version_highs(&dir).unwrap().get("f"), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
