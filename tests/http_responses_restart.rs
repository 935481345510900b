//! Stored `/v1/responses` ids outlive a worker restart on the same `--session-store`: a worker
//! process answers a conversation (non-streamed and streamed turns), drains on SIGTERM, and a new
//! process on the same store answers `GET /v1/responses/{id}` for each, continues the restored
//! session in place from the last response (only the new input is prefilled, the answer equals a
//! stateless request over the same tokens), forks from an older one, and forgets deleted ids — on a
//! local store and on Redis (a real `redis-server`, see `common::redis`); and a streamed response
//! still generating at SIGTERM ends within the exit timeout as `response.incomplete` (reason
//! `worker_shutdown`), stored with its session, and is continued after the restart.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::Command;
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

fn history(r: &Value) -> Vec<u64> {
    ids(&r["prompt_token_ids"]).into_iter().chain(ids(&r["output_token_ids"])).collect()
}

fn request(input: &str, previous: Option<&str>, stream: bool) -> Value {
    let mut body = json!({ "model": MODEL, "input": input, "max_output_tokens": 6, "temperature": 0,
                           "return_token_ids": true, "stream": stream });
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    body
}

async fn respond(addr: SocketAddr, input: &str, previous: Option<&str>) -> Value {
    let r = http::post_json(addr, "/v1/responses", &request(input, previous, false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// A streamed turn's finished response (its last event).
async fn respond_streamed(addr: SocketAddr, input: &str, previous: Option<&str>) -> Value {
    let r = http::post_json(addr, "/v1/responses", &request(input, previous, true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let last = http::sse_events(&r.body).pop().expect("events");
    assert!(matches!(last["type"].as_str(), Some("response.completed" | "response.incomplete")), "{last}");
    last["response"].clone()
}

async fn stateless(addr: SocketAddr, prompt: &[u64], max_tokens: usize) -> Vec<u64> {
    let body = json!({ "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": true });
    let r = http::post_json(addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    ids(&r.json()["choices"][0]["token_ids"])
}

/// SIGTERM, then a bounded wait for exit 0.
async fn stop(mut w: SpawnedWorker) {
    let status = Command::new("kill").args(["-TERM", &w.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = w.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "worker did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "worker exited with {code:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_ids_survive_a_drain_and_restart_with_a_local_session_store() {
    let dir = tempfile::tempdir().expect("tmp");
    restart_scenario(dir.path().as_os_str()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_ids_survive_a_drain_and_restart_with_a_redis_session_store() {
    let Some(server) = common::redis::start() else { return };
    restart_scenario(server.url.as_ref()).await;
}

async fn restart_scenario(store: &OsStr) {
    let args: Vec<&OsStr> = vec!["--backend".as_ref(), "cpu".as_ref(), "--session-store".as_ref(), store];
    let (w, _) = spawn_worker(&args, &[]).await;
    let addr: SocketAddr = w.http.parse().unwrap();
    let r1 = respond(addr, "one", None).await;
    let r2 = respond(addr, "two", r1["id"].as_str()).await;
    let r3 = respond_streamed(addr, "three", r2["id"].as_str()).await;
    let gone = respond(addr, "other", None).await;
    let del = http::send(addr, "DELETE", &format!("/v1/responses/{}", gone["id"].as_str().unwrap()), &[], vec![]).await;
    assert_eq!(del.status, 200, "{}", del.text());
    stop(w).await;

    let (w, _) = spawn_worker(&args, &[]).await;
    let addr: SocketAddr = w.http.parse().unwrap();
    for r in [&r1, &r2, &r3] {
        let got = http::get(addr, &format!("/v1/responses/{}", r["id"].as_str().unwrap())).await;
        assert_eq!(got.status, 200, "{}: {}", r["id"], got.text());
        assert_eq!(got.json(), *r, "the stored object, as answered before the restart");
    }
    let lost = http::get(addr, &format!("/v1/responses/{}", gone["id"].as_str().unwrap())).await;
    assert_eq!(lost.status, 404, "a deleted response stays deleted");

    // The last response continues the restored session in place: only the new input is prefilled.
    let r4 = respond(addr, "four", r3["id"].as_str()).await;
    assert_eq!(ids(&r4["prompt_token_ids"])[..history(&r3).len()], history(&r3)[..]);
    assert_eq!(r4["usage"]["input_tokens_details"]["cached_tokens"], json!(history(&r3).len() - 1), "{r4}");
    let out4 = ids(&r4["output_token_ids"]);
    assert_eq!(out4, stateless(addr, &ids(&r4["prompt_token_ids"]), out4.len()).await);
    // An older response forks from its exact tokens.
    let f = respond(addr, "branch", r1["id"].as_str()).await;
    assert_eq!(ids(&f["prompt_token_ids"])[..history(&r1).len()], history(&r1)[..]);
    stop(w).await;
}

/// The (type, data) of every complete SSE event in `seen`.
fn events(seen: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(seen);
    let complete = &text[..text.rfind("\n\n").map_or(0, |i| i + 2)];
    http::sse_events(complete.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_running_at_sigterm_is_cut_short_stored_and_continued_after_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let args: Vec<&OsStr> = vec![
        "--backend".as_ref(),
        "cpu".as_ref(),
        "--session-store".as_ref(),
        dir.path().as_os_str(),
        "--exit-timeout".as_ref(),
        "3".as_ref(),
    ];
    let (w, _) = spawn_worker(&args, &[]).await;
    let addr: SocketAddr = w.http.parse().unwrap();
    let r1 = respond(addr, "one", None).await;
    // A streamed follow-up that would run for a long time (greedy on this model runs to the limit).
    let mut body = request("Talk.", r1["id"].as_str(), true);
    body["max_output_tokens"] = json!(30000);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
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
    let mut signalled = None;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), resp.body_mut().frame()).await.expect("bounded");
        let Some(frame) = frame else { break };
        if let Ok(data) = frame.expect("the stream is not cut").into_data() {
            seen.extend_from_slice(&data);
        }
        // SIGTERM once text is flowing.
        if signalled.is_none() && events(&seen).iter().any(|e| e["type"] == "response.output_text.delta") {
            let pid = w.child.id().to_string();
            assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
            signalled = Some(Instant::now());
        }
    }
    let signalled = signalled.expect("text flowed before the stream ended");
    assert!(signalled.elapsed() < Duration::from_secs(3), "the stream ended within the exit timeout");
    let evs = events(&seen);
    let last = evs.last().expect("events");
    assert_eq!(last["type"], "response.incomplete", "{last}");
    let cut = last["response"].clone();
    assert_eq!(cut["incomplete_details"]["reason"], "worker_shutdown", "the answer says it was cut short");
    let deltas: String = evs.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(cut["output"][0]["content"][0]["text"], json!(deltas));
    let n = ids(&cut["output_token_ids"]).len();
    assert!(n > 0 && n < 30000, "{n} tokens");
    stop(w).await;

    // After the restart the cut-short response is known and its session continues in place.
    let (w, _) = spawn_worker(&args, &[]).await;
    let addr: SocketAddr = w.http.parse().unwrap();
    let got = http::get(addr, &format!("/v1/responses/{}", cut["id"].as_str().unwrap())).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.json(), cut);
    let next = respond(addr, "Go on.", cut["id"].as_str()).await;
    assert_eq!(ids(&next["prompt_token_ids"])[..history(&cut).len()], history(&cut)[..]);
    assert_eq!(next["usage"]["input_tokens_details"]["cached_tokens"], json!(history(&cut).len() - 1), "{next}");
    stop(w).await;
}
