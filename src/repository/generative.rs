//! Generative models in the repository: recognising a decoder checkpoint (an HF Llama-family folder
//! or a `.gguf` file),
//! completing its configuration, building its decoder instances and tokenizer, and the built-in
//! `tiny_decoder` (seeded random weights, byte-level tokenizer).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::llama::{HfDecoderFiles, LlamaConfig, LlamaModel, Weight, WeightSource, load_hf_decoder};
use crate::backend::cpu::quant::QFormat;
use crate::backend::generative::DecoderInstance;
use crate::batching::generative::detok::TokenText;
use crate::batching::generative::handle::GenerativeSetup;
use crate::batching::generative::params::SamplingParams;
use crate::batching::generative::session::SessionLimits;
use crate::batching::generative::step::StepLimits;
use crate::batching::generative::tokens::{ByteTokenizer, ChatMessage, PromptTokenizer};
use crate::config::generative::GenerativeSpec;
use crate::tokenize::{ChatTemplate, Tokenizer};

use super::LoadError;

/// Where the built-in decoder's errors point (it has no folder).
const BUILTIN_PATH: &str = "<built-in tiny_decoder>";

/// Name of the built-in generative model.
pub const TINY_DECODER: &str = "tiny_decoder";

/// Configuration of the built-in generative model.
pub const TINY_DECODER_CONFIG: &str = r#"
name: "tiny_decoder"
backend: "builtin"
parameters { key: "max_num_seqs" value: { string_value: "32" } }
parameters { key: "kv_cache_memory" value: { string_value: "16MiB" } }
"#;

/// Hyper-parameters of the built-in generative model (a Llama of 2 layers, hidden 64, GQA 4/2
/// heads, vocabulary = the byte tokenizer's 258 ids, context 32768 — long enough that an unbounded
/// request keeps running while a client or test watches it).
const TINY_DECODER_HF_CONFIG: &str = r#"{
  "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
  "max_position_embeddings": 32768, "tie_word_embeddings": true, "vocab_size": 258,
  "bos_token_id": 256, "eos_token_id": 257
}"#;

/// A decoder checkpoint found in a version folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecoderSource {
    /// An HF folder (`config.json` of a Llama-family decoder, safetensors, `tokenizer.json`).
    HfFolder(PathBuf),
    /// One `.gguf` file (weights, tokenizer and chat template in its metadata).
    Gguf(PathBuf),
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Whether `path` holds a decoder checkpoint this worker serves: an HF folder, a `.gguf` file, or a
/// folder holding exactly one `.gguf` file.
pub fn detect(path: &Path) -> Option<DecoderSource> {
    if is_gguf(path) {
        return Some(DecoderSource::Gguf(path.into()));
    }
    detect_hf(path).or_else(|| {
        let ggufs: Vec<PathBuf> =
            std::fs::read_dir(path).ok()?.filter_map(Result::ok).map(|e| e.path()).filter(|p| is_gguf(p)).collect();
        match ggufs.as_slice() {
            [one] => Some(DecoderSource::Gguf(one.clone())),
            _ => None,
        }
    })
}

fn detect_hf(path: &Path) -> Option<DecoderSource> {
    let config = std::fs::read_to_string(path.join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&config).ok()?;
    let model_type = json.get("model_type").and_then(|v| v.as_str()).unwrap_or_default();
    let causal = json
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|x| x.as_str().is_some_and(|s| s.ends_with("ForCausalLM"))));
    let llama_family = matches!(model_type, "llama" | "mistral" | "qwen2");
    (llama_family && (causal || path.join("tokenizer.json").is_file())).then(|| DecoderSource::HfFolder(path.into()))
}

/// An HF tokenizer with its chat template, seen as the generative front needs it.
struct HfTokenizer {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    eos: Vec<u32>,
}

impl TokenText for HfTokenizer {
    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode_skip_special(ids).unwrap_or_default()
    }
}

impl PromptTokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer.encode(text, add_special).map_err(|e| e.to_string())
    }

    fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, String> {
        let Some(t) = &self.template else {
            return Err("the model has no chat template; send text_input instead of messages".into());
        };
        let messages: Vec<crate::tokenize::ChatMessage> =
            messages.iter().map(|m| crate::tokenize::ChatMessage::new(m.role.clone(), m.content.clone())).collect();
        t.render(&messages).map_err(|e| e.to_string())
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }
}

