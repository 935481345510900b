//! Stored `/v1/responses` ids outlive a worker restart on the same `--session-store`: a worker
//! process answers a conversation (non-streamed and streamed turns), drains on SIGTERM, and a new
//! process on the same store answers `GET /v1/responses/{id}` for each, continues the restored
//! session in place from the last response (only the new input is prefilled, the answer equals a
//! stateless request over the same tokens), forks from an older one, and forgets deleted ids — on a
//! local store and on Redis (a real `redis-server`, see `common::redis`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::http;
use common::*;
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
