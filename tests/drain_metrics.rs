//! The metrics endpoint during a drain: `/metrics` and `/capacity` keep answering until the
//! worker exits, so the final counters can be scraped.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::repository::ModelControlMode;
use safetensors::Dtype;

fn request() -> ModelInferRequest {
    let v: Vec<u8> = [2i64, 7, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
    let m: Vec<u8> = [1i64; 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = |n: &str| InferInputTensor {
        name: n.into(),
        datatype: "INT64".into(),
        shape: vec![1, 3],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "slow".into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![v.into(), m.into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_capacity_answer_during_the_drain() {
    let repo = tempfile::tempdir().expect("tmp");
    let dir = repo.path().join("slow");
    std::fs::create_dir_all(dir.join("1")).expect("mkdir");
    write_checkpoint(&dir.join("1"), &generate(9), Dtype::F32, "", true);
    // A request waits up to 1.5 s for batch-mates: the drain has something to finish.
    std::fs::write(
        dir.join("config.pbtxt"),
        r#"name: "slow" backend: "cpu" max_batch_size: 8
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] },
         { name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1500000 }
"#,
    )
    .expect("config");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let in_flight = tokio::spawn(async move { c.model_infer(request()).await });
    let model = w.repo.get("slow", "").expect("loaded");
    let deadline = Instant::now() + Duration::from_secs(10);
    while model.batching.queue_depth() == 0 {
        assert!(Instant::now() < deadline, "the request did not reach the queue");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    w.server.shutdown.cancel();
    // Draining: the request is still queued, and the endpoint answers.
    assert_eq!(model.batching.queue_depth(), 1);
    let cap = capacity(&metrics).await;
    assert!(cap.to_string().contains("slow"), "{cap}");
    let m = http_get(&metrics, "/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    in_flight.await.expect("join").expect("the accepted request is answered");
    w.server.wait().await.expect("clean stop");
    assert!(tokio::net::TcpStream::connect(&metrics).await.is_err(), "the endpoint stops when the worker exits");
}
