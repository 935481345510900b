//! AVX-512 VNNI kernels: one output per 32-bit lane, a whole interleaved group of 16 weight rows
//! ([`super::layout`]) per 512-bit register, one `vpdpbusd` per 4-byte piece of the activation
//! block (broadcast) for 16 outputs at once.
//!
//! A tile is 16 weight rows × up to 8 activation rows: a block's 16 rows are loaded and unpacked
//! once (8 registers) and reused for every activation row of the tile. Each lane runs the
//! reference's sequence for its output ([`super::scalar`]): the exact integer block sum, then
//! `fma(dw·dx, isum, acc)` and, for Q4_1, `fma(mw, sx, acc)`. Q4_0 and Q8_0 weights enter as
//! unsigned bytes (nibbles; Q8_0 offset by `w ^ 0x80`), and each block's sum starts at the
//! activation's integer correction (`−8·Σq` or `−128·Σq`), so the integer result is exact.

use std::arch::x86_64::*;
use std::ops::Range;

use super::format::{FQ4_0, FQ4_1, FQ8_0, QFormat, QK};
use super::layout::GROUP;
use super::qmatrix::{QData, XRef};

/// Activation rows per tile (32 zmm registers: 8 weight pieces, 8 accumulators, temporaries).
const CT: usize = 8;

/// 4 activation bytes at `p` broadcast to every 32-bit lane.
///
/// # Safety
/// `p` points at 4 readable bytes; AVX-512F is enabled in the caller.
#[inline(always)]
unsafe fn bcast4(p: *const i8) -> __m512i {
    // SAFETY: per the contract above.
    unsafe { _mm512_set1_epi32(std::ptr::read_unaligned(p.cast::<i32>())) }
}

/// Group `g`'s 16 weight rows × `C` activation rows over every block; outputs of rows outside
/// `rows` (group padding, neighbours' rows) are not written.
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
        (g + 1) * nb * GROUP * qsb <= w.qs.len()
            && (g + 1) * nb * GROUP <= w.d.len()
            && (F != FQ4_1 || (g + 1) * nb * GROUP <= w.mins.len())
            && c0 + C <= x.m
            && x.q.qs.len() >= x.m * nb * QK
            && x.q.d.len() >= x.m * nbp
            && x.q.s.len() >= x.m * nbp
            && (F == FQ4_1 || x.q.corr.len() >= x.m * nbp),
        "quant tile out of range"
    );
    // SAFETY (pointer arithmetic below): every offset stays inside the ranges asserted above:
    // group g's blocks, activation rows c0..c0 + C.
    let wq = w.qs[g * nb * GROUP * qsb..].as_ptr();
    let wd = w.d[g * nb * GROUP..].as_ptr();
    let wm = if F == FQ4_1 { w.mins[g * nb * GROUP..].as_ptr() } else { wd };
    let xq = x.q.qs.as_ptr();
    let m4 = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); C];
    // The group's first tile asks for the next group's pieces of the same block: the weights
    // stream from memory once per step, and this keeps a group's worth of loads in flight.
    let ahead = c0 == 0
        && (g + 2) * nb * GROUP * qsb <= w.qs.len()
        && (g + 2) * nb * GROUP <= w.d.len()
        && (F != FQ4_1 || (g + 2) * nb * GROUP <= w.mins.len());
    for b in 0..nb {
        if ahead {
            // SAFETY: group g + 1 exists (checked above), so these addresses are inside the
            // fields; a prefetch never faults nor writes.
            unsafe {
                let next = wq.add((nb + b) * GROUP * qsb);
                for l in (0..GROUP * qsb).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(l).cast());
                }
                _mm_prefetch::<_MM_HINT_T0>(wd.add((nb + b) * GROUP).cast());
                if F == FQ4_1 {
                    _mm_prefetch::<_MM_HINT_T0>(wm.add((nb + b) * GROUP).cast());
                }
            }
        }
        // SAFETY: block b < nb of group g and activation rows c0 + c < m (asserted); 4-byte reads
        // of activations stay inside each block's 32 bytes.
        unsafe {
            let wb = wq.add(b * GROUP * qsb);
            let mut wv = [_mm512_setzero_si512(); 8];
            if F == FQ8_0 {
                for (t, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_xor_si512(_mm512_loadu_si512(wb.add(t * 4 * GROUP).cast()), _mm512_set1_epi8(-128));
                }
            } else {
                for t in 0..4 {
                    let v = _mm512_loadu_si512(wb.add(t * 4 * GROUP).cast());
                    wv[t] = _mm512_and_si512(v, m4);
                    wv[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(wd.add(b * GROUP).cast()));
            let mw = if F == FQ4_1 { _mm512_cvtph_ps(_mm256_loadu_si256(wm.add(b * GROUP).cast())) } else { dw };
            let xrow = xq.add((c0 * nb + b) * QK);
            for c in 0..C {
                let xc = xrow.add(c * nb * QK);
                let at = (c0 + c) * nbp + b;
                let start =
                    if F == FQ4_1 { _mm512_setzero_si512() } else { _mm512_set1_epi32(*x.q.corr.as_ptr().add(at)) };
                // Two chains (even and odd pieces) for latency; integer sums are exact in any order.
                let mut s0 = _mm512_dpbusd_epi32(start, wv[0], bcast4(xc));
                let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[1], bcast4(xc.add(4)));
                for t in (2..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, wv[t], bcast4(xc.add(4 * t)));
                    s1 = _mm512_dpbusd_epi32(s1, wv[t + 1], bcast4(xc.add(4 * t + 4)));
                }
                let isum = _mm512_add_epi32(s0, s1);
                let dd = _mm512_mul_ps(dw, _mm512_set1_ps(*x.q.d.as_ptr().add(at)));
                acc[c] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum), acc[c]);
                if F == FQ4_1 {
                    acc[c] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x.q.s.as_ptr().add(at)), acc[c]);
                }
            }
        }
    }
    store::<C>(&acc, g, c0, rows, out);
}

/// Writes the lanes of group `g`'s rows inside `rows`: `out[c · rows.len() + r − rows.start]`.
#[inline(always)]
pub(super) fn store<const C: usize>(acc: &[__m512; C], g: usize, c0: usize, rows: &Range<usize>, out: &mut [f32]) {
    let len = rows.len();
    for (c, a) in acc.iter().enumerate() {
        let mut v = [0.0f32; GROUP];
        // SAFETY: `v` holds 16 f32; AVX-512F is enabled in every caller.
        unsafe { _mm512_storeu_ps(v.as_mut_ptr(), *a) };
        for (i, &y) in v.iter().enumerate() {
            let r = g * GROUP + i;
            if rows.contains(&r) {
                out[(c0 + c) * len + r - rows.start] = y;
            }
        }
    }
}

/// Every tile of weight rows `rows` × all activation rows: each group's blocks stay in L1 while
/// the activation rows stream past.
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
