//! Moving sessions out of and into the actor's session table: reading a slot's state, spilling to
//! the store, listing, export and import.

use tokio::sync::oneshot;

use super::pending::{Move, Parked};
use super::*;

impl Actor {
    pub(super) fn read_state(&mut self, instance: usize, slot: usize) -> Result<Vec<Tensor>, BatchingError> {
        let model = self.model();
        let unavailable = |reason: &str| BatchingError::Unavailable { model: model.clone(), reason: reason.into() };
        let sender = self
            .instances
            .get(instance)
            .and_then(Option::as_ref)
            .ok_or_else(|| unavailable("the session's instance is out of service"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        sender.send(Job::Read { slot, reply: tx }).map_err(|_| unavailable("the session's instance stopped"))?;
        let state = rx.recv().map_err(|_| unavailable("the session's instance stopped"))?;
        state.map_err(|source| BatchingError::Backend { model: model.clone(), source })
    }

    /// A copy of the state of an idle live session (its pending restore, or read from its slot).
    /// The session keeps it: callers remove the session once the copy is safely elsewhere.
    pub(super) fn copy_state(&mut self, id: &SequenceId) -> Result<(Vec<Tensor>, u64), BatchingError> {
        let Some(l) = self.live.get(id) else {
            return Err(BatchingError::NotFound { model: self.model(), id: id.clone() });
        };
        let (inst, slot, steps) = (l.instance, l.slot, l.steps);
        match &l.restore {
            Some(s) => Ok((s.clone(), steps)),
            None => Ok((self.read_state(inst, slot)?, steps)),
        }
    }

    /// Spills an idle session whose state can be read now (its instance is idle).
    pub(super) fn spill(&mut self, id: &SequenceId) -> Result<(), BatchingError> {
        if self.store.is_none() {
            return Err(BatchingError::Store(StoreError::NotConfigured));
        }
        let (state, _) = self.copy_state(id)?;
        self.spill_state(id, state)
    }

    /// Writes a live session's state to the store, then frees its slot. The session stays live,
    /// its state untouched, unless the store has it.
    pub(super) fn spill_state(&mut self, id: &SequenceId, state: Vec<Tensor>) -> Result<(), BatchingError> {
        let Some(store) = self.store.clone() else {
            return Err(BatchingError::Store(StoreError::NotConfigured));
        };
        let steps = self.live.get(id).map_or(0, |l| l.steps);
        let blob = SessionBlob { model: self.model(), version: self.shared.version, id: id.clone(), steps, state };
        store.put_all(std::slice::from_ref(&blob))?;
        let mut last_active = Instant::now();
        if let Some(l) = self.live.remove(id) {
            self.free_slot(l.instance, l.slot);
            last_active = l.last_active;
        }
        self.spilled.insert(id.clone(), (steps, last_active));
        let c = &self.shared.counters;
        c.spilled.fetch_add(1, Ordering::Relaxed);
        c.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
        c.live.store(self.live.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn list(&self) -> Vec<SessionInfo> {
        let now = Instant::now();
        let (model, version) = (self.model(), self.shared.version);
        let mut out: Vec<SessionInfo> = self
            .live
            .iter()
            .map(|(id, l)| SessionInfo {
                model: model.clone(),
                version,
                id: id.clone(),
                steps: l.steps,
                live: true,
                idle: now.saturating_duration_since(l.last_active),
            })
            .collect();
        out.extend(self.spilled.iter().map(|(id, (steps, since))| SessionInfo {
            model: model.clone(),
            version,
            id: id.clone(),
            steps: *steps,
            live: false,
            idle: now.saturating_duration_since(*since),
        }));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Exports a session. A live session whose instance is executing is read behind that work
    /// and the reply sent when its state arrives; the actor does not wait.
    pub(super) fn export(&mut self, id: SequenceId, reply: oneshot::Sender<Result<SessionBlob, BatchingError>>) {
        if self.live.get(&id).is_some_and(|l| !l.in_flight && !l.moving && l.queue.is_empty())
            && self.state_behind_work(&id)
        {
            if let Err((Move::Export(reply), e)) = self.start_move(&id, Move::Export(reply)) {
                let _ = reply.send(Err(e));
            }
            return;
        }
        let _ = reply.send(self.export_now(id));
    }

    fn export_now(&mut self, id: SequenceId) -> Result<SessionBlob, BatchingError> {
        if let Some(l) = self.live.get(&id) {
            if l.in_flight || l.moving || !l.queue.is_empty() {
                return Err(BatchingError::Busy { model: self.model(), id });
            }
            let (state, steps) = self.copy_state(&id)?;
            self.close(&id, ClosedReason::Exported);
            return Ok(SessionBlob { model: self.model(), version: self.shared.version, id, steps, state });
        }
        if self.spilled.contains_key(&id) {
            let store = self.store.clone().ok_or(BatchingError::Store(StoreError::NotConfigured))?;
            let taken = store.take(&self.shared.adm.spec.name, self.shared.version, &id);
            if matches!(taken, Err(StoreError::Io { .. })) {
                // The entry is still there: the session stays spilled.
                self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
            } else {
                self.spilled.remove(&id);
                self.shared.counters.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
            }
            let blob = taken?.ok_or_else(|| BatchingError::NotFound { model: self.model(), id: id.clone() })?;
            if self.closed.insert(id.clone(), ClosedReason::Exported).is_none() {
                self.closed_order.push_back(id);
            }
            return Ok(blob);
        }
        Err(BatchingError::NotFound { model: self.model(), id })
    }

    /// Imports a session into a free slot (parked while a spill frees one); replies when done.
    pub(super) fn import(&mut self, blob: SessionBlob, reply: oneshot::Sender<Result<SessionInfo, BatchingError>>) {
        match self.check_import(&blob) {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(()) => match self.allocate() {
                Ok(Alloc::Slot(instance, slot)) => {
                    let _ = reply.send(Ok(self.insert_imported(blob, instance, slot)));
                }
                Ok(Alloc::Pending) => self.park(Parked::Import(blob, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    fn check_import(&self, blob: &SessionBlob) -> Result<(), BatchingError> {
        if self.instances.iter().all(Option::is_none) {
            // Not "retry shortly": no slot will free up until the model is reloaded.
            return Err(BatchingError::Unavailable { model: self.model(), reason: NO_INSTANCE.into() });
        }
        if let Err(reason) = blob.id.check() {
            return Err(BatchingError::BadBlob { reason });
        }
        if blob.model != self.shared.adm.spec.name || blob.version != self.shared.version {
            return Err(BatchingError::BadBlob {
                reason: format!(
                    "the session belongs to model '{}' version {}, not '{}' version {}",
                    blob.model,
                    blob.version,
                    self.model(),
                    self.shared.version
                ),
            });
        }
        self.check_state(&blob.state)?;
        self.check_corrid(&blob.id)?;
        if self.live.contains_key(&blob.id) || self.spilled.contains_key(&blob.id) || self.is_parked(&blob.id) {
            return Err(BatchingError::AlreadyExists { model: self.model(), id: blob.id.clone() });
        }
        Ok(())
    }

    fn insert_imported(&mut self, blob: SessionBlob, instance: usize, slot: usize) -> SessionInfo {
        let now = Instant::now();
        self.closed.remove(&blob.id);
        let info = SessionInfo {
            model: self.model(),
            version: blob.version,
            id: blob.id.clone(),
            steps: blob.steps,
            live: true,
            idle: std::time::Duration::ZERO,
        };
        self.live.insert(
            blob.id,
            Live {
                instance,
                slot,
                steps: blob.steps,
                last_active: now,
                queue: VecDeque::new(),
                in_flight: false,
                closing: false,
                end_after: false,
                start_after: false,
                restore: Some(blob.state),
                saved: None,
                moving: false,
            },
        );
        self.shared.counters.live.store(self.live.len() as u64, Ordering::Relaxed);
        info
    }
}

impl Actor {
    /// After the store moved a damaged file aside (keeping what could still be read), the
    /// sessions this model had spilled that are no longer there are lost: dropped from the index,
    /// counted, and remembered so their next request learns why.
    pub(super) fn check_store_epoch(&mut self) {
        let Some(store) = self.store.clone() else { return };
        let epoch = store.epoch();
        if epoch == self.store_epoch {
            return;
        }
        self.store_epoch = epoch;
        let kept: std::collections::HashSet<SequenceId> =
            match store.list(&self.shared.adm.spec.name, self.shared.version) {
                Ok((found, _)) => found.into_iter().map(|s| s.id).collect(),
                Err(_) => Default::default(),
            };
        let gone: Vec<SequenceId> = self.spilled.keys().filter(|id| !kept.contains(*id)).cloned().collect();
        if gone.is_empty() {
            return;
        }
        tracing::error!(model = %self.model(), sessions = gone.len(), "the session store file was damaged and replaced: spilled sessions it no longer holds are lost");
        for id in &gone {
            self.spilled.remove(id);
            self.remember_closed(id, ClosedReason::StoreDamaged);
        }
        let c = &self.shared.counters;
        c.lost.fetch_add(gone.len() as u64, Ordering::Relaxed);
        c.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
    }
}
