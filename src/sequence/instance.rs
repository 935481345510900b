//! Stateful instances: an executor that keeps each batch slot's implicit state where the model
//! runs (host memory on the CPU, the slot's device tensors on Neuron), and the thread that owns it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use tokio::sync::oneshot;

use super::models::{KernelStep, SequenceKernel};
use super::{ClosedReason, Command, SequenceError, SequenceId, StepOutcome};
use crate::backend::{BackendError, NamedTensor};
use crate::scheduler::stats::ModelStats;
use crate::scheduler::{FailureReason, InferReply, RequestInput};
use crate::tensor::Tensor;

/// One sequence's step handed to an instance: which slot, and the request.
#[derive(Debug)]
pub struct SlotStep<'a> {
    /// The batch slot holding the sequence's state.
    pub slot: usize,
    /// Reset the slot's state to the initial state before running (START).
    pub start: bool,
    /// The request's inputs, in model-configuration order.
    pub inputs: &'a [RequestInput],
    /// Control tensors, in configuration order.
    pub controls: &'a [NamedTensor],
}

/// An executor of stateful batches owned by one thread; each slot holds one live sequence's state.
pub trait StatefulInstance: Send {
    /// Runs one step for every entry (distinct slots). Returns each step's outputs, in
    /// model-configuration order.
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError>;
    /// A copy of a slot's state tensors (for spilling and export).
    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError>;
    /// Replaces a slot's state tensors (restore and import).
    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError>;
    /// A short label for logs, e.g. `cpu:0`.
    fn label(&self) -> String;
}

/// A CPU instance over a [`SequenceKernel`], with the slots' states in host memory.
#[derive(Debug)]
pub struct CpuSequenceInstance {
    kernel: Arc<dyn SequenceKernel>,
    initial: Vec<Tensor>,
    states: Vec<Vec<Tensor>>,
    index: usize,
}

impl CpuSequenceInstance {
    /// An instance with `slots` slots, each starting at `initial`.
    pub fn new(
        kernel: Arc<dyn SequenceKernel>,
        initial: Vec<Tensor>,
        slots: usize,
        index: usize,
    ) -> CpuSequenceInstance {
        CpuSequenceInstance { kernel, states: vec![initial.clone(); slots], initial, index }
    }

    fn slot_error(&self, slot: usize) -> BackendError {
        BackendError::Execution {
            message: format!("slot {slot} does not exist (instance has {})", self.states.len()),
            instance_usable: true,
            nrt_status: None,
        }
    }
}

impl StatefulInstance for CpuSequenceInstance {
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let mut taken = Vec::with_capacity(steps.len());
        for s in steps {
            let st = self.states.get_mut(s.slot).ok_or_else(|| BackendError::Execution {
                message: format!("slot {} does not exist", s.slot),
                instance_usable: true,
                nrt_status: None,
            })?;
            taken.push(if s.start { self.initial.clone() } else { std::mem::take(st) });
        }
        let mut ksteps: Vec<KernelStep<'_>> = steps
            .iter()
            .zip(taken.iter_mut())
            .map(|(s, state)| KernelStep { inputs: s.inputs, controls: s.controls, state: state.as_mut_slice() })
            .collect();
        let result = self.kernel.run(&mut ksteps);
        drop(ksteps);
        // The state is written back even when the kernel failed part-way, so a slot is never
        // left empty; a failed step leaves its sequence's state as the kernel left it.
        for (s, state) in steps.iter().zip(taken) {
            if let Some(slot) = self.states.get_mut(s.slot) {
                *slot = state;
            }
        }
        result
    }

    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError> {
        self.states.get(slot).cloned().ok_or_else(|| self.slot_error(slot))
    }

    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError> {
        let err = self.slot_error(slot);
        let s = self.states.get_mut(slot).ok_or(err)?;
        *s = state;
        Ok(())
    }

    fn label(&self) -> String {
        format!("cpu:{}", self.index)
    }
}

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
    pub(crate) reply: oneshot::Sender<Result<InferReply, SequenceError>>,
    pub(crate) arrived: Instant,
}

/// Work for an instance thread.
#[derive(Debug)]
pub(crate) enum Job {
    /// Execute one batch.
    Execute(Vec<StepJob>, Instant),
    /// Read a slot's state.
    Read { slot: usize, reply: std::sync::mpsc::Sender<Result<Vec<Tensor>, BackendError>> },
}

/// Starts the thread owning `instance`; it reports each finished batch to the actor.
pub(crate) fn spawn(
    index: usize,
    mut instance: Box<dyn StatefulInstance>,
    model: String,
    stats: Arc<ModelStats>,
    done: std::sync::mpsc::Sender<Command>,
) -> Result<std::sync::mpsc::Sender<Job>, std::io::Error> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let name = format!("{model}-seq-{}", instance.label());
    std::thread::Builder::new().name(name).spawn(move || {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Read { slot, reply } => {
                    let _ = reply.send(instance.read_state(slot));
                }
                Job::Execute(steps, dispatched) => {
                    let (usable, outcomes, replies) =
                        run_batch(&mut *instance, steps, dispatched, &model, &stats, index);
                    // Done reaches the actor before any client sees its reply, so a client's next
                    // call (an export, say) never finds its sequence still marked as running.
                    let _ = done.send(Command::Done { instance: index, outcomes, usable });
                    for (reply, result) in replies {
                        let _ = reply.send(result);
                    }
                }
            }
        }
    })?;
    Ok(tx)
}

