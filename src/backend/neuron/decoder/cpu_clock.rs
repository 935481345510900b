//! The calling thread's CPU time, for the host-overhead figures of [`super::DecoderTimings`]: on a
//! machine whose cores are shared, wall time between executions includes waiting for a core;
//! CPU time is what the step loop itself costs.

/// Nanoseconds of CPU the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`); 0 where the clock
/// is not available.
pub fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec for the duration of the call; the clock id is a
    // constant the kernel knows (an unknown one would only return an error, handled below).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return 0;
    }
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn grows_with_work_done_on_this_thread() {
        let before = super::thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(super::thread_cpu_ns() > before, "{x}");
    }
}
