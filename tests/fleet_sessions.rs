//! A fleet on one shared store: a real `redis-server` started by the test on 127.0.0.1 and worker
//! *processes* (the worker binary) with session leases. A conversation moving between live
//! workers, a holder killed with SIGKILL, two workers racing for one session and a store that stops
//! answering: every acknowledged turn equals a stateless request over the whole token history (the
//! continuation is exact), and no session is ever continued by two workers at once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::fleet::*;
use common::gen_sessions::*;
use common::generative::gqa_repository;

/// The tests share two cores with everything else: one at a time, so lease timings hold.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_moves_between_three_live_workers_exactly() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "2").await;
    let (b, mut cb) = worker(&redis.url, repo.path(), "worker-b", "2").await;
    let (c, mut cc) = worker(&redis.url, repo.path(), "worker-c", "2").await;
    let mut history = Vec::new();
    turn(&mut ca, &mut history, 7, 100, true).await;
    turn(&mut cb, &mut history, 7, 101, false).await;
    turn(&mut cc, &mut history, 7, 102, false).await;
    turn(&mut ca, &mut history, 7, 103, false).await;
    turn(&mut cb, &mut history, 7, 104, false).await;
    // Each move was a hand-off by a live holder, well before any lease could expire.
    assert_eq!(lease(&a.metrics, "handed_over_total").await, 2.0);
    assert_eq!(lease(&b.metrics, "handed_over_total").await, 1.0);
    assert_eq!(lease(&c.metrics, "handed_over_total").await, 1.0);
    assert_eq!(lease(&b.metrics, "held").await, 1.0, "B holds the session now");
    assert_eq!(lease(&a.metrics, "held").await + lease(&c.metrics, "held").await, 0.0);
    // The holder wrote the K/V when it handed over: the taker reused them.
    let from_kv = lease(&b.metrics, "restored_kv_total").await + lease(&c.metrics, "restored_kv_total").await;
    assert_eq!(from_kv + lease(&a.metrics, "restored_kv_total").await, 4.0, "every taker reused the K/V");
    assert_eq!(lease(&a.metrics, "writes_through_total").await, 2.0, "one write-through per turn");
    let (mut n, mut secs) = (0.0, 0.0);
    for w in [&a, &b, &c] {
        n += lease(&w.metrics, "writes_through_total").await;
        secs += lease(&w.metrics, "write_through_seconds_total").await;
    }
    assert_eq!(n, 5.0, "five turns, five writes through");
    eprintln!("write-through: {n} turns, mean {:.3} ms (debug build, loopback redis-server)", secs / n * 1e3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_holder_is_taken_over_after_the_lease_ttl_from_kv_or_from_tokens() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (mut a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "1.5").await;
    let (mut b, mut cb) = worker(&redis.url, repo.path(), "worker-b", "1.5").await;
    let (c, mut cc) = worker(&redis.url, repo.path(), "worker-c", "1.5").await;

    // Session 7 on A; its K/V written behind; A is killed; B continues from the K/V.
    let mut h7 = Vec::new();
    turn(&mut ca, &mut h7, 7, 200, true).await;
    turn(&mut ca, &mut h7, 7, 201, false).await;
    wait_lease(&a.metrics, "kv_written_total", 2.0, Duration::from_secs(10)).await;
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reaped");
    let killed = Instant::now();
    turn(&mut cb, &mut h7, 7, 202, false).await;
    assert!(killed.elapsed() >= Duration::from_millis(900), "taken over only once the lease expired");
    assert_eq!(lease(&b.metrics, "restored_kv_total").await, 1.0, "B continued from the K/V A wrote behind");
    assert_eq!(lease(&b.metrics, "restored_tokens_total").await, 0.0);

    // Session 8 on B; its K/V deleted from the store; B is killed; C recomputes from the tokens.
    let mut h8 = Vec::new();
    turn(&mut cb, &mut h8, 8, 300, true).await;
    wait_lease(&b.metrics, "kv_written_total", 1.0, Duration::from_secs(10)).await;
    let client = redis::Client::open(redis.url.as_str()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let deleted: i64 = redis::cmd("DEL").arg("neuron-worker:kvb:gqa\u{1f}1\u{1f}u:8").query(&mut conn).expect("DEL");
    assert_eq!(deleted, 1, "the K/V of session 8 were in the store");
    b.child.kill().expect("SIGKILL");
    b.child.wait().expect("reaped");
    turn(&mut cc, &mut h8, 8, 301, false).await;
    assert_eq!(lease(&c.metrics, "restored_tokens_total").await, 1.0, "C recomputed the K/V from the tokens");
    assert_eq!(lease(&c.metrics, "restored_kv_total").await, 0.0);
    turn(&mut cc, &mut h8, 8, 302, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_racing_for_one_session_continue_it_one_at_a_time() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (_a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "2").await;
    let (_b, cb) = worker(&redis.url, repo.path(), "worker-b", "2").await;
    let (_c, cc) = worker(&redis.url, repo.path(), "worker-c", "2").await;
    let mut history = Vec::new();
    turn(&mut ca, &mut history, 9, 400, true).await;
    let (mb, mc) = (message(401, 9, VOCAB), message(402, 9, VOCAB));
    let send = |mut c: Client, m: Vec<u32>| {
        tokio::spawn(async move { generate(&mut c, with_session(ids_request(&m, SEEDED), 9, false, false)).await })
    };
    let (tb, tc) = (send(cb, mb.clone()), send(cc, mc.clone()));
    let (rb, rc) = (tb.await.expect("task"), tc.await.expect("task"));
    let stateless = |h: Vec<u32>| {
        let mut c = ca.clone();
        async move { generate(&mut c, ids_request(&h, SEEDED)).await.expect("stateless").0 }
    };
    let after = |first: &[u32], out: &[u32]| [history.as_slice(), first, out].concat();
    match (rb, rc) {
        (Ok((ob, _)), Ok((oc, _))) => {
            // Both continued, one after the other (the second waited for the hand-off).
            if ob == stateless(after(&mb, &[])).await {
                assert_eq!(oc, stateless([after(&mb, &ob), mc.clone()].concat()).await, "C continued after B");
            } else {
                assert_eq!(oc, stateless(after(&mc, &[])).await, "one of them continued first");
                assert_eq!(ob, stateless([after(&mc, &oc), mb.clone()].concat()).await, "B continued after C");
            }
        }
        (Ok((o, _)), Err(e)) | (Err(e), Ok((o, _))) => {
            assert!(e.contains("held by worker worker-"), "the other is told who holds it: {e}");
            let m = if o == stateless(after(&mb, &[])).await { &mb } else { &mc };
            assert_eq!(o, stateless(after(m, &[])).await, "the one that continued did so exactly");
        }
        (Err(x), Err(y)) => panic!("neither continued: {x} / {y}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_serves_resident_sessions_until_their_lease_expires_and_loses_nothing_acknowledged() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "3").await;
    let (_b, mut cb) = worker(&redis.url, repo.path(), "worker-b", "3").await;
    let mut history = Vec::new();
    turn(&mut ca, &mut history, 10, 500, true).await;

    // A short gap: the turn's write-through is retried and lands once the store answers again.
    let paused = Paused::new(redis.pid());
    let msg = message(501, 9, VOCAB);
    let mut c = ca.clone();
    let req = with_session(ids_request(&msg, SEEDED), 10, false, false);
    let pending = tokio::spawn(async move { generate(&mut c, req).await });
    wait_lease(&a.metrics, "write_retries_total", 1.0, Duration::from_secs(10)).await;
    drop(paused);
    let (ids, _) = pending.await.expect("task").expect("the turn is acknowledged once the store is back");
    history.extend(&msg);
    let (stateless, _) = generate(&mut ca, ids_request(&history, SEEDED)).await.expect("stateless");
    assert_eq!(ids, stateless);
    history.extend(&ids);

    // A long gap: the turn is refused once the lease would expire, the next one at once.
    let paused = Paused::new(redis.pid());
    let lost = message(502, 9, VOCAB);
    let e = generate(&mut ca, with_session(ids_request(&lost, SEEDED), 10, false, false)).await.unwrap_err();
    assert!(e.contains("not kept") && e.contains("lease"), "{e}");
    let e = generate(&mut ca, with_session(ids_request(&lost, SEEDED), 10, false, false)).await.unwrap_err();
    assert!(e.contains("unreachable"), "{e}");
    let e = generate(&mut cb, with_session(ids_request(&lost, SEEDED), 11, true, false)).await.unwrap_err();
    assert!(e.contains("unreachable"), "a new session is refused: {e}");
    let health = common::capacity(&a.metrics).await;
    assert_eq!(health["session_leases"]["store_reachable"], false, "{health}");
    assert!(lease(&a.metrics, "store_unreachable_seconds").await > 0.0);
    assert!(lease(&a.metrics, "writes_failed_total").await >= 1.0);
    drop(paused);

    // Back: every acknowledged turn is there; B continues (A's lease expired in the store).
    turn(&mut cb, &mut history, 10, 503, false).await;
    assert_eq!(lease(&a.metrics, "held").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_holder_does_not_hand_it_over_is_answered_409_naming_the_holder() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (mut a, _) = worker(&redis.url, repo.path(), "worker-a", "30").await;
    let (b, _) = worker_waiting(&redis.url, repo.path(), "worker-b", "30", "0.3").await;
    let post = |addr: &str| {
        let addr: std::net::SocketAddr = addr.parse().expect("address");
        let body = serde_json::json!({ "input_ids": [5, 6, 7], "parameters": { "max_tokens": 3, "temperature": 0 } });
        async move {
            common::http::send(
                addr,
                "POST",
                "/v2/models/gqa/generate",
                &[("content-type", "application/json"), ("x-session-id", "held-1")],
                body.to_string().into_bytes(),
            )
            .await
        }
    };
    let r = post(&a.http).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A stops answering (killed) while its lease has 30 s to go: B waits 0.3 s, then names A.
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reaped");
    let r = post(&b.http).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.header("x-session-holder"), Some("worker-a"));
    assert!(r.text().contains("held by worker worker-a"), "{}", r.text());
    assert!(lease(&b.metrics, "handoff_requests_total").await >= 1.0);
}

#[test]
fn a_stale_holders_writes_are_fenced_off_once_another_worker_took_the_lease() {
    use neuron_worker::sessions::lease::{LeaseConfig, LeaseError, Leases, RECORD_PREFIX};
    use std::sync::Arc;
    let Some(redis) = common::redis::start() else { return };
    let cfg = |worker: &str| LeaseConfig {
        worker: worker.into(),
        ttl: Duration::from_secs(10),
        handoff_wait: Duration::from_secs(1),
    };
    let a = Leases::start(&redis.url, cfg("worker-a")).expect("leases A");
    let b = Leases::start(&redis.url, cfg("worker-b")).expect("leases B");
    let none = || -> Arc<dyn Fn() + Send + Sync> { Arc::new(|| {}) };
    let token_a = a.try_acquire("m\u{1f}1\u{1f}u:1", "1", none()).expect("A takes the free lease");
    match b.try_acquire("m\u{1f}1\u{1f}u:1", "1", none()) {
        Err(LeaseError::Held { holder, .. }) => assert_eq!(holder, "worker-a"),
        other => panic!("B must be told A holds it: {other:?}"),
    }
    assert!(a.write_fenced("m\u{1f}1\u{1f}u:1", token_a, RECORD_PREFIX, b"turn 1 by A").expect("written"));
    // A's lease expires in the store (A paused past its TTL): deleted here to make it so now.
    let client = redis::Client::open(redis.url.as_str()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let _: i64 = redis::cmd("DEL").arg("neuron-worker:lease:m\u{1f}1\u{1f}u:1").query(&mut conn).expect("DEL");
    let token_b = b.try_acquire("m\u{1f}1\u{1f}u:1", "1", none()).expect("B takes it over");
    assert!(token_b > token_a, "fencing tokens grow: {token_a} then {token_b}");
    // A wakes up and writes with its old token: refused; B's writes land.
    assert!(!a.write_fenced("m\u{1f}1\u{1f}u:1", token_a, RECORD_PREFIX, b"turn 2 by A").expect("answered"));
    assert!(b.write_fenced("m\u{1f}1\u{1f}u:1", token_b, RECORD_PREFIX, b"turn 2 by B").expect("written"));
    let record: Vec<u8> =
        redis::cmd("GET").arg("neuron-worker:session:m\u{1f}1\u{1f}u:1").query(&mut conn).expect("GET");
    assert_eq!(record, b"turn 2 by B");
    assert!(matches!(a.check("m\u{1f}1\u{1f}u:1", "1"), Err(LeaseError::Lost { .. })), "A knows it lost the lease");
    assert_eq!(a.stats.fenced_off.load(std::sync::atomic::Ordering::Relaxed), 1);
}
