//! The OpenAI-compatible API under `/v1`, mapped onto the same core as the KServe v2 routes:
//! models, embeddings (encoder models), chat and text completions and responses (generative
//! models), with OpenAI's error shape.

pub mod completions;
pub mod embeddings;
pub mod generation;
pub mod models;
pub mod response_persist;
pub mod response_store;
pub mod responses;
pub mod responses_stream;

use axum::response::{IntoResponse, Response};

use super::HttpError;

/// An [`HttpError`] answered in OpenAI's error shape.
#[derive(Debug)]
pub struct OpenAiError(pub HttpError);

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.into_openai()
    }
}

impl<E: Into<HttpError>> From<E> for OpenAiError {
    fn from(e: E) -> OpenAiError {
        OpenAiError(e.into())
    }
}
