//! Turns written through without stopping the step loop (fleet mode): a finished turn is parked
//! with its session still busy (so its next turn, a hand-off and an export all wait: the lease
//! stays the fence) while [`crate::sessions::lease_through`] writes its token history; the step
//! loop keeps stepping the other sequences. When the write ended, the turn is retired: its last
//! response goes (the tokens are durable) and its K/V are queued to be written behind, or it is
//! answered "not kept" and the session stays as the store holds it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::request::GenerateRequest;
use super::sequence::Sequence;
use super::session_lease::{FleetEvent, send_held, unavailable};
use super::step::Engine;
use crate::sessions::SequenceId;
use crate::sessions::lease::LeaseError;
use crate::sessions::lease_through::ThroughJob;

/// How a write ended, for which session.
type Outcome = (SequenceId, Result<u64, LeaseError>);

/// Where a step loop's writes through report back (the turns wait in [`Engine`]'s `writing`).
pub struct Writing {
    tx: mpsc::Sender<Outcome>,
    rx: mpsc::Receiver<Outcome>,
}

impl Default for Writing {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Writing { tx, rx }
    }
}

impl Engine {
    /// Parks finished turn `seq` (its session stays busy) and queues the write through of its
    /// record `value` under session key `key`.
    pub(super) fn write_turn_through(&mut self, seq: Sequence, key: String, value: Vec<u8>) {
        let Some(f) = self.fleet.as_mut() else { return };
        let Some(id) = seq.session.as_ref().map(|t| t.id.clone()) else { return };
        let (tx, back, done_id) = (f.writing.tx.clone(), f.back.clone(), id.clone());
        let job = ThroughJob {
            key,
            shown: id.to_string(),
            value,
            done: Box::new(move |r| {
                let _ = tx.send((done_id, r));
                let _ = back(FleetEvent::Written);
            }),
        };
        self.writing.insert(id, seq);
        f.leases.write_through_later(job);
    }

    /// Retires the parked turns whose write through ended.
    pub fn turns_written(&mut self) {
        loop {
            let Some(f) = self.fleet.as_mut() else { return };
            let Ok((id, r)) = f.writing.rx.try_recv() else { return };
            let Some(seq) = self.writing.remove(&id) else { continue };
            if let Some(next) = self.turn_written(seq, r) {
                self.add(next);
            }
        }
    }

    /// Waits for every parked turn's write through (drain, instance failure), at most a lease TTL
    /// and a few seconds: a write retries only while its lease is valid. True when a turn was
    /// retired (its session's next turn may have been queued).
    pub fn settle_writes(&mut self) -> bool {
        let Some(f) = self.fleet.as_ref() else { return false };
        let deadline = Instant::now() + f.leases.config().ttl + Duration::from_secs(5);
        let mut any = false;
        loop {
            let Some(f) = self.fleet.as_mut() else { return any };
            if self.writing.is_empty() {
                return any;
            }
            match f.writing.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((id, r)) => {
                    let Some(seq) = self.writing.remove(&id) else { continue };
                    any = true;
                    if let Some(next) = self.turn_written(seq, r) {
                        self.add(next);
                    }
                }
                Err(_) => {
                    let error = unavailable("this turn is not kept: its write through did not end in time");
                    for (_, mut seq) in std::mem::take(&mut self.writing) {
                        let next = self.sessions.abort(&mut seq);
                        send_held(&mut seq, Some(error.clone()));
                        if let Some(next) = next {
                            let _ = super::outbox::deliver(&next.updates, Err(error.clone()));
                            self.left_queue += 1;
                        }
                    }
                    return true;
                }
            }
        }
    }

    /// A parked turn's write through ended with `r`: its last response goes (or an error in its
    /// place). Returns the session's next queued turn.
    fn turn_written(&mut self, mut seq: Sequence, r: Result<u64, LeaseError>) -> Option<GenerateRequest> {
        let turn = seq.session.clone()?;
        let f = self.fleet.as_ref()?;
        let (key, leases) = (f.key(&turn.id), f.leases.clone());
        match r {
            Ok(token) => {
                let next = self.sessions.finish(&mut seq);
                send_held(&mut seq, None);
                self.queue_kv_behind(&turn.id, &key, token);
                let asked = self.fleet.as_ref().is_some_and(|f| f.asked.contains(&turn.id));
                if asked && next.is_none() {
                    self.hand_over(&turn.id);
                }
                next
            }
            Err(e) => {
                leases.stats.writes_failed.fetch_add(1, Relaxed);
                let error = unavailable(if matches!(e, LeaseError::Exiting { .. }) {
                    e.to_string()
                } else {
                    format!("this turn is not kept: {e}")
                });
                tracing::warn!(session = %turn.id, error = %e, "a turn's tokens could not be written through; the turn is refused");
                let next = self.sessions.abort(&mut seq);
                send_held(&mut seq, Some(error.clone()));
                if matches!(e, LeaseError::Lost { .. }) {
                    if let Some(next) = next {
                        let _ = super::outbox::deliver(&next.updates, Err(error.clone()));
                        self.left_queue += 1;
                    }
                    self.drop_local(&turn.id, &key, &error);
                    return None;
                }
                next
            }
        }
    }

    /// Queues the new K/V pieces of session `id` (lease `token`) to be written behind.
    fn queue_kv_behind(&mut self, id: &SequenceId, key: &str, token: u64) {
        if let Some((from, pieces)) = self.new_kv_pieces(id, key)
            && let Some(f) = self.fleet.as_ref()
        {
            f.leases.write_behind(key, token, from, pieces);
        }
    }
}
