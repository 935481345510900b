//! Time an instance spends inside and between its executions, wall and (when asked) thread CPU
//! time: what the benchmark of the step loop's host overhead reads.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Time spent by an instance (shared with whoever watches it, e.g. the benchmark of host
/// overhead): counters only ever grow.
#[derive(Debug, Default)]
pub struct DecoderTimings {
    /// Calls of `forward`.
    pub steps: AtomicU64,
    /// Program executions.
    pub executions: AtomicU64,
    /// Nanoseconds inside `forward`.
    pub forward_ns: AtomicU64,
    /// Nanoseconds inside program executions (writing the three small inputs and `nrt_execute`).
    pub execute_ns: AtomicU64,
    /// Nanoseconds between the end of one `forward` and the start of the next (the step loop's
    /// own work: scheduling, sampling, streaming; idle time when there was no work).
    pub between_ns: AtomicU64,
    /// Whether the CPU-time counters below are kept (two extra clock reads per execution and one
    /// per step; off unless a benchmark turns it on).
    pub measure_cpu: std::sync::atomic::AtomicBool,
    /// CPU time of the step-loop thread from the start of one `forward` to the start of the next
    /// (all it did: its own work and the executions), summed over `cpu_cycles` such cycles.
    pub step_cpu_ns: AtomicU64,
    /// Step cycles in `step_cpu_ns`: host CPU per step = (step_cpu_ns − execute_cpu_ns) / cpu_cycles.
    pub cpu_cycles: AtomicU64,
    /// CPU time of the step-loop thread inside the executions counted by `step_cpu_ns` (writing
    /// the small inputs and `nrt_execute`; a real device waits there, the stand-in computes).
    pub execute_cpu_ns: AtomicU64,
    /// Each measured step cycle's host time outside executions, as (wall ns, thread CPU ns), in
    /// order, at most [`STEP_RECORD_LIMIT`] of them: the distribution behind the two means above
    /// (on a few shared cores the mean wall figure carries the rare steps where the thread waited
    /// for a core; the median does not).
    pub step_host: std::sync::Mutex<Vec<(u32, u32)>>,
}

/// The most step cycles [`DecoderTimings::step_host`] keeps (8 MiB).
pub const STEP_RECORD_LIMIT: usize = 1 << 20;

impl DecoderTimings {
    pub(super) fn add(counter: &AtomicU64, d: Duration) {
        counter.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Records one step cycle's host wall and CPU time (saturating at 4.2 s each).
    pub(super) fn record_step(&self, wall: Duration, cpu_ns: u64) {
        if let Ok(mut steps) = self.step_host.lock()
            && steps.len() < STEP_RECORD_LIMIT
        {
            let wall = u32::try_from(wall.as_nanos()).unwrap_or(u32::MAX);
            steps.push((wall, u32::try_from(cpu_ns).unwrap_or(u32::MAX)));
        }
    }
}

/// An instance's side of [`DecoderTimings`]: where the current step cycle (the start of one
/// `forward` to the start of the next) began and what its executions took so far.
#[derive(Debug, Default)]
pub(super) struct StepClock {
    /// When the last `forward` ended.
    last_forward_end: Option<Instant>,
    /// While CPU time is measured: when the current cycle's `forward` started, wall and thread CPU.
    cycle_start: Option<(Instant, u64)>,
    /// Wall and CPU time inside executions since then.
    cycle_execute_wall: Duration,
    cycle_execute_cpu: u64,
}

impl StepClock {
    /// A `forward` starts at `started`: closes the previous cycle into `timings`.
    pub(super) fn step_started(&mut self, timings: &DecoderTimings, started: Instant) {
        if let Some(end) = self.last_forward_end {
            DecoderTimings::add(&timings.between_ns, started.duration_since(end));
        }
        if !timings.measure_cpu.load(Relaxed) {
            self.cycle_start = None;
            return;
        }
        let now = super::cpu_clock::thread_cpu_ns();
        if let Some((wall_start, cpu_start)) = self.cycle_start {
            timings.step_cpu_ns.fetch_add(now.saturating_sub(cpu_start), Relaxed);
            timings.execute_cpu_ns.fetch_add(self.cycle_execute_cpu, Relaxed);
            timings.cpu_cycles.fetch_add(1, Relaxed);
            let wall = started.duration_since(wall_start).saturating_sub(self.cycle_execute_wall);
            timings.record_step(wall, now.saturating_sub(cpu_start).saturating_sub(self.cycle_execute_cpu));
        }
        self.cycle_execute_cpu = 0;
        self.cycle_execute_wall = Duration::ZERO;
        self.cycle_start = Some((started, now));
    }

    /// The thread's CPU time at the start of an execution, while CPU time is measured.
    pub(super) fn execute_started(&self) -> Option<u64> {
        self.cycle_start.map(|_| super::cpu_clock::thread_cpu_ns())
    }

    /// An execution that started at CPU time `cpu_started` took `inside` of wall time.
    pub(super) fn execute_ended(&mut self, timings: &DecoderTimings, cpu_started: Option<u64>, inside: Duration) {
        DecoderTimings::add(&timings.execute_ns, inside);
        if let Some(c) = cpu_started {
            self.cycle_execute_cpu += super::cpu_clock::thread_cpu_ns().saturating_sub(c);
            self.cycle_execute_wall += inside;
        }
        timings.executions.fetch_add(1, Relaxed);
    }

    /// The `forward` that started at `started` ends now.
    pub(super) fn step_ended(&mut self, timings: &DecoderTimings, started: Instant) {
        timings.steps.fetch_add(1, Relaxed);
        let end = Instant::now();
        DecoderTimings::add(&timings.forward_ns, end.duration_since(started));
        self.last_forward_end = Some(end);
    }
}
