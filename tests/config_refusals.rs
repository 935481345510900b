//! Configurations the worker cannot serve are refused at load, with the reason in the repository
//! index, instead of loading READY and failing every request.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::path::Path;

use common::bert_fixture::{generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::*;
use neuron_worker::repository::ModelControlMode;
use safetensors::Dtype;

fn bert_folder(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mkdir");
    write_checkpoint(dir, &generate(7), Dtype::F32, "", true);
}

/// Writes a BERT model `name` whose `config.pbtxt` has `inputs`/`outputs` (text inside `[ ]`)
/// and `extra` lines.
fn bert_model(root: &Path, name: &str, ids_type: &str, embedding_type: &str, extra: &str) {
    bert_folder(&root.join(name).join("1"));
    let config = format!(
        r#"name: "{name}" max_batch_size: 8
input [ {{ name: "input_ids" data_type: {ids_type} dims: [ -1 ] }}, {{ name: "attention_mask" data_type: {ids_type} dims: [ -1 ] }} ]
output [ {{ name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }}, {{ name: "sentence_embedding" data_type: {embedding_type} dims: [ 32 ] }} ]
{extra}"#
    );
    std::fs::write(root.join(name).join("config.pbtxt"), config).expect("write config");
}

/// The repository index as (name → (state, reason)).
async fn index(w: &TestWorker) -> Vec<(String, String, String)> {
    let mut c = w.client().await;
    let idx = c.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
    idx.models.into_iter().map(|m| (m.name, m.state, m.reason)).collect()
}

fn entry<'a>(idx: &'a [(String, String, String)], name: &str) -> (&'a str, &'a str) {
    idx.iter().find(|m| m.0 == name).map(|m| (m.1.as_str(), m.2.as_str())).unwrap_or(("absent", ""))
}

#[tokio::test]
async fn datatypes_the_cpu_bert_cannot_use_are_refused_at_load() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_model(repo.path(), "good", "TYPE_INT64", "TYPE_FP16", "");
    bert_model(repo.path(), "float_ids", "TYPE_FP32", "TYPE_FP32", "");
    bert_model(repo.path(), "int_output", "TYPE_INT64", "TYPE_INT32", "");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let idx = index(&w).await;
    assert_eq!(entry(&idx, "good").0, "READY");
    let (state, reason) = entry(&idx, "float_ids");
    assert_eq!(state, "UNAVAILABLE");
    assert!(reason.contains("input_ids") && reason.contains("TYPE_FP32"), "{reason}");
    let (state, reason) = entry(&idx, "int_output");
    assert_eq!(state, "UNAVAILABLE");
    assert!(reason.contains("sentence_embedding") && reason.contains("TYPE_INT32"), "{reason}");
}

#[tokio::test]
async fn size_like_values_past_their_bounds_are_refused_and_a_refused_reload_keeps_serving() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_model(repo.path(), "bert", "TYPE_INT64", "TYPE_FP32", "dynamic_batching { }");
    bert_model(repo.path(), "unbatched", "TYPE_INT64", "TYPE_FP32", "");
    std::fs::write(
        repo.path().join("unbatched/config.pbtxt"),
        std::fs::read_to_string(repo.path().join("unbatched/config.pbtxt"))
            .expect("read")
            .replace("max_batch_size: 8", "max_batch_size: 0")
            .replace("dims: [ -1 ] }", "dims: [ 1, -1 ] }")
            .replace("dims: [ -1, 32 ]", "dims: [ 1, -1, 32 ]")
            .replace("dims: [ 32 ]", "dims: [ 1, 32 ]"),
    )
    .expect("write");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::Explicit, options()).await;
    let idx = index(&w).await;
    assert_eq!(entry(&idx, "bert").0, "READY");
    let (state, reason) = entry(&idx, "unbatched");
    assert_eq!(state, "UNAVAILABLE");
    assert!(reason.contains("max_batch_size"), "{reason}");

    // Today's code allocates one queue per priority level: 1e10 levels aborted the whole worker.
    let config = repo.path().join("bert/config.pbtxt");
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text.replace("dynamic_batching { }", "dynamic_batching { priority_levels: 10000000000 }"))
        .expect("write");
    let mut c = w.client().await;
    let e = c
        .repository_model_load(RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() })
        .await
        .expect_err("refused");
    assert!(e.message().contains("priority_levels") && e.message().contains("at most 1000"), "{}", e.message());
    let idx = index(&w).await;
    assert_eq!(entry(&idx, "bert").0, "READY", "the serving version stays");
}

