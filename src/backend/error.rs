//! Errors of the backend layer (CPU kernels and the Neuron runtime).

/// Why a backend could not load a model or execute a batch.
///
/// `Clone`, so one execution failure can be sent to every request of the batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// A request's tensor is outside what the model accepts (a vocabulary id out of range, ...).
    #[error("input '{name}': {reason}")]
    InvalidInput {
        /// Input name.
        name: String,
        /// What is wrong and what the limit is.
        reason: String,
    },
    /// The model's files could not be read or do not describe a model this backend can run.
    #[error("cannot load model: {0}")]
    Load(String),
    /// Execution of a batch failed.
    #[error("{message}")]
    Execution {
        /// What happened, where (model, core) and what to do.
        message: String,
        /// False when the instance (its NeuronCore) must be taken out of service.
        instance_usable: bool,
        /// The Neuron runtime status code, when the failure came from libnrt.
        nrt_status: Option<u32>,
    },
    /// The backend is not available on this machine (e.g. libnrt not found).
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}
