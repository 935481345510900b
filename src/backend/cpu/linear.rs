//! A linear layer `y = x · Wᵀ (+ b)` with a deterministic, batch-invariant kernel, split over threads by
//! output columns.
//!
//! Each output element is one fixed-order reduction over `k` ([`linear_kernels`](super::linear_kernels)),
//! so a row's result is bit-identical whatever `m` is and however the columns are split across threads.
//! Large products split the columns over scoped threads (no spinning pool: idle cores stay idle).

use std::sync::OnceLock;

use super::linear_kernels::{KernelIsa, kernel_isa, matmul_cols};
use super::quant::{ActPrecision, QMatrix};

/// Products with fewer multiply-adds than this (m·n·k) run on the calling thread.
pub const PARALLEL_MIN_MACS: usize = 1 << 19;

/// Threads a linear layer uses by default: the machine's available parallelism, or
/// `NEURON_WORKER_LINEAR_THREADS` when set.
pub fn linear_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("NEURON_WORKER_LINEAR_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or_else(super::gemm::default_threads)
    })
}

#[derive(Debug, Clone)]
enum LinearWeights {
    /// Row-major `[n, k]` f32.
    Dense(Vec<f32>),
    /// A quantized `[n, k]` matrix (its own batch-invariant integer kernels and thread pool).
    Quant(QMatrix),
}

/// A linear layer with `n` outputs over `k` inputs.
#[derive(Debug, Clone)]
pub struct Linear {
    n: usize,
    k: usize,
    weights: LinearWeights,
    bias: Option<Vec<f32>>,
}

/// Why a linear layer could not be built from the given parts.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinearError {
    /// The weight data does not hold `n * k` values.
    #[error("weight holds {len} values, [{n}, {k}] needs {}", n * k)]
    WeightLength {
        /// Values given.
        len: usize,
        /// Outputs.
        n: usize,
        /// Inputs.
        k: usize,
    },
    /// The bias does not hold `n` values.
    #[error("bias holds {len} values, the layer has {n} outputs")]
    BiasLength {
        /// Values given.
        len: usize,
        /// Outputs.
        n: usize,
    },
    /// Layers stacked together must share their input width.
    #[error("cannot stack layers over {a} and {b} inputs")]
    InputMismatch {
        /// One input width.
        a: usize,
        /// The other.
        b: usize,
    },
}

impl Linear {
    /// A dense f32 layer from row-major `[n, k]` weights (HF's `[out_features, in_features]`).
    pub fn dense(data: Vec<f32>, n: usize, k: usize) -> Result<Self, LinearError> {
        if data.len() != n * k {
            return Err(LinearError::WeightLength { len: data.len(), n, k });
        }
        Ok(Linear { n, k, weights: LinearWeights::Dense(data), bias: None })
    }

    /// A layer over a quantized `[n, k]` matrix, kept quantized.
    pub fn quant(q: QMatrix) -> Self {
        Linear { n: q.n(), k: q.k(), weights: LinearWeights::Quant(q), bias: None }
    }

    /// The quantized matrix, when the layer holds one.
    pub fn quant_weights(&self) -> Option<&QMatrix> {
        match &self.weights {
            LinearWeights::Quant(q) => Some(q),
            LinearWeights::Dense(_) => None,
        }
    }

    /// Sets how a quantized layer's products quantize activations (no effect on dense layers).
    pub fn set_activations(&mut self, act: ActPrecision) {
        if let LinearWeights::Quant(q) = &mut self.weights {
            *q = q.with_activations(act);
        }
    }