/// What the generative policy is started with.
pub struct LoadedDecoder {
    /// One decoder per instance.
    pub decoders: Vec<Box<dyn DecoderInstance>>,
    /// Tokenizer and chat template.
    pub tokenizer: Arc<dyn PromptTokenizer>,
    /// Step limits, stop tokens, sampling defaults.
    pub setup: GenerativeSetup,
}

fn setup(spec: &GenerativeSpec, eos: Vec<u32>, defaults: SamplingParams) -> GenerativeSetup {
    GenerativeSetup {
        limits: StepLimits {
            max_batched_tokens: spec.max_batched_tokens,
            max_running: spec.max_running,
            max_prefill_while_decoding: spec.max_prefill_while_decoding,
        },
        eos,
        defaults,
        version: 1,
        sessions: SessionLimits {
            max_sessions: spec.max_sessions,
            max_session_tokens: spec.max_session_tokens.unwrap_or(usize::MAX),
            store_after_idle: spec.store_after_idle,
        },
    }
}

fn capped(mut config: LlamaConfig, spec: &GenerativeSpec) -> LlamaConfig {
    if let Some(cap) = spec.max_model_len {
        config.max_position_embeddings = config.max_position_embeddings.min(cap);
    }
    config
}

fn build(
    path: &Path,
    config: &LlamaConfig,
    weights: &dyn WeightSource,
    spec: &GenerativeSpec,
    instances: usize,
    quantized: bool,
) -> Result<Vec<Box<dyn DecoderInstance>>, LoadError> {
    // `auto` K/V precision follows the weights: quantized checkpoints get an f16 cache, as
    // llama.cpp's default.
    let kv_dtype = spec.kv_dtype.resolve(quantized);
    let blocks = spec.num_blocks(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, kv_dtype);
    tracing::info!(
        path = %path.display(),
        kv_cache_dtype = kv_dtype.name(),
        kv_blocks = blocks,
        kv_tokens = blocks * spec.block_size,
        "K/V cache per instance"
    );
    (0..instances.max(1))
        .map(|_| {
            LlamaModel::new(config.clone(), weights, blocks, spec.block_size, kv_dtype)
                .map(|mut m| {
                    m.set_activations(spec.activations);
                    Box::new(m) as Box<dyn DecoderInstance>
                })
                .map_err(|source| LoadError::DecoderCheckpoint { path: path.to_path_buf(), source })
        })
        .collect()
}

/// Loads a decoder checkpoint: `instances` decoders (each with its own K/V pool sized by `spec`),
/// the tokenizer, and the sampling defaults of its generation config.
pub fn load(source: &DecoderSource, spec: &GenerativeSpec, instances: usize) -> Result<LoadedDecoder, LoadError> {
    let dir = match source {
        DecoderSource::HfFolder(dir) => dir,
        DecoderSource::Gguf(file) => return load_gguf(file, spec, instances),
    };
    let files = load_hf_decoder(dir).map_err(|source| LoadError::DecoderCheckpoint { path: dir.clone(), source })?;
    let config = capped(files.config.clone(), spec);
    let decoders = build(dir, &config, &files.weights, spec, instances, false)?;
    Ok(hf_decoder(files, decoders, spec))
}

/// The tokenizer and sampling defaults of an HF folder, around `decoders` built from it.
fn hf_decoder(files: HfDecoderFiles, decoders: Vec<Box<dyn DecoderInstance>>, spec: &GenerativeSpec) -> LoadedDecoder {
    let g = &files.generation;
    let mut defaults = SamplingParams::default();
    if let Some(t) = g.temperature {
        defaults.temperature = t;
    }
    if g.do_sample == Some(false) {
        defaults.temperature = 0.0;
    }
    defaults.top_p = g.top_p.unwrap_or(defaults.top_p);
    defaults.top_k = g.top_k.unwrap_or(defaults.top_k);
    defaults.min_p = g.min_p.unwrap_or(defaults.min_p);
    defaults.max_tokens = g.max_new_tokens.unwrap_or(defaults.max_tokens);
    let eos = g.eos_token_ids.clone();
    let tokenizer =
        Arc::new(HfTokenizer { tokenizer: files.tokenizer, template: files.chat_template, eos: eos.clone() });
    LoadedDecoder { decoders, tokenizer, setup: setup(spec, eos, defaults) }
}

