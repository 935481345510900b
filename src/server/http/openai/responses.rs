//! `POST /v1/responses` (streamed or not, see `responses_stream`), `GET` and `DELETE /v1/responses/{id}`: OpenAI's Responses API
//! over a generative model, backed by generative sessions. A stored response (`store: true`, the
//! default) keeps its conversation as a session on the worker; a follow-up naming it by
//! `previous_response_id` sends only its new input, rendered as a chat continuation (see
//! `server::chat_turn`), and prefills only those tokens (`usage.input_tokens_details.cached_tokens`
//! says how many were reused). Following up an older response forks: a new session starts from
//! that response's exact tokens (its full K/V blocks are shared through the prefix cache), and the
//! newer branch keeps its session. `store: false` runs a stateless request over the same tokens.
//! Deleting the newest response of a conversation ends its session.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::OpenAiError;
use super::completions::{messages, new_id, now};
use super::generation::{self, Generation, Outcome, Prompt};
use super::response_store::{Orphan, StoredResponse};
use crate::batching::generative::tokens::ChatMessage;
use crate::proto::inference::InferParameter;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::server::ServerError;
use crate::server::chat_turn;
use crate::server::http::core::ResponseStream;
use crate::server::http::{App, HttpError, body};
use crate::sessions::SequenceId;

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
        "no stored response '{id}' (responses sent with store: true are kept while the worker runs, and across restarts with --session-store; the oldest are dropped beyond 10000)"
    ))
}

/// Ends sessions no stored response continues any more (a session whose cancelled turn is still
/// winding down is retried for up to 2 s).
async fn end_sessions(app: &App, orphans: Vec<Orphan>) {
    use crate::batching::generative::session_moves::MoveError;
    for o in orphans {
        let Some(g) = app.core.repo.get(&o.model, "").ok().and_then(|m| m.batching.generative().cloned()) else {
            continue;
        };
        for _ in 0..40 {
            match g.export_session(SequenceId::Str(o.session.clone())).await {
                Err(MoveError::Busy { .. }) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                Err(MoveError::NotFound { .. }) | Ok(_) => break,
                Err(e) => {
                    tracing::debug!(session = %o.session, error = %e, "could not end a responses session");
                    break;
                }
            }
        }
    }
}

/// A turn's session until its response is stored: if the request fails or its client goes away
/// (the handler is dropped), no stored response continues the session, so it is ended.
pub(super) struct Unstored {
    app: App,
    orphan: Option<Orphan>,
}

impl Unstored {
    fn stored(mut self) {
        self.orphan = None;
    }
}

impl Drop for Unstored {
    fn drop(&mut self) {
        let Some(o) = self.orphan.take() else { return };
        self.app.responses.drop_session(&o.session);
        let app = self.app.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                app.responses.ended(&o.session).await;
                end_sessions(&app, vec![o]).await
            });
        }
    }
}

/// How a request's tokens reach the model.
pub(super) struct Turn {
    /// Session to run the turn in (`None`: stateless).
    session: Option<String>,
    /// Open the session with this turn.
    start: bool,
    /// The session's tokens before the turn (what it reuses).
    history: Vec<u32>,
    /// The turn's new tokens.
    prompt: Vec<u32>,
}

fn session_params(turn: &Turn) -> std::collections::HashMap<String, InferParameter> {
    let p = |c| InferParameter { parameter_choice: Some(c) };
    let mut m = std::collections::HashMap::new();
    if let Some(id) = &turn.session {
        m.insert("sequence_id".to_string(), p(ParameterChoice::StringParam(id.clone())));
        m.insert("sequence_start".to_string(), p(ParameterChoice::BoolParam(turn.start)));
    }
    m
}

/// `incomplete_details.reason` of a response the worker cut short while draining (its generation
/// was still running near the exit deadline); what was generated is stored and can be continued.
pub const CUT_SHORT: &str = "worker_shutdown";

/// A parsed `POST /v1/responses`, its session claimed, ready to run (streamed or not).
pub(super) struct Prepared {
    pub(super) app: App,
    pub(super) model: String,
    /// The request, for the fields the response echoes.
    req: Map<String, Value>,
    store: bool,
    previous: Option<String>,
    turn: Turn,
    sampling: Map<String, Value>,
    /// Ends the turn's session unless its response gets stored.
    unstored: Unstored,
    /// The response's id, creation time and output message id (known before it runs, for streams).
    id: String,
    created_at: u64,
    pub(super) msg_id: String,
}

