//! The stand-in program (`standin/program.json`): loading, checking and running it in `f32`.
//!
//! Format (the worker's NEFF writer documents the same format):
//! `{"version": 1|2, "blobs": {NAME: {"file": PATH, "shape": [..]}}, "ops": [OP, ...]}` where OP is
//! `{"op": "dense", "input", "weight", "bias"?, "activation", "output"}`, `{"op": "add", "a", "b",
//! "output"}` or `{"op": "copy", "input", "output"}` (version 1), and, from version 2, `{"op":
//! "mul"|"sub", "a", "b", "output"}`, `{"op": "activation", "input", "function", "output"}` and
//! `{"op": "select", "cond", "a", "b", "output"}`. Activations: `none`, `relu`, `gelu`, `tanh`
//! (version 1) and `sigmoid` (version 2). Version 1 programs take `float32` inputs and outputs
//! only; version 2 also takes `int32` ones, converted to and from `f32` at the boundary (exact
//! for |v| < 2^24; outputs are rounded to the nearest integer and saturate).
//! A program using a feature newer than its declared version, unknown top-level keys (`state` is
//! reserved) and unknown op tags are refused at load with `NRT_UNSUPPORTED_NEFF_VERSION`.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::abi::{NRT_INVALID, NRT_UNSUPPORTED_NEFF_VERSION, NrtStatus};
use crate::neff::TensorDecl;

/// Path of the program inside the NEFF archive.
pub const PROGRAM_PATH: &str = "standin/program.json";

const KNOWN_KEYS: [&str; 3] = ["version", "blobs", "ops"];
/// Op tags of version 1 programs.
const OPS_V1: [&str; 3] = ["dense", "add", "copy"];
/// Op tags added by version 2.
const OPS_V2: [&str; 4] = ["mul", "sub", "activation", "select"];
/// Newest program format version this stand-in runs.
pub const MAX_VERSION: u64 = 2;

/// Why a program could not be loaded: the status `nrt_load` returns and a log message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramError {
    /// Status for the caller.
    pub status: NrtStatus,
    /// What is wrong.
    pub message: String,
}

fn invalid(message: String) -> ProgramError {
    ProgramError { status: NRT_INVALID, message }
}

/// Activation after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// GELU, erf form.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
    /// Logistic `1 / (1 + exp(-x))` (version 2).
    Sigmoid,
}

/// One program step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `output = act(input · weight + bias)`.
    Dense {
        /// Buffer read as `[rows, in]`.
        input: String,
        /// Blob `[in, out]`.
        weight: String,
        /// Optional blob `[out]`.
        #[serde(default)]
        bias: Option<String>,
        /// Activation.
        activation: Activation,
        /// Buffer written.
        output: String,
    },
    /// Elementwise `a + b`.
    Add {
        /// First operand.
        a: String,
        /// Second operand.
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
    /// Elementwise `a * b` (version 2).
    Mul {
        /// First operand.
        a: String,
        /// Second operand.
        b: String,
        /// Buffer written.
        output: String,
    },
    /// Elementwise `a - b` (version 2).
    Sub {
        /// First operand.
        a: String,
        /// Second operand.
        b: String,
        /// Buffer written.
        output: String,
    },
    /// Elementwise `function(input)` (version 2).
    Activation {
        /// Buffer read.
        input: String,
        /// Function applied to every element.
        function: Activation,
        /// Buffer written.
        output: String,
    },
    /// Row select (version 2): `cond` holds one value per row; `a` and `b` (equal lengths, a
    /// whole number of values per row) are split into that many rows; row `r` of `output` is row
    /// `r` of `a` when `cond[r] != 0`, else row `r` of `b`.
    Select {
        /// One value per row.
        cond: String,
        /// Rows taken where `cond` is non-zero.
        a: String,
        /// Rows taken where `cond` is zero.
        b: String,
        /// Buffer written.
        output: String,
    },
}

