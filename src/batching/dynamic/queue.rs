//! The queue the actor owns: FIFO per priority level, purging of cancelled and expired requests,
//! and batch formation (largest batch that fits, preferred sizes honoured).

use std::collections::VecDeque;
use std::time::Instant;

use super::InferRequest;

/// A queued request with its queue deadline.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) req: InferRequest,
    pub(crate) deadline: Option<Instant>,
}

/// Inner dimensions that must agree for requests to share a batch: everything past the first
/// non-batch dimension of every input (the first non-batch dimension may be padded).
fn compat_key(req: &InferRequest) -> impl Iterator<Item = usize> + '_ {
    req.inputs.iter().flat_map(|i| i.shape.iter().skip(2).copied().chain(std::iter::once(usize::MAX)))
}

/// Requests by priority level (index 0 = level 1, the highest), FIFO within a level.
#[derive(Debug)]
pub(crate) struct Queue {
    levels: Vec<VecDeque<Queued>>,
    len: usize,
}

/// What [`Queue::purge`] removed.
#[derive(Debug, Default)]
pub(crate) struct Purged {
    pub(crate) cancelled: Vec<Queued>,
    pub(crate) expired: Vec<Queued>,
}

impl Queue {
    /// A queue with `levels` priority levels (at least 1).
    pub(crate) fn new(levels: usize) -> Queue {
        Queue { levels: (0..levels.max(1)).map(|_| VecDeque::new()).collect(), len: 0 }
    }

    /// Requests queued.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a request at `level` (1-based, clamped to the configured levels).
    pub(crate) fn push(&mut self, q: Queued, level: u64) {
        let idx = (level.max(1) as usize - 1).min(self.levels.len() - 1);
        self.levels[idx].push_back(q);
        self.len += 1;
    }

    /// Puts a request back at the head of `level` (work handed back by an instance leaving service).
    pub(crate) fn push_front(&mut self, q: Queued, level: u64) {
        let idx = (level.max(1) as usize - 1).min(self.levels.len() - 1);
        self.levels[idx].push_front(q);
        self.len += 1;
    }

    /// Removes requests whose client went away or whose deadline passed.
    pub(crate) fn purge(&mut self, now: Instant) -> Purged {
        let mut out = Purged::default();
        for level in &mut self.levels {
            let mut i = 0;
            while i < level.len() {
                let q = &level[i];
                if q.req.reply.is_closed() {
                    out.cancelled.extend(level.remove(i));
                } else if q.deadline.is_some_and(|d| d <= now) {
                    out.expired.extend(level.remove(i));
                } else {
                    i += 1;
                }
            }
        }
        self.len -= out.cancelled.len() + out.expired.len();
        out
    }

    /// The earliest arrival among queued requests.
    pub(crate) fn oldest_arrival(&self) -> Option<Instant> {
        self.levels.iter().filter_map(|l| l.front()).map(|q| q.req.arrived).min()
    }

