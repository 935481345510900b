//! What the generative policy is handed (a tokenized prompt, its sampling parameters and an update
//! channel) and what flows back (one update per generated token, the last one saying why it ended).

use std::time::Instant;

use tokio::sync::mpsc;

use super::params::SamplingParams;
use super::sampler::RankedLogprob;
use crate::backend::BackendError;
use crate::sessions::SequenceId;

/// One generation request, validated and tokenized.
#[derive(Debug)]
pub struct GenerateRequest {
    /// Prompt tokens (at least one).
    pub prompt: Vec<u32>,
    /// Sampling and stopping parameters.
    pub params: SamplingParams,
    /// The seed of the sampling randomness (the request's, or one drawn for it).
    pub seed: u64,
    /// Where updates go; a closed receiver means the client went away: the sequence stops and its
    /// blocks are freed at the next step.
    pub updates: UpdateSender,
    /// When the request reached the worker (time to first token is measured from here).
    pub arrived: Instant,
    /// The conversation session this request is a turn of (`None`: a stateless request).
    pub session: Option<SessionTurn>,
}

/// A request's place in a conversation session: its prompt is appended to the session's tokens and
/// only the new tokens are prefilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTurn {
    /// The session id (Triton's `sequence_id`, or the `x-session-id` header).
    pub id: SequenceId,
    /// `sequence_start`: begin the session (a session already open under this id is replaced).
    pub start: bool,
    /// `sequence_end`: the session ends after this turn (its K/V and tokens are released).
    pub end: bool,
    /// The id came from a front that cannot send START (the `x-session-id` header, OpenAI): an
    /// unknown id starts a session instead of being refused.
    pub implicit_start: bool,
}

/// The update channel of one request. Unbounded: the step loop never waits on a client, and a
/// request's updates are bounded by its `max_tokens`.
pub type UpdateSender = mpsc::UnboundedSender<Result<GenerationUpdate, GenerationError>>;

/// The receiving end of an update channel.
pub type UpdateReceiver = mpsc::UnboundedReceiver<Result<GenerationUpdate, GenerationError>>;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// End-of-sequence token or a stop string (vLLM's `stop`).
    Stop,
    /// `max_tokens` generated, or the context limit reached (vLLM's `length`).
    Length,
    /// Cut short by the worker: its exit deadline came while the sequence was still generating
    /// (vLLM's `abort`). The tokens generated so far were sent; a session keeps them.
    Abort,
}

impl FinishReason {
    /// The name vLLM reports (`stop`, `length`, `abort`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// The summary carried by a sequence's last update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated (including an end-of-sequence token).
    pub output_tokens: usize,
    /// Sum of the generated tokens' log-probabilities.
    pub cumulative_logprob: f64,
    /// Prompt tokens whose K/V was reused (the kept session, or the prefix cache) instead of computed.
    pub cached_tokens: usize,
}

/// The most likely tokens at one generated position (vLLM's `logprobs` entry for that position).
#[derive(Debug, Clone, PartialEq)]
pub struct PositionLogprobs {
    /// The chosen token, its log-probability and rank.
    pub chosen: RankedLogprob,
    /// The most likely tokens, best first (as many as the `logprobs` sampling parameter asked).
    pub top: Vec<RankedLogprob>,
}

/// What one step produced for one sequence: its new token, the text that became final, and (last
/// update only) why it ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GenerationUpdate {
    /// Text completed by these tokens (may be empty while a character or a possible stop string is
    /// incomplete).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Log-probability of each generated token.
    pub logprobs: Vec<f32>,
    /// Per token, the most likely alternatives (only when the `logprobs` parameter asked for them).
    pub top_logprobs: Vec<PositionLogprobs>,
    /// Set on the last update.
    pub finished: Option<Finished>,
}

/// Why a generation request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GenerationError {
    /// The request cannot be served by this model (prompt longer than the context or the K/V pool).
    #[error("{reason}")]
    TooLarge {
        /// The limit exceeded and what to do.
        reason: String,
    },
    /// The decoder failed the step this sequence was in.
    #[error("{0}")]
    Backend(#[from] BackendError),
    /// A session turn that cannot run: unknown, ended or restarted session, `truncate_to` beyond the
    /// history, a session at its token limit.
    #[error("{reason}")]
    Session {
        /// What is wrong with the turn and what to do.
        reason: String,
    },
    /// The worker holds as many sessions as it may: a new one is refused until one ends.
    #[error("{reason}")]
    SessionsFull {
        /// The limit and what to do.
        reason: String,
    },
    /// Another live worker holds the session (shared store with leases) and did not hand it over
    /// within the wait: gRPC UNAVAILABLE, HTTP 409, both naming the holder.
    #[error("{reason}")]
    Held {
        /// The holder's worker id.
        holder: String,
        /// What happened and what to do.
        reason: String,
    },
    /// The model stopped serving (drain, unload, instance lost) before the sequence finished.
    #[error("{reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
}
