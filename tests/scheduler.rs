//! Scheduler semantics with a programmable test backend: batching under load, delay, preferred
//! sizes, priorities, queue bound, timeouts, cancellation, bucket padding/splitting, sequence
//! padding, and fault isolation.
//!
//! Synchronisation: the batching actor reads submissions and an instance's "batch done" from one
//! FIFO channel, so every request submitted before the gate opens is queued by the time the blocked
//! batch completes; where a test needs a batch to have reached its instance it waits (bounded) on
//! the probe's arrival count. The few sleeps left make time pass on purpose (a delay or a deadline
//! that must run out, or that must not have run out yet).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use neuron_worker::batching::{Batcher, BatchingError, InferReply, InferRequest, RequestInput};
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::tensor::{DataType, Tensor};
use tokio::sync::oneshot;

/// What one execution saw.
#[derive(Debug, Clone)]
struct Seen {
    shape: Vec<usize>,
    /// First element of each row (the tag).
    tags: Vec<f32>,
    data: Vec<f32>,
}

#[derive(Clone, Default)]
struct Probe {
    log: Arc<Mutex<Vec<Seen>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    /// Executions that reached the gate (whether or not it was open).
    arrived: Arc<AtomicUsize>,
}

impl Probe {
    fn close(&self) {
        *self.gate.0.lock().expect("gate") = false;
    }
    fn open(&self) {
        *self.gate.0.lock().expect("gate") = true;
        self.gate.1.notify_all();
    }
    fn seen(&self) -> Vec<Seen> {
        self.log.lock().expect("log").clone()
    }
    /// Waits (bounded) until `n` executions have reached the gate.
    async fn wait_arrived(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.arrived.load(SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "{} executions reached the instance, expected {n}",
                self.arrived.load(SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Echoes its input as OUTPUT0 (FP32). Rows tagged `fail_tag` fail the batch (usable or not).
struct EchoInstance {
    probe: Probe,
    fail_tag: Option<(f32, bool)>,
    index: usize,
}

impl ModelInstance for EchoInstance {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        self.probe.arrived.fetch_add(1, SeqCst);
        {
            let (m, cv) = &*self.probe.gate;
            let mut open = m.lock().map_err(|_| BackendError::Load("gate".into()))?;
            while !*open {
                open = cv.wait(open).map_err(|_| BackendError::Load("gate".into()))?;
            }
        }
        let t = inputs[0].tensor;
        let data = t.to_f32().unwrap_or_default();
        let row = data.len() / t.shape[0].max(1);
        let tags: Vec<f32> = data.chunks(row.max(1)).map(|r| r[0]).collect();
        self.probe.log.lock().map_err(|_| BackendError::Load("log".into()))?.push(Seen {
            shape: t.shape.to_vec(),
            tags: tags.clone(),
            data: data.clone(),
        });
        if let Some((tag, usable)) = self.fail_tag
            && tags.contains(&tag)
        {
            return Err(BackendError::Execution {
                message: format!("injected failure on {}", self.label()),
                instance_usable: usable,
                nrt_status: None,
            });
        }
        Ok(vec![NamedTensor { name: "OUTPUT0".into(), tensor: Tensor::from_f32(t.shape.to_vec(), &data) }])
    }
    fn label(&self) -> String {
        format!("echo:{}", self.index)
    }
}

fn spec(extra: &str, dims: &str, max_batch: usize) -> Arc<ModelSpec> {
    let text = format!(
        r#"name: "echo" max_batch_size: {max_batch}
           input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
           output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
           {extra}"#
    );
    let cfg = parse_model_config(&text, "test").expect("config parses");
    Arc::new(ModelSpec::from_config(&cfg, "test").expect("spec"))
}

fn start(spec: Arc<ModelSpec>, probe: &Probe, instances: usize, fail_tag: Option<(f32, bool)>) -> Batcher {
    let inst: Vec<Box<dyn ModelInstance>> = (0..instances)
        .map(|index| Box::new(EchoInstance { probe: probe.clone(), fail_tag, index }) as Box<dyn ModelInstance>)
        .collect();
    Batcher::start_dynamic(spec, inst)
}

type Rx = oneshot::Receiver<Result<InferReply, BatchingError>>;

/// A request of `rows` rows of width `width`, every element = tag + position/1000.
fn submit(
    h: &Batcher,
    tag: f32,
    rows: usize,
    width: usize,
    priority: u64,
    timeout: Option<Duration>,
) -> Result<Rx, BatchingError> {
    let data: Vec<f32> =
        (0..rows * width).map(|i| if i % width == 0 { tag } else { tag + (i % width) as f32 / 1000.0 }).collect();
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (tx, rx) = oneshot::channel();
    h.submit(InferRequest {
        inputs: vec![RequestInput { shape: vec![rows, width], data: Bytes::from(bytes) }],
        rows,
        priority,
        timeout,
        sequence: Default::default(),
        reply: tx,
        arrived: Instant::now(),
    })?;
    Ok(rx)
}

async fn output(rx: Rx) -> Result<Vec<f32>, BatchingError> {
    let reply =
        rx.await.map_err(|_| BatchingError::Unavailable { model: "echo".into(), reason: "dropped".into() })??;
    let t = &reply.outputs[0].tensor;
    assert_eq!(t.dtype, DataType::Fp32);
    Ok(t.view().to_f32().unwrap_or_default())
}

/// Waits (bounded) until `n` instances are in service: the actor learns of a retired instance just
/// after the failed batch's clients got their errors.
async fn wait_in_service(h: &Batcher, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.instances_in_service() != n {
        assert!(Instant::now() < deadline, "{} instances in service, expected {n}", h.instances_in_service());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Occupies the single instance with a blocked batch (tag 0) and returns its receiver.
async fn block(h: &Batcher, p: &Probe) -> Rx {
    p.close();
    let before = p.arrived.load(SeqCst);
    let rx = submit(h, 0.0, 1, 2, 0, None).expect("submit");
    // The batch is dispatched, then the instance waits at the gate before logging it.
    p.wait_arrived(before + 1).await;
    rx
}

#[tokio::test]
async fn queued_rows_form_one_batch_and_each_request_gets_its_own_rows() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "2", 16), &p, 1, None);
    let first = block(&h, &p).await;
    let rxs: Vec<Rx> =
        (1..=5).map(|t| submit(&h, t as f32, if t == 3 { 3 } else { 1 }, 2, 0, None).expect("submit")).collect();
    p.open();
    output(first).await.expect("first");
    for (i, rx) in rxs.into_iter().enumerate() {
        let tag = (i + 1) as f32;
        let out = output(rx).await.expect("reply");
        let rows = if tag == 3.0 { 3 } else { 1 };
        assert_eq!(out.len(), rows * 2);
        assert!(out.chunks(2).all(|r| r[0] == tag && (r[1] - (tag + 0.001)).abs() < 1e-6), "tag {tag}: {out:?}");
    }
    let seen = p.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].shape, vec![7, 2]);
    assert_eq!(seen[1].tags, vec![1.0, 2.0, 3.0, 3.0, 3.0, 4.0, 5.0]);
    let s = h.stats();
    assert_eq!(s.execution_count.load(std::sync::atomic::Ordering::Relaxed), 2);
    assert_eq!(s.inference_count.load(std::sync::atomic::Ordering::Relaxed), 8);
}

