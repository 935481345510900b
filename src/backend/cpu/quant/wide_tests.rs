//! Tests of the 16-bit activation mode ([`ActPrecision::I16`]): every SIMD kernel equals the
//! scalar reference bit for bit, results do not depend on the batch size or thread split, and
//! products are much closer to f32 products than with 8-bit activations.

use std::time::Duration;

use super::activations::{QActs, wide_pos};
use super::format::QK;
use super::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

const FORMATS: [QFormat; 4] = [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1, QFormat::F16];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_isa_equals_the_scalar_reference_bit_for_bit_with_16_bit_activations() {
    let pool = QuantPool::new(1, Duration::ZERO);
    for &(n, k) in &[(13usize, 576usize), (7, 32), (9, 96), (33, 256), (6, 2080)] {
        for (fi, &f) in FORMATS.iter().enumerate() {
            let w =
                QMatrix::quantize(f, &random(n * k, 21 + fi as u64), n, k).unwrap().with_activations(ActPrecision::I16);
            for m in [1usize, 2, 3, 4, 5, 8, 9, 17] {
                let mut x = random(m * k, 200 + m as u64);
                // One block dominated by a large value (most of its others quantize to ±1..3).
                x[1] = 1e4;
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
fn a_q8_0_byte_of_minus_128_is_exact_in_every_kernel() {
    // d = 1, every weight byte -128, activations at ±32767 after quantization.
    let d = half::f16::from_f32(1.0).to_le_bytes();
    let block: Vec<u8> = [&d[..], &[0x80u8; QK][..]].concat();
    let bytes: Vec<u8> = (0..16).flat_map(|_| block.clone()).collect();
    let w = QMatrix::from_gguf_bytes(QFormat::Q8_0, 16, QK, &bytes).unwrap().with_activations(ActPrecision::I16);
    let x: Vec<f32> = (0..QK).map(|e| if e % 3 == 0 { -1.0 } else { 1.0 }).collect();
    let want: f32 = x.iter().map(|v| -128.0 * v).sum();
    let pool = QuantPool::new(1, Duration::ZERO);
    for isa in QuantIsa::available() {
        let mut got = vec![0.0; 16];
        w.forward_with(isa, &pool, &x, 1, &mut got);
        assert_eq!(got, vec![want; 16], "{isa:?}");
    }
}

#[test]
fn outputs_do_not_depend_on_batch_size_or_threads_with_16_bit_activations() {
    let (n, k) = (200, 512);
    let single = QuantPool::new(1, Duration::ZERO);
    let multi = QuantPool::new(3, Duration::from_micros(50));
    for &f in &FORMATS {
        let w = QMatrix::quantize(f, &random(n * k, 7), n, k).unwrap().with_activations(ActPrecision::I16);
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
fn sixteen_bit_activations_are_far_closer_to_f32_products() {
    let (n, k, m) = (64, 576, 4);
    for &f in &[QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1] {
        let w8 = QMatrix::quantize(f, &random(n * k, 11), n, k).unwrap();
        let w16 = w8.with_activations(ActPrecision::I16);
        assert_eq!((w8.activations(), w16.activations()), (ActPrecision::I8, ActPrecision::I16));
        let deq = w8.dequantize();
        let x = random(m * k, 12);
        let want: Vec<f64> =
            (0..m * n).map(|i| (0..k).map(|e| x[(i / n) * k + e] as f64 * deq[(i % n) * k + e] as f64).sum()).collect();
        let rms = (want.iter().map(|v| v * v).sum::<f64>() / want.len() as f64).sqrt();
        let worst = |w: &QMatrix| {
            let mut got = vec![0.0; m * n];
            w.forward(&x, m, &mut got);
            got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max)
        };
        let (e8, e16) = (worst(&w8), worst(&w16));
        // Each activation is off by up to amax/65534 instead of amax/254: ~258 times less; what is
        // left is f32 rounding of the block sums.
        assert!(e16 <= 2e-4 * rms, "{f:?}: 16-bit max error {e16} vs output rms {rms}");
        assert!(e16 * 50.0 <= e8, "{f:?}: 16-bit error {e16} not far below 8-bit error {e8}");
    }
}

#[test]
fn the_16_bit_block_quantizer_rounds_half_to_even_and_reorders_pairs() {
    assert_eq!((0..8).map(wide_pos).collect::<Vec<_>>(), [0, 2, 1, 3, 4, 6, 5, 7]);
    // amax 32767: d = 1, values are their own quantization; halves round to even.
    let mut x: Vec<f32> = (0..QK).map(|e| e as f32 - 16.0).collect();
    x[0] = 32767.0;
    x[1] = 2.5;
    x[2] = -3.5;
    x[3] = f32::NAN;
    let mut q = QActs::default();
    q.quantize_with(&x, 1, QK, QFormat::Q4_1, ActPrecision::I16);
    assert!(q.wide && q.qs.is_empty());
    assert_eq!(q.d[0], 1.0);
    let want: Vec<i32> = (0..QK)
        .map(|e| match e {
            0 => 32767,
            1 => 2,
            2 => -4,
            3 => 0,
            _ => e as i32 - 16,
        })
        .collect();
    let got: Vec<i32> = (0..QK).map(|e| q.value(0, 0, e)).collect();
    assert_eq!(got, want);
    assert_eq!(q.s[0], want.iter().sum::<i32>() as f32);
    // An infinite value zeroes its block, as the 8-bit quantizer does.
    x[5] = f32::INFINITY;
    q.quantize_with(&x, 1, QK, QFormat::Q4_1, ActPrecision::I16);
    assert!((0..QK).all(|e| q.value(0, 0, e) == 0));
}
