//! Turns written through off the step loop: a turn's token history is written (fenced, retried
//! while the lease is valid) by a thread of its own on a connection of its own, so a slow or
//! stopped store delays only the turns that wait for it, never the other sequences of their
//! instance. The caller holds the turn's last response and the session (busy: its next turn waits)
//! until [`ThroughJob::done`] reports how the write ended.
//!
//! Once the worker's exit deadline is near ([`Leases::exit_by`]), a write is retried only until
//! then: the turn is answered "not kept" rather than cut off silently by the exit.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::lease::{LeaseError, Leases, RECORD};
use super::store_redis::RedisStore;

/// What to do when a write through ended: `Ok(token)` (the lease's fencing token) once the
/// tokens are durable, or why they are not.
pub type ThroughDone = Box<dyn FnOnce(Result<u64, LeaseError>) + Send>;

/// One turn's write through.
pub struct ThroughJob {
    /// The session's store key.
    pub key: String,
    /// The session as messages show it.
    pub shown: String,
    /// The durable record (a session blob with the token history).
    pub value: Vec<u8>,
    /// Called once, from the writer thread, when the write ended.
    pub done: ThroughDone,
}

/// The queue of writes through, their connection and the exit deadline.
pub(super) struct Through {
    conn: RedisStore,
    queue: Mutex<VecDeque<ThroughJob>>,
    ready: Condvar,
    exit_by: Mutex<Option<Instant>>,
}

impl Through {
    pub(super) fn new(conn: RedisStore) -> Through {
        Through { conn, queue: Mutex::new(VecDeque::new()), ready: Condvar::new(), exit_by: Mutex::new(None) }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leases {
    /// Queues a turn's write through; `job.done` is called when it ended.
    pub fn write_through_later(&self, job: ThroughJob) {
        lock(&self.through.queue).push_back(job);
        self.through.ready.notify_one();
    }

    /// Writes a session record through its lease now (on the calling thread), retrying while the
    /// lease is valid. Returns the lease token.
    pub fn write_through(&self, key: &str, shown: &str, value: &[u8]) -> Result<u64, LeaseError> {
        self.write_through_on(None, key, shown, value)
    }

    /// The worker exits at `at`: writes through are retried only until then.
    pub fn exit_by(&self, at: Instant) {
        let mut e = lock(&self.through.exit_by);
        *e = Some(e.map_or(at, |t| t.min(at)));
    }

    fn write_through_on(
        &self,
        conn: Option<&RedisStore>,
        key: &str,
        shown: &str,
        value: &[u8],
    ) -> Result<u64, LeaseError> {
        let started = Instant::now();
        loop {
            let token = self.check(key, shown)?;
            let written = match conn {
                Some(c) => self.write_fenced_on(c, key, token, RECORD, value),
                None => self.write_fenced(key, token, RECORD, value),
            };
            match written {
                Ok(true) => {
                    self.stats.writes_ok.fetch_add(1, Relaxed);
                    let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    self.stats.write_nanos.fetch_add(took, Relaxed);
                    return Ok(token);
                }
                Ok(false) => {
                    return Err(LeaseError::Lost {
                        session: shown.to_string(),
                        reason: "another worker took its lease over (the fencing token no longer matches)".into(),
                    });
                }
                Err(e) => {
                    self.stats.write_retries.fetch_add(1, Relaxed);
                    let now = Instant::now();
                    if self.valid_until(key).is_none_or(|t| t <= now) {
                        self.forget(key);
                        self.stats.lost.fetch_add(1, Relaxed);
                        return Err(LeaseError::Lost {
                            session: shown.to_string(),
                            reason: format!(
                                "the session store did not take the turn's tokens before the lease expired: {e}"
                            ),
                        });
                    }
                    if lock(&self.through.exit_by).is_some_and(|t| t <= now) {
                        return Err(LeaseError::Exiting { session: shown.to_string(), reason: e.to_string() });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn next_through(&self) -> Option<ThroughJob> {
        let mut q = lock(&self.through.queue);
        if q.is_empty() {
            q = self
                .through
                .ready
                .wait_timeout(q, Duration::from_millis(200))
                .map(|(q, _)| q)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        q.pop_front()
    }
}

/// Writes queued turns through until the leases are dropped.
pub(super) fn write_loop(weak: Weak<Leases>) {
    loop {
        let Some(leases) = weak.upgrade() else { return };
        if let Some(job) = leases.next_through() {
            let r = leases.write_through_on(Some(&leases.through.conn), &job.key, &job.shown, &job.value);
            (job.done)(r);
        }
    }
}
