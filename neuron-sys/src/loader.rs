//! Finding and opening libnrt at run time, with errors that say what was tried and what to do.

use std::ffi::{CStr, OsString, c_char, c_void};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::bindings::{NRT_STATUS, Nrt, nrt_model_t, nrt_tensor_t, nrt_vnc_memory_stats_t};
use crate::bindings_optional::NrtOptional;

/// Environment variable naming the libnrt to load (a path); tried before the default locations.
pub const LIBNRT_ENV: &str = "NEURON_WORKER_LIBNRT";

/// Where the `aws-neuronx-runtime-lib` package installs libnrt (often not on the loader path).
pub const SDK_LIBRARY_PATH: &str = "/opt/aws/neuron/lib/libnrt.so.1";

/// libnrt's soname, resolved through the dynamic loader's search path.
pub const SONAME: &str = "libnrt.so.1";

/// The core functions, in header order; a library lacking any of them is not a usable libnrt.
pub const CORE_SYMBOLS: [&str; 23] = [
    "nrt_init",
    "nrt_close",
    "nrt_load",
    "nrt_load_collectives",
    "nrt_unload",
    "nrt_get_total_nc_count",
    "nrt_get_visible_nc_count",
    "nrt_get_model_tensor_info",
    "nrt_free_model_tensor_info",
    "nrt_allocate_tensor_set",
    "nrt_destroy_tensor_set",
    "nrt_add_tensor_to_tensor_set",
    "nrt_get_tensor_from_tensor_set",
    "nrt_tensor_allocate",
    "nrt_tensor_free",
    "nrt_tensor_read",
    "nrt_tensor_write",
    "nrt_tensor_get_size",
    "nrt_tensor_allocate_empty",
    "nrt_tensor_attach_buffer",
    "nrt_execute",
    "nrt_execute_repeat",
    "nrt_get_version",
];

/// One candidate that could not be opened, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The path or soname that was tried.
    pub candidate: PathBuf,
    /// The operating system's (or the dynamic loader's) reason.
    pub error: String,
}

/// Why libnrt could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No candidate exists or could be found by the dynamic loader.
    #[error(
        "libnrt (the Neuron runtime library) was not found; tried {}. Install the \
         aws-neuronx-runtime-lib package, or set {LIBNRT_ENV} to the path of libnrt.so.1",
        DisplayAttempts(.attempts)
    )]
    NotFound {
        /// Every candidate, in the order tried, with its error.
        attempts: Vec<Attempt>,
    },
    /// A candidate exists but the dynamic loader refused it (not a shared library, wrong
    /// architecture, or one of its own dependencies is missing).
    #[error(
        "{} exists but cannot be loaded as a shared library: {reason}. {LIBNRT_ENV} must name \
         libnrt.so.1 from the aws-neuronx-runtime-lib package",
        .path.display()
    )]
    Unloadable {
        /// The file that was opened.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// A shared library loaded but lacks a function every libnrt exports.
    #[error(
        "{} loaded but does not export `{symbol}`: it is not libnrt, or the Neuron runtime is \
         too old for this worker (upgrade aws-neuronx-runtime-lib or fix {LIBNRT_ENV})",
        .path.display()
    )]
    MissingSymbol {
        /// The library that was opened.
        path: PathBuf,
        /// The first required symbol it lacks.
        symbol: &'static str,
    },
}

struct DisplayAttempts<'a>(&'a [Attempt]);

impl fmt::Display for DisplayAttempts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({})", a.candidate.display(), a.error)?;
        }
        Ok(())
    }
}

/// The signature of `nrt_get_status_as_str`.
pub type StatusAsStrFn = unsafe extern "C" fn(NRT_STATUS) -> *const c_char;
/// The signature of `nrt_get_total_vnc_count` and `nrt_get_visible_vnc_count`.
pub type VncCountFn = unsafe extern "C" fn(*mut u32) -> NRT_STATUS;
/// The signature of `nrt_profile_start`.
pub type ProfileStartFn = unsafe extern "C" fn(*mut nrt_model_t, *const c_char) -> NRT_STATUS;
/// The signature of `nrt_profile_stop`.
pub type ProfileStopFn = unsafe extern "C" fn(*const c_char) -> NRT_STATUS;

