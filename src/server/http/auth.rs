//! Bearer-token check for the HTTP front: the same `--auth-token` as gRPC, on every route except the
//! health probes (`/v2/health/*`), compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::HttpError;

/// Answers 401 (Triton's or, under `/v1`, OpenAI's error shape) when the token is missing or wrong.
pub async fn check(State(token): State<Option<Arc<str>>>, req: Request, next: Next) -> Response {
    let Some(expected) = token else { return next.run(req).await };
    if req.uri().path().starts_with("/v2/health/") {
        return next.run(req).await;
    }
    let got = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let Some(why) = crate::server::bearer::refusal(got, &expected) else { return next.run(req).await };
    let err = HttpError::new(StatusCode::UNAUTHORIZED, why);
    if req.uri().path().starts_with("/v1/") { err.into_openai() } else { err.into_response() }
}
