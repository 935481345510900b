//! Per-model statistics (Triton's ModelStatistics semantics), kept in atomics that the instance
//! threads update and the statistics RPC and the metrics endpoint read.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and a cumulative duration in nanoseconds.
#[derive(Debug, Default)]
pub struct StatDuration {
    /// Number of events.
    pub count: AtomicU64,
    /// Sum of their durations, in nanoseconds.
    pub ns: AtomicU64,
}

impl StatDuration {
    /// Records `n` events that took `d` in total.
    pub fn add(&self, n: u64, d: Duration) {
        self.count.fetch_add(n, Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// `(count, ns)` now.
    pub fn get(&self) -> (u64, u64) {
        (self.count.load(Relaxed), self.ns.load(Relaxed))
    }
}

/// Statistics of the executions at one batch size.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchSizeStats {
    /// Executions at this size.
    pub count: u64,
    /// Time spent assembling inputs, ns.
    pub compute_input_ns: u64,
    /// Time spent in the backend, ns.
    pub compute_infer_ns: u64,
    /// Time spent splitting outputs and replying, ns.
    pub compute_output_ns: u64,
}

/// Time one batch spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchPhases {
    /// Assembling the batch's inputs.
    pub input: Duration,
    /// In the backend.
    pub infer: Duration,
    /// Splitting outputs and preparing replies.
    pub output: Duration,
}

/// Why a request did not succeed, for the failure counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The queue was full.
    QueueFull,
    /// The request's queue timeout expired before execution.
    Timeout,
    /// The client went away before execution.
    Cancelled,
    /// The backend failed the batch.
    Backend,
    /// No instance was in service.
    Unavailable,
    /// The request's values were refused (by the model's check before batching, or by the backend
    /// when the request ran alone): the client's error, not the instance's.
    InvalidRequest,
    /// The response was larger than the server may send; it was refused in its place.
    ResponseTooLarge,
}

impl FailureReason {
    /// Every reason, for metrics.
    pub const ALL: [FailureReason; 7] = [
        FailureReason::QueueFull,
        FailureReason::Timeout,
        FailureReason::Cancelled,
        FailureReason::Backend,
        FailureReason::Unavailable,
        FailureReason::InvalidRequest,
        FailureReason::ResponseTooLarge,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::QueueFull => "queue_full",
            FailureReason::Timeout => "timeout",
            FailureReason::Cancelled => "cancelled",
            FailureReason::Backend => "backend",
            FailureReason::Unavailable => "unavailable",
            FailureReason::InvalidRequest => "invalid_request",
            FailureReason::ResponseTooLarge => "response_too_large",
        }
    }
}

/// Per-instance counters.
#[derive(Debug, Default)]
pub struct InstanceStats {
    /// Batches executed.
    pub executions: AtomicU64,
    /// Batches that failed.
    pub errors: AtomicU64,
    /// 1 while the instance is in service.
    pub in_service: AtomicU64,
}

/// All statistics of one model version.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Successful requests and their end-to-end time in the worker.
    pub success: StatDuration,
    /// Failed requests and their time in the worker.
    pub fail: StatDuration,
    /// Time requests spent queued.
    pub queue: StatDuration,
    /// Input assembly time, per request.
    pub compute_input: StatDuration,
    /// Backend time, per request.
    pub compute_infer: StatDuration,
    /// Output split and reply time, per request.
    pub compute_output: StatDuration,
    /// Rows inferred (Triton's inference_count).
    pub inference_count: AtomicU64,
    /// Backend executions (Triton's execution_count).
    pub execution_count: AtomicU64,
    /// Warm-up executions run at load (`model_warmup`), before the model was ready; not requests.
    pub warmup_executions: AtomicU64,
    /// Milliseconds since the epoch of the last inference.
    pub last_inference_ms: AtomicU64,
    failures: [AtomicU64; 7],
    batch: Mutex<BTreeMap<usize, BatchSizeStats>>,
    /// Smoothed backend time per execution, ns (for the queue-wait estimate).
    pub recent_exec_ns: AtomicU64,
    /// Per-instance counters.
    pub instances: Vec<InstanceStats>,
    nrt_status: Mutex<BTreeMap<u32, u64>>,
}

