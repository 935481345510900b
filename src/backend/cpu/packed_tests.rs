//! Tests of the packed dense layers against a plain f64 reference, on every instruction set
//! this CPU supports, with partial panels and partial row tiles.

use super::*;
use crate::backend::cpu::isa::detected;

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| (((i * 37 + seed * 11) % 101) as f32 / 50.0 - 1.0) * 0.5).collect()
}

/// `act(a·wᵀ + b)` in f64.
fn reference(a: &[f32], w: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(w[j * k + p])).sum();
            out[i * n + j] = dot + f64::from(b[j]);
        }
    }
    out
}

fn levels() -> Vec<Isa> {
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|l| *l <= detected()).collect()
}

#[test]
fn bias_and_gelu_match_the_reference_on_every_isa() {
    // n = 45: two full AVX2 panels and a partial one (one full and a partial on AVX-512);
    // m = 29: full tiles plus single-row remainders, several blocks.
    for (m, k, n) in [(29, 70, 45), (200, 384, 64), (1, 5, 3)] {
        let (a, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
        let want = reference(&a, &w, &b, m, k, n);
        for level in levels() {
            let packed = PackedLinear::for_isa(level, &w, &b, n, k);
            for threads in [1, 2] {
                let mut out = vec![f32::NAN; m * n];
                linear(&a, m, &packed, &mut out, Epilogue::Act(Activation::None), threads);
                for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                    assert!((f64::from(*x) - y).abs() < 1e-4, "{level:?} {m}x{k}x{n} t{threads} [{i}]: {x} vs {y}");
                }
                let mut out = vec![f32::NAN; m * n];
                linear(&a, m, &packed, &mut out, Epilogue::Act(Activation::Gelu), threads);
                for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                    let g = y * 0.5 * (1.0 + libm_erf(y / std::f64::consts::SQRT_2));
                    assert!((f64::from(*x) - g).abs() < 1e-4, "{level:?} gelu [{i}]: {x} vs {g}");
                }
            }
        }
    }
}

#[test]
fn residual_layer_norm_matches_the_reference_on_every_isa() {
    let (m, k, n) = (37, 50, 40);
    let (a, w, b) = (values(m * k, 4), values(n * k, 5), values(n, 6));
    let residual = values(m * n, 7);
    let gamma: Vec<f32> = (0..n).map(|j| 1.0 + j as f32 * 0.01).collect();
    let beta: Vec<f32> = (0..n).map(|j| j as f32 * -0.02).collect();
    let mut want = reference(&a, &w, &b, m, k, n);
    for (row, res) in want.chunks_mut(n).zip(residual.chunks(n)) {
        row.iter_mut().zip(res).for_each(|(v, r)| *v += f64::from(*r));
        let mean = row.iter().sum::<f64>() / n as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - mean) / (var + 1e-12).sqrt() * f64::from(gamma[j]) + f64::from(beta[j]);
        }
    }
    for level in levels() {
        let packed = PackedLinear::for_isa(level, &w, &b, n, k);
        for threads in [1, 2] {
            let mut out = vec![f32::NAN; m * n];
            let epilogue = Epilogue::ResidualLayerNorm { residual: &residual, gamma: &gamma, beta: &beta, eps: 1e-12 };
            linear(&a, m, &packed, &mut out, epilogue, threads);
            for (i, (x, y)) in out.iter().zip(&want).enumerate() {
                assert!((f64::from(*x) - y).abs() < 1e-4, "{level:?} t{threads} [{i}]: {x} vs {y}");
            }
        }
    }
}

#[test]
fn blocks_cover_the_rows_evenly() {
    // M = 4096 on 2 threads, AVX2 strips of 6: 44 blocks of 90 or 96 rows, 2,048 rows per half.
    let blocks = block_count(4096, 2, 6);
    assert_eq!(blocks, 44);
    assert_eq!(block_start(0, blocks, 4096, 6), 0);
    assert_eq!(block_start(blocks / 2, blocks, 4096, 6), 2046);
    assert_eq!(block_start(blocks, blocks, 4096, 6), 4096);
    for i in 0..blocks {
        let len = block_start(i + 1, blocks, 4096, 6) - block_start(i, blocks, 4096, 6);
        assert!(len == 90 || len == 96 || (i == blocks - 1 && len == 94), "block {i}: {len} rows");
    }
    assert_eq!(block_count(1024, 2, 6), 12);
    assert_eq!(block_count(5, 2, 6), 1);
    assert_eq!(block_count(0, 2, 12), 1);
    assert_eq!(block_start(1, 1, 0, 12), 0);
}

/// erf in f64 (Abramowitz & Stegun 7.1.26 is not precise enough here): a series for small
/// arguments and a continued fraction for the tail.
fn libm_erf(x: f64) -> f64 {
    let s = x.signum();
    let x = x.abs();
    if x < 3.0 {
        let mut term = x;
        let mut total = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        s * total * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        s * (1.0 - (-x * x).exp() / (x * std::f64::consts::PI.sqrt()))
    }
}
