//! Forward time of a SmolLM2-135M-shaped Llama decoder with seeded random F32 weights (hidden 576, 30
//! layers, 9 heads / 3 KV heads, MLP 1536, vocabulary 49152): one-token decode at position 512, a decode
//! step of 8 sequences, and a 512-token prefill. `cargo bench --bench llama_forward`
//! (`NEURON_WORKER_ISA=avx2` measures the AVX2 kernels on an AVX-512 machine).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neuron_worker::backend::cpu::linear::linear_threads;
use neuron_worker::backend::cpu::linear_kernels::kernel_isa;
use neuron_worker::backend::cpu::llama::{LlamaConfig, LlamaModel, RandomWeights};
use neuron_worker::backend::generative::{DecoderInstance, KvDtype, LogitsWanted, SeqChunk};

const BLOCK: usize = 16;

fn smollm2_135m() -> LlamaConfig {
    LlamaConfig::from_json(
        r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,
        "num_attention_heads":9,"num_key_value_heads":3,"vocab_size":49152,"rms_norm_eps":1e-5,
        "rope_theta":100000.0,"max_position_embeddings":8192,"tie_word_embeddings":true}"#,
    )
    .expect("the benchmark's config parses")
}

fn bench(c: &mut Criterion) {
    let config = smollm2_135m();
    let vocab = config.vocab_size as u32;
    let mut model = LlamaModel::new(config.clone(), &RandomWeights::new(config, 7), 8 * 36, BLOCK, KvDtype::F32)
        .expect("the random model builds");
    println!("llama_forward: kernels {} | {} threads", kernel_isa().name(), linear_threads());
    let prompt: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let blocks: Vec<u32> = (0..33).collect();
    let mut logits = Vec::new();
    let mut group = c.benchmark_group("llama_135m_f32");
    group.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(10));

    group.throughput(Throughput::Elements(512));
    group.bench_function("prefill_512", |b| {
        b.iter(|| {
            logits.clear();
            model
                .forward(
                    &[SeqChunk { tokens: &prompt, start: 0, blocks: &blocks, logits: LogitsWanted::Last }],
                    &mut logits,
                )
                .expect("prefill runs");
        })
    });

    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_1_at_512", |b| {
        b.iter(|| {
            logits.clear();
            model
                .forward(
                    &[SeqChunk { tokens: &[42], start: 512, blocks: &blocks, logits: LogitsWanted::Last }],
                    &mut logits,
                )
                .expect("decode runs");
        })
    });

    // Eight sequences of 128 positions each decoding one token in one step.
    let tables: Vec<Vec<u32>> = (0..8u32).map(|s| (36 + s * 9..36 + s * 9 + 9).collect()).collect();
    for t in &tables {
        logits.clear();
        model
            .forward(
                &[SeqChunk { tokens: &prompt[..128], start: 0, blocks: t, logits: LogitsWanted::None }],
                &mut logits,
            )
            .expect("prefill runs");
    }
    group.throughput(Throughput::Elements(8));
    group.bench_function("decode_8_at_128", |b| {
        b.iter(|| {
            logits.clear();
            let chunks: Vec<SeqChunk<'_>> = tables
                .iter()
                .map(|t| SeqChunk { tokens: &[42], start: 128, blocks: t, logits: LogitsWanted::Last })
                .collect();
            model.forward(&chunks, &mut logits).expect("decode runs");
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
