//! The tiers of a generative conversation session, and how it moves between them: its K/V blocks
//! resident in the pool → written to the session store (`--session-store`) when the pool needs
//! its blocks → its token history only (no store, or the store failed), recomputed on its next
//! turn. Idleness moves a session down a tier, never ends it; its next turn brings it back up
//! (K/V read back from the store, or from the prefix cache when that still holds them).
//!
//! The store also makes sessions outlive their instance: at drain every open session is written
//! (K/V included), and when an instance fails its sessions are written as tokens (its K/V may be
//! damaged), so their next turn continues on another instance or after a restart, exactly. While
//! a turn runs the store does not hold its session (taken at the turn's start); a crash during a
//! turn loses the sessions not yet written, as for sequence models.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::request::SessionTurn;
use super::session::KeptSession;
use super::session_moves::{blob_of, check_blob, load_parts};
use super::step::Engine;
use crate::sessions::{SequenceId, SessionBlob, SessionStore};

/// Where a model version's sessions go when their blocks are needed, at drain and when their
/// instance fails.
#[derive(Debug, Clone)]
pub struct Durable {
    /// The worker's session store.
    pub store: Arc<SessionStore>,
    /// Model name (the store's key).
    pub model: String,
    /// Model version (the store's key).
    pub version: i64,
}

impl Durable {
    fn id(&self) -> (String, i64) {
        (self.model.clone(), self.version)
    }
}

/// When the sessions of an instance are saved together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveReason {
    /// The model drains (unload, reload, shutdown): K/V included.
    Drain,
    /// The instance failed: tokens only (its K/V may be damaged).
    InstanceFailed,
}

impl Engine {
    /// Moves every idle session with resident blocks down a tier (to the store when there is one,
    /// else to its tokens); returns how many moved. (The pool does this by itself when it runs
    /// short; benchmarks and operators' tools call it to measure or to make room ahead.)
    pub fn release_idle_sessions(&mut self) -> usize {
        let n = self.make_room(usize::MAX);
        self.publish_gauges();
        n
    }

    /// Releases idle sessions' blocks, least recently used first, until `needed` blocks are
    /// available or no idle session holds any; each goes to the store first when there is one.
    /// Returns how many sessions released.
    pub(super) fn make_room(&mut self, needed: usize) -> usize {
        let candidates = self.sessions.idle_resident();
        self.release_sessions(candidates, needed)
    }

    /// With a store and `store_after_idle` set: writes the sessions idle that long to the store
    /// (their blocks go to the prefix cache). Returns how many moved.
    pub fn store_long_idle(&mut self) -> usize {
        let Some(age) = self.sessions.limits().store_after_idle else { return 0 };
        if self.durable.is_none() {
            return 0;
        }
        let candidates = self.sessions.idle_resident_for(age);
        if candidates.is_empty() {
            return 0;
        }
        let n = self.release_sessions(candidates, usize::MAX);
        self.publish_gauges();
        n
    }

    /// True when some idle session may be moved by [`Engine::store_long_idle`] later.
    pub fn has_idle_to_store(&self) -> bool {
        self.durable.is_some()
            && self.sessions.limits().store_after_idle.is_some()
            && self.sessions.iter().any(|(_, s)| !s.busy && s.table.is_some())
    }

