//! A sequence instance thread: owns one [`StatefulInstance`], writes pending restores into their
//! slots, runs each batch of steps, and follows the instance-thread protocol of
//! [`crate::batching::instance`] (panics caught, statistics before the done signal, done before
//! the replies, a fatal error retires the instance).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use super::{ClosedReason, Command, Shared, StepOutcome};
use crate::backend::{BackendError, NamedTensor, RequestInput, SlotStep, StatefulInstance};
use crate::batching::instance::{self as protocol, Replies};
use crate::batching::stats::{BatchPhases, FailureReason, ModelStats};
use crate::batching::{BatchingError, InferReply, ReplySender};
use crate::sessions::SequenceId;
use crate::tensor::Tensor;

/// A request's step as sent to the instance thread.
#[derive(Debug)]
pub(crate) struct StepJob {
    pub(crate) id: SequenceId,
    pub(crate) slot: usize,
    pub(crate) start: bool,
    /// State to write into the slot first (a restored or imported session).
    pub(crate) restore: Option<Vec<Tensor>>,
    pub(crate) inputs: Vec<RequestInput>,
    pub(crate) controls: Vec<NamedTensor>,
    pub(crate) reply: ReplySender,
    pub(crate) arrived: Instant,
}

/// Work for an instance thread.
#[derive(Debug)]
pub(crate) enum Job {
    /// Execute one batch.
    Execute(Vec<StepJob>, Instant),
    /// Read a slot's state.
    Read { slot: usize, reply: std::sync::mpsc::Sender<Result<Vec<Tensor>, BackendError>> },
    /// Read a slot's state and send it to the actor as [`Command::StateRead`] (queued behind
    /// the batch this instance is executing, so the actor does not wait for it).
    ReadFor { slot: usize, id: SequenceId },
}

/// Starts the thread owning `instance`; it reports each finished batch to the actor.
pub(crate) fn spawn(
    index: usize,
    mut instance: Box<dyn StatefulInstance>,
    shared: Arc<Shared>,
    done: std::sync::mpsc::Sender<Command>,
) -> Result<std::sync::mpsc::Sender<Job>, std::io::Error> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let model = shared.adm.spec.name.clone();
    let name = format!("{model}-seq-{}", instance.label());
    let stats = shared.adm.stats.clone();
    let in_service = protocol::in_service(stats.clone(), index);
    std::thread::Builder::new().name(name).spawn(move || {
        let _in_service = in_service;
        let label = instance.label();
        while let Ok(job) = rx.recv() {
            match job {
                Job::Read { slot, reply } => {
                    let _ = reply.send(protocol::guarded(&label, || instance.read_state(slot)));
                }
                Job::ReadFor { slot, id } => {
                    let state = protocol::guarded(&label, || instance.read_state(slot));
                    let _ = done.send(Command::StateRead { id, state });
                }
                Job::Execute(steps, dispatched) => {
                    let batch = Batch { model: &model, label: &label, stats: &stats, index };
                    let (usable, outcomes, replies) = batch.run(&mut *instance, steps, dispatched);
                    // Done reaches the actor before any client sees its reply, so a client's next
                    // call (an export, say) never finds its sequence still marked as running.
                    replies.deliver_after(|| {
                        let _ = done.send(Command::Done { instance: index, outcomes, usable });
                    });
                }
            }
        }
    })?;
    Ok(tx)
}

/// What one batch is run with.
struct Batch<'a> {
    model: &'a str,
    label: &'a str,
    stats: &'a ModelStats,
    index: usize,
}

/// How each step of a batch went.
type Outcomes = Vec<(SequenceId, StepOutcome)>;

