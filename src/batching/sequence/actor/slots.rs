//! Batch slots and the sequences holding them: allocating a slot (spilling an idle session to
//! free one), closing a sequence and remembering why, and expiring idle ones.

use super::*;

/// The outcome of asking for a slot.
#[derive(Debug)]
pub(super) enum Alloc {
    /// This slot (instance, slot) is free and now taken.
    Slot(usize, usize),
    /// A spill behind a busy instance's work will free one: park the request.
    Pending,
}

impl Actor {
    pub(super) fn free_slot(&mut self, instance: usize, slot: usize) {
        if let Some(f) = self.free.get_mut(instance) {
            f.push(slot);
        }
    }

    /// A free slot on the instance with the most free slots. With a store and none free, spills
    /// the least recently used idle session: at once when its instance is idle, else behind that
    /// instance's work ([`Alloc::Pending`]: the caller parks its request until the slot is free).
    pub(super) fn allocate(&mut self) -> Result<Alloc, BatchingError> {
        for attempt in 0..2 {
            let best = (0..self.instances.len())
                .filter(|i| self.instances[*i].is_some())
                .max_by_key(|i| (self.free[*i].len(), std::cmp::Reverse(*i)))
                .filter(|i| !self.free[*i].is_empty());
            if let Some(i) = best
                && let Some(slot) = self.free[i].pop()
            {
                return Ok(Alloc::Slot(i, slot));
            }
            if attempt == 1 || self.store.is_none() {
                break;
            }
            // A spill in flight that no parked request has claimed yet frees a slot for this one.
            if self.spills_in_flight > self.parked.len() {
                return Ok(Alloc::Pending);
            }
            let lru = self
                .live
                .iter()
                .filter(|(_, l)| !l.in_flight && !l.moving && l.queue.is_empty())
                .min_by_key(|(_, l)| l.last_active)
                .map(|(id, _)| id.clone());
            let Some(id) = lru else {
                if self.spills_in_flight > 0 {
                    return Ok(Alloc::Pending);
                }
                return Err(BatchingError::SlotsExhausted {
                    model: self.model(),
                    capacity: self.shared.capacity(),
                    hint: "; every one has a request queued or running, so none can be spilled: retry shortly".into(),
                });
            };
            let spilled = if self.state_behind_work(&id) {
                match self.start_move(&id, Move::Spill) {
                    Ok(()) => return Ok(Alloc::Pending),
                    Err((_, e)) => Err(e),
                }
            } else {
                self.spill(&id)
            };
            if let Err(e) = spilled {
                self.shared.counters.store_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(model = %self.model(), id = %id, error = %e, "cannot spill the least recently used idle session to make room; it stays live");
                return Err(BatchingError::SlotsExhausted {
                    model: self.model(),
                    capacity: self.shared.capacity(),
                    hint: format!(
                        "; the least recently used idle session could not be spilled to make room ({e}); it stays live: retry later"
                    ),
                });
            }
        }
        Err(BatchingError::SlotsExhausted {
            model: self.model(),
            capacity: self.shared.capacity(),
            hint: "; retry after sequences end or expire (max_sequence_idle_microseconds), or start the worker with --session-store to spill idle sessions".into(),
        })
    }

    pub(super) fn close(&mut self, id: &SequenceId, reason: ClosedReason) {
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
            ClosedReason::Exported
            | ClosedReason::RestoreFailed
            | ClosedReason::InstanceFailed
            | ClosedReason::StoreDamaged => 0,
        };
        c.live.store(self.live.len() as u64, Ordering::Relaxed);
    }

    /// Records why a sequence is gone, so its late requests learn it.
    pub(super) fn remember_closed(&mut self, id: &SequenceId, reason: ClosedReason) {
        if self.closed.insert(id.clone(), reason).is_none() {
            self.closed_order.push_back(id.clone());
        }
        while self.closed_order.len() > REMEMBER_CLOSED {
            if let Some(old) = self.closed_order.pop_front() {
                self.closed.remove(&old);
            }
        }
    }

    pub(super) fn expire(&mut self, now: Instant) {
        let max_idle = self.shared.seq.max_idle;
        let idle: Vec<SequenceId> = self
            .live
            .iter()
            .filter(|(_, l)| {
                !l.in_flight
                    && !l.moving
                    && l.queue.is_empty()
                    && now.saturating_duration_since(l.last_active) >= max_idle
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            tracing::debug!(model = %self.model(), id = %id, "sequence expired");
            self.close(&id, ClosedReason::Expired);
        }
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        if self.draining {
            return None;
        }
        let max_idle = self.shared.seq.max_idle;
        self.live.values().filter(|l| !l.in_flight && l.queue.is_empty()).map(|l| l.last_active + max_idle).min()
    }
}
