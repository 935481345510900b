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
//! # The stand-in program format (`standin/program.json`, versions 1 and 2)
//!
//! ```json
//! {
//!   "version": 1,
//!   "blobs": { "w0": { "file": "standin/w0.bin", "shape": [64, 16] } },
//!   "ops": [
//!     { "op": "dense", "input": "INPUT0", "weight": "w0", "bias": "b0",
//!       "activation": "gelu", "output": "OUTPUT0" }
//!   ]
//! }
//! ```
//!
//! - Values are named host buffers of `f32`. Before the first op, every NEFF input is a buffer
//!   (its tensor bytes read as little-endian `f32`). Each op writes a new buffer named `output`;
//!   after the last op, every NEFF output is written from the buffer of the same name. Ops run in
//!   order.
//! - A blob is a file in the archive holding row-major little-endian `f32` values; `shape` is
//!   its shape and `product(shape)` its element count. Blob names use `[A-Za-z0-9_.-]`.
//! - `dense { input, weight, bias?, activation, output }`: `weight` is a blob of shape
//!   `[in, out]`, `bias` an optional blob of shape `[out]`; the input buffer is viewed as
//!   `[rows, in]` and `output = act(input · weight + bias)` of shape `[rows, out]`.
//!   `activation` is `none`, `relu`, `gelu` (erf form, `x/2 · (1 + erf(x/√2))`), `tanh` or
//!   (version 2) `sigmoid` (`1 / (1 + exp(−x))`).
//! - `add { a, b, output }`: elementwise sum of two buffers of equal length.
//! - `copy { input, output }`: a copy of a buffer.
//!
//! Version 2 adds, for stateful models:
//! - `mul { a, b, output }`, `sub { a, b, output }`: elementwise product and difference.
//! - `activation { input, function, output }`: one of the activations above, elementwise.
//! - `select { cond, a, b, output }`: `cond` holds one value per row (e.g. a `[rows, 1]` READY
//!   control); `a` and `b` have equal lengths, split into that many rows; row `r` of `output` is
//!   row `r` of `a` where `cond[r] != 0`, else row `r` of `b`. This is how a state update is
//!   gated: rows whose slot is not in the batch keep their state input.
//! - `int32` NEFF inputs and outputs: converted to `f32` when read and back (rounded to nearest,
//!   saturating) when written. Exact for |v| < 2^24; larger values lose low bits, so wrapping
//!   32-bit arithmetic is not reproduced there.
//!
//! [`NeffBuilder::build`] writes the lowest version that has every feature the program uses
//! (so version 1 programs are unchanged); the stand-in refuses a program that uses a feature
//! newer than its declared version, or a version it does not know, with
//! `NRT_UNSUPPORTED_NEFF_VERSION`, so an older stand-in never runs a newer program wrongly.
//!
//! Shapes are fixed per NEFF (one NEFF per batch-size bucket, as on real hardware); the
//! stand-in checks at load time that every buffer length follows from the input sizes and that
//! every output gets exactly its declared size.
//!
//! Implicit state is not a program feature: a stateful model's NEFF takes its state as an
//! ordinary input and writes the next state as an ordinary output, and the worker keeps the two
//! device tensors (see `backend::neuron::stateful`). The top-level `"state"` key stays reserved
//! (refused at load).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{Value, json};

use super::{HEADER_LEN, NeffError, NeffHeader, Result};

/// Newest version of the stand-in program format this builder writes (each program gets the
/// lowest version that has the features it uses).
pub const PROGRAM_VERSION: u32 = 2;

/// Path of the stand-in program inside the archive.
pub const PROGRAM_PATH: &str = "standin/program.json";

/// The activation applied after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// GELU, erf form: `x/2 · (1 + erf(x/√2))`.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic `1 / (1 + exp(−x))` (program version 2).
    Sigmoid,
}

