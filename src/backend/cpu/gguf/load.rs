//! Loading a Llama-family decoder from one `.gguf` file: [`GgufSource`] as the model's
//! [`WeightSource`], its configuration as a [`LlamaConfig`], its tokenizer and chat template.

use std::path::{Path, PathBuf};

use super::source::{GgufSource, GgufTensor};
use super::tokenizer::tokenizer_json;
use crate::backend::cpu::llama::{LlamaConfig, LoadError, Weight, WeightSource};

impl WeightSource for GgufSource {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>, LoadError> {
        let t =
            self.gguf_tensor(hf_name).map_err(|e| LoadError::Gguf { path: PathBuf::new(), message: e.to_string() })?;
        Ok(t.map(|t| match t {
            GgufTensor::Dense { data, shape } => Weight::Dense { data, shape },
            GgufTensor::Quant(q) => Weight::Quant(q),
        }))
    }
}

/// Everything a `.gguf` file gives a decoder.
pub struct GgufDecoderFiles {
    /// Hyper-parameters from the `<arch>.*` metadata.
    pub config: LlamaConfig,
    /// The weights (quantized matrices stay quantized).
    pub weights: GgufSource,
    /// The tokenizer as an HF `tokenizer.json` text (`None` when its type is not supported).
    pub tokenizer_json: Option<String>,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
    /// Text of the bos / eos tokens (for the template's `bos_token` / `eos_token`).
    pub bos_token: Option<String>,
    /// See `bos_token`.
    pub eos_token: Option<String>,
}

/// Opens `path` and reads its configuration, tokenizer and template.
pub fn load_gguf_decoder(path: &Path) -> Result<GgufDecoderFiles, LoadError> {
    let err = |e: super::GgufError| LoadError::Gguf { path: path.to_path_buf(), message: e.to_string() };
    let weights = GgufSource::open(path).map_err(err)?;
    let config_json = weights.config_json().map_err(err)?;
    let config = LlamaConfig::from_json(&config_json.to_string())?;
    let tokenizer_json = tokenizer_json(weights.file()).ok().map(|v| v.to_string());
    let id = |k: &str| weights.file().get(k).and_then(super::GgufValue::as_u64);
    let text = |id: Option<u64>| id.and_then(|i| weights.token_text(i)).map(str::to_string);
    Ok(GgufDecoderFiles {
        config,
        chat_template: weights.chat_template().map(str::to_string),
        bos_token: text(id("tokenizer.ggml.bos_token_id")),
        eos_token: text(id("tokenizer.ggml.eos_token_id")),
        tokenizer_json,
        weights,
    })
}
