//! The queue actor: the only owner of a model's queue. It admits requests, purges cancelled and
//! expired ones, waits for fuller batches within the configured delay, and hands each batch to an
//! idle instance. When a full batch is waiting and no instance is idle, a busy instance is handed
//! one batch ahead (single-priority queues only), so it starts its next execution without waiting
//! for a round trip through the actor. A model whose batches take microseconds runs on the
//! actor's own thread when an instance is idle and allows it (CPU dense models), saving the two
//! thread hand-offs that would cost more than the model.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::Command;
use super::queue::{Queue, Queued};
use super::worker::{Batch, InstanceHandle};
use crate::batching::admission::Admission;
use crate::batching::stats::FailureReason;
use crate::batching::{BatchingError, InferRequest};

/// How often a non-empty queue is checked for requests whose client left.
const PURGE_INTERVAL: Duration = Duration::from_millis(100);

enum Event {
    Command(Command),
    Closed,
    Timer,
}

struct Actor {
    shared: Arc<Admission>,
    queue: Queue,
    instances: Vec<Option<InstanceHandle>>,
    /// Batches sent to each instance and not yet done (0 = idle; at most 2).
    outstanding: Vec<usize>,
    busy: usize,
    drain: Vec<oneshot::Sender<()>>,
    max_rows: usize,
}

