//! The Llama-family decoder on the CPU: weights, a paged K/V pool and one batched, batch-invariant
//! forward over the chunks of a step ([`DecoderInstance`]).

use super::LoadError;
use super::attention::{AttentionShape, AttnScratch};
use super::attention_tasks::attention_rows;
use super::config::LlamaConfig;
use super::kv_pool::KvPool;
use super::layers::{DecoderLayer, WeightReader, linear_from, rms_norm, swiglu};
use super::rope::Rope;
use super::weights::{Weight, WeightSource};
use crate::backend::BackendError;
use crate::backend::cpu::linear::{Linear, linear_threads};
use crate::backend::cpu::quant::ActPrecision;
use crate::backend::generative::{DecoderInstance, DecoderShape, KvDtype, LogitsWanted, SeqChunk};

/// Buffers reused by every forward (grown, never shrunk).
#[derive(Debug, Default)]
struct Scratch {
    /// Residual stream `[rows, hidden]`.
    x: Vec<f32>,
    /// Normed rows `[rows, hidden]`.
    h: Vec<f32>,
    /// Stacked q/k/v `[rows, q_dim + 2 kv_dim]`.
    qkv: Vec<f32>,
    /// Attention outputs `[rows, q_dim]`.
    attn: Vec<f32>,
    /// Output of o_proj or down_proj `[rows, hidden]`.
    proj: Vec<f32>,
    /// Stacked gate/up `[rows, 2 intermediate]`.
    gate_up: Vec<f32>,
    /// SwiGLU output `[rows, intermediate]`.
    act: Vec<f32>,
    /// Rows whose logits are wanted, normed `[wanted, hidden]`.
    last: Vec<f32>,
    /// Per row: (absolute position, chunk index).
    rows: Vec<(usize, usize)>,
    /// Rows whose logits are wanted, in output order.
    wanted: Vec<usize>,
    /// RoPE cos / sin of each row's position (`head_dim / 2` per row), computed once per step.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Attention scratch, one per thread.
    attention: Vec<AttnScratch>,
}

fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    &mut buf[..len]
}

/// A Llama-architecture decoder (Llama 2/3, Mistral, Qwen2, SmolLM): f32, f16/bf16-widened or
/// quantized weights; f32 or f16 K/V.
pub struct LlamaModel {
    config: LlamaConfig,
    shape: DecoderShape,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Linear,
    rope: Rope,
    pool: KvPool,
    digest: [u8; 32],
    threads: usize,
    scratch: Scratch,
}

