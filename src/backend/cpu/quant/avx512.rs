//! AVX-512 VNNI kernels: `vpdpbusd` with the AVX2 kernel's 8-lane layout and reduction order, so
//! the results are bit-identical to it. One activation row runs on 256-bit registers; several run
//! in 4 × 4 tiles on 512-bit registers, each holding the 8 lanes of two weight rows ([`wide`]).
//!
//! Q4_0 and Q8_0 start each block's accumulator at the activation's precomputed lane correction
//! (`−8·Σq` or `−128·Σq`), Q8_0 weights are offset to unsigned by `w ^ 0x80`: one instruction per
//! block and activation row.

use std::arch::x86_64::*;

use super::avx2::quant_kernels;

/// Loads one weight block as unsigned bytes (Q8_0 offset by 128; Q4_x nibbles).
///
/// # Safety
/// `b` points at the block's 32 (Q8_0) or 16 (Q4) bytes; AVX2 is enabled in the caller.
#[inline(always)]
unsafe fn load_w<const F: u8>(b: *const u8) -> (__m256i, __m256i) {
    // SAFETY: per the contract above.
    unsafe {
        if F == super::format::FQ8_0 {
            let w = _mm256_loadu_si256(b.cast());
            (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), _mm256_setzero_si256())
        } else {
            let v = _mm_loadu_si128(b.cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
            (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_setzero_si256())
        }
    }
}

/// 8 lane sums of one block's integer dot product, corrections included.
///
/// # Safety
/// `corr` points at 8 i32 unless F is Q4_1; AVX512-VNNI and AVX512VL are enabled in the caller.
#[inline(always)]
unsafe fn dot<const F: u8>(w: (__m256i, __m256i), xv: __m256i, corr: *const i32) -> __m256i {
    // SAFETY: per the contract above.
    unsafe {
        let start = if F == super::format::FQ4_1 { _mm256_setzero_si256() } else { _mm256_loadu_si256(corr.cast()) };
        _mm256_dpbusd_epi32(start, w.0, xv)
    }
}

quant_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", load_w, dot, 4, 4, full_tile);

/// The full multi-row tile: 4 weight rows × 4 activation rows on 512-bit registers.
#[inline(always)]
fn full_tile<const F: u8>(w: &QData, x: &XRef<'_>, t: Tile, out: &mut [f32], dd: &mut [f32], mwf: &mut [f32]) {
    // SAFETY: only reached from `rows_all`, compiled for (and called after detecting) these
    // features.
    unsafe { wide::<F, 2, 4>(w, x, t, out, dd, mwf) }
}

/// Two weight rows' block `b` in one register: lanes 0–7 row `r`, lanes 8–15 row `r + 1` (as
/// [`load_w`] lays out one row).
///
/// # Safety
/// `a` and `b` point at the two blocks' bytes; the features of [`wide`] are enabled.
#[inline(always)]
unsafe fn load_w2<const F: u8>(a: *const u8, b: *const u8) -> __m512i {
    // SAFETY: per the contract above.
    unsafe {
        if F == super::format::FQ8_0 {
            let v = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256(a.cast())),
                _mm256_loadu_si256(b.cast()),
                1,
            );
            _mm512_xor_si512(v, _mm512_set1_epi8(-128))
        } else {
            let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(a.cast()));
            let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(b.cast()));
            let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            // 16-bit lanes of the 128-bit quarters 1 and 3 shift by 4 (the high nibbles).
            let shift = _mm512_set_epi64(
                0x0004_0004_0004_0004,
                0x0004_0004_0004_0004,
                0,
                0,
                0x0004_0004_0004_0004,
                0x0004_0004_0004_0004,
                0,
                0,
            );
            _mm512_and_si512(_mm512_srlv_epi16(v, shift), _mm512_set1_epi8(0x0F))
        }
    }
}

