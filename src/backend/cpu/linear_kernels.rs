//! Deterministic micro-kernels for `out[i][j] = x[i] · w[j]` (x `[m, k]`, w `[n, k]`, both row-major).
//!
//! Every output element is reduced the same way wherever it sits in a tile and whatever `m` is: one
//! vector accumulator over `k` in steps of the vector width, a fixed horizontal sum, then the `k % width`
//! tail in order. So a row's results never depend on the other rows of the batch (batch invariance), nor
//! on how the columns were split across threads. The instruction set is picked at run time: AVX-512F,
//! AVX2+FMA, or a scalar fallback (results differ between instruction sets, never within one).

use std::ops::Range;

/// The micro-kernel family this machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelIsa {
    /// 16-wide AVX-512F accumulators, 4×4 tiles.
    Avx512,
    /// 8-wide AVX2 accumulators with FMA, 4×3 tiles.
    Avx2Fma,
    /// Portable code (8 scalar lanes).
    Scalar,
}

impl KernelIsa {
    /// A short name for logs and benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            KernelIsa::Avx512 => "avx512f",
            KernelIsa::Avx2Fma => "avx2+fma",
            KernelIsa::Scalar => "scalar",
        }
    }
}

/// The kernel family this process runs: the level of [`crate::backend::cpu::isa::isa`] (detected
/// once, lowered by `NEURON_WORKER_ISA`).
pub fn kernel_isa() -> KernelIsa {
    match super::isa::isa() {
        super::isa::Isa::Avx512 => KernelIsa::Avx512,
        super::isa::Isa::Avx2 => KernelIsa::Avx2Fma,
        super::isa::Isa::Scalar => KernelIsa::Scalar,
    }
}

/// Bytes of weights a column block keeps in L2 while every row tile passes over it.
const L2_BLOCK_BYTES: usize = 192 * 1024;

/// Computes columns `cols` of `x · wᵀ` for all `m` rows: `out[i][j - cols.start] = x[i] · w[j]`.
/// `out` holds one slice per row, each `cols.len()` long.
///
/// # Panics
/// When the slices are shorter than the shapes say (a caller bug, never input-dependent).
pub fn matmul_cols(
    isa: KernelIsa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    cols: Range<usize>,
    out: &mut [&mut [f32]],
) {
    assert!(x.len() >= m * k && w.len() >= cols.end * k && out.len() >= m, "matmul_cols: operand too short");
    assert!(out.iter().take(m).all(|r| r.len() >= cols.len()), "matmul_cols: output row too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx512 is only selected when the CPU reports AVX-512F; bounds are asserted above.
        KernelIsa::Avx512 => unsafe { x86::run_avx512(x, m, k, w, cols, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2Fma is only selected when the CPU reports AVX2 and FMA; bounds are asserted above.
        KernelIsa::Avx2Fma => unsafe { x86::run_avx2(x, m, k, w, cols, out) },
        _ => scalar(x, m, k, w, cols, out),
    }
}

/// Fixed-order dot product over 8 scalar lanes, lanes summed as
/// `((l0+l4)+(l1+l5))+((l2+l6)+(l3+l7))`, then the tail (the portable path and the attention
/// scores). Always inlined, so it is compiled with the target features of its caller.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut lanes = [0f32; 8];
    let full = n / 8 * 8;
    for (ca, cb) in a[..full].chunks_exact(8).zip(b[..full].chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += ca[l] * cb[l];
        }
    }
    let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for i in full..n {
        s += a[i] * b[i];
    }
    s
}

fn scalar(x: &[f32], m: usize, k: usize, w: &[f32], cols: Range<usize>, out: &mut [&mut [f32]]) {
    for (i, row) in out.iter_mut().enumerate().take(m) {
        let xr = &x[i * k..(i + 1) * k];
        for j in cols.clone() {
            row[j - cols.start] = dot(xr, &w[j * k..(j + 1) * k]);
        }
    }
}

