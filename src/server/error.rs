//! The server layer's error and the one mapping from every internal error to a gRPC status.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::backend::BackendError;
use crate::repository::RepositoryError;
use crate::scheduler::SchedulerError;
use crate::sequence::SequenceError;

/// Why an RPC failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The request does not match the model (names the input, expected vs got).
    #[error("{0}")]
    InvalidRequest(String),
    /// From the model repository.
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    /// From the scheduler (and, through it, the backend).
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// A protocol feature this worker does not offer.
    #[error("{0}")]
    Unimplemented(String),
    /// The worker is shutting down.
    #[error("the worker is shutting down and accepts no new requests; send them to another worker")]
    Draining,
    /// From the sequence batcher (stateful sessions).
    #[error(transparent)]
    Sequence(#[from] SequenceError),
}

impl From<ServerError> for Status {
    fn from(e: ServerError) -> Status {
        let msg = e.to_string();
        match e {
            ServerError::InvalidRequest(_) => Status::invalid_argument(msg),
            ServerError::Unimplemented(_) => Status::unimplemented(msg),
            ServerError::Draining => Status::unavailable(msg),
            ServerError::Repository(r) => match r {
                RepositoryError::NotFound { .. } => Status::not_found(msg),
                RepositoryError::NotReady { .. } => Status::unavailable(msg),
                RepositoryError::BadName(_) => Status::invalid_argument(msg),
                RepositoryError::Load { .. } => Status::internal(msg),
                RepositoryError::NotAllowed(_) => Status::failed_precondition(msg),
            },
            ServerError::Scheduler(s) => match s {
                SchedulerError::QueueFull { .. } => Status::with_error_details(
                    Code::ResourceExhausted,
                    msg,
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(50))),
                ),
                SchedulerError::Timeout { .. } => Status::deadline_exceeded(msg),
                SchedulerError::Unavailable { .. } => Status::unavailable(msg),
                SchedulerError::TooLarge { .. } => Status::invalid_argument(msg),
                SchedulerError::Backend { source, .. } => match source {
                    BackendError::InvalidInput { .. } => Status::invalid_argument(msg),
                    BackendError::Unavailable(_) => Status::unavailable(msg),
                    BackendError::Load(_) | BackendError::Execution { .. } => Status::internal(msg),
                },
            },
            ServerError::Sequence(s) => match s {
                SequenceError::InvalidRequest { .. }
                | SequenceError::NotLive { .. }
                | SequenceError::BadBlob { .. } => Status::invalid_argument(msg),
                SequenceError::SlotsExhausted { .. } | SequenceError::QueueFull { .. } => Status::with_error_details(
                    Code::ResourceExhausted,
                    msg,
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(100))),
                ),
                SequenceError::Busy { .. } => Status::failed_precondition(msg),
                SequenceError::NotFound { .. } => Status::not_found(msg),
                SequenceError::AlreadyExists { .. } => Status::already_exists(msg),
                SequenceError::CorruptSession { .. } => Status::data_loss(msg),
                SequenceError::Store { .. } => Status::internal(msg),
                SequenceError::Unavailable { .. } => Status::unavailable(msg),
                SequenceError::Backend { source, .. } => match source {
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
        let full = ServerError::Scheduler(SchedulerError::QueueFull { model: "m".into(), max_queue_size: 3 });
        let st = Status::from(full);
        assert_eq!(st.code(), Code::ResourceExhausted);
        assert_eq!(st.get_details_retry_info().and_then(|r| r.retry_delay), Some(Duration::from_millis(50)));
        let nf = ServerError::Repository(RepositoryError::NotFound { model: "x".into(), version: String::new() });
        assert_eq!(Status::from(nf).code(), Code::NotFound);
        let fatal = ServerError::Scheduler(SchedulerError::Backend {
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
