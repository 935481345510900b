//! The scheduler: one queue actor per model version that forms batches (dynamic batching, priorities,
//! queue bound, timeouts, Neuron shape buckets) and hands them to idle instance threads.
//!
//! Request path: a handler calls [`SchedulerHandle::submit`] with a validated request and a oneshot
//! for the reply → the actor (sole owner of the queue) forms a batch when an instance is idle → the
//! instance thread copies the rows once into its batch buffers, pads to the bucket, executes, and
//! sends each request its own rows.

mod actor;
mod instance;
mod queue;
pub mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{BackendError, ModelInstance, NamedTensor};
use crate::config::ModelSpec;
pub use stats::{FailureReason, ModelStats};

/// One input of a request, already validated against the model's spec.
#[derive(Debug, Clone)]
pub struct RequestInput {
    /// Full shape, including the batch dimension for batching models.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes (exactly `shape` × element size).
    pub data: Bytes,
}

/// What a request gets back: every model output, for its own rows only.
#[derive(Debug, Clone, PartialEq)]
pub struct InferReply {
    /// Outputs in model-configuration order.
    pub outputs: Vec<NamedTensor>,
}

/// The reply channel of one request.
pub type ReplySender = oneshot::Sender<Result<InferReply, SchedulerError>>;

/// A validated request waiting for execution.
#[derive(Debug)]
pub struct InferRequest {
    /// Inputs in model-configuration order.
    pub inputs: Vec<RequestInput>,
    /// Batch rows this request carries (1 for non-batching models).
    pub rows: usize,
    /// Priority level, 1 = highest; 0 = the model's default.
    pub priority: u64,
    /// Queue timeout requested by the client.
    pub timeout: Option<Duration>,
    /// Where the result goes; a closed channel means the client went away.
    pub reply: ReplySender,
    /// When the request reached the worker.
    pub arrived: Instant,
}

/// Why the scheduler could not serve a request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SchedulerError {
    /// The model's queue is full.
    #[error(
        "model '{model}': queue full ({max_queue_size} requests waiting); retry after a short backoff or add instances"
    )]
    QueueFull {
        /// Model name.
        model: String,
        /// The bound that was hit.
        max_queue_size: usize,
    },
    /// The request's queue timeout expired before it could be executed; it was not executed.
    #[error(
        "model '{model}': request timed out after {waited_us} us in the queue (timeout {timeout_us} us); it was not executed"
    )]
    Timeout {
        /// Model name.
        model: String,
        /// How long it waited.
        waited_us: u64,
        /// Its timeout.
        timeout_us: u64,
    },
    /// No instance of the model is in service (all failed, or the model is unloading).
    #[error("model '{model}' is not available: {reason}")]
    Unavailable {
        /// Model name.
        model: String,
        /// Why.
        reason: String,
    },
    /// The request does not fit what the model can execute (too many rows, too long a sequence).
    #[error("model '{model}': {reason}")]
    TooLarge {
        /// Model name.
        model: String,
        /// The limit that was exceeded.
        reason: String,
    },
    /// The backend failed the batch this request was in.
    #[error("model '{model}': {source}")]
    Backend {
        /// Model name.
        model: String,
        /// The backend's error.
        source: BackendError,
    },
}

/// State shared between the handle, the actor and the instance threads (atomics only).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) spec: Arc<ModelSpec>,
    pub(crate) stats: Arc<ModelStats>,
    pub(crate) queued: AtomicUsize,
    pub(crate) ready: AtomicBool,
    pub(crate) in_service: AtomicUsize,
    pub(crate) unavailable_reason: std::sync::Mutex<String>,
}

enum Command {
    Enqueue(InferRequest),
    Done { instance: usize, usable: bool },
    Requeue(Vec<InferRequest>),
    RetireAll(String),
    Drain(oneshot::Sender<()>),
}

/// A cheap, cloneable handle to one model version's scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerHandle {
    tx: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Enqueue(_) => "Enqueue",
            Command::Done { .. } => "Done",
            Command::Requeue(_) => "Requeue",
            Command::RetireAll(_) => "RetireAll",
            Command::Drain(_) => "Drain",
        })
    }
}

