//! The `llama_decoder` op of stand-in programs (version 3): a whole Llama-family decoder
//! (`LlamaForCausalLM`, Qwen2 with `attention_bias`) run as one prefill or decode step, with the
//! weights as NEFF inputs under their Hugging Face names and the KV cache as aliased state (each
//! cache tensor is both an input, `...must_alias_input`, and an output, bound to the same device
//! tensor). Its types, the tensors it declares for a bucket, and the load-time check; the
//! semantics are in the [`crate::program`] module documentation.

use serde::{Deserialize, Serialize};

use crate::program::ProgramError;
use crate::tensor::{NeffTensor, shape_bytes};

/// Whether a decoder program encodes a prompt chunk or generates one token per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderMode {
    /// One sequence, `S` tokens (`input_ids` `[1, S]`): context encoding.
    Prefill,
    /// `B` sequences, one token each (`input_ids` `[B, 1]`): token generation.
    Decode,
}

/// Hugging Face's `rope_type: "llama3"` frequency scaling (Llama 3.1 and later).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RopeScalingJson", into = "RopeScalingJson")]
pub struct Llama3RopeScaling {
    /// `factor`: long wavelengths are divided by it.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f64,
    /// `high_freq_factor`.
    pub high_freq_factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position_embeddings: u64,
}

/// The JSON form of [`Llama3RopeScaling`]: Hugging Face's dict, `rope_type` optional (`llama3`).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RopeScalingJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: u64,
}

impl TryFrom<RopeScalingJson> for Llama3RopeScaling {
    type Error = String;

    fn try_from(json: RopeScalingJson) -> Result<Llama3RopeScaling, String> {
        match json.rope_type.as_deref() {
            None | Some("llama3") => Ok(Llama3RopeScaling {
                factor: json.factor,
                low_freq_factor: json.low_freq_factor,
                high_freq_factor: json.high_freq_factor,
                original_max_position_embeddings: json.original_max_position_embeddings,
            }),
            Some(other) => Err(format!("rope_scaling: rope_type '{other}' is not supported (only 'llama3')")),
        }
    }
}

impl From<Llama3RopeScaling> for RopeScalingJson {
    fn from(s: Llama3RopeScaling) -> RopeScalingJson {
        RopeScalingJson {
            rope_type: Some("llama3".into()),
            factor: s.factor,
            low_freq_factor: s.low_freq_factor,
            high_freq_factor: s.high_freq_factor,
            original_max_position_embeddings: s.original_max_position_embeddings,
        }
    }
}

