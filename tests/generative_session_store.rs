//! Generative sessions and the session store, over real gRPC on 127.0.0.1 (the HF fixture
//! `llama-gqa`): idle sessions whose blocks the pool needs are written to the store and come back
//! for their next turn, exactly; a drained worker writes every open session, and a worker started
//! on the same store continues them exactly, lists them, and exports one no instance holds.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::gen_sessions::*;
use common::generative::gqa_repository;
use neuron_worker::repository::ModelControlMode;
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::server::sessions::proto::{self as sp, ExportSessionRequest, ListSessionsRequest};
use neuron_worker::sessions::{SequenceId, SessionBlob, SessionStore};
use tokio_stream::StreamExt;

async fn sessions_client(w: &common::TestWorker) -> SessionsClient<tonic::transport::Channel> {
    SessionsClient::connect(format!("http://{}", w.server.grpc_addr)).await.expect("sessions client")
}

fn stored(store: &SessionStore) -> Vec<(SequenceId, u64)> {
    let (found, skipped) = store.list("gqa", 1).expect("store lists");
    assert!(skipped.is_empty(), "{skipped:?}");
    let mut ids: Vec<(SequenceId, u64)> = found.into_iter().map(|s| (s.id, s.steps)).collect();
    ids.sort();
    ids
}

/// 64 sessions over a pool that holds about 8 of them: every turn is answered, the idle
/// sessions' K/V go to the store and come back, and the outputs equal stateless requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_spill_to_the_store_and_come_back_exactly() {
    let repo = gqa_repository(r#"parameters { key: "kv_cache_memory" value: { string_value: "384KiB" } }"#);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
    let w = common::start_with_store(repo.path(), store.clone()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let greedy = r#"{"max_tokens": 4, "temperature": 0, "ignore_eos": true}"#;
    const SESSIONS: u64 = 64;
    let histories = concurrent_turns(&c, SESSIONS, 3, 2000, 20, 300, greedy).await;
    let spilled = metric(&metrics, "session_spilled_total").await;
    let restored = metric(&metrics, "session_restored_total").await;
    assert!(spilled > 0.0, "idle sessions went to the store");
    assert!(restored > 0.0, "sessions came back from the store ({spilled} spilled)");
    assert_eq!(metric(&metrics, "session_dropped_to_tokens_total").await, 0.0, "none dropped to tokens");
    assert_eq!(metric(&metrics, "session_store_failures_total").await, 0.0);
    let now_stored = metric(&metrics, "sessions_stored").await;
    assert!(now_stored > 0.0 && metric(&metrics, "session_kv_stored_bytes").await > 0.0);
    assert_eq!(now_stored as usize, stored(&store).len(), "the gauge counts what the store holds");
    for id in [0usize, 21, 42, 63] {
        let h = &histories[id];
        let stateless = generate(&mut c, ids_request(&h[..h.len() - 4], greedy)).await.unwrap();
        assert_eq!(stateless.0, h[h.len() - 4..], "session {id}: last turn equals the stateless run");
    }
    assert_eq!(metric(&metrics, "sessions_open").await, SESSIONS as f64);
    // The store's own metrics: every spill is a put, every restore a take, none failed, and
    // the latency histogram counts them all.
    let text = common::http_get(&metrics, "/metrics").await;
    let value = |line: &str| -> f64 {
        let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line} missing:\n{text}"));
        l.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
    };
    let puts = value("neuron_worker_session_store_operations_total{op=\"put\",result=\"ok\"}");
    let takes = value("neuron_worker_session_store_operations_total{op=\"take\",result=\"ok\"}");
    assert!(puts >= 1.0 && takes >= restored, "puts {puts}, takes {takes}, restored {restored}");
    assert_eq!(value("neuron_worker_session_store_operations_total{op=\"put\",result=\"error\"}"), 0.0);
    assert_eq!(value("neuron_worker_session_store_seconds_count{op=\"put\"}"), puts);
    assert_eq!(value("neuron_worker_session_store_io_failures_total"), 0.0);
    assert_eq!(value("neuron_worker_session_store_lost_sessions_total"), 0.0);
}

