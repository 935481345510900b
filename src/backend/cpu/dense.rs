//! Stacks of fully connected layers (`y = act(x·W + b)`), the shape of the built-in models.

use super::gemm;
pub use super::ops::Activation;
use super::skinny::{self, PackCache};

/// One fully connected layer: `y = activation(x · weight + bias)`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseLayer {
    /// Row-major `[in_dim, out_dim]` weight.
    pub weight: Vec<f32>,
    /// `[out_dim]` bias.
    pub bias: Vec<f32>,
    /// Input features.
    pub in_dim: usize,
    /// Output features.
    pub out_dim: usize,
    /// Applied after the bias.
    pub activation: Activation,
    /// The weight packed for small batches ([`skinny`]), filled on first use.
    pub(crate) packed: PackCache,
}

impl DenseLayer {
    /// A layer from its parts; `None` when `weight` is not `in_dim·out_dim` long or `bias` not
    /// `out_dim` long.
    pub fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        in_dim: usize,
        out_dim: usize,
        activation: Activation,
    ) -> Option<DenseLayer> {
        (weight.len() == in_dim * out_dim && bias.len() == out_dim).then_some(DenseLayer {
            weight,
            bias,
            in_dim,
            out_dim,
            activation,
            packed: PackCache::default(),
        })
    }
}

/// Layers applied in order; each layer's `in_dim` is the previous layer's `out_dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseStack {
    /// The layers, input first.
    pub layers: Vec<DenseLayer>,
}

impl DenseStack {
    /// Features one input row has (0 for an empty stack).
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_dim)
    }

    /// Features one output row has (0 for an empty stack).
    pub fn output_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_dim)
    }

    /// Runs `batch` rows of [`DenseStack::input_dim`] features through every layer with the
    /// default thread count; returns `batch` rows of [`DenseStack::output_dim`] features.
    ///
    /// # Panics
    /// If `x.len() != batch · input_dim` (callers validate request shapes first).
    pub fn forward(&self, x: &[f32], batch: usize) -> Vec<f32> {
        self.forward_threads(x, batch, gemm::default_threads())
    }

    /// [`DenseStack::forward`] with an explicit thread cap. Batches of at most
    /// [`skinny::MAX_ROWS`] rows run on the calling thread with the weight read once for all rows
    /// ([`skinny`]); bigger ones go through [`gemm::matmul`], threaded from
    /// [`gemm::PARALLEL_MIN_ROWS`] rows.
    ///
    /// # Panics
    /// If `x.len() != batch · input_dim`.
    pub fn forward_threads(&self, x: &[f32], batch: usize, threads: usize) -> Vec<f32> {
        assert_eq!(x.len(), batch * self.input_dim(), "dense input length");
        let mut cur = std::borrow::Cow::Borrowed(x);
        for layer in &self.layers {
            let mut next = vec![0.0f32; batch * layer.out_dim];
            if batch <= skinny::MAX_ROWS {
                let packed = layer.packed.get_or_pack(&layer.weight, layer.in_dim, layer.out_dim);
                packed.matmul(&cur, batch, &mut next);
            } else {
                gemm::matmul(&cur, &layer.weight, &mut next, batch, layer.in_dim, layer.out_dim, threads);
            }
            // Element-wise work below the threaded GEMM's row threshold stays on this thread too.
            let act_threads = if batch < gemm::PARALLEL_MIN_ROWS { 1 } else { threads };
            super::ops::bias_activation(&mut next, &layer.bias, layer.activation, act_threads);
            cur = std::borrow::Cow::Owned(next);
        }
        cur.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_layers_with_relu() {
        // [1,2] · [[1,-1],[1,1]] + [0, -5] = [3, -4] -> relu [3, 0]; · [[2],[7]] + [1] = 7.
        let l1 = DenseLayer::new(vec![1.0, -1.0, 1.0, 1.0], vec![0.0, -5.0], 2, 2, Activation::Relu);
        let l2 = DenseLayer::new(vec![2.0, 7.0], vec![1.0], 2, 1, Activation::None);
        let stack = DenseStack { layers: [l1, l2].into_iter().flatten().collect() };
        assert_eq!(stack.layers.len(), 2);
        assert_eq!(stack.forward(&[1.0, 2.0, 0.0, 0.0], 2), vec![7.0, 1.0]);
        assert!(DenseLayer::new(vec![0.0; 3], vec![0.0], 2, 1, Activation::None).is_none());
    }

    #[test]
    fn small_batches_agree_with_the_threaded_gemm_path() {
        // Rows 0..5 through the small-batch kernel, then inside a batch of 70 through `gemm`.
        let stack = super::super::builtin::mlp_weights();
        let x: Vec<f32> = (0..70 * 256).map(|i| (i as f32 * 0.013).sin()).collect();
        let big = stack.forward_threads(&x, 70, 2);
        let small = stack.forward_threads(&x[..5 * 256], 5, 2);
        for (a, b) in small.iter().zip(&big[..5 * 256]) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
