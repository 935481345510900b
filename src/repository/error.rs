//! Errors of the model repository layer.

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
    #[error("model '{model}' failed to load: {reason}")]
    Load {
        /// Model name.
        model: String,
        /// What is wrong, with the file and field.
        reason: String,
    },
    /// The operation needs `--model-control-mode explicit` (or a repository).
    #[error("{0}")]
    NotAllowed(String),
}
