//! The step loop's engine: iteration-level (continuous) batching over one [`DecoderInstance`].
//!
//! Each [`Engine::step`]: drops sequences whose client went away; gives every running sequence its
//! next tokens (one decode token, or the next chunk of its prompt) under a per-step token budget,
//! preempting the most recently admitted sequences when K/V blocks run out; admits waiting
//! sequences (first come, first served) while the budget and the blocks for their whole prompt
//! allow; runs one forward over all chunks; samples; sends each sequence its update; retires the
//! finished. A preempted sequence keeps its tokens and recomputes its K/V when readmitted (the
//! prefix cache often still holds most of it).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use super::detok::TokenText;
use super::kv_blocks::BlockPool;
use super::request::{GenerateRequest, GenerationError};
use super::sequence::{Sequence, StopRules};
use super::session::{Affinity, SessionLimits, Sessions};
use super::session_tiers::Durable;
use super::stats::GenerativeStats;
use crate::backend::BackendError;
use crate::backend::generative::DecoderInstance;

mod run;
mod schedule;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLimits {
    /// Most tokens run in one forward (decode tokens plus prefill chunks).
    pub max_batched_tokens: usize,
    /// Most sequences in the running set.
    pub max_running: usize,
    /// While sequences are decoding, most prompt tokens (chunks of prompts and session turns) run
    /// in one step: a step costs about its tokens, so this bounds the decoding streams'
    /// inter-token latency when prompts join. Decoders that prefill from zero only (one chunk per
    /// history) are not capped.
    pub max_prefill_while_decoding: usize,
}

/// Default [`StepLimits::max_prefill_while_decoding`].
pub const DEFAULT_MAX_PREFILL_WHILE_DECODING: usize = 64;

impl Default for StepLimits {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            max_running: 64,
            max_prefill_while_decoding: DEFAULT_MAX_PREFILL_WHILE_DECODING,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Tokens run through the decoder.
    pub tokens: usize,
    /// Sequences in the forward.
    pub sequences: usize,
    /// Sequences preempted in this step.
    pub preempted: usize,
}

/// The engine of one instance thread: the decoder, its block pool, the waiting and running sets.
pub struct Engine {
    pub(super) decoder: Box<dyn DecoderInstance>,
    pub(super) text: Arc<dyn TokenText>,
    rules: StopRules,
    limits: StepLimits,
    pub(super) pool: BlockPool,
    pub(super) waiting: VecDeque<Sequence>,
    pub(super) running: Vec<Sequence>,
    pub(super) stats: Arc<GenerativeStats>,
    /// Conversation sessions kept on this instance.
    pub(super) sessions: Sessions,
    /// Where idle sessions go when the pool needs their blocks, and at drain.
    pub(super) durable: Option<Durable>,
    /// Gauge values this engine last added to the shared statistics.
    published: [u64; 8],
    logits: Vec<f32>,
    /// Tokens and logprobs picked on the device (greedy rows of a decoder that samples there).
    picked: Vec<(u32, f32)>,
    scratch: super::sampler::SampleScratch,
    /// K/V bytes one position takes (all layers, K and V).
    pub(super) kv_bytes_per_position: u64,
    /// Session leases on a shared store (see [`super::session_lease`]).
    pub(super) fleet: Option<super::session_lease::Fleet>,
    /// Finished session turns waiting for their write through (see [`super::session_through`]).
    pub(super) writing: std::collections::HashMap<crate::sessions::SequenceId, Sequence>,
    /// Requests that left the queue (first admission, refusal, cancellation) since the last
    /// [`Engine::take_left_queue`].
    pub(super) left_queue: usize,
}

