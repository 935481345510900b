//! Serving a generative request: tokenize the prompt, submit it to the model's generative policy,
//! and answer with one response (ModelInfer, or a non-streamed request) or one response per update
//! (ModelStreamInfer with `stream: true`, the last marked `triton_final_response`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::Status;

use super::error::ServerError;
use super::generate::{GenerateCall, Prompt, ResponseEncoder, decode_generate, set_final};
use crate::batching::BatchingError;
use crate::batching::generative::handle::GenerativeModel;
use crate::batching::generative::request::{GenerateRequest, GenerationError, UpdateReceiver};
use crate::proto::inference::{ModelInferRequest, ModelInferResponse, ModelStreamInferResponse};
use crate::repository::LoadedModel;

/// A submitted generation and what its responses need.
struct Started {
    call: GenerateCall,
    updates: UpdateReceiver,
    /// The prompt as text (prepended to a non-streamed `text_output` unless excluded).
    prompt_text: String,
    prompt_tokens: usize,
    generative: Arc<GenerativeModel>,
}

fn to_server(model: &str, e: GenerationError) -> ServerError {
    let model = model.to_string();
    ServerError::Batching(match e {
        GenerationError::TooLarge { reason } => BatchingError::TooLarge { model, reason },
        GenerationError::Backend(source) => BatchingError::Backend { model, source },
        GenerationError::Unavailable { reason } => BatchingError::Unavailable { model, reason },
        GenerationError::Held { holder, reason } => BatchingError::SessionHeld { model, holder, reason },
        GenerationError::Session { reason } => BatchingError::InvalidRequest { model, reason },
        GenerationError::SessionsFull { reason } => BatchingError::SlotsExhausted { model, capacity: 0, hint: reason },
    })
}

/// Whether `turn` continues a session already open (its prompt then renders as a continuation
/// and gets no beginning-of-sequence token). A header id opens its session implicitly, so whether
/// it is open is asked of the model (two first turns racing on one new id both render as openings).
async fn continues(generative: &GenerativeModel, call: &GenerateCall) -> bool {
    match &call.session {
        None => false,
        Some(_) if call.params.truncate_to == Some(0) => false,
        Some(t) if t.start => false,
        Some(t) if !t.implicit_start => true,
        Some(t) => generative.list_sessions().await.iter().any(|s| s.id == t.id),
    }
}

async fn start(
    model: &LoadedModel,
    generative: &Arc<GenerativeModel>,
    req: &mut ModelInferRequest,
    arrived: Instant,
) -> Result<Started, ServerError> {
    let call = decode_generate(req, generative.defaults())?;
    let continues = continues(generative, &call).await;
    let tok = generative.tokenizer();
    let invalid = |e: String| ServerError::InvalidRequest(format!("model '{}': {e}", model.spec.name));
    let (prompt, prompt_text) = match &call.prompt {
        Prompt::Text(t) => {
            (tok.encode(t, !continues).map_err(|e| invalid(format!("cannot tokenize text_input: {e}")))?, t.clone())
        }
        Prompt::Ids(ids) => (ids.clone(), tok.decode(ids)),
        Prompt::Messages(m) if continues => (
            super::chat_turn::continuation(tok.as_ref(), m, None).map_err(invalid)?,
            super::chat_turn::continuation_text(tok.as_ref(), m).map_err(invalid)?,
        ),
        Prompt::Messages(m) => {
            let text = tok
                .render_chat(m)
                .map_err(|e| invalid(format!("cannot render messages with the chat template: {e}")))?;
            (
                tok.encode(&text, false).map_err(|e| invalid(format!("cannot tokenize the rendered messages: {e}")))?,
                text,
            )
        }
    };
    let (tx, updates) = mpsc::unbounded_channel();
    let seed = call.params.seed.unwrap_or_else(rand::random);
    let prompt_tokens = prompt.len();
    let session = call.session.clone();
    generative.submit(GenerateRequest { prompt, params: call.params.clone(), seed, updates: tx, arrived, session })?;
    Ok(Started { call, updates, prompt_text, prompt_tokens, generative: generative.clone() })
}

fn named(mut resp: ModelInferResponse, model: &LoadedModel, id: &str) -> ModelInferResponse {
    resp.model_name = model.spec.name.clone();
    resp.model_version = model.version.to_string();
    resp.id = id.to_string();
    resp
}

