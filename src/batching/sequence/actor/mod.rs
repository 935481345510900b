//! The sequence actor: one thread per model version, the only owner of the session table. It
//! queues each request behind its sequence's earlier ones, assigns slots, forms batches (one
//! request per sequence, oldest first, within the strategy's delay), expires idle sequences, and
//! spills, restores, exports, imports and drains sessions.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::Instant;

use super::worker::{self, Job, StepJob};
use super::{ClosedReason, Command, SequenceRequest, SequenceSetup, Shared, StepOutcome};
use crate::backend::NamedTensor;
use crate::backend::StatefulInstance;
use crate::batching::BatchingError;
use crate::batching::admission::NO_INSTANCE;
use crate::batching::stats::FailureReason;
use crate::config::ControlKind;
use crate::sessions::{SequenceId, SessionBlob, SessionInfo, SessionStore, StoreError};
use crate::tensor::{DataType, Tensor};

mod controls;
mod drain;
mod handover;
mod moves;
mod pending;
mod slots;

use pending::{Move, Parked};
use slots::Alloc;

/// Ids of closed sequences remembered, so a late request learns why its sequence is gone.
const REMEMBER_CLOSED: usize = 65_536;

/// One live sequence.
#[derive(Debug)]
struct Live {
    /// Instance holding its slot.
    instance: usize,
    /// Its slot on that instance.
    slot: usize,
    /// Requests executed since START.
    steps: u64,
    /// Last request arrival or completion.
    last_active: Instant,
    /// Requests waiting, in arrival order.
    queue: VecDeque<SequenceRequest>,
    /// A request of this sequence is executing.
    in_flight: bool,
    /// An END request is queued or running (later requests without START are refused).
    closing: bool,
    /// The request in flight is its END.
    end_after: bool,
    /// The request in flight is a START.
    start_after: bool,
    /// State to write into the slot before its next step (restored or imported sessions).
    restore: Option<Vec<Tensor>>,
    /// While draining: the step count at which the store last received this session.
    saved: Option<u64>,
    /// Its state is being read behind its instance's work, for a spill or an export.
    moving: bool,
}

struct Actor {
    shared: Arc<Shared>,
    store: Option<Arc<SessionStore>>,
    instances: Vec<Option<Sender<Job>>>,
    busy: Vec<bool>,
    free: Vec<Vec<usize>>,
    live: HashMap<SequenceId, Live>,
    /// Sessions in the store: steps, and since when they are idle (start-up for those found there).
    spilled: HashMap<SequenceId, (u64, Instant)>,
    closed: HashMap<SequenceId, ClosedReason>,
    closed_order: VecDeque<SequenceId>,
    drain: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The worker or the model is draining: sequences no longer expire and sessions are saved.
    draining: bool,
    /// The store's epoch when `spilled` was listed (a damaged file moved aside changes it).
    store_epoch: u64,
    /// Moves waiting for the state of a session whose instance is busy.
    moving: HashMap<SequenceId, Move>,
    /// Requests waiting for a slot that a spill in flight frees.
    parked: VecDeque<Parked>,
    /// Spills waiting for their session's state.
    spills_in_flight: usize,
    /// A reload is under way: the replaced version may still hold sessions this one does not know.
    awaiting_handover: bool,
}

/// The sessions the store holds for this model version. A store that cannot be read is logged
/// and the model serves without them (they stay in the store); skipped entries are counted.
fn stored_sessions(shared: &Shared, store: &SessionStore) -> HashMap<SequenceId, (u64, Instant)> {
    let model = &shared.adm.spec.name;
    let (found, skipped) = match store.list(model, shared.version) {
        Ok(l) => l,
        Err(e) => {
            shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(model = %model, error = %e, "cannot list the sessions in the session store; the model serves without them");
            return HashMap::new();
        }
    };
    for s in skipped {
        tracing::warn!(model = %model, problem = %s, "session store entry skipped");
        shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
    }
    let now = Instant::now();
    let spilled: HashMap<SequenceId, (u64, Instant)> = found.into_iter().map(|s| (s.id, (s.steps, now))).collect();
    shared.counters.spilled_now.store(spilled.len() as u64, Ordering::Relaxed);
    if !spilled.is_empty() {
        tracing::info!(model = %model, sessions = spilled.len(), "sessions found in the session store; they continue on their next request");
    }
    spilled
}

