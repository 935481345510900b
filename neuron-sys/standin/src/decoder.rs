//! Running a `llama_decoder` program (format version 3) on the bound tensors: which tensor plays
//! which role (resolved once at load), the execution-time checks (alias pairs, slots,
//! positions, token ids), locking the tensors in place (no copy of weights or caches), and the
//! call into [`crate::decoder_math`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use neff_format::program::{DecoderMode, LlamaDecoderOp};

use crate::abi::{NRT_INVALID, NrtStatus};
use crate::decoder_math::{Caches, Dims, LayerWeights, Llama3Scaling, Model, Picked, Rope, Token, Weights, forward};
use crate::knobs::ExecKind;
use crate::neff::TensorDecl;
use crate::tensor::{Access, LockSet, Tensor, View, addr};

/// Indices (into the model's inputs, or outputs for `*_out`) of one layer's tensors.
#[derive(Debug, Clone)]
struct LayerPlan {
    input_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    q_bias: Option<usize>,
    k_bias: Option<usize>,
    v_bias: Option<usize>,
    o: usize,
    post_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
    k_in: usize,
    v_in: usize,
    k_out: usize,
    v_out: usize,
}

/// A checked decoder op with every tensor role resolved to its index in the declarations.
#[derive(Debug, Clone)]
pub struct DecoderPlan {
    op: LlamaDecoderOp,
    dims: Dims,
    slots: usize,
    eps: f32,
    rope: Rope,
    rows: usize,
    /// Positions must be below this (prefill: `max_len`, decode: `context`).
    limit: usize,
    ids: usize,
    positions: usize,
    seq_ids: usize,
    embed: usize,
    norm: usize,
    lm_head: usize,
    layers: Vec<LayerPlan>,
    logits: usize,
    next_ids: Option<usize>,
    next_logprobs: Option<usize>,
}

fn size(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("llama_decoder: dimension {v} does not fit this machine"))
}

fn index(decls: &[TensorDecl], name: &str, kind: &str) -> Result<usize, String> {
    decls.iter().position(|d| d.name == name).ok_or_else(|| format!("llama_decoder: {kind} '{name}' is not declared"))
}

impl DecoderPlan {
    /// Resolves `op` (already checked by `neff_format`'s `Program::check`) against the NEFF's
    /// declarations.
    pub fn new(op: &LlamaDecoderOp, inputs: &[TensorDecl], outputs: &[TensorDecl]) -> Result<DecoderPlan, String> {
        let c = &op.config;
        let dims = Dims {
            hidden: size(c.hidden_size)?,
            intermediate: size(c.intermediate_size)?,
            heads: size(c.num_heads)?,
            kv_heads: size(c.num_kv_heads)?,
            head_dim: size(c.head_dim)?,
            vocab: size(c.vocab_size)?,
            max_len: size(c.max_len)?,
        };
        let scaling = c.rope_scaling.map(|s| Llama3Scaling {
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings as f64,
        });
        let declared: Vec<_> = inputs.iter().map(TensorDecl::as_neff).collect();
        let rows = size(op.rows(&declared).map_err(|e| e.to_string())?)?;
        let limit = match op.mode {
            DecoderMode::Prefill => dims.max_len,
            DecoderMode::Decode => size(op.context.unwrap_or(c.max_len))?,
        };
        let weight = |hf: &str| index(inputs, &op.weight_input(hf), "weight");
        let mut layers = Vec::new();
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let names = op.cache_names(l);
            let bias = |which: &str| -> Result<Option<usize>, String> {
                c.attention_bias.then(|| weight(&format!("{p}.self_attn.{which}_proj.bias"))).transpose()
            };
            layers.push(LayerPlan {
                input_norm: weight(&format!("{p}.input_layernorm.weight"))?,
                q: weight(&format!("{p}.self_attn.q_proj.weight"))?,
                k: weight(&format!("{p}.self_attn.k_proj.weight"))?,
                v: weight(&format!("{p}.self_attn.v_proj.weight"))?,
                q_bias: bias("q")?,
                k_bias: bias("k")?,
                v_bias: bias("v")?,
                o: weight(&format!("{p}.self_attn.o_proj.weight"))?,
                post_norm: weight(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: weight(&format!("{p}.mlp.gate_proj.weight"))?,
                up: weight(&format!("{p}.mlp.up_proj.weight"))?,
                down: weight(&format!("{p}.mlp.down_proj.weight"))?,
                k_in: index(inputs, &names.k_input, "cache input")?,
                v_in: index(inputs, &names.v_input, "cache input")?,
                k_out: index(outputs, &names.k_output, "cache output")?,
                v_out: index(outputs, &names.v_output, "cache output")?,
            });
        }
        let embed = weight("model.embed_tokens.weight")?;
        Ok(DecoderPlan {
            dims,
            slots: size(c.slots)?,
            eps: c.rms_norm_eps as f32,
            rope: Rope::new(dims.head_dim, c.rope_theta, scaling),
            rows,
            limit,
            ids: index(inputs, &op.input_ids, "input")?,
            positions: index(inputs, &op.position_ids, "input")?,
            seq_ids: index(inputs, &op.seq_ids, "input")?,
            embed,
            norm: weight("model.norm.weight")?,
            lm_head: if c.tie_word_embeddings { embed } else { weight("lm_head.weight")? },
            layers,
            logits: index(outputs, &op.logits, "output")?,
            next_ids: op.next_token_ids.as_deref().map(|n| index(outputs, n, "output")).transpose()?,
            next_logprobs: op.next_token_logprobs.as_deref().map(|n| index(outputs, n, "output")).transpose()?,
            op: op.clone(),
        })
    }

