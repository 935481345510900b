//! Triton's generate extension: `POST /v2/models/{m}[/versions/{v}]/generate` and `/generate_stream`
//! (server-sent events). Top-level JSON keys name model inputs; `parameters` are request parameters,
//! except that for models with a `sampling_parameters` input (Triton's vLLM-backend convention) the
//! sampling keys are folded into that JSON and `stream` / other input names become inputs. Each
//! response's outputs come back as top-level keys (one element as a scalar).

use std::collections::HashMap;
use std::convert::Infallible;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::{Map, Value};

use super::error::HttpError;
use super::{App, body, params, tensor_json};
use crate::config::ModelSpec;
use crate::proto::inference::model_infer_request::InferInputTensor;
use crate::proto::inference::{ModelInferRequest, ModelInferResponse};
use crate::server::ServerError;
use crate::tensor::DataType;

/// The input through which vLLM-style models take their sampling settings.
const SAMPLING_INPUT: &str = "sampling_parameters";

fn input_tensor(spec: &ModelSpec, name: &str, value: &Value) -> Result<(InferInputTensor, Bytes), HttpError> {
    let Some(io) = spec.inputs.iter().find(|i| i.name == name) else {
        let names: Vec<&str> = spec.inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(HttpError::bad_request(format!(
            "model '{}' has no input '{name}'; top-level keys name inputs ({names:?}), or go in 'parameters'",
            spec.name
        )));
    };
    // A JSON object for a BYTES input (e.g. sampling_parameters) travels as its JSON text.
    let value = match (io.dtype, value) {
        (DataType::Bytes, Value::Object(_)) => Value::String(value.to_string()),
        _ => value.clone(),
    };
    let elements = match &value {
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let mut shape = vec![elements as i64];
    if spec.batches() {
        shape.insert(0, 1);
    }
    let data = tensor_json::json_to_raw(name, io.dtype, &value)?;
    let tensor = InferInputTensor {
        name: name.to_string(),
        datatype: io.dtype.as_str().to_string(),
        shape,
        parameters: Default::default(),
        contents: None,
    };
    Ok((tensor, Bytes::from(data)))
}

/// Builds the core request from a generate body; `stream` is what the route implies.
pub fn to_core(
    spec: &ModelSpec,
    version: &str,
    mut body: Map<String, Value>,
    stream: bool,
) -> Result<ModelInferRequest, HttpError> {
    let id = match body.remove("id") {
        None => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => return Err(HttpError::bad_request(format!("'id' must be a string, got {other}"))),
    };
    let parameters = match body.remove("parameters") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(other) => return Err(HttpError::bad_request(format!("'parameters' must be an object, got {other}"))),
    };
    let has = |n: &str| spec.inputs.iter().any(|i| i.name == n);
    let mut request_params = Map::new();
    let mut sampling = match body.remove(SAMPLING_INPUT) {
        Some(Value::Object(m)) => Some(m),
        Some(Value::String(s)) => Some(
            serde_json::from_str(&s)
                .map_err(|e| HttpError::bad_request(format!("'{SAMPLING_INPUT}' is not a JSON object: {e}")))?,
        ),
        Some(other) => {
            return Err(HttpError::bad_request(format!("'{SAMPLING_INPUT}' must be an object, got {other}")));
        }
        None => None,
    };
    for (k, v) in parameters {
        if crate::server::session_turn::is_session_param(&k) {
            // sequence_id / sequence_start / sequence_end are request parameters for any model.
            request_params.insert(k, v);
        } else if has(&k) && !body.contains_key(&k) {
            body.insert(k, v);
        } else if has(SAMPLING_INPUT) {
            sampling.get_or_insert_with(Map::new).insert(k, v);
        } else {
            request_params.insert(k, v);
        }
    }
    if let Some(s) = sampling {
        body.insert(SAMPLING_INPUT.into(), Value::Object(s));
    }
    if has("stream") {
        body.insert("stream".into(), Value::Bool(stream));
    }
    let mut inputs = Vec::with_capacity(body.len());
    let mut raw = Vec::with_capacity(body.len());
    for (k, v) in &body {
        let (t, data) = input_tensor(spec, k, v)?;
        inputs.push(t);
        raw.push(data);
    }
    Ok(ModelInferRequest {
        model_name: spec.name.clone(),
        model_version: version.to_string(),
        id,
        parameters: params::to_params(&request_params, &[])?,
        inputs,
        outputs: Vec::new(),
        raw_input_contents: raw,
    })
}

