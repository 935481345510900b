//! K/V written behind: after a turn's tokens are written through, the session's K/V blob is
//! queued here and written by a thread of its own (fenced by the lease, like every write), so a
//! turn never waits for its K/V. The queue is bounded in bytes ([`super::lease::KV_BEHIND_BYTES`]):
//! a newer blob of a session replaces its queued one, and a blob that does not fit is dropped
//! (counted) — the K/V are a cache, a worker taking the session over recomputes what is missing.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex, Weak};
use std::time::Duration;

use super::lease::{KV, KV_BEHIND_BYTES, Leases};
use super::store_redis::RedisStore;

/// One queued write: session key, lease token, blob.
struct Pending {
    key: String,
    token: u64,
    value: Vec<u8>,
}

/// The queue and its connection.
pub(super) struct KvBehind {
    conn: RedisStore,
    queue: Mutex<(VecDeque<Pending>, usize)>,
    ready: Condvar,
}

impl KvBehind {
    pub(super) fn new(conn: RedisStore) -> KvBehind {
        KvBehind { conn, queue: Mutex::new((VecDeque::new(), 0)), ready: Condvar::new() }
    }
}

impl Leases {
    /// Queues the K/V blob of session `key` (lease `token`) for writing behind. False when it was
    /// dropped (over the byte bound).
    pub fn write_behind(&self, key: &str, token: u64, value: Vec<u8>) -> bool {
        let mut q = self.behind.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.0.iter().position(|p| p.key == key)
            && let Some(old) = q.0.remove(i)
        {
            q.1 -= old.value.len();
        }
        if q.1 + value.len() > KV_BEHIND_BYTES {
            self.stats.kv_skipped.fetch_add(1, Relaxed);
            return false;
        }
        q.1 += value.len();
        q.0.push_back(Pending { key: key.to_string(), token, value });
        self.behind.ready.notify_one();
        true
    }

    /// Drops what is queued for `key` (the session was handed over or ended: its writes would be
    /// fenced off anyway).
    pub fn cancel_behind(&self, key: &str) {
        let mut q = self.behind.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = q.0.iter().position(|p| p.key == key)
            && let Some(old) = q.0.remove(i)
        {
            q.1 -= old.value.len();
        }
    }

    /// Writes the K/V blob of `key` now (hand-off, pool pressure): true when it was written.
    pub fn write_kv_now(&self, key: &str, token: u64, value: &[u8]) -> bool {
        self.cancel_behind(key);
        let ok = matches!(self.write_fenced(key, token, KV, value), Ok(true));
        if ok {
            self.stats.kv_written.fetch_add(1, Relaxed);
        } else {
            self.stats.kv_skipped.fetch_add(1, Relaxed);
        }
        ok
    }

    fn next_behind(&self) -> Option<Pending> {
        let mut q = self.behind.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.0.is_empty() {
            q = self
                .behind
                .ready
                .wait_timeout(q, Duration::from_millis(200))
                .map(|(q, _)| q)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let p = q.0.pop_front()?;
        q.1 -= p.value.len();
        Some(p)
    }

    fn write_one_behind(&self, p: &Pending) {
        let keys = [format!("{}{}", super::lease::LEASE, p.key), format!("{KV}{}", p.key)];
        let value = format!("{}\n{}", self.config().worker, p.token);
        let ttl = u64::try_from(self.config().ttl.as_millis()).unwrap_or(u64::MAX).to_string();
        let r = self.behind.conn.run("write K/V behind", |c| {
            redis::cmd("EVAL")
                .arg(WRITE_KV)
                .arg(2)
                .arg(&keys)
                .arg(&value)
                .arg(&ttl)
                .arg(p.value.as_slice())
                .query::<i64>(c)
        });
        if matches!(r, Ok(1)) {
            self.stats.kv_written.fetch_add(1, Relaxed);
        } else {
            self.stats.kv_skipped.fetch_add(1, Relaxed);
        }
    }
}

/// Fenced write of the K/V (does not renew the lease: only the holder's own thread does).
const WRITE_KV: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
return 1";

/// Writes queued K/V blobs until the leases are dropped.
pub(super) fn write_loop(weak: Weak<Leases>) {
    loop {
        let Some(leases) = weak.upgrade() else { return };
        if let Some(p) = leases.next_behind() {
            leases.write_one_behind(&p);
        }
    }
}
