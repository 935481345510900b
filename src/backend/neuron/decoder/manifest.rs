//! The manifest of a compiled decoder (`neuron_decoder.json` in a version folder): which NEFF is the
//! prefill program of which sequence bucket and the decode program of which (batch, context)
//! bucket, the KV cache layout, and the tensor names the programs use.
//!
//! ```json
//! {
//!   "format": 1,
//!   "kv": { "layout": "contiguous", "slots": 9, "max_len": 256, "dtype": "float32",
//!           "k_input": "layers.{layer}.cache_k.must_alias_input", "k_output": "layers.{layer}.cache_k",
//!           "v_input": "layers.{layer}.cache_v.must_alias_input", "v_output": "layers.{layer}.cache_v" },
//!   "tensors": { "input_ids": "input_ids", "position_ids": "position_ids", "seq_ids": "seq_ids",
//!                "logits": "logits", "weight": "{name}", "weights_dtype": "float32" },
//!   "padding_position": -1,
//!   "prefill": [ { "neff": "prefill_s16.neff", "seq_len": 16 } ],
//!   "decode": [ { "neff": "decode_b4_c64.neff", "batch": 4, "context": 64 } ]
//! }
//! ```
//!
//! The model itself (hyper-parameters, weights, tokenizer) is the HF folder the manifest sits in:
//! `config.json`, `model.safetensors` (or a sharded index), `tokenizer.json`. Weights are inputs of
//! every program, loaded once per core; the KV cache is one device tensor per layer for K and one
//! for V, `[slots, max_len, kv_heads, head_dim]`, bound as both the input (`k_input`) and the output
//! (`k_output`) of every program, so the programs update it in place. The last slot is scratch:
//! the padding rows of a decode bucket point at it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Name of the manifest file in a version folder.
pub const MANIFEST_FILE: &str = "neuron_decoder.json";

/// The manifest format this worker reads.
pub const FORMAT: u64 = 1;

/// Why a manifest cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// What is wrong and what to do.
    pub reason: String,
}

/// Layout of the KV cache tensors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvLayout {
    /// One contiguous range of `max_len` positions per slot: a session's K/V is one byte range per
    /// tensor.
    Contiguous,
}

/// The KV cache: layout, size and the tensor names (`{layer}` is replaced by the layer index).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvSpec {
    /// Layout of each cache tensor.
    pub layout: KvLayout,
    /// Rows of each cache tensor; the last one is the scratch slot of padding rows.
    pub slots: usize,
    /// Positions per slot: the model's context limit on this device.
    pub max_len: usize,
    /// Element type (`float32`).
    pub dtype: String,
    /// Program input holding layer `{layer}`'s K cache (aliased to `k_output`).
    pub k_input: String,
    /// Program output holding layer `{layer}`'s K cache.
    pub k_output: String,
    /// Program input holding layer `{layer}`'s V cache (aliased to `v_output`).
    pub v_input: String,
    /// Program output holding layer `{layer}`'s V cache.
    pub v_output: String,
}

impl KvSpec {
    /// Slots sessions can use (all but the scratch slot).
    pub fn usable_slots(&self) -> usize {
        self.slots.saturating_sub(1)
    }

    /// The scratch slot (padding rows write there).
    pub fn scratch_slot(&self) -> usize {
        self.slots.saturating_sub(1)
    }
}

fn default_input_ids() -> String {
    "input_ids".into()
}
fn default_position_ids() -> String {
    "position_ids".into()
}
fn default_seq_ids() -> String {
    "seq_ids".into()
}
fn default_logits() -> String {
    "logits".into()
}
fn default_weight() -> String {
    "{name}".into()
}
fn default_weights_dtype() -> String {
    "float32".into()
}
fn default_padding_position() -> i32 {
    -1
}
fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
}

/// Names of the programs' inputs and outputs (defaults follow AWS's NxD Inference names).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorNames {
    /// Token ids, int32: prefill `[1, seq_len]`, decode `[batch, 1]`.
    #[serde(default = "default_input_ids")]
    pub input_ids: String,
    /// Positions, int32, same shape as `input_ids`; padding tokens carry `padding_position`.
    #[serde(default = "default_position_ids")]
    pub position_ids: String,
    /// Cache slot per row, int32: prefill `[1]`, decode `[batch]`.
    #[serde(default = "default_seq_ids")]
    pub seq_ids: String,
    /// Logits, float32: prefill `[1, seq_len, vocab]`, decode `[batch, vocab]`.
    #[serde(default = "default_logits")]
    pub logits: String,
    /// The input name of a weight: `{name}` is replaced by its HF tensor name.
    #[serde(default = "default_weight")]
    pub weight: String,
    /// Element type of the weight inputs (`float32`, `bfloat16` or `float16`).
    #[serde(default = "default_weights_dtype")]
    pub weights_dtype: String,
    /// Optional int32 output (prefill `[1, seq_len]`, decode `[batch]`): the greedy token of each
    /// row, picked on the device. With `next_token_logprobs`, greedy requests (without top
    /// logprobs) take their tokens from it and the logits stay on the device.
    #[serde(default)]
    pub next_token_ids: Option<String>,
    /// Optional float32 output, same shape: the log-probability of each picked token.
    #[serde(default)]
    pub next_token_logprobs: Option<String>,
}

