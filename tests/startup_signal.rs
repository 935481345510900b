//! SIGTERM while the worker is still loading its models: a clean stop with a log line and exit 0
//! (it used to die by the signal, silently); and a log written to a pipe carries no colour codes.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bert_fixture::{generate, write_checkpoint};
use safetensors::Dtype;

#[test]
fn sigterm_during_loading_stops_cleanly_and_logs_are_plain_text() {
    let repo = tempfile::tempdir().expect("tmp");
    // Enough models that loading is still going on when the signal arrives.
    let w = generate(11);
    for k in 0..40 {
        let dir = repo.path().join(format!("m{k:02}/1"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        write_checkpoint(&dir, &w, Dtype::F32, "", true);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_neuron-worker"))
        .arg("serve")
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .arg("--model-repository")
        .arg(repo.path())
        .args(["--backend", "cpu"])
        .env("RUST_LOG", "info")
        .env_remove("NEURON_WORKER_AUTH_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the worker starts");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).expect("read log") > 0, "the worker ended early: {log}");
        log.push_str(&line);
        if line.contains("backend selected") {
            break;
        }
        assert!(Instant::now() < deadline, "no 'backend selected' line: {log}");
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    stderr.read_to_string(&mut log).expect("read the rest of the log");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "status {status:?}; log:\n{log}");
    assert!(log.contains("signal received"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log written to a pipe:\n{log}");
}
