//! BERT encoder on a small generated checkpoint, against a plain-loop f64 reference written here.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// test and benchmark code may panic on setup failures
// The references are plain index loops on purpose: they should read like the math.
#![allow(clippy::needless_range_loop)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use neuron_worker::backend::BackendError;
use neuron_worker::backend::cpu::{BertModel, PoolingMode};

mod common;

use common::bert_fixture::*;
use safetensors::Dtype;

fn layer_norm(x: &mut [f64], g: &[f32], b: &[f32]) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    for i in 0..x.len() {
        x[i] = (x[i] - mean) / (var + 1e-12).sqrt() * g[i] as f64 + b[i] as f64;
    }
}

fn linear(x: &[f64], w: &[f32], b: &[f32], out: usize) -> Vec<f64> {
    let inp = x.len();
    (0..out).map(|o| b[o] as f64 + (0..inp).map(|i| x[i] * w[o * inp + i] as f64).sum::<f64>()).collect()
}

/// Returns (token states [seq][H], mean-pooled L2-normalised embedding).
fn reference(w: &Weights, ids: &[i64], mask: &[i64], types: &[i64]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let m: HashMap<&str, &Vec<f32>> = w.iter().map(|(n, _, v)| (n.as_str(), v)).collect();
    let t = |n: &str| m[n].as_slice();
    let seq = ids.len();
    let mut x: Vec<Vec<f64>> = (0..seq)
        .map(|s| {
            let mut row: Vec<f64> = (0..H)
                .map(|i| {
                    t("embeddings.word_embeddings.weight")[ids[s] as usize * H + i] as f64
                        + t("embeddings.position_embeddings.weight")[s * H + i] as f64
                        + t("embeddings.token_type_embeddings.weight")[types[s] as usize * H + i] as f64
                })
                .collect();
            layer_norm(&mut row, t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"));
            row
        })
        .collect();
    let dh = H / HEADS;
    for l in 0..LAYERS {
        let p = |s: &str| format!("encoder.layer.{l}.{s}");
        let proj = |x: &Vec<Vec<f64>>, name: &str, out: usize| -> Vec<Vec<f64>> {
            x.iter().map(|r| linear(r, t(&p(&format!("{name}.weight"))), t(&p(&format!("{name}.bias"))), out)).collect()
        };
        let q = proj(&x, "attention.self.query", H);
        let k = proj(&x, "attention.self.key", H);
        let v = proj(&x, "attention.self.value", H);
        let mut ctx = vec![vec![0.0f64; H]; seq];
        for h in 0..HEADS {
            for i in 0..seq {
                let mut scores: Vec<f64> = (0..seq)
                    .map(|j| {
                        let dot: f64 = (0..dh).map(|d| q[i][h * dh + d] * k[j][h * dh + d]).sum();
                        dot / (dh as f64).sqrt() + if mask[j] == 0 { -1e9 } else { 0.0 }
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                scores.iter_mut().for_each(|s| *s = (*s - max).exp());
                let sum: f64 = scores.iter().sum();
                for d in 0..dh {
                    ctx[i][h * dh + d] = (0..seq).map(|j| scores[j] / sum * v[j][h * dh + d]).sum();
                }
            }
        }
        let attn = proj(&ctx, "attention.output.dense", H);
        for s in 0..seq {
            let mut r: Vec<f64> = (0..H).map(|i| attn[s][i] + x[s][i]).collect();
            layer_norm(&mut r, t(&p("attention.output.LayerNorm.weight")), t(&p("attention.output.LayerNorm.bias")));
            x[s] = r;
        }
        let inter: Vec<Vec<f64>> = proj(&x, "intermediate.dense", INTER)
            .into_iter()
            .map(|r| r.into_iter().map(|v| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()))).collect())
            .collect();
        let out = proj(&inter, "output.dense", H);
        for s in 0..seq {
            let mut r: Vec<f64> = (0..H).map(|i| out[s][i] + x[s][i]).collect();
            layer_norm(&mut r, t(&p("output.LayerNorm.weight")), t(&p("output.LayerNorm.bias")));
            x[s] = r;
        }
    }
    let count = mask.iter().filter(|m| **m != 0).count() as f64;
    let mut emb: Vec<f64> =
        (0..H).map(|i| (0..seq).filter(|s| mask[*s] != 0).map(|s| x[s][i]).sum::<f64>() / count).collect();
    let norm = emb.iter().map(|v| v * v).sum::<f64>().sqrt();
    emb.iter_mut().for_each(|v| *v /= norm);
    (x, emb)
}

fn max_diff(a: &[f32], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

const SENTENCES: [&[i64]; 3] = [&[1, 17, 42, 99, 3, 2], &[1, 5, 2], &[1, 88, 0, 64, 12, 7, 31, 2]];

fn padded(batch: &[&[i64]]) -> (Vec<i64>, Vec<i64>, Vec<i64>, usize) {
    let seq = batch.iter().map(|s| s.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut types) = (Vec::new(), Vec::new(), Vec::new());
    for s in batch {
        for p in 0..seq {
            ids.push(s.get(p).copied().unwrap_or(0));
            mask.push(i64::from(p < s.len()));
            types.push(i64::from(p >= 3 && p < s.len()));
        }
    }
    (ids, mask, types, seq)
}

fn check_against_reference(dtype: Dtype, prefix: &str, tol: f64) {
    let (dir, w) = checkpoint(dtype, prefix, true);
    let model = BertModel::load(dir.path()).expect("load");
    let info = model.info();
    assert_eq!((info.hidden_size, info.vocab_size, info.max_position_embeddings), (H, VOCAB, MAX_POS));
    assert!(info.has_token_type_embeddings && info.normalize);
    assert_eq!(info.pooling, PoolingMode::Mean);
    let (ids, mask, types, seq) = padded(&SENTENCES);
    let out = model.forward(&ids, &mask, Some(&types), SENTENCES.len(), seq).expect("forward");
    assert_eq!(out.last_hidden_state.len(), SENTENCES.len() * seq * H);
    for (b, _) in SENTENCES.iter().enumerate() {
        let r = b * seq..(b + 1) * seq;
        let (states, emb) = reference(&w, &ids[r.clone()], &mask[r.clone()], &types[r]);
        let got = &out.sentence_embedding[b * H..(b + 1) * H];
        assert!(max_diff(got, &emb) < tol, "{dtype:?} sentence {b}: {}", max_diff(got, &emb));
        for s in 0..SENTENCES[b].len() {
            let row = &out.last_hidden_state[(b * seq + s) * H..(b * seq + s + 1) * H];
            assert!(max_diff(row, &states[s]) < 10.0 * tol, "{dtype:?} state {b},{s}");
        }
    }
}

#[test]
fn f32_checkpoint_matches_reference() {
    check_against_reference(Dtype::F32, "", 2e-5);
}

#[test]
fn prefixed_f16_and_bf16_checkpoints_match_reference_of_rounded_weights() {
    check_against_reference(Dtype::F16, "bert.", 2e-5);
    check_against_reference(Dtype::BF16, "", 2e-5);
    // And stay close to the f32 model.
    let (d32, _) = checkpoint(Dtype::F32, "", true);
    let (d16, _) = checkpoint(Dtype::BF16, "", true);
    let (ids, mask, types, seq) = padded(&SENTENCES);
    let run = |d: &Path| {
        BertModel::load(d)
            .expect("load")
            .forward(&ids, &mask, Some(&types), 3, seq)
            .expect("forward")
            .sentence_embedding
    };
    let (a, b) = (run(d32.path()), run(d16.path()));
    for s in 0..3 {
        let cos: f32 = (0..H).map(|i| a[s * H + i] * b[s * H + i]).sum();
        assert!(cos > 0.999, "bf16 vs f32 cosine {cos}");
    }
}

#[test]
fn padding_does_not_change_a_sentence() {
    let (dir, _) = checkpoint(Dtype::F32, "", true);
    let model = BertModel::load(dir.path()).expect("load");
    let alone = &SENTENCES[1..2];
    let (ids, mask, types, seq) = padded(alone);
    let single = model.forward(&ids, &mask, Some(&types), 1, seq).expect("alone");
    let (ids, mask, types, seq_b) = padded(&SENTENCES);
    let batch = model.forward(&ids, &mask, Some(&types), 3, seq_b).expect("batch");
    for i in 0..H {
        let d = (single.sentence_embedding[i] - batch.sentence_embedding[H + i]).abs();
        assert!(d < 1e-5, "embedding {i} moved by {d}");
    }
    for s in 0..seq {
        for i in 0..H {
            let d = (single.last_hidden_state[s * H + i] - batch.last_hidden_state[(seq_b + s) * H + i]).abs();
            assert!(d < 1e-4, "state {s},{i} moved by {d}");
        }
    }
}

fn expect_invalid(r: Result<impl std::fmt::Debug, BackendError>, input: &str, words: &[&str]) {
    match r {
        Err(BackendError::InvalidInput { name, reason }) => {
            assert_eq!(name, input, "{reason}");
            for w in words {
                assert!(reason.contains(w), "'{reason}' lacks '{w}'");
            }
        }
        other => panic!("expected InvalidInput for {input}, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_explained_not_panics() {
    let (dir, _) = checkpoint(Dtype::F32, "", false);
    let model = BertModel::load(dir.path()).expect("load");
    let m = |n: usize| vec![1i64; n];
    expect_invalid(model.forward(&[1, 100], &m(2), None, 1, 2), "input_ids", &["100", "0..100"]);
    expect_invalid(model.forward(&[-1, 5], &m(2), None, 1, 2), "input_ids", &["-1"]);
    expect_invalid(model.forward(&[1, 5], &m(2), Some(&[0, 2]), 1, 2), "token_type_ids", &["2", "0..2"]);
    expect_invalid(model.forward(&[1; 17], &m(17), None, 1, 17), "input_ids", &["17", "16"]);
    expect_invalid(model.forward(&[1, 5, 6], &m(2), None, 1, 3), "attention_mask", &["2", "3"]);
    expect_invalid(model.forward(&[1, 5], &[1, 2], None, 1, 2), "attention_mask", &["2"]);
    expect_invalid(model.forward(&[1, 5], &m(2), None, 2, 2), "input_ids", &["2", "4"]);
    // Without modules.json: mean pooling, not normalised.
    let out = model.forward(&[1, 5, 9], &[1, 1, 0], None, 1, 3).expect("forward");
    let mean: Vec<f32> = (0..H).map(|i| (out.last_hidden_state[i] + out.last_hidden_state[H + i]) / 2.0).collect();
    for i in 0..H {
        assert!((out.sentence_embedding[i] - mean[i]).abs() < 1e-6);
    }
    assert!(!model.info().normalize);
}

#[test]
fn missing_or_misshapen_tensors_name_file_and_tensor() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut w = generate(7);
    w.retain(|(n, _, _)| n != "encoder.layer.1.output.dense.bias");
    write_checkpoint(dir.path(), &w, Dtype::F32, "", false);
    let err = BertModel::load(dir.path()).expect_err("missing tensor");
    let msg = err.to_string();
    assert!(matches!(err, BackendError::Load(_)));
    assert!(msg.contains("model.safetensors") && msg.contains("encoder.layer.1.output.dense.bias"), "{msg}");
    assert!(msg.contains("[32]"), "{msg}");

    let mut w = generate(7);
    for (n, s, v) in w.iter_mut() {
        if n == "encoder.layer.0.intermediate.dense.weight" {
            *s = vec![H, INTER];
            v.truncate(H * INTER);
        }
    }
    write_checkpoint(dir.path(), &w, Dtype::F32, "", false);
    let msg = BertModel::load(dir.path()).expect_err("wrong shape").to_string();
    assert!(msg.contains("intermediate.dense.weight") && msg.contains("[32, 64]") && msg.contains("[64, 32]"), "{msg}");
    std::fs::remove_file(dir.path().join("config.json")).expect("rm");
    let msg = BertModel::load(dir.path()).expect_err("no config").to_string();
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn instance_runs_int32_inputs_without_token_types() {
    use neuron_worker::backend::cpu::{CpuInstance, CpuModel};
    use neuron_worker::backend::{BatchInput, ModelInstance};
    use neuron_worker::tensor::{DataType, TensorView};
    let (dir, _) = checkpoint(Dtype::F32, "", true);
    let model = Arc::new(CpuModel::Bert(BertModel::load(dir.path()).expect("load")));
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let mut inst = CpuInstance::new(
        Arc::clone(&model),
        names(&["input_ids", "attention_mask", "token_type_ids"]),
        names(&["last_hidden_state", "sentence_embedding"]),
        2,
        0,
    )
    .expect("instance");
    let (ids, mask, _, seq) = padded(&SENTENCES);
    let i32s = |v: &[i64]| v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect::<Vec<u8>>();
    let (idb, mb) = (i32s(&ids), i32s(&mask));
    let shape = [3usize, seq];
    let inputs = [
        BatchInput { name: "input_ids", tensor: TensorView { dtype: DataType::Int32, shape: &shape, data: &idb } },
        BatchInput { name: "attention_mask", tensor: TensorView { dtype: DataType::Int32, shape: &shape, data: &mb } },
    ];
    let out = inst.execute(&inputs).expect("execute");
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].name.as_str(), out[0].tensor.shape.clone()), ("last_hidden_state", vec![3, seq, H]));
    assert_eq!((out[1].name.as_str(), out[1].tensor.shape.clone()), ("sentence_embedding", vec![3, H]));
    let CpuModel::Bert(bert) = &*model else { panic!("bert") };
    let zeros = vec![0i64; ids.len()];
    let direct = bert.forward(&ids, &mask, Some(&zeros), 3, seq).expect("forward");
    let got = out[1].tensor.view().to_f32().expect("f32");
    assert!(got.iter().zip(&direct.sentence_embedding).all(|(a, b)| (a - b).abs() < 1e-6));
    let fp = vec![0u8; ids.len() * 4];
    let bad = [
        BatchInput { name: "input_ids", tensor: TensorView { dtype: DataType::Fp32, shape: &shape, data: &fp } },
        BatchInput { name: "attention_mask", tensor: TensorView { dtype: DataType::Int32, shape: &shape, data: &mb } },
    ];
    expect_invalid(inst.execute(&bad), "input_ids", &["FP32", "INT64"]);
}
