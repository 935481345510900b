//! `ModelStreamInfer`'s loop: reads a stream's requests, runs each through the inference core and
//! answers in-band, with the stream's memory bounded and its errors its own.
//!
//! - Backpressure: at most [`STREAM_MAX_IN_FLIGHT`] requests of one stream are executing or hold a
//!   response not yet handed to the transport, plus [`STREAM_UNSENT_RESPONSES`] handed over and
//!   not yet sent. Past that the loop stops reading the stream (HTTP/2 flow control then holds
//!   the client back) until the client reads responses; a pause is logged once.
//! - In-band errors: a request message that does not decode or exceeds `--max-message-size`
//!   ([`StreamMessage::Refused`]) and a response too large to send each get an error response for
//!   that request only (with a log line); the stream stays open.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::error::ServerError;
use super::inference::InferenceService;
use super::stream_route::StreamMessage;
use crate::proto::inference::{ModelInferResponse, ModelStreamInferResponse};
use crate::repository::Repository;

/// What a `ModelStreamInfer` call answers with.
pub(crate) type ResponseStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

/// Requests of one stream executing, or holding a response not yet handed to the transport.
pub const STREAM_MAX_IN_FLIGHT: usize = 32;

/// Responses of one stream handed to the transport and not yet sent.
pub const STREAM_UNSENT_RESPONSES: usize = 16;

/// `resp`, or an in-band error in its place when it is larger than `max` bytes (the request is
/// then counted as failed, not as a success).
pub(crate) fn bound_response(
    repo: &Repository,
    resp: ModelInferResponse,
    max: usize,
) -> Result<ModelInferResponse, ServerError> {
    let bytes = resp.encoded_len();
    if bytes <= max {
        return Ok(resp);
    }
    if let Ok(model) = repo.get(&resp.model_name, &resp.model_version) {
        model.batching.stats().record_response_refused();
    }
    tracing::warn!(model = %resp.model_name, bytes, limit = max, "response larger than --max-message-size refused");
    Err(ServerError::ResponseTooLarge { model: resp.model_name, bytes, limit: max })
}

impl InferenceService {
    /// Serves one `ModelStreamInfer` stream (see the module doc); `session` (the stream's
    /// `x-session-id`) names the session of every generation request on it.
    pub(crate) fn serve_stream<S>(&self, mut incoming: S, session: Option<String>) -> ResponseStream
    where
        S: Stream<Item = Result<StreamMessage, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<ModelStreamInferResponse, Status>>(STREAM_UNSENT_RESPONSES);
        let (repo, draining, max) = (self.repo.clone(), self.draining.clone(), self.max_message_size);
        tokio::spawn(async move {
            let in_flight = tokio_util::task::TaskTracker::new();
            let permits = Arc::new(Semaphore::new(STREAM_MAX_IN_FLIGHT));
            // Responses of models with `preserve_ordering` wait for the previous such response.
            let mut previous: Option<oneshot::Receiver<()>> = None;
            let mut ended_by: Option<Status> = None;
            loop {
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        tracing::warn!(
                            in_flight = STREAM_MAX_IN_FLIGHT,
                            "stream: responses are not being read; reading its requests paused until they are"
                        );
                        tokio::select! {
                            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                            _ = draining.cancelled() => break,
                            _ = tx.closed() => break,
                        }
                    }
                };
                let msg = tokio::select! {
                    m = incoming.next() => m,
                    _ = draining.cancelled() => None,
                    _ = tx.closed() => None,
                };
                let mut req = match msg {
                    Some(Ok(StreamMessage::Request(r))) => *r,
                    Some(Ok(StreamMessage::Refused(why))) => {
                        tracing::warn!(reason = %why, "stream: request message refused in-band; the stream stays open");
                        let tx = tx.clone();
                        let resp = ModelStreamInferResponse {
                            error_message: why,
                            infer_response: Some(ModelInferResponse::default()),
                        };
                        in_flight.spawn(async move {
                            let _ = tx.send(Ok(resp)).await;
                            drop(permit);
                        });
                        continue;
                    }
                    Some(Err(status)) => {
                        tracing::warn!(%status, "stream: reading the request stream failed; it ends once accepted requests are answered");
                        ended_by = Some(status);
                        break;
                    }
                    None => break,
                };
                if let Some(id) = &session {
                    super::session_turn::apply_session_header(&mut req, id);
                }
                let ordered = repo
                    .get(&req.model_name, &req.model_version)
                    .map(|m| m.spec.dynamic.preserve_ordering)
                    .unwrap_or(false);
                let (done_tx, done_rx) = oneshot::channel();
                let wait = if ordered { previous.replace(done_rx) } else { None };
                let (repo, tx) = (repo.clone(), tx.clone());
                // Generative models answer with one response per update (decoupled).
                if let Ok(model) = repo.get(&req.model_name, &req.model_version)
                    && let Some(g) = model.batching.generative().cloned()
                {
                    in_flight.spawn(async move {
                        tokio::select! {
                            _ = super::generate_stream::generate_stream(&model, &g, req, &tx) => {}
                            _ = tx.closed() => {}
                        }
                        let _ = done_tx.send(());
                        drop(permit);
                    });
                    continue;
                }
                in_flight.spawn(async move {
                    let id = req.id.clone();
                    let work = async {
                        let result = Self::infer(&repo, req).await.and_then(|r| bound_response(&repo, r, max));
                        if let Some(w) = wait {
                            let _ = w.await;
                        }
                        let msg = match result {
                            Ok(resp) => {
                                ModelStreamInferResponse { error_message: String::new(), infer_response: Some(resp) }
                            }
                            Err(e) => ModelStreamInferResponse {
                                error_message: e.to_string(),
                                infer_response: Some(ModelInferResponse { id, ..Default::default() }),
                            },
                        };
                        let _ = tx.send(Ok(msg)).await;
                    };
                    // A client that closes the stream cancels what it sent: dropping the request's
                    // future drops its reply channel, and the scheduler skips it.
                    tokio::select! {
                        _ = work => {}
                        _ = tx.closed() => {}
                    }
                    let _ = done_tx.send(());
                    drop(permit);
                });
            }
            // Every accepted request is answered; then a draining worker ends the stream.
            in_flight.close();
            in_flight.wait().await;
            if draining.is_cancelled() {
                let _ = tx.send(Err(ServerError::Draining.into())).await;
            } else if let Some(status) = ended_by {
                let _ = tx.send(Err(status)).await;
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}
