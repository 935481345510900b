//! Stateful sessions: Triton's sequence batching. Requests carry a sequence id and START/END
//! flags; each live sequence holds a batch slot of one instance whose implicit state stays where
//! the model runs; requests of one sequence run in arrival order, never two at once. Idle
//! sequences expire; with a session store, the least recently used idle session is spilled when
//! every slot is taken and restored on its next request; sessions can be exported and imported.
//!
//! Request path: a handler calls [`SequenceHandle::submit`] → the sequence actor (one thread per
//! model version, sole owner of the session table) queues it behind the sequence's earlier
//! requests → when the sequence's instance is idle, the actor forms a batch (one request per
//! sequence, oldest first) → the instance thread runs it and answers each request.

mod actor;
pub mod config;
pub mod export;
pub mod instance;
pub mod models;
pub mod neuron;
pub mod store;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use config::{ControlKind, SequenceSpec, Strategy};
pub use export::SessionBlob;
pub use instance::{CpuSequenceInstance, SlotStep, StatefulInstance};
pub use models::{STATEFUL_BUILTIN_CONFIGS, builtin_kernel};
pub use store::SessionStore;

use crate::backend::BackendError;
use crate::config::ModelSpec;
use crate::scheduler::stats::ModelStats;
use crate::scheduler::{InferReply, RequestInput};

/// A sequence (correlation) id, as Triton's requests carry it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SequenceId {
    /// An unsigned integer id (0 is not a valid id).
    Uint(u64),
    /// A string id (empty is not a valid id).
    Str(String),
}

impl std::fmt::Display for SequenceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SequenceId::Uint(v) => write!(f, "{v}"),
            SequenceId::Str(s) => write!(f, "\"{s}\""),
        }
    }
}

/// Why a sequence is no longer live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosedReason {
    /// Its END request was executed.
    Ended,
    /// It had no request for `max_sequence_idle_microseconds`.
    Expired,
    /// It was exported to another worker.
    Exported,
    /// Its spilled or imported state could not be written into its slot.
    RestoreFailed,
    /// Its instance failed and was taken out of service.
    InstanceFailed,
}

impl ClosedReason {
    fn as_str(self) -> &'static str {
        match self {
            ClosedReason::Ended => {
                "has ended (its END request was executed); send a request with sequence_start to begin it again"
            }
            ClosedReason::Expired => {
                "expired after being idle longer than max_sequence_idle_microseconds; start it again with sequence_start"
            }
            ClosedReason::Exported => "was exported to another worker with ExportSession; send its requests there",
            ClosedReason::RestoreFailed => {
                "was closed: its state could not be restored into a slot; start it again with sequence_start"
            }
            ClosedReason::InstanceFailed => {
                "was lost: its instance failed and was taken out of service; start it again with sequence_start"
            }
        }
    }
}

