//! Writes through on a shared store, with real worker processes and a real `redis-server`: a
//! store that stops answering (SIGSTOP) delays only the turns waiting for their write, never the
//! other streams of the instance; a session's next turn waits for its previous turn's write; a
//! turn arriving while another worker holds the session is answered UNAVAILABLE naming the holder
//! in the gRPC metadata.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::time::{Duration, Instant};

use common::fleet::*;
use common::gen_sessions::*;
use common::generative::gqa_repository;
use tokio_stream::StreamExt;

/// The tests share two cores with everything else: one at a time, so lease timings hold.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A stateless greedy generation of 40 tokens.
const LONG: &str = r#"{"max_tokens": 40, "temperature": 0, "ignore_eos": true}"#;

/// Streams `req`: its token ids, the whole time, and the longest wait between two responses.
async fn streamed(
    c: &mut Client,
    req: neuron_worker::proto::inference::ModelInferRequest,
) -> (Vec<u32>, Duration, Duration) {
    let started = Instant::now();
    let mut stream = c.model_stream_infer(tokio_stream::iter(vec![req])).await.expect("stream opens").into_inner();
    let (mut ids, mut last, mut gap) = (Vec::new(), started, Duration::ZERO);
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("a response within 60 s")
            .expect("stream open")
            .expect("no stream error");
        assert!(msg.error_message.is_empty(), "{}", msg.error_message);
        let now = Instant::now();
        gap = gap.max(now - last);
        last = now;
        let r = msg.infer_response.expect("response");
        let get = |name: &str| {
            r.outputs.iter().position(|o| o.name == name).map(|i| r.raw_output_contents[i].clone()).unwrap_or_default()
        };
        ids.extend(get("output_ids").chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32));
        if common::generative::is_final(&r) {
            return (ids, started.elapsed(), gap);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_delays_only_the_turns_writing_through_not_the_other_streams_of_the_instance() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "8").await;
    let mut history = Vec::new();
    turn(&mut ca, &mut history, 10, 500, true).await;
    let (_, base, base_gap) = streamed(&mut ca, ids_request(&message(600, 9, VOCAB), LONG)).await;

    // The store stops answering; a turn of session 10 finishes and waits for its write through,
    // and the session's next turn queues behind it.
    let paused = Paused::new(redis.pid());
    let (m1, m2) = (message(501, 9, VOCAB), message(502, 9, VOCAB));
    let send = |m: Vec<u32>| {
        let mut c = ca.clone();
        tokio::spawn(async move { generate(&mut c, with_session(ids_request(&m, SEEDED), 10, false, false)).await })
    };
    let first = send(m1.clone());
    wait_lease(&a.metrics, "write_retries_total", 1.0, Duration::from_secs(10)).await;
    let second = send(m2.clone());

    // Meanwhile a stateless stream on the same worker (one instance) gets its tokens at the pace
    // it had before the outage.
    let (ids, during, gap) = streamed(&mut ca, ids_request(&message(601, 9, VOCAB), LONG)).await;
    assert_eq!(ids.len(), 40);
    assert!(!first.is_finished() && !second.is_finished(), "the session's turns still wait for the store");
    eprintln!(
        "stateless 40 tokens: {base:?} (longest gap {base_gap:?}) before, {during:?} ({gap:?}) during the outage"
    );
    let bound = base * 4 + Duration::from_millis(800);
    assert!(during < bound, "40 tokens took {during:?} during the outage, {base:?} before: the instance stalled");
    assert!(gap < base_gap * 4 + Duration::from_millis(500), "a {gap:?} gap between tokens (before: {base_gap:?})");
    assert_eq!(lease(&a.metrics, "writes_through_total").await, 1.0, "only the first turn was acknowledged");

    // The store is back: the first turn is acknowledged, then the second continues after it.
    drop(paused);
    let (o1, _) = first.await.expect("task").expect("the first turn is acknowledged once the store is back");
    let (o2, _) = second.await.expect("task").expect("the second turn too");
    history.extend(&m1);
    let (stateless, _) = generate(&mut ca, ids_request(&history, SEEDED)).await.expect("stateless");
    assert_eq!(o1, stateless, "the first turn continues the session exactly");
    history.extend(&o1);
    history.extend(&m2);
    let (stateless, _) = generate(&mut ca, ids_request(&history, SEEDED)).await.expect("stateless");
    assert_eq!(o2, stateless, "the second turn ran after the first was written through");
    assert_eq!(lease(&a.metrics, "writes_through_total").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_turn_during_another_workers_turn_is_unavailable_with_the_holder_in_the_metadata() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let (a, mut ca) = tiny_worker(&redis.url, "worker-a", "10", "8").await;
    let (b, mut cb) = tiny_worker(&redis.url, "worker-b", "10", "0.3").await;
    let greedy = r#"{"max_tokens": 6, "temperature": 0, "ignore_eos": true}"#;
    generate(&mut ca, with_session(tiny(&message(700, 5, 256), greedy), 12, true, false)).await.expect("turn 1");
    // A long turn of session 12 runs on A (streamed, so its first tokens show it is in flight).
    let endless = r#"{"max_tokens": 30000, "temperature": 0, "ignore_eos": true}"#;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(with_session(tiny(&message(701, 5, 256), endless), 12, false, false)).await.expect("send");
    let mut running =
        ca.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let first = running.next().await.expect("a delta").expect("ok");
    assert!(first.error_message.is_empty(), "{}", first.error_message);

    // A unary turn of session 12 reaches B: A is asked to hand it over, cannot (its turn is in
    // flight), and after B's 0.3 s wait the answer names A.
    let mut unary = with_session(tiny(&message(702, 5, 256), greedy), 12, false, false);
    unary.raw_input_contents[2] = vec![0].into(); // stream: false
    let t = Instant::now();
    let status = cb.model_infer(unary).await.expect_err("B does not continue a session A is continuing");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let holder = status.metadata().get("x-session-holder").and_then(|v| v.to_str().ok());
    assert_eq!(holder, Some("worker-a"), "{status:?}");
    assert!(status.message().contains("held by worker worker-a"), "{}", status.message());
    assert!(t.elapsed() >= Duration::from_millis(300), "B waited for a hand-off first");
    assert!(lease(&b.metrics, "handoff_requests_total").await >= 1.0);
    assert_eq!(lease(&a.metrics, "handed_over_total").await, 0.0, "A did not hand over during its turn");
    drop(tx);
    drop(running);
}

