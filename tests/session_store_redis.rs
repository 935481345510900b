//! The session store on a real Redis server (started by the test on 127.0.0.1): the store's
//! operations behave as on the local store (write, take once, list, skip corrupt or foreign
//! entries, remove), and two workers sharing the store continue each other's generative sessions
//! exactly (a drained worker's session is listed and continued by the other).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::sync::Arc;

use common::gen_sessions::*;
use common::generative::gqa_repository;
use neuron_worker::server::sessions::proto::ListSessionsRequest;
use neuron_worker::server::sessions::proto::sessions_client::SessionsClient;
use neuron_worker::sessions::{SequenceId, SessionBlob, SessionStore, StoreLocation};
use neuron_worker::tensor::Tensor;

fn open(url: &str) -> Arc<SessionStore> {
    Arc::new(SessionStore::open_location(&StoreLocation::Redis(url.into())).expect("connects"))
}

#[test]
fn the_redis_store_writes_takes_once_lists_and_skips_bad_entries() {
    let Some(server) = common::redis::start() else { return };
    let store = open(&server.url);
    let other = open(&server.url);
    assert!(store.is_shared());
    let blob = |model: &str, id: u64| SessionBlob {
        model: model.into(),
        version: 1,
        id: SequenceId::Uint(id),
        steps: id,
        state: vec![Tensor::from_f32(vec![2], &[id as f32, 0.5])],
    };
    let named = SessionBlob { id: SequenceId::Str("agent*[7]".into()), ..blob("m", 9) };
    store.put_all(&[blob("m", 1), blob("m", 2), blob("m*x", 3), named.clone()]).expect("writes");
    store.put_raw("m", 1, &SequenceId::Uint(4), b"garbage").expect("raw");
    store.put_raw("m", 1, &SequenceId::Uint(5), &blob("m", 6).encode()).expect("foreign");
    let (found, skipped) = other.list("m", 1).expect("lists");
    let mut ids: Vec<SequenceId> = found.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, vec![SequenceId::Uint(1), SequenceId::Uint(2), SequenceId::Str("agent*[7]".into())]);
    assert_eq!(skipped.len(), 2, "the garbage and the foreign entry: {skipped:?}");
    assert_eq!(other.list("m*x", 1).expect("lists").0.len(), 1, "glob characters in names are literal");
    // Taken once: the second worker finds nothing.
    assert_eq!(store.take("m", 1, &SequenceId::Uint(1)).expect("takes"), Some(blob("m", 1)));
    assert_eq!(other.take("m", 1, &SequenceId::Uint(1)).expect("takes"), None);
    assert_eq!(other.take("m", 1, &named.id).expect("takes"), Some(named));
    assert!(store.take("m", 1, &SequenceId::Uint(4)).is_err(), "a corrupt entry is refused");
    assert!(store.contains("m", 1, &SequenceId::Uint(2)).expect("looks up"));
    store.remove_all("m", 1, &[SequenceId::Uint(2), SequenceId::Uint(5)]).expect("removes");
    assert!(!other.contains("m", 1, &SequenceId::Uint(2)).expect("looks up"));
    // The server goes away: operations fail with the address, nothing hangs.
    drop(server);
    let e = store.put_all(&[blob("m", 7)]).expect_err("no server");
    assert!(e.to_string().contains("127.0.0.1"), "{e}");
    assert!(store.health().io_failures.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_drained_by_one_worker_continues_exactly_on_another() {
    let Some(server) = common::redis::start() else { return };
    let repo = gqa_repository("");
    let a = common::start_with_store(repo.path(), open(&server.url)).await;
    let b = common::start_with_store(repo.path(), open(&server.url)).await;
    let seeded = r#"{"max_tokens": 6, "temperature": 0.8, "seed": 21, "ignore_eos": true}"#;
    let mut ca = a.client().await;
    let mut history = Vec::new();
    for turn in 0..2u64 {
        let msg = message(1200 + turn, 19, VOCAB);
        let (ids, _) = generate(&mut ca, with_session(ids_request(&msg, seeded), 121, turn == 0, false)).await.unwrap();
        history.extend(&msg);
        history.extend(ids);
    }
    // B does not hold it while A does.
    let mut cb = b.client().await;
    let e = generate(&mut cb, with_session(ids_request(&[3, 4], seeded), 121, false, false)).await.unwrap_err();
    assert!(e.contains("not open"), "{e}");
    a.server.shutdown.cancel();
    a.server.wait().await.expect("A drains");
    let mut sb = SessionsClient::connect(format!("http://{}", b.server.grpc_addr)).await.expect("client");
    let listed = sb.list_sessions(ListSessionsRequest::default()).await.expect("list").into_inner();
    assert_eq!(listed.sessions.len(), 1, "B lists the session A wrote: {listed:?}");
    assert_eq!(listed.sessions[0].location, "SPILLED");
    let third = message(1202, 6, VOCAB);
    let metrics = b.server.metrics_addr.expect("metrics").to_string();
    let kept = generate(&mut cb, with_session(ids_request(&third, seeded), 121, false, false)).await.unwrap();
    assert_eq!(metric(&metrics, "session_restored_total").await, 1.0);
    assert_eq!(
        metric(&metrics, "prefix_cache_hit_tokens_total").await,
        (history.len() - 1) as f64,
        "K/V came from Redis"
    );
    history.extend(&third);
    let stateless = generate(&mut cb, ids_request(&history, seeded)).await.unwrap();
    assert_eq!(kept, stateless, "continued on B exactly as on one worker");
}