/// Why the sequence layer could not serve a request or session operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SequenceError {
    /// The request is malformed for a sequence model (no id, batch > 1, ...).
    #[error("model '{model}': {reason}")]
    InvalidRequest {
        /// Model name.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// A request without START for a sequence that is not live.
    #[error("model '{model}': sequence {id} {why}")]
    NotLive {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
        /// Why: never started, ended, expired, exported.
        why: String,
    },
    /// Every slot holds a live sequence and none can be spilled.
    #[error("model '{model}': all {capacity} sequence slots are taken by live sequences{hint}")]
    SlotsExhausted {
        /// Model name.
        model: String,
        /// Slots × instances.
        capacity: usize,
        /// What would help.
        hint: String,
    },
    /// Too many requests are queued for the model's sequences.
    #[error("model '{model}': {queued} sequence requests are queued (bound {bound}); retry after a short backoff")]
    QueueFull {
        /// Model name.
        model: String,
        /// Requests queued.
        queued: usize,
        /// The bound.
        bound: usize,
    },
    /// The session is busy (a request is queued or running), so it cannot be exported now.
    #[error("model '{model}': sequence {id} has requests queued or running; export it between requests")]
    Busy {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// No session with that id on this worker (export).
    #[error("model '{model}': no session {id} on this worker")]
    NotFound {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// Import of a session whose id is already live (or spilled) here.
    #[error("model '{model}': sequence {id} already exists on this worker")]
    AlreadyExists {
        /// Model name.
        model: String,
        /// The sequence id.
        id: SequenceId,
    },
    /// An imported blob that is corrupt, from another model version, or of the wrong state shape.
    #[error("session blob refused: {reason}")]
    BadBlob {
        /// What is wrong.
        reason: String,
    },
    /// A stored session that is corrupt or foreign; it was skipped and removed.
    #[error("stored session {id} is corrupt and was discarded: {reason}")]
    CorruptSession {
        /// The sequence id.
        id: SequenceId,
        /// What is wrong.
        reason: String,
    },
    /// The session store failed.
    #[error("session store: {reason}")]
    Store {
        /// What failed.
        reason: String,
    },
    /// The model is draining or its batcher stopped.
    #[error("model '{model}' is not available: {reason}")]
    Unavailable {
        /// Model name.
        model: String,
        /// Why.
        reason: String,
    },
    /// The backend failed the batch the request was in.
    #[error("model '{model}': {source}")]
    Backend {
        /// Model name.
        model: String,
        /// The backend's error.
        source: BackendError,
    },
}

/// A validated request of a sequence model.
#[derive(Debug)]
pub struct SequenceRequest {
    /// The sequence it belongs to.
    pub id: SequenceId,
    /// First request of the sequence (resets its state; restarts a live sequence).
    pub start: bool,
    /// Last request of the sequence (frees its slot once executed).
    pub end: bool,
    /// Inputs in model-configuration order (batch dimension 1).
    pub inputs: Vec<RequestInput>,
    /// Where the result goes.
    pub reply: oneshot::Sender<Result<InferReply, SequenceError>>,
    /// When the request reached the worker.
    pub arrived: Instant,
}

/// One session as ListSessions reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: i64,
    /// The sequence id.
    pub id: SequenceId,
    /// Steps executed since START.
    pub steps: u64,
    /// True when it holds a slot, false when it is spilled to the store.
    pub live: bool,
    /// Time since its last request (zero for spilled sessions loaded at start-up).
    pub idle: Duration,
}

/// Session counters of one model version (for metrics).
#[derive(Debug, Default)]
pub struct SessionCounters {
    /// Sequences holding a slot now.
    pub live: AtomicU64,
    /// Sessions in the store now.
    pub spilled_now: AtomicU64,
    /// Sessions spilled to the store, total.
    pub spilled: AtomicU64,
    /// Sessions restored from the store, total.
    pub restored: AtomicU64,
    /// Sequences freed after being idle, total.
    pub expired: AtomicU64,
    /// Sequences ended by an END request, total.
    pub ended: AtomicU64,
    /// Store entries found corrupt or foreign and skipped, total.
    pub corrupt: AtomicU64,
}

/// How one step of a finished batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepOutcome {
    /// Executed.
    Ok,
    /// The execution failed.
    Failed,
    /// Its pending restore could not be written into its slot; it was not executed.
    RestoreFailed,
}

/// Commands to the sequence actor.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(SequenceRequest),
    Done { instance: usize, outcomes: Vec<(SequenceId, StepOutcome)>, usable: bool },
    List(oneshot::Sender<Vec<SessionInfo>>),
    Export { id: SequenceId, reply: oneshot::Sender<Result<SessionBlob, SequenceError>> },
    Import { blob: SessionBlob, reply: oneshot::Sender<Result<SessionInfo, SequenceError>> },
    Drain(oneshot::Sender<()>),
}

/// What the actor and the handle share (atomics only).
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) spec: Arc<ModelSpec>,
    pub(crate) seq: Arc<SequenceSpec>,
    pub(crate) version: i64,
    pub(crate) stats: Arc<ModelStats>,
    pub(crate) counters: SessionCounters,
    pub(crate) accepting: AtomicBool,
    pub(crate) queued: AtomicU64,
    pub(crate) capacity: usize,
    /// Instances in service (the actor lowers it when it takes one out).
    pub(crate) in_service: AtomicUsize,
    /// Run once when the last instance is taken out of service.
    pub(crate) on_no_instance: std::sync::Mutex<Option<NoInstanceHook>>,
}

/// What to do when a sequence model has no instance left (see [`start_with_instances`]).
pub(crate) struct NoInstanceHook(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for NoInstanceHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoInstanceHook")
    }
}

