//! [`BatchingError`]: the one error of the batching layer, for every policy — why a request or a
//! session operation could not be served. The server maps each kind to one gRPC status.

use crate::backend::BackendError;
use crate::sessions::{SequenceId, StoreError};

/// Why the batching layer could not serve a request or session operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchingError {
    /// The model's queue is full.
    #[error(
        "model '{model}': queue full ({max_queue_size} requests waiting); retry after a short backoff or add instances"
    )]
    QueueFull {
        /// Model name.
        model: String,
        /// The bound that was hit.
        max_queue_size: usize,
    },
    /// The request's queue timeout expired before it could be executed; it was not executed.
    #[error(
        "model '{model}': request timed out after {waited_us} us in the queue (timeout {timeout_us} us); it was not executed"
    )]
    Timeout {
        /// Model name.
        model: String,
        /// How long it waited.
        waited_us: u64,
        /// Its timeout.
        timeout_us: u64,
    },
    /// Another live worker holds the conversation session (shared store with leases).
    #[error("model '{model}': {reason}")]
    SessionHeld {
        /// Model name.
        model: String,
        /// The holder's worker id.
        holder: String,
        /// What happened and what to do.
        reason: String,
    },
    /// No instance of the model is in service (all failed, or the model is draining or unloading).
    #[error("model '{model}' is not available: {reason}")]
    Unavailable {
        /// Model name.
        model: String,
        /// Why.
        reason: String,
    },
    /// The request does not fit what the model can execute (too many rows, too long a sequence).
    #[error("model '{model}': {reason}")]
    TooLarge {
        /// Model name.
        model: String,
        /// The limit that was exceeded.
        reason: String,
    },
    /// The backend failed the batch this request was in.
    #[error("model '{model}': {source}")]
    Backend {
        /// Model name.
        model: String,
        /// The backend's error.
        source: BackendError,
    },
    /// The request is malformed for this model's policy (a sequence model without a sequence id,
    /// more than one row, ...).
    #[error("model '{model}': {reason}")]
    InvalidRequest {
        /// Model name.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// A request without START for a sequence that is not live.
    #[error("model '{model}': sequence {id} {why}")]
    NotLive {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
        /// Why: never started, ended, expired, exported.
        why: String,
    },
    /// Every slot holds a live sequence and none can be spilled.
    #[error("model '{model}': all {capacity} sequence slots are taken by live sequences{hint}")]
    SlotsExhausted {
        /// Model name.
        model: String,
        /// Slots × instances.
        capacity: usize,
        /// What would help.
        hint: String,
    },
    /// The session is busy (a request is queued or running), so it cannot be exported now.
    #[error("model '{model}': sequence {id} has requests queued or running; export it between requests")]
    Busy {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// No session with that id on this worker (export).
    #[error("model '{model}': no session {id} on this worker")]
    NotFound {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// Import of a session whose id is already live (or spilled) here.
    #[error("model '{model}': sequence {id} already exists on this worker")]
    AlreadyExists {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// An imported blob that is corrupt, from another model version, or of the wrong state shape.
    #[error("session blob refused: {reason}")]
    BadBlob {
        /// What is wrong.
        reason: String,
    },
    /// The session store failed, or held a corrupt entry.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A session operation on a model whose policy keeps no sessions.
    #[error("model '{model}' is not a stateful (sequence-batched) model; it has no sessions")]
    NoSessions {
        /// Model name.
        model: String,
    },
}

impl BatchingError {
    /// Whether the error says the instance that produced it must leave service.
    pub fn is_fatal(&self) -> bool {
        matches!(self, BatchingError::Backend { source: BackendError::Execution { instance_usable: false, .. }, .. })
    }
}
