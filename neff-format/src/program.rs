//! The stand-in program format (`standin/program.json`, versions 1 to 3): its types, the rules
//! on versions, and the load-time check that every buffer length follows from the inputs.
//!
//! ```json
//! {
//!   "version": 1,
//!   "blobs": { "w0": { "file": "standin/w0.bin", "shape": [64, 16] } },
//!   "ops": [
//!     { "op": "dense", "input": "INPUT0", "weight": "w0", "bias": "b0",
//!       "activation": "gelu", "output": "OUTPUT0" }
//!   ]
//! }
//! ```
//!
//! - Values are named host buffers of `f32`. Before the first op, every NEFF input is a buffer
//!   (its tensor bytes read as little-endian `f32`). Each op writes a new buffer named `output`;
//!   after the last op, every NEFF output is written from the buffer of the same name. Ops run in
//!   order.
//! - A blob is a file in the archive holding row-major little-endian `f32` values; `shape` is
//!   its shape and `product(shape)` its element count. Blob names use `[A-Za-z0-9_.-]`.
//! - `dense { input, weight, bias?, activation, output }`: `weight` is a blob of shape
//!   `[in, out]`, `bias` an optional blob of shape `[out]`; the input buffer is viewed as
//!   `[rows, in]` and `output = act(input · weight + bias)` of shape `[rows, out]`.
//!   `activation` is `none`, `relu`, `gelu` (erf form, `x/2 · (1 + erf(x/√2))`), `tanh` or
//!   (version 2) `sigmoid` (`1 / (1 + exp(−x))`).
//! - `add { a, b, output }`: elementwise sum of two buffers of equal length.
//! - `copy { input, output }`: a copy of a buffer.
//!
//! Version 2 adds, for stateful models:
//! - `mul { a, b, output }`, `sub { a, b, output }`: elementwise product and difference.
//! - `activation { input, function, output }`: one of the activations above, elementwise.
//! - `select { cond, a, b, output }`: `cond` holds one value per row (e.g. a `[rows, 1]` READY
//!   control); `a` and `b` have equal lengths, split into that many rows; row `r` of `output` is
//!   row `r` of `a` where `cond[r] != 0`, else row `r` of `b`. This is how a state update is
//!   gated: rows whose slot is not in the batch keep their state input.
//! - `int32` NEFF inputs and outputs: converted to `f32` when read and back (rounded to nearest,
//!   saturating) when written. Exact for |v| < 2^24; larger values lose low bits, so wrapping
//!   32-bit arithmetic is not reproduced there.
//!
//! Version 3 adds one op, `llama_decoder` ([`LlamaDecoderOp`], types in [`crate::decoder`]): a
//! whole Llama-family decoder step with the KV cache as aliased device state. It is the only op
//! of its program and works on the NEFF's tensors directly (no `f32` buffers):
//!
//! ```json
//! { "op": "llama_decoder", "mode": "decode",
//!   "config": { "hidden_size": 32, "intermediate_size": 48, "num_layers": 2, "num_heads": 4,
//!               "num_kv_heads": 2, "head_dim": 8, "vocab_size": 50, "rms_norm_eps": 1e-5,
//!               "rope_theta": 10000.0, "tie_word_embeddings": false, "slots": 4, "max_len": 64 },
//!   "input_ids": "input_ids", "position_ids": "position_ids", "seq_ids": "seq_ids",
//!   "weight": "{name}",
//!   "cache_k_input": "layers.{layer}.cache_k.must_alias_input", "cache_k_output": "layers.{layer}.cache_k",
//!   "cache_v_input": "layers.{layer}.cache_v.must_alias_input", "cache_v_output": "layers.{layer}.cache_v",
//!   "context": 32, "logits": "logits", "next_token_ids": "next_token_ids" }
//! ```
//!
//! - Tensors ([`LlamaDecoderOp::tensors`]): `int32` inputs `input_ids` and `position_ids`
//!   (prefill `[1, S]`, decode `[B, 1]`; position -1 marks padding) and `seq_ids` (prefill
//!   `[1]`, decode `[B]`: the cache slot of each row); the `float32` weights under their Hugging
//!   Face names and shapes ([`DecoderConfig::weights`]), named by the `weight` pattern (`{name}`
//!   replaced); per layer a K and a V cache, `float32 [slots, max_len, num_kv_heads, head_dim]`,
//!   declared as an input and as an output (patterns with `{layer}`); outputs `logits`
//!   (`float32`, prefill `[1, S, V]`, decode `[B, V]`) and optionally `next_token_ids` (`int32`,
//!   prefill `[1, S]`, decode `[B]`) with, optionally, `next_token_logprobs` (`float32`, same
//!   shape: the picked token's log-softmax, the sum of exponentials in f64). `context` (decode only, required, at most `max_len`) bounds
//!   the positions a decode program reads. The load-time check refuses any other shape or dtype,
//!   a missing end of an alias pair and undeclared outputs; other inputs are ignored.
//! - Semantics: Hugging Face `LlamaForCausalLM` in `float32`, per real token (position ≥ 0):
//!   embedding; per layer RMSNorm (`x / sqrt(mean(x²) + eps) · w`), Q/K/V projections (plus
//!   biases with `attention_bias`), RoPE in Hugging Face's `rotate_half` convention (pairs `i`
//!   and `i + head_dim/2`, `inv_freq = theta^(−2i/head_dim)`, with the `llama3` scaling when
//!   `rope_scaling` is set), K and V written to `cache[slot, position]` for every real token of
//!   the call first, then attention of the query at position `p` over `cache[slot, 0..=p]`
//!   (scale `1/sqrt(head_dim)`, softmax; query head `h` reads KV head
//!   `h / (num_heads / num_kv_heads)`), `o_proj`, residual, RMSNorm, `down(silu(gate) · up)`,
//!   residual; final norm; LM head (`lm_head.weight`, or the embedding when
//!   `tie_word_embeddings`). `next_token_ids` is the argmax of each logits row (ties → lowest
//!   id). Padding rows write and read nothing; their logits are 0, their next id -1 and its
//!   logprob 0.
//! - Invariance: a row's logits and the K/V it writes depend only on its token, position and its
//!   slot's cache contents: bit-identical whatever the bucket size, the other rows, the padding,
//!   and however a prompt is split between calls (prefill then decode included).
//! - Execution fails (`NRT_INVALID` in the stand-in) for a real row's slot outside
//!   `[0, slots)`, a token outside `[0, vocab_size)`, a position at or above `max_len` (decode:
//!   at or above `context`), two real tokens of one call at the same slot and position, and a
//!   cache alias pair bound to two different tensors (the same device tensor must be bound as
//!   input and output, as real hardware requires).
//!
//! A writer declares the lowest version that has every feature the program uses (so version 1
//! programs are unchanged); a reader refuses a program that uses a feature newer than its
//! declared version, a version it does not know, unknown top-level keys (`state` is reserved)
//! and unknown op tags as [`ProgramError::Unsupported`], so an older stand-in never runs a newer
//! program wrongly. Shapes are fixed per NEFF; [`Program::check`] verifies at load time that
//! every buffer length follows from the input sizes and that every output gets exactly its
//! declared size.
//!
//! Implicit state is not a program feature: a stateful model's NEFF takes its state as an
//! ordinary input and writes the next state as an ordinary output.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tensor::{NeffTensor, element_count};

