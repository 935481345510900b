//! Our logits of SmolLM2-135M-Instruct (Q4_1 GGUF) along the reference sequences of
//! tests/fixtures/smollm2_reference.json (each prompt followed by transformers' greedy tokens,
//! teacher-forced in one chunk), for examples/smollm2_logit_compare.py to set beside transformers'
//! and llama.cpp's.
//!
//!     cargo run --release --example smollm2_logits_dump -- [MODEL.gguf] [OUT.f32] [i8|i16]
//!
//! (MODEL defaults to $SMOLLM2_GGUF or ~/.cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf, OUT
//! to /tmp/smollm2_ours.f32; i8|i16: how the quantized products quantize activations, default i8.) Writes, per prompt in order, `steps` rows of `vocab` little-endian
//! f32: the logits after the prompt and after each of its first `steps - 1` greedy tokens.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // example code may panic on setup failures

use std::io::Write;
use std::path::{Path, PathBuf};

use neuron_worker::backend::cpu::gguf::load_gguf_decoder;
use neuron_worker::backend::cpu::llama::LlamaModel;
use neuron_worker::backend::cpu::quant::ActPrecision;
use neuron_worker::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};
use serde_json::Value;

fn main() {
    let mut args = std::env::args().skip(1);
    let model_path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/llm-reference/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
    });
    let out_path = args.next().unwrap_or_else(|| "/tmp/smollm2_ours.f32".into());
    let act = match args.next().as_deref() {
        Some("i16") => ActPrecision::I16,
        _ => ActPrecision::I8,
    };
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_reference.json"))
            .unwrap(),
    )
    .unwrap();
    let files = load_gguf_decoder(&model_path).unwrap();
    let vocab = files.config.vocab_size;
    let mut model = LlamaModel::new(files.config, &files.weights, 64, 16, KvDtype::F32).unwrap();
    model.set_activations(act);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&out_path).unwrap());
    let ids = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect::<Vec<_>>();
    for p in reference["prompts"].as_array().unwrap() {
        let prompt = ids(&p["ids"]);
        let greedy = ids(&p["greedy"]);
        let mut seq = prompt.clone();
        seq.extend_from_slice(&greedy[..greedy.len() - 1]);
        let blocks: Vec<u32> = (0..seq.len().div_ceil(16) as u32).collect();
        let mut out = Vec::new();
        model
            .forward(&[SeqChunk { tokens: &seq, start: 0, blocks: &blocks, logits: LogitsWanted::All }], &mut out)
            .unwrap();
        for row in out.chunks_exact(vocab).skip(prompt.len() - 1) {
            for v in row {
                file.write_all(&v.to_le_bytes()).unwrap();
            }
        }
    }
    file.flush().unwrap();
    eprintln!("wrote {out_path} (vocab {vocab})");
}
