//! Widening half-precision values to f32 in bulk (an f16 K/V cache read by attention): AVX-512 or
//! F16C conversions inlined in a loop, picked by the instruction set in force; `half`'s conversion
//! on the baseline. Every path is exact (each f16 is an f32), so the choice changes no result.

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::isa::Isa;

/// Writes `src` widened to f32 into `dst[..src.len()]` (`dst` at least as long), with the
/// conversions of `level` (no higher than the CPU's: pass [`super::isa::isa`] or lower).
#[inline]
pub fn widen(level: Isa, src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: callers pass `isa()` or lower, and `isa()` never reports a level the CPU lacks.
        Isa::Avx512 => return unsafe { widen_avx512(src, dst) },
        // SAFETY: F16C is checked here (AVX2 machines have it in practice, but it is its own flag).
        Isa::Avx2 if std::arch::is_x86_feature_detected!("f16c") => return unsafe { widen_f16c(src, dst) },
        _ => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,f16c")]
fn widen_avx512(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256, _mm512_cvtph_ps, _mm512_storeu_ps};
    let mut s = src.chunks_exact(16);
    let mut d = dst.chunks_exact_mut(16);
    for (s, d) in (&mut s).zip(&mut d) {
        // SAFETY: `s` holds 16 f16 (32 bytes, an unaligned load) and `d` 16 f32 (64 bytes).
        unsafe { _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast::<__m256i>()))) };
    }
    for (o, x) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *o = x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let mut s = src.chunks_exact(8);
    let mut d = dst.chunks_exact_mut(8);
    for (s, d) in (&mut s).zip(&mut d) {
        // SAFETY: `s` holds 8 f16 (16 bytes, an unaligned load) and `d` 8 f32 (32 bytes).
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast::<__m128i>()))) };
    }
    for (o, x) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *o = x.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::isa::isa;

    #[test]
    fn every_level_widens_every_half_exactly() {
        // All 65536 bit patterns (NaNs compared by bits), at an odd length for the remainders.
        let src: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).chain([f16::ONE; 7]).collect();
        let want: Vec<u32> = src.iter().map(|x| x.to_f32().to_bits()).collect();
        for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= isa()) {
            let mut dst = vec![0f32; src.len() + 3];
            widen(level, &src, &mut dst);
            let got: Vec<u32> = dst[..src.len()].iter().map(|x| x.to_bits()).collect();
            let bad = got.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(bad, None, "{level:?}: first difference at {bad:?}");
            assert_eq!(&dst[src.len()..], &[0.0; 3]);
        }
    }
}
