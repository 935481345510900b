//! Latency and outcome of session-store operations, per kind (counters and a fixed-bucket
//! histogram, lock-free), for `/metrics`: a fleet operator sees a slow or failing store before
//! sessions are lost.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A kind of store operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// Writing sessions (`put_all`, `put_raw`).
    Put,
    /// Taking a session out (`take`).
    Take,
    /// Looking a session up (`contains`).
    Contains,
    /// Removing sessions (`remove`, `remove_all`).
    Remove,
    /// Listing a model's sessions (`list`).
    List,
}

impl StoreOp {
    /// Every kind, in metric order.
    pub const ALL: [StoreOp; 5] = [StoreOp::Put, StoreOp::Take, StoreOp::Contains, StoreOp::Remove, StoreOp::List];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            StoreOp::Put => "put",
            StoreOp::Take => "take",
            StoreOp::Contains => "contains",
            StoreOp::Remove => "remove",
            StoreOp::List => "list",
        }
    }
}

/// Upper bounds (seconds) of the latency histogram's buckets (`+Inf` is implied).
pub const BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0];

/// Counters of one kind of operation.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Operations that succeeded.
    pub ok: AtomicU64,
    /// Operations that failed.
    pub failed: AtomicU64,
    /// Sum of their durations, nanoseconds.
    pub nanos: AtomicU64,
    /// Cumulative-by-render bucket counts (`buckets[i]`: durations ≤ `BUCKETS[i]`, not cumulative
    /// here; the last one counts what is above every bound).
    pub buckets: [AtomicU64; BUCKETS.len() + 1],
}

/// Every kind's counters.
#[derive(Debug, Default)]
pub struct StoreStats {
    ops: [OpStats; StoreOp::ALL.len()],
}

impl StoreStats {
    /// Records one operation.
    pub fn record(&self, op: StoreOp, took: Duration, ok: bool) {
        let s = self.get(op);
        if ok { &s.ok } else { &s.failed }.fetch_add(1, Relaxed);
        s.nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        let secs = took.as_secs_f64();
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        s.buckets[i].fetch_add(1, Relaxed);
    }

    /// The counters of `op`.
    pub fn get(&self, op: StoreOp) -> &OpStats {
        &self.ops[StoreOp::ALL.iter().position(|&o| o == op).unwrap_or(0)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_land_in_their_bucket_and_counter() {
        let s = StoreStats::default();
        s.record(StoreOp::Take, Duration::from_micros(300), true);
        s.record(StoreOp::Take, Duration::from_secs(2), false);
        let t = s.get(StoreOp::Take);
        assert_eq!((t.ok.load(Relaxed), t.failed.load(Relaxed)), (1, 1));
        assert_eq!(t.buckets[2].load(Relaxed), 1, "300 µs is in the ≤ 500 µs bucket");
        assert_eq!(t.buckets[BUCKETS.len()].load(Relaxed), 1, "2 s is above every bound");
        assert_eq!(t.nanos.load(Relaxed), 2_000_300_000);
        assert_eq!(s.get(StoreOp::Put).ok.load(Relaxed), 0);
    }
}