/// The signature of `nrt_tensor_copy` (src, src_offset, dst, dst_offset, size).
pub type TensorCopyFn = unsafe extern "C" fn(*const nrt_tensor_t, usize, *mut nrt_tensor_t, usize, usize) -> NRT_STATUS;
/// The signature of `nrt_get_vnc_memory_stats` (vnc, stats, stats_size_in, stats_size_out).
pub type VncMemoryStatsFn = unsafe extern "C" fn(u32, *mut nrt_vnc_memory_stats_t, usize, *mut usize) -> NRT_STATUS;

/// The functions only some runtime releases export; each accessor is `None` when absent.
pub struct OptionalFunctions {
    table: Option<NrtOptional>,
}

impl OptionalFunctions {
    /// `nrt_get_status_as_str` (runtimes from SDK 2.28).
    pub fn get_status_as_str(&self) -> Option<StatusAsStrFn> {
        self.table.as_ref()?.nrt_get_status_as_str.as_ref().ok().copied()
    }

    /// `nrt_get_total_vnc_count`.
    pub fn get_total_vnc_count(&self) -> Option<VncCountFn> {
        self.table.as_ref()?.nrt_get_total_vnc_count.as_ref().ok().copied()
    }

    /// `nrt_get_visible_vnc_count`.
    pub fn get_visible_vnc_count(&self) -> Option<VncCountFn> {
        self.table.as_ref()?.nrt_get_visible_vnc_count.as_ref().ok().copied()
    }

    /// `nrt_profile_start`.
    pub fn profile_start(&self) -> Option<ProfileStartFn> {
        self.table.as_ref()?.nrt_profile_start.as_ref().ok().copied()
    }

    /// `nrt_profile_stop`.
    pub fn profile_stop(&self) -> Option<ProfileStopFn> {
        self.table.as_ref()?.nrt_profile_stop.as_ref().ok().copied()
    }

    /// `nrt_tensor_copy` (two device tensors must be on the same core).
    pub fn tensor_copy(&self) -> Option<TensorCopyFn> {
        self.table.as_ref()?.nrt_tensor_copy.as_ref().ok().copied()
    }

    /// `nrt_get_vnc_memory_stats`.
    pub fn get_vnc_memory_stats(&self) -> Option<VncMemoryStatsFn> {
        self.table.as_ref()?.nrt_get_vnc_memory_stats.as_ref().ok().copied()
    }

    /// Names of the optional functions this library exports.
    pub fn present(&self) -> Vec<&'static str> {
        let mut names = Vec::new();
        let checks = [
            ("nrt_get_status_as_str", self.get_status_as_str().is_some()),
            ("nrt_get_total_vnc_count", self.get_total_vnc_count().is_some()),
            ("nrt_get_visible_vnc_count", self.get_visible_vnc_count().is_some()),
            ("nrt_profile_start", self.profile_start().is_some()),
            ("nrt_profile_stop", self.profile_stop().is_some()),
            ("nrt_tensor_copy", self.tensor_copy().is_some()),
            ("nrt_get_vnc_memory_stats", self.get_vnc_memory_stats().is_some()),
        ];
        for (name, present) in checks {
            if present {
                names.push(name);
            }
        }
        names
    }
}

/// An opened libnrt: the core function table, the optional functions and where it came from.
///
/// The library stays loaded as long as this value lives; function pointers taken from it must not
/// be called after it is dropped.
pub struct Library {
    core: Nrt,
    optional: OptionalFunctions,
    path: PathBuf,
}

impl Library {
    /// The core functions (every one present).
    pub fn core(&self) -> &Nrt {
        &self.core
    }

    /// The optional functions.
    pub fn optional(&self) -> &OptionalFunctions {
        &self.optional
    }

