//! A generation still running when the exit deadline comes is not lost: it ends with a last
//! response whose finish reason is `abort` (after the tokens it generated), within the exit
//! timeout, and its session is written to the store with those tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::generative::{is_final, text_request};
use neuron_worker::proto::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::sessions::{SequenceId, SessionStore};
use tokio_stream::StreamExt;

const MODEL: &str = "tiny_decoder";

/// A streamed turn of session 7 (START) of the built-in decoder that would run for a long time.
fn endless_turn() -> ModelInferRequest {
    let mut r = text_request(MODEL, "Once", true, r#"{"max_tokens": 30000, "ignore_eos": true}"#);
    let p = |c| InferParameter { parameter_choice: Some(c) };
    r.parameters.insert("sequence_id".into(), p(ParameterChoice::Uint64Param(7)));
    r.parameters.insert("sequence_start".into(), p(ParameterChoice::BoolParam(true)));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_running_at_the_deadline_ends_with_abort_and_its_session_is_stored() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
    let repo =
        Repository::new(None, BackendSelection::Cpu, ModelControlMode::None).with_session_store(Some(store.clone()));
    let repo = Arc::new(repo);
    repo.load_all().await.expect("repository loads");
    let exit_timeout = Duration::from_secs(3);
    let opts = neuron_worker::server::ServeOptions { exit_timeout, ..common::options() };
    let server = neuron_worker::server::start(opts, repo.clone()).await.expect("server starts");
    let w = common::TestWorker { server, repo };
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(endless_turn()).await.expect("send");
    let mut stream =
        c.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let mut ids: Vec<i32> = Vec::new();
    let mut finish = String::new();
    let read = |r: &neuron_worker::proto::inference::ModelInferResponse, name: &str| {
        r.outputs.iter().position(|o| o.name == name).map(|i| r.raw_output_contents[i].to_vec()).unwrap_or_default()
    };
    let first = stream.next().await.expect("a delta").expect("ok");
    assert!(first.error_message.is_empty(), "{}", first.error_message);
    let r = first.infer_response.expect("response");
    ids.extend(read(&r, "output_ids").chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])));

    let t0 = Instant::now();
    w.server.shutdown.cancel();
    loop {
        let msg = tokio::time::timeout(exit_timeout * 2, stream.next())
            .await
            .expect("a response before the exit timeout")
            .expect("the stream ends with a last response, not silently")
            .expect("no stream error");
        assert!(msg.error_message.is_empty(), "{}", msg.error_message);
        let r = msg.infer_response.expect("response");
        ids.extend(read(&r, "output_ids").chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        let f = read(&r, "finish_reason");
        if f.len() > 4 {
            finish = String::from_utf8_lossy(&f[4..]).into_owned();
        }
        if is_final(&r) {
            break;
        }
    }
    let cut_after = t0.elapsed();
    assert_eq!(finish, "abort", "the last response says the generation was cut short");
    assert!(cut_after < exit_timeout, "cut short after {cut_after:?}, past the {exit_timeout:?} exit timeout");
    assert!(ids.len() > 1 && ids.len() < 30000, "{} tokens", ids.len());
    let page = common::http_get(&metrics, "/metrics").await;
    let line = format!("neuron_worker_request_cut_short_total{{model=\"{MODEL}\",version=\"1\"}} 1");
    assert!(page.contains(&line), "{page}");
    drop(tx);
    drop(stream);
    w.server.wait().await.expect("the worker stops cleanly within the exit timeout");
    assert!(t0.elapsed() < exit_timeout + Duration::from_secs(1), "{:?}", t0.elapsed());

    // The session was written with the prompt and every token the client received.
    let blob = store.take(MODEL, 1, &SequenceId::Uint(7)).expect("store reads").expect("session 7 stored");
    assert_eq!(blob.steps, 1);
    let tokens: Vec<u32> =
        blob.state[0].data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let generated: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
    assert!(tokens.ends_with(&generated), "stored {} tokens, {} generated", tokens.len(), generated.len());
    assert_eq!(tokens.len(), generated.len() + "Once".len() + 1, "prompt (BOS + 4 bytes) + generated");
}
