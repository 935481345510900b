//! CPU kernels, built-in models and `CpuInstance` against naive references written here.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]
// test and benchmark code may panic on setup failures
// The references are plain index loops on purpose: they should read like the math.
#![allow(clippy::needless_range_loop)]

use std::sync::Arc;

use neuron_worker::backend::cpu::ops::{Activation, gelu, gelu_exact, layer_norm, masked_softmax, softmax};
use neuron_worker::backend::cpu::{CpuInstance, CpuModel, isa_name, linear_weights, matmul, matmul_bt, mlp_weights};
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance};
use neuron_worker::tensor::{DataType, TensorView, encode_f32};

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            for p in 0..k {
                c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
            }
        }
    }
    c
}

#[test]
fn matmul_matches_naive_at_many_shapes_and_threads() {
    assert!(!isa_name().is_empty());
    for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 9), (130, 70, 90), (64, 384, 128), (257, 129, 65)] {
        let a = values(m * k, 1);
        let b = values(k * n, 2);
        let want = naive(&a, &b, m, k, n);
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        for threads in [1, 2] {
            let mut c = vec![f32::NAN; m * n];
            matmul(&a, &b, &mut c, m, k, n, threads);
            let mut c2 = vec![f32::NAN; m * n];
            matmul_bt(&a, &bt, &mut c2, m, k, n, threads);
            for i in 0..m * n {
                let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                assert!((c[i] as f64 - want[i]).abs() < tol, "{m}x{k}x{n} t{threads} [{i}]");
                assert!((c2[i] as f64 - want[i]).abs() < tol, "bt {m}x{k}x{n} t{threads} [{i}]");
            }
        }
    }
}

#[test]
fn layer_norm_softmax_gelu_match_naive() {
    let mut x = values(3 * 40, 5);
    let g = values(40, 6);
    let b = values(40, 7);
    let orig = x.clone();
    layer_norm(&mut x, &g, &b, 1e-5);
    for r in 0..3 {
        let row = &orig[r * 40..(r + 1) * 40];
        let mean = row.iter().map(|v| *v as f64).sum::<f64>() / 40.0;
        let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / 40.0;
        for i in 0..40 {
            let want = (row[i] as f64 - mean) / (var + 1e-5).sqrt() * g[i] as f64 + b[i] as f64;
            assert!((x[r * 40 + i] as f64 - want).abs() < 1e-5);
        }
    }
    let mut s = vec![1.0f32, 2.0, 3.0, -50.0];
    softmax(&mut s);
    let e: Vec<f64> = [1.0f64, 2.0, 3.0, -50.0].iter().map(|v| v.exp()).collect();
    let sum: f64 = e.iter().sum();
    for i in 0..4 {
        assert!((s[i] as f64 - e[i] / sum).abs() < 1e-7);
    }
    let mut m = vec![1.0f32, 2.0, 300.0];
    masked_softmax(&mut m, &[true, true, false]);
    assert_eq!(m[2], 0.0);
    assert!((m[0] as f64 - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-7);
    assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((gelu(-3.0) + 0.004_049_71).abs() < 1e-6);
    for i in -800..800 {
        let x = i as f32 / 100.0;
        assert!((gelu(x) - gelu_exact(x)).abs() < 2e-6, "gelu({x})");
    }
}

#[test]
fn linear_builtin_matches_closed_form() {
    let stack = linear_weights();
    let x = values(3 * 64, 9);
    let y = stack.forward(&x, 3);
    assert_eq!(y.len(), 48);
    for r in 0..3 {
        for j in 0..16 {
            let mut want = ((j % 5) as f64 - 2.0) / 4.0;
            for i in 0..64 {
                want += x[r * 64 + i] as f64 * ((((7 * i + 3 * j) % 17) as f64) - 8.0) / 16.0;
            }
            assert!((y[r * 16 + j] as f64 - want).abs() < 1e-4, "row {r} col {j}");
        }
    }
}

#[test]
fn mlp_builtin_matches_naive_layers() {
    let stack = mlp_weights();
    let x = values(2 * 256, 11);
    let y = stack.forward(&x, 2);
    let mut cur: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    for l in &stack.layers {
        let mut next = vec![0.0f64; 2 * l.out_dim];
        for r in 0..2 {
            for j in 0..l.out_dim {
                let mut v = l.bias[j] as f64;
                for i in 0..l.in_dim {
                    v += cur[r * l.in_dim + i] * l.weight[i * l.out_dim + j] as f64;
                }
                next[r * l.out_dim + j] = match l.activation {
                    Activation::Gelu => 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt())),
                    _ => v,
                };
            }
        }
        cur = next;
    }
    for i in 0..y.len() {
        assert!((y[i] as f64 - cur[i]).abs() < 1e-4, "[{i}] {} vs {}", y[i], cur[i]);
    }
}

#[test]
fn dense_instance_maps_names_dtypes_and_rejects_bad_shapes() {
    let model = Arc::new(CpuModel::Dense(linear_weights()));
    let mut inst = CpuInstance::new(model, vec!["INPUT0".into()], vec!["OUTPUT0".into()], 2, 3).expect("new");
    assert_eq!(inst.label(), "cpu:3");
    let x = values(2 * 64, 13);
    let want = linear_weights().forward(&x, 2);
    for dtype in [DataType::Fp32, DataType::Fp16, DataType::Bf16] {
        let bytes = encode_f32(&x, dtype).expect("encode");
        let shape = [2usize, 64];
        let inputs = [BatchInput { name: "INPUT0", tensor: TensorView { dtype, shape: &shape, data: &bytes } }];
        let out = inst.execute(&inputs).expect("execute");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "OUTPUT0");
        assert_eq!((out[0].tensor.dtype, out[0].tensor.shape.clone()), (DataType::Fp32, vec![2, 16]));
        let got = out[0].tensor.view().to_f32().expect("f32");
        let tol = if dtype == DataType::Fp32 { 1e-5 } else { 0.1 };
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < tol), "{dtype}");
    }
    let bytes = encode_f32(&x, DataType::Fp32).expect("encode");
    let shape = [4usize, 32];
    let bad =
        [BatchInput { name: "INPUT0", tensor: TensorView { dtype: DataType::Fp32, shape: &shape, data: &bytes } }];
    match inst.execute(&bad) {
        Err(BackendError::InvalidInput { name, reason }) => {
            assert_eq!(name, "INPUT0");
            assert!(reason.contains("[4, 32]") && reason.contains("[-1, 64]"), "{reason}");
        }
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    let ints = vec![0u8; 2 * 64 * 4];
    let shape = [2usize, 64];
    let bad =
        [BatchInput { name: "INPUT0", tensor: TensorView { dtype: DataType::Int32, shape: &shape, data: &ints } }];
    assert!(matches!(inst.execute(&bad), Err(BackendError::InvalidInput { .. })));
    let too_many = CpuInstance::new(Arc::new(CpuModel::Dense(linear_weights())), vec![], vec![], 1, 0);
    assert!(matches!(too_many, Err(BackendError::Load(_))));
}
