//! An instance thread: owns one backend instance (one NeuronCore, or one CPU instance), copies each
//! batch's rows once into its reused batch buffers, pads to the bucket (rows of zeros; shorter
//! sequences padded with zeros, i.e. pad tokens with attention mask 0), splits work larger than the
//! largest bucket, executes, and sends each request its own rows (padding dropped).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Command;
use crate::backend::{BackendError, BatchInput, ModelInstance, NamedTensor};
use crate::batching::admission::Admission;
use crate::batching::instance::{self as protocol, Replies};
use crate::batching::stats::{BatchPhases, FailureReason};
use crate::batching::{BatchingError, InferReply, InferRequest};
use crate::tensor::{Tensor, TensorView};

/// A batch handed from the actor to an instance.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The requests, in queue order.
    pub(crate) requests: Vec<InferRequest>,
    /// Each request's queue deadline (by position; missing = none): checked again when the batch
    /// starts, since a batch handed ahead to a busy instance may wait there.
    pub(crate) deadlines: Vec<Option<Instant>>,
}

/// The actor's end of an instance: its batch channel, and the instance itself for batches the
/// actor runs inline (see [`InstanceHandle::run_inline`]).
#[derive(Debug)]
pub(crate) struct InstanceHandle {
    tx: std::sync::mpsc::Sender<Batch>,
    worker: Arc<Mutex<Worker>>,
}

/// Batches whose recent cost (copy, execute, split) averages below this may run on the actor's
/// thread when the instance is idle and allows it: two thread hand-offs cost more than the model.
/// Unoptimised (debug) builds run everything, hand-offs included, about ten times slower, so the
/// bound scales with them (what counts as tiny is the same model either way).
pub(crate) const INLINE_MAX: Duration =
    if cfg!(debug_assertions) { Duration::from_micros(400) } else { Duration::from_micros(20) };

/// A batch's cost counts in the moving average for at most this multiple of [`INLINE_MAX`].
const COST_CLAMP: u64 = 2;

/// What running a batch leaves: whether the instance is still usable, and the replies to send
/// once the actor knows it is done.
pub(crate) type Finished = (bool, Replies<InferReply>);

impl InstanceHandle {
    /// Hands `batch` to the instance thread; gives it back when the thread has stopped.
    pub(crate) fn send(&self, batch: Batch) -> Result<(), Batch> {
        self.tx.send(batch).map_err(|e| e.0)
    }

    /// Runs `batch` on the calling thread when the instance allows it
    /// ([`ModelInstance::may_run_inline`]), its batches have recently cost less than
    /// [`INLINE_MAX`] and its thread is not using it; else gives the batch back. The caller must
    /// not have a batch outstanding on this instance (batches then run in the order sent).
    pub(crate) fn run_inline(&self, batch: Batch) -> Result<Finished, Batch> {
        let mut worker = match self.worker.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(batch),
        };
        if !worker.inline || worker.cost_ns >= INLINE_MAX.as_nanos() as u64 {
            return Err(batch);
        }
        Ok(worker.process(batch))
    }
}

pub(super) fn spawn(
    index: usize,
    instance: Box<dyn ModelInstance>,
    shared: Arc<Admission>,
    done: mpsc::UnboundedSender<Command>,
) -> InstanceHandle {
    let (tx, rx) = std::sync::mpsc::channel::<Batch>();
    let name = format!("{}-{}", shared.spec.name, instance.label());
    let inline = instance.may_run_inline();
    let stats = shared.stats.clone();
    let worker = Worker { index, instance, shared, buffers: Vec::new(), shapes: Vec::new(), inline, cost_ns: u64::MAX };
    let worker = Arc::new(Mutex::new(worker));
    let thread_worker = worker.clone();
    let in_service = protocol::in_service(stats, index);
    let run = move || {
        let _in_service = in_service;
        while let Ok(batch) = rx.recv() {
            // The lock is released before the replies go out, so the actor can run the next batch
            // inline as soon as it has handled Done.
            let (usable, replies) = lock(&thread_worker).process(batch);
            replies.deliver_after(|| {
                let _ = done.send(Command::Done { instance: index, usable });
            });
            if !usable {
                // Out of service: hand every batch already sent here back to the queue. The actor
                // drops its sender when it handles our Done, which ends this loop.
                while let Ok(b) = rx.recv() {
                    let _ = done.send(Command::Requeue(b.requests));
                }
                break;
            }
        }
    };
    if let Err(e) = std::thread::Builder::new().name(name).spawn(run) {
        tracing::error!(error = %e, "cannot start instance thread");
    }
    InstanceHandle { tx, worker }
}

