//! Graceful drain: SIGTERM under concurrent load. Every request whose send completed before the
//! signal succeeds with its correct answer, the worker's success counters (scraped during the
//! drain) equal the clients' counts, open streams end with UNAVAILABLE, and the worker exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use safetensors::Dtype;

/// A BERT model `name` (the shared fixture's weights) whose lone requests wait `delay_us` for
/// batch-mates (0: none).
fn bert_model(root: &Path, name: &str, delay_us: u64) {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("1")).expect("mkdir");
    bert_fixture::write_checkpoint(&dir.join("1"), &bert_fixture::generate(9), Dtype::F32, "", true);
    let config = format!(
        r#"name: "{name}" backend: "cpu" max_batch_size: 64
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }},
        {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }},
         {{ name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} preferred_batch_size: [ 64 ] }}
"#
    );
    std::fs::write(dir.join("config.pbtxt"), config).expect("config");
}

/// The token ids of input `k` (3 to 8 tokens of the fixture's 100-word vocabulary).
fn ids(k: usize) -> Vec<i64> {
    (0..3 + k % 6).map(|j| ((k * 13 + j * 7) % 97 + 1) as i64).collect()
}

fn embed(model: &str, ids: &[i64]) -> ModelInferRequest {
    let bytes = |v: &[i64]| -> Bytes { v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into() };
    let t = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, ids.len() as i64],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![bytes(ids), bytes(&vec![1; ids.len()])],
        outputs: vec![InferRequestedOutputTensor { name: "sentence_embedding".into(), ..Default::default() }],
        ..Default::default()
    }
}

/// A model's `queue_depth` in `/capacity`.
async fn queued(metrics: &str, model: &str) -> u64 {
    let cap = capacity(metrics).await;
    cap["models"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["model"] == model))
        .and_then(|e| e["queue_depth"].as_u64())
        .unwrap_or(0)
}

