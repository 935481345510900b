//! GGUF model files: the container ([`GgufFile`]), weights by HF name with quantized matrices kept
//! quantized ([`GgufSource`]), the HF-style configuration, tokenizer and chat template their
//! metadata describes.

mod load;
mod names;
mod reader;
mod source;
mod tokenizer;

pub use load::{GgufDecoderFiles, load_gguf_decoder};
pub use names::{gguf_name, hf_name};
pub use reader::{GgufFile, GgufValue, TensorInfo};
pub use source::{GgufSource, GgufTensor};
pub use tokenizer::tokenizer_json;

use std::path::PathBuf;

/// Why a GGUF file could not be read or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GgufError {
    /// The file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        message: String,
    },
    /// The file ends before a structure it declares.
    #[error("GGUF file truncated while reading {what} (byte {at}): re-download or re-export it")]
    Truncated {
        /// What was being read.
        what: String,
        /// Byte offset.
        at: usize,
    },
    /// The file's structure is invalid.
    #[error("malformed GGUF file at byte {at}: {what}")]
    Malformed {
        /// What is wrong.
        what: String,
        /// Byte offset.
        at: usize,
    },
    /// Valid GGUF, but something this worker does not run.
    #[error("unsupported GGUF content: {what}")]
    Unsupported {
        /// What, and what is supported.
        what: String,
    },
    /// Required metadata is absent or has the wrong type.
    #[error("GGUF metadata '{key}' is missing or not {expected}")]
    Metadata {
        /// The key.
        key: String,
        /// The expected type.
        expected: &'static str,
    },
}