/// The worker, also after a panic outside the backend call (the guarded call catches those).
fn lock(worker: &Mutex<Worker>) -> std::sync::MutexGuard<'_, Worker> {
    worker.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Worker {
    index: usize,
    instance: Box<dyn ModelInstance>,
    shared: Arc<Admission>,
    buffers: Vec<Vec<u8>>,
    shapes: Vec<Vec<usize>>,
    /// The instance allows [`InstanceHandle::run_inline`].
    inline: bool,
    /// Moving average of a batch's cost in ns (`u64::MAX` before the first batch).
    cost_ns: u64,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("index", &self.index).field("cost_ns", &self.cost_ns).finish()
    }
}

/// Where each request's rows sit in the batch, and its sequence length when sequences were padded.
struct Layout {
    offsets: Vec<(usize, usize, Option<usize>)>,
    total_rows: usize,
    padded_seq: Option<usize>,
}

impl Worker {
    fn model(&self) -> String {
        self.shared.spec.name.clone()
    }

    /// Runs one batch; returns whether the instance is still usable and the replies, which the
    /// caller sends after signalling the actor (so the next batch is on its way while they go
    /// out). Requests whose client left or
    /// whose deadline passed while the batch waited (it may have been handed ahead to this busy
    /// instance) are skipped; a batch whose sequence lengths differ too much runs as several
    /// executions ([`super::groups`]); a batch that fails without taking the instance down is run
    /// again one request at a time, so the failure reaches only the request that caused it.
    fn process(&mut self, batch: Batch) -> Finished {
        let stats = self.shared.stats.clone();
        let start = Instant::now();
        let mut replies = Replies::with_capacity(batch.requests.len());
        let mut requests = Vec::with_capacity(batch.requests.len());
        let deadlines = batch.deadlines.into_iter().chain(std::iter::repeat(None));
        for (r, deadline) in batch.requests.into_iter().zip(deadlines) {
            if r.reply.is_closed() {
                stats.record_failure(FailureReason::Cancelled, r.arrived.elapsed());
            } else if let Some(d) = deadline.filter(|d| *d <= start) {
                let waited = r.arrived.elapsed();
                stats.record_failure(FailureReason::Timeout, waited);
                let timeout_us = d.saturating_duration_since(r.arrived).as_micros() as u64;
                let e =
                    BatchingError::Timeout { model: self.model(), waited_us: waited.as_micros() as u64, timeout_us };
                replies.push(r.reply, Err(e));
            } else {
                requests.push(r);
            }
        }
        let mut fatal = None;
        for group in super::groups::by_padding(&self.shared.spec, requests) {
            fatal = self.run_isolating(group, start, fatal, &mut replies);
        }
        // One batch that took long because its thread lost the CPU mid-run (a busy machine) must
        // not send the next dozens to the instance thread: a batch counts for at most
        // COST_CLAMP × INLINE_MAX. A model that is really that slow still averages above the
        // bound after a few batches.
        let cost = start.elapsed().as_nanos() as u64;
        let cost = cost.min(COST_CLAMP * INLINE_MAX.as_nanos() as u64);
        self.cost_ns = if self.cost_ns == u64::MAX { cost } else { (self.cost_ns * 7 + cost) / 8 };
        (fatal.is_none(), replies)
    }

