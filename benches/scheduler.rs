//! Scheduler benchmark: what batching costs, and how close the scheduler keeps NeuronCores to fully
//! busy. `cargo bench --bench scheduler`.
//!
//! - Overhead: one no-op instance (zeros of the right shape, returned at once) behind the queue
//!   actor, 64 single-row submitters kept in flight, dynamic batching up to 64 rows. Every batch's
//!   time is scheduling time: µs per batch and requests per second through the scheduler alone.
//! - Efficiency: the stand-in libnrt with 8 visible cores and a fixed simulated device time per
//!   execution; 8 `NeuronInstance`s of a tiny dense model compiled at bucket 16, kept saturated by
//!   single-row submitters. Ideal = cores × bucket rows ÷ device time; the ratio is achieved rows/s
//!   ÷ ideal. libnrt is one per process and the stand-in reads its knobs at `nrt_init`, so this part
//!   runs in a child process (this executable, re-executed with the knobs in its environment).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::Bytes;
use neuron_worker::backend::neuron::{NeuronInstance, NeuronModelConfig, Runtime, TensorConfig};
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use neuron_worker::batching::{Batcher, InferRequest, RequestInput};
use neuron_worker::config::{ModelSpec, parse_model_config};
use neuron_worker::tensor::{DataType, Tensor, TensorView};
use tokio::sync::oneshot;

/// Set in the child's environment: run the efficiency measurement and print its lines.
const CHILD_MARKER: &str = "NEURON_WORKER_SCHEDULER_BENCH_CHILD";
/// Simulated NeuronCores for the efficiency part.
const CORES: usize = 8;
/// Simulated device time per execution, µs.
const DEVICE_US: u64 = 2000;
/// The one compiled batch size.
const BUCKET: usize = 16;
/// Input features of the dense model (the built-in `linear`: 64 → 16).
const IN_FEATURES: usize = 64;
/// Output features of the dense model.
const OUT_FEATURES: usize = 16;

type Failure = String;

fn main() -> ExitCode {
    let result = if std::env::var_os(CHILD_MARKER).is_some() { efficiency_child() } else { parent() };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scheduler bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parent() -> Result<(), Failure> {
    overhead()?;
    efficiency_in_child()
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))
}

/// A model spec from configuration text, as the repository would build it.
fn spec(text: &str) -> Result<Arc<ModelSpec>, Failure> {
    let cfg = parse_model_config(text, "bench").map_err(|e| format!("bench config: {e}"))?;
    Ok(Arc::new(ModelSpec::from_config(&cfg, "bench").map_err(|e| format!("bench spec: {e}"))?))
}

/// One row of `width` FP32 values.
fn one_row(width: usize) -> Bytes {
    (0..width).flat_map(|i| (i as f32 / width as f32).to_le_bytes()).collect::<Vec<u8>>().into()
}

/// What the submitters did.
#[derive(Debug, Default)]
struct Load {
    /// Replies that carried outputs.
    ok: u64,
    /// Submissions or replies that failed, with the first error seen.
    failed: u64,
    first_error: Option<String>,
}

/// Keeps `in_flight` single-row requests outstanding until `stop` is set.
async fn submit_loop(h: Batcher, row: Bytes, width: usize, in_flight: usize, stop: Arc<AtomicBool>) -> Load {
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (h, row, stop) = (h.clone(), row.clone(), stop.clone());
            tokio::spawn(async move {
                let mut load = Load::default();
                while !stop.load(Relaxed) {
                    let (tx, rx) = oneshot::channel();
                    let req = InferRequest {
                        inputs: vec![RequestInput { shape: vec![1, width], data: row.clone() }],
                        rows: 1,
                        priority: 0,
                        timeout: None,
                        sequence: Default::default(),
                        reply: tx,
                        arrived: Instant::now(),
                    };
                    let outcome = match h.submit(req) {
                        Ok(()) => match rx.await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(e)) => Err(e.to_string()),
                            Err(_) => Err("reply channel dropped".to_string()),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(()) => load.ok += 1,
                        Err(e) => {
                            load.failed += 1;
                            load.first_error.get_or_insert(e);
                            // Do not spin on a persistent error.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                load
            })
        })
        .collect();
    let mut total = Load::default();
    for t in tasks {
        match t.await {
            Ok(l) => {
                total.ok += l.ok;
                total.failed += l.failed;
                if total.first_error.is_none() {
                    total.first_error = l.first_error;
                }
            }
            Err(e) => {
                total.failed += 1;
                total.first_error.get_or_insert(format!("submitter task: {e}"));
            }
        }
    }
    total
}

