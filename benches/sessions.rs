//! Stateful sessions benchmark (in process, CPU):
//! - `gru_64_sessions/state_on_worker`: one step (one time step) of each of 64 live `gru` sessions
//!   per iteration, the hidden state kept by the sequence batcher;
//! - `gru_64_sessions/state_resent`: the same cell served stateless, each request carrying its
//!   hidden state in and out as the client would re-send it (batched by the dynamic batcher with
//!   the same batch size and delay);
//! - `spill_restore/*`: round-robin steps over 16 `accumulate` sessions (fit the 16 slots) and over
//!   17 sessions (every step spills the least recently used session to the redb store and restores
//!   the requested one); the difference per step is the cost of one spill + restore.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use neuron_worker::backend::cpu::stateful::kernels::{
    ACCUMULATE_CONFIG, GRU_CONFIG, GRU_HIDDEN, GRU_INPUT, GruCell, KernelStep, SequenceKernel,
};
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use neuron_worker::batching::SequenceControl;
use neuron_worker::batching::{Batcher, InferRequest, RequestInput};
use neuron_worker::config::SequenceSpec;
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::repository::start_cpu_sequence as start_cpu;
use neuron_worker::sessions::{SequenceId, SessionStore};
use neuron_worker::tensor::{DataType, Tensor};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

const SESSIONS: u64 = 64;

fn spec_of(text: &str) -> (Arc<ModelSpec>, Option<SequenceSpec>) {
    let cfg = parse_model_config(text, "bench").unwrap_or_else(|e| panic!("{e}"));
    let spec = ModelSpec::from_config(&cfg, "bench").unwrap_or_else(|e| panic!("{e}"));
    let seq = SequenceSpec::from_config(&cfg, "bench", None).unwrap_or_else(|e| panic!("{e}"));
    (Arc::new(spec), seq)
}

fn x_bytes(seed: u64) -> Bytes {
    let x: Vec<f32> = (0..GRU_INPUT).map(|i| (((seed as usize) * 31 + i * 7) % 19) as f32 / 9.0 - 1.0).collect();
    Bytes::from(x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

async fn stateful_round(h: &Batcher, start: bool) {
    let mut waits = Vec::with_capacity(SESSIONS as usize);
    for s in 0..SESSIONS {
        let (tx, rx) = oneshot::channel();
        let inputs = vec![RequestInput { shape: vec![1, 1, GRU_INPUT], data: x_bytes(s) }];
        let req = InferRequest {
            inputs,
            rows: 1,
            priority: 0,
            timeout: None,
            sequence: SequenceControl { id: Some(SequenceId::Uint(s + 1)), start, end: false },
            reply: tx,
            arrived: Instant::now(),
        };
        h.submit(req).unwrap_or_else(|e| panic!("{e}"));
        waits.push(rx);
    }
    for w in waits {
        w.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The GRU cell served stateless: `INPUT0` + `HIDDEN_IN` → `OUTPUT0` + `HIDDEN_OUT`.
struct ResentGru {
    cell: GruCell,
}

impl ModelInstance for ResentGru {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let (x, h) = (&inputs[0].tensor, &inputs[1].tensor);
        let rows = x.shape[0];
        let t = x.shape[1];
        let row_x = t * GRU_INPUT * 4;
        let reqs: Vec<[RequestInput; 1]> = (0..rows)
            .map(|r| {
                [RequestInput {
                    shape: vec![1, t, GRU_INPUT],
                    data: Bytes::copy_from_slice(&x.data[r * row_x..(r + 1) * row_x]),
                }]
            })
            .collect();
        let mut states: Vec<Vec<Tensor>> = (0..rows)
            .map(|r| {
                vec![Tensor {
                    dtype: DataType::Fp32,
                    shape: vec![GRU_HIDDEN],
                    data: h.data[r * GRU_HIDDEN * 4..(r + 1) * GRU_HIDDEN * 4].to_vec(),
                }]
            })
            .collect();
        let mut steps: Vec<KernelStep<'_>> = reqs
            .iter()
            .zip(states.iter_mut())
            .map(|(i, s)| KernelStep { inputs: i, controls: &[], state: s })
            .collect();
        let outs = self.cell.run(&mut steps)?;
        drop(steps);
        let out: Vec<u8> = outs.iter().flat_map(|o| o[0].tensor.data.iter().copied()).collect();
        let hid: Vec<u8> = states.iter().flat_map(|s| s[0].data.iter().copied()).collect();
        Ok(vec![
            NamedTensor {
                name: "OUTPUT0".into(),
                tensor: Tensor { dtype: DataType::Fp32, shape: vec![rows, t, GRU_HIDDEN], data: out },
            },
            NamedTensor {
                name: "HIDDEN_OUT".into(),
                tensor: Tensor { dtype: DataType::Fp32, shape: vec![rows, GRU_HIDDEN], data: hid },
            },
        ])
    }

    fn label(&self) -> String {
        "cpu".into()
    }
}

const RESENT_CONFIG: &str = r#"
name: "gru_resent"
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 64 ] }, { name: "HIDDEN_IN" data_type: TYPE_FP32 dims: [ 128 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 128 ] }, { name: "HIDDEN_OUT" data_type: TYPE_FP32 dims: [ 128 ] } ]
instance_group [ { count: 2 } ]
dynamic_batching { preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 200 }
"#;

