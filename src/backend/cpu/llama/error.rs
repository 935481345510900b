//! Errors of loading a Llama-family decoder: its files, its configuration and its weights.

use std::path::PathBuf;

use crate::backend::BackendError;

/// Why a decoder's folder, configuration or weights could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        message: String,
    },
    /// A JSON file (config.json, the shard index, ...) is not what it should be.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A safetensors file is malformed.
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's reason.
        message: String,
    },
    /// A weight the architecture needs is in none of the weight files.
    #[error("weight '{name}' is missing: the files do not hold a complete model of this architecture")]
    MissingTensor {
        /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
        name: String,
    },
    /// A weight has a shape the configuration does not allow.
    #[error("weight '{name}' has shape {found:?}, the configuration implies {expected:?}")]
    Shape {
        /// HF tensor name.
        name: String,
        /// Shape implied by config.json.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A weight is stored in an element type this loader does not convert.
    #[error("weight '{name}' is stored as {dtype}; supported: F32, F16, BF16")]
    UnsupportedDtype {
        /// HF tensor name.
        name: String,
        /// The stored element type.
        dtype: String,
    },
    /// config.json describes something this implementation does not run.
    #[error("config.json field '{field}': {reason}")]
    Config {
        /// The offending field.
        field: String,
        /// What is wrong and what is supported.
        reason: String,
    },
    /// A GGUF file could not be read or does not describe a model this loader runs.
    #[error("{path}: {message}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong (from the GGUF reader).
        message: String,
    },
    /// The tokenizer or the chat template of the folder could not be loaded.
    #[error("{message}")]
    Tokenizer {
        /// What is wrong, with the file.
        message: String,
    },
    /// The decoder was asked for a KV pool it cannot hold.
    #[error("KV pool: {reason}")]
    KvPool {
        /// What is wrong (sizes, limits).
        reason: String,
    },
}

impl From<LoadError> for BackendError {
    fn from(e: LoadError) -> Self {
        BackendError::Load(e.to_string())
    }
}

impl From<crate::tokenize::TokenizeError> for LoadError {
    fn from(e: crate::tokenize::TokenizeError) -> Self {
        LoadError::Tokenizer { message: e.to_string() }
    }
}
