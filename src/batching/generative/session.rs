//! Conversation sessions kept by one step loop: each session's token history (prompts and generated
//! tokens, never re-tokenized), its K/V blocks while they are resident, the turn running for it and
//! the turns queued behind it, and the least-recently-used order in which idle sessions give their
//! blocks back when the pool runs short.
//!
//! Memory never deadlocks: an idle session pins nothing the pool cannot take back. Releasing an
//! idle session's table returns its full blocks to the prefix cache (still found by their tokens'
//! hashes on the next turn) and frees its partial last block; if the cache evicts them too, the
//! next turn recomputes the missing K/V from the tokens (batch-invariant kernels make that exact).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::kv_blocks::BlockTable;
use super::request::{GenerateRequest, GenerationError, SessionTurn, UpdateSender};
use super::sequence::Sequence;
use super::stats::GenerativeStats;
use crate::sessions::SequenceId;

/// Bounds on the sessions one model version keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Most open sessions per instance (each keeps its token history in host memory).
    pub max_sessions: usize,
    /// Most tokens a session may hold (history plus the new turn's input); a turn beyond it is
    /// refused with a message saying to END the session or rewind it with `truncate_to`.
    pub max_session_tokens: usize,
    /// With a session store: a session idle this long is written there (its blocks released to
    /// the prefix cache), so it survives a crash; `None` = only when the pool needs its blocks.
    pub store_after_idle: Option<Duration>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self { max_sessions: 1024, max_session_tokens: usize::MAX, store_after_idle: None }
    }
}

/// Which instance holds each open session (shared by the handle, which routes turns, and the step
/// loops, which forget a session when it ends).
pub type Affinity = Arc<Mutex<HashMap<SequenceId, usize>>>;

/// One open session on this instance.
#[derive(Debug, Default)]
pub struct KeptSession {
    /// Every token of the conversation so far.
    pub tokens: Vec<u32>,
    /// The blocks holding K/V of `tokens[..computed]`, while resident.
    pub table: Option<BlockTable>,
    /// Positions whose K/V are in `table` (0 when it is not resident).
    pub computed: usize,
    /// Turns completed.
    pub turns: u64,
    /// Logical time of the last use (least recently used idle sessions release their blocks first).
    pub last_used: u64,
    /// A turn is queued or running.
    pub busy: bool,
    /// Turns that arrived while one was running; they run in order.
    pub pending: VecDeque<GenerateRequest>,
    /// The session store holds this session as it is now (written when its blocks were released):
    /// the K/V bytes written (0 when only its tokens are). Its next turn restores from there.
    pub stored: Option<u64>,
    /// When the session last became idle (listings report the idle time).
    pub idle_since: Option<Instant>,
}

/// A turn that cannot run, and where to say so.
pub type Refused = (UpdateSender, GenerationError);

/// The sessions of one instance.
#[derive(Debug)]
pub struct Sessions {
    map: HashMap<SequenceId, KeptSession>,
    limits: SessionLimits,
    affinity: Affinity,
    instance: usize,
    clock: u64,
    stats: Arc<GenerativeStats>,
}

impl Sessions {
    /// No session yet, on instance `instance`.
    pub fn new(limits: SessionLimits, affinity: Affinity, instance: usize, stats: Arc<GenerativeStats>) -> Self {
        Self { map: HashMap::new(), limits, affinity, instance, clock: 0, stats }
    }

    /// Open sessions.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Open sessions whose K/V table is resident in the pool.
    pub fn resident(&self) -> usize {
        self.map.values().filter(|s| s.table.is_some()).count()
    }

    /// Open sessions whose state the session store holds (their blocks were released).
    pub fn stored(&self) -> usize {
        self.map.values().filter(|s| s.stored.is_some()).count()
    }

    /// Positions with resident K/V, and K/V bytes held by the store, over all open sessions.
    pub fn kv_footprint(&self) -> (u64, u64) {
        self.map.values().fold((0, 0), |(r, st), s| {
            (r + if s.table.is_some() { s.computed as u64 } else { 0 }, st + s.stored.unwrap_or(0))
        })
    }

    /// The open sessions (for listing).
    pub fn iter(&self) -> impl Iterator<Item = (&SequenceId, &KeptSession)> {
        self.map.iter()
    }

    /// The open session `id`.
    pub fn get(&self, id: &SequenceId) -> Option<&KeptSession> {
        self.map.get(id)
    }

    /// The open session `id`, to change it.
    pub fn get_mut(&mut self, id: &SequenceId) -> Option<&mut KeptSession> {
        self.map.get_mut(id)
    }

