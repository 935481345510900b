//! `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events or not)
//! over a generative model: the request becomes one generation (see `generation`), the model's
//! responses become OpenAI's completion objects or chunks, with `usage` (cached prompt tokens
//! included) and log-probabilities.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};

use super::OpenAiError;
use super::generation::{self, Generation, Outcome, Prompt};
use crate::server::ServerError;
use crate::server::http::{App, HttpError, body};

/// Chat or text completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

fn field<'a>(req: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    req.get(key).filter(|v| !v.is_null())
}

fn text_of(content: &Value) -> Result<String, HttpError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                (Some("text" | "input_text" | "output_text"), Some(t)) => Ok(t.to_string()),
                _ => Err(HttpError::bad_request(format!("only text content parts are supported, got {p}"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.concat()),
        Value::Null => Ok(String::new()),
        other => Err(HttpError::bad_request(format!("message content must be a string or text parts, got {other}"))),
    }
}

/// Chat messages with plain-string content.
pub fn messages(v: &Value) -> Result<Vec<Value>, HttpError> {
    let Some(list) = v.as_array().filter(|l| !l.is_empty()) else {
        return Err(HttpError::bad_request("'messages' must be a non-empty list of {\"role\", \"content\"} objects"));
    };
    list.iter()
        .map(|m| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| HttpError::bad_request(format!("message without a 'role': {m}")))?;
            let role = if role == "developer" { "system" } else { role };
            Ok(json!({ "role": role, "content": text_of(m.get("content").unwrap_or(&Value::Null))? }))
        })
        .collect()
}

/// Reads the shared sampling fields of a chat or completion request.
pub fn sampling(req: &Map<String, Value>, max_tokens_keys: &[&str]) -> Result<Map<String, Value>, HttpError> {
    let mut s = Map::new();
    for key in max_tokens_keys {
        if let Some(v) = field(req, key) {
            s.insert("max_tokens".into(), v.clone());
        }
    }
    for key in ["temperature", "top_p", "seed"] {
        if let Some(v) = field(req, key) {
            s.insert(key.into(), v.clone());
        }
    }
    if let Some(v) = field(req, "stop") {
        s.insert("stop".into(), generation::stop(v)?);
    }
    if let Some(n) = field(req, "n").and_then(Value::as_u64)
        && n != 1
    {
        return Err(HttpError::bad_request("'n' must be 1 (one choice per request)"));
    }
    Ok(s)
}

fn parse(kind: Kind, req: &Map<String, Value>) -> Result<Generation, HttpError> {
    let stream = field(req, "stream").and_then(Value::as_bool).unwrap_or(false);
    match kind {
        Kind::Chat => {
            let logprobs = match field(req, "logprobs").and_then(Value::as_bool) {
                Some(true) => Some(field(req, "top_logprobs").and_then(Value::as_u64).unwrap_or(0)),
                _ => None,
            };
            let prompt = Prompt::Messages(messages(field(req, "messages").unwrap_or(&Value::Null))?);
            let sampling = sampling(req, &["max_tokens", "max_completion_tokens"])?;
            Ok(Generation { prompt, stream, sampling, logprobs })
        }
        Kind::Text => {
            if field(req, "echo").and_then(Value::as_bool) == Some(true) {
                return Err(HttpError::bad_request("'echo' is not supported"));
            }
            let prompt = match field(req, "prompt") {
                Some(Value::String(s)) => Prompt::Text(s.clone()),
                Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                    Prompt::Text(a[0].as_str().unwrap_or("").into())
                }
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => {
                    Prompt::Ids(a.iter().filter_map(Value::as_i64).collect())
                }
                _ => {
                    return Err(HttpError::bad_request(
                        "'prompt' must be a string or a list of token ids (one prompt)",
                    ));
                }
            };
            let logprobs = field(req, "logprobs").and_then(Value::as_u64);
            let mut sampling = sampling(req, &["max_tokens"])?;
            sampling.entry("max_tokens").or_insert(Value::from(16));
            Ok(Generation { prompt, stream, sampling, logprobs })
        }
    }
}

