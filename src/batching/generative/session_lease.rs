//! Generative sessions on a shared store with leases (`--session-store redis://...`): the step
//! loop's side of [`crate::sessions::lease`].
//!
//! - A turn for a session not open here takes its lease (set-if-absent) and restores it from the
//!   store: its token history from the durable record, its K/V from the K/V cache when they agree
//!   with the tokens, else the turn recomputes them from the tokens.
//! - A turn for a session another live worker holds waits (on a thread of its own, the step loop
//!   goes on) while that worker is asked to hand it over, up to `--session-handoff-wait`; then it
//!   is answered UNAVAILABLE naming the holder. A dead holder's lease expires after its TTL.
//! - A turn is acknowledged (its last response sent) only once its token history is written
//!   through under the lease (fenced); its K/V are then queued to be written behind. A turn whose
//!   tokens cannot be written before the lease would expire is answered UNAVAILABLE and the session
//!   goes back to what the store holds.
//! - A hand-off request is served between turns: the K/V are written, the lease released, the
//!   session dropped here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::request::{GenerateRequest, GenerationError};
use super::sequence::Sequence;
use super::session::KeptSession;
use super::session_moves::{Parts, blob_of, check_blob, load_parts};
use super::step::Engine;
use crate::sessions::lease::{LeaseError, Leases, RECORD};
use crate::sessions::{SequenceId, SessionBlob};

/// What comes back to a step loop from the lease threads.
#[derive(Debug)]
pub enum FleetEvent {
    /// The lease of the request's session was acquired for it: run it.
    Acquired(GenerateRequest),
    /// The lease could not be had: answer the request (and the turns queued behind it).
    NotAcquired(GenerateRequest, GenerationError),
    /// Another worker asks for this session.
    Handoff(SequenceId),
}

/// Sends an event to the step loop; gives it back when the loop is gone.
pub type FleetBack = Arc<dyn Fn(FleetEvent) -> Result<(), Box<FleetEvent>> + Send + Sync>;

/// A step loop's leases.
pub struct Fleet {
    leases: Arc<Leases>,
    back: FleetBack,
    model: String,
    version: i64,
    /// Sessions whose lease a waiter thread is getting, and the turns queued behind the first.
    acquiring: HashMap<SequenceId, Vec<GenerateRequest>>,
    /// Sessions asked for by another worker while a turn ran.
    asked: HashSet<SequenceId>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("leases", &self.leases).finish_non_exhaustive()
    }
}

impl Fleet {
    /// Leases for model `model` version `version`, events going back through `back`.
    pub fn new(leases: Arc<Leases>, model: String, version: i64, back: FleetBack) -> Fleet {
        Fleet { leases, back, model, version, acquiring: HashMap::new(), asked: HashSet::new() }
    }

    fn key(&self, id: &SequenceId) -> String {
        crate::sessions::store::key(&self.model, self.version, id)
    }

    fn on_handoff(&self, id: &SequenceId) -> Arc<dyn Fn() + Send + Sync> {
        let (back, id) = (self.back.clone(), id.clone());
        Arc::new(move || {
            let _ = back(FleetEvent::Handoff(id.clone()));
        })
    }
}

fn unavailable(e: impl std::fmt::Display) -> GenerationError {
    GenerationError::Unavailable { reason: e.to_string() }
}

impl Engine {
    /// Continues sessions through leases on a shared store (see the module notes).
    pub fn with_fleet(mut self, fleet: Option<Fleet>) -> Engine {
        self.fleet = fleet;
        self
    }

    fn refuse(&mut self, req: GenerateRequest, error: GenerationError) {
        if let Some(t) = &req.session {
            self.sessions.unpin_if_absent(&t.id);
        }
        let _ = super::outbox::deliver(&req.updates, Err(error));
        self.left_queue += 1;
    }