/// Path of the program inside the NEFF archive.
pub const PROGRAM_PATH: &str = "standin/program.json";

pub use crate::decoder::{CacheNames, DecoderConfig, DecoderMode, Llama3RopeScaling, LlamaDecoderOp};

/// Newest program format version (readers run 1 to this; writers write the lowest needed).
pub const MAX_VERSION: u64 = 3;

const KNOWN_KEYS: [&str; 3] = ["version", "blobs", "ops"];
/// Op tags of version 1 programs.
const OPS_V1: [&str; 3] = ["dense", "add", "copy"];
/// Op tags added by version 2.
const OPS_V2: [&str; 4] = ["mul", "sub", "activation", "select"];
/// Op tags added by version 3.
const OPS_V3: [&str; 1] = ["llama_decoder"];

/// Why a program cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    /// The program uses a format version, key or op this reader does not know (a newer format).
    #[error("{PROGRAM_PATH}: {reason}")]
    Unsupported {
        /// What is not supported.
        reason: String,
    },
    /// The program is malformed or does not fit the NEFF's tensors.
    #[error("{PROGRAM_PATH}: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

fn invalid(reason: String) -> ProgramError {
    ProgramError::Invalid { reason }
}

/// The activation applied after a dense layer, or elementwise by [`ProgramOp::Activation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// GELU, erf form: `x/2 · (1 + erf(x/√2))`.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic `1 / (1 + exp(−x))` (program version 2).
    Sigmoid,
}

