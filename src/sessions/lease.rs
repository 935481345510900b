//! Ownership leases of conversation sessions on a shared (Redis/Valkey) store: one worker
//! continues a session at a time.
//!
//! Per session (store key `k`, see `store::key`) the store holds:
//! - `neuron-worker:lease:k` = `"<worker id>\n<token>"`, set only if absent, with a TTL
//!   (`--session-lease-ttl`, default 10 s), renewed every third of it while the worker keeps the
//!   session open, deleted when it hands the session over, ends it or drains;
//! - `neuron-worker:fence:k`, a counter `INCR`ed at every acquisition: the lease's *fencing token*;
//! - `neuron-worker:session:k`, the durable record (the session blob with its token history),
//!   written through at every turn;
//! - `neuron-worker:kvb:k`, the K/V cache of the session: a hash of K/V pieces, one per K/V block
//!   (field = block index, see [`super::kv_pieces`]), written behind incrementally;
//! - `neuron-worker:kv:k`, the K/V cache as one whole blob, written by earlier versions: still
//!   read (when it covers more than the pieces) and deleted with the session.
//!
//! Every write of a session's keys is a Lua script that first checks that the lease still holds
//! this worker's id and token, so a holder whose lease expired (paused, partitioned, or slow) and
//! was taken over can never overwrite the new holder's state. A worker that wants a session
//! another live worker holds publishes the session key on `neuron-worker:handoff:<holder id>`; the
//! holder writes it through, releases the lease and drops it between turns.
//!
//! Validity is tracked locally, conservatively: a lease is valid until the instant its last
//! successful acquisition, renewal or fenced write was *sent* plus the TTL, so the worker stops
//! serving a session no later than the store lets the lease expire.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::store::StoreError;
use super::store_redis::RedisStore;

/// Key prefixes and the hand-off channel prefix.
pub(crate) const LEASE: &str = "neuron-worker:lease:";
const FENCE: &str = "neuron-worker:fence:";
pub(crate) const RECORD: &str = "neuron-worker:session:";
/// The prefix of the durable records (the target of a write through).
pub const RECORD_PREFIX: &str = RECORD;
pub(crate) const KV: &str = "neuron-worker:kv:";
pub(crate) const KV_BLOCKS: &str = "neuron-worker:kvb:";
const HANDOFF: &str = "neuron-worker:handoff:";

/// The default lease TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// The default longest wait for a session another worker holds.
pub const DEFAULT_HANDOFF_WAIT: Duration = Duration::from_secs(5);
/// Most K/V bytes queued for writing behind; a session whose K/V would exceed it is not queued
/// (its K/V are a cache: a worker taking it over recomputes them from the tokens).
pub const KV_BEHIND_BYTES: usize = 256 << 20;

/// Acquire: the lease if absent or held under this worker's own id (this process lost track of
/// it, or a restarted worker with the same id: a new token fences the old one off), else who
/// holds it. Worker ids must therefore be unique among live workers (pod names are).
const ACQUIRE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, #ARGV[1] + 1) ~= ARGV[1] .. '\n' then return '0' .. cur end
local t = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '\n' .. t, 'PX', ARGV[2])
return '1' .. t";
/// Renew: only the holder with this token.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0";
/// Release: only the holder with this token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0";
/// Fenced write of KEYS[2] (and renewal of the lease).
const WRITE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1";
/// Fenced end: the record, the K/V and the lease go.
const END: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[1])
return 1";

/// A session as the store holds it: the durable record, the whole K/V blob of earlier versions,
/// and the K/V pieces (block index, piece).
pub type StoredPair = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(usize, Vec<u8>)>);

