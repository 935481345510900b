//! Causal grouped-query attention of one query row over its sequence's paged K/V.
//!
//! The scores, the softmax and the weighted sum of one query visit positions `0..=pos` in increasing
//! order with fixed-order dot products, so the result depends only on the query and the stored K/V:
//! not on the other rows of the step nor on how the sequence's prefill was chunked.
//!
//! One portable body is compiled three times (baseline, AVX2+FMA, AVX-512) and picked at run time
//! ([`crate::backend::cpu::isa::isa`]): the arithmetic is plain IEEE operations in a fixed order (no
//! fused multiply-add is formed), so every version gives the same bits; the wider ones are faster.

use super::kv_pool::KvPool;
use crate::backend::cpu::isa::{Isa, isa};

/// Shape of the attention: heads, grouping and scale.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (each serves `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Score scale, `1 / sqrt(head_dim)`.
    pub scale: f32,
}

#[allow(clippy::too_many_arguments)]
/// Attention output (`heads * head_dim`) of the query row `q` at absolute position `pos`, reading K/V of
/// positions `0..=pos` through the block table `blocks`. `scores` is scratch (grown as needed).
pub fn attend(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    q: &[f32],
    pos: usize,
    blocks: &[u32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: `isa()` never reports a level the CPU lacks.
        Isa::Avx512 => return unsafe { attend_avx512(pool, layer, shape, q, pos, blocks, scores, out) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { attend_avx2(pool, layer, shape, q, pos, blocks, scores, out) },
        Isa::Scalar => {}
    }
    attend_body(pool, layer, shape, q, pos, blocks, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    q: &[f32],
    pos: usize,
    blocks: &[u32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(pool, layer, shape, q, pos, blocks, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn attend_avx512(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    q: &[f32],
    pos: usize,
    blocks: &[u32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(pool, layer, shape, q, pos, blocks, scores, out)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_body(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    q: &[f32],
    pos: usize,
    blocks: &[u32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let bs = pool.block_size();
    let (keys, values) = pool.layer(layer);
    if scores.len() < pos + 1 {
        scores.resize(pos + 1, 0.0);
    }
    let scores = &mut scores[..=pos];
    for h in 0..shape.heads {
        let g = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (p, s) in scores.iter_mut().enumerate() {
            let o = pool.offset(blocks[p / bs] as usize, g, p % bs);
            *s = crate::backend::cpu::linear_kernels::dot(qh, &keys[o..o + hd]) * shape.scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * hd..(h + 1) * hd];
        oh.fill(0.0);
        for (p, s) in scores.iter().enumerate() {
            let weight = s / sum;
            let o = pool.offset(blocks[p / bs] as usize, g, p % bs);
            for (acc, v) in oh.iter_mut().zip(&values[o..o + hd]) {
                *acc += weight * v;
            }
        }
    }
}
