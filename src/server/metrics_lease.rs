//! Metrics of the session leases on a shared store (Prometheus text): leases held, hand-offs,
//! writes through and behind, restores from K/V or from tokens, and how long the store has not
//! answered (an outage: sessions keep serving only until their leases would expire).

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use crate::sessions::lease::Leases;

/// The leases' metrics, `neuron_worker_session_lease_*`.
pub fn render(leases: &Leases) -> String {
    let mut out = String::new();
    let s = &leases.stats;
    let counters = [
        ("acquired_total", "Session leases acquired", &s.acquired),
        ("handed_over_total", "Sessions handed over to another worker that asked", &s.handed_over),
        ("handoff_requests_total", "Hand-offs asked of the workers holding a session", &s.handoff_requests),
        ("lost_total", "Leases lost while held (expired during a store outage, or taken over)", &s.lost),
        ("writes_through_total", "Turns whose token history was written through", &s.writes_ok),
        ("write_retries_total", "Write-through attempts that failed and were retried", &s.write_retries),
        ("writes_failed_total", "Turns refused because their tokens could not be written through", &s.writes_failed),
        ("fenced_off_total", "Writes refused by the fencing token (a stale holder)", &s.fenced_off),
        ("restored_kv_total", "Sessions taken from the store with their K/V", &s.restored_kv),
        (
            "restored_tokens_total",
            "Sessions taken from the store with their tokens only (K/V recomputed)",
            &s.restored_tokens,
        ),
        (
            "kv_written_total",
            "K/V writes (new pieces of one session) written behind, or at hand-off and drain",
            &s.kv_written,
        ),
        ("kv_bytes_written_total", "K/V bytes written (pieces: only the blocks with new positions)", &s.kv_bytes),
        ("kv_skipped_total", "K/V writes not done (over the byte bound, or fenced off)", &s.kv_skipped),
        (
            "refused_unreachable_total",
            "Lease operations refused because the store was unreachable",
            &s.refused_unreachable,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(out, "# HELP neuron_worker_session_lease_{name} {help}");
        let _ = writeln!(out, "# TYPE neuron_worker_session_lease_{name} counter");
        let _ = writeln!(out, "neuron_worker_session_lease_{name} {}", v.load(Relaxed));
    }
    let _ = writeln!(
        out,
        "# HELP neuron_worker_session_lease_write_through_seconds_total Time spent writing turns through (retries included)"
    );
    let _ = writeln!(out, "# TYPE neuron_worker_session_lease_write_through_seconds_total counter");
    let _ = writeln!(
        out,
        "neuron_worker_session_lease_write_through_seconds_total {}",
        s.write_nanos.load(Relaxed) as f64 / 1e9
    );
    let gauges = [
        ("held", "Session leases this worker holds", leases.held_count() as f64),
        (
            "store_unreachable_seconds",
            "Seconds since the shared store stopped answering (0 while it answers)",
            leases.unreachable_for().as_secs_f64(),
        ),
        ("ttl_seconds", "The lease TTL", leases.config().ttl.as_secs_f64()),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(out, "# HELP neuron_worker_session_lease_{name} {help}");
        let _ = writeln!(out, "# TYPE neuron_worker_session_lease_{name} gauge");
        let _ = writeln!(out, "neuron_worker_session_lease_{name} {v}");
    }
    out
}

/// The leases' part of `/capacity` (health details): the store's reachability and the gap.
pub fn health(leases: &Leases) -> serde_json::Value {
    let gap = leases.unreachable_for().as_secs_f64();
    serde_json::json!({
        "store_reachable": gap == 0.0,
        "store_unreachable_seconds": gap,
        "leases_held": leases.held_count(),
        "lease_ttl_seconds": leases.config().ttl.as_secs_f64(),
        "worker_id": leases.config().worker,
    })
}