/// How a lease operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Another worker holds the session.
    #[error(
        "session {session} is held by worker {holder}; send the turn there, or retry (it is handed over between turns)"
    )]
    Held {
        /// The session (as messages show it).
        session: String,
        /// The holder's worker id.
        holder: String,
    },
    /// This worker's lease is gone: expired while the store was unreachable, or taken over.
    #[error(
        "this worker's lease on session {session} is lost ({reason}); the session continues from the store on whichever worker takes it next"
    )]
    Lost {
        /// The session.
        session: String,
        /// What happened.
        reason: String,
    },
    /// The worker's exit deadline came before the store took the turn's tokens.
    #[error(
        "this turn of session {session} is not acknowledged: the worker is exiting and the session store did not confirm its tokens before the exit deadline ({reason}); the store may still apply the write it was sent, so the session continues on another worker from this turn or from the one before"
    )]
    Exiting {
        /// The session.
        session: String,
        /// The store's last error.
        reason: String,
    },
    /// The store cannot be reached.
    #[error(
        "the session store is unreachable ({reason}); new sessions and sessions held elsewhere cannot be served until it is back"
    )]
    Unreachable {
        /// The store's error.
        reason: String,
    },
}

/// Counters of the leases (metrics `neuron_worker_session_lease_*`).
#[derive(Debug, Default)]
pub struct LeaseStats {
    /// Leases acquired.
    pub acquired: AtomicU64,
    /// Sessions handed over to another worker that asked.
    pub handed_over: AtomicU64,
    /// Hand-offs this worker asked for.
    pub handoff_requests: AtomicU64,
    /// Leases lost (expired or taken over while held).
    pub lost: AtomicU64,
    /// Turns written through.
    pub writes_ok: AtomicU64,
    /// Time spent writing turns through (retries included), nanoseconds.
    pub write_nanos: AtomicU64,
    /// Write-through attempts that failed and were retried.
    pub write_retries: AtomicU64,
    /// Turns refused because their tokens could not be written through.
    pub writes_failed: AtomicU64,
    /// Writes refused by the fence (a stale holder).
    pub fenced_off: AtomicU64,
    /// Sessions restored with K/V from the store.
    pub restored_kv: AtomicU64,
    /// Sessions restored from their tokens only (K/V recomputed).
    pub restored_tokens: AtomicU64,
    /// K/V writes (pieces of one session) written behind, or at hand-off and drain.
    pub kv_written: AtomicU64,
    /// K/V bytes written (pieces).
    pub kv_bytes: AtomicU64,
    /// K/V blobs not written (over the byte bound, or refused).
    pub kv_skipped: AtomicU64,
    /// Requests refused because the store was unreachable.
    pub refused_unreachable: AtomicU64,
}

/// A lease this worker holds.
struct Held {
    token: u64,
    valid_until: Instant,
    /// The store no longer holds it (found at a renewal): not renewed again.
    lost: bool,
    /// Called when another worker asks for the session.
    on_handoff: Arc<dyn Fn() + Send + Sync>,
}

/// How leases are configured.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// This worker's id (written into its leases).
    pub worker: String,
    /// Lease TTL.
    pub ttl: Duration,
    /// Longest wait for a session another worker holds before answering with the holder.
    pub handoff_wait: Duration,
}

