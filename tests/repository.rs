//! Model repository over gRPC: a bare HF BERT folder served with a completed config, version
//! policies, a broken model reported without affecting the others, and explicit load/unload.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::path::Path;

use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::proto::inference::*;
use neuron_worker::repository::ModelControlMode;
use safetensors::Dtype;
use tonic::Code;
use tonic::transport::Channel;

fn bert_folder(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_checkpoint(dir, &generate(7), Dtype::F32, "", true);
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bert_request(model: &str, ids: &[i64]) -> ModelInferRequest {
    let n = ids.len() as i64;
    let tensor = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, n],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![tensor("input_ids"), tensor("attention_mask")],
        raw_input_contents: vec![i64_bytes(ids).into(), i64_bytes(&vec![1; ids.len()]).into()],
        ..Default::default()
    }
}

async fn embedding(
    c: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    ids: &[i64],
) -> Result<(Vec<f32>, Vec<i64>), tonic::Status> {
    let r = c.model_infer(bert_request(model, ids)).await?.into_inner();
    let i = r.outputs.iter().position(|o| o.name == "sentence_embedding").expect("sentence_embedding present");
    let h = r.outputs.iter().find(|o| o.name == "last_hidden_state").map(|o| o.shape.clone()).unwrap_or_default();
    Ok((bytes_f32(&r.raw_output_contents[i]), h))
}

#[tokio::test]
async fn bare_bert_folder_is_completed_and_padding_never_changes_a_sentence() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_folder(&repo.path().join("bert/1"));
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let cfg = c
        .model_config(ModelConfigRequest { name: "bert".into(), version: String::new() })
        .await
        .expect("config")
        .into_inner()
        .config
        .expect("config");
    let inputs: Vec<(String, bool)> = cfg.input.iter().map(|i| (i.name.clone(), i.optional)).collect();
    assert_eq!(
        inputs,
        vec![("input_ids".into(), false), ("attention_mask".into(), false), ("token_type_ids".into(), true)]
    );
    assert_eq!(cfg.output[1].dims, vec![32]);
    // Alone, then many sentences of different lengths at once (they are batched and padded).
    let sentences: Vec<Vec<i64>> =
        (0..12).map(|k| (0..(3 + k % 9)).map(|i| ((k * 13 + i * 7) % 97 + 2) as i64).collect()).collect();
    let mut alone = Vec::new();
    for s in &sentences {
        let (e, hidden_shape) = embedding(&mut c, "bert", s).await.expect("alone");
        assert_eq!(hidden_shape, vec![1, s.len() as i64, 32]);
        let norm: f32 = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "Normalize module → unit norm, got {norm}");
        alone.push(e);
    }
    let mut tasks = Vec::new();
    for s in sentences.clone() {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { embedding(&mut c, "bert", &s).await }));
    }
    for ((t, want), s) in tasks.into_iter().zip(&alone).zip(&sentences) {
        let (got, hidden_shape) = t.await.expect("join").expect("batched");
        assert_eq!(hidden_shape, vec![1, s.len() as i64, 32], "padded positions must be cropped");
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-4, "padded batch changed a sentence: {g} vs {w}");
        }
    }
    // Ids and mask of different lengths would be padded apart: refused before they reach a batch.
    let mut r = bert_request("bert", &[5, 6, 7, 8]);
    r.inputs[1].shape = vec![1, 6];
    r.raw_input_contents[1] = i64_bytes(&[1; 6]).into();
    let e = c.model_infer(r).await.expect_err("mismatched lengths");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("sequence length 6 differs from input 'input_ids' (4)"), "{}", e.message());
    let bad = c.model_infer(bert_request("bert", &[5, 100, 7])).await.expect_err("id out of vocabulary");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("input_ids"), "{}", bad.message());
}

#[tokio::test]
async fn broken_model_is_reported_and_others_are_served() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_folder(&repo.path().join("good/1"));
    std::fs::create_dir_all(repo.path().join("broken/1")).expect("mkdir");
    std::fs::write(repo.path().join("broken/config.pbtxt"), "name: \"broken\"\nmax_batch_size: -3\n").expect("write");
    std::fs::create_dir_all(repo.path().join("typo/1")).expect("mkdir");
    std::fs::write(repo.path().join("typo/config.pbtxt"), "name: \"typo\" max_batch_sise: 4").expect("write");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let idx = c.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
    let by_name = |n: &str| idx.models.iter().find(|m| m.name == n).cloned().expect("listed");
    assert_eq!(by_name("good").state, "READY");
    let broken = by_name("broken");
    assert_eq!(broken.state, "UNAVAILABLE");
    assert!(
        broken.reason.contains("broken/config.pbtxt") && broken.reason.contains("max_batch_size"),
        "{}",
        broken.reason
    );
    assert!(by_name("typo").reason.contains("max_batch_sise"), "{}", by_name("typo").reason);
    let ready = c
        .model_ready(ModelReadyRequest { name: "broken".into(), version: String::new() })
        .await
        .expect("rpc")
        .into_inner();
    assert!(!ready.ready);
    let e = c.model_infer(bert_request("broken", &[1, 2])).await.expect_err("not ready");
    assert_eq!(e.code(), Code::Unavailable);
    embedding(&mut c, "good", &[3, 4, 5]).await.expect("the good model serves");
}

