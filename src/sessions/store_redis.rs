//! The session store on Redis or Valkey (`--session-store redis://host:port/db`): the same keys
//! and checksummed blobs as the local store, in a database every worker of a fleet can name, so a
//! session one worker wrote (spilled, drained, idle) is continued by whichever worker its next turn
//! reaches. A session is taken with `GETDEL`, so exactly one worker gets it.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::{Commands, Connection, RedisResult};

use super::store::StoreError;
use super::store_db::StoreHealth;

/// Prefix of every key this worker writes (the rest is the local store's key).
const NAMESPACE: &str = "neuron-worker:session:";

/// Longest wait for a connection, a read or a write before the operation fails (and sessions
/// stay where they were).
const TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis (or Valkey) database holding sessions.
pub struct RedisStore {
    client: redis::Client,
    conn: Mutex<Option<Connection>>,
    /// The URL without its password (logs, errors).
    shown: String,
    /// What happened to the store (I/O failures and reconnections).
    pub(super) health: StoreHealth,
    /// Longest wait for a connection, a read or a write.
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.shown).finish_non_exhaustive()
    }
}

/// `url` with any password replaced by `***`.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let auth = &url[s + 3..at];
            match auth.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &auth[..c], &url[at..]),
                None => format!("{}***{}", &url[..s + 3], &url[at..]),
            }
        }
        _ => url.to_string(),
    }
}

/// The glob pattern matching exactly the keys that start with `prefix`.
fn pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('*');
    p
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`) and checks that the server
    /// answers, so a wrong address is reported at start-up.
    pub fn open(url: &str) -> Result<RedisStore, StoreError> {
        RedisStore::open_with_timeout(url, TIMEOUT)
    }

    /// As [`RedisStore::open`], each operation waiting at most `timeout` (leases use a fraction of
    /// their TTL, so an unreachable store is noticed before a lease would expire).
    pub fn open_with_timeout(url: &str, timeout: Duration) -> Result<RedisStore, StoreError> {
        let shown = redact(url);
        let client = redis::Client::open(url).map_err(|e| StoreError::Io {
            path: shown.clone(),
            operation: "parse the address",
            reason: format!("{e} (expected redis://host:port/db)"),
        })?;
        let store = RedisStore { client, conn: Mutex::new(None), shown, health: StoreHealth::default(), timeout };
        store.run("connect", |c| redis::cmd("PING").query::<String>(c))?;
        Ok(store)
    }

    /// The URL without its password.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection of its own (a subscriber holds one).
    pub(super) fn connect(&self) -> RedisResult<Connection> {
        let c = self.client.get_connection_with_timeout(self.timeout)?;
        c.set_read_timeout(Some(self.timeout))?;
        c.set_write_timeout(Some(self.timeout))?;
        Ok(c)
    }

    /// Runs `f` on the connection, connecting (again) first when needed; one reconnection and
    /// retry after a connection error.
    pub(super) fn run<T>(
        &self,
        operation: &'static str,
        f: impl Fn(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self.lock();
        let mut last = None;
        for attempt in 0..2 {
            if slot.is_none() {
                match self.connect() {
                    Ok(c) => {
                        if attempt > 0 || last.is_some() {
                            self.health.reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        *slot = Some(c);
                    }
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                }
            }
            let Some(conn) = slot.as_mut() else { continue };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let retry = e.is_io_error() || e.is_connection_dropped() || e.is_timeout();
                    *slot = None;
                    last = Some(e);
                    if !retry {
                        break;
                    }
                }
            }
        }
        self.health.io_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Err(StoreError::Io {
            path: self.shown.clone(),
            operation,
            reason: last.map_or_else(|| "no connection".to_string(), |e| e.to_string()),
        })
    }

    /// Writes `entries` (key, value) in one MULTI/EXEC transaction.
    pub(super) fn put_all(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.run("write sessions", |c| {
            let mut p = redis::pipe();
            p.atomic();
            for (k, v) in entries {
                p.set(format!("{NAMESPACE}{k}"), v.as_slice()).ignore();
            }
            p.query::<()>(c)
        })
    }

    /// Removes the entry `key` and returns its value (`GETDEL`: one worker gets it).
    pub(super) fn take(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run("take a session", |c| redis::cmd("GETDEL").arg(format!("{NAMESPACE}{key}")).query(c))
    }

    /// Whether there is an entry `key`.
    pub(super) fn contains(&self, key: &str) -> Result<bool, StoreError> {
        self.run("look a session up", |c| c.exists(format!("{NAMESPACE}{key}")))
    }

    /// Deletes the entries `keys`.
    pub(super) fn remove_all(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let full: Vec<String> = keys.iter().map(|k| format!("{NAMESPACE}{k}")).collect();
        self.run("remove sessions", |c| c.del::<_, ()>(&full))
    }

    /// Every (key, value) whose key starts with `prefix` (keys without the namespace).
    pub(super) fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.list_in(NAMESPACE, "list sessions", prefix)
    }

    /// [`RedisStore::list`] under another key `namespace` (the records beside the sessions), named
    /// `operation` in errors.
    pub(super) fn list_in(
        &self,
        namespace: &str,
        operation: &'static str,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let pat = pattern(&format!("{namespace}{prefix}"));
        self.run(operation, |c| {
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) =
                    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pat).arg("COUNT").arg(512).query(c)?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            keys.sort();
            keys.dedup();
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                // A key deleted since the scan is simply not listed.
                if let Some(v) = c.get::<_, Option<Vec<u8>>>(&k)? {
                    out.push((k[namespace.len()..].to_string(), v));
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_and_patterns_escaped() {
        assert_eq!(redact("redis://u:secret@h:6379/2"), "redis://u:***@h:6379/2");
        assert_eq!(redact("redis://secret@h"), "redis://***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
        assert_eq!(pattern("m*[x]?\u{1f}1"), "m\\*\\[x\\]\\?\u{1f}1*");
    }
}
