//! `load()` reads NEURON_WORKER_LIBNRT. Environment is process-global, so this is the only test in
//! its binary (its own process), and the only one that sets the variable.

use std::path::Path;

#[test]
fn load_tries_the_path_in_neuron_worker_libnrt_first() {
    let wanted = "/nonexistent/from-env/libnrt.so.1";
    // SAFETY: this is the only test in this binary, so no other thread reads or writes the
    // environment concurrently.
    unsafe { std::env::set_var(neuron_sys::LIBNRT_ENV, wanted) };
    let result = neuron_sys::load();
    let Err(neuron_sys::LoadError::NotFound { attempts }) = result else {
        panic!("expected NotFound, got {result:?}");
    };
    assert_eq!(attempts.len(), 3);
    assert_eq!(attempts[0].candidate, Path::new(wanted));
    assert_eq!(attempts[1].candidate, Path::new(neuron_sys::SDK_LIBRARY_PATH));
    assert_eq!(attempts[2].candidate, Path::new(neuron_sys::SONAME));
}
