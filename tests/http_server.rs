//! End-to-end tests of the HTTP front (KServe v2 REST with Triton's binary tensor data extension)
//! over 127.0.0.1: answers equal the gRPC front's for the same request, binary data in and out,
//! the error statuses, auth, TLS, the body limit and drain.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use common::http::{self, Reply};
use common::*;
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::repository::ModelControlMode;
use serde_json::{Value, json};

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

async fn grpc_output(w: &TestWorker, req: ModelInferRequest) -> Vec<Vec<u8>> {
    let mut c = w.client().await;
    c.model_infer(req).await.expect("gRPC infer").into_inner().raw_output_contents
}

/// JSON answers (f32 printed by serde_json, shortest round trip) equal the gRPC raw bytes exactly.
async fn json_equals_grpc(w: &TestWorker, model: &str, width: usize, rows: usize) {
    let x: Vec<f32> = (0..rows * width).map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0).collect();
    let body = json!({
        "id": "r1",
        "inputs": [{ "name": "INPUT0", "shape": [rows, width], "datatype": "FP32", "data": x }]
    });
    let r = http::post_json(w.http(), &format!("/v2/models/{model}/infer"), &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let j = r.json();
    assert_eq!(j["id"], "r1");
    assert_eq!(j["model_name"], model);
    assert_eq!(j["model_version"], "1");
    let out = &j["outputs"][0];
    assert_eq!(out["name"], "OUTPUT0");
    assert_eq!(out["datatype"], "FP32");
    let grpc = grpc_output(w, fp32_request(model, "INPUT0", vec![rows as i64, width as i64], &x)).await;
    assert_eq!(floats(&out["data"]), bytes_f32(&grpc[0]), "{model}: HTTP JSON vs gRPC");
    let cols = bytes_f32(&grpc[0]).len() / rows;
    assert_eq!(out["shape"], json!([rows, cols]));
}

#[tokio::test]
async fn linear_and_mlp_json_answers_equal_grpc() {
    let w = start().await;
    json_equals_grpc(&w, "linear", 64, 3).await;
    json_equals_grpc(&w, "mlp", 256, 2).await;
    // And the closed form, through the versioned route.
    let x = tagged_rows(2, 1);
    let body = json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": [x.clone()] }] });
    let r = http::post_json(w.http(), "/v2/models/linear/versions/1/infer", &body).await;
    let got = floats(&r.json()["outputs"][0]["data"]);
    for (g, want) in got.iter().zip(linear_reference(&x)) {
        assert!((g - want).abs() < 1e-4, "{g} vs {want}");
    }
}

#[tokio::test]
async fn binary_inputs_and_outputs_round_trip_bytes() {
    let w = start().await;
    let x = tagged_rows(5, 2);
    let raw = f32_bytes(&x);
    let head = json!({
        "inputs": [{ "name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "parameters": { "binary_data_size": raw.len() } }],
        "outputs": [{ "name": "OUTPUT0", "parameters": { "binary_data": true } }]
    })
    .to_string();
    let mut body = head.clone().into_bytes();
    body.extend_from_slice(&raw);
    let len = head.len().to_string();
    let r = http::send(
        w.http(),
        "POST",
        "/v2/models/linear/infer",
        &[("inference-header-content-length", &len), ("content-type", "application/octet-stream")],
        body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let head_len: usize = r.header("inference-header-content-length").expect("header length").parse().expect("number");
    let j: Value = serde_json::from_slice(&r.body[..head_len]).expect("JSON header");
    assert_eq!(j["outputs"][0]["parameters"]["binary_data_size"], 2 * 16 * 4);
    assert!(j["outputs"][0].get("data").is_none());
    let grpc = grpc_output(&w, fp32_request("linear", "INPUT0", vec![2, 64], &x)).await;
    assert_eq!(&r.body[head_len..], grpc[0].as_slice(), "binary output equals gRPC raw output");

    // binary_data_output for all outputs, JSON input.
    let body = json!({
        "parameters": { "binary_data_output": true },
        "inputs": [{ "name": "INPUT0", "shape": [2, 64], "datatype": "FP32", "data": x }]
    });
    let r = http::post_json(w.http(), "/v2/models/linear/infer", &body).await;
    let head_len: usize = r.header("inference-header-content-length").expect("header length").parse().expect("number");
    assert_eq!(&r.body[head_len..], grpc[0].as_slice());

    // A binary size that runs past the body is refused with the numbers.
    let head = json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "parameters": { "binary_data_size": 256 } }] }).to_string();
    let len = head.len().to_string();
    let mut body = head.into_bytes();
    body.extend_from_slice(&[0u8; 100]);
    let r = http::send(w.http(), "POST", "/v2/models/linear/infer", &[("inference-header-content-length", &len)], body)
        .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().expect("message").contains("binary_data_size 256"), "{}", r.text());
}