    /// The candidate it was loaded from (a path, or the bare soname when found on the loader path).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The runtime's own text for a status code, when it exports `nrt_get_status_as_str`.
    pub fn status_text(&self, code: u32) -> Option<String> {
        let f = self.optional.get_status_as_str()?;
        // SAFETY: the symbol was resolved from this loaded library (still loaded: `self` owns it),
        // with the documented signature; it returns NULL or a pointer to a static NUL-terminated
        // string, which is copied before returning.
        let text = unsafe {
            let ptr = f(code);
            if ptr.is_null() {
                return None;
            }
            CStr::from_ptr(ptr).to_string_lossy().into_owned()
        };
        Some(text)
    }
}

impl fmt::Debug for Library {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("optional", &self.optional.present())
            .finish_non_exhaustive()
    }
}

/// The candidates in order: `$NEURON_WORKER_LIBNRT` (when set and non-empty), then
/// [`SDK_LIBRARY_PATH`], then [`SONAME`].
pub fn candidates(env_value: Option<OsString>) -> Vec<PathBuf> {
    let mut list = Vec::with_capacity(3);
    if let Some(value) = env_value.filter(|v| !v.is_empty()) {
        list.push(PathBuf::from(value));
    }
    list.push(PathBuf::from(SDK_LIBRARY_PATH));
    list.push(PathBuf::from(SONAME));
    list
}

/// Loads libnrt from the first candidate of [`candidates`] (reading `$NEURON_WORKER_LIBNRT`).
pub fn load() -> Result<Library, LoadError> {
    load_from(&candidates(std::env::var_os(LIBNRT_ENV)))
}

/// Loads libnrt from the first candidate that exists.
///
/// A path that does not exist, or a bare name the dynamic loader cannot find, moves on to the next
/// candidate; a file that exists but cannot be loaded, or loads without the core symbols, stops
/// the search with that error (it was chosen, and it is wrong).
pub fn load_from(candidates: &[PathBuf]) -> Result<Library, LoadError> {
    let mut attempts = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let is_path = candidate.components().count() > 1 || candidate.is_absolute();
        if is_path {
            match std::fs::metadata(candidate) {
                Err(e) => {
                    attempts.push(Attempt { candidate: candidate.clone(), error: e.to_string() });
                    continue;
                }
                Ok(meta) if meta.is_dir() => {
                    return Err(LoadError::Unloadable {
                        path: candidate.clone(),
                        reason: "it is a directory".to_owned(),
                    });
                }
                Ok(_) => {}
            }
        }
        // SAFETY: opening a shared library runs its initialisers. The candidates are libnrt (or a
        // library the operator named explicitly); libnrt's initialisers have no preconditions.
        let opened = unsafe { libloading::Library::new(candidate) };
        match opened {
            Ok(lib) => return bind(lib, candidate),
            Err(e) if is_path => {
                return Err(LoadError::Unloadable { path: candidate.clone(), reason: e.to_string() });
            }
            Err(e) => attempts.push(Attempt { candidate: candidate.clone(), error: e.to_string() }),
        }
    }
    Err(LoadError::NotFound { attempts })
}