/// The leases of one worker on one shared store.
pub struct Leases {
    conn: RedisStore,
    /// The renewal thread's own connection (a slow write never delays renewals).
    renewer: RedisStore,
    cfg: LeaseConfig,
    held: Mutex<HashMap<String, Held>>,
    /// Statistics.
    pub stats: LeaseStats,
    /// When the store last answered a lease operation, and since when it has not (outage).
    contact: Mutex<(Option<Instant>, Option<Instant>)>,
    pub(super) behind: super::lease_behind::KvBehind,
    pub(super) through: super::lease_through::Through,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases").field("worker", &self.cfg.worker).field("ttl", &self.cfg.ttl).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Leases {
    /// Connects (five connections: leases, writes through, renewals, the hand-off subscriber, the
    /// K/V written behind) and starts the renewal, subscriber and writer threads.
    pub fn start(url: &str, cfg: LeaseConfig) -> Result<Arc<Leases>, StoreError> {
        // Each operation waits at most an eighth of the TTL (one reconnect-and-retry doubles it), so
        // a write through is retried a few times before the lease would expire.
        let timeout = (cfg.ttl / 8).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let conn = RedisStore::open_with_timeout(url, timeout)?;
        let behind = super::lease_behind::KvBehind::new(RedisStore::open_with_timeout(url, timeout)?);
        // Writes through wait at most 250 ms per attempt (a record is a few kilobytes) and are
        // retried, so they notice an exit deadline in time.
        let through_timeout = timeout.min(Duration::from_millis(250));
        let through = super::lease_through::Through::new(RedisStore::open_with_timeout(url, through_timeout)?);
        let sub = RedisStore::open_with_timeout(url, timeout)?;
        let renewer = RedisStore::open_with_timeout(url, timeout)?;
        let leases = Arc::new(Leases {
            conn,
            renewer,
            cfg,
            held: Mutex::new(HashMap::new()),
            stats: LeaseStats::default(),
            contact: Mutex::new((Some(Instant::now()), None)),
            behind,
            through,
        });
        let weak = Arc::downgrade(&leases);
        std::thread::Builder::new()
            .name("session-leases".into())
            .spawn(move || renew_loop(weak))
            .map_err(|e| io("start the lease thread", e.to_string()))?;
        let weak = Arc::downgrade(&leases);
        let channel = format!("{HANDOFF}{}", leases.cfg.worker);
        std::thread::Builder::new()
            .name("session-handoff".into())
            .spawn(move || subscribe_loop(weak, sub, channel))
            .map_err(|e| io("start the hand-off thread", e.to_string()))?;
        let weak = Arc::downgrade(&leases);
        std::thread::Builder::new()
            .name("session-kv-behind".into())
            .spawn(move || super::lease_behind::write_loop(weak))
            .map_err(|e| io("start the K/V writer thread", e.to_string()))?;
        let weak = Arc::downgrade(&leases);
        std::thread::Builder::new()
            .name("session-write-through".into())
            .spawn(move || super::lease_through::write_loop(weak))
            .map_err(|e| io("start the write-through thread", e.to_string()))?;
        Ok(leases)
    }

    /// The connection of the lease operations.
    pub(super) fn conn(&self) -> &RedisStore {
        &self.conn
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    fn value(&self, token: u64) -> String {
        format!("{}\n{token}", self.cfg.worker)
    }

    fn contacted(&self, ok: bool) {
        let mut c = lock(&self.contact);
        if ok {
            *c = (Some(Instant::now()), None);
        } else if c.1.is_none() {
            c.1 = Some(Instant::now());
        }
    }

    /// How long the store has not answered (zero when it answers).
    pub fn unreachable_for(&self) -> Duration {
        lock(&self.contact).1.map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Leases held now.
    pub fn held_count(&self) -> usize {
        lock(&self.held).len()
    }

    fn eval<T: redis::FromRedisValue>(
        &self,
        operation: &'static str,
        script: &str,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.eval_on(&self.conn, operation, script, keys, args)
    }

    fn eval_on<T: redis::FromRedisValue>(
        &self,
        conn: &RedisStore,
        operation: &'static str,
        script: &str,
        keys: &[String],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let r = conn.run(operation, |c| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(script).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(*a);
            }
            cmd.query(c)
        });
        self.contacted(r.is_ok());
        r
    }

    /// Takes the lease of session `key` if no worker holds it. `on_handoff` is called (from the
    /// subscriber thread) when another worker asks for the session.
    pub fn try_acquire(
        &self,
        key: &str,
        shown: &str,
        on_handoff: Arc<dyn Fn() + Send + Sync>,
    ) -> Result<u64, LeaseError> {
        if let Some(h) = lock(&self.held).get(key)
            && h.valid_until > Instant::now()
        {
            return Ok(h.token);
        }
        let sent = Instant::now();
        let ttl = millis(self.cfg.ttl).to_string();
        let keys = [format!("{LEASE}{key}"), format!("{FENCE}{key}")];
        let answer: String = self
            .eval("acquire a session lease", ACQUIRE, &keys, &[self.cfg.worker.as_bytes(), ttl.as_bytes()])
            .map_err(|e| self.unreachable(e))?;
        match answer.split_at_checked(1) {
            Some(("1", token)) => {
                let token = token.parse().unwrap_or(0);
                lock(&self.held)
                    .insert(key.to_string(), Held { token, valid_until: sent + self.cfg.ttl, lost: false, on_handoff });
                self.stats.acquired.fetch_add(1, Relaxed);
                Ok(token)
            }
            Some((_, holder)) => {
                let holder = holder.split('\n').next().unwrap_or_default().to_string();
                Err(LeaseError::Held { session: shown.to_string(), holder })
            }
            None => Err(LeaseError::Unreachable { reason: "the store answered an empty lease".into() }),
        }
    }

