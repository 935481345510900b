//! The decoder's hyper-parameters, read from an HF `config.json` (Llama, Mistral, Qwen2, SmolLM).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::LoadError;

/// `rope_scaling` of type `llama3` (Llama 3.1+): low frequencies slowed by `factor`, a smooth ramp between.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3RopeScaling {
    /// Slow-down of the low frequencies.
    pub factor: f32,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully scaled.
    pub low_freq_factor: f32,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f32,
    /// The context length the model was trained with before the extension.
    pub original_max_position_embeddings: f32,
}

/// Hyper-parameters of a Llama-architecture decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` as written (`llama`, `mistral`, `qwen2`, ...).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one head (`head_dim`, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// `rope_scaling` of type `llama3`, when present.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Context limit: positions at or past it are refused (the sliding window, when smaller).
    pub max_position_embeddings: usize,
    /// The output projection is the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// q/k/v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub attention_bias: bool,
    /// Beginning-of-sequence token id, if set.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (`eos_token_id` may be a list).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    vocab_size: usize,
    #[serde(default)]
    attention_bias: bool,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn default_eps() -> f64 {
    1e-6
}

fn default_max_positions() -> usize {
    2048
}

/// Reads token ids given as one integer or a list of integers (`eos_token_id` in HF configs).
pub(crate) fn token_ids(value: Option<&Value>) -> Vec<u32> {
    match value {
        Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()).into_iter().collect(),
        Some(Value::Array(items)) => {
            items.iter().filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok())).collect()
        }
        _ => Vec::new(),
    }
}

fn config_error(field: &str, reason: impl Into<String>) -> LoadError {
    LoadError::Config { field: field.to_string(), reason: reason.into() }
}

fn number(params: &Value, key: &str) -> Result<f32, LoadError> {
    params
        .get(key)
        .and_then(Value::as_f64)
        .map(|v| v as f32)
        .ok_or_else(|| config_error("rope_scaling", format!("type llama3 needs a number '{key}'")))
}

impl LlamaConfig {
    /// Reads `config.json` from an HF model folder.
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::Io { path: path.to_path_buf(), message: e.to_string() })?;
        Self::from_json(&text).map_err(|e| match e {
            LoadError::Json { message, .. } => LoadError::Json { path: path.to_path_buf(), message },
            other => other,
        })
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_json(text: &str) -> Result<Self, LoadError> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| LoadError::Json { path: "config.json".into(), message: e.to_string() })?;
        let model_type = raw.model_type.unwrap_or_else(|| "llama".to_string());
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(config_error(
                "model_type",
                format!("'{model_type}' is not a Llama-architecture decoder (llama, mistral, qwen2)"),
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref()
            && act != "silu"
        {
            return Err(config_error("hidden_act", format!("'{act}' is not supported (silu only)")));
        }
        if raw.num_attention_heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 {
            return Err(config_error("num_attention_heads", "sizes must be positive"));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if kv_heads == 0 || !raw.num_attention_heads.is_multiple_of(kv_heads) {
            return Err(config_error(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads {}", raw.num_attention_heads),
            ));
        }
        let head_dim = raw.head_dim.unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(config_error("head_dim", format!("{head_dim} must be even and positive (RoPE)")));
        }
        // transformers 5 writes `rope_parameters` (with rope_theta inside); checkpoints write
        // `rope_theta` + `rope_scaling`.
        let params = raw.rope_parameters.as_ref().or(raw.rope_scaling.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64))
            .unwrap_or(10000.0) as f32;
        let rope_type = params
            .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let rope_scaling = match (rope_type, params) {
            ("default", _) | (_, None) => None,
            ("llama3", Some(p)) => Some(Llama3RopeScaling {
                factor: number(p, "factor")?,
                low_freq_factor: number(p, "low_freq_factor")?,
                high_freq_factor: number(p, "high_freq_factor")?,
                original_max_position_embeddings: number(p, "original_max_position_embeddings")?,
            }),
            (other, Some(_)) => {
                return Err(config_error(
                    "rope_scaling",
                    format!("type '{other}' is not supported (default and llama3 are)"),
                ));
            }
        };
        // A sliding window only changes attention past its length: refusing positions beyond it keeps
        // the results exact.
        let window = match model_type.as_str() {
            "qwen2" if raw.use_sliding_window != Some(true) => None,
            _ => raw.sliding_window,
        };
        let max_positions = window.map_or(raw.max_position_embeddings, |w| w.min(raw.max_position_embeddings));
        Ok(LlamaConfig {
            attention_bias: raw.attention_bias || model_type == "qwen2",
            model_type,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_positions,
            tie_word_embeddings: raw.tie_word_embeddings,
            vocab_size: raw.vocab_size,
            bos_token_id: token_ids(raw.bos_token_id.as_ref()).first().copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref()),
        })
    }

    /// Width of the query projection (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (and of the value) projection (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_legacy_and_v5_rope_keys() {
        let legacy = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
            "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":320,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192},"eos_token_id":[2,3]}"#;
        let c = LlamaConfig::from_json(legacy).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.eos_token_ids, vec![2, 3]);
        assert_eq!(c.rope_scaling.as_ref().map(|s| s.factor), Some(8.0));
        let v5 = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":320,"rope_parameters":{"rope_type":"default","rope_theta":1000.0},"eos_token_id":2}"#;
        let c = LlamaConfig::from_json(v5).unwrap();
        assert_eq!(c.rope_theta, 1000.0);
        assert!(c.rope_scaling.is_none());
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.eos_token_ids, vec![2]);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let gelu = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":320,"hidden_act":"gelu"}"#;
        assert!(matches!(LlamaConfig::from_json(gelu), Err(LoadError::Config { field, .. }) if field == "hidden_act"));
        let yarn = r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":320,"rope_scaling":{"rope_type":"yarn","factor":4.0}}"#;
        assert!(
            matches!(LlamaConfig::from_json(yarn), Err(LoadError::Config { field, .. }) if field == "rope_scaling")
        );
    }
}
