//! The built-in stateful models and their CPU kernels.
//!
//! # `accumulate`: `INPUT` INT32 `[1]` → `OUTPUT` INT32 `[1]`
//! Triton's classic sequence example: `OUTPUT` is the running sum (wrapping 32-bit) of the
//! sequence's `INPUT` values, this request's included. The sum is the implicit state
//! `ACC_IN`/`ACC_OUT` (INT32 `[1]`, zero at START).
//!
//! # `gru`: `INPUT0` FP32 `[-1, 64]` → `OUTPUT0` FP32 `[-1, 128]`
//! A GRU cell (PyTorch's gate equations) run over the request's time steps; the hidden state
//! `h` (FP32 `[128]`, zero at START) is the implicit state `HIDDEN_IN`/`HIDDEN_OUT` and carries
//! over from one request of the sequence to the next. Row `t` of `OUTPUT0` is `h` after step `t`.
//!
//! ```text
//! gi = x·Wi + bi      (Wi: [64][384], bi: [384])      columns 0..128 = r, 128..256 = z, 256..384 = n
//! gh = h·Wh + bh      (Wh: [128][384], bh: [384])
//! r  = σ(gi_r + gh_r)        z = σ(gi_z + gh_z)        σ(v) = 1 / (1 + exp(−v))
//! n  = tanh(gi_n + r ⊙ gh_n)
//! h' = (1 − z) ⊙ n + z ⊙ h
//! ```
//!
//! Weights come from the SplitMix64 generator documented in `backend::cpu::builtin`
//! ([`SplitMix64`]; `uniform()` is exact in [-1, 1)):
//! - `Wi` then `bi` from one stream seeded with [`GRU_SEED`] (`0x677275`): `Wi[i][j] = uniform() * 0.125`
//!   drawn in row-major order (i < 64, j < 384), then `bi[j] = uniform() * 0.1f32` (f32 product,
//!   rounded to nearest).
//! - `Wh` then `bh` from a second stream seeded with `GRU_SEED + 1`: `Wh[i][j] = uniform() * 0.0625`
//!   (i < 128, j < 384, row-major), then `bh[j] = uniform() * 0.1f32`.
//!
//! The weight scales are powers of two, so every weight is exact; an independent f32 or f64
//! implementation matches to about 1e-5.

use std::sync::Arc;

use crate::backend::RequestInput;
use crate::backend::cpu::builtin::SplitMix64;
use crate::backend::cpu::matmul;
use crate::backend::{BackendError, NamedTensor};
use crate::tensor::{DataType, Tensor};

/// Seed of the `gru` input-weight stream; the hidden-weight stream uses `GRU_SEED + 1`.
pub const GRU_SEED: u64 = 0x677275;
/// `gru` input width.
pub const GRU_INPUT: usize = 64;
/// `gru` hidden (and output) width.
pub const GRU_HIDDEN: usize = 128;

/// Configuration of the built-in `accumulate` model, in Triton's text format.
pub const ACCUMULATE_CONFIG: &str = r#"
name: "accumulate"
backend: "builtin"
max_batch_size: 8
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 1000000
  direct { }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY int32_false_true: [ 0, 1 ] } ] }
  ]
  state [ { input_name: "ACC_IN" output_name: "ACC_OUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
}
"#;

/// Configuration of the built-in `gru` model, in Triton's text format.
pub const GRU_CONFIG: &str = r#"
name: "gru"
backend: "builtin"
max_batch_size: 16
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 64 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 128 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 1000000
  oldest { max_candidate_sequences: 64 preferred_batch_size: [ 16 ] max_queue_delay_microseconds: 200 }
  state [ { input_name: "HIDDEN_IN" output_name: "HIDDEN_OUT" data_type: TYPE_FP32 dims: [ 128 ] } ]
}
"#;

/// Configurations of the built-in stateful models.
pub const STATEFUL_BUILTIN_CONFIGS: &[(&str, &str)] = &[("accumulate", ACCUMULATE_CONFIG), ("gru", GRU_CONFIG)];

/// One sequence's step as a kernel sees it.
#[derive(Debug)]
pub struct KernelStep<'a> {
    /// The request's inputs, in model-configuration order (batch dimension 1).
    pub inputs: &'a [RequestInput],
    /// Control tensors, in configuration order.
    pub controls: &'a [NamedTensor],
    /// The sequence's implicit state tensors, updated in place.
    pub state: &'a mut [Tensor],
}

