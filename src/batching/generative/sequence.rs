//! The state of one generating sequence: its tokens, how many have K/V in its blocks, its text
//! stream and its update channel. Every move (run a chunk, preempt, finish) goes through this struct.

use std::time::Instant;

use std::sync::Arc;

use super::deferred_text::SeqText;
use super::detok::TokenText;
use super::kv_blocks::BlockTable;
use super::params::SamplingParams;
use super::request::{
    FinishReason, Finished, GenerateRequest, GenerationUpdate, PositionLogprobs, SessionTurn, UpdateSender,
};
use super::sampler::Sampled;

/// What the step loop needs to know to finish sequences.
#[derive(Debug, Clone)]
pub struct StopRules {
    /// End-of-sequence token ids.
    pub eos: Vec<u32>,
    /// Most positions a sequence may hold (the decoder's context limit, or the K/V pool if smaller).
    pub context_limit: usize,
}

/// One sequence of the step loop (waiting, running or preempted).
#[derive(Debug)]
pub struct Sequence {
    /// Prompt followed by the tokens generated so far.
    pub tokens: Vec<u32>,
    /// Prompt length.
    pub prompt_len: usize,
    /// Positions whose K/V are in `table` (0 while waiting or preempted).
    pub computed: usize,
    /// The sequence's blocks (`None` while waiting or preempted).
    pub table: Option<BlockTable>,
    /// Sampling and stopping parameters.
    pub params: SamplingParams,
    /// Seed of the sampling randomness.
    pub seed: u64,
    /// Update channel.
    pub updates: UpdateSender,
    /// Arrival (for time to first token).
    pub arrived: Instant,
    /// When the last token was generated (for inter-token latency).
    pub last_token_at: Option<Instant>,
    /// Sum of the generated tokens' log-probabilities.
    pub cumulative_logprob: f64,
    /// Times this sequence was preempted (blocks freed, to be recomputed).
    pub preemptions: u32,
    /// Incremental text of the generated tokens (on the step loop, or deferred to delivery).
    pub text: SeqText,
    /// Set once the sequence has ended (or its client went away).
    pub done: bool,
    /// Has been admitted to the running set at least once (it has left the model's queue).
    pub started: bool,
    /// The session this sequence is a turn of (its tokens and blocks go back to it at the end).
    pub session: Option<SessionTurn>,
    /// Prompt positions whose K/V were reused at first admission (kept session or prefix cache).
    pub reused: usize,
    /// Keep the last response until the turn is written through (session leases).
    pub hold_final: bool,
    /// The last response, kept while `hold_final`.
    pub held_final: Option<GenerationUpdate>,
}

/// What accepting one token did, for the statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accepted {
    /// Seconds since arrival, when this is the first generated token.
    pub first_token_s: Option<f64>,
    /// Seconds since the previous token otherwise.
    pub inter_token_s: Option<f64>,
    /// Why the sequence ended, when it ended with this token.
    pub finished: Option<FinishReason>,
    /// The client had gone away (the update could not be sent): the sequence ends.
    pub client_gone: bool,
}

impl Sequence {
    /// A waiting sequence for `req`.
    pub fn new(mut req: GenerateRequest) -> Sequence {
        let prompt = std::mem::take(&mut req.prompt);
        Sequence::for_turn(req, prompt, None, 0)
    }

