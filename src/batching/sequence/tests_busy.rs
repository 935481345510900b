//! A busy instance never blocks the session owner: spilling or exporting a session whose instance
//! is executing a long batch is queued behind that batch, while requests on the other instance
//! and ListSessions are answered at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::tests::step;
use crate::backend::cpu::stateful::kernels::ACCUMULATE_CONFIG;
use crate::backend::cpu::stateful::{CpuSequenceInstance, builtin_kernel};
use crate::backend::{BackendError, NamedTensor, SlotStep, StatefulInstance};
use crate::batching::{Batcher, BatchingError, InferReply, InferRequest, RequestInput, SequenceControl, SequenceSetup};
use crate::config::{ModelSpec, SequenceSpec, parse_model_config};
use crate::sessions::{SequenceId, SessionStore};
use crate::tensor::Tensor;

/// How long a slow execution takes: the device time of a long batch (or a hung core).
const SLOW: Duration = Duration::from_millis(1500);
/// What "answered at once" means here (a step takes well under a millisecond otherwise).
const QUICK: Duration = Duration::from_millis(500);

/// A CPU `accumulate` instance whose executions take [`SLOW`] while `slow_value` is the input.
struct Slow {
    inner: CpuSequenceInstance,
    slow_value: Arc<AtomicU64>,
}

impl StatefulInstance for Slow {
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let slow = self.slow_value.load(Ordering::Acquire) as i32;
        if steps.iter().any(|s| s.inputs.first().is_some_and(|x| x.data.as_ref() == slow.to_le_bytes())) {
            std::thread::sleep(SLOW);
        }
        self.inner.execute(steps)
    }
    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError> {
        self.inner.read_state(slot)
    }
    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError> {
        self.inner.write_state(slot, state)
    }
    fn label(&self) -> String {
        self.inner.label()
    }
}

/// `accumulate` on two instances of two slots each, with a store; a step whose input is 7777
/// takes [`SLOW`].
fn two_instances() -> (Batcher, tempfile::TempDir) {
    // Sessions stay live while the test waits for slow batches.
    let text = ACCUMULATE_CONFIG
        .replace("max_sequence_idle_microseconds: 1000000", "max_sequence_idle_microseconds: 60000000");
    let cfg = parse_model_config(&text, "t").unwrap_or_else(|e| panic!("{e}"));
    let spec = Arc::new(ModelSpec::from_config(&cfg, "t").unwrap_or_else(|e| panic!("{e}")));
    let seq = SequenceSpec::from_config(&cfg, "t", None).ok().flatten().unwrap_or_else(|| panic!("no sequence spec"));
    let slow_value = Arc::new(AtomicU64::new(7777));
    let instances = (0..2)
        .map(|i| {
            let inner = CpuSequenceInstance::new(
                builtin_kernel("accumulate").unwrap_or_else(|| panic!("kernel")),
                seq.states.iter().map(|s| s.initial.clone()).collect(),
                2,
                i,
            );
            Box::new(Slow { inner, slow_value: slow_value.clone() }) as Box<dyn StatefulInstance>
        })
        .collect();
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Arc::new(SessionStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
    let setup = SequenceSetup { spec, seq: Arc::new(seq), version: 1, store: Some(store), slots: 2 };
    (Batcher::start_sequence(setup, instances).unwrap_or_else(|e| panic!("{e}")), dir)
}

/// Submits sequence `id`'s slow step; the reply comes on the returned channel.
fn submit_slow(h: &Batcher, id: u64) -> oneshot::Receiver<Result<InferReply, BatchingError>> {
    let (tx, rx) = oneshot::channel();
    h.submit(InferRequest {
        inputs: vec![RequestInput { shape: vec![1, 1], data: bytes::Bytes::from(7777i32.to_le_bytes().to_vec()) }],
        rows: 1,
        priority: 0,
        timeout: None,
        sequence: SequenceControl { id: Some(SequenceId::Uint(id)), start: false, end: false },
        reply: tx,
        arrived: Instant::now(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    rx
}

async fn output(rx: oneshot::Receiver<Result<InferReply, BatchingError>>) -> i32 {
    let reply = rx.await.unwrap_or_else(|_| panic!("no reply")).unwrap_or_else(|e| panic!("{e}"));
    let d = &reply.outputs[0].tensor.data;
    i32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// Waits (bounded) until no request is queued: the slow step has been handed to its instance.
async fn dispatched(h: &Batcher) {
    let t = Instant::now();
    while h.queue_depth() > 0 {
        assert!(t.elapsed() < SLOW, "the slow step was never dispatched");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spilling_or_exporting_a_session_of_a_busy_instance_does_not_block_the_others() {
    let (h, _dir) = two_instances();
    // Slots fill evenly: 1 and 3 on instance 0, 2 and 4 on instance 1; 1 is the least recently used.
    for id in 1..=4u64 {
        assert_eq!(step(&h, id, id as i32, true, false).await.ok(), Some(id as i32));
    }
    // Sequence 3 keeps instance 0 busy for SLOW.
    let h5 = h.clone();
    let busy = submit_slow(&h, 3);
    let t = Instant::now();
    dispatched(&h).await;
    // Sequence 5 needs a slot: sequence 1 (idle, on the busy instance) is spilled behind that batch.
    let start5 = tokio::spawn(async move { step(&h5, 5, 50, true, false).await });
    // Meanwhile sessions on instance 1 and ListSessions answer at once.
    let t1 = Instant::now();
    assert_eq!(step(&h, 2, 1, false, false).await.ok(), Some(3));
    assert_eq!(step(&h, 4, 1, false, false).await.ok(), Some(5));
    let list = h.list_sessions().await;
    let waited = t1.elapsed();
    assert!(waited < QUICK, "instance 1 and ListSessions waited {waited:?} for instance 0's batch");
    assert!(list.iter().any(|s| s.id == SequenceId::Uint(1)), "{list:?}");
    // The START of 5 completes once the batch ends and 1 is spilled; 1 continues from the store.
    assert_eq!(start5.await.ok().and_then(Result::ok), Some(50));
    assert_eq!(output(busy).await, 3 + 7777);
    assert!(t.elapsed() >= SLOW);
    let list = h.list_sessions().await;
    assert_eq!(list.iter().find(|s| s.id == SequenceId::Uint(1)).map(|s| (s.live, s.steps)), Some((false, 1)));

    // Export of an idle session on a busy instance answers when the batch ends, without
    // blocking instance 1 meanwhile.
    let busy = submit_slow(&h, 3);
    dispatched(&h).await;
    let h5 = h.clone();
    let export = tokio::spawn(async move { h5.export_session(SequenceId::Uint(5)).await });
    let t1 = Instant::now();
    assert_eq!(step(&h, 2, 1, false, false).await.map_err(|e| e.to_string()), Ok(4));
    let waited = t1.elapsed();
    assert!(waited < QUICK, "instance 1 waited {waited:?} for an export on instance 0");
    let blob = export.await.ok().and_then(Result::ok).unwrap_or_else(|| panic!("export"));
    assert_eq!((blob.steps, blob.state[0].data.clone()), (1, 50i32.to_le_bytes().to_vec()));
    assert_eq!(output(busy).await, 3 + 2 * 7777);
}
