//! AVX2 kernels: one output per 32-bit lane, 8 weight rows (half an interleaved group of
//! [`super::layout`]) per register, `vpmaddubsw`/`vpmaddwd` integer dots against broadcast
//! 4-byte pieces of the activation block, F16C scale conversion.
//!
//! A tile is 8 weight rows × `C` activation rows: each block's weights are unpacked once per tile
//! and reused for `C` activation rows. Every lane runs the reference's sequence for its output
//! ([`super::scalar`]): the exact integer block sum, then `fma(dw·dx, isum, acc)` (and the Q4_1
//! minimum term), so tiling and threading never change a result.

use std::arch::x86_64::*;
use std::ops::Range;

use half::f16;

use super::format::{FQ4_0, FQ4_1, FQ8_0, QFormat, QK};
use super::layout::GROUP;
use super::qmatrix::{QData, XRef};

/// Activation rows per tile (16 ymm registers: 2 weight pieces, 2·C accumulators, temporaries).
const CT: usize = 4;

/// The fixed 8-lane horizontal sum (same order as `scalar::hsum8`).
#[inline(always)]
fn hsum(v: __m256) -> f32 {
    // SAFETY: only inlined into functions compiled with AVX enabled and called after detection.
    unsafe {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }
}

/// 4 activation bytes at `p` broadcast to every 32-bit lane.
///
/// # Safety
/// `p` points at 4 readable bytes; AVX is enabled in the caller.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m256i {
    // SAFETY: per the contract above.
    unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>())) }
}

