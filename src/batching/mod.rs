//! The batching layer: one [`Batcher`] handle per model version, whatever its policy.
//!
//! The handle is what the rest of the worker sees: [`Batcher::submit`] a validated
//! [`InferRequest`], [`Batcher::drain`], readiness, statistics, capacity (queue depth, instances
//! in service, estimated queue wait) and, for policies that keep sessions, list/export/import.
//! Beneath it sit:
//! - one admission and readiness state ([`admission`]): readiness, the queue bound, queue depth
//!   and instances in service, the same for every policy;
//! - one error enum ([`BatchingError`]) and one statistics recorder ([`stats::ModelStats`],
//!   Triton's per-request semantics: a batch of n requests charges each request the batch's time);
//! - one instance-thread protocol ([`instance`]): one OS thread per backend instance, panics
//!   caught, statistics recorded, then the actor told the batch is done, then the replies sent; a
//!   fatal error retires the instance and the last one leaving closes the model;
//! - the policies: [`dynamic`] (Triton dynamic batching over [`crate::backend::ModelInstance`]) and
//!   [`sequence`] (Triton sequence batching over [`crate::backend::StatefulInstance`]).
//!
//! # Adding a policy
//! A policy is a module `batching/<name>/` with an actor that owns its queue and one thread per
//! instance of its backend contract (a trait in `backend/`). It plugs in by:
//! 1. a variant of the private `Policy` enum holding its sender (a cheap `Clone` value), built
//!    by a `Batcher::start_<name>` constructor from an [`admission::Admission`] it shares;
//! 2. admitting through that `Admission` (`admit` in [`Batcher::submit`], `dequeued` when a
//!    request leaves its queue, `set_in_service` when an instance leaves, `close` at drain), so
//!    readiness, `/capacity` and `/metrics` read it like every other model;
//! 3. answering with [`BatchingError`] and recording with `ModelStats::record_batch` /
//!    `record_success` / `record_failure` from its instance threads, following [`instance`];
//! 4. arms in the `match`es of [`Batcher`] (submit, drain, and the session methods if it keeps
//!    sessions — their state moves through [`crate::sessions`]).

pub(crate) mod admission;
pub mod dynamic;
pub mod error;
pub mod generative;
pub(crate) mod instance;
pub mod request;
pub mod sequence;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

pub use error::BatchingError;
pub use request::{InferReply, InferRequest, ReplySender, RequestInput, SequenceControl};
pub use sequence::SequenceSetup;
pub use stats::{FailureReason, ModelStats};

use crate::backend::{InputCheck, ModelInstance, StatefulInstance};
use crate::config::{ModelSpec, SequenceSpec};
use crate::sessions::{SequenceId, SessionBlob, SessionCounters, SessionInfo};
use admission::Admission;
use dynamic::DynamicQueue;
use sequence::SequenceSessions;

/// The policy-specific end of a handle.
#[derive(Clone, Debug)]
enum Policy {
    /// Dynamic batching over stateless instances.
    Dynamic(DynamicQueue),
    /// Sequence batching over stateful instances.
    Sequence(SequenceSessions),
    /// Iteration-level batching of generative (decoder) instances.
    Generative(Arc<generative::handle::GenerativeModel>),
}

/// A cheap, cloneable handle to one model version's batching, whatever its policy.
#[derive(Clone, Debug)]
pub struct Batcher {
    admission: Arc<Admission>,
    policy: Policy,
    /// The backend's check of a request's values, run before it is queued.
    check: Option<Arc<dyn InputCheck>>,
}

impl Batcher {
    /// Starts a dynamic-batching model version (on the current tokio runtime): its queue actor
    /// and one thread per instance.
    pub fn start_dynamic(spec: Arc<ModelSpec>, instances: Vec<Box<dyn ModelInstance>>) -> Batcher {
        let admission = Arc::new(Admission::new(spec, instances.len()));
        let check = instances.first().and_then(|i| i.input_check());
        let policy = Policy::Dynamic(DynamicQueue::start(admission.clone(), instances));
        Batcher { admission, policy, check }
    }

    /// Starts a sequence-batching model version: its session actor thread and one thread per
    /// instance (each with `setup.slots` slots). Sessions found in the store continue on their
    /// next request.
    pub fn start_sequence(
        mut setup: SequenceSetup,
        instances: Vec<Box<dyn StatefulInstance>>,
    ) -> Result<Batcher, BatchingError> {
        if setup.spec.sequence.is_none() {
            // Requests are decoded from the spec: it says the model takes sequence parameters.
            let mut spec = (*setup.spec).clone();
            spec.sequence = Some(setup.seq.clone());
            setup.spec = Arc::new(spec);
        }
        let admission = Arc::new(Admission::new(setup.spec.clone(), instances.len()));
        let policy = Policy::Sequence(SequenceSessions::start(admission.clone(), setup, instances)?);
        Ok(Batcher { admission, policy, check: None })
    }

