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
mod moves;

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
}

struct Actor {
    shared: Arc<Shared>,
    store: Option<Arc<SessionStore>>,
    instances: Vec<Option<Sender<Job>>>,
    busy: Vec<bool>,
    free: Vec<Vec<usize>>,
    live: HashMap<SequenceId, Live>,
    spilled: HashMap<SequenceId, u64>,
    closed: HashMap<SequenceId, ClosedReason>,
    closed_order: VecDeque<SequenceId>,
    drain: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The worker or the model is draining: sequences no longer expire and sessions are saved.
    draining: bool,
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
    if let Some(store) = &setup.store {
        let (found, skipped) = store.list(&model, setup.version)?;
        for s in skipped {
            tracing::warn!(model = %model, problem = %s, "session store entry skipped");
            shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        }
        for s in found {
            spilled.insert(s.id, s.steps);
        }
        shared.counters.spilled_now.store(spilled.len() as u64, Ordering::Relaxed);
        if !spilled.is_empty() {
            tracing::info!(model = %model, sessions = spilled.len(), "sessions found in the session store; they continue on their next request");
        }
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
        shared,
    };
    std::thread::Builder::new()
        .name(format!("{model}-sequences"))
        .spawn(move || actor.run(rx))
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
            if !self.drain.is_empty() && self.live.values().all(|l| !l.in_flight && l.queue.is_empty()) {
                self.finish_drain();
                break;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(req) => self.submit(req),
            Command::Done { instance, outcomes, usable } => self.done(instance, outcomes, usable),
            Command::List(reply) => {
                let _ = reply.send(self.list());
            }
            Command::Export { id, reply } => {
                let _ = reply.send(self.export(id));
            }
            Command::Import { blob, reply } => {
                let _ = reply.send(self.import(blob));
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
        // An id absent from the index may still be in the store (written by the previous
        // instance of this model at a reload, after this one listed the store).
        let spilled = self.spilled.contains_key(&req.id) || (!req.start && self.in_store(&req.id));
        if !req.start && !spilled {
            let why = self.closed.get(&req.id).map_or(
                "was never started on this worker: its first request must set sequence_start (or import the session)",
                |r| r.as_str(),
            );
            let e = BatchingError::NotLive { model: self.model(), id: req.id.clone(), why: why.into() };
            return self.reject(req, e);
        }
        let (inst, slot) = match self.allocate() {
            Ok(s) => s,
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
        };
        if spilled {
            self.spilled.remove(&req.id);
            self.shared.counters.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
            let taken = match &self.store {
                Some(store) => store.take(&self.shared.adm.spec.name, self.shared.version, &req.id),
                None => Ok(None),
            };
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
                    let e = BatchingError::NotLive {
                        model: self.model(),
                        id: req.id.clone(),
                        why: "was spilled, but its entry is gone from the session store".into(),
                    };
                    return self.reject(req, e);
                }
                (Err(e), false) => {
                    self.free_slot(inst, slot);
                    if matches!(e, BatchingError::Store(StoreError::Corrupt { .. }) | BatchingError::BadBlob { .. }) {
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

    fn in_store(&self, id: &SequenceId) -> bool {
        let Some(store) = &self.store else { return false };
        store.contains(&self.shared.adm.spec.name, self.shared.version, id).unwrap_or_else(|e| {
            tracing::warn!(model = %self.model(), error = %e, "session store lookup failed");
            false
        })
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

    fn free_slot(&mut self, instance: usize, slot: usize) {
        if let Some(f) = self.free.get_mut(instance) {
            f.push(slot);
        }
    }

    /// A free slot on the instance with the most free slots; with a store, spills the least
    /// recently used idle session when none is free.
    fn allocate(&mut self) -> Result<(usize, usize), BatchingError> {
        for attempt in 0..2 {
            let best = (0..self.instances.len())
                .filter(|i| self.instances[*i].is_some())
                .max_by_key(|i| (self.free[*i].len(), std::cmp::Reverse(*i)))
                .filter(|i| !self.free[*i].is_empty());
            if let Some(i) = best
                && let Some(slot) = self.free[i].pop()
            {
                return Ok((i, slot));
            }
            if attempt == 1 || self.store.is_none() {
                break;
            }
            let lru = self
                .live
                .iter()
                .filter(|(_, l)| !l.in_flight && l.queue.is_empty())
                .min_by_key(|(_, l)| l.last_active)
                .map(|(id, _)| id.clone());
            let Some(id) = lru else {
                return Err(BatchingError::SlotsExhausted {
                    model: self.model(),
                    capacity: self.shared.capacity,
                    hint: "; every one has a request queued or running, so none can be spilled: retry shortly".into(),
                });
            };
            self.spill(&id)?;
        }
        Err(BatchingError::SlotsExhausted {
            model: self.model(),
            capacity: self.shared.capacity,
            hint: "; retry after sequences end or expire (max_sequence_idle_microseconds), or start the worker with --session-store to spill idle sessions".into(),
        })
    }

    fn close(&mut self, id: &SequenceId, reason: ClosedReason) {
        let Some(l) = self.live.remove(id) else { return };
        self.forget_saved(id);
        self.free_slot(l.instance, l.slot);
        for r in l.queue {
            let e = BatchingError::NotLive { model: self.model(), id: id.clone(), why: reason.as_str().into() };
            self.reject(r, e);
        }
        self.remember_closed(id, reason);
        let c = &self.shared.counters;
        match reason {
            ClosedReason::Ended => c.ended.fetch_add(1, Ordering::Relaxed),
            ClosedReason::Expired => c.expired.fetch_add(1, Ordering::Relaxed),
            ClosedReason::Exported | ClosedReason::RestoreFailed | ClosedReason::InstanceFailed => 0,
        };
        c.live.store(self.live.len() as u64, Ordering::Relaxed);
    }

    /// Records why a sequence is gone, so its late requests learn it.
    fn remember_closed(&mut self, id: &SequenceId, reason: ClosedReason) {
        if self.closed.insert(id.clone(), reason).is_none() {
            self.closed_order.push_back(id.clone());
        }
        while self.closed_order.len() > REMEMBER_CLOSED {
            if let Some(old) = self.closed_order.pop_front() {
                self.closed.remove(&old);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let max_idle = self.shared.seq.max_idle;
        let idle: Vec<SequenceId> = self
            .live
            .iter()
            .filter(|(_, l)| {
                !l.in_flight && l.queue.is_empty() && now.saturating_duration_since(l.last_active) >= max_idle
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            tracing::debug!(model = %self.model(), id = %id, "sequence expired");
            self.close(&id, ClosedReason::Expired);
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        if self.draining {
            return None;
        }
        let max_idle = self.shared.seq.max_idle;
        self.live.values().filter(|l| !l.in_flight && l.queue.is_empty()).map(|l| l.last_active + max_idle).min()
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
                .filter(|(_, l)| l.instance == inst && !l.in_flight)
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
        let stepped: Vec<SequenceId> = outcomes.iter().map(|(id, _)| id.clone()).collect();
        for (id, outcome) in outcomes {
            let Some(l) = self.live.get_mut(&id) else { continue };
            l.in_flight = false;
            l.last_active = now;
            match outcome {
                StepOutcome::Ok => {
                    l.steps = if l.start_after { 1 } else { l.steps + 1 };
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
        }
        self.save_while_draining(stepped);
    }
}
