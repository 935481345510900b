//! The session store (`--session-store DIR` or `--session-store redis://host:port/db`): an
//! embedded, crash-safe redb database, or a Redis/Valkey database shared by a fleet, holding
//! spilled sessions, one entry per (model, version, sequence id) whose value is the checksummed
//! [`SessionBlob`]. Entries that do not decode, or whose content does not match their key, are
//! reported and skipped, never loaded.

use std::path::Path;

use redb::ReadableDatabase;

use super::SequenceId;
use super::blob::SessionBlob;
use super::store_db::{GuardedDb, Opener, SESSIONS, StoreHealth};
use super::store_stats::StoreOp;

/// The database file inside the store folder.
pub const STORE_FILE: &str = "sessions.redb";

/// Why the session store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written (disk full, permissions). Nothing moved:
    /// sessions stay where they were, and the store is re-opened on its next operation.
    #[error(
        "session store: {path}: {operation}: {reason}; sessions stay where they were, retry once the disk has room"
    )]
    Io {
        /// The store's folder or database file.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// The storage library's message.
        reason: String,
    },
    /// The database file is damaged: it was moved aside and replaced by an empty store.
    #[error("session store: {path}: {operation}: the file is damaged ({reason}): {outcome}")]
    Damaged {
        /// The database file.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// What the storage library reported.
        reason: String,
        /// Where the file went, and what replaced it.
        outcome: String,
    },
    /// A stored session that is corrupt or foreign; it was removed.
    #[error("stored session {id} is corrupt and was discarded: {reason}")]
    Corrupt {
        /// The sequence id.
        id: SequenceId,
        /// What is wrong.
        reason: String,
    },
    /// The worker runs without `--session-store`.
    #[error("session store: no session store configured; start the worker with --session-store DIR")]
    NotConfigured,
}

/// An opened session store, shared by every model of the worker: a typed key (model, version,
/// sequence id) → a [`SessionBlob`]. Every operation is one transaction; a failed write changes
/// nothing; the store survives I/O errors (re-opened) and a damaged file (moved aside).
pub struct SessionStore {
    pub(super) backend: Backend,
    /// The database file, or the Redis URL without its password.
    location: std::path::PathBuf,
    /// Latency and outcome of every operation.
    stats: super::store_stats::StoreStats,
    /// Session ownership leases (shared store only, once enabled).
    leases: Option<std::sync::Arc<super::lease::Leases>>,
    /// The Redis URL as given (leases open their own connections).
    url: Option<String>,
}

/// Where the sessions are kept.
pub(super) enum Backend {
    /// A redb file in a local folder.
    Local(GuardedDb),
    /// A Redis or Valkey database.
    Redis(Box<super::store_redis::RedisStore>),
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore").field("location", &self.location).finish()
    }
}

/// A parsed `--session-store` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local folder (redb).
    Local(std::path::PathBuf),
    /// A Redis or Valkey URL.
    Redis(String),
}

/// What `--session-store` names: a local folder, or a Redis URL. Anything else that looks like a
/// URL is refused (a `redis:/...` typo must not silently become a local folder named `redis:`).
pub fn parse_location(spec: &str) -> Result<StoreLocation, String> {
    let t = spec.trim();
    if t.is_empty() {
        return Err("--session-store is empty: give a folder or redis://host:port/db".into());
    }
    if let Some((scheme, rest)) = t.split_once(':') {
        let scheme_like =
            !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        let lower = scheme.to_ascii_lowercase();
        if scheme_like && (rest.starts_with("//") || lower.starts_with("redis") || lower == "valkey") {
            return match lower.as_str() {
                "redis" if rest.starts_with("//") => Ok(StoreLocation::Redis(t.to_string())),
                "rediss" => Err("--session-store: TLS to Redis (rediss://) is not supported yet; use redis:// on a \
                                 private network, or a local folder"
                    .into()),
                _ => Err(format!(
                    "--session-store: '{t}' is not a supported store; give a local folder or redis://host:port/db \
                     (Redis or Valkey)"
                )),
            };
        }
    }
    Ok(StoreLocation::Local(std::path::PathBuf::from(t)))
}

/// A session found in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// The sequence id.
    pub id: SequenceId,
    /// Steps executed before it was stored.
    pub steps: u64,
}

