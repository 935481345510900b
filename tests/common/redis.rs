//! A real `redis-server` (or `valkey-server`) for tests: started on a free 127.0.0.1 port with a
//! temporary folder, stopped when dropped. Tests that need it fail with a clear message when no
//! server binary is installed (`apt-get install redis-server`; `.ci/run` installs it), unless
//! `NEURON_WORKER_SKIP_REDIS_TESTS=1` says to skip them.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Redis server.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:<port>/0`.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// The server's process id (tests pause it with SIGSTOP to simulate an unreachable store).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> Option<&'static str> {
    ["redis-server", "valkey-server"].into_iter().find(|b| {
        Command::new(b).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    })
}

/// Starts a server, or `None` when the tests are told to skip; panics when no binary is found.
pub fn start() -> Option<RedisServer> {
    let Some(bin) = binary() else {
        if std::env::var("NEURON_WORKER_SKIP_REDIS_TESTS").is_ok_and(|v| v == "1") {
            eprintln!("SKIPPED: no redis-server or valkey-server (NEURON_WORKER_SKIP_REDIS_TESTS=1)");
            return None;
        }
        panic!(
            "this test needs a real redis-server or valkey-server on PATH: apt-get install redis-server \
             (or set NEURON_WORKER_SKIP_REDIS_TESTS=1 to skip the Redis tests)"
        );
    };
    // A probe that only connects can be fooled: a connect loop to a free port in the ephemeral
    // range can connect to itself (TCP simultaneous open), which holds the port so the server
    // cannot bind it and exits. So the server must answer PING, and a server that exited is
    // started again on another port.
    for _attempt in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = super::free_port();
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let t = Instant::now();
        loop {
            if child.try_wait().expect("redis-server status").is_some() {
                break; // it exited (port taken): next attempt
            }
            if answers_as(port, child.id()) {
                return Some(RedisServer { child, url: format!("redis://127.0.0.1:{port}/0"), _dir: dir });
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not answer PING on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("redis-server exited right after start five times in a row (ports taken?)");
}

/// Whether the Redis server on `port` answers and is the process `pid` (another test's server
/// that took the same port first would answer too).
fn answers_as(port: u16, pid: u32) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    if s.local_addr().ok() == s.peer_addr().ok() {
        return false; // connected to itself
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"INFO server\r\n").is_err() {
        return false;
    }
    let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
    let want = format!("\r\nprocess_id:{pid}\r\n");
    while let Ok(n @ 1..) = s.read(&mut buf) {
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if text.contains(&want) {
            return true;
        }
        if text.contains("\r\nprocess_id:") && text.contains("\r\nrun_id:") {
            return false; // another server
        }
    }
    false
}