impl Engine {
    /// An engine over `decoder` (its block pool sized by the decoder's `num_blocks`).
    pub fn new(
        decoder: Box<dyn DecoderInstance>,
        text: Arc<dyn TokenText>,
        eos: Vec<u32>,
        limits: StepLimits,
        stats: Arc<GenerativeStats>,
    ) -> Engine {
        let shape = decoder.shape().clone();
        let pool = BlockPool::new(decoder.num_blocks(), shape.block_size);
        let context_limit = shape.max_positions.min(decoder.num_blocks() * shape.block_size);
        stats.kv_blocks_total.fetch_add(decoder.num_blocks() as u64, Relaxed);
        stats.kv_bytes_total.fetch_add(kv_pool_bytes(decoder.as_ref()), Relaxed);
        stats.kv_tokens_total.fetch_add((decoder.num_blocks() * shape.block_size) as u64, Relaxed);
        let _ = stats.kv_dtype.set(shape.kv_dtype);
        Engine {
            decoder,
            text,
            rules: StopRules { eos, context_limit },
            limits: StepLimits {
                max_batched_tokens: limits.max_batched_tokens.max(1),
                max_running: limits.max_running.max(1),
                max_prefill_while_decoding: limits.max_prefill_while_decoding.max(1),
            },
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            sessions: Sessions::new(SessionLimits::default(), Affinity::default(), 0, stats.clone()),
            durable: None,
            stats,
            published: [0; 8],
            logits: Vec::new(),
            picked: Vec::new(),
            scratch: Default::default(),
            kv_bytes_per_position: shape.kv_bytes_per_position() as u64,
            fleet: None,
            writing: std::collections::HashMap::new(),
            left_queue: 0,
        }
    }

    /// Keeps conversation sessions under `limits` as instance `instance` of a model whose handle
    /// routes turns through `affinity`.
    pub fn with_sessions(mut self, limits: SessionLimits, affinity: Affinity, instance: usize) -> Engine {
        let limits = SessionLimits {
            max_session_tokens: limits.max_session_tokens.min(self.rules.context_limit.saturating_sub(1)),
            ..limits
        };
        self.sessions = Sessions::new(limits, affinity, instance, self.stats.clone());
        self
    }

    /// Writes idle sessions to `durable`'s store when the pool needs their blocks, and every
    /// session at drain (see [`super::session_tiers`]).
    pub fn with_durable(mut self, durable: Option<Durable>) -> Engine {
        self.durable = durable;
        self
    }

    /// Where this engine's sessions are saved, if anywhere.
    pub fn durable(&self) -> Option<&Durable> {
        self.durable.as_ref()
    }

    /// The sessions kept on this instance.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The sessions kept on this instance, and the decoder holding their K/V (export, import).
    pub fn sessions_mut(&mut self) -> (&mut Sessions, &mut dyn DecoderInstance, &BlockPool) {
        (&mut self.sessions, self.decoder.as_mut(), &self.pool)
    }

    /// Most positions a sequence can hold here (context limit, or the whole K/V pool if smaller).
    pub fn context_limit(&self) -> usize {
        self.rules.context_limit
    }

    /// The decoder's label.
    pub fn label(&self) -> String {
        self.decoder.label()
    }

    /// The block pool (for tests and capacity reports).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Sequences waiting and running.
    pub fn load(&self) -> (usize, usize) {
        (self.waiting.len(), self.running.len())
    }

    /// Requests that left the queue since the last call: admitted to the running set for the first
    /// time, refused, or cancelled while waiting (the model's queue depth counts down by this).
    pub fn take_left_queue(&mut self) -> usize {
        std::mem::take(&mut self.left_queue)
    }

    /// Nothing to do until a request arrives.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a request. A prompt that can never fit (empty, or longer than the context limit) is
    /// answered with an error at once.
    pub fn add(&mut self, req: GenerateRequest) {
        let Some(req) = self.lease_gate(req) else { return self.publish() };
        let new_tokens = req.prompt.len();
        let turn_id = req.session.as_ref().map(|t| t.id.clone());
        if let Some(turn) = &req.session
            && self.fleet.is_none()
        {
            self.bring_back(turn);
        }
        let mut seq = match self.sessions.begin(req) {
            Ok(Some(seq)) => seq,
            Ok(None) => return self.publish(),
            Err((updates, error)) => {
                if let Some(id) = &turn_id {
                    self.sessions.unpin_if_absent(id);
                    self.fleet_release_if_absent(id);
                }
                let _ = super::outbox::deliver(&updates, Err(error));
                self.left_queue += 1;
                return self.publish();
            }
        };
        // With leases, a turn is acknowledged once its tokens are written through.
        seq.hold_final = self.fleet.is_some() && seq.session.is_some();
        let limit = self.rules.context_limit;
        let what = if seq.session.is_some() { "the session's tokens plus this turn's input" } else { "the prompt" };
        let vocab = self.decoder.shape().vocab as u32;
        let refuse = if seq.tokens.is_empty() {
            Some("the prompt is empty: send at least one token".to_string())
        } else if seq.tokens.len() >= limit {
            Some(format!(
                "{what} come to {} tokens; this model holds at most {limit} positions (prompt plus generated tokens); shorten it",
                seq.tokens.len()
            ))
        } else {
            seq.tokens[seq.tokens.len() - new_tokens..]
                .iter()
                .find(|&&t| t >= vocab)
                .map(|t| format!("token id {t} is outside the vocabulary (0..{vocab})"))
        };
        if let Some(reason) = refuse {
            let _ = super::outbox::deliver(&seq.updates, Err(GenerationError::TooLarge { reason }));
            self.left_queue += 1;
            seq.started = true;
            self.retire(seq, false);
            return self.publish();
        }
        self.stats.prompt_tokens.fetch_add(seq.tokens.len() as u64, Relaxed);
        self.waiting.push_back(seq);
        self.publish();
    }

