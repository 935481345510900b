//! Generation over real gRPC on 127.0.0.1 with the built-in `tiny_decoder` (and the HF fixture
//! `llama-gqa` served through a repository folder): streamed deltas concatenate to the
//! non-streamed text, seeded sampling is reproducible, a request alone and inside a batch of 8
//! mixed-length requests gives the same tokens and logprobs, and a cancelled stream frees its
//! sequence (visible in /capacity).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use common::generative::{bytes_el, gqa_repository, is_final, text_request};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::{InferParameter, ModelConfigRequest, ModelInferRequest, ModelInferResponse};
use neuron_worker::repository::ModelControlMode;
use tokio_stream::StreamExt;

const MODEL: &str = "tiny_decoder";

/// (text, ids, logprobs, finish_reason) of one response.
fn outputs(r: &ModelInferResponse) -> (String, Vec<i32>, Vec<f32>, String) {
    let get = |name: &str| {
        r.outputs.iter().position(|o| o.name == name).map(|i| r.raw_output_contents[i].clone()).unwrap_or_default()
    };
    let text = |b: Vec<u8>| if b.len() >= 4 { String::from_utf8_lossy(&b[4..]).into_owned() } else { String::new() };
    let ids = get("output_ids").chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let lps = get("output_logprobs").chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (text(get("text_output")), ids, lps, text(get("finish_reason")))
}