async fn resent_round(h: &Batcher, hidden: &mut [Bytes]) {
    let mut waits = Vec::with_capacity(SESSIONS as usize);
    for (s, state) in hidden.iter().enumerate() {
        let (tx, rx) = oneshot::channel();
        let inputs = vec![
            RequestInput { shape: vec![1, 1, GRU_INPUT], data: x_bytes(s as u64) },
            RequestInput { shape: vec![1, GRU_HIDDEN], data: state.clone() },
        ];
        let req = InferRequest {
            inputs,
            rows: 1,
            priority: 0,
            timeout: None,
            sequence: SequenceControl::default(),
            reply: tx,
            arrived: Instant::now(),
        };
        h.submit(req).unwrap_or_else(|e| panic!("{e}"));
        waits.push(rx);
    }
    for (w, state) in waits.into_iter().zip(hidden.iter_mut()) {
        let reply = w.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
        *state = Bytes::from(reply.outputs[1].tensor.data.clone());
    }
}

async fn acc_step(h: &Batcher, id: u64, start: bool) {
    let (tx, rx) = oneshot::channel();
    let inputs = vec![RequestInput { shape: vec![1, 1], data: Bytes::from(1i32.to_le_bytes().to_vec()) }];
    h.submit(InferRequest {
        inputs,
        rows: 1,
        priority: 0,
        timeout: None,
        sequence: SequenceControl { id: Some(SequenceId::Uint(id)), start, end: false },
        reply: tx,
        arrived: Instant::now(),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    rx.await.unwrap_or_else(|e| panic!("{e}")).unwrap_or_else(|e| panic!("{e}"));
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("gru_64_sessions");
    g.sample_size(20).measurement_time(Duration::from_secs(4)).throughput(Throughput::Elements(SESSIONS));

    let (spec, seq) = spec_of(GRU_CONFIG);
    let seq = seq.unwrap_or_else(|| panic!("gru is a sequence model"));
    let handle = rt.block_on(async { start_cpu(spec, Arc::new(seq), 1, None) }).unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(stateful_round(&handle, true));
    g.bench_function("state_on_worker", |b| b.iter(|| rt.block_on(stateful_round(&handle, false))));

    let (rspec, _) = spec_of(RESENT_CONFIG);
    let instances: Vec<Box<dyn ModelInstance>> =
        (0..2).map(|_| Box::new(ResentGru { cell: GruCell::seeded() }) as Box<dyn ModelInstance>).collect();
    let sched = rt.block_on(async { Batcher::start_dynamic(rspec, instances) });
    let mut hidden: Vec<Bytes> = (0..SESSIONS).map(|_| Bytes::from(vec![0u8; GRU_HIDDEN * 4])).collect();
    g.bench_function("state_resent", |b| b.iter(|| rt.block_on(resent_round(&sched, &mut hidden))));
    g.finish();

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = Arc::new(SessionStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
    let (spec, seq) = spec_of(ACCUMULATE_CONFIG);
    let seq = seq.unwrap_or_else(|| panic!("accumulate is a sequence model"));
    let acc = rt.block_on(async { start_cpu(spec, Arc::new(seq), 1, Some(store)) }).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("spill_restore");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    for n in [16u64, 17] {
        for id in 1..=n {
            rt.block_on(acc_step(&acc, 1000 * n + id, true));
        }
        let mut next = 0u64;
        let label = if n == 16 { "step_16_sessions_fit" } else { "step_17_sessions_spill_restore_each" };
        g.bench_function(label, |b| {
            b.iter(|| {
                next = next % n + 1;
                rt.block_on(acc_step(&acc, 1000 * n + next, false))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