#[tokio::test]
async fn queue_delay_waits_for_a_fuller_batch() {
    let p = Probe::default();
    p.open();
    let h = start(spec("dynamic_batching { max_queue_delay_microseconds: 200000 }", "2", 4), &p, 1, None);
    let a = submit(&h, 1.0, 1, 2, 0, None).expect("submit");
    tokio::time::sleep(Duration::from_millis(20)).await; // on purpose: less than the 200 ms delay
    assert!(p.seen().is_empty(), "executed before the delay ran out or the batch filled");
    let rest: Vec<Rx> = (2..=4).map(|t| submit(&h, t as f32, 1, 2, 0, None).expect("submit")).collect();
    output(a).await.expect("a");
    for rx in rest {
        output(rx).await.expect("rest");
    }
    // The batch filled to max_batch_size (4) before the 200 ms delay ran out: one execution.
    assert_eq!(p.seen().len(), 1);
    assert_eq!(p.seen()[0].tags, vec![1.0, 2.0, 3.0, 4.0]);
    // A lone request goes when the delay runs out.
    let t0 = Instant::now();
    output(submit(&h, 9.0, 1, 2, 0, None).expect("submit")).await.expect("lone");
    assert!(t0.elapsed() >= Duration::from_millis(150), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn preferred_batch_size_shapes_batches() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { preferred_batch_size: [ 4 ] }", "2", 8), &p, 1, None);
    let first = block(&h, &p).await;
    let rxs: Vec<Rx> = (1..=6).map(|t| submit(&h, t as f32, 1, 2, 0, None).expect("submit")).collect();
    p.open();
    output(first).await.expect("first");
    for rx in rxs {
        output(rx).await.expect("reply");
    }
    let sizes: Vec<usize> = p.seen().iter().map(|s| s.shape[0]).collect();
    assert_eq!(sizes, vec![1, 4, 2]);
}

#[tokio::test]
async fn higher_priority_requests_run_first() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { priority_levels: 2 default_priority_level: 2 }", "2", 1), &p, 1, None);
    let first = block(&h, &p).await;
    let a = submit(&h, 1.0, 1, 2, 0, None).expect("a");
    let b = submit(&h, 2.0, 1, 2, 2, None).expect("b");
    let c = submit(&h, 3.0, 1, 2, 1, None).expect("c");
    p.open();
    for rx in [first, a, b, c] {
        output(rx).await.expect("reply");
    }
    let order: Vec<f32> = p.seen().iter().map(|s| s.tags[0]).collect();
    assert_eq!(order, vec![0.0, 3.0, 1.0, 2.0]);
}

