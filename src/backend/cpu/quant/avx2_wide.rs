//! AVX2 kernels for 16-bit activations ([`super::activations::ActPrecision::I16`]): the layout and
//! tiles of [`super::avx2`] (8 weight rows per register, one output per lane), with each 4-byte
//! weight piece widened to its even and odd bytes as 16-bit pairs and multiplied by `vpmaddwd`
//! with a broadcast pair of activations (stored `0, 2, 1, 3` per group of 4 for that).
//!
//! Each lane runs the reference's sequence for its output ([`super::scalar`]): the exact integer
//! block sum, then `fma(dw·dx, isum, acc)` and, for Q4_1, `fma(mw, sx, acc)`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::format::{FQ4_0, FQ4_1, FQ8_0, QFormat, QK};
use super::layout::GROUP;
use super::qmatrix::{QData, XRef};

/// Activation rows per tile (16 ymm registers: C integer sums, C accumulators, widened pieces).
const CT: usize = 4;

/// The 16-bit pair at `p` broadcast to every 32-bit lane.
///
/// # Safety
/// `p` points at 2 readable `i16`; AVX is enabled in the caller.
#[inline(always)]
unsafe fn bcast2(p: *const i16) -> __m256i {
    // SAFETY: per the contract above.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>())) }
}

/// 8 weight rows from `lane0` (a multiple of 8) × `C` activation rows over every block; outputs of
/// rows outside `rows` are not written.
// `c` indexes the accumulators and the activation rows alike: a range reads clearer than iterators.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
fn tile<const F: u8, const C: usize>(
    w: &QData,
    lane0: usize,
    x: &XRef<'_>,
    c0: usize,
    rows: &Range<usize>,
    out: &mut [f32],
) {
    let (nb, qsb, nbp) = (w.nb, w.qs_bytes, x.q.nbp);
    let (g, half) = (lane0 / GROUP, lane0 % GROUP);
    assert!(
        x.q.wide
            && (g + 1) * nb * GROUP * qsb <= w.qs.len()
            && (g + 1) * nb * GROUP <= w.d.len()
            && (F != FQ4_1 || (g + 1) * nb * GROUP <= w.mins.len())
            && c0 + C <= x.m
            && x.q.qs16.len() >= x.m * nb * QK
            && x.q.d.len() >= x.m * nbp
            && x.q.s.len() >= x.m * nbp
            && (F != FQ4_0 || x.q.corr.len() >= x.m * nbp),
        "quant tile out of range"
    );
    // SAFETY (pointer arithmetic below): every offset stays inside the ranges asserted above.
    let wq = w.qs[g * nb * GROUP * qsb + 4 * half..].as_ptr();
    let wd = w.d[g * nb * GROUP + half..].as_ptr();
    let wm = if F == FQ4_1 { w.mins[g * nb * GROUP + half..].as_ptr() } else { wd };
    let xq = x.q.qs16.as_ptr();
    let m4 = _mm256_set1_epi16(0x000F);
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        // SAFETY: block b < nb of group g and activation rows c0 + c < m (asserted); 4-byte reads
        // of activations stay inside each block's 32 values.
        unsafe {
            let wb = wq.add(b * GROUP * qsb);
            let xrow = xq.add((c0 * nb + b) * QK);
            let mut isum = [_mm256_setzero_si256(); C];
            if F == FQ4_0 {
                for c in 0..C {
                    isum[c] = _mm256_set1_epi32(*x.q.corr.as_ptr().add((c0 + c) * nbp + b));
                }
            }
            let pieces = if F == FQ8_0 { 8 } else { 4 };
            for t in 0..pieces {
                let v = _mm256_loadu_si256(wb.add(t * 4 * GROUP).cast());
                let (e0, o0) = if F == FQ8_0 {
                    (_mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), _mm256_srai_epi16(v, 8))
                } else {
                    (_mm256_and_si256(v, m4), _mm256_and_si256(_mm256_srli_epi16(v, 8), m4))
                };
                for c in 0..C {
                    let xc = xrow.add(c * nb * QK + 4 * t);
                    let p =
                        _mm256_add_epi32(_mm256_madd_epi16(e0, bcast2(xc)), _mm256_madd_epi16(o0, bcast2(xc.add(2))));
                    isum[c] = _mm256_add_epi32(isum[c], p);
                }
                if F != FQ8_0 {
                    let e1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    let o1 = _mm256_srli_epi16(v, 12);
                    for c in 0..C {
                        let xc = xrow.add(c * nb * QK + 16 + 4 * t);
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(e1, bcast2(xc)),
                            _mm256_madd_epi16(o1, bcast2(xc.add(2))),
                        );
                        isum[c] = _mm256_add_epi32(isum[c], p);
                    }
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(wd.add(b * GROUP).cast()));
            let mw = if F == FQ4_1 { _mm256_cvtph_ps(_mm_loadu_si128(wm.add(b * GROUP).cast())) } else { dw };
            for c in 0..C {
                let at = (c0 + c) * nbp + b;
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(*x.q.d.as_ptr().add(at)));
                acc[c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum[c]), acc[c]);
                if F == FQ4_1 {
                    acc[c] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*x.q.s.as_ptr().add(at)), acc[c]);
                }
            }
        }
    }
    super::avx2::store::<C>(&acc, lane0, c0, rows, out);
}

/// Every tile of weight rows `rows` × all activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_f<const F: u8>(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    let mut lane0 = rows.start / 8 * 8;
    while lane0 < rows.end {
        let mut c = 0;
        while c < x.m {
            match (x.m - c).min(CT) {
                4 => tile::<F, 4>(w, lane0, x, c, &rows, out),
                3 => tile::<F, 3>(w, lane0, x, c, &rows, out),
                2 => tile::<F, 2>(w, lane0, x, c, &rows, out),
                _ => tile::<F, 1>(w, lane0, x, c, &rows, out),
            }
            c += CT;
        }
        lane0 += 8;
    }
}

/// AVX2 outputs for weight rows `rows` with 16-bit activations (layout as
/// [`super::scalar::rows`]); F16 weights take [`super::avx2::rows`] (f32 activations).
pub(crate) fn rows(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    if w.format == QFormat::F16 {
        return super::avx2::rows(w, rows, x, out);
    }
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
        return super::scalar::rows(w, rows, x, out);
    }
    // SAFETY: the features `rows_f` is compiled for were detected above.
    unsafe {
        match w.format {
            QFormat::Q8_0 => rows_f::<FQ8_0>(w, rows, x, out),
            QFormat::Q4_0 => rows_f::<FQ4_0>(w, rows, x, out),
            QFormat::Q4_1 => rows_f::<FQ4_1>(w, rows, x, out),
            QFormat::F16 => {}
        }
    }
}
