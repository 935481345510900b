//! The CPU Llama-family decoder against HF transformers (fixtures from
//! tests/fixtures/llama/make_fixtures.py): logits at every position within 1e-4, 48 greedy tokens
//! identical, and bit-identical results whatever shares the step or however the prefill is chunked.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::{Path, PathBuf};

use neuron_worker::backend::cpu::llama::{LlamaConfig, LlamaModel, SafetensorsSource};
use neuron_worker::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};
use serde_json::Value;

const FIXTURES: [&str; 4] = ["llama-gqa", "llama-tied-llama3", "qwen2-bias-bf16", "mistral-f16"];
const BLOCK: usize = 16;

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama").join(name)
}

struct Prompt {
    ids: Vec<u32>,
    greedy: Vec<u32>,
    /// Logits of every position of ids + greedy[..47], `[rows, vocab]`.
    logits: Vec<f32>,
}

struct Fixture {
    model: LlamaModel,
    vocab: usize,
    tolerance: f32,
    prompts: Vec<Prompt>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(name: &str, num_blocks: usize) -> Fixture {
    let d = dir(name);
    let config = LlamaConfig::from_file(&d.join("config.json")).unwrap();
    let source = SafetensorsSource::open(&d).unwrap();
    let model = LlamaModel::new(config, &source, num_blocks, BLOCK, KvDtype::F32).unwrap();
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    let blob = std::fs::read(d.join("logits.bin")).unwrap();
    let all: Vec<f32> = blob.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let vocab = expected["vocab"].as_u64().unwrap() as usize;
    let prompts = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let off = p["logits_offset_rows"].as_u64().unwrap() as usize * vocab;
            let rows = p["logits_rows"].as_u64().unwrap() as usize;
            Prompt { ids: ids(&p["ids"]), greedy: ids(&p["greedy"]), logits: all[off..off + rows * vocab].to_vec() }
        })
        .collect();
    Fixture { model, vocab, tolerance: expected["tolerance"].as_f64().unwrap() as f32, prompts }
}

