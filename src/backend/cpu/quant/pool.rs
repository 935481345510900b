//! A small persistent thread pool for the quantized kernels: workers spin briefly after a job (so
//! back-to-back matrix products of one decode step do not pay a wake-up each; not where the
//! process's CPUs are hyperthreads of one core, where a spinning worker slows the thread doing the
//! work), then sleep on a condition variable — no busy-waiting while the model is idle. The caller
//! claims tasks too, so a worker that wakes late costs little.
//!
//! Jobs are `Arc`s of owned data, so no borrow crosses a thread (no lifetime erasure). Which thread
//! computes which rows never changes a result: every output is reduced by one fixed order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Work split into numbered tasks that any thread may run.
pub(crate) trait PoolJob: Send + Sync {
    /// Runs the next unclaimed task; false when none is left.
    fn run_next(&self) -> bool;
    /// True when every task has finished.
    fn finished(&self) -> bool;
}

struct State {
    generation: u64,
    job: Option<Arc<dyn PoolJob>>,
    sleeping: usize,
    busy: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    done_lock: Mutex<()>,
    generation: AtomicU64,
    spin: Duration,
}

/// Spin after a job, in microseconds, when the pool's CPUs are separate cores (no two of the
/// CPUs this process may run on are SMT siblings): workers stay awake across the back-to-back
/// products of a decode step instead of being woken ~150 times a step. SmolLM2-135M Q4_1 through
/// the server on a 2-vCPU Xeon whose vCPUs are separate cores: single-stream ITL median 8.6 ms
/// at 0 µs, 4.5–5.1 ms at 50 µs; 16 streams 284–300 → 310 tok/s (docs/benchmarks.md).
pub const DEFAULT_SPIN_US: u64 = 50;

/// The pool the quantized kernels share (one per process).
pub struct QuantPool {
    shared: Arc<Shared>,
    threads: usize,
}

impl QuantPool {
    /// The process-wide pool: `NEURON_WORKER_QUANT_THREADS` threads (default: the available
    /// parallelism), the caller counting as one; workers spin `NEURON_WORKER_QUANT_SPIN_US`
    /// microseconds before sleeping (default [`DEFAULT_SPIN_US`] on separate cores, 0 when some of
    /// the process's CPUs are hyperthreads of one core: a spinning sibling slows the thread doing
    /// the work).
    pub fn global() -> &'static QuantPool {
        static POOL: OnceLock<QuantPool> = OnceLock::new();
        POOL.get_or_init(|| {
            let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
            let threads = env("NEURON_WORKER_QUANT_THREADS")
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
                .clamp(1, 256);
            QuantPool::new(
                threads,
                Duration::from_micros(env("NEURON_WORKER_QUANT_SPIN_US").map_or_else(default_spin_us, |v| v as u64)),
            )
        })
    }

    /// A pool of `threads` (the caller included) whose workers spin `spin` before sleeping.
    pub fn new(threads: usize, spin: Duration) -> QuantPool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { generation: 0, job: None, sleeping: 0, busy: false }),
            wake: Condvar::new(),
            done: Condvar::new(),
            done_lock: Mutex::new(()),
            generation: AtomicU64::new(0),
            spin,
        });
        let mut started = 1;
        for i in 1..threads.max(1) {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new().name(format!("quant-{i}")).spawn(move || worker(&s));
            if spawned.is_ok() {
                started += 1;
            }
        }
        QuantPool { shared, threads: started }
    }

    /// Threads that run a job (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// How long workers spin after a job before sleeping.
    pub fn spin(&self) -> Duration {
        self.shared.spin
    }

    /// Runs `job` to completion on the calling thread and the workers. When another job is in
    /// flight (two models sharing the pool), the caller runs this one alone.
    pub(crate) fn run(&self, job: Arc<dyn PoolJob>) {
        let posted = self.threads > 1 && {
            let Ok(mut st) = self.shared.state.lock() else { return run_alone(&*job) };
            if st.busy {
                false
            } else {
                st.busy = true;
                st.job = Some(Arc::clone(&job));
                st.generation += 1;
                self.shared.generation.store(st.generation, Ordering::Release);
                if st.sleeping > 0 {
                    self.shared.wake.notify_all();
                }
                true
            }
        };
        while job.run_next() {}
        if posted {
            let start = Instant::now();
            while !job.finished() && start.elapsed() < self.shared.spin {
                std::hint::spin_loop();
            }
            if !job.finished()
                && let Ok(mut g) = self.shared.done_lock.lock()
            {
                while !job.finished() {
                    match self.shared.done.wait_timeout(g, Duration::from_millis(5)) {
                        Ok((ng, _)) => g = ng,
                        Err(_) => break,
                    }
                }
            }
            if let Ok(mut st) = self.shared.state.lock() {
                st.job = None;
                st.busy = false;
            }
        }
    }
}

/// The default spin: [`DEFAULT_SPIN_US`] unless two CPUs this process may run on are SMT siblings
/// (Linux: `Cpus_allowed_list` of `/proc/self/status` and each CPU's `thread_siblings_list`); 0 on
/// siblings, or when the topology cannot be read.
pub fn default_spin_us() -> u64 {
    let read = |path: String| std::fs::read_to_string(path).ok();
    let Some(status) = read("/proc/self/status".into()) else { return 0 };
    let Some(allowed) = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(cpu_list) else {
        return 0;
    };
    let shares_a_core = allowed.iter().any(|&cpu| {
        read(format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"))
            .is_none_or(|siblings| cpu_list(&siblings).iter().any(|&s| s != cpu && allowed.contains(&s)))
    });
    if shares_a_core { 0 } else { DEFAULT_SPIN_US }
}

/// Parses a Linux CPU list (`0-3,8,10-11`); malformed parts are skipped.
fn cpu_list(text: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in text.trim().split(',') {
        let mut ends = part.trim().splitn(2, '-').map(|x| x.trim().parse::<usize>());
        match (ends.next(), ends.next()) {
            (Some(Ok(a)), None) => out.push(a),
            (Some(Ok(a)), Some(Ok(b))) if b >= a && b - a < 4096 => out.extend(a..=b),
            _ => {}
        }
    }
    out
}

fn run_alone(job: &dyn PoolJob) {
    while job.run_next() {}
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        while s.generation.load(Ordering::Acquire) == seen && start.elapsed() < s.spin {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
        }
        let job = {
            let Ok(mut st) = s.state.lock() else { return };
            while st.generation == seen {
                st.sleeping += 1;
                st = match s.wake.wait(st) {
                    Ok(g) => g,
                    Err(_) => return,
                };
                st.sleeping -= 1;
            }
            seen = st.generation;
            st.job.clone()
        };
        if let Some(job) = job {
            while job.run_next() {}
            let finished = job.finished();
            drop(job);
            if finished {
                let _g = s.done_lock.lock();
                s.done.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(cpu_list("5"), vec![5]);
        assert_eq!(cpu_list("x,2-1,4"), vec![4]);
        assert!(matches!(default_spin_us(), 0 | DEFAULT_SPIN_US));
    }
}
