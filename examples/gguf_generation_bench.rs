//! Generation speed of a GGUF model on the CPU backend: prompt processing (one 512-token chunk),
//! single-stream decode tokens/s and the median decode step; `streams` sequences (128-token
//! prompts unless given) decoding together, one token each per step: total tokens/s and the p99
//! step time (each stream's inter-token latency), and the bytes of K/V such a step reads (mean
//! over the run); plus the memory-bandwidth roofline for decode (bytes of weights read per token
//! over a measured triad bandwidth). Prints one JSON object (read by
//! examples/generation_llamacpp_compare.py, which runs llama.cpp on the same file beside it).
//! The model is called directly (no server, no sampling), as llama.cpp is on the other side.
//!
//! `cargo run --release --example gguf_generation_bench -- MODEL.gguf [prompt_tokens] [decode_tokens] [streams] [stream_prompt_tokens]`
//! Threads: `NEURON_WORKER_QUANT_THREADS` (quantized products), `NEURON_WORKER_LINEAR_THREADS`
//! (f32 products); ISA cap: `NEURON_WORKER_ISA=avx2`; activations of the quantized products:
//! `NEURON_WORKER_ACTIVATION_BITS=8|16` (as `serve --activation-bits`, default 8); K/V cache:
//! `NEURON_WORKER_KV_CACHE_DTYPE=f16|f32` (default f16, as `serve` picks for a quantized GGUF).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::PathBuf;
use std::time::Instant;

use neuron_worker::backend::cpu::gguf::load_gguf_decoder;
use neuron_worker::backend::cpu::linear_kernels::kernel_isa;
use neuron_worker::backend::cpu::llama::LlamaModel;
use neuron_worker::backend::cpu::quant::{ActPrecision, QFormat, QuantPool, quant_isa};
use neuron_worker::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};

const BLOCK: usize = 16;

