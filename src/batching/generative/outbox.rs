//! Coalesced delivery of a step loop's updates: what one step sends to its streams leaves the
//! step-loop thread as one message to the model's delivery thread, which hands each update to
//! its stream there.
//!
//! Sending straight to each stream's channel wakes that stream's task from outside the runtime:
//! one cross-thread wake-up (often a futex call, and a runtime thread scheduled against the step
//! loop) per stream per step. Through the outbox a step costs one such wake-up whatever its batch;
//! the per-stream wake-ups happen on the delivery thread, off the step loop's path to the next
//! execution.
//!
//! The delivery thread does not preempt the step loop it was woken by
//! ([`super::delivery_thread`]): woken on the step loop's core it waits until the step loop
//! blocks in its next execution. When it was an async-runtime task, its worker thread, woken by
//! the flush right before an execution, took the step loop's core once per step (seen with
//! `perf sched` on 2 vCPUs) and held the next execution back by the time it took to hand out
//! the step's updates.
//!
//! Order is kept: every update a step-loop thread sends goes through its outbox (see
//! [`deliver`]), flushed in order into one channel that one task drains in order. A thread
//! without an outbox (no runtime at start, or not a step-loop thread) sends directly.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use std::sync::mpsc as std_mpsc;

use super::deferred_text::{self, DeferredText};
use super::request::{GenerationError, GenerationUpdate, UpdateSender};

type Message = Result<GenerationUpdate, GenerationError>;
/// An update, its stream, and the sequence's text state when its text is filled in at delivery.
type Entry = (UpdateSender, Message, Option<Arc<Mutex<DeferredText>>>);
type Batch = Vec<Entry>;

/// The pending updates of the current step-loop thread and the channel to its delivery thread.
struct Outbox {
    pending: Batch,
    to_task: std_mpsc::Sender<Batch>,
}

thread_local! {
    static OUTBOX: RefCell<Option<Outbox>> = const { RefCell::new(None) };
}

/// The delivery thread of one model's step loops. It is shared by all of them (one channel, one
/// thread), so updates reach their streams in the order the step loops flushed them, whichever
/// instance a sequence is on: a sequence moved to another instance after a failure continues its
/// stream (and its deferred text) in order, since its old instance flushed before handing it over.
#[derive(Clone)]
pub struct Delivery(std_mpsc::Sender<Batch>);

impl Delivery {
    /// Starts the delivery thread of `model`; it ends once every step loop holding it has ended.
    pub fn start(model: &str) -> std::io::Result<Delivery> {
        let (to_task, from_loop) = std_mpsc::channel::<Batch>();
        std::thread::Builder::new().name(format!("gen-{model}-out")).spawn(move || {
            super::delivery_thread::yield_on_wake_up();
            while let Ok(batch) = from_loop.recv() {
                for entry in batch {
                    send(entry);
                }
            }
        })?;
        Ok(Delivery(to_task))
    }
}

/// Gives the current thread an outbox that hands its updates to `delivery` (called once by a
/// step-loop thread at start).
pub fn install(delivery: Delivery) {
    OUTBOX.with(|o| *o.borrow_mut() = Some(Outbox { pending: Vec::new(), to_task: delivery.0 }));
}

/// Sends `message` on `stream`: queued until the next [`flush`] on a thread with an outbox, at
/// once elsewhere. `false` when the stream's receiver is gone (the client left).
pub fn deliver(stream: &UpdateSender, message: Message) -> bool {
    deliver_text(stream, message, None)
}

/// [`deliver`] for an update whose text is filled in from `text` just before it is sent (on the
/// delivery thread, or at once where there is no outbox): see [`super::deferred_text`].
pub fn deliver_text(stream: &UpdateSender, message: Message, text: Option<&Arc<Mutex<DeferredText>>>) -> bool {
    let mut entry = Some((stream.clone(), message, text.cloned()));
    let queued = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        let outbox = o.as_mut()?;
        if stream.is_closed() {
            return Some(false);
        }
        if let Some(e) = entry.take() {
            outbox.pending.push(e);
        }
        Some(true)
    });
    match queued {
        Some(open) => open,
        None => entry.is_some_and(send),
    }
}

/// Fills in a deferred text and sends; `false` when the stream's receiver is gone.
fn send((stream, mut message, text): Entry) -> bool {
    if let (Some(text), Ok(update)) = (&text, &mut message) {
        deferred_text::fill(text, update);
    }
    stream.send(message).is_ok()
}

/// Hands the updates queued on this thread to its delivery thread (one wake-up). When the thread
/// is gone they are sent directly instead.
pub fn flush() {
    let batch = OUTBOX.with(|o| {
        let mut o = o.borrow_mut();
        let outbox = o.as_mut()?;
        if outbox.pending.is_empty() {
            return None;
        }
        let batch = std::mem::take(&mut outbox.pending);
        match outbox.to_task.send(batch) {
            Ok(()) => None,
            Err(std_mpsc::SendError(batch)) => Some(batch),
        }
    });
    for entry in batch.into_iter().flatten() {
        send(entry);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    fn update(n: u32) -> Message {
        Ok(GenerationUpdate { tokens: vec![n], ..Default::default() })
    }

    #[test]
    fn without_an_outbox_updates_go_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(deliver(&tx, update(1)));
        assert_eq!(rx.try_recv().ok().and_then(|m| m.ok()).map(|u| u.tokens), Some(vec![1]));
        drop(rx);
        assert!(!deliver(&tx, update(2)), "a closed stream reports the client gone");
    }

    #[test]
    fn a_step_loop_thread_delivers_in_order_at_flush() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        let (a, mut ra) = mpsc::unbounded_channel();
        let (b, mut rb) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            install(Delivery::start("test").unwrap());
            for n in 0..3 {
                assert!(deliver(&a, update(n)));
                assert!(deliver(&b, update(10 + n)));
            }
            assert!(deliver(&a, Err(GenerationError::Unavailable { reason: "last".into() })));
            flush();
        })
        .join()
        .unwrap();
        runtime.block_on(async {
            for n in 0..3 {
                assert_eq!(ra.recv().await.unwrap().unwrap().tokens, vec![n]);
                assert_eq!(rb.recv().await.unwrap().unwrap().tokens, vec![10 + n]);
            }
            assert!(ra.recv().await.unwrap().is_err(), "the error comes after the updates");
            assert!(ra.recv().await.is_none(), "the channel closes once every update was handed over");
        });
    }
}
