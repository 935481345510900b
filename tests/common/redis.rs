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
    let dir = tempfile::tempdir().expect("temp dir");
    let port = super::free_port();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "redis-server did not listen on {port} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(RedisServer { child, url: format!("redis://127.0.0.1:{port}/0"), _dir: dir })
}