/// One step of a stand-in program (see the module documentation for semantics).
// The decoder variant is large, but ops are parsed once per load and never moved in a hot path;
// boxing it would only make writers' code noisier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProgramOp {
    /// `output = activation(input · weight + bias)`.
    Dense {
        /// Buffer read, viewed as `[rows, in]`.
        input: String,
        /// Blob of shape `[in, out]`.
        weight: String,
        /// Optional blob of shape `[out]`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Activation applied to every element.
        activation: Activation,
        /// Buffer written, `[rows, out]`.
        output: String,
    },
    /// `output = a + b`, elementwise.
    Add {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = input`.
    Copy {
        /// Buffer read.
        input: String,
        /// Buffer written.
        output: String,
    },
    /// `output = a * b`, elementwise (program version 2).
    Mul {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = a - b`, elementwise (program version 2).
    Sub {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = function(input)`, elementwise (program version 2).
    Activation {
        /// Buffer read.
        input: String,
        /// Function applied to every element.
        function: Activation,
        /// Buffer written.
        output: String,
    },
    /// Row `r` of `output` is row `r` of `a` where `cond[r] != 0`, else row `r` of `b`; `cond`
    /// holds one value per row (program version 2).
    Select {
        /// One value per row.
        cond: String,
        /// Rows taken where `cond` is non-zero.
        a: String,
        /// Rows taken where `cond` is zero (same length as `a`).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// A whole decoder step on the NEFF's tensors, the KV cache updated in place (program
    /// version 3; the program's only op).
    LlamaDecoder(LlamaDecoderOp),
}

impl ProgramOp {
    /// The lowest program format version that has this op (with its activation).
    pub fn min_version(&self) -> u64 {
        match self {
            ProgramOp::Dense { activation: Activation::Sigmoid, .. } => 2,
            ProgramOp::Dense { .. } | ProgramOp::Add { .. } | ProgramOp::Copy { .. } => 1,
            ProgramOp::Mul { .. } | ProgramOp::Sub { .. } | ProgramOp::Activation { .. } | ProgramOp::Select { .. } => {
                2
            }
            ProgramOp::LlamaDecoder(_) => 3,
        }
    }

    /// The op's tag as written in the program (`dense`, `add`, ...).
    pub fn tag(&self) -> &'static str {
        match self {
            ProgramOp::Dense { .. } => "dense",
            ProgramOp::Add { .. } => "add",
            ProgramOp::Copy { .. } => "copy",
            ProgramOp::Mul { .. } => "mul",
            ProgramOp::Sub { .. } => "sub",
            ProgramOp::Activation { .. } => "activation",
            ProgramOp::Select { .. } => "select",
            ProgramOp::LlamaDecoder(_) => "llama_decoder",
        }
    }
}

/// Where a weight blob lives in the archive and its shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobSpec {
    /// Archive path of the little-endian `f32` values.
    pub file: String,
    /// Row-major shape; `product(shape)` values.
    pub shape: Vec<u64>,
}

/// A stand-in program as written in `standin/program.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Program {
    /// Format version (1 to 3).
    pub version: u64,
    /// Weight blobs by name.
    #[serde(default)]
    pub blobs: BTreeMap<String, BlobSpec>,
    /// The ops, run in order.
    pub ops: Vec<ProgramOp>,
}

/// The archive path of the blob named `name` as writers lay it out.
pub fn blob_path(name: &str) -> String {
    format!("standin/{name}.bin")
}

/// True for tensor dtypes a program of `version` takes: `float32` (or undeclared) always,
/// `int32` from version 2.
pub fn takes_dtype(version: u64, dtype: Option<&str>) -> bool {
    match dtype {
        None | Some("float32") => true,
        Some("int32") => version >= 2,
        Some(_) => false,
    }
}

impl Program {
    /// The lowest version that has every feature of `ops` over `tensors`: version 3 for a
    /// `llama_decoder` op, version 2 for the other version 2 ops or for `int32` tensors, else 1.
    pub fn min_version<'a>(ops: &[ProgramOp], tensors: impl IntoIterator<Item = &'a NeffTensor>) -> u64 {
        let int32 = tensors.into_iter().any(|t| t.dtype.as_deref() == Some("int32"));
        let ops = ops.iter().map(ProgramOp::min_version).max().unwrap_or(1);
        ops.max(if int32 { 2 } else { 1 })
    }

    /// Parses `standin/program.json`, refusing (as [`ProgramError::Unsupported`]) versions, keys
    /// and ops this reader does not know and ops newer than the declared version.
    pub fn from_json(bytes: &[u8]) -> Result<Program, ProgramError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
        check_known(&value)?;
        let program: Program = serde_json::from_value(value).map_err(|e| invalid(e.to_string()))?;
        if let Some(op) = program.ops.iter().find(|op| op.min_version() > program.version) {
            return Err(ProgramError::Unsupported {
                reason: format!(
                    "op '{}' needs program version {}, the program declares {}",
                    op.tag(),
                    op.min_version(),
                    program.version
                ),
            });
        }
        Ok(program)
    }

    /// The program as `standin/program.json` bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers into memory cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The `[in, out]` dimensions of a dense op's weight, checking the bias is `[out]`.
    pub fn dense_dims(&self, weight: &str, bias: Option<&str>) -> Result<(u64, u64), ProgramError> {
        let w = self.blobs.get(weight).ok_or_else(|| invalid(format!("dense: unknown blob '{weight}'")))?;
        let [fan_in, fan_out] = w.shape[..] else {
            return Err(invalid(format!("dense: weight '{weight}' is not 2-D")));
        };
        if let Some(bias) = bias {
            let b = self.blobs.get(bias).ok_or_else(|| invalid(format!("dense: unknown blob '{bias}'")))?;
            if element_count(&b.shape) != Some(fan_out) {
                return Err(invalid(format!("dense: bias '{bias}' is not [{fan_out}]")));
            }
        }
        Ok((fan_in, fan_out))
    }

    /// The program's `llama_decoder` op, if it has one.
    pub fn decoder(&self) -> Option<&LlamaDecoderOp> {
        self.ops.iter().find_map(|op| match op {
            ProgramOp::LlamaDecoder(d) => Some(d),
            _ => None,
        })
    }

    /// Checks the program against the NEFF's declared tensors: every input and output of a dtype
    /// the version takes and of a known byte size, every buffer an op reads already written,
    /// every buffer length derivable, every output exactly filled. A `llama_decoder` op must be
    /// the program's only op and is checked by [`LlamaDecoderOp::check`].
    pub fn check(&self, inputs: &[NeffTensor], outputs: &[NeffTensor]) -> Result<(), ProgramError> {
        if let Some(decoder) = self.decoder() {
            if self.ops.len() != 1 {
                return Err(invalid("a llama_decoder op must be the program's only op".into()));
            }
            return decoder.check(inputs, outputs);
        }
        let mut lengths: HashMap<&str, u64> = HashMap::new();
        for t in inputs {
            lengths.insert(&t.name, self.values_of(t, "input")?);
        }
        for op in &self.ops {
            let (output, len) = self.op_length(op, &lengths)?;
            lengths.insert(output, len);
        }
        for t in outputs {
            let want = self.values_of(t, "output")?;
            match lengths.get(t.name.as_str()) {
                Some(&have) if have == want => {}
                Some(&have) => {
                    return Err(invalid(format!("output '{}' holds {want} values, the program makes {have}", t.name)));
                }
                None => return Err(invalid(format!("no op writes output '{}'", t.name))),
            }
        }
        Ok(())
    }

    /// Number of 4-byte values of a tensor a program reads or writes.
    fn values_of(&self, t: &NeffTensor, kind: &str) -> Result<u64, ProgramError> {
        let size = t.byte_size().filter(|s| s % 4 == 0);
        match size {
            Some(size) if takes_dtype(self.version, t.dtype.as_deref()) => Ok(size / 4),
            _ => {
                let allowed = if self.version >= 2 { "float32 or int32" } else { "float32 (int32 from version 2)" };
                Err(invalid(format!(
                    "{kind} '{}' is {:?} of {:?} bytes, a program takes {allowed}",
                    t.name,
                    t.dtype,
                    t.byte_size()
                )))
            }
        }
    }

    fn op_length<'a>(&self, op: &'a ProgramOp, lengths: &HashMap<&str, u64>) -> Result<(&'a str, u64), ProgramError> {
        let buffer =
            |name: &str| lengths.get(name).copied().ok_or_else(|| invalid(format!("op reads unknown buffer '{name}'")));
        match op {
            ProgramOp::Dense { input, weight, bias, output, .. } => {
                let (fan_in, fan_out) = self.dense_dims(weight, bias.as_deref())?;
                let len = buffer(input)?;
                if fan_in == 0 || len % fan_in != 0 {
                    return Err(invalid(format!("dense: '{input}' ({len} values) is not [rows, {fan_in}]")));
                }
                let out = (len / fan_in)
                    .checked_mul(fan_out)
                    .ok_or_else(|| invalid(format!("dense: '{output}' would overflow")))?;
                Ok((output, out))
            }
            ProgramOp::Add { a, b, output } | ProgramOp::Mul { a, b, output } | ProgramOp::Sub { a, b, output } => {
                let (la, lb) = (buffer(a)?, buffer(b)?);
                if la != lb {
                    return Err(invalid(format!("{}: '{a}' has {la} values, '{b}' has {lb}", op.tag())));
                }
                Ok((output, la))
            }
            ProgramOp::Copy { input, output } | ProgramOp::Activation { input, output, .. } => {
                Ok((output, buffer(input)?))
            }
            ProgramOp::Select { cond, a, b, output } => {
                let (rows, la, lb) = (buffer(cond)?, buffer(a)?, buffer(b)?);
                if la != lb || rows == 0 || la % rows != 0 {
                    return Err(invalid(format!(
                        "select: '{a}' ({la} values) and '{b}' ({lb}) must be equal and split into the {rows} rows of '{cond}'"
                    )));
                }
                Ok((output, la))
            }
            ProgramOp::LlamaDecoder(_) => Err(invalid("a llama_decoder op must be the program's only op".into())),
        }
    }
}