/// Columns per L2 block for a reduction length `k`, a multiple of `nr`.
fn column_block(k: usize, nr: usize) -> usize {
    (L2_BLOCK_BYTES / (4 * k.max(1)) / nr * nr).max(nr)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Runs the tiles of one kernel family over all rows and the columns `cols`, blocked for L2.
    macro_rules! driver {
        ($name:ident, $tile:ident, $mr:literal, $nr:literal, $feat:literal) => {
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                x: &[f32],
                m: usize,
                k: usize,
                w: &[f32],
                cols: Range<usize>,
                out: &mut [&mut [f32]],
            ) {
                let nb = super::column_block(k, $nr);
                let mut jb = cols.start;
                while jb < cols.end {
                    let je = (jb + nb).min(cols.end);
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min($mr);
                        let mut j = jb;
                        while j + $nr <= je {
                            // SAFETY: i + mr <= m and j + nr <= cols.end: inside the asserted bounds.
                            unsafe {
                                match mr {
                                    $mr => $tile::<$mr, $nr>(x, k, w, i, j, cols.start, out),
                                    3 => $tile::<3, $nr>(x, k, w, i, j, cols.start, out),
                                    2 => $tile::<2, $nr>(x, k, w, i, j, cols.start, out),
                                    _ => $tile::<1, $nr>(x, k, w, i, j, cols.start, out),
                                }
                            }
                            j += $nr;
                        }
                        while j < je {
                            // SAFETY: as above, one column at a time.
                            unsafe {
                                match mr {
                                    $mr => $tile::<$mr, 1>(x, k, w, i, j, cols.start, out),
                                    3 => $tile::<3, 1>(x, k, w, i, j, cols.start, out),
                                    2 => $tile::<2, 1>(x, k, w, i, j, cols.start, out),
                                    _ => $tile::<1, 1>(x, k, w, i, j, cols.start, out),
                                }
                            }
                            j += 1;
                        }
                        i += mr;
                    }
                    jb = je;
                }
            }
        };
    }

    driver!(run_avx512, tile512, 4, 4, "avx512f");
    driver!(run_avx2, tile256, 4, 3, "avx2,fma");

    /// One MR×NR tile with 16-wide accumulators.
    ///
    /// # Safety
    /// AVX-512F present; rows `i..i+MR` of x and `j..j+NR` of w exist (length `k` each); out rows exist
    /// and cover column `j + NR - 1 - col0`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile512<const MR: usize, const NR: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
        i: usize,
        j: usize,
        col0: usize,
        out: &mut [&mut [f32]],
    ) {
        let kv = k / 16 * 16;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk < kv {
            let mut wv = [_mm512_setzero_ps(); NR];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + b) * k + kk + 16 <= (j + NR) * k, inside w.
                *v = unsafe { _mm512_loadu_ps(wp.add((j + b) * k + kk)) };
            }
            for (a, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + a) * k + kk + 16 <= (i + MR) * k, inside x.
                let xv = unsafe { _mm512_loadu_ps(xp.add((i + a) * k + kk)) };
                for (b, c) in row.iter_mut().enumerate() {
                    *c = _mm512_fmadd_ps(xv, wv[b], *c);
                }
            }
            kk += 16;
        }
        for (a, row) in acc.iter().enumerate() {
            let xr = &x[(i + a) * k..(i + a + 1) * k];
            for (b, c) in row.iter().enumerate() {
                let wr = &w[(j + b) * k..(j + b + 1) * k];
                let mut s = _mm512_reduce_add_ps(*c);
                for t in kv..k {
                    s += xr[t] * wr[t];
                }
                out[i + a][j + b - col0] = s;
            }
        }
    }

    /// Horizontal sum of 8 lanes in a fixed order.
    #[target_feature(enable = "avx2,fma")]
    fn hsum256(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// One MR×NR tile with 8-wide accumulators.
    ///
    /// # Safety
    /// AVX2 and FMA present; same bounds as [`tile512`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile256<const MR: usize, const NR: usize>(
        x: &[f32],
        k: usize,
        w: &[f32],
        i: usize,
        j: usize,
        col0: usize,
        out: &mut [&mut [f32]],
    ) {
        let kv = k / 8 * 8;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk < kv {
            let mut wv = [_mm256_setzero_ps(); NR];
            for (b, v) in wv.iter_mut().enumerate() {
                // SAFETY: (j + b) * k + kk + 8 <= (j + NR) * k, inside w.
                *v = unsafe { _mm256_loadu_ps(wp.add((j + b) * k + kk)) };
            }
            for (a, row) in acc.iter_mut().enumerate() {
                // SAFETY: (i + a) * k + kk + 8 <= (i + MR) * k, inside x.
                let xv = unsafe { _mm256_loadu_ps(xp.add((i + a) * k + kk)) };
                for (b, c) in row.iter_mut().enumerate() {
                    *c = _mm256_fmadd_ps(xv, wv[b], *c);
                }
            }
            kk += 8;
        }
        for (a, row) in acc.iter().enumerate() {
            let xr = &x[(i + a) * k..(i + a + 1) * k];
            for (b, c) in row.iter().enumerate() {
                let wr = &w[(j + b) * k..(j + b + 1) * k];
                let mut s = hsum256(*c);
                for t in kv..k {
                    s += xr[t] * wr[t];
                }
                out[i + a][j + b - col0] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    fn run(isa: KernelIsa, x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        let mut rows: Vec<&mut [f32]> = out.chunks_mut(n).collect();
        matmul_cols(isa, x, m, k, w, 0..n, &mut rows);
        out
    }

    #[test]
    fn every_isa_matches_f64_and_is_batch_invariant() {
        let isas: Vec<KernelIsa> = [KernelIsa::Scalar, KernelIsa::Avx2Fma, KernelIsa::Avx512]
            .into_iter()
            .filter(|&i| match i {
                KernelIsa::Scalar => true,
                KernelIsa::Avx2Fma => crate::backend::cpu::isa::detected() >= crate::backend::cpu::isa::Isa::Avx2,
                KernelIsa::Avx512 => crate::backend::cpu::isa::detected() >= crate::backend::cpu::isa::Isa::Avx512,
            })
            .collect();
        for &(m, k, n) in &[(1, 64, 7), (5, 83, 13), (9, 576, 40), (4, 16, 4)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            for &isa in &isas {
                let all = run(isa, &x, m, k, &w, n);
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                        assert!((all[i * n + j] as f64 - exact).abs() < 1e-4 * k as f64, "{isa:?} {m}x{k}x{n}");
                    }
                    // A row alone gives the very same bits as inside the batch.
                    let alone = run(isa, &x[i * k..(i + 1) * k], 1, k, &w, n);
                    assert_eq!(alone, all[i * n..(i + 1) * n], "{isa:?} row {i} of {m}x{k}x{n}");
                }
                // Splitting the columns gives the same bits.
                let mut split = vec![0f32; m * n];
                let cut = n / 2;
                let (mut left, mut right): (Vec<&mut [f32]>, Vec<&mut [f32]>) =
                    split.chunks_mut(n).map(|r| r.split_at_mut(cut)).unzip();
                matmul_cols(isa, &x, m, k, &w, 0..cut, &mut left);
                matmul_cols(isa, &x, m, k, &w, cut..n, &mut right);
                assert_eq!(split, all, "{isa:?} column split");
            }
        }
    }
}