impl Prepared {
    fn get(&self, k: &str) -> Option<&Value> {
        self.req.get(k).filter(|v| !v.is_null())
    }

    /// Starts the turn on the model.
    pub(super) fn start(&self, stream: bool) -> Result<ResponseStream, HttpError> {
        let loaded = self.app.core.repo.get(&self.model, "").map_err(ServerError::from)?;
        let ids = self.turn.prompt.iter().map(|&t| i64::from(t)).collect();
        let g = Generation { prompt: Prompt::Ids(ids), stream, sampling: self.sampling.clone(), logprobs: None };
        let mut req = generation::to_core(&loaded.spec, &g)?;
        req.parameters = session_params(&self.turn);
        Ok(self.app.core.infer_stream(req))
    }

    /// The response object with `status`, no output and no usage yet (streams announce it first).
    pub(super) fn object(&self, status: &str) -> Value {
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "incomplete_details": null,
            "error": null,
            "model": self.model,
            "instructions": self.get("instructions").cloned().unwrap_or(Value::Null),
            "previous_response_id": self.previous,
            "store": self.store,
            "output": [],
            "parallel_tool_calls": false,
            "tool_choice": "auto",
            "tools": [],
            "temperature": self.get("temperature").cloned().unwrap_or(Value::Null),
            "top_p": self.get("top_p").cloned().unwrap_or(Value::Null),
            "max_output_tokens": self.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "metadata": self.get("metadata").cloned().unwrap_or(json!({})),
            "text": { "format": { "type": "text" } },
            "usage": null
        })
    }

    /// The response object of a turn that failed after it started.
    pub(super) fn failed(&self, e: &HttpError) -> Value {
        let mut body = self.object("failed");
        body["error"] = json!({ "code": e.openai_type(), "message": e.message });
        body
    }

    /// The finished response object for `o`; stores it (when `store`) as its session's head.
    pub(super) async fn finish(self, o: &Outcome) -> Value {
        let output_ids: Vec<u32> = o.output_ids.iter().filter_map(|&t| u32::try_from(t).ok()).collect();
        let input_tokens = (self.turn.history.len() + self.turn.prompt.len()) as u64;
        // Why the answer is incomplete: `max_output_tokens` reached, or the worker drained with the
        // generation still running and cut it short near its exit deadline (finish reason `abort`).
        let cut = match o.finish_reason.as_deref() {
            Some("length") => Some("max_output_tokens"),
            Some("abort") => Some(CUT_SHORT),
            _ => None,
        };
        let mut body = self.object(if cut.is_some() { "incomplete" } else { "completed" });
        if let Some(reason) = cut {
            body["incomplete_details"] = json!({ "reason": reason });
        }
        body["output"] = json!([message_item(&self.msg_id, "completed", &o.text)]);
        body["usage"] = json!({
            "input_tokens": input_tokens,
            "input_tokens_details": { "cached_tokens": o.cached_tokens },
            "output_tokens": o.completion_tokens,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": input_tokens + o.completion_tokens
        });
        let Prepared { app, model, turn, unstored, id, req, .. } = self;
        let mut tokens = turn.history;
        tokens.extend_from_slice(&turn.prompt);
        if body_flag(&req, "return_token_ids") {
            body["prompt_token_ids"] = json!(tokens);
            body["output_token_ids"] = json!(output_ids);
        }
        tokens.extend_from_slice(&output_ids);
        unstored.stored();
        if let Some(session) = turn.session {
            let orphans = app.responses.put(id, StoredResponse { model, session, tokens, body: body.clone() }).await;
            end_sessions(&app, orphans).await;
        }
        body
    }
}

fn body_flag(req: &Map<String, Value>, k: &str) -> bool {
    req.get(k).and_then(Value::as_bool) == Some(true)
}

/// The assistant message output item with `text` as its one `output_text` part.
pub(super) fn message_item(id: &str, status: &str, text: &str) -> Value {
    json!({
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [text_part(text)]
    })
}

/// An `output_text` content part.
pub(super) fn text_part(text: &str) -> Value {
    json!({ "type": "output_text", "text": text, "annotations": [], "logprobs": [] })
}

