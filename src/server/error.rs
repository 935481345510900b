//! The server layer's error and the one mapping from every internal error to a gRPC status.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::BackendError;
use crate::batching::BatchingError;
use crate::repository::RepositoryError;
use crate::sessions::StoreError;

/// The header (gRPC metadata) naming the worker that holds a conversation session another worker
/// was asked to continue (with gRPC UNAVAILABLE; HTTP 409).
pub const SESSION_HOLDER: &str = "x-session-holder";

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request does not match the model (names the input, expected vs got).
    #[error("{0}")]
    InvalidRequest(String),
    /// From the model repository.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// From the batching layer (and, through it, the backend and the session store).
    #[error(transparent)]
    Batching(#[from] BatchingError),
    /// A protocol feature this worker does not offer.
    #[error("{0}")]
    Unimplemented(String),
    /// A response larger than the transport may send (`--max-message-size`).
    #[error(
        "model '{model}': the response is {bytes} bytes, over the {limit}-byte limit (--max-message-size); ask for fewer rows or outputs, or raise the limit"
    )]
    ResponseTooLarge {
        /// Model name.
        model: String,
        /// Encoded response size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The worker is shutting down.
    #[error("the worker is shutting down and accepts no new requests; send them to another worker")]
    Draining,
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let msg = e.to_string();
        match e {
            ServerError::InvalidRequest(_) => Status::invalid_argument(msg),
            ServerError::Unimplemented(_) => Status::unimplemented(msg),
            ServerError::Draining => Status::unavailable(msg),
            ServerError::ResponseTooLarge { .. } => Status::resource_exhausted(msg),
            ServerError::Repository(r) => match r {
                RepositoryError::NotFound { .. } => Status::not_found(msg),
                RepositoryError::NotReady { .. } => Status::unavailable(msg),
                RepositoryError::BadName(_) => Status::invalid_argument(msg),
                RepositoryError::Load { .. } => Status::internal(msg),
                RepositoryError::NotAllowed(_) => Status::failed_precondition(msg),
            },
            ServerError::Batching(b) => match b {
                BatchingError::QueueFull { .. } => Status::with_error_details(
                    Code::ResourceExhausted,
                    msg,
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(50))),
                ),
                BatchingError::SlotsExhausted { .. } => Status::with_error_details(
                    Code::ResourceExhausted,
                    msg,
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(100))),
                ),
                BatchingError::Timeout { .. } => Status::deadline_exceeded(msg),
                BatchingError::Unavailable { .. } => Status::unavailable(msg),
                BatchingError::SessionHeld { holder, .. } => {
                    let mut st = Status::unavailable(msg);
                    if let Ok(v) = holder.parse() {
                        st.metadata_mut().insert(SESSION_HOLDER, v);
                    }
                    st
                }
                BatchingError::TooLarge { .. }
                | BatchingError::InvalidRequest { .. }
                | BatchingError::NotLive { .. }
                | BatchingError::BadBlob { .. }
                | BatchingError::NoSessions { .. } => Status::invalid_argument(msg),
                BatchingError::Busy { .. } => Status::failed_precondition(msg),
                BatchingError::NotFound { .. } => Status::not_found(msg),
                BatchingError::AlreadyExists { .. } => Status::already_exists(msg),
                BatchingError::Store(StoreError::Corrupt { .. } | StoreError::Damaged { .. }) => Status::data_loss(msg),
                // A store that cannot be written now (disk full) may work again: retry later.
                BatchingError::Store(StoreError::Io { .. }) => Status::with_error_details(
                    Code::Unavailable,
                    msg,
                    ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
                ),
                BatchingError::Store(StoreError::NotConfigured) => Status::internal(msg),
                BatchingError::Backend { source, .. } => match source {
                    BackendError::InvalidInput { .. } => Status::invalid_argument(msg),
                    BackendError::Unavailable(_) => Status::unavailable(msg),
                    BackendError::Load(_) | BackendError::Execution { .. } => Status::internal(msg),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_kinds_to_codes() {
        let full = ServerError::Batching(BatchingError::QueueFull { model: "m".into(), max_queue_size: 3 });
        let st = Status::from(full);
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(st.get_details_retry_info().and_then(|r| r.retry_delay), Some(Duration::from_millis(50)));
        let nf = ServerError::Repository(RepositoryError::NotFound { model: "x".into(), version: String::new() });
        assert_eq!(Status::from(nf).code(), Code::NotFound);
        let fatal = ServerError::Batching(BatchingError::Backend {
            model: "m".into(),
            source: BackendError::Execution {
                message: "NRT_TIMEOUT".into(),
                instance_usable: false,
                nrt_status: Some(5),
            },
        });
        let st = Status::from(fatal);
        assert_eq!(st.code(), Code::Internal);
        assert!(st.message().contains("NRT_TIMEOUT"));
        assert_eq!(Status::from(ServerError::Draining).code(), Code::Unavailable);
    }
}
