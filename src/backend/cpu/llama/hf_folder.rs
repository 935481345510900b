//! Everything an HF decoder folder holds, loaded at once: `config.json`, the safetensors weights,
//! `tokenizer.json`, the chat template and special tokens of `tokenizer_config.json`, and the sampling
//! defaults of `generation_config.json`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::config::token_ids;
use super::{LlamaConfig, LoadError, SafetensorsSource};
use crate::tokenize::{ChatTemplate, Tokenizer};

/// Sampling defaults and stop tokens a model folder declares (`generation_config.json`, with the ids of
/// config.json and tokenizer_config.json folded in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// Every token id that ends generation (generation_config, config and the tokenizer's eos token).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// `do_sample`: false means greedy by default.
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default nucleus threshold.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default min-p.
    pub min_p: Option<f32>,
    /// Default output length limit.
    pub max_new_tokens: Option<usize>,
}

/// The files of an HF decoder folder, parsed.
pub struct HfDecoderFiles {
    /// The folder.
    pub dir: PathBuf,
    /// Model hyper-parameters.
    pub config: LlamaConfig,
    /// The weights (kept in memory until the model is built).
    pub weights: SafetensorsSource,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template, when the folder has one.
    pub chat_template: Option<ChatTemplate>,
    /// Beginning-of-sequence token text (`bos_token` of tokenizer_config.json), if any.
    pub bos_token: Option<String>,
    /// End-of-sequence token text (`eos_token` of tokenizer_config.json), if any.
    pub eos_token: Option<String>,
    /// Stop tokens and sampling defaults.
    pub generation: GenerationDefaults,
}

fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| LoadError::Io { path: path.to_path_buf(), message: e.to_string() })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| LoadError::Json { path: path.to_path_buf(), message: e.to_string() })
}

/// A special token written as a string or as an AddedToken object (`{"content": ...}`).
fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template: `chat_template.jinja` beside the config, or tokenizer_config's `chat_template`
/// (a string, or a list of named templates of which `default` is taken).
fn template_source(dir: &Path, tokenizer_config: Option<&Value>) -> Result<Option<String>, LoadError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| LoadError::Io { path: jinja, message: e.to_string() });
    }
    Ok(match tokenizer_config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

fn f32_field(v: Option<&Value>, key: &str) -> Option<f32> {
    v?.get(key)?.as_f64().map(|x| x as f32)
}

fn usize_field(v: Option<&Value>, key: &str) -> Option<usize> {
    v?.get(key)?.as_u64().and_then(|x| usize::try_from(x).ok())
}

/// Loads an HF decoder folder (Llama, Mistral, Qwen2, SmolLM): configuration, weights, tokenizer, chat
/// template and generation defaults.
pub fn load_hf_decoder(dir: &Path) -> Result<HfDecoderFiles, LoadError> {
    let config = LlamaConfig::from_file(&dir.join("config.json"))?;
    let weights = SafetensorsSource::open(dir)?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
    let gen_config = read_json(&dir.join("generation_config.json"))?;
    let bos_token = token_text(tok_config.as_ref().and_then(|c| c.get("bos_token")));
    let eos_token = token_text(tok_config.as_ref().and_then(|c| c.get("eos_token")));
    let chat_template = match template_source(dir, tok_config.as_ref())? {
        Some(source) => Some(ChatTemplate::new(
            &source,
            bos_token.as_deref().unwrap_or_default(),
            eos_token.as_deref().unwrap_or_default(),
        )?),
        None => None,
    };
    let gcfg = gen_config.as_ref();
    let mut eos_token_ids = token_ids(gcfg.and_then(|g| g.get("eos_token_id")));
    let extra = config.eos_token_ids.iter().copied().chain(eos_token.as_deref().and_then(|t| tokenizer.token_id(t)));
    for id in extra {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    let generation = GenerationDefaults {
        eos_token_ids,
        bos_token_id: token_ids(gcfg.and_then(|g| g.get("bos_token_id"))).first().copied().or(config.bos_token_id),
        do_sample: gcfg.and_then(|g| g.get("do_sample")).and_then(Value::as_bool),
        temperature: f32_field(gcfg, "temperature"),
        top_p: f32_field(gcfg, "top_p"),
        top_k: usize_field(gcfg, "top_k"),
        min_p: f32_field(gcfg, "min_p"),
        max_new_tokens: usize_field(gcfg, "max_new_tokens"),
    };
    Ok(HfDecoderFiles {
        dir: dir.to_path_buf(),
        config,
        weights,
        tokenizer,
        chat_template,
        bos_token,
        eos_token,
        generation,
    })
}
