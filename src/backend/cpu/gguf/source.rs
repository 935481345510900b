//! [`GgufSource`]: a GGUF model's weights by HF tensor name, its HF-style configuration and chat
//! template.
//!
//! llama.cpp's converter reorders the rows of `attn_q`/`attn_k` of `llama`-architecture models
//! (each head's two rotary halves interleaved, for GGML's adjacent-pair RoPE). The rows are put back
//! here — whole rows, so quantized blocks move untouched — exactly as transformers' GGUF loader
//! does (`reverse_permute_weights`), and the model runs HF's rotate-half RoPE unchanged.

use std::path::Path;

use half::{bf16, f16};
use serde_json::{Value, json};

use super::GgufError;
use super::names::gguf_name;
use super::reader::{GgufFile, GgufValue, TensorInfo};
use crate::backend::cpu::quant::{QFormat, QMatrix};

/// A tensor read from a GGUF file.
#[derive(Debug, Clone)]
pub enum GgufTensor {
    /// f32 values, row-major, HF shape (`[n, k]` for a matrix).
    Dense {
        /// Values.
        data: Vec<f32>,
        /// HF shape (outermost first).
        shape: Vec<usize>,
    },
    /// A matrix kept in its block format.
    Quant(QMatrix),
}

/// GGML type ids of unquantized element types.
const F32: u32 = 0;
const F16: u32 = 1;
const BF16: u32 = 30;

/// A GGUF model file opened for loading.
#[derive(Debug)]
pub struct GgufSource {
    file: GgufFile,
    arch: String,
}

impl GgufSource {
    /// Reads and parses `path`.
    pub fn open(path: &Path) -> Result<GgufSource, GgufError> {
        GgufSource::new(GgufFile::open(path)?)
    }

    /// Wraps a parsed file; its architecture must be a Llama-family one (`llama`, `mistral`,
    /// `qwen2`).
    pub fn new(file: GgufFile) -> Result<GgufSource, GgufError> {
        let arch = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or(GgufError::Metadata { key: "general.architecture".into(), expected: "a string" })?
            .to_string();
        if !["llama", "mistral", "qwen2"].contains(&arch.as_str()) {
            return Err(GgufError::Unsupported {
                what: format!("architecture '{arch}' (supported: llama, mistral, qwen2)"),
            });
        }
        Ok(GgufSource { file, arch })
    }