    /// Releases `candidates` in order until `needed` blocks are available.
    fn release_sessions(&mut self, candidates: Vec<SequenceId>, needed: usize) -> usize {
        let block_size = self.pool.block_size();
        // (session, its blob, the K/V bytes the store will hold)
        let mut released: Vec<(SequenceId, Option<SessionBlob>, u64)> = Vec::new();
        // With leases, the K/V go as pieces (only what the store lacks); all must be written.
        let mut fleet_written = true;
        for id in candidates {
            if self.pool.available() >= needed {
                break;
            }
            if self.fleet.is_some() {
                fleet_written &= self.fleet_flush_kv(&id);
            }
            let Some(s) = self.sessions.get_mut(&id) else { continue };
            let (blob, bytes) = match &self.durable {
                Some(_) if self.fleet.is_some() => (None, s.computed as u64 * self.kv_bytes_per_position),
                Some(d) => {
                    let b = blob_of(self.decoder.as_mut(), block_size, id.clone(), s, d.id(), true);
                    let bytes = b.state.get(2).map_or(0, |t| t.data.len() as u64);
                    (Some(b), bytes)
                }
                None => (None, 0),
            };
            s.table = None;
            s.computed = 0;
            released.push((id, blob, bytes));
        }
        let n = released.len();
        if n == 0 {
            return 0;
        }
        self.stats.session_kv_released.fetch_add(n as u64, Relaxed);
        let blobs: Vec<SessionBlob> = released.iter().filter_map(|(_, b, _)| b.clone()).collect();
        let written = match &self.durable {
            Some(_) if self.fleet.is_some() => fleet_written,
            None => false,
            Some(d) => match d.store.put_all(&blobs) {
                Ok(()) => true,
                Err(e) => {
                    self.stats.session_store_failures.fetch_add(1, Relaxed);
                    tracing::warn!(model = %d.model, sessions = n, error = %e, "cannot write idle sessions to the session store; they keep their tokens and recompute their K/V on their next turn");
                    false
                }
            },
        };
        if written {
            for (id, _, bytes) in &released {
                if let Some(s) = self.sessions.get_mut(id) {
                    s.stored = Some(*bytes);
                }
            }
            self.stats.session_spilled.fetch_add(n as u64, Relaxed);
        } else {
            self.stats.session_dropped_to_tokens.fetch_add(n as u64, Relaxed);
        }
        n
    }

    /// Brings the session of `turn` back before the turn begins. A start discards any stored
    /// copy of the id. A continuation of a session the store holds (released here, or left by a
    /// drained or failed instance, or by a previous run of the worker) takes it out of the store:
    /// its K/V go back into the pool unless the prefix cache still holds them.
    pub(super) fn bring_back(&mut self, turn: &SessionTurn) {
        let Some(d) = self.durable.clone() else { return };
        let known = self.sessions.get(&turn.id).map(|s| s.stored.is_some());
        if known == Some(false) {
            return; // in memory, and the store does not hold it
        }
        if turn.start {
            let held = known == Some(true) || d.store.contains(&d.model, d.version, &turn.id).unwrap_or(false);
            if held && let Err(e) = d.store.remove(&d.model, d.version, &turn.id) {
                self.stats.session_store_failures.fetch_add(1, Relaxed);
                tracing::warn!(model = %d.model, id = %turn.id, error = %e, "cannot delete the stored copy of a restarted session");
            }
            if let Some(s) = self.sessions.get_mut(&turn.id) {
                s.stored = None;
            }
            return;
        }
        if known.is_none() && self.sessions.is_full() {
            return; // the turn is refused (sessions full); the store keeps the session
        }
        if known == Some(true) && self.prefix_cache_covers(&turn.id) {
            // The prefix cache still holds its K/V: only the stale store copy goes.
            if let Err(e) = d.store.remove(&d.model, d.version, &turn.id) {
                self.stats.session_store_failures.fetch_add(1, Relaxed);
                tracing::warn!(model = %d.model, id = %turn.id, error = %e, "cannot delete the stored copy of a continued session");
            }
            self.mark_not_stored(&turn.id);
            return;
        }
        let blob = match d.store.take(&d.model, d.version, &turn.id) {
            Ok(Some(b)) => b,
            Ok(None) => {
                // Not stored (unknown id, or its copy was removed): the turn goes on from memory.
                self.mark_not_stored(&turn.id);
                return;
            }
            Err(e) => {
                self.stats.session_store_failures.fetch_add(1, Relaxed);
                tracing::warn!(model = %d.model, id = %turn.id, error = %e, "cannot read a session from the session store");
                self.mark_not_stored(&turn.id);
                return;
            }
        };
        if let Err(reason) = self.restore(&d, blob, known.is_some()) {
            self.stats.session_store_failures.fetch_add(1, Relaxed);
            tracing::warn!(model = %d.model, id = %turn.id, %reason, "a stored session cannot continue here");
            self.mark_not_stored(&turn.id);
        }
    }

