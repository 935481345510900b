//! The generative policy's handle: one step-loop thread per decoder instance, a bounded queue, and
//! the dispatch of each request to the least loaded instance.

use std::sync::atomic::Ordering::{AcqRel, Acquire};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::params::SamplingParams;
use super::request::GenerateRequest;
use super::session::{Affinity, SessionLimits};
use super::session_moves::{MoveError, SessionCommand};
use super::session_tiers::Durable;
use super::stats::GenerativeStats;
use super::step::{Engine, StepLimits};
use super::tokens::PromptTokenizer;
use crate::backend::generative::DecoderInstance;
use crate::batching::BatchingError;
use crate::batching::admission::Admission;
use crate::sessions::{SequenceId, SessionBlob, SessionInfo, SessionStore};
use step_thread::{ThreadContext, step_loop};

mod step_thread;

/// How a generative model version is served.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerativeSetup {
    /// Per-step limits.
    pub limits: StepLimits,
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
    /// Sampling defaults of the model (its generation config over vLLM's defaults).
    pub defaults: SamplingParams,
    /// Bounds on conversation sessions.
    pub sessions: SessionLimits,
    /// The model version (written into exported sessions).
    pub version: i64,
}

/// What a step-loop thread is sent.
#[derive(Debug)]
enum Command {
    /// A generation request (a session turn or a stateless request).
    Generate(GenerateRequest),
    /// A session operation (list, export, import).
    Session(SessionCommand),
    /// A sequence of an instance that left service, to continue here.
    Resume(super::failover::MovedSequence),
    /// The exit deadline is near: end every generation where it stands (finish reason `abort`).
    CutShort,
    /// From the session lease threads (shared store).
    Fleet(super::session_lease::FleetEvent),
}

/// The least loaded instance still in service, other than `except`: its index and link.
fn least_loaded(links: &[InstanceLink], except: Option<usize>) -> Option<(usize, &InstanceLink)> {
    links
        .iter()
        .enumerate()
        .filter(|&(i, l)| Some(i) != except && l.alive.load(Acquire))
        .min_by_key(|(_, l)| l.load.load(Acquire))
}

/// One instance's end of the handle.
#[derive(Debug)]
struct InstanceLink {
    /// Requests to the step loop.
    sender: mpsc::Sender<Command>,
    /// Sequences queued to or held by the instance.
    load: Arc<AtomicUsize>,
    /// False once the instance failed fatally.
    alive: Arc<AtomicBool>,
}

/// The handle of one generative model version (shared behind an `Arc`).
pub struct GenerativeModel {
    setup: GenerativeSetup,
    admission: Arc<Admission>,
    tokenizer: Arc<dyn PromptTokenizer>,
    links: Arc<Mutex<Vec<InstanceLink>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<GenerativeStats>,
    context_limit: usize,
    vocab: usize,
    label: Vec<String>,
    /// The instance holding each open session.
    affinity: Affinity,
    /// The session store, when the worker has one.
    durable: Option<Durable>,
}

