//! Runs the CPU BERT forward of a MiniLM-L6-shaped model (random weights) in a loop, for profilers
//! (`perf record`, `valgrind --tool=callgrind`) and A/B timings of whole processes.
//!
//! ```sh
//! cargo build --release --example bert_forward
//! NEURON_WORKER_ISA=avx2 ./target/release/examples/bert_forward --batch 32 --seq 128 --reps 3
//! ```
//!
//! Flags: `--batch N` (32), `--seq N` (128), `--reps N` (3), `--threads N` (all cores), `--pad N`
//! (masked tokens at the end of every sequence, 0). Prints the ISA, the time per forward and the
//! sequences per second.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::time::Instant;

use neuron_worker::backend::cpu::gemm::isa_name;
use neuron_worker::backend::cpu::{BertConfig, BertModel, BertScratch, PoolingMode, default_threads};

fn minilm_shaped() -> BertModel {
    let config = BertConfig {
        hidden_size: 384,
        num_hidden_layers: 6,
        num_attention_heads: 12,
        intermediate_size: 1536,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-12,
        vocab_size: 30522,
        max_position_embeddings: 512,
        type_vocab_size: 2,
    };
    let mut state = 1u64;
    let built = BertModel::from_fn(config, PoolingMode::Mean, true, |name, shape| {
        let n: usize = shape.iter().product();
        let base = if name.contains("LayerNorm.weight") { 1.0 } else { 0.0 };
        Ok(Some(
            (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    base + ((state >> 40) as f32 / 16_777_216.0 - 0.5) * 0.1
                })
                .collect(),
        ))
    });
    match built {
        Ok(m) => m,
        Err(e) => panic!("generated model: {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, got {v}")))
    };
    let (batch, seq, reps) = (flag("--batch", 32), flag("--seq", 128), flag("--reps", 3));
    let threads = flag("--threads", default_threads());
    let pad = flag("--pad", 0).min(seq);
    let model = minilm_shaped();
    let ids: Vec<i64> = (0..batch * seq).map(|i| (i * 7919 % 30522) as i64).collect();
    let mask: Vec<i64> = (0..batch * seq).map(|i| i64::from(i % seq < seq - pad)).collect();
    let mut scratch = BertScratch::default();
    let mut check = 0.0f32;
    let start = Instant::now();
    for _ in 0..reps {
        match model.forward_with(&mut scratch, threads, &ids, &mask, None, batch, seq) {
            Ok(out) => check += out.sentence_embedding[0],
            Err(e) => panic!("forward: {e}"),
        }
    }
    let per = start.elapsed().as_secs_f64() / reps.max(1) as f64;
    println!(
        "isa {} threads {threads} b{batch} s{seq} pad {pad}: {:.1} ms/forward, {:.1} seq/s (check {check:.6})",
        isa_name(),
        per * 1e3,
        batch as f64 / per
    );
}
