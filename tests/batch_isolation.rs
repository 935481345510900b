//! One request never fails its batch-mates: BERT requests are checked against the model's limits
//! before they join a batch (over gRPC, with a full batch waiting), a failure only the backend can
//! tell fails only its own request (the rest of the batch is run without it), one long sequence
//! does not pad its batch-mates to its length, and a batch handed ahead to a busy instance does
//! not run requests whose deadline passed or whose client left while it waited.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test code may panic on setup failures

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::bert_fixture::{VOCAB, generate, write_checkpoint};
use common::*;
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use neuron_worker::batching::{Batcher, BatchingError, FailureReason, InferReply, InferRequest, RequestInput};
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::proto::inference::ModelInferRequest;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::model_infer_request::InferInputTensor;
use neuron_worker::repository::ModelControlMode;
use neuron_worker::tensor::Tensor;
use safetensors::Dtype;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A BERT request with explicit ids, mask and token types (one row).
fn bert_request(ids: &[i64], mask: &[i64], types: &[i64]) -> ModelInferRequest {
    let tensor = |name: &str, n: usize| InferInputTensor {
        name: name.into(),
        datatype: "INT64".into(),
        shape: vec![1, n as i64],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "bert".into(),
        inputs: vec![
            tensor("input_ids", ids.len()),
            tensor("attention_mask", mask.len()),
            tensor("token_type_ids", types.len()),
        ],
        raw_input_contents: vec![i64_bytes(ids).into(), i64_bytes(mask).into(), i64_bytes(types).into()],
        ..Default::default()
    }
}

async fn sentence_embedding(
    c: &mut GrpcInferenceServiceClient<Channel>,
    r: ModelInferRequest,
) -> Result<Vec<f32>, tonic::Status> {
    let r = c.model_infer(r).await?.into_inner();
    let i = r.outputs.iter().position(|o| o.name == "sentence_embedding").expect("sentence_embedding present");
    Ok(bytes_f32(&r.raw_output_contents[i]))
}

fn valid(k: usize) -> ModelInferRequest {
    let ids: Vec<i64> = (0..(3 + k % 6)).map(|i| ((k * 11 + i * 5) % 97 + 2) as i64).collect();
    let n = ids.len();
    bert_request(&ids, &vec![1; n], &vec![0; n])
}

#[tokio::test]
async fn one_bad_bert_request_never_fails_its_batch_mates() {
    let repo = tempfile::tempdir().expect("tmp");
    let dir = repo.path().join("bert");
    std::fs::create_dir_all(dir.join("1")).expect("mkdir");
    write_checkpoint(&dir.join("1"), &generate(7), Dtype::F32, "", true);
    // Nine rows make a full batch, formed at once; fewer wait up to 1 s for more.
    std::fs::write(
        dir.join("config.pbtxt"),
        r#"name: "bert" backend: "cpu" max_batch_size: 9
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] },
        { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true } ]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] },
         { name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000000 }
"#,
    )
    .expect("write config");
    let w = start_with(Some(repo.path().to_path_buf()), ModelControlMode::None, options()).await;
    let mut c = w.client().await;
    let mut alone = Vec::new();
    for k in 0..8 {
        alone.push(sentence_embedding(&mut c, valid(k)).await.expect("alone"));
    }
    let vocab = VOCAB as i64;
    let bad: Vec<(&str, ModelInferRequest, &str)> = vec![
        ("id past the vocabulary", bert_request(&[2, vocab, 4], &[1, 1, 1], &[0, 0, 0]), "input_ids"),
        ("negative id", bert_request(&[2, 3, -1], &[1, 1, 1], &[0, 0, 0]), "input_ids"),
        ("mask value 2", bert_request(&[2, 3, 4], &[1, 2, 1], &[0, 0, 0]), "attention_mask"),
        ("token type 2", bert_request(&[2, 3, 4], &[1, 1, 1], &[0, 2, 0]), "token_type_ids"),
        ("17 tokens (max_position_embeddings 16)", bert_request(&[5; 17], &[1; 17], &[0; 17]), "16"),
    ];
    for (what, request, named) in bad {
        let mut tasks = Vec::new();
        for k in 0..8 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move { sentence_embedding(&mut c, valid(k)).await }));
        }
        let mut cb = c.clone();
        let bad_task = tokio::spawn(async move { sentence_embedding(&mut cb, request).await });
        let e = bad_task.await.expect("join").expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains(named), "{what}: the error names what is wrong: {}", e.message());
        for (k, t) in tasks.into_iter().enumerate() {
            let got = t.await.expect("join").unwrap_or_else(|e| panic!("{what}: valid request {k} failed: {e:?}"));
            let diff = got.iter().zip(&alone[k]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-4, "{what}: request {k} differs from its answer alone by {diff}");
        }
    }
}

