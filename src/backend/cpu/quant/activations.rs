//! Activation rows quantized per 32-element block to 8 bits (llama.cpp's Q8_0/Q8_1 idea) or, in
//! the [`ActPrecision::I16`] mode, to 16 bits, with the per-block sums the integer kernels need.

use super::format::{QFormat, QK};

/// How a quantized product quantizes its activation rows (per 32-element block, scale `max|x|/q_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActPrecision {
    /// 8 bits (±127), as llama.cpp does: the fastest products (one `vpdpbusd` per 4 elements).
    #[default]
    I8,
    /// 16 bits (±32767): each block's error is 258 times smaller, products run `vpdpwssd` /
    /// `vpmaddwd` on weights widened to 16 bits (about twice the integer work of [`Self::I8`]).
    I16,
}

/// `m` activation rows of `nb` blocks each, quantized: `x ≈ d·q` per block.
#[derive(Debug, Default)]
pub(crate) struct QActs {
    /// Rows.
    pub m: usize,
    /// Blocks per row.
    pub nb: usize,
    /// Row stride of `d` and `s`: `nb` rounded up to 8, the tail zero (so the SIMD kernels read
    /// scales 8 blocks at a time without a bounds case).
    pub nbp: usize,
    /// Quantized values, `[m][nb·32]`, in [-127, 127].
    pub qs: Vec<i8>,
    /// Scales, `[m][nbp]` (f32, unlike llama.cpp's f16: no precision lost on the activation side).
    pub d: Vec<f32>,
    /// `d · Σq` per block, `[m][nbp]` (the Q4_1 minimum term).
    pub s: Vec<f32>,
    /// Per block, the integer correction `−bias · Σq` `[m][nbp]`, with bias 8 for Q4_0 (its
    /// nibbles are stored +8) and 128 for Q8_0 (weights offset to unsigned for VNNI); empty for
    /// other formats (and for Q8_0 in the 16-bit mode, whose weights are sign-extended instead).
    pub corr: Vec<i32>,
    /// True when quantized to 16 bits: the values are in `qs16`, and `qs` is empty.
    pub wide: bool,
    /// 16-bit mode: quantized values `[m][nb·32]` in [-32767, 32767], each 4-element group stored
    /// as elements `0, 2, 1, 3` (see [`wide_pos`]), so one 32-bit broadcast gives the pair that
    /// `vpdpwssd`/`vpmaddwd` multiplies with the even (or odd) bytes of 4 weight bytes widened to
    /// 16 bits.
    pub qs16: Vec<i16>,
}

/// Where element `e` of a block sits in a 16-bit activation block (`0, 2, 1, 3` per group of 4).
#[inline(always)]
pub(crate) fn wide_pos(e: usize) -> usize {
    (e & !3) | ((e & 1) << 1) | ((e >> 1) & 1)
}

/// One block of 32 values to 16 bits: `q = round_half_even(x / d)` clamped to ±32767 with
/// `d = max|x| / 32767` (NaN values, and every value of a block with an infinite one, become 0),
/// stored in [`wide_pos`] order; returns `d` and `Σq`.
fn quantize_block16(xb: &[f32], qb: &mut [i16]) -> (f32, i32) {
    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 32767.0;
    let id = if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (e, &v) in xb.iter().enumerate() {
        // `as i32` maps NaN to 0; |v·id| ≤ 32767 (+ rounding) stays far below 2^22.
        let q = (round_even(v * id) as i32).clamp(-32767, 32767);
        qb[wide_pos(e)] = q as i16;
        sum += q;
    }
    (d, sum)
}

/// Round half to even for |v| < 2^22 without a libm call (the loop stays vectorisable).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// One block of 32 values to `qb`: `q = round_half_even(x / d)` clamped to ±127 with
/// `d = max|x| / 127` (NaN values, and every value of a block with an infinite one, become 0);
/// returns `d` and `Σq`.
fn quantize_block(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 };
    for (q, &v) in qb.iter_mut().zip(xb) {
        *q = (round_even(v * id) as i32).clamp(-127, 127) as i8;
    }
    (d, qb.iter().map(|&q| q as i32).sum())
}

/// [`quantize_block`] with AVX2, bit for bit (the maximum is exact in any order, `vcvtps2dq`
/// rounds half to even as `round_even` does for |v| ≤ 127, NaN products are masked to 0).
///
/// # Safety
/// AVX2 must be available; `xb` and `qb` hold 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(xb: &[f32], qb: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(xb.len() >= QK && qb.len() >= QK);
    // SAFETY: 32 f32 are read from `xb` and 32 bytes written to `qb` (asserted lengths).
    unsafe {
        let p = xb.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
        let mut amax = _mm256_setzero_ps();
        for x in v {
            // max(|x|, acc) keeps acc when |x| is NaN, as f32::max does.
            amax = _mm256_max_ps(_mm256_and_ps(x, abs_mask), amax);
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        let mut q = [_mm256_setzero_si256(); 4];
        for (qi, x) in q.iter_mut().zip(v) {
            let p = _mm256_mul_ps(x, id);
            let ordered = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
            let r = _mm256_and_si256(_mm256_cvtps_epi32(p), ordered);
            *qi = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
        }
        let sum8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum8), _mm256_extracti128_si256(sum8, 1));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
        let p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qb.as_mut_ptr().cast(), bytes);
        (d, sum)
    }
}

