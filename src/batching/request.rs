//! What a policy is handed: a validated request with its reply channel, and what it sends back.

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::NamedTensor;
pub use crate::backend::RequestInput;
use crate::sessions::SequenceId;

use super::BatchingError;

/// What a request gets back: every model output, for its own rows only.
#[derive(Debug, Clone, PartialEq)]
pub struct InferReply {
    /// Outputs in model-configuration order.
    pub outputs: Vec<NamedTensor>,
}

/// The reply channel of one request.
pub type ReplySender = oneshot::Sender<Result<InferReply, BatchingError>>;

/// A request's Triton sequence parameters (`sequence_id`, `sequence_start`, `sequence_end`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SequenceControl {
    /// The sequence it belongs to; `None` when absent, 0 or empty.
    pub id: Option<SequenceId>,
    /// First request of the sequence (resets its state; restarts a live sequence).
    pub start: bool,
    /// Last request of the sequence (frees its slot once executed).
    pub end: bool,
}

/// A validated request waiting for execution, whatever the model's policy.
#[derive(Debug)]
pub struct InferRequest {
    /// Inputs in model-configuration order.
    pub inputs: Vec<RequestInput>,
    /// Batch rows this request carries (1 for non-batching models).
    pub rows: usize,
    /// Priority level, 1 = highest; 0 = the model's default (dynamic policy).
    pub priority: u64,
    /// Queue timeout requested by the client (dynamic policy).
    pub timeout: Option<Duration>,
    /// Sequence parameters (sequence policy; default for the others).
    pub sequence: SequenceControl,
    /// Where the result goes; a closed channel means the client went away.
    pub reply: ReplySender,
    /// When the request reached the worker.
    pub arrived: Instant,
}
