//! Tiny models run on the batching actor's thread (no hand-off to the instance thread) once their
//! batches are measured to be tiny, and only for instances that allow it; results, statistics and
//! fault isolation are the same as on the instance thread.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use neuron_worker::batching::{Batcher, BatchingError, InferReply, InferRequest, RequestInput};
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::tensor::Tensor;
use tokio::sync::oneshot;

/// Echoes INPUT0 as OUTPUT0 and records the name of the thread each execution ran on.
struct Echo {
    threads: Arc<Mutex<Vec<String>>>,
    inline: bool,
    /// Time spent per execution (a "slow" model).
    spin: Duration,
    /// Panics on the next execution when set.
    panic: Arc<AtomicBool>,
    /// Takes 5 ms on the next execution when set (a batch whose thread lost the CPU).
    stall: Arc<AtomicBool>,
    index: usize,
}

impl ModelInstance for Echo {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let name = std::thread::current().name().unwrap_or("unnamed").to_string();
        self.threads.lock().map_err(|_| BackendError::Load("log".into()))?.push(name);
        if self.panic.swap(false, SeqCst) {
            panic!("kernel bug");
        }
        let t0 = Instant::now();
        let spin = if self.stall.swap(false, SeqCst) { Duration::from_millis(5) } else { self.spin };
        while t0.elapsed() < spin {
            std::hint::spin_loop();
        }
        let t = inputs[0].tensor;
        Ok(vec![NamedTensor {
            name: "OUTPUT0".into(),
            tensor: Tensor { dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec() },
        }])
    }
    fn label(&self) -> String {
        format!("echo:{}", self.index)
    }
    fn may_run_inline(&self) -> bool {
        self.inline
    }
}

struct Setup {
    batcher: Batcher,
    threads: Arc<Mutex<Vec<String>>>,
    panic: Arc<AtomicBool>,
    stall: Arc<AtomicBool>,
}

fn start(instances: usize, inline: bool, spin: Duration) -> Setup {
    let text = r#"name: "echo" max_batch_size: 8
           input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
           output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
           dynamic_batching { }"#;
    let cfg = parse_model_config(text, "test").expect("config parses");
    let spec = Arc::new(ModelSpec::from_config(&cfg, "test").expect("spec"));
    let threads = Arc::new(Mutex::new(Vec::new()));
    let panic = Arc::new(AtomicBool::new(false));
    let stall = Arc::new(AtomicBool::new(false));
    let inst: Vec<Box<dyn ModelInstance>> = (0..instances)
        .map(|index| {
            let echo =
                Echo { threads: threads.clone(), inline, spin, panic: panic.clone(), stall: stall.clone(), index };
            Box::new(echo) as Box<dyn ModelInstance>
        })
        .collect();
    Setup { batcher: Batcher::start_dynamic(spec, inst), threads, panic, stall }
}

async fn infer(h: &Batcher, v: f32) -> Result<Vec<u8>, BatchingError> {
    let data: Vec<u8> = [v, v + 0.5].iter().flat_map(|x| x.to_le_bytes()).collect();
    let (tx, rx) = oneshot::channel::<Result<InferReply, BatchingError>>();
    h.submit(InferRequest {
        inputs: vec![RequestInput { shape: vec![1, 2], data: Bytes::from(data) }],
        rows: 1,
        priority: 0,
        timeout: None,
        sequence: Default::default(),
        reply: tx,
        arrived: Instant::now(),
    })?;
    let reply =
        rx.await.map_err(|_| BatchingError::Unavailable { model: "echo".into(), reason: "dropped".into() })??;
    Ok(reply.outputs[0].tensor.data.clone())
}

fn expected(v: f32) -> Vec<u8> {
    [v, v + 0.5].iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn on_instance_thread(name: &str) -> bool {
    name.starts_with("echo-echo:")
}

#[tokio::test]
async fn a_tiny_model_runs_inline_after_its_first_batch_with_the_same_results_and_statistics() {
    let s = start(1, true, Duration::ZERO);
    for i in 0..20 {
        assert_eq!(infer(&s.batcher, i as f32).await.expect("served"), expected(i as f32));
    }
    let threads = s.threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 20);
    // The first batch is measured on the instance thread; the tiny ones after it run inline (a
    // preempted one may go back to the thread, so most, not all).
    assert!(on_instance_thread(&threads[0]), "{threads:?}");
    let inline = threads.iter().filter(|t| !on_instance_thread(t)).count();
    assert!(inline >= 15, "{inline} of 20 ran inline: {threads:?}");
    let stats = s.batcher.stats();
    let (success, _) = stats.success.get();
    assert_eq!(success, 20);
    assert_eq!(stats.execution_count.load(SeqCst), 20);
    tokio::time::timeout(Duration::from_secs(5), s.batcher.drain()).await.expect("drain completes");
}

#[tokio::test]
async fn one_slow_batch_does_not_send_the_next_ones_to_the_instance_thread() {
    let s = start(1, true, Duration::ZERO);
    for i in 0..20 {
        infer(&s.batcher, i as f32).await.expect("served");
    }
    // One batch takes 5 ms, as when its thread loses the CPU on a busy machine. Counted whole in
    // the cost average it would send the next few dozen batches to the instance thread.
    s.stall.store(true, SeqCst);
    assert_eq!(infer(&s.batcher, 20.0).await.expect("served"), expected(20.0));
    for i in 21..26 {
        assert_eq!(infer(&s.batcher, i as f32).await.expect("served"), expected(i as f32));
    }
    let threads = s.threads.lock().unwrap().clone();
    let after = &threads[21..];
    let inline = after.iter().filter(|t| !on_instance_thread(t)).count();
    assert!(inline >= 4, "{inline} of 5 ran inline after the slow batch: {threads:?}");
}

#[tokio::test]
async fn instances_that_do_not_allow_it_and_slow_models_stay_on_their_thread() {
    for (inline, spin) in [(false, Duration::ZERO), (true, Duration::from_millis(3))] {
        let s = start(1, inline, spin);
        for i in 0..6 {
            assert_eq!(infer(&s.batcher, i as f32).await.expect("served"), expected(i as f32));
        }
        let threads = s.threads.lock().unwrap().clone();
        assert!(threads.iter().all(|t| on_instance_thread(t)), "inline {inline} spin {spin:?}: {threads:?}");
    }
}

#[tokio::test]
async fn a_panic_inline_retires_the_instance_and_the_other_serves() {
    let s = start(2, true, Duration::ZERO);
    for i in 0..6 {
        infer(&s.batcher, i as f32).await.expect("served");
    }
    assert!(s.threads.lock().unwrap().iter().any(|t| !on_instance_thread(t)), "nothing ran inline");
    s.panic.store(true, SeqCst);
    let err = infer(&s.batcher, 99.0).await.expect_err("the panic fails the batch");
    assert!(err.to_string().contains("panicked: kernel bug"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.batcher.instances_in_service() != 1 {
        assert!(Instant::now() < deadline, "{} instances in service", s.batcher.instances_in_service());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..6 {
        assert_eq!(infer(&s.batcher, i as f32).await.expect("served by the other"), expected(i as f32));
    }
    tokio::time::timeout(Duration::from_secs(5), s.batcher.drain()).await.expect("drain completes");
}
