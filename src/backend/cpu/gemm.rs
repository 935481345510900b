//! f32 matrix multiplication for the CPU backend, dispatched to the best instruction set at run time.
//!
//! Built on the `gemm` crate's generic driver (`gemm-common`), which packs panels for the cache
//! hierarchy and splits big products over the rayon pool, with `gemm-f32`'s micro-kernels for the
//! instruction set [`super::isa::isa`] picked at run time (AVX-512F, AVX2+FMA or scalar) — no
//! `target-cpu` flags. Calling the driver ourselves rather than `gemm::gemm` is what lets
//! `NEURON_WORKER_ISA=avx2` run the AVX2 kernels on an AVX-512 machine: the `gemm` crate only has a
//! compile-time switch (its `x86-v4` feature). Products below [`PARALLEL_MIN_FLOPS`] or
//! [`PARALLEL_MIN_ROWS`] run on the calling thread (see [`parallelism_for`]).

use gemm_common::Parallelism;

use super::isa::{Isa, isa};

/// Products with fewer multiply-adds than this (m·k·n) run single-threaded.
pub const PARALLEL_MIN_FLOPS: usize = 64 * 64 * 64;

/// Products with fewer rows than this run single-threaded whatever their size: at small M the
/// product streams the weights once and is bound by memory, and waking (then spinning) rayon
/// workers on a machine shared with the request path costs more than the second core saves.
pub const PARALLEL_MIN_ROWS: usize = 64;

/// The instruction set the GEMM micro-kernels use in this process (see [`super::isa`]):
/// `"avx512f"`, `"avx2+fma"` or `"scalar"`.
pub fn isa_name() -> &'static str {
    isa().name()
}

/// Single-precision FLOP per cycle per core of the detected instruction set (two FMA pipes:
/// 64 for AVX-512, 32 for AVX2+FMA, 16 for SSE/NEON). Cores that split 512-bit operations in two
/// (Zen 4) reach half of the AVX-512 figure.
pub fn flops_per_cycle() -> usize {
    match isa_name() {
        "avx512f" => 64,
        "avx2+fma" => 32,
        _ => 2,
    }
}

/// The default thread count for one model: the machine's available parallelism (at least 1).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A read-only strided matrix: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    /// Backing storage, starting at element (0, 0).
    pub data: &'a [f32],
    /// Row stride in elements.
    pub rs: usize,
    /// Column stride in elements.
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> MatRef<'a> {
        MatRef { data, rs: cols, cs: 1 }
    }

    /// The transpose of a row-major matrix that has `cols` columns (its rows become columns).
    pub fn transposed(data: &'a [f32], cols: usize) -> MatRef<'a> {
        MatRef { data, rs: 1, cs: cols }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `c[m×n] = a[m×k] · b[k×n]`, all row-major. `threads` caps the threads used (1 = calling thread).
///
/// # Panics
/// If a slice is shorter than its dimensions require.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    gemm_strided(MatRef::row_major(a, k), MatRef::row_major(b, n), c, n, m, k, n, 1.0, false, threads);
}

/// `c[m×n] = a[m×k] · bᵀ` where `b` is row-major `[n×k]` — the layout of an HF `Linear` weight
/// (`[out, in]`) and of the keys in attention.
///
/// # Panics
/// If a slice is shorter than its dimensions require.
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, threads: usize) {
    gemm_strided(MatRef::row_major(a, k), MatRef::transposed(b, k), c, n, m, k, n, 1.0, false, threads);
}

