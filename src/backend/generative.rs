//! The generative instance contract: one decoder step over a batch of sequence chunks with paged K/V.
//!
//! The generative batching policy (the step loop) owns the block tables and decides which tokens of
//! which sequences run in a step; a [`DecoderInstance`] owns the weights and the K/V storage (a pool of
//! `num_blocks` fixed-size blocks) and runs one forward over the chunks it is given.

use super::BackendError;

/// Tokens per K/V block when a model does not say otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Shape facts the step loop needs from a decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderShape {
    /// Number of transformer layers (each holds K and V per block).
    pub layers: usize,
    /// Number of key/value heads (grouped-query attention: may be fewer than the query heads).
    pub kv_heads: usize,
    /// Size of one attention head.
    pub head_dim: usize,
    /// Vocabulary size: the length of one logits row.
    pub vocab: usize,
    /// Context limit (`max_position_embeddings`): no position at or beyond it may be computed.
    pub max_positions: usize,
    /// Tokens per KV block (default [`DEFAULT_BLOCK_SIZE`]).
    pub block_size: usize,
    /// How K and V are stored (and travel in session blobs).
    pub kv_dtype: KvDtype,
}

impl DecoderShape {
    /// Blocks needed to hold K/V for `positions` tokens.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size.max(1))
    }

    /// Bytes of K and V of one position (every layer and K/V head).
    pub fn kv_bytes_per_position(&self) -> usize {
        kv_bytes_per_position(self.layers, self.kv_heads, self.head_dim, self.kv_dtype)
    }

    /// Bytes of one K/V block of `block_size` positions, as [`DecoderInstance::read_blocks`] gives.
    pub fn kv_block_bytes(&self, block_size: usize) -> usize {
        self.kv_bytes_per_position() * block_size
    }
}

/// Bytes of K and V of one position of a decoder with `layers` layers of `kv_heads` K/V heads of
/// `head_dim` elements of `dtype` (what a pool budget is divided by, before a decoder exists).
pub fn kv_bytes_per_position(layers: usize, kv_heads: usize, head_dim: usize, dtype: KvDtype) -> usize {
    layers * 2 * kv_heads * head_dim * dtype.bytes()
}

/// The element type of a decoder's K/V cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// IEEE single precision: the values attention computed, unrounded.
    #[default]
    F32,
    /// IEEE half precision (rounded to nearest even when stored; read back exactly): half the
    /// memory and bandwidth, as llama.cpp's default cache.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    /// The name used in configurations and messages (`f32`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// The code a session blob records (0 f32, 1 f16).
    pub fn code(self) -> u64 {
        match self {
            KvDtype::F32 => 0,
            KvDtype::F16 => 1,
        }
    }

    /// The dtype of a blob's code, if known.
    pub fn from_code(code: u64) -> Option<KvDtype> {
        match code {
            0 => Some(KvDtype::F32),
            1 => Some(KvDtype::F16),
            _ => None,
        }
    }
}

/// One sequence's part of a step: tokens at absolute positions `start..start + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The tokens to run, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    /// Absolute position of `tokens[0]`.
    pub start: usize,
    /// Block table: block ids covering positions 0..start+tokens.len() (block i holds positions
    /// i*block_size .. (i+1)*block_size). K/V of positions < start are already in those blocks.
    pub blocks: &'a [u32],
    /// Logits wanted: for the last token only, or for every token of the chunk.
    pub logits: LogitsWanted,
}

/// Which logits rows a chunk asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// No logits (a prefill chunk that is not the last of its prompt).
    None,
    /// One row: the logits after the chunk's last token (the next-token distribution).
    Last,
    /// One row per token of the chunk (prompt logprobs, speculative checks).
    All,
}

impl LogitsWanted {
    /// Number of logits rows this chunk appends for a chunk of `tokens` tokens.
    pub fn rows(self, tokens: usize) -> usize {
        match self {
            LogitsWanted::None => 0,
            LogitsWanted::Last => usize::from(tokens > 0),
            LogitsWanted::All => tokens,
        }
    }
}

/// A decoder instance: owns its weights and its KV storage (num_blocks blocks), one thread.
pub trait DecoderInstance: Send {
    /// The decoder's shape (layers, heads, vocabulary, context limit, block size).
    fn shape(&self) -> &DecoderShape;

    /// Number of K/V blocks in this instance's pool; block ids are `0..num_blocks()`.
    fn num_blocks(&self) -> usize;

    /// One forward over all chunks (batched). Writes K/V of every chunk token into its blocks, and appends
    /// logits rows (vocab f32 each) to `logits` in chunk order (0, 1 or tokens.len() rows per chunk).
    /// Must be batch-invariant: a chunk's logits and K/V are bit-identical whatever else is in the step and
    /// however its prefill was split into chunks.
    fn forward(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<(), BackendError>;

    /// Copies block `src` to block `dst` (copy-on-write of a shared partial block).
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError>;

    /// Reads blocks' K/V as bytes (spill, export). Layout documented by the implementation.
    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, BackendError>;

    /// Writes blocks' K/V back from bytes produced by [`DecoderInstance::read_blocks`] (restore, import).
    fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError>;

    /// A digest of the weights (model identity for sessions), e.g. a hash of the tensor bytes.
    fn weights_digest(&self) -> [u8; 32];

    /// A short label for logs and metrics, e.g. `cpu:0`.
    fn label(&self) -> String;

    /// Whether this decoder can only prefill from position 0 (compiled context-encoding programs
    /// that write a sequence's K/V from its start, as NxD Inference's do): then every prefill
    /// runs a sequence's whole token history in one chunk, and a kept session's next turn or a
    /// prefix-cache hit recomputes what was already computed.
    fn prefill_from_zero_only(&self) -> bool {
        false
    }

    /// Whether [`DecoderInstance::forward_greedy`] picks greedy tokens on the device (compiled
    /// programs with token ids out), so the logits never travel to the host.
    fn greedy_on_device(&self) -> bool {
        false
    }

    /// Like [`DecoderInstance::forward`], but instead of logits rows appends, for each row a chunk
    /// asks for ([`LogitsWanted::Last`] only), the greedy token (argmax, lowest id among equals)
    /// and its log-probability (`logit − log Σ exp(logits)`), exactly as the host sampler would.
    fn forward_greedy(&mut self, chunks: &[SeqChunk<'_>], picked: &mut Vec<(u32, f32)>) -> Result<(), BackendError> {
        let _ = (chunks, picked);
        Err(BackendError::Unavailable(format!("{} cannot sample on the device", self.label())))
    }
}