/// A worker process serving the built-in `tiny_decoder` (context 32768: a turn can run for as
/// long as a test needs) on the store `url`, exit timeout `exit` seconds.
/// It waits at most `wait` seconds for a session another worker holds.
async fn tiny_worker(url: &str, id: &str, exit: &str, wait: &str) -> (common::SpawnedWorker, Client) {
    let args = [
        "--backend",
        "cpu",
        "--session-store",
        url,
        "--worker-id",
        id,
        "--session-lease-ttl",
        "30",
        "--session-handoff-wait",
        wait,
        "--exit-timeout",
        exit,
    ];
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    common::spawn_worker(&args, &[]).await
}

/// A `tiny_decoder` request over token ids, asking for the finish reason too.
fn tiny(ids: &[u32], params: &str) -> neuron_worker::proto::inference::ModelInferRequest {
    let mut r = ids_request(ids, params);
    r.model_name = "tiny_decoder".into();
    r.inputs.push(neuron_worker::proto::inference::model_infer_request::InferInputTensor {
        name: "return_finish_reason".into(),
        datatype: "BOOL".into(),
        shape: vec![1],
        ..Default::default()
    });
    r.raw_input_contents.push(vec![1].into());
    r
}

/// Streams an endless turn of session `id` (`start`: START) on `c`, sends SIGTERM to `w` once it runs,
/// and returns the ids streamed and how the stream ended: the finish reason of a last response,
/// or an error.
async fn cut_at_exit(
    c: &mut Client,
    w: &common::SpawnedWorker,
    id: u64,
    msg: &[u32],
    start: bool,
) -> (Vec<u32>, Result<String, String>) {
    let endless = r#"{"max_tokens": 30000, "temperature": 0, "ignore_eos": true}"#;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(with_session(tiny(msg, endless), id, start, false)).await.expect("send");
    let mut stream =
        c.model_stream_infer(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let mut ids = Vec::new();
    let mut terminated = false;
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(30), stream.next()).await.expect("an answer") {
            Some(Ok(m)) => m,
            Some(Err(status)) => return (ids, Err(format!("stream error: {status}"))),
            None => return (ids, Err("the stream ended without a last response".into())),
        };
        if !msg.error_message.is_empty() {
            return (ids, Err(msg.error_message));
        }
        let r = msg.infer_response.expect("response");
        let get = |name: &str| {
            r.outputs.iter().position(|o| o.name == name).map(|i| r.raw_output_contents[i].to_vec()).unwrap_or_default()
        };
        ids.extend(get("output_ids").chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32));
        if common::generative::is_final(&r) {
            let f = get("finish_reason");
            return (ids, Ok(String::from_utf8_lossy(f.get(4..).unwrap_or_default()).into_owned()));
        }
        if !terminated {
            signal(w.child.id(), libc::SIGTERM);
            terminated = true;
        }
    }
}

