//! [`GenerativeSpec`]: the settings of a generative (decoder) model, from `config.pbtxt`
//! `parameters` over the worker's defaults (`--kv-cache-memory`).

use super::ConfigError;
use crate::backend::cpu::quant::ActPrecision;
use crate::backend::generative::KvDtype;
use crate::proto::inference::{ModelConfig, ModelInput, ModelOutput, ModelTransactionPolicy};
use crate::tensor::DataType;

/// K/V cache memory per instance when neither the model nor `--kv-cache-memory` says otherwise.
pub const DEFAULT_KV_CACHE_MEMORY: u64 = 512 << 20;

/// Inputs of a generative model: (name, datatype, dims) in configuration order. All optional;
/// exactly one of `text_input`, `input_ids`, `messages` must be sent.
pub const GENERATIVE_INPUTS: &[(&str, DataType, i64)] = &[
    ("text_input", DataType::Bytes, 1),
    ("input_ids", DataType::Int32, -1),
    ("messages", DataType::Bytes, 1),
    ("stream", DataType::Bool, 1),
    ("sampling_parameters", DataType::Bytes, 1),
    ("exclude_input_in_output", DataType::Bool, 1),
    ("return_finish_reason", DataType::Bool, 1),
    ("return_cumulative_logprob", DataType::Bool, 1),
    ("return_logprobs", DataType::Bool, 1),
    ("return_num_input_tokens", DataType::Bool, 1),
    ("return_num_output_tokens", DataType::Bool, 1),
    ("return_output_ids", DataType::Bool, 1),
    ("return_output_logprobs", DataType::Bool, 1),
    ("return_num_cached_tokens", DataType::Bool, 1),
];

/// Outputs of a generative model: (name, datatype, dims) in configuration order.
pub const GENERATIVE_OUTPUTS: &[(&str, DataType, i64)] = &[
    ("text_output", DataType::Bytes, -1),
    ("finish_reason", DataType::Bytes, -1),
    ("cumulative_logprob", DataType::Fp32, -1),
    ("logprobs", DataType::Bytes, -1),
    ("num_input_tokens", DataType::Uint32, -1),
    ("num_output_tokens", DataType::Uint32, -1),
    ("output_ids", DataType::Int32, -1),
    ("output_logprobs", DataType::Fp32, -1),
    ("num_cached_tokens", DataType::Uint32, -1),
];

/// Completes the configuration of a generative model: the tensors of Triton's vLLM-backend
/// conventions (when the configuration lists none), no batch dimension (`max_batch_size: 0`; the
/// policy batches sequences itself), and `model_transaction_policy { decoupled: true }` (a request
/// may get many responses).
pub fn complete_config(config: &mut ModelConfig) {
    if config.input.is_empty() {
        config.input = GENERATIVE_INPUTS
            .iter()
            .map(|&(name, dtype, dim)| ModelInput {
                name: name.into(),
                data_type: dtype.config_code(),
                dims: vec![dim],
                optional: true,
                ..Default::default()
            })
            .collect();
    }
    if config.output.is_empty() {
        config.output = GENERATIVE_OUTPUTS
            .iter()
            .map(|&(name, dtype, dim)| ModelOutput {
                name: name.into(),
                data_type: dtype.config_code(),
                dims: vec![dim],
                ..Default::default()
            })
            .collect();
    }
    config.max_batch_size = 0;
    config.model_transaction_policy = Some(ModelTransactionPolicy { decoupled: true });
}

/// How a generative model is batched and how much K/V memory it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerativeSpec {
    /// Most tokens in one step (decode tokens plus prefill chunks): `max_num_batched_tokens`.
    pub max_batched_tokens: usize,
    /// Most sequences running at once per instance: `max_num_seqs`.
    pub max_running: usize,
    /// While sequences decode, most prompt tokens per step: `max_prefill_tokens_while_decoding`
    /// (bounds the decoding streams' inter-token latency when prompts join).
    pub max_prefill_while_decoding: usize,
    /// Bytes of K/V cache per instance: `kv_cache_memory` (e.g. `256MiB`).
    pub kv_cache_memory: u64,
    /// Tokens per K/V block: `kv_block_size`.
    pub block_size: usize,
    /// Cap on the context (prompt plus generated tokens): `max_model_len`; `None` = the model's.
    pub max_model_len: Option<usize>,
    /// Most open conversation sessions per instance: `max_sessions`.
    pub max_sessions: usize,
    /// Most tokens one session may hold: `max_session_tokens`; `None` = the context limit.
    pub max_session_tokens: Option<usize>,
    /// With `--session-store`: seconds after which an idle session is written to the store (and
    /// survives a crash): `session_store_after_idle_seconds` (default 60; 0 = only when the pool
    /// needs its blocks, and at drain).
    pub store_after_idle: Option<std::time::Duration>,
    /// How the quantized (GGUF) weights' products quantize activations: `activation_bits` 8 or 16
    /// (worker default `--activation-bits`); F32/F16/BF16 checkpoints ignore it.
    pub activations: ActPrecision,
    /// Element type of the K/V cache: `kv_cache_dtype` `auto`, `f32` or `f16` (worker default
    /// `--kv-cache-dtype`).
    pub kv_dtype: KvCacheDtype,
}

