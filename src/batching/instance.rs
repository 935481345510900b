//! The instance-thread protocol every policy follows: one OS thread owns one backend instance;
//! a backend call that panics is caught and becomes a fatal error of that instance; after each
//! batch the thread records statistics, then signals the actor that it is done (and whether it is
//! still usable), and only then sends the replies — so a client that reads statistics or issues
//! its next call after its reply finds them up to date; a fatal error retires the instance.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::oneshot;

use super::BatchingError;
use super::stats::ModelStats;
use crate::backend::BackendError;

/// Runs one backend call for instance `label`; a panic inside it is caught and returned as a
/// fatal execution error (the instance leaves service; the model keeps serving on the others).
pub(crate) fn guarded<T>(label: &str, call: impl FnOnce() -> Result<T, BackendError>) -> Result<T, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(BackendError::Execution {
            message: format!("instance {label} panicked: {what}; it is taken out of service"),
            instance_usable: false,
            nrt_status: None,
        })
    })
}

/// Whether a backend error means the instance must leave service.
pub(crate) fn is_fatal(e: &BackendError) -> bool {
    matches!(e, BackendError::Execution { instance_usable: false, .. })
}

/// One reply and where it goes.
type Pending<T> = (oneshot::Sender<Result<T, BatchingError>>, Result<T, BatchingError>);

/// Replies of one batch, held until the actor has been told the batch is done.
pub(crate) struct Replies<T> {
    pending: Vec<Pending<T>>,
}

impl<T> Replies<T> {
    /// Room for `n` replies.
    pub(crate) fn with_capacity(n: usize) -> Replies<T> {
        Replies { pending: Vec::with_capacity(n) }
    }

    /// Holds one reply.
    pub(crate) fn push(&mut self, to: oneshot::Sender<Result<T, BatchingError>>, result: Result<T, BatchingError>) {
        self.pending.push((to, result));
    }

    /// Moves `other`'s replies after these.
    pub(crate) fn append(&mut self, other: &mut Replies<T>) {
        self.pending.append(&mut other.pending);
    }

    /// Signals the actor (`done`), then sends every reply: the protocol's order.
    pub(crate) fn deliver_after(self, done: impl FnOnce()) {
        done();
        for (to, result) in self.pending {
            let _ = to.send(result);
        }
    }
}

/// Marks instance `index` in service in the statistics while the returned guard lives.
///
/// Take it before the instance's thread starts and move it into the thread: the instance is
/// then in service from the moment its model reports ready (a scrape right after a load does
/// not see a thread that has not been scheduled yet as out of service).
pub(crate) fn in_service(stats: Arc<ModelStats>, index: usize) -> InService {
    if let Some(s) = stats.instances.get(index) {
        s.in_service.store(1, Relaxed);
    }
    InService { stats, index }
}

/// See [`in_service`].
pub(crate) struct InService {
    stats: Arc<ModelStats>,
    index: usize,
}

impl Drop for InService {
    fn drop(&mut self) {
        if let Some(s) = self.stats.instances.get(self.index) {
            s.in_service.store(0, Relaxed);
        }
    }
}

/// Counts a failed batch of instance `index` (and the Neuron runtime status it carried).
pub(crate) fn record_batch_error(stats: &ModelStats, index: usize, e: &BackendError) {
    if let BackendError::Execution { nrt_status: Some(code), .. } = e {
        stats.record_nrt_status(*code);
    }
    if let Some(s) = stats.instances.get(index) {
        s.errors.fetch_add(1, Relaxed);
    }
}
