//! Where a decoder's weights come from: the [`WeightSource`] trait (HF tensor names) and its
//! safetensors implementation (one file or a sharded index; F32, F16 and BF16 converted to f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::LoadError;

/// One weight tensor as a source hands it to the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Weight {
    /// Row-major f32 values of the given shape.
    Dense {
        /// `shape.iter().product()` values, row-major.
        data: Vec<f32>,
        /// The tensor's shape (a matrix is `[out_features, in_features]`, as HF stores it).
        shape: Vec<usize>,
    },
    /// A `[n, k]` matrix kept in a quantized block format (GGUF).
    Quant(crate::backend::cpu::quant::QMatrix),
}

impl Weight {
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Weight::Dense { shape, .. } => shape,
            Weight::Quant(q) => q.shape(),
        }
    }
}

/// A provider of weights by HF name (`model.layers.0.self_attn.q_proj.weight`, ...).
pub trait WeightSource {
    /// The tensor named `hf_name`, or `None` when the source does not hold it (an optional bias, a tied
    /// `lm_head.weight`).
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>, LoadError>;
}

/// One safetensors file, read into memory, with its header parsed.
struct Shard {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// Weights of an HF folder: `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
pub struct SafetensorsSource {
    shards: Vec<Shard>,
    /// Tensor name → index in `shards`.
    index: HashMap<String, usize>,
}

fn read(path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|e| LoadError::Io { path: path.to_path_buf(), message: e.to_string() })
}

impl SafetensorsSource {
    /// Opens the weights of the HF folder `dir` (single file or sharded index).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = String::from_utf8(read(&index_path)?)
                .map_err(|e| LoadError::Json { path: index_path.clone(), message: e.to_string() })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::Json { path: index_path.clone(), message: e.to_string() })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| LoadError::Json {
                path: index_path.clone(),
                message: "no 'weight_map' object".to_string(),
            })?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            let mut files = Vec::with_capacity(names.len());
            for name in names {
                // Shard names are plain file names beside the index; refuse anything that walks out.
                if name.contains('/') || name.contains('\\') || name == ".." {
                    return Err(LoadError::Json {
                        path: index_path.clone(),
                        message: format!("shard '{name}' is not a file name in the model folder"),
                    });
                }
                files.push(dir.join(name));
            }
            files
        } else {
            return Err(LoadError::Io {
                path: single,
                message: "neither model.safetensors nor model.safetensors.index.json is in the folder".to_string(),
            });
        };
        Self::from_files(&files)
    }

    /// Opens the given safetensors files (every tensor name must be unique across them).
    pub fn from_files(files: &[PathBuf]) -> Result<Self, LoadError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let bytes = read(path)?;
            let parsed = SafeTensors::deserialize(&bytes)
                .map_err(|e| LoadError::Safetensors { path: path.clone(), message: e.to_string() })?;
            for name in parsed.names() {
                index.insert(name.to_string(), i);
            }
            shards.push(Shard { path: path.clone(), bytes });
        }
        Ok(SafetensorsSource { shards, index })
    }

    /// Names of every tensor in the source.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }
}

/// Converts little-endian F32/F16/BF16 bytes to f32 values.
pub fn to_f32(name: &str, dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, LoadError> {
    let out = match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => {
            return Err(LoadError::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") });
        }
    };
    Ok(out)
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, hf_name: &str) -> Result<Option<Weight>, LoadError> {
        let Some(&i) = self.index.get(hf_name) else {
            return Ok(None);
        };
        let shard = &self.shards[i];
        let parsed = SafeTensors::deserialize(&shard.bytes)
            .map_err(|e| LoadError::Safetensors { path: shard.path.clone(), message: e.to_string() })?;
        let view = parsed
            .tensor(hf_name)
            .map_err(|e| LoadError::Safetensors { path: shard.path.clone(), message: e.to_string() })?;
        let data = to_f32(hf_name, view.dtype(), view.data())?;
        Ok(Some(Weight::Dense { data, shape: view.shape().to_vec() }))
    }
}
