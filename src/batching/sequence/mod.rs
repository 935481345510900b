//! The sequence batching policy (Triton's `sequence_batching`): requests carry a sequence id and
//! START/END flags; each live sequence holds a batch slot of one instance whose implicit state
//! stays where the model runs; requests of one sequence run in arrival order, never two at once.
//! Idle sequences expire; with a session store, the least recently used idle session is spilled
//! when every slot is taken and restored on its next request; sessions can be exported and
//! imported (the blob and the store are in [`crate::sessions`]).
//!
//! Request path: [`super::Batcher::submit`] checks the sequence parameters and admits the request
//! → the sequence actor (one thread per model version, sole owner of the session table) queues it
//! behind the sequence's earlier requests → when the sequence's instance is idle, the actor forms
//! a batch (one request per sequence, oldest first) → the instance thread runs it, records
//! statistics, signals the actor, then answers each request.

mod actor;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_busy;
#[cfg(test)]
mod tests_store;
mod worker;

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::admission::Admission;
use super::{BatchingError, InferRequest, ReplySender, RequestInput};
use crate::backend::StatefulInstance;
use crate::config::{ModelSpec, SequenceSpec};
use crate::sessions::{SequenceId, SessionBlob, SessionCounters, SessionInfo, SessionStore};

/// Why a sequence model refuses requests while it drains.
const DRAINING: &str = "the model is draining";

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
    /// It was spilled, and the store file holding it was found damaged and moved aside.
    StoreDamaged,
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
            ClosedReason::StoreDamaged => {
                "was lost: the session store file holding it was damaged and moved aside; start it again with sequence_start"
            }
        }
    }
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
    Done {
        instance: usize,
        outcomes: Vec<(SequenceId, StepOutcome)>,
        usable: bool,
    },
    List(oneshot::Sender<Vec<SessionInfo>>),
    Export {
        id: SequenceId,
        reply: oneshot::Sender<Result<SessionBlob, BatchingError>>,
    },
    Import {
        blob: SessionBlob,
        reply: oneshot::Sender<Result<SessionInfo, BatchingError>>,
    },
    /// A session's state, read behind its instance's work for a spill or an export.
    StateRead {
        id: SequenceId,
        state: Result<Vec<crate::tensor::Tensor>, crate::backend::BackendError>,
    },
    BeginDrain(oneshot::Sender<()>),
    /// A reload: the replaced version may still hold sessions; wait for [`Command::Handover`].
    AwaitHandover,
    /// The replaced version drained into the store: take its sessions over.
    Handover(oneshot::Sender<()>),
    Drain(oneshot::Sender<()>),
}

/// A request of a sequence model, checked: it names its sequence and carries one row.
#[derive(Debug)]
pub(crate) struct SequenceRequest {
    /// The sequence it belongs to.
    pub(crate) id: SequenceId,
    /// First request of the sequence (resets its state; restarts a live sequence).
    pub(crate) start: bool,
    /// Last request of the sequence (frees its slot once executed).
    pub(crate) end: bool,
    /// Inputs in model-configuration order (batch dimension 1).
    pub(crate) inputs: Vec<RequestInput>,
    /// Where the result goes.
    pub(crate) reply: ReplySender,
    /// When the request reached the worker.
    pub(crate) arrived: Instant,
}

/// What the actor, the instance threads and the handle share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The model's admission and readiness state (spec, statistics, queue depth).
    pub(crate) adm: Arc<Admission>,
    pub(crate) seq: Arc<SequenceSpec>,
    pub(crate) version: i64,
    pub(crate) counters: SessionCounters,
    /// Slots per instance.
    pub(crate) slots: usize,
}

impl Shared {
    /// Live sequences the model can hold now: slots × instances in service.
    pub(crate) fn capacity(&self) -> usize {
        self.slots * self.adm.instances_in_service()
    }
}

/// Everything needed to start a sequence model version.
#[derive(Debug)]
pub struct SequenceSetup {
    /// The model's spec.
    pub spec: Arc<ModelSpec>,
    /// Its sequence batching settings.
    pub seq: Arc<SequenceSpec>,
    /// The version being served.
    pub version: i64,
    /// The session store, if configured.
    pub store: Option<Arc<SessionStore>>,
    /// Slots per instance.
    pub slots: usize,
}

