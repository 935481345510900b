//! Times one forward of the built-in `mlp` (256→1024→1024→256, ~6 MB of f32 weights) at several
//! batch sizes, on the calling thread's default thread count, and prints each batch's time as a
//! multiple of a batch of 1: the "does a batch of 8 cost well under 8 batches of 1" check.
//!
//! ```sh
//! cargo build --release --example mlp_batch_cost
//! ./target/release/examples/mlp_batch_cost --reps 200
//! NEURON_WORKER_ISA=avx2 ./target/release/examples/mlp_batch_cost --reps 200
//! ```
//!
//! Flags: `--reps N` (200 forwards per batch size; the median is printed), `--threads N` (all
//! cores), `--gemm` (every layer through `gemm::matmul` at every batch size, as before the
//! small-batch kernel: the A/B in one binary). Batch sizes are run interleaved, so load from other
//! processes hits them alike.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benchmark code may panic on setup failures

use std::time::Instant;

use neuron_worker::backend::cpu::gemm::{self, isa_name};
use neuron_worker::backend::cpu::{DenseStack, default_threads, mlp_weights, ops};

/// The dense forward through `gemm::matmul` only (the path before the small-batch kernel).
fn forward_gemm(stack: &DenseStack, x: &[f32], batch: usize, threads: usize) -> Vec<f32> {
    let mut cur = x.to_vec();
    for layer in &stack.layers {
        let mut next = vec![0.0f32; batch * layer.out_dim];
        gemm::matmul(&cur, &layer.weight, &mut next, batch, layer.in_dim, layer.out_dim, threads);
        ops::bias_activation(&mut next, &layer.bias, layer.activation, threads);
        cur = next;
    }
    cur
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |v| v.parse().unwrap())
    };
    let reps = flag("--reps", 200);
    let threads = flag("--threads", default_threads());
    let via_gemm = args.iter().any(|a| a == "--gemm");
    let stack = mlp_weights();
    let batches = [1usize, 2, 4, 8, 16, 32, 64];
    let inputs: Vec<Vec<f32>> =
        batches.iter().map(|b| (0..b * 256).map(|i| ((i as f32) * 0.013).sin()).collect()).collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(reps); batches.len()];
    let mut sink = 0.0f32;
    for rep in 0..reps + 5 {
        for (i, b) in batches.iter().enumerate() {
            let t = Instant::now();
            let y = if via_gemm {
                forward_gemm(&stack, &inputs[i], *b, threads)
            } else {
                stack.forward_threads(&inputs[i], *b, threads)
            };
            let us = t.elapsed().as_secs_f64() * 1e6;
            sink += y[0];
            if rep >= 5 {
                times[i].push(us);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    let path = if via_gemm { "gemm::matmul" } else { "DenseStack::forward_threads" };
    println!("{path}: isa {} threads {threads} reps {reps} (checksum {sink:.3})", isa_name());
    println!("| batch | median µs | × batch 1 | µs per row |");
    println!("| --- | --- | --- | --- |");
    for (b, m) in batches.iter().zip(&medians) {
        println!("| {b} | {m:.1} | {:.2} | {:.1} |", m / medians[0], m / *b as f64);
    }
}
