//! Reloading a model version without losing or resurrecting a session. The new version serves as
//! soon as it is swapped in, while the replaced one finishes its accepted requests and writes its
//! live sessions to the store. Until that is done the new version cannot know those sessions, so
//! a request continuing one waits (parked), and what it listed from the store at start-up is not
//! trusted. The handover then lists the store once: entries of sessions started or ended here
//! since the swap are stale copies of the old version's state and are deleted (so an ended id
//! cannot come back from before the reload); the others become this version's spilled sessions.

use super::*;

impl Actor {
    /// A reload starts: forget the start-up listing (the replaced version still moves sessions
    /// in and out of the store) and park requests for unknown sessions until the handover.
    pub(super) fn await_handover(&mut self) {
        if self.store.is_none() {
            return;
        }
        self.awaiting_handover = true;
        self.spilled.clear();
        self.shared.counters.spilled_now.store(0, Ordering::Relaxed);
    }

    /// The replaced version has drained: adopt what it left in the store, in one step.
    pub(super) fn take_handover(&mut self) {
        if !std::mem::take(&mut self.awaiting_handover) {
            return;
        }
        let Some(store) = self.store.clone() else { return };
        let (model, version) = (self.shared.adm.spec.name.clone(), self.shared.version);
        let now = Instant::now();
        match store.list(&model, version) {
            Ok((found, skipped)) => {
                for s in skipped {
                    tracing::warn!(model = %model, problem = %s, "session store entry skipped");
                    self.shared.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                }
                let mut stale = Vec::new();
                for s in found {
                    if self.live.contains_key(&s.id) || self.closed.contains_key(&s.id) || self.is_parked_start(&s.id) {
                        stale.push(s.id);
                    } else {
                        self.spilled.insert(s.id, (s.steps, now));
                    }
                }
                if !stale.is_empty()
                    && let Err(e) = store.remove_all(&model, version, &stale)
                {
                    // Kept out of the index, they are never restored; a later START overwrites them.
                    tracing::warn!(model = %model, sessions = stale.len(), error = %e, "cannot delete the replaced version's copies of sessions restarted since the reload");
                }
                tracing::info!(model = %model, adopted = self.spilled.len(), superseded = stale.len(), "reload: sessions of the replaced version taken over");
            }
            Err(e) => {
                self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(model = %model, error = %e, "reload: cannot list the sessions the replaced version stored; they are not continued");
            }
        }
        self.shared.counters.spilled_now.store(self.spilled.len() as u64, Ordering::Relaxed);
        self.retry_parked();
    }

    fn is_parked_start(&self, id: &SequenceId) -> bool {
        self.parked.iter().any(|p| matches!(p, pending::Parked::Submit(r) if &r.id == id && r.start))
    }
}
