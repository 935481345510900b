//! Draining a sequence model without losing a session. From the moment the worker (or the model)
//! starts draining, idle sequences no longer expire, and every session whose slot is not executing
//! is written to the store — at once, then again as each of its steps finishes, before the client
//! gets that step's reply. So whatever ends the drain early (the exit deadline, a kill), the store
//! holds every session but those with a step running at that instant, each at its last answered
//! step. At the end of the drain every live session is written once more; a session that ends
//! while draining has its saved copy removed, so it cannot come back.

use super::*;

impl Actor {
    /// Stops expiry and saves every session whose slot is not executing (once; later calls do nothing).
    pub(super) fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        // A session that has not run a step yet (its START is queued) has no state of its own.
        // Sessions on a busy instance are saved when its batch ends (reading them now would wait).
        let idle: Vec<SequenceId> = self
            .live
            .iter()
            .filter(|(_, l)| !l.in_flight && !l.moving && l.steps > 0 && !self.busy[l.instance])
            .map(|(id, _)| id.clone())
            .collect();
        let n = self.save(idle);
        if n > 0 {
            tracing::info!(model = %self.model(), sessions = n, "draining: idle sessions saved to the session store");
        }
    }

    /// While draining, saves the sessions of an instance whose batch just finished (those idle
    /// whose last step the store does not hold yet).
    pub(super) fn save_while_draining(&mut self, instance: usize) {
        if !self.draining {
            return;
        }
        let idle = self
            .live
            .iter()
            .filter(|(_, l)| l.instance == instance && !l.in_flight && !l.moving && l.steps > 0)
            .filter(|(_, l)| l.saved != Some(l.steps))
            .map(|(id, _)| id.clone())
            .collect();
        self.save(idle);
    }

    /// While draining, removes the saved copy of a session that is closed (ended, exported).
    pub(super) fn forget_saved(&mut self, id: &SequenceId) {
        let Some(store) = self.store.as_ref().filter(|_| self.draining) else { return };
        if let Err(e) = store.remove(&self.shared.adm.spec.name, self.shared.version, id) {
            tracing::warn!(model = %self.model(), id = %id, error = %e, "cannot remove the saved copy of a closed session");
        }
    }

    /// The blobs of the sessions `ids` whose state can be read; the others are logged (`when`: the
    /// moment of the drain, for the log line) and left out.
    fn blobs(&mut self, ids: Vec<SequenceId>, when: &str) -> Vec<SessionBlob> {
        let mut blobs = Vec::with_capacity(ids.len());
        for id in ids {
            match self.copy_state(&id) {
                Ok((state, steps)) => {
                    blobs.push(SessionBlob { model: self.model(), version: self.shared.version, id, steps, state })
                }
                Err(e) => tracing::warn!(model = %self.model(), id = %id, error = %e, "cannot save a session {when}"),
            }
        }
        blobs
    }

    /// Writes the sessions `ids` to the store in one transaction; returns how many were written.
    fn save(&mut self, ids: Vec<SequenceId>) -> usize {
        let Some(store) = self.store.clone() else { return 0 };
        let blobs = self.blobs(ids, "while draining");
        match store.put_all(&blobs) {
            Ok(()) => {
                self.mark_saved(&blobs);
                blobs.len()
            }
            Err(e) => {
                self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(model = %self.model(), sessions = blobs.len(), error = %e, "cannot save sessions to the session store while draining; tried again at the end of the drain");
                0
            }
        }
    }

    fn mark_saved(&mut self, blobs: &[SessionBlob]) {
        for b in blobs {
            if let Some(l) = self.live.get_mut(&b.id) {
                l.saved = Some(b.steps);
            }
        }
    }

    /// Writes every live session the store does not hold at its last step (twice if the first
    /// write fails: the store re-opens after an I/O error); those that cannot be written are
    /// counted as lost, on the model and on the store (the worker then exits non-zero).
    pub(super) fn finish_drain(&mut self) {
        if let Some(store) = self.store.clone() {
            let ids: Vec<SequenceId> =
                self.live.iter().filter(|(_, l)| l.saved != Some(l.steps)).map(|(id, _)| id.clone()).collect();
            let unreadable = ids.len();
            let blobs = self.blobs(ids, "at drain");
            let unreadable = (unreadable - blobs.len()) as u64;
            let n = blobs.len();
            let written = store.put_all(&blobs).or_else(|e| {
                tracing::warn!(model = %self.model(), sessions = n, error = %e, "cannot write live sessions to the session store; trying once more");
                store.put_all(&blobs)
            });
            let lost = match written {
                Ok(()) => {
                    if n > 0 {
                        tracing::info!(model = %self.model(), sessions = n, path = %store.path().display(), "live sessions written to the session store");
                    }
                    self.shared.counters.spilled.fetch_add(n as u64, Ordering::Relaxed);
                    unreadable
                }
                Err(e) => {
                    self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(model = %self.model(), sessions = n, error = %e, "cannot write live sessions to the session store; they are lost");
                    unreadable + n as u64
                }
            };
            if lost > 0 {
                self.shared.counters.lost.fetch_add(lost, Ordering::Relaxed);
                store.record_lost(lost);
            }
        } else if !self.live.is_empty() {
            tracing::info!(model = %self.model(), sessions = self.live.len(), "live sessions dropped at drain (no --session-store)");
        }
        self.live.clear();
        self.shared.counters.live.store(0, Ordering::Relaxed);
        self.instances.iter_mut().for_each(|i| *i = None);
        for d in self.drain.drain(..) {
            let _ = d.send(());
        }
    }
}
