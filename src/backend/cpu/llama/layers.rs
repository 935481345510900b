//! One decoder layer's weights (pre-norm attention with fused q/k/v, pre-norm SwiGLU MLP with fused
//! gate/up) and the row-wise operations between the matrix products.

use sha2::{Digest, Sha256};

use super::LoadError;
use super::config::LlamaConfig;
use super::weights::{Weight, WeightSource};
use crate::backend::cpu::linear::Linear;

/// Reads weights by HF name, checks their shapes and hashes them (model identity).
pub struct WeightReader<'a> {
    source: &'a dyn WeightSource,
    digest: Sha256,
}

impl<'a> WeightReader<'a> {
    /// A reader over `source`.
    pub fn new(source: &'a dyn WeightSource) -> Self {
        WeightReader { source, digest: Sha256::new() }
    }

    /// SHA-256 over every tensor read (name, shape, f32 values), in reading order.
    pub fn finish(self) -> [u8; 32] {
        self.digest.finalize().into()
    }

    fn hash(&mut self, name: &str, weight: &Weight) {
        self.digest.update(name.as_bytes());
        match weight {
            Weight::Dense { data, shape } => {
                for d in shape {
                    self.digest.update((*d as u64).to_le_bytes());
                }
                for x in data {
                    self.digest.update(x.to_le_bytes());
                }
            }
            Weight::Quant(q) => {
                for d in q.shape() {
                    self.digest.update((*d as u64).to_le_bytes());
                }
                self.digest.update(q.format().ggml_type().to_le_bytes());
                self.digest.update(q.gguf_bytes());
            }
        }
    }

    /// The tensor `name` if the source has it, checked against `shape`.
    pub fn optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Weight>, LoadError> {
        let Some(weight) = self.source.tensor(name)? else {
            return Ok(None);
        };
        if weight.shape() != shape {
            return Err(LoadError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: weight.shape().to_vec(),
            });
        }
        self.hash(name, &weight);
        Ok(Some(weight))
    }

    /// The tensor `name`, which must exist with `shape`.
    pub fn required(&mut self, name: &str, shape: &[usize]) -> Result<Weight, LoadError> {
        self.optional(name, shape)?.ok_or_else(|| LoadError::MissingTensor { name: name.to_string() })
    }

    /// A vector (norm weight) of `len` values.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Vec<f32>, LoadError> {
        match self.required(name, &[len])? {
            Weight::Dense { data, .. } => Ok(data),
            Weight::Quant(q) => Ok(q.dequantize()),
        }
    }

    /// A `[n, k]` matrix as a linear layer, with `{prefix}.bias` when the source has it.
    pub fn linear(&mut self, prefix: &str, n: usize, k: usize) -> Result<Linear, LoadError> {
        let name = format!("{prefix}.weight");
        let weight = self.required(&name, &[n, k])?;
        let linear = linear_from(&name, weight, n, k)?;
        match self.optional(&format!("{prefix}.bias"), &[n])? {
            Some(Weight::Dense { data, .. }) => linear.with_bias(data).map_err(|e| shape_error(&name, e)),
            Some(Weight::Quant(q)) => linear.with_bias(q.dequantize()).map_err(|e| shape_error(&name, e)),
            None => Ok(linear),
        }
    }
}

fn shape_error(name: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Config { field: name.to_string(), reason: e.to_string() }
}