    /// The parsed container.
    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// `general.architecture`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    fn req_u64(&self, k: &str) -> Result<u64, GgufError> {
        let key = self.key(k);
        self.file.get(&key).and_then(GgufValue::as_u64).ok_or(GgufError::Metadata { key, expected: "an integer" })
    }

    fn opt_f64(&self, k: &str) -> Option<f64> {
        self.file.get(&self.key(k)).and_then(GgufValue::as_f64)
    }

    /// The vocabulary size (`tokenizer.ggml.tokens`, else `<arch>.vocab_size`).
    pub fn vocab_size(&self) -> Result<u64, GgufError> {
        if let Some(t) = self.file.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array) {
            return Ok(t.len() as u64);
        }
        self.req_u64("vocab_size")
    }

    /// The model's hyper-parameters as an HF `config.json` value (what a Llama loader reads).
    pub fn config_json(&self) -> Result<Value, GgufError> {
        let hidden = self.req_u64("embedding_length")?;
        let heads = self.req_u64("attention.head_count")?;
        let kv_heads = self.file.get(&self.key("attention.head_count_kv")).and_then(GgufValue::as_u64).unwrap_or(heads);
        let mut c = json!({
            "model_type": if self.arch == "qwen2" { "qwen2" } else { "llama" },
            "hidden_size": hidden,
            "intermediate_size": self.req_u64("feed_forward_length")?,
            "num_hidden_layers": self.req_u64("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": self.opt_f64("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            "rope_theta": self.opt_f64("rope.freq_base").unwrap_or(10_000.0),
            "max_position_embeddings": self.req_u64("context_length")?,
            "tie_word_embeddings": self.file.tensor_info("output.weight").is_none(),
            "vocab_size": self.vocab_size()?,
            "attention_bias": self.file.tensor_info("blk.0.attn_q.bias").is_some(),
        });
        if let Some(hd) = self.file.get(&self.key("attention.key_length")).and_then(GgufValue::as_u64) {
            c["head_dim"] = json!(hd);
        }
        let tok = |k: &str| self.file.get(&format!("tokenizer.ggml.{k}")).and_then(GgufValue::as_u64);
        if let Some(b) = tok("bos_token_id") {
            c["bos_token_id"] = json!(b);
        }
        if let Some(e) = tok("eos_token_id") {
            c["eos_token_id"] = json!(e);
        }
        Ok(c)
    }

    /// `tokenizer.chat_template`, if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.file.get("tokenizer.chat_template").and_then(GgufValue::as_str)
    }

    /// The token text of id `id` (for the template's bos/eos strings).
    pub fn token_text(&self, id: u64) -> Option<&str> {
        let toks = self.file.get("tokenizer.ggml.tokens")?.as_array()?;
        toks.get(usize::try_from(id).ok()?)?.as_str()
    }

    /// The tensor with HF name `hf_name`, or `None` when the file does not hold it.
    pub fn gguf_tensor(&self, hf_name: &str) -> Result<Option<GgufTensor>, GgufError> {
        let Some(g) = gguf_name(hf_name) else { return Ok(None) };
        let Some(info) = self.file.tensor_info(&g) else { return Ok(None) };
        let t = self.read(info)?;
        // Undo the converter's Q/K row interleaving (llama architecture only).
        let heads = match g.rsplit('.').nth(1) {
            Some("attn_q") if self.arch != "qwen2" => Some(self.req_u64("attention.head_count")?),
            Some("attn_k") if self.arch != "qwen2" => Some(
                self.file
                    .get(&self.key("attention.head_count_kv"))
                    .and_then(GgufValue::as_u64)
                    .map_or_else(|| self.req_u64("attention.head_count"), Ok)?,
            ),
            _ => None,
        };
        match heads {
            Some(h) => Ok(Some(unpermute(t, h as usize, &g)?)),
            None => Ok(Some(t)),
        }
    }

    fn read(&self, info: &TensorInfo) -> Result<GgufTensor, GgufError> {
        let bad = |what: String| GgufError::Malformed { what, at: 0 };
        let dims: Vec<usize> = info
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| bad(format!("tensor '{}': dimension {d}", info.name))))
            .collect::<Result<_, _>>()?;
        let elems = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor '{}': shape {dims:?} overflows", info.name)))?;
        let shape: Vec<usize> = dims.iter().rev().copied().collect();
        let (k, n) = match dims.len() {
            1 => (dims[0], 1),
            2 => (dims[0], dims[1]),
            _ => return Err(GgufError::Unsupported { what: format!("tensor '{}' of shape {dims:?}", info.name) }),
        };
        let plain = |width: usize, conv: fn(&[u8]) -> f32| -> Result<GgufTensor, GgufError> {
            let size = elems.checked_mul(width).ok_or_else(|| bad(format!("tensor '{}' too large", info.name)))?;
            let bytes = self.file.tensor_bytes(info, size)?;
            Ok(GgufTensor::Dense { data: bytes.chunks_exact(width).map(conv).collect(), shape: shape.clone() })
        };
        match info.ggml_type {
            F32 => plain(4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            BF16 => plain(2, |b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            F16 if dims.len() == 1 => plain(2, |b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
            t => {
                let f = QFormat::from_ggml_type(t).ok_or_else(|| GgufError::Unsupported {
                    what: format!(
                        "tensor '{}' has GGML type {t} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
                        info.name
                    ),
                })?;
                let size = f
                    .tensor_bytes(n, k)
                    .ok_or_else(|| bad(format!("tensor '{}': {f:?} shape {dims:?} is not whole blocks", info.name)))?;
                let bytes = self.file.tensor_bytes(info, size)?;
                let q = QMatrix::from_gguf_bytes(f, n, k, bytes)
                    .map_err(|e| bad(format!("tensor '{}': {e}", info.name)))?;
                if dims.len() == 1 {
                    Ok(GgufTensor::Dense { data: q.dequantize(), shape })
                } else {
                    Ok(GgufTensor::Quant(q))
                }
            }
        }
    }
}

/// HF row order of a converter-permuted Q/K weight with `heads` heads of `rows / heads` rows:
/// HF row `h·hd + s·hd/2 + i` is GGUF row `h·hd + 2i + s`.
fn unpermute_order(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return None;
    }
    let hd = rows / heads;
    let half = hd / 2;
    Some((0..rows).map(|r| (r / hd) * hd + 2 * (r % hd % half) + (r % hd) / half).collect())
}

fn unpermute(t: GgufTensor, heads: usize, name: &str) -> Result<GgufTensor, GgufError> {
    let rows = match &t {
        GgufTensor::Dense { shape, .. } => shape.first().copied().unwrap_or(0),
        GgufTensor::Quant(q) => q.n(),
    };
    let order = unpermute_order(rows, heads).ok_or_else(|| GgufError::Malformed {
        what: format!("tensor '{name}' has {rows} rows, not a whole number of {heads} rotary heads"),
        at: 0,
    })?;
    Ok(match t {
        GgufTensor::Quant(q) => GgufTensor::Quant(q.select_rows(&order)),
        GgufTensor::Dense { data, shape } => {
            let width = data.len() / rows.max(1);
            let data = order.iter().flat_map(|&r| data[r * width..(r + 1) * width].iter().copied()).collect();
            GgufTensor::Dense { data, shape }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::unpermute_order;

    #[test]
    fn unpermute_inverts_the_converters_permutation() {
        // llama.cpp's permute: reshape(heads, 2, hd/2, ...).swapaxes(1, 2): GGUF row h·hd + 2i + s
        // holds HF row h·hd + s·hd/2 + i.
        let (heads, hd) = (3, 8);
        let hf: Vec<usize> = (0..heads * hd).collect();
        let mut gguf = vec![0; heads * hd];
        for h in 0..heads {
            for s in 0..2 {
                for i in 0..hd / 2 {
                    gguf[h * hd + 2 * i + s] = hf[h * hd + s * hd / 2 + i];
                }
            }
        }
        let order = unpermute_order(heads * hd, heads).unwrap();
        let back: Vec<usize> = order.iter().map(|&r| gguf[r]).collect();
        assert_eq!(back, hf);
        assert_eq!(unpermute_order(10, 3), None);
    }
}
