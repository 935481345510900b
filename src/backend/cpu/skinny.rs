//! Products with few rows against a fixed weight, `c[m×n] = a[m×k] · W[k×n]` for small `m` (the
//! dense layers of a small batch): the weight is read from memory once for all rows.
//!
//! The weight is packed once ([`PackedWeight::pack`]) into column strips of [`STRIP`] columns, each
//! strip `k` rows long and contiguous, so a strip streams sequentially through the hardware
//! prefetcher. Each pass over a strip keeps the accumulators of up to 8 (AVX-512) or 6 (AVX2)
//! rows in registers; a batch with more rows runs a second pass over the same strip while it is
//! still in L2. Rows few enough to leave FMA units idle get several interleaved accumulator
//! chains. One thread: at these shapes the product is bound by the weight's memory traffic, and
//! the second core is better left to the request path (and the client) on a small machine.
//! AVX-512 and AVX2+FMA bodies are picked at run time by [`super::isa::isa`]; other machines run a
//! portable loop.

use super::isa::{Isa, isa};

/// Columns per packed strip (one 512-bit or two 256-bit registers).
pub const STRIP: usize = 16;

/// Products with at most this many rows use this kernel; bigger ones go through the `gemm` crate
/// (threaded from [`super::gemm::PARALLEL_MIN_ROWS`] rows). Per row this kernel's cost is flat from
/// about 8 rows up, and a threaded GEMM at these sizes contends with the request path on a small
/// machine (measured: `examples/mlp_batch_cost.rs`, docs/benchmarks.md).
pub const MAX_ROWS: usize = 64;

/// A `[k × n]` row-major weight repacked as `ceil(n / 16)` strips of `[k × 16]` (the last strip's
/// missing columns are zeros).
#[derive(Debug, Clone)]
pub struct PackedWeight {
    k: usize,
    n: usize,
    /// The strips start at `buf[offset]`, the first 64-byte boundary of the buffer: a 512-bit load
    /// that straddles two cache lines costs two.
    buf: Vec<f32>,
    offset: usize,
}

impl PackedWeight {
    /// Packs row-major `w` (`k · n` elements).
    ///
    /// # Panics
    /// If `w.len() != k · n`.
    pub fn pack(w: &[f32], k: usize, n: usize) -> PackedWeight {
        assert_eq!(w.len(), k * n, "packed weight length");
        let n_strips = n.div_ceil(STRIP);
        let len = n_strips * k * STRIP;
        let mut buf = vec![0.0f32; len + STRIP];
        let offset = buf.as_ptr().align_offset(64).min(STRIP);
        for (s, strip) in buf[offset..offset + len].chunks_exact_mut(k * STRIP).enumerate() {
            let c0 = s * STRIP;
            let width = STRIP.min(n - c0);
            for (p, row) in strip.chunks_exact_mut(STRIP).enumerate() {
                row[..width].copy_from_slice(&w[p * n + c0..p * n + c0 + width]);
            }
        }
        PackedWeight { k, n, buf, offset }
    }

    fn strips(&self) -> &[f32] {
        &self.buf[self.offset..self.offset + self.n.div_ceil(STRIP) * self.k * STRIP]
    }

    /// Input features (rows of the weight).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output features (columns of the weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// `c[m×n] = a[m×k] · W`, row-major, on the calling thread.
    ///
    /// # Panics
    /// If `a` is shorter than `m · k` or `c` shorter than `m · n`.
    pub fn matmul(&self, a: &[f32], m: usize, c: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        assert!(a.len() >= m * k, "skinny: lhs of {} elements too short for {m}x{k}", a.len());
        assert!(c.len() >= m * n, "skinny: dst of {} elements too short for {m}x{n}", c.len());
        if m == 0 || n == 0 {
            return;
        }
        let max_rows = match isa() {
            Isa::Avx512 => 8,
            Isa::Avx2 => 6,
            Isa::Scalar => 4,
        };
        for (s, strip) in self.strips().chunks_exact(k * STRIP).enumerate() {
            let c0 = s * STRIP;
            let width = STRIP.min(n - c0);
            let mut r0 = 0;
            while r0 < m {
                let rows = max_rows.min(m - r0);
                let mut tile = [[0.0f32; STRIP]; 8];
                tile_product(&a[r0 * k..(r0 + rows) * k], rows, k, strip, &mut tile[..rows]);
                for (i, t) in tile[..rows].iter().enumerate() {
                    let at = (r0 + i) * n + c0;
                    c[at..at + width].copy_from_slice(&t[..width]);
                }
                r0 += rows;
            }
        }
    }
}

impl PartialEq for PackedWeight {
    fn eq(&self, other: &PackedWeight) -> bool {
        (self.k, self.n) == (other.k, other.n) && self.strips() == other.strips()
    }
}

