//! Moves that wait for a busy instance, so the session owner never does. Reading an idle session's
//! state from an instance that is executing a batch would block the actor (and every other
//! session of the model, and ListSessions) until that batch ends; instead the read is queued
//! behind the batch on the instance's thread and the actor carries on. A spill started that way
//! frees its slot when the state arrives; the request that needed the slot (a START, a restore,
//! an import) is parked until then. An export answers when the state arrives.

use tokio::sync::oneshot;

use super::*;

/// A move waiting for a session's state from its busy instance.
#[derive(Debug)]
pub(super) enum Move {
    /// Spill it to the store, freeing its slot for a parked request.
    Spill,
    /// Export it: the blob goes to the waiting caller.
    Export(oneshot::Sender<Result<SessionBlob, BatchingError>>),
}

/// A request waiting for a slot that a spill in flight will free.
#[derive(Debug)]
pub(super) enum Parked {
    /// A request of a sequence that is not live (a START, or a spilled session's next step).
    Submit(SequenceRequest),
    /// An import.
    Import(SessionBlob, oneshot::Sender<Result<SessionInfo, BatchingError>>),
}

impl Actor {
    /// Whether reading `id`'s state would wait for a batch its instance is executing.
    pub(super) fn state_behind_work(&self, id: &SequenceId) -> bool {
        self.live.get(id).is_some_and(|l| l.restore.is_none() && self.busy.get(l.instance).copied().unwrap_or(false))
    }

    /// Queues a read of `id`'s state behind its instance's work; `mv` says what to do with it.
    pub(super) fn start_move(&mut self, id: &SequenceId, mv: Move) -> Result<(), (Move, BatchingError)> {
        let Some(l) = self.live.get_mut(id) else {
            return Err((mv, BatchingError::NotFound { model: self.shared.adm.spec.name.clone(), id: id.clone() }));
        };
        let job = Job::ReadFor { slot: l.slot, id: id.clone() };
        let sent = self.instances.get(l.instance).and_then(Option::as_ref).map(|s| s.send(job).is_ok());
        if sent != Some(true) {
            let model = self.shared.adm.spec.name.clone();
            let e = BatchingError::Unavailable { model, reason: "the session's instance stopped".into() };
            return Err((mv, e));
        }
        l.moving = true;
        if matches!(mv, Move::Spill) {
            self.spills_in_flight += 1;
        }
        self.moving.insert(id.clone(), mv);
        Ok(())
    }

    /// A session's state arrived from its instance: finishes the move waiting for it.
    pub(super) fn state_read(&mut self, id: SequenceId, state: Result<Vec<Tensor>, crate::backend::BackendError>) {
        let Some(mv) = self.moving.remove(&id) else { return };
        if let Some(l) = self.live.get_mut(&id) {
            l.moving = false;
        }
        let model = self.model();
        match mv {
            Move::Export(reply) => {
                let result = match (state, self.live.get(&id)) {
                    (Ok(state), Some(l)) => {
                        let blob =
                            SessionBlob { model, version: self.shared.version, id: id.clone(), steps: l.steps, state };
                        self.close(&id, ClosedReason::Exported);
                        Ok(blob)
                    }
                    (Ok(_), None) => Err(BatchingError::NotFound { model, id }),
                    (Err(source), _) => Err(BatchingError::Backend { model, source }),
                };
                let _ = reply.send(result);
            }
            Move::Spill => {
                self.spills_in_flight = self.spills_in_flight.saturating_sub(1);
                // A session that got a request meanwhile stays live; the parked request looks again.
                let idle = self.live.get(&id).is_some_and(|l| !l.in_flight && l.queue.is_empty());
                match state {
                    Ok(state) if idle => {
                        if let Err(e) = self.spill_state(&id, state) {
                            self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(model = %self.model(), id = %id, error = %e, "cannot spill the least recently used idle session to make room; it stays live");
                            return self.refuse_parked(&e);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(model = %self.model(), id = %id, error = %e, "cannot read a session's state to spill it; it stays live");
                    }
                }
                self.retry_parked();
            }
        }
    }

    /// Resolves the moves of sessions lost with their instance.
    pub(super) fn abandon_move(&mut self, id: &SequenceId) {
        match self.moving.remove(id) {
            Some(Move::Export(reply)) => {
                let e = BatchingError::Unavailable {
                    model: self.model(),
                    reason: format!("sequence {id} was lost: its instance failed"),
                };
                let _ = reply.send(Err(e));
            }
            Some(Move::Spill) => self.spills_in_flight = self.spills_in_flight.saturating_sub(1),
            None => {}
        }
    }

    /// Parks a request until a spill in flight frees a slot.
    pub(super) fn park(&mut self, p: Parked) {
        self.parked.push_back(p);
    }

    /// Whether `id` has a request parked (its later requests park behind it, in order).
    pub(super) fn is_parked(&self, id: &SequenceId) -> bool {
        self.parked.iter().any(|p| match p {
            Parked::Submit(r) => &r.id == id,
            Parked::Import(b, _) => &b.id == id,
        })
    }

    /// Runs the parked requests again, in order (a freed slot goes to the oldest).
    pub(super) fn retry_parked(&mut self) {
        for p in std::mem::take(&mut self.parked) {
            match p {
                Parked::Submit(r) => self.submit(r),
                Parked::Import(blob, reply) => self.import(blob, reply),
            }
        }
    }

    /// Refuses every parked request: the spill meant to make room for them failed.
    fn refuse_parked(&mut self, e: &BatchingError) {
        for p in std::mem::take(&mut self.parked) {
            let refusal = BatchingError::SlotsExhausted {
                model: self.model(),
                capacity: self.shared.capacity(),
                hint: format!(
                    "; the least recently used idle session could not be spilled to make room ({e}); it stays live: retry later"
                ),
            };
            match p {
                Parked::Submit(r) => self.reject(r, refusal),
                Parked::Import(_, reply) => {
                    let _ = reply.send(Err(refusal));
                }
            }
        }
    }
}
