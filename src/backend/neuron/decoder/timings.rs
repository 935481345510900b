//! Time an instance spends inside and between its executions, wall and (when asked) thread CPU
//! time: what the benchmark of the step loop's host overhead reads.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

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
