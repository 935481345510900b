//! AVX-512 VNNI kernels for 16-bit activations ([`super::activations::ActPrecision::I16`]): the
//! layout and tiles of [`super::avx512`] (16 weight rows per 512-bit register, one output per
//! lane), with each 4-byte weight piece widened to two registers of 16-bit pairs — its even bytes
//! (elements 0 and 2 of the piece) and odd bytes (1 and 3) — and multiplied by `vpdpwssd` with a
//! broadcast pair of activations (stored `0, 2, 1, 3` per group of 4 for that).
//!
//! Each lane runs the reference's sequence for its output ([`super::scalar`]): the exact integer
//! block sum (Q4_0 starting at the activation's `−8·Σq` correction; Q8_0 sign-extended), then
//! `fma(dw·dx, isum, acc)` and, for Q4_1, `fma(mw, sx, acc)`.

use std::arch::x86_64::*;
use std::ops::Range;

use super::format::{FQ4_0, FQ4_1, FQ8_0, QFormat, QK};
use super::layout::GROUP;
use super::qmatrix::{QData, XRef};

/// Activation rows per tile (2 integer chains and 1 accumulator per row, 4 widened pieces).
const CT: usize = 8;

/// The 16-bit pair at `p` broadcast to every 32-bit lane.
///
/// # Safety
/// `p` points at 2 readable `i16`; AVX-512F is enabled in the caller.
#[inline(always)]
unsafe fn bcast2(p: *const i16) -> __m512i {
    // SAFETY: per the contract above.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>())) }
}

/// Group `g`'s 16 weight rows × `C` activation rows over every block; outputs of rows outside
/// `rows` are not written.
// `c` indexes the accumulators and the activation rows alike: a range reads clearer than iterators.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn tile<const F: u8, const C: usize>(
    w: &QData,
    g: usize,
    x: &XRef<'_>,
    c0: usize,
    rows: &Range<usize>,
    out: &mut [f32],
) {
    let (nb, qsb, nbp) = (w.nb, w.qs_bytes, x.q.nbp);
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
    // SAFETY (pointer arithmetic below): every offset stays inside the ranges asserted above:
    // group g's blocks, activation rows c0..c0 + C.
    let wq = w.qs[g * nb * GROUP * qsb..].as_ptr();
    let wd = w.d[g * nb * GROUP..].as_ptr();
    let wm = if F == FQ4_1 { w.mins[g * nb * GROUP..].as_ptr() } else { wd };
    let xq = x.q.qs16.as_ptr();
    let m4 = _mm512_set1_epi16(0x000F);
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..nb {
        // SAFETY: block b < nb of group g and activation rows c0 + c < m (asserted); 4-byte reads
        // of activations stay inside each block's 32 values.
        unsafe {
            let wb = wq.add(b * GROUP * qsb);
            let xrow = xq.add((c0 * nb + b) * QK);
            let mut s0 = [_mm512_setzero_si512(); C];
            let mut s1 = [_mm512_setzero_si512(); C];
            if F == FQ4_0 {
                for c in 0..C {
                    s0[c] = _mm512_set1_epi32(*x.q.corr.as_ptr().add((c0 + c) * nbp + b));
                }
            }
            // Widened pieces: (even, odd) 16-bit pairs of elements 4t.. and, for Q4_x, 16 + 4t...
            let pieces = if F == FQ8_0 { 8 } else { 4 };
            for t in 0..pieces {
                let v = _mm512_loadu_si512(wb.add(t * 4 * GROUP).cast());
                let (e0, o0) = if F == FQ8_0 {
                    (_mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8), _mm512_srai_epi16(v, 8))
                } else {
                    (_mm512_and_si512(v, m4), _mm512_and_si512(_mm512_srli_epi16(v, 8), m4))
                };
                for c in 0..C {
                    let xc = xrow.add(c * nb * QK + 4 * t);
                    s0[c] = _mm512_dpwssd_epi32(s0[c], e0, bcast2(xc));
                    s1[c] = _mm512_dpwssd_epi32(s1[c], o0, bcast2(xc.add(2)));
                }
                if F != FQ8_0 {
                    let e1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    let o1 = _mm512_srli_epi16(v, 12);
                    for c in 0..C {
                        let xc = xrow.add(c * nb * QK + 16 + 4 * t);
                        s0[c] = _mm512_dpwssd_epi32(s0[c], e1, bcast2(xc));
                        s1[c] = _mm512_dpwssd_epi32(s1[c], o1, bcast2(xc.add(2)));
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(wd.add(b * GROUP).cast()));
            let mw = if F == FQ4_1 { _mm512_cvtph_ps(_mm256_loadu_si256(wm.add(b * GROUP).cast())) } else { dw };
            for c in 0..C {
                let at = (c0 + c) * nbp + b;
                let isum = _mm512_add_epi32(s0[c], s1[c]);
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*x.q.d.as_ptr().add(at)));
                acc[c] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[c]);
                if F == FQ4_1 {
                    acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.q.s.as_ptr().add(at)), acc[c]);
                }
            }
        }
    }
    super::avx512::store::<C>(&acc, g, c0, rows, out);
}

/// Every tile of weight rows `rows` × all activation rows.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn rows_f<const F: u8>(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    for g in rows.start / GROUP..rows.end.div_ceil(GROUP) {
        let mut c = 0;
        while c < x.m {
            match (x.m - c).min(CT) {
                8 => tile::<F, 8>(w, g, x, c, &rows, out),
                7 => tile::<F, 7>(w, g, x, c, &rows, out),
                6 => tile::<F, 6>(w, g, x, c, &rows, out),
                5 => tile::<F, 5>(w, g, x, c, &rows, out),
                4 => tile::<F, 4>(w, g, x, c, &rows, out),
                3 => tile::<F, 3>(w, g, x, c, &rows, out),
                2 => tile::<F, 2>(w, g, x, c, &rows, out),
                _ => tile::<F, 1>(w, g, x, c, &rows, out),
            }
            c += CT;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn rows_all(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    match w.format {
        QFormat::Q8_0 => rows_f::<FQ8_0>(w, rows, x, out),
        QFormat::Q4_0 => rows_f::<FQ4_0>(w, rows, x, out),
        QFormat::Q4_1 => rows_f::<FQ4_1>(w, rows, x, out),
        QFormat::F16 => super::avx2::rows(w, rows, x, out),
    }
}

/// AVX-512 VNNI outputs for weight rows `rows` with 16-bit activations (layout as
/// [`super::scalar::rows`]).
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
        return super::avx2_wide::rows(w, rows, x, out);
    }
    // SAFETY: the features `rows_all` is compiled for were detected above.
    unsafe { rows_all(w, rows, x, out) }
}
