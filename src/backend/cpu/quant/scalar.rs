//! The scalar reference kernel: defines the exact reduction order every SIMD kernel reproduces.
//!
//! For a weight row `r` and an activation row `c`:
//! - quantized formats: one accumulator; per block `b` in order, the exact integer dot `isum` of
//!   the block's 32 weights with the 32 quantized activations (8 or 16 bits), then
//!   `acc = fma(dw·dx, isum, acc)` (`dw·dx` rounded to f32 first), and for Q4_1 the minimum term
//!   `acc = fma(mw, sx, acc)` (`sx = dx·Σq`). The SIMD kernels hold one output per lane (16 or 8
//!   weight rows per register, [`super::layout`]), so each lane runs exactly this sequence;
//! - F16: lane `j` takes elements `8t + j` as `acc[j] = fma(w, x, acc[j])` (a short tail padded
//!   with zeros), and the lanes are summed as `((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` (the AVX
//!   horizontal sum).

use std::ops::Range;

use half::f16;

use super::format::{QFormat, QK};
use super::layout::{qs_at, scale_at};
use super::qmatrix::{QData, XRef};

/// The fixed horizontal sum of 8 lanes.
#[inline(always)]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    let s4 = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

#[inline(always)]
fn h(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Signed weight value of element `e` of block `b` in row `r`.
#[inline(always)]
fn wq(w: &QData, r: usize, b: usize, e: usize) -> i32 {
    let at = |j: usize| qs_at(w.nb, w.qs_bytes, r, b, j);
    match w.format {
        QFormat::Q8_0 => w.qs[at(e)] as i8 as i32,
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let byte = w.qs[at(e % (QK / 2))];
            let nib = if e < QK / 2 { byte & 0x0F } else { byte >> 4 } as i32;
            if w.format == QFormat::Q4_0 { nib - 8 } else { nib }
        }
        QFormat::F16 => 0,
    }
}

/// One output: weight row `r` · activation row `c`.
pub(crate) fn dot(w: &QData, r: usize, x: &XRef<'_>, c: usize) -> f32 {
    if w.format == QFormat::F16 {
        let mut acc = [0.0f32; 8];
        let k = w.k;
        let xr = &x.f[c * k..(c + 1) * k];
        let row = &w.qs[r * k * 2..(r + 1) * k * 2];
        for t in 0..k.div_ceil(8) {
            for (j, a) in acc.iter_mut().enumerate() {
                let e = 8 * t + j;
                let (wv, xv) =
                    if e < k { (h(u16::from_le_bytes([row[2 * e], row[2 * e + 1]])), xr[e]) } else { (0.0, 0.0) };
                *a = wv.mul_add(xv, *a);
            }
        }
        return hsum8(&acc);
    }
    let nb = w.nb;
    let xd = x.q.row_d(c);
    let xs = x.q.row_s(c);
    let mut acc = 0.0f32;
    for b in 0..nb {
        // 8 or 16-bit activations alike: |isum| ≤ 32·128·32767 < 2^31, exact; `as f32` then rounds
        // to nearest even, as `vcvtdq2ps` does.
        let isum: i32 = (0..QK).map(|e| wq(w, r, b, e) * x.q.value(c, b, e)).sum();
        let dd = h(w.d[scale_at(nb, r, b)]) * xd[b];
        acc = dd.mul_add(isum as f32, acc);
        if w.format == QFormat::Q4_1 {
            acc = h(w.mins[scale_at(nb, r, b)]).mul_add(xs[b], acc);
        }
    }
    acc
}

/// Outputs for weight rows `rows` and every activation row: `out[c · rows.len() + (r − rows.start)]`.
pub(crate) fn rows(w: &QData, rows: Range<usize>, x: &XRef<'_>, out: &mut [f32]) {
    let len = rows.len();
    for c in 0..x.m {
        for r in rows.clone() {
            out[c * len + r - rows.start] = dot(w, r, x, c);
        }
    }
}
