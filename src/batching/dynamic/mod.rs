//! The dynamic batching policy (Triton's `dynamic_batching`): one queue actor per model version
//! forms batches (delay, preferred sizes, priorities, queue timeouts, Neuron shape buckets) and
//! hands them to idle instance threads, which pad to the bucket, split work larger than the
//! largest bucket, execute, and send each request its own rows.
//!
//! Request path: [`super::Batcher::submit`] admits the request → [`DynamicQueue::send`] → the
//! actor (sole owner of the queue) forms a batch when an instance is idle → the instance thread
//! copies the rows once into its batch buffers, pads, executes, records statistics, signals the
//! actor, then replies.

mod actor;
mod groups;
mod queue;
mod worker;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::admission::Admission;
use super::stats::FailureReason;
use super::{BatchingError, InferRequest};
use crate::backend::ModelInstance;

/// Why a dynamic model refuses requests while it drains.
const UNLOADING: &str = "the model is unloading";

enum Command {
    Enqueue(InferRequest),
    Done { instance: usize, usable: bool },
    Requeue(Vec<InferRequest>),
    Drain(oneshot::Sender<()>),
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Enqueue(_) => "Enqueue",
            Command::Done { .. } => "Done",
            Command::Requeue(_) => "Requeue",
            Command::Drain(_) => "Drain",
        })
    }
}

/// The handle's end of a dynamic model's queue actor.
#[derive(Clone, Debug)]
pub(crate) struct DynamicQueue {
    tx: mpsc::UnboundedSender<Command>,
}

impl DynamicQueue {
    /// Starts the actor (on the current tokio runtime) and one thread per instance.
    pub(crate) fn start(admission: Arc<Admission>, instances: Vec<Box<dyn ModelInstance>>) -> DynamicQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        let senders = instances
            .into_iter()
            .enumerate()
            .map(|(i, inst)| worker::spawn(i, inst, admission.clone(), tx.clone()))
            .collect();
        actor::spawn(rx, senders, admission);
        DynamicQueue { tx }
    }

    /// Queues an admitted request.
    pub(crate) fn send(&self, admission: &Admission, request: InferRequest) -> Result<(), BatchingError> {
        self.tx.send(Command::Enqueue(request)).map_err(|e| {
            admission.dequeued(1);
            if let Command::Enqueue(r) = e.0 {
                admission.stats.record_failure(FailureReason::Unavailable, r.arrived.elapsed());
            }
            BatchingError::Unavailable { model: admission.spec.name.clone(), reason: UNLOADING.into() }
        })
    }

    /// Stops admitting, lets every queued request finish, then stops the instance threads.
    pub(crate) async fn drain(&self, admission: &Admission) {
        admission.close(UNLOADING);
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Drain(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}