    /// The gate of a session turn: `Some` to go on (the lease is held and the session open here or
    /// new), `None` when the turn was answered or waits for the lease.
    pub(super) fn lease_gate(&mut self, req: GenerateRequest) -> Option<GenerateRequest> {
        let Some(f) = self.fleet.as_mut() else { return Some(req) };
        let Some(turn) = req.session.clone() else { return Some(req) };
        if let Some(queue) = f.acquiring.get_mut(&turn.id) {
            queue.push(req);
            return None;
        }
        let (key, shown) = (f.key(&turn.id), turn.id.to_string());
        let leases = f.leases.clone();
        if let Some(s) = self.sessions.get(&turn.id) {
            if s.busy {
                return Some(req); // queued behind its running turn
            }
            return match leases.check(&key, &shown) {
                Ok(_) => {
                    if s.table.is_none() && s.stored.is_some() {
                        self.reload_kv(&turn.id, &key);
                    }
                    Some(req)
                }
                Err(e) => {
                    self.drop_local(&turn.id, &key, &unavailable(&e));
                    self.refuse(req, unavailable(e));
                    None
                }
            };
        }
        if leases.check(&key, &shown).is_err() {
            match leases.try_acquire(&key, &shown, f.on_handoff(&turn.id)) {
                Ok(_) => {}
                Err(LeaseError::Held { holder, .. }) => {
                    f.acquiring.insert(turn.id.clone(), Vec::new());
                    let (back, on_handoff) = (f.back.clone(), f.on_handoff(&turn.id));
                    let spawned = std::thread::Builder::new().name("session-lease-wait".into()).spawn({
                        let leases = leases.clone();
                        move || wait_for_lease(leases, key, shown, holder, req, back, on_handoff)
                    });
                    if let Err(e) = spawned {
                        tracing::warn!(error = %e, "cannot start a thread to wait for a session lease");
                        f.acquiring.remove(&turn.id);
                    }
                    return None;
                }
                Err(e) => {
                    self.refuse(req, unavailable(e));
                    return None;
                }
            }
        }
        if !turn.start
            && let Err(e) = self.load_from_store(&turn.id, &key)
        {
            leases.release(&key);
            self.refuse(req, e);
            return None;
        }
        Some(req)
    }

    /// Restores session `id` from the store (its lease is held): tokens from the record, K/V
    /// from the cache when they agree with the tokens. No record: nothing to restore.
    fn load_from_store(&mut self, id: &SequenceId, key: &str) -> Result<(), GenerationError> {
        let Some(f) = &self.fleet else { return Ok(()) };
        let leases = f.leases.clone();
        let (record, kv) = leases.read(key).map_err(unavailable)?;
        let Some(record) = record else { return Ok(()) };
        let block_size = self.pool.block_size();
        let bad = |reason: String| GenerationError::Session {
            reason: format!("the stored record of session {id} cannot continue here: {reason}"),
        };
        let rec = SessionBlob::decode(&record).map_err(bad)?;
        let tokens = check_blob(self.decoder.as_ref(), block_size, &rec).map_err(bad)?.tokens;
        let kv_blob = kv.and_then(|b| SessionBlob::decode(&b).ok());
        let cached = kv_blob.as_ref().and_then(|b| check_blob(self.decoder.as_ref(), block_size, b).ok());
        let parts = match cached {
            Some(p) if p.computed > 0 && p.tokens.get(..p.computed) == tokens.get(..p.computed) => {
                Parts { tokens, computed: p.computed, kv: p.kv }
            }
            _ => Parts { tokens, computed: 0, kv: &[] },
        };
        let from_kv = parts.computed > 0;
        let needed = parts.computed.div_ceil(block_size);
        if self.pool.available() < needed {
            self.make_room(needed);
        }
        let session = load_parts(self.decoder.as_mut(), &self.pool, parts, rec.steps).map_err(unavailable)?;
        let stat =
            if from_kv && session.table.is_some() { &leases.stats.restored_kv } else { &leases.stats.restored_tokens };
        stat.fetch_add(1, Relaxed);
        self.stats.session_restored.fetch_add(1, Relaxed);
        self.sessions.insert(id.clone(), session)
    }