async fn stream_all(
    client: &mut neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    reqs: Vec<ModelInferRequest>,
) -> Vec<(String, Vec<i32>, Vec<f32>, String)> {
    let n = reqs.len();
    let ids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let reqs: Vec<ModelInferRequest> = reqs
        .into_iter()
        .zip(&ids)
        .map(|(mut r, id)| {
            r.id = id.clone();
            r
        })
        .collect();
    let mut stream = client.model_stream_infer(tokio_stream::iter(reqs)).await.expect("stream opens").into_inner();
    let mut out = vec![(String::new(), Vec::new(), Vec::new(), String::new()); n];
    let mut done = 0;
    while done < n {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a response within 60 s")
            .expect("stream open")
            .expect("no stream error");
        assert!(msg.error_message.is_empty(), "{}", msg.error_message);
        let r = msg.infer_response.expect("response");
        let i: usize = r.id.parse().expect("id");
        let (t, ids, lps, reason) = outputs(&r);
        out[i].0.push_str(&t);
        out[i].1.extend(ids);
        out[i].2.extend(lps);
        if is_final(&r) {
            out[i].3 = reason;
            done += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_deltas_concatenate_to_the_unary_text_and_seeds_reproduce() {
    let w = common::start().await;
    let mut c = w.client().await;
    let cfg = c.model_config(ModelConfigRequest { name: MODEL.into(), version: String::new() }).await.unwrap();
    let cfg = cfg.into_inner().config.unwrap();
    assert_eq!(cfg.model_transaction_policy.map(|p| p.decoupled), Some(true));
    assert!(cfg.input.iter().any(|i| i.name == "text_input"));

    let params = r#"{"max_tokens": 24, "temperature": 0.9, "top_k": 50, "seed": 7, "ignore_eos": true}"#;
    let unary = c.model_infer(text_request(MODEL, "Hello", false, params)).await.unwrap().into_inner();
    let (text, ids, lps, reason) = outputs(&unary);
    assert!(text.starts_with("Hello"), "non-streamed text includes the prompt: {text:?}");
    assert_eq!(ids.len(), 24);
    assert_eq!(lps.len(), 24);
    assert_eq!(reason, "length");

    let streamed = stream_all(&mut c, vec![text_request(MODEL, "Hello", true, params)]).await;
    assert_eq!(format!("Hello{}", streamed[0].0), text, "deltas concatenate to the completion");
    assert_eq!(streamed[0].1, ids, "same seed, same tokens");
    assert_eq!(streamed[0].2, lps);
    assert_eq!(streamed[0].3, "length");

    let other = r#"{"max_tokens": 24, "temperature": 0.9, "top_k": 50, "seed": 8, "ignore_eos": true}"#;
    let (_, ids8, ..) = outputs(&c.model_infer(text_request(MODEL, "Hello", false, other)).await.unwrap().into_inner());
    assert_ne!(ids8, ids, "another seed samples other tokens");

    let bad = c.model_infer(text_request(MODEL, "x", false, r#"{"best_of": 2}"#)).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("best_of"), "{}", bad.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_and_in_a_batch_of_eight_the_tokens_and_logprobs_are_identical() {
    let repo = gqa_repository("");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let mut c = w.client().await;
    let prompts = [
        "a",
        "hello world, this is",
        "the",
        "quick brown fox jumps over",
        "x y",
        "lorem ipsum dolor sit amet",
        "ok",
        "zz",
    ];
    let params = |k: usize| format!(r#"{{"max_tokens": 12, "temperature": 1.0, "seed": {k}, "ignore_eos": true}}"#);
    let mut alone = Vec::new();
    for (k, p) in prompts.iter().enumerate() {
        alone.push(stream_all(&mut c, vec![text_request("gqa", p, true, &params(k))]).await.remove(0));
    }
    let batch: Vec<ModelInferRequest> =
        prompts.iter().enumerate().map(|(k, p)| text_request("gqa", p, true, &params(k))).collect();
    let together = stream_all(&mut c, batch).await;
    for k in 0..prompts.len() {
        assert_eq!(together[k].1, alone[k].1, "request {k}: tokens");
        assert_eq!(together[k].2, alone[k].2, "request {k}: logprobs bit-identical");
        assert_eq!(together[k].0, alone[k].0, "request {k}: text");
        assert_eq!(together[k].1.len(), 12);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_frees_its_sequence() {
    let w = common::start().await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let params = r#"{"max_tokens": 100000, "ignore_eos": true}"#;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(text_request(MODEL, "Once", true, params)).await.unwrap();
    let mut stream = c.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let first = stream.next().await.expect("a delta").expect("ok");
    assert!(first.error_message.is_empty());
    let running = |cap: &serde_json::Value| {
        cap["models"].as_array().and_then(|m| m.iter().find(|m| m["model"] == MODEL)).map(|m| {
            (
                m["generative"]["num_requests_running"].as_u64().unwrap_or(99),
                m["generative"]["kv_cache_usage_perc"].as_f64().unwrap_or(1.0),
            )
        })
    };
    // The gauges are published at the end of the step that sent the first delta: wait for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(&common::capacity(&metrics).await).map(|r| r.0) != Some(1) {
        assert!(Instant::now() < deadline, "the sequence never showed as running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(stream);
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = running(&common::capacity(&metrics).await);
        if r == Some((0, 0.0)) {
            break;
        }
        assert!(Instant::now() < deadline, "sequence still running after cancel: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = common::http_get(&metrics, "/metrics").await;
    assert!(text.contains("neuron_worker_request_cancelled_total{model=\"tiny_decoder\",version=\"1\"} 1"), "{text}");
    assert!(text.contains("neuron_worker_time_to_first_token_seconds_count{model=\"tiny_decoder\""));
    let _ = InferParameter::default();
}

/// A request carrying token ids (`input_ids`) with greedy sampling, returning the generated ids.
fn ids_request(model: &str, ids: &[i32], max_tokens: usize) -> ModelInferRequest {
    let input = |name: &str, dtype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: dtype.into(),
        shape,
        ..Default::default()
    };
    let params = format!(r#"{{"max_tokens": {max_tokens}, "temperature": 0, "ignore_eos": true}}"#);
    let inputs = vec![
        input("input_ids", "INT32", vec![ids.len() as i64]),
        input("sampling_parameters", "BYTES", vec![1]),
        input("return_output_ids", "BOOL", vec![1]),
    ];
    let raw = vec![ids.iter().flat_map(|i| i.to_le_bytes()).collect::<Vec<u8>>(), bytes_el(&params), vec![1]];
    let raw = raw.into_iter().map(bytes::Bytes::from).collect();
    ModelInferRequest { model_name: model.into(), inputs, raw_input_contents: raw, ..Default::default() }
}

/// A `.gguf` file in a version folder is served: the F32 GGUF of the `llama-gqa` weights generates
/// transformers' greedy tokens (from the fixture's expected.json, computed on the safetensors copy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_file_in_a_version_folder_is_served_and_generates_the_reference_tokens() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let repo = tempfile::tempdir().expect("temp dir");
    let v = repo.path().join("gguf_gqa/1");
    std::fs::create_dir_all(&v).expect("mkdir");
    std::os::unix::fs::symlink(fixtures.join("gguf-llama-gqa/f32.gguf"), v.join("model.gguf")).expect("symlink");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("llama-gqa/expected.json")).expect("expected"))
            .expect("json");
    let w = common::start_with(Some(repo.path().into()), ModelControlMode::None, common::options()).await;
    let mut c = w.client().await;
    let cfg = c
        .model_config(ModelConfigRequest { name: "gguf_gqa".into(), version: String::new() })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config body");
    assert!(cfg.model_transaction_policy.is_some_and(|p| p.decoupled), "served as a decoupled generative model");
    let prompts = expected["prompts"].as_array().expect("prompts");
    assert!(!prompts.is_empty());
    for (k, p) in prompts.iter().enumerate() {
        let ids: Vec<i32> = p["ids"].as_array().expect("ids").iter().map(|x| x.as_i64().expect("id") as i32).collect();
        let want: Vec<i32> =
            p["greedy"].as_array().expect("greedy").iter().map(|x| x.as_i64().expect("id") as i32).collect();
        let r = c.model_infer(ids_request("gguf_gqa", &ids, want.len())).await.expect("infer").into_inner();
        let (_, got, _, _) = outputs(&r);
        assert_eq!(got, want, "prompt {k}: greedy tokens of the GGUF model vs transformers");
    }
}
