//! Moving sessions out of and into the actor's session table: reading a slot's state, spilling to
//! the store, listing, export and import.

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

    pub(super) fn spill(&mut self, id: &SequenceId) -> Result<(), BatchingError> {
        let Some(store) = self.store.clone() else {
            return Err(BatchingError::Store(StoreError::NotConfigured));
        };
        let (state, steps) = self.copy_state(id)?;
        let blob = SessionBlob { model: self.model(), version: self.shared.version, id: id.clone(), steps, state };
        // The session stays live, its state untouched, unless the store has it.
        store.put_all(std::slice::from_ref(&blob))?;
        if let Some(l) = self.live.remove(id) {
            self.free_slot(l.instance, l.slot);
        }
        self.spilled.insert(id.clone(), steps);
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
        out.extend(self.spilled.iter().map(|(id, steps)| SessionInfo {
            model: model.clone(),
            version,
            id: id.clone(),
            steps: *steps,
            live: false,
            idle: std::time::Duration::ZERO,
        }));
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub(super) fn export(&mut self, id: SequenceId) -> Result<SessionBlob, BatchingError> {
        if let Some(l) = self.live.get(&id) {
            if l.in_flight || !l.queue.is_empty() {
                return Err(BatchingError::Busy { model: self.model(), id });
            }
            let (state, steps) = self.copy_state(&id)?;
            self.close(&id, ClosedReason::Exported);
            return Ok(SessionBlob { model: self.model(), version: self.shared.version, id, steps, state });
        }
        if self.spilled.remove(&id).is_some() {
            self.shared.counters.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
            let store = self.store.clone().ok_or(BatchingError::Store(StoreError::NotConfigured))?;
            let blob = store
                .take(&self.shared.adm.spec.name, self.shared.version, &id)?
                .ok_or_else(|| BatchingError::NotFound { model: self.model(), id: id.clone() })?;
            if self.closed.insert(id.clone(), ClosedReason::Exported).is_none() {
                self.closed_order.push_back(id);
            }
            return Ok(blob);
        }
        Err(BatchingError::NotFound { model: self.model(), id })
    }

    pub(super) fn import(&mut self, blob: SessionBlob) -> Result<SessionInfo, BatchingError> {
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
        if self.live.contains_key(&blob.id) || self.spilled.contains_key(&blob.id) {
            return Err(BatchingError::AlreadyExists { model: self.model(), id: blob.id });
        }
        let (instance, slot) = self.allocate()?;
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
            },
        );
        self.shared.counters.live.store(self.live.len() as u64, Ordering::Relaxed);
        Ok(info)
    }
}