    /// Executes `requests` as one batch and holds each its reply; a batch of several that fails
    /// with an error that leaves the instance usable is run again one request at a time. Returns
    /// the fatal error that took the instance out of service, if one did (`fatal` on entry: an
    /// earlier one, and the requests are answered with it without running).
    fn run_isolating(
        &mut self,
        requests: Vec<InferRequest>,
        start: Instant,
        fatal: Option<BatchingError>,
        replies: &mut Replies<InferReply>,
    ) -> Option<BatchingError> {
        let stats = self.shared.stats.clone();
        if let Some(e) = fatal {
            for req in requests {
                stats.record_failure(FailureReason::Backend, req.arrived.elapsed());
                replies.push(req.reply, Err(e.clone()));
            }
            return Some(e);
        }
        let first = requests.first()?;
        let result = if self.shared.spec.batches() { self.run_batched(&requests) } else { self.run_single(first) };
        let index = self.index;
        match result {
            Ok((outputs, timings)) => {
                // Triton's per-request semantics: every request of the batch spent the batch's time.
                let rows: usize = requests.iter().map(|r| r.rows).sum();
                let phases = BatchPhases { input: timings.input, infer: timings.infer, output: timings.split };
                stats.record_batch(requests.len(), rows, phases, &timings.executions);
                if let Some(s) = stats.instances.get(index) {
                    s.executions.fetch_add(timings.executions.len() as u64, Relaxed);
                }
                for (req, outs) in requests.into_iter().zip(outputs) {
                    stats.record_success(start.saturating_duration_since(req.arrived), req.arrived.elapsed());
                    replies.push(req.reply, Ok(InferReply { outputs: outs }));
                }
                None
            }
            Err(e) if !e.is_fatal() && requests.len() > 1 => {
                tracing::warn!(model = %self.shared.spec.name, instance = %self.instance.label(), requests = requests.len(), error = %e,
                    "batch failed; running its requests one at a time so the failure reaches only the request that caused it");
                let mut fatal = None;
                for req in requests {
                    fatal = self.run_isolating(vec![req], start, fatal, replies);
                }
                fatal
            }
            Err(e) => {
                // A request the backend refused is the client's error, not the instance's.
                let client = matches!(
                    e,
                    BatchingError::TooLarge { .. }
                        | BatchingError::Backend { source: BackendError::InvalidInput { .. }, .. }
                );
                let reason = if client { FailureReason::InvalidRequest } else { FailureReason::Backend };
                if client {
                    tracing::debug!(model = %self.shared.spec.name, error = %e, "request refused by the backend");
                } else {
                    if let BatchingError::Backend { source, .. } = &e {
                        protocol::record_batch_error(&stats, index, source);
                    } else if let Some(s) = stats.instances.get(index) {
                        s.errors.fetch_add(1, Relaxed);
                    }
                    tracing::warn!(model = %self.shared.spec.name, instance = %self.instance.label(), error = %e, "batch failed");
                }
                let fatal = e.is_fatal().then(|| e.clone());
                for req in requests {
                    stats.record_failure(reason, req.arrived.elapsed());
                    replies.push(req.reply, Err(e.clone()));
                }
                fatal
            }
        }
    }

    /// A model without a batch dimension: one request, its tensors as they are.
    fn run_single(&mut self, req: &InferRequest) -> Result<(Vec<Vec<NamedTensor>>, Timings), BatchingError> {
        let spec = self.shared.spec.clone();
        let inputs: Vec<BatchInput<'_>> = spec
            .inputs
            .iter()
            .zip(&req.inputs)
            .map(|(s, i)| BatchInput {
                name: &s.name,
                tensor: TensorView { dtype: s.dtype, shape: &i.shape, data: &i.data },
            })
            .collect();
        let t = Instant::now();
        let out = guarded_execute(self.instance.as_mut(), &spec.name, &inputs)?;
        let infer = t.elapsed();
        Ok((vec![out], Timings { input: Duration::ZERO, infer, split: Duration::ZERO, executions: vec![(1, infer)] }))
    }

    fn layout(&self, requests: &[InferRequest]) -> Result<Layout, BatchingError> {
        let spec = &self.shared.spec;
        let seq_inputs: Vec<usize> =
            spec.inputs.iter().enumerate().filter(|(_, s)| s.dims.first() == Some(&-1)).map(|(i, _)| i).collect();
        let mut offsets = Vec::with_capacity(requests.len());
        let mut total_rows = 0;
        let mut max_seq = 0;
        for r in requests {
            let seq = seq_inputs.first().and_then(|i| r.inputs.get(*i)).and_then(|t| t.shape.get(1)).copied();
            max_seq = max_seq.max(seq.unwrap_or(0));
            offsets.push((total_rows, r.rows, seq));
            total_rows += r.rows;
        }
        let padded_seq = if seq_inputs.is_empty() {
            None
        } else {
            let Some(s) = spec.buckets.seq_bucket(max_seq) else {
                return Err(BatchingError::TooLarge {
                    model: spec.name.clone(),
                    reason: format!(
                        "sequence length {max_seq} exceeds the largest sequence bucket {:?}",
                        spec.buckets.seq.last()
                    ),
                });
            };
            Some(s)
        };
        Ok(Layout { offsets, total_rows, padded_seq })
    }

