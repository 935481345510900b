//! The softmax normaliser of a logits row (log Σ exp), vectorised: it runs once per generated
//! token over the whole vocabulary (tens of thousands of entries), where a scalar `exp` per entry
//! cost more host time per step than everything else the step loop does.
//!
//! The result does not depend on the instruction set: every entry goes through the same
//! polynomial (plain multiplies and adds, no fused multiply-add), into one of 16 fixed lanes
//! summed in f64 in a fixed order, so AVX-512, AVX2 and baseline builds give the same bits.

use crate::backend::cpu::fast_exp::{LOWEST, exp_nonpositive};
use crate::backend::cpu::isa::{Isa, isa};

/// Lanes of the running sums (fixed, whatever the ISA: the order of additions is part of the result).
const LANES: usize = 16;

/// One entry's share of the sum: exp(l − max), clamped below at e^LOWEST (under f32's smallest
/// normal: a masked (−∞) or vanishing logit contributes nothing measurable next to the maximum's 1).
#[inline(always)]
fn term(l: f32, max: f32) -> f64 {
    f64::from(exp_term(l, max))
}

/// [`term`] before widening to f64.
#[inline(always)]
fn exp_term(l: f32, max: f32) -> f32 {
    let x = l - max;
    exp_nonpositive(if x > LOWEST { x } else { LOWEST })
}

/// The body, compiled once per ISA (inlined into each `target_feature` wrapper): the maximum
/// and log Σ exp.
#[inline(always)]
fn log_sum_exp_body(logits: &[f32]) -> (f32, f32) {
    let mut lanes_max = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().unwrap_or(&[f32::NEG_INFINITY; LANES]);
        for j in 0..LANES {
            // NaN compares false: NaN entries are ignored.
            lanes_max[j] = if c[j] > lanes_max[j] { c[j] } else { lanes_max[j] };
        }
    }
    let mut max = f32::NEG_INFINITY;
    for &l in lanes_max.iter().chain(tail) {
        max = if l > max { l } else { max };
    }
    if !max.is_finite() {
        return (max, max);
    }
    let mut sums = [0f64; LANES];
    for c in logits.chunks_exact(LANES) {
        let c: &[f32; LANES] = c.try_into().unwrap_or(&[f32::NEG_INFINITY; LANES]);
        // The 16 exponentials first, in f32 (full-width vectors), then widened into the sums: one
        // loop mixing f32 and f64 lanes vectorised only 4 entries at a time.
        let mut e = [0f32; LANES];
        for j in 0..LANES {
            e[j] = exp_term(c[j], max);
        }
        for j in 0..LANES {
            sums[j] += f64::from(e[j]);
        }
    }
    for (s, &l) in sums.iter_mut().zip(tail) {
        *s += term(l, max);
    }
    let mut total = 0f64;
    for s in sums {
        total += s;
    }
    (max, max + total.ln() as f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn log_sum_exp_avx2(logits: &[f32]) -> (f32, f32) {
    log_sum_exp_body(logits)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn log_sum_exp_avx512(logits: &[f32]) -> (f32, f32) {
    log_sum_exp_body(logits)
}

/// log Σ exp(logits), computed stably (relative to the maximum); NaN entries are ignored; the
/// maximum itself when it is not finite (an empty row gives −∞).
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    max_and_log_sum_exp(logits).1
}

/// The largest entry (NaN ignored; −∞ for an empty row) and [`log_sum_exp`], in one pass over the
/// row for the maximum and one for the sum.
pub fn max_and_log_sum_exp(logits: &[f32]) -> (f32, f32) {
    log_sum_exp_on(isa(), logits)
}

/// [`max_and_log_sum_exp`] on a given instruction set (no higher than the CPU's).
fn log_sum_exp_on(level: Isa, logits: &[f32]) -> (f32, f32) {
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` only reports AVX-512 when the CPU has avx512f/bw/vl, avx2 and fma.
        Isa::Avx512 => unsafe { log_sum_exp_avx512(logits) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` only reports AVX2 (or higher) when the CPU has avx2 and fma.
        Isa::Avx2 => unsafe { log_sum_exp_avx2(logits) },
        _ => log_sum_exp_body(logits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(logits: &[f32]) -> f64 {
        let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
        max + logits.iter().filter(|l| !l.is_nan()).map(|&l| (f64::from(l) - max).exp()).sum::<f64>().ln()
    }

    #[test]
    fn matches_an_f64_reference_and_is_the_same_on_every_isa() {
        for n in [1usize, 5, 16, 17, 320, 49_152 + 7] {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.031 - 12.0).collect();
            let ours = log_sum_exp(&logits);
            let want = reference(&logits);
            assert!((f64::from(ours) - want).abs() < 2e-6 * want.abs().max(1.0), "n {n}: {ours} vs {want}");
            let baseline = log_sum_exp_body(&logits).1;
            for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= isa()) {
                assert_eq!(log_sum_exp_on(level, &logits).1.to_bits(), baseline.to_bits(), "{level:?}, n {n}");
            }
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_and_log_sum_exp(&logits).0, max);
        }
    }

    #[test]
    fn masked_nan_and_empty_rows() {
        let masked = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        assert!((f64::from(log_sum_exp(&masked)) - (1f64.exp() + 1.0).ln()).abs() < 1e-6);
        let with_nan = [0.0f32, f32::NAN, 1.0];
        assert!((f64::from(log_sum_exp(&with_nan)) - (1f64.exp() + 1.0).ln()).abs() < 1e-6);
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::NEG_INFINITY; 3]), f32::NEG_INFINITY);
        assert_eq!(log_sum_exp(&[f32::INFINITY, 0.0]), f32::INFINITY);
        // Far below the maximum: counts as nothing.
        assert_eq!(log_sum_exp(&[0.0, -1000.0]), 0.0);
    }
}