    /// Whether the prefix cache holds the K/V of all of session `id`'s tokens but its last
    /// partial block (the most a stored copy could add).
    fn prefix_cache_covers(&self, id: &SequenceId) -> bool {
        let Some(s) = self.sessions.get(id) else { return false };
        let cached = self.pool.lookup_prefix(&s.tokens).len();
        cached + self.pool.block_size() > s.tokens.len()
    }

    fn mark_not_stored(&mut self, id: &SequenceId) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.stored = None;
        }
    }

    /// Loads `blob` taken from the store: into the open session (`open`: it released its blocks
    /// here, its tokens are in memory) or as a newly opened one.
    fn restore(&mut self, d: &Durable, blob: SessionBlob, open: bool) -> Result<(), String> {
        let block_size = self.pool.block_size();
        let p = check_blob(self.decoder.as_ref(), block_size, &blob)?;
        if open {
            let same = self.sessions.get(&blob.id).is_some_and(|s| s.tokens == p.tokens);
            if !same {
                return Err("the stored copy's tokens differ from the session's (a stale copy); recomputing".into());
            }
            // The prefix cache may still hold (nearly) everything the store does.
            let cached = self.pool.lookup_prefix(&p.tokens[..p.computed]).len();
            if cached + block_size > p.computed {
                self.mark_not_stored(&blob.id);
                return Ok(());
            }
        }
        let needed = p.computed.div_ceil(block_size);
        if self.pool.available() < needed {
            self.make_room(needed);
        }
        let loaded = load_parts(self.decoder.as_mut(), &self.pool, p, blob.steps).map_err(|e| e.to_string())?;
        self.stats.session_restored.fetch_add(1, Relaxed);
        if open {
            if let Some(s) = self.sessions.get_mut(&blob.id) {
                s.table = loaded.table;
                s.computed = loaded.computed;
                s.stored = None;
            }
            return Ok(());
        }
        if let Err(e) = self.sessions.insert(blob.id.clone(), loaded) {
            // Put it back so it is not lost.
            if let Err(w) = d.store.put_all(std::slice::from_ref(&blob)) {
                self.stats.sessions_lost.fetch_add(1, Relaxed);
                d.store.record_lost(1);
                return Err(format!("{e}; and it could not be put back into the store ({w}): lost"));
            }
            return Err(e.to_string());
        }
        Ok(())
    }

    /// Writes every open session the store does not hold yet (drain: with its resident K/V;
    /// instance failure: tokens only), in one transaction, tried twice. Sessions that cannot be
    /// written are counted as lost (on the model and on the store: the worker exits non-zero).
    pub(super) fn save_sessions(&mut self, reason: SaveReason) {
        if self.sessions.is_empty() {
            return;
        }
        let Some(d) = self.durable.clone() else {
            tracing::info!(sessions = self.sessions.len(), ?reason, "open sessions dropped (no --session-store)");
            return;
        };
        if self.fleet.is_some() {
            return self.fleet_save(reason == SaveReason::Drain);
        }
        let block_size = self.pool.block_size();
        let with_kv = reason == SaveReason::Drain;
        let mut blobs = Vec::new();
        let pending: Vec<(SequenceId, &KeptSession)> =
            self.sessions.iter().filter(|(_, s)| s.stored.is_none()).map(|(id, s)| (id.clone(), s)).collect();
        for (id, s) in pending {
            // A session with a turn running at failure is saved as it was before that turn.
            blobs.push(blob_of(self.decoder.as_mut(), block_size, id, s, d.id(), with_kv && !s.busy));
        }
        let n = blobs.len() as u64;
        let written = d.store.put_all(&blobs).or_else(|e| {
            tracing::warn!(model = %d.model, sessions = n, error = %e, "cannot write sessions to the session store; trying once more");
            d.store.put_all(&blobs)
        });
        match written {
            Ok(()) => {
                self.stats.session_spilled.fetch_add(n, Relaxed);
                tracing::info!(model = %d.model, sessions = n, ?reason, path = %d.store.path().display(), "sessions written to the session store");
            }
            Err(e) => {
                self.stats.session_store_failures.fetch_add(1, Relaxed);
                self.stats.sessions_lost.fetch_add(n, Relaxed);
                d.store.record_lost(n);
                tracing::error!(model = %d.model, sessions = n, error = %e, ?reason, "cannot write sessions to the session store; they are lost");
            }
        }
    }
}