    /// A sequence leaves the engine: a session turn gives its tokens and blocks back to its session
    /// (`keep`: what it generated is kept; otherwise the session is left as it was before the turn),
    /// and the session's next queued turn, if any, is added.
    pub(super) fn retire(&mut self, mut seq: Sequence, keep: bool) {
        if seq.session.is_none() {
            return;
        }
        let next = if self.fleet.is_some() {
            self.fleet_retire(seq, keep)
        } else if keep {
            self.sessions.finish(&mut seq)
        } else {
            self.sessions.abort(&mut seq)
        };
        if let Some(next) = next {
            self.add(next);
        }
    }

    /// Publishes the gauges after a change made outside a step.
    pub(super) fn publish_gauges(&mut self) {
        self.publish();
    }

    /// Saves the sessions to the store (when there is one) as `reason` requires.
    pub fn save_sessions_for(&mut self, reason: super::session_tiers::SaveReason) {
        self.save_sessions(reason);
        self.publish();
    }

    /// Takes every stateless sequence (running or waiting) off this instance, for another one
    /// to continue (the instance is leaving service); session turns stay.
    pub fn take_movable(&mut self) -> Vec<super::failover::MovedSequence> {
        let mut moved = Vec::new();
        let running = std::mem::take(&mut self.running);
        let waiting = std::mem::take(&mut self.waiting);
        use super::failover::MovedSequence;
        for s in running {
            if MovedSequence::movable(&s) {
                moved.push(MovedSequence::from_sequence(s));
            } else {
                self.running.push(s);
            }
        }
        for s in waiting {
            if MovedSequence::movable(&s) {
                moved.push(MovedSequence::from_sequence(s));
            } else {
                self.waiting.push_back(s);
            }
        }
        self.publish();
        moved
    }

    /// Continues a sequence another instance held: it waits (ahead of new requests) to recompute
    /// its K/V from its tokens, then generates on.
    pub fn resume(&mut self, moved: super::failover::MovedSequence) {
        self.stats.moved_sequences.fetch_add(1, Relaxed);
        self.waiting.push_front(moved.into_sequence());
        self.publish();
    }

