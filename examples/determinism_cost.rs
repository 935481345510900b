//! What the batch-invariant f32 linear kernel costs against the fastest non-invariant one this
//! crate links: the `gemm` crate (its blocking and thread split depend on m, so a row's result can
//! change with the batch). Times `x[m, k] · Wᵀ` for the matrices of a SmolLM2-135M layer (fused
//! q/k/v 576→960, o 576→576, fused gate/up 576→3072, down 1536→576) and its head (576→49152), at
//! m = 1 (one decode stream), 16 (16 streams) and 512 (a prompt chunk), and the whole model's
//! products weighted by their sizes.
//!
//! `cargo run --release --example determinism_cost [threads]` (default: NEURON_WORKER_LINEAR_THREADS
//! or all cores; `NEURON_WORKER_ISA=avx2` for the AVX2 kernels).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benchmark code may panic on setup failures

use std::time::Instant;

use neuron_worker::backend::cpu::gemm::matmul_bt;
use neuron_worker::backend::cpu::linear::{Linear, linear_threads};
use neuron_worker::backend::cpu::linear_kernels::kernel_isa;

/// (name, n, k, matrices of this shape in the model).
const SHAPES: [(&str, usize, usize, usize); 5] = [
    ("qkv", 960, 576, 30),
    ("o_proj", 576, 576, 30),
    ("gate_up", 3072, 576, 30),
    ("down", 576, 1536, 30),
    ("lm_head", 49152, 576, 1),
];

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// Best of `reps` timings of `f`, seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(linear_threads);
    println!("kernels {} | {threads} threads | best of several runs per cell", kernel_isa().name());
    println!("{:>8} {:>6} {:>12} {:>12} {:>8}", "matrix", "m", "invariant µs", "gemm µs", "cost");
    for m in [1usize, 16, 512] {
        let (mut ours_total, mut gemm_total) = (0.0, 0.0);
        for &(name, n, k, count) in &SHAPES {
            let w = data(n * k, 7);
            let x = data(m * k, 3);
            let mut out = vec![0f32; m * n];
            let linear = Linear::dense(w.clone(), n, k).expect("shapes match");
            let reps = if m * n * k > 1 << 26 { 3 } else { 20 };
            let ours = best(reps, || linear.forward_with(&x, m, &mut out, threads));
            let theirs = best(reps, || matmul_bt(&x, &w, &mut out, m, k, n, threads));
            ours_total += ours * count as f64;
            gemm_total += theirs * count as f64;
            println!(
                "{name:>8} {m:>6} {:>12.1} {:>12.1} {:>7.0}%",
                ours * 1e6,
                theirs * 1e6,
                100.0 * (ours / theirs - 1.0)
            );
        }
        println!(
            "determinism: f32 products of one forward at m={m} invariant {:.2} ms, gemm {:.2} ms, cost {:+.0}%",
            ours_total * 1e3,
            gemm_total * 1e3,
            100.0 * (ours_total / gemm_total - 1.0)
        );
    }
}