#[tokio::test]
async fn bert_fixture_json_answers_equal_grpc() {
    let root = tempfile::tempdir().expect("temp dir");
    let version = root.path().join("bert").join("1");
    std::fs::create_dir_all(&version).expect("mkdir");
    let w = bert_fixture::generate(42);
    bert_fixture::write_checkpoint(&version, &w, safetensors::Dtype::F32, "", true);
    let worker = start_with(Some(root.path().to_path_buf()), ModelControlMode::None, options()).await;
    let ids = [[1i64, 5, 9, 14, 2], [1, 7, 3, 0, 0]];
    let mask = [[1i64, 1, 1, 1, 1], [1, 1, 1, 0, 0]];
    let body = json!({
        "inputs": [
            { "name": "input_ids", "shape": [2, 5], "datatype": "INT64", "data": ids },
            { "name": "attention_mask", "shape": [2, 5], "datatype": "INT64", "data": mask }
        ],
        "outputs": [{ "name": "sentence_embedding" }]
    });
    let r = http::post_json(worker.http(), "/v2/models/bert/infer", &body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["outputs"].as_array().map(Vec::len), Some(1));
    assert_eq!(j["outputs"][0]["shape"], json!([2, 32]));
    let i64_bytes = |v: &[[i64; 5]; 2]| v.iter().flatten().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let tensor = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![2, 5],
        ..Default::default()
    };
    let req = ModelInferRequest {
        model_name: "bert".into(),
        inputs: vec![tensor("input_ids"), tensor("attention_mask")],
        raw_input_contents: vec![i64_bytes(&ids).into(), i64_bytes(&mask).into()],
        outputs: vec![neuron_worker::proto::inference::model_infer_request::InferRequestedOutputTensor {
            name: "sentence_embedding".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let grpc = grpc_output(&worker, req).await;
    assert_eq!(floats(&j["outputs"][0]["data"]), bytes_f32(&grpc[0]));
}

#[tokio::test]
async fn health_metadata_config_statistics_and_repository() {
    let w = start().await;
    let a = w.http();
    assert_eq!(http::get(a, "/v2/health/live").await.status, 200);
    assert_eq!(http::get(a, "/v2/health/ready").await.status, 200);
    assert_eq!(http::get(a, "/v2/models/linear/ready").await.status, 200);
    assert_eq!(http::get(a, "/v2/models/linear/versions/1/ready").await.status, 200);
    let meta = http::get(a, "/v2").await.json();
    assert_eq!(meta["name"], "neuron-worker");
    let ext: Vec<&str> = meta["extensions"].as_array().expect("list").iter().filter_map(Value::as_str).collect();
    assert!(ext.contains(&"binary_tensor_data") && ext.contains(&"statistics"), "{ext:?}");
    let m = http::get(a, "/v2/models/linear").await.json();
    assert_eq!(m["inputs"][0], json!({ "name": "INPUT0", "datatype": "FP32", "shape": [-1, 64] }));
    assert_eq!(m["versions"], json!(["1"]));
    let cfg = http::get(a, "/v2/models/linear/config").await.json();
    assert_eq!(cfg["max_batch_size"], 64);
    assert_eq!(cfg["input"][0]["dims"], json!([64]));
    assert!(cfg.get("dynamic_batching").is_some() && cfg.get("sequence_batching").is_none());
    let body =
        json!({ "inputs": [{ "name": "INPUT0", "shape": [3, 64], "datatype": "FP32", "data": tagged_rows(0, 3) }] });
    assert_eq!(http::post_json(a, "/v2/models/linear/infer", &body).await.status, 200);
    let s = http::get(a, "/v2/models/linear/stats").await.json();
    assert_eq!(s["model_stats"][0]["name"], "linear");
    assert_eq!(s["model_stats"][0]["inference_count"], 3);
    assert_eq!(s["model_stats"][0]["inference_stats"]["success"]["count"], 1);
    let all = http::get(a, "/v2/models/stats").await.json();
    assert!(all["model_stats"].as_array().expect("list").len() >= 4);
    let index = http::send(a, "POST", "/v2/repository/index", &[], Vec::new()).await.json();
    assert!(index.as_array().expect("list").contains(&json!({ "name": "linear", "version": "1", "state": "READY" })));
    // Load/unload need explicit control mode: refused here, with the reason.
    let r = http::send(a, "POST", "/v2/repository/models/linear/unload", &[], Vec::new()).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("--model-control-mode explicit"), "{}", r.text());
    // Request counters by route template.
    let metrics = http_get(&w.server.metrics_addr.expect("metrics").to_string(), "/metrics").await;
    assert!(
        metrics.contains(r#"neuron_worker_http_requests{method="POST",route="/v2/models/{model}/infer",status="200"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn repository_load_and_unload_in_explicit_mode() {
    let w = start_with(None, ModelControlMode::Explicit, options()).await;
    let a = w.http();
    let r = http::send(a, "POST", "/v2/repository/models/mlp/unload", &[], Vec::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(http::get(a, "/v2/models/mlp/ready").await.status, 400);
    let r = http::post_json(a, "/v2/repository/models/mlp/load", &json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(http::get(a, "/v2/models/mlp/ready").await.status, 200);
}

fn error_of(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_else(|| panic!("no error message: {}", r.text())).to_string()
}

#[tokio::test]
async fn errors_have_triton_shape_and_status() {
    let w = start().await;
    let a = w.http();
    // Malformed JSON: 400 naming the problem and where.
    let r = http::send(a, "POST", "/v2/models/linear/infer", &[], b"{\"inputs\": [}".to_vec()).await;
    assert_eq!(r.status, 400);
    let e = error_of(&r);
    assert!(e.contains("malformed JSON") && e.contains("line 1 column 13"), "{e}");
    let r = http::post_json(a, "/v2/models/linear/infer", &json!({ "input": [] })).await;
    assert!(error_of(&r).contains("missing field `inputs`"), "{}", r.text());
    // The core's validation, same words as gRPC.
    let body = json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 63], "datatype": "FP32", "data": vec![0.0; 63] }] });
    let r = http::post_json(a, "/v2/models/linear/infer", &body).await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("shape [1, 63] does not match the model's [-1, 64]"), "{}", r.text());
    let body = json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, "x"] }] });
    assert!(error_of(&http::post_json(a, "/v2/models/linear/infer", &body).await).contains("element 1"));
    // Unknown model and route: 404.
    let body = json!({ "inputs": [] });
    let r = http::post_json(a, "/v2/models/nope/infer", &body).await;
    assert_eq!(r.status, 404);
    assert!(error_of(&r).contains("'nope'"));
    assert_eq!(http::get(a, "/v2/models/nope").await.status, 404);
    assert_eq!(http::get(a, "/v3/whatever").await.status, 404);
}