#[tokio::test]
async fn version_policies_pick_versions() {
    let repo = tempfile::tempdir().expect("tmp");
    for v in ["1", "2", "3"] {
        bert_folder(&repo.path().join("latest").join(v));
        bert_folder(&repo.path().join("all").join(v));
    }
    let config = |name: &str, policy: &str| {
        format!(
            r#"name: "{name}" max_batch_size: 8 {policy}
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }}, {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }}, {{ name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] }} ]"#
        )
    };
    std::fs::write(repo.path().join("latest/config.pbtxt"), config("latest", "")).expect("write");
    std::fs::write(
        repo.path().join("all/config.pbtxt"),
        config("all", "version_policy: { specific: { versions: [1, 3] } }"),
    )
    .expect("write");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let md = |name: &str| ModelMetadataRequest { name: name.into(), version: String::new() };
    assert_eq!(c.model_metadata(md("latest")).await.expect("md").into_inner().versions, vec!["3".to_string()]);
    assert_eq!(
        c.model_metadata(md("all")).await.expect("md").into_inner().versions,
        vec!["1".to_string(), "3".to_string()]
    );
    let mut req = bert_request("all", &[4, 5]);
    req.model_version = "2".into();
    assert_eq!(c.model_infer(req).await.expect_err("v2 not loaded").code(), Code::NotFound);
    let mut req = bert_request("all", &[4, 5]);
    req.model_version = "1".into();
    assert_eq!(c.model_infer(req).await.expect("v1").into_inner().model_version, "1");
}

#[tokio::test]
async fn explicit_mode_loads_and_unloads_and_refuses_escaping_names() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_folder(&repo.path().join("bert/1"));
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::Explicit, options()).await;
    let mut c = w.client().await;
    let unload = RepositoryModelUnloadRequest { model_name: "bert".into(), ..Default::default() };
    c.repository_model_unload(unload).await.expect("unload");
    let ready = c
        .model_ready(ModelReadyRequest { name: "bert".into(), version: String::new() })
        .await
        .expect("rpc")
        .into_inner();
    assert!(!ready.ready);
    assert_eq!(c.model_infer(bert_request("bert", &[1, 2])).await.expect_err("unloaded").code(), Code::Unavailable);
    c.repository_model_load(RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() })
        .await
        .expect("load");
    embedding(&mut c, "bert", &[3, 4]).await.expect("served again");
    // A reload that fails keeps the serving version.
    std::fs::write(repo.path().join("bert/config.pbtxt"), "name: \"bert\" max_batch_size: oops").expect("write");
    let e = c
        .repository_model_load(RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() })
        .await
        .expect_err("broken config");
    assert_eq!(e.code(), Code::Internal);
    embedding(&mut c, "bert", &[3, 4]).await.expect("the loaded version still serves");
    std::fs::remove_file(repo.path().join("bert/config.pbtxt")).expect("remove");
    for bad in ["../bert", "/etc", "a/b", ".."] {
        let e = c
            .repository_model_load(RepositoryModelLoadRequest { model_name: bad.into(), ..Default::default() })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {}", e.message());
    }
    let e = c
        .repository_model_load(RepositoryModelLoadRequest { model_name: "absent".into(), ..Default::default() })
        .await
        .expect_err("absent");
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn int32_ids_and_fp16_outputs_follow_the_config() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_folder(&repo.path().join("half/1"));
    bert_folder(&repo.path().join("full/1"));
    std::fs::write(
        repo.path().join("half/config.pbtxt"),
        r#"name: "half" max_batch_size: 8
input [ { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] }, { name: "attention_mask" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }, { name: "sentence_embedding" data_type: TYPE_FP16 dims: [ 32 ] } ]"#,
    )
    .expect("write");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let ids: [i32; 4] = [3, 9, 27, 81];
    let i32_bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    let ones: Vec<u8> = [1i32; 4].iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "INT32".into(),
        shape: vec![1, 4],
        ..Default::default()
    };
    let req = ModelInferRequest {
        model_name: "half".into(),
        inputs: vec![t("input_ids"), t("attention_mask")],
        raw_input_contents: vec![i32_bytes.into(), ones.into()],
        ..Default::default()
    };
    let r = c.model_infer(req).await.expect("infer").into_inner();
    let k = r.outputs.iter().position(|o| o.name == "sentence_embedding").expect("output");
    assert_eq!(r.outputs[k].datatype, "FP16");
    assert_eq!(r.raw_output_contents[k].len(), 32 * 2);
    let half: Vec<f32> =
        r.raw_output_contents[k].chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
    let (full, _) = embedding(&mut c, "full", &[3, 9, 27, 81]).await.expect("fp32 model");
    for (h, f) in half.iter().zip(&full) {
        assert!((h - f).abs() < 2e-3, "{h} vs {f}");
    }
}

/// Health follows the repository as it changes, not on a timer: right after an unload the model's
/// health is NOT_SERVING, and right after a load it is SERVING again (checked within 100 ms, where a
/// 500 ms poll would still report the old status).
#[tokio::test]
async fn health_follows_unload_and_load_at_once() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let repo = tempfile::tempdir().expect("tmp");
    bert_folder(&repo.path().join("bert/1"));
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::Explicit, options()).await;
    let mut c = w.client().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", w.server.grpc_addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    let mut status_within = async |want: i32| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
        loop {
            let st = health
                .check(HealthCheckRequest { service: "bert".into() })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1);
            if st == want || std::time::Instant::now() > deadline {
                return st;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    assert_eq!(status_within(1).await, 1, "SERVING after start");
    c.repository_model_unload(RepositoryModelUnloadRequest { model_name: "bert".into(), ..Default::default() })
        .await
        .expect("unload");
    assert_eq!(status_within(2).await, 2, "NOT_SERVING within 100 ms of the unload");
    c.repository_model_load(RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() })
        .await
        .expect("load");
    assert_eq!(status_within(1).await, 1, "SERVING within 100 ms of the load");
}
