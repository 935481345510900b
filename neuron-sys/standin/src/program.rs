//! Running the stand-in program (`standin/program.json`) in `f32`: loading its blobs, and the
//! ops' arithmetic. The format itself (types, version rules, the load-time length check) is
//! `neff_format::program`, shared with the worker's NEFF writer. Version 2 programs also take
//! `int32` tensors, converted to and from `f32` at the boundary (exact for |v| < 2^24; outputs
//! are rounded to the nearest integer and saturate).

use std::collections::{BTreeMap, HashMap};

pub use neff_format::program::{Activation, PROGRAM_PATH, ProgramOp as Op};
use neff_format::program::{Program as ProgramFormat, ProgramError as FormatError};

use crate::abi::{NRT_INVALID, NRT_UNSUPPORTED_NEFF_VERSION, NrtStatus};
use crate::decoder::DecoderPlan;
use crate::knobs::ExecKind;
use crate::neff::TensorDecl;

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

impl From<FormatError> for ProgramError {
    fn from(e: FormatError) -> ProgramError {
        let status = match e {
            FormatError::Unsupported { .. } => NRT_UNSUPPORTED_NEFF_VERSION,
            FormatError::Invalid { .. } => NRT_INVALID,
        };
        ProgramError { status, message: e.to_string() }
    }
}

/// A checked program with its blobs, ready to run on inputs of the declared sizes.
#[derive(Debug, Clone)]
pub struct Program {
    format: ProgramFormat,
    blobs: HashMap<String, Vec<f32>>,
    decoder: Option<DecoderPlan>,
}

impl Program {
    /// Loads the program from the NEFF's `standin/` files and checks it against the declared
    /// tensors (`neff_format::program::Program::check`), then reads every blob.
    pub fn load(
        files: &BTreeMap<String, Vec<u8>>,
        inputs: &[TensorDecl],
        outputs: &[TensorDecl],
    ) -> Result<Program, ProgramError> {
        let text = files.get(PROGRAM_PATH).ok_or_else(|| invalid(format!("no {PROGRAM_PATH} in the NEFF")))?;
        let format = ProgramFormat::from_json(text)?;
        let declared = |list: &[TensorDecl]| list.iter().map(TensorDecl::as_neff).collect::<Vec<_>>();
        format.check(&declared(inputs), &declared(outputs))?;
        let mut blobs = HashMap::new();
        for (name, spec) in &format.blobs {
            let bytes =
                files.get(&spec.file).ok_or_else(|| invalid(format!("blob '{name}': no file '{}'", spec.file)))?;
            let count = neff_format::element_count(&spec.shape);
            if count.and_then(|c| c.checked_mul(4)) != Some(bytes.len() as u64) {
                return Err(invalid(format!(
                    "blob '{name}': shape {:?} does not match {} bytes",
                    spec.shape,
                    bytes.len()
                )));
            }
            blobs.insert(name.clone(), f32_from_le(bytes));
        }
        let decoder = format.decoder().map(|op| DecoderPlan::new(op, inputs, outputs)).transpose().map_err(invalid)?;
        Ok(Program { format, blobs, decoder })
    }

    /// The kind of execution this program is, for the per-kind device-time knobs.
    pub fn exec_kind(&self) -> ExecKind {
        self.decoder.as_ref().map_or(ExecKind::Plain, DecoderPlan::exec_kind)
    }

    /// The decoder step of a version 3 program (it then has no other op).
    pub fn decoder(&self) -> Option<&DecoderPlan> {
        self.decoder.as_ref()
    }

    fn dense_dims(&self, weight: &str, bias: Option<&str>) -> Result<(usize, usize), String> {
        let (fan_in, fan_out) = self.format.dense_dims(weight, bias).map_err(|e| e.to_string())?;
        let to_usize = |v: u64| usize::try_from(v).map_err(|_| "dense: dimension too large".to_string());
        Ok((to_usize(fan_in)?, to_usize(fan_out)?))
    }

    /// Runs the program. `inputs` must hold every declared input with its checked length
    /// (the caller checks tensor sizes); returns every buffer the ops wrote.
    pub fn run(&self, inputs: HashMap<String, Vec<f32>>) -> Result<HashMap<String, Vec<f32>>, String> {
        let mut buffers = inputs;
        for op in &self.format.ops {
            let (name, value) = match op {
                Op::Dense { input, weight, bias, activation, output } => {
                    let x = buffers.get(input).ok_or_else(|| format!("missing buffer '{input}'"))?;
                    let (fan_in, fan_out) = self.dense_dims(weight, bias.as_deref())?;
                    let w = self.blobs.get(weight).map(Vec::as_slice).unwrap_or_default();
                    let b = bias.as_ref().and_then(|b| self.blobs.get(b)).map(Vec::as_slice);
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
                Op::LlamaDecoder(_) => return Err("a llama_decoder program runs on tensors, not buffers".into()),
            };
            buffers.insert(name.clone(), value);
        }
        Ok(buffers)
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
    fn select_picks_rows_and_sigmoid_is_logistic() {
        let out = select(&[1.0, 0.0, 2.0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]);
        assert_eq!(out, vec![1.0, 2.0, -3.0, -4.0, 5.0, 6.0]);
        assert!((activate(0.0, Activation::Sigmoid) - 0.5).abs() < 1e-7);
        assert!((activate(2.0, Activation::Sigmoid) - 0.880_797_1).abs() < 1e-6);
    }
}
