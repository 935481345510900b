//! A damaged store file: one flipped byte anywhere in it must not panic the worker, must not
//! leave a session silently missing, and must leave a store that works.

use std::sync::atomic::Ordering;

use super::store::STORE_FILE;
use super::{SequenceId, SessionBlob, SessionStore};
use crate::tensor::Tensor;

fn blob(id: u64) -> SessionBlob {
    SessionBlob {
        model: "m".into(),
        version: 1,
        id: SequenceId::Uint(id),
        steps: id,
        state: vec![Tensor::from_f32(vec![4], &[id as f32; 4])],
    }
}

#[test]
fn a_flipped_byte_anywhere_in_the_file_neither_panics_nor_loses_a_session_uncounted() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    {
        let store = SessionStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        store.put_all(&(1..=40).map(blob).collect::<Vec<_>>()).unwrap_or_else(|e| panic!("{e}"));
    }
    let pristine = std::fs::read(dir.path().join(STORE_FILE)).unwrap_or_else(|e| panic!("{e}"));
    // Flips in bytes that are not zero hit the header, the B-tree pages, keys and values.
    let used: Vec<usize> = pristine.iter().enumerate().filter(|(_, b)| **b != 0).map(|(i, _)| i).collect();
    assert!(used.len() > 200, "{} bytes in use", used.len());
    let (mut quarantined, mut dropped_some) = (0, 0);
    for k in 0..160 {
        let off = used[k * used.len() / 160];
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = pristine.clone();
        bytes[off] ^= 0x5a;
        std::fs::write(d.path().join(STORE_FILE), &bytes).unwrap_or_else(|e| panic!("{e}"));
        let store = SessionStore::open(d.path()).unwrap_or_else(|e| panic!("offset {off}: {e}"));
        let (ok, skipped) = store.list("m", 1).unwrap_or_else(|e| panic!("offset {off}: {e}"));
        let h = store.health();
        let accounted = ok.len() as u64 + skipped.len() as u64 + h.dropped.load(Ordering::Relaxed);
        let uncounted = h.uncounted.load(Ordering::Relaxed) > 0;
        assert!(
            accounted == 40 || uncounted,
            "offset {off}: {} listed, {} skipped, {accounted} accounted for: {h:?}",
            ok.len(),
            skipped.len()
        );
        if h.quarantined.load(Ordering::Relaxed) > 0 {
            quarantined += 1;
            let aside = std::fs::read_dir(d.path())
                .unwrap_or_else(|e| panic!("{e}"))
                .filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("sessions.redb.damaged-"));
            assert!(aside, "offset {off}: the damaged file is kept aside");
        }
        if accounted == 40 && ok.len() < 40 {
            dropped_some += 1;
        }
        // Every listed session is intact, and the store takes writes.
        for s in &ok {
            let got = store.take("m", 1, &s.id).unwrap_or_else(|e| panic!("offset {off}: {e}"));
            assert_eq!(got.as_ref().map(|b| b.steps), Some(s.steps), "offset {off}");
        }
        store.put_all(&[blob(41)]).unwrap_or_else(|e| panic!("offset {off}: {e}"));
        assert_eq!(store.list("m", 1).map(|l| l.0.len()).ok(), Some(1), "offset {off}");
    }
    // The sample did hit damage (otherwise the test proves nothing).
    assert!(quarantined + dropped_some > 0, "no flip had any effect");
}