/// Parses a `POST /v1/responses` body and claims the session its turn runs in.
async fn prepare(app: App, req: Map<String, Value>) -> Result<Prepared, HttpError> {
    let get = |k: &str| req.get(k).filter(|v| !v.is_null());
    let model =
        get("model").and_then(Value::as_str).ok_or_else(|| HttpError::bad_request("'model' is required"))?.to_string();
    let store = get("store").and_then(Value::as_bool).unwrap_or(true);
    let previous = get("previous_response_id").and_then(Value::as_str).map(str::to_string);
    let mut new_messages: Vec<ChatMessage> = input_messages(get("input").unwrap_or(&Value::Null))?
        .into_iter()
        .map(|m| ChatMessage {
            role: m["role"].as_str().unwrap_or("user").to_string(),
            content: m["content"].as_str().unwrap_or("").to_string(),
        })
        .collect();
    if let Some(instructions) = get("instructions").and_then(Value::as_str) {
        new_messages.insert(0, ChatMessage { role: "system".into(), content: instructions.into() });
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
    if let Some(id) = &previous {
        let prev = app.responses.get(id).await.ok_or_else(|| not_found(id))?;
        if prev.model != model {
            return Err(HttpError::bad_request(format!(
                "response '{id}' was made by model '{}', not '{model}'",
                prev.model
            )));
        }
    }
    let loaded = app.core.repo.get(&model, "").map_err(ServerError::from)?;
    let Some(generative) = loaded.batching.generative().cloned() else {
        return Err(HttpError::bad_request(format!("model '{model}' is not a generative model")));
    };
    let tok = generative.tokenizer().clone();
    let invalid = |e: String| HttpError::bad_request(format!("model '{model}': {e}"));
    let turn = match &previous {
        None => {
            let prompt = chat_turn::opening(tok.as_ref(), &new_messages).map_err(invalid)?;
            let session = store.then(|| new_id("resp_session_"));
            Turn { session, start: true, history: Vec::new(), prompt }
        }
        Some(id) => {
            // Claimed only when storing: a stateless follow-up leaves the session alone.
            let (prev, is_head) = if store {
                app.responses.claim(id).await.ok_or_else(|| not_found(id))?
            } else {
                (app.responses.get(id).await.ok_or_else(|| not_found(id))?, false)
            };
            let claimed = is_head.then(|| Orphan { model: model.clone(), session: prev.session.clone() });
            let guard = Unstored { app: app.clone(), orphan: claimed };
            let cont = chat_turn::continuation(tok.as_ref(), &new_messages, prev.tokens.last().copied());
            let cont = cont.map_err(invalid)?;
            // From here the turn's own guard (below) owns the session.
            guard.stored();
            if is_head {
                let session = prev.session.clone();
                Turn { session: Some(session), start: false, history: prev.tokens, prompt: cont }
            } else {
                let mut prompt = prev.tokens;
                prompt.extend(cont);
                let session = store.then(|| new_id("resp_session_"));
                Turn { session, start: true, history: Vec::new(), prompt }
            }
        }
    };
    // The session may hold part of a failed or abandoned turn: no stored response continues it then.
    let orphan = turn.session.clone().map(|session| Orphan { model: model.clone(), session });
    let unstored = Unstored { app: app.clone(), orphan };
    Ok(Prepared {
        app,
        model,
        req,
        store,
        previous,
        turn,
        sampling,
        unstored,
        id: new_id("resp_"),
        created_at: now(),
        msg_id: new_id("msg_"),
    })
}

/// `POST /v1/responses`: the response object, or with `stream: true` its server-sent events.
pub async fn create(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Response, OpenAiError> {
    let bytes = body::read(&headers, raw, app.body_limit).await?;
    let req: Map<String, Value> = body::json(&bytes)?;
    let stream = body_flag(&req, "stream");
    let p = prepare(app, req).await?;
    if stream {
        return Ok(super::responses_stream::respond(p).await?);
    }
    let mut responses = p.start(false)?;
    let mut o = Outcome::default();
    while let Some(r) = responses.next().await {
        o.push(generation::read(&r?));
    }
    Ok(Json(p.finish(&o).await).into_response())
}

/// `GET /v1/responses/{id}`.
pub async fn get(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, OpenAiError> {
    Ok(Json(app.responses.get(&id).await.ok_or_else(|| not_found(&id))?.body))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(State(app): State<App>, Path(id): Path<String>) -> Result<Json<Value>, OpenAiError> {
    let orphan = app.responses.delete(&id).await.ok_or_else(|| not_found(&id))?;
    end_sessions(&app, orphan.into_iter().collect()).await;
    Ok(Json(json!({ "id": id, "object": "response.deleted", "deleted": true })))
}