    /// Adds a bias of `n` values.
    pub fn with_bias(mut self, bias: Vec<f32>) -> Result<Self, LinearError> {
        if bias.len() != self.n {
            return Err(LinearError::BiasLength { len: bias.len(), n: self.n });
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// Stacks layers over the same input into one whose outputs are theirs, in order (fused q/k/v or
    /// gate/up: one pass over the input, one thread split). A layer without bias contributes zeros when
    /// another has one. Results are bit-identical to running the parts one by one.
    pub fn stack(parts: Vec<Linear>) -> Result<Self, LinearError> {
        let k = parts.first().map_or(0, |p| p.k);
        let n: usize = parts.iter().map(|p| p.n).sum();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let quants: Vec<QMatrix> = parts.iter().filter_map(|p| p.quant_weights().cloned()).collect();
        let mut bias = Vec::with_capacity(if any_bias { n } else { 0 });
        if any_bias {
            for p in &parts {
                match &p.bias {
                    Some(b) => bias.extend_from_slice(b),
                    None => bias.extend(std::iter::repeat_n(0.0, p.n)),
                }
            }
        }
        // All quantized in one format: concatenate the rows, still quantized.
        if quants.len() == parts.len()
            && let Some(q) = QMatrix::stack(&quants)
        {
            let stacked = Linear::quant(q);
            return if any_bias { stacked.with_bias(bias) } else { Ok(stacked) };
        }
        let mut data = Vec::with_capacity(n * k);
        for p in parts {
            if p.k != k {
                return Err(LinearError::InputMismatch { a: k, b: p.k });
            }
            match p.weights {
                LinearWeights::Dense(w) => data.extend_from_slice(&w),
                // Mixed formats: this part is expanded to f32.
                LinearWeights::Quant(q) => data.extend_from_slice(&q.dequantize()),
            }
        }
        let stacked = Linear::dense(data, n, k)?;
        if any_bias { stacked.with_bias(bias) } else { Ok(stacked) }
    }

    /// Number of outputs.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of inputs.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The dense weights, row-major `[n, k]` (empty for a quantized layer: see
    /// [`Linear::quant_weights`]).
    pub fn dense_weights(&self) -> &[f32] {
        match &self.weights {
            LinearWeights::Dense(w) => w,
            LinearWeights::Quant(_) => &[],
        }
    }

    /// `out[m, n] = x[m, k] · Wᵀ (+ b)` on [`linear_threads`] threads.
    ///
    /// # Panics
    /// When `x` or `out` is shorter than `m` rows (a caller bug).
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_with(x, m, out, linear_threads());
    }

    /// [`Linear::forward`] on at most `threads` threads; the result does not depend on `threads`.
    pub fn forward_with(&self, x: &[f32], m: usize, out: &mut [f32], threads: usize) {
        self.forward_isa(kernel_isa(), x, m, out, threads);
    }

    /// [`Linear::forward_with`] with a given kernel family (tests compare families).
    pub fn forward_isa(&self, isa: KernelIsa, x: &[f32], m: usize, out: &mut [f32], threads: usize) {
        let (n, k) = (self.n, self.k);
        assert!(x.len() >= m * k && out.len() >= m * n, "Linear::forward: buffers shorter than {m} rows");
        if m == 0 || n == 0 {
            return;
        }
        let out = &mut out[..m * n];
        let w = match &self.weights {
            LinearWeights::Dense(w) => w,
            LinearWeights::Quant(q) => {
                q.forward(&x[..m * k], m, out);
                self.add_bias(out);
                return;
            }
        };
        // Column split: whole 16-column groups per thread, at least 64 columns each.
        let t = if m * n * k < PARALLEL_MIN_MACS { 1 } else { threads.clamp(1, (n / 64).max(1)) };
        if t == 1 {
            let mut rows: Vec<&mut [f32]> = out.chunks_mut(n).collect();
            matmul_cols(isa, x, m, k, w, 0..n, &mut rows);
        } else {
            let per = n.div_ceil(t).div_ceil(16) * 16;
            let bounds: Vec<usize> = (0..=t).map(|i| (i * per).min(n)).collect();
            let mut parts: Vec<Vec<&mut [f32]>> = (0..t).map(|_| Vec::with_capacity(m)).collect();
            for row in out.chunks_mut(n) {
                let mut rest = row;
                for (ti, part) in parts.iter_mut().enumerate() {
                    let (mine, others) = rest.split_at_mut(bounds[ti + 1] - bounds[ti]);
                    part.push(mine);
                    rest = others;
                }
            }
            std::thread::scope(|s| {
                let mut iter = parts.iter_mut().enumerate();
                let first = iter.next();
                for (ti, part) in iter {
                    let cols = bounds[ti]..bounds[ti + 1];
                    s.spawn(move || matmul_cols(isa, x, m, k, w, cols, part));
                }
                if let Some((_, part)) = first {
                    matmul_cols(isa, x, m, k, w, bounds[0]..bounds[1], part);
                }
            });
        }
        self.add_bias(out);
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(b) = &self.bias {
            for row in out.chunks_mut(self.n) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_stacking_do_not_change_bits() {
        let (m, k) = (7, 96);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect();
        let a = Linear::dense((0..300 * k).map(|i| ((i * 13 % 97) as f32 - 48.0) / 90.0).collect(), 300, k)
            .unwrap()
            .with_bias((0..300).map(|i| i as f32 / 100.0).collect())
            .unwrap();
        let b = Linear::dense((0..200 * k).map(|i| ((i * 7 % 89) as f32 - 44.0) / 70.0).collect(), 200, k).unwrap();
        let mut one = vec![0f32; m * 300];
        a.forward_with(&x, m, &mut one, 1);
        let mut many = vec![0f32; m * 300];
        // Forces the threaded path even though the product is small.
        for threads in [2, 3] {
            let big_m = PARALLEL_MIN_MACS / (300 * k) + 1;
            let xs: Vec<f32> = x.iter().copied().cycle().take(big_m * k).collect();
            let mut big = vec![0f32; big_m * 300];
            a.forward_with(&xs, big_m, &mut big, threads);
            a.forward_with(&x, m, &mut many, threads);
            assert_eq!(one, many);
            for r in 0..big_m {
                let src = r % m;
                assert_eq!(big[r * 300..(r + 1) * 300], one[src * 300..(src + 1) * 300], "row {r}");
            }
        }
        let stacked = Linear::stack(vec![a.clone(), b.clone()]).unwrap();
        let mut s = vec![0f32; m * 500];
        stacked.forward_with(&x, m, &mut s, 2);
        let mut bo = vec![0f32; m * 200];
        b.forward_with(&x, m, &mut bo, 1);
        for r in 0..m {
            assert_eq!(s[r * 500..r * 500 + 300], one[r * 300..(r + 1) * 300]);
            assert_eq!(s[r * 500 + 300..(r + 1) * 500], bo[r * 200..(r + 1) * 200]);
        }
    }
}
