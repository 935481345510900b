//! A load asked for during an unload's drain: the last word wins (the model ends loaded) and
//! nothing leaks (one instance thread, however many rounds).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::repository::ModelControlMode;
use safetensors::Dtype;

/// Threads of this process whose name starts with `prefix` (Linux: /proc/self/task/*/comm).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.starts_with(prefix))
        .count()
}

fn request() -> ModelInferRequest {
    let ids: Vec<u8> =
        [2i64, 17, 42, 99, 3, 5, 8, 13, 21, 34, 55, 89, 1, 1, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let mask: Vec<u8> = [1i64; 16].iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "race".into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![ids.into(), mask.into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_during_an_unloads_drain_wins_and_leaks_nothing() {
    let repo = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(repo.path().join("race/1")).expect("mkdir");
    write_checkpoint(&repo.path().join("race/1"), &generate(3), Dtype::F32, "", true);
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::Explicit, options()).await;
    let c = w.client().await;
    // The first execution starts the shared rayon pool, whose threads take the name of the thread
    // that started them: count after it, and expect that many in every round.
    c.clone().model_infer(request()).await.expect("first request");
    let baseline = threads_named("race-cpu");
    assert!(baseline >= 1);
    for round in 0..5 {
        // Requests in flight, so the unload has something to drain while the load runs.
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move { c.model_infer(request()).await.map(|_| ()) }));
        }
        let model = w.repo.get("race", "").expect("loaded");
        let deadline = Instant::now() + Duration::from_secs(10);
        while model.batching.queue_depth() == 0 && model.batching.stats().success.get().0 == 0 {
            assert!(Instant::now() < deadline, "round {round}: no request reached the model");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(model);
        let (unloaded, loaded) = tokio::join!(w.repo.unload("race"), async {
            tokio::task::yield_now().await;
            w.repo.load("race").await
        });
        unloaded.expect("unload");
        loaded.expect("load");
        assert!(w.repo.get("race", "").is_ok(), "round {round}: the load came last, so the model is loaded");
        for t in tasks {
            if let Err(e) = t.await.expect("join") {
                assert_eq!(e.code(), tonic::Code::Unavailable, "round {round}: {e:?}");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while threads_named("race-cpu") != baseline {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} threads named after the model, expected {baseline} (one instance thread)",
                threads_named("race-cpu")
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