/// The model's shape (Hugging Face config names) and the KV cache's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    /// `hidden_size` (H).
    pub hidden_size: u64,
    /// `intermediate_size` (I).
    pub intermediate_size: u64,
    /// `num_hidden_layers`.
    pub num_layers: u64,
    /// `num_attention_heads`.
    pub num_heads: u64,
    /// `num_key_value_heads` (divides `num_heads`).
    pub num_kv_heads: u64,
    /// `head_dim` (even).
    pub head_dim: u64,
    /// `vocab_size` (V).
    pub vocab_size: u64,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta`.
    pub rope_theta: f64,
    /// `rope_scaling` of `rope_type` `llama3`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// `tie_word_embeddings`: the LM head is the embedding matrix (no `lm_head.weight` input).
    pub tie_word_embeddings: bool,
    /// Q, K and V projections have biases (Qwen2).
    #[serde(default)]
    pub attention_bias: bool,
    /// Cache slots (sequences the cache holds).
    pub slots: u64,
    /// Positions per slot.
    pub max_len: u64,
}

impl DecoderConfig {
    /// Every weight the decoder takes: Hugging Face tensor name and shape (row-major `float32`),
    /// in the order writers declare them.
    pub fn weights(&self) -> Vec<(String, Vec<u64>)> {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Shape of every K and V cache tensor: `[slots, max_len, num_kv_heads, head_dim]` (`float32`).
    pub fn cache_shape(&self) -> Vec<u64> {
        vec![self.slots, self.max_len, self.num_kv_heads, self.head_dim]
    }

    /// Bytes of one slot in each cache tensor: slot `s` is the byte range
    /// `[s * slot_bytes, (s + 1) * slot_bytes)` of every K and V tensor (position `p` of it
    /// starts `p * num_kv_heads * head_dim * 4` bytes further).
    pub fn cache_slot_bytes(&self) -> u64 {
        self.max_len.saturating_mul(self.num_kv_heads).saturating_mul(self.head_dim).saturating_mul(4)
    }

    /// Checks the dimensions: all positive, heads a multiple of KV heads, an even head size,
    /// finite positive `rope_theta`, non-negative `rms_norm_eps`, sane `rope_scaling`, ids and
    /// positions that fit `int32`, and tensor sizes that do not overflow.
    pub fn validate(&self) -> Result<(), String> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("slots", self.slots),
            ("max_len", self.max_len),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(format!("config: {name} is 0"));
        }
        let int32 = i32::MAX as u64;
        if let Some((name, v)) = dims.iter().find(|(_, v)| *v > int32) {
            return Err(format!("config: {name} = {v} does not fit int32"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "config: num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("config: head_dim {} is odd (RoPE rotates pairs)", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("config: rope_theta {} is not a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!("config: rms_norm_eps {} is not a non-negative number", self.rms_norm_eps));
        }
        if let Some(s) = &self.rope_scaling {
            let positive = [s.factor, s.low_freq_factor, s.high_freq_factor].iter().all(|v| v.is_finite() && *v > 0.0);
            if !positive || s.high_freq_factor == s.low_freq_factor || s.original_max_position_embeddings == 0 {
                return Err(format!(
                    "config: rope_scaling {s:?} needs positive factors, high_freq_factor != low_freq_factor \
                     and original_max_position_embeddings > 0"
                ));
            }
        }
        let shapes = self.weights().into_iter().map(|(_, s)| s).chain([self.cache_shape()]);
        for shape in shapes {
            if shape_bytes("float32", &shape).is_none() {
                return Err(format!("config: a tensor of shape {shape:?} overflows"));
            }
        }
        Ok(())
    }
}

/// The names of one layer's four cache tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheNames {
    /// K cache as an input (`...must_alias_input`).
    pub k_input: String,
    /// K cache as an output (the same device tensor).
    pub k_output: String,
    /// V cache as an input.
    pub v_input: String,
    /// V cache as an output.
    pub v_output: String,
}

/// A whole decoder step (see the [`crate::program`] module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaDecoderOp {
    /// Prefill or decode.
    pub mode: DecoderMode,
    /// Model and cache dimensions.
    pub config: DecoderConfig,
    /// `int32` input: prefill `[1, S]`, decode `[B, 1]`.
    pub input_ids: String,
    /// `int32` input, same shape as `input_ids`; -1 marks padding.
    pub position_ids: String,
    /// `int32` input: prefill `[1]`, decode `[B]`: the cache slot of each row.
    pub seq_ids: String,
    /// Name pattern of the weight inputs: `{name}` is replaced by the Hugging Face tensor name.
    pub weight: String,
    /// Name pattern of the K cache inputs: `{layer}` is replaced by the layer index.
    pub cache_k_input: String,
    /// Name pattern of the K cache outputs.
    pub cache_k_output: String,
    /// Name pattern of the V cache inputs.
    pub cache_v_input: String,
    /// Name pattern of the V cache outputs.
    pub cache_v_output: String,
    /// Decode only (required there): K/V positions read are below it; at most `max_len`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u64>,
    /// `float32` output: prefill `[1, S, V]`, decode `[B, V]`; rows of padding are 0.
    pub logits: String,
    /// Optional `int32` output: prefill `[1, S]`, decode `[B]`: the argmax of each logits row
    /// (ties → lowest id); -1 for padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token_ids: Option<String>,
    /// Optional `float32` output, same shape as `next_token_ids` (which it requires): the
    /// log-probability of each picked token, `logit − (max + ln Σ exp(logit − max))` with the sum
    /// in f64 (the host sampler's formula); 0 for padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token_logprobs: Option<String>,
}

fn invalid(reason: String) -> ProgramError {
    ProgramError::Invalid { reason: format!("llama_decoder: {reason}") }
}

fn tensor(name: String, dtype: &str, shape: Vec<u64>) -> NeffTensor {
    NeffTensor { name, dtype: Some(dtype.into()), shape: Some(shape), size_bytes: None }
}

impl LlamaDecoderOp {
    /// The NEFF input holding the weight with Hugging Face name `hf_name`.
    pub fn weight_input(&self, hf_name: &str) -> String {
        self.weight.replace("{name}", hf_name)
    }

    /// The names of layer `layer`'s cache tensors.
    pub fn cache_names(&self, layer: u64) -> CacheNames {
        let name = |pattern: &str| pattern.replace("{layer}", &layer.to_string());
        CacheNames {
            k_input: name(&self.cache_k_input),
            k_output: name(&self.cache_k_output),
            v_input: name(&self.cache_v_input),
            v_output: name(&self.cache_v_output),
        }
    }

    /// Shape of `input_ids` and `position_ids` for a bucket of `rows` (prefill: tokens `S`,
    /// decode: sequences `B`).
    pub fn ids_shape(&self, rows: u64) -> Vec<u64> {
        match self.mode {
            DecoderMode::Prefill => vec![1, rows],
            DecoderMode::Decode => vec![rows, 1],
        }
    }

    /// The bucket size of a NEFF: `S` (prefill) or `B` (decode), read from the declared
    /// `input_ids`.
    pub fn rows(&self, inputs: &[NeffTensor]) -> Result<u64, ProgramError> {
        let ids = inputs
            .iter()
            .find(|t| t.name == self.input_ids)
            .ok_or_else(|| invalid(format!("input_ids '{}' is not a declared input", self.input_ids)))?;
        let rows = match (self.mode, ids.shape.as_deref()) {
            (DecoderMode::Prefill, Some(&[1, s])) => s,
            (DecoderMode::Decode, Some(&[b, 1])) => b,
            (mode, shape) => {
                let want = if mode == DecoderMode::Prefill { "[1, S]" } else { "[B, 1]" };
                return Err(invalid(format!("input_ids '{}' has shape {shape:?}, {mode:?} needs {want}", ids.name)));
            }
        };
        if rows == 0 || rows > i32::MAX as u64 {
            return Err(invalid(format!("input_ids '{}' has {rows} rows", ids.name)));
        }
        Ok(rows)
    }

    /// The inputs and outputs a NEFF of this op declares for a bucket of `rows`: inputs
    /// `input_ids`, `position_ids`, `seq_ids`, the weights (in [`DecoderConfig::weights`] order),
    /// then per layer the K and V cache inputs; outputs `logits`, `next_token_ids` (if any), then
    /// per layer the K and V cache outputs.
    pub fn tensors(&self, rows: u64) -> (Vec<NeffTensor>, Vec<NeffTensor>) {
        let ids = self.ids_shape(rows);
        let seq = vec![match self.mode {
            DecoderMode::Prefill => 1,
            DecoderMode::Decode => rows,
        }];
        let mut inputs = vec![
            tensor(self.input_ids.clone(), "int32", ids.clone()),
            tensor(self.position_ids.clone(), "int32", ids),
            tensor(self.seq_ids.clone(), "int32", seq),
        ];
        for (name, shape) in self.config.weights() {
            inputs.push(tensor(self.weight_input(&name), "float32", shape));
        }
        let (logits, next) = match self.mode {
            DecoderMode::Prefill => (vec![1, rows, self.config.vocab_size], vec![1, rows]),
            DecoderMode::Decode => (vec![rows, self.config.vocab_size], vec![rows]),
        };
        let mut outputs = vec![tensor(self.logits.clone(), "float32", logits)];
        if let Some(name) = &self.next_token_ids {
            outputs.push(tensor(name.clone(), "int32", next.clone()));
        }
        if let Some(name) = &self.next_token_logprobs {
            outputs.push(tensor(name.clone(), "float32", next));
        }
        let cache = self.config.cache_shape();
        for layer in 0..self.config.num_layers {
            let names = self.cache_names(layer);
            inputs.push(tensor(names.k_input, "float32", cache.clone()));
            inputs.push(tensor(names.v_input, "float32", cache.clone()));
            outputs.push(tensor(names.k_output, "float32", cache.clone()));
            outputs.push(tensor(names.v_output, "float32", cache.clone()));
        }
        (inputs, outputs)
    }

    /// The load-time check: a valid config, name patterns with their placeholders, every tensor
    /// of [`LlamaDecoderOp::tensors`] declared with exactly that dtype and shape (so both ends
    /// of every cache alias pair, with equal shapes), no other output, `context` set for decode
    /// only and at most `max_len`. Other declared inputs are allowed and ignored.
    pub fn check(&self, inputs: &[NeffTensor], outputs: &[NeffTensor]) -> Result<(), ProgramError> {
        self.config.validate().map_err(invalid)?;
        if self.next_token_logprobs.is_some() && self.next_token_ids.is_none() {
            return Err(invalid("next_token_logprobs needs next_token_ids".into()));
        }
        if !self.weight.contains("{name}") {
            return Err(invalid(format!("weight pattern '{}' has no {{name}}", self.weight)));
        }
        for pattern in [&self.cache_k_input, &self.cache_k_output, &self.cache_v_input, &self.cache_v_output] {
            if !pattern.contains("{layer}") {
                return Err(invalid(format!("cache pattern '{pattern}' has no {{layer}}")));
            }
        }
        match (self.mode, self.context) {
            (DecoderMode::Decode, None) => return Err(invalid("a decode program needs 'context'".into())),
            (DecoderMode::Decode, Some(c)) if c == 0 || c > self.config.max_len => {
                return Err(invalid(format!("context {c} is not in 1..={}", self.config.max_len)));
            }
            (DecoderMode::Prefill, Some(_)) => {
                return Err(invalid("'context' is for decode programs only".into()));
            }
            _ => {}
        }
        let (want_in, want_out) = self.tensors(self.rows(inputs)?);
        let mut names = std::collections::HashSet::new();
        if let Some(dup) = want_in.iter().chain(&want_out).find(|t| !names.insert(t.name.as_str())) {
            return Err(invalid(format!("tensor name '{}' is used for two roles", dup.name)));
        }
        for (want, declared, kind) in [(&want_in, inputs, "input"), (&want_out, outputs, "output")] {
            for w in want {
                let Some(d) = declared.iter().find(|d| d.name == w.name) else {
                    return Err(invalid(format!("{kind} '{}' is not declared", w.name)));
                };
                let want_bytes = w.byte_size();
                if d.dtype != w.dtype || d.shape != w.shape || d.byte_size() != want_bytes {
                    return Err(invalid(format!(
                        "{kind} '{}' is {:?} {:?} ({:?} bytes), the config needs {:?} {:?}",
                        d.name,
                        d.dtype,
                        d.shape,
                        d.byte_size(),
                        w.dtype,
                        w.shape
                    )));
                }
            }
        }
        if let Some(extra) = outputs.iter().find(|d| !want_out.iter().any(|w| w.name == d.name)) {
            return Err(invalid(format!("output '{}' is not written by the decoder", extra.name)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_config() -> DecoderConfig {
        DecoderConfig {
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            vocab_size: 50,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            attention_bias: false,
            slots: 3,
            max_len: 16,
        }
    }

    fn op(mode: DecoderMode) -> LlamaDecoderOp {
        LlamaDecoderOp {
            mode,
            config: tiny_config(),
            input_ids: "input_ids".into(),
            position_ids: "position_ids".into(),
            seq_ids: "seq_ids".into(),
            weight: "{name}".into(),
            cache_k_input: "layers.{layer}.cache_k.must_alias_input".into(),
            cache_k_output: "layers.{layer}.cache_k".into(),
            cache_v_input: "layers.{layer}.cache_v.must_alias_input".into(),
            cache_v_output: "layers.{layer}.cache_v".into(),
            context: (mode == DecoderMode::Decode).then_some(8),
            logits: "logits".into(),
            next_token_ids: Some("next_token_ids".into()),
            next_token_logprobs: None,
        }
    }

    #[test]
    fn weights_follow_the_hf_names_and_shapes() {
        let mut config = tiny_config();
        let names: Vec<_> = config.weights().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 1 + 2 * 9 + 2);
        assert_eq!(names[0], "model.embed_tokens.weight");
        assert!(names.contains(&"model.layers.1.mlp.down_proj.weight".to_string()));
        assert_eq!(names.last().map(String::as_str), Some("lm_head.weight"));
        let shape = |c: &DecoderConfig, n: &str| c.weights().into_iter().find(|(w, _)| w == n).map(|(_, s)| s);
        assert_eq!(shape(&config, "model.layers.0.self_attn.k_proj.weight"), Some(vec![16, 32]));
        assert_eq!(shape(&config, "model.layers.0.self_attn.o_proj.weight"), Some(vec![32, 32]));
        assert_eq!(shape(&config, "model.layers.0.mlp.down_proj.weight"), Some(vec![32, 48]));
        config.tie_word_embeddings = true;
        config.attention_bias = true;
        assert_eq!(shape(&config, "lm_head.weight"), None);
        assert_eq!(shape(&config, "model.layers.1.self_attn.v_proj.bias"), Some(vec![16]));
        assert_eq!(config.cache_slot_bytes(), 16 * 2 * 8 * 4);
    }

    #[test]
    fn check_accepts_the_declared_tensors_and_refuses_mismatches() {
        for mode in [DecoderMode::Prefill, DecoderMode::Decode] {
            let op = op(mode);
            let (inputs, outputs) = op.tensors(4);
            assert_eq!(op.check(&inputs, &outputs), Ok(()));
            assert_eq!(op.rows(&inputs), Ok(4));
            // A missing alias end.
            let no_v1: Vec<_> = outputs.iter().filter(|t| t.name != "layers.1.cache_v").cloned().collect();
            assert!(op.check(&inputs, &no_v1).is_err());
            // A cache of the wrong shape.
            let mut bad = inputs.clone();
            if let Some(t) = bad.iter_mut().find(|t| t.name == "layers.0.cache_k.must_alias_input") {
                t.shape = Some(vec![3, 15, 2, 8]);
            }
            assert!(op.check(&bad, &outputs).is_err());
            // Weights as float16.
            let mut bad = inputs.clone();
            bad[3].dtype = Some("float16".into());
            assert!(op.check(&bad, &outputs).is_err());
            // An output nothing writes.
            let mut extra = outputs.clone();
            extra.push(tensor("other".into(), "float32", vec![1]));
            assert!(op.check(&inputs, &extra).is_err());
            // Another input is ignored.
            let mut more = inputs.clone();
            more.push(tensor("attention_mask".into(), "int32", vec![1, 4]));
            assert_eq!(op.check(&more, &outputs), Ok(()));
        }
        let mut decode = op(DecoderMode::Decode);
        let (inputs, outputs) = decode.tensors(2);
        decode.context = Some(17);
        assert!(decode.check(&inputs, &outputs).is_err(), "context above max_len");
        decode.context = None;
        assert!(decode.check(&inputs, &outputs).is_err(), "decode needs a context");
        let mut prefill = op(DecoderMode::Prefill);
        prefill.weight = "w".into();
        assert!(prefill.check(&inputs, &outputs).is_err(), "pattern without {{name}}");
    }

    #[test]
    fn json_has_the_documented_form_and_refuses_unknown_fields() {
        let mut op = op(DecoderMode::Prefill);
        op.config.rope_scaling = Some(Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json["mode"], "prefill");
        assert_eq!(json["config"]["rope_scaling"]["rope_type"], "llama3");
        assert!(json.get("context").is_none());
        assert_eq!(serde_json::from_value::<LlamaDecoderOp>(json.clone()).unwrap(), op);
        let mut unknown = json.clone();
        unknown["config"]["sliding_window"] = 4.into();
        assert!(serde_json::from_value::<LlamaDecoderOp>(unknown).is_err());
        let mut other_rope = json;
        other_rope["config"]["rope_scaling"]["rope_type"] = "yarn".into();
        assert!(serde_json::from_value::<LlamaDecoderOp>(other_rope).is_err());
    }
}