/// `tile[i] = a[i] · strip` for the `rows` rows of `a` (each `k` long), `strip` `[k × 16]`.
fn tile_product(a: &[f32], rows: usize, k: usize, strip: &[f32], tile: &mut [[f32; STRIP]]) {
    debug_assert!(a.len() == rows * k && strip.len() == k * STRIP && tile.len() == rows);
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! go {
            ($f:ident, $($mr:literal => $u:literal),*) => {
                match rows {
                    // SAFETY: `isa()` reported the features this body was compiled for; `a` holds
                    // `rows · k` elements, `strip` `k · 16` and `tile` `rows` rows (checked by
                    // the caller's slicing), which is all the body reads and writes.
                    $($mr => return unsafe { x86::$f::<$mr, $u>(a.as_ptr(), k, strip.as_ptr(), tile.as_mut_ptr().cast()) },)*
                    _ => {}
                }
            };
        }
        match isa() {
            Isa::Avx512 => go!(strip512, 1 => 4, 2 => 4, 3 => 2, 4 => 2, 5 => 1, 6 => 1, 7 => 1, 8 => 1),
            Isa::Avx2 => go!(strip256, 1 => 4, 2 => 2, 3 => 2, 4 => 1, 5 => 1, 6 => 1),
            Isa::Scalar => {}
        }
    }
    for (i, t) in tile.iter_mut().enumerate() {
        *t = [0.0; STRIP];
        for (p, w) in strip.chunks_exact(STRIP).enumerate() {
            let x = a[i * k + p];
            for (o, wv) in t.iter_mut().zip(w) {
                *o += x * wv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::STRIP;

    /// AVX-512 body: `MR` rows, `U` interleaved accumulator chains over `k` (to hide FMA latency
    /// when few rows leave the units idle). Writes `MR × 16` floats at `out`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` points at `MR · k` floats, `w` at `k · 16`, `out` at `MR · 16`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn strip512<const MR: usize, const U: usize>(
        a: *const f32,
        k: usize,
        w: *const f32,
        out: *mut f32,
    ) {
        // SAFETY: every pointer offset below stays inside the extents of this function's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); MR]; U];
            let mut p = 0;
            while p + U <= k {
                for (u, acc_u) in acc.iter_mut().enumerate() {
                    let wv = _mm512_loadu_ps(w.add((p + u) * STRIP));
                    for (i, acc_i) in acc_u.iter_mut().enumerate() {
                        *acc_i = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i * k + p + u)), wv, *acc_i);
                    }
                }
                p += U;
            }
            while p < k {
                let wv = _mm512_loadu_ps(w.add(p * STRIP));
                for (i, acc_i) in acc[0].iter_mut().enumerate() {
                    *acc_i = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i * k + p)), wv, *acc_i);
                }
                p += 1;
            }
            for (i, first) in acc[0].iter().enumerate() {
                let mut sum = *first;
                for acc_u in acc.iter().skip(1) {
                    sum = _mm512_add_ps(sum, acc_u[i]);
                }
                _mm512_storeu_ps(out.add(i * STRIP), sum);
            }
        }
    }

    /// AVX2+FMA body: as [`strip512`] with each strip row in two 256-bit registers.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `a` points at `MR · k` floats, `w` at `k · 16`, `out` at `MR · 16`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn strip256<const MR: usize, const U: usize>(
        a: *const f32,
        k: usize,
        w: *const f32,
        out: *mut f32,
    ) {
        // SAFETY: every pointer offset below stays inside the extents of this function's contract.
        unsafe {
            let mut lo = [[_mm256_setzero_ps(); MR]; U];
            let mut hi = [[_mm256_setzero_ps(); MR]; U];
            let mut p = 0;
            while p + U <= k {
                for (u, (lo_u, hi_u)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                    let w0 = _mm256_loadu_ps(w.add((p + u) * STRIP));
                    let w1 = _mm256_loadu_ps(w.add((p + u) * STRIP + 8));
                    for (i, (l, h)) in lo_u.iter_mut().zip(hi_u.iter_mut()).enumerate() {
                        let x = _mm256_broadcast_ss(&*a.add(i * k + p + u));
                        *l = _mm256_fmadd_ps(x, w0, *l);
                        *h = _mm256_fmadd_ps(x, w1, *h);
                    }
                }
                p += U;
            }
            while p < k {
                let w0 = _mm256_loadu_ps(w.add(p * STRIP));
                let w1 = _mm256_loadu_ps(w.add(p * STRIP + 8));
                for (i, (l, h)) in lo[0].iter_mut().zip(hi[0].iter_mut()).enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(i * k + p));
                    *l = _mm256_fmadd_ps(x, w0, *l);
                    *h = _mm256_fmadd_ps(x, w1, *h);
                }
                p += 1;
            }
            for (i, (l0, h0)) in lo[0].iter().zip(&hi[0]).enumerate() {
                let (mut l, mut h) = (*l0, *h0);
                for (lo_u, hi_u) in lo.iter().zip(&hi).skip(1) {
                    l = _mm256_add_ps(l, lo_u[i]);
                    h = _mm256_add_ps(h, hi_u[i]);
                }
                _mm256_storeu_ps(out.add(i * STRIP), l);
                _mm256_storeu_ps(out.add(i * STRIP + 8), h);
            }
        }
    }
}

/// A lazily packed copy of a layer's weight, filled by the first small batch (packing costs one
/// pass over the weight). Compares equal to any other cache: it is derived data.
#[derive(Debug, Clone, Default)]
pub struct PackCache(std::sync::OnceLock<PackedWeight>);

impl PackCache {
    /// The packed form of row-major `w` (`k × n`), packed on first use.
    pub fn get_or_pack(&self, w: &[f32], k: usize, n: usize) -> &PackedWeight {
        self.0.get_or_init(|| PackedWeight::pack(w, k, n))
    }
}

impl PartialEq for PackCache {
    fn eq(&self, _: &PackCache) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * w[p * n + j] as f64).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn every_row_count_and_ragged_width_matches_naive() {
        // k odd (remainder of the interleaved chains), n not a multiple of the strip.
        let (k, n) = (37, 41);
        let w: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let packed = PackedWeight::pack(&w, k, n);
        assert_eq!((packed.k(), packed.n()), (k, n));
        for m in 1..=MAX_ROWS {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut c = vec![f32::NAN; m * n];
            packed.matmul(&a, m, &mut c);
            for (x, y) in c.iter().zip(naive(&a, &w, m, k, n)) {
                assert!((x - y).abs() < 1e-4, "m={m} ({}): {x} vs {y}", isa().name());
            }
        }
    }
}
