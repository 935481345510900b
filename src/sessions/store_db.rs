//! The session store's database handle, guarded against the two ways a store breaks in the field.
//! A failed write (disk full, I/O error) leaves redb refusing every later write until the database
//! is re-opened, so an I/O error closes the handle and the next operation re-opens it. A damaged
//! file makes the storage library report corruption or panic; every call into it runs under
//! `catch_unwind`, and a damaged file is moved aside (named in the log) and replaced by an empty
//! store, so one flipped byte neither crash-loops the worker nor kills a model's session thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::store::StoreError;

/// The sessions table: key (model, version, id) → encoded [`super::SessionBlob`].
pub(super) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

/// What happened to the store since the worker started (for metrics, logs and the exit status).
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Operations that failed with an I/O error (disk full, permissions, ...), total.
    pub io_failures: AtomicU64,
    /// Times the database was re-opened after an I/O error.
    pub reopened: AtomicU64,
    /// Times the database file was found damaged and moved aside.
    pub quarantined: AtomicU64,
    /// Entries dropped: corrupt ones, and those of a damaged file that could not be read back.
    pub dropped: AtomicU64,
    /// Damaged files whose entry count could not be read (what they held is not in `dropped`).
    pub uncounted: AtomicU64,
    /// Sessions that could not be saved when a model drained: they are lost.
    pub lost: AtomicU64,
    /// Bumped each time the file is moved aside: a list of stored sessions taken before is stale.
    pub epoch: AtomicU64,
}

/// How the database file is opened.
#[derive(Debug, Clone)]
pub(super) enum Opener {
    /// The file itself.
    File,
    /// The file behind a backend whose writes fail while the switch is on (tests).
    #[cfg(any(test, feature = "testing"))]
    Faulty(super::store_fault::WriteFault),
}

/// Why an operation on the database failed.
enum Failure {
    /// I/O: the handle is closed and re-opened by the next operation.
    Io(String),
    /// The file is damaged (reported corrupt, not a database, or the library panicked).
    Damaged(String),
}

fn classify(e: redb::Error) -> Failure {
    match e {
        redb::Error::Corrupted(m) => Failure::Damaged(format!("the database is corrupted: {m}")),
        // Only this code writes the file, always with the same table and types: a table whose
        // recorded types differ was damaged on disk (a flipped byte in its definition).
        e @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TypeDefinitionChanged { .. }) => {
            Failure::Damaged(format!("the table's recorded definition is damaged: {e}"))
        }
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            Failure::Damaged(format!("the file is not a valid session database: {io}"))
        }
        other => Failure::Io(other.to_string()),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
    format!("the storage library panicked reading it: {}", msg.unwrap_or_else(|| "(no message)".into()))
}

/// Runs `f` into the storage library, turning a panic into [`Failure::Damaged`].
fn guarded<T>(f: impl FnOnce() -> Result<T, redb::Error>) -> Result<T, Failure> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(e)),
        Err(p) => Err(Failure::Damaged(panic_message(&*p))),
    }
}

/// Drops a database handle whose state may be broken, without letting a panic escape.
fn close(db: Option<Database>) {
    if let Some(db) = db {
        let _ = catch_unwind(AssertUnwindSafe(move || drop(db)));
    }
}

/// The guarded handle: one database, re-opened or replaced when it breaks.
pub(super) struct GuardedDb {
    path: PathBuf,
    opener: Opener,
    db: Mutex<Option<Database>>,
    pub(super) health: StoreHealth,
}