impl GenerativeModel {
    /// Starts one step-loop thread per decoder; requests are admitted through `admission`.
    pub(crate) fn start(
        admission: Arc<Admission>,
        setup: GenerativeSetup,
        decoders: Vec<Box<dyn DecoderInstance>>,
        tokenizer: Arc<dyn PromptTokenizer>,
        store: Option<Arc<SessionStore>>,
    ) -> Result<GenerativeModel, BatchingError> {
        let model = admission.spec.name.clone();
        let stats = Arc::new(GenerativeStats::default());
        let in_service = Arc::new(AtomicUsize::new(decoders.len()));
        let links = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let mut context_limit = usize::MAX;
        let mut vocab = 0;
        let mut label = Vec::new();
        let affinity = Affinity::default();
        let durable = store.map(|store| Durable { store, model: model.clone(), version: setup.version });
        // Streams are consumed on the server's runtime: updates reach them through an outbox.
        // One delivery thread for all of the model's instances (see `outbox::Delivery`).
        // Inside an async runtime (the server): the streams' consumers are its tasks. A thread that
        // cannot be started leaves the step loops sending directly, which is correct, only costlier.
        let delivery = tokio::runtime::Handle::try_current().ok().and_then(|_| match super::outbox::Delivery::start(&model) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(model = %model, error = %e, "no delivery thread: step loops send their updates directly");
                None
            }
        });
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
                admission: admission.clone(),
                in_service: in_service.clone(),
                peers: links.clone(),
                index: i,
            };
            let text: Arc<dyn super::detok::TokenText> = Arc::new(TextOf(tokenizer.clone()));
            let engine_parts = (decoder, text, setup.eos.clone(), setup.limits, stats.clone());
            let sessions = (setup.sessions, affinity.clone(), durable.clone());
            let fleet = durable.as_ref().and_then(|d| d.store.leases().cloned()).map(|leases| {
                let peers = links.clone();
                let back: super::session_lease::FleetBack = Arc::new(move |ev| {
                    let Ok(l) = peers.lock() else { return Err(Box::new(ev)) };
                    let Some(link) = l.get(i) else { return Err(Box::new(ev)) };
                    match link.sender.send(Command::Fleet(ev)) {
                        Err(mpsc::SendError(Command::Fleet(ev))) => Err(Box::new(ev)),
                        _ => Ok(()),
                    }
                });
                super::session_lease::Fleet::new(leases, model.clone(), setup.version, back)
            });
            let delivery = delivery.clone();
            // The thread says when its engine exists (its K/V pool counted in the gauges), so a
            // scheduler reading /capacity right after the load sees the whole pool.
            let (built_tx, built_rx) = mpsc::sync_channel::<()>(1);
            let handle = std::thread::Builder::new()
                .name(format!("gen-{model}-{i}"))
                .spawn(move || {
                    let (decoder, text, eos, limits, stats) = engine_parts;
                    let engine = Engine::new(decoder, text, eos, limits, stats)
                        .with_sessions(sessions.0, sessions.1, i)
                        .with_durable(sessions.2)
                        .with_fleet(fleet);
                    let _ = built_tx.send(());
                    if let Some(delivery) = delivery {
                        super::outbox::install(delivery);
                    }
                    step_loop(engine, ctx);
                    super::outbox::flush();
                })
                .map_err(|e| BatchingError::Unavailable {
                    model: model.clone(),
                    reason: format!("cannot start an instance thread: {e}"),
                })?;
            let _ = built_rx.recv();
            if let Ok(mut l) = links.lock() {
                l.push(InstanceLink { sender: tx, load, alive });
            }
            threads.push(handle);
        }
        if links.lock().map_or(true, |l| l.is_empty()) {
            return Err(BatchingError::Unavailable { model, reason: "no decoder instance was created".into() });
        }
        Ok(GenerativeModel {
            setup,
            admission,
            tokenizer,
            links,
            threads: Mutex::new(threads),
            stats,
            context_limit,
            vocab,
            label,
            affinity,
            durable,
        })
    }

    /// Model name.
    pub fn name(&self) -> &str {
        &self.admission.spec.name
    }

    /// The model's tokenizer and chat template.
    pub fn tokenizer(&self) -> &Arc<dyn PromptTokenizer> {
        &self.tokenizer
    }

    /// The model's sampling defaults.
    pub fn defaults(&self) -> &SamplingParams {
        &self.setup.defaults
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

    /// The model's generation statistics.
    pub fn stats(&self) -> &Arc<GenerativeStats> {
        &self.stats
    }

    /// Queues a request on the least loaded instance (admitted through the model's admission
    /// state: refused when the model is not ready or its queue is full).
    pub fn submit(&self, req: GenerateRequest) -> Result<(), BatchingError> {
        self.admission.admit(req.arrived)?;
        let refuse = |reason: &str| {
            self.admission.dequeued(1);
            BatchingError::Unavailable { model: self.name().to_string(), reason: reason.to_string() }
        };
        let Ok(links) = self.links.lock() else {
            return Err(refuse("the model's handle is poisoned; reload the model"));
        };
        // A session's turns (a restart too) go to the instance holding it; a session not held by
        // any (new, or in the store) is pinned to the least loaded one now, so that its turns
        // queue behind each other there.
        let link = match &req.session {
            None => least_loaded(&links, None).map(|(_, l)| l),
            Some(turn) => {
                let Ok(mut affinity) = self.affinity.lock() else {
                    return Err(refuse("the model's session routing is poisoned; reload the model"));
                };
                match affinity.get(&turn.id).copied() {
                    Some(i) => match links.get(i) {
                        Some(l) if l.alive.load(Acquire) => Some(l),
                        _ => {
                            return Err(refuse(
                                "the instance holding this session is leaving service; retry in a moment (with a session store the session continues on another instance; without one it is lost: start it again)",
                            ));
                        }
                    },
                    None => least_loaded(&links, None).map(|(i, l)| {
                        affinity.insert(turn.id.clone(), i);
                        l
                    }),
                }
            }
        };
        let Some(link) = link else {
            return Err(refuse("the model is draining"));
        };
        link.load.fetch_add(1, AcqRel);
        if link.sender.send(Command::Generate(req)).is_err() {
            link.load.fetch_sub(1, AcqRel);
            return Err(refuse("the instance stopped"));
        }
        Ok(())
    }

    fn model_id(&self) -> (String, i64) {
        (self.name().to_string(), self.setup.version)
    }

    /// Sends `cmd` to instance `i`'s thread; false when it is gone.
    fn send_session(&self, i: usize, cmd: SessionCommand) -> bool {
        let Ok(links) = self.links.lock() else { return false };
        links.get(i).is_some_and(|l| l.alive.load(Acquire) && l.sender.send(Command::Session(cmd)).is_ok())
    }

    fn instances(&self) -> usize {
        self.links.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// The open sessions of every instance.
    pub async fn list_sessions(&self) -> Vec<SessionInfo> {
        let mut all = Vec::new();
        for i in 0..self.instances() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.send_session(i, SessionCommand::List { model: self.model_id(), reply: tx })
                && let Ok(list) = rx.await
            {
                all.extend(list);
            }
        }
        // Sessions in the store that no instance holds (left by a drained or failed instance, or
        // by a previous run of the worker).
        if let Some(d) = &self.durable {
            let d = d.clone();
            let listed = tokio::task::spawn_blocking(move || d.store.list(&d.model, d.version)).await;
            if let Ok(Ok((found, _))) = listed {
                let known: std::collections::HashSet<SequenceId> = all.iter().map(|s| s.id.clone()).collect();
                let (model, version) = self.model_id();
                all.extend(found.into_iter().filter(|s| !known.contains(&s.id)).map(|s| SessionInfo {
                    model: model.clone(),
                    version,
                    id: s.id,
                    steps: s.steps,
                    live: false,
                    idle: std::time::Duration::ZERO,
                }));
            }
        }
        all
    }

    /// Takes an idle session out of this worker as a blob.
    pub async fn export_session(&self, id: SequenceId) -> Result<SessionBlob, MoveError> {
        let instance = self.affinity.lock().ok().and_then(|a| a.get(&id).copied());
        let Some(i) = instance else { return self.export_stored(id).await };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send_session(i, SessionCommand::Export { id: id.clone(), model: self.model_id(), reply: tx }) {
            return Err(MoveError::NotFound { id });
        }
        rx.await.unwrap_or(Err(MoveError::NotFound { id }))
    }

    /// Takes a session no instance holds out of the store, as a blob.
    async fn export_stored(&self, id: SequenceId) -> Result<SessionBlob, MoveError> {
        let Some(d) = self.durable.clone() else { return Err(MoveError::NotFound { id }) };
        let key = id.clone();
        let taken = tokio::task::spawn_blocking(move || d.store.take(&d.model, d.version, &key)).await;
        match taken {
            Ok(Ok(Some(blob))) => Ok(blob),
            Ok(Ok(None)) => Err(MoveError::NotFound { id }),
            Ok(Err(e)) => Err(MoveError::Backend { reason: format!("cannot read the session store: {e}") }),
            Err(e) => Err(MoveError::Backend { reason: e.to_string() }),
        }
    }

    /// Opens a session from a blob exported by a worker serving the same weights, on the least
    /// loaded instance.
    pub async fn import_session(&self, blob: SessionBlob) -> Result<SessionInfo, MoveError> {
        let (id, steps) = (blob.id.clone(), blob.steps);
        if self.affinity.lock().is_ok_and(|a| a.contains_key(&id)) {
            return Err(MoveError::Refused { reason: format!("session {id} is already open on this worker") });
        }
        let pick = {
            let links = self
                .links
                .lock()
                .map_err(|_| MoveError::Refused { reason: "the model's handle is poisoned".into() })?;
            least_loaded(&links, None).map(|(i, _)| i)
        };
        let Some(i) = pick else {
            return Err(MoveError::Refused { reason: "no instance of the model is in service".into() });
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send_session(i, SessionCommand::Import { blob, reply: tx }) {
            return Err(MoveError::Refused { reason: "the instance stopped".into() });
        }
        rx.await.unwrap_or(Err(MoveError::Refused { reason: "the instance stopped".into() }))?;
        let (model, version) = self.model_id();
        Ok(SessionInfo { model, version, id, steps, live: true, idle: std::time::Duration::ZERO })
    }

    /// Ends every generation where it stands, on every instance (the worker's exit deadline is
    /// near): each gets a last response with finish reason `abort`, session turns keep what they
    /// generated. Returns at once; the step loops do it between steps.
    pub fn cut_short(&self) {
        self.admission.close("the worker is shutting down");
        if let Ok(links) = self.links.lock() {
            for l in links.iter() {
                let _ = l.sender.send(Command::CutShort);
            }
        }
    }

    /// Stops accepting requests; running and queued sequences finish, then the threads end.
    /// Blocks until they have.
    pub fn drain(&self) {
        self.admission.close("the model is draining");
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
        let threads = self.threads.lock().map(|mut t| std::mem::take(&mut *t)).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for GenerativeModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerativeModel")
            .field("model", &self.name())
            .field("instances", &self.label)
            .field("context_limit", &self.context_limit)
            .finish_non_exhaustive()
    }
}

impl Drop for GenerativeModel {
    fn drop(&mut self) {
        if let Ok(mut links) = self.links.lock() {
            links.clear();
        }
    }
}

/// The tokenizer seen as a decoder only (what the step loop needs).
struct TextOf(Arc<dyn PromptTokenizer>);

impl super::detok::TokenText for TextOf {
    fn decode(&self, ids: &[u32]) -> String {
        self.0.decode(ids)
    }
}
