//! `POST /v1/responses` with `stream: true`: OpenAI's Responses streaming as server-sent events
//! (`event:` the type, `data:` the JSON, each with a `sequence_number` from 0): `response.created`,
//! `response.in_progress`, `response.output_item.added`, `response.content_part.added`, one
//! `response.output_text.delta` per model response carrying text, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`, then `response.completed` (or
//! `response.incomplete` when `max_output_tokens` cut the answer, as OpenAI does) carrying the
//! finished response with its usage. The turn runs in the same session path as a non-streamed one
//! and its response is stored (and chainable by `previous_response_id`) before the last event is
//! sent. Errors before the first token keep their HTTP status; later ones become an `error` event
//! then `response.failed`. A client that goes away mid-stream drops the stream: the generation is
//! cancelled, no response is stored, and the turn's session is ended; the response it followed up
//! stays stored, and a follow-up of it then forks from its exact tokens.

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};

use super::generation::{self, Outcome};
use super::responses::{Prepared, message_item, text_part};
use crate::proto::inference::ModelInferResponse;
use crate::server::http::HttpError;
use crate::server::http::core::ResponseStream;

/// Where a stream is.
enum Phase {
    /// Nothing sent yet; the first model response is in hand.
    Start(Box<ModelInferResponse>),
    /// Text deltas are flowing.
    Deltas,
    /// The last event was sent.
    Done,
}

/// A running streamed response.
struct Run {
    /// `None` once the response was finished (stored).
    p: Option<Prepared>,
    rest: ResponseStream,
    total: Outcome,
    seq: u64,
    phase: Phase,
    msg_id: String,
}

impl Run {
    /// One SSE event of `kind` with `fields` and the next sequence number.
    fn event(&mut self, kind: &str, mut fields: Value) -> Event {
        fields["type"] = json!(kind);
        fields["sequence_number"] = json!(self.seq);
        self.seq += 1;
        Event::default().event(kind).data(fields.to_string())
    }

    /// The text part's location, shared by the part's events.
    fn at(&self) -> Value {
        json!({ "item_id": self.msg_id, "output_index": 0, "content_index": 0 })
    }

    /// A delta event for one model response (none when it carries no text).
    fn delta(&mut self, r: &ModelInferResponse) -> Option<Event> {
        let d = generation::read(r);
        let text = d.text.clone();
        self.total.push(d);
        if text.is_empty() {
            return None;
        }
        let mut f = self.at();
        f["delta"] = json!(text);
        f["logprobs"] = json!([]);
        Some(self.event("response.output_text.delta", f))
    }

    /// The events that open the stream.
    fn opening(&mut self, p: &Prepared, first: &ModelInferResponse) -> Vec<Event> {
        let mut out = vec![
            self.event("response.created", json!({ "response": p.object("in_progress") })),
            self.event("response.in_progress", json!({ "response": p.object("in_progress") })),
        ];
        let mut item = message_item(&self.msg_id, "in_progress", "");
        item["content"] = json!([]);
        out.push(self.event("response.output_item.added", json!({ "output_index": 0, "item": item })));
        let mut f = self.at();
        f["part"] = text_part("");
        out.push(self.event("response.content_part.added", f));
        out.extend(self.delta(first));
        out
    }

    /// The closing events once the model is done: the text, part and item done, then the stored
    /// response.
    async fn closing(&mut self) -> Vec<Event> {
        let text = self.total.text.clone();
        let mut out = Vec::new();
        let mut f = self.at();
        f["text"] = json!(text);
        f["logprobs"] = json!([]);
        out.push(self.event("response.output_text.done", f));
        let mut f = self.at();
        f["part"] = text_part(&text);
        out.push(self.event("response.content_part.done", f));
        let item = message_item(&self.msg_id, "completed", &text);
        out.push(self.event("response.output_item.done", json!({ "output_index": 0, "item": item })));
        let Some(p) = self.p.take() else { return out };
        let body = p.finish(&self.total).await;
        let kind = if body["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
        out.push(self.event(kind, json!({ "response": body })));
        out
    }

    /// The events for a failure after the stream started (the turn is not stored).
    fn failure(&mut self, e: &HttpError) -> Vec<Event> {
        let mut out =
            vec![self.event("error", json!({ "code": e.openai_type(), "message": e.message, "param": null }))];
        if let Some(p) = self.p.take() {
            let mut body = p.failed(e);
            body["output"] = json!([message_item(&self.msg_id, "incomplete", &self.total.text)]);
            out.push(self.event("response.failed", json!({ "response": body })));
            // Dropping `p` ends the turn's session: no stored response continues it.
        }
        out
    }

    /// The next batch of events; `None` once done.
    async fn step(mut self) -> Option<(Vec<Event>, Run)> {
        match std::mem::replace(&mut self.phase, Phase::Deltas) {
            Phase::Done => None,
            Phase::Start(first) => {
                let p = self.p.take()?;
                let out = self.opening(&p, &first);
                self.p = Some(p);
                Some((out, self))
            }
            Phase::Deltas => {
                let out = match self.rest.next().await {
                    Some(Ok(r)) => self.delta(&r).into_iter().collect(),
                    Some(Err(e)) => {
                        self.phase = Phase::Done;
                        self.failure(&e)
                    }
                    None => {
                        self.phase = Phase::Done;
                        self.closing().await
                    }
                };
                Some((out, self))
            }
        }
    }
}

/// Runs `p` streamed and answers with its events.
pub(super) async fn respond(p: Prepared) -> Result<Response, HttpError> {
    let mut rest = p.start(true)?;
    // Errors before the first response (validation, overload, a session held elsewhere) keep
    // their HTTP status; dropping `p` then ends the turn's session.
    let first = match rest.next().await {
        Some(r) => r?,
        None => {
            return Err(HttpError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "the model ended the generation without a response",
            ));
        }
    };
    let msg_id = p.msg_id.clone();
    let phase = Phase::Start(Box::new(first));
    let run = Run { p: Some(p), rest, total: Outcome::default(), seq: 0, phase, msg_id };
    let events =
        futures::stream::unfold(run, Run::step).flat_map(futures::stream::iter).map(Ok::<_, std::convert::Infallible>);
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