/// A CPU implementation of a stateful model: one batch of steps of distinct sequences.
pub trait SequenceKernel: Send + Sync + std::fmt::Debug {
    /// Runs one step of every sequence in `steps`, updating each state in place. Returns each
    /// step's outputs, in model-configuration order.
    fn run(&self, steps: &mut [KernelStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError>;
}

/// The built-in kernel called `name`, if there is one.
pub fn builtin_kernel(name: &str) -> Option<Arc<dyn SequenceKernel>> {
    match name {
        "accumulate" => Some(Arc::new(Accumulate)),
        "gru" => Some(Arc::new(GruCell::seeded())),
        _ => None,
    }
}

fn invalid(name: &str, reason: String) -> BackendError {
    BackendError::InvalidInput { name: name.into(), reason }
}

/// The `accumulate` kernel.
#[derive(Debug, Clone, Copy)]
pub struct Accumulate;

impl SequenceKernel for Accumulate {
    fn run(&self, steps: &mut [KernelStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let mut out = Vec::with_capacity(steps.len());
        for step in steps.iter_mut() {
            let x = step.inputs.first().ok_or_else(|| invalid("INPUT", "missing".into()))?;
            let [a, b, c, d] = x
                .data
                .get(..4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .ok_or_else(|| invalid("INPUT", "needs one INT32".into()))?;
            let acc =
                step.state.first_mut().ok_or_else(|| BackendError::Load("accumulate needs one state tensor".into()))?;
            let prev = acc.data.get(..4).and_then(|s| <[u8; 4]>::try_from(s).ok()).map(i32::from_le_bytes).unwrap_or(0);
            let sum = prev.wrapping_add(i32::from_le_bytes([a, b, c, d]));
            acc.data = sum.to_le_bytes().to_vec();
            let tensor = Tensor { dtype: DataType::Int32, shape: x.shape.clone(), data: sum.to_le_bytes().to_vec() };
            out.push(vec![NamedTensor { name: "OUTPUT".into(), tensor }]);
        }
        Ok(out)
    }
}

/// A GRU cell with the seeded weights of the module doc.
#[derive(Debug, Clone)]
pub struct GruCell {
    /// `[64][384]`, row-major.
    pub wi: Vec<f32>,
    /// `[384]`.
    pub bi: Vec<f32>,
    /// `[128][384]`, row-major.
    pub wh: Vec<f32>,
    /// `[384]`.
    pub bh: Vec<f32>,
}

impl GruCell {
    /// The `gru` built-in's weights.
    pub fn seeded() -> GruCell {
        let gates = 3 * GRU_HIDDEN;
        let mut rng = SplitMix64::new(GRU_SEED);
        let wi = (0..GRU_INPUT * gates).map(|_| rng.uniform() * 0.125).collect();
        let bi = (0..gates).map(|_| rng.uniform() * 0.1f32).collect();
        let mut rng = SplitMix64::new(GRU_SEED + 1);
        let wh = (0..GRU_HIDDEN * gates).map(|_| rng.uniform() * 0.0625).collect();
        let bh = (0..gates).map(|_| rng.uniform() * 0.1f32).collect();
        GruCell { wi, bi, wh, bh }
    }

    /// Runs the cell over `x` (`[T][64]`) from hidden state `h` (`[128]`, updated in place);
    /// returns `[T][128]`. A plain loop: the reference the batched kernel is tested against.
    pub fn reference(&self, x: &[f32], h: &mut [f32]) -> Vec<f32> {
        let g = 3 * GRU_HIDDEN;
        let mut out = Vec::with_capacity(x.len() / GRU_INPUT * GRU_HIDDEN);
        for xt in x.chunks_exact(GRU_INPUT) {
            let mut gi = self.bi.clone();
            let mut gh = self.bh.clone();
            for (i, xv) in xt.iter().enumerate() {
                for (acc, w) in gi.iter_mut().zip(&self.wi[i * g..(i + 1) * g]) {
                    *acc += xv * w;
                }
            }
            for (i, hv) in h.iter().enumerate() {
                for (acc, w) in gh.iter_mut().zip(&self.wh[i * g..(i + 1) * g]) {
                    *acc += hv * w;
                }
            }
            gate(&gi, &gh, h);
            out.extend_from_slice(h);
        }
        out
    }
}

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// Applies the gate equations to one row: `gi`, `gh` are `[384]`, `h` is updated in place.
fn gate(gi: &[f32], gh: &[f32], h: &mut [f32]) {
    let hd = GRU_HIDDEN;
    for k in 0..hd {
        let r = sigmoid(gi[k] + gh[k]);
        let z = sigmoid(gi[hd + k] + gh[hd + k]);
        let n = (gi[2 * hd + k] + r * gh[2 * hd + k]).tanh();
        h[k] = (1.0 - z) * n + z * h[k];
    }
}

fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl SequenceKernel for GruCell {
    fn run(&self, steps: &mut [KernelStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let (hd, g) = (GRU_HIDDEN, 3 * GRU_HIDDEN);
        let mut xs = Vec::with_capacity(steps.len());
        let mut hs = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            let x = step.inputs.first().ok_or_else(|| invalid("INPUT0", "missing".into()))?;
            let t = x.shape.get(1).copied().unwrap_or(0);
            if x.shape.len() != 3 || x.shape[0] != 1 || x.shape[2] != GRU_INPUT || x.data.len() != t * GRU_INPUT * 4 {
                return Err(invalid("INPUT0", format!("shape {:?}: expected [1, T, {GRU_INPUT}] FP32", x.shape)));
            }
            xs.push(f32s(&x.data));
            let h = step.state.first().ok_or_else(|| BackendError::Load("gru needs one state tensor".into()))?;
            if h.data.len() != hd * 4 {
                return Err(BackendError::Load(format!("gru state holds {} bytes, expected {}", h.data.len(), hd * 4)));
            }
            hs.push(f32s(&h.data));
        }
        let lens: Vec<usize> = xs.iter().map(|x| x.len() / GRU_INPUT).collect();
        let max_t = lens.iter().copied().max().unwrap_or(0);
        let mut outs: Vec<Vec<f32>> = lens.iter().map(|t| Vec::with_capacity(t * hd)).collect();
        let (mut xb, mut hb, mut gi, mut gh) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for t in 0..max_t {
            let active: Vec<usize> = (0..steps.len()).filter(|i| lens[*i] > t).collect();
            let b = active.len();
            xb.clear();
            hb.clear();
            for &i in &active {
                xb.extend_from_slice(&xs[i][t * GRU_INPUT..(t + 1) * GRU_INPUT]);
                hb.extend_from_slice(&hs[i]);
            }
            gi.clear();
            gi.resize(b * g, 0.0);
            gh.clear();
            gh.resize(b * g, 0.0);
            matmul(&xb, &self.wi, &mut gi, b, GRU_INPUT, g, 1);
            matmul(&hb, &self.wh, &mut gh, b, hd, g, 1);
            for (row, &i) in active.iter().enumerate() {
                let gir: Vec<f32> = gi[row * g..(row + 1) * g].iter().zip(&self.bi).map(|(a, b)| a + b).collect();
                let ghr: Vec<f32> = gh[row * g..(row + 1) * g].iter().zip(&self.bh).map(|(a, b)| a + b).collect();
                gate(&gir, &ghr, &mut hs[i]);
                outs[i].extend_from_slice(&hs[i]);
            }
        }
        let mut result = Vec::with_capacity(steps.len());
        for ((step, h), (out, t)) in steps.iter_mut().zip(&hs).zip(outs.into_iter().zip(&lens)) {
            if let Some(state) = step.state.first_mut() {
                state.data = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            }
            result.push(vec![NamedTensor { name: "OUTPUT0".into(), tensor: Tensor::from_f32(vec![1, *t, hd], &out) }]);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn input(t: usize, tag: usize) -> (Vec<f32>, RequestInput) {
        let x: Vec<f32> = (0..t * GRU_INPUT).map(|i| (((i * 7 + tag * 13) % 23) as f32) / 11.0 - 1.0).collect();
        let data = Bytes::from(x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        (x, RequestInput { shape: vec![1, t, GRU_INPUT], data })
    }

    #[test]
    fn batched_gru_matches_the_reference_with_ragged_steps() {
        let cell = GruCell::seeded();
        assert_eq!(cell.wi[0], SplitMix64::new(GRU_SEED).uniform() * 0.125);
        let (x1, r1) = input(3, 1);
        let (x2, r2) = input(1, 2);
        let zero = Tensor::from_f32(vec![GRU_HIDDEN], &[0.0; GRU_HIDDEN]);
        let (mut s1, mut s2) = (vec![zero.clone()], vec![zero]);
        let (i1, i2) = ([r1], [r2]);
        let mut steps = vec![
            KernelStep { inputs: &i1, controls: &[], state: &mut s1 },
            KernelStep { inputs: &i2, controls: &[], state: &mut s2 },
        ];
        let out = cell.run(&mut steps).unwrap_or_default();
        let (mut h1, mut h2) = (vec![0.0; GRU_HIDDEN], vec![0.0; GRU_HIDDEN]);
        let want1 = cell.reference(&x1, &mut h1);
        let want2 = cell.reference(&x2, &mut h2);
        let got1 = f32s(&out[0][0].tensor.data);
        let got2 = f32s(&out[1][0].tensor.data);
        assert_eq!(out[0][0].tensor.shape, vec![1, 3, GRU_HIDDEN]);
        for (g, w) in got1.iter().zip(&want1).chain(got2.iter().zip(&want2)) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert!((f32s(&s1[0].data)[5] - h1[5]).abs() < 1e-5);
        assert!(want1.iter().any(|v| v.abs() > 0.01));
    }

    #[test]
    fn accumulate_sums_in_its_state() {
        let one = |v: i32| RequestInput { shape: vec![1, 1], data: Bytes::from(v.to_le_bytes().to_vec()) };
        let mut state = vec![Tensor { dtype: DataType::Int32, shape: vec![1], data: vec![0; 4] }];
        for (v, want) in [(3, 3i32), (4, 7), (-10, -3)] {
            let inputs = [one(v)];
            let mut steps = [KernelStep { inputs: &inputs, controls: &[], state: &mut state }];
            let out = Accumulate.run(&mut steps).unwrap_or_default();
            assert_eq!(out[0][0].tensor.data, want.to_le_bytes().to_vec());
        }
    }
}