/// 8 weight rows × `C` activation rows over every block. `lane0` is the tile's first weight row
/// (a multiple of 8); outputs of rows outside `rows` (group padding, neighbours' rows) are not
/// written.
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
        (g + 1) * nb * GROUP * qsb <= w.qs.len()
            && (g + 1) * nb * GROUP <= w.d.len()
            && (F != FQ4_1 || (g + 1) * nb * GROUP <= w.mins.len())
            && c0 + C <= x.m
            && x.q.qs.len() >= x.m * nb * QK
            && x.q.d.len() >= x.m * nbp
            && x.q.s.len() >= x.m * nbp
            && (F != FQ4_0 || x.q.corr.len() >= x.m * nbp),
        "quant tile out of range"
    );
    // SAFETY (pointer arithmetic below): every offset stays inside the ranges asserted above:
    // group g's blocks, activation rows c0..c0 + C.
    let wq = w.qs[g * nb * GROUP * qsb + 4 * half..].as_ptr();
    let wd = w.d[g * nb * GROUP + half..].as_ptr();
    let wm = if F == FQ4_1 { w.mins[g * nb * GROUP + half..].as_ptr() } else { wd };
    let xq = x.q.qs.as_ptr();
    let ones = _mm256_set1_epi16(1);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let mut isum = [_mm256_setzero_si256(); C];
        // SAFETY: block b < nb of group g and activation rows c0 + c < m (asserted); 4-byte reads
        // of activations are unaligned reads inside the block's 32 bytes.
        unsafe {
            let wb = wq.add(b * GROUP * qsb);
            let xrow = xq.add((c0 * nb + b) * QK);
            if F == FQ8_0 {
                for t in 0..8 {
                    let wv = _mm256_loadu_si256(wb.add(t * 4 * GROUP).cast());
                    let aw = _mm256_sign_epi8(wv, wv);
                    for c in 0..C {
                        let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(xrow.add(c * nb * QK + 4 * t)), wv));
                        isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(p, ones));
                    }
                }
            } else {
                // Pairs of nibble·activation products (≤ 2·15·127) summed 8 times stay below
                // 2^15: the 16-bit sums are exact.
                let mut p16 = [_mm256_setzero_si256(); C];
                for t in 0..4 {
                    let v = _mm256_loadu_si256(wb.add(t * 4 * GROUP).cast());
                    let lo = _mm256_and_si256(v, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                    for c in 0..C {
                        p16[c] =
                            _mm256_add_epi16(p16[c], _mm256_maddubs_epi16(lo, bcast4(xrow.add(c * nb * QK + 4 * t))));
                        p16[c] = _mm256_add_epi16(
                            p16[c],
                            _mm256_maddubs_epi16(hi, bcast4(xrow.add(c * nb * QK + 4 * (t + 4)))),
                        );
                    }
                }
                for c in 0..C {
                    isum[c] = _mm256_madd_epi16(p16[c], ones);
                    if F == FQ4_0 {
                        isum[c] =
                            _mm256_add_epi32(isum[c], _mm256_set1_epi32(*x.q.corr.as_ptr().add((c0 + c) * nbp + b)));
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
    store::<C>(&acc, lane0, c0, rows, out);
}

/// Writes the lanes of rows inside `rows`: `out[c · rows.len() + r − rows.start]`.
#[inline(always)]
pub(super) fn store<const C: usize>(acc: &[__m256; C], lane0: usize, c0: usize, rows: &Range<usize>, out: &mut [f32]) {
    let len = rows.len();
    for (c, a) in acc.iter().enumerate() {
        let mut v = [0.0f32; 8];
        // SAFETY: `v` holds 8 f32; AVX is enabled in every caller.
        unsafe { _mm256_storeu_ps(v.as_mut_ptr(), *a) };
        for (i, &y) in v.iter().enumerate() {
            let r = lane0 + i;
            if rows.contains(&r) {
                out[(c0 + c) * len + r - rows.start] = y;
            }
        }
    }
}

/// F16 weights times f32 activations, one output.
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_dot(w: &QData, r: usize, xr: &[f32]) -> f32 {
    let k = w.k;
    let row = &w.qs[r * k * 2..(r + 1) * k * 2];
    let mut acc = _mm256_setzero_ps();
    let mut e = 0;
    while e + 8 <= k {
        // SAFETY: 16 bytes (8 halves) and 8 f32 are in bounds: e + 8 <= k.
        let (wv, xv) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(row[2 * e..2 * e + 16].as_ptr().cast())),
                _mm256_loadu_ps(xr[e..e + 8].as_ptr()),
            )
        };
        acc = _mm256_fmadd_ps(wv, xv, acc);
        e += 8;
    }
    if e < k {
        let mut wv = [0.0f32; 8];
        let mut xv = [0.0f32; 8];
        for j in 0..k - e {
            wv[j] = f16::from_bits(u16::from_le_bytes([row[2 * (e + j)], row[2 * (e + j) + 1]])).to_f32();
            xv[j] = xr[e + j];
        }
        // SAFETY: both arrays hold 8 f32.
        let (wv, xv) = unsafe { (_mm256_loadu_ps(wv.as_ptr()), _mm256_loadu_ps(xv.as_ptr())) };
        acc = _mm256_fmadd_ps(wv, xv, acc);
    }
    hsum(acc)
}

/// Every tile of weight rows `rows` (starting at a group boundary) × all activation rows: each
/// 8-row weight slice stays in L1 while the activation rows stream past.
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

#[target_feature(enable = "avx2,fma,f16c")]
fn rows_all(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    match w.format {
        QFormat::Q8_0 => rows_f::<FQ8_0>(w, rows, x, out),
        QFormat::Q4_0 => rows_f::<FQ4_0>(w, rows, x, out),
        QFormat::Q4_1 => rows_f::<FQ4_1>(w, rows, x, out),
        QFormat::F16 => {
            let len = rows.len();
            let k = w.k;
            for c in 0..x.m {
                for r in rows.clone() {
                    out[c * len + r - rows.start] = f16_dot(w, r, &x.f[c * k..(c + 1) * k]);
                }
            }
        }
    }
}

/// AVX2 outputs for weight rows `rows` (layout as [`super::scalar::rows`]).
pub(crate) fn rows(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
        return super::scalar::rows(w, rows, x, out);
    }
    // SAFETY: the features `rows_all` is compiled for were detected above.
    unsafe { rows_all(w, rows, x, out) }
}