#[tokio::test]
async fn full_queue_rejects_with_queue_full_and_counts_it() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { default_queue_policy { max_queue_size: 2 } }", "2", 4), &p, 1, None);
    let first = block(&h, &p).await;
    let a = submit(&h, 1.0, 1, 2, 0, None).expect("a");
    let b = submit(&h, 2.0, 1, 2, 0, None).expect("b");
    let err = submit(&h, 3.0, 1, 2, 0, None).expect_err("queue full");
    assert!(matches!(err, BatchingError::QueueFull { max_queue_size: 2, .. }), "{err}");
    assert_eq!(h.queue_depth(), 2);
    p.open();
    for rx in [first, a, b] {
        output(rx).await.expect("reply");
    }
    let failures = h.stats().failures();
    assert_eq!(failures.iter().find(|(r, _)| r.as_str() == "queue_full").map(|x| x.1), Some(1));
}

#[tokio::test]
async fn expired_requests_are_rejected_and_never_executed() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "2", 4), &p, 1, None);
    let first = block(&h, &p).await;
    let late = submit(&h, 7.0, 1, 2, 0, Some(Duration::from_millis(10))).expect("late");
    let fine = submit(&h, 8.0, 1, 2, 0, None).expect("fine");
    tokio::time::sleep(Duration::from_millis(60)).await; // on purpose: past the 10 ms deadline
    let err = output(late).await.expect_err("timed out");
    assert!(matches!(err, BatchingError::Timeout { timeout_us: 10_000, .. }), "{err}");
    p.open();
    output(first).await.expect("first");
    output(fine).await.expect("fine");
    assert!(p.seen().iter().all(|s| !s.tags.contains(&7.0)), "an expired request was executed");
}

#[tokio::test]
async fn cancelled_requests_leave_the_queue_unexecuted() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "2", 4), &p, 1, None);
    let first = block(&h, &p).await;
    let gone = submit(&h, 5.0, 1, 2, 0, None).expect("gone");
    let kept = submit(&h, 6.0, 1, 2, 0, None).expect("kept");
    drop(gone);
    p.open();
    output(first).await.expect("first");
    output(kept).await.expect("kept");
    assert!(p.seen().iter().all(|s| !s.tags.contains(&5.0)), "a cancelled request was executed");
    let cancelled = h.stats().failures().into_iter().find(|(r, _)| r.as_str() == "cancelled").map(|x| x.1);
    assert_eq!(cancelled, Some(1));
}

