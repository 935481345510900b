//! Kernel tests: every SIMD kernel equals the scalar reference bit for bit, results do not depend
//! on the batch size or thread split, and products are close to f32 products.

use super::super::format::QK;
use super::*;

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = lcg(seed);
    (0..n).map(|_| r()).collect()
}

const FORMATS: [QFormat; 4] = [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1, QFormat::F16];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_isa_equals_the_scalar_reference_bit_for_bit() {
    let pool = QuantPool::new(1, std::time::Duration::ZERO);
    // k with a partial last group of 8 blocks (18 blocks), k past one 64-block segment of the
    // multi-row tiles (65 blocks), n not a multiple of the tiles.
    for &(n, k) in &[(13usize, 576usize), (7, 32), (9, 96), (33, 256), (6, 2080)] {
        for (fi, &f) in FORMATS.iter().enumerate() {
            let w = QMatrix::quantize(f, &random(n * k, 1 + fi as u64), n, k).unwrap();
            for m in [1usize, 2, 3, 5, 8, 17] {
                let x = random(m * k, 100 + m as u64);
                let mut want = vec![0.0; m * n];
                w.forward_with(QuantIsa::Scalar, &pool, &x, m, &mut want);
                for isa in QuantIsa::available() {
                    let mut got = vec![0.0; m * n];
                    w.forward_with(isa, &pool, &x, m, &mut got);
                    assert_eq!(bits(&got), bits(&want), "{f:?} {isa:?} n={n} k={k} m={m}");
                }
            }
        }
    }
}

#[test]
fn outputs_do_not_depend_on_batch_size_or_threads() {
    let (n, k) = (200, 512);
    let single = QuantPool::new(1, std::time::Duration::ZERO);
    let multi = QuantPool::new(3, std::time::Duration::from_micros(50));
    for &f in &FORMATS {
        let w = QMatrix::quantize(f, &random(n * k, 7), n, k).unwrap();
        let m = 11;
        let x = random(m * k, 8);
        let mut batched = vec![0.0; m * n];
        w.forward_with(quant_isa(), &multi, &x, m, &mut batched);
        for c in 0..m {
            let mut alone = vec![0.0; n];
            w.forward_with(quant_isa(), &single, &x[c * k..(c + 1) * k], 1, &mut alone);
            assert_eq!(bits(&alone), bits(&batched[c * n..(c + 1) * n]), "{f:?} row {c}");
        }
    }
}

#[test]
fn products_are_close_to_f32_products_of_the_dequantized_weight() {
    let (n, k, m) = (16, 256, 3);
    for &f in &FORMATS {
        let w = QMatrix::quantize(f, &random(n * k, 3), n, k).unwrap();
        let deq = w.dequantize();
        let x = random(m * k, 4);
        let mut got = vec![0.0; m * n];
        w.forward(&x, m, &mut got);
        for c in 0..m {
            for r in 0..n {
                let want: f32 = (0..k).map(|e| x[c * k + e] * deq[r * k + e]).sum();
                let norm: f32 = (0..k).map(|e| (x[c * k + e] * deq[r * k + e]).abs()).sum();
                // Activations are quantized to 8 bits per block: error ≲ 1% of Σ|x·w|.
                assert!((got[c * n + r] - want).abs() <= 0.01 * norm, "{f:?} ({c},{r}): {} vs {want}", got[c * n + r]);
            }
        }
    }
}

#[test]
fn dequantize_matches_the_block_formulas() {
    // One hand-made block per format: d = 0.5, m = -1, q[e] = e % 16 (Q4), e - 16 (Q8).
    let d = half::f16::from_f32(0.5).to_le_bytes();
    let mn = half::f16::from_f32(-1.0).to_le_bytes();
    let nib: Vec<u8> = (0..QK / 2).map(|j| (j % 16) as u8 | (((j + 16) % 16) as u8) << 4).collect();
    let q41: Vec<u8> = [&d[..], &mn[..], &nib[..]].concat();
    let w = QMatrix::from_gguf_bytes(QFormat::Q4_1, 1, QK, &q41).unwrap();
    let want: Vec<f32> = (0..QK).map(|e| 0.5 * (e % 16) as f32 - 1.0).collect();
    assert_eq!(w.dequantize(), want);
    let q40: Vec<u8> = [&d[..], &nib[..]].concat();
    let w = QMatrix::from_gguf_bytes(QFormat::Q4_0, 1, QK, &q40).unwrap();
    let want: Vec<f32> = (0..QK).map(|e| 0.5 * ((e % 16) as f32 - 8.0)).collect();
    assert_eq!(w.dequantize(), want);
    let q8: Vec<u8> = [&d[..], &(0..QK).map(|e| (e as i8 - 16) as u8).collect::<Vec<_>>()[..]].concat();
    let w = QMatrix::from_gguf_bytes(QFormat::Q8_0, 1, QK, &q8).unwrap();
    let want: Vec<f32> = (0..QK).map(|e| 0.5 * (e as f32 - 16.0)).collect();
    assert_eq!(w.dequantize(), want);
    assert_eq!(w.gguf_bytes(), q8);
}

#[test]
fn one_row_dequantizes_as_the_whole_matrix_does() {
    let (n, k) = (37, 3 * QK);
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5).collect();
    for f in [QFormat::F16, QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1] {
        let q = QMatrix::quantize(f, &w, n, k).unwrap();
        let all = q.dequantize();
        for r in [0, 15, 16, 36] {
            let mut row = vec![0.0; k];
            q.dequantize_row(r, &mut row);
            assert_eq!(row, all[r * k..(r + 1) * k], "{f:?} row {r}");
        }
    }
}

#[test]
fn malformed_sizes_are_errors() {
    assert!(matches!(
        QMatrix::from_gguf_bytes(QFormat::Q4_1, 2, 32, &[0; 39]),
        Err(QuantError::WrongSize { expected: 40, got: 39, .. })
    ));
    assert!(matches!(QMatrix::from_gguf_bytes(QFormat::Q8_0, 1, 40, &[0; 40]), Err(QuantError::RaggedRow { .. })));
    assert!(QMatrix::from_gguf_bytes(QFormat::Q8_0, usize::MAX, 32, &[]).is_err());
}

#[test]
fn relative_error_from_activation_quantization_is_small() {
    let (n, k, m) = (64, 576, 4);
    for &f in &FORMATS {
        let w = QMatrix::quantize(f, &random(n * k, 11), n, k).unwrap();
        let deq = w.dequantize();
        let x = random(m * k, 12);
        let mut got = vec![0.0; m * n];
        w.forward(&x, m, &mut got);
        let want: Vec<f32> =
            (0..m * n).map(|i| (0..k).map(|e| x[(i / n) * k + e] * deq[(i % n) * k + e]).sum()).collect();
        let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // 8-bit activations: each x is off by up to amax/254, so over k = 576 uniform terms the
        // error's deviation is ~0.4 % of the output rms; the worst of 256 outputs stays under 2 %.
        assert!(worst <= 0.02 * rms, "{f:?}: max error {worst} vs output rms {rms}");
    }
}