/// The token embedding: f32 rows, or a quantized matrix whose rows are expanded on lookup (a GGUF's
/// `token_embd`, which a tied head then multiplies by quantized).
enum Embedding {
    Dense(Vec<f32>),
    Quant(crate::backend::cpu::quant::QMatrix),
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel").field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl LlamaModel {
    /// Builds the decoder from `weights` (HF names) with a K/V pool of `num_blocks` blocks of
    /// `block_size` positions of `kv_dtype` elements.
    pub fn new(
        config: LlamaConfig,
        weights: &dyn WeightSource,
        num_blocks: usize,
        block_size: usize,
        kv_dtype: KvDtype,
    ) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let vocab = config.vocab_size;
        let mut reader = WeightReader::new(weights);
        let embed_weight = reader.required("model.embed_tokens.weight", &[vocab, h])?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::load(&mut reader, &config, i))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = reader.vector("model.norm.weight", h)?;
        let head = if config.tie_word_embeddings { None } else { reader.optional("lm_head.weight", &[vocab, h])? };
        let lm_head = match head {
            Some(w) => linear_from("lm_head.weight", w, vocab, h)?,
            // Tied (or a checkpoint that omits the head): the output projection is the embedding.
            None => linear_from("model.embed_tokens.weight", embed_weight.clone(), vocab, h)?,
        };
        let embed = match embed_weight {
            Weight::Dense { data, .. } => Embedding::Dense(data),
            Weight::Quant(q) => Embedding::Quant(q),
        };
        let pool = KvPool::new(
            config.num_hidden_layers,
            config.num_key_value_heads,
            config.head_dim,
            block_size,
            num_blocks,
            kv_dtype,
        )?;
        let shape = DecoderShape {
            layers: config.num_hidden_layers,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            vocab,
            max_positions: config.max_position_embeddings,
            block_size,
            kv_dtype,
        };
        let threads = linear_threads();
        Ok(LlamaModel {
            rope: Rope::new(&config),
            digest: reader.finish(),
            config,
            shape,
            embed,
            layers,
            norm,
            lm_head,
            pool,
            threads,
            scratch: Scratch { attention: vec![AttnScratch::default(); threads], ..Scratch::default() },
        })
    }

    /// Sets how the quantized products (GGUF weights) quantize their activations: 8 bits per block
    /// as llama.cpp does (the default), or 16 bits, closer to f32 (see docs/generation.md). Dense
    /// (f32/f16/bf16) layers are unaffected.
    pub fn set_activations(&mut self, act: ActPrecision) {
        for l in &mut self.layers {
            for lin in [&mut l.qkv, &mut l.o, &mut l.gate_up, &mut l.down] {
                lin.set_activations(act);
            }
        }
        self.lm_head.set_activations(act);
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Bytes of K/V one block holds (all layers).
    pub fn block_bytes(&self) -> usize {
        self.pool.block_bytes()
    }

    /// Uses at most `threads` threads for matrix products and attention (results do not change).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
        self.scratch.attention.resize(self.threads, AttnScratch::default());
    }

    fn validate(&self, chunks: &[SeqChunk<'_>]) -> Result<(), BackendError> {
        let invalid = |reason: String| BackendError::InvalidInput { name: "chunks".to_string(), reason };
        for (c, chunk) in chunks.iter().enumerate() {
            let end = chunk.start + chunk.tokens.len();
            if end > self.shape.max_positions {
                return Err(invalid(format!(
                    "chunk {c} reaches position {end}, past the context limit {}",
                    self.shape.max_positions
                )));
            }
            if chunk.blocks.len() * self.shape.block_size < end {
                return Err(invalid(format!("chunk {c}: {} blocks cannot hold {end} positions", chunk.blocks.len())));
            }
            if let Some(&b) = chunk.blocks.iter().find(|&&b| b as usize >= self.pool.num_blocks()) {
                return Err(invalid(format!("chunk {c}: block {b} outside the pool of {}", self.pool.num_blocks())));
            }
            if let Some(&t) = chunk.tokens.iter().find(|&&t| t as usize >= self.shape.vocab) {
                return Err(invalid(format!("chunk {c}: token {t} outside the vocabulary of {}", self.shape.vocab)));
            }
        }
        Ok(())
    }

    fn run(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) {
        let cfg = &self.config;
        let (hd, hidden, inter) = (cfg.head_dim, cfg.hidden_size, cfg.intermediate_size);
        let (q_dim, kv_dim) = (cfg.q_dim(), cfg.kv_dim());
        let qkv_w = q_dim + 2 * kv_dim;
        let s = &mut self.scratch;
        s.rows.clear();
        s.wanted.clear();
        for (c, chunk) in chunks.iter().enumerate() {
            let first = s.rows.len();
            s.rows.extend((0..chunk.tokens.len()).map(|i| (chunk.start + i, c)));
            match chunk.logits {
                LogitsWanted::None => {}
                LogitsWanted::Last if chunk.tokens.is_empty() => {}
                LogitsWanted::Last => s.wanted.push(s.rows.len() - 1),
                LogitsWanted::All => s.wanted.extend(first..s.rows.len()),
            }
        }
        let t = s.rows.len();
        if t == 0 {
            return;
        }
        let x = grow(&mut s.x, t * hidden);
        for (row, tok) in x.chunks_exact_mut(hidden).zip(chunks.iter().flat_map(|c| c.tokens)) {
            let tok = *tok as usize;
            match &self.embed {
                Embedding::Dense(e) => row.copy_from_slice(&e[tok * hidden..(tok + 1) * hidden]),
                Embedding::Quant(q) => q.dequantize_row(tok, row),
            }
        }
        let shape = AttentionShape {
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let half = hd / 2;
        let (cos, sin) = (grow(&mut s.cos, t * half), grow(&mut s.sin, t * half));
        for ((&(pos, _), c), sn) in s.rows.iter().zip(cos.chunks_exact_mut(half)).zip(sin.chunks_exact_mut(half)) {
            self.rope.angles(pos, c, sn);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let h = grow(&mut s.h, t * hidden);
            rms_norm(&s.x[..t * hidden], &layer.attn_norm, cfg.rms_norm_eps, h);
            let qkv = grow(&mut s.qkv, t * qkv_w);
            layer.qkv.forward_with(h, t, qkv, self.threads);
            for (i, (row, &(pos, c))) in qkv.chunks_exact_mut(qkv_w).zip(&s.rows).enumerate() {
                let (cos, sin) = (&s.cos[i * half..(i + 1) * half], &s.sin[i * half..(i + 1) * half]);
                let (q, kv) = row.split_at_mut(q_dim);
                let (k, v) = kv.split_at_mut(kv_dim);
                Rope::rotate(q, cos, sin);
                Rope::rotate(k, cos, sin);
                let bs = self.shape.block_size;
                self.pool.write(l, chunks[c].blocks[pos / bs] as usize, pos % bs, k, v);
            }
            let attn = grow(&mut s.attn, t * q_dim);
            attention_rows(&self.pool, l, shape, qkv, qkv_w, &s.rows, chunks, &mut s.attention, attn, self.threads);
            let proj = grow(&mut s.proj, t * hidden);
            layer.o.forward_with(attn, t, proj, self.threads);
            add(&mut s.x[..t * hidden], proj);
            let h = grow(&mut s.h, t * hidden);
            rms_norm(&s.x[..t * hidden], &layer.mlp_norm, cfg.rms_norm_eps, h);
            let gate_up = grow(&mut s.gate_up, t * 2 * inter);
            layer.gate_up.forward_with(h, t, gate_up, self.threads);
            let act = grow(&mut s.act, t * inter);
            swiglu(gate_up, inter, act);
            let proj = grow(&mut s.proj, t * hidden);
            layer.down.forward_with(act, t, proj, self.threads);
            add(&mut s.x[..t * hidden], proj);
        }
        let w = s.wanted.len();
        if w == 0 {
            return;
        }
        let last = grow(&mut s.last, w * hidden);
        for (dst, &r) in last.chunks_exact_mut(hidden).zip(&s.wanted) {
            rms_norm(&s.x[r * hidden..(r + 1) * hidden], &self.norm, cfg.rms_norm_eps, dst);
        }
        let vocab = self.shape.vocab;
        let old = logits.len();
        logits.resize(old + w * vocab, 0.0);
        self.lm_head.forward_with(last, w, &mut logits[old..], self.threads);
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl DecoderInstance for LlamaModel {
    fn shape(&self) -> &DecoderShape {
        &self.shape
    }

    fn num_blocks(&self) -> usize {
        self.pool.num_blocks()
    }

    fn forward(&mut self, chunks: &[SeqChunk<'_>], logits: &mut Vec<f32>) -> Result<(), BackendError> {
        self.validate(chunks)?;
        self.run(chunks, logits);
        Ok(())
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.pool.copy_block(src, dst)
    }

    /// Layout: per block in order, per layer, K then V, each `[kv_head][slot][head_dim]`,
    /// little-endian elements of the shape's `kv_dtype`.
    fn read_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>, BackendError> {
        self.pool.read_blocks(blocks)
    }

    fn write_blocks(&mut self, blocks: &[u32], bytes: &[u8]) -> Result<(), BackendError> {
        self.pool.write_blocks(blocks, bytes)
    }

    fn weights_digest(&self) -> [u8; 32] {
        self.digest
    }

    fn label(&self) -> String {
        format!("cpu:{}", self.config.model_type)
    }
}
