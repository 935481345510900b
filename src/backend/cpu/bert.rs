//! A BERT encoder (HF `BertModel` layout) with sentence pooling, loaded from safetensors.
//!
//! Files read from the model folder: `config.json` (HF config), `model.safetensors` (F32, F16 or
//! BF16; names bare or under `bert.`), and optionally `modules.json` / `1_Pooling/config.json`
//! (see [`super::pooling`]). Every projection runs as one GEMM over all batch×seq tokens (Q, K and
//! V fused into one `[3·hidden, hidden]` weight) with its weight packed once at load
//! ([`super::packed`]): bias and GELU are applied in the GEMM's epilogue, residual + LayerNorm
//! right after each block of rows; attention runs per (sequence, block of queries).

use std::path::Path;

use serde::Deserialize;

use super::attention::{AttentionShape, self_attention};
use super::gemm::default_threads;
use super::ops::{Activation, add_in_place, layer_norm};
use super::packed::{Epilogue, PackedLinear, linear};
use super::pooling::{PoolingMode, l2_normalize, pool, read_sentence_config};
use super::weights::{WeightReader, read_file};
use crate::backend::BackendError;

/// The architecture fields of an HF BERT `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Hidden size (`heads · head_dim`).
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Feed-forward inner size.
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (erf form) or `relu`.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Vocabulary size: valid ids are `0..vocab_size`.
    pub vocab_size: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Token types (0 = no token type embeddings).
    #[serde(default)]
    pub type_vocab_size: usize,
}

fn default_act() -> String {
    "gelu".to_string()
}

fn default_eps() -> f64 {
    1e-12
}

/// What the model repository needs to describe a loaded BERT model.
#[derive(Debug, Clone, PartialEq)]
pub struct BertInfo {
    /// Hidden size: the last dimension of both outputs.
    pub hidden_size: usize,
    /// Valid token ids are `0..vocab_size`.
    pub vocab_size: usize,
    /// Longest accepted sequence.
    pub max_position_embeddings: usize,
    /// Token types accepted (`token_type_ids` in `0..type_vocab_size`).
    pub type_vocab_size: usize,
    /// Whether the model has token type embeddings (so `token_type_ids` is a meaningful input).
    pub has_token_type_embeddings: bool,
    /// Whether `sentence_embedding` is L2-normalised.
    pub normalize: bool,
    /// How `sentence_embedding` is pooled.
    pub pooling: PoolingMode,
}

/// Both outputs of one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BertOutput {
    /// `[batch, seq, hidden]` final token states.
    pub last_hidden_state: Vec<f32>,
    /// `[batch, hidden]` pooled (and optionally normalised) sentence embeddings.
    pub sentence_embedding: Vec<f32>,
}

/// Reusable buffers of a forward pass (one per instance, so batches do not reallocate).
#[derive(Debug, Default)]
pub struct BertScratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    tmp: Vec<f32>,
    inter: Vec<f32>,
    keep: Vec<bool>,
}

struct Layer {
    qkv: PackedLinear,
    out: PackedLinear,
    ln1: (Vec<f32>, Vec<f32>),
    inter: PackedLinear,
    ffn_out: PackedLinear,
    ln2: (Vec<f32>, Vec<f32>),
}

/// A loaded BERT encoder with its pooling; immutable, shared by the instances of a model.
pub struct BertModel {
    config: BertConfig,
    act: Activation,
    eps: f32,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Option<Vec<f32>>,
    emb_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    pooling: PoolingMode,
    normalize: bool,
}

impl std::fmt::Debug for BertModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertModel").field("config", &self.config).field("pooling", &self.pooling).finish()
    }
}

fn invalid(name: &str, reason: String) -> BackendError {
    BackendError::InvalidInput { name: name.to_string(), reason }
}

impl BertModel {
    /// Loads `config.json`, `model.safetensors` and the sentence-transformers files from `dir`.
    /// A missing or misshapen tensor is a [`BackendError::Load`] naming the file, the tensor and
    /// the expected and found shapes.
    pub fn load(dir: &Path) -> Result<BertModel, BackendError> {
        let cfg_path = dir.join("config.json");
        let cfg_bytes = read_file(&cfg_path)?;
        let config: BertConfig = serde_json::from_slice(&cfg_bytes)
            .map_err(|e| BackendError::Load(format!("{}: {e}", cfg_path.display())))?;
        let (pooling, normalize) = read_sentence_config(dir)?;
        let st_path = dir.join("model.safetensors");
        let bytes = read_file(&st_path)?;
        let reader = WeightReader::new(&st_path, &bytes, "bert.")?;
        BertModel::from_fn(config, pooling, normalize, |name, shape| {
            if name == "embeddings.token_type_embeddings.weight" && !reader.contains(name) {
                return Ok(None);
            }
            reader.get(name, shape).map(Some)
        })
    }