/// Rows and executions the scheduler has completed so far.
fn progress(h: &Batcher) -> (u64, u64) {
    let s = h.stats();
    (s.inference_count.load(Relaxed), s.execution_count.load(Relaxed))
}

// ---------------------------------------------------------------------------------------------
// Part 1: scheduling overhead with a no-op backend.

/// Returns zeros of the output shape at once: every microsecond of a batch is the scheduler's.
struct NoopInstance {
    out_width: usize,
}

impl ModelInstance for NoopInstance {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let rows = inputs.first().and_then(|i| i.tensor.shape.first().copied()).unwrap_or(0);
        let shape = vec![rows, self.out_width];
        let tensor = Tensor { dtype: DataType::Fp32, shape, data: vec![0u8; rows * self.out_width * 4] };
        Ok(vec![NamedTensor { name: "OUTPUT0".into(), tensor }])
    }

    fn label(&self) -> String {
        "noop:0".into()
    }
}

fn overhead() -> Result<(), Failure> {
    const IN_FLIGHT: usize = 64;
    const WIDTH: usize = 16;
    let rt = tokio_runtime()?;
    let spec = spec(&format!(
        r#"name: "noop" max_batch_size: 64
           input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
           output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {WIDTH} ] }} ]
           dynamic_batching {{ }}"#
    ))?;
    rt.block_on(async {
        let instances: Vec<Box<dyn ModelInstance>> = vec![Box::new(NoopInstance { out_width: WIDTH })];
        let h = Batcher::start_dynamic(spec, instances);
        let stop = Arc::new(AtomicBool::new(false));
        let load = tokio::spawn(submit_loop(h.clone(), one_row(WIDTH), WIDTH, IN_FLIGHT, stop.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (rows0, execs0, t0) = (progress(&h).0, progress(&h).1, Instant::now());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ((rows1, execs1), elapsed) = (progress(&h), t0.elapsed());
        stop.store(true, Relaxed);
        let load = load.await.map_err(|e| format!("submitters: {e}"))?;
        h.drain().await;
        if load.failed > 0 {
            return Err(format!("{} of {} requests failed; first: {}", load.failed, load.ok + load.failed, load.first_error.unwrap_or_default()));
        }
        let (rows, execs) = (rows1 - rows0, execs1 - execs0);
        if execs == 0 {
            return Err("no batch executed in the measurement window".into());
        }
        let secs = elapsed.as_secs_f64();
        println!(
            "scheduler overhead: {:.1} us per batch (avg batch {:.1} rows), {:.0} requests/s through the scheduler alone ({IN_FLIGHT} single-row requests in flight, 1 no-op instance, max_batch_size 64)",
            secs * 1e6 / execs as f64,
            rows as f64 / execs as f64,
            rows as f64 / secs,
        );
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Part 2: efficiency against the ideal, on the stand-in libnrt (child process).

fn efficiency_in_child() -> Result<(), Failure> {
    let standin = nrt_standin::standin_library_path()
        .ok_or("the stand-in libnrt was not found next to this executable; build it with `cargo bench --bench scheduler` (nrt-standin is a dev-dependency)")?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let out = Command::new(&exe)
        .env(CHILD_MARKER, "1")
        .env("NEURON_WORKER_LIBNRT", &standin)
        .env("NRT_STANDIN_VISIBLE_CORES", CORES.to_string())
        .env("NRT_STANDIN_EXEC_DELAY_US", DEVICE_US.to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(format!("efficiency run ({}) failed: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

/// Per-core timing of executions, to tell device time from time the core waited on the scheduler.
#[derive(Default)]
struct CoreTimes {
    /// Executions seen.
    executions: AtomicU64,
    /// Total time inside `execute` (device time + stand-in host work), ns.
    busy_ns: AtomicU64,
    /// Total time between the end of one execution and the start of the next, ns.
    gap_ns: AtomicU64,
    /// Longest such gap, ns.
    max_gap_ns: AtomicU64,
    /// Gaps longer than 200 µs.
    long_gaps: AtomicU64,
    /// End of the last execution.
    last_end: Mutex<Option<Instant>>,
    /// Measuring: counters only move while set.
    armed: Arc<AtomicBool>,
}

/// Wraps an instance and records when it executes.
struct Timed {
    inner: Box<dyn ModelInstance>,
    times: Arc<CoreTimes>,
}

impl ModelInstance for Timed {
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError> {
        let start = Instant::now();
        let out = self.inner.execute(inputs);
        let end = Instant::now();
        let t = &self.times;
        let previous = t.last_end.lock().ok().and_then(|mut last| last.replace(end));
        if t.armed.load(Relaxed) {
            t.executions.fetch_add(1, Relaxed);
            t.busy_ns.fetch_add((end - start).as_nanos() as u64, Relaxed);
            if let Some(prev) = previous {
                let gap = start.saturating_duration_since(prev).as_nanos() as u64;
                t.gap_ns.fetch_add(gap, Relaxed);
                t.max_gap_ns.fetch_max(gap, Relaxed);
                if gap > 200_000 {
                    t.long_gaps.fetch_add(1, Relaxed);
                }
            }
        }
        out
    }

    fn label(&self) -> String {
        self.inner.label()
    }
}

fn efficiency_child() -> Result<(), Failure> {
    let runtime = Runtime::get_or_init().map_err(|e| format!("stand-in libnrt: {e}"))?;
    if (runtime.visible_cores() as usize) < CORES {
        return Err(format!("the stand-in shows {} cores, the bench needs {CORES}", runtime.visible_cores()));
    }
    let neff = neuron_worker::neff::testing::builtin_dense_neff("linear", BUCKET)?
        .build()
        .map_err(|e| format!("building the NEFF: {e}"))?;
    let spec = spec(&format!(
        r#"name: "linear" max_batch_size: {BUCKET}
           input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {IN_FEATURES} ] }} ]
           output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {OUT_FEATURES} ] }} ]
           dynamic_batching {{ }}
           parameters {{ key: "neuron_batch_buckets" value: {{ string_value: "{BUCKET}" }} }}"#
    ))?;
    let config = NeuronModelConfig {
        name: "linear".into(),
        batching: true,
        inputs: vec![TensorConfig { name: "INPUT0".into(), dtype: DataType::Fp32, dims: vec![IN_FEATURES] }],
        outputs: vec![TensorConfig { name: "OUTPUT0".into(), dtype: DataType::Fp32, dims: vec![OUT_FEATURES] }],
    };
    let armed = Arc::new(AtomicBool::new(false));
    let mut times = Vec::with_capacity(CORES);
    let mut instances: Vec<Box<dyn ModelInstance>> = Vec::with_capacity(CORES);
    for core in 0..CORES {
        let inst = NeuronInstance::new(runtime.clone(), core as u32, config.clone(), &[(BUCKET, neff.as_slice())])
            .map_err(|e| format!("core {core}: {e}"))?;
        let t = Arc::new(CoreTimes { armed: armed.clone(), ..CoreTimes::default() });
        times.push(t.clone());
        instances.push(Box::new(Timed { inner: Box::new(inst), times: t }));
    }
    let alone_us = execute_alone(instances.first_mut().ok_or("no instance")?.as_mut())?;
    let rt = tokio_runtime()?;
    let m = rt.block_on(saturate(spec, instances, &armed))?;
    report(&m, &times, alone_us);
    Ok(())
}

