//! Streamed `/v1/responses` over raw HTTP with the built-in `tiny_decoder`: the event sequence
//! (types, `event:` names, sequence numbers, ids), the concatenated deltas equal to the
//! non-streamed answer of the same seeded request, the streamed response stored and chainable by
//! `previous_response_id` exactly as a non-streamed one (in either direction), errors before the
//! first token answered with their HTTP status, and a client going away mid-stream leaving no
//! session behind and the response it followed up usable.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::http;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const MODEL: &str = "tiny_decoder";

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

fn request(input: &str, previous: Option<&str>, stream: bool) -> Value {
    let mut body = json!({ "model": MODEL, "input": input, "max_output_tokens": 12, "temperature": 0.9,
                           "seed": 11, "return_token_ids": true, "stream": stream });
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    body
}

async fn respond(addr: SocketAddr, body: &Value) -> Value {
    let r = http::post_json(addr, "/v1/responses", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The (event name, data) pairs of an SSE body.
fn events(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8_lossy(body);
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event:") {
                name = Some(n.trim().to_string());
            } else if let Some(d) = line.strip_prefix("data:") {
                data = Some(serde_json::from_str::<Value>(d.trim()).unwrap_or_else(|e| panic!("{e}: {d}")));
            }
        }
        if let (Some(n), Some(d)) = (name, data) {
            out.push((n, d));
        }
    }
    out
}

/// A streamed turn: its events (checked for shape and order) and the finished response.
async fn stream(addr: SocketAddr, body: &Value) -> (Vec<Value>, Value) {
    let r = http::post_json(addr, "/v1/responses", body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    let evs = events(&r.body);
    for (i, (name, data)) in evs.iter().enumerate() {
        assert_eq!(data["type"], json!(name), "the event name is the data's type");
        assert_eq!(data["sequence_number"], json!(i), "sequence numbers count from 0: {data}");
    }
    let types: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    let n = types.len();
    assert!(n >= 9, "{types:?}");
    assert_eq!(
        types[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    assert!(types[4..n - 4].iter().all(|t| *t == "response.output_text.delta"), "{types:?}");
    assert_eq!(
        types[n - 4..n - 1],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    );
    let last = &evs[n - 1].1;
    let done = last["response"].clone();
    let want = if done["status"] == "incomplete" { "response.incomplete" } else { "response.completed" };
    assert_eq!(types[n - 1], want, "{done}");
    let data: Vec<Value> = evs.into_iter().map(|(_, d)| d).collect();
    // One response id throughout; one output item and part, addressed alike by every part event.
    let id = &data[0]["response"]["id"];
    assert_eq!(data[0]["response"]["status"], "in_progress");
    assert_eq!(data[1]["response"]["id"], *id);
    assert_eq!(done["id"], *id);
    let item_id = &data[2]["item"]["id"];
    assert_eq!(data[2]["item"]["status"], "in_progress");
    for d in &data[3..n - 1] {
        if d["type"] != "response.output_item.done" {
            assert_eq!(d["item_id"], *item_id, "{d}");
            assert_eq!((d["output_index"].as_u64(), d["content_index"].as_u64()), (Some(0), Some(0)));
        }
    }
    let deltas: String = data[4..n - 4].iter().map(|d| d["delta"].as_str().unwrap()).collect();
    assert_eq!(data[n - 4]["text"], json!(deltas));
    assert_eq!(data[n - 3]["part"]["text"], json!(deltas));
    assert_eq!(data[n - 2]["item"]["content"][0]["text"], json!(deltas));
    assert_eq!(done["output"][0]["id"], *item_id);
    assert_eq!(done["output"][0]["content"][0]["text"], json!(deltas), "the stored text is the streamed text");
    (data, done)
}

fn text(r: &Value) -> &str {
    r["output"][0]["content"][0]["text"].as_str().unwrap()
}

fn history(r: &Value) -> Vec<u64> {
    ids(&r["prompt_token_ids"]).into_iter().chain(ids(&r["output_token_ids"])).collect()
}

#[tokio::test]
async fn streamed_response_equals_the_non_streamed_one_and_chains() {
    let w = start().await;
    let addr = w.http();
    let generative = w.repo.get(MODEL, "").unwrap().batching.generative().unwrap().clone();
    let whole = respond(addr, &request("Tell me a story.", None, false)).await;
    let (_, streamed) = stream(addr, &request("Tell me a story.", None, true)).await;
    assert!(!text(&whole).is_empty());
    assert_eq!(text(&streamed), text(&whole), "same seeded request, same answer");
    assert_eq!(streamed["output_token_ids"], whole["output_token_ids"]);
    for k in ["input_tokens", "output_tokens", "total_tokens"] {
        assert_eq!(streamed["usage"][k], whole["usage"][k], "{k}");
    }
    // The second run of the same prompt found its full K/V blocks in the prefix cache.
    let cached = streamed["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached < streamed["usage"]["input_tokens"].as_u64().unwrap());
    assert_ne!(streamed["id"], whole["id"]);

    // The streamed response is stored: GET answers it, and a follow-up continues its session.
    let sid = streamed["id"].as_str().unwrap();
    assert_eq!(http::get(addr, &format!("/v1/responses/{sid}")).await.json(), streamed);
    let sessions = generative.list_sessions().await.len();
    let next = respond(addr, &request("And then?", Some(sid), false)).await;
    assert_eq!(next["usage"]["input_tokens_details"]["cached_tokens"], json!(history(&streamed).len() - 1));
    assert_eq!(ids(&next["prompt_token_ids"])[..history(&streamed).len()], history(&streamed)[..]);
    assert_eq!(generative.list_sessions().await.len(), sessions, "continued in place, no new session");

    // A streamed follow-up of a stored response reports the reused tokens in its final event, and
    // equals its non-streamed twin (a fork from the same response, so both start alike).
    let (_, s2) = stream(addr, &request("Go on.", next["id"].as_str(), true)).await;
    assert_eq!(s2["previous_response_id"], next["id"]);
    assert_eq!(s2["usage"]["input_tokens_details"]["cached_tokens"], json!(history(&next).len() - 1));
    let twin = respond(addr, &request("Go on.", next["id"].as_str(), false)).await;
    assert_eq!(text(&twin), text(&s2));
    assert_eq!(twin["prompt_token_ids"], s2["prompt_token_ids"]);
    // And chains once more, streamed.
    let (_, s3) = stream(addr, &request("The end.", s2["id"].as_str(), true)).await;
    assert_eq!(s3["usage"]["input_tokens_details"]["cached_tokens"], json!(history(&s2).len() - 1));
}

#[tokio::test]
async fn streamed_errors_before_the_first_token_keep_their_status() {
    let w = start().await;
    let addr = w.http();
    let r = http::post_json(addr, "/v1/responses", &request("x", Some("resp_nope"), true)).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("resp_nope"));
    let mut body = request("x", None, true);
    body["model"] = json!("linear");
    let r = http::post_json(addr, "/v1/responses", &body).await;
    assert_eq!(r.status, 400, "{}", r.text());
}

/// Reads a streamed turn until its `response.created` event, then drops the connection: the
/// response id.
async fn start_and_hang_up(addr: SocketAddr, body: &Value) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/responses")
        .header("host", "127.0.0.1")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let mut resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut seen = Vec::new();
    let id = loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), resp.body_mut().frame()).await.unwrap();
        let frame = frame.expect("the stream goes on").unwrap();
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
        if let Some((_, created)) = events(&seen).into_iter().find(|(n, _)| n == "response.created") {
            break created["response"]["id"].as_str().unwrap().to_string();
        }
    };
    drop(resp);
    drop(sender);
    conn.abort();
    id
}