/// A fresh object id: `prefix` and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:024x}", rand::random::<u128>() >> 32)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn logprobs_json(kind: Kind, o: &Outcome) -> Value {
    if o.logprobs.is_empty() {
        return Value::Null;
    }
    let per: Vec<(Value, Vec<Value>)> = o
        .logprobs
        .iter()
        .enumerate()
        .map(|(i, m)| generation::token_logprobs(m, o.output_ids.get(i).copied()))
        .collect();
    match kind {
        Kind::Chat => {
            json!({ "content": per.into_iter().map(|(mut c, top)| { c["top_logprobs"] = Value::from(top); c }).collect::<Vec<_>>() })
        }
        Kind::Text => json!({
            "tokens": per.iter().map(|(c, _)| c["token"].clone()).collect::<Vec<_>>(),
            "token_logprobs": per.iter().map(|(c, _)| c["logprob"].clone()).collect::<Vec<_>>(),
            "top_logprobs": per.iter().map(|(_, top)| top.iter().map(|t| (t["token"].as_str().unwrap_or("").to_string(), t["logprob"].clone())).collect::<Map<_, _>>()).collect::<Vec<_>>(),
        }),
    }
}

fn choice(kind: Kind, o: &Outcome, streaming: bool) -> Value {
    let mut c = match (kind, streaming) {
        (Kind::Chat, false) => json!({ "index": 0, "message": { "role": "assistant", "content": o.text } }),
        (Kind::Chat, true) => json!({ "index": 0, "delta": { "content": o.text } }),
        (Kind::Text, _) => json!({ "index": 0, "text": o.text }),
    };
    c["finish_reason"] = o.finish_reason.clone().map_or(Value::Null, Value::String);
    c["logprobs"] = logprobs_json(kind, o);
    c
}

fn envelope(kind: Kind, id: &str, model: &str, created: u64, streaming: bool) -> Value {
    let object = match (kind, streaming) {
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
        (Kind::Text, _) => "text_completion",
    };
    json!({ "id": id, "object": object, "created": created, "model": model })
}

