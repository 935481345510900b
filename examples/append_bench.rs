//! The forward pass of a kept session's turn, alone (no step loop, no sampling): 16 new tokens (and 1,
//! a decode step) appended after H tokens of history already in the K/V pool, timed at several H. The difference
//! between two history lengths is the cost of attending over the extra history; the time at the
//! shortest is mostly the 16-row weight products.
//!
//! `cargo run --release --example append_bench -- MODEL.gguf [H ...]` (default H = 0 1024 2048).
//! The thread count comes from the usual environment (`NEURON_WORKER_LINEAR_THREADS`, else the cores).
//! Prints lines `append: ...` (wall time, and the process's CPU time over all threads, which a
//! loaded machine disturbs less), medians of 7 repetitions (`APPEND_BENCH_REPS` to change; more make a
//! profile of the appends alone).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // benchmark code may panic on setup failures

use std::path::PathBuf;
use std::time::{Duration, Instant};

use neuron_worker::backend::generative::{LogitsWanted, SeqChunk};
use neuron_worker::config::generative::GenerativeSpec;
use neuron_worker::repository::generative::{DecoderSource, load};

/// CPU time of the whole process (all threads): less sensitive to other processes than wall time.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().expect("a GGUF model path"));
    let histories: Vec<usize> = {
        let v: Vec<usize> = args.map(|a| a.parse().expect("a history length")).collect();
        if v.is_empty() { vec![0, 1024, 2048] } else { v }
    };
    let spec = GenerativeSpec { kv_cache_memory: 1 << 30, max_batched_tokens: 4096, ..GenerativeSpec::default() };
    let mut loaded = load(&DecoderSource::Gguf(path), &spec, 1).expect("model loads");
    let mut model = loaded.decoders.pop().expect("one decoder");
    let (vocab, bs) = (model.shape().vocab, model.shape().block_size);
    let longest = histories.iter().max().copied().unwrap_or(0) + 16;
    let blocks: Vec<u32> = (0..longest.div_ceil(bs) as u32).collect();
    assert!(blocks.len() <= model.num_blocks(), "the pool holds {} blocks", model.num_blocks());
    let tokens: Vec<u32> = (0..longest as u64).map(|i| ((i * 7919 + 13) % vocab as u64) as u32).collect();
    let mut logits = Vec::new();
    let reps: usize = std::env::var("APPEND_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(7).max(1);
    let mut filled = 0;
    for &h in &histories {
        // Prefill the history up to h (chunks of 512), once, growing from the previous length.
        while filled < h {
            let end = (filled + 512).min(h);
            let chunk =
                SeqChunk { tokens: &tokens[filled..end], start: filled, blocks: &blocks, logits: LogitsWanted::None };
            model.forward(&[chunk], &mut logits).expect("prefill");
            filled = end;
        }
        for new in [16, 1] {
            let (mut times, mut cpu) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                logits.clear();
                let tokens = &tokens[h..h + new];
                let chunk = SeqChunk { tokens, start: h, blocks: &blocks, logits: LogitsWanted::Last };
                let (t, c) = (Instant::now(), cpu_time());
                model.forward(&[chunk], &mut logits).expect("append");
                times.push(t.elapsed());
                cpu.push(cpu_time().saturating_sub(c));
            }
            times.sort();
            cpu.sort();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "append: {new} token(s) after {h} tokens of history: {:.2} ms (min {:.2}); cpu time {:.2} ms",
                ms(times[reps / 2]),
                ms(times[0]),
                ms(cpu[reps / 2])
            );
        }
    }
}