    /// Ends every sequence with `error` (the instance is leaving service).
    pub fn fail_all(&mut self, error: GenerationError) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            self.left_queue += usize::from(!s.started);
            let _ = super::outbox::deliver(&s.updates, Err(error.clone()));
        }
        let pending: usize = self.sessions.iter().map(|(_, s)| s.pending.len()).sum();
        self.left_queue += pending;
        self.sessions.fail_all(&error);
        self.publish();
    }

    /// Runs one iteration. An `Err` is a decoder failure: the sequences of that step were failed
    /// with it and dropped; the caller decides whether the instance stays in service.
    pub fn step(&mut self) -> Result<StepReport, BackendError> {
        self.drop_cancelled();
        let mut report = StepReport::default();
        // While sequences decode, prompts join in chunks of at most `max_prefill_while_decoding`
        // tokens a step (their results do not depend on the chunking).
        let decoding = !self.decoder.prefill_from_zero_only()
            && self.running.iter().any(|s| s.tokens.len().saturating_sub(s.computed) == 1);
        let prompt = if decoding { self.limits.max_prefill_while_decoding } else { usize::MAX };
        let mut budget = schedule::StepBudget::new(self.limits.max_batched_tokens, prompt);
        // (index in running, tokens to run)
        let mut plan: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        self.schedule_running(&mut budget, &mut plan, &mut report)?;
        self.admit_waiting(&mut budget, &mut plan);
        if plan.is_empty() {
            self.publish();
            return Ok(report);
        }
        let result = self.run(&plan);
        if let Err(e) = &result {
            if !matches!(e, BackendError::Execution { instance_usable: true, .. }) {
                // The instance leaves service: its sequences stay, without their K/V, for the
                // caller to move to another instance (see `failover`) or to fail.
                for &(i, _) in &plan {
                    self.running[i].preempt();
                }
                self.publish();
                return Err(e.clone());
            }
            let failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
            for &i in failed.iter().rev() {
                let s = self.running.remove(i);
                let _ = super::outbox::deliver(&s.updates, Err(GenerationError::Backend(e.clone())));
                self.retire(s, true);
            }
            self.publish();
            return Err(e.clone());
        }
        report.tokens = plan.iter().map(|&(_, n)| n).sum();
        report.sequences = plan.len();
        self.stats.steps.fetch_add(1, Relaxed);
        if self.running.iter().any(|s| s.done) {
            let (done, running): (Vec<Sequence>, Vec<Sequence>) =
                std::mem::take(&mut self.running).into_iter().partition(|s| s.done);
            self.running = running;
            for s in done {
                self.retire(s, true);
            }
        }
        self.publish();
        Ok(report)
    }

    fn drop_cancelled(&mut self) {
        if !self.running.iter().chain(&self.waiting).any(Sequence::cancelled) {
            return; // the usual case: no allocation
        }
        let (gone, running): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.running).into_iter().partition(|s| s.cancelled());
        self.running = running;
        let (gone_waiting, waiting): (Vec<Sequence>, Vec<Sequence>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|s| s.cancelled());
        self.waiting = waiting.into();
        self.stats.cancelled.fetch_add((gone.len() + gone_waiting.len()) as u64, Relaxed);
        for s in gone {
            self.retire(s, true);
        }
        for s in gone_waiting {
            self.left_queue += usize::from(!s.started);
            let keep = s.started;
            self.retire(s, keep);
        }
    }

    /// Adds this engine's change of running/waiting/blocks-used to the shared gauges.
    fn publish(&mut self) {
        let (resident, stored) = self.sessions.kv_footprint();
        let now = [
            self.running.len() as u64,
            self.waiting.len() as u64,
            (self.pool.num_blocks() - self.pool.available()) as u64,
            self.sessions.len() as u64,
            self.sessions.resident() as u64,
            self.sessions.stored() as u64,
            resident * self.kv_bytes_per_position,
            stored,
        ];
        let st = &self.stats;
        let gauges: [&AtomicU64; 8] = [
            &st.running,
            &st.waiting,
            &st.kv_blocks_used,
            &st.sessions_open,
            &st.sessions_resident,
            &st.sessions_stored,
            &st.session_kv_bytes_resident,
            &st.session_kv_bytes_stored,
        ];
        for ((g, &new), old) in gauges.iter().zip(&now).zip(self.published.iter_mut()) {
            if new >= *old {
                g.fetch_add(new - *old, Relaxed);
            } else {
                g.fetch_sub(*old - new, Relaxed);
            }
            *old = new;
        }
    }
}

/// Bytes of a decoder's K/V pool (K and V of its element type, every layer and block).
fn kv_pool_bytes(decoder: &dyn DecoderInstance) -> u64 {
    let s = decoder.shape();
    (decoder.num_blocks() * s.kv_block_bytes(s.block_size)) as u64
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.fail_all(GenerationError::Unavailable { reason: "the model instance stopped".into() });
        self.stats.kv_blocks_total.fetch_sub(self.decoder.num_blocks() as u64, Relaxed);
        self.stats.kv_bytes_total.fetch_sub(kv_pool_bytes(self.decoder.as_ref()), Relaxed);
        let tokens = self.decoder.num_blocks() * self.decoder.shape().block_size;
        self.stats.kv_tokens_total.fetch_sub(tokens as u64, Relaxed);
        self.running.clear();
        self.waiting.clear();
        self.publish();
    }
}