pub(super) fn spawn(rx: mpsc::UnboundedReceiver<Command>, instances: Vec<InstanceHandle>, shared: Arc<Admission>) {
    let spec = &shared.spec;
    let mut max_rows = spec.max_rows();
    if let Some(largest) = spec.buckets.largest_batch() {
        max_rows = max_rows.min(largest);
    }
    let actor = Actor {
        queue: Queue::new(spec.dynamic.priority_levels as usize),
        outstanding: vec![0; instances.len()],
        instances: instances.into_iter().map(Some).collect(),
        busy: 0,
        drain: Vec::new(),
        max_rows,
        shared,
    };
    tokio::spawn(actor.run(rx));
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut wake: Option<Instant> = None;
        loop {
            let event = match wake {
                Some(at) => tokio::select! {
                    c = rx.recv() => c.map_or(Event::Closed, Event::Command),
                    _ = tokio::time::sleep_until(at.into()) => Event::Timer,
                },
                None => rx.recv().await.map_or(Event::Closed, Event::Command),
            };
            match event {
                Event::Command(c) => self.handle(c),
                Event::Closed => break,
                Event::Timer => {}
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            wake = self.dispatch();
            if !self.drain.is_empty() && self.queue.is_empty() && self.busy == 0 {
                self.instances.iter_mut().for_each(|i| *i = None);
                for d in self.drain.drain(..) {
                    let _ = d.send(());
                }
                break;
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Enqueue(req) => {
                // Admitted just before the last instance left service: answer now, nothing will run it.
                if self.shared.in_service.load(Ordering::Acquire) == 0 {
                    self.shared.queued.fetch_sub(1, Ordering::AcqRel);
                    self.shared.stats.record_failure(FailureReason::Unavailable, req.arrived.elapsed());
                    let reason = self.unavailable_reason();
                    let _ = req
                        .reply
                        .send(Err(BatchingError::Unavailable { model: self.shared.spec.name.clone(), reason }));
                    return;
                }
                let (q, level) = self.queued(req);
                self.queue.push(q, level);
            }
            Command::Requeue(requests) => {
                self.busy = self.busy.saturating_sub(1);
                if self.shared.in_service.load(Ordering::Acquire) == 0 {
                    let reason = self.unavailable_reason();
                    for r in requests {
                        self.shared.stats.record_failure(FailureReason::Unavailable, r.arrived.elapsed());
                        let _ = r.reply.send(Err(BatchingError::Unavailable {
                            model: self.shared.spec.name.clone(),
                            reason: reason.clone(),
                        }));
                    }
                    return;
                }
                self.shared.queued.fetch_add(requests.len(), Ordering::AcqRel);
                for req in requests.into_iter().rev() {
                    let (q, level) = self.queued(req);
                    self.queue.push_front(q, level);
                }
            }
            Command::Done { instance, usable } => {
                self.busy = self.busy.saturating_sub(1);
                if let Some(n) = self.outstanding.get_mut(instance) {
                    *n = n.saturating_sub(1);
                }
                self.instance_done(instance, usable);
            }
            Command::Drain(done) => self.drain.push(done),
        }
    }

    /// Takes instance `instance` out of service when its last batch left it unusable.
    fn instance_done(&mut self, instance: usize, usable: bool) {
        if !usable && let Some(slot) = self.instances.get_mut(instance) {
            *slot = None;
            let left = self.shared.in_service.load(Ordering::Acquire).saturating_sub(1);
            tracing::error!(model = %self.shared.spec.name, instance, left, "instance taken out of service");
            if left == 0 {
                // Not ready before the count reads 0, so nobody sees "0 in service" and ready.
                self.shared.close(crate::batching::admission::NO_INSTANCE);
                self.fail_all_unavailable();
            }
            self.shared.set_in_service(left);
        }
    }

    /// A request with its queue deadline and priority level, per the model's queue policy.
    fn queued(&self, req: InferRequest) -> (Queued, u64) {
        let policy = &self.shared.spec.dynamic;
        // Triton's queue policy: with `allow_timeout_override` a request may shorten the default
        // timeout (or set one when there is no default); without it the default applies.
        let timeout = match (req.timeout, policy.default_timeout) {
            (Some(t), Some(d)) if policy.allow_timeout_override => Some(t.min(d)),
            (Some(t), None) if policy.allow_timeout_override => Some(t),
            (_, d) => d,
        };
        let level = if req.priority == 0 { policy.default_priority_level } else { req.priority };
        let deadline = timeout.map(|t| req.arrived + t);
        (Queued { req, deadline }, level)
    }

    /// An idle instance; or, when a full batch is waiting (`full`), one busy with a single batch.
    fn pick_instance(&self, full: bool) -> Option<usize> {
        let live = |i: &usize| self.instances[*i].is_some();
        let idle = (0..self.instances.len()).filter(live).find(|i| self.outstanding[*i] == 0);
        idle.or_else(|| {
            if full { (0..self.instances.len()).filter(live).find(|i| self.outstanding[*i] == 1) } else { None }
        })
    }

    fn unavailable_reason(&self) -> String {
        self.shared.reason()
    }

    /// Answers every queued request as unavailable (the model has no instance left).
    fn fail_all_unavailable(&mut self) {
        let reason = self.unavailable_reason();
        let mut rest = Vec::new();
        while !self.queue.is_empty() {
            rest.extend(self.queue.take_batch(usize::MAX, &[]).0);
        }
        self.shared.queued.fetch_sub(rest.len(), Ordering::AcqRel);
        for q in rest {
            self.shared.stats.record_failure(FailureReason::Unavailable, q.req.arrived.elapsed());
            let _ = q
                .req
                .reply
                .send(Err(BatchingError::Unavailable { model: self.shared.spec.name.clone(), reason: reason.clone() }));
        }
    }

    /// Sends batches to idle instances; returns when to wake up next (delay or deadline), if ever.
    fn dispatch(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let purged = self.queue.purge(now);
        let n = purged.cancelled.len() + purged.expired.len();
        if n > 0 {
            self.shared.queued.fetch_sub(n, Ordering::AcqRel);
        }
        for q in purged.cancelled {
            self.shared.stats.record_failure(FailureReason::Cancelled, q.req.arrived.elapsed());
        }
        for q in purged.expired {
            let waited = q.req.arrived.elapsed();
            self.shared.stats.record_failure(FailureReason::Timeout, waited);
            let timeout = q.deadline.map(|d| d.saturating_duration_since(q.req.arrived)).unwrap_or_default();
            let _ = q.req.reply.send(Err(BatchingError::Timeout {
                model: self.shared.spec.name.clone(),
                waited_us: waited.as_micros() as u64,
                timeout_us: timeout.as_micros() as u64,
            }));
        }
        let spec = self.shared.spec.clone();
        let policy = &spec.dynamic;
        let mut wake = None;
        while !self.queue.is_empty() {
            let avail = self.queue.available_rows(self.max_rows);
            // Handing a batch ahead commits its requests to that instance early; with priority levels
            // a later, more urgent request could then wait behind it, so only single-level queues do it.
            let ahead = avail >= self.max_rows && policy.priority_levels <= 1;
            let Some(inst) = self.pick_instance(ahead) else { break };
            let delay = policy.max_queue_delay;
            if spec.dynamic_batching
                && delay > Duration::ZERO
                && avail < self.max_rows
                && !policy.preferred_batch_sizes.iter().any(|p| *p <= avail)
            {
                let oldest = self.queue.oldest_arrival().unwrap_or(now);
                if oldest + delay > now {
                    wake = Some(oldest + delay);
                    break;
                }
            }
            let preferred: &[usize] = if spec.dynamic_batching { &policy.preferred_batch_sizes } else { &[] };
            let (requests, _rows) = self.queue.take_batch(self.max_rows, preferred);
            self.shared.queued.fetch_sub(requests.len(), Ordering::AcqRel);
            let deadlines = requests.iter().map(|q| q.deadline).collect();
            let batch = Batch { requests: requests.into_iter().map(|q| q.req).collect(), deadlines };
            // A tiny model on an idle instance runs here, on the actor's thread: no hand-off to
            // the instance thread and back. The protocol's order holds: done, then replies.
            let handle = self.instances.get(inst).and_then(Option::as_ref);
            let batch = match handle {
                Some(h) if self.outstanding[inst] == 0 => h.run_inline(batch),
                _ => Err(batch),
            };
            let batch = match batch {
                Ok((usable, replies)) => {
                    self.instance_done(inst, usable);
                    replies.deliver_after(|| {});
                    continue;
                }
                Err(batch) => batch,
            };
            match self.instances.get(inst).and_then(Option::as_ref) {
                Some(handle) => match handle.send(batch) {
                    Ok(()) => {
                        self.busy += 1;
                        self.outstanding[inst] += 1;
                    }
                    Err(batch) => self.fail_batch(batch, "instance thread stopped"),
                },
                None => self.fail_batch(batch, "instance out of service"),
            }
        }
        // Clients that leave send nothing: look again soon, so a cancelled request leaves the
        // queue depth (and `/capacity`) while the instances are busy.
        let purge = (!self.queue.is_empty()).then(|| now + PURGE_INTERVAL);
        [wake, self.queue.next_deadline(), purge].into_iter().flatten().min()
    }

    fn fail_batch(&mut self, batch: Batch, why: &str) {
        for r in batch.requests {
            self.shared.stats.record_failure(FailureReason::Unavailable, r.arrived.elapsed());
            let _ = r
                .reply
                .send(Err(BatchingError::Unavailable { model: self.shared.spec.name.clone(), reason: why.into() }));
        }
    }
}
