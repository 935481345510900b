//! `GET /v1/models` and `GET /v1/models/{id}`: the loaded models in OpenAI's list shape.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::OpenAiError;
use crate::server::http::{App, HttpError};

fn entry(id: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "neuron-worker" })
}

/// Every model with a ready version.
pub async fn list(State(app): State<App>) -> Json<Value> {
    let data: Vec<Value> = app
        .core
        .repo
        .entries()
        .into_iter()
        .filter(|(_, e)| e.versions.values().any(|v| v.batching.is_ready()))
        .map(|(name, _)| entry(&name))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// One model.
pub async fn get(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, OpenAiError> {
    app.core.repo.get(&id, "").map_err(|e| OpenAiError(HttpError::from(crate::server::ServerError::from(e))))?;
    Ok(Json(entry(&id)))
}