#[tokio::test]
async fn a_client_leaving_mid_stream_leaves_no_session_and_the_parent_usable() {
    let w = start().await;
    let addr = w.http();
    let generative = w.repo.get(MODEL, "").unwrap().batching.generative().unwrap().clone();
    let first = respond(addr, &request("Hello.", None, false)).await;
    assert_eq!(generative.list_sessions().await.len(), 1);
    // A follow-up that would run for a long time (greedy on this model runs to the token limit).
    let mut long = request("Talk.", first["id"].as_str(), true);
    long["max_output_tokens"] = json!(30000);
    long["temperature"] = json!(0);
    let gone = start_and_hang_up(addr, &long).await;
    // The generation is cancelled and the session it ran in ended: bounded wait on the condition.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !generative.list_sessions().await.is_empty() {
        assert!(Instant::now() < deadline, "the abandoned turn's session was not ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(http::get(addr, &format!("/v1/responses/{gone}")).await.status, 404, "an abandoned turn is not stored");
    // The parent is still stored; following it up again forks from its exact tokens.
    let again = respond(addr, &request("Talk.", first["id"].as_str(), false)).await;
    assert_eq!(ids(&again["prompt_token_ids"])[..history(&first).len()], history(&first)[..]);
    assert_eq!(again["usage"]["input_tokens"], json!(ids(&again["prompt_token_ids"]).len()));
    assert_eq!(generative.list_sessions().await.len(), 1);
}
