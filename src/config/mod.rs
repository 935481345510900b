//! Model configuration: Triton's `ModelConfig` read from `config.pbtxt`, checked and turned into the
//! [`ModelSpec`] the scheduler and server work from.

pub mod generative;
pub mod limits;
mod pbtxt;
pub mod sequence;
mod spec;
pub mod unserved;
mod unserved_more;

pub use pbtxt::parse_model_config;
pub use sequence::{ControlKind, ControlSpec, SequenceSpec, StateSpec, Strategy};
pub use spec::{BucketPlan, DEFAULT_MAX_QUEUE_SIZE, DynamicPolicy, IoSpec, ModelSpec};

/// Why a model configuration cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid protobuf text format for `inference.ModelConfig`.
    #[error("{file}: not a valid ModelConfig in protobuf text format: {reason}")]
    Syntax {
        /// The file (or `<built-in>`).
        file: String,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A field holds a value the worker cannot serve.
    #[error("{file}: field `{field}`: {reason}")]
    Field {
        /// The file (or `<built-in>`).
        file: String,
        /// The field at fault, e.g. `input[0].data_type`.
        field: String,
        /// What is wrong and what is accepted.
        reason: String,
    },
}
