//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), as an HF `tokenizer.json` value that
//! the `tokenizers` crate loads.
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE: the vocabulary is already spelled in
//! GPT-2's byte alphabet, merges are given). The pre-tokenizer follows `tokenizer.ggml.pre` as
//! llama.cpp does: `smollm` splits digits one by one before GPT-2's regex (as SmolLM2's own
//! tokenizer.json), `llama-bpe`/`llama3` and `qwen2` use their split regexes, others GPT-2's.
//! Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens.

use serde_json::{Value, json};

use super::GgufError;
use super::reader::{GgufFile, GgufValue};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn strings<'a>(f: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, GgufError> {
    let bad = || GgufError::Metadata { key: key.to_string(), expected: "an array of strings" };
    f.get(key).and_then(GgufValue::as_array).ok_or_else(bad)?.iter().map(|v| v.as_str().ok_or_else(bad)).collect()
}

fn pre_tokenizer(pre: &str) -> Value {
    let byte_level =
        |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]})
    };
    match pre {
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level(true),
        ]}),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        _ => byte_level(true),
    }
}

/// The `tokenizer.json` value for the tokenizer in `f`'s metadata.
pub fn tokenizer_json(f: &GgufFile) -> Result<Value, GgufError> {
    let model = f.get("tokenizer.ggml.model").and_then(GgufValue::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(GgufError::Unsupported {
            what: format!("tokenizer.ggml.model = '{model}' (supported: gpt2 byte-level BPE)"),
        });
    }
    let tokens = strings(f, "tokenizer.ggml.tokens")?;
    let merges = strings(f, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = f
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert((*tok).to_string(), json!(id));
        let ty = types.get(id).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": ty == 3}));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(GgufError::Malformed { what: format!("merge '{m}' is not two tokens"), at: 0 }),
        })
        .collect::<Result<_, _>>()?;
    let pre = f.get("tokenizer.ggml.pre").and_then(GgufValue::as_str).unwrap_or("default");
    let add_bos = f.get("tokenizer.ggml.add_bos_token").and_then(GgufValue::as_bool).unwrap_or(false);
    let bos = f.get("tokenizer.ggml.bos_token_id").and_then(GgufValue::as_u64);
    let post = match (add_bos, bos.and_then(|b| tokens.get(b as usize).map(|t| (b, *t)))) {
        (true, Some((id, text))) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {text: {"id": text, "ids": [id], "tokens": [text]}},
        }),
        _ => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true}),
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre),
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}
