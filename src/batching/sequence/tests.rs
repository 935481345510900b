//! The sequence actor over CPU `accumulate` instances whose executions and state writes can be
//! made to fail, and a session store whose writes can be made to fail: what survives a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::backend::cpu::stateful::kernels::ACCUMULATE_CONFIG;
use crate::backend::cpu::stateful::{CpuSequenceInstance, builtin_kernel};
use crate::backend::{BackendError, SlotStep, StatefulInstance};
use crate::batching::{Batcher, BatchingError, InferRequest, RequestInput, SequenceControl, SequenceSetup};
use crate::config::{ModelSpec, SequenceSpec, parse_model_config};
use crate::sessions::{SequenceId, SessionBlob, SessionStore};
use crate::tensor::Tensor;

/// Execution failure modes of [`Flaky`].
const EXEC_OK: u8 = 0;
const EXEC_FAILS: u8 = 1;
const EXEC_FATAL: u8 = 2;

/// A CPU instance whose executions fail (usable or not) and whose state writes fail on demand.
struct Flaky {
    inner: CpuSequenceInstance,
    exec: Arc<AtomicU8>,
    fail_write: Arc<AtomicBool>,
}

impl StatefulInstance for Flaky {
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<crate::backend::NamedTensor>>, BackendError> {
        match self.exec.load(Ordering::Acquire) {
            EXEC_OK => self.inner.execute(steps),
            mode => Err(BackendError::Execution {
                message: "injected execution failure".into(),
                instance_usable: mode != EXEC_FATAL,
                nrt_status: None,
            }),
        }
    }

    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError> {
        self.inner.read_state(slot)
    }

    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError> {
        if self.fail_write.load(Ordering::Acquire) {
            return Err(BackendError::Execution {
                message: "injected state write failure".into(),
                instance_usable: true,
                nrt_status: None,
            });
        }
        self.inner.write_state(slot, state)
    }

    fn label(&self) -> String {
        self.inner.label()
    }
}

pub(super) struct Rig {
    pub(super) handle: Batcher,
    /// Per instance: execution mode and state-write failure switch.
    exec: Vec<Arc<AtomicU8>>,
    fail_write: Vec<Arc<AtomicBool>>,
}

/// `accumulate` with `count` instances of `slots` slots each.
pub(super) fn rig(count: usize, slots: usize, store: Option<Arc<SessionStore>>) -> Rig {
    let cfg = parse_model_config(ACCUMULATE_CONFIG, "t").unwrap_or_else(|e| panic!("{e}"));
    let spec = Arc::new(ModelSpec::from_config(&cfg, "t").unwrap_or_else(|e| panic!("{e}")));
    let seq = SequenceSpec::from_config(&cfg, "t", None).ok().flatten().unwrap_or_else(|| panic!("no sequence spec"));
    let exec: Vec<Arc<AtomicU8>> = (0..count).map(|_| Arc::new(AtomicU8::new(EXEC_OK))).collect();
    let fail_write: Vec<Arc<AtomicBool>> = (0..count).map(|_| Arc::new(AtomicBool::new(false))).collect();
    let instances = (0..count)
        .map(|i| {
            let inner = CpuSequenceInstance::new(
                builtin_kernel("accumulate").unwrap_or_else(|| panic!("kernel")),
                seq.states.iter().map(|s| s.initial.clone()).collect(),
                slots,
                i,
            );
            Box::new(Flaky { inner, exec: exec[i].clone(), fail_write: fail_write[i].clone() })
                as Box<dyn StatefulInstance>
        })
        .collect();
    let setup = SequenceSetup { spec, seq: Arc::new(seq), version: 1, store, slots };
    let handle = Batcher::start_sequence(setup, instances).unwrap_or_else(|e| panic!("{e}"));
    Rig { handle, exec, fail_write }
}

pub(super) async fn step(h: &Batcher, id: u64, v: i32, start: bool, end: bool) -> Result<i32, BatchingError> {
    let (tx, rx) = oneshot::channel();
    h.submit(InferRequest {
        inputs: vec![RequestInput { shape: vec![1, 1], data: bytes::Bytes::from(v.to_le_bytes().to_vec()) }],
        rows: 1,
        priority: 0,
        timeout: None,
        sequence: SequenceControl { id: Some(SequenceId::Uint(id)), start, end },
        reply: tx,
        arrived: Instant::now(),
    })?;
    let reply = rx.await.unwrap_or_else(|_| panic!("no reply"))?;
    let data = &reply.outputs[0].tensor.data;
    Ok(i32::from_le_bytes([data[0], data[1], data[2], data[3]]))
}