/// The store key of a session (model, version, id), without the Redis namespace.
pub(crate) fn key(model: &str, version: i64, id: &SequenceId) -> String {
    match id {
        SequenceId::Uint(v) => format!("{model}\u{1f}{version}\u{1f}u:{v}"),
        SequenceId::Str(s) => format!("{model}\u{1f}{version}\u{1f}s:{s}"),
    }
}

fn prefix(model: &str, version: i64) -> String {
    format!("{model}\u{1f}{version}\u{1f}")
}

/// Whether a raw entry is a valid session blob stored under its own key.
pub(super) fn valid_entry(k: &str, v: &[u8]) -> bool {
    SessionBlob::decode(v).is_ok_and(|b| key(&b.model, b.version, &b.id) == k)
}

/// Decodes and checks a taken entry against its key.
fn verify_taken(
    raw: Option<Vec<u8>>,
    model: &str,
    version: i64,
    id: &SequenceId,
) -> Result<Option<SessionBlob>, StoreError> {
    let Some(raw) = raw else { return Ok(None) };
    let blob = SessionBlob::decode(&raw).map_err(|reason| StoreError::Corrupt { id: id.clone(), reason })?;
    if blob.model != model || blob.version != version || &blob.id != id {
        return Err(StoreError::Corrupt {
            id: id.clone(),
            reason: format!("the entry holds model '{}' version {} sequence {}", blob.model, blob.version, blob.id),
        });
    }
    Ok(Some(blob))
}

/// What one listed entry is.
fn classify(model: &str, version: i64, k: &str, v: &[u8]) -> Listed {
    match SessionBlob::decode(v) {
        Ok(b) if b.model == model && b.version == version && key(model, version, &b.id) == k => {
            Listed::Ok(StoredSession { id: b.id, steps: b.steps })
        }
        Ok(b) => Listed::Skipped(format!(
            "entry '{}' holds model '{}' version {} sequence {}",
            k.replace('\u{1f}', "/"),
            b.model,
            b.version,
            b.id
        )),
        Err(reason) => Listed::Skipped(format!("entry '{}': {reason}", k.replace('\u{1f}', "/"))),
    }
}

/// The valid sessions, and descriptions of the skipped entries.
fn split(listed: Vec<Listed>) -> (Vec<StoredSession>, Vec<String>) {
    let (mut ok, mut skipped) = (Vec::new(), Vec::new());
    for l in listed {
        match l {
            Listed::Ok(s) => ok.push(s),
            Listed::Skipped(s) => skipped.push(s),
        }
    }
    (ok, skipped)
}

/// What `list` saw under one key.
enum Listed {
    Ok(StoredSession),
    Skipped(String),
}

impl SessionStore {
    /// Opens (or creates) the store in folder `dir`. A damaged database file is moved aside
    /// (logged, with its new name) and an empty store is started instead.
    pub fn open(dir: &Path) -> Result<SessionStore, StoreError> {
        SessionStore::open_with(dir, Opener::File)
    }

    /// Opens the store `--session-store` names: a local folder, or a Redis/Valkey database
    /// (connected and checked now).
    pub fn open_location(location: &StoreLocation) -> Result<SessionStore, StoreError> {
        match location {
            StoreLocation::Local(dir) => SessionStore::open(dir),
            StoreLocation::Redis(url) => {
                let r = super::store_redis::RedisStore::open(url)?;
                let location = std::path::PathBuf::from(r.shown());
                Ok(SessionStore {
                    backend: Backend::Redis(Box::new(r)),
                    location,
                    stats: Default::default(),
                    leases: None,
                    url: Some(url.clone()),
                })
            }
        }
    }

    /// Turns on session leases (shared store only; a local store keeps working without them):
    /// one worker continues a session at a time, see [`super::lease`].
    pub fn enable_leases(&mut self, cfg: super::lease::LeaseConfig) -> Result<(), StoreError> {
        if let Some(url) = &self.url {
            self.leases = Some(super::lease::Leases::start(url, cfg)?);
        }
        Ok(())
    }

    /// The session leases, when the store is shared and they are enabled.
    pub fn leases(&self) -> Option<&std::sync::Arc<super::lease::Leases>> {
        self.leases.as_ref()
    }