    /// A waiting sequence over `tokens` (a session's history plus `req`'s prompt), whose first
    /// `computed` positions already have K/V in `table`.
    pub fn for_turn(req: GenerateRequest, tokens: Vec<u32>, table: Option<BlockTable>, computed: usize) -> Sequence {
        let prompt_len = tokens.len();
        Sequence {
            tokens,
            prompt_len,
            computed,
            table,
            params: req.params,
            seed: req.seed,
            updates: req.updates,
            arrived: req.arrived,
            last_token_at: None,
            cumulative_logprob: 0.0,
            preemptions: 0,
            text: SeqText::new(prompt_len),
            done: false,
            started: false,
            session: req.session,
            reused: 0,
            hold_final: false,
            held_final: None,
        }
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The client went away (its receiver was dropped).
    pub fn cancelled(&self) -> bool {
        self.updates.is_closed()
    }

    /// Frees the sequence's blocks; it will recompute its K/V from its tokens when readmitted.
    pub fn preempt(&mut self) {
        self.table = None;
        self.computed = 0;
        self.preemptions += 1;
    }

    /// Appends a sampled token, works out the text it completes and whether the sequence ends,
    /// and sends the update.
    pub fn accept(
        &mut self,
        sampled: Sampled,
        top: Option<PositionLogprobs>,
        rules: &StopRules,
        decoder: &Arc<dyn TokenText>,
        now: Instant,
    ) -> Accepted {
        self.text.defer_if_free(&self.params.stop, &self.tokens, decoder);
        self.tokens.push(sampled.token);
        self.cumulative_logprob += f64::from(sampled.logprob);
        let (first_token_s, inter_token_s) = match self.last_token_at {
            None => (Some(now.duration_since(self.arrived).as_secs_f64()), None),
            Some(t) => (None, Some(now.duration_since(t).as_secs_f64())),
        };
        self.last_token_at = Some(now);
        let eos = !self.params.ignore_eos && rules.eos.contains(&sampled.token);
        let length = self.generated() >= self.params.max_tokens || self.tokens.len() >= rules.context_limit;
        // Text here only when it is not deferred (the delivery side fills it in otherwise).
        let (text, stopped) = match &mut self.text {
            SeqText::Deferred(_) => (String::new(), false),
            SeqText::Here(stream) => {
                let (mut text, stopped) = if eos {
                    (String::new(), false)
                } else {
                    stream.push(&self.tokens, decoder.as_ref(), &self.params.stop)
                };
                if (eos || length) && !stopped {
                    let end = if eos { self.tokens.len() - 1 } else { self.tokens.len() };
                    text.push_str(&stream.finish(&self.tokens[..end], decoder.as_ref(), &self.params.stop));
                }
                (text, stopped)
            }
        };
        let reason = if eos || stopped {
            Some(FinishReason::Stop)
        } else if length {
            Some(FinishReason::Length)
        } else {
            None
        };
        let finished = reason.map(|reason| Finished {
            reason,
            prompt_tokens: self.prompt_len,
            output_tokens: self.generated(),
            cumulative_logprob: self.cumulative_logprob,
            cached_tokens: self.reused,
        });
        let update = GenerationUpdate {
            text,
            tokens: vec![sampled.token],
            logprobs: vec![sampled.logprob],
            top_logprobs: top.into_iter().collect(),
            finished,
        };
        let client_gone = if self.hold_final && finished.is_some() {
            self.held_final = Some(update);
            self.updates.is_closed()
        } else {
            !super::outbox::deliver_text(&self.updates, Ok(update), self.text.deferred())
        };
        if client_gone || finished.is_some() {
            self.done = true;
        }
        Accepted { first_token_s, inter_token_s, finished: reason, client_gone }
    }

    /// Ends the sequence where it stands (the worker's exit deadline came): sends the text still
    /// held back and a last update whose reason is [`FinishReason::Abort`].
    pub fn cut_short(&mut self, decoder: &dyn TokenText) {
        let text = match &mut self.text {
            SeqText::Here(stream) => stream.finish(&self.tokens, decoder, &self.params.stop),
            SeqText::Deferred(_) => String::new(),
        };
        let finished = Finished {
            reason: FinishReason::Abort,
            prompt_tokens: self.prompt_len,
            output_tokens: self.generated(),
            cumulative_logprob: self.cumulative_logprob,
            cached_tokens: self.reused,
        };
        let _ = super::outbox::deliver_text(
            &self.updates,
            Ok(GenerationUpdate { text, finished: Some(finished), ..Default::default() }),
            self.text.deferred(),
        );
        self.done = true;
    }
}
