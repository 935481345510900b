//! The OpenAI-compatible `/v1` routes over 127.0.0.1: models, embeddings of a BERT fixture equal to
//! the gRPC `sentence_embedding` (floats and base64), and OpenAI's error shape. Chat, completions and
//! responses need a generative model; their request/response mapping is unit-tested in the crate.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use base64::Engine;
use common::http;
use common::*;
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use neuron_worker::repository::ModelControlMode;
use serde_json::{Value, json};

async fn bert_worker() -> (TestWorker, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("temp dir");
    let version = root.path().join("bert").join("1");
    std::fs::create_dir_all(&version).expect("mkdir");
    bert_fixture::write_checkpoint(&version, &bert_fixture::generate(42), safetensors::Dtype::F32, "", true);
    (start_with(Some(root.path().to_path_buf()), ModelControlMode::None, options()).await, root)
}

async fn grpc_embedding(w: &TestWorker, ids: &[i64]) -> Vec<f32> {
    let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let t = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, ids.len() as i64],
        ..Default::default()
    };
    let req = ModelInferRequest {
        model_name: "bert".into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![bytes(ids).into(), bytes(&vec![1; ids.len()]).into()],
        outputs: vec![InferRequestedOutputTensor { name: "sentence_embedding".into(), ..Default::default() }],
        ..Default::default()
    };
    let mut c = w.client().await;
    bytes_f32(&c.model_infer(req).await.expect("gRPC infer").into_inner().raw_output_contents[0])
}

#[tokio::test]
async fn embeddings_equal_the_grpc_sentence_embedding() {
    let (w, _root) = bert_worker().await;
    let a = w.http();
    let models = http::get(a, "/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "bert");
    assert_eq!(http::get(a, "/v1/models/bert").await.json()["object"], "model");

    let first = [1i64, 5, 9, 14, 2];
    let second = [1i64, 7, 3];
    let r = http::post_json(a, "/v1/embeddings", &json!({ "model": "bert", "input": first })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["object"], "list");
    assert_eq!(j["usage"]["prompt_tokens"], 5);
    let got: Vec<f32> =
        j["data"][0]["embedding"].as_array().expect("floats").iter().map(|v| v.as_f64().expect("f") as f32).collect();
    assert_eq!(got, grpc_embedding(&w, &first).await);

    // Two inputs of different lengths (padded and masked in one batch), as base64 (the openai
    // client's default): each equals its own gRPC answer within float tolerance.
    let body = json!({ "model": "bert", "input": [first, second], "encoding_format": "base64" });
    let j = http::post_json(a, "/v1/embeddings", &body).await.json();
    assert_eq!(j["usage"]["total_tokens"], 8);
    for (i, ids) in [&first[..], &second[..]].into_iter().enumerate() {
        assert_eq!(j["data"][i]["index"], i);
        let b64 = j["data"][i]["embedding"].as_str().expect("base64");
        let got = bytes_f32(&base64::engine::general_purpose::STANDARD.decode(b64).expect("valid base64"));
        let want = grpc_embedding(&w, ids).await;
        assert_eq!(got.len(), 32);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "row {i}: {g} vs {w}");
        }
    }
}

#[tokio::test]
async fn errors_have_openai_shape() {
    let (w, _root) = bert_worker().await;
    let a = w.http();
    let err = |r: &http::Reply| r.json()["error"].clone();
    let r = http::post_json(a, "/v1/embeddings", &json!({ "model": "nope", "input": [1, 2] })).await;
    assert_eq!(r.status, 404);
    assert_eq!(err(&r)["type"], "invalid_request_error");
    assert!(err(&r)["message"].as_str().expect("message").contains("'nope'"));
    let r = http::post_json(a, "/v1/embeddings", &json!({ "model": "bert", "input": "some text" })).await;
    assert_eq!(r.status, 400);
    assert!(err(&r)["message"].as_str().expect("message").contains("send token ids"), "{}", r.text());
    let r = http::send(a, "POST", "/v1/embeddings", &[], b"{".to_vec()).await;
    assert_eq!(r.status, 400);
    assert!(err(&r)["message"].as_str().expect("message").contains("malformed JSON"));
    // Generation on an encoder model is refused, naming what is missing.
    let body = json!({ "model": "bert", "messages": [{ "role": "user", "content": "hi" }] });
    let r = http::post_json(a, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 400);
    assert!(err(&r)["message"].as_str().expect("message").contains("not a generative model"), "{}", r.text());
    let r = http::get(a, "/v1/responses/resp_missing").await;
    assert_eq!(r.status, 404);
    assert_eq!(err(&r)["type"], "invalid_request_error");
    let r = http::post_json(
        a,
        "/v1/responses",
        &json!({ "model": "bert", "input": "hi", "previous_response_id": "resp_x" }),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let _: Value = r.json();
}