/// Fields the worker would otherwise ignore are refused at load, each naming its field.
#[tokio::test]
async fn ignored_fields_are_refused_at_load_naming_the_field() {
    let repo = tempfile::tempdir().expect("tmp");
    let cases: &[(&str, &str, &str)] = &[
        ("backend_onnx", r#"backend: "onnxruntime""#, "backend"),
        ("platform_trt", r#"platform: "tensorrt_plan""#, "platform"),
        ("contradiction", "backend: \"cpu\"\nplatform: \"neuron\"", "contradicts"),
        ("neuron_on_cpu", r#"backend: "neuron""#, "runs the CPU backend"),
        (
            "batch_input",
            r#"batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_INT32 } ]"#,
            "batch_input",
        ),
        ("decoupled", "model_transaction_policy { decoupled: true }", "decoupled"),
        (
            "warmup_unknown",
            r#"model_warmup [ { name: "w" batch_size: 1 inputs { key: "nope" value: { data_type: TYPE_INT64 dims: [ 4 ] zero_data: true } } } ]"#,
            "'nope' is not an input",
        ),
        (
            "warmup_file",
            r#"model_warmup [ { name: "w" batch_size: 1 inputs [ { key: "input_ids" value: { data_type: TYPE_INT64 dims: [ 4 ] input_data_file: "x" } }, { key: "attention_mask" value: { data_type: TYPE_INT64 dims: [ 4 ] zero_data: true } } ] } ]"#,
            "input_data_file",
        ),
    ];
    for (name, extra, _) in cases {
        bert_model(repo.path(), name, "TYPE_INT64", "TYPE_FP32", extra);
    }
    // reshape and allow_ragged_batch sit on an input.
    bert_model(repo.path(), "reshape", "TYPE_INT64", "TYPE_FP32", "");
    bert_model(repo.path(), "ragged", "TYPE_INT64", "TYPE_FP32", "");
    let edit = |name: &str, with: &str| {
        let path = repo.path().join(name).join("config.pbtxt");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replacen("dims: [ -1 ] }", &format!("dims: [ -1 ] {with} }}"), 1)).expect("write");
    };
    edit("reshape", "reshape: { shape: [ -1 ] }");
    edit("ragged", "allow_ragged_batch: true");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let idx = index(&w).await;
    let all = cases.iter().map(|(n, _, w)| (*n, *w)).chain([("reshape", "reshape"), ("ragged", "allow_ragged_batch")]);
    for (name, words) in all {
        let (state, reason) = entry(&idx, name);
        assert_eq!(state, "UNAVAILABLE", "{name}: {reason}");
        assert!(reason.contains(words), "{name}: {reason}");
    }
}

/// `model_warmup` on the CPU: the sample runs `count` times before the model is ready (it shows in
/// `neuron_worker_warmup_executions`, not in the request counters).
#[tokio::test]
async fn warmup_runs_before_ready_on_the_cpu() {
    let repo = tempfile::tempdir().expect("tmp");
    let warm = r#"model_warmup [ { name: "w" batch_size: 2 count: 3 inputs [
        { key: "input_ids" value: { data_type: TYPE_INT64 dims: [ 5 ] random_data: true } },
        { key: "attention_mask" value: { data_type: TYPE_INT64 dims: [ 5 ] zero_data: true } } ] } ]"#;
    bert_model(repo.path(), "warm", "TYPE_INT64", "TYPE_FP32", warm);
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let idx = index(&w).await;
    assert_eq!(entry(&idx, "warm").0, "READY", "{:?}", entry(&idx, "warm"));
    let page = http_get(&w.server.metrics_addr.expect("metrics").to_string(), "/metrics").await;
    assert!(page.contains("neuron_worker_warmup_executions{model=\"warm\",version=\"1\"} 3"), "{page}");
    assert!(page.contains("neuron_worker_inference_exec_count{model=\"warm\",version=\"1\"} 0"), "{page}");
}