/// Checks the core symbols of an opened library and builds the function tables.
fn bind(lib: libloading::Library, candidate: &Path) -> Result<Library, LoadError> {
    for symbol in CORE_SYMBOLS {
        let name = format!("{symbol}\0");
        // SAFETY: only the symbol's address is looked up (typed as a data pointer, never called
        // or dereferenced here).
        let found = unsafe { lib.get::<*const c_void>(name.as_bytes()) };
        if found.is_err() {
            return Err(LoadError::MissingSymbol { path: candidate.to_path_buf(), symbol });
        }
    }
    // SAFETY: every core symbol is present (checked above) and declared in our header with the
    // signature libnrt documents; the table keeps the library loaded while it lives.
    let core = unsafe { Nrt::from_library(lib) }
        .map_err(|e| LoadError::Unloadable { path: candidate.to_path_buf(), reason: e.to_string() })?;
    // A second handle to the same, already loaded, object (dlopen counts references).
    // SAFETY: as above; the library is already loaded, so no initialiser runs again.
    let optional_table = unsafe { libloading::Library::new(candidate) }
        .ok()
        // SAFETY: every field of the optional table is a `Result`; absent symbols are not called.
        .and_then(|lib| unsafe { NrtOptional::from_library(lib) }.ok());
    Ok(Library { core, optional: OptionalFunctions { table: optional_table }, path: candidate.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("neuron-sys-{}-{name}", std::process::id()));
        let written = std::fs::write(&path, contents);
        assert!(written.is_ok(), "cannot write {}: {written:?}", path.display());
        path
    }

    #[test]
    fn candidates_put_the_env_path_first() {
        let with_env = candidates(Some("/custom/libnrt.so.1".into()));
        assert_eq!(
            with_env,
            vec![PathBuf::from("/custom/libnrt.so.1"), PathBuf::from(SDK_LIBRARY_PATH), PathBuf::from(SONAME)]
        );
        assert_eq!(candidates(None), vec![PathBuf::from(SDK_LIBRARY_PATH), PathBuf::from(SONAME)]);
        assert_eq!(candidates(Some("".into())).len(), 2);
    }

    #[test]
    fn missing_library_lists_every_candidate_and_what_to_do() {
        let list = candidates(Some("/nonexistent/dir/libnrt.so.1".into()));
        let Err(err) = load_from(&list) else {
            panic!("a nonexistent libnrt loaded");
        };
        let LoadError::NotFound { attempts } = &err else {
            panic!("expected NotFound, got {err}");
        };
        let tried: Vec<&Path> = attempts.iter().map(|a| a.candidate.as_path()).collect();
        assert_eq!(
            tried,
            vec![Path::new("/nonexistent/dir/libnrt.so.1"), Path::new(SDK_LIBRARY_PATH), Path::new(SONAME)]
        );
        assert!(attempts[0].error.contains("No such file"), "{}", attempts[0].error);
        let text = err.to_string();
        for needle in
            ["/nonexistent/dir/libnrt.so.1", SDK_LIBRARY_PATH, "libnrt.so.1 (", "aws-neuronx-runtime-lib", LIBNRT_ENV]
        {
            assert!(text.contains(needle), "{needle:?} missing from: {text}");
        }
    }

    #[test]
    fn a_file_that_is_not_a_library_is_reported_as_such() {
        let path = temp_file("not-a-library.so", b"this is not an ELF file\n");
        let result = load_from(std::slice::from_ref(&path));
        let _ = std::fs::remove_file(&path);
        let Err(err) = result else {
            panic!("a text file loaded as libnrt");
        };
        let LoadError::Unloadable { path: reported, reason } = &err else {
            panic!("expected Unloadable, got {err}");
        };
        assert_eq!(reported, &path);
        assert!(!reason.is_empty());
        assert!(err.to_string().contains("cannot be loaded as a shared library"), "{err}");
    }

    #[test]
    fn a_directory_is_not_a_library() {
        let dir = std::env::temp_dir();
        let Err(LoadError::Unloadable { path, reason }) = load_from(std::slice::from_ref(&dir)) else {
            panic!("expected Unloadable for a directory");
        };
        assert_eq!(path, dir);
        assert_eq!(reason, "it is a directory");
    }

    #[test]
    fn a_library_without_the_runtime_symbols_names_the_first_missing_one() {
        // libm is on every glibc system and exports none of libnrt's functions.
        let libm = PathBuf::from("libm.so.6");
        let Err(err) = load_from(&[PathBuf::from("/nonexistent/libnrt.so.1"), libm.clone()]) else {
            panic!("libm loaded as libnrt");
        };
        let LoadError::MissingSymbol { path, symbol } = &err else {
            panic!("expected MissingSymbol, got {err}");
        };
        assert_eq!(path, &libm);
        assert_eq!(*symbol, "nrt_init");
        assert!(err.to_string().contains("does not export `nrt_init`"), "{err}");
    }

    #[test]
    fn core_symbols_are_exactly_the_functions_of_the_header() {
        let header = include_str!("../include/nrt/nrt.h");
        let mut declared: Vec<&str> = header
            .lines()
            .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
            .filter_map(|l| {
                let start = l.find("nrt_")?;
                let rest = &l[start..];
                let end = rest.find('(')?;
                let name = &rest[..end];
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_').then_some(name)
            })
            .collect();
        declared.sort_unstable();
        let mut listed = CORE_SYMBOLS.to_vec();
        listed.sort_unstable();
        assert_eq!(declared, listed);
    }
}
