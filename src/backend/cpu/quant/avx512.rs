//! AVX-512 VNNI kernels: `vpdpbusd` on 256-bit registers (AVX512VL), so the lane layout and the
//! reduction order are the AVX2 kernel's and the results are bit-identical to it.
//!
//! Q4_0 and Q8_0 start each block's accumulator at the activation's precomputed lane correction
//! (`−8·Σq` or `−128·Σq`), Q8_0 weights are offset to unsigned by `w ^ 0x80`: one instruction per
//! block and activation row.

use std::arch::x86_64::*;

use super::avx2::quant_kernels;

/// Loads one weight block as unsigned bytes (Q8_0 offset by 128; Q4_x nibbles).
#[inline(always)]
fn load_w<const F: u8>(b: &[u8]) -> (__m256i, __m256i) {
    // SAFETY: `b` holds the block's 32 (Q8_0) or 16 (Q4) bytes; AVX2 is enabled in every caller.
    unsafe {
        if F == super::format::FQ8_0 {
            let w = _mm256_loadu_si256(b[..32].as_ptr().cast());
            (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), _mm256_setzero_si256())
        } else {
            let v = _mm_loadu_si128(b[..16].as_ptr().cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
            (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_setzero_si256())
        }
    }
}

/// 8 lane sums of one block's integer dot product, corrections included.
#[inline(always)]
fn dot<const F: u8>(w: (__m256i, __m256i), xv: __m256i, corr: &[i32]) -> __m256i {
    // SAFETY: AVX512-VNNI and AVX512VL are enabled in every caller; `corr` holds 8 i32 unless F is
    // Q4_1.
    unsafe {
        let start = if F == super::format::FQ4_1 {
            _mm256_setzero_si256()
        } else {
            _mm256_loadu_si256(corr[..8].as_ptr().cast())
        };
        _mm256_dpbusd_epi32(start, w.0, xv)
    }
}

quant_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", load_w, dot);

/// AVX-512 VNNI outputs for weight rows `rows` (layout as [`super::scalar::rows`]).
pub(crate) fn rows(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    use std::arch::is_x86_feature_detected as has;
    let ok = has!("avx2")
        && has!("fma")
        && has!("f16c")
        && has!("avx512f")
        && has!("avx512bw")
        && has!("avx512vl")
        && has!("avx512vnni");
    if !ok {
        return super::avx2::rows(w, rows, x, out);
    }
    // SAFETY: the features `rows_all` is compiled for were detected above.
    unsafe { rows_all(w, rows, x, out) }
}