impl QActs {
    /// Quantizes `x` (`[m, k]`, `k = nb·32`) to `precision` for a product with a `format` weight.
    /// Reuses buffers.
    pub fn quantize_with(&mut self, x: &[f32], m: usize, k: usize, format: QFormat, precision: ActPrecision) {
        if precision == ActPrecision::I16 {
            return self.quantize16(x, m, k, format);
        }
        self.wide = false;
        self.qs16.clear();
        let nb = k / QK;
        let nbp = nb.div_ceil(8) * 8;
        self.m = m;
        self.nb = nb;
        self.nbp = nbp;
        self.qs.resize(m * k, 0);
        self.d.clear();
        self.d.resize(m * nbp, 0.0);
        self.s.clear();
        self.s.resize(m * nbp, 0.0);
        let bias = match format {
            QFormat::Q4_0 => 8,
            QFormat::Q8_0 => 128,
            _ => 0,
        };
        self.corr.clear();
        self.corr.resize(if bias == 0 { 0 } else { m * nbp }, 0);
        #[cfg(target_arch = "x86_64")]
        let simd = super::isa::quant_isa() >= super::isa::QuantIsa::Avx2;
        for (b, (xb, qb)) in x[..m * k].chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK)).enumerate() {
            #[cfg(target_arch = "x86_64")]
            let (d, sum) = if simd {
                // SAFETY: AVX2 was detected (quant_isa never exceeds the CPU).
                unsafe { quantize_block_avx2(xb, qb) }
            } else {
                quantize_block(xb, qb)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (d, sum) = quantize_block(xb, qb);
            let at = b / nb * nbp + b % nb;
            self.d[at] = d;
            self.s[at] = d * sum as f32;
            if bias != 0 {
                self.corr[at] = -bias * sum;
            }
        }
    }

    /// The 16-bit mode of [`quantize_with`](Self::quantize_with).
    fn quantize16(&mut self, x: &[f32], m: usize, k: usize, format: QFormat) {
        let nb = k / QK;
        let nbp = nb.div_ceil(8) * 8;
        (self.m, self.nb, self.nbp, self.wide) = (m, nb, nbp, true);
        self.qs.clear();
        self.qs16.resize(m * k, 0);
        self.d.clear();
        self.d.resize(m * nbp, 0.0);
        self.s.clear();
        self.s.resize(m * nbp, 0.0);
        // Q8_0 weights are sign-extended to 16 bits: only Q4_0's +8 nibbles need a correction.
        let bias = if format == QFormat::Q4_0 { 8 } else { 0 };
        self.corr.clear();
        self.corr.resize(if bias == 0 { 0 } else { m * nbp }, 0);
        for (b, (xb, qb)) in x[..m * k].chunks_exact(QK).zip(self.qs16.chunks_exact_mut(QK)).enumerate() {
            let (d, sum) = quantize_block16(xb, qb);
            let at = b / nb * nbp + b % nb;
            self.d[at] = d;
            // |Σq| ≤ 32·32767 < 2^24: exact in f32.
            self.s[at] = d * sum as f32;
            if bias != 0 {
                self.corr[at] = -bias * sum;
            }
        }
    }

    /// Value of element `e` of block `b` of row `r` (either mode), for the scalar reference.
    #[inline(always)]
    pub fn value(&self, r: usize, b: usize, e: usize) -> i32 {
        let base = (r * self.nb + b) * QK;
        if self.wide { self.qs16[base + wide_pos(e)] as i32 } else { self.qs[base + e] as i32 }
    }

    /// Row `r`'s scales.
    pub fn row_d(&self, r: usize) -> &[f32] {
        &self.d[r * self.nbp..r * self.nbp + self.nb]
    }

    /// Row `r`'s `d·Σq` terms.
    pub fn row_s(&self, r: usize) -> &[f32] {
        &self.s[r * self.nbp..r * self.nbp + self.nb]
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn the_avx2_block_quantizer_equals_the_scalar_one() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let mut s = 12345u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut blocks: Vec<Vec<f32>> =
            (0..200).map(|i| (0..QK).map(|_| next() * (i as f32 + 0.5)).collect()).collect();
        // Exact halves after scaling (ties), zeros, a NaN, an infinity.
        blocks.push((0..QK).map(|e| (e as f32 - 16.0) * 127.0 / 32.0).collect());
        blocks.push(vec![0.0; QK]);
        blocks.push((0..QK).map(|e| if e == 3 { f32::NAN } else { e as f32 }).collect());
        blocks.push((0..QK).map(|e| if e == 5 { f32::INFINITY } else { e as f32 }).collect());
        for xb in &blocks {
            let (mut a, mut b) = ([0i8; QK], [0i8; QK]);
            let want = quantize_block(xb, &mut a);
            // SAFETY: AVX2 detected above.
            let got = unsafe { quantize_block_avx2(xb, &mut b) };
            assert_eq!((got.0.to_bits(), got.1, b), (want.0.to_bits(), want.1, a), "{xb:?}");
        }
    }
}