#[tokio::test]
async fn overload_is_429_with_retry_after_and_sequences_use_parameters() {
    let w = start().await;
    let a = w.http();
    let step = |id: u64, v: i32, start: bool| {
        json!({
            "parameters": { "sequence_id": id, "sequence_start": start },
            "inputs": [{ "name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [v] }]
        })
    };
    // Sequence parameters as Triton's HTTP front takes them: the accumulator keeps the sum.
    let r = http::post_json(a, "/v2/models/accumulate/infer", &step(7, 5, true)).await;
    assert_eq!(r.json()["outputs"][0]["data"], json!([5]), "{}", r.text());
    let r = http::post_json(a, "/v2/models/accumulate/infer", &step(7, 4, false)).await;
    assert_eq!(r.json()["outputs"][0]["data"], json!([9]));
    let by_name = json!({
        "parameters": { "sequence_id": "conv-a", "sequence_start": true, "sequence_end": true },
        "inputs": [{ "name": "INPUT", "shape": [1, 1], "datatype": "INT32", "data": [3] }]
    });
    assert_eq!(
        http::post_json(a, "/v2/models/accumulate/infer", &by_name).await.json()["outputs"][0]["data"],
        json!([3])
    );
    // Every slot taken (16, one already by sequence 7): the next start is told to come back later.
    for id in 100..115u64 {
        let r = http::post_json(a, "/v2/models/accumulate/infer", &step(id, 1, true)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = http::post_json(a, "/v2/models/accumulate/infer", &step(999, 1, true)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(error_of(&r).contains("sequence slots are taken"), "{}", r.text());
}

#[tokio::test]
async fn bearer_token_and_body_limit() {
    let mut opts = options();
    opts.auth_token = Some("s3cret".into());
    opts.max_message_size = 4096;
    let w = start_with(None, ModelControlMode::None, opts).await;
    let a = w.http();
    // Health needs no token (probes); everything else does.
    assert_eq!(http::get(a, "/v2/health/ready").await.status, 200);
    let r = http::get(a, "/v2/models/linear").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert!(error_of(&r).contains("Authorization: Bearer"), "{}", r.text());
    let r = http::send(a, "GET", "/v2/models/linear", &[("authorization", "Bearer nope")], Vec::new()).await;
    assert_eq!(r.status, 401);
    let ok = http::send(a, "GET", "/v2/models/linear", &[("authorization", "Bearer s3cret")], Vec::new()).await;
    assert_eq!(ok.status, 200);
    // OpenAI's error shape under /v1.
    let r = http::get(a, "/v1/models").await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    // Over the limit: 413, whether announced by Content-Length or compressed.
    let r =
        http::send(a, "POST", "/v2/models/linear/infer", &[("authorization", "Bearer s3cret")], vec![b' '; 5000]).await;
    assert_eq!(r.status, 413);
    assert!(error_of(&r).contains("4096 bytes"), "{}", r.text());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &[b' '; 100_000]).expect("compress");
    let small = gz.finish().expect("compress");
    assert!(small.len() < 4096);
    let headers = [("authorization", "Bearer s3cret"), ("content-encoding", "gzip")];
    assert_eq!(http::send(a, "POST", "/v2/models/linear/infer", &headers, small).await.status, 413);
    // A gzip body within the limit works.
    let body =
        json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": vec![0.25; 64] }] });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, body.to_string().as_bytes()).expect("compress");
    let r = http::send(a, "POST", "/v2/models/linear/infer", &headers, gz.finish().expect("compress")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn drain_finishes_an_accepted_request_and_refuses_new_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = start().await;
    let a = w.http();
    let body = json!({ "inputs": [{ "name": "INPUT0", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64] }] })
        .to_string();
    // A request whose body is still arriving when the drain starts: `100 Continue` says the handler
    // is reading it.
    let mut s = tokio::net::TcpStream::connect(a).await.expect("connect");
    let head = format!(
        "POST /v2/models/linear/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).await.expect("read 100 Continue");
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    w.server.shutdown.cancel();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tokio::net::TcpStream::connect(a).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the HTTP front still accepts connections while draining");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.write_all(body.as_bytes()).await.expect("write the body");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"OUTPUT0\""), "{out}");
    w.server.wait().await.expect("drained cleanly");
}

#[tokio::test]
async fn generate_extension_maps_keys_to_inputs_and_streams_events() {
    let w = start().await;
    let a = w.http();
    let x = tagged_rows(4, 1);
    let r = http::post_json(a, "/v2/models/linear/generate", &json!({ "id": "g", "INPUT0": x })).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["id"], "g");
    let grpc = grpc_output(&w, fp32_request("linear", "INPUT0", vec![1, 64], &x)).await;
    assert_eq!(floats(&j["OUTPUT0"]), bytes_f32(&grpc[0]));
    // Streamed: the same object as one SSE event.
    let r = http::post_json(a, "/v2/models/linear/generate_stream", &json!({ "INPUT0": x })).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")));
    let events = http::sse_events(&r.body);
    assert_eq!(events.len(), 1);
    assert_eq!(floats(&events[0]["OUTPUT0"]), bytes_f32(&grpc[0]));
    // A one-element output is a scalar; request parameters pass through.
    let body =
        json!({ "INPUT": [3], "parameters": { "sequence_id": 5, "sequence_start": true, "sequence_end": true } });
    assert_eq!(http::post_json(a, "/v2/models/accumulate/generate", &body).await.json()["OUTPUT"], 3);
    // Keys that are not inputs are refused with the model's inputs.
    let r = http::post_json(a, "/v2/models/linear/generate_stream", &json!({ "text_input": "hi" })).await;
    assert_eq!(r.status, 400);
    assert!(error_of(&r).contains("has no input 'text_input'"), "{}", r.text());
}
