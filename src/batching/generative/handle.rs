//! The generative policy's handle: one step-loop thread per decoder instance, a bounded queue, and
//! the dispatch of each request to the least loaded instance.

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::detok::TokenText;
use super::request::{GenerateRequest, GenerationError};
use super::stats::GenerativeStats;
use super::step::{Engine, StepLimits};
use crate::backend::generative::DecoderInstance;

/// How a generative model version is served.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerativeSetup {
    /// Model name (errors, thread names).
    pub model: String,
    /// Per-step limits.
    pub limits: StepLimits,
    /// Most requests waiting (not yet running) across instances; more → queue full.
    pub max_queue_size: usize,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The queue bound was reached.
    #[error("model '{model}': queue full ({max_queue_size} requests waiting); retry after a short backoff")]
    QueueFull {
        /// Model name.
        model: String,
        /// The bound.
        max_queue_size: usize,
    },
    /// No instance is serving (drained, or every instance failed).
    #[error("model '{model}' is not available: {reason}")]
    Unavailable {
        /// Model name.
        model: String,
        /// Why.
        reason: String,
    },
}

/// One instance's end of the handle.
#[derive(Debug)]
struct InstanceLink {
    /// Requests to the step loop.
    sender: mpsc::Sender<GenerateRequest>,
    /// Sequences queued to or held by the instance.
    load: Arc<AtomicUsize>,
    /// False once the instance failed fatally.
    alive: Arc<AtomicBool>,
}

/// The handle of one generative model version (cheap to share behind an `Arc`).
#[derive(Debug)]
pub struct GenerativeModel {
    setup: GenerativeSetup,
    links: Mutex<Vec<InstanceLink>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Requests sent to a thread and not yet taken into its engine.
    in_channel: Arc<AtomicUsize>,
    stats: Arc<GenerativeStats>,
    context_limit: usize,
    vocab: usize,
    label: Vec<String>,
}

impl GenerativeModel {
    /// Starts one step-loop thread per decoder.
    pub fn start(
        setup: GenerativeSetup,
        decoders: Vec<Box<dyn DecoderInstance>>,
        text: Arc<dyn TokenText>,
    ) -> Result<GenerativeModel, GenerationError> {
        let stats = Arc::new(GenerativeStats::default());
        let in_channel = Arc::new(AtomicUsize::new(0));
        let mut links = Vec::new();
        let mut threads = Vec::new();
        let mut context_limit = usize::MAX;
        let mut vocab = 0;
        let mut label = Vec::new();
        for (i, decoder) in decoders.into_iter().enumerate() {
            let shape = decoder.shape().clone();
            context_limit = context_limit.min(shape.max_positions.min(decoder.num_blocks() * shape.block_size));
            vocab = shape.vocab;
            label.push(decoder.label());
            let (tx, rx) = mpsc::channel();
            let load = Arc::new(AtomicUsize::new(0));
            let alive = Arc::new(AtomicBool::new(true));
            let ctx = ThreadContext {
                rx,
                load: load.clone(),
                alive: alive.clone(),
                in_channel: in_channel.clone(),
                model: setup.model.clone(),
            };
            let engine_parts = (decoder, text.clone(), setup.eos.clone(), setup.limits, stats.clone());
            let handle = std::thread::Builder::new()
                .name(format!("gen-{}-{i}", setup.model))
                .spawn(move || {
                    let (decoder, text, eos, limits, stats) = engine_parts;
                    step_loop(Engine::new(decoder, text, eos, limits, stats), ctx)
                })
                .map_err(|e| GenerationError::Unavailable {
                    reason: format!("cannot start an instance thread: {e}"),
                })?;
            links.push(InstanceLink { sender: tx, load, alive });
            threads.push(handle);
        }
        if links.is_empty() {
            return Err(GenerationError::Unavailable { reason: "no decoder instance was created".into() });
        }
        Ok(GenerativeModel {
            setup,
            links: Mutex::new(links),
            threads: Mutex::new(threads),
            in_channel,
            stats,
            context_limit,
            vocab,
            label,
        })
    }

    /// Model name.
    pub fn name(&self) -> &str {
        &self.setup.model
    }