// ---- the batching layer with a programmable backend ----

type Rx = oneshot::Receiver<Result<InferReply, BatchingError>>;

/// Echoes INPUT0; a batch holding a row whose first value is 13 fails with an input error only the
/// backend can see. Executions wait while the gate is closed; each execution's shape is logged.
#[derive(Clone, Default)]
struct Probe {
    gate: Arc<(Mutex<bool>, Condvar)>,
    shapes: Arc<Mutex<Vec<Vec<usize>>>>,
    started: Arc<AtomicUsize>,
}

impl Probe {
    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().expect("gate") = open;
        self.gate.1.notify_all();
    }
}

struct Echo(Probe);

impl ModelInstance for Echo {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        self.0.started.fetch_add(1, Ordering::SeqCst);
        {
            let (m, cv) = &*self.0.gate;
            let mut open = m.lock().expect("gate");
            while !*open {
                open = cv.wait(open).expect("gate");
            }
        }
        let t = inputs[0].tensor;
        self.0.shapes.lock().expect("log").push(t.shape.to_vec());
        let data = t.to_f32().unwrap_or_default();
        let row = data.len() / t.shape[0].max(1);
        if data.chunks(row.max(1)).any(|r| r[0] == 13.0) {
            return Err(BackendError::InvalidInput {
                name: "INPUT0".into(),
                reason: "value 13 is not accepted".into(),
            });
        }
        Ok(vec![NamedTensor { name: "OUTPUT0".into(), tensor: Tensor::from_f32(t.shape.to_vec(), &data) }])
    }
    fn label(&self) -> String {
        "echo:0".into()
    }
}

fn start_echo(dims: &str, max_batch: usize, extra: &str, probe: &Probe) -> Batcher {
    let text = format!(
        r#"name: "echo" max_batch_size: {max_batch}
           input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
           output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {dims} ] }} ]
           dynamic_batching {{ {extra} }}"#
    );
    let spec = Arc::new(ModelSpec::from_config(&parse_model_config(&text, "t").expect("parses"), "t").expect("spec"));
    Batcher::start_dynamic(spec, vec![Box::new(Echo(probe.clone()))])
}

/// One row of `width` values: `tag`, then tag + i/1000.
fn submit(h: &Batcher, tag: f32, width: usize, timeout: Option<Duration>) -> Rx {
    let data: Vec<f32> = (0..width).map(|i| if i == 0 { tag } else { tag + i as f32 / 1000.0 }).collect();
    let (tx, rx) = oneshot::channel();
    h.submit(InferRequest {
        inputs: vec![RequestInput { shape: vec![1, width], data: Bytes::from(f32_bytes(&data)) }],
        rows: 1,
        priority: 0,
        timeout,
        sequence: Default::default(),
        reply: tx,
        arrived: Instant::now(),
    })
    .expect("submit");
    rx
}

async fn reply(rx: Rx) -> Result<Vec<f32>, BatchingError> {
    let r = rx.await.expect("a reply is sent")?;
    Ok(r.outputs[0].tensor.view().to_f32().unwrap_or_default())
}