/// The next turn of session `id` on `c` (greedy, 6 tokens) and the same over `history` stateless.
async fn next_turn(c: &mut Client, id: u64, history: &[u32], msg: &[u32]) -> (Vec<u32>, Vec<u32>) {
    let greedy = r#"{"max_tokens": 6, "temperature": 0, "ignore_eos": true}"#;
    let (out, _) = generate(c, with_session(tiny(msg, greedy), id, false, false)).await.expect("the session continues");
    let (stateless, _) = generate(c, tiny(&[history, msg].concat(), greedy)).await.expect("stateless");
    (out, stateless)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_cut_short_at_the_exit_deadline_is_answered_only_after_its_write_through() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let (_b, mut cb) = tiny_worker(&redis.url, "worker-b", "10", "8").await;
    let msg = |n: u64| message(n, 5, 256);

    // Store up: the cut-short turn is written through, then answered (finish reason abort); B
    // continues after it.
    let (mut a1, mut ca1) = tiny_worker(&redis.url, "worker-a1", "10", "8").await;
    let (ids, last) = cut_at_exit(&mut ca1, &a1, 14, &msg(800), true).await;
    assert_eq!(last.as_deref(), Ok("abort"), "the cut-short turn is acknowledged");
    assert!(ids.len() > 1, "{} tokens before the cut", ids.len());
    assert!(a1.child.wait().expect("exits").success(), "worker-a1 drains cleanly");
    let (out, stateless) = next_turn(&mut cb, 14, &[msg(800), ids].concat(), &msg(801)).await;
    assert_eq!(out, stateless, "B continues after the cut-short turn, exactly");

    // Store stopped at the exit deadline: the turn is not acknowledged, and the answer says why.
    let (mut a2, mut ca2) = tiny_worker(&redis.url, "worker-a2", "10", "8").await;
    let greedy = r#"{"max_tokens": 6, "temperature": 0, "ignore_eos": true}"#;
    let (first, _) = generate(&mut ca2, with_session(tiny(&msg(899), greedy), 15, true, false)).await.expect("turn 1");
    let paused = Paused::new(redis.pid());
    let (ids, last) = cut_at_exit(&mut ca2, &a2, 15, &msg(900), false).await;
    let e = last.expect_err("a turn whose tokens the store did not confirm is not acknowledged");
    assert!(e.contains("exiting") && e.contains("not acknowledged"), "{e}");
    let _ = a2.child.wait();
    drop(paused);
    // A2 exited holding the lease (its release may not have reached the stopped store): expired
    // here rather than after its 30 s TTL. The store may still apply the write A2 sent (the
    // client was told so): B continues exactly from that turn or from the one before.
    let client = redis::Client::open(redis.url.as_str()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let _: i64 =
        redis::cmd("DEL").arg("neuron-worker:lease:tiny_decoder\u{1f}1\u{1f}u:15").query(&mut conn).expect("DEL");
    let (out, _) =
        generate(&mut cb, with_session(tiny(&msg(901), greedy), 15, false, false)).await.expect("B continues 15");
    let before = [msg(899), first, msg(901)].concat();
    let after = [&before[..before.len() - 5], &msg(900), &ids, &msg(901)].concat();
    let (sb, _) = generate(&mut cb, tiny(&before, greedy)).await.expect("stateless");
    let (sa, _) = generate(&mut cb, tiny(&after, greedy)).await.expect("stateless");
    assert!(out == sb || out == sa, "session 15 continues exactly from a turn the store holds");
}

/// The K/V pieces the store holds for session `id` of `gqa`: (block index, bytes).
fn kv_pieces(conn: &mut redis::Connection, id: u64) -> Vec<(usize, usize)> {
    let key = format!("neuron-worker:kvb:gqa\u{1f}1\u{1f}u:{id}");
    let fields: Vec<String> = redis::cmd("HKEYS").arg(&key).query(conn).expect("HKEYS");
    let mut out: Vec<(usize, usize)> = fields
        .iter()
        .map(|f| {
            (f.parse().expect("a block index"), redis::cmd("HSTRLEN").arg(&key).arg(f).query(conn).expect("HSTRLEN"))
        })
        .collect();
    out.sort_unstable();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_are_written_behind_incrementally_and_a_taker_continues_from_the_assembled_pieces() {
    let _one = SERIAL.lock().await;
    let Some(redis) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let (mut a, mut ca) = worker(&redis.url, repo.path(), "worker-a", "1.5").await;
    let (b, mut cb) = worker(&redis.url, repo.path(), "worker-b", "1.5").await;
    let client = redis::Client::open(redis.url.as_str()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");

    // Six turns of 15 new tokens each (9 in, 6 out): the bytes written per turn stay those of the
    // blocks holding new positions, while the K/V held grow with the history.
    let mut history = Vec::new();
    let (mut written, mut per_turn, mut held) = (0.0, Vec::new(), Vec::new());
    for n in 0..6u64 {
        turn(&mut ca, &mut history, 20, 1000 + n, n == 0).await;
        wait_lease(&a.metrics, "kv_written_total", (n + 1) as f64, Duration::from_secs(10)).await;
        let now = lease(&a.metrics, "kv_bytes_written_total").await;
        per_turn.push(now - written);
        written = now;
        let pieces = kv_pieces(&mut conn, 20);
        held.push(pieces.iter().map(|p| p.1).sum::<usize>() as f64);
        // Block i of the pieces covers positions up to the history (the last token has no K/V yet).
        assert_eq!(pieces.iter().map(|p| p.0).collect::<Vec<_>>(), (0..pieces.len()).collect::<Vec<_>>());
    }
    let piece = kv_pieces(&mut conn, 20)[0].1 as f64;
    eprintln!(
        "K/V bytes written per turn {per_turn:?}; K/V held after each turn {held:?} (a whole rewrite writes those); piece {piece} bytes; history {} tokens",
        history.len()
    );
    for (n, w) in per_turn.iter().enumerate().skip(1) {
        assert!(*w <= 2.0 * piece, "turn {n} wrote {w} K/V bytes: more than the two blocks its 15 positions touch");
    }
    assert!(held[5] >= 4.0 * piece, "the history spans several blocks: {held:?}");
    assert!(per_turn[5] * 2.0 < held[5], "the last turn wrote less than half of what a whole rewrite would");

    // A is killed; B takes the session over after the TTL and continues from the assembled K/V.
    a.child.kill().expect("SIGKILL");
    a.child.wait().expect("reaped");
    turn(&mut cb, &mut history, 20, 1010, false).await;
    assert_eq!(lease(&b.metrics, "restored_kv_total").await, 1.0, "B continued from the K/V pieces");
    assert_eq!(lease(&b.metrics, "restored_tokens_total").await, 0.0);
    turn(&mut cb, &mut history, 20, 1011, false).await;
}