/// `2·P` weight rows × `C` activation rows with each register holding two weight rows' 8 lanes
/// for one activation row: per block and register one `vpdpbusd`, one conversion, one scale
/// product and one FMA for two outputs. Each output's lanes see exactly the operations of the
/// 256-bit tile (and the reference), in the same order.
// `c` indexes the accumulators and the activation rows alike: a range reads clearer than iterators.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn wide<const F: u8, const P: usize, const C: usize>(
    w: &QData,
    x: &XRef<'_>,
    t: Tile,
    out: &mut [f32],
    dd: &mut [f32],
    mwf: &mut [f32],
) {
    let r_n = 2 * P;
    let (nb, qsb, nbp) = (w.nb, w.qs_bytes, x.q.nbp);
    assert!(t.r0 + r_n <= w.n && t.c0 + C <= x.m && dd.len() >= r_n * SEG, "quant tile out of range");
    if F == FQ4_1 {
        mins_f32(w, t.r0, r_n, nbp, mwf);
    }
    assert!(w.qs.len() >= w.n * nb * qsb && x.q.qs.len() >= x.m * nb * QK && x.q.d.len() >= x.m * nbp);
    assert!(F == FQ4_1 || x.q.corr.len() >= x.m * nb * 8);
    let wq = w.qs.as_ptr();
    let xq = x.q.qs.as_ptr();
    let xd = x.q.d.as_ptr();
    let xc = x.q.corr.as_ptr();
    let dwp = dd.as_mut_ptr();
    let mut acc = [[_mm512_setzero_ps(); C]; P];
    let mut s0 = 0;
    while s0 < nb {
        let sl = (nb - s0).min(SEG);
        // The weight scales of the segment as f32, `dwp[r * SEG + i]`.
        for r in 0..r_n {
            let mut g = 0;
            while g < sl {
                let gl = (sl - g).min(8);
                let at = (t.r0 + r) * nb + s0 + g;
                // SAFETY: g + 8 <= SEG: inside row r's SEG slots of `dd` (r < 2P, asserted).
                unsafe { _mm256_storeu_ps(dwp.add(r * SEG + g), cvt8(&w.d[at..at + gl])) };
                g += 8;
            }
        }
        for i in 0..sl {
            let b = s0 + i;
            let mut wz = [_mm512_setzero_si512(); P];
            let mut dw = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let (ra, rb) = (t.r0 + 2 * p, t.r0 + 2 * p + 1);
                // SAFETY: rows ra, rb < n and block b < nb (asserted); `dwp` slots were written
                // above for i < sl.
                unsafe {
                    wz[p] = load_w2::<F>(wq.add((ra * nb + b) * qsb), wq.add((rb * nb + b) * qsb));
                    let lo = _mm256_broadcast_ss(&*dwp.add(2 * p * SEG + i));
                    let hi = _mm256_broadcast_ss(&*dwp.add((2 * p + 1) * SEG + i));
                    dw[p] = _mm512_castpd_ps(_mm512_insertf64x4(
                        _mm512_castps_pd(_mm512_castps256_ps512(lo)),
                        _mm256_castps_pd(hi),
                        1,
                    ));
                }
            }
            for c in 0..C {
                let at = (t.c0 + c) * nb + b;
                // SAFETY: row t.c0 + c < m and block b < nb: inside the activations (asserted);
                // `corr` only read for Q4_0/Q8_0.
                unsafe {
                    let xz = _mm512_broadcast_i64x4(_mm256_loadu_si256(xq.add(at * QK).cast()));
                    let dx = _mm512_set1_ps(*xd.add((t.c0 + c) * nbp + b));
                    let start = if F == FQ4_1 {
                        _mm512_setzero_si512()
                    } else {
                        _mm512_broadcast_i64x4(_mm256_loadu_si256(xc.add(at * 8).cast()))
                    };
                    for p in 0..P {
                        let isum = _mm512_dpbusd_epi32(start, wz[p], xz);
                        let d = _mm512_mul_ps(dw[p], dx);
                        acc[p][c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(isum), acc[p][c]);
                    }
                }
            }
        }
        s0 += sl;
    }
    for p in 0..P {
        for c in 0..C {
            let mut v = hsum2(acc[p][c]);
            if F == FQ4_1 {
                // Minimum term of both rows at once: lane b % 8 of each half takes block b, as the
                // reference.
                let mut macc = _mm512_setzero_ps();
                let xs = &x.q.row_s_padded(t.c0 + c)[..nbp];
                let (ma, mb) = (&mwf[2 * p * nbp..(2 * p + 1) * nbp], &mwf[(2 * p + 1) * nbp..(2 * p + 2) * nbp]);
                for ((a8, b8), s8) in ma.chunks_exact(8).zip(mb.chunks_exact(8)).zip(xs.chunks_exact(8)) {
                    // SAFETY: each chunk holds 8 f32.
                    unsafe {
                        let m = _mm512_castpd_ps(_mm512_insertf64x4(
                            _mm512_castps_pd(_mm512_castps256_ps512(_mm256_loadu_ps(a8.as_ptr()))),
                            _mm256_castps_pd(_mm256_loadu_ps(b8.as_ptr())),
                            1,
                        ));
                        let sx =
                            _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(s8.as_ptr()))));
                        macc = _mm512_fmadd_ps(m, sx, macc);
                    }
                }
                let mv = hsum2(macc);
                v = [v[0] + mv[0], v[1] + mv[1]];
            }
            out[(t.c0 + c) * t.len + t.r0 + 2 * p - t.rstart] = v[0];
            out[(t.c0 + c) * t.len + t.r0 + 2 * p + 1 - t.rstart] = v[1];
        }
    }
}

/// The fixed 8-lane horizontal sum ([`hsum`]'s order) of both 256-bit halves at once.
#[inline(always)]
fn hsum2(v: __m512) -> [f32; 2] {
    // SAFETY: only inlined into functions compiled with AVX-512F enabled and called after
    // detection.
    unsafe {
        // Lanes j and j + 4 of each half: [a0+a4, a1+a5, a2+a6, a3+a7] in every 128-bit quarter.
        let s4 = _mm512_add_ps(v, _mm512_shuffle_f32x4::<0b10_11_00_01>(v, v));
        // [s0+s2, s1+s3, ..] per quarter, then their sum in lane 0 of each quarter.
        let s2 = _mm512_add_ps(s4, _mm512_permute_ps::<0b11_10_11_10>(s4));
        let s1 = _mm512_add_ps(s2, _mm512_permute_ps::<0b01_01_01_01>(s2));
        let hi = _mm512_extractf32x4_ps::<2>(s1);
        [_mm512_cvtss_f32(s1), _mm_cvtss_f32(hi)]
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