    /// True when the store is shared through Redis/Valkey.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    fn open_with(dir: &Path, opener: Opener) -> Result<SessionStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.display().to_string(),
            operation: "create the folder",
            reason: e.to_string(),
        })?;
        let db = GuardedDb::open(dir.join(STORE_FILE), opener)?;
        match db.verify(valid_entry) {
            // A damaged table was moved aside and replaced by what could be read: keep going.
            Ok(()) | Err(StoreError::Damaged { .. }) => {}
            Err(e) => return Err(e),
        }
        let location = db.path().to_path_buf();
        Ok(SessionStore { backend: Backend::Local(db), location, stats: Default::default(), leases: None, url: None })
    }

    /// Opens the store in `dir` behind a backend whose writes fail while the returned switch is
    /// on, as a full disk's would (tests).
    #[cfg(any(test, feature = "testing"))]
    pub fn open_with_write_fault(dir: &Path) -> Result<(SessionStore, super::WriteFault), StoreError> {
        let fault = super::WriteFault::default();
        Ok((SessionStore::open_with(dir, Opener::Faulty(fault.clone()))?, fault))
    }

    /// The database file (local store), or the URL without its password (Redis).
    pub fn path(&self) -> &Path {
        &self.location
    }

    /// Latency and outcome of the store's operations, per kind.
    pub fn stats(&self) -> &super::store_stats::StoreStats {
        &self.stats
    }

    pub(super) fn timed<T>(&self, op: StoreOp, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = f();
        self.stats.record(op, started.elapsed(), result.is_ok());
        result
    }

    /// What happened to the store: I/O failures, re-opens, damaged files, dropped and lost sessions.
    pub fn health(&self) -> &StoreHealth {
        match &self.backend {
            Backend::Local(db) => &db.health,
            Backend::Redis(r) => &r.health,
        }
    }

    /// Records `n` sessions that could not be saved and are lost (the worker exits non-zero).
    pub fn record_lost(&self, n: u64) {
        self.health().lost.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sessions recorded as lost since start-up.
    pub fn lost(&self) -> u64 {
        self.health().lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes each time a damaged file is moved aside: what was listed before is gone.
    pub fn epoch(&self) -> u64 {
        self.health().epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes sessions in one durable transaction (replacing entries with the same key). On
    /// error nothing is written.
    pub fn put_all(&self, blobs: &[SessionBlob]) -> Result<(), StoreError> {
        self.timed(StoreOp::Put, || {
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => {
                    let entries: Vec<(String, Vec<u8>)> =
                        blobs.iter().map(|b| (key(&b.model, b.version, &b.id), b.encode())).collect();
                    return r.put_all(&entries);
                }
            };
            db.run("write sessions", |db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(SESSIONS)?;
                    for b in blobs {
                        t.insert(key(&b.model, b.version, &b.id).as_str(), b.encode().as_slice())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
        })
    }

    /// Removes a session and returns it, verified. A corrupt or foreign entry is removed and
    /// reported as an error; `Ok(None)` when there is no entry. On an I/O error the entry stays.
    pub fn take(&self, model: &str, version: i64, id: &SequenceId) -> Result<Option<SessionBlob>, StoreError> {
        self.timed(StoreOp::Take, || {
            let k = key(model, version, id);
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => return verify_taken(r.take(&k)?, model, version, id),
            };
            let raw = db.run("take a session", |db| {
                let txn = db.begin_write()?;
                let raw = {
                    let mut t = txn.open_table(SESSIONS)?;
                    t.remove(k.as_str())?.map(|v| v.value().to_vec())
                };
                txn.commit()?;
                Ok(raw)
            })?;
            verify_taken(raw, model, version, id)
        })
    }

    /// Whether the store has an entry (valid or not) for the session.
    pub fn contains(&self, model: &str, version: i64, id: &SequenceId) -> Result<bool, StoreError> {
        self.timed(StoreOp::Contains, || {
            let k = key(model, version, id);
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => return r.contains(&k),
            };
            db.run("look a session up", |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(SESSIONS)?;
                Ok(t.get(k.as_str())?.is_some())
            })
        })
    }

    /// Deletes a session's entry if there is one.
    pub fn remove(&self, model: &str, version: i64, id: &SequenceId) -> Result<(), StoreError> {
        self.remove_all(model, version, std::slice::from_ref(id))
    }

    /// Deletes the entries of sessions `ids` in one transaction.
    pub fn remove_all(&self, model: &str, version: i64, ids: &[SequenceId]) -> Result<(), StoreError> {
        self.timed(StoreOp::Remove, || {
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => {
                    let keys: Vec<String> = ids.iter().map(|id| key(model, version, id)).collect();
                    return r.remove_all(&keys);
                }
            };
            db.run("remove sessions", |db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(SESSIONS)?;
                    for id in ids {
                        t.remove(key(model, version, id).as_str())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
        })
    }

    /// The sessions stored for a model version, and a description of every entry under that
    /// model version that was skipped (corrupt, or its content does not match its key).
    pub fn list(&self, model: &str, version: i64) -> Result<(Vec<StoredSession>, Vec<String>), StoreError> {
        self.timed(StoreOp::List, || {
            let p = prefix(model, version);
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => {
                    let listed = r.list(&p)?.into_iter().map(|(k, v)| classify(model, version, &k, &v)).collect();
                    return Ok(split(listed));
                }
            };
            let listed = db.run("list sessions", |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(SESSIONS)?;
                let mut out = Vec::new();
                for entry in t.range(p.as_str()..)? {
                    let (k, v) = entry?;
                    let k = k.value().to_string();
                    if !k.starts_with(&p) {
                        break;
                    }
                    out.push(classify(model, version, &k, v.value()));
                }
                Ok(out)
            })?;
            Ok(split(listed))
        })
    }

    /// Overwrites an entry's raw value (tests use it to simulate corruption).
    pub fn put_raw(&self, model: &str, version: i64, id: &SequenceId, value: &[u8]) -> Result<(), StoreError> {
        self.timed(StoreOp::Put, || {
            let k = key(model, version, id);
            let db = match &self.backend {
                Backend::Local(db) => db,
                Backend::Redis(r) => return r.put_all(&[(k, value.to_vec())]),
            };
            db.run("write an entry", |db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(SESSIONS)?;
                    t.insert(k.as_str(), value)?;
                }
                txn.commit()?;
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Tensor;

    #[test]
    fn stores_takes_and_skips_corrupt_or_foreign_entries() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = SessionStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let blob = |id: u64| SessionBlob {
            model: "m".into(),
            version: 1,
            id: SequenceId::Uint(id),
            steps: id,
            state: vec![Tensor::from_f32(vec![1], &[id as f32])],
        };
        store.put_all(&[blob(1), blob(2)]).unwrap_or_else(|e| panic!("{e}"));
        store.put_raw("m", 1, &SequenceId::Uint(3), b"garbage").unwrap_or_else(|e| panic!("{e}"));
        store.put_raw("m", 1, &SequenceId::Uint(4), &blob(5).encode()).unwrap_or_else(|e| panic!("{e}"));
        let (ok, skipped) = store.list("m", 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.iter().map(|s| s.steps).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert_eq!(store.take("m", 1, &SequenceId::Uint(2)).ok().flatten(), Some(blob(2)));
        assert_eq!(store.take("m", 1, &SequenceId::Uint(2)).ok().flatten(), None);
        assert!(matches!(store.take("m", 1, &SequenceId::Uint(3)), Err(StoreError::Corrupt { .. })));
        assert!(matches!(store.take("m", 1, &SequenceId::Uint(4)), Err(StoreError::Corrupt { .. })));
        assert_eq!(store.list("m", 2).map(|l| l.0.len()).ok(), Some(0));
    }
}

#[cfg(test)]
mod location_tests {
    use super::*;

    #[test]
    fn store_locations_are_folders_or_redis_urls_and_nothing_else() {
        assert_eq!(parse_location("/var/lib/nw"), Ok(StoreLocation::Local("/var/lib/nw".into())));
        assert_eq!(parse_location("sessions"), Ok(StoreLocation::Local("sessions".into())));
        assert_eq!(parse_location("redis://h:6379/2"), Ok(StoreLocation::Redis("redis://h:6379/2".into())));
        for bad in ["redis:/h:6379", "redis:h", "ftp://h/x", "rediss://h", "valkey://h", "s3://bucket", ""] {
            assert!(parse_location(bad).is_err(), "{bad} must be refused");
        }
        assert!(parse_location("ftp://h").unwrap_err().contains("redis://host:port/db"));
    }
}