/// Loads a compiled decoder (`neuron_decoder.json` beside an HF folder) on NeuronCores `0..cores`:
/// one instance per core, weights loaded once per core, KV cache in device memory.
pub fn load_neuron(
    dir: &Path,
    model: &str,
    spec: &GenerativeSpec,
    cores: usize,
    instances: Option<usize>,
) -> Result<LoadedDecoder, LoadError> {
    use crate::backend::neuron::decoder::{DecoderManifest, load::load_instances};
    let manifest =
        DecoderManifest::load(dir).map_err(|e| LoadError::Decoder { path: dir.to_path_buf(), reason: e.reason })?;
    let files =
        load_hf_decoder(dir).map_err(|source| LoadError::DecoderCheckpoint { path: dir.to_path_buf(), source })?;
    let config = capped(files.config.clone(), spec);
    let instances = load_instances(dir, model, &manifest, &config, &files.weights, cores.max(1), instances)
        .map_err(|(core, source)| LoadError::Backend { core, source })?;
    let decoders = instances.into_iter().map(|i| Box::new(i) as Box<dyn DecoderInstance>).collect();
    Ok(hf_decoder(files, decoders, spec))
}

/// Whether `dir` holds a compiled decoder for NeuronCores.
pub fn is_neuron_decoder(dir: &Path) -> bool {
    dir.join(crate::backend::neuron::decoder::MANIFEST_FILE).is_file()
}

/// Loads a `.gguf` decoder: quantized matrices stay quantized; the tokenizer is rebuilt from the
/// file's `tokenizer.ggml.*` metadata and the chat template read from `tokenizer.chat_template`.
fn load_gguf(file: &Path, spec: &GenerativeSpec, instances: usize) -> Result<LoadedDecoder, LoadError> {
    let at = |e: &dyn std::fmt::Display| LoadError::Decoder { path: file.to_path_buf(), reason: e.to_string() };
    let files = crate::backend::cpu::gguf::load_gguf_decoder(file)
        .map_err(|source| LoadError::DecoderCheckpoint { path: file.to_path_buf(), source })?;
    let json = files.tokenizer_json.as_deref().ok_or_else(|| {
        at(&"its tokenizer type is not supported (only GPT-2 byte-level BPE, tokenizer.ggml.model = gpt2, is read)")
    })?;
    let inner: tokenizers::Tokenizer = json.parse().map_err(|e| at(&format!("tokenizer: {e}")))?;
    let template = match &files.chat_template {
        Some(src) => Some(
            ChatTemplate::new(src, files.bos_token.as_deref().unwrap_or(""), files.eos_token.as_deref().unwrap_or(""))
                .map_err(|e| at(&format!("chat template: {e}")))?,
        ),
        None => None,
    };
    let config = capped(files.config.clone(), spec);
    // Quantized: the matrices run through the quantized kernels (GGML block formats, and F16
    // matrices too), read from the file's tensor infos without loading one.
    let down = files.weights.file().tensor_info("blk.0.ffn_down.weight");
    let quantized = down.is_some_and(|t| t.dims.len() == 2 && QFormat::from_ggml_type(t.ggml_type).is_some());
    let decoders = build(file, &config, &files.weights, spec, instances, quantized)?;
    let eos = files.config.eos_token_ids.clone();
    let tokenizer = Arc::new(HfTokenizer { tokenizer: Tokenizer::from_tokenizers(inner), template, eos: eos.clone() });
    Ok(LoadedDecoder { decoders, tokenizer, setup: setup(spec, eos, SamplingParams::default()) })
}

/// Seeded random weights for the built-in decoder (SplitMix64 → uniform in ±0.5·scale; norms 1).
struct SeededWeights {
    tensors: HashMap<String, Weight>,
}