    /// Rows to execute for `total` real rows: the bucket (or chunks of the largest bucket plus the
    /// bucket of the rest).
    fn padded_rows(&self, total: usize) -> (usize, usize) {
        let plan = &self.shared.spec.buckets;
        match (plan.batch_bucket(total), plan.largest_batch()) {
            (Some(b), _) => (b, b),
            (None, Some(largest)) => {
                let rest = total % largest;
                let tail = if rest == 0 { 0 } else { plan.batch_bucket(rest).unwrap_or(largest) };
                (total - rest + tail, largest)
            }
            (None, None) => (total, total),
        }
    }

    fn run_batched(&mut self, requests: &[InferRequest]) -> Result<(Vec<Vec<NamedTensor>>, Timings), BatchingError> {
        let spec = self.shared.spec.clone();
        let t0 = Instant::now();
        let layout = self.layout(requests)?;
        let (exec_rows, chunk) = self.padded_rows(layout.total_rows);
        self.buffers.resize_with(spec.inputs.len(), Vec::new);
        self.shapes.resize_with(spec.inputs.len(), Vec::new);
        for (i, ispec) in spec.inputs.iter().enumerate() {
            let esize = ispec.dtype.size().unwrap_or(1);
            let first = &requests[0].inputs[i];
            let mut inner: Vec<usize> = first.shape.get(1..).unwrap_or(&[]).to_vec();
            let pads_seq = ispec.dims.first() == Some(&-1) && !inner.is_empty();
            if let (true, Some(s)) = (pads_seq, layout.padded_seq) {
                inner[0] = s;
            }
            let row_bytes = inner.iter().product::<usize>() * esize;
            let buf = &mut self.buffers[i];
            buf.clear();
            buf.reserve(exec_rows * row_bytes);
            for r in requests {
                let t = &r.inputs[i];
                if t.shape.get(1..) == Some(inner.as_slice()) {
                    buf.extend_from_slice(&t.data);
                } else {
                    let src_row = t.data.len() / r.rows.max(1);
                    if src_row > row_bytes {
                        return Err(BatchingError::Backend {
                            model: self.model(),
                            source: BackendError::InvalidInput {
                                name: ispec.name.clone(),
                                reason: format!("a row of {src_row} bytes does not fit the batch's {row_bytes}"),
                            },
                        });
                    }
                    for row in t.data.chunks(src_row.max(1)) {
                        buf.extend_from_slice(row);
                        buf.resize(buf.len() + row_bytes.saturating_sub(row.len()), 0);
                    }
                }
            }
            buf.resize(exec_rows * row_bytes, 0);
            let shape = &mut self.shapes[i];
            shape.clear();
            shape.push(exec_rows);
            shape.extend_from_slice(&inner);
        }
        let input_time = t0.elapsed();
        let mut executions = Vec::new();
        let mut chunks: Vec<(Vec<NamedTensor>, usize)> = Vec::new();
        let mut start = 0;
        let mut chunk_shapes: Vec<Vec<usize>> = self.shapes.clone();
        while start < exec_rows {
            let rows = chunk.min(exec_rows - start);
            let real = rows.min(layout.total_rows.saturating_sub(start));
            let inputs: Vec<BatchInput<'_>> = spec
                .inputs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let row_bytes = self.buffers[i].len() / exec_rows.max(1);
                    chunk_shapes[i][0] = rows;
                    (s, &self.buffers[i][start * row_bytes..(start + rows) * row_bytes], i)
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|(s, data, i)| BatchInput {
                    name: &s.name,
                    tensor: TensorView { dtype: s.dtype, shape: &chunk_shapes[i], data },
                })
                .collect();
            let t = Instant::now();
            let out = guarded_execute(self.instance.as_mut(), &spec.name, &inputs)?;
            executions.push((real, t.elapsed()));
            chunks.push((out, real));
            start += rows;
        }
        let t_split = Instant::now();
        let merged = merge_chunks(chunks, layout.total_rows);
        let per_request = split_outputs(&spec, merged, &layout).map_err(|reason| BatchingError::Backend {
            model: self.model(),
            source: BackendError::Execution { message: reason, instance_usable: true, nrt_status: None },
        })?;
        let infer = executions.iter().map(|e| e.1).sum();
        Ok((per_request, Timings { input: input_time, infer, split: t_split.elapsed(), executions }))
    }
}

