//! The sequence actor over a session store that fails: a full disk (writes fail, then succeed
//! again) and a damaged file. Nothing live is lost while the store cannot write, the store works
//! again without a restart, and what is lost is counted.

use std::sync::atomic::Ordering;

use super::tests::{fault_store, rig, step, steps_of};
use crate::batching::BatchingError;
use crate::sessions::SequenceId;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_sessions_live_and_the_store_works_again_once_it_has_room() {
    let (store, fault, _dir) = fault_store();
    let r = rig(1, 2, Some(store.clone()));
    assert_eq!(step(&r.handle, 1, 10, true, false).await.ok(), Some(10));
    assert_eq!(step(&r.handle, 2, 20, true, false).await.ok(), Some(20));
    fault.set(true);
    // Sequence 3 needs a slot: spilling sequence 1 fails, so the START is refused as "slots
    // exhausted" (RESOURCE_EXHAUSTED, retry later) with the reason, and sequence 1 stays live.
    let e = step(&r.handle, 3, 1, true, false).await.expect_err("no slot and no spill");
    assert!(matches!(e, BatchingError::SlotsExhausted { .. }), "{e}");
    assert!(e.to_string().contains("could not be spilled") && e.to_string().contains("disk full"), "{e}");
    assert_eq!(step(&r.handle, 1, 1, false, false).await.ok(), Some(11));
    assert_eq!(step(&r.handle, 2, 1, false, false).await.ok(), Some(21));
    // Room again: the store works without a restart (redb refused every write after one failure).
    fault.set(false);
    assert_eq!(step(&r.handle, 3, 5, true, false).await.ok(), Some(5), "sequence 1 is spilled to make room");
    let list = r.handle.list_sessions().await;
    assert_eq!(list.iter().find(|s| s.id == SequenceId::Uint(1)).map(|s| (s.live, s.steps)), Some((false, 2)));
    // A spilled session asked for while the disk is full again stays in the store: UNAVAILABLE.
    assert_eq!(step(&r.handle, 3, 1, false, true).await.ok(), Some(6), "END frees a slot");
    fault.set(true);
    let e = step(&r.handle, 1, 1, false, false).await.expect_err("cannot take it from the store");
    assert!(matches!(e, BatchingError::Unavailable { .. }) && e.to_string().contains("kept"), "{e}");
    assert_eq!(steps_of(&r.handle, 1).await, Some(2), "still listed, spilled");
    fault.set(false);
    assert_eq!(step(&r.handle, 1, 1, false, false).await.ok(), Some(12), "restored from the store");
    let h = store.health();
    assert!(h.io_failures.load(Ordering::Relaxed) >= 2, "{h:?}");
    assert!(h.reopened.load(Ordering::Relaxed) >= 1, "{h:?}");
    let c = r.handle.session_counters().unwrap_or_else(|| panic!("counters"));
    assert_eq!(c.store_failures.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_cannot_be_saved_at_drain_are_counted_as_lost() {
    let (store, fault, _dir) = fault_store();
    let r = rig(1, 2, Some(store.clone()));
    assert_eq!(step(&r.handle, 1, 10, true, false).await.ok(), Some(10));
    assert_eq!(step(&r.handle, 2, 20, true, false).await.ok(), Some(20));
    fault.set(true);
    r.handle.drain().await;
    assert_eq!(store.lost(), 2, "the worker exits non-zero when this is not 0");
    let c = r.handle.session_counters().unwrap_or_else(|| panic!("counters"));
    assert_eq!(c.lost.load(Ordering::Relaxed), 2);
    fault.set(false);
    assert_eq!(store.list("accumulate", 1).map(|l| l.0.len()).ok(), Some(0));
}
