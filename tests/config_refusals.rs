//! Configurations the worker cannot serve are refused at load, with the reason in the repository
//! index, instead of loading READY and failing every request.

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