impl Default for TensorNames {
    fn default() -> Self {
        TensorNames {
            input_ids: default_input_ids(),
            position_ids: default_position_ids(),
            seq_ids: default_seq_ids(),
            logits: default_logits(),
            weight: default_weight(),
            weights_dtype: default_weights_dtype(),
            next_token_ids: None,
            next_token_logprobs: None,
        }
    }
}

/// One prefill (context-encoding) program: up to `seq_len` tokens of one sequence from any start
/// position.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefillBucket {
    /// The NEFF, relative to the version folder.
    pub neff: PathBuf,
    /// Tokens per execution.
    pub seq_len: usize,
}

/// One decode (token-generation) program: one token for each of up to `batch` sequences whose
/// positions are all below `context`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeBucket {
    /// The NEFF, relative to the version folder.
    pub neff: PathBuf,
    /// Rows per execution.
    pub batch: usize,
    /// K/V positions the program reads (every row's position must be below it).
    pub context: usize,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderManifest {
    /// Manifest format (1).
    pub format: u64,
    /// The KV cache.
    pub kv: KvSpec,
    /// Tensor names.
    #[serde(default)]
    pub tensors: TensorNames,
    /// Position value marking a padding token or row.
    #[serde(default = "default_padding_position")]
    pub padding_position: i32,
    /// Whether the prefill programs start at any position (`true`, the default: a kept session's
    /// next turn computes only its new tokens) or only at 0 (`false`: NxD Inference-style context
    /// encoding; every prefill recomputes the whole history, in one program run, so the longest
    /// prompt plus history is the largest prefill bucket).
    #[serde(default = "default_true")]
    pub prefill_appends: bool,
    /// Ranks per instance (tensor parallelism): an instance spans this many consecutive
    /// NeuronCores, each program loaded on every one of them with `nrt_load_collectives` (rank,
    /// group size) and executed on all at once; logits are read from rank 0. Default 1.
    #[serde(default = "default_one")]
    pub tensor_parallel: usize,
    /// Each rank's weights, when they are sharded: a folder relative to the version folder, with
    /// `{rank}` (e.g. `"tp{rank}"`, holding that rank's `model.safetensors`). Default: every rank
    /// is bound to the version folder's weights.
    #[serde(default)]
    pub rank_weights: Option<String>,
    /// Prefill programs, any order.
    pub prefill: Vec<PrefillBucket>,
    /// Decode programs, any order.
    pub decode: Vec<DecodeBucket>,
}

/// Replaces `{key}` in `pattern` by `value`.
pub fn fill(pattern: &str, key: &str, value: &str) -> String {
    pattern.replace(&format!("{{{key}}}"), value)
}

impl DecoderManifest {
    /// Reads and checks `dir/neuron_decoder.json`; buckets come back sorted (prefill by length,
    /// decode by batch then context).
    pub fn load(dir: &Path) -> Result<DecoderManifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let err = |reason: String| ManifestError { path: path.clone(), reason };
        let text = std::fs::read_to_string(&path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let mut m: DecoderManifest =
            serde_json::from_str(&text).map_err(|e| err(format!("not a decoder manifest: {e}")))?;
        m.check().map_err(err)?;
        m.prefill.sort_by_key(|b| b.seq_len);
        m.decode.sort_by_key(|b| (b.batch, b.context));
        Ok(m)
    }