    /// Puts back the K/V of an open session that released its blocks (pool pressure), when the
    /// store's K/V cache agrees with its tokens; otherwise its next turn recomputes them.
    fn reload_kv(&mut self, id: &SequenceId, key: &str) {
        let Some(f) = &self.fleet else { return };
        let Ok((_, Some(kv))) = f.leases.read(key) else { return };
        let block_size = self.pool.block_size();
        let Ok(blob) = SessionBlob::decode(&kv) else { return };
        let Ok(p) = check_blob(self.decoder.as_ref(), block_size, &blob) else { return };
        let Some(s) = self.sessions.get(id) else { return };
        if p.computed == 0 || s.tokens.get(..p.computed) != p.tokens.get(..p.computed) {
            return;
        }
        let (tokens, turns) = (s.tokens.clone(), s.turns);
        let needed = p.computed.div_ceil(block_size);
        if self.pool.available() < needed {
            self.make_room(needed);
        }
        let parts = Parts { tokens, computed: p.computed, kv: p.kv };
        if let Ok(loaded) = load_parts(self.decoder.as_mut(), &self.pool, parts, turns)
            && let Some(s) = self.sessions.get_mut(id)
        {
            s.table = loaded.table;
            s.computed = loaded.computed;
            s.stored = None;
            self.stats.session_restored.fetch_add(1, Relaxed);
        }
    }

    /// Drops session `id` here without writing it (its lease is lost): its queued turns get `error`.
    fn drop_local(&mut self, id: &SequenceId, key: &str, error: &GenerationError) {
        if let Some(f) = self.fleet.as_mut() {
            f.asked.remove(id);
            f.leases.cancel_behind(key);
            f.leases.forget(key);
        }
        if let Ok(s) = self.sessions.take_idle(id) {
            for p in s.pending {
                let _ = super::outbox::deliver(&p.updates, Err(error.clone()));
                self.left_queue += 1;
            }
        }
    }

    /// A lease thread's event.
    pub fn fleet_event(&mut self, event: FleetEvent) {
        let Some(f) = self.fleet.as_mut() else { return };
        match event {
            FleetEvent::Acquired(req) => {
                let id = req.session.as_ref().map(|t| t.id.clone());
                let followers = id.and_then(|id| f.acquiring.remove(&id)).unwrap_or_default();
                self.add(req);
                for r in followers {
                    self.add(r);
                }
            }
            FleetEvent::NotAcquired(req, error) => {
                let id = req.session.as_ref().map(|t| t.id.clone());
                let followers = id.and_then(|id| f.acquiring.remove(&id)).unwrap_or_default();
                for r in followers {
                    let _ = super::outbox::deliver(&r.updates, Err(error.clone()));
                    self.left_queue += 1;
                }
                self.refuse(req, error);
            }
            FleetEvent::Handoff(id) => match self.sessions.get(&id) {
                Some(s) if !s.busy && s.pending.is_empty() => self.hand_over(&id),
                Some(_) => {
                    f.asked.insert(id);
                }
                None => {}
            },
        }
        self.publish_gauges();
    }

    /// Hands idle session `id` to the worker that asked: K/V written, lease released, dropped here.
    fn hand_over(&mut self, id: &SequenceId) {
        let Some(f) = self.fleet.as_mut() else { return };
        f.asked.remove(id);
        let key = f.key(id);
        let (leases, model) = (f.leases.clone(), (f.model.clone(), f.version));
        let block_size = self.pool.block_size();
        let Ok(session) = self.sessions.take_idle(id) else { return };
        if let Ok(token) = leases.check(&key, &id.to_string()) {
            let blob = blob_of(self.decoder.as_mut(), block_size, id.clone(), &session, model, true);
            leases.write_kv_now(&key, token, &blob.encode());
            leases.release(&key);
            leases.stats.handed_over.fetch_add(1, Relaxed);
        } else {
            leases.forget(&key);
        }
    }