async fn complete(app: App, headers: HeaderMap, raw: Body, kind: Kind) -> Result<Response, OpenAiError> {
    let bytes = body::read(&headers, raw, app.body_limit).await?;
    let req: Map<String, Value> = body::json(&bytes)?;
    let model = field(&req, "model")
        .and_then(Value::as_str)
        .ok_or_else(|| HttpError::bad_request("'model' is required"))?
        .to_string();
    let g = parse(kind, &req)?;
    let loaded = app.core.repo.get(&model, "").map_err(ServerError::from)?;
    let mut core_req = generation::to_core(&loaded.spec, &g)?;
    crate::server::http::core::apply_session_header(&headers, &mut core_req)?;
    let id = new_id(if kind == Kind::Chat { "chatcmpl-" } else { "cmpl-" });
    let created = now();
    let mut responses = app.core.infer_stream(core_req);
    if !g.stream {
        let mut o = Outcome::default();
        while let Some(r) = responses.next().await {
            o.push(generation::read(&r?));
        }
        let mut body = envelope(kind, &id, &model, created, false);
        body["choices"] = json!([choice(kind, &o, false)]);
        if field(&req, "return_token_ids").and_then(Value::as_bool) == Some(true) {
            // vLLM's extension: the generated token ids (exactness checks compare ids, not text).
            body["choices"][0]["token_ids"] = json!(o.output_ids);
        }
        body["usage"] = o.usage();
        return Ok(Json(body).into_response());
    }
    let include_usage =
        req.get("stream_options").and_then(|s| s.get("include_usage")).and_then(Value::as_bool) == Some(true);
    // Errors before the first response (validation, overload) keep their HTTP status.
    let first = match responses.next().await {
        Some(r) => r?,
        None => return Err(HttpError::bad_request("the model sent no response").into()),
    };
    let head = envelope(kind, &id, &model, created, true);
    let events = async_stream(head, kind, first, responses, include_usage);
    Ok(Sse::new(events.map(|d| Ok::<_, std::convert::Infallible>(Event::default().data(d))))
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The SSE `data:` payloads of a streamed completion, ending with `[DONE]`.
fn async_stream(
    head: Value,
    kind: Kind,
    first: crate::proto::inference::ModelInferResponse,
    rest: crate::server::http::core::ResponseStream,
    include_usage: bool,
) -> impl futures::Stream<Item = String> + Send {
    let state = (Some(first), rest, Outcome::default(), false);
    let chunks = futures::stream::unfold(state, move |(mut first, mut rest, mut total, done)| {
        let head = head.clone();
        async move {
            if done {
                return None;
            }
            let next = match first.take() {
                Some(r) => Some(Ok(r)),
                None => rest.next().await,
            };
            match next {
                Some(Ok(r)) => {
                    let mut o = Outcome::default();
                    o.push(generation::read(&r));
                    total.push(generation::read(&r));
                    let mut chunk = head;
                    let mut c = choice(kind, &o, true);
                    if kind == Kind::Chat && total.text.len() == o.text.len() {
                        c["delta"]["role"] = Value::from("assistant");
                    }
                    chunk["choices"] = json!([c]);
                    Some((vec![chunk.to_string()], (None, rest, total, false)))
                }
                Some(Err(e)) => Some((
                    vec![json!({ "error": { "message": e.message, "type": "server_error" } }).to_string()],
                    (None, rest, total, true),
                )),
                None => {
                    let mut out = Vec::new();
                    if include_usage {
                        let mut u = head;
                        u["choices"] = json!([]);
                        u["usage"] = total.usage();
                        out.push(u.to_string());
                    }
                    out.push("[DONE]".to_string());
                    Some((out, (None, rest, total, true)))
                }
            }
        }
    });
    chunks.flat_map(futures::stream::iter)
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Response, OpenAiError> {
    complete(app, headers, raw, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn text(State(app): State<App>, headers: HeaderMap, raw: Body) -> Result<Response, OpenAiError> {
    complete(app, headers, raw, Kind::Text).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_request_maps_to_vllm_sampling_keys() {
        let req: Map<String, Value> = serde_json::from_value(json!({
            "model": "m", "messages": [{ "role": "developer", "content": [{ "type": "text", "text": "be brief" }] },
                                       { "role": "user", "content": "hi" }],
            "max_completion_tokens": 5, "temperature": 0, "top_p": 0.9, "seed": 7, "stop": "\n",
            "logprobs": true, "top_logprobs": 2, "stream": true
        }))
        .expect("object");
        let g = parse(Kind::Chat, &req).expect("parses");
        assert_eq!(
            g.prompt,
            Prompt::Messages(vec![
                json!({"role": "system", "content": "be brief"}),
                json!({"role": "user", "content": "hi"})
            ])
        );
        assert!(g.stream);
        assert_eq!(g.logprobs, Some(2));
        assert_eq!(
            Value::Object(g.sampling),
            json!({"max_tokens": 5, "temperature": 0, "top_p": 0.9, "seed": 7, "stop": ["\n"]})
        );
    }

    #[test]
    fn completion_defaults_and_refusals() {
        let req: Map<String, Value> =
            serde_json::from_value(json!({ "model": "m", "prompt": [1, 2, 3], "logprobs": 1 })).expect("object");
        let g = parse(Kind::Text, &req).expect("parses");
        assert_eq!(g.prompt, Prompt::Ids(vec![1, 2, 3]));
        assert_eq!(g.sampling["max_tokens"], 16);
        let req: Map<String, Value> =
            serde_json::from_value(json!({ "model": "m", "prompt": "x", "n": 2 })).expect("object");
        assert!(parse(Kind::Text, &req).expect_err("n=2").message.contains("'n' must be 1"));
    }

    #[test]
    fn outcome_usage_and_logprobs() {
        let mut o = Outcome::default();
        o.push(generation::Delta {
            text: "a".into(),
            prompt_tokens: Some(4),
            completion_tokens: Some(1),
            output_ids: vec![7],
            ..Default::default()
        });
        let mut lp = Map::new();
        lp.insert("7".into(), json!({ "logprob": -0.5, "rank": 1, "decoded_token": "a" }));
        lp.insert("3".into(), json!({ "logprob": -1.5, "rank": 2, "decoded_token": "b" }));
        o.push(generation::Delta {
            text: "b".into(),
            finish_reason: Some("length".into()),
            completion_tokens: Some(1),
            output_ids: vec![3],
            logprobs: vec![lp.clone(), lp],
            ..Default::default()
        });
        assert_eq!(o.text, "ab");
        assert_eq!(
            o.usage(),
            json!({ "prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6, "prompt_tokens_details": { "cached_tokens": 0 } })
        );
        let c = choice(Kind::Chat, &o, false);
        assert_eq!(c["finish_reason"], "length");
        assert_eq!(c["logprobs"]["content"][0]["token"], "a");
        assert_eq!(c["logprobs"]["content"][1]["token"], "b");
        assert_eq!(c["logprobs"]["content"][1]["top_logprobs"][0]["token"], "a");
    }
}