impl GuardedDb {
    /// Opens the file at `path`; a damaged file is moved aside and an empty store created.
    pub(super) fn open(path: PathBuf, opener: Opener) -> Result<GuardedDb, StoreError> {
        let g = GuardedDb { path, opener, db: Mutex::new(None), health: StoreHealth::default() };
        {
            let mut slot = g.lock();
            match g.ensure_open(&mut slot, "open") {
                Ok(()) => {}
                // Damaged, moved aside, and a new store is open in its place.
                Err(StoreError::Damaged { .. }) if slot.is_some() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(g)
    }

    /// The database file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Option<Database>> {
        // No code panics while holding the lock (calls into the library are caught), so a poisoned
        // lock still guards a consistent handle.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io_error(&self, operation: &'static str, reason: String) -> StoreError {
        StoreError::Io { path: self.path.display().to_string(), operation, reason }
    }

    fn create(&self) -> Result<Database, redb::Error> {
        let db = match &self.opener {
            Opener::File => Database::create(&self.path)?,
            #[cfg(any(test, feature = "testing"))]
            Opener::Faulty(fault) => fault.create(&self.path)?,
        };
        let txn = db.begin_write()?;
        txn.open_table(SESSIONS)?;
        txn.commit()?;
        Ok(db)
    }

    /// Opens the database if the handle is closed; a damaged file is quarantined.
    fn ensure_open(&self, slot: &mut Option<Database>, operation: &'static str) -> Result<(), StoreError> {
        if slot.is_some() {
            return Ok(());
        }
        match guarded(|| self.create()) {
            Ok(db) => {
                *slot = Some(db);
                Ok(())
            }
            Err(Failure::Io(reason)) => {
                self.health.io_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), error = %reason, "cannot open the session store; it is tried again on the next operation");
                Err(self.io_error(operation, format!("cannot open the database: {reason}")))
            }
            Err(Failure::Damaged(reason)) => Err(self.quarantine(slot, operation, reason)),
        }
    }

    /// Runs one operation. An I/O error closes the handle (the next operation re-opens it). A
    /// damaged file is moved aside and replaced by a new store holding what could be read from it,
    /// and the operation runs once more there.
    pub(super) fn run<T>(
        &self,
        operation: &'static str,
        f: impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        match self.run_once(operation, &f) {
            Err(StoreError::Damaged { .. }) if self.lock().is_some() => self.run_once(operation, &f),
            other => other,
        }
    }

    fn run_once<T>(
        &self,
        operation: &'static str,
        f: &impl Fn(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let mut slot = self.lock();
        let reopening = slot.is_none();
        self.ensure_open(&mut slot, operation)?;
        let Some(db) = slot.as_ref() else { return Err(self.io_error(operation, "the database is closed".into())) };
        match guarded(|| f(db)) {
            Ok(v) => {
                if reopening {
                    self.health.reopened.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(path = %self.path.display(), "session store re-opened after an I/O error; it works again");
                }
                Ok(v)
            }
            Err(Failure::Io(reason)) => {
                close(slot.take());
                self.health.io_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(path = %self.path.display(), operation, error = %reason, "session store I/O error (disk full?); sessions stay where they are and the store is re-opened on the next operation");
                Err(self.io_error(operation, reason))
            }
            Err(Failure::Damaged(reason)) => Err(self.quarantine(&mut slot, operation, reason)),
        }
    }

    /// Moves the damaged file aside and starts a new store in its place holding every entry that
    /// could still be read from it (valid sessions only); the others are counted as dropped.
    fn quarantine(&self, slot: &mut Option<Database>, operation: &'static str, reason: String) -> StoreError {
        close(slot.take());
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".damaged-{secs}"));
        let aside = self.path.with_file_name(name);
        self.health.quarantined.fetch_add(1, Ordering::Relaxed);
        self.health.epoch.fetch_add(1, Ordering::Relaxed);
        let path = self.path.display().to_string();
        if let Err(e) = std::fs::rename(&self.path, &aside) {
            tracing::error!(path, error = %reason, rename_error = %e,
                "the session store file is damaged and cannot be moved aside; the store is unusable until it is removed");
            return StoreError::Damaged {
                path,
                operation,
                reason,
                outcome: format!("cannot be moved aside ({e}); remove it"),
            };
        }
        let (salvaged, held) = salvage(&aside);
        let outcome = match guarded(|| {
            let db = self.create()?;
            if !salvaged.is_empty() {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(SESSIONS)?;
                    for (k, v) in &salvaged {
                        t.insert(k.as_str(), v.as_slice())?;
                    }
                }
                txn.commit()?;
            }
            Ok(db)
        }) {
            Ok(db) => {
                *slot = Some(db);
                let dropped = held.map(|n| n.saturating_sub(salvaged.len() as u64));
                match dropped {
                    Some(n) => self.health.dropped.fetch_add(n, Ordering::Relaxed),
                    None => self.health.uncounted.fetch_add(1, Ordering::Relaxed),
                };
                let dropped = dropped.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string());
                tracing::error!(path, moved_to = %aside.display(), error = %reason, kept = salvaged.len(), dropped = %dropped,
                    "the session store file is damaged: moved aside; a new store holds the sessions that could still be read");
                format!(
                    "moved aside to {}; a new store holds the {} sessions that could still be read ({dropped} dropped)",
                    aside.display(),
                    salvaged.len()
                )
            }
            Err(Failure::Io(e) | Failure::Damaged(e)) => {
                tracing::error!(path, moved_to = %aside.display(), error = %reason, create_error = %e,
                    "the session store file is damaged and moved aside, but a new store cannot be created");
                format!("moved aside to {}, but a new store cannot be created: {e}", aside.display())
            }
        };
        StoreError::Damaged { path, operation, reason, outcome }
    }

    /// Checks every entry once (at open): an entry whose value is not a valid session blob for
    /// its key is removed and counted as dropped; a table that does not list as many entries as it
    /// records is damaged (entries unreachable) and is quarantined with what can be read.
    pub(super) fn verify(&self, valid: impl Fn(&str, &[u8]) -> bool) -> Result<(), StoreError> {
        let bad = self.run("check the stored sessions", |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(SESSIONS)?;
            let (mut seen, mut bad) = (0u64, Vec::new());
            for entry in t.iter()? {
                let (k, v) = entry?;
                seen += 1;
                if !valid(k.value(), v.value()) {
                    bad.push(k.value().to_string());
                }
            }
            let held = t.len()?;
            if seen != held {
                return Err(redb::Error::Corrupted(format!(
                    "the sessions table records {held} entries, {seen} can be read"
                )));
            }
            Ok(bad)
        })?;
        if bad.is_empty() {
            return Ok(());
        }
        // Counted once removed (a removal that finds the file damaged counts them in the quarantine).
        self.run("remove corrupt entries", |db| {
            let txn = db.begin_write()?;
            {
                let mut t = txn.open_table(SESSIONS)?;
                for k in &bad {
                    // Listed but not found by key: the B-tree's key order is damaged.
                    if t.remove(k.as_str())?.is_none() {
                        return Err(redb::Error::Corrupted(format!(
                            "entry '{k}' is listed but cannot be found by its key"
                        )));
                    }
                }
            }
            txn.commit()?;
            Ok(())
        })?;
        tracing::error!(path = %self.path.display(), entries = bad.len(), "session store entries are corrupt and were removed");
        self.health.dropped.fetch_add(bad.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// The entries of a damaged file that can still be read (a panic part-way keeps those read
/// before it), and how many it records holding (`None` when that cannot be read). The file is
/// read as it is; if that fails (a file left needing recovery cannot be opened read-only), a copy
/// of it is opened read-write, which lets the library rebuild its allocation state, and read.
fn salvage(path: &Path) -> (Vec<(String, Vec<u8>)>, Option<u64>) {
    let mut entries = Vec::new();
    let mut held = None;
    let _ = guarded(|| read_all(&redb::ReadOnlyDatabase::open(path)?, &mut entries, &mut held));
    if held.is_none() {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".salvage");
        let copy = path.with_file_name(name);
        if std::fs::copy(path, &copy).is_ok() {
            entries.clear();
            let _ = guarded(|| read_all(&Database::open(&copy)?, &mut entries, &mut held));
            let _ = std::fs::remove_file(&copy);
        }
    }
    let entries = entries.into_iter().filter(|(k, v)| super::store::valid_entry(k, v)).collect();
    (entries, held)
}

fn read_all(
    db: &impl ReadableDatabase,
    entries: &mut Vec<(String, Vec<u8>)>,
    held: &mut Option<u64>,
) -> Result<(), redb::Error> {
    let txn = db.begin_read()?;
    let t = txn.open_table(SESSIONS)?;
    *held = Some(t.len()?);
    for entry in t.iter()? {
        let (k, v) = entry?;
        entries.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(())
}
