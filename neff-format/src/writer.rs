//! Writing NEFF files for tests: the real container format plus a program the stand-in libnrt runs.
//!
//! [`NeffBuilder`] writes what a compiler would (a 1024-byte header with correct sizes,
//! `pkg_version` 2, NEFF version 2.0, then a gzip'd tar holding `neff.json` with
//! `metadata.signatures.default.{inputs,outputs}` and `sg00/def.json` with `var` entries typed
//! `input`/`output`), and adds what only the stand-in libnrt reads: `standin/program.json` and
//! one weight blob per parameter. Real hardware cannot run these files; the stand-in cannot run
//! compiler output. The `hash` field is left zero: the real fixture's hash is not the MD5 of the
//! bytes after the header, so neither this reader nor the stand-in checks it. The `uuid` is
//! derived from the payload, so equal content gives an equal uuid.
//!
//! The program format is described in [`crate::program`]; [`NeffBuilder::build`] writes the
//! lowest program version that has every feature the program uses and checks the program
//! against the declared tensors with the same [`Program::check`] the stand-in runs at load.

use std::collections::{BTreeMap, HashSet};
use std::io::Write as _;
use std::path::Path;

use serde_json::{Value, json};

use crate::error::{NeffError, Result};
use crate::header::{HEADER_LEN, NeffHeader};
pub use crate::program::{Activation, DecoderConfig, DecoderMode, Llama3RopeScaling, LlamaDecoderOp, ProgramOp};
use crate::program::{BlobSpec, PROGRAM_PATH, Program, blob_path};
use crate::tensor::{NeffTensor, element_count, shape_bytes};

/// One fully connected layer for [`NeffBuilder::dense_chain`].
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    /// Row-major `[in, out]` weights.
    pub weight: Vec<f32>,
    /// Optional `[out]` bias.
    pub bias: Option<Vec<f32>>,
    /// Input features.
    pub in_features: u64,
    /// Output features.
    pub out_features: u64,
    /// Activation after the layer.
    pub activation: Activation,
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    dtype: String,
    shape: Vec<u64>,
}

#[derive(Debug, Clone)]
struct Blob {
    name: String,
    shape: Vec<u64>,
    data: Vec<f32>,
}

/// Builds a NEFF file: declared tensors, optional stand-in program and weight blobs.
#[derive(Debug, Clone)]
pub struct NeffBuilder {
    name: String,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    blobs: Vec<Blob>,
    ops: Vec<ProgramOp>,
    lnc_size: u32,
}

impl NeffBuilder {
    /// A builder for a NEFF whose header names it `name` (at most 255 bytes are kept).
    pub fn new(name: impl Into<String>) -> NeffBuilder {
        NeffBuilder {
            name: name.into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            blobs: Vec::new(),
            ops: Vec::new(),
            lnc_size: 1,
        }
    }

    /// Declares an input tensor (`dtype` as the compiler spells it, e.g. `float32`).
    pub fn input(mut self, name: impl Into<String>, dtype: &str, shape: &[u64]) -> NeffBuilder {
        let spec = TensorSpec { name: name.into(), dtype: dtype.into(), shape: shape.to_vec() };
        self.inputs.push(spec);
        self
    }

    /// Declares an output tensor.
    pub fn output(mut self, name: impl Into<String>, dtype: &str, shape: &[u64]) -> NeffBuilder {
        let spec = TensorSpec { name: name.into(), dtype: dtype.into(), shape: shape.to_vec() };
        self.outputs.push(spec);
        self
    }

    /// Adds a weight blob of `f32` values with the given shape.
    pub fn blob(mut self, name: impl Into<String>, shape: &[u64], data: Vec<f32>) -> NeffBuilder {
        self.blobs.push(Blob { name: name.into(), shape: shape.to_vec(), data });
        self
    }

    /// Appends a program op.
    pub fn op(mut self, op: ProgramOp) -> NeffBuilder {
        self.ops.push(op);
        self
    }

    /// Sets the header's `lnc_size` (default 1).
    pub fn lnc_size(mut self, lnc_size: u32) -> NeffBuilder {
        self.lnc_size = lnc_size;
        self
    }