/// The general product: `c = scale · a·b` (or `c += scale · a·b` when `accumulate`), with `a` and `b`
/// strided views and `c` row-major with row stride `c_rs`.
///
/// # Panics
/// If a view or `c` is shorter than its dimensions require.
#[allow(clippy::too_many_arguments)]
pub fn gemm_strided(
    a: MatRef<'_>,
    b: MatRef<'_>,
    c: &mut [f32],
    c_rs: usize,
    m: usize,
    k: usize,
    n: usize,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    assert!(a.fits(m, k), "gemm: lhs of {} elements too short for {m}x{k}", a.data.len());
    assert!(b.fits(k, n), "gemm: rhs of {} elements too short for {k}x{n}", b.data.len());
    let c_fits = m == 0 || n == 0 || (m - 1) * c_rs + n <= c.len();
    assert!(c_fits, "gemm: dst of {} elements too short for {m}x{n} (row stride {c_rs})", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_rs..r * c_rs + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = parallelism_for(m, k, n, threads);
    // SAFETY: the asserts above prove every element the product reads ((m-1)·rs + (k-1)·cs for
    // `a`, likewise for `b`) and writes ((m-1)·c_rs + n-1) lies inside its slice; `c` is borrowed
    // mutably so it cannot alias `a` or `b`. The driver computes dst := alpha·dst + beta·lhs·rhs.
    unsafe {
        let (a_cs, a_rs, b_cs, b_rs) = (a.cs as isize, a.rs as isize, b.cs as isize, b.rs as isize);
        driver(
            isa(),
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            scale,
            parallelism,
        );
    }
}

/// How a product of this shape is threaded: on the calling thread below [`PARALLEL_MIN_FLOPS`]
/// multiply-adds or [`PARALLEL_MIN_ROWS`] rows, else over `threads` rayon workers.
pub fn parallelism_for(m: usize, k: usize, n: usize, threads: usize) -> Parallelism {
    if threads > 1 && m >= PARALLEL_MIN_ROWS && m * k * n >= PARALLEL_MIN_FLOPS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Runs gemm's generic driver with the micro-kernels of `isa` (dst column stride 1).
///
/// # Safety
/// The pointers and strides must describe valid `m×k`, `k×n` and `m×n` matrices, `dst` not
/// aliasing the others, and `isa` must be supported by this CPU ([`isa()`] guarantees it).
#[allow(clippy::too_many_arguments)]
unsafe fn driver(
    isa: Isa,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    scale: f32,
    parallelism: Parallelism,
) {
    macro_rules! run {
        ($simd:ty, $lanes:expr, $($ukr:ident)::+) => {{
            use $($ukr)::+ as ukr;
            let Some(simd) = <$simd as gemm_common::simd::MixedSimd<f32, f32, f32, f32>>::try_new() else {
                unreachable!("gemm: {} kernels on a CPU without them", isa.name())
            };
            // SAFETY: forwarded from this function's contract.
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<
                    _,
                    f32,
                    { $lanes },
                    { ukr::MR_DIV_N * $lanes },
                    { ukr::NR },
                    { ukr::MR_DIV_N },
                    { ukr::H_M },
                    { ukr::H_N },
                >(
                    simd, m, n, k, dst, 1, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                    1.0, scale, false, false, false, |a, b, c| a * b + c, &ukr::UKR, &ukr::H_UKR, false,
                    parallelism,
                )
            }
        }};
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => run!(gemm_common::simd::V4, 16, gemm_f32::microkernel::avx512f::f32),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => run!(gemm_common::simd::V3, 8, gemm_f32::microkernel::fma::f32),
        _ => run!(gemm_common::simd::Scalar, 1, gemm_f32::microkernel::scalar::f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn small_products_match_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![9.0; m * n];
        matmul(&a, &b, &mut c, m, k, n, 2);
        for (x, y) in c.iter().zip(naive(&a, &b, m, k, n)) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        // bᵀ stored as [n, k].
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut c2 = vec![0.0; m * n];
        matmul_bt(&a, &bt, &mut c2, m, k, n, 1);
        for (x, y) in c.iter().zip(&c2) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn every_supported_isa_matches_naive() {
        let (m, k, n) = (37, 70, 29);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);
        for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|l| *l <= super::super::isa::detected()) {
            let mut c = vec![1.0f32; m * n];
            // SAFETY: row-major m×k, k×n and m×n slices of exactly those sizes; `level` is supported.
            unsafe {
                driver(
                    level,
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    n as isize,
                    false,
                    a.as_ptr(),
                    1,
                    k as isize,
                    b.as_ptr(),
                    1,
                    n as isize,
                    1.0,
                    Parallelism::None,
                );
            }
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{}: {x} vs {y}", level.name());
            }
        }
    }

    #[test]
    fn isa_is_reported() {
        assert!(["avx512f", "avx2+fma", "scalar"].contains(&isa_name()));
        assert!(flops_per_cycle() >= 2);
    }
}
