//! The HTTP front's one error type and its one mapping: every failure from the core arrives as the
//! gRPC status the core's errors map to, and becomes an HTTP status here (400, 401, 404, 409, 413,
//! 429 with `Retry-After`, 500, 501, 503, 504), rendered as Triton's `{"error": "..."}` or, under
//! `/v1`, OpenAI's `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tonic::Code;
use tonic_types::StatusExt;

use crate::server::ServerError;

/// Why an HTTP request failed: the status to answer with and a message that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What happened and what to do.
    pub message: String,
    /// When the client may retry (sent as `Retry-After`, whole seconds rounded up).
    pub retry_after: Option<Duration>,
    /// The worker holding the conversation session (409, sent as `x-session-holder`).
    pub holder: Option<String>,
}

impl HttpError {
    /// An error with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> HttpError {
        HttpError { status, message: message.into(), retry_after: None, holder: None }
    }

    /// 400: the request is malformed or does not fit the model.
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }

    /// An error the core sent in band on a stream: 409 naming the holder when another worker holds
    /// the conversation session (the `x-session-holder` parameter beside the message), else 400.
    pub fn in_band(message: String, resp: Option<&crate::proto::inference::ModelInferResponse>) -> HttpError {
        use crate::proto::inference::infer_parameter::ParameterChoice;
        let holder = resp.and_then(|r| r.parameters.get(crate::server::error::SESSION_HOLDER)).and_then(|p| {
            match &p.parameter_choice {
                Some(ParameterChoice::StringParam(h)) => Some(h.clone()),
                _ => None,
            }
        });
        match holder {
            Some(holder) => HttpError {
                status: StatusCode::CONFLICT,
                message,
                retry_after: Some(Duration::from_secs(1)),
                holder: Some(holder),
            },
            None => HttpError::bad_request(message),
        }
    }

    /// 404: no such route, model or stored object.
    pub fn not_found(message: impl Into<String>) -> HttpError {
        HttpError::new(StatusCode::NOT_FOUND, message)
    }

    /// OpenAI's `error.type` for this status.
    pub fn openai_type(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            _ => "server_error",
        }
    }

    fn with_headers(&self, mut resp: Response) -> Response {
        *resp.status_mut() = self.status;
        if let Some(v) = self.holder.as_deref().and_then(|h| HeaderValue::from_str(h).ok()) {
            resp.headers_mut().insert(crate::server::error::SESSION_HOLDER, v);
        }
        if let Some(after) = self.retry_after {
            let secs = after.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }

    /// The body in OpenAI's error shape (for `/v1`).
    pub fn into_openai(self) -> Response {
        let body = serde_json::json!({
            "error": { "message": self.message, "type": self.openai_type(), "param": null, "code": null }
        });
        self.with_headers(axum::Json(body).into_response())
    }

    /// The JSON object Triton sends as an SSE event when a stream fails after it started.
    pub fn event_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message })
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        self.with_headers(axum::Json(body).into_response())
    }
}

/// The one mapping from the core's statuses to HTTP.
impl From<tonic::Status> for HttpError {
    fn from(s: tonic::Status) -> HttpError {
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Ok | Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let retry_after = match s.code() {
            Code::ResourceExhausted => {
                Some(s.get_details_retry_info().and_then(|r| r.retry_delay).unwrap_or(Duration::from_secs(1)))
            }
            Code::Unavailable => Some(Duration::from_secs(1)),
            _ => None,
        };
        // A session another live worker holds: 409 naming the holder (the gateway may route there).
        let holder = s.metadata().get(crate::server::error::SESSION_HOLDER).and_then(|v| v.to_str().ok());
        if let Some(holder) = holder {
            return HttpError {
                status: StatusCode::CONFLICT,
                message: s.message().to_string(),
                retry_after: Some(Duration::from_secs(1)),
                holder: Some(holder.to_string()),
            };
        }
        HttpError { status, message: s.message().to_string(), retry_after, holder: None }
    }
}

impl From<ServerError> for HttpError {
    fn from(e: ServerError) -> HttpError {
        HttpError::from(tonic::Status::from(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::BatchingError;

    #[test]
    fn overload_is_429_with_retry_after() {
        let e =
            HttpError::from(ServerError::Batching(BatchingError::QueueFull { model: "m".into(), max_queue_size: 2 }));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers().get(header::RETRY_AFTER).and_then(|v| v.to_str().ok()), Some("1"));
    }

    #[test]
    fn kinds_map_to_statuses() {
        let nf = ServerError::Repository(crate::repository::RepositoryError::NotFound {
            model: "x".into(),
            version: String::new(),
        });
        assert_eq!(HttpError::from(nf).status, StatusCode::NOT_FOUND);
        assert_eq!(HttpError::from(ServerError::InvalidRequest("bad".into())).status, StatusCode::BAD_REQUEST);
        assert_eq!(HttpError::from(ServerError::Draining).status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
