//! KServe v2 / Triton REST endpoints other than infer: health, server and model metadata, model
//! readiness, configuration, statistics, and the repository (index, load, unload). Each asks the
//! core the same question the gRPC RPC asks and writes its answer as JSON.

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::error::HttpError;
use super::{App, body, proto_json};
use crate::proto::inference::ModelRepositoryParameter;
use crate::proto::inference::model_repository_parameter::ParameterChoice;

/// Extensions only the HTTP front offers, added to the core's list in `GET /v2`.
const HTTP_EXTENSIONS: &[&str] = &["binary_tensor_data", "generate"];

/// `(model, version)` from a route's path parameters (version empty when absent).
pub fn model_and_version(path: &HashMap<String, String>) -> (&str, &str) {
    (path.get("model").map_or("", String::as_str), path.get("version").map_or("", String::as_str))
}

fn status_only(ok: bool, not: StatusCode) -> Response {
    if ok { StatusCode::OK.into_response() } else { not.into_response() }
}

/// `GET /v2/health/live`: 200 while the process serves.
pub async fn live(State(app): State<App>) -> Result<Response, HttpError> {
    Ok(status_only(app.core.live().await?, StatusCode::SERVICE_UNAVAILABLE))
}

/// `GET /v2/health/ready`: 200 when a model is ready and the worker is not draining, else 503.
pub async fn ready(State(app): State<App>) -> Result<Response, HttpError> {
    Ok(status_only(app.core.ready().await?, StatusCode::SERVICE_UNAVAILABLE))
}

/// `GET /v2`: server metadata.
pub async fn server_metadata(State(app): State<App>) -> Result<Json<Value>, HttpError> {
    let mut m = app.core.server_metadata().await?;
    m.extensions.extend(HTTP_EXTENSIONS.iter().map(|s| s.to_string()));
    Ok(Json(json!({ "name": m.name, "version": m.version, "extensions": m.extensions })))
}

/// `GET /v2/models/{m}[/versions/{v}]`: model metadata.
pub async fn model_metadata(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
) -> Result<Json<Value>, HttpError> {
    let (m, v) = model_and_version(&p);
    Ok(Json(proto_json::to_json("ModelMetadataResponse", &app.core.model_metadata(m, v).await?)?))
}

/// `GET /v2/models/{m}[/versions/{v}]/ready`: 200 when ready, else 400 (Triton's answer).
pub async fn model_ready(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
) -> Result<Response, HttpError> {
    let (m, v) = model_and_version(&p);
    Ok(status_only(app.core.model_ready(m, v).await?, StatusCode::BAD_REQUEST))
}

/// `GET /v2/models/{m}[/versions/{v}]/config`: the model configuration as JSON.
pub async fn model_config(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
) -> Result<Json<Value>, HttpError> {
    let (m, v) = model_and_version(&p);
    Ok(Json(proto_json::to_json("ModelConfig", &app.core.model_config(m, v).await?)?))
}

/// `GET /v2/models[/{m}[/versions/{v}]]/stats`: statistics.
pub async fn statistics(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
) -> Result<Json<Value>, HttpError> {
    let (m, v) = model_and_version(&p);
    Ok(Json(proto_json::to_json("ModelStatisticsResponse", &app.core.statistics(m, v).await?)?))
}

/// `GET /v2/models/stats`: statistics of every model.
pub async fn all_statistics(State(app): State<App>) -> Result<Json<Value>, HttpError> {
    Ok(Json(proto_json::to_json("ModelStatisticsResponse", &app.core.statistics("", "").await?)?))
}

async fn optional_json(app: &App, headers: &HeaderMap, raw: Body) -> Result<Map<String, Value>, HttpError> {
    let bytes = body::read(headers, raw, app.body_limit).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    body::json(&bytes)
}

/// `POST /v2/repository/index` (body `{"ready": bool}` optional): every model and version with its state.
pub async fn repository_index(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Json<Value>, HttpError> {
    let req = optional_json(&app, &headers, raw).await?;
    let ready = match req.get("ready") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(HttpError::bad_request(format!("'ready' must be true or false, got {other}"))),
    };
    let index = app.core.index(ready).await?;
    let models: Vec<Value> = index
        .models
        .into_iter()
        .map(|m| {
            let mut v = json!({ "name": m.name, "state": m.state });
            if !m.version.is_empty() {
                v["version"] = Value::String(m.version);
            }
            if !m.reason.is_empty() {
                v["reason"] = Value::String(m.reason);
            }
            v
        })
        .collect();
    Ok(Json(Value::Array(models)))
}

/// `POST /v2/repository/models/{m}/load` (body `{"parameters": {...}}` optional).
pub async fn load(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
    headers: HeaderMap,
    raw: Body,
) -> Result<Response, HttpError> {
    let req = optional_json(&app, &headers, raw).await?;
    let mut parameters = HashMap::new();
    if let Some(Value::Object(ps)) = req.get("parameters") {
        for (k, v) in ps {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::Number(n) if n.is_i64() => ParameterChoice::Int64Param(n.as_i64().unwrap_or_default()),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                other => ParameterChoice::StringParam(other.to_string()),
            };
            parameters.insert(k.clone(), ModelRepositoryParameter { parameter_choice: Some(choice) });
        }
    }
    app.core.load(model_and_version(&p).0, parameters).await?;
    Ok(StatusCode::OK.into_response())
}

/// `POST /v2/repository/models/{m}/unload`.
pub async fn unload(
    State(app): State<App>,
    Path(p): Path<HashMap<String, String>>,
    headers: HeaderMap,
    raw: Body,
) -> Result<Response, HttpError> {
    optional_json(&app, &headers, raw).await?;
    app.core.unload(model_and_version(&p).0).await?;
    Ok(StatusCode::OK.into_response())
}

/// Any other path: 404 naming what exists.
pub async fn no_route(uri: axum::http::Uri) -> HttpError {
    HttpError::not_found(format!(
        "no endpoint {}; this worker serves /v2 (KServe v2 / Triton REST) and /v1 (OpenAI-compatible)",
        uri.path()
    ))
}