/// The K/V cache element type a model asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// f16 for a GGUF's matrices (Q8_0/Q4_0/Q4_1, or F16: all run on the quantized kernels), as
    /// llama.cpp's default cache; f32 for HF F32/F16/BF16 checkpoints, whose outputs then match
    /// `transformers` to f32 rounding.
    #[default]
    Auto,
    /// Always f32.
    F32,
    /// Always f16: half the K/V memory and attention bandwidth; logits move by f16 rounding of K
    /// and V (see docs/generation.md).
    F16,
}

impl KvCacheDtype {
    /// The element type for a model whose weights are `quantized` or not.
    pub fn resolve(self, quantized: bool) -> KvDtype {
        match self {
            KvCacheDtype::Auto if quantized => KvDtype::F16,
            KvCacheDtype::Auto | KvCacheDtype::F32 => KvDtype::F32,
            KvCacheDtype::F16 => KvDtype::F16,
        }
    }
}

/// Parses a K/V cache element type: `auto`, `f32` or `f16` (`float32`/`float16`/`fp16`/`half` too).
pub fn parse_kv_cache_dtype(text: &str) -> Result<KvCacheDtype, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(KvCacheDtype::Auto),
        "f32" | "fp32" | "float32" | "float" => Ok(KvCacheDtype::F32),
        "f16" | "fp16" | "float16" | "half" => Ok(KvCacheDtype::F16),
        other => Err(format!("'{other}' is not a K/V cache type: use auto, f32 or f16")),
    }
}

impl Default for GenerativeSpec {
    fn default() -> Self {
        Self {
            max_batched_tokens: 512,
            max_running: 64,
            max_prefill_while_decoding: crate::batching::generative::step::DEFAULT_MAX_PREFILL_WHILE_DECODING,
            kv_cache_memory: DEFAULT_KV_CACHE_MEMORY,
            block_size: crate::backend::generative::DEFAULT_BLOCK_SIZE,
            max_model_len: None,
            max_sessions: 1024,
            max_session_tokens: None,
            store_after_idle: Some(std::time::Duration::from_secs(60)),
            activations: ActPrecision::default(),
            kv_dtype: KvCacheDtype::default(),
        }
    }
}

/// Parses an activation width for quantized products: `8` (llama.cpp's, fastest) or `16`.
pub fn parse_activation_bits(text: &str) -> Result<ActPrecision, String> {
    match text.trim() {
        "8" => Ok(ActPrecision::I8),
        "16" => Ok(ActPrecision::I16),
        other => Err(format!("'{other}' is not an activation width: use 8 or 16")),
    }
}

