//! Errors of the model repository layer: why a model could not be found or served
//! ([`RepositoryError`]) and why one could not be loaded ([`LoadError`]).

use std::path::PathBuf;

use crate::backend::BackendError;
use crate::config::ConfigError;

/// Why a model could not be found, loaded or served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepositoryError {
    /// No model of that name (or no such version) is known.
    #[error("model '{model}'{version} not found; RepositoryIndex lists the models this worker has")]
    NotFound {
        /// Model name.
        model: String,
        /// ` version N` or empty.
        version: String,
    },
    /// The model is known but not ready (failed to load, unloading, or all instances out of service).
    #[error("model '{model}' is not ready: {reason}")]
    NotReady {
        /// Model name.
        model: String,
        /// Why.
        reason: String,
    },
    /// A model name that would leave the repository folder.
    #[error("model name '{0}' is not allowed: names cannot contain '/', '\\\\' or '..', nor be absolute paths")]
    BadName(String),
    /// The model's files are wrong; names the file and field at fault.
    #[error("model '{model}' failed to load: {source}")]
    Load {
        /// Model name (empty when the repository itself could not be read).
        model: String,
        /// What is wrong.
        source: LoadError,
    },
    /// The operation needs `--model-control-mode explicit` (or a repository).
    #[error("{0}")]
    NotAllowed(String),
}

/// Why a model (or the repository) could not be loaded. Each variant names the file, folder or
/// field at fault and, where there is one, what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// The configuration is not valid or asks for something the worker cannot serve.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file or folder could not be read.
    #[error("{}: cannot read {what}: {reason}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What it is (`the model folder`, `the NEFF for batch bucket 4`...).
        what: String,
        /// The operating system's message.
        reason: String,
    },
    /// The folder has neither a `config.pbtxt` nor a version folder to complete one from.
    #[error("{}: no config.pbtxt and no numeric version folder (e.g. 1/)", dir.display())]
    NoConfig {
        /// The model folder.
        dir: PathBuf,
    },
    /// The folder has no `config.pbtxt` and is not an HF BERT checkpoint either.
    #[error("{}: no config.pbtxt, and the folder is not a loadable HF BERT checkpoint: {source}", dir.display())]
    NotACheckpoint {
        /// The version folder tried.
        dir: PathBuf,
        /// Why the checkpoint did not load.
        source: BackendError,
    },
    /// `name` in the configuration differs from the folder's name.
    #[error("{file}: field `name`: '{found}' does not match the folder name '{folder}'")]
    NameMismatch {
        /// The configuration file.
        file: String,
        /// The name the configuration gives.
        found: String,
        /// The folder's name.
        folder: String,
    },
    /// The version policy picks no folder, or a version without a folder.
    #[error("{file}: field `version_policy`: {reason}")]
    Versions {
        /// The configuration file.
        file: String,
        /// What is missing.
        reason: String,
    },
    /// A built-in configuration names a model without built-in weights.
    #[error("no built-in model named '{name}'")]
    NoBuiltin {
        /// The model name.
        name: String,
    },
    /// The version folder holds nothing the CPU backend can run.
    #[error(
        "{}: no CPU reference found (expected an HF folder with config.json and model.safetensors){}",
        dir.display(),
        if *holds_neff { "; it holds NEFF files, which need --backend neuron (or auto with libnrt)" } else { "" }
    )]
    NoCpuModel {
        /// The version folder.
        dir: PathBuf,
        /// It holds `.neff` files (a Neuron model on a CPU worker).
        holds_neff: bool,
    },
    /// A tensor has a variable dimension, which a NEFF cannot have.
    #[error("model '{model}': tensor '{tensor}' has a variable dimension; NEFFs have fixed shapes (declare buckets)")]
    VariableDimension {
        /// The model.
        model: String,
        /// The tensor.
        tensor: String,
    },
    /// Neuron instances were asked for while the CPU backend is selected.
    #[error("the Neuron backend is not selected (start with --backend neuron or auto on a machine with libnrt)")]
    NeuronNotSelected,
    /// The backend refused the model: its files, or the runtime (on `core` when one is named).
    #[error("{}{source}", core.map(|c| format!("core {c}: ")).unwrap_or_default())]
    Backend {
        /// The NeuronCore (or CPU instance) being loaded, when one was.
        core: Option<usize>,
        /// The backend's error.
        source: BackendError,
    },
    /// A decoder checkpoint's files (config, weights) could not be read or do not describe a
    /// decoder the worker can run.
    #[error("{}: cannot serve this decoder checkpoint: {source}", path.display())]
    DecoderCheckpoint {
        /// The folder or file.
        path: PathBuf,
        /// What the decoder loader said.
        source: crate::backend::cpu::llama::LoadError,
    },
    /// A decoder checkpoint (generative model) could not be loaded: its tokenizer or chat template.
    #[error("{}: cannot serve this decoder checkpoint: {reason}", path.display())]
    Decoder {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `model_warmup` sample failed on an instance: the model is not served.
    #[error("model '{model}': warm-up sample '{sample}' failed on {reason}")]
    Warmup {
        /// The model.
        model: String,
        /// The sample's name.
        sample: String,
        /// The instance, rows and the backend's error.
        reason: String,
    },
    /// The batching layer could not start the model's instances.
    #[error("cannot start the model's instances: {source}")]
    Batching {
        /// What the batching layer said.
        source: crate::batching::BatchingError,
    },
    /// A stateful model has no CPU kernel (and no NEFF on a Neuron worker).
    #[error(
        "model '{model}': the CPU backend has no stateful kernel for it (built-in stateful models: accumulate, \
         gru); serve it from a NEFF with --backend neuron"
    )]
    NoStatefulKernel {
        /// The model.
        model: String,
    },
    /// The loading task died (a panic in a loader).
    #[error("loader task failed: {reason}")]
    Task {
        /// The join error.
        reason: String,
    },
}

impl From<BackendError> for LoadError {
    fn from(source: BackendError) -> LoadError {
        LoadError::Backend { core: None, source }
    }
}