    /// A NEFF running `layers` in sequence on `float32` input `input` of shape
    /// `[batch, layers[0].in_features]`, producing `output` of shape `[batch, last.out_features]`.
    /// `linear` is one layer 64→16 (no activation); `mlp` is 256→1024 (gelu) →1024 (gelu) →256.
    pub fn dense_chain(
        name: impl Into<String>,
        batch: u64,
        input: &str,
        output: &str,
        layers: &[DenseLayer],
    ) -> NeffBuilder {
        let first = layers.first().map_or(0, |l| l.in_features);
        let last = layers.last().map_or(0, |l| l.out_features);
        let mut builder =
            NeffBuilder::new(name).input(input, "float32", &[batch, first]).output(output, "float32", &[batch, last]);
        let mut current = input.to_string();
        for (i, layer) in layers.iter().enumerate() {
            let weight = format!("w{i}");
            builder = builder.blob(&weight, &[layer.in_features, layer.out_features], layer.weight.clone());
            let bias = layer.bias.as_ref().map(|b| {
                let name = format!("b{i}");
                (name, b.clone())
            });
            if let Some((bias_name, data)) = &bias {
                builder = builder.blob(bias_name, &[layer.out_features], data.clone());
            }
            let next = if i + 1 == layers.len() { output.to_string() } else { format!("h{i}") };
            builder = builder.op(ProgramOp::Dense {
                input: current,
                weight,
                bias: bias.map(|(name, _)| name),
                activation: layer.activation,
                output: next.clone(),
            });
            current = next;
        }
        builder
    }

    /// A NEFF running `op` (a version 3 program) for a bucket of `rows` (prefill: `S` tokens,
    /// decode: `B` sequences), declaring every tensor of [`LlamaDecoderOp::tensors`]: `int32`
    /// ids, `float32` weights, each cache as an input and an output, logits (and next ids).
    pub fn llama_decoder(name: impl Into<String>, op: LlamaDecoderOp, rows: u64) -> NeffBuilder {
        let (inputs, outputs) = op.tensors(rows);
        let mut builder = NeffBuilder::new(name);
        for t in inputs {
            builder = builder.input(t.name, t.dtype.as_deref().unwrap_or("float32"), t.shape.as_deref().unwrap_or(&[]));
        }
        for t in outputs {
            builder =
                builder.output(t.name, t.dtype.as_deref().unwrap_or("float32"), t.shape.as_deref().unwrap_or(&[]));
        }
        builder.op(ProgramOp::LlamaDecoder(op))
    }