    /// Prefill or decode, for the device-time knobs.
    pub fn exec_kind(&self) -> ExecKind {
        match self.op.mode {
            DecoderMode::Prefill => ExecKind::Prefill,
            DecoderMode::Decode => ExecKind::Decode,
        }
    }

    /// The real tokens of a call, checked: slot, id and position in range, no two at one slot
    /// and position. Rows at position -1 are padding.
    fn tokens(&self, ids: &[i32], positions: &[i32], seq_ids: &[i32]) -> Result<Vec<Token>, String> {
        let mut tokens = Vec::with_capacity(self.rows);
        let mut seen = HashSet::new();
        for row in 0..self.rows {
            let (id, pos) = (ids[row], positions[row]);
            let slot = match self.op.mode {
                DecoderMode::Prefill => seq_ids[0],
                DecoderMode::Decode => seq_ids[row],
            };
            if pos == -1 {
                continue;
            }
            let what = match self.op.mode {
                DecoderMode::Prefill => "position_ids",
                DecoderMode::Decode => "context (the decode bucket)",
            };
            let pos = usize::try_from(pos).map_err(|_| format!("row {row}: position {pos} (padding is -1)"))?;
            if pos >= self.limit {
                return Err(format!("row {row}: position {pos} is not below {} ({what})", self.limit));
            }
            let slot = usize::try_from(slot)
                .ok()
                .filter(|s| *s < self.slots)
                .ok_or_else(|| format!("row {row}: seq_id {slot} is not a cache slot (0..{})", self.slots))?;
            let id = usize::try_from(id).ok().filter(|i| *i < self.dims.vocab).ok_or_else(|| {
                format!("row {row}: token id {id} is outside the vocabulary (0..{})", self.dims.vocab)
            })?;
            if !seen.insert((slot, pos)) {
                return Err(format!("row {row}: a second token for slot {slot} position {pos} in one call"));
            }
            tokens.push(Token { row, id, pos, slot });
        }
        Ok(tokens)
    }