/// Why a model without instances refuses requests.
pub(crate) const NO_INSTANCE: &str =
    "every instance was taken out of service after it failed; reload the model or restart the worker";

/// A cheap, cloneable handle to one model version's sequence batcher.
#[derive(Clone, Debug)]
pub struct SequenceHandle {
    tx: std::sync::mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// Everything needed to start a sequence batcher.
#[derive(Debug)]
pub struct SequenceSetup {
    /// The model's spec.
    pub spec: Arc<ModelSpec>,
    /// Its sequence batching settings.
    pub seq: Arc<SequenceSpec>,
    /// The version being served.
    pub version: i64,
    /// Statistics to record into (shared with ModelStatistics and metrics).
    pub stats: Arc<ModelStats>,
    /// The session store, if configured.
    pub store: Option<Arc<SessionStore>>,
    /// Slots per instance.
    pub slots: usize,
}

impl SequenceHandle {
    /// Starts the actor thread and one thread per instance.
    pub fn start(
        setup: SequenceSetup,
        instances: Vec<Box<dyn StatefulInstance>>,
    ) -> Result<SequenceHandle, SequenceError> {
        SequenceHandle::start_with_hook(setup, instances, None)
    }

    fn start_with_hook(
        setup: SequenceSetup,
        instances: Vec<Box<dyn StatefulInstance>>,
        on_no_instance: Option<NoInstanceHook>,
    ) -> Result<SequenceHandle, SequenceError> {
        let shared = Arc::new(Shared {
            spec: setup.spec.clone(),
            seq: setup.seq.clone(),
            version: setup.version,
            stats: setup.stats.clone(),
            counters: SessionCounters::default(),
            accepting: AtomicBool::new(true),
            queued: AtomicU64::new(0),
            capacity: setup.slots * instances.len(),
            in_service: AtomicUsize::new(instances.len()),
            on_no_instance: std::sync::Mutex::new(on_no_instance),
        });
        let tx = actor::spawn(shared.clone(), setup, instances)?;
        Ok(SequenceHandle { tx, shared })
    }

    fn unavailable(&self, reason: &str) -> SequenceError {
        SequenceError::Unavailable { model: self.shared.spec.name.clone(), reason: reason.into() }
    }

    /// Queues a request behind the earlier requests of its sequence. Fails at once when the
    /// model is draining or the queue bound is hit; otherwise the result arrives on `reply`.
    pub fn submit(&self, req: SequenceRequest) -> Result<(), SequenceError> {
        let s = &self.shared;
        if !s.accepting.load(Ordering::Acquire) {
            return Err(self.unavailable("the model is draining"));
        }
        if s.in_service.load(Ordering::Acquire) == 0 {
            return Err(self.unavailable(NO_INSTANCE));
        }
        let bound = s.spec.dynamic.max_queue_size as u64;
        let queued = s.queued.fetch_add(1, Ordering::AcqRel);
        if queued >= bound {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SequenceError::QueueFull {
                model: s.spec.name.clone(),
                queued: queued as usize,
                bound: bound as usize,
            });
        }
        self.tx.send(Command::Submit(req)).map_err(|_| {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            self.unavailable("the sequence batcher stopped")
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SequenceError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| self.unavailable("the sequence batcher stopped"))?;
        rx.await.map_err(|_| self.unavailable("the sequence batcher stopped"))
    }

    /// Every session of this model version: live ones and spilled ones.
    pub async fn list(&self) -> Vec<SessionInfo> {
        self.ask(Command::List).await.unwrap_or_default()
    }

    /// Ends the session here and returns its state (it must have no request queued or running).
    pub async fn export(&self, id: SequenceId) -> Result<SessionBlob, SequenceError> {
        self.ask(|reply| Command::Export { id, reply }).await?
    }

    /// Continues a session exported by a worker serving the same model version.
    pub async fn import(&self, blob: SessionBlob) -> Result<SessionInfo, SequenceError> {
        self.ask(|reply| Command::Import { blob, reply }).await?
    }

    /// Stops accepting requests, finishes every queued request, writes every live session to the
    /// store (when one is configured), then stops the threads.
    pub async fn drain(&self) {
        self.shared.accepting.store(false, Ordering::Release);
        let _ = self.ask(Command::Drain).await;
    }

