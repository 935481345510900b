//! Errors of tokenizing text and rendering chat templates.

use std::path::PathBuf;

/// Why text could not be turned into tokens (or back), or a chat could not be rendered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenizeError {
    /// A tokenizer or tokenizer_config file could not be read or parsed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer failed on some text or ids.
    #[error("tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer library's reason.
        message: String,
    },
    /// The chat template does not compile.
    #[error("chat template does not compile: {message}")]
    Template {
        /// The template engine's reason (with the line).
        message: String,
    },
    /// Rendering the chat failed: the template raised an exception or the messages do not fit it.
    #[error("chat template refused the messages: {message}")]
    Render {
        /// The template's message (e.g. from `raise_exception`) or the engine's reason.
        message: String,
    },
}