    /// Most positions (prompt plus generated tokens) a sequence can hold.
    pub fn context_limit(&self) -> usize {
        self.context_limit
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Instance labels.
    pub fn instance_labels(&self) -> &[String] {
        &self.label
    }

    /// The model's statistics.
    pub fn stats(&self) -> &Arc<GenerativeStats> {
        &self.stats
    }

    /// The queue bound.
    pub fn max_queue_size(&self) -> usize {
        self.setup.max_queue_size
    }

    /// Requests waiting for admission (sent and not yet running).
    pub fn queue_depth(&self) -> usize {
        self.in_channel.load(Acquire) + self.stats.waiting.load(Relaxed) as usize
    }

    /// Instances in service.
    pub fn instances_in_service(&self) -> usize {
        self.links.lock().map(|l| l.iter().filter(|l| l.alive.load(Acquire)).count()).unwrap_or(0)
    }

    /// Whether requests are accepted.
    pub fn is_ready(&self) -> bool {
        self.instances_in_service() > 0
    }

    /// Queues a request on the least loaded instance.
    pub fn submit(&self, req: GenerateRequest) -> Result<(), SubmitError> {
        let unavailable =
            |reason: &str| SubmitError::Unavailable { model: self.setup.model.clone(), reason: reason.to_string() };
        if self.queue_depth() >= self.setup.max_queue_size {
            return Err(SubmitError::QueueFull {
                model: self.setup.model.clone(),
                max_queue_size: self.setup.max_queue_size,
            });
        }
        let links = self.links.lock().map_err(|_| unavailable("the model's handle is poisoned"))?;
        let Some(link) = links.iter().filter(|l| l.alive.load(Acquire)).min_by_key(|l| l.load.load(Acquire)) else {
            return Err(unavailable(if links.is_empty() {
                "the model is draining"
            } else {
                "every instance failed; reload the model or restart the worker"
            }));
        };
        self.in_channel.fetch_add(1, AcqRel);
        link.load.fetch_add(1, AcqRel);
        if link.sender.send(req).is_err() {
            self.in_channel.fetch_sub(1, AcqRel);
            link.load.fetch_sub(1, AcqRel);
            return Err(unavailable("the instance stopped"));
        }
        Ok(())
    }

    /// Stops accepting requests; running and queued sequences finish, then the threads end.
    /// Returns when they have.
    pub fn drain(&self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for GenerativeModel {
    fn drop(&mut self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
    }
}

struct ThreadContext {
    rx: mpsc::Receiver<GenerateRequest>,
    load: Arc<AtomicUsize>,
    alive: Arc<AtomicBool>,
    in_channel: Arc<AtomicUsize>,
    model: String,
}

/// The instance thread: take requests, step while there is work, block when idle, end when the
/// handle is gone and the work is done.
fn step_loop(mut engine: Engine, ctx: ThreadContext) {
    let mut open = true;
    loop {
        if engine.is_idle() {
            if !open {
                return;
            }
            match ctx.rx.recv() {
                Ok(req) => {
                    ctx.in_channel.fetch_sub(1, AcqRel);
                    engine.add(req);
                }
                Err(_) => return,
            }
        }
        while open {
            match ctx.rx.try_recv() {
                Ok(req) => {
                    ctx.in_channel.fetch_sub(1, AcqRel);
                    engine.add(req);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        let (waiting, running) = engine.load();
        ctx.load.store(waiting + running, Release);
        let fatal = match result {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => match &e {
                crate::backend::BackendError::Execution { instance_usable: true, .. } => {
                    tracing::warn!(model = %ctx.model, instance = %engine.label(), error = %e, "generation step failed");
                    None
                }
                _ => Some(e.to_string()),
            },
            Err(_) => Some("the instance panicked".to_string()),
        };
        if let Some(reason) = fatal {
            tracing::error!(model = %ctx.model, instance = %engine.label(), %reason, "generative instance leaves service");
            ctx.alive.store(false, Release);
            engine.fail_all(GenerationError::Unavailable {
                reason: format!("instance {} failed: {reason}", engine.label()),
            });
            // Answer what is still queued to this instance, then stop.
            while let Ok(req) = ctx.rx.try_recv() {
                ctx.in_channel.fetch_sub(1, AcqRel);
                let _ = req.updates.send(Err(GenerationError::Unavailable {
                    reason: format!("instance {} failed: {reason}", engine.label()),
                }));
            }
            return;
        }
    }
}