    /// Starts a generative model version: one step-loop thread per decoder instance; its idle
    /// sessions spill to `store`, and are written there at drain.
    pub fn start_generative(
        spec: Arc<ModelSpec>,
        setup: generative::handle::GenerativeSetup,
        decoders: Vec<Box<dyn crate::backend::generative::DecoderInstance>>,
        tokenizer: Arc<dyn generative::tokens::PromptTokenizer>,
        store: Option<Arc<crate::sessions::SessionStore>>,
    ) -> Result<Batcher, BatchingError> {
        let admission = Arc::new(Admission::new(spec, decoders.len()));
        let model = generative::handle::GenerativeModel::start(admission.clone(), setup, decoders, tokenizer, store)?;
        Ok(Batcher { admission, policy: Policy::Generative(Arc::new(model)), check: None })
    }

    /// The generative handle, for generative models (their requests go there, not to `submit`).
    pub fn generative(&self) -> Option<&Arc<generative::handle::GenerativeModel>> {
        match &self.policy {
            Policy::Generative(g) => Some(g),
            _ => None,
        }
    }

    /// Queues a validated request. Fails at once when the request does not fit the policy, the
    /// model is not ready or its queue is full; otherwise the result arrives on `request.reply`.
    pub fn submit(&self, request: InferRequest) -> Result<(), BatchingError> {
        let adm = &self.admission;
        match &self.policy {
            Policy::Dynamic(q) => {
                self.check_values(&request)?;
                adm.admit(request.arrived)?;
                q.send(adm, request)
            }
            Policy::Generative(_) => Err(BatchingError::InvalidRequest {
                model: adm.spec.name.clone(),
                reason: "a generative model takes generation requests (text_input, input_ids or messages)".into(),
            }),
            Policy::Sequence(s) => {
                s.check(&request)?;
                adm.admit(request.arrived)?;
                s.send(request)
            }
        }
    }

    /// Refuses a request whose values the backend cannot run (an id outside the vocabulary, a
    /// sequence longer than the model's positions...) before it can join, and fail, a batch.
    fn check_values(&self, request: &InferRequest) -> Result<(), BatchingError> {
        let Some(check) = &self.check else { return Ok(()) };
        check.check(&self.admission.spec.inputs, &request.inputs).map_err(|e| {
            self.admission.stats.record_failure(FailureReason::InvalidRequest, request.arrived.elapsed());
            BatchingError::InvalidRequest { model: self.admission.spec.name.clone(), reason: e.to_string() }
        })
    }

    /// The worker started draining and will call [`Batcher::drain`] once its accepted requests
    /// are answered: a sequence model stops expiring sessions and saves each to the store as soon
    /// as it is idle, so none is lost if the drain is cut short. Requests are still admitted.
    pub async fn begin_drain(&self) {
        match &self.policy {
            Policy::Dynamic(_) | Policy::Generative(_) => {}
            Policy::Sequence(s) => s.begin_drain().await,
        }
    }

    /// The exit deadline is near: a generative model ends its generations where they stand (finish
    /// reason `abort`; sessions keep what was generated). Other policies have nothing to cut.
    pub fn cut_short(&self) {
        if let Policy::Generative(g) = &self.policy {
            g.cut_short();
        }
    }

    /// Stops accepting requests and finishes every accepted one (a sequence model then writes its
    /// live sessions to the store); resolves once the threads are stopped.
    pub async fn drain(&self) {
        match &self.policy {
            Policy::Dynamic(q) => q.drain(&self.admission).await,
            Policy::Sequence(s) => s.drain().await,
            Policy::Generative(g) => {
                let g = g.clone();
                let _ = tokio::task::spawn_blocking(move || g.drain()).await;
            }
        }
    }

    /// The model's spec.
    pub fn spec(&self) -> &Arc<ModelSpec> {
        &self.admission.spec
    }

    /// The model's statistics.
    pub fn stats(&self) -> &Arc<ModelStats> {
        &self.admission.stats
    }

    /// A receiver that sees every change of [`Batcher::is_ready`] (health follows it).
    pub fn readiness(&self) -> tokio::sync::watch::Receiver<bool> {
        self.admission.readiness.subscribe()
    }

