//! A vectorisable `exp` for non-positive arguments, the same bits on every instruction set: the
//! sampler's softmax normaliser and the attention softmax use it.

/// Below this, `exp` is under f32's smallest normal (e^-87.3); callers clamp their arguments here.
pub const LOWEST: f32 = -87.0;

/// `exp(x)` for `x` in [−87, 0] (callers clamp): Cody–Waite range reduction to r in
/// [−ln2/2, ln2/2] and the Cephes degree-6 polynomial, about 1 ulp; then scaled by 2^n through the
/// exponent bits. Written without branches or libm calls so that the loops around it vectorise;
/// plain multiplies and adds (no fused multiply-add), so every ISA gives the same bits.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer (ties to even)
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // 5.0000001201e-1, which rounds to 0.5 in f32
    let e = p * (r * r) + r + 1.0;
    // n is in [−126, 0] and sits in t's low mantissa bits (t is in [2^23, 2^24), where the
    // spacing is 1): integer arithmetic on the bits, which vectorises (a float-to-int cast would
    // not, being saturating in Rust). 2^n is then a normal number built from its exponent.
    let n_bits = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    e * scale
}

/// `exp(x)` for `x ≤ 0`, clamped below at e^[`LOWEST`] (−∞ and NaN give e^LOWEST too).
#[inline(always)]
pub fn exp_clamped(x: f32) -> f32 {
    exp_nonpositive(if x > LOWEST { x } else { LOWEST })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_over_its_range() {
        let mut x = LOWEST;
        while x <= 0.0 {
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            let ulp = (libm.to_bits() as i64 - ours.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {ours}, libm {libm}: {ulp} ulp");
            x += 0.0137;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_clamped(f32::NEG_INFINITY), exp_nonpositive(LOWEST));
    }
}
