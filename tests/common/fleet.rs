//! Helpers of the fleet tests: worker processes on a shared store, their lease metrics, a turn
//! checked against a stateless request, and a Redis server paused with SIGSTOP.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use super::SpawnedWorker;
use super::gen_sessions::*;

/// Seeded sampling of 6 tokens.
pub const SEEDED: &str = r#"{"max_tokens": 6, "temperature": 0.8, "seed": 21, "ignore_eos": true}"#;

/// A worker process named `id` on the store `url`, leases of `ttl` seconds.
pub async fn worker(url: &str, repo: &std::path::Path, id: &str, ttl: &str) -> (SpawnedWorker, Client) {
    worker_waiting(url, repo, id, ttl, "8").await
}

/// As [`worker`], waiting at most `wait` seconds for a session another worker holds.
pub async fn worker_waiting(
    url: &str,
    repo: &std::path::Path,
    id: &str,
    ttl: &str,
    wait: &str,
) -> (SpawnedWorker, Client) {
    worker_with(url, repo, id, ttl, wait, &[]).await
}

/// As [`worker_waiting`], with `extra` arguments.
pub async fn worker_with(
    url: &str,
    repo: &std::path::Path,
    id: &str,
    ttl: &str,
    wait: &str,
    extra: &[&str],
) -> (SpawnedWorker, Client) {
    let mut args: Vec<&OsStr> = vec![
        "--backend".as_ref(),
        "cpu".as_ref(),
        "--kv-cache-memory".as_ref(),
        "32MiB".as_ref(),
        "--model-repository".as_ref(),
        repo.as_os_str(),
        "--session-store".as_ref(),
        url.as_ref(),
        "--worker-id".as_ref(),
        id.as_ref(),
        "--session-lease-ttl".as_ref(),
        ttl.as_ref(),
        "--session-handoff-wait".as_ref(),
        wait.as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    super::spawn_worker(&args, &[]).await
}

/// A `neuron_worker_session_lease_*` value of the worker whose metrics are at `addr`.
pub async fn lease(addr: &str, name: &str) -> f64 {
    let text = super::http_get(addr, "/metrics").await;
    let prefix = format!("neuron_worker_session_lease_{name} ");
    let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix} missing:\n{text}"));
    line[prefix.len()..].trim().parse().expect("a number")
}

/// Polls `lease(addr, name) >= at_least` until `within`.
pub async fn wait_lease(addr: &str, name: &str, at_least: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let v = lease(addr, name).await;
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {v} (wanted {at_least}) for {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One turn of session `id` on `c`; checked against a stateless request over the whole history.
pub async fn turn(c: &mut Client, history: &mut Vec<u32>, id: u64, n: u64, start: bool) -> Vec<u32> {
    let msg = message(n, 9, VOCAB);
    let (ids, _) = generate(c, with_session(ids_request(&msg, SEEDED), id, start, false))
        .await
        .unwrap_or_else(|e| panic!("turn {n} of session {id}: {e}"));
    history.extend(&msg);
    let (stateless, _) = generate(c, ids_request(history, SEEDED)).await.expect("stateless");
    assert_eq!(ids, stateless, "turn {n} of session {id} continues exactly as on one worker");
    history.extend(&ids);
    ids
}

/// Pauses the Redis server (SIGSTOP) until dropped (SIGCONT): connections stay open, nothing is
/// answered — a store that is unreachable without losing its data.
pub struct Paused(pub u32);

pub fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("a pid");
    // SAFETY: kill(2) with the pid of a child this test started and still owns (a redis-server,
    // reaped only when the RedisServer is dropped, after every Paused guard; or a worker process,
    // reaped by its SpawnedWorker).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

impl Paused {
    pub fn new(pid: u32) -> Paused {
        signal(pid, libc::SIGSTOP);
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}