impl Op {
    /// The oldest program format version that has this op (with its activation).
    fn version(&self) -> u64 {
        match self {
            Op::Dense { activation: Activation::Sigmoid, .. } => 2,
            Op::Dense { .. } | Op::Add { .. } | Op::Copy { .. } => 1,
            Op::Mul { .. } | Op::Sub { .. } | Op::Activation { .. } | Op::Select { .. } => 2,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobSpec {
    file: String,
    shape: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProgramFile {
    /// Checked by `check_known` before typed parsing.
    version: u64,
    #[serde(default)]
    blobs: HashMap<String, BlobSpec>,
    ops: Vec<Op>,
}

#[derive(Debug, Clone)]
struct Blob {
    shape: Vec<u64>,
    data: Vec<f32>,
}

/// A checked program, ready to run on inputs of the declared sizes.
#[derive(Debug, Clone)]
pub struct Program {
    version: u64,
    blobs: HashMap<String, Blob>,
    ops: Vec<Op>,
}

impl Program {
    /// Loads the program from the NEFF's `standin/` files and checks it against the declared
    /// tensors: every input and output `float32` (or, from version 2, `int32`), every buffer
    /// length derivable, every output exactly filled, no op newer than the declared version.
    pub fn load(
        files: &HashMap<String, Vec<u8>>,
        inputs: &[TensorDecl],
        outputs: &[TensorDecl],
    ) -> Result<Program, ProgramError> {
        let text = files.get(PROGRAM_PATH).ok_or_else(|| invalid(format!("no {PROGRAM_PATH} in the NEFF")))?;
        let value: Value = serde_json::from_slice(text).map_err(|e| invalid(format!("{PROGRAM_PATH}: {e}")))?;
        check_known(&value)?;
        let file: ProgramFile = serde_json::from_value(value).map_err(|e| invalid(format!("{PROGRAM_PATH}: {e}")))?;
        let mut blobs = HashMap::new();
        for (name, spec) in file.blobs {
            let bytes =
                files.get(&spec.file).ok_or_else(|| invalid(format!("blob '{name}': no file '{}'", spec.file)))?;
            let count = spec.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            if count.and_then(|c| c.checked_mul(4)) != Some(bytes.len() as u64) {
                return Err(invalid(format!(
                    "blob '{name}': shape {:?} does not match {} bytes",
                    spec.shape,
                    bytes.len()
                )));
            }
            blobs.insert(name, Blob { shape: spec.shape, data: f32_from_le(bytes) });
        }
        let program = Program { version: file.version, blobs, ops: file.ops };
        if let Some(op) = program.ops.iter().find(|op| op.version() > program.version) {
            return Err(ProgramError {
                status: NRT_UNSUPPORTED_NEFF_VERSION,
                message: format!(
                    "{PROGRAM_PATH}: {op:?} needs program version {}, the program declares {}",
                    op.version(),
                    program.version
                ),
            });
        }
        program.check(inputs, outputs)?;
        Ok(program)
    }

    fn check(&self, inputs: &[TensorDecl], outputs: &[TensorDecl]) -> Result<(), ProgramError> {
        let mut lengths: HashMap<&str, u64> = HashMap::new();
        for t in inputs {
            self.check_dtype(t, "input")?;
            lengths.insert(&t.name, t.size / 4);
        }
        for op in &self.ops {
            let (output, len) = self.op_length(op, &lengths)?;
            lengths.insert(output, len);
        }
        for t in outputs {
            self.check_dtype(t, "output")?;
            match lengths.get(t.name.as_str()) {
                Some(&len) if len.checked_mul(4) == Some(t.size) => {}
                Some(&len) => {
                    return Err(invalid(format!(
                        "output '{}' is {} bytes, the program makes {len} float32 values",
                        t.name, t.size
                    )));
                }
                None => return Err(invalid(format!("no op writes output '{}'", t.name))),
            }
        }
        Ok(())
    }

    /// `float32` (or undeclared) tensors always; `int32` ones from version 2.
    fn check_dtype(&self, t: &TensorDecl, kind: &str) -> Result<(), ProgramError> {
        let ok = match t.dtype.as_deref() {
            None | Some("float32") => true,
            Some("int32") => self.version >= 2,
            Some(_) => false,
        };
        if !ok || !t.size.is_multiple_of(4) {
            let allowed = if self.version >= 2 { "float32 or int32" } else { "float32 (int32 from version 2)" };
            return Err(invalid(format!("{kind} '{}' is {:?}, a program takes {allowed}", t.name, t.dtype)));
        }
        Ok(())
    }

    fn op_length<'a>(&self, op: &'a Op, lengths: &HashMap<&str, u64>) -> Result<(&'a str, u64), ProgramError> {
        let buffer =
            |name: &str| lengths.get(name).copied().ok_or_else(|| invalid(format!("op reads unknown buffer '{name}'")));
        match op {
            Op::Dense { input, weight, bias, output, .. } => {
                let (fan_in, fan_out) = self.dense_dims(weight, bias.as_deref())?;
                let len = buffer(input)?;
                if fan_in == 0 || len % fan_in as u64 != 0 {
                    return Err(invalid(format!("dense: '{input}' ({len} values) is not [rows, {fan_in}]")));
                }
                Ok((output, len / fan_in as u64 * fan_out as u64))
            }
            Op::Add { a, b, output } | Op::Mul { a, b, output } | Op::Sub { a, b, output } => {
                let (la, lb) = (buffer(a)?, buffer(b)?);
                if la != lb {
                    return Err(invalid(format!("{}: '{a}' has {la} values, '{b}' has {lb}", op_name(op))));
                }
                Ok((output, la))
            }
            Op::Copy { input, output } | Op::Activation { input, output, .. } => Ok((output, buffer(input)?)),
            Op::Select { cond, a, b, output } => {
                let (rows, la, lb) = (buffer(cond)?, buffer(a)?, buffer(b)?);
                if la != lb || rows == 0 || la % rows != 0 {
                    return Err(invalid(format!(
                        "select: '{a}' ({la} values) and '{b}' ({lb}) must be equal and split into the {rows} rows of '{cond}'"
                    )));
                }
                Ok((output, la))
            }
        }
    }

    fn dense_dims(&self, weight: &str, bias: Option<&str>) -> Result<(usize, usize), ProgramError> {
        let w = self.blobs.get(weight).ok_or_else(|| invalid(format!("dense: unknown blob '{weight}'")))?;
        let [fan_in, fan_out] = w.shape[..] else {
            return Err(invalid(format!("dense: weight '{weight}' is not 2-D")));
        };
        if let Some(bias) = bias {
            let b = self.blobs.get(bias).ok_or_else(|| invalid(format!("dense: unknown blob '{bias}'")))?;
            if b.data.len() as u64 != fan_out {
                return Err(invalid(format!("dense: bias '{bias}' is not [{fan_out}]")));
            }
        }
        let to_usize = |v: u64| usize::try_from(v).map_err(|_| invalid("dense: dimension too large".into()));
        Ok((to_usize(fan_in)?, to_usize(fan_out)?))
    }

    /// Runs the program. `inputs` must hold every declared input with its checked length
    /// (the caller checks tensor sizes); returns every buffer the ops wrote.
    pub fn run(&self, inputs: HashMap<String, Vec<f32>>) -> Result<HashMap<String, Vec<f32>>, String> {
        let mut buffers = inputs;
        for op in &self.ops {
            let (name, value) = match op {
                Op::Dense { input, weight, bias, activation, output } => {
                    let x = buffers.get(input).ok_or_else(|| format!("missing buffer '{input}'"))?;
                    let (fan_in, fan_out) = self.dense_dims(weight, bias.as_deref()).map_err(|e| e.message)?;
                    let w = self.blobs.get(weight).map(|b| b.data.as_slice()).unwrap_or_default();
                    let b = bias.as_ref().and_then(|b| self.blobs.get(b)).map(|b| b.data.as_slice());
                    (output, dense(x, w, b, fan_in, fan_out, *activation))
                }
                Op::Add { a, b, output } | Op::Mul { a, b, output } | Op::Sub { a, b, output } => {
                    let x = buffers.get(a).ok_or_else(|| format!("missing buffer '{a}'"))?;
                    let y = buffers.get(b).ok_or_else(|| format!("missing buffer '{b}'"))?;
                    let f: fn(f32, f32) -> f32 = match op {
                        Op::Mul { .. } => |p, q| p * q,
                        Op::Sub { .. } => |p, q| p - q,
                        _ => |p, q| p + q,
                    };
                    (output, x.iter().zip(y).map(|(p, q)| f(*p, *q)).collect())
                }
                Op::Activation { input, function, output } => {
                    let x = buffers.get(input).ok_or_else(|| format!("missing buffer '{input}'"))?;
                    (output, x.iter().map(|v| activate(*v, *function)).collect())
                }
                Op::Select { cond, a, b, output } => {
                    let c = buffers.get(cond).ok_or_else(|| format!("missing buffer '{cond}'"))?;
                    let x = buffers.get(a).ok_or_else(|| format!("missing buffer '{a}'"))?;
                    let y = buffers.get(b).ok_or_else(|| format!("missing buffer '{b}'"))?;
                    (output, select(c, x, y))
                }
                Op::Copy { input, output } => {
                    let x = buffers.get(input).ok_or_else(|| format!("missing buffer '{input}'"))?;
                    (output, x.clone())
                }
            };
            buffers.insert(name.clone(), value);
        }
        Ok(buffers)
    }
}

/// Refuses keys and op tags this stand-in does not know (a newer program format).
fn check_known(value: &Value) -> Result<(), ProgramError> {
    let unsupported = |message: String| ProgramError { status: NRT_UNSUPPORTED_NEFF_VERSION, message };
    let Value::Object(map) = value else {
        return Err(invalid(format!("{PROGRAM_PATH} is not an object")));
    };
    if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
        return Err(unsupported(format!("{PROGRAM_PATH}: key '{key}' is not supported by this stand-in")));
    }
    let version = map.get("version").and_then(Value::as_u64).unwrap_or(0);
    if !(1..=MAX_VERSION).contains(&version) {
        return Err(unsupported(format!(
            "{PROGRAM_PATH}: version {version} is not supported (1 to {MAX_VERSION} are)"
        )));
    }
    let ops = map.get("ops").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for op in ops {
        let tag = op.get("op").and_then(Value::as_str).unwrap_or("");
        let known = OPS_V1.contains(&tag) || (version >= 2 && OPS_V2.contains(&tag));
        if !known {
            return Err(unsupported(format!("{PROGRAM_PATH}: op '{tag}' is not supported by this stand-in")));
        }
    }
    Ok(())
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Dense { .. } => "dense",
        Op::Add { .. } => "add",
        Op::Copy { .. } => "copy",
        Op::Mul { .. } => "mul",
        Op::Sub { .. } => "sub",
        Op::Activation { .. } => "activation",
        Op::Select { .. } => "select",
    }
}

/// Row `r` of the result is row `r` of `a` where `cond[r] != 0`, else row `r` of `b`.
fn select(cond: &[f32], a: &[f32], b: &[f32]) -> Vec<f32> {
    let width = a.len() / cond.len().max(1);
    let mut out = Vec::with_capacity(a.len());
    for (r, c) in cond.iter().enumerate() {
        let src = if *c != 0.0 { a } else { b };
        out.extend_from_slice(src.get(r * width..(r + 1) * width).unwrap_or_default());
    }
    out
}

fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn dense(x: &[f32], w: &[f32], b: Option<&[f32]>, fan_in: usize, fan_out: usize, act: Activation) -> Vec<f32> {
    let rows = x.len() / fan_in.max(1);
    let mut y = vec![0f32; rows * fan_out];
    for (xr, yr) in x.chunks_exact(fan_in).zip(y.chunks_exact_mut(fan_out)) {
        if let Some(b) = b {
            yr.copy_from_slice(b);
        }
        for (&xi, wr) in xr.iter().zip(w.chunks_exact(fan_out)) {
            for (yj, &wij) in yr.iter_mut().zip(wr) {
                *yj += xi * wij;
            }
        }
        for v in yr.iter_mut() {
            *v = activate(*v, act);
        }
    }
    y
}

fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Activation::Gelu => {
            let x = f64::from(v);
            (0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
        }
    }
}