    /// The NEFF file's bytes.
    pub fn build(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut files: Vec<(String, Vec<u8>)> = vec![
            ("neff.json".into(), to_json_bytes(&self.neff_json())),
            ("sg00/def.json".into(), to_json_bytes(&self.def_json())),
        ];
        if !self.ops.is_empty() {
            files.push((PROGRAM_PATH.into(), self.program().to_json()));
            for blob in &self.blobs {
                let bytes = blob.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                files.push((blob_path(&blob.name), bytes));
            }
        }
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (p.as_str(), b.as_slice())).collect();
        assemble(&self.name, self.lnc_size, &refs).map_err(|e| self.invalid(e.to_string()))
    }

    /// Writes the NEFF to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.build()?;
        let file = path.as_ref().display().to_string();
        std::fs::write(path, bytes).map_err(|source| NeffError::Io { file, source })
    }

    fn invalid(&self, reason: String) -> NeffError {
        NeffError::InvalidBuild { name: self.name.clone(), reason }
    }

    fn neff_json(&self) -> Value {
        let signature = |list: &[TensorSpec]| -> Value {
            let map: serde_json::Map<String, Value> = list
                .iter()
                .enumerate()
                .map(|(id, t)| (t.name.clone(), json!({"id": id, "dtype": t.dtype, "shape": t.shape})))
                .collect();
            Value::Object(map)
        };
        json!({
            "metadata": {
                "signatures": {
                    "default": { "inputs": signature(&self.inputs), "outputs": signature(&self.outputs) }
                }
            }
        })
    }

    fn def_json(&self) -> Value {
        let mut vars = serde_json::Map::new();
        let io = self.inputs.iter().map(|t| (t, "input")).chain(self.outputs.iter().map(|t| (t, "output")));
        for (var_id, (tensor, kind)) in io.enumerate() {
            let size = shape_bytes(&tensor.dtype, &tensor.shape).unwrap_or(0);
            vars.insert(tensor.name.clone(), json!({"ops": [], "size": size, "type": kind, "var_id": var_id + 1}));
        }
        json!({ "name": "sg00", "var": vars })
    }

    fn program(&self) -> Program {
        let blobs: BTreeMap<String, BlobSpec> = self
            .blobs
            .iter()
            .map(|b| (b.name.clone(), BlobSpec { file: blob_path(&b.name), shape: b.shape.clone() }))
            .collect();
        Program { version: self.program_version(), blobs, ops: self.ops.clone() }
    }

    fn declared(list: &[TensorSpec]) -> Vec<NeffTensor> {
        list.iter()
            .map(|t| NeffTensor {
                name: t.name.clone(),
                dtype: Some(t.dtype.clone()),
                shape: Some(t.shape.clone()),
                size_bytes: None,
            })
            .collect()
    }

    /// The lowest program version with every feature used: version 3 for a `llama_decoder` op,
    /// version 2 for the other version 2 ops or for `int32` tensors, else 1.
    pub fn program_version(&self) -> u64 {
        let tensors = NeffBuilder::declared(&self.inputs).into_iter().chain(NeffBuilder::declared(&self.outputs));
        Program::min_version(&self.ops, &tensors.collect::<Vec<_>>())
    }

    /// Checks names, dtypes, blob sizes and (with a program) what the stand-in checks at load:
    /// every buffer length follows from the inputs and every output gets exactly its size.
    fn validate(&self) -> Result<()> {
        let mut seen = HashSet::new();
        for t in self.inputs.iter().chain(&self.outputs) {
            if t.name.is_empty() || !seen.insert(t.name.as_str()) {
                return Err(self.invalid(format!("tensor name '{}' is empty or repeated", t.name)));
            }
            if shape_bytes(&t.dtype, &t.shape).is_none() {
                return Err(self.invalid(format!("tensor '{}': unknown dtype '{}' or size overflow", t.name, t.dtype)));
            }
        }
        let mut names = HashSet::new();
        for blob in &self.blobs {
            let valid_name =
                !blob.name.is_empty() && blob.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid_name || !names.insert(blob.name.as_str()) {
                return Err(self.invalid(format!("blob name '{}' is invalid or repeated", blob.name)));
            }
            if element_count(&blob.shape) != Some(blob.data.len() as u64) {
                return Err(self.invalid(format!(
                    "blob '{}': shape {:?} does not match {} values",
                    blob.name,
                    blob.shape,
                    blob.data.len()
                )));
            }
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        let (inputs, outputs) = (NeffBuilder::declared(&self.inputs), NeffBuilder::declared(&self.outputs));
        self.program().check(&inputs, &outputs).map_err(|e| self.invalid(e.to_string()))
    }
}

/// Writes a NEFF container around arbitrary archive files: header (pkg_version 2, NEFF 2.0,
/// correct sizes, the given name and lnc_size) then a gzip'd tar of `files` in order.
/// Useful on its own for tests that need malformed archives.
pub fn assemble(name: &str, lnc_size: u32, files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    for (path, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, *bytes)?;
    }
    let payload = tar.into_inner()?.finish()?;
    let header = NeffHeader {
        pkg_version: 2,
        header_size: HEADER_LEN as u64,
        data_size: payload.len() as u64,
        neff_version_major: 2,
        neff_version_minor: 0,
        build_version: String::new(),
        num_tpb: 1,
        hash: [0; 32],
        uuid: content_uuid(&payload),
        name: name.to_string(),
        requested_tpb_count: 1,
        feature_bits: 0,
        lnc_size,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.write_all(&header.encode())?;
    out.write_all(&payload)?;
    Ok(out)
}

fn to_json_bytes(value: &Value) -> Vec<u8> {
    // Serialising a `Value` into memory cannot fail.
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

/// 16 bytes from two FNV-1a passes over the payload (not a cryptographic hash).
fn content_uuid(payload: &[u8]) -> [u8; 16] {
    let fnv = |seed: u64| payload.iter().fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_le_bytes());
    out[8..].copy_from_slice(&fnv(0x8422_2325_cbf2_9ce4).to_le_bytes());
    out
}