fn acc_blob(id: u64, sum: i32, steps: u64) -> SessionBlob {
    SessionBlob {
        model: "accumulate".into(),
        version: 1,
        id: SequenceId::Uint(id),
        steps,
        state: vec![Tensor { dtype: crate::tensor::DataType::Int32, shape: vec![1], data: sum.to_le_bytes().to_vec() }],
    }
}

/// A session store in a temporary folder whose writes fail while the switch is on.
pub(super) fn fault_store() -> (Arc<SessionStore>, crate::sessions::WriteFault, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (store, fault) = SessionStore::open_with_write_fault(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(store), fault, dir)
}

pub(super) async fn steps_of(h: &Batcher, id: u64) -> Option<u64> {
    h.list_sessions().await.into_iter().find(|s| s.id == SequenceId::Uint(id)).map(|s| s.steps)
}

#[tokio::test]
async fn a_failed_spill_keeps_the_pending_restore_of_the_session() {
    let (store, fault, _dir) = fault_store();
    let r = rig(1, 1, Some(store));
    // Sequence 1 leaves 50 in the only slot.
    assert_eq!(step(&r.handle, 1, 50, true, true).await.ok(), Some(50));
    // Session 2 (sum 100) is imported into that slot; its state waits to be written there.
    r.handle.import_session(acc_blob(2, 100, 3)).await.unwrap_or_else(|e| panic!("import: {e}"));
    // Starting sequence 3 must spill session 2, but the store cannot be written.
    fault.set(true);
    let e = step(&r.handle, 3, 1, true, false).await.expect_err("spill fails");
    assert!(matches!(e, BatchingError::SlotsExhausted { .. }), "{e}");
    fault.set(false);
    // Session 2 continues from its own state, not from the slot's previous occupant.
    assert_eq!(step(&r.handle, 2, 1, false, false).await.ok(), Some(101));
    assert_eq!(steps_of(&r.handle, 2).await, Some(4));
}

#[tokio::test]
async fn a_failed_restore_closes_the_session_instead_of_running_on_foreign_state() {
    let r = rig(1, 2, None);
    assert_eq!(step(&r.handle, 1, 50, true, false).await.ok(), Some(50));
    r.handle.import_session(acc_blob(2, 100, 3)).await.unwrap_or_else(|e| panic!("import: {e}"));
    r.fail_write[0].store(true, Ordering::Release);
    let e = step(&r.handle, 2, 1, false, false).await.expect_err("restore fails");
    assert!(e.to_string().contains("could not be restored"), "{e}");
    r.fail_write[0].store(false, Ordering::Release);
    // Its next request is refused with the reason; it never runs on the slot's old content.
    let e = step(&r.handle, 2, 1, false, false).await.expect_err("closed");
    assert!(matches!(e, BatchingError::NotLive { .. }) && e.to_string().contains("could not be restored"), "{e}");
    // The other sequence was not disturbed, and the id can be started again.
    assert_eq!(step(&r.handle, 1, 1, false, false).await.ok(), Some(51));
    assert_eq!(step(&r.handle, 2, 7, true, false).await.ok(), Some(7));
}

