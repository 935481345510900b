//! Draining never loses an idle session: from the moment the worker starts draining, idle
//! sequences stop expiring and are saved to the store, so neither work still in flight for longer
//! than `max_sequence_idle_microseconds` nor an exit deadline that cuts the drain short loses them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sequences::*;
use common::*;
use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::sessions::{SequenceId, SessionStore};

/// A worker over `accumulate` (batches of 2; a lone request waits 3 s for a partner; sequences
/// expire after 300 ms idle) with the session store `store`.
async fn worker(repo_dir: &Path, store: Arc<SessionStore>, exit_timeout: Duration) -> TestWorker {
    let repo = Repository::new(Some(repo_dir.to_path_buf()), BackendSelection::Cpu, ModelControlMode::None)
        .with_session_store(Some(store));
    let repo = Arc::new(repo);
    repo.load_all().await.expect("repository loads");
    let opts = neuron_worker::server::ServeOptions { exit_timeout, ..options() };
    let server = neuron_worker::server::start(opts, repo.clone()).await.expect("server starts");
    TestWorker { server, repo }
}

/// Starts sequences 1..=4 (two batches of two), then leaves a START of sequence 5 waiting 3 s in
/// the queue, and starts draining once it waits.
async fn start_four_idle_and_one_waiting(w: &TestWorker) -> tokio::task::JoinHandle<Result<i32, tonic::Status>> {
    for pair in [[1u64, 2], [3, 4]] {
        let (mut a, mut b) = (w.client().await, w.client().await);
        let (ida, idb) = (SequenceId::Uint(pair[0]), SequenceId::Uint(pair[1]));
        let (x, y) = tokio::join!(
            acc(&mut a, &ida, 10 * pair[0] as i32, true, false),
            acc(&mut b, &idb, 10 * pair[1] as i32, true, false)
        );
        assert_eq!((x.expect("step"), y.expect("step")), (10 * pair[0] as i32, 10 * pair[1] as i32));
    }
    let mut c = w.client().await;
    let waiting = tokio::spawn(async move { acc(&mut c, &SequenceId::Uint(5), 50, true, false).await });
    let addr = w.server.metrics_addr.expect("metrics endpoint").to_string();
    let t = Instant::now();
    while capacity(&addr).await["models"][0]["queue_depth"] != 1 {
        assert!(t.elapsed() < Duration::from_secs(5), "sequence 5 never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    w.server.shutdown.cancel();
    waiting
}

fn stored(store: &SessionStore) -> Vec<(SequenceId, u64)> {
    let (found, skipped) = store.list("accumulate", 1).expect("store lists");
    assert!(skipped.is_empty(), "{skipped:?}");
    let mut ids: Vec<(SequenceId, u64)> = found.into_iter().map(|s| (s.id, s.steps)).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_idle_while_the_drain_waits_for_work_in_flight_are_not_expired_but_stored() {
    let (repo, dir) = (accumulate_repo(2, 3_000_000, 300_000), tempfile::tempdir().expect("tempdir"));
    let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
    let w = worker(repo.path(), store.clone(), Duration::from_secs(20)).await;
    let waiting = start_four_idle_and_one_waiting(&w).await;
    // The drain waits ~3 s for sequence 5, ten times the idle timeout of the others.
    assert_eq!(waiting.await.expect("joins").expect("accepted before the drain, answered"), 50);
    w.server.wait().await.expect("drains cleanly");
    let all: Vec<(SequenceId, u64)> = (1..=5).map(|i| (SequenceId::Uint(i), 1)).collect();
    assert_eq!(stored(&store), all, "every session is in the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_idle_at_the_start_of_a_drain_are_stored_even_when_the_exit_deadline_passes() {
    let (repo, dir) = (accumulate_repo(2, 3_000_000, 300_000), tempfile::tempdir().expect("tempdir"));
    let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
    let w = worker(repo.path(), store.clone(), Duration::from_millis(800)).await;
    let _waiting = start_four_idle_and_one_waiting(&w).await;
    let e = w.server.wait().await.expect_err("the exit deadline passes while sequence 5 waits");
    assert!(e.to_string().contains("exit"), "{e}");
    // Sequence 5 never ran a step (its START was still queued): only the four sessions are kept.
    let four: Vec<(SequenceId, u64)> = (1..=4).map(|i| (SequenceId::Uint(i), 1)).collect();
    assert_eq!(stored(&store), four);
}
