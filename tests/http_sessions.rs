//! Conversation sessions over the HTTP front, with the built-in `tiny_decoder` (byte tokenizer,
//! template `<|role|>\ncontent\n` then `<|assistant|>\n`): the `x-session-id` header on the generate
//! extension and on chat completions (a turn prefills only its new tokens, and its tokens equal a
//! stateless request over the session's exact token history), and `/v1/responses` chained by
//! `previous_response_id` (cached tokens, exactness, forks, GET and DELETE ending the session).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::net::SocketAddr;

use common::http;
use common::*;
use serde_json::{Value, json};

const MODEL: &str = "tiny_decoder";

fn ids(v: &Value) -> Vec<u32> {
    let list = match v {
        Value::Array(a) => a.clone(),
        other => vec![other.clone()],
    };
    list.iter().map(|x| x.as_u64().unwrap_or_else(|| panic!("not a token id: {x}")) as u32).collect()
}

fn bytes(s: &str) -> Vec<u32> {
    s.bytes().map(u32::from).collect()
}

async fn post(addr: SocketAddr, path: &str, session: Option<&str>, body: &Value) -> Value {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(s) = session {
        headers.push(("x-session-id", s));
    }
    let r = http::send(addr, "POST", path, &headers, body.to_string().into_bytes()).await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// A generate-extension turn: (output ids, num_cached_tokens, num_input_tokens).
async fn generate(addr: SocketAddr, session: Option<&str>, prompt: &[u32]) -> (Vec<u32>, u64, u64) {
    let body = json!({
        "input_ids": prompt,
        "sampling_parameters": { "max_tokens": 6, "temperature": 0, "ignore_eos": true },
        "exclude_input_in_output": true,
        "return_output_ids": true,
        "return_num_cached_tokens": true,
        "return_num_input_tokens": true,
    });
    let r = post(addr, &format!("/v2/models/{MODEL}/generate"), session, &body).await;
    (ids(&r["output_ids"]), r["num_cached_tokens"].as_u64().unwrap(), r["num_input_tokens"].as_u64().unwrap())
}

/// A stateless `/v1/completions` over token ids: the generated ids.
async fn stateless(addr: SocketAddr, prompt: &[u32], max_tokens: u64) -> Vec<u32> {
    let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": true });
    ids(&post(addr, "/v1/completions", None, &body).await["choices"][0]["token_ids"])
}

#[tokio::test]
async fn session_header_on_the_generate_extension() {
    let w = start().await;
    let addr = w.http();
    let first = bytes("Hello");
    let (out1, cached1, _) = generate(addr, Some("gen-1"), &first).await;
    assert_eq!(out1.len(), 6);
    assert_eq!(cached1, 0);
    let second = bytes(" again");
    let (out2, cached2, input2) = generate(addr, Some("gen-1"), &second).await;
    let mut history: Vec<u32> = first.iter().chain(&out1).chain(&second).copied().collect();
    assert_eq!(input2, history.len() as u64, "num_input_tokens counts the session's history too");
    assert_eq!(cached2, (first.len() + out1.len() - 1) as u64, "every earlier token but the last sampled one");
    // The turn's tokens equal a stateless request over the same token history.
    let (alone, _, _) = generate(addr, None, &history).await;
    assert_eq!(out2, alone);
    history.extend(&out2);
    let listed = w.repo.get(MODEL, "").unwrap().batching.generative().unwrap().list_sessions().await;
    assert!(listed.iter().any(|s| s.id.to_string().contains("gen-1")), "{listed:?}");
    // The header and a differing sequence_id are refused (the one rule both fronts share).
    let body = json!({ "input_ids": [1], "parameters": { "sequence_id": "other" } });
    let r = http::send(
        addr,
        "POST",
        &format!("/v2/models/{MODEL}/generate"),
        &[("content-type", "application/json"), ("x-session-id", "gen-1")],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("name different sessions"), "{}", r.text());
}

#[tokio::test]
async fn session_header_on_chat_completions_appends_a_continuation() {
    let w = start().await;
    let addr = w.http();
    let chat = |content: &str, stream: bool| {
        json!({ "model": MODEL, "messages": [{ "role": "user", "content": content }], "max_tokens": 5,
                "temperature": 0, "return_token_ids": true, "stream": stream })
    };
    let t1 = post(addr, "/v1/chat/completions", Some("chat-1"), &chat("hi", false)).await;
    let out1 = ids(&t1["choices"][0]["token_ids"]);
    let opening = bytes("<|user|>\nhi\n<|assistant|>\n");
    assert_eq!(t1["usage"]["prompt_tokens"], opening.len() as u64);
    let t2 = post(addr, "/v1/chat/completions", Some("chat-1"), &chat("more", false)).await;
    // What "new" means: the template's text after an assistant answer, for the new messages only.
    let continuation = bytes("\n<|user|>\nmore\n<|assistant|>\n");
    let history: Vec<u32> = opening.iter().chain(&out1).chain(&continuation).copied().collect();
    assert_eq!(t2["usage"]["prompt_tokens"], history.len() as u64);
    assert_eq!(t2["usage"]["prompt_tokens_details"]["cached_tokens"], (opening.len() + out1.len() - 1) as u64);
    assert_eq!(ids(&t2["choices"][0]["token_ids"]), stateless(addr, &history, 5).await);
    // Streamed turns go through the same path; the usage chunk reports the cache.
    let mut body = chat("again", true);
    body["stream_options"] = json!({ "include_usage": true });
    let r = http::send(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json"), ("x-session-id", "chat-1")],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = http::sse_events(&r.body);
    let usage = events.iter().find(|e| !e["usage"].is_null()).expect("a usage chunk");
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= history.len() as u64);
}

async fn respond(addr: SocketAddr, input: &str, previous: Option<&str>) -> Value {
    let mut body = json!({ "model": MODEL, "input": input, "max_output_tokens": 5, "temperature": 0,
                           "return_token_ids": true });
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    post(addr, "/v1/responses", None, &body).await
}

#[tokio::test]
async fn responses_chain_reuses_the_session_and_forks_from_older_responses() {
    let w = start().await;
    let addr = w.http();
    let generative = w.repo.get(MODEL, "").unwrap().batching.generative().unwrap().clone();
    let r1 = respond(addr, "one", None).await;
    assert_eq!(r1["usage"]["input_tokens_details"]["cached_tokens"], 0);
    let total = |r: &Value| ids(&r["prompt_token_ids"]).len() + ids(&r["output_token_ids"]).len();
    let history = |r: &Value| -> Vec<u32> {
        ids(&r["prompt_token_ids"]).into_iter().chain(ids(&r["output_token_ids"])).collect()
    };
    let r2 = respond(addr, "two", r1["id"].as_str()).await;
    let r3 = respond(addr, "three", r2["id"].as_str()).await;
    for (prev, r) in [(&r1, &r2), (&r2, &r3)] {
        // The follow-up prefilled only its new tokens: the earlier conversation came from the session.
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], (total(prev) - 1) as u64, "{r}");
        let prompt = ids(&r["prompt_token_ids"]);
        assert_eq!(prompt[..total(prev)], history(prev)[..], "the session's tokens are never re-tokenized");
        assert_eq!(r["usage"]["input_tokens"], prompt.len() as u64);
    }
    // Turn 3's tokens equal a stateless request over the same token history.
    let out3 = ids(&r3["output_token_ids"]);
    assert_eq!(out3, stateless(addr, &ids(&r3["prompt_token_ids"]), out3.len() as u64).await);
    assert_eq!(generative.list_sessions().await.len(), 1, "one conversation, one session");

    // A follow-up of r2 (older than r3) forks: a new session from r2's tokens; r3's stays intact.
    let f = respond(addr, "branch", r2["id"].as_str()).await;
    assert_eq!(ids(&f["prompt_token_ids"])[..total(&r2)], history(&r2)[..]);
    assert_eq!(generative.list_sessions().await.len(), 2);
    let r4 = respond(addr, "four", r3["id"].as_str()).await;
    assert_eq!(r4["usage"]["input_tokens_details"]["cached_tokens"], (total(&r3) - 1) as u64);

    // GET returns the stored object; DELETE of a conversation's newest response ends its session.
    let got = http::get(addr, &format!("/v1/responses/{}", r4["id"].as_str().unwrap())).await;
    assert_eq!(got.json()["id"], r4["id"]);
    let del =
        http::send(addr, "DELETE", &format!("/v1/responses/{}", r4["id"].as_str().unwrap()), &[], Vec::new()).await;
    assert_eq!(del.json()["deleted"], true);
    assert_eq!(generative.list_sessions().await.len(), 1, "the branch's session remains");
    assert_eq!(http::get(addr, &format!("/v1/responses/{}", r4["id"].as_str().unwrap())).await.status, 404);
    // r3 is no longer any session's head: following it up forks from its tokens, still exact.
    let r5 = respond(addr, "five", r3["id"].as_str()).await;
    assert_eq!(ids(&r5["prompt_token_ids"])[..total(&r3)], history(&r3)[..]);
}