/// The handle's end of a sequence model's actor.
#[derive(Clone, Debug)]
pub(crate) struct SequenceSessions {
    tx: std::sync::mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl SequenceSessions {
    /// Starts the actor thread and one thread per instance.
    pub(crate) fn start(
        adm: Arc<Admission>,
        setup: SequenceSetup,
        instances: Vec<Box<dyn StatefulInstance>>,
    ) -> Result<SequenceSessions, BatchingError> {
        let shared = Arc::new(Shared {
            adm,
            seq: setup.seq.clone(),
            version: setup.version,
            counters: SessionCounters::default(),
            slots: setup.slots,
        });
        let tx = actor::spawn(shared.clone(), setup, instances)?;
        Ok(SequenceSessions { tx, shared })
    }

    fn unavailable(&self, reason: &str) -> BatchingError {
        BatchingError::Unavailable { model: self.shared.adm.spec.name.clone(), reason: reason.into() }
    }

    /// Checks a request's sequence parameters before it is admitted.
    pub(crate) fn check(&self, req: &InferRequest) -> Result<(), BatchingError> {
        let model = &self.shared.adm.spec.name;
        let invalid = |reason: String| BatchingError::InvalidRequest { model: model.clone(), reason };
        let Some(id) = &req.sequence.id else {
            return Err(invalid(
                "this is a stateful (sequence-batched) model: every request needs a non-zero sequence_id, and the first request of a sequence sequence_start".into(),
            ));
        };
        if req.rows != 1 {
            return Err(invalid(format!(
                "a request of sequence {id} must carry exactly one batch row, got {}",
                req.rows
            )));
        }
        Ok(())
    }

    /// Queues an admitted request behind the earlier requests of its sequence.
    pub(crate) fn send(&self, req: InferRequest) -> Result<(), BatchingError> {
        let InferRequest { inputs, sequence, reply, arrived, .. } = req;
        let Some(id) = sequence.id else {
            self.shared.adm.dequeued(1);
            return Err(BatchingError::InvalidRequest {
                model: self.shared.adm.spec.name.clone(),
                reason: "a request without a sequence_id".into(),
            });
        };
        let req = SequenceRequest { id, start: sequence.start, end: sequence.end, inputs, reply, arrived };
        self.tx.send(Command::Submit(req)).map_err(|_| {
            self.shared.adm.dequeued(1);
            self.unavailable("the sequence batcher stopped")
        })
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, BatchingError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| self.unavailable("the sequence batcher stopped"))?;
        rx.await.map_err(|_| self.unavailable("the sequence batcher stopped"))
    }

    /// Every session of this model version: live ones and spilled ones.
    pub(crate) async fn list(&self) -> Vec<SessionInfo> {
        self.ask(Command::List).await.unwrap_or_default()
    }

    /// Ends the session here and returns its state (it must have no request queued or running).
    pub(crate) async fn export(&self, id: SequenceId) -> Result<SessionBlob, BatchingError> {
        self.ask(|reply| Command::Export { id, reply }).await?
    }

    /// Continues a session exported by a worker serving the same model version.
    pub(crate) async fn import(&self, blob: SessionBlob) -> Result<SessionInfo, BatchingError> {
        self.ask(|reply| Command::Import { blob, reply }).await?
    }

    /// See [`super::Batcher::await_handover`].
    pub(crate) fn await_handover(&self) {
        let _ = self.tx.send(Command::AwaitHandover);
    }

    /// See [`super::Batcher::take_handover`].
    pub(crate) async fn take_handover(&self) {
        let _ = self.ask(Command::Handover).await;
    }

    /// The worker started draining: stop expiring sequences and save sessions to the store as
    /// they are idle (see `actor/drain.rs`); requests are still admitted until [`Self::drain`].
    pub(crate) async fn begin_drain(&self) {
        let _ = self.ask(Command::BeginDrain).await;
    }

    /// Stops admitting, finishes every queued request, writes every live session to the store
    /// (when one is configured), then stops the threads.
    pub(crate) async fn drain(&self) {
        self.shared.adm.close(DRAINING);
        let _ = self.ask(Command::Drain).await;
    }

    /// The model version's session counters.
    pub(crate) fn counters(&self) -> &SessionCounters {
        &self.shared.counters
    }

    /// Live sequences the model can hold now (slots × instances in service).
    pub(crate) fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// The sequence batching settings.
    pub(crate) fn sequence_spec(&self) -> &Arc<SequenceSpec> {
        &self.shared.seq
    }
}
