//! The Neuron backend: a safe layer over libnrt (loaded at run time through `neuron-sys`).
//!
//! - [`Runtime`]: the process's one runtime (`nrt_init` / `nrt_close`), visible cores, version.
//! - [`NeuronModel`]: a NEFF loaded on one NeuronCore, its tensor info and the check against the
//!   model configuration.
//! - [`DeviceTensor`] / [`TensorSet`]: device memory and the sets `nrt_execute` takes.
//! - [`NeuronInstance`]: a [`ModelInstance`](crate::backend::ModelInstance) for one core, one NEFF
//!   per batch-size bucket, tensor sets allocated once and reused.
//! - [`StatefulNeff`]: a stateful model's NEFF on one core, its implicit state kept in two
//!   device tensors per state used ping-pong (one row per sequence slot).
//! - [`decoder`]: generative decoders (prefill and decode programs, KV cache on the device).
//! - [`probe`]: whether this machine can use Neuron, and why not.
//!
//! libnrt is found through `NEURON_WORKER_LIBNRT`, then `/opt/aws/neuron/lib/libnrt.so.1`, then
//! `libnrt.so.1` on the loader path. The runtime itself honours NEURON_RT_VISIBLE_CORES,
//! NEURON_RT_NUM_CORES, NEURON_RT_LOG_LEVEL and NEURON_RT_EXEC_TIMEOUT (set it explicitly: its
//! documented default varies).

pub mod decoder;
pub mod error;
pub mod instance;
pub mod model;
pub mod runtime;
pub mod sequence;
pub mod stateful;
pub mod tensor;

use std::path::PathBuf;

pub use error::{NeuronError, Operation};
pub use instance::{NeuronInstance, NeuronModelConfig, TensorConfig};
pub use model::{ExpectedTensor, NeffTensorInfo, NeuronModel, TensorUsage, check_tensors};
/// The documented name of a Neuron runtime status code (`5` → `NRT_TIMEOUT`), for logs and metrics.
pub use neuron_sys::status_name as nrt_status_name;
pub use runtime::Runtime;
pub use stateful::{StateTensorConfig, StatefulNeff, StatefulNeffConfig};
pub use tensor::{DeviceTensor, TensorSet};

/// Whether the Neuron backend can run here, for `--backend auto|cpu|neuron` and the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// libnrt loads and at least one NeuronCore is visible.
    Available {
        /// `major.minor.patch.maintenance (detail)`.
        runtime_version: String,
        /// NeuronCores visible to this process.
        visible_cores: u32,
        /// Where libnrt was loaded from.
        library_path: PathBuf,
    },
    /// Neuron cannot be used.
    Unavailable {
        /// Why, and what to do about it.
        reason: String,
    },
}

/// Checks whether Neuron is usable without initialising the runtime (so no core is claimed): loads
/// libnrt and asks for the visible core count and the version. When a runtime is already
/// initialised in this process, reports that one.
pub fn probe() -> Probe {
    if let Some(rt) = Runtime::current() {
        return Probe::Available {
            runtime_version: rt.version().to_owned(),
            visible_cores: rt.visible_cores(),
            library_path: rt.library_path().to_path_buf(),
        };
    }
    let library = match runtime::library() {
        Ok(lib) => lib,
        Err(e) => {
            return Probe::Unavailable { reason: e.to_string() };
        }
    };
    let nrt = library.core();
    let visible_cores = match runtime::visible_core_count(nrt) {
        Ok(n) => n,
        Err(e) => {
            return Probe::Unavailable { reason: e.to_string() };
        }
    };
    if visible_cores == 0 {
        return Probe::Unavailable {
            reason: format!(
                "libnrt loaded from {} but no NeuronCore is visible to this process: check `neuron-ls` \
                 (is the Neuron driver loaded, are the cores held by another process?) and \
                 NEURON_RT_VISIBLE_CORES",
                library.path().display()
            ),
        };
    }
    let runtime_version = runtime::version(nrt).unwrap_or_else(|e| format!("unknown ({e})"));
    Probe::Available { runtime_version, visible_cores, library_path: library.path().to_path_buf() }
}
