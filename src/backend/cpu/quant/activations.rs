//! Activation rows quantized per 32-element block to 8 bits (llama.cpp's Q8_0/Q8_1 idea), with the
//! per-block sums the integer kernels need.

use super::format::{QFormat, QK};

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
    /// other formats.
    pub corr: Vec<i32>,
}

/// Round half to even for |v| < 2^22 without a libm call (the loop stays vectorisable).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

impl QActs {
    /// Quantizes `x` (`[m, k]`, `k = nb·32`) for a product with a `format` weight. Reuses buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, format: QFormat) {
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
        for (b, xb) in x[..m * k].chunks_exact(QK).enumerate() {
            let amax = xb.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 };
            let qb = &mut self.qs[b * QK..(b + 1) * QK];
            for (q, &v) in qb.iter_mut().zip(xb) {
                *q = (round_even(v * id) as i32).clamp(-127, 127) as i8;
            }
            let sum: i32 = qb.iter().map(|&q| q as i32).sum();
            let at = b / nb * nbp + b % nb;
            self.d[at] = d;
            self.s[at] = d * sum as f32;
            if bias != 0 {
                self.corr[at] = -bias * sum;
            }
        }
    }

    /// Row `r`'s quantized values.
    pub fn row_qs(&self, r: usize) -> &[i8] {
        &self.qs[r * self.nb * QK..(r + 1) * self.nb * QK]
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