/// One step of a stand-in program (see the module documentation for semantics).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ProgramOp {
    /// `output = activation(input · weight + bias)`.
    Dense {
        /// Buffer read, viewed as `[rows, in]`.
        input: String,
        /// Blob of shape `[in, out]`.
        weight: String,
        /// Optional blob of shape `[out]`.
        #[serde(skip_serializing_if = "Option::is_none")]
        bias: Option<String>,
        /// Activation applied to every element.
        activation: Activation,
        /// Buffer written, `[rows, out]`.
        output: String,
    },
    /// `output = a + b`, elementwise.
    Add {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = input`.
    Copy {
        /// Buffer read.
        input: String,
        /// Buffer written.
        output: String,
    },
    /// `output = a * b`, elementwise (program version 2).
    Mul {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = a - b`, elementwise (program version 2).
    Sub {
        /// First operand.
        a: String,
        /// Second operand (same length).
        b: String,
        /// Buffer written.
        output: String,
    },
    /// `output = function(input)`, elementwise (program version 2).
    Activation {
        /// Buffer read.
        input: String,
        /// Function applied to every element.
        function: Activation,
        /// Buffer written.
        output: String,
    },
    /// Row `r` of `output` is row `r` of `a` where `cond[r] != 0`, else row `r` of `b`; `cond`
    /// holds one value per row (program version 2).
    Select {
        /// One value per row.
        cond: String,
        /// Rows taken where `cond` is non-zero.
        a: String,
        /// Rows taken where `cond` is zero (same length as `a`).
        b: String,
        /// Buffer written.
        output: String,
    },
}

