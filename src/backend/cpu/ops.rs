//! Element-wise and row-wise kernels: activations, bias, layer norm, softmax.
//!
//! `exp`, `erf` and `erfc` are branch-free polynomial forms built from float multiply-adds and
//! integer bit operations only, so the compiler vectorises the loops (AVX-512 / AVX2 bodies picked
//! by [`super::isa::isa`]); their error is about f32 rounding: 3e-7 relative for exp and erfc (so
//! GELU stays relatively accurate in its negative tail), 4e-7 absolute for erf.

use rayon::prelude::*;

/// Elements per parallel chunk for element-wise kernels.
const CHUNK: usize = 1 << 14;

/// Compiles an `#[inline(always)]` body for AVX-512 and for AVX2+FMA and picks one at run time by
/// [`super::isa::isa`] (else the baseline build): `dispatch!(body(arg: Type, ...))`. With
/// `dispatch!(fused body(...))` the body takes `<const FUSED: bool>` (see [`madd`]): `true` in the
/// FMA builds, `false` in the baseline one.
macro_rules! dispatch {
    ($body:ident($($arg:ident: $ty:ty),*)) => {
        dispatch!(@ [$body] [$body] $($arg: $ty),*)
    };
    (fused $body:ident($($arg:ident: $ty:ty),*)) => {
        dispatch!(@ [$body::<true>] [$body::<false>] $($arg: $ty),*)
    };
    (@ [$($fast:tt)*] [$($base:tt)*] $($arg:ident: $ty:ty),*) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            fn wide($($arg: $ty),*) { $($fast)*($($arg),*) }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) { $($fast)*($($arg),*) }
            match $crate::backend::cpu::isa::isa() {
                // SAFETY: `isa()` only reports levels whose features were detected on this CPU.
                $crate::backend::cpu::isa::Isa::Avx512 => return unsafe { wide($($arg),*) },
                // SAFETY: as above, for `avx2`.
                $crate::backend::cpu::isa::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                $crate::backend::cpu::isa::Isa::Scalar => {}
            }
        }
        $($base)*($($arg),*)
    }};
}

/// An activation applied after a dense layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Identity.
    None,
    /// `max(x, 0)`.
    Relu,
    /// The exact (erf) GELU: `x/2 · (1 + erf(x/√2))`.
    Gelu,
    /// Hyperbolic tangent.
    Tanh,
}

/// `e^x` for f32, relative error below 2e-7 on [-87, 88]; saturates outside.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    exp_split::<false>(x, 0.0)
}

/// `a·b + c`: one fused multiply-add when `FUSED` (for bodies compiled with the `fma` target
/// feature, where it is one instruction; elsewhere `mul_add` would be a libm call), else a
/// multiply and an add. Rust never contracts `a * b + c` by itself.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED { a.mul_add(b, c) } else { a * b + c }
}

/// `e^(hi + lo)` for a small correction `lo` (|lo| ≪ 1) that `hi + lo` would lose to rounding;
/// `hi` saturates outside [-87, 88]. `FUSED`: see [`madd`].
#[inline(always)]
fn exp_split<const FUSED: bool>(hi: f32, lo: f32) -> f32 {
    let x = hi.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5·2^23 trick: `f32::round` is a libm call on baseline x86_64
    // and would stop the loop from vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = madd::<FUSED>(x, std::f32::consts::LOG2_E, MAGIC);
    let n = shifted - MAGIC;
    // n·0.693_359_4 is exact (the constant has 9 significant bits, |n| ≤ 128).
    let r = madd::<FUSED>(-n, -2.121_944_4e-4, x - n * 0.693_359_4) + lo;
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FUSED>(p, r, 1.398_2e-3);
    p = madd::<FUSED>(p, r, 8.333_452e-3);
    p = madd::<FUSED>(p, r, 4.166_579_6e-2);
    p = madd::<FUSED>(p, r, 0.166_666_65);
    p = madd::<FUSED>(p, r, 0.5);
    let y = madd::<FUSED>(p * r, r, r) + 1.0;
    // 2^n from the bits of `shifted` (= 1.5·2^23 + n, so its low mantissa bits hold n in two's
    // complement): integer add and shift only. `n as i32` would be a saturating scalar conversion
    // per lane and stop the loop from vectorising.
    y * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}

