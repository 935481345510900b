//! The session store (`--session-store DIR`): an embedded, crash-safe redb database holding
//! spilled sessions, one entry per (model, version, sequence id) whose value is the checksummed
//! [`SessionBlob`]. Entries that do not decode, or whose content does not match their key, are
//! reported and skipped, never loaded.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, TableDefinition};

use super::SequenceId;
use super::blob::SessionBlob;

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
/// The database file inside the store folder.
pub const STORE_FILE: &str = "sessions.redb";

/// Why the session store could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened, read or written (disk full, permissions, damaged file).
    #[error("session store: {path}: {operation}: {reason}")]
    Io {
        /// The store's folder or database file.
        path: String,
        /// What was being done.
        operation: &'static str,
        /// The storage library's message.
        reason: String,
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

/// An opened session store, shared by every model of the worker.
pub struct SessionStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore").field("path", &self.path).finish()
    }
}

/// A session found in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// The sequence id.
    pub id: SequenceId,
    /// Steps executed before it was stored.
    pub steps: u64,
}

fn key(model: &str, version: i64, id: &SequenceId) -> String {
    match id {
        SequenceId::Uint(v) => format!("{model}\u{1f}{version}\u{1f}u:{v}"),
        SequenceId::Str(s) => format!("{model}\u{1f}{version}\u{1f}s:{s}"),
    }
}

fn prefix(model: &str, version: i64) -> String {
    format!("{model}\u{1f}{version}\u{1f}")
}

impl SessionStore {
    /// Opens (or creates) the store in folder `dir`.
    pub fn open(dir: &Path) -> Result<SessionStore, StoreError> {
        let err = |what: &'static str, e: &dyn std::fmt::Display| StoreError::Io {
            path: dir.display().to_string(),
            operation: what,
            reason: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| err("cannot create the folder", &e))?;
        let path = dir.join(STORE_FILE);
        let db = Database::create(&path).map_err(|e| err("cannot open the session database", &e))?;
        let txn = db.begin_write().map_err(|e| err("cannot write", &e))?;
        txn.open_table(SESSIONS).map_err(|e| err("cannot open the sessions table", &e))?;
        txn.commit().map_err(|e| err("cannot commit", &e))?;
        Ok(SessionStore { db, path })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn fail(&self, what: &'static str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io { path: self.path.display().to_string(), operation: what, reason: e.to_string() }
    }

    /// Writes sessions in one durable transaction (replacing entries with the same key).
    pub fn put_all(&self, blobs: &[SessionBlob]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.fail("begin write", e))?;
        {
            let mut t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
            for b in blobs {
                t.insert(key(&b.model, b.version, &b.id).as_str(), b.encode().as_slice())
                    .map_err(|e| self.fail("insert", e))?;
            }
        }
        txn.commit().map_err(|e| self.fail("commit", e))
    }

    /// Removes a session and returns it, verified. A corrupt or foreign entry is removed and
    /// reported as an error; `Ok(None)` when there is no entry.
    pub fn take(&self, model: &str, version: i64, id: &SequenceId) -> Result<Option<SessionBlob>, StoreError> {
        let k = key(model, version, id);
        let txn = self.db.begin_write().map_err(|e| self.fail("begin write", e))?;
        let raw = {
            let mut t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
            t.remove(k.as_str()).map_err(|e| self.fail("remove", e))?.map(|v| v.value().to_vec())
        };
        txn.commit().map_err(|e| self.fail("commit", e))?;
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

    /// Whether the store has an entry (valid or not) for the session.
    pub fn contains(&self, model: &str, version: i64, id: &SequenceId) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail("begin read", e))?;
        let t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
        Ok(t.get(key(model, version, id).as_str()).map_err(|e| self.fail("read", e))?.is_some())
    }

    /// Deletes a session's entry if there is one.
    pub fn remove(&self, model: &str, version: i64, id: &SequenceId) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.fail("begin write", e))?;
        {
            let mut t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
            t.remove(key(model, version, id).as_str()).map_err(|e| self.fail("remove", e))?;
        }
        txn.commit().map_err(|e| self.fail("commit", e))
    }

    /// The sessions stored for a model version, and a description of every entry under that
    /// model version that was skipped (corrupt, or its content does not match its key).
    pub fn list(&self, model: &str, version: i64) -> Result<(Vec<StoredSession>, Vec<String>), StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail("begin read", e))?;
        let t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
        let p = prefix(model, version);
        let (mut ok, mut skipped) = (Vec::new(), Vec::new());
        for entry in t.range(p.as_str()..).map_err(|e| self.fail("read", e))? {
            let (k, v) = entry.map_err(|e| self.fail("read", e))?;
            let k = k.value().to_string();
            if !k.starts_with(&p) {
                break;
            }
            match SessionBlob::decode(v.value()) {
                Ok(b) if b.model == model && b.version == version && key(model, version, &b.id) == k => {
                    ok.push(StoredSession { id: b.id, steps: b.steps })
                }
                Ok(b) => skipped.push(format!(
                    "entry '{}' holds model '{}' version {} sequence {}",
                    k.replace('\u{1f}', "/"),
                    b.model,
                    b.version,
                    b.id
                )),
                Err(reason) => skipped.push(format!("entry '{}': {reason}", k.replace('\u{1f}', "/"))),
            }
        }
        Ok((ok, skipped))
    }

    /// An in-memory store whose writes fail (as a disk error would) while the returned switch is
    /// on: tests use it to check that nothing is lost when the store cannot be written.
    #[cfg(test)]
    pub(crate) fn in_memory_with_write_fault() -> (SessionStore, std::sync::Arc<std::sync::atomic::AtomicBool>) {
        let fault = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let backend = fault_backend::Faulty { inner: redb::backends::InMemoryBackend::new(), fail: fault.clone() };
        let db = redb::Builder::new().create_with_backend(backend).unwrap_or_else(|e| panic!("in-memory store: {e}"));
        let txn = db.begin_write().unwrap_or_else(|e| panic!("{e}"));
        txn.open_table(SESSIONS).unwrap_or_else(|e| panic!("{e}"));
        txn.commit().unwrap_or_else(|e| panic!("{e}"));
        (SessionStore { db, path: PathBuf::from("<in-memory test store>") }, fault)
    }

    /// Overwrites an entry's raw value (tests use it to simulate corruption).
    pub fn put_raw(&self, model: &str, version: i64, id: &SequenceId, value: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.fail("begin write", e))?;
        {
            let mut t = txn.open_table(SESSIONS).map_err(|e| self.fail("open table", e))?;
            t.insert(key(model, version, id).as_str(), value).map_err(|e| self.fail("insert", e))?;
        }
        txn.commit().map_err(|e| self.fail("commit", e))
    }
}

#[cfg(test)]
mod fault_backend {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::StorageBackend;
    use redb::backends::InMemoryBackend;

    /// redb storage in memory whose writes and syncs fail while `fail` is set.
    #[derive(Debug)]
    pub(super) struct Faulty {
        pub(super) inner: InMemoryBackend,
        pub(super) fail: Arc<AtomicBool>,
    }

    impl Faulty {
        fn check(&self) -> Result<(), std::io::Error> {
            if self.fail.load(Ordering::Acquire) {
                return Err(std::io::Error::other("injected write failure"));
            }
            Ok(())
        }
    }

    impl StorageBackend for Faulty {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
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