fn table(first: u32, positions: usize) -> Vec<u32> {
    (first..first + positions.div_ceil(BLOCK) as u32).collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs one sequence alone, in one chunk, asking every row's logits.
fn logits_alone(model: &mut LlamaModel, tokens: &[u32], first_block: u32) -> Vec<f32> {
    let blocks = table(first_block, tokens.len());
    let mut out = Vec::new();
    model.forward(&[SeqChunk { tokens, start: 0, blocks: &blocks, logits: LogitsWanted::All }], &mut out).unwrap();
    out
}

#[test]
fn logits_match_transformers_at_every_position() {
    for name in FIXTURES {
        let mut f = load(name, 64);
        for (pi, p) in f.prompts.iter().enumerate() {
            let mut seq = p.ids.clone();
            seq.extend_from_slice(&p.greedy[..p.greedy.len() - 1]);
            let got = logits_alone(&mut f.model, &seq, 0);
            assert_eq!(got.len(), p.logits.len(), "{name} prompt {pi}");
            let worst = got.iter().zip(&p.logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= f.tolerance, "{name} prompt {pi}: max |Δlogit| {worst} > {}", f.tolerance);
        }
    }
}

#[test]
fn greedy_tokens_match_transformers_over_48_steps() {
    for name in FIXTURES {
        let mut f = load(name, 64);
        for (pi, p) in f.prompts.iter().enumerate() {
            let total = p.ids.len() + p.greedy.len();
            let blocks = table(0, total);
            let mut out = Vec::new();
            f.model
                .forward(
                    &[SeqChunk { tokens: &p.ids, start: 0, blocks: &blocks, logits: LogitsWanted::Last }],
                    &mut out,
                )
                .unwrap();
            let mut generated = vec![argmax(&out)];
            while generated.len() < p.greedy.len() {
                let pos = p.ids.len() + generated.len() - 1;
                let tok = [*generated.last().unwrap()];
                out.clear();
                f.model
                    .forward(
                        &[SeqChunk { tokens: &tok, start: pos, blocks: &blocks, logits: LogitsWanted::Last }],
                        &mut out,
                    )
                    .unwrap();
                assert_eq!(out.len(), f.vocab);
                generated.push(argmax(&out));
            }
            assert_eq!(generated, p.greedy, "{name} prompt {pi}");
        }
    }
}

#[test]
fn batch_mates_and_chunking_do_not_change_a_bit() {
    for name in ["llama-gqa", "qwen2-bias-bf16"] {
        let mut f = load(name, 128);
        let p = &f.prompts[1];
        let mut seq = p.ids.clone();
        seq.extend_from_slice(&p.greedy[..20]);
        let alone = logits_alone(&mut f.model, &seq, 0);
        let vocab = f.vocab;

        // The same sequence prefilled in three chunks, each in its own step with other sequences.
        let others: Vec<Vec<u32>> =
            f.prompts.iter().map(|q| q.ids.iter().chain(&q.greedy).copied().collect()).collect();
        let target_blocks = table(10, seq.len());
        let cuts = [0, 5, 17, seq.len()];
        let mut chunked = Vec::new();
        for (step, w) in cuts.windows(2).enumerate() {
            // Seven batch mates of mixed lengths, each in its own blocks, around the target chunk.
            let mate_tables: Vec<Vec<u32>> = (0..7).map(|m| table(40 + 12 * m as u32, 70)).collect();
            let mut chunks = Vec::new();
            let mut mate_rows = Vec::new();
            for (m, mate_table) in mate_tables.iter().enumerate().take(7) {
                let src = &others[(m + step) % others.len()];
                let len = 1 + (m * 5 + step * 3) % src.len().min(30);
                chunks.push(SeqChunk {
                    tokens: &src[..len],
                    start: 0,
                    blocks: mate_table,
                    logits: if m % 2 == 0 { LogitsWanted::All } else { LogitsWanted::Last },
                });
                mate_rows.push(if m % 2 == 0 { len } else { 1 });
                if m == 3 {
                    chunks.push(SeqChunk {
                        tokens: &seq[w[0]..w[1]],
                        start: w[0],
                        blocks: &target_blocks,
                        logits: LogitsWanted::All,
                    });
                    mate_rows.push(usize::MAX);
                }
            }
            let mut out = Vec::new();
            f.model.forward(&chunks, &mut out).unwrap();
            let mut row = 0;
            for n in mate_rows {
                if n == usize::MAX {
                    let rows = w[1] - w[0];
                    chunked.extend_from_slice(&out[row * vocab..(row + rows) * vocab]);
                    row += rows;
                } else {
                    row += n;
                }
            }
            assert_eq!(row * vocab, out.len());
        }
        assert_eq!(chunked.len(), alone.len());
        let same = chunked.iter().zip(&alone).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{name}: chunked prefill among batch mates changed the logits");

        // The K/V the sequence left behind is the same too.
        let mut g = load(name, 128);
        logits_alone(&mut g.model, &seq, 10);
        assert_eq!(f.model.read_blocks(&target_blocks).unwrap(), g.model.read_blocks(&target_blocks).unwrap());
    }
}

#[test]
fn blocks_spill_restore_and_copy() {
    let mut f = load("llama-gqa", 16);
    let p = &f.prompts[0];
    let blocks = table(0, p.ids.len() + 1);
    let mut out = Vec::new();
    f.model
        .forward(&[SeqChunk { tokens: &p.ids, start: 0, blocks: &blocks, logits: LogitsWanted::Last }], &mut out)
        .unwrap();
    let saved = f.model.read_blocks(&blocks).unwrap();
    assert_eq!(saved.len(), blocks.len() * f.model.block_bytes());
    // Restore into other blocks and continue: the same next-token logits.
    let moved: Vec<u32> = blocks.iter().map(|b| b + 8).collect();
    f.model.write_blocks(&moved, &saved).unwrap();
    let tok = [p.greedy[0]];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let pos = p.ids.len();
    f.model
        .forward(&[SeqChunk { tokens: &tok, start: pos, blocks: &blocks, logits: LogitsWanted::Last }], &mut a)
        .unwrap();
    f.model
        .forward(&[SeqChunk { tokens: &tok, start: pos, blocks: &moved, logits: LogitsWanted::Last }], &mut b)
        .unwrap();
    assert_eq!(a, b);
    f.model.copy_block(blocks[0], 15).unwrap();
    assert_eq!(f.model.read_blocks(&[15]).unwrap(), f.model.read_blocks(&[blocks[0]]).unwrap());
    // Refusals name the problem.
    let err = f.model.copy_block(0, 99).unwrap_err().to_string();
    assert!(err.contains("99"), "{err}");
    let err = f
        .model
        .forward(&[SeqChunk { tokens: &[5000], start: 0, blocks: &[0], logits: LogitsWanted::Last }], &mut a)
        .unwrap_err()
        .to_string();
    assert!(err.contains("vocabulary"), "{err}");
}
