//! Test tooling: "compiles" an HF decoder folder for the stand-in libnrt — one prefill NEFF per
//! sequence bucket, one decode NEFF per (batch, context) bucket, each a stand-in `llama_decoder`
//! program that takes the weights and the KV cache as inputs — and writes the
//! `neuron_decoder.json` manifest beside the HF files. The NEFFs carry a stand-in program, not
//! Neuron machine code: they do not run on hardware.

use std::path::Path;

use serde_json::json;

use crate::backend::cpu::llama::LlamaConfig;
use neff_format::writer::{DecoderConfig, DecoderMode, Llama3RopeScaling, LlamaDecoderOp, NeffBuilder};

/// The buckets and cache size to compile for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecoderLayout {
    /// Rows of each cache tensor (the last is the scratch slot).
    pub slots: usize,
    /// Positions per slot.
    pub max_len: usize,
    /// Prefill sequence buckets.
    pub prefill: Vec<usize>,
    /// Decode (batch, context) buckets; one must have `context == max_len`.
    pub decode: Vec<(usize, usize)>,
    /// The programs also pick greedy tokens on the device (`next_token_ids` and
    /// `next_token_logprobs` outputs).
    pub device_greedy: bool,
    /// The manifest says the prefill programs start at any position (`false`: only at 0, so the
    /// worker recomputes a session's history on each turn; the stand-in programs could append).
    pub prefill_appends: bool,
    /// Ranks per instance (the manifest's `tensor_parallel`); the stand-in's ranks each compute
    /// the whole model (it has no collective operators), so the weights are not sharded.
    pub tensor_parallel: usize,
}

/// Tensor names of the stand-in programs (AWS's conventions; the manifest repeats them).
const K_INPUT: &str = "layers.{layer}.cache_k.must_alias_input";
const K_OUTPUT: &str = "layers.{layer}.cache_k";
const V_INPUT: &str = "layers.{layer}.cache_v.must_alias_input";
const V_OUTPUT: &str = "layers.{layer}.cache_v";

fn op_config(c: &LlamaConfig, layout: &DecoderLayout) -> DecoderConfig {
    DecoderConfig {
        hidden_size: c.hidden_size as u64,
        intermediate_size: c.intermediate_size as u64,
        num_layers: c.num_hidden_layers as u64,
        num_heads: c.num_attention_heads as u64,
        num_kv_heads: c.num_key_value_heads as u64,
        head_dim: c.head_dim as u64,
        vocab_size: c.vocab_size as u64,
        rms_norm_eps: f64::from(c.rms_norm_eps),
        rope_theta: f64::from(c.rope_theta),
        rope_scaling: c.rope_scaling.as_ref().map(|r| Llama3RopeScaling {
            factor: f64::from(r.factor),
            low_freq_factor: f64::from(r.low_freq_factor),
            high_freq_factor: f64::from(r.high_freq_factor),
            original_max_position_embeddings: r.original_max_position_embeddings as u64,
        }),
        tie_word_embeddings: c.tie_word_embeddings,
        attention_bias: c.attention_bias,
        slots: layout.slots as u64,
        max_len: layout.max_len as u64,
    }
}

fn op(config: DecoderConfig, mode: DecoderMode, context: Option<u64>, greedy: bool) -> LlamaDecoderOp {
    LlamaDecoderOp {
        mode,
        config,
        input_ids: "input_ids".into(),
        position_ids: "position_ids".into(),
        seq_ids: "seq_ids".into(),
        weight: "{name}".into(),
        cache_k_input: K_INPUT.into(),
        cache_k_output: K_OUTPUT.into(),
        cache_v_input: V_INPUT.into(),
        cache_v_output: V_OUTPUT.into(),
        context,
        logits: "logits".into(),
        next_token_ids: greedy.then(|| "next_token_ids".into()),
        next_token_logprobs: greedy.then(|| "next_token_logprobs".into()),
    }
}

fn copy_file(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to).map(|_| ()).map_err(|e| format!("{} → {}: {e}", from.display(), to.display()))
}

/// Writes a compiled decoder version folder `out` from the HF folder `hf`: its files (config,
/// weights, tokenizer, generation config) copied, the NEFFs of `layout` and the manifest.
pub fn write_standin_decoder(hf: &Path, out: &Path, layout: &DecoderLayout) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let entries = std::fs::read_dir(hf).map_err(|e| format!("{}: {e}", hf.display()))?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let wanted = name.ends_with(".safetensors")
            || name.ends_with(".safetensors.index.json")
            || matches!(
                name.as_str(),
                "config.json" | "tokenizer.json" | "tokenizer_config.json" | "generation_config.json"
            );
        if wanted {
            copy_file(&entry.path(), &out.join(&name))?;
        }
    }
    let config = LlamaConfig::from_file(&hf.join("config.json")).map_err(|e| e.to_string())?;
    let cfg = op_config(&config, layout);
    let mut prefill = Vec::new();
    for &s in &layout.prefill {
        let file = format!("prefill_s{s}.neff");
        NeffBuilder::llama_decoder(
            format!("prefill_s{s}"),
            op(cfg.clone(), DecoderMode::Prefill, None, layout.device_greedy),
            s as u64,
        )
        .write_to(out.join(&file))
        .map_err(|e| e.to_string())?;
        prefill.push(json!({ "neff": file, "seq_len": s }));
    }
    let mut decode = Vec::new();
    for &(b, c) in &layout.decode {
        let file = format!("decode_b{b}_c{c}.neff");
        NeffBuilder::llama_decoder(
            format!("decode_b{b}_c{c}"),
            op(cfg.clone(), DecoderMode::Decode, Some(c as u64), layout.device_greedy),
            b as u64,
        )
        .write_to(out.join(&file))
        .map_err(|e| e.to_string())?;
        decode.push(json!({ "neff": file, "batch": b, "context": c }));
    }
    let manifest = json!({
        "format": 1,
        "kv": { "layout": "contiguous", "slots": layout.slots, "max_len": layout.max_len, "dtype": "float32",
                "k_input": K_INPUT, "k_output": K_OUTPUT, "v_input": V_INPUT, "v_output": V_OUTPUT },
        "tensors": { "input_ids": "input_ids", "position_ids": "position_ids", "seq_ids": "seq_ids",
                     "logits": "logits", "weight": "{name}", "weights_dtype": "float32",
                     "next_token_ids": layout.device_greedy.then_some("next_token_ids"),
                     "next_token_logprobs": layout.device_greedy.then_some("next_token_logprobs") },
        "padding_position": -1,
        "prefill_appends": layout.prefill_appends,
        "tensor_parallel": layout.tensor_parallel,
        "prefill": prefill,
        "decode": decode,
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    let path = out.join(crate::backend::neuron::decoder::MANIFEST_FILE);
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}
