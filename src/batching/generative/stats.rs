//! Counters, gauges and latency histograms of one generative model version, written by its step
//! loops and read at scrape time (`/metrics`, `/capacity`). Atomics only.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// Upper bounds (seconds) of the latency histogram buckets (time to first token, inter-token).
pub const LATENCY_BUCKETS_S: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A fixed-bucket histogram of seconds (Prometheus semantics: cumulative at read time).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (non-cumulative); the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    /// Sum of observations, nanoseconds.
    sum_ns: AtomicU64,
    /// Number of observations.
    count: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn observe(&self, seconds: f64) {
        let i = LATENCY_BUCKETS_S.iter().position(|&b| seconds <= b).unwrap_or(LATENCY_BUCKETS_S.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add((seconds * 1e9) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf), the sum in seconds, and the count.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS_S.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            out.push((LATENCY_BUCKETS_S.get(i).copied().unwrap_or(f64::INFINITY), acc));
        }
        (out, self.sum_ns.load(Relaxed) as f64 / 1e9, self.count.load(Relaxed))
    }
}

/// The statistics of one generative model version (all instances).
#[derive(Debug, Default)]
pub struct GenerativeStats {
    /// Sequences in the running set (holding K/V blocks), all instances.
    pub running: AtomicU64,
    /// Sequences waiting for admission (queued or preempted), all instances.
    pub waiting: AtomicU64,
    /// K/V blocks owned by sequences, all instances.
    pub kv_blocks_used: AtomicU64,
    /// K/V blocks in the pools, all instances.
    pub kv_blocks_total: AtomicU64,
    /// Bytes of the K/V pools, all instances (the KV budget: device memory on Neuron).
    pub kv_bytes_total: AtomicU64,
    /// Token positions the K/V pools hold (blocks × positions per block), all instances.
    pub kv_tokens_total: AtomicU64,
    /// The K/V element type of the instances' pools (set when the first instance starts; every
    /// instance of a version has the same one).
    pub kv_dtype: std::sync::OnceLock<crate::backend::generative::KvDtype>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Prompt tokens whose K/V came from the prefix cache.
    pub prefix_cached_tokens: AtomicU64,
    /// Preemptions (a running sequence's blocks freed, to be recomputed).
    pub preemptions: AtomicU64,
    /// Sequences moved off an instance that left service, continued on another one.
    pub moved_sequences: AtomicU64,
    /// Tokens picked on the device (greedy, by compiled programs with token ids out).
    pub device_sampled_tokens: AtomicU64,
    /// Tokens whose K/V was already computed (a kept session's history, a prefix-cache hit) but
    /// were recomputed because the decoder can only prefill from position 0.
    pub recomputed_tokens: AtomicU64,
    /// Forward steps run.
    pub steps: AtomicU64,
    /// Requests finished by a stop condition.
    pub finished_stop: AtomicU64,
    /// Requests finished by length.
    pub finished_length: AtomicU64,
    /// Requests whose client went away before they finished.
    pub cancelled: AtomicU64,
    /// Generations cut short by the worker's exit deadline (finish reason `abort`).
    pub cut_short: AtomicU64,
    /// Open conversation sessions, all instances (gauge).
    pub sessions_open: AtomicU64,
    /// Open sessions whose K/V blocks are resident in the pool (gauge); the others keep their
    /// tokens and recompute what the prefix cache no longer holds on their next turn.
    pub sessions_resident: AtomicU64,
    /// Session turns started.
    pub session_turns: AtomicU64,
    /// Times an idle session released its K/V blocks to make room (least recently used first).
    pub session_kv_released: AtomicU64,
    /// Open sessions whose state is in the session store, their blocks released (gauge).
    pub sessions_stored: AtomicU64,
    /// K/V bytes of open sessions resident in the pool (gauge).
    pub session_kv_bytes_resident: AtomicU64,
    /// K/V bytes of open sessions held by the session store (gauge).
    pub session_kv_bytes_stored: AtomicU64,
    /// Idle sessions written to the session store (blocks released, at drain, or when their
    /// instance failed).
    pub session_spilled: AtomicU64,
    /// Sessions whose state came back from the session store for a turn.
    pub session_restored: AtomicU64,
    /// Idle sessions that released their blocks keeping only their tokens (no store, or it
    /// failed): their next turn recomputes what the prefix cache no longer holds.
    pub session_dropped_to_tokens: AtomicU64,
    /// Writes or reads of the session store that failed.
    pub session_store_failures: AtomicU64,
    /// Sessions that could not be saved when their instance stopped (lost).
    pub sessions_lost: AtomicU64,
    /// Time from arrival to the first generated token.
    pub time_to_first_token: LatencyHistogram,
    /// Time between two generated tokens of a sequence.
    pub inter_token_latency: LatencyHistogram,
}

impl GenerativeStats {
    /// K/V cache usage, 0–1 (blocks owned by sequences over blocks in the pools).
    pub fn kv_cache_usage(&self) -> f64 {
        let total = self.kv_blocks_total.load(Relaxed);
        if total == 0 { 0.0 } else { self.kv_blocks_used.load(Relaxed) as f64 / total as f64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(0.0005);
        h.observe(0.02);
        h.observe(100.0);
        let (b, sum, n) = h.snapshot();
        assert_eq!(n, 3);
        assert!((sum - 100.0205).abs() < 1e-6);
        assert_eq!(b[0], (0.001, 1));
        assert_eq!(b[4], (0.025, 2));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 3)));
    }
}