    /// Checks what JSON cannot: format, sizes, patterns, bucket limits.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format {} is not supported (this worker reads format {FORMAT})", self.format));
        }
        let kv = &self.kv;
        if kv.slots < 2 {
            return Err(format!(
                "kv.slots is {}: at least 2 are needed (the last slot is scratch for padding rows)",
                kv.slots
            ));
        }
        if kv.max_len == 0 {
            return Err("kv.max_len is 0".into());
        }
        if kv.dtype != "float32" {
            return Err(format!("kv.dtype '{}' is not supported yet (only float32)", kv.dtype));
        }
        for (key, pattern) in
            [("k_input", &kv.k_input), ("k_output", &kv.k_output), ("v_input", &kv.v_input), ("v_output", &kv.v_output)]
        {
            if !pattern.contains("{layer}") {
                return Err(format!("kv.{key} '{pattern}' must contain {{layer}}"));
            }
        }
        if !self.tensors.weight.contains("{name}") {
            return Err(format!("tensors.weight '{}' must contain {{name}}", self.tensors.weight));
        }
        if !matches!(self.tensors.weights_dtype.as_str(), "float32" | "bfloat16" | "float16") {
            return Err(format!(
                "tensors.weights_dtype '{}' is not supported (float32, bfloat16 or float16)",
                self.tensors.weights_dtype
            ));
        }
        if self.tensors.next_token_ids.is_some() != self.tensors.next_token_logprobs.is_some() {
            return Err("tensors.next_token_ids and tensors.next_token_logprobs go together (on-device greedy \
                        picks need both the token and its log-probability)"
                .into());
        }
        if self.tensor_parallel == 0 {
            return Err("tensor_parallel is 0: it counts the ranks (cores) of one instance, at least 1".into());
        }
        if let Some(p) = &self.rank_weights
            && !p.contains("{rank}")
        {
            return Err(format!("rank_weights '{p}' must contain {{rank}}"));
        }
        if self.prefill.is_empty() || self.decode.is_empty() {
            return Err("at least one prefill and one decode program are needed".into());
        }
        if let Some(b) = self.prefill.iter().find(|b| b.seq_len == 0 || b.seq_len > kv.max_len) {
            return Err(format!("prefill bucket {}: seq_len must be in 1..={}", b.neff.display(), kv.max_len));
        }
        if let Some(b) = self.decode.iter().find(|b| b.batch == 0 || b.batch >= kv.slots) {
            return Err(format!(
                "decode bucket {}: batch must be in 1..{} (below kv.slots: one slot is scratch)",
                b.neff.display(),
                kv.slots
            ));
        }
        if let Some(b) = self.decode.iter().find(|b| b.context == 0 || b.context > kv.max_len) {
            return Err(format!("decode bucket {}: context must be in 1..={}", b.neff.display(), kv.max_len));
        }
        if !self.decode.iter().any(|b| b.context == kv.max_len) {
            return Err(format!(
                "no decode program reads the whole context (context = kv.max_len = {}): a sequence near the limit \
                 could not be decoded; compile one",
                kv.max_len
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "format": 1,
            "kv": { "layout": "contiguous", "slots": 5, "max_len": 64, "dtype": "float32",
                    "k_input": "l{layer}.k.must_alias_input", "k_output": "l{layer}.k",
                    "v_input": "l{layer}.v.must_alias_input", "v_output": "l{layer}.v" },
            "prefill": [ { "neff": "p16.neff", "seq_len": 16 }, { "neff": "p8.neff", "seq_len": 8 } ],
            "decode": [ { "neff": "d4.neff", "batch": 4, "context": 64 }, { "neff": "d1.neff", "batch": 1, "context": 64 } ]
        })
    }

    fn parse(v: serde_json::Value) -> Result<DecoderManifest, String> {
        let m: DecoderManifest = serde_json::from_value(v).map_err(|e| e.to_string())?;
        m.check().map(|()| m)
    }

    #[test]
    fn a_manifest_with_defaults_parses_and_names_follow_aws() {
        let m = parse(sample()).unwrap();
        assert_eq!(m.tensors, TensorNames::default());
        assert_eq!(m.tensors.input_ids, "input_ids");
        assert_eq!(m.padding_position, -1);
        assert_eq!(m.kv.usable_slots(), 4);
        assert_eq!(fill(&m.kv.k_input, "layer", "3"), "l3.k.must_alias_input");
    }

    #[test]
    fn impossible_manifests_are_refused_with_the_reason() {
        let cases: [(&str, serde_json::Value, &str); 5] = [
            ("/kv/slots", serde_json::json!(1), "at least 2"),
            ("/kv/dtype", serde_json::json!("bfloat16"), "only float32"),
            ("/kv/k_input", serde_json::json!("cache_k"), "{layer}"),
            ("/decode/0/batch", serde_json::json!(5), "below kv.slots"),
            ("/decode", serde_json::json!([{ "neff": "d.neff", "batch": 1, "context": 32 }]), "whole context"),
        ];
        for (pointer, value, expected) in cases {
            let mut v = sample();
            *v.pointer_mut(pointer).unwrap() = value;
            let err = parse(v).unwrap_err();
            assert!(err.contains(expected), "{pointer}: {err}");
        }
        let mut v = sample();
        v["extra"] = serde_json::json!(1);
        assert!(parse(v).unwrap_err().contains("unknown field"));
    }
}
