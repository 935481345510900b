//! Kernel benchmarks: f32 GEMM at BERT shapes (GFLOP/s, % of peak) and a MiniLM-shaped BERT forward
//! (sequences per second). `cargo bench --bench kernels`.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use neuron_worker::backend::cpu::gemm::{flops_per_cycle, isa_name};
use neuron_worker::backend::cpu::{BertConfig, BertModel, BertScratch, PoolingMode, default_threads, matmul_bt};

/// Nominal clock from /proc/cpuinfo (first "cpu MHz" line), in GHz.
fn ghz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0.0, |mhz| mhz / 1000.0)
}

fn peak_gflops() -> f64 {
    default_threads() as f64 * flops_per_cycle() as f64 * ghz()
}

fn bench_gemm(c: &mut Criterion) {
    let threads = default_threads();
    println!(
        "isa {} | {} threads | {:.2} GHz | peak {:.0} GFLOP/s ({} FLOP/cycle/core)",
        isa_name(),
        threads,
        ghz(),
        peak_gflops(),
        flops_per_cycle()
    );
    let mut group = c.benchmark_group("gemm_f32");
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    // (m, k, n): QKV-sized, FFN up, FFN down for batch 32 × seq 128 MiniLM; weight as [n, k].
    for (m, k, n) in [(4096, 384, 384), (4096, 384, 1536), (4096, 1536, 384)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 97) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 89) as f32 * 0.01).collect();
        let mut out = vec![0.0f32; m * n];
        let flops = 2 * m * k * n;
        group.throughput(Throughput::Elements(flops as u64));
        let id = format!("{m}x{k}x{n}");
        group.bench_function(BenchmarkId::from_parameter(&id), |bench| {
            bench.iter(|| matmul_bt(&a, &b, &mut out, m, k, n, threads))
        });
        let reps = 20;
        let start = Instant::now();
        for _ in 0..reps {
            matmul_bt(&a, &b, &mut out, m, k, n, threads);
        }
        let gflops = flops as f64 * reps as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("gemm {id}: {gflops:.1} GFLOP/s = {:.0}% of peak", 100.0 * gflops / peak_gflops());
    }
    group.finish();
}

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

fn bench_bert(c: &mut Criterion) {
    let model = minilm_shaped();
    let threads = default_threads();
    let seq = 128;
    let mut group = c.benchmark_group("bert_minilm_forward");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    for batch in [1usize, 8, 32] {
        let ids: Vec<i64> = (0..batch * seq).map(|i| (i * 7919 % 30522) as i64).collect();
        let mask = vec![1i64; batch * seq];
        let mut scratch = BertScratch::default();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new("seq128", batch), |bench| {
            bench.iter(|| model.forward_with(&mut scratch, threads, &ids, &mask, None, batch, seq))
        });
        let reps = if batch == 32 { 3 } else { 10 };
        let start = Instant::now();
        for _ in 0..reps {
            let _ = model.forward_with(&mut scratch, threads, &ids, &mask, None, batch, seq);
        }
        let per = start.elapsed().as_secs_f64() / reps as f64;
        println!("bert b{batch} s{seq}: {:.1} ms/batch, {:.1} seq/s", per * 1e3, batch as f64 / per);
    }
    group.finish();
}

/// The softmax normaliser over a vocabulary row, once per generated token: ours against the
/// straightforward scalar form (f64 `exp` per entry) it replaced.
fn bench_log_sum_exp(c: &mut Criterion) {
    use neuron_worker::batching::generative::softmax_sum::log_sum_exp;
    let mut group = c.benchmark_group("log_sum_exp");
    for vocab in [49_152usize, 128_256] {
        let logits: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 * 0.031 - 12.0).collect();
        group.throughput(Throughput::Elements(vocab as u64));
        group.bench_with_input(BenchmarkId::new("vectorised", vocab), &logits, |b, l| b.iter(|| log_sum_exp(l)));
        group.bench_with_input(BenchmarkId::new("scalar_f64_exp", vocab), &logits, |b, l| {
            b.iter(|| {
                let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = l.iter().map(|&x| f64::from(x - max).exp()).sum();
                max + sum.ln() as f32
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_gemm, bench_bert, bench_log_sum_exp);
criterion_main!(benches);