/// The error function (via a Chebyshev fit of erfc; fractional error below 1.2e-7).
pub fn erf(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 { 1.0 - erfc } else { erfc - 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        let cases = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_8),
            (1.0, 0.842_700_792_9),
            (2.0, 0.995_322_265_0),
            (-1.0, -0.842_700_792_9),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {}", erf(x));
        }
    }

    #[test]
    fn activations() {
        assert_eq!(activate(-2.0, Activation::Relu), 0.0);
        assert_eq!(activate(3.0, Activation::None), 3.0);
        assert!((activate(1.0, Activation::Gelu) - 0.841_344_7).abs() < 1e-6);
        assert!((activate(-1.0, Activation::Gelu) + 0.158_655_3).abs() < 1e-6);
        assert!((activate(0.5, Activation::Tanh) - 0.462_117_16).abs() < 1e-6);
    }

    #[test]
    fn dense_computes_rows() {
        // x = [[1, 2]], W = [[1, 0, 2], [0, 1, 3]], b = [1, 1, 1]
        let y = dense(&[1.0, 2.0], &[1.0, 0.0, 2.0, 0.0, 1.0, 3.0], Some(&[1.0, 1.0, 1.0]), 2, 3, Activation::None);
        assert_eq!(y, vec![2.0, 3.0, 9.0]);
    }

    #[test]
    fn unknown_keys_and_ops_are_unsupported() {
        let state = serde_json::json!({"version": 1, "state": {}, "ops": []});
        assert_eq!(check_known(&state).map_err(|e| e.status), Err(NRT_UNSUPPORTED_NEFF_VERSION));
        let gru = serde_json::json!({"version": 1, "ops": [{"op": "gru"}]});
        assert_eq!(check_known(&gru).map_err(|e| e.status), Err(NRT_UNSUPPORTED_NEFF_VERSION));
        let v3 = serde_json::json!({"version": 3, "ops": []});
        assert_eq!(check_known(&v3).map_err(|e| e.status), Err(NRT_UNSUPPORTED_NEFF_VERSION));
        let mul_in_v1 = serde_json::json!({"version": 1, "ops": [{"op": "mul"}]});
        assert_eq!(check_known(&mul_in_v1).map_err(|e| e.status), Err(NRT_UNSUPPORTED_NEFF_VERSION));
        let mul_in_v2 = serde_json::json!({"version": 2, "ops": [{"op": "mul"}]});
        assert_eq!(check_known(&mul_in_v2).map_err(|e| e.status), Ok(()));
    }

    #[test]
    fn select_picks_rows_and_sigmoid_is_logistic() {
        let out = select(&[1.0, 0.0, 2.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
        assert_eq!(out, vec![1.0, 2.0, -3.0, -4.0, 5.0, 6.0]);
        assert!((activate(0.0, Activation::Sigmoid) - 0.5).abs() < 1e-7);
        assert!((activate(2.0, Activation::Sigmoid) - 0.880_797_1).abs() < 1e-6);
    }
}