    /// The earliest queue deadline among queued requests.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.levels.iter().flatten().filter_map(|q| q.deadline).min()
    }

    fn in_order(&self) -> impl Iterator<Item = &Queued> {
        self.levels.iter().flatten()
    }

    /// Rows that one batch could take now, in priority-then-arrival order, up to `max_rows`
    /// (a first request larger than `max_rows` counts alone: it will be split by the instance).
    pub(crate) fn available_rows(&self, max_rows: usize) -> usize {
        let mut it = self.in_order();
        let Some(first) = it.next() else { return 0 };
        let mut rows = first.req.rows;
        let key: Vec<usize> = compat_key(&first.req).collect();
        for q in it {
            if rows >= max_rows {
                break;
            }
            if rows + q.req.rows > max_rows {
                break;
            }
            if compat_key(&q.req).eq(key.iter().copied()) {
                rows += q.req.rows;
            }
        }
        rows
    }

    /// Takes the next batch: the largest preferred size that can be formed (when any is set and
    /// reachable), else everything available up to `max_rows`. Returns the requests and their rows.
    pub(crate) fn take_batch(&mut self, max_rows: usize, preferred: &[usize]) -> (Vec<Queued>, usize) {
        let avail = self.available_rows(max_rows);
        let target = preferred.iter().copied().filter(|p| *p <= avail).max().unwrap_or(avail).max(1);
        let mut taken = Vec::new();
        let mut rows = 0;
        let mut key: Option<Vec<usize>> = None;
        'levels: for level in &mut self.levels {
            let mut i = 0;
            while i < level.len() {
                let r = level[i].req.rows;
                if !taken.is_empty() && rows + r > target {
                    break 'levels;
                }
                let k: Vec<usize> = compat_key(&level[i].req).collect();
                if key.as_ref().is_some_and(|key| *key != k) {
                    i += 1;
                    continue;
                }
                key.get_or_insert(k);
                rows += r;
                taken.extend(level.remove(i));
                if rows >= target {
                    break 'levels;
                }
            }
        }
        self.len -= taken.len();
        (taken, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batching::RequestInput;
    use bytes::Bytes;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn req(
        rows: usize,
        tag: u8,
    ) -> (Queued, oneshot::Receiver<Result<crate::batching::InferReply, crate::batching::BatchingError>>) {
        let (tx, rx) = oneshot::channel();
        let input = RequestInput { shape: vec![rows, 1], data: Bytes::from(vec![tag; rows]) };
        let req = InferRequest {
            inputs: vec![input],
            rows,
            priority: 0,
            timeout: None,
            sequence: Default::default(),
            reply: tx,
            arrived: Instant::now(),
        };
        (Queued { req, deadline: None }, rx)
    }

    fn tags(batch: &[Queued]) -> Vec<u8> {
        batch.iter().map(|q| q.req.inputs[0].data[0]).collect()
    }

    #[test]
    fn takes_highest_priority_first_then_fifo() {
        let mut q = Queue::new(2);
        let mut keep = Vec::new();
        for (tag, level) in [(1, 2), (2, 1), (3, 2), (4, 1)] {
            let (r, rx) = req(1, tag);
            keep.push(rx);
            q.push(r, level);
        }
        let (batch, rows) = q.take_batch(3, &[]);
        assert_eq!(rows, 3);
        assert_eq!(tags(&batch), vec![2, 4, 1]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn preferred_size_limits_batch_and_rows_count() {
        let mut q = Queue::new(1);
        let mut keep = Vec::new();
        for tag in 0..10 {
            let (r, rx) = req(if tag == 0 { 3 } else { 1 }, tag);
            keep.push(rx);
            q.push(r, 1);
        }
        assert_eq!(q.available_rows(16), 12);
        let (batch, rows) = q.take_batch(16, &[4, 8]);
        assert_eq!(rows, 8);
        assert_eq!(batch.len(), 6);
        let (_, rows) = q.take_batch(16, &[4, 8]);
        assert_eq!(rows, 4);
        assert!(q.is_empty());
    }

    #[test]
    fn purge_drops_cancelled_and_expired() {
        let mut q = Queue::new(1);
        let (a, rx_a) = req(1, 1);
        let (mut b, _rx_b) = req(1, 2);
        b.deadline = Some(Instant::now());
        let (c, _rx_c) = req(1, 3);
        drop(rx_a);
        q.push(a, 1);
        q.push(b, 1);
        q.push(c, 1);
        let p = q.purge(Instant::now() + Duration::from_millis(1));
        assert_eq!(tags(&p.cancelled), vec![1]);
        assert_eq!(tags(&p.expired), vec![2]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn oversized_first_request_goes_alone() {
        let mut q = Queue::new(1);
        let (a, _ra) = req(20, 1);
        let (b, _rb) = req(1, 2);
        q.push(a, 1);
        q.push(b, 1);
        let (batch, rows) = q.take_batch(16, &[]);
        assert_eq!((tags(&batch), rows), (vec![1], 20));
    }
}