/// Parses a memory size: bytes, or a number with `K`/`M`/`G` (powers of 1024; `KiB`, `MB`, ... too).
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 =
        num.parse().map_err(|_| format!("'{text}' is not a size (expected e.g. 512MiB, 2G or a byte count)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("'{text}': unknown unit '{other}' (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !(1.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("'{text}' is not a positive size"));
    }
    Ok(bytes as u64)
}

impl GenerativeSpec {
    /// Reads the generative `parameters` of `config` over `defaults`; `file` names the source.
    pub fn from_config(config: &ModelConfig, file: &str, defaults: &GenerativeSpec) -> Result<Self, ConfigError> {
        let mut s = defaults.clone();
        let err = |key: &str, reason: String| ConfigError::Field {
            file: file.to_string(),
            field: format!("parameters.{key}"),
            reason,
        };
        let positive = |key: &str, v: &str| -> Result<usize, ConfigError> {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| err(key, format!("'{v}' is not a positive integer")))
        };
        for (key, p) in &config.parameters {
            let v = p.string_value.as_str();
            match key.as_str() {
                "max_num_batched_tokens" => s.max_batched_tokens = positive(key, v)?,
                "max_num_seqs" => s.max_running = positive(key, v)?,
                "max_prefill_tokens_while_decoding" => s.max_prefill_while_decoding = positive(key, v)?,
                "kv_block_size" => s.block_size = positive(key, v)?,
                "max_model_len" => s.max_model_len = Some(positive(key, v)?),
                "max_sessions" => s.max_sessions = positive(key, v)?,
                "max_session_tokens" => s.max_session_tokens = Some(positive(key, v)?),
                "session_store_after_idle_seconds" => {
                    let secs = v.trim().parse::<f64>().ok().filter(|x| x.is_finite() && *x >= 0.0 && *x < 1e9);
                    let secs = secs.ok_or_else(|| err(key, format!("'{v}' is not a number of seconds >= 0")))?;
                    s.store_after_idle = (secs > 0.0).then(|| std::time::Duration::from_secs_f64(secs));
                }
                "kv_cache_memory" => s.kv_cache_memory = parse_memory(v).map_err(|r| err(key, r))?,
                "activation_bits" => s.activations = parse_activation_bits(v).map_err(|r| err(key, r))?,
                "kv_cache_dtype" => s.kv_dtype = parse_kv_cache_dtype(v).map_err(|r| err(key, r))?,
                _ => super::unserved::check_parameters(config, file, true)?,
            }
        }
        Ok(s)
    }

    /// K/V blocks that fit the memory budget for a decoder of this shape (K and V of `dtype` per
    /// layer, per K/V head, per position); at least one.
    pub fn num_blocks(&self, layers: usize, kv_heads: usize, head_dim: usize, dtype: KvDtype) -> usize {
        let per_position = crate::backend::generative::kv_bytes_per_position(layers, kv_heads, head_dim, dtype);
        let per_block = (per_position * self.block_size).max(1) as u64;
        (self.kv_cache_memory / per_block).max(1) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_model_config;

    #[test]
    fn memory_sizes_parse() {
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("2G"), Ok(2 << 30));
        assert_eq!(parse_memory("1.5k"), Ok(1536));
        assert_eq!(parse_memory("4096"), Ok(4096));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("3 parsecs").is_err());
        assert!(parse_memory("0").is_err());
    }

    #[test]
    fn parameters_override_defaults() {
        let cfg = parse_model_config(
            r#"name: "g"
               parameters { key: "max_num_seqs" value: { string_value: "8" } }
               parameters { key: "kv_cache_memory" value: { string_value: "64MiB" } }
               parameters { key: "max_model_len" value: { string_value: "1024" } }
               parameters { key: "max_prefill_tokens_while_decoding" value: { string_value: "32" } }"#,
            "t",
        )
        .unwrap();
        let s = GenerativeSpec::from_config(&cfg, "t", &GenerativeSpec::default()).unwrap();
        assert_eq!(s.max_running, 8);
        assert_eq!(s.kv_cache_memory, 64 << 20);
        assert_eq!(s.max_model_len, Some(1024));
        assert_eq!(s.max_prefill_while_decoding, 32);
        assert_eq!(GenerativeSpec::default().max_prefill_while_decoding, 64);
        assert_eq!(s.max_batched_tokens, 512);
        assert_eq!(s.activations, ActPrecision::default());
        // 2 layers × K,V × 4 heads × 64 dims × 16 positions × 4 bytes = 65536 bytes a block.
        assert_eq!(s.num_blocks(2, 4, 64, KvDtype::F32), 1024);
        assert_eq!(s.num_blocks(2, 4, 64, KvDtype::F16), 2048);
        assert_eq!(s.kv_dtype, KvCacheDtype::Auto);
        let bad =
            parse_model_config(r#"name: "g" parameters { key: "max_num_seqs" value: { string_value: "0" } }"#, "t")
                .unwrap();
        let e = GenerativeSpec::from_config(&bad, "t", &GenerativeSpec::default()).unwrap_err();
        assert!(e.to_string().contains("parameters.max_num_seqs"), "{e}");
    }

    #[test]
    fn activation_bits_select_the_product_precision() {
        let cfg = |v: &str| {
            parse_model_config(
                &format!(r#"name: "g" parameters {{ key: "activation_bits" value: {{ string_value: "{v}" }} }}"#),
                "t",
            )
            .unwrap()
        };
        let spec = |v: &str| GenerativeSpec::from_config(&cfg(v), "t", &GenerativeSpec::default());
        assert_eq!(spec("16").unwrap().activations, ActPrecision::I16);
        assert_eq!(spec(" 8").unwrap().activations, ActPrecision::I8);
        let e = spec("12").unwrap_err().to_string();
        assert!(e.contains("parameters.activation_bits") && e.contains("use 8 or 16"), "{e}");
    }

    #[test]
    fn kv_cache_dtype_resolves_by_weights() {
        let cfg = |v: &str| {
            parse_model_config(
                &format!(r#"name: "g" parameters {{ key: "kv_cache_dtype" value: {{ string_value: "{v}" }} }}"#),
                "t",
            )
            .unwrap()
        };
        let spec = |v: &str| GenerativeSpec::from_config(&cfg(v), "t", &GenerativeSpec::default());
        assert_eq!(spec("F16").unwrap().kv_dtype, KvCacheDtype::F16);
        assert_eq!(spec("float32").unwrap().kv_dtype, KvCacheDtype::F32);
        assert_eq!(KvCacheDtype::Auto.resolve(true), KvDtype::F16);
        assert_eq!(KvCacheDtype::Auto.resolve(false), KvDtype::F32);
        assert_eq!(KvCacheDtype::F32.resolve(true), KvDtype::F32);
        assert_eq!(KvCacheDtype::F16.resolve(false), KvDtype::F16);
        let e = spec("int8").unwrap_err().to_string();
        assert!(e.contains("parameters.kv_cache_dtype") && e.contains("auto, f32 or f16"), "{e}");
    }
}