    /// Runs one step on the bound tensors (in declaration order, sizes already checked); the
    /// error is logged by the caller.
    pub fn execute(&self, inputs: &[Arc<Tensor>], outputs: &[Arc<Tensor>]) -> Result<(), Failure> {
        let fail = |message: String| (NRT_INVALID, message);
        let tensor_in = |i: usize| inputs.get(i).ok_or_else(|| fail(format!("input {i} is not bound")));
        let tensor_out = |i: usize| outputs.get(i).ok_or_else(|| fail(format!("output {i} is not bound")));
        // Reads: ids and weights. Writes: caches (input and output must be one tensor), outputs.
        let mut reads = vec![self.ids, self.positions, self.seq_ids, self.embed, self.norm, self.lm_head];
        let mut writes = Vec::new();
        for l in &self.layers {
            reads.extend([l.input_norm, l.q, l.k, l.v, l.o, l.post_norm, l.gate, l.up, l.down]);
            reads.extend([l.q_bias, l.k_bias, l.v_bias].into_iter().flatten());
            for (input, output) in [(l.k_in, l.k_out), (l.v_in, l.v_out)] {
                let (a, b) = (tensor_in(input)?, tensor_out(output)?);
                if !Arc::ptr_eq(a, b) {
                    return Err(fail(format!(
                        "cache '{}' and '{}' are bound to two different tensors ('{}', '{}'); an aliased \
                         (must-alias) pair takes the same device tensor as input and output",
                        self.op_name(input, true),
                        self.op_name(output, false),
                        a.name,
                        b.name
                    )));
                }
                writes.push(Arc::clone(a));
            }
        }
        writes.push(Arc::clone(tensor_out(self.logits)?));
        if let Some(next) = self.next_ids {
            writes.push(Arc::clone(tensor_out(next)?));
        }
        if let Some(lp) = self.next_logprobs {
            writes.push(Arc::clone(tensor_out(lp)?));
        }
        let read_tensors: Vec<&Arc<Tensor>> = reads.iter().map(|&i| tensor_in(i)).collect::<Result<_, _>>()?;
        let read_addrs: HashSet<usize> = read_tensors.iter().map(|t| addr(t)).collect();
        let mut write_addrs = HashSet::new();
        for t in &writes {
            if read_addrs.contains(&addr(t)) || !write_addrs.insert(addr(t)) {
                return Err(fail(format!("tensor '{}' is bound to two roles, one of them written", t.name)));
            }
        }
        let requests: Vec<(&Tensor, Access)> = read_tensors
            .iter()
            .map(|t| (&***t, Access::Read))
            .chain(writes.iter().map(|t| (&**t, Access::Write)))
            .collect();
        let mut locks = LockSet::lock(&requests);
        let mut views = locks.views();
        let f32s = |i: usize| tensor_in(i).and_then(|t| read_view(&views, t)).and_then(|(b, t)| cast(b, t));
        let i32s = |i: usize| tensor_in(i).and_then(|t| read_view(&views, t)).and_then(|(b, t)| cast(b, t));
        let tokens = self.tokens(i32s(self.ids)?, i32s(self.positions)?, i32s(self.seq_ids)?).map_err(fail)?;
        let optional = |i: Option<usize>| i.map(f32s).transpose();
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(LayerWeights {
                input_norm: f32s(l.input_norm)?,
                q: f32s(l.q)?,
                k: f32s(l.k)?,
                v: f32s(l.v)?,
                q_bias: optional(l.q_bias)?,
                k_bias: optional(l.k_bias)?,
                v_bias: optional(l.v_bias)?,
                o: f32s(l.o)?,
                post_norm: f32s(l.post_norm)?,
                gate: f32s(l.gate)?,
                up: f32s(l.up)?,
                down: f32s(l.down)?,
            });
        }
        let weights =
            Weights { embed: f32s(self.embed)?, layers, norm: f32s(self.norm)?, lm_head: f32s(self.lm_head)? };
        let (mut k_cache, mut v_cache) = (Vec::new(), Vec::new());
        let mut cache_tensors = writes.iter();
        for _ in &self.layers {
            for cache in [&mut k_cache, &mut v_cache] {
                let t = cache_tensors.next().ok_or_else(|| fail("cache tensors missing".into()))?;
                cache.push(cast_mut::<f32>(write_view(&mut views, t)?, t)?);
            }
        }
        let logits_tensor = tensor_out(self.logits)?;
        let logits = cast_mut::<f32>(write_view(&mut views, logits_tensor)?, logits_tensor)?;
        let next_ids = match self.next_ids {
            Some(i) => {
                let t = tensor_out(i)?;
                Some(cast_mut::<i32>(write_view(&mut views, t)?, t)?)
            }
            None => None,
        };
        let next_logprobs = match self.next_logprobs {
            Some(i) => {
                let t = tensor_out(i)?;
                Some(cast_mut::<f32>(write_view(&mut views, t)?, t)?)
            }
            None => None,
        };
        let model = Model { dims: self.dims, eps: self.eps, rope: &self.rope, weights };
        let picked = Picked { ids: next_ids, logprobs: next_logprobs };
        forward(&model, &mut Caches { k: k_cache, v: v_cache }, &tokens, logits, picked);
        Ok(())
    }

    /// The declared name of input (or output) `i`, for messages.
    fn op_name(&self, i: usize, input: bool) -> String {
        let names: Vec<_> = (0..self.op.config.num_layers).map(|l| self.op.cache_names(l)).collect();
        let found = self.layers.iter().zip(&names).find_map(|(l, n)| match input {
            true if l.k_in == i => Some(n.k_input.clone()),
            true if l.v_in == i => Some(n.v_input.clone()),
            false if l.k_out == i => Some(n.k_output.clone()),
            false if l.v_out == i => Some(n.v_output.clone()),
            _ => None,
        });
        found.unwrap_or_default()
    }
}

type Failure = (NrtStatus, String);

/// The bytes of a tensor locked for reading (the slice outlives the map borrow).
fn read_view<'b, 't>(views: &HashMap<usize, View<'b>>, t: &'t Tensor) -> Result<(&'b [u8], &'t Tensor), Failure> {
    match views.get(&addr(t)) {
        Some(View::Read(bytes)) => Ok((*bytes, t)),
        _ => Err((NRT_INVALID, format!("tensor '{}' is not locked for reading", t.name))),
    }
}

/// The bytes of a tensor locked for writing (taken out of the map: one writer per tensor).
fn write_view<'b>(views: &mut HashMap<usize, View<'b>>, t: &Tensor) -> Result<&'b mut [u8], Failure> {
    match views.remove(&addr(t)) {
        Some(View::Write(bytes)) => Ok(bytes),
        _ => Err((NRT_INVALID, format!("tensor '{}' is not locked for writing", t.name))),
    }
}

fn cast<'b, T: bytemuck::Pod>(bytes: &'b [u8], t: &Tensor) -> Result<&'b [T], Failure> {
    bytemuck::try_cast_slice(bytes).map_err(|_| (NRT_INVALID, format!("tensor '{}' is not 4-byte aligned", t.name)))
}

fn cast_mut<'b, T: bytemuck::Pod>(bytes: &'b mut [u8], t: &Tensor) -> Result<&'b mut [T], Failure> {
    bytemuck::try_cast_slice_mut(bytes).map_err(|_| (NRT_INVALID, format!("tensor '{}' is not 4-byte aligned", t.name)))
}