/// `erf(x)` for f32, absolute error below 4e-7: a Taylor series for |x| < 0.5, else
/// Abramowitz & Stegun 7.1.26 (both evaluated, one selected, so loops stay vectorised).
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let x2 = x * x;
    let mut s = 1.0 / 9360.0_f32;
    s = s * x2 - 1.0 / 1320.0;
    s = s * x2 + 1.0 / 216.0;
    s = s * x2 - 1.0 / 42.0;
    s = s * x2 + 0.1;
    s = s * x2 - 1.0 / 3.0;
    s = s * x2 + 1.0;
    let taylor = std::f32::consts::FRAC_2_SQRT_PI * x * s;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t;
    let tail = (1.0 - poly * fast_exp(-x2)).copysign(x);
    if a < 0.5 { taylor } else { tail }
}

/// GELU of one value, erf form, with `libm::erff` (the reference for [`gelu`]).
pub fn gelu_exact(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erfc(a)` for `a ≥ 0`, relative error about 2e-7 (the Chebyshev fit of Numerical Recipes'
/// `erfcc`, fractional error below 1.2e-7 in exact arithmetic, plus f32 rounding): one `exp`,
/// one division, a dozen multiply-adds, no branch — it vectorises.
#[inline(always)]
pub fn fast_erfc_nonneg(a: f32) -> f32 {
    let sq = a * a;
    erfc_core::<false>(a, sq, a.mul_add(a, -sq))
}

/// `erfc(a)` with `a² = sq + sq_lo` given exactly by the caller. `FUSED`: see [`madd`].
#[inline(always)]
fn erfc_core<const FUSED: bool>(a: f32, sq: f32, sq_lo: f32) -> f32 {
    let t = 1.0 / madd::<FUSED>(0.5, a, 1.0);
    let mut p = 0.170_872_77_f32;
    p = madd::<FUSED>(p, t, -0.822_152_23);
    p = madd::<FUSED>(p, t, 1.488_515_9);
    p = madd::<FUSED>(p, t, -1.135_204);
    p = madd::<FUSED>(p, t, 0.278_868_07);
    p = madd::<FUSED>(p, t, -0.186_288_06);
    p = madd::<FUSED>(p, t, 0.096_784_18);
    p = madd::<FUSED>(p, t, 0.374_091_96);
    p = madd::<FUSED>(p, t, 1.000_023_7);
    p = madd::<FUSED>(p, t, -1.265_512_2);
    // e^(p − a²) with p − sq = s + s_lo exactly (TwoSum): rounding `p − a²` to f32 would cost a
    // relative error of a²·6e-8 (5e-6 at a = 9).
    let s = p - sq;
    let back = s - p;
    let s_lo = (p - (s - back)) + (-sq - back);
    t * exp_split::<FUSED>(s, s_lo - sq_lo)
}

/// GELU of one value, erf form, vectorisable: `x/2 · (1 + erf(x/√2))` with `1 + erf(z)` taken as
/// `erfc(−z)` for `z < 0` and `2 − erfc(z)` otherwise, so the result keeps its relative accuracy
/// (about 3e-7) in the negative tail, where `1 + erf` is tiny. `z² = x²/2` is formed exactly
/// (FMA), not from the rounded `x/√2`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    gelu_body::<false>(x)
}

/// [`gelu`] with its polynomials as fused multiply-adds: for bodies compiled with the `fma`
/// target feature only (AVX2 / AVX-512 kernels), where it needs about half the instructions;
/// elsewhere each `mul_add` is a libm call. Same accuracy (rounding differs in the last bit).
#[inline(always)]
pub fn gelu_fused(x: f32) -> f32 {
    gelu_body::<true>(x)
}

#[inline(always)]
fn gelu_body<const FUSED: bool>(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let xx = x * x;
    let c = erfc_core::<FUSED>(z, 0.5 * xx, 0.5 * x.mul_add(x, -xx));
    let one_plus_erf = if x < 0.0 { c } else { 2.0 - c };
    0.5 * x * one_plus_erf
}

/// `tanh(x)` through `e^(2x)`, vectorisable.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let x = x.clamp(-9.0, 9.0);
    if x.abs() < 0.005 {
        return x - x * x * x / 3.0;
    }
    let e = fast_exp(2.0 * x);
    (e - 1.0) / (e + 1.0)
}

// Plain index loops: iterator adapters here are separate functions that the compiler may not
// inline into the AVX builds, which would leave the hot loop on baseline SSE.
#[inline(always)]
fn apply_rows_body<const FUSED: bool>(x: &mut [f32], bias: &[f32], act: Activation) {
    let n = bias.len();
    for row in x.chunks_exact_mut(n) {
        let row = &mut row[..n];
        match act {
            Activation::None => {
                for i in 0..n {
                    row[i] += bias[i];
                }
            }
            Activation::Relu => {
                for i in 0..n {
                    row[i] = (row[i] + bias[i]).max(0.0);
                }
            }
            Activation::Gelu => {
                for i in 0..n {
                    row[i] = gelu_body::<FUSED>(row[i] + bias[i]);
                }
            }
            Activation::Tanh => {
                for i in 0..n {
                    row[i] = tanh(row[i] + bias[i]);
                }
            }
        }
    }
}

fn apply_rows(x: &mut [f32], bias: &[f32], act: Activation) {
    dispatch!(fused apply_rows_body(x: &mut [f32], bias: &[f32], act: Activation))
}

/// Adds `bias` to every row of `x` (rows of `bias.len()`) then applies `act`, in place.
/// Uses the rayon pool when `threads > 1` and the tensor is large.
pub fn bias_activation(x: &mut [f32], bias: &[f32], act: Activation, threads: usize) {
    let n = bias.len();
    if n == 0 {
        return;
    }
    let rows_per_chunk = (CHUNK / n).max(1);
    if threads > 1 && x.len() > 2 * CHUNK {
        x.par_chunks_mut(rows_per_chunk * n).for_each(|c| apply_rows(c, bias, act));
    } else {
        apply_rows(x, bias, act);
    }
}

/// Layer normalisation of every row of `x` (rows of `gamma.len()`), in place:
/// `(x - mean) / sqrt(var + eps) · gamma + beta`, biased variance as in PyTorch.
pub fn layer_norm(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = gamma.len();
    if n == 0 {
        return;
    }
    dispatch!(layer_norm_body(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32))
}

#[inline(always)]
fn layer_norm_body(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = gamma.len();
    for row in x.chunks_exact_mut(n) {
        let mean = sum(row) / n as f32;
        let var = sum_sq_dev(row, mean) / n as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *v = (*v - mean) * inv * g + b;
        }
    }
}

/// `x += residual` element-wise.
pub fn add_in_place(x: &mut [f32], residual: &[f32]) {
    x.iter_mut().zip(residual).for_each(|(a, b)| *a += b);
}

/// Softmax of one row in place, over the positions where `keep[j]` is true only; the others get
/// exactly 0. A row with nothing kept becomes uniform (as adding a large negative bias would give).
pub fn masked_softmax(row: &mut [f32], keep: &[bool]) {
    dispatch!(fused masked_softmax_body(row: &mut [f32], keep: &[bool]))
}

#[inline(always)]
fn masked_softmax_body<const FUSED: bool>(row: &mut [f32], keep: &[bool]) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES).zip(keep.chunks_exact(LANES));
    for (c, k) in &mut chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(if k[i] { c[i] } else { f32::NEG_INFINITY });
        }
    }
    let tail_start = row.len() - row.len() % LANES;
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for (v, k) in row[tail_start..].iter().zip(&keep[tail_start..]) {
        if *k {
            max = max.max(*v);
        }
    }
    if max == f32::NEG_INFINITY {
        let u = 1.0 / row.len().max(1) as f32;
        row.fill(u);
        return;
    }
    for (v, k) in row.iter_mut().zip(keep) {
        let e = exp_split::<FUSED>(*v - max, 0.0);
        *v = if *k { e } else { 0.0 };
    }
    let inv = 1.0 / sum(row);
    row.iter_mut().for_each(|v| *v *= inv);
}

/// Lanes of the vectorisable reductions below.
const LANES: usize = 16;

/// Sum of `x` with 16 independent partial sums (vectorisable; the order differs from a plain
/// left-to-right sum only by rounding).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] += c[i];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `Σ (x - mean)²` with 16 independent partial sums (vectorisable, no buffer).
#[inline(always)]
fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            lanes[i] += d * d;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum::<f32>()
}

/// Plain softmax of one row in place.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = fast_exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let (f, e) = (fast_exp(x), x.exp());
            assert!(((f - e) / e).abs() < 3e-7, "exp({x}) = {f} vs {e}");
            x += 0.013;
        }
        let mut x = -6.0f32;
        while x < 6.0 {
            assert!((fast_erf(x) - libm::erff(x)).abs() < 4e-7, "erf({x})");
            x += 0.001;
        }
    }

    #[test]
    fn gelu_is_relatively_accurate_in_both_tails() {
        let (mut worst, mut worst_at) = (0.0f64, 0.0f32);
        let mut x = -12.0f32;
        while x < 12.0 {
            let xd = f64::from(x);
            let want = 0.5 * xd * libm::erfc(-xd * std::f64::consts::FRAC_1_SQRT_2);
            for got in [f64::from(gelu(x)), f64::from(gelu_fused(x))] {
                if want.abs() > 1e-30 && ((got - want) / want).abs() > worst {
                    worst = ((got - want) / want).abs();
                    worst_at = x;
                }
            }
            // Against the scalar libm (f32) form the kernels used to be checked with.
            assert!((gelu(x) - gelu_exact(x)).abs() <= 2e-7 * x.abs().max(1.0), "gelu({x})");
            x += 0.000_97;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e} at {worst_at}");
        let mut a = 0.0f32;
        while a < 9.0 {
            let want = libm::erfc(f64::from(a));
            assert!(((f64::from(fast_erfc_nonneg(a)) - want) / want).abs() < 5e-7, "erfc({a})");
            a += 0.001;
        }
    }

    #[test]
    fn dispatched_gelu_matches_the_f64_reference() {
        // Through `bias_activation`, i.e. the AVX-512 / AVX2 body this CPU (or NEURON_WORKER_ISA) picks.
        let xs: Vec<f32> = (0..24_000).map(|i| -12.0 + i as f32 * 0.001).collect();
        let mut y = xs.clone();
        bias_activation(&mut y, &[0.0; 8], Activation::Gelu, 1);
        for (x, got) in xs.iter().zip(&y) {
            let xd = f64::from(*x);
            let want = 0.5 * xd * libm::erfc(-xd * std::f64::consts::FRAC_1_SQRT_2);
            if want.abs() > 1e-30 {
                let rel = ((f64::from(*got) - want) / want).abs();
                assert!(rel < 5e-7, "gelu({x}) = {got} vs {want}: relative error {rel:e}");
            }
        }
    }

    #[test]
    fn gelu_known_values() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu_exact(2.0) - 1.954_499_7).abs() < 1e-6);
        assert!((tanh(0.5) - 0.5f32.tanh()).abs() < 1e-6);
    }
}
