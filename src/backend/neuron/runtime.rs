//! The process's one Neuron runtime: `nrt_init` once, `nrt_close` when the last user drops it.

use std::ffi::c_char;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};

use neuron_sys::bindings::{NRT_FRAMEWORK_TYPE_NO_FW, NRT_SUCCESS, Nrt, nrt_version_t};

use super::error::{NeuronError, Operation};

/// The runtime of this process (libnrt allows one per process).
static CURRENT: Mutex<Current> = Mutex::new(Current { runtime: Weak::new(), open: false });

/// Signalled when a runtime finishes closing.
static CLOSED: Condvar = Condvar::new();

/// The process-wide runtime state, behind [`CURRENT`].
struct Current {
    /// The runtime users hold.
    runtime: Weak<Runtime>,
    /// True from a successful `nrt_init` until its `nrt_close` returned. It can be true while
    /// `runtime` no longer upgrades: the last user is dropping it and nrt_close is pending.
    open: bool,
}

/// libnrt, once loaded: kept for the life of the process so that probing and initialising share
/// one handle (failures are not kept, so a later attempt tries again).
static LIBRARY: Mutex<Option<Arc<neuron_sys::Library>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads libnrt (see [`neuron_sys::load`]) or returns the copy already loaded.
pub fn library() -> Result<Arc<neuron_sys::Library>, neuron_sys::LoadError> {
    let mut slot = lock(&LIBRARY);
    if let Some(lib) = slot.as_ref() {
        return Ok(Arc::clone(lib));
    }
    let lib = Arc::new(neuron_sys::load()?);
    *slot = Some(Arc::clone(&lib));
    Ok(lib)
}

/// The initialised Neuron runtime of this process.
///
/// Shared (`Arc`) by every model and tensor that uses it; `nrt_close` runs when the last one is
/// dropped.
pub struct Runtime {
    library: Arc<neuron_sys::Library>,
    visible_cores: u32,
    version: String,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("library", &self.library.path())
            .field("visible_cores", &self.visible_cores)
            .field("version", &self.version)
            .finish()
    }
}

impl Runtime {
    /// The process's runtime: initialises libnrt (`nrt_init`, reading the `NEURON_RT_*`
    /// environment) on first use, and returns the same runtime while any user holds it.
    pub fn get_or_init() -> Result<Arc<Runtime>, NeuronError> {
        let mut current = lock(&CURRENT);
        loop {
            if let Some(rt) = current.runtime.upgrade() {
                return Ok(rt);
            }
            if !current.open {
                break;
            }
            // The last user is closing the previous runtime: wait for nrt_close to return.
            current = CLOSED.wait(current).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let library = library()?;
        let nrt = library.core();
        // SAFETY: `nrt_init` is the documented first call; the two version strings are static
        // NUL-terminated empty strings. CURRENT's lock serialises init against close.
        let code = unsafe { (nrt.nrt_init)(NRT_FRAMEWORK_TYPE_NO_FW, c"".as_ptr(), c"".as_ptr()) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::Init, code, "", None));
        }
        let queried = visible_core_count(nrt).and_then(|cores| Ok((cores, version(nrt)?)));
        let (visible_cores, version) = match queried {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: nrt_init succeeded above and no model or tensor exists yet.
                unsafe { (nrt.nrt_close)() };
                return Err(e);
            }
        };
        let rt = Arc::new(Runtime { library, visible_cores, version });
        current.runtime = Arc::downgrade(&rt);
        current.open = true;
        tracing::info!(
            version = %rt.version,
            visible_cores,
            library = %rt.library.path().display(),
            "Neuron runtime initialised"
        );
        Ok(rt)
    }

    /// The runtime if one is initialised in this process, without initialising it.
    pub fn current() -> Option<Arc<Runtime>> {
        lock(&CURRENT).runtime.upgrade()
    }

    /// NeuronCores visible to this process (indices `0..visible_cores()`).
    pub fn visible_cores(&self) -> u32 {
        self.visible_cores
    }

    /// The runtime's version, `major.minor.patch.maintenance (detail)`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Where libnrt was loaded from.
    pub fn library_path(&self) -> &Path {
        self.library.path()
    }

    /// The core function table (for the other files of this layer).
    pub(crate) fn nrt(&self) -> &Nrt {
        self.library.core()
    }

    /// The functions only some runtime releases export.
    pub(crate) fn optional(&self) -> &neuron_sys::OptionalFunctions {
        self.library.optional()
    }

    /// Device memory of NeuronCore `core` as the runtime reports it (`nrt_get_vnc_memory_stats`):
    /// `(bytes used, bytes limit)`; `None` when this runtime does not export the call or it fails.
    pub fn memory_stats(&self, core: u32) -> Option<(usize, usize)> {
        let f = self.optional().get_vnc_memory_stats()?;
        let mut stats = neuron_sys::bindings::nrt_vnc_memory_stats_t { bytes_used: 0, bytes_limit: 0 };
        let mut written = 0usize;
        // SAFETY: `stats` is a live struct of the size passed; `written` is a valid out-pointer;
        // the runtime is initialised (we are it).
        let code = unsafe { f(core, &mut stats, std::mem::size_of_val(&stats), &mut written) };
        (code == NRT_SUCCESS).then_some((stats.bytes_used, stats.bytes_limit))
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Hold the lock so that a concurrent `get_or_init` cannot call nrt_init mid-close.
        let mut current = lock(&CURRENT);
        // SAFETY: every model, tensor and tensor set holds an `Arc<Runtime>`, so none is alive
        // when the last reference is dropped; nrt_close is the documented last call.
        unsafe { (self.nrt().nrt_close)() };
        current.open = false;
        drop(current);
        CLOSED.notify_all();
        tracing::info!("Neuron runtime closed");
    }
}

/// `nrt_get_visible_nc_count` (callable before `nrt_init`).
pub(crate) fn visible_core_count(nrt: &Nrt) -> Result<u32, NeuronError> {
    let mut count = 0u32;
    // SAFETY: the argument points to a live u32 the call writes to.
    let code = unsafe { (nrt.nrt_get_visible_nc_count)(&mut count) };
    if code != NRT_SUCCESS {
        return Err(NeuronError::status(Operation::CoreCount, code, "", None));
    }
    Ok(count)
}

/// `nrt_get_version`, formatted as `major.minor.patch.maintenance (detail)`.
pub(crate) fn version(nrt: &Nrt) -> Result<String, NeuronError> {
    let mut v = nrt_version_t::default();
    // SAFETY: `v` is a zeroed nrt_version_t and the call is told its exact size.
    let code = unsafe { (nrt.nrt_get_version)(&mut v, std::mem::size_of::<nrt_version_t>()) };
    if code != NRT_SUCCESS {
        return Err(NeuronError::status(Operation::Version, code, "", None));
    }
    let detail = c_chars_to_string(&v.rt_detail);
    let numbers = format!("{}.{}.{}.{}", v.rt_major, v.rt_minor, v.rt_patch, v.rt_maintenance);
    Ok(if detail.is_empty() { numbers } else { format!("{numbers} ({detail})") })
}

/// A fixed-size C character array up to its first NUL (all of it when there is none), lossily.
pub(crate) fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c_strings_stop_at_nul_and_survive_a_missing_one() {
        let mut buf = [0 as c_char; 8];
        for (d, s) in buf.iter_mut().zip(b"2.28\0xyz") {
            *d = *s as c_char;
        }
        assert_eq!(c_chars_to_string(&buf), "2.28");
        let full = [b'a' as c_char; 4];
        assert_eq!(c_chars_to_string(&full), "aaaa");
    }
}
