//! Reading named tensors from a safetensors checkpoint as f32 (from F32, F16 or BF16).

use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use crate::backend::BackendError;

/// Reads the whole file at `path`, explaining a failure with the path.
pub fn read_file(path: &Path) -> Result<Vec<u8>, BackendError> {
    std::fs::read(path).map_err(|e| BackendError::Load(format!("{}: {e}", path.display())))
}

/// Named tensors of one parsed safetensors file.
pub struct WeightReader<'a> {
    path: &'a Path,
    tensors: SafeTensors<'a>,
    prefix: &'static str,
}

impl<'a> WeightReader<'a> {
    /// Parses the header of `bytes` (the content of `path`). Names are looked up as given and,
    /// failing that, under `prefix` (e.g. `bert.`), so both bare and prefixed exports load.
    pub fn new(path: &'a Path, bytes: &'a [u8], prefix: &'static str) -> Result<Self, BackendError> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| BackendError::Load(format!("{}: not a safetensors file: {e}", path.display())))?;
        Ok(WeightReader { path, tensors, prefix })
    }

    /// Whether a tensor called `name` (or `prefix + name`) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok() || self.tensors.tensor(&format!("{}{name}", self.prefix)).is_ok()
    }

    /// The tensor `name` converted to f32, checked to have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, BackendError> {
        let view = match self.tensors.tensor(name) {
            Ok(v) => v,
            Err(_) => self.tensors.tensor(&format!("{}{name}", self.prefix)).map_err(|_| {
                BackendError::Load(format!(
                    "{}: tensor '{name}' (expected shape {shape:?}) is missing",
                    self.path.display()
                ))
            })?,
        };
        if view.shape() != shape {
            return Err(BackendError::Load(format!(
                "{}: tensor '{name}' has shape {:?}, expected {shape:?}",
                self.path.display(),
                view.shape()
            )));
        }
        let data = view.data();
        let out: Vec<f32> = match view.dtype() {
            Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => {
                return Err(BackendError::Load(format!(
                    "{}: tensor '{name}' has dtype {other:?}; F32, F16 or BF16 expected",
                    self.path.display()
                )));
            }
        };
        let expected: usize = shape.iter().product();
        if out.len() != expected {
            return Err(BackendError::Load(format!(
                "{}: tensor '{name}' holds {} values, expected {expected}",
                self.path.display(),
                out.len()
            )));
        }
        Ok(out)
    }
}