#[tokio::test]
async fn bucket_plan_pads_to_the_smallest_bucket_and_splits_large_work() {
    let p = Probe::default();
    p.open();
    let extra = r#"dynamic_batching { } parameters { key: "neuron_batch_buckets" value: { string_value: "2,4" } }"#;
    let h = start(spec(extra, "2", 16), &p, 1, None);
    let out = output(submit(&h, 1.0, 3, 2, 0, None).expect("3 rows")).await.expect("reply");
    assert_eq!(out.len(), 6);
    let out = output(submit(&h, 2.0, 9, 2, 0, None).expect("9 rows")).await.expect("reply");
    assert_eq!(out.len(), 18);
    assert!(out.chunks(2).all(|r| r[0] == 2.0));
    let seen = p.seen();
    let shapes: Vec<usize> = seen.iter().map(|s| s.shape[0]).collect();
    // 3 rows → bucket 4 (one zero row); 9 rows → 4 + 4 + bucket 2 for the last row.
    assert_eq!(shapes, vec![4, 4, 4, 2]);
    assert_eq!(seen[0].tags, vec![1.0, 1.0, 1.0, 0.0]);
    assert_eq!(seen[3].tags, vec![2.0, 0.0]);
}

#[tokio::test]
async fn variable_sequences_are_padded_with_zeros_and_outputs_cropped() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "-1", 8), &p, 1, None);
    let first = block(&h, &p).await;
    let short = submit(&h, 1.0, 1, 3, 0, None).expect("short");
    let long = submit(&h, 2.0, 1, 5, 0, None).expect("long");
    p.open();
    output(first).await.expect("first");
    let s = output(short).await.expect("short");
    let l = output(long).await.expect("long");
    assert_eq!(s, vec![1.0, 1.001, 1.002]);
    assert_eq!(l.len(), 5);
    let batch = &p.seen()[1];
    assert_eq!(batch.shape, vec![2, 5]);
    assert_eq!(&batch.data[..5], &[1.0, 1.001, 1.002, 0.0, 0.0]);
}

#[tokio::test]
async fn a_failed_batch_fails_only_its_requests() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "2", 1), &p, 1, Some((13.0, true)));
    p.open();
    let bad = output(submit(&h, 13.0, 1, 2, 0, None).expect("bad")).await.expect_err("fails");
    assert!(bad.to_string().contains("injected failure on echo:0"), "{bad}");
    let good = output(submit(&h, 14.0, 1, 2, 0, None).expect("good")).await.expect("good");
    assert_eq!(good[0], 14.0);
    assert!(h.is_ready());
}

#[tokio::test]
async fn an_unusable_instance_is_retired_and_the_rest_serve() {
    let p = Probe::default();
    p.open();
    let h = start(spec("dynamic_batching { }", "2", 1), &p, 2, Some((13.0, false)));
    assert_eq!(h.instances_in_service(), 2);
    output(submit(&h, 13.0, 1, 2, 0, None).expect("bad")).await.expect_err("fails");
    wait_in_service(&h, 1).await;
    for t in 20..26 {
        assert_eq!(output(submit(&h, t as f32, 1, 2, 0, None).expect("good")).await.expect("good")[0], t as f32);
    }
    output(submit(&h, 13.0, 1, 2, 0, None).expect("bad")).await.expect_err("fails");
    wait_in_service(&h, 0).await;
    assert!(!h.is_ready());
    let err = submit(&h, 1.0, 1, 2, 0, None).expect_err("unavailable");
    assert!(matches!(err, BatchingError::Unavailable { .. }), "{err}");
}

