//! Test tooling: a session store whose writes fail on demand, as a full disk's would. The file is
//! real (re-opening reads what was committed), only the backend's writes, resizes and syncs fail
//! while the switch is on.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redb::backends::FileBackend;
use redb::{Database, StorageBackend};

/// The switch of a store's injected write failures (shared by every backend it opens).
#[derive(Debug, Clone, Default)]
pub struct WriteFault(Arc<AtomicBool>);

impl WriteFault {
    /// Turns the failures on (`true`) or off.
    pub fn set(&self, failing: bool) {
        self.0.store(failing, Ordering::Release);
    }

    fn check(&self) -> Result<(), std::io::Error> {
        if self.0.load(Ordering::Acquire) {
            return Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "injected write failure (disk full)"));
        }
        Ok(())
    }

    /// Opens (or creates) the database at `path` behind a backend that consults this switch.
    pub(super) fn create(&self, path: &Path) -> Result<Database, redb::Error> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        let inner = FileBackend::new(file)?;
        Ok(redb::Builder::new().create_with_backend(Faulty { inner, fault: self.clone() })?)
    }
}

/// A file backend whose writes fail while its switch is on.
#[derive(Debug)]
struct Faulty {
    inner: FileBackend,
    fault: WriteFault,
}

impl StorageBackend for Faulty {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.fault.check()?;
        self.inner.write(offset, data)
    }
    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }
}