    /// Whether at least one instance is in service and the model accepts requests.
    pub fn is_ready(&self) -> bool {
        self.admission.is_ready()
    }

    /// Why the model refuses requests while it is not ready.
    pub fn unavailable_reason(&self) -> String {
        self.admission.reason()
    }

    /// Requests admitted and waiting for an instance (for a sequence model: waiting behind their
    /// sequence's earlier request or for their instance).
    pub fn queue_depth(&self) -> usize {
        self.admission.queue_depth()
    }

    /// Instances in service.
    pub fn instances_in_service(&self) -> usize {
        self.admission.instances_in_service()
    }

    /// Estimated queue wait for a new request, from the queue depth and recent execution times:
    /// batches ahead of it ÷ instances × smoothed execution time.
    pub fn estimated_queue_wait(&self) -> Duration {
        self.admission.estimated_queue_wait()
    }

    /// Whether the model keeps sessions (list, export, import apply).
    pub fn keeps_sessions(&self) -> bool {
        matches!(self.policy, Policy::Sequence(_) | Policy::Generative(_))
    }

    fn move_error(&self, e: generative::session_moves::MoveError) -> BatchingError {
        use generative::session_moves::MoveError;
        let model = self.admission.spec.name.clone();
        match e {
            MoveError::NotFound { id } => BatchingError::NotFound { model, id },
            MoveError::Busy { id } => BatchingError::Busy { model, id },
            MoveError::BadBlob { reason } => BatchingError::BadBlob { reason },
            MoveError::Refused { reason } | MoveError::Backend { reason } => {
                BatchingError::InvalidRequest { model, reason }
            }
        }
    }

    fn no_sessions(&self) -> BatchingError {
        BatchingError::NoSessions { model: self.admission.spec.name.clone() }
    }

    /// This version replaces a running one of the same version (a reload): until
    /// [`Batcher::take_handover`], requests continuing a session it does not know wait, since the
    /// version being replaced may still hold it. Call before requests can reach this version.
    pub fn await_handover(&self) {
        if let Policy::Sequence(s) = &self.policy {
            s.await_handover();
        }
    }

    /// The replaced version has drained (its sessions are in the store): take them over in one
    /// step, so they are listed, exportable and continued here, and release the waiting requests.
    pub async fn take_handover(&self) {
        if let Policy::Sequence(s) = &self.policy {
            s.take_handover().await;
        }
    }

    /// Every session of this model version (empty for models without sessions).
    pub async fn list_sessions(&self) -> Vec<SessionInfo> {
        match &self.policy {
            Policy::Sequence(s) => s.list().await,
            Policy::Generative(g) => g.list_sessions().await,
            Policy::Dynamic(_) => Vec::new(),
        }
    }

    /// Ends a session here and returns its state (it must have no request queued or running).
    pub async fn export_session(&self, id: SequenceId) -> Result<SessionBlob, BatchingError> {
        match &self.policy {
            Policy::Sequence(s) => s.export(id).await,
            Policy::Generative(g) => g.export_session(id).await.map_err(|e| self.move_error(e)),
            Policy::Dynamic(_) => Err(self.no_sessions()),
        }
    }

    /// Continues a session exported by a worker serving the same model version.
    pub async fn import_session(&self, blob: SessionBlob) -> Result<SessionInfo, BatchingError> {
        match &self.policy {
            Policy::Sequence(s) => s.import(blob).await,
            Policy::Generative(g) => g.import_session(blob).await.map_err(|e| self.move_error(e)),
            Policy::Dynamic(_) => Err(self.no_sessions()),
        }
    }

    /// Session counters, for models that keep sessions.
    pub fn session_counters(&self) -> Option<&SessionCounters> {
        match &self.policy {
            Policy::Sequence(s) => Some(s.counters()),
            Policy::Dynamic(_) | Policy::Generative(_) => None,
        }
    }

    /// Live sessions the model can hold at once (slots × instances in service), for models that
    /// keep sessions.
    pub fn session_capacity(&self) -> Option<usize> {
        match &self.policy {
            Policy::Sequence(s) => Some(s.capacity()),
            Policy::Dynamic(_) | Policy::Generative(_) => None,
        }
    }

    /// The sequence batching settings, for sequence models.
    pub fn sequence_spec(&self) -> Option<&Arc<SequenceSpec>> {
        match &self.policy {
            Policy::Sequence(s) => Some(s.sequence_spec()),
            Policy::Dynamic(_) | Policy::Generative(_) => None,
        }
    }
}
