//! Speed of the quantized matrix products alone, on SmolLM2-135M's shapes (q/k/v stacked, o,
//! gate/up stacked, down) with random Q4_1 weights: microseconds per product and nanoseconds per
//! output block (one weight row's block times one activation row), for several row counts `m`.
//!
//! `cargo run --release --example quant_kernel_bench -- [m ...] [--threads N] [--spin-us US] [--format q4_1|q4_0|q8_0] [--bits 8|16]`
//! (default m = 1 16 64; `--spin-us`: how long the pool's workers spin after a job, default the
//! worker's own default; `--bits`: activations quantized to 8 or 16 bits, default 8; ISA cap:
//! `NEURON_WORKER_ISA=avx2`). With one thread the times are the
//! calling thread's CPU time (less disturbed by other processes on a shared machine than wall time).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benchmark code may panic on setup failures

use std::time::{Duration, Instant};

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

use neuron_worker::backend::cpu::quant::{ActPrecision, QFormat, QMatrix, QuantPool, quant_isa};

fn main() {
    let mut ms = Vec::new();
    let mut threads = 1;
    let mut spin_us = neuron_worker::backend::cpu::quant::default_spin_us();
    let mut format = QFormat::Q4_1;
    let mut act = ActPrecision::I8;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()).unwrap_or(1),
            "--spin-us" => spin_us = args.next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "--format" => {
                format = match args.next().as_deref() {
                    Some("q4_0") => QFormat::Q4_0,
                    Some("q8_0") => QFormat::Q8_0,
                    _ => QFormat::Q4_1,
                }
            }
            "--bits" => act = if args.next().as_deref() == Some("16") { ActPrecision::I16 } else { ActPrecision::I8 },
            m => ms.push(m.parse::<usize>().expect("m is a number")),
        }
    }
    if ms.is_empty() {
        ms = vec![1, 16, 64];
    }
    let pool = QuantPool::new(threads, Duration::from_micros(spin_us));
    let shapes = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)];
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    println!("isa {} threads {threads} spin {spin_us} us format {format:?} activations {act:?}", quant_isa().name());
    for &m in &ms {
        let mut total = 0.0;
        let mut blocks = 0usize;
        for &(name, n, k) in &shapes {
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let q = QMatrix::quantize(format, &w, n, k).unwrap().with_activations(act);
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let mut out = vec![0.0; m * n];
            let reps = (200_000_000 / (m * n * k)).clamp(3, 2000);
            let mut best = f64::MAX;
            for _ in 0..3 {
                let (t, c) = (Instant::now(), thread_cpu());
                for _ in 0..reps {
                    q.forward_with(quant_isa(), &pool, &x, m, &mut out);
                }
                let spent = if threads == 1 { thread_cpu() - c } else { t.elapsed().as_secs_f64() };
                best = best.min(spent / reps as f64);
            }
            let nblk = m * n * k / 32;
            total += best;
            blocks += nblk;
            println!(
                "m {m:3} {name:8} [{n}x{k}] {:9.1} us  {:6.3} ns/output-block",
                best * 1e6,
                best * 1e9 / nblk as f64
            );
        }
        println!(
            "m {m:3} layer     {:9.1} us  {:6.3} ns/output-block  ({:.0} tok/s for 30 layers)",
            total * 1e6,
            total * 1e9 / blocks as f64,
            m as f64 / (30.0 * total)
        );
    }
}