impl SeededWeights {
    fn new(c: &LlamaConfig, seed: u64) -> SeededWeights {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut tensors = HashMap::new();
        let mut matrix = |name: String, n: usize, k: usize, next: &mut dyn FnMut() -> f32| {
            let scale = 2.0 / (k as f32).sqrt();
            let data = (0..n * k).map(|_| next() * scale).collect();
            tensors.insert(name, Weight::Dense { data, shape: vec![n, k] });
        };
        let (h, kv) = (c.hidden_size, c.num_key_value_heads * c.head_dim);
        matrix("model.embed_tokens.weight".into(), c.vocab_size, h, &mut next);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            matrix(format!("{p}.self_attn.q_proj.weight"), c.num_attention_heads * c.head_dim, h, &mut next);
            matrix(format!("{p}.self_attn.k_proj.weight"), kv, h, &mut next);
            matrix(format!("{p}.self_attn.v_proj.weight"), kv, h, &mut next);
            matrix(format!("{p}.self_attn.o_proj.weight"), h, c.num_attention_heads * c.head_dim, &mut next);
            matrix(format!("{p}.mlp.gate_proj.weight"), c.intermediate_size, h, &mut next);
            matrix(format!("{p}.mlp.up_proj.weight"), c.intermediate_size, h, &mut next);
            matrix(format!("{p}.mlp.down_proj.weight"), h, c.intermediate_size, &mut next);
        }
        let ones = |n: usize| Weight::Dense { data: vec![1.0; n], shape: vec![n] };
        for l in 0..c.num_hidden_layers {
            tensors.insert(format!("model.layers.{l}.input_layernorm.weight"), ones(h));
            tensors.insert(format!("model.layers.{l}.post_attention_layernorm.weight"), ones(h));
        }
        tensors.insert("model.norm.weight".into(), ones(h));
        SeededWeights { tensors }
    }
}

impl WeightSource for SeededWeights {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>, crate::backend::cpu::llama::LoadError> {
        Ok(self.tensors.get(hf_name).cloned())
    }
}

/// The built-in generative model: a 2-layer Llama with seeded random weights (seed 13) and the
/// byte-level tokenizer. It produces text-shaped noise; it exists to try streaming, sampling and
/// sessions with no download.
pub fn tiny_decoder(spec: &GenerativeSpec, instances: usize) -> Result<LoadedDecoder, LoadError> {
    let path = Path::new(BUILTIN_PATH);
    let config = LlamaConfig::from_json(TINY_DECODER_HF_CONFIG)
        .map_err(|source| LoadError::DecoderCheckpoint { path: path.to_path_buf(), source })?;
    let config = capped(config, spec);
    let weights = SeededWeights::new(&config, 13);
    let decoders = build(path, &config, &weights, spec, instances, false)?;
    let defaults = SamplingParams { max_tokens: 16, ..SamplingParams::default() };
    let tokenizer = Arc::new(ByteTokenizer);
    Ok(LoadedDecoder { decoders, tokenizer, setup: setup(spec, vec![ByteTokenizer::EOS], defaults) })
}

/// Loads every version of a generative model and starts its generative policy.
pub(crate) async fn load_versions(
    source: super::loader::ModelSource,
    defaults: &GenerativeSpec,
    store: Option<Arc<crate::sessions::SessionStore>>,
    backend: &super::BackendSelection,
) -> Result<std::collections::BTreeMap<i64, Arc<super::LoadedModel>>, LoadError> {
    let file = format!("model '{}' config", source.config.name);
    let gspec = GenerativeSpec::from_config(&source.config, &file, defaults)?;
    let mut versions = std::collections::BTreeMap::new();
    for (version, vdir) in source.versions {
        let mut spec = (*source.spec).clone();
        spec.generative = Some(Arc::new(gspec.clone()));
        let spec = Arc::new(spec);
        let neuron_cores = match backend {
            super::BackendSelection::Neuron { cores } if vdir.as_deref().is_some_and(is_neuron_decoder) => Some(*cores),
            _ => None,
        };
        let instances = spec.instance_count.unwrap_or(1);
        let count = spec.instance_count;
        let g = gspec.clone();
        let name = source.config.name.clone();
        let loaded = tokio::task::spawn_blocking(move || match vdir {
            None => tiny_decoder(&g, instances),
            Some(d) if let Some(cores) = neuron_cores => load_neuron(&d, &name, &g, cores, count),
            Some(d) => match detect(&d) {
                Some(src) => load(&src, &g, instances),
                None => {
                    Err(LoadError::Decoder { path: d, reason: "the version folder holds no decoder checkpoint".into() })
                }
            },
        })
        .await
        .map_err(|e| LoadError::Task { reason: e.to_string() })??;
        let setup = GenerativeSetup { version, ..loaded.setup };
        let batching = crate::batching::Batcher::start_generative(
            spec.clone(),
            setup,
            loaded.decoders,
            loaded.tokenizer,
            store.clone(),
        )
        .map_err(|source| LoadError::Batching { source })?;
        let backend =
            if neuron_cores.is_some() { crate::backend::BackendKind::Neuron } else { crate::backend::BackendKind::Cpu };
        let model =
            super::LoadedModel { version, config: source.config.clone(), spec, batching, backend, tokenizer: None };
        versions.insert(version, Arc::new(model));
    }
    Ok(versions)
}