    /// Builds a model from `config` and a source of HF-named tensors: `get(name, shape)` returns the
    /// f32 values of that exact shape, or `None` for an absent optional tensor (only the token type
    /// embeddings are optional). Used by [`BertModel::load`] and by generated test/bench models.
    pub fn from_fn(
        config: BertConfig,
        pooling: PoolingMode,
        normalize: bool,
        mut get: impl FnMut(&str, &[usize]) -> Result<Option<Vec<f32>>, BackendError>,
    ) -> Result<BertModel, BackendError> {
        let h = config.hidden_size;
        let heads = config.num_attention_heads;
        if h == 0 || heads == 0 || !h.is_multiple_of(heads) {
            return Err(BackendError::Load(format!(
                "config.json: hidden_size {h} is not a positive multiple of num_attention_heads {heads}"
            )));
        }
        let act = match config.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            other => {
                return Err(BackendError::Load(format!(
                    "config.json: hidden_act '{other}' is not supported (gelu or relu)"
                )));
            }
        };
        let mut req = |name: &str, shape: &[usize]| -> Result<Vec<f32>, BackendError> {
            get(name, shape)?
                .ok_or_else(|| BackendError::Load(format!("tensor '{name}' (expected shape {shape:?}) is missing")))
        };
        let i = config.intermediate_size;
        let word = req("embeddings.word_embeddings.weight", &[config.vocab_size, h])?;
        let position = req("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?;
        let emb_ln = (req("embeddings.LayerNorm.weight", &[h])?, req("embeddings.LayerNorm.bias", &[h])?);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{l}.");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                qkv_w.extend(req(&format!("{p}attention.self.{part}.weight"), &[h, h])?);
                qkv_b.extend(req(&format!("{p}attention.self.{part}.bias"), &[h])?);
            }
            let out_w = req(&format!("{p}attention.output.dense.weight"), &[h, h])?;
            let out_b = req(&format!("{p}attention.output.dense.bias"), &[h])?;
            layers.push(Layer {
                qkv: PackedLinear::new(&qkv_w, &qkv_b, 3 * h, h),
                out: PackedLinear::new(&out_w, &out_b, h, h),
                ln1: (
                    req(&format!("{p}attention.output.LayerNorm.weight"), &[h])?,
                    req(&format!("{p}attention.output.LayerNorm.bias"), &[h])?,
                ),
                inter: PackedLinear::new(
                    &req(&format!("{p}intermediate.dense.weight"), &[i, h])?,
                    &req(&format!("{p}intermediate.dense.bias"), &[i])?,
                    i,
                    h,
                ),
                ffn_out: PackedLinear::new(
                    &req(&format!("{p}output.dense.weight"), &[h, i])?,
                    &req(&format!("{p}output.dense.bias"), &[h])?,
                    h,
                    i,
                ),
                ln2: (
                    req(&format!("{p}output.LayerNorm.weight"), &[h])?,
                    req(&format!("{p}output.LayerNorm.bias"), &[h])?,
                ),
            });
        }
        let token_type = if config.type_vocab_size > 0 {
            get("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?
        } else {
            None
        };
        let eps = config.layer_norm_eps as f32;
        Ok(BertModel { config, act, eps, word, position, token_type, emb_ln, layers, pooling, normalize })
    }

    /// The model's architecture as read from `config.json`.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// What the repository needs to declare the model's inputs and outputs.
    pub fn info(&self) -> BertInfo {
        BertInfo {
            hidden_size: self.config.hidden_size,
            vocab_size: self.config.vocab_size,
            max_position_embeddings: self.config.max_position_embeddings,
            type_vocab_size: if self.token_type.is_some() { self.config.type_vocab_size } else { 0 },
            has_token_type_embeddings: self.token_type.is_some(),
            normalize: self.normalize,
            pooling: self.pooling,
        }
    }

    /// Runs `batch` sequences of `seq` tokens with fresh buffers and the default thread count.
    /// `token_type_ids` defaults to all zeros. Bad input is a [`BackendError::InvalidInput`].
    pub fn forward(
        &self,
        input_ids: &[i64],
        attention_mask: &[i64],
        token_type_ids: Option<&[i64]>,
        batch: usize,
        seq: usize,
    ) -> Result<BertOutput, BackendError> {
        let mut scratch = BertScratch::default();
        self.forward_with(&mut scratch, default_threads(), input_ids, attention_mask, token_type_ids, batch, seq)
    }

    fn validate(
        &self,
        input_ids: &[i64],
        attention_mask: &[i64],
        token_type_ids: Option<&[i64]>,
        batch: usize,
        seq: usize,
    ) -> Result<(), BackendError> {
        let n = batch.checked_mul(seq).ok_or_else(|| invalid("input_ids", "batch × seq overflows".into()))?;
        let len_check = |name: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(invalid(name, format!("has {len} values, expected batch {batch} × seq {seq} = {n}")))
            }
        };
        len_check("input_ids", input_ids.len())?;
        len_check("attention_mask", attention_mask.len())?;
        if let Some(tt) = token_type_ids {
            len_check("token_type_ids", tt.len())?;
        }
        let max_pos = self.config.max_position_embeddings;
        if seq > max_pos {
            return Err(invalid(
                "input_ids",
                format!("sequence length {seq} exceeds max_position_embeddings {max_pos}"),
            ));
        }
        let vocab = self.config.vocab_size as i64;
        if let Some((at, id)) = input_ids.iter().enumerate().find(|(_, id)| **id < 0 || **id >= vocab) {
            return Err(invalid("input_ids", format!("id {id} at position {at} is outside the vocabulary 0..{vocab}")));
        }
        if let Some((at, m)) = attention_mask.iter().enumerate().find(|(_, m)| **m != 0 && **m != 1) {
            return Err(invalid("attention_mask", format!("value {m} at position {at}; only 0 and 1 are allowed")));
        }
        if let Some(tt) = token_type_ids {
            let types = self.info().type_vocab_size.max(1) as i64;
            if let Some((at, t)) = tt.iter().enumerate().find(|(_, t)| **t < 0 || **t >= types) {
                return Err(invalid("token_type_ids", format!("type {t} at position {at} is outside 0..{types}")));
            }
        }
        Ok(())
    }

    /// [`BertModel::forward`] with caller-owned buffers and a thread cap (1 = calling thread only;
    /// more uses the rayon pool).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        s: &mut BertScratch,
        threads: usize,
        input_ids: &[i64],
        attention_mask: &[i64],
        token_type_ids: Option<&[i64]>,
        batch: usize,
        seq: usize,
    ) -> Result<BertOutput, BackendError> {
        self.validate(input_ids, attention_mask, token_type_ids, batch, seq)?;
        let h = self.config.hidden_size;
        let inter = self.config.intermediate_size;
        let t = batch * seq;

        s.x.clear();
        s.x.resize(t * h, 0.0);
        for (tok, row) in s.x.chunks_exact_mut(h).enumerate() {
            let id = input_ids[tok] as usize;
            let pos = tok % seq;
            let ty = token_type_ids.map_or(0, |tt| tt[tok] as usize);
            let w = &self.word[id * h..(id + 1) * h];
            let p = &self.position[pos * h..(pos + 1) * h];
            for ((r, a), b) in row.iter_mut().zip(w).zip(p) {
                *r = a + b;
            }
            if let Some(types) = &self.token_type {
                add_in_place(row, &types[ty * h..(ty + 1) * h]);
            }
        }
        layer_norm(&mut s.x, &self.emb_ln.0, &self.emb_ln.1, self.eps);

        s.keep.clear();
        s.keep.extend(attention_mask.iter().map(|m| *m != 0));
        let shape = AttentionShape {
            batch,
            seq,
            heads: self.config.num_attention_heads,
            head_dim: h / self.config.num_attention_heads,
        };
        for layer in &self.layers {
            s.qkv.resize(t * 3 * h, 0.0);
            linear(&s.x, t, &layer.qkv, &mut s.qkv, Epilogue::Act(Activation::None), threads);
            s.ctx.resize(t * h, 0.0);
            self_attention(&s.qkv, &s.keep, shape, &mut s.ctx, threads);

            s.tmp.resize(t * h, 0.0);
            let (gamma, beta) = (&layer.ln1.0, &layer.ln1.1);
            let epilogue = Epilogue::ResidualLayerNorm { residual: &s.x, gamma, beta, eps: self.eps };
            linear(&s.ctx, t, &layer.out, &mut s.tmp, epilogue, threads);
            std::mem::swap(&mut s.x, &mut s.tmp);

            s.inter.resize(t * inter, 0.0);
            linear(&s.x, t, &layer.inter, &mut s.inter, Epilogue::Act(self.act), threads);
            let (gamma, beta) = (&layer.ln2.0, &layer.ln2.1);
            let epilogue = Epilogue::ResidualLayerNorm { residual: &s.x, gamma, beta, eps: self.eps };
            linear(&s.inter, t, &layer.ffn_out, &mut s.tmp, epilogue, threads);
            std::mem::swap(&mut s.x, &mut s.tmp);
        }

        let mut sentence = vec![0.0f32; batch * h];
        pool(&s.x, attention_mask, batch, seq, h, self.pooling, &mut sentence);
        if self.normalize {
            l2_normalize(&mut sentence, h);
        }
        Ok(BertOutput { last_hidden_state: s.x[..t * h].to_vec(), sentence_embedding: sentence })
    }
}