/// A model's `neuron_worker_inference_request_success` in a `/metrics` page.
fn successes(page: &str, model: &str) -> u64 {
    let prefix = format!("neuron_worker_inference_request_success{{model=\"{model}\",version=\"1\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// A model's `neuron_worker_inference_request_failure` in a `/metrics` page, every reason summed.
fn failures(page: &str, model: &str) -> u64 {
    let prefix = format!("neuron_worker_inference_request_failure{{model=\"{model}\",");
    page.lines().filter(|l| l.starts_with(&prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// Waits (bounded) until `model` has `n` requests queued: their sends have completed.
async fn wait_queued(metrics: &str, model: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while queued(metrics, model).await != n {
        assert!(Instant::now() < deadline, "{model}: {} queued, expected {n}", queued(metrics, model).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// SIGTERM while 40 requests are confirmed queued (their sends completed: `/capacity` counts them)
/// and 8 clients keep sending: every confirmed request succeeds with the answer the worker gives
/// outside a drain; requests racing the signal either succeed with the right answer or are refused
/// with UNAVAILABLE; the worker's success counters, scraped during the drain (one more request is
/// still queued, so the worker is still up), equal the clients' counts; the worker exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_every_accepted_request_and_the_counters_agree() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_model(repo.path(), "fast", 0);
    bert_model(repo.path(), "held", 1_500_000);
    bert_model(repo.path(), "last", 6_000_000);
    let args: Vec<&OsStr> = vec![
        "--backend".as_ref(),
        "cpu".as_ref(),
        "--exit-timeout".as_ref(),
        "20".as_ref(),
        "--model-repository".as_ref(),
        repo.path().as_os_str(),
    ];
    let (mut worker, client) = spawn_worker(&args, &[]).await;
    let metrics = worker.metrics.clone();
    // What the worker answers outside a drain, one request at a time.
    let mut want = Vec::new();
    for k in 0..40 {
        let r = client.clone().model_infer(embed("fast", &ids(k))).await.expect("reference answer");
        want.push(bytes_f32(&r.into_inner().raw_output_contents[0]));
    }
    let want = Arc::new(want);
    let close =
        |got: &[f32], want: &[f32]| got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5);

    // Load racing the signal: each client stops sending once it sees the signal.
    let signalled = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut racing = Vec::new();
    for t in 0..8 {
        let (mut c, signalled, want, answered) = (client.clone(), signalled.clone(), want.clone(), answered.clone());
        racing.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for i in 0..100_000 {
                if signalled.load(Ordering::SeqCst) {
                    break;
                }
                let k = (t * 5 + i) % 40;
                match c.model_infer(embed("fast", &ids(k))).await {
                    Ok(r) => {
                        let got = bytes_f32(&r.into_inner().raw_output_contents[0]);
                        assert!(close(&got, &want[k]), "racing request {k}: wrong answer");
                        ok += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    // Sent as the signal came: refused at the connection, never accepted.
                    Err(e) if signalled.load(Ordering::SeqCst) && e.code() == tonic::Code::Unavailable => refused += 1,
                    Err(e) => panic!("a request sent before the signal failed: {e}"),
                }
            }
            (ok, refused)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.load(Ordering::SeqCst) < 64 {
        assert!(Instant::now() < deadline, "the racing clients got too few answers");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held: Vec<_> = (0..40)
        .map(|k| {
            let mut c = client.clone();
            tokio::spawn(async move { c.model_infer(embed("held", &ids(k))).await })
        })
        .collect();
    wait_queued(&metrics, "held", 40).await;
    let last = {
        let mut c = client.clone();
        tokio::spawn(async move { c.model_infer(embed("last", &ids(3))).await })
    };
    wait_queued(&metrics, "last", 1).await;

    signalled.store(true, Ordering::SeqCst);
    let status = Command::new("kill").args(["-TERM", &worker.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    for (k, h) in held.into_iter().enumerate() {
        let r = h.await.expect("join").unwrap_or_else(|e| panic!("accepted request {k} failed during the drain: {e}"));
        assert!(close(&bytes_f32(&r.into_inner().raw_output_contents[0]), &want[k]), "held request {k}: wrong answer");
    }
    let (mut fast_ok, mut refused) = (40u64, 0u64); // the reference answers
    for t in racing {
        let (ok, r) = t.await.expect("racing client");
        fast_ok += ok;
        refused += r;
    }
    // The worker is still up (one request queued until its delay runs out): its counters now.
    assert!(!last.is_finished(), "the last request finished before the counters were scraped");
    let page = http_get(&metrics, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert_eq!(successes(&page, "held"), 40, "held: server successes vs client");
    assert_eq!(successes(&page, "fast"), fast_ok, "fast: server successes vs client ({refused} refused)");
    // No request the server took in failed: every UNAVAILABLE a racing client saw was refused by
    // the transport before the server accepted it (a stream opened after the GOAWAY the drain
    // sends, or a new connection after the listener closed), never an accepted request lost.
    assert_eq!(failures(&page, "fast"), 0, "fast: no accepted request failed ({refused} refused)");
    assert_eq!(failures(&page, "held"), 0, "held: no accepted request failed");
    last.await.expect("join").expect("the last accepted request succeeds");
    let deadline = Instant::now() + Duration::from_secs(25);
    let code = loop {
        if let Some(s) = worker.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "worker did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "worker exited with {code:?}");
}

#[tokio::test]
async fn sigterm_ends_open_streams_with_unavailable_and_exits_zero() {
    let args: Vec<&OsStr> = vec!["--backend".as_ref(), "cpu".as_ref(), "--exit-timeout".as_ref(), "20".as_ref()];
    let (mut worker, mut client) = spawn_worker(&args, &[]).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut responses =
        client.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    for i in 0..2 {
        let mut r = fp32_request("linear", "INPUT0", vec![1, 64], &tagged_rows(i, 1));
        r.id = format!("s{i}");
        tx.send(r).await.expect("send");
        let m = responses.message().await.expect("response").expect("not ended");
        assert!(m.error_message.is_empty(), "{}", m.error_message);
    }
    // The client keeps its side of the stream open; the worker must not wait for it.
    let t0 = Instant::now();
    let status = Command::new("kill").args(["-TERM", &worker.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
    let end = responses.message().await;
    match end {
        Err(e) => assert_eq!(e.code(), tonic::Code::Unavailable, "{e}"),
        Ok(other) => panic!("expected UNAVAILABLE at drain, got {other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(s) = worker.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "worker did not exit while a client held a stream open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(code.success(), "worker exited with {code:?}");
    assert!(t0.elapsed() < Duration::from_secs(15));
    drop(tx);
}