    /// The model version's session counters.
    pub fn counters(&self) -> &SessionCounters {
        &self.shared.counters
    }

    /// Instances in service (0 once every instance failed; the model is then not ready).
    pub fn instances_in_service(&self) -> usize {
        self.shared.in_service.load(Ordering::Acquire)
    }

    /// Live sequences the model can hold (slots × instances).
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// The sequence batching settings.
    pub fn sequence_spec(&self) -> &Arc<SequenceSpec> {
        &self.shared.seq
    }

    /// The served version.
    pub fn version(&self) -> i64 {
        self.shared.version
    }
}

/// Creates CPU instances for a built-in stateful model: `count` instances of `slots` slots each.
pub fn create_cpu_instances(
    spec: &ModelSpec,
    seq: &SequenceSpec,
    slots: usize,
    count: usize,
) -> Result<Vec<Box<dyn StatefulInstance>>, String> {
    let kernel = builtin_kernel(&spec.name).ok_or_else(|| {
        format!(
            "model '{}': the CPU backend has no stateful kernel for it (built-in stateful models: accumulate, gru)",
            spec.name
        )
    })?;
    let initial = seq.states.iter().map(|s| s.initial.clone()).collect::<Vec<_>>();
    Ok((0..count)
        .map(|i| {
            Box::new(CpuSequenceInstance::new(kernel.clone(), initial.clone(), slots, i)) as Box<dyn StatefulInstance>
        })
        .collect())
}

/// The placeholder instances a sequence model's stateless scheduler is started with: they keep
/// its readiness, instance count and statistics in step with the sequence batcher, and refuse
/// work (every request of a sequence model is routed to the batcher).
#[derive(Debug)]
pub struct RoutedToSequences {
    index: usize,
}

impl crate::backend::ModelInstance for RoutedToSequences {
    fn execute(
        &mut self,
        _: &[crate::backend::BatchInput<'_>],
    ) -> Result<Vec<crate::backend::NamedTensor>, BackendError> {
        Err(BackendError::Execution {
            message: "requests of sequence models are executed by the sequence batcher".into(),
            instance_usable: true,
            nrt_status: None,
        })
    }

    fn label(&self) -> String {
        format!("seq:{}", self.index)
    }
}

/// Starts a sequence model version on the CPU: its stateless scheduler (readiness, statistics)
/// and its sequence batcher over the built-in kernel.
pub fn start_cpu(
    spec: Arc<ModelSpec>,
    seq: SequenceSpec,
    version: i64,
    store: Option<Arc<SessionStore>>,
) -> Result<(crate::scheduler::SchedulerHandle, SequenceHandle), String> {
    let count = spec.instance_count.unwrap_or(1).max(1);
    let slots = seq.slots_per_instance(spec.max_batch_size, count);
    let instances = create_cpu_instances(&spec, &seq, slots, count)?;
    start_with_instances(spec, seq, version, store, instances, slots)
}

/// Starts a sequence model version over `instances` (each with `slots` slots): its stateless
/// scheduler (readiness, statistics) and its sequence batcher.
pub fn start_with_instances(
    spec: Arc<ModelSpec>,
    seq: SequenceSpec,
    version: i64,
    store: Option<Arc<SessionStore>>,
    instances: Vec<Box<dyn StatefulInstance>>,
    slots: usize,
) -> Result<(crate::scheduler::SchedulerHandle, SequenceHandle), String> {
    let count = instances.len();
    let placeholders: Vec<Box<dyn crate::backend::ModelInstance>> = (0..count)
        .map(|index| Box::new(RoutedToSequences { index }) as Box<dyn crate::backend::ModelInstance>)
        .collect();
    let scheduler = crate::scheduler::SchedulerHandle::start(spec.clone(), placeholders);
    let hook = {
        let scheduler = scheduler.clone();
        NoInstanceHook(Box::new(move || scheduler.retire_all(NO_INSTANCE)))
    };
    let setup = SequenceSetup { spec, seq: Arc::new(seq), version, stats: scheduler.stats().clone(), store, slots };
    let handle = SequenceHandle::start_with_hook(setup, instances, Some(hook)).map_err(|e| e.to_string())?;
    Ok((scheduler, handle))
}
