//! AVX2 kernels (`vpmaddubsw` + `vpmaddwd` integer dots, F16C scale conversion), and the tiled
//! loop shared with the AVX-512 VNNI kernels ([`quant_kernels!`]).
//!
//! A tile is `R` weight rows × `C` activation rows: each weight block is loaded and unpacked once per
//! tile and reused for `C` activation rows. Every output keeps its own accumulator, updated in
//! block order exactly as in [`super::scalar`], so tiling and threading never change a result.

use std::arch::x86_64::*;

/// Generates `rows` (and its helpers) for one target feature set from two inline helpers:
/// `$load_w::<F>(block: *const u8) -> (__m256i, __m256i)` and
/// `$dot::<F>(w, xv: __m256i, corr: *const i32) -> __m256i` (8 lane sums of a block), with
/// multi-row tiles of `$rt` weight rows × `$ct` activation rows, the full ones computed by
/// `$wide::<F>(w, x, tile, out, scale scratch, minimum scratch)` (in scope where the macro expands).
macro_rules! quant_kernels {
    ($feat:literal, $load_w:ident, $dot:ident, $rt:literal, $ct:literal, $wide:ident) => {
        use std::ops::Range;

        use half::f16;

        use super::format::{FQ4_0, FQ4_1, FQ8_0, QFormat, QK};
        use super::qmatrix::{QData, XRef};

        /// How many weight rows ahead a one-activation-row product prefetches.
        const PREFETCH_ROWS: usize = 8;

        /// The fixed 8-lane horizontal sum (same order as `scalar::hsum8`).
        #[inline(always)]
        fn hsum(v: __m256) -> f32 {
            // SAFETY: only inlined into functions compiled with AVX enabled and called after
            // detection.
            unsafe {
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
            }
        }

        /// 8 values from `src` (f16 bits or f32 via `conv`), zero-padded.
        #[inline(always)]
        fn pad8<T: Copy>(src: &[T], conv: impl Fn(T) -> f32) -> [f32; 8] {
            let mut a = [0.0f32; 8];
            for (o, &v) in a.iter_mut().zip(src) {
                *o = conv(v);
            }
            a
        }

        #[inline(always)]
        fn load8(a: &[f32; 8]) -> __m256 {
            // SAFETY: `a` holds 8 f32; AVX is enabled in every caller.
            unsafe { _mm256_loadu_ps(a.as_ptr()) }
        }

        /// 8 f16 values (bits) from `src` as f32 with F16C, zero-padded past `src.len()` (≤ 8).
        #[inline(always)]
        fn cvt8(src: &[u16]) -> __m256 {
            let mut a = [0u16; 8];
            let src = if src.len() >= 8 {
                &src[..8]
            } else {
                a[..src.len()].copy_from_slice(src);
                &a[..]
            };
            // SAFETY: `src` holds 8 u16 (16 bytes); F16C is enabled in every caller.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(src.as_ptr().cast())) }
        }

        /// 8 f32 from `src`, zero-padded past `src.len()` (≤ 8).
        #[inline(always)]
        fn ld8(src: &[f32]) -> __m256 {
            if src.len() >= 8 {
                // SAFETY: `src` holds at least 8 f32; AVX is enabled in every caller.
                unsafe { _mm256_loadu_ps(src.as_ptr()) }
            } else {
                load8(&pad8(src, |v| v))
            }
        }

        #[target_feature(enable = $feat)]
        fn tile<const F: u8, const R: usize, const C: usize>(
            w: &QData,
            r0: usize,
            x: &XRef<'_>,
            c0: usize,
            out: &mut [f32],
            len: usize,
            rstart: usize,
        ) {
            let nb = w.nb;
            let qsb = w.qs_bytes;
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            // Q4_1's minimum term, 8 lanes per output (block b in lane b % 8, as the reference).
            let mut macc = [[_mm256_setzero_ps(); C]; R];
            // No closures here: a closure would not inherit the target features, and its
            // intrinsics would turn into calls.
            let mut xq: [&[i8]; C] = [&[]; C];
            let mut xd: [&[f32]; C] = [&[]; C];
            let mut xs: [&[f32]; C] = [&[]; C];
            let mut xc: [&[i32]; C] = [&[]; C];
            for c in 0..C {
                xq[c] = x.q.row_qs(c0 + c);
                xd[c] = x.q.row_d(c0 + c);
                if F == FQ4_1 {
                    xs[c] = x.q.row_s(c0 + c);
                }
                xc[c] = x.q.row_corr(c0 + c);
            }
            let mut dd = [[[0.0f32; 8]; C]; R];
            let mut g = 0;
            while g < nb {
                let gl = (nb - g).min(8);
                let mut xd8 = [_mm256_setzero_ps(); C];
                let mut xs8 = [_mm256_setzero_ps(); C];
                for c in 0..C {
                    xd8[c] = ld8(&xd[c][g..g + gl]);
                    if F == FQ4_1 {
                        xs8[c] = ld8(&xs[c][g..g + gl]);
                    }
                }
                for r in 0..R {
                    let at = (r0 + r) * nb + g;
                    let dw = cvt8(&w.d[at..at + gl]);
                    let mw = if F == FQ4_1 { cvt8(&w.mins[at..at + gl]) } else { _mm256_setzero_ps() };
                    for c in 0..C {
                        // SAFETY: `dd[r][c]` holds 8 f32.
                        unsafe { _mm256_storeu_ps(dd[r][c].as_mut_ptr(), _mm256_mul_ps(dw, xd8[c])) };
                        if F == FQ4_1 {
                            macc[r][c] = _mm256_fmadd_ps(mw, xs8[c], macc[r][c]);
                        }
                    }
                }
                for i in 0..gl {
                    let b = g + i;
                    let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
                    for r in 0..R {
                        let at = ((r0 + r) * nb + b) * qsb;
                        // SAFETY: the slice check keeps the block's bytes in bounds.
                        wv[r] = unsafe { $load_w::<F>(w.qs[at..at + qsb].as_ptr()) };
                        if PREFETCH_ROWS > 0 && C == 1 {
                            // One activation row: the product streams the weight once, so ask for
                            // the rows a few tiles ahead (a hint: never faults, never changes a
                            // result; past the end it is simply wasted).
                            let ahead = w.qs.as_ptr().wrapping_add(at + PREFETCH_ROWS * nb * qsb);
                            _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                        }
                    }
                    for c in 0..C {
                        let xb = &xq[c][b * QK..b * QK + QK];
                        // SAFETY: `xb` holds 32 bytes.
                        let xv = unsafe { _mm256_loadu_si256(xb.as_ptr().cast()) };
                        let corr = if F == FQ4_1 { std::ptr::null() } else { xc[c][b * 8..b * 8 + 8].as_ptr() };
                        for r in 0..R {
                            // SAFETY: `corr` points at 8 i32 unless F is Q4_1 (then unused).
                            let p = unsafe { $dot::<F>(wv[r], xv, corr) };
                            let d = _mm256_set1_ps(dd[r][c][i]);
                            acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r][c]);
                        }
                    }
                }
                g += 8;
            }
            for r in 0..R {
                for c in 0..C {
                    let mut v = hsum(acc[r][c]);
                    if F == FQ4_1 {
                        v += hsum(macc[r][c]);
                    }
                    out[(c0 + c) * len + r0 + r - rstart] = v;
                }
            }
        }

        /// F16 weights times f32 activations, one output.
        #[target_feature(enable = $feat)]
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
                for (j, o) in wv.iter_mut().enumerate().take(k - e) {
                    *o = f16::from_bits(u16::from_le_bytes([row[2 * (e + j)], row[2 * (e + j) + 1]])).to_f32();
                }
                acc = _mm256_fmadd_ps(load8(&wv), load8(&pad8(&xr[e..], |v| v)), acc);
            }
            hsum(acc)
        }

        #[target_feature(enable = $feat)]
        fn rows_f<const F: u8>(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
            let len = rows.len();
            let m = x.m;
            if m == 1 {
                let mut r = rows.start;
                while r + 4 <= rows.end {
                    tile::<F, 4, 1>(w, r, x, 0, out, len, rows.start);
                    r += 4;
                }
                for r in r..rows.end {
                    tile::<F, 1, 1>(w, r, x, 0, out, len, rows.start);
                }
                return;
            }
            // Weight rows in panels that stay in L1 while every activation row streams past.
            const PANEL: usize = 16;
            // Scratch: scale products (R·C·SEG), then the tile rows' Q4_1 minimums as f32.
            let mut scratch = vec![0.0f32; $rt * $ct * SEG + $rt * x.q.nbp];
            let (dd, mwf) = scratch.split_at_mut($rt * $ct * SEG);
            let mut p = rows.start;
            while p < rows.end {
                let pe = (p + PANEL).min(rows.end);
                let mut c = 0;
                while c < m {
                    // Full tiles of $ct activation rows, then tails of at most 3.
                    let cn = if m - c >= $ct { $ct } else { (m - c).min(3) };
                    let mut r = p;
                    while r < pe {
                        let rn = if pe - r >= $rt { $rt } else { 1 };
                        let t = Tile { r0: r, c0: c, len, rstart: rows.start };
                        match (rn == $rt, cn) {
                            (true, $ct) => $wide::<F>(w, x, t, out, dd, mwf),
                            (true, 3) => multi::<F, $rt, 3>(w, x, t, out, dd, mwf),
                            (true, 2) => multi::<F, $rt, 2>(w, x, t, out, dd, mwf),
                            (true, _) => multi::<F, $rt, 1>(w, x, t, out, dd, mwf),
                            (false, $ct) => multi::<F, 1, $ct>(w, x, t, out, dd, mwf),
                            (false, 3) => multi::<F, 1, 3>(w, x, t, out, dd, mwf),
                            (false, 2) => multi::<F, 1, 2>(w, x, t, out, dd, mwf),
                            (false, _) => multi::<F, 1, 1>(w, x, t, out, dd, mwf),
                        }
                        r += rn;
                    }
                    c += cn;
                }
                p = pe;
            }
        }

        /// Where a multi-row tile sits: first weight row and activation row, and the output layout
        /// (`out[c * len + r - rstart]`).
        #[derive(Clone, Copy)]
        struct Tile {
            r0: usize,
            c0: usize,
            len: usize,
            rstart: usize,
        }

        /// Blocks a multi-row tile takes at once (its scale products fit `SEG` per output).
        const SEG: usize = 64;

        /// `R` weight rows × `C` activation rows (`C > 1` or a tail): the scale products
        /// `dw·dx` of a segment of blocks are formed first (8 blocks per instruction), then every
        /// block is one integer dot, one conversion and one FMA per output; the Q4_1 minimum
        /// term runs after, over 8 blocks per FMA. Same order per output as the reference.
        #[target_feature(enable = $feat)]
        fn multi<const F: u8, const R: usize, const C: usize>(
            w: &QData,
            x: &XRef<'_>,
            t: Tile,
            out: &mut [f32],
            dd: &mut [f32],
            mwf: &mut [f32],
        ) {
            let (nb, qsb, nbp) = (w.nb, w.qs_bytes, x.q.nbp);
            assert!(t.r0 + R <= w.n && t.c0 + C <= x.m && dd.len() >= R * C * SEG, "quant tile out of range");
            if F == FQ4_1 {
                mins_f32(w, t.r0, R, nbp, mwf);
            }
            assert!(w.qs.len() >= w.n * nb * qsb && x.q.qs.len() >= x.m * nb * QK && x.q.d.len() >= x.m * nbp);
            assert!(F == FQ4_1 || x.q.corr.len() >= x.m * nb * 8);
            let wq = w.qs.as_ptr();
            let xq = x.q.qs.as_ptr();
            let xc = x.q.corr.as_ptr();
            let ddp = dd.as_mut_ptr();
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut s0 = 0;
            while s0 < nb {
                let sl = (nb - s0).min(SEG);
                // Scale products of the segment, 8 blocks at a time (the padded tail of the
                // activation scales is zero; it is never read back).
                let mut g = 0;
                while g < sl {
                    let gl = (sl - g).min(8);
                    for r in 0..R {
                        let at = (t.r0 + r) * nb + s0 + g;
                        let dw = cvt8(&w.d[at..at + gl]);
                        for c in 0..C {
                            let xd = &x.q.row_d_padded(t.c0 + c)[s0 + g..s0 + g + 8];
                            // SAFETY: `xd` holds 8 f32; the store lands inside `dd` (R·C·SEG long,
                            // g + 8 <= SEG).
                            unsafe {
                                let v = _mm256_mul_ps(dw, _mm256_loadu_ps(xd.as_ptr()));
                                _mm256_storeu_ps(ddp.add((r * C + c) * SEG + g), v);
                            }
                        }
                    }
                    g += 8;
                }
                for i in 0..sl {
                    let b = s0 + i;
                    let mut wv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
                    for r in 0..R {
                        // SAFETY: row t.r0 + r < n and block b < nb: inside `w.qs` (asserted).
                        wv[r] = unsafe { $load_w::<F>(wq.add(((t.r0 + r) * nb + b) * qsb)) };
                    }
                    for c in 0..C {
                        let at = (t.c0 + c) * nb + b;
                        // SAFETY: row t.c0 + c < m and block b < nb: inside the activations
                        // (asserted), `corr` only read for Q4_0/Q8_0; `dd` index < R·C·SEG.
                        unsafe {
                            let xv = _mm256_loadu_si256(xq.add(at * QK).cast());
                            let corr = if F == FQ4_1 { xc } else { xc.add(at * 8) };
                            for r in 0..R {
                                let p = $dot::<F>(wv[r], xv, corr);
                                let d = _mm256_broadcast_ss(&*ddp.add((r * C + c) * SEG + i));
                                acc[r][c] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc[r][c]);
                            }
                        }
                    }
                }
                s0 += sl;
            }
            for r in 0..R {
                for c in 0..C {
                    let mut v = hsum(acc[r][c]);
                    if F == FQ4_1 {
                        // Minimum term: lane b % 8 takes block b, as the reference.
                        let mut macc = _mm256_setzero_ps();
                        let xs = &x.q.row_s_padded(t.c0 + c)[..nbp];
                        let mw = &mwf[r * nbp..(r + 1) * nbp];
                        for (m8, s8) in mw.chunks_exact(8).zip(xs.chunks_exact(8)) {
                            // SAFETY: both chunks hold 8 f32.
                            unsafe {
                                macc = _mm256_fmadd_ps(_mm256_loadu_ps(m8.as_ptr()), _mm256_loadu_ps(s8.as_ptr()), macc)
                            };
                        }
                        v += hsum(macc);
                    }
                    out[(t.c0 + c) * t.len + t.r0 + r - t.rstart] = v;
                }
            }
        }

        /// The Q4_1 minimums of weight rows `r0..r0 + rn` as f32, `mwf[r * nbp + b]`, zero past
        /// `nb` (converted once per tile, not once per output).
        #[inline(always)]
        fn mins_f32(w: &QData, r0: usize, rn: usize, nbp: usize, mwf: &mut [f32]) {
            let nb = w.nb;
            assert!(mwf.len() >= rn * nbp && nbp >= nb.div_ceil(8) * 8);
            for r in 0..rn {
                let mut g = 0;
                while g < nb {
                    let gl = (nb - g).min(8);
                    let at = (r0 + r) * nb + g;
                    let v = cvt8(&w.mins[at..at + gl]);
                    // SAFETY: g + 8 <= nbp: inside row r's slots of `mwf` (asserted).
                    unsafe { _mm256_storeu_ps(mwf.as_mut_ptr().add(r * nbp + g), v) };
                    g += 8;
                }
            }
        }

        #[target_feature(enable = $feat)]
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
    };
}
pub(crate) use quant_kernels;

