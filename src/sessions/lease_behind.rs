//! K/V written behind: after a turn's tokens are written through, the session's new K/V pieces
//! (the blocks holding positions not yet in the store: see [`super::kv_pieces`]) are queued here
//! and written by a thread of its own (fenced by the lease, like every write), so a turn never
//! waits for its K/V. A write replaces the session's pieces from its first block on (pieces past
//! the session's end are left from an older branch and deleted). The queue is bounded in bytes
//! ([`super::lease::KV_BEHIND_BYTES`]): newer pieces of a session merge with its queued ones, and a
//! write that does not fit is dropped (counted, and the session's next write starts again from
//! block 0) — the K/V are a cache, a worker taking the session over recomputes what is missing.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::lease::{KV_BEHIND_BYTES, KV_BLOCKS, Leases};
use super::store_redis::RedisStore;

/// One queued write: session key, lease token, first block, the pieces of blocks `from..`.
struct Pending {
    key: String,
    token: u64,
    from: usize,
    pieces: Vec<Vec<u8>>,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.pieces.iter().map(Vec::len).sum()
    }

    /// `later` (written after this one) merged in.
    fn merge(mut self, later: Pending) -> Pending {
        if later.from <= self.from {
            return later;
        }
        self.pieces.truncate(later.from - self.from);
        if self.from + self.pieces.len() < later.from {
            return later; // a gap: the later write alone is consistent
        }
        self.pieces.extend(later.pieces);
        Pending { token: later.token, ..self }
    }
}

/// The queue and its connection.
pub(super) struct KvBehind {
    conn: RedisStore,
    queue: Mutex<(VecDeque<Pending>, usize)>,
    ready: Condvar,
    /// Sessions whose last K/V write was dropped or failed: their next write starts at block 0.
    failed: Mutex<HashSet<String>>,
}

impl KvBehind {
    pub(super) fn new(conn: RedisStore) -> KvBehind {
        KvBehind { conn, queue: Mutex::new((VecDeque::new(), 0)), ready: Condvar::new(), failed: Default::default() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leases {
    /// Queues the K/V pieces of blocks `from..` of session `key` (lease `token`) for writing
    /// behind. False when they were dropped (over the byte bound).
    pub fn write_behind(&self, key: &str, token: u64, from: usize, pieces: Vec<Vec<u8>>) -> bool {
        let mut p = Pending { key: key.to_string(), token, from, pieces };
        let mut q = lock(&self.behind.queue);
        if let Some(i) = q.0.iter().position(|p| p.key == key)
            && let Some(old) = q.0.remove(i)
        {
            q.1 -= old.bytes();
            p = old.merge(p);
        }
        if q.1 + p.bytes() > KV_BEHIND_BYTES {
            drop(q);
            self.kv_failed(key);
            return false;
        }
        q.1 += p.bytes();
        q.0.push_back(p);
        self.behind.ready.notify_one();
        true
    }

    fn kv_failed(&self, key: &str) {
        self.stats.kv_skipped.fetch_add(1, Relaxed);
        lock(&self.behind.failed).insert(key.to_string());
    }

    /// True (once) when a K/V write of `key` was dropped or failed since the last call: the
    /// session's next write must start at block 0.
    pub fn take_kv_failed(&self, key: &str) -> bool {
        lock(&self.behind.failed).remove(key)
    }

    /// Drops what is queued for `key` (the session was handed over or ended: its writes would be
    /// fenced off anyway).
    pub fn cancel_behind(&self, key: &str) {
        let _ = self.take_queued(key);
    }

    fn take_queued(&self, key: &str) -> Option<Pending> {
        let mut q = lock(&self.behind.queue);
        let i = q.0.iter().position(|p| p.key == key)?;
        let old = q.0.remove(i)?;
        q.1 -= old.bytes();
        Some(old)
    }

    /// Writes the K/V pieces of blocks `from..` of `key` now, with what is still queued for it
    /// (hand-off, pool pressure, drain): true when written.
    pub fn write_kv_now(&self, key: &str, token: u64, from: usize, pieces: Vec<Vec<u8>>) -> bool {
        let p = Pending { key: key.to_string(), token, from, pieces };
        let p = match self.take_queued(key) {
            Some(old) => old.merge(p),
            None => p,
        };
        self.write_pieces(self.conn(), &p)
    }

    fn next_behind(&self) -> Option<Pending> {
        let mut q = lock(&self.behind.queue);
        if q.0.is_empty() {
            q = self
                .behind
                .ready
                .wait_timeout(q, Duration::from_millis(200))
                .map(|(q, _)| q)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let p = q.0.pop_front()?;
        q.1 -= p.bytes();
        Some(p)
    }

    fn write_pieces(&self, conn: &RedisStore, p: &Pending) -> bool {
        if p.pieces.is_empty() && p.from > 0 {
            return true;
        }
        let keys = [format!("{}{}", super::lease::LEASE, p.key), format!("{KV_BLOCKS}{}", p.key)];
        let value = format!("{}\n{}", self.config().worker, p.token);
        let r = conn.run("write K/V behind", |c| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(WRITE_KV).arg(2).arg(&keys).arg(&value).arg(p.from);
            for piece in &p.pieces {
                cmd.arg(piece.as_slice());
            }
            cmd.query::<i64>(c)
        });
        if matches!(r, Ok(1)) {
            self.stats.kv_written.fetch_add(1, Relaxed);
            self.stats.kv_bytes.fetch_add(p.bytes() as u64, Relaxed);
            true
        } else {
            self.kv_failed(&p.key);
            false
        }
    }
}

/// Fenced write of K/V pieces: the pieces of blocks ARGV[2].. replace the session's pieces from
/// block ARGV[2] on (does not renew the lease: only the holder's own thread does).
const WRITE_KV: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local from = tonumber(ARGV[2])
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if tonumber(f) >= from then redis.call('HDEL', KEYS[2], f) end
end
for i = 3, #ARGV do redis.call('HSET', KEYS[2], tostring(from + i - 3), ARGV[i]) end
return 1";

/// Writes queued K/V pieces until the leases are dropped.
pub(super) fn write_loop(weak: Weak<Leases>) {
    loop {
        let Some(leases) = weak.upgrade() else { return };
        if let Some(p) = leases.next_behind() {
            leases.write_pieces(&leases.behind.conn, &p);
        }
    }
}
