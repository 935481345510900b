//! Metrics of the session store (Prometheus text): operations by kind and outcome, their latency
//! histogram, and the store's health counters (I/O failures, re-opens, damaged files moved aside,
//! dropped entries, sessions lost). Rendered only when the worker has a store.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::sessions::SessionStore;
use crate::sessions::store_stats::{BUCKETS, StoreOp};

/// The store's metrics, `neuron_worker_session_store_*`.
pub fn render(store: &SessionStore) -> String {
    let mut out = String::new();
    let stats = store.stats();
    let _ = writeln!(
        out,
        "# HELP neuron_worker_session_store_operations_total Session store operations by kind and result"
    );
    let _ = writeln!(out, "# TYPE neuron_worker_session_store_operations_total counter");
    for op in StoreOp::ALL {
        let s = stats.get(op);
        for (result, v) in [("ok", s.ok.load(Relaxed)), ("error", s.failed.load(Relaxed))] {
            let _ = writeln!(
                out,
                "neuron_worker_session_store_operations_total{{op=\"{}\",result=\"{result}\"}} {v}",
                op.label()
            );
        }
    }
    let _ = writeln!(out, "# HELP neuron_worker_session_store_seconds Session store operation latency");
    let _ = writeln!(out, "# TYPE neuron_worker_session_store_seconds histogram");
    for op in StoreOp::ALL {
        let s = stats.get(op);
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += s.buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "neuron_worker_session_store_seconds_bucket{{op=\"{}\",le=\"{bound}\"}} {cumulative}",
                op.label()
            );
        }
        cumulative += s.buckets[BUCKETS.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "neuron_worker_session_store_seconds_bucket{{op=\"{}\",le=\"+Inf\"}} {cumulative}",
            op.label()
        );
        let secs = s.nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "neuron_worker_session_store_seconds_sum{{op=\"{}\"}} {secs}", op.label());
        let _ = writeln!(out, "neuron_worker_session_store_seconds_count{{op=\"{}\"}} {cumulative}", op.label());
    }
    let h = store.health();
    let health = [
        ("io_failures_total", "Store operations that failed with an I/O or connection error", &h.io_failures),
        ("reopened_total", "Times the store was re-opened (reconnected) after a failure", &h.reopened),
        ("quarantined_total", "Damaged store files moved aside", &h.quarantined),
        ("dropped_total", "Corrupt or unreadable store entries dropped", &h.dropped),
        ("lost_sessions_total", "Sessions that could not be saved when a model drained (lost)", &h.lost),
    ];
    for (name, help, v) in health {
        let _ = writeln!(out, "# HELP neuron_worker_session_store_{name} {help}");
        let _ = writeln!(out, "# TYPE neuron_worker_session_store_{name} counter");
        let _ = writeln!(out, "neuron_worker_session_store_{name} {}", v.load(Relaxed));
    }
    if let Some(leases) = store.leases() {
        out.push_str(&super::metrics_lease::render(leases));
    }
    out
}