    /// A session turn leaves the engine (fleet mode): `keep`, its tokens are written through and,
    /// once written, its last response is sent; otherwise the session is left as it was. Returns
    /// the session's next queued turn.
    pub(super) fn fleet_retire(&mut self, seq: &mut Sequence, keep: bool) -> Option<GenerateRequest> {
        let turn = seq.session.clone()?;
        let f = self.fleet.as_ref()?;
        let (key, leases, model) = (f.key(&turn.id), f.leases.clone(), (f.model.clone(), f.version));
        if !keep {
            let next = self.sessions.abort(seq);
            send_held(seq, None);
            return next;
        }
        if turn.end {
            let next = self.sessions.finish(seq);
            leases.cancel_behind(&key);
            leases.end(&key);
            send_held(seq, None);
            return next;
        }
        let turns = self.sessions.get(&turn.id).map_or(0, |s| s.turns) + 1;
        let block_size = self.pool.block_size();
        let record = KeptSession { tokens: seq.tokens.clone(), turns, ..KeptSession::default() };
        let blob = blob_of(self.decoder.as_mut(), block_size, turn.id.clone(), &record, model.clone(), false);
        match write_through(&leases, &key, &turn.id.to_string(), &blob.encode()) {
            Ok(token) => {
                let next = self.sessions.finish(seq);
                send_held(seq, None);
                if let Some(s) = self.sessions.get(&turn.id)
                    && s.table.is_some()
                    && (s.computed as u64).saturating_mul(self.kv_bytes_per_position)
                        <= crate::sessions::lease::KV_BEHIND_BYTES as u64
                {
                    let kv = blob_of(self.decoder.as_mut(), block_size, turn.id.clone(), s, model, true);
                    leases.write_behind(&key, token, kv.encode());
                }
                let asked = self.fleet.as_ref().is_some_and(|f| f.asked.contains(&turn.id));
                if asked && next.is_none() {
                    self.hand_over(&turn.id);
                }
                next
            }
            Err(e) => {
                leases.stats.writes_failed.fetch_add(1, Relaxed);
                let error = unavailable(format!("this turn is not kept: {e}"));
                tracing::warn!(session = %turn.id, error = %e, "a turn's tokens could not be written through; the turn is refused");
                let next = self.sessions.abort(seq);
                send_held(seq, Some(error.clone()));
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

    /// Writes the K/V of released sessions (pool pressure) to the store's K/V cache, fenced.
    /// True when every one was written.
    pub(super) fn fleet_write_kv(&self, blobs: &[SessionBlob]) -> bool {
        let Some(f) = &self.fleet else { return false };
        let mut all = true;
        for b in blobs {
            let key = f.key(&b.id);
            all &= match f.leases.check(&key, &b.id.to_string()) {
                Ok(token) => f.leases.write_kv_now(&key, token, &b.encode()),
                Err(_) => false,
            };
        }
        all
    }

    /// Drain or instance failure (fleet mode): every session's record is already durable; at drain
    /// its resident K/V are written too; every lease is released.
    pub(super) fn fleet_save(&mut self, with_kv: bool) {
        let Some(f) = &self.fleet else { return };
        let (leases, model) = (f.leases.clone(), (f.model.clone(), f.version));
        let block_size = self.pool.block_size();
        let ids: Vec<SequenceId> = self.sessions.iter().map(|(id, _)| id.clone()).collect();
        let mut released = 0;
        for id in ids {
            let key = crate::sessions::store::key(&model.0, model.1, &id);
            if let (Ok(token), Some(s)) = (leases.check(&key, &id.to_string()), self.sessions.get(&id))
                && with_kv
                && !s.busy
                && s.table.is_some()
            {
                let blob = blob_of(self.decoder.as_mut(), block_size, id.clone(), s, model.clone(), true);
                leases.write_kv_now(&key, token, &blob.encode());
            }
            leases.release(&key);
            released += 1;
        }
        tracing::info!(model = %model.0, sessions = released, "session leases released (their tokens are in the store)");
    }

    /// Releases the lease of `id` when no session `id` is open here (its turn was refused).
    pub(super) fn fleet_release_if_absent(&mut self, id: &SequenceId) {
        let Some(f) = &self.fleet else { return };
        if self.sessions.get(id).is_none() && !f.acquiring.contains_key(id) {
            f.leases.release(&f.key(id));
        }
    }

    /// An imported (or exported) session joins (leaves) the fleet: its lease is taken and its
    /// record written (its lease released and its keys deleted). `Err` when another worker holds it.
    pub(super) fn fleet_adopt(&mut self, id: &SequenceId, join: bool) -> Result<(), String> {
        let Some(f) = &self.fleet else { return Ok(()) };
        let (key, leases, model) = (f.key(id), f.leases.clone(), (f.model.clone(), f.version));
        if !join {
            if leases.try_acquire(&key, &id.to_string(), Arc::new(|| {})).is_ok() {
                leases.end(&key);
            }
            return Ok(());
        }
        leases.try_acquire(&key, &id.to_string(), f.on_handoff(id)).map_err(|e| e.to_string())?;
        let block_size = self.pool.block_size();
        let Some(s) = self.sessions.get(id) else { return Ok(()) };
        let record = KeptSession { tokens: s.tokens.clone(), turns: s.turns, ..KeptSession::default() };
        let blob = blob_of(self.decoder.as_mut(), block_size, id.clone(), &record, model, false);
        write_through(&leases, &key, &id.to_string(), &blob.encode()).map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Sends a sequence's held last response (or `error` in its place).
fn send_held(seq: &mut Sequence, error: Option<GenerationError>) {
    let held = seq.held_final.take();
    match error {
        Some(e) if held.is_some() => {
            let _ = super::outbox::deliver(&seq.updates, Err(e));
        }
        Some(_) => {}
        None => {
            if let Some(update) = held {
                let _ = super::outbox::deliver_text(&seq.updates, Ok(update), seq.text.deferred());
            }
        }
    }
}

/// Writes a session record through its lease, retrying while the lease is valid. Returns the
/// lease token.
fn write_through(leases: &Leases, key: &str, shown: &str, value: &[u8]) -> Result<u64, LeaseError> {
    let started = Instant::now();
    loop {
        let token = leases.check(key, shown)?;
        match leases.write_fenced(key, token, RECORD, value) {
            Ok(true) => {
                leases.stats.writes_ok.fetch_add(1, Relaxed);
                let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                leases.stats.write_nanos.fetch_add(took, Relaxed);
                return Ok(token);
            }
            Ok(false) => {
                return Err(LeaseError::Lost {
                    session: shown.to_string(),
                    reason: "another worker took its lease over (the fencing token no longer matches)".into(),
                });
            }
            Err(e) => {
                leases.stats.write_retries.fetch_add(1, Relaxed);
                if leases.valid_until(key).is_none_or(|t| t <= Instant::now()) {
                    leases.forget(key);
                    leases.stats.lost.fetch_add(1, Relaxed);
                    return Err(LeaseError::Lost {
                        session: shown.to_string(),
                        reason: format!(
                            "the session store did not take the turn's tokens before the lease expired: {e}"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Waits (bounded by the hand-off wait) for the lease of a session another worker holds, asking
/// that worker to hand it over; then sends the request back to the step loop.
fn wait_for_lease(
    leases: Arc<Leases>,
    key: String,
    shown: String,
    mut holder: String,
    req: GenerateRequest,
    back: FleetBack,
    on_handoff: Arc<dyn Fn() + Send + Sync>,
) {
    let deadline = Instant::now() + leases.config().handoff_wait;
    let mut asked: Option<Instant> = None;
    let event = loop {
        if req.updates.is_closed() {
            break FleetEvent::NotAcquired(req, unavailable("the client went away"));
        }
        if asked.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            leases.request_handoff(&holder, &key);
            asked = Some(Instant::now());
        }
        match leases.try_acquire(&key, &shown, on_handoff.clone()) {
            Ok(_) => break FleetEvent::Acquired(req),
            Err(LeaseError::Held { holder: h, .. }) => holder = h,
            Err(e) => break FleetEvent::NotAcquired(req, unavailable(e)),
        }
        if Instant::now() >= deadline {
            let e = LeaseError::Held { session: shown.clone(), holder: holder.clone() };
            break FleetEvent::NotAcquired(req, GenerationError::Held { holder, reason: e.to_string() });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Err(event) = back(event) {
        // The step loop is gone (drain): answer here.
        let (req, error) = match *event {
            FleetEvent::Acquired(req) => {
                leases.release(&key);
                (req, unavailable("the model is draining"))
            }
            FleetEvent::NotAcquired(req, e) => (req, e),
            FleetEvent::Handoff(_) => return,
        };
        let _ = req.updates.send(Err(error));
    }
}