pub(super) fn spawn(
    shared: Arc<Shared>,
    setup: SequenceSetup,
    instances: Vec<Box<dyn StatefulInstance>>,
) -> Result<Sender<Command>, BatchingError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let model = shared.adm.spec.name.clone();
    let n = instances.len();
    let mut senders = Vec::with_capacity(n);
    for (i, inst) in instances.into_iter().enumerate() {
        let s = worker::spawn(i, inst, shared.clone(), tx.clone()).map_err(|e| BatchingError::Unavailable {
            model: model.clone(),
            reason: format!("cannot start an instance thread: {e}"),
        })?;
        senders.push(Some(s));
    }
    let mut spilled = HashMap::new();
    let mut store_epoch = 0;
    if let Some(store) = &setup.store {
        store_epoch = store.epoch();
        spilled = stored_sessions(&shared, store);
    }
    let actor = Actor {
        store: setup.store,
        busy: vec![false; n],
        free: (0..n).map(|_| (0..setup.slots).rev().collect()).collect(),
        instances: senders,
        live: HashMap::new(),
        spilled,
        closed: HashMap::new(),
        closed_order: VecDeque::new(),
        drain: Vec::new(),
        draining: false,
        store_epoch,
        moving: HashMap::new(),
        parked: VecDeque::new(),
        spills_in_flight: 0,
        awaiting_handover: false,
        shared,
    };
    std::thread::Builder::new()
        .name(format!("{model}-sequences"))
        .spawn(move || {
            let adm = actor.shared.adm.clone();
            // The session table's only owner: if it dies, the model cannot serve, so it must not
            // say it is ready (the panic itself is logged by the panic hook).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || actor.run(rx))).is_err() {
                tracing::error!(model = %adm.spec.name, "the sequence batcher failed; the model is not ready until it is reloaded");
                adm.close("the model's sequence batcher failed; reload the model (RepositoryModelLoad) or restart the worker");
                adm.set_in_service(0);
            }
        })
        .map_err(|e| BatchingError::Unavailable { model, reason: format!("cannot start the sequence batcher: {e}") })?;
    Ok(tx)
}

impl Actor {
    fn model(&self) -> String {
        self.shared.adm.spec.name.clone()
    }