    fn unreachable(&self, e: StoreError) -> LeaseError {
        self.stats.refused_unreachable.fetch_add(1, Relaxed);
        LeaseError::Unreachable { reason: e.to_string() }
    }

    /// This worker's token for `key` while its lease is valid (by the local, conservative clock).
    pub fn check(&self, key: &str, shown: &str) -> Result<u64, LeaseError> {
        match lock(&self.held).get(key) {
            Some(h) if h.valid_until > Instant::now() => Ok(h.token),
            Some(_) => Err(LeaseError::Lost {
                session: shown.to_string(),
                reason: format!(
                    "the lease expired: the session store has not answered for {:.1} s",
                    self.unreachable_for().as_secs_f64()
                ),
            }),
            None => Err(LeaseError::Lost { session: shown.to_string(), reason: "no lease held".into() }),
        }
    }

    /// When the lease of `key` stops being valid, if held.
    pub fn valid_until(&self, key: &str) -> Option<Instant> {
        lock(&self.held).get(key).map(|h| h.valid_until)
    }

    /// Forgets the lease of `key` locally (it was lost).
    pub fn forget(&self, key: &str) {
        lock(&self.held).remove(key);
    }

    /// Releases the lease of `key` (best effort: it expires by itself otherwise).
    pub fn release(&self, key: &str) {
        let Some(h) = lock(&self.held).remove(key) else { return };
        let keys = [format!("{LEASE}{key}")];
        let _ = self.eval::<i64>("release a session lease", RELEASE, &keys, &[self.value(h.token).as_bytes()]);
    }

    /// Writes `value` under `target_prefix` + `key` if this worker's lease (token) still holds,
    /// renewing it. `Ok(false)`: the fence refused the write (the lease is lost; forgotten here).
    pub fn write_fenced(&self, key: &str, token: u64, target_prefix: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.write_fenced_on(&self.conn, key, token, target_prefix, value)
    }

    /// As [`Leases::write_fenced`], on connection `conn`.
    pub(super) fn write_fenced_on(
        &self,
        conn: &RedisStore,
        key: &str,
        token: u64,
        target_prefix: &str,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let sent = Instant::now();
        let ttl = millis(self.cfg.ttl).to_string();
        let keys = [format!("{LEASE}{key}"), format!("{target_prefix}{key}")];
        let ok: i64 = self.eval_on(
            conn,
            "write a session through its lease",
            WRITE,
            &keys,
            &[self.value(token).as_bytes(), ttl.as_bytes(), value],
        )?;
        self.after_fenced(key, token, ok == 1, sent);
        Ok(ok == 1)
    }

    fn after_fenced(&self, key: &str, token: u64, ok: bool, sent: Instant) {
        let mut held = lock(&self.held);
        if ok {
            if let Some(h) = held.get_mut(key)
                && h.token == token
            {
                h.valid_until = sent + self.cfg.ttl;
            }
        } else {
            self.stats.fenced_off.fetch_add(1, Relaxed);
            if held.get(key).is_some_and(|h| h.token == token) {
                held.remove(key);
                self.stats.lost.fetch_add(1, Relaxed);
            }
        }
    }

    /// Ends session `key`: its record, K/V and lease are deleted (fenced).
    pub fn end(&self, key: &str) {
        let Some(h) = lock(&self.held).remove(key) else { return };
        let keys =
            [format!("{LEASE}{key}"), format!("{RECORD}{key}"), format!("{KV}{key}"), format!("{KV_BLOCKS}{key}")];
        let _ = self.eval::<i64>("end a session", END, &keys, &[self.value(h.token).as_bytes()]);
    }