/// Loads one weight block: Q8_0 → (|w|, w); Q4_x → (nibbles as bytes 0..15, unused).
///
/// # Safety
/// `b` points at the block's 32 (Q8_0) or 16 (Q4) bytes; AVX2 is enabled in the caller.
#[inline(always)]
unsafe fn load_w<const F: u8>(b: *const u8) -> (__m256i, __m256i) {
    // SAFETY: per the contract above.
    unsafe {
        if F == FQ8_0 {
            let w = _mm256_loadu_si256(b.cast());
            (_mm256_sign_epi8(w, w), w)
        } else {
            let v = _mm_loadu_si128(b.cast());
            let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
            (_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_setzero_si256())
        }
    }
}

/// 8 lane sums (4 elements each) of one block's integer dot product.
///
/// # Safety
/// `corr` points at 8 i32 unless F is Q4_1; AVX2 is enabled in the caller.
#[inline(always)]
unsafe fn dot<const F: u8>(w: (__m256i, __m256i), xv: __m256i, corr: *const i32) -> __m256i {
    // SAFETY: per the contract above.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        if F == FQ8_0 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w.0, _mm256_sign_epi8(xv, w.1)), ones)
        } else {
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w.0, xv), ones);
            if F == FQ4_0 { _mm256_add_epi32(p, _mm256_loadu_si256(corr.cast())) } else { p }
        }
    }
}

quant_kernels!("avx2,fma,f16c", load_w, dot, 2, 4, full_tile);

/// The full AVX2 multi-row tile: 2 weight rows × 4 activation rows.
#[inline(always)]
fn full_tile<const F: u8>(w: &QData, x: &XRef<'_>, t: Tile, out: &mut [f32], dd: &mut [f32], mwf: &mut [f32]) {
    // SAFETY: only reached from `rows_all`, compiled for (and called after detecting) AVX2.
    unsafe { multi::<F, 2, 4>(w, x, t, out, dd, mwf) }
}

/// AVX2 outputs for weight rows `rows` (layout as [`super::scalar::rows`]).
pub(crate) fn rows(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")) {
        return super::scalar::rows(w, rows, x, out);
    }
    // SAFETY: the features `rows_all` is compiled for were detected above.
    unsafe { rows_all(w, rows, x, out) }
}