#[tokio::test]
async fn drain_finishes_accepted_requests_then_refuses() {
    let p = Probe::default();
    let h = start(spec("dynamic_batching { }", "2", 4), &p, 1, None);
    let first = block(&h, &p).await;
    let queued: Vec<Rx> = (1..=3).map(|t| submit(&h, t as f32, 1, 2, 0, None).expect("submit")).collect();
    let h2 = h.clone();
    let drain = tokio::spawn(async move { h2.drain().await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.is_ready() {
        assert!(Instant::now() < deadline, "the drain never closed admission");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(submit(&h, 9.0, 1, 2, 0, None).is_err(), "accepted a request while draining");
    p.open();
    output(first).await.expect("first");
    for rx in queued {
        output(rx).await.expect("queued request finished during drain");
    }
    tokio::time::timeout(Duration::from_secs(5), drain).await.expect("drain completes").expect("join");
}

#[tokio::test]
async fn work_handed_ahead_to_a_retiring_instance_is_served_by_another() {
    let p = Probe::default();
    p.close();
    let h = start(spec("dynamic_batching { }", "2", 1), &p, 2, Some((13.0, false)));
    // Instance 0 takes the batch that will fail fatally, instance 1 a normal one; then one batch is
    // handed ahead to each while both are busy.
    let doomed = submit(&h, 13.0, 1, 2, 0, None).expect("submit");
    p.wait_arrived(1).await;
    let rest: Vec<Rx> = (1..=3).map(|t| submit(&h, t as f32, 1, 2, 0, None).expect("submit")).collect();
    p.wait_arrived(2).await;
    p.open();
    assert!(output(doomed).await.is_err());
    for (i, rx) in rest.into_iter().enumerate() {
        let out = output(rx).await.expect("served by the remaining instance");
        assert_eq!(out[0], (i + 1) as f32);
    }
    wait_in_service(&h, 1).await;
}

/// Panics on the first batch it sees (a bug in a backend must not take the worker down).
struct PanickingInstance;

impl ModelInstance for PanickingInstance {
    fn execute(&mut self, _inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        panic!("kernel bug");
    }
    fn label(&self) -> String {
        "panics".into()
    }
}

#[tokio::test]
async fn a_panicking_instance_is_retired_and_the_others_serve() {
    let p = Probe::default();
    p.open();
    let inst: Vec<Box<dyn ModelInstance>> =
        vec![Box::new(PanickingInstance), Box::new(EchoInstance { probe: p.clone(), fail_tag: None, index: 1 })];
    let h = Batcher::start_dynamic(spec("dynamic_batching { }", "2", 1), inst);
    let err = output(submit(&h, 1.0, 1, 2, 0, None).expect("submit")).await.expect_err("the panic fails the batch");
    assert!(err.to_string().contains("panicked: kernel bug"), "{err}");
    wait_in_service(&h, 1).await;
    for t in 2..6 {
        assert_eq!(output(submit(&h, t as f32, 1, 2, 0, None).expect("submit")).await.expect("served")[0], t as f32);
    }
    // Drain still completes (no batch is left counted on the dead instance).
    tokio::time::timeout(Duration::from_secs(5), h.drain()).await.expect("drain completes");
}

#[tokio::test]
async fn a_reachable_preferred_size_goes_without_waiting_for_the_delay() {
    let p = Probe::default();
    let extra = "dynamic_batching { preferred_batch_size: [ 2 ] max_queue_delay_microseconds: 5000000 }";
    let h = start(spec(extra, "2", 8), &p, 1, None);
    p.open();
    let t0 = Instant::now();
    // One request alone waits for the delay (1 row: no preferred size reachable)...
    let first = submit(&h, 0.0, 1, 2, 0, None).expect("submit");
    tokio::time::sleep(Duration::from_millis(50)).await; // on purpose: less than the 5 s delay
    assert!(p.seen().is_empty(), "a lone request did not wait for a preferred batch");
    // ...until more arrive: 4 rows queued, so the preferred 2 goes at once, twice.
    let rxs: Vec<Rx> = (1..=3).map(|t| submit(&h, t as f32, 1, 2, 0, None).expect("submit")).collect();
    output(first).await.expect("first");
    for rx in rxs {
        output(rx).await.expect("preferred batch");
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "the 5 s delay was waited out: {:?}", t0.elapsed());
    let tags: Vec<Vec<f32>> = p.seen().iter().map(|s| s.tags.clone()).collect();
    assert_eq!(tags, vec![vec![0.0, 1.0], vec![2.0, 3.0]]);
}