/// Refuses keys and op tags this reader does not know (a newer program format).
fn check_known(value: &Value) -> Result<(), ProgramError> {
    let unsupported = |reason: String| ProgramError::Unsupported { reason };
    let Value::Object(map) = value else {
        return Err(invalid("not a JSON object".into()));
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(unsupported(format!("key '{key}' is not supported by this reader")));
    }
    let version = map.get("version").and_then(Value::as_u64).unwrap_or(0);
    if !(1..=MAX_VERSION).contains(&version) {
        return Err(unsupported(format!("version {version} is not supported (1 to {MAX_VERSION} are)")));
    }
    let ops = map.get("ops").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for op in ops {
        let tag = op.get("op").and_then(Value::as_str).unwrap_or("");
        let known =
            OPS_V1.contains(&tag) || (version >= 2 && OPS_V2.contains(&tag)) || (version >= 3 && OPS_V3.contains(&tag));
        if !known {
            return Err(unsupported(format!("op '{tag}' is not supported by this reader")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsupported(json: serde_json::Value) -> bool {
        matches!(Program::from_json(json.to_string().as_bytes()), Err(ProgramError::Unsupported { .. }))
    }

    #[test]
    fn unknown_keys_ops_and_versions_are_unsupported() {
        assert!(unsupported(serde_json::json!({"version": 1, "state": {}, "ops": []})));
        assert!(unsupported(serde_json::json!({"version": 1, "ops": [{"op": "gru"}]})));
        assert!(unsupported(serde_json::json!({"version": 4, "ops": []})));
        assert!(unsupported(serde_json::json!({"version": 2, "ops": [{"op": "llama_decoder"}]})));
        assert!(unsupported(
            serde_json::json!({"version": 1, "ops": [{"op": "mul", "a": "x", "b": "y", "output": "z"}]})
        ));
        let sigmoid_v1 = serde_json::json!({"version": 1, "blobs": {}, "ops": [
            {"op": "dense", "input": "x", "weight": "w", "activation": "sigmoid", "output": "y"}]});
        assert!(unsupported(sigmoid_v1));
        let mul_v2 = serde_json::json!({"version": 2, "ops": [{"op": "mul", "a": "x", "b": "y", "output": "z"}]});
        assert_eq!(Program::from_json(mul_v2.to_string().as_bytes()).map(|p| p.ops.len()), Ok(1));
    }

    #[test]
    fn json_round_trip_keeps_the_program() {
        let mut blobs = BTreeMap::new();
        blobs.insert("w".to_string(), BlobSpec { file: blob_path("w"), shape: vec![2, 3] });
        let program = Program {
            version: 1,
            blobs,
            ops: vec![ProgramOp::Dense {
                input: "x".into(),
                weight: "w".into(),
                bias: None,
                activation: Activation::Gelu,
                output: "y".into(),
            }],
        };
        assert_eq!(Program::from_json(&program.to_json()), Ok(program));
    }

    fn tensor(name: &str, dtype: &str, shape: &[u64]) -> NeffTensor {
        NeffTensor { name: name.into(), dtype: Some(dtype.into()), shape: Some(shape.to_vec()), size_bytes: None }
    }

    #[test]
    fn check_derives_lengths_and_refuses_mismatches() {
        let mut blobs = BTreeMap::new();
        blobs.insert("w".to_string(), BlobSpec { file: blob_path("w"), shape: vec![2, 3] });
        let dense = ProgramOp::Dense {
            input: "x".into(),
            weight: "w".into(),
            bias: None,
            activation: Activation::None,
            output: "y".into(),
        };
        let program = Program { version: 1, blobs, ops: vec![dense] };
        let x = tensor("x", "float32", &[4, 2]);
        assert_eq!(program.check(std::slice::from_ref(&x), &[tensor("y", "float32", &[4, 3])]), Ok(()));
        assert!(program.check(std::slice::from_ref(&x), &[tensor("y", "float32", &[4, 2])]).is_err());
        assert!(program.check(std::slice::from_ref(&x), &[tensor("z", "float32", &[4, 3])]).is_err());
        // int32 only from version 2.
        assert!(program.check(&[tensor("x", "int32", &[4, 2])], &[tensor("y", "float32", &[4, 3])]).is_err());
        assert!(program.check(&[tensor("x", "float16", &[4, 2])], &[tensor("y", "float32", &[4, 3])]).is_err());
        let v2 = Program { version: 2, ..program };
        assert_eq!(v2.check(&[tensor("x", "int32", &[4, 2])], &[tensor("y", "float32", &[4, 3])]), Ok(()));
        assert_eq!(Program::min_version(&v2.ops, &[x]), 1);
    }

    #[test]
    fn a_decoder_program_is_version_3_and_its_only_op() {
        let config = serde_json::json!({"hidden_size": 8, "intermediate_size": 8, "num_layers": 1,
            "num_heads": 2, "num_kv_heads": 1, "head_dim": 4, "vocab_size": 10, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": true, "slots": 2, "max_len": 8});
        let op = serde_json::json!({"op": "llama_decoder", "mode": "prefill", "config": config,
            "input_ids": "ids", "position_ids": "pos", "seq_ids": "seq", "weight": "w.{name}",
            "cache_k_input": "k{layer}.must_alias_input", "cache_k_output": "k{layer}",
            "cache_v_input": "v{layer}.must_alias_input", "cache_v_output": "v{layer}", "logits": "logits"});
        let program =
            Program::from_json(serde_json::json!({"version": 3, "ops": [op]}).to_string().as_bytes()).expect("parses");
        let decoder = program.decoder().expect("has the op");
        assert_eq!(decoder.mode, DecoderMode::Prefill);
        assert_eq!(decoder.weight_input("model.norm.weight"), "w.model.norm.weight");
        assert_eq!(Program::min_version(&program.ops, &[]), 3);
        let (inputs, outputs) = decoder.tensors(3);
        assert_eq!(program.check(&inputs, &outputs), Ok(()));
        let two_ops = Program { ops: vec![program.ops[0].clone(), program.ops[0].clone()], ..program.clone() };
        assert!(two_ops.check(&inputs, &outputs).is_err());
        assert_eq!(Program::from_json(&program.to_json()), Ok(program));

        let mut unknown = op.clone();
        unknown["temperature"] = 1.0.into();
        let parsed = Program::from_json(serde_json::json!({"version": 3, "ops": [unknown]}).to_string().as_bytes());
        assert!(matches!(parsed, Err(ProgramError::Invalid { .. })), "{parsed:?}");
    }
}
