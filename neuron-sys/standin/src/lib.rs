//! TEST-ONLY stand-in for libnrt, the AWS Neuron runtime: the same C symbols and ABI, running
//! models on host memory. It is never shipped; it exists so that the worker's Neuron path (loader,
//! FFI, safe layer, scheduling, failure handling) runs in CI on machines without Neuron hardware.
//!
//! `cargo build -p nrt-standin` writes `target/<profile>/libnrt_standin.so`; point the worker at
//! it with `NEURON_WORKER_LIBNRT=/path/to/libnrt_standin.so`. Tests can find it with
//! [`standin_library_path`].
//!
//! # What it runs
//! Any NEFF loads (its tensors come from `neff.json` and `sgNN/def.json`, so the tensor info of
//! real compiler output is reported faithfully; the reader is the `neff-format` crate the worker
//! uses too). Only NEFFs carrying a `standin/program.json` (written by that crate's writer,
//! format in `neff_format::program`: versions 1 to 3, version 2 adding the ops of stateful
//! models and `int32` tensors run as `f32`, version 3 the `llama_decoder` op: compiled prefill
//! and decode programs of a Llama-family model, weights as inputs, the KV cache as aliased
//! device state updated in place, see [`decoder`]) execute; executing compiler output returns
//! `NRT_UNSUPPORTED_NEFF_VERSION` and logs why on stderr. `nrt_tensor_copy` (same-core rule for
//! device tensors) and `nrt_get_vnc_memory_stats` (bytes allocated per core) are implemented.
//!
//! # Rules enforced like the real runtime
//! Calls before `nrt_init` return `NRT_UNINITIALIZED` (13), after `nrt_close` `NRT_CLOSED` (14)
//! until the next `nrt_init` (core counts and the version are always available); a name not in
//! the set (`nrt_get_tensor_from_tensor_set`) or a set tensor the model does not declare
//! (`nrt_execute`) gives `NRT_FAILURE`; a missing tensor or one of the wrong size gives
//! `NRT_INVALID`; loading past the visible cores gives `NRT_LOAD_NOT_ENOUGH_NC` (9); stale
//! handles give `NRT_INVALID_HANDLE`. Executions on different models run concurrently.
//! Differences: repeated `nrt_init` succeeds (the first call's knobs stay); `nrt_load` with
//! `start_nc = -1` places models round-robin; its deprecated core count may be -1 (as AWS says
//! to pass) or positive.
//!
//! # Knobs (environment, read at `nrt_init`; process-wide)
//! - `NRT_STANDIN_VISIBLE_CORES`: visible NeuronCores (default 2). If unset,
//!   `NEURON_RT_VISIBLE_CORES` (`0-3`, `2`, `0,1`) gives the count.
//! - `NRT_STANDIN_EXEC_DELAY_US`: simulated device time per execution (default 0): an execution
//!   lasts at least this long, its host computation included, the rest slept.
//! - `NRT_STANDIN_PREFILL_DELAY_US` / `NRT_STANDIN_DECODE_DELAY_US`: simulated device time per
//!   execution of a program whose decoder op is a prefill / a decode step (default: the above).
//! - `NRT_STANDIN_FAIL_LOAD_STATUS`: status every `nrt_load` returns.
//! - `NRT_STANDIN_FAIL_EXEC_STATUS`: status an execution returns when the failure triggers.
//! - `NRT_STANDIN_FAIL_EVERY_N`: every Nth execution on each core fails (counted per core);
//!   unset: only the first execution fails (once per process).
//! - `NRT_STANDIN_FAIL_ONCE=1`: at most one injected failure per kind (load, execute).
//! - `NRT_STANDIN_FAIL_CORE`: only executions of models placed on this core fail or hang.
//! - `NRT_STANDIN_DENY_READ_PREFIX`: `nrt_tensor_read` of a tensor whose allocation name starts
//!   with this prefix returns `NRT_INVALID` (executions still read it), so tests can show that a
//!   tensor (the worker's `state:` tensors) is never read back to the host.
//! - `NRT_STANDIN_DENY_WRITE_PREFIX`: the same for `nrt_tensor_write` (host writes); executions
//!   still write such tensors.
//! - `NRT_STANDIN_DEVICE_MEMORY_BYTES`: device memory per core (default 16 GiB), reported by
//!   `nrt_get_vnc_memory_stats`; device allocations beyond it fail with `NRT_RESOURCE`.
//! - `NRT_STANDIN_SERIAL_CORES=1`: one execution at a time per core, device time included (as on
//!   hardware); by default executions on one core overlap.
//! - `NRT_STANDIN_HANG_EXEC=1`: executions sleep `NEURON_RT_EXEC_TIMEOUT` seconds (default
//!   3600, or until `nrt_close`) and return `NRT_TIMEOUT`.
//! - `NRT_STANDIN_EXEC_LOG`: a file each completed execution appends `<model name> core <core>`
//!   to (one line, one write), so tests count executions per program (per NEFF) from outside.
//!
//! Rust tests can bypass the environment: [`runtime::Runtime`] instances take a
//! [`knobs::Knobs`] directly, and [`runtime::global`]`().set_knobs(..)` changes the process's.

pub mod abi;
pub mod decoder;
pub mod decoder_math;
pub mod ffi;
pub mod knobs;
pub mod neff;
pub mod program;
pub mod runtime;
pub mod tensor;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_copy;
#[cfg(test)]
mod tests_decoder;
#[cfg(test)]
mod tests_decoder_reference;

use std::path::PathBuf;

/// File name of the built stand-in library (`libnrt_standin.so` on Linux).
pub fn library_file_name() -> String {
    format!("{}nrt_standin{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// Finds the built stand-in library next to the running executable: in its directory, then in
/// the parent (a test binary in `target/debug/deps/` finds `target/debug/deps/` or
/// `target/debug/`). `None` when it is in neither place (build it with `cargo build -p nrt-standin`).
pub fn standin_library_path() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let name = library_file_name();
    [Some(dir), dir.parent()].into_iter().flatten().map(|d| d.join(&name)).find(|p| p.is_file())
}
