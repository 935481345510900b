//! Sending the load for one point: a closed loop (N requests always in flight) or an open loop
//! (requests at a fixed rate, at most N in flight), with a warm-up that is not measured.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use tokio::sync::{Mutex, Semaphore};

use super::error::{BenchError, code_name};
use super::inputs::InputSet;
use super::model::ModelInfo;
use super::pool::Pool;
use super::server_stats::{self, ServerSplit};

/// Highest latency the histograms hold, µs (longer ones are clamped to it).
const MAX_LATENCY_US: u64 = 3_600_000_000;

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// How open-loop arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    /// Exponential gaps (a Poisson process), like independent clients.
    Poisson,
    /// Equal gaps.
    Uniform,
}

/// One point of the run.
#[derive(Debug, Clone, Copy)]
pub struct PointPlan {
    /// Requests in flight (closed loop) or the cap on them (open loop).
    pub concurrency: u32,
    /// Unmeasured time before the window.
    pub warmup: Duration,
    /// The measurement window.
    pub duration: Duration,
    /// Open loop: requests per second and their spacing; `None` = closed loop.
    pub rate: Option<(f64, Arrivals)>,
}

/// What one point measured.
#[derive(Debug)]
pub struct PointOutcome {
    /// Latency of the successful requests that completed in the window, µs.
    pub latency: Histogram<u64>,
    /// Successful requests completed in the window.
    pub completed: u64,
    /// Failed requests in the window, by gRPC status code name.
    pub errors: BTreeMap<&'static str, u64>,
    /// The window's actual length.
    pub window: Duration,
    /// The worker's own queue/compute split over the window.
    pub server: ServerSplit,
}

/// Results of one load task.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    completed: u64,
    errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn new(empty: &Histogram<u64>) -> Tally {
        Tally { latency: empty.clone(), completed: 0, errors: BTreeMap::new() }
    }

    fn record(&mut self, result: Result<(), tonic::Code>, latency: Duration) {
        match result {
            Ok(()) => {
                self.completed += 1;
                self.latency.saturating_record((latency.as_micros() as u64).clamp(1, MAX_LATENCY_US));
            }
            Err(code) => *self.errors.entry(code_name(code)).or_insert(0) += 1,
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.completed += other.completed;
        // Same bounds on both sides, so adding cannot go out of range.
        let _ = self.latency.add(&other.latency);
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
    }
}

async fn send(pool: &Pool, inputs: &InputSet, i: usize) -> Result<(), tonic::Code> {
    let req = pool.request(inputs.request(i));
    pool.client().model_infer(req).await.map(|_| ()).map_err(|s| s.code())
}

/// Sleeps `d`, moving the progress bar along (its unit is milliseconds).
pub(super) async fn wait(d: Duration, progress: &ProgressBar) {
    let end = Instant::now() + d;
    let mut shown = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep((end - now).min(Duration::from_millis(100))).await;
        let done = (d - end.saturating_duration_since(Instant::now())).as_millis() as u64;
        progress.inc(done.saturating_sub(shown));
        shown = done;
    }
}

/// Runs one point: warm-up, then the measured window bracketed by ModelStatistics reads.
pub async fn run_point(
    pool: Arc<Pool>,
    inputs: Arc<InputSet>,
    model: &ModelInfo,
    plan: PointPlan,
    progress: &ProgressBar,
) -> Result<PointOutcome, BenchError> {
    let empty = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| BenchError::Histogram(e.to_string()))?;
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let sink = Arc::new(Mutex::new(Tally::new(&empty)));
    let driver = match plan.rate {
        None => tokio::spawn(closed_loop(
            pool.clone(),
            inputs,
            phase.clone(),
            plan.concurrency,
            sink.clone(),
            empty.clone(),
        )),
        Some((rate, arrivals)) => {
            tokio::spawn(open_loop(pool.clone(), inputs, phase.clone(), plan.concurrency, rate, arrivals, sink.clone()))
        }
    };
    wait(plan.warmup, progress).await;
    let before = server_stats::snapshot(&pool, &model.name, &model.version).await;
    phase.store(MEASURE, Ordering::Release);
    let start = Instant::now();
    wait(plan.duration, progress).await;
    let after = server_stats::snapshot(&pool, &model.name, &model.version).await;
    phase.store(STOP, Ordering::Release);
    let window = start.elapsed();
    // The driver ends once its in-flight requests return (bounded by the request timeout).
    let _ = driver.await;
    let tally = std::mem::replace(&mut *sink.lock().await, Tally::new(&empty));
    Ok(PointOutcome {
        latency: tally.latency,
        completed: tally.completed,
        errors: tally.errors,
        window,
        server: server_stats::split(before, after),
    })
}

/// `concurrency` tasks, each sending its next request as soon as the previous one returns.
async fn closed_loop(
    pool: Arc<Pool>,
    inputs: Arc<InputSet>,
    phase: Arc<AtomicU8>,
    concurrency: u32,
    sink: Arc<Mutex<Tally>>,
    empty: Histogram<u64>,
) {
    let mut tasks = Vec::with_capacity(concurrency as usize);
    for task in 0..concurrency as usize {
        let (pool, inputs, phase, sink) = (pool.clone(), inputs.clone(), phase.clone(), sink.clone());
        let mut tally = Tally::new(&empty);
        tasks.push(tokio::spawn(async move {
            let mut i = task;
            while phase.load(Ordering::Acquire) != STOP {
                let sent = Instant::now();
                let result = send(&pool, &inputs, i).await;
                let latency = sent.elapsed();
                if phase.load(Ordering::Acquire) == MEASURE {
                    tally.record(result, latency);
                }
                i = i.wrapping_add(1);
            }
            sink.lock().await.merge(&tally);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Requests at `rate` per second; latency counts from the scheduled send time, so a request that
/// waits for one of the `cap` slots is charged for the wait (no coordinated omission).
async fn open_loop(
    pool: Arc<Pool>,
    inputs: Arc<InputSet>,
    phase: Arc<AtomicU8>,
    cap: u32,
    rate: f64,
    arrivals: Arrivals,
    sink: Arc<Mutex<Tally>>,
) {
    let slots = Arc::new(Semaphore::new(cap as usize));
    let mean_gap = 1.0 / rate;
    let mut next = Instant::now();
    let mut i = 0usize;
    while phase.load(Ordering::Acquire) != STOP {
        let gap = match arrivals {
            Arrivals::Uniform => mean_gap,
            Arrivals::Poisson => -mean_gap * (1.0 - rand::random::<f64>()).ln(),
        };
        next += Duration::from_secs_f64(gap);
        tokio::time::sleep_until(next.into()).await;
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (pool, inputs, phase, sink) = (pool.clone(), inputs.clone(), phase.clone(), sink.clone());
        let scheduled = next;
        tokio::spawn(async move {
            let result = send(&pool, &inputs, i).await;
            let latency = scheduled.elapsed();
            if phase.load(Ordering::Acquire) == MEASURE {
                sink.lock().await.record(result, latency);
            }
            drop(slot);
        });
        i = i.wrapping_add(1);
    }
    // Wait for the requests still in flight.
    let _ = slots.acquire_many(cap).await;
}
