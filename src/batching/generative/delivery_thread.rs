//! The scheduling class of a model's delivery thread ([`super::outbox`]): it must not take the
//! core of the step loop that just woke it.
//!
//! A step loop flushes its step's updates right before it blocks in the next execution. The
//! thread it wakes is runnable at once; under the kernel's normal policy a woken thread may
//! preempt the thread that woke it, and on a machine with few cores it often lands on the step
//! loop's core and does, holding the next execution back by the time it takes to hand out the
//! step's updates (on 2 vCPUs: about once per step, 35–40 µs each, `perf sched`). Under
//! `SCHED_BATCH` (Linux; same nice level, same share of the CPU over time) a woken thread does not
//! preempt: it runs on an idle core at once, else as soon as the step loop blocks in its
//! execution, a few microseconds later.

/// Puts the calling thread in the `SCHED_BATCH` class where the OS has it (Linux); elsewhere, or
/// when the call is refused, the thread stays as it is (only slower to leave the core alone).
pub fn yield_on_wake_up() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0 names the
        // calling thread; SCHED_BATCH takes priority 0 and needs no privilege. A failure only
        // returns -1, handled below.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "delivery thread stays in the normal scheduling class");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn the_calling_thread_is_batch_scheduled() {
        std::thread::spawn(|| {
            super::yield_on_wake_up();
            // SAFETY: pid 0 names the calling thread; the call only reads its policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }
}