/// Executes on the backend under the instance-thread protocol's panic guard.
fn guarded_execute(
    instance: &mut dyn ModelInstance,
    model: &str,
    inputs: &[BatchInput<'_>],
) -> Result<Vec<NamedTensor>, BatchingError> {
    let label = instance.label();
    protocol::guarded(&label, || instance.execute(inputs))
        .map_err(|source| BatchingError::Backend { model: model.to_string(), source })
}

/// Time spent per phase of one batch.
struct Timings {
    input: Duration,
    infer: Duration,
    split: Duration,
    executions: Vec<(usize, Duration)>,
}

/// Joins the real rows of each chunk's outputs (dropping padded rows) into one output per name.
fn merge_chunks(mut chunks: Vec<(Vec<NamedTensor>, usize)>, total_rows: usize) -> Vec<NamedTensor> {
    if chunks.len() == 1 {
        return chunks.pop().map(|c| c.0).unwrap_or_default();
    }
    let Some((first, _)) = chunks.first() else { return Vec::new() };
    let mut merged: Vec<NamedTensor> = first
        .iter()
        .map(|t| {
            let mut shape = t.tensor.shape.clone();
            if let Some(d) = shape.first_mut() {
                *d = total_rows;
            }
            NamedTensor { name: t.name.clone(), tensor: Tensor { dtype: t.tensor.dtype, shape, data: Vec::new() } }
        })
        .collect();
    for (outs, real) in &chunks {
        for (m, o) in merged.iter_mut().zip(outs) {
            let rows = o.tensor.shape.first().copied().unwrap_or(1).max(1);
            let row_bytes = o.tensor.data.len() / rows;
            m.tensor.data.extend_from_slice(&o.tensor.data[..(real * row_bytes).min(o.tensor.data.len())]);
        }
    }
    merged
}

/// Cuts the batch outputs into each request's rows, cropping padded sequence positions.
fn split_outputs(
    spec: &crate::config::ModelSpec,
    outputs: Vec<NamedTensor>,
    layout: &Layout,
) -> Result<Vec<Vec<NamedTensor>>, String> {
    // One request whose rows fill the outputs exactly (no padded rows, no padded positions): hand
    // the outputs over without copying.
    if let [(_, rows, seq)] = layout.offsets.as_slice()
        && (layout.padded_seq.is_none() || *seq == layout.padded_seq)
        && outputs.iter().all(|o| o.tensor.shape.first() == Some(rows))
    {
        return Ok(vec![outputs]);
    }
    let mut per_request: Vec<Vec<NamedTensor>> =
        layout.offsets.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in &outputs {
        let t = &out.tensor;
        let rows = t.shape.first().copied().unwrap_or(0);
        if rows < layout.total_rows {
            return Err(format!(
                "backend returned {rows} rows for output '{}', expected at least {}",
                out.name, layout.total_rows
            ));
        }
        let row_bytes = t.data.len().checked_div(rows).unwrap_or(0);
        let crops = layout.padded_seq.is_some()
            && spec.outputs.iter().any(|o| o.name == out.name && o.dims.first() == Some(&-1))
            && t.shape.get(1).copied() == layout.padded_seq;
        for ((offset, n, seq), dest) in layout.offsets.iter().zip(per_request.iter_mut()) {
            let rows_data = &t.data[offset * row_bytes..(offset + n) * row_bytes];
            let mut shape = t.shape.clone();
            shape[0] = *n;
            let data = match (crops, seq, layout.padded_seq) {
                (true, Some(s), Some(padded)) if *s < padded => {
                    let pos_bytes = row_bytes / padded.max(1);
                    shape[1] = *s;
                    let mut d = Vec::with_capacity(n * s * pos_bytes);
                    for row in rows_data.chunks(row_bytes.max(1)) {
                        d.extend_from_slice(&row[..s * pos_bytes]);
                    }
                    d
                }
                _ => rows_data.to_vec(),
            };
            dest.push(NamedTensor { name: out.name.clone(), tensor: Tensor { dtype: t.dtype, shape, data } });
        }
    }
    Ok(per_request)
}
