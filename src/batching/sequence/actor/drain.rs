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
        let idle: Vec<SequenceId> =
            self.live.iter().filter(|(_, l)| !l.in_flight && l.steps > 0).map(|(id, _)| id.clone()).collect();
        let n = self.save(idle);
        if n > 0 {
            tracing::info!(model = %self.model(), sessions = n, "draining: idle sessions saved to the session store");
        }
    }

    /// While draining, saves the sessions of a finished batch (those still live and idle).
    pub(super) fn save_while_draining(&mut self, ids: Vec<SequenceId>) {
        if !self.draining {
            return;
        }
        let idle =
            ids.into_iter().filter(|id| self.live.get(id).is_some_and(|l| !l.in_flight && l.steps > 0)).collect();
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
            Ok(()) => blobs.len(),
            Err(e) => {
                tracing::error!(model = %self.model(), sessions = blobs.len(), error = %e, "cannot save sessions to the session store while draining");
                0
            }
        }
    }

    pub(super) fn finish_drain(&mut self) {
        if let Some(store) = self.store.clone() {
            let ids: Vec<SequenceId> = self.live.keys().cloned().collect();
            let blobs = self.blobs(ids, "at drain");
            let n = blobs.len();
            match store.put_all(&blobs) {
                Ok(()) => {
                    if n > 0 {
                        tracing::info!(model = %self.model(), sessions = n, path = %store.path().display(), "live sessions written to the session store");
                    }
                    self.shared.counters.spilled.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(model = %self.model(), sessions = n, error = %e, "cannot write live sessions to the session store; they are lost")
                }
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