/// A worker drains: its sessions go to the store with their K/V. A worker started on the same
/// store lists them, continues one exactly (its K/V read back, not recomputed), and exports one
/// that no instance holds; an ended session leaves the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_drained_worker_continue_exactly_after_a_restart() {
    let repo = gqa_repository("");
    let dir = tempfile::tempdir().expect("tempdir");
    let seeded = r#"{"max_tokens": 6, "temperature": 0.9, "seed": 11, "ignore_eos": true}"#;
    let greedy = r#"{"max_tokens": 5, "temperature": 0, "ignore_eos": true}"#;
    let mut history: Vec<u32> = Vec::new();
    {
        let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
        let a = common::start_with_store(repo.path(), store.clone()).await;
        let mut c = a.client().await;
        for (turn, n) in [(0u64, 21usize), (1, 9)] {
            let msg = message(500 + turn, n, VOCAB);
            let (ids, _) =
                generate(&mut c, with_session(ids_request(&msg, seeded), 51, turn == 0, false)).await.unwrap();
            history.extend(&msg);
            history.extend(ids);
        }
        generate(&mut c, with_session(ids_request(&message(600, 7, VOCAB), greedy), 52, true, false)).await.unwrap();
        a.server.shutdown.cancel();
        a.server.wait().await.expect("drains cleanly");
        assert_eq!(stored(&store), vec![(SequenceId::Uint(51), 2), (SequenceId::Uint(52), 1)]);
        let blob = store.take("gqa", 1, &SequenceId::Uint(51)).expect("reads").expect("held");
        assert!(!blob.state[2].data.is_empty(), "its K/V were written, not only its tokens");
        store.put_all(&[blob]).expect("put back");
    }
    let store = Arc::new(SessionStore::open(dir.path()).expect("store re-opens"));
    let b = common::start_with_store(repo.path(), store.clone()).await;
    let metrics = b.server.metrics_addr.expect("metrics").to_string();
    let mut s = sessions_client(&b).await;
    let listed = s.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner();
    let mut seen: Vec<(Option<sp::SequenceId>, u64, String)> =
        listed.sessions.iter().map(|i| (i.sequence_id.clone(), i.steps, i.location.clone())).collect();
    seen.sort_by_key(|x| x.1);
    assert_eq!(seen.len(), 2, "both stored sessions are listed: {listed:?}");
    assert!(seen.iter().all(|x| x.2 == "SPILLED"), "listed as in the store: {seen:?}");
    // Turn 3 of session 51 on the new worker equals the stateless request over its history.
    let mut c = b.client().await;
    let third = message(502, 5, VOCAB);
    let kept = generate(&mut c, with_session(ids_request(&third, seeded), 51, false, false)).await.unwrap();
    assert_eq!(metric(&metrics, "session_restored_total").await, 1.0);
    // All history positions but the last generated token's came back from the store.
    assert_eq!(metric(&metrics, "prefix_cache_hit_tokens_total").await, (history.len() - 1) as f64);
    history.extend(&third);
    let stateless = generate(&mut c, ids_request(&history, seeded)).await.unwrap();
    assert_eq!(kept, stateless, "tokens and logprobs after the restart equal the stateless run");
    assert_eq!(stored(&store), vec![(SequenceId::Uint(52), 1)], "a continued session left the store");
    // Session 52 is held by no instance: exported straight from the store.
    let req = ExportSessionRequest {
        model: "gqa".into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(52)) }),
    };
    let blob = s.export_session(req).await.expect("export from the store").into_inner().blob;
    let blob = SessionBlob::decode(&blob).expect("decodes");
    assert_eq!((blob.id, blob.steps), (SequenceId::Uint(52), 1));
    assert!(stored(&store).is_empty(), "exported: the session left this worker");
    // Session 51 ends: nothing of it stays.
    generate(&mut c, with_session(ids_request(&[1, 2], greedy), 51, false, true)).await.unwrap();
    b.server.shutdown.cancel();
    b.server.wait().await.expect("drains cleanly");
    assert!(stored(&store).is_empty(), "an ended session is not written at drain");
}