/// Runs `inner` on a zero batch of one bucket, without any scheduler; returns µs per execution.
fn execute_alone(inst: &mut dyn ModelInstance) -> Result<f64, Failure> {
    const RUNS: u32 = 100;
    let data = vec![0u8; BUCKET * IN_FEATURES * 4];
    let shape = [BUCKET, IN_FEATURES];
    let tensor = TensorView { dtype: DataType::Fp32, shape: &shape, data: &data };
    let inputs = [BatchInput { name: "INPUT0", tensor }];
    let t = Instant::now();
    for _ in 0..RUNS {
        inst.execute(&inputs).map_err(|e| format!("stand-in execute: {e}"))?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / f64::from(RUNS))
}

/// What one saturated run measured.
struct Measured {
    /// Length of the measurement window.
    window: Duration,
    /// Real rows completed in the window.
    rows: u64,
    /// Executions completed in the window.
    executions: u64,
    /// Instance-thread time copying inputs into batches, splitting outputs and replying, ns
    /// (summed over executions).
    host_ns: u64,
    /// Queue-depth samples taken, and how many found less than one bucket queued.
    samples: u64,
    short_samples: u64,
}

/// Keeps every core busy with single-row requests and measures a steady-state window.
async fn saturate(
    spec: Arc<ModelSpec>,
    instances: Vec<Box<dyn ModelInstance>>,
    armed: &AtomicBool,
) -> Result<Measured, Failure> {
    // Two rounds of the whole bucket per core in flight: a full batch is always queued.
    const IN_FLIGHT: usize = CORES * BUCKET * 2;
    let h = Batcher::start_dynamic(spec, instances);
    let stop = Arc::new(AtomicBool::new(false));
    let row = one_row(IN_FEATURES);
    let load = tokio::spawn(submit_loop(h.clone(), row, IN_FEATURES, IN_FLIGHT, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snapshot = |h: &Batcher| {
        let s = h.stats();
        let host: u64 = s.batch_stats().iter().map(|(_, b)| b.compute_input_ns + b.compute_output_ns).sum();
        (s.inference_count.load(Relaxed), s.execution_count.load(Relaxed), host)
    };
    // Samples the queue depth from its own thread, off the runtime the scheduler uses.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (h, sampling) = (h.clone(), sampling.clone());
        std::thread::spawn(move || {
            let (mut n, mut short) = (0u64, 0u64);
            while sampling.load(Relaxed) {
                n += 1;
                short += u64::from(h.queue_depth() < BUCKET);
                std::thread::sleep(Duration::from_micros(500));
            }
            (n, short)
        })
    };
    armed.store(true, Relaxed);
    let (before, t0) = (snapshot(&h), Instant::now());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (after, window) = (snapshot(&h), t0.elapsed());
    armed.store(false, Relaxed);
    sampling.store(false, Relaxed);
    stop.store(true, Relaxed);
    let (samples, short_samples) = sampler.join().map_err(|_| "queue sampler panicked")?;
    let load = load.await.map_err(|e| format!("submitters: {e}"))?;
    h.drain().await;
    if load.failed > 0 {
        let first = load.first_error.unwrap_or_default();
        return Err(format!("{} of {} requests failed; first: {first}", load.failed, load.ok + load.failed));
    }
    let m = Measured {
        window,
        rows: after.0 - before.0,
        executions: after.1 - before.1,
        host_ns: after.2 - before.2,
        samples,
        short_samples,
    };
    if m.executions == 0 {
        return Err("no batch executed in the measurement window".into());
    }
    Ok(m)
}

fn report(m: &Measured, times: &[Arc<CoreTimes>], alone_us: f64) {
    let secs = m.window.as_secs_f64();
    let achieved = m.rows as f64 / secs;
    let ideal = (CORES * BUCKET) as f64 / (DEVICE_US as f64 * 1e-6);
    println!(
        "scheduler efficiency: {:.2} of ideal ({CORES} cores, {DEVICE_US} us device time, bucket {BUCKET})",
        achieved / ideal
    );
    let sum = |f: fn(&CoreTimes) -> u64| times.iter().map(|t| f(t)).sum::<u64>();
    let timed = sum(|t| t.executions.load(Relaxed)).max(1) as f64;
    let busy_us = sum(|t| t.busy_ns.load(Relaxed)) as f64 / 1e3;
    let gap_us = sum(|t| t.gap_ns.load(Relaxed)) as f64 / 1e3 / timed;
    let max_gap_us = times.iter().map(|t| t.max_gap_ns.load(Relaxed)).max().unwrap_or(0) as f64 / 1e3;
    let long_gaps = sum(|t| t.long_gaps.load(Relaxed));
    let execs = m.executions as f64;
    let host_us = m.host_ns as f64 / 1e3 / execs;
    println!(
        "  {achieved:.0} rows/s of {ideal:.0} ideal; avg batch {:.2} rows; cores inside execute {:.1}% of the window",
        m.rows as f64 / execs,
        100.0 * busy_us / (secs * 1e6 * CORES as f64),
    );
    println!(
        "  per execution: {:.0} us inside execute under load ({alone_us:.0} us alone, no scheduler: ceiling {:.2} of ideal), then {gap_us:.0} us until the core's next execute",
        busy_us / timed,
        DEVICE_US as f64 / alone_us,
    );
    println!(
        "  of that gap: {host_us:.0} us instance-thread input copy + output split/replies, {:.0} us actor round trip (Done -> next batch received); max gap {max_gap_us:.0} us, {long_gaps} gaps > 200 us; queue held < 1 bucket in {:.1}% of samples",
        gap_us - host_us,
        100.0 * m.short_samples as f64 / m.samples.max(1) as f64,
    );
}