/// Every refused field, given over the repository API: a reload of a serving model fails naming
/// the field and the serving version (and its configuration) stays; a first load fails and the
/// model stays unloaded.
#[tokio::test]
async fn refused_fields_over_the_repository_api_keep_the_serving_version_or_stay_unloaded() {
    let repo = tempfile::tempdir().expect("tmp");
    bert_model(repo.path(), "bert", "TYPE_INT64", "TYPE_FP32", "");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::Explicit, options()).await;
    let mut c = w.client().await;
    let good = std::fs::read_to_string(repo.path().join("bert/config.pbtxt")).expect("read");
    let on_input = |with: &str| good.replacen("dims: [ -1 ] }", &format!("dims: [ -1 ] {with} }}"), 1);
    let extra = |with: &str| format!("{good}\n{with}");
    let cases: Vec<(String, &str)> = vec![
        (on_input("reshape: { shape: [ -1 ] }"), "input[0].reshape"),
        (on_input("allow_ragged_batch: true"), "input[0].allow_ragged_batch"),
        (
            extra(r#"batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "n" data_type: TYPE_INT32 } ]"#),
            "batch_input",
        ),
        (
            extra(
                r#"model_warmup [ { name: "w" batch_size: 1 inputs [ { key: "input_ids" value: { data_type: TYPE_INT64 dims: [ 4 ] input_data_file: "x" } }, { key: "attention_mask" value: { data_type: TYPE_INT64 dims: [ 4 ] zero_data: true } } ] } ]"#,
            ),
            "input_data_file",
        ),
        (extra(r#"backend: "python""#), "`backend`"),
        (extra(r#"platform: "onnxruntime_onnx""#), "`platform`"),
        (extra("model_transaction_policy { decoupled: true }"), "decoupled"),
        (extra("optimization { cuda { graphs: true } }"), "optimization.cuda"),
        (extra("instance_group [ { kind: KIND_GPU } ]"), "instance_group[0].kind"),
        (extra(r#"default_model_filename: "model.onnx""#), "default_model_filename"),
        (
            extra(r#"parameters { key: "neuron_batch_bucket" value: { string_value: "1,4" } }"#),
            "parameters.neuron_batch_bucket",
        ),
    ];
    for (i, (text, field)) in cases.iter().enumerate() {
        // A reload of the serving model.
        std::fs::write(repo.path().join("bert/config.pbtxt"), text).expect("write");
        let load = RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() };
        let e = c.repository_model_load(load).await.expect_err(field);
        assert!(e.message().contains(field), "{field}: {}", e.message());
        let ready = c.model_ready(ModelReadyRequest { name: "bert".into(), version: String::new() }).await;
        assert!(ready.expect("ready rpc").into_inner().ready, "{field}: the serving version stays");
        let cfg = c.model_config(ModelConfigRequest { name: "bert".into(), version: String::new() }).await;
        let cfg = cfg.expect("config rpc").into_inner().config.expect("config");
        assert!(cfg.input[0].reshape.is_none() && cfg.batch_input.is_empty() && cfg.optimization.is_none());
        assert!(cfg.backend.is_empty() && cfg.platform != "onnxruntime_onnx" && cfg.parameters.is_empty());
        // A first load of a new model.
        let name = format!("fresh{i}");
        bert_folder(&repo.path().join(&name).join("1"));
        std::fs::write(
            repo.path().join(&name).join("config.pbtxt"),
            text.replacen("\"bert\"", &format!("\"{name}\""), 1),
        )
        .expect("write");
        let load = RepositoryModelLoadRequest { model_name: name.clone(), ..Default::default() };
        let e = c.repository_model_load(load).await.expect_err(field);
        assert!(e.message().contains(field), "{field}: {}", e.message());
        let ready = c.model_ready(ModelReadyRequest { name: name.clone(), version: String::new() }).await;
        assert!(!ready.is_ok_and(|r| r.into_inner().ready), "{field}: {name} stays unloaded");
        let idx = index(&w).await;
        assert_eq!(entry(&idx, &name).0, "UNAVAILABLE", "{field}");
    }
    std::fs::write(repo.path().join("bert/config.pbtxt"), &good).expect("write");
    let load = RepositoryModelLoadRequest { model_name: "bert".into(), ..Default::default() };
    c.repository_model_load(load).await.expect("the good config loads again");
}