impl SchedulerHandle {
    /// Starts the actor (on the current tokio runtime) and one thread per instance.
    pub fn start(spec: Arc<ModelSpec>, instances: Vec<Box<dyn ModelInstance>>) -> SchedulerHandle {
        let stats = Arc::new(ModelStats::new(instances.len()));
        let shared = Arc::new(Shared {
            spec,
            stats,
            queued: AtomicUsize::new(0),
            ready: AtomicBool::new(!instances.is_empty()),
            in_service: AtomicUsize::new(instances.len()),
            unavailable_reason: std::sync::Mutex::new("no instance could be created".into()),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let senders = instances
            .into_iter()
            .enumerate()
            .map(|(i, inst)| instance::spawn(i, inst, shared.clone(), tx.clone()))
            .collect();
        actor::spawn(rx, senders, shared.clone());
        SchedulerHandle { tx, shared }
    }

    /// Queues a validated request. Fails at once when the model is unavailable or its queue is full;
    /// otherwise the result arrives on `request.reply`.
    pub fn submit(&self, request: InferRequest) -> Result<(), SchedulerError> {
        let s = &self.shared;
        let model = || s.spec.name.clone();
        if !s.ready.load(Ordering::Acquire) {
            s.stats.record_failure(FailureReason::Unavailable, request.arrived.elapsed());
            let reason = s.unavailable_reason.lock().map(|r| r.clone()).unwrap_or_default();
            return Err(SchedulerError::Unavailable { model: model(), reason });
        }
        let max = s.spec.dynamic.max_queue_size;
        if s.queued.fetch_add(1, Ordering::AcqRel) >= max {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            s.stats.record_failure(FailureReason::QueueFull, request.arrived.elapsed());
            return Err(SchedulerError::QueueFull { model: model(), max_queue_size: max });
        }
        self.tx.send(Command::Enqueue(request)).map_err(|e| {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            if let Command::Enqueue(r) = e.0 {
                s.stats.record_failure(FailureReason::Unavailable, r.arrived.elapsed());
            }
            SchedulerError::Unavailable { model: model(), reason: "the model is unloading".into() }
        })
    }

    /// Stops accepting requests, lets every queued request finish, then stops the instance threads.
    /// Resolves once the queue is empty.
    pub async fn drain(&self) {
        self.shared.ready.store(false, Ordering::Release);
        if let Ok(mut r) = self.shared.unavailable_reason.lock() {
            *r = "the model is unloading".into();
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Drain(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Takes every instance out of service from outside the scheduler (e.g. a sequence model's
    /// batcher lost its last instance): the model becomes not ready and requests get UNAVAILABLE
    /// with `reason`.
    pub fn retire_all(&self, reason: &str) {
        if let Ok(mut r) = self.shared.unavailable_reason.lock() {
            *r = reason.to_string();
        }
        self.shared.ready.store(false, Ordering::Release);
        let _ = self.tx.send(Command::RetireAll(reason.to_string()));
    }

    /// The model's spec.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.shared.spec
    }

    /// The model's statistics.
    pub fn stats(&self) -> &Arc<ModelStats> {
        &self.shared.stats
    }

    /// Whether at least one instance is in service and the model accepts requests.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    /// Requests waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Instances in service.
    pub fn instances_in_service(&self) -> usize {
        self.shared.in_service.load(Ordering::Acquire)
    }

    /// Estimated queue wait for a new request, from the queue depth and recent execution times:
    /// batches ahead of it ÷ instances × smoothed execution time.
    pub fn estimated_queue_wait(&self) -> Duration {
        let inst = self.instances_in_service().max(1) as u64;
        let per_batch = self.shared.spec.max_rows().max(1) as u64;
        let batches_ahead = (self.queue_depth() as u64).div_ceil(per_batch);
        let exec_ns = self.shared.stats.recent_exec_ns.load(Ordering::Relaxed);
        Duration::from_nanos(batches_ahead.div_ceil(inst) * exec_ns)
    }
}
