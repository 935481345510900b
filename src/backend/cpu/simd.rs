//! A vector of f32 lanes for the hand-written micro-kernels ([`super::packed`]): AVX2 (8 lanes),
//! AVX-512 (16 lanes) and a portable array the compiler vectorises for the baseline target.
//!
//! Every method is `#[inline(always)]` and is only called from functions compiled with the
//! matching `#[target_feature]` (see `packed::block_avx2` / `block_avx512`), into which the
//! intrinsics inline.

/// One register of `W` f32 lanes.
pub trait Lanes {
    /// Lanes per vector.
    const W: usize;
    /// Whether the functions these lanes are used in are compiled with FMA, so scalar
    /// `mul_add` there is one instruction (see `ops::gelu_fused`).
    const FUSED: bool;
    /// The register type.
    type V: Copy;
    /// Loads the first `W` values of `src` (which must hold at least `W`).
    fn load(src: &[f32]) -> Self::V;
    /// Stores into the first `W` values of `dst` (which must hold at least `W`).
    fn store(dst: &mut [f32], v: Self::V);
    /// Loads `W` values from `p`.
    ///
    /// # Safety
    /// `p..p+W` must be readable.
    unsafe fn load_ptr(p: *const f32) -> Self::V;
    /// Broadcasts `*p` to every lane.
    ///
    /// # Safety
    /// `p` must be readable.
    unsafe fn splat_ptr(p: *const f32) -> Self::V;
    /// `a·b + c` (fused where the instruction set has it).
    fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a + b`.
    fn add(a: Self::V, b: Self::V) -> Self::V;
    /// All lanes zero.
    fn zero() -> Self::V;
}

/// Eight lanes held in an array; plain loops the baseline build vectorises.
#[derive(Debug, Clone, Copy)]
pub struct Portable;

impl Lanes for Portable {
    const W: usize = 8;
    const FUSED: bool = false;
    type V = [f32; 8];

    #[inline(always)]
    fn load(src: &[f32]) -> [f32; 8] {
        let mut v = [0.0; 8];
        v.copy_from_slice(&src[..8]);
        v
    }

    #[inline(always)]
    fn store(dst: &mut [f32], v: [f32; 8]) {
        dst[..8].copy_from_slice(&v);
    }

    #[inline(always)]
    unsafe fn load_ptr(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values at `p`.
        unsafe { std::ptr::read_unaligned(p.cast::<[f32; 8]>()) }
    }

    #[inline(always)]
    unsafe fn splat_ptr(p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees `p` is readable.
        [unsafe { *p }; 8]
    }

    #[inline(always)]
    fn fma(a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }

    #[inline(always)]
    fn add(a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }

    #[inline(always)]
    fn zero() -> [f32; 8] {
        [0.0; 8]
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Lanes;

    /// AVX2 + FMA: 8 lanes in a `__m256`. Only for functions compiled with `avx2,fma`.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx2;

    impl Lanes for Avx2 {
        const W: usize = 8;
        const FUSED: bool = true;
        type V = __m256;

        #[inline(always)]
        fn load(src: &[f32]) -> __m256 {
            assert!(src.len() >= 8);
            // SAFETY: 8 values readable (asserted); AVX is enabled in every caller (module doc).
            unsafe { _mm256_loadu_ps(src.as_ptr()) }
        }

        #[inline(always)]
        fn store(dst: &mut [f32], v: __m256) {
            assert!(dst.len() >= 8);
            // SAFETY: 8 values writable (asserted); AVX enabled in every caller.
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
        }

        #[inline(always)]
        unsafe fn load_ptr(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable values; AVX enabled in every caller.
            unsafe { _mm256_loadu_ps(p) }
        }

        #[inline(always)]
        unsafe fn splat_ptr(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees `p` is readable; AVX enabled in every caller.
            unsafe { _mm256_broadcast_ss(&*p) }
        }

        #[inline(always)]
        fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            // SAFETY: FMA is enabled in every caller (module doc).
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }

        #[inline(always)]
        fn add(a: __m256, b: __m256) -> __m256 {
            // SAFETY: AVX enabled in every caller.
            unsafe { _mm256_add_ps(a, b) }
        }

        #[inline(always)]
        fn zero() -> __m256 {
            // SAFETY: AVX enabled in every caller.
            unsafe { _mm256_setzero_ps() }
        }
    }

    /// AVX-512F: 16 lanes in a `__m512`. Only for functions compiled with `avx512f`.
    #[derive(Debug, Clone, Copy)]
    pub struct Avx512;

    impl Lanes for Avx512 {
        const W: usize = 16;
        const FUSED: bool = true;
        type V = __m512;

        #[inline(always)]
        fn load(src: &[f32]) -> __m512 {
            assert!(src.len() >= 16);
            // SAFETY: 16 values readable (asserted); AVX-512F enabled in every caller.
            unsafe { _mm512_loadu_ps(src.as_ptr()) }
        }

        #[inline(always)]
        fn store(dst: &mut [f32], v: __m512) {
            assert!(dst.len() >= 16);
            // SAFETY: 16 values writable (asserted); AVX-512F enabled in every caller.
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
        }

        #[inline(always)]
        unsafe fn load_ptr(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable values; AVX-512F enabled in every caller.
            unsafe { _mm512_loadu_ps(p) }
        }

        #[inline(always)]
        unsafe fn splat_ptr(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees `p` is readable; AVX-512F enabled in every caller.
            unsafe { _mm512_set1_ps(*p) }
        }

        #[inline(always)]
        fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled in every caller.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }

        #[inline(always)]
        fn add(a: __m512, b: __m512) -> __m512 {
            // SAFETY: AVX-512F enabled in every caller.
            unsafe { _mm512_add_ps(a, b) }
        }

        #[inline(always)]
        fn zero() -> __m512 {
            // SAFETY: AVX-512F enabled in every caller.
            unsafe { _mm512_setzero_ps() }
        }
    }
}