/// Waits for the whole completion and returns it as one response.
async fn complete(model: &LoadedModel, mut s: Started, id: &str) -> Result<ModelInferResponse, ServerError> {
    let mut enc = ResponseEncoder::default();
    loop {
        match s.updates.recv().await {
            Some(Ok(u)) => {
                let done = u.finished.is_some();
                enc.push(u);
                if done {
                    break;
                }
            }
            Some(Err(e)) => return Err(to_server(&model.spec.name, e)),
            None => {
                return Err(to_server(
                    &model.spec.name,
                    GenerationError::Unavailable { reason: "the model stopped before the sequence finished".into() },
                ));
            }
        }
    }
    let prefix = if s.call.include_prompt { s.prompt_text.as_str() } else { "" };
    let tok = s.generative.tokenizer().clone();
    let resp = enc.take_response(&s.call, prefix, s.prompt_tokens, &|t| tok.decode(&[t]));
    Ok(named(resp, model, id))
}

/// ModelInfer on a generative model: the whole completion in one response.
pub async fn generate_unary(
    model: &LoadedModel,
    generative: &Arc<GenerativeModel>,
    mut req: ModelInferRequest,
) -> Result<ModelInferResponse, ServerError> {
    let arrived = Instant::now();
    let id = std::mem::take(&mut req.id);
    let started = start(model, generative, &mut req, arrived).await?;
    complete(model, started, &id).await
}

/// ModelStreamInfer on a generative model: responses go to `tx` (errors as `error_message`).
pub async fn generate_stream(
    model: &LoadedModel,
    generative: &Arc<GenerativeModel>,
    mut req: ModelInferRequest,
    tx: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
) {
    let arrived = Instant::now();
    let id = std::mem::take(&mut req.id);
    let error = |e: ServerError| {
        let mut resp = ModelInferResponse { id: id.clone(), ..Default::default() };
        // A session another worker holds: its id travels beside the in-band message.
        if let ServerError::Batching(BatchingError::SessionHeld { holder, .. }) = &e {
            let p = crate::proto::inference::InferParameter {
                parameter_choice: Some(crate::proto::inference::infer_parameter::ParameterChoice::StringParam(
                    holder.clone(),
                )),
            };
            resp.parameters.insert(super::error::SESSION_HOLDER.to_string(), p);
        }
        ModelStreamInferResponse { error_message: e.to_string(), infer_response: Some(resp) }
    };
    let ok = |resp: ModelInferResponse| ModelStreamInferResponse {
        error_message: String::new(),
        infer_response: Some(resp),
    };
    let mut s = match start(model, generative, &mut req, arrived).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Ok(error(e))).await;
            return;
        }
    };
    if !s.call.stream {
        let empty_final = s.call.empty_final_response;
        let msg = match complete(model, s, &id).await {
            Ok(mut resp) => {
                set_final(&mut resp, !empty_final);
                ok(resp)
            }
            Err(e) => error(e),
        };
        let _ = tx.send(Ok(msg)).await;
        if empty_final {
            let mut last = named(ModelInferResponse::default(), model, &id);
            set_final(&mut last, true);
            let _ = tx.send(Ok(ok(last))).await;
        }
        return;
    }
    let mut enc = ResponseEncoder::default();
    let tok = s.generative.tokenizer().clone();
    loop {
        let msg = match s.updates.recv().await {
            Some(Ok(u)) => {
                let done = u.finished.is_some();
                enc.push(u);
                let mut resp =
                    named(enc.take_response(&s.call, "", s.prompt_tokens, &|t| tok.decode(&[t])), model, &id);
                set_final(&mut resp, done && !s.call.empty_final_response);
                if tx.send(Ok(ok(resp))).await.is_err() {
                    return;
                }
                if !done {
                    continue;
                }
                if !s.call.empty_final_response {
                    return;
                }
                let mut last = named(ModelInferResponse::default(), model, &id);
                set_final(&mut last, true);
                ok(last)
            }
            Some(Err(e)) => error(to_server(&model.spec.name, e)),
            None => error(to_server(
                &model.spec.name,
                GenerationError::Unavailable { reason: "the model stopped before the sequence finished".into() },
            )),
        };
        let _ = tx.send(Ok(msg)).await;
        return;
    }
}