#[tokio::test]
async fn a_failed_end_keeps_the_sequence_and_failed_steps_are_not_counted() {
    let r = rig(1, 2, None);
    assert_eq!(step(&r.handle, 1, 5, true, false).await.ok(), Some(5));
    assert_eq!(step(&r.handle, 1, 5, false, false).await.ok(), Some(10));
    r.exec[0].store(EXEC_FAILS, Ordering::Release);
    assert!(step(&r.handle, 1, 1, false, false).await.is_err());
    assert!(step(&r.handle, 1, 1, false, true).await.is_err(), "the END fails");
    assert_eq!(steps_of(&r.handle, 1).await, Some(2), "failed steps do not count");
    r.exec[0].store(EXEC_OK, Ordering::Release);
    // The END can be retried: the sequence is still live.
    assert_eq!(step(&r.handle, 1, 1, false, true).await.ok(), Some(11));
    let e = step(&r.handle, 1, 1, false, false).await.expect_err("ended");
    assert!(e.to_string().contains("has ended"), "{e}");
    assert_eq!(r.handle.session_counters().unwrap_or_else(|| panic!("counters")).ended.load(Ordering::Relaxed), 1);
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_every_instance_makes_the_model_unavailable_and_not_ready() {
    let r = rig(2, 1, None);
    // Sequence 1 on instance 0, sequence 2 on instance 1.
    assert_eq!(step(&r.handle, 1, 5, true, false).await.ok(), Some(5));
    assert_eq!(step(&r.handle, 2, 6, true, false).await.ok(), Some(6));
    r.exec[0].store(EXEC_FATAL, Ordering::Release);
    assert!(step(&r.handle, 1, 1, false, false).await.is_err());
    // The actor learns of the failure just after the client got its error.
    until("instance 0 is out of service", || r.handle.instances_in_service() == 1).await;
    // Sequence 1 is remembered as lost with its instance; the model serves on with the other.
    let e = step(&r.handle, 1, 1, false, false).await.expect_err("lost");
    assert!(matches!(e, BatchingError::NotLive { .. }) && e.to_string().contains("its instance failed"), "{e}");
    assert_eq!(r.handle.instances_in_service(), 1);
    assert!(r.handle.is_ready());
    assert_eq!(step(&r.handle, 2, 1, false, false).await.ok(), Some(7));

    r.exec[1].store(EXEC_FATAL, Ordering::Release);
    assert!(step(&r.handle, 2, 1, false, false).await.is_err());
    until("no instance is left", || r.handle.instances_in_service() == 0).await;
    // STARTs are refused as unavailable (not as slots exhausted), and so are lost sequences.
    for (id, start) in [(3, true), (2, false)] {
        let e = step(&r.handle, id, 1, start, false).await.expect_err("unavailable");
        assert!(matches!(e, BatchingError::Unavailable { .. }), "{e}");
    }
    // What readiness, health and /capacity read follows.
    until("the model is not ready", || !r.handle.is_ready() && r.handle.instances_in_service() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_follows_the_instances_in_service_and_import_without_any_says_unavailable() {
    let r = rig(2, 2, None);
    assert_eq!(r.handle.session_capacity(), Some(4));
    assert_eq!(step(&r.handle, 1, 5, true, false).await.ok(), Some(5));
    assert_eq!(step(&r.handle, 2, 6, true, false).await.ok(), Some(6));
    r.exec[0].store(EXEC_FATAL, Ordering::Release);
    assert!(step(&r.handle, 1, 1, false, false).await.is_err());
    until("instance 0 is out of service", || r.handle.instances_in_service() == 1).await;
    // Two slots are left (one holds sequence 2): the refusal names what is there, not the start-up figure.
    assert_eq!(r.handle.session_capacity(), Some(2));
    assert_eq!(step(&r.handle, 3, 1, true, false).await.ok(), Some(1));
    let e = step(&r.handle, 4, 1, true, false).await.expect_err("slots taken");
    assert!(e.to_string().contains("all 2 sequence slots are taken"), "{e}");

    r.exec[1].store(EXEC_FATAL, Ordering::Release);
    assert!(step(&r.handle, 2, 1, false, false).await.is_err());
    until("no instance is left", || r.handle.instances_in_service() == 0).await;
    assert_eq!(r.handle.session_capacity(), Some(0));
    // Not "retry shortly" (RESOURCE_EXHAUSTED) while nothing can ever take the session.
    let e = r.handle.import_session(acc_blob(9, 1, 1)).await.expect_err("no instance");
    assert!(matches!(e, BatchingError::Unavailable { .. }), "{e}");
}

#[tokio::test]
async fn import_refuses_unreachable_ids_and_step_counts_do_not_wrap() {
    let r = rig(1, 2, None);
    for id in [SequenceId::Uint(0), SequenceId::Str(String::new()), SequenceId::Str("x".repeat(300))] {
        let blob = SessionBlob { id: id.clone(), ..acc_blob(1, 1, 1) };
        let e = r.handle.import_session(blob).await.expect_err("unreachable id");
        assert!(matches!(e, BatchingError::BadBlob { .. }), "{id}: {e}");
    }
    assert!(r.handle.list_sessions().await.is_empty());
    r.handle.import_session(acc_blob(7, 1, u64::MAX)).await.unwrap_or_else(|e| panic!("import: {e}"));
    assert_eq!(step(&r.handle, 7, 1, false, false).await.ok(), Some(2));
    assert_eq!(steps_of(&r.handle, 7).await, Some(u64::MAX));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilled_sessions_report_how_long_they_are_idle() {
    let (store, _fault, _dir) = fault_store();
    let r = rig(1, 1, Some(store));
    assert_eq!(step(&r.handle, 1, 5, true, false).await.ok(), Some(5));
    let t = Instant::now();
    until("sequence 1 is idle for a while", || t.elapsed() > Duration::from_millis(30)).await;
    // Sequence 2 takes the only slot: sequence 1 is spilled, idle since its last request.
    assert_eq!(step(&r.handle, 2, 1, true, false).await.ok(), Some(1));
    let list = r.handle.list_sessions().await;
    let spilled = list.iter().find(|s| s.id == SequenceId::Uint(1)).unwrap_or_else(|| panic!("listed: {list:?}"));
    assert!(!spilled.live);
    assert!(spilled.idle >= Duration::from_millis(30), "{spilled:?}");
}