    /// True when no more session can be opened on this instance.
    pub fn is_full(&self) -> bool {
        self.map.len() >= self.limits.max_sessions
    }

    /// Forgets the routing of `id` to this instance when no session `id` is open here (a turn for
    /// an unknown id was refused: the handle pinned it here on arrival).
    pub fn unpin_if_absent(&mut self, id: &SequenceId) {
        if !self.map.contains_key(id)
            && let Ok(mut a) = self.affinity.lock()
            && a.get(id) == Some(&self.instance)
        {
            a.remove(id);
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn forget(&mut self, id: &SequenceId) {
        self.map.remove(id);
        if let Ok(mut a) = self.affinity.lock()
            && a.get(id) == Some(&self.instance)
        {
            a.remove(id);
        }
    }

    /// Starts turn `req` of its session: the sequence to queue, `None` when it waits behind a
    /// running turn of the same session, or the refusal to send.
    pub fn begin(&mut self, req: GenerateRequest) -> Result<Option<Sequence>, Refused> {
        let Some(turn) = req.session.clone() else { return Ok(Some(Sequence::new(req))) };
        let refuse = |req: GenerateRequest, reason: String| Err((req.updates, GenerationError::Session { reason }));
        if turn.start {
            match self.map.get(&turn.id) {
                Some(s) if s.busy => {
                    return refuse(
                        req,
                        format!(
                            "session {} has a turn running; a sequence_start cannot replace it until that turn \
                             finishes (or its client cancels it)",
                            turn.id
                        ),
                    );
                }
                Some(_) => self.forget(&turn.id),
                None => {}
            }
        }
        if !self.map.contains_key(&turn.id) {
            if !turn.start && !turn.implicit_start {
                return refuse(
                    req,
                    format!(
                        "session {} is not open on this worker (never started, ended, or lost with its instance); \
                         start it with sequence_start",
                        turn.id
                    ),
                );
            }
            if self.map.len() >= self.limits.max_sessions {
                let reason = format!(
                    "this instance holds its maximum of {} open sessions; end one (sequence_end) or retry on \
                     another worker",
                    self.limits.max_sessions
                );
                return Err((req.updates, GenerationError::SessionsFull { reason }));
            }
            self.map.insert(turn.id.clone(), KeptSession::default());
            if let Ok(mut a) = self.affinity.lock() {
                a.insert(turn.id.clone(), self.instance);
            }
        }
        let now = self.tick();
        let max_tokens = self.limits.max_session_tokens;
        let Some(s) = self.map.get_mut(&turn.id) else {
            return refuse(req, format!("session {} vanished while starting a turn", turn.id));
        };
        if s.busy {
            s.pending.push_back(req);
            return Ok(None);
        }
        let history = s.tokens.len();
        let keep = req.params.truncate_to.unwrap_or(history);
        if keep > history {
            return refuse(req, format!("truncate_to {keep} is beyond the {history} tokens session {} holds", turn.id));
        }
        let total = keep + req.prompt.len();
        if total == 0 {
            return refuse(req, "the turn has no tokens: send a prompt, or truncate_to at least 1".into());
        }
        if total > max_tokens {
            return refuse(
                req,
                format!(
                    "session {} would hold {total} tokens; sessions of this model hold at most {max_tokens} \
                     (max_session_tokens): end it, or rewind it with truncate_to",
                    turn.id
                ),
            );
        }
        let mut tokens = Vec::with_capacity(total + req.params.max_tokens.min(4096));
        tokens.extend_from_slice(&s.tokens[..keep]);
        tokens.extend_from_slice(&req.prompt);
        // At least one token is computed by the turn, for its logits.
        let reuse = s.computed.min(keep).min(total - 1);
        let table = s.table.take().map(|t| if reuse < t.len() { t.fork(reuse) } else { t });
        s.computed = 0;
        s.busy = true;
        s.last_used = now;
        s.stored = None;
        s.idle_since = None;
        let reuse = if table.is_some() { reuse } else { 0 };
        self.stats.session_turns.fetch_add(1, Relaxed);
        Ok(Some(Sequence::for_turn(req, tokens, table, reuse)))
    }

    /// Takes back a finished (or cancelled, or failed) turn's sequence: its tokens and blocks become
    /// the session's. Returns the next queued turn of that session, if any.
    pub fn finish(&mut self, seq: &mut Sequence) -> Option<GenerateRequest> {
        let turn: SessionTurn = seq.session.take()?;
        let now = self.tick();
        let s = self.map.get_mut(&turn.id)?;
        if turn.end {
            let pending = std::mem::take(&mut s.pending);
            self.forget(&turn.id);
            for p in pending {
                let reason = format!("session {} ended (sequence_end) before this turn ran", turn.id);
                let _ = super::outbox::deliver(&p.updates, Err(GenerationError::Session { reason }));
            }
            return None;
        }
        s.tokens = std::mem::take(&mut seq.tokens);
        s.table = seq.table.take();
        s.computed = if s.table.is_some() { seq.computed.min(s.tokens.len()) } else { 0 };
        s.busy = false;
        s.turns += 1;
        s.last_used = now;
        s.idle_since = Some(Instant::now());
        s.pending.pop_front()
    }

    /// Takes back a turn that did not run (refused, or cancelled while waiting): the session stays
    /// as it was before the turn (its blocks come back). Returns the next queued turn, if any.
    pub fn abort(&mut self, seq: &mut Sequence) -> Option<GenerateRequest> {
        let turn: SessionTurn = seq.session.take()?;
        let now = self.tick();
        let s = self.map.get_mut(&turn.id)?;
        let table = seq.table.take();
        // The turn's blocks hold K/V of positions it shares with the history (at most its reuse).
        let computed = seq.computed.min(s.tokens.len());
        if table.is_some() && s.tokens.get(..computed) == seq.tokens.get(..computed) {
            s.table = table;
            s.computed = computed;
        } else {
            s.table = None;
            s.computed = 0;
        }
        s.busy = false;
        s.last_used = now;
        s.idle_since = Some(Instant::now());
        s.pending.pop_front()
    }

    /// The bounds these sessions live under.
    pub fn limits(&self) -> &SessionLimits {
        &self.limits
    }

    /// Idle sessions with resident blocks that have been idle for at least `age`, longest first.
    pub fn idle_resident_for(&self, age: Duration) -> Vec<SequenceId> {
        let mut idle: Vec<(Instant, SequenceId)> = self
            .map
            .iter()
            .filter(|(_, s)| !s.busy && s.table.is_some())
            .filter_map(|(id, s)| s.idle_since.filter(|t| t.elapsed() >= age).map(|t| (t, id.clone())))
            .collect();
        idle.sort_unstable();
        idle.into_iter().map(|(_, id)| id).collect()
    }

    /// Idle sessions whose K/V blocks are resident, least recently used first (the order in which
    /// they give their blocks back when the pool runs short).
    pub fn idle_resident(&self) -> Vec<SequenceId> {
        let mut idle: Vec<(u64, SequenceId)> = self
            .map
            .iter()
            .filter(|(_, s)| !s.busy && s.table.is_some())
            .map(|(id, s)| (s.last_used, id.clone()))
            .collect();
        idle.sort_unstable();
        idle.into_iter().map(|(_, id)| id).collect()
    }

    /// The instance leaves service: every session is lost; queued turns are answered with `error`.
    pub fn fail_all(&mut self, error: &GenerationError) {
        let ids: Vec<SequenceId> = self.map.keys().cloned().collect();
        for id in ids {
            if let Some(s) = self.map.get_mut(&id) {
                for p in std::mem::take(&mut s.pending) {
                    let _ = super::outbox::deliver(&p.updates, Err(error.clone()));
                }
            }
            self.forget(&id);
        }
    }

    /// Takes an idle session out (export). `Err` says why it cannot be taken now.
    pub fn take_idle(&mut self, id: &SequenceId) -> Result<KeptSession, bool> {
        match self.map.get(id) {
            None => Err(false),
            Some(s) if s.busy => Err(true),
            Some(_) => {
                let s = self.map.remove(id);
                self.forget(id);
                s.ok_or(false)
            }
        }
    }

    /// Adds an imported session (its id must not be open here).
    pub fn insert(&mut self, id: SequenceId, mut session: KeptSession) -> Result<(), GenerationError> {
        if self.map.contains_key(&id) {
            return Err(GenerationError::Session { reason: format!("session {id} is already open on this worker") });
        }
        if self.map.len() >= self.limits.max_sessions {
            return Err(GenerationError::SessionsFull {
                reason: format!("this instance holds its maximum of {} open sessions", self.limits.max_sessions),
            });
        }
        session.last_used = self.tick();
        session.idle_since.get_or_insert_with(Instant::now);
        if let Ok(mut a) = self.affinity.lock() {
            a.insert(id.clone(), self.instance);
        }
        self.map.insert(id, session);
        Ok(())
    }
}