/// A linear layer from a `[n, k]` weight.
pub fn linear_from(name: &str, weight: Weight, n: usize, k: usize) -> Result<Linear, LoadError> {
    match weight {
        Weight::Dense { data, .. } => Linear::dense(data, n, k).map_err(|e| shape_error(name, e)),
        Weight::Quant(q) => Ok(Linear::quant(q)),
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    /// RMSNorm weight before attention.
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: outputs `[q_dim | kv_dim | kv_dim]`.
    pub qkv: Linear,
    /// Attention output projection.
    pub o: Linear,
    /// RMSNorm weight before the MLP.
    pub mlp_norm: Vec<f32>,
    /// gate and up projections stacked: outputs `[intermediate | intermediate]`.
    pub gate_up: Linear,
    /// Down projection.
    pub down: Linear,
}

impl DecoderLayer {
    /// Reads layer `i` (`model.layers.{i}.*`).
    pub fn load(reader: &mut WeightReader<'_>, config: &LlamaConfig, i: usize) -> Result<Self, LoadError> {
        let h = config.hidden_size;
        let inter = config.intermediate_size;
        let p = format!("model.layers.{i}");
        let q = reader.linear(&format!("{p}.self_attn.q_proj"), config.q_dim(), h)?;
        let k = reader.linear(&format!("{p}.self_attn.k_proj"), config.kv_dim(), h)?;
        let v = reader.linear(&format!("{p}.self_attn.v_proj"), config.kv_dim(), h)?;
        let o = reader.linear(&format!("{p}.self_attn.o_proj"), h, config.q_dim())?;
        let gate = reader.linear(&format!("{p}.mlp.gate_proj"), inter, h)?;
        let up = reader.linear(&format!("{p}.mlp.up_proj"), inter, h)?;
        let down = reader.linear(&format!("{p}.mlp.down_proj"), h, inter)?;
        Ok(DecoderLayer {
            attn_norm: reader.vector(&format!("{p}.input_layernorm.weight"), h)?,
            qkv: Linear::stack(vec![q, k, v]).map_err(|e| shape_error(&p, e))?,
            o,
            mlp_norm: reader.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
            gate_up: Linear::stack(vec![gate, up]).map_err(|e| shape_error(&p, e))?,
            down,
        })
    }
}

/// RMSNorm of each row of `x` into `out`, as transformers computes it in f32:
/// `w * (x * rsqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut sum = 0f32;
        for v in xr {
            sum += v * v;
        }
        let inv = 1.0 / (sum / d as f32 + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = w * (v * inv);
        }
    }
}

/// SwiGLU: `out[i] = silu(gate[i]) * up[i]` for each row of `gate_up` (`[gate | up]`, `2 * d` wide),
/// with `silu(g) = g · sigmoid(g)` computed from `e = exp(−|g|)` (never overflows):
/// `g / (1 + e)` for `g ≥ 0`, `g·e / (1 + e)` below (`e = 0` past |g| = 87). The exponential is
/// [`exp_clamped`](crate::backend::cpu::fast_exp::exp_clamped) (within 2 ulp of libm), so the loop
/// vectorises; it is the same code on every machine, so the same bits.
pub fn swiglu(gate_up: &[f32], d: usize, out: &mut [f32]) {
    use crate::backend::cpu::fast_exp::{LOWEST, exp_clamped};
    for (gu, or) in gate_up.chunks_exact(2 * d).zip(out.chunks_exact_mut(d)) {
        let (g, u) = gu.split_at(d);
        for ((o, &g), &u) in or.iter_mut().zip(g).zip(u) {
            // Below e^−87 (f32's normals end) the exponential counts as 0, as libm's would flush.
            let e = if g.abs() < -LOWEST { exp_clamped(-g.abs()) } else { 0.0 };
            let num = if g >= 0.0 { g } else { g * e };
            *o = num / (1.0 + e) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::swiglu;

    #[test]
    fn swiglu_is_within_a_few_ulp_of_f64_over_the_whole_range() {
        // Gates from −120 to 120 (both tails: exp(−|g|) under f32's normals at the ends), ups of
        // both signs.
        let gates: Vec<f32> = (0..24_001).map(|i| (i as f32 - 12_000.0) * 0.01).collect();
        let d = gates.len();
        let mut gate_up = gates.clone();
        gate_up.extend(gates.iter().enumerate().map(|(i, _)| if i % 2 == 0 { 1.5 } else { -0.75 }));
        let mut out = vec![0f32; d];
        swiglu(&gate_up, d, &mut out);
        for (i, (&g, &o)) in gates.iter().zip(&out).enumerate() {
            let (g64, u64_) = (g as f64, gate_up[d + i] as f64);
            let want = g64 / (1.0 + (-g64).exp()) * u64_;
            let err = (o as f64 - want).abs();
            // A few ulp of the result; past g = −87 the result (under 1e−36) is flushed to 0.
            let tol = 4.0 * f32::EPSILON as f64 * want.abs() + 1e-35;
            assert!(err <= tol, "silu({g}) · {}: {o}, want {want} (error {err:e})", gate_up[d + i]);
        }
        assert_eq!(out[12_000], 0.0, "silu(0) = 0");
    }
}