    fn run(mut self, rx: Receiver<Command>) {
        let mut wake: Option<Instant> = None;
        loop {
            let cmd = match wake {
                Some(at) => match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                },
            };
            if let Some(c) = cmd {
                self.handle(c);
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            let now = Instant::now();
            if !self.draining {
                self.expire(now);
            }
            wake = self.dispatch(now);
            if let Some(e) = self.next_expiry() {
                wake = Some(wake.map_or(e, |w| w.min(e)));
            }
            if !self.drain.is_empty()
                && self.moving.is_empty()
                && !self.awaiting_handover
                && self.parked.is_empty()
                && self.live.values().all(|l| !l.in_flight && l.queue.is_empty())
            {
                self.finish_drain();
                break;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        self.check_store_epoch();
        match cmd {
            Command::Submit(req) => self.submit(req),
            Command::Done { instance, outcomes, usable } => self.done(instance, outcomes, usable),
            Command::List(reply) => {
                let _ = reply.send(self.list());
            }
            Command::Export { id, reply } => self.export(id, reply),
            Command::Import { blob, reply } => self.import(blob, reply),
            Command::StateRead { id, state } => self.state_read(id, state),
            Command::AwaitHandover => self.await_handover(),
            Command::Handover(done) => {
                self.take_handover();
                let _ = done.send(());
            }
            Command::BeginDrain(done) => {
                self.begin_drain();
                let _ = done.send(());
            }
            Command::Drain(done) => {
                self.begin_drain();
                self.drain.push(done);
            }
        }
    }

    fn reject(&self, req: SequenceRequest, e: BatchingError) {
        self.shared.adm.dequeued(1);
        let reason = match e {
            BatchingError::SlotsExhausted { .. } | BatchingError::QueueFull { .. } => FailureReason::QueueFull,
            BatchingError::Unavailable { .. } | BatchingError::Store(StoreError::Io { .. }) => {
                FailureReason::Unavailable
            }
            _ => FailureReason::Backend,
        };
        self.shared.adm.stats.record_failure(reason, req.arrived.elapsed());
        let _ = req.reply.send(Err(e));
    }

    fn submit(&mut self, req: SequenceRequest) {
        let now = Instant::now();
        if let Err(e) = self.check_corrid(&req.id) {
            return self.reject(req, e);
        }
        if self.instances.iter().all(Option::is_none) {
            let e = BatchingError::Unavailable { model: self.model(), reason: NO_INSTANCE.into() };
            return self.reject(req, e);
        }
        if let Some(l) = self.live.get_mut(&req.id) {
            if !req.start && l.closing {
                let e = BatchingError::NotLive {
                    model: self.model(),
                    id: req.id.clone(),
                    why: ClosedReason::Ended.as_str().into(),
                };
                return self.reject(req, e);
            }
            l.closing = req.end;
            l.last_active = now;
            l.queue.push_back(req);
            return;
        }
        // A request behind a parked one of its sequence waits with it, in order.
        if self.is_parked(&req.id) {
            return self.park(Parked::Submit(req));
        }
        let spilled = self.spilled.contains_key(&req.id);
        // During a reload the replaced version may still hold it: wait for the handover.
        if !req.start && !spilled && self.awaiting_handover {
            return self.park(Parked::Submit(req));
        }
        if !req.start && !spilled {
            let why = self.closed.get(&req.id).map_or(
                "was never started on this worker: its first request must set sequence_start (or import the session)",
                |r| r.as_str(),
            );
            let e = BatchingError::NotLive { model: self.model(), id: req.id.clone(), why: why.into() };
            return self.reject(req, e);
        }
        let (inst, slot) = match self.allocate() {
            Ok(Alloc::Slot(i, s)) => (i, s),
            Ok(Alloc::Pending) => return self.park(Parked::Submit(req)),
            Err(e) => return self.reject(req, e),
        };
        let mut live = Live {
            instance: inst,
            slot,
            steps: 0,
            last_active: now,
            queue: VecDeque::new(),
            in_flight: false,
            closing: req.end,
            end_after: false,
            start_after: false,
            restore: None,
            saved: None,
            moving: false,
        };
        if spilled {
            let taken = match &self.store {
                Some(store) => store.take(&self.shared.adm.spec.name, self.shared.version, &req.id),
                None => Ok(None),
            };
            if let Err(e @ StoreError::Io { .. }) = &taken {
                // The entry is still in the store: the session stays spilled, the client retries.
                self.free_slot(inst, slot);
                self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                let e = BatchingError::Unavailable {
                    model: self.model(),
                    reason: format!(
                        "sequence {} is in the session store, which cannot be written now ({e}); it is kept there: retry later",
                        req.id
                    ),
                };
                return self.reject(req, e);
            }
            let since = self.spilled.remove(&req.id);
            self.shared.counters.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
            let restored = taken.map_err(BatchingError::from).and_then(|b| match b {
                Some(b) => self.check_state(&b.state).map(|()| Some(b)),
                None => Ok(None),
            });
            match (restored, req.start) {
                (_, true) => {}
                (Ok(Some(blob)), false) => {
                    live.restore = Some(blob.state);
                    live.steps = blob.steps;
                    self.shared.counters.restored.fetch_add(1, Ordering::Relaxed);
                }
                (Ok(None), false) => {
                    self.free_slot(inst, slot);
                    if since.is_some() {
                        self.shared.counters.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    let e = BatchingError::NotLive {
                        model: self.model(),
                        id: req.id.clone(),
                        why: "was spilled, but its entry is gone from the session store (the store file was damaged and replaced, or removed); start it again with sequence_start".into(),
                    };
                    return self.reject(req, e);
                }
                (Err(e), false) => {
                    self.free_slot(inst, slot);
                    if matches!(
                        e,
                        BatchingError::Store(StoreError::Corrupt { .. } | StoreError::Damaged { .. })
                            | BatchingError::BadBlob { .. }
                    ) {
                        self.shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(model = %self.model(), id = %req.id, error = %e, "cannot restore a spilled session");
                    return self.reject(req, e);
                }
            }
        }
        self.closed.remove(&req.id);
        live.queue.push_back(req);
        if let Some(id) = live.queue.back().map(|r| r.id.clone()) {
            self.live.insert(id, live);
        }
        self.shared.counters.live.store(self.live.len() as u64, Ordering::Relaxed);
    }

    fn check_corrid(&self, id: &SequenceId) -> Result<(), BatchingError> {
        let numeric =
            self.shared.seq.controls.iter().any(|c| c.kind == ControlKind::CorrId && c.dtype != DataType::Bytes);
        if numeric && matches!(id, SequenceId::Str(_)) {
            return Err(BatchingError::InvalidRequest {
                model: self.model(),
                reason: format!(
                    "sequence id {id} is a string, but the model's CORRID control input is an integer; send an integer sequence_id"
                ),
            });
        }
        Ok(())
    }

    fn check_state(&self, state: &[Tensor]) -> Result<(), BatchingError> {
        let specs = &self.shared.seq.states;
        let ok = state.len() == specs.len()
            && state
                .iter()
                .zip(specs)
                .all(|(t, s)| t.dtype == s.dtype && t.shape == s.dims && t.data.len() == s.initial.data.len());
        if ok {
            return Ok(());
        }
        let want: Vec<String> = specs.iter().map(|s| format!("{}{:?}", s.dtype, s.dims)).collect();
        let got: Vec<String> = state.iter().map(|t| format!("{}{:?}", t.dtype, t.shape)).collect();
        Err(BatchingError::BadBlob {
            reason: format!("model '{}' keeps state {want:?}, the session holds {got:?}", self.model()),
        })
    }

    /// Sends a batch to every idle instance that has work; returns when to wake for a delay.
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let (delay, preferred) = self.shared.seq.batch_policy();
        let preferred = preferred.to_vec();
        let limit = self.shared.adm.spec.max_batch_size.max(1);
        let mut wake: Option<Instant> = None;
        for inst in 0..self.instances.len() {
            if self.busy[inst] || self.instances[inst].is_none() {
                continue;
            }
            let mut ready: Vec<(Instant, SequenceId)> = self
                .live
                .iter()
                .filter(|(_, l)| l.instance == inst && !l.in_flight && !l.moving)
                .filter_map(|(id, l)| l.queue.front().map(|r| (r.arrived, id.clone())))
                .collect();
            if ready.is_empty() {
                continue;
            }
            ready.sort();
            let take = ready.len().min(limit);
            if !delay.is_zero() && take < limit && !preferred.contains(&take) && self.drain.is_empty() {
                let until = ready[0].0 + delay;
                if until > now {
                    wake = Some(wake.map_or(until, |w| w.min(until)));
                    continue;
                }
            }
            let mut jobs = Vec::with_capacity(take);
            for (_, id) in ready.into_iter().take(take) {
                let Some(req) = self.live.get_mut(&id).and_then(|l| l.queue.pop_front()) else { continue };
                let controls = self.controls(&req);
                let Some(l) = self.live.get_mut(&id) else { continue };
                l.in_flight = true;
                l.end_after = req.end;
                l.start_after = req.start;
                let SequenceRequest { id, start, inputs, reply, arrived, .. } = req;
                jobs.push(StepJob {
                    id,
                    slot: l.slot,
                    start,
                    restore: l.restore.take(),
                    inputs,
                    controls,
                    reply,
                    arrived,
                });
            }
            self.shared.adm.dequeued(jobs.len());
            let sent = self.instances[inst].as_ref().map(|s| s.send(Job::Execute(jobs, now)));
            match sent {
                Some(Ok(())) => self.busy[inst] = true,
                Some(Err(e)) => {
                    if let Job::Execute(jobs, _) = e.0 {
                        self.fail_jobs(jobs, "instance thread stopped");
                    }
                    self.take_out(inst);
                }
                None => {}
            }
        }
        wake
    }

    fn fail_jobs(&mut self, jobs: Vec<StepJob>, why: &str) {
        for j in jobs {
            if let Some(l) = self.live.get_mut(&j.id) {
                l.in_flight = false;
            }
            self.shared.adm.stats.record_failure(FailureReason::Unavailable, j.arrived.elapsed());
            let _ = j.reply.send(Err(BatchingError::Unavailable { model: self.model(), reason: why.into() }));
        }
    }

    /// Takes an instance out of service: its sequences are lost (remembered as closed because
    /// their instance failed) and their queued requests fail. Without any instance left, the
    /// model becomes not ready and every request is refused as unavailable.
    fn take_out(&mut self, inst: usize) {
        if self.instances.get(inst).is_none_or(Option::is_none) {
            return;
        }
        self.instances[inst] = None;
        self.busy[inst] = false;
        let ids: Vec<SequenceId> =
            self.live.iter().filter(|(_, l)| l.instance == inst).map(|(id, _)| id.clone()).collect();
        tracing::error!(model = %self.model(), instance = inst, sessions_lost = ids.len(), "sequence instance taken out of service");
        for id in ids {
            if let Some(l) = self.live.remove(&id) {
                for r in l.queue {
                    let e = BatchingError::Unavailable {
                        model: self.model(),
                        reason: format!("sequence {id} was lost: its instance failed"),
                    };
                    self.reject(r, e);
                }
                self.free_slot(l.instance, l.slot);
            }
            self.remember_closed(&id, ClosedReason::InstanceFailed);
            self.abandon_move(&id);
        }
        if let Some(s) = self.shared.adm.stats.instances.get(inst) {
            s.in_service.store(0, Ordering::Relaxed);
        }
        self.shared.counters.live.store(self.live.len() as u64, Ordering::Relaxed);
        let left = self.instances.iter().filter(|i| i.is_some()).count();
        if left == 0 {
            tracing::error!(model = %self.model(), "no sequence instance left in service; the model is not ready");
        }
        self.shared.adm.set_in_service(left);
    }

    fn done(&mut self, instance: usize, outcomes: Vec<(SequenceId, StepOutcome)>, usable: bool) {
        let now = Instant::now();
        if let Some(b) = self.busy.get_mut(instance) {
            *b = false;
        }
        for (id, outcome) in outcomes {
            let Some(l) = self.live.get_mut(&id) else { continue };
            l.in_flight = false;
            l.last_active = now;
            match outcome {
                StepOutcome::Ok => {
                    l.steps = if l.start_after { 1 } else { l.steps.saturating_add(1) };
                    if l.end_after && l.queue.is_empty() {
                        self.close(&id, ClosedReason::Ended);
                    }
                }
                // A failed END does not end the sequence: it can be retried. Later requests
                // without START are refused only while an END is still queued.
                StepOutcome::Failed => l.closing = l.queue.back().is_some_and(|r| r.end),
                StepOutcome::RestoreFailed => self.close(&id, ClosedReason::RestoreFailed),
            }
        }
        if !usable {
            self.take_out(instance);
            // A spill of a session lost with the instance frees nothing: parked requests look again.
            self.retry_parked();
        }
        self.save_while_draining(instance);
    }
}