impl ModelStats {
    /// Statistics for a model with `instances` instances.
    pub fn new(instances: usize) -> ModelStats {
        ModelStats { instances: (0..instances).map(|_| InstanceStats::default()).collect(), ..Default::default() }
    }

    /// Counts a failed request.
    pub fn record_failure(&self, reason: FailureReason, in_worker: Duration) {
        let idx = FailureReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.failures[idx].fetch_add(1, Relaxed);
        self.fail.add(1, in_worker);
    }

    /// Re-counts a request already recorded as a success whose response was refused because it
    /// was too large to send: one success fewer, one failure more.
    pub fn record_response_refused(&self) {
        let _ = self.success.count.fetch_update(Relaxed, Relaxed, |c| c.checked_sub(1));
        self.record_failure(FailureReason::ResponseTooLarge, Duration::ZERO);
    }

    /// Failed requests by reason.
    pub fn failures(&self) -> Vec<(FailureReason, u64)> {
        FailureReason::ALL.iter().zip(&self.failures).map(|(r, c)| (*r, c.load(Relaxed))).collect()
    }

    /// Records one execution of `batch_size` rows.
    pub fn record_execution(&self, batch_size: usize, input: Duration, infer: Duration, output: Duration) {
        self.execution_count.fetch_add(1, Relaxed);
        let ns = infer.as_nanos() as u64;
        let old = self.recent_exec_ns.load(Relaxed);
        let smoothed = if old == 0 { ns } else { (old * 7 + ns) / 8 };
        self.recent_exec_ns.store(smoothed, Relaxed);
        if let Ok(mut map) = self.batch.lock() {
            let e = map.entry(batch_size).or_default();
            e.count += 1;
            e.compute_input_ns += input.as_nanos() as u64;
            e.compute_infer_ns += ns;
            e.compute_output_ns += output.as_nanos() as u64;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.last_inference_ms.store(now, Relaxed);
    }

    /// Records a batch of `requests` requests carrying `rows` rows that succeeded, with Triton's
    /// per-request semantics: every request of the batch is charged the batch's input, infer and
    /// output time. `executions` are the backend executions it took (rows, backend time each; more
    /// than one when it was split). Every policy records through here, before any reply goes out.
    pub fn record_batch(&self, requests: usize, rows: usize, phases: BatchPhases, executions: &[(usize, Duration)]) {
        let n = requests as u64;
        let k = requests as u32;
        self.compute_input.add(n, phases.input * k);
        self.compute_infer.add(n, phases.infer * k);
        self.compute_output.add(n, phases.output * k);
        self.inference_count.fetch_add(rows as u64, Relaxed);
        let per_exec = executions.len().max(1) as u32;
        for (rows, infer) in executions {
            self.record_execution(*rows, phases.input / per_exec, *infer, phases.output / per_exec);
        }
    }

    /// Records one request of a successful batch: its time queued and its time in the worker.
    pub fn record_success(&self, queued: Duration, in_worker: Duration) {
        self.queue.add(1, queued);
        self.success.add(1, in_worker);
    }

    /// Executions by batch size, ascending.
    pub fn batch_stats(&self) -> Vec<(usize, BatchSizeStats)> {
        self.batch.lock().map(|m| m.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
    }

    /// Counts a Neuron runtime status seen on a failed execution.
    pub fn record_nrt_status(&self, status: u32) {
        if let Ok(mut m) = self.nrt_status.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// Neuron runtime statuses seen, with counts.
    pub fn nrt_statuses(&self) -> Vec<(u32, u64)> {
        self.nrt_status.lock().map(|m| m.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default()
    }
}