/// A reply to deliver once the actor has been told the batch is done.
type Reply = (oneshot::Sender<Result<InferReply, SequenceError>>, Result<InferReply, SequenceError>);

/// Runs one batch; returns whether the instance stays usable, how each step went and the
/// replies to send. A step whose pending restore cannot be written is not executed (the actor
/// closes its sequence); the other steps run.
fn run_batch(
    instance: &mut dyn StatefulInstance,
    steps: Vec<StepJob>,
    dispatched: Instant,
    model: &str,
    stats: &ModelStats,
    index: usize,
) -> (bool, Vec<(SequenceId, StepOutcome)>, Vec<Reply>) {
    let t0 = Instant::now();
    let mut outcomes = Vec::with_capacity(steps.len());
    let mut replies = Vec::with_capacity(steps.len());
    let mut usable = true;
    let mut runnable = Vec::with_capacity(steps.len());
    for mut s in steps {
        let Some(state) = s.restore.take() else {
            runnable.push(s);
            continue;
        };
        match instance.write_state(s.slot, state) {
            Ok(()) => runnable.push(s),
            Err(e) => {
                usable &= !matches!(e, BackendError::Execution { instance_usable: false, .. });
                tracing::warn!(model, instance = index, id = %s.id, error = %e, "cannot restore a session into its slot; it is closed");
                stats.record_failure(FailureReason::Backend, s.arrived.elapsed());
                let why = format!("{}: {e}", ClosedReason::RestoreFailed.as_str());
                let err = SequenceError::NotLive { model: model.to_string(), id: s.id.clone(), why };
                outcomes.push((s.id, StepOutcome::RestoreFailed));
                replies.push((s.reply, Err(err)));
            }
        }
    }
    if runnable.is_empty() || !usable {
        for s in runnable {
            stats.record_failure(FailureReason::Unavailable, s.arrived.elapsed());
            let reason = "its instance failed while restoring another session".to_string();
            outcomes.push((s.id, StepOutcome::Failed));
            replies.push((s.reply, Err(SequenceError::Unavailable { model: model.to_string(), reason })));
        }
        return (usable, outcomes, replies);
    }
    let (usable, mut done, mut rest) = execute_batch(instance, runnable, t0, dispatched, model, stats, index);
    outcomes.append(&mut done);
    replies.append(&mut rest);
    (usable, outcomes, replies)
}

/// Executes steps whose slots hold their state.
fn execute_batch(
    instance: &mut dyn StatefulInstance,
    steps: Vec<StepJob>,
    t0: Instant,
    dispatched: Instant,
    model: &str,
    stats: &ModelStats,
    index: usize,
) -> (bool, Vec<(SequenceId, StepOutcome)>, Vec<Reply>) {
    let t_in = t0.elapsed();
    let views: Vec<SlotStep<'_>> = steps
        .iter()
        .map(|s| SlotStep { slot: s.slot, start: s.start, inputs: &s.inputs, controls: &s.controls })
        .collect();
    let result = instance.execute(&views);
    drop(views);
    let infer = t0.elapsed().saturating_sub(t_in);
    let n = steps.len() as u64;
    let outcomes = |o: StepOutcome| steps.iter().map(|s| (s.id.clone(), o)).collect::<Vec<_>>();
    match result {
        Ok(outputs) if outputs.len() == steps.len() => {
            let ok = outcomes(StepOutcome::Ok);
            let t_out = Instant::now();
            let mut replies = Vec::with_capacity(steps.len());
            for (s, outs) in steps.into_iter().zip(outputs) {
                stats.queue.add(1, dispatched.saturating_duration_since(s.arrived));
                stats.success.add(1, s.arrived.elapsed());
                replies.push((s.reply, Ok(InferReply { outputs: outs })));
            }
            let out_time = t_out.elapsed();
            stats.compute_input.add(n, t_in);
            stats.compute_infer.add(n, infer);
            stats.compute_output.add(n, out_time);
            stats.inference_count.fetch_add(n, Relaxed);
            stats.record_execution(n as usize, t_in, infer, out_time);
            if let Some(s) = stats.instances.get(index) {
                s.executions.fetch_add(1, Relaxed);
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
            let usable = !matches!(e, BackendError::Execution { instance_usable: false, .. });
            if let Some(s) = stats.instances.get(index) {
                s.errors.fetch_add(1, Relaxed);
            }
            tracing::warn!(model, instance = index, error = %e, "sequence batch failed");
            let replies = steps
                .into_iter()
                .map(|s| {
                    stats.record_failure(FailureReason::Backend, s.arrived.elapsed());
                    (s.reply, Err(SequenceError::Backend { model: model.to_string(), source: e.clone() }))
                })
                .collect();
            (usable, failed, replies)
        }
    }
}