/// A session larger than a message: the unary export refuses and keeps it; the streamed export
/// moves it in checked chunks to another worker, where it continues exactly; a damaged chunk is
/// refused and nothing is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_larger_than_a_message_moves_in_checked_chunks() {
    use neuron_worker::server::sessions::proto::SessionChunk;
    let repo = gqa_repository("");
    let opts = || neuron_worker::server::ServeOptions { max_message_size: 32 << 10, ..common::options() };
    let a = common::start_with(Some(repo.path().into()), ModelControlMode::None, opts()).await;
    let b = common::start_with(Some(repo.path().into()), ModelControlMode::None, opts()).await;
    let greedy = r#"{"max_tokens": 8, "temperature": 0, "ignore_eos": true}"#;
    let mut ca = a.client().await;
    let mut history = Vec::new();
    for turn in 0..3u64 {
        let msg = message(800 + turn, 40, VOCAB);
        let (ids, _) = generate(&mut ca, with_session(ids_request(&msg, greedy), 81, turn == 0, false)).await.unwrap();
        history.extend(&msg);
        history.extend(ids);
    }
    let req = || ExportSessionRequest {
        model: "gqa".into(),
        version: String::new(),
        sequence_id: Some(sp::SequenceId { id: Some(sp::sequence_id::Id::Uint64Id(81)) }),
    };
    let mut sa = sessions_client(&a).await;
    let e = sa.export_session(req()).await.expect_err("over the message limit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("ExportSessionStream"), "{e}");
    let chunks: Vec<SessionChunk> = sa
        .export_session_stream(req())
        .await
        .expect("streamed export")
        .into_inner()
        .map(|c| c.expect("chunk"))
        .collect()
        .await;
    assert!(chunks.len() >= 5, "{} chunks: the ~100 KB blob travels in pieces of 16 KiB", chunks.len());
    assert_eq!(chunks[0].session.as_ref().map(|s| s.steps), Some(3));
    let listed = sa.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner();
    assert!(listed.sessions.is_empty(), "exported: the session left worker A");
    // A damaged chunk: refused, nothing opened on B.
    let mut sb = sessions_client(&b).await;
    let mut bad = chunks.clone();
    bad[2].data[7] ^= 0x10;
    let e = sb.import_session_stream(tokio_stream::iter(bad)).await.expect_err("damaged");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("CRC-32"), "{e}");
    assert!(sb.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner().sessions.is_empty());
    // Intact: imported, and the next turn equals the stateless request over the whole history.
    let info = sb.import_session_stream(tokio_stream::iter(chunks)).await.expect("import").into_inner();
    assert_eq!(info.session.map(|s| s.steps), Some(3));
    let mut cb = b.client().await;
    let next = message(900, 5, VOCAB);
    let moved = generate(&mut cb, with_session(ids_request(&next, greedy), 81, false, false)).await.unwrap();
    history.extend(&next);
    let stateless = generate(&mut cb, ids_request(&history, greedy)).await.unwrap();
    assert_eq!(moved, stateless, "the moved session continues exactly");
}

/// A session idle for `session_store_after_idle_seconds` is written to the store by itself (so a
/// crash would not lose it); its next turn finds its K/V still in the prefix cache, drops the
/// stored copy, and equals the stateless request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_idle_session_is_written_to_the_store() {
    let repo =
        gqa_repository(r#"parameters { key: "session_store_after_idle_seconds" value: { string_value: "0.2" } }"#);
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SessionStore::open(dir.path()).expect("store opens"));
    let w = common::start_with_store(repo.path(), store.clone()).await;
    let metrics = w.server.metrics_addr.expect("metrics").to_string();
    let mut c = w.client().await;
    let greedy = r#"{"max_tokens": 5, "temperature": 0, "ignore_eos": true}"#;
    let mut history = Vec::new();
    for turn in 0..2u64 {
        let msg = message(950 + turn, 23, VOCAB);
        let (ids, _) = generate(&mut c, with_session(ids_request(&msg, greedy), 95, turn == 0, false)).await.unwrap();
        history.extend(&msg);
        history.extend(ids);
    }
    let t = std::time::Instant::now();
    while metric(&metrics, "sessions_stored").await != 1.0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the idle session was never written to the store");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored(&store), vec![(SequenceId::Uint(95), 2)], "the store holds it at its last turn");
    let msg = message(952, 4, VOCAB);
    let kept = generate(&mut c, with_session(ids_request(&msg, greedy), 95, false, false)).await.unwrap();
    history.extend(&msg);
    let stateless = generate(&mut c, ids_request(&history, greedy)).await.unwrap();
    assert_eq!(kept, stateless);
    assert_eq!(metric(&metrics, "session_restored_total").await, 0.0, "the prefix cache still held its K/V");
    assert!(stored(&store).is_empty() || stored(&store) == vec![(SequenceId::Uint(95), 3)], "no stale copy");
}