/// One response's outputs as a flat JSON object.
pub fn from_core(resp: &ModelInferResponse) -> Value {
    let mut out = Map::new();
    out.insert("model_name".into(), Value::String(resp.model_name.clone()));
    out.insert("model_version".into(), Value::String(resp.model_version.clone()));
    if !resp.id.is_empty() {
        out.insert("id".into(), Value::String(resp.id.clone()));
    }
    for (o, data) in resp.outputs.iter().zip(&resp.raw_output_contents) {
        let dtype = DataType::from_name(&o.datatype).unwrap_or(DataType::Bytes);
        let v = match tensor_json::raw_to_json(dtype, data) {
            Value::Array(mut items) if items.len() == 1 => items.pop().unwrap_or(Value::Null),
            other => other,
        };
        out.insert(o.name.clone(), v);
    }
    Value::Object(out)
}

async fn prepare(
    app: &App,
    path: &HashMap<String, String>,
    headers: &HeaderMap,
    raw: Body,
    stream: bool,
) -> Result<ModelInferRequest, HttpError> {
    let (model, version) = super::kserve::model_and_version(path);
    let loaded = app.core.repo.get(model, version).map_err(ServerError::from)?;
    let bytes = body::read(headers, raw, app.body_limit).await?;
    let json: Map<String, Value> = body::json(&bytes)?;
    let mut req = to_core(&loaded.spec, version, json, stream)?;
    super::core::apply_session_header(headers, &mut req)?;
    Ok(req)
}

/// `POST .../generate`: one JSON object (the last response of the model, for streaming models).
pub async fn generate(
    State(app): State<App>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    raw: Body,
) -> Result<Response, HttpError> {
    let req = prepare(&app, &path, &headers, raw, false).await?;
    let mut responses = app.core.infer_stream(req);
    let mut last = None;
    while let Some(r) = responses.next().await {
        let r = r?;
        if !r.outputs.is_empty() {
            last = Some(r);
        }
    }
    let last = last
        .ok_or_else(|| HttpError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "the model sent no response"))?;
    Ok(Json(from_core(&last)).into_response())
}

/// `POST .../generate_stream`: one SSE `data:` event per response; an error after the stream
/// started is sent as a last `{"error": ...}` event.
pub async fn generate_stream(
    State(app): State<App>,
    Path(path): Path<HashMap<String, String>>,
    headers: HeaderMap,
    raw: Body,
) -> Result<Response, HttpError> {
    let req = prepare(&app, &path, &headers, raw, true).await?;
    let mut responses = app.core.infer_stream(req);
    // Errors before the first response (validation, overload) keep their HTTP status.
    let first = match responses.next().await {
        Some(r) => r?,
        None => {
            return Err(HttpError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "the model sent no response"));
        }
    };
    let events = futures::stream::once(async move { Ok(first) }).chain(responses).filter_map(|r| async move {
        match r {
            Ok(resp) if resp.outputs.is_empty() => None,
            Ok(resp) => Some(from_core(&resp)),
            Err(e) => Some(e.event_json()),
        }
    });
    Ok(sse(events).into_response())
}

/// An SSE response of JSON `data:` events.
pub fn sse(events: impl Stream<Item = Value> + Send + 'static) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(events.map(|v| Ok(Event::default().data(v.to_string())))).keep_alive(KeepAlive::default())
}
