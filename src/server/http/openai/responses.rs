//! `POST /v1/responses` (non-streamed), `GET` and `DELETE /v1/responses/{id}`: OpenAI's Responses API
//! over a generative model. `previous_response_id` continues a stored conversation (the stored
//! messages are sent again, then the new input); `store: false` keeps nothing.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::OpenAiError;
use super::completions::{messages, new_id, now};
use super::generation::{self, Generation, Outcome, Prompt};
use super::response_store::StoredResponse;
use crate::server::ServerError;
use crate::server::http::{App, HttpError, body};

fn input_messages(input: &Value) -> Result<Vec<Value>, HttpError> {
    match input {
        Value::String(s) => Ok(vec![json!({ "role": "user", "content": s })]),
        Value::Array(items) => {
            let plain: Vec<Value> = items
                .iter()
                .filter(|i| i.get("type").and_then(Value::as_str).is_none_or(|t| t == "message"))
                .cloned()
                .collect();
            if plain.len() != items.len() {
                return Err(HttpError::bad_request(
                    "'input' items other than messages (tools, files) are not supported",
                ));
            }
            messages(&Value::Array(plain))
        }
        other => Err(HttpError::bad_request(format!("'input' must be a string or a list of messages, got {other}"))),
    }
}

fn not_found(id: &str) -> HttpError {
    HttpError::not_found(format!(
        "no stored response '{id}' (responses are kept in memory while the worker runs, when sent with store: true)"
    ))
}

/// `POST /v1/responses`.
pub async fn create(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Json<Value>, OpenAiError> {
    let bytes = body::read(&headers, raw, app.body_limit).await?;
    let req: Map<String, Value> = body::json(&bytes)?;
    let get = |k: &str| req.get(k).filter(|v| !v.is_null());
    let model =
        get("model").and_then(Value::as_str).ok_or_else(|| HttpError::bad_request("'model' is required"))?.to_string();
    if get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(HttpError::bad_request(
            "streamed responses are not supported yet; use /v1/chat/completions with stream: true",
        )
        .into());
    }
    let store = get("store").and_then(Value::as_bool).unwrap_or(true);
    let previous = get("previous_response_id").and_then(Value::as_str).map(str::to_string);
    let mut history = match &previous {
        Some(id) => {
            let prev = app.responses.get(id).ok_or_else(|| not_found(id))?;
            if prev.model != model {
                return Err(HttpError::bad_request(format!(
                    "response '{id}' was made by model '{}', not '{model}'",
                    prev.model
                ))
                .into());
            }
            prev.messages
        }
        None => Vec::new(),
    };
    history.extend(input_messages(get("input").unwrap_or(&Value::Null))?);
    let mut prompt = history.clone();
    if let Some(instructions) = get("instructions").and_then(Value::as_str) {
        prompt.insert(0, json!({ "role": "system", "content": instructions }));
    }
    let mut sampling = Map::new();
    if let Some(v) = get("max_output_tokens") {
        sampling.insert("max_tokens".into(), v.clone());
    }
    for k in ["temperature", "top_p", "seed"] {
        if let Some(v) = get(k) {
            sampling.insert(k.into(), v.clone());
        }
    }
    let loaded = app.core.repo.get(&model, "").map_err(ServerError::from)?;
    let g = Generation { prompt: Prompt::Messages(prompt), stream: false, sampling, logprobs: None };
    let mut responses = app.core.infer_stream(generation::to_core(&loaded.spec, &g)?);
    let mut o = Outcome::default();
    while let Some(r) = responses.next().await {
        o.push(generation::read(&r?));
    }
    let id = new_id("resp_");
    let incomplete = o.finish_reason.as_deref() == Some("length");
    let body = json!({
        "id": id,
        "object": "response",
        "created_at": now(),
        "status": if incomplete { "incomplete" } else { "completed" },
        "incomplete_details": if incomplete { json!({ "reason": "max_output_tokens" }) } else { Value::Null },
        "error": null,
        "model": model,
        "instructions": get("instructions").cloned().unwrap_or(Value::Null),
        "previous_response_id": previous,
        "store": store,
        "output": [{
            "type": "message",
            "id": new_id("msg_"),
            "status": "completed",
            "role": "assistant",
            "content": [{ "type": "output_text", "text": o.text, "annotations": [] }]
        }],
        "parallel_tool_calls": false,
        "tool_choice": "auto",
        "tools": [],
        "temperature": get("temperature").cloned().unwrap_or(Value::Null),
        "top_p": get("top_p").cloned().unwrap_or(Value::Null),
        "metadata": get("metadata").cloned().unwrap_or(json!({})),
        "text": { "format": { "type": "text" } },
        "usage": {
            "input_tokens": o.prompt_tokens,
            "input_tokens_details": { "cached_tokens": o.cached_tokens },
            "output_tokens": o.completion_tokens,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": o.prompt_tokens + o.completion_tokens
        }
    });
    if store {
        history.push(json!({ "role": "assistant", "content": o.text }));
        app.responses.put(id, StoredResponse { model, messages: history, body: body.clone() });
    }
    Ok(Json(body))
}

/// `GET /v1/responses/{id}`.
pub async fn get(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, OpenAiError> {
    Ok(Json(app.responses.get(&id).ok_or_else(|| not_found(&id))?.body))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, OpenAiError> {
    if !app.responses.delete(&id) {
        return Err(not_found(&id).into());
    }
    Ok(Json(json!({ "id": id, "object": "response.deleted", "deleted": true })))
}