impl Batch<'_> {
    /// Runs one batch; returns whether the instance stays usable, how each step went and the
    /// replies to send. A step whose pending restore cannot be written is not executed (the actor
    /// closes its sequence); the other steps run.
    fn run(
        &self,
        instance: &mut dyn StatefulInstance,
        steps: Vec<StepJob>,
        dispatched: Instant,
    ) -> (bool, Outcomes, Replies<InferReply>) {
        let (model, stats) = (self.model, self.stats);
        let t0 = Instant::now();
        let mut outcomes = Vec::with_capacity(steps.len());
        let mut replies = Replies::with_capacity(steps.len());
        let mut usable = true;
        let mut runnable = Vec::with_capacity(steps.len());
        for mut s in steps {
            let Some(state) = s.restore.take() else {
                runnable.push(s);
                continue;
            };
            match protocol::guarded(self.label, || instance.write_state(s.slot, state)) {
                Ok(()) => runnable.push(s),
                Err(e) => {
                    usable &= !protocol::is_fatal(&e);
                    tracing::warn!(model, instance = self.index, id = %s.id, error = %e, "cannot restore a session into its slot; it is closed");
                    stats.record_failure(FailureReason::Backend, s.arrived.elapsed());
                    let why = format!("{}: {e}", ClosedReason::RestoreFailed.as_str());
                    let err = BatchingError::NotLive { model: model.to_string(), id: s.id.clone(), why };
                    outcomes.push((s.id, StepOutcome::RestoreFailed));
                    replies.push(s.reply, Err(err));
                }
            }
        }
        if runnable.is_empty() || !usable {
            for s in runnable {
                stats.record_failure(FailureReason::Unavailable, s.arrived.elapsed());
                let reason = "its instance failed while restoring another session".to_string();
                outcomes.push((s.id, StepOutcome::Failed));
                replies.push(s.reply, Err(BatchingError::Unavailable { model: model.to_string(), reason }));
            }
            return (usable, outcomes, replies);
        }
        let (usable, mut done, mut rest) = self.execute(instance, runnable, t0, dispatched);
        outcomes.append(&mut done);
        replies.append(&mut rest);
        (usable, outcomes, replies)
    }

    /// Executes steps whose slots hold their state.
    fn execute(
        &self,
        instance: &mut dyn StatefulInstance,
        steps: Vec<StepJob>,
        t0: Instant,
        dispatched: Instant,
    ) -> (bool, Outcomes, Replies<InferReply>) {
        let (model, stats) = (self.model, self.stats);
        let t_in = t0.elapsed();
        let views: Vec<SlotStep<'_>> = steps
            .iter()
            .map(|s| SlotStep { slot: s.slot, start: s.start, inputs: &s.inputs, controls: &s.controls })
            .collect();
        let result = protocol::guarded(self.label, || instance.execute(&views));
        drop(views);
        let infer = t0.elapsed().saturating_sub(t_in);
        let outcomes = |o: StepOutcome| steps.iter().map(|s| (s.id.clone(), o)).collect::<Vec<_>>();
        let mut replies = Replies::with_capacity(steps.len());
        match result {
            Ok(outputs) if outputs.len() == steps.len() => {
                let ok = outcomes(StepOutcome::Ok);
                let t_out = Instant::now();
                let n = steps.len();
                let mut done = Vec::with_capacity(n);
                for (s, outs) in steps.into_iter().zip(outputs) {
                    done.push((s.reply, InferReply { outputs: outs }, s.arrived));
                }
                let phases = BatchPhases { input: t_in, infer, output: t_out.elapsed() };
                // One request per sequence, one row each: n requests, n rows, one execution.
                stats.record_batch(n, n, phases, &[(n, infer)]);
                if let Some(s) = stats.instances.get(self.index) {
                    s.executions.fetch_add(1, Relaxed);
                }
                for (reply, out, arrived) in done {
                    stats.record_success(dispatched.saturating_duration_since(arrived), arrived.elapsed());
                    replies.push(reply, Ok(out));
                }
                (true, ok, replies)
            }
            other => {
                let failed = outcomes(StepOutcome::Failed);
                let e = match other {
                    Err(e) => e,
                    Ok(o) => BackendError::Execution {
                        message: format!("instance returned {} results for {} steps", o.len(), steps.len()),
                        instance_usable: true,
                        nrt_status: None,
                    },
                };
                let usable = !protocol::is_fatal(&e);
                protocol::record_batch_error(stats, self.index, &e);
                tracing::warn!(model, instance = self.index, error = %e, "sequence batch failed");
                for s in steps {
                    stats.record_failure(FailureReason::Backend, s.arrived.elapsed());
                    replies.push(s.reply, Err(BatchingError::Backend { model: model.to_string(), source: e.clone() }));
                }
                (usable, failed, replies)
            }
        }
    }
}