/// Waits (bounded) until the backend has started `n` executions.
async fn wait_started(p: &Probe, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.started.load(Ordering::SeqCst) < n {
        assert!(Instant::now() < deadline, "{} executions started, expected {n}", p.started.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn a_failure_only_the_backend_sees_fails_only_its_request() {
    let p = Probe::default();
    let h = start_echo("2", 4, "", &p);
    p.set_gate(false);
    let first = submit(&h, 1.0, 2, None);
    wait_started(&p, 1).await;
    // Queued behind the busy instance: one batch of four, one of them refused by the backend.
    let rxs: Vec<Rx> = [2.0, 13.0, 3.0, 4.0].iter().map(|t| submit(&h, *t, 2, None)).collect();
    p.set_gate(true);
    reply(first).await.expect("first");
    for (rx, tag) in rxs.into_iter().zip([2.0f32, 13.0, 3.0, 4.0]) {
        let got = reply(rx).await;
        if tag == 13.0 {
            let e = got.expect_err("the offender fails");
            assert!(e.to_string().contains("value 13"), "{e}");
        } else {
            assert_eq!(got.expect("a batch-mate of the offender succeeds"), vec![tag, tag + 0.001]);
        }
    }
    let stats = h.stats();
    assert_eq!(stats.success.get().0, 4);
    let invalid = stats.failures().into_iter().find(|(r, _)| *r == FailureReason::InvalidRequest).map(|f| f.1);
    assert_eq!(invalid, Some(1), "the offender counts as an invalid request");
    let backend = stats.failures().into_iter().find(|(r, _)| *r == FailureReason::Backend).map(|f| f.1);
    assert_eq!(backend, Some(0), "nothing failed on the instance's side");
    assert_eq!(stats.instances[0].errors.load(Ordering::SeqCst), 0, "a client's bad input is no instance error");
}

#[tokio::test]
async fn one_long_sequence_does_not_pad_its_batch_mates() {
    let p = Probe::default();
    let h = start_echo("-1", 8, "", &p);
    p.set_gate(false);
    let first = submit(&h, 1.0, 4, None);
    wait_started(&p, 1).await;
    let long = 1 << 20;
    let mut rxs: Vec<(Rx, usize)> = (0..7).map(|k| (submit(&h, 2.0 + k as f32, 4, None), 4)).collect();
    rxs.push((submit(&h, 20.0, long, None), long));
    p.set_gate(true);
    reply(first).await.expect("first");
    for (rx, width) in rxs {
        assert_eq!(reply(rx).await.expect("served").len(), width);
    }
    let shapes = p.shapes.lock().expect("log").clone();
    let padded: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    assert!(padded <= 2 * (long + 8 * 4), "the short rows were padded to the long one's length: executions {shapes:?}");
}

#[tokio::test]
async fn a_batch_handed_ahead_skips_requests_that_expired_or_were_cancelled_while_it_waited() {
    let p = Probe::default();
    let h = start_echo("2", 4, "", &p);
    p.set_gate(false);
    let first = submit(&h, 1.0, 2, None);
    wait_started(&p, 1).await;
    // A full batch: handed ahead to the busy instance at once.
    let expiring: Vec<Rx> = (0..2).map(|k| submit(&h, 2.0 + k as f32, 2, Some(Duration::from_millis(50)))).collect();
    let cancelled = submit(&h, 5.0, 2, None);
    let kept = submit(&h, 6.0, 2, None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.queue_depth() != 0 {
        assert!(Instant::now() < deadline, "the full batch is handed ahead to the busy instance");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(cancelled);
    tokio::time::sleep(Duration::from_millis(80)).await; // past the 50 ms deadline
    p.set_gate(true);
    reply(first).await.expect("first");
    for rx in expiring {
        match reply(rx).await {
            Err(BatchingError::Timeout { .. }) => {}
            other => panic!("an expired request must not be executed: {other:?}"),
        }
    }
    assert_eq!(reply(kept).await.expect("kept"), vec![6.0, 6.001]);
    let shapes = p.shapes.lock().expect("log").clone();
    assert_eq!(shapes, vec![vec![1, 2], vec![1, 2]], "only the live request ran in the second execution");
    let f = h.stats().failures();
    let count = |reason| f.iter().find(|(r, _)| *r == reason).map(|x| x.1);
    assert_eq!((count(FailureReason::Timeout), count(FailureReason::Cancelled)), (Some(2), Some(1)));
}

#[tokio::test]
async fn cancelled_requests_leave_the_queue_depth_while_the_instance_is_busy() {
    let p = Probe::default();
    let h = start_echo("2", 4, "", &p);
    p.set_gate(false);
    let first = submit(&h, 1.0, 2, None);
    wait_started(&p, 1).await;
    // More than a batch handed ahead can take: some stay queued behind the busy instance.
    let waiting: Vec<Rx> = (0..20).map(|k| submit(&h, 2.0 + k as f32, 2, None)).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.queue_depth() != 16 {
        assert!(Instant::now() < deadline, "queue depth {}, expected 16 (one batch handed ahead)", h.queue_depth());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(waiting); // every client leaves; the instance is still busy
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.queue_depth() != 0 {
        assert!(Instant::now() < deadline, "{} cancelled requests still counted as queued", h.queue_depth());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cancelled = h.stats().failures().into_iter().find(|(r, _)| *r == FailureReason::Cancelled).map(|f| f.1);
    assert_eq!(cancelled, Some(16));
    p.set_gate(true);
    reply(first).await.expect("first");
}
