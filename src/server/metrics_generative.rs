//! Metrics of generative models (Prometheus text) and their `/capacity` fields: running and waiting
//! sequences, K/V-cache usage, prompt and generated tokens, time to first token and inter-token
//! latency. The gauges are what the Gateway API Inference Extension's endpoint picker reads from a
//! model server (see the README for the mapping).

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;

use crate::batching::generative::stats::{GenerativeStats, LatencyHistogram};
use crate::repository::Repository;

const PREFIX: &str = "neuron_worker_";

/// (model, version, stats) of every loaded generative model version.
fn generative_models(repo: &Repository) -> Vec<(String, String, std::sync::Arc<GenerativeStats>)> {
    let mut out = Vec::new();
    for (name, entry) in repo.entries() {
        for (v, m) in &entry.versions {
            if let Some(g) = m.batching.generative() {
                out.push((name.clone(), v.to_string(), g.stats().clone()));
            }
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {PREFIX}{name} {help}");
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
}

fn histogram(out: &mut String, name: &str, model: &str, version: &str, h: &LatencyHistogram) {
    let (buckets, sum, count) = h.snapshot();
    for (le, n) in buckets {
        let le = if le.is_infinite() { "+Inf".to_string() } else { le.to_string() };
        let _ = writeln!(out, "{PREFIX}{name}_bucket{{model=\"{model}\",version=\"{version}\",le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{PREFIX}{name}_sum{{model=\"{model}\",version=\"{version}\"}} {sum}");
    let _ = writeln!(out, "{PREFIX}{name}_count{{model=\"{model}\",version=\"{version}\"}} {count}");
}

/// The generative metrics in the Prometheus text format (empty when no generative model is loaded).
pub fn render(repo: &Repository) -> String {
    let models = generative_models(repo);
    let mut out = String::new();
    if models.is_empty() {
        return out;
    }
    type Read = fn(&GenerativeStats) -> f64;
    let simple: [(&str, &str, &str, Read); 26] = [
        ("num_requests_running", "gauge", "Sequences in the running set (holding K/V blocks)", |s| {
            s.running.load(Relaxed) as f64
        }),
        ("num_requests_waiting", "gauge", "Sequences waiting for admission (queued or preempted)", |s| {
            s.waiting.load(Relaxed) as f64
        }),
        ("kv_cache_usage_perc", "gauge", "Fraction of K/V cache blocks owned by sequences (0-1)", |s| {
            s.kv_cache_usage()
        }),
        ("prompt_tokens_total", "counter", "Prompt tokens of admitted generation requests", |s| {
            s.prompt_tokens.load(Relaxed) as f64
        }),
        ("generation_tokens_total", "counter", "Tokens generated", |s| s.generated_tokens.load(Relaxed) as f64),
        ("sessions_open", "gauge", "Open conversation sessions (token history kept on the worker)", |s| {
            s.sessions_open.load(Relaxed) as f64
        }),
        ("sessions_resident", "gauge", "Open sessions whose K/V blocks are resident in the pool", |s| {
            s.sessions_resident.load(Relaxed) as f64
        }),
        ("sessions_stored", "gauge", "Open sessions whose state is in the session store (blocks released)", |s| {
            s.sessions_stored.load(Relaxed) as f64
        }),
        ("session_kv_resident_bytes", "gauge", "K/V bytes of open sessions resident in the pool", |s| {
            s.session_kv_bytes_resident.load(Relaxed) as f64
        }),
        ("session_kv_stored_bytes", "gauge", "K/V bytes of open sessions held by the session store", |s| {
            s.session_kv_bytes_stored.load(Relaxed) as f64
        }),
        (
            "session_spilled_total",
            "counter",
            "Sessions written to the session store (released, drained, failed over)",
            |s| s.session_spilled.load(Relaxed) as f64,
        ),
        (
            "session_restored_total",
            "counter",
            "Sessions whose state came back from the session store for a turn",
            |s| s.session_restored.load(Relaxed) as f64,
        ),
        (
            "session_dropped_to_tokens_total",
            "counter",
            "Idle sessions that released their K/V keeping only their tokens (recomputed on their next turn)",
            |s| s.session_dropped_to_tokens.load(Relaxed) as f64,
        ),
        ("session_store_failures_total", "counter", "Session store reads or writes that failed", |s| {
            s.session_store_failures.load(Relaxed) as f64
        }),
        ("sessions_lost_total", "counter", "Sessions that could not be saved when their instance stopped", |s| {
            s.sessions_lost.load(Relaxed) as f64
        }),
        ("session_turns_total", "counter", "Session turns started", |s| s.session_turns.load(Relaxed) as f64),
        ("session_kv_released_total", "counter", "Idle sessions that gave their K/V blocks back to make room", |s| {
            s.session_kv_released.load(Relaxed) as f64
        }),
        (
            "prefix_cache_hit_tokens_total",
            "counter",
            "Prompt tokens whose K/V came from a kept session or the prefix cache",
            |s| s.prefix_cached_tokens.load(Relaxed) as f64,
        ),
        ("num_preemptions_total", "counter", "Running sequences preempted (blocks freed, recomputed later)", |s| {
            s.preemptions.load(Relaxed) as f64
        }),
        (
            "moved_sequences_total",
            "counter",
            "Sequences moved off an instance that left service and continued on another",
            |s| s.moved_sequences.load(Relaxed) as f64,
        ),
        (
            "device_sampled_tokens_total",
            "counter",
            "Tokens picked on the device (greedy, compiled programs with token ids out)",
            |s| s.device_sampled_tokens.load(Relaxed) as f64,
        ),
        (
            "recomputed_prefill_tokens_total",
            "counter",
            "Tokens whose K/V was kept but recomputed because the compiled prefill programs only start at position 0",
            |s| s.recomputed_tokens.load(Relaxed) as f64,
        ),
        ("request_success_stop_total", "counter", "Generations ended by EOS or a stop string", |s| {
            s.finished_stop.load(Relaxed) as f64
        }),
        ("request_success_length_total", "counter", "Generations ended by max_tokens or the context limit", |s| {
            s.finished_length.load(Relaxed) as f64
        }),
        ("request_cancelled_total", "counter", "Generations whose client went away before the end", |s| {
            s.cancelled.load(Relaxed) as f64
        }),
        (
            "request_cut_short_total",
            "counter",
            "Generations cut short by the exit deadline (finish reason abort)",
            |s| s.cut_short.load(Relaxed) as f64,
        ),
    ];
    for (name, kind, help, read) in simple {
        family(&mut out, name, kind, help);
        for (model, version, s) in &models {
            let _ = writeln!(out, "{PREFIX}{name}{{model=\"{model}\",version=\"{version}\"}} {}", read(s));
        }
    }
    family(&mut out, "time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token");
    for (model, version, s) in &models {
        histogram(&mut out, "time_to_first_token_seconds", model, version, &s.time_to_first_token);
    }
    family(&mut out, "inter_token_latency_seconds", "histogram", "Time between two generated tokens of a sequence");
    for (model, version, s) in &models {
        histogram(&mut out, "inter_token_latency_seconds", model, version, &s.inter_token_latency);
    }
    out
}

/// The generative fields of a model version's `/capacity` entry (`None` for other models).
pub fn capacity(stats: &GenerativeStats) -> serde_json::Value {
    serde_json::json!({
        "num_requests_running": stats.running.load(Relaxed),
        "num_requests_waiting": stats.waiting.load(Relaxed),
        "kv_cache_usage_perc": stats.kv_cache_usage(),
        "kv_cache_blocks": stats.kv_blocks_total.load(Relaxed),
        "kv_cache_bytes": stats.kv_bytes_total.load(Relaxed),
        "kv_cache_tokens": stats.kv_tokens_total.load(Relaxed),
        "kv_cache_dtype": stats.kv_dtype.get().map(|d| d.name()),
        "sessions_open": stats.sessions_open.load(Relaxed),
        "sessions_resident": stats.sessions_resident.load(Relaxed),
        "sessions_stored": stats.sessions_stored.load(Relaxed),
        "session_kv_resident_bytes": stats.session_kv_bytes_resident.load(Relaxed),
        "session_kv_stored_bytes": stats.session_kv_bytes_stored.load(Relaxed),
    })
}