impl ProgramOp {
    /// The lowest program format version that has this op (with its activation).
    pub fn min_version(&self) -> u32 {
        match self {
            ProgramOp::Dense { activation: Activation::Sigmoid, .. } => 2,
            ProgramOp::Dense { .. } | ProgramOp::Add { .. } | ProgramOp::Copy { .. } => 1,
            ProgramOp::Mul { .. } | ProgramOp::Sub { .. } | ProgramOp::Activation { .. } | ProgramOp::Select { .. } => {
                2
            }
        }
    }
}

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

    /// The NEFF file's bytes.
    pub fn build(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut files: Vec<(String, Vec<u8>)> = vec![
            ("neff.json".into(), to_json_bytes(&self.neff_json())),
            ("sg00/def.json".into(), to_json_bytes(&self.def_json())),
        ];
        if !self.ops.is_empty() {
            files.push((PROGRAM_PATH.into(), to_json_bytes(&self.program_json())));
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
            let size = tensor_bytes(tensor).unwrap_or(0);
            vars.insert(tensor.name.clone(), json!({"ops": [], "size": size, "type": kind, "var_id": var_id + 1}));
        }
        json!({ "name": "sg00", "var": vars })
    }

    fn program_json(&self) -> Value {
        let blobs: serde_json::Map<String, Value> = self
            .blobs
            .iter()
            .map(|b| (b.name.clone(), json!({"file": blob_path(&b.name), "shape": b.shape})))
            .collect();
        json!({ "version": self.program_version(), "blobs": blobs, "ops": self.ops })
    }

    /// The lowest program version with every feature used: version 2 for its ops or for `int32`
    /// tensors, else 1.
    pub fn program_version(&self) -> u32 {
        let int32 = self.inputs.iter().chain(&self.outputs).any(|t| t.dtype == "int32");
        let ops = self.ops.iter().map(ProgramOp::min_version).max().unwrap_or(1);
        ops.max(if int32 { 2 } else { 1 })
    }

    /// Checks names, dtypes, blob sizes and (with a program) that every buffer length follows
    /// from the inputs and every output gets exactly its declared length.
    fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for t in self.inputs.iter().chain(&self.outputs) {
            if t.name.is_empty() || !seen.insert(t.name.as_str()) {
                return Err(self.invalid(format!("tensor name '{}' is empty or repeated", t.name)));
            }
            if tensor_bytes(t).is_none() {
                return Err(self.invalid(format!("tensor '{}': unknown dtype '{}' or size overflow", t.name, t.dtype)));
            }
        }
        let mut blobs: HashMap<&str, &Blob> = HashMap::new();
        for blob in &self.blobs {
            let valid_name =
                !blob.name.is_empty() && blob.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid_name || blobs.insert(&blob.name, blob).is_some() {
                return Err(self.invalid(format!("blob name '{}' is invalid or repeated", blob.name)));
            }
            if product(&blob.shape) != Some(blob.data.len() as u64) {
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
        let mut lengths: HashMap<&str, u64> = HashMap::new();
        for t in &self.inputs {
            if t.dtype != "float32" && t.dtype != "int32" {
                return Err(self.invalid(format!("input '{}' must be float32 or int32 to run a program", t.name)));
            }
            lengths.insert(&t.name, product(&t.shape).unwrap_or(0));
        }
        for op in &self.ops {
            let (name, len) = self.op_length(op, &lengths, &blobs)?;
            lengths.insert(name, len);
        }
        for t in &self.outputs {
            let want = product(&t.shape).unwrap_or(0);
            match lengths.get(t.name.as_str()) {
                Some(&have) if have == want && (t.dtype == "float32" || t.dtype == "int32") => {}
                Some(&have) => {
                    return Err(self.invalid(format!(
                        "output '{}' ({}, {want} elements) gets {have} float32 values",
                        t.name, t.dtype
                    )));
                }
                None => return Err(self.invalid(format!("no op writes output '{}'", t.name))),
            }
        }
        Ok(())
    }

    fn op_length<'a>(
        &self,
        op: &'a ProgramOp,
        lengths: &HashMap<&str, u64>,
        blobs: &HashMap<&str, &Blob>,
    ) -> Result<(&'a str, u64)> {
        let buffer = |name: &str| {
            lengths.get(name).copied().ok_or_else(|| self.invalid(format!("op reads unknown buffer '{name}'")))
        };
        match op {
            ProgramOp::Dense { input, weight, bias, output, .. } => {
                let w = blobs
                    .get(weight.as_str())
                    .ok_or_else(|| self.invalid(format!("dense: unknown weight blob '{weight}'")))?;
                let [fan_in, fan_out] = w.shape[..] else {
                    return Err(self.invalid(format!("dense: weight '{weight}' is not 2-D")));
                };
                if let Some(bias) = bias {
                    let b = blobs
                        .get(bias.as_str())
                        .ok_or_else(|| self.invalid(format!("dense: unknown bias blob '{bias}'")))?;
                    if b.data.len() as u64 != fan_out {
                        return Err(self.invalid(format!("dense: bias '{bias}' is not [{fan_out}]")));
                    }
                }
                let len = buffer(input)?;
                if fan_in == 0 || len % fan_in != 0 {
                    return Err(self.invalid(format!("dense: '{input}' ({len} values) is not [rows, {fan_in}]")));
                }
                Ok((output, len / fan_in * fan_out))
            }
            ProgramOp::Add { a, b, output } | ProgramOp::Mul { a, b, output } | ProgramOp::Sub { a, b, output } => {
                let (la, lb) = (buffer(a)?, buffer(b)?);
                if la != lb {
                    return Err(self.invalid(format!("elementwise op: '{a}' has {la} values, '{b}' has {lb}")));
                }
                Ok((output, la))
            }
            ProgramOp::Copy { input, output } | ProgramOp::Activation { input, output, .. } => {
                Ok((output, buffer(input)?))
            }
            ProgramOp::Select { cond, a, b, output } => {
                let (rows, la, lb) = (buffer(cond)?, buffer(a)?, buffer(b)?);
                if la != lb || rows == 0 || la % rows != 0 {
                    return Err(self.invalid(format!(
                        "select: '{a}' ({la} values) and '{b}' ({lb}) must be equal and split into the {rows} rows of '{cond}'"
                    )));
                }
                Ok((output, la))
            }
        }
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

fn blob_path(name: &str) -> String {
    format!("standin/{name}.bin")
}

fn to_json_bytes(value: &Value) -> Vec<u8> {
    // Serialising a `Value` into memory cannot fail.
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

fn product(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

fn element_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "bool" | "int8" | "uint8" => 1,
        "int16" | "uint16" | "float16" | "bfloat16" => 2,
        "int32" | "uint32" | "float32" => 4,
        "int64" | "uint64" | "float64" => 8,
        _ => return None,
    })
}

fn tensor_bytes(t: &TensorSpec) -> Option<u64> {
    product(&t.shape)?.checked_mul(element_size(&t.dtype)?)
}

/// 16 bytes from two FNV-1a passes over the payload (not a cryptographic hash).
fn content_uuid(payload: &[u8]) -> [u8; 16] {
    let fnv = |seed: u64| payload.iter().fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&fnv(0xcbf2_9ce4_8422_2325).to_le_bytes());
    out[8..].copy_from_slice(&fnv(0x8422_2325_cbf2_9ce4).to_le_bytes());
    out
}