/// Triad `a = b + s·c` over 3 × 64 MiB on `threads` threads: bytes moved (3 arrays) per second.
fn triad_bandwidth(threads: usize) -> f64 {
    let n = 16 << 20;
    let b = vec![1.0f32; n];
    let c = vec![2.0f32; n];
    let mut a = vec![0.0f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            for ((a, b), c) in a.chunks_mut(per).zip(b.chunks(per)).zip(c.chunks(per)) {
                s.spawn(move || {
                    for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                        *a = b + 3.0 * c;
                    }
                });
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&a);
    (3 * n * 4) as f64 / best
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(
        args.next().ok_or("usage: gguf_generation_bench MODEL.gguf [prompt] [decode] [streams] [stream_prompt]")?,
    );
    let prompt_len: usize = args.next().map_or(Ok(512), |s| s.parse())?;
    let decode_len: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let streams: usize = args.next().map_or(Ok(16), |s| s.parse())?;
    // Each stream's prompt (its context when decoding starts): 128 unless given.
    let stream_prompt: usize = args.next().map_or(Ok(128), |s| s.parse())?;
    let files = load_gguf_decoder(&path)?;
    // Bytes of weights a decode step reads: every tensor once (a tied embedding once, as the head).
    let mut weight_bytes = 0usize;
    for t in &files.weights.file().tensors {
        let elems: u64 = t.dims.iter().product();
        let bytes = match QFormat::from_ggml_type(t.ggml_type) {
            Some(f) => f.tensor_bytes(1, elems as usize).unwrap_or(0),
            None => elems as usize * if t.ggml_type == 0 { 4 } else { 2 },
        };
        weight_bytes += bytes;
    }
    let vocab = files.config.vocab_size;
    let total = prompt_len + decode_len;
    let blocks: Vec<u32> = (0..total.div_ceil(BLOCK) as u32).collect();
    let per_stream = (stream_prompt + decode_len).div_ceil(BLOCK);
    // K/V element type: f16 (what `kv_cache_dtype: auto` serves a quantized GGUF with) unless
    // NEURON_WORKER_KV_CACHE_DTYPE=f32.
    let kv_dtype = match std::env::var("NEURON_WORKER_KV_CACHE_DTYPE").as_deref() {
        Ok("f32") => KvDtype::F32,
        _ => KvDtype::F16,
    };
    let mut model =
        LlamaModel::new(files.config, &files.weights, blocks.len() + streams * per_stream, BLOCK, kv_dtype)?;
    let act = match std::env::var("NEURON_WORKER_ACTIVATION_BITS").as_deref() {
        Ok("16") => ActPrecision::I16,
        _ => ActPrecision::I8,
    };
    model.set_activations(act);
    let prompt: Vec<u32> = (0..prompt_len).map(|i| (100 + (i * 7919) % (vocab - 200)) as u32).collect();
    let mut logits = Vec::new();
    // Warm-up, then the measured prefill (best of 2).
    let mut prefill = f64::MAX;
    for _ in 0..3 {
        logits.clear();
        let t = Instant::now();
        model.forward(
            &[SeqChunk { tokens: &prompt, start: 0, blocks: &blocks, logits: LogitsWanted::Last }],
            &mut logits,
        )?;
        prefill = prefill.min(t.elapsed().as_secs_f64());
    }
    let mut tok = logits.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
    let argmax = |row: &[f32]| {
        row.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    let mut single_steps = Vec::with_capacity(decode_len);
    let t = Instant::now();
    for step in 0..decode_len {
        logits.clear();
        let chunk = [tok];
        let s = Instant::now();
        model.forward(
            &[SeqChunk { tokens: &chunk, start: prompt_len + step, blocks: &blocks, logits: LogitsWanted::Last }],
            &mut logits,
        )?;
        single_steps.push(s.elapsed().as_secs_f64());
        tok = argmax(&logits);
    }
    let decode = t.elapsed().as_secs_f64();

    // `streams` sequences: each prefilled with its own 128-token prompt, then decoding together.
    let tables: Vec<Vec<u32>> = (0..streams)
        .map(|s| {
            let first = (blocks.len() + s * per_stream) as u32;
            (first..first + per_stream as u32).collect()
        })
        .collect();
    let mut toks = Vec::with_capacity(streams);
    for (s, table) in tables.iter().enumerate() {
        let p: Vec<u32> = (0..stream_prompt).map(|i| (100 + ((i + 17 * s) * 7919) % (vocab - 200)) as u32).collect();
        logits.clear();
        model.forward(&[SeqChunk { tokens: &p, start: 0, blocks: table, logits: LogitsWanted::Last }], &mut logits)?;
        toks.push(argmax(&logits));
    }
    let mut multi_steps = Vec::with_capacity(decode_len);
    let t = Instant::now();
    for step in 0..decode_len {
        logits.clear();
        let singles: Vec<[u32; 1]> = toks.iter().map(|&t| [t]).collect();
        let chunks: Vec<SeqChunk<'_>> = singles
            .iter()
            .zip(&tables)
            .map(|(tok, table)| SeqChunk {
                tokens: tok,
                start: stream_prompt + step,
                blocks: table,
                logits: LogitsWanted::Last,
            })
            .collect();
        let s = Instant::now();
        model.forward(&chunks, &mut logits)?;
        multi_steps.push(s.elapsed().as_secs_f64());
        toks = logits.chunks(vocab).map(argmax).collect();
    }
    let multi = t.elapsed().as_secs_f64();
    let quantile = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    let threads = QuantPool::global().threads();
    let bw = triad_bandwidth(threads);
    println!(
        "{}",
        serde_json::json!({
            "isa": quant_isa().name(),
            "activation_bits": if act == ActPrecision::I16 { 16 } else { 8 },
            "f32_isa": kernel_isa().name(),
            "threads": threads,
            "quant_spin_us": QuantPool::global().spin().as_micros() as u64,
            "prompt_tokens": prompt_len,
            "prompt_tok_s": prompt_len as f64 / prefill,
            "decode_tokens": decode_len,
            "decode_tok_s": decode_len as f64 / decode,
            "decode_step_p50_s": quantile(&mut single_steps, 0.5),
            "streams": streams,
            "stream_prompt_tokens": stream_prompt,
            "kv_cache_dtype": kv_dtype.name(),
            "streams_kv_bytes_per_step": streams * (stream_prompt + decode_len / 2) * model.config().num_hidden_layers * 2 * model.config().kv_dim() * kv_dtype.bytes(),
            "streams_total_tok_s": (streams * decode_len) as f64 / multi,
            "streams_step_p50_s": quantile(&mut multi_steps, 0.5),
            "streams_step_p99_s": quantile(&mut multi_steps, 0.99),
            "weight_bytes_per_token": weight_bytes,
            "triad_bytes_s": bw,
            "roofline_decode_tok_s": bw / weight_bytes as f64,
        })
    );
    Ok(())
}
