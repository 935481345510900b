//! [`Admission`]: the one admission and readiness state of a model version, shared by its handle,
//! its policy's actor and its instance threads (atomics only, plus the reason it is unavailable).
//! Every policy admits through it, so readiness, the queue bound, queue depth, instances in
//! service and the queue-wait estimate mean the same for every model.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::BatchingError;
use super::stats::{FailureReason, ModelStats};
use crate::config::ModelSpec;

/// Why a model whose every instance failed refuses requests.
pub(crate) const NO_INSTANCE: &str =
    "every instance was taken out of service after fatal runtime errors; reload the model or restart the worker";

/// Admission and readiness of one model version.
#[derive(Debug)]
pub(crate) struct Admission {
    /// The model's spec.
    pub(crate) spec: Arc<ModelSpec>,
    /// Its statistics.
    pub(crate) stats: Arc<ModelStats>,
    /// Requests admitted and not yet handed to an instance.
    pub(crate) queued: AtomicUsize,
    /// Accepting requests (false while draining, or once no instance is left).
    pub(crate) ready: AtomicBool,
    /// Instances in service.
    pub(crate) in_service: AtomicUsize,
    /// Why requests are refused while not ready.
    pub(crate) unavailable_reason: Mutex<String>,
    /// Readiness as a watch value, so health follows it without polling.
    pub(crate) readiness: tokio::sync::watch::Sender<bool>,
}

impl Admission {
    /// The state of a model version starting with `instances` instances.
    pub(crate) fn new(spec: Arc<ModelSpec>, instances: usize) -> Admission {
        Admission {
            spec,
            stats: Arc::new(ModelStats::new(instances)),
            queued: AtomicUsize::new(0),
            ready: AtomicBool::new(instances > 0),
            in_service: AtomicUsize::new(instances),
            unavailable_reason: Mutex::new("no instance could be created".into()),
            readiness: tokio::sync::watch::Sender::new(instances > 0),
        }
    }

    /// Admits one request: refused (and counted as failed) when the model is not ready or its
    /// queue is full; otherwise it counts as queued until the policy dequeues it.
    pub(crate) fn admit(&self, arrived: Instant) -> Result<(), BatchingError> {
        if !self.ready.load(Ordering::Acquire) {
            self.stats.record_failure(FailureReason::Unavailable, arrived.elapsed());
            return Err(self.unavailable());
        }
        let max = self.spec.dynamic.max_queue_size;
        if self.queued.fetch_add(1, Ordering::AcqRel) >= max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.stats.record_failure(FailureReason::QueueFull, arrived.elapsed());
            return Err(BatchingError::QueueFull { model: self.spec.name.clone(), max_queue_size: max });
        }
        Ok(())
    }

    /// `n` admitted requests left the queue (handed to an instance, refused, or purged).
    pub(crate) fn dequeued(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
    }

    /// The error for a request refused because the model is not ready.
    pub(crate) fn unavailable(&self) -> BatchingError {
        BatchingError::Unavailable { model: self.spec.name.clone(), reason: self.reason() }
    }

    /// Why the model is not ready.
    pub(crate) fn reason(&self) -> String {
        self.unavailable_reason.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Stops admitting requests, with `reason` for those refused (drain, or every instance lost).
    pub(crate) fn close(&self, reason: &str) {
        if let Ok(mut r) = self.unavailable_reason.lock() {
            *r = reason.to_string();
        }
        self.ready.store(false, Ordering::Release);
        self.readiness.send_replace(false);
    }

    /// Records that `left` instances remain in service. With none left the model is closed
    /// first, so nobody sees "0 in service" and ready at once.
    pub(crate) fn set_in_service(&self, left: usize) {
        if left == 0 {
            self.close(NO_INSTANCE);
        }
        self.in_service.store(left, Ordering::Release);
    }

    /// Whether the model accepts requests.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Requests admitted and waiting for an instance.
    pub(crate) fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Instances in service.
    pub(crate) fn instances_in_service(&self) -> usize {
        self.in_service.load(Ordering::Acquire)
    }

    /// Estimated queue wait for a new request: batches ahead of it ÷ instances × the smoothed
    /// execution time.
    pub(crate) fn estimated_queue_wait(&self) -> Duration {
        let inst = self.instances_in_service().max(1) as u64;
        let per_batch = self.spec.max_rows().max(1) as u64;
        let batches_ahead = (self.queue_depth() as u64).div_ceil(per_batch);
        let exec_ns = self.stats.recent_exec_ns.load(Ordering::Relaxed);
        Duration::from_nanos(batches_ahead.div_ceil(inst) * exec_ns)
    }
}