    /// The durable record and the K/V cache of `key` (read under the lease).
    pub fn read(&self, key: &str) -> Result<StoredPair, StoreError> {
        let keys = [format!("{RECORD}{key}"), format!("{KV}{key}")];
        let blocks = format!("{KV_BLOCKS}{key}");
        let r = self.conn.run("read a session", |c| {
            redis::pipe()
                .cmd("MGET")
                .arg(&keys)
                .cmd("HGETALL")
                .arg(&blocks)
                .query::<((Option<Vec<u8>>, Option<Vec<u8>>), Vec<(String, Vec<u8>)>)>(c)
        });
        self.contacted(r.is_ok());
        let ((record, whole), pieces) = r?;
        let pieces = pieces.into_iter().filter_map(|(i, b)| i.parse().ok().map(|i| (i, b))).collect();
        Ok((record, whole, pieces))
    }

    /// Asks `holder` to hand session `key` over.
    pub fn request_handoff(&self, holder: &str, key: &str) {
        self.stats.handoff_requests.fetch_add(1, Relaxed);
        let channel = format!("{HANDOFF}{holder}");
        let r = self.conn.run("ask for a hand-off", |c| redis::cmd("PUBLISH").arg(&channel).arg(key).query::<i64>(c));
        self.contacted(r.is_ok());
    }

    /// Renews every held lease (one pipeline); leases the store no longer holds are dropped.
    fn renew_all(&self) {
        let held: Vec<(String, u64)> =
            lock(&self.held).iter().filter(|(_, h)| !h.lost).map(|(k, h)| (k.clone(), h.token)).collect();
        if held.is_empty() {
            // Still find out whether the store answers (health, metrics).
            let r = self.renewer.run("ping", |c| redis::cmd("PING").query::<String>(c));
            self.contacted(r.is_ok());
            return;
        }
        let ttl = millis(self.cfg.ttl).to_string();
        let sent = Instant::now();
        let r = self.renewer.run("renew session leases", |c| {
            let mut p = redis::pipe();
            for (k, t) in &held {
                p.cmd("EVAL").arg(RENEW).arg(1).arg(format!("{LEASE}{k}")).arg(self.value(*t)).arg(&ttl);
            }
            p.query::<Vec<i64>>(c)
        });
        self.contacted(r.is_ok());
        let Ok(answers) = r else { return };
        let mut map = lock(&self.held);
        for ((k, t), ok) in held.iter().zip(answers) {
            let Some(h) = map.get_mut(k) else { continue };
            if h.token != *t {
                continue;
            }
            if ok == 1 {
                h.valid_until = sent + self.cfg.ttl;
            } else {
                // Expired in the store (an outage longer than the TTL) or taken: not ours.
                h.valid_until = h.valid_until.min(sent);
                h.lost = true;
                self.stats.lost.fetch_add(1, Relaxed);
                tracing::warn!(session = %k.replace('\u{1f}', "/"), "session lease lost (expired in the store)");
            }
        }
    }

    fn handoff_asked(&self, key: &str) {
        let cb = lock(&self.held).get(key).map(|h| h.on_handoff.clone());
        if let Some(cb) = cb {
            cb();
        }
    }
}

fn io(operation: &'static str, reason: String) -> StoreError {
    StoreError::Io { path: "session leases".into(), operation, reason }
}

/// Renews the leases every third of the TTL until the leases are dropped.
fn renew_loop(weak: Weak<Leases>) {
    loop {
        let every = match weak.upgrade() {
            Some(l) => {
                l.renew_all();
                (l.cfg.ttl / 3).max(Duration::from_millis(20))
            }
            None => return,
        };
        std::thread::sleep(every);
    }
}

/// Listens for hand-off requests addressed to this worker.
fn subscribe_loop(weak: Weak<Leases>, store: RedisStore, channel: String) {
    loop {
        let conn = match store.connect() {
            Ok(c) => c,
            Err(_) => {
                if weak.strong_count() == 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let mut conn = conn;
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        let mut pubsub = conn.as_pubsub();
        if pubsub.subscribe(&channel).is_err() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        loop {
            if weak.strong_count() == 0 {
                return;
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let Ok(key) = msg.get_payload::<String>() else { continue };
                    match weak.upgrade() {
                        Some(l) => l.handoff_asked(&key),
                        None => return,
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(_) => break, // reconnect
            }
        }
    }
}
