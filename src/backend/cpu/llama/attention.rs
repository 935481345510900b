//! Causal grouped-query attention of the query rows of one sequence over its paged K/V.
//!
//! Each query (row, head) visits positions `0..=pos` in increasing order: the scores (fixed-order
//! dot products), the softmax (maximum, then `exp` and the sum in position order) and the weighted
//! sum of values (position order), so its result depends only on the query and the stored K/V: not
//! on the other rows of the step nor on how the sequence's prefill was chunked. Several rows of one
//! sequence are computed together only so that each K/V block is read from memory once for all of
//! them (a 16-token turn after 2k tokens of history would otherwise re-read 3 MB of K/V per layer,
//! row and head); the arithmetic of each query is the same as alone.
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

/// Query rows of one sequence: row `i`'s query is `q[i * stride..][..heads * head_dim]`, at absolute
/// position `positions[i]`; the sequence's K/V is read through the block table `blocks`.
#[derive(Debug, Clone, Copy)]
pub struct SeqQueries<'a> {
    /// Queries, `positions.len()` rows `stride` apart.
    pub q: &'a [f32],
    /// Distance between rows in `q`.
    pub stride: usize,
    /// Absolute position of each row.
    pub positions: &'a [usize],
    /// The sequence's block table.
    pub blocks: &'a [u32],
}

/// Attention outputs (`heads * head_dim` per row, rows in order) of the rows of `rows`, reading K/V
/// of positions `0..=pos` of each. `scores` is scratch (grown as needed).
pub fn attend_rows(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match isa() {
        // SAFETY: `isa()` never reports a level the CPU lacks.
        Isa::Avx512 => return unsafe { attend_avx512(pool, layer, shape, rows, scores, out) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { attend_avx2(pool, layer, shape, rows, scores, out) },
        Isa::Scalar => {}
    }
    attend_body(pool, layer, shape, rows, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(pool, layer, shape, rows, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn attend_avx512(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_body(pool, layer, shape, rows, scores, out)
}

#[inline(always)]
fn attend_body(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let q_dim = shape.heads * hd;
    let group = shape.heads / shape.kv_heads;
    let bs = pool.block_size();
    let (keys, values) = pool.layer(layer);
    let positions = rows.positions;
    let Some(&last) = positions.iter().max() else { return };
    // Scores of query (row i, head j of the group) at `start[i] * group + j * len_i`.
    let total: usize = positions.iter().map(|p| p + 1).sum::<usize>() * group;
    if scores.len() < total {
        scores.resize(total, 0.0);
    }
    for g in 0..shape.kv_heads {
        let heads = g * group..(g + 1) * group;
        // Scores, one K block at a time for every query.
        for blk in 0..=last / bs {
            let p0 = blk * bs;
            let kb = pool.offset(rows.blocks[blk] as usize, g, 0);
            let mut at = 0;
            for (i, &pos) in positions.iter().enumerate() {
                let len = pos + 1;
                if p0 < len {
                    let pe = (p0 + bs).min(len);
                    for (j, h) in heads.clone().enumerate() {
                        let qh = &rows.q[i * rows.stride + h * hd..][..hd];
                        let s = &mut scores[at + j * len..][p0..pe];
                        for (p, s) in (p0..pe).zip(s) {
                            let k = &keys[kb + (p - p0) * hd..][..hd];
                            *s = crate::backend::cpu::linear_kernels::dot(qh, k) * shape.scale;
                        }
                    }
                }
                at += len * group;
            }
        }
        // Softmax of each query, in position order; the scores become the weights.
        let mut at = 0;
        for &pos in positions {
            let len = pos + 1;
            for s in scores[at..at + len * group].chunks_exact_mut(len) {
                let mut max = f32::NEG_INFINITY;
                for &v in s.iter() {
                    max = max.max(v);
                }
                let mut sum = 0f32;
                for v in s.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in s.iter_mut() {
                    *v /= sum;
                }
            }
            at += len * group;
        }
        for o in out.chunks_exact_mut(q_dim).take(positions.len()) {
            o[g * group * hd..(g + 1) * group * hd].fill(0.0);
        }
        // Weighted sums, one V block at a time for every query.
        for blk in 0..=last / bs {
            let p0 = blk * bs;
            let vb = pool.offset(rows.blocks[blk] as usize, g, 0);
            let mut at = 0;
            for (i, &pos) in positions.iter().enumerate() {
                let len = pos + 1;
                if p0 < len {
                    let pe = (p0 + bs).min(len);
                    for (j, h) in heads.clone().enumerate() {
                        let oh = &mut out[i * q_dim + h * hd..][..hd];
                        let w = &scores[at + j * len..][p0..pe];
                        for (p, &weight) in (p0..pe).zip(w) {
                            let v = &values[vb + (p - p0) * hd..][..hd];
                            for (acc, v) in oh.iter_mut().zip(v) {
                                *acc += weight * v;
                            }
                        }
                    }
                }
                at += len * group;
            }
        }
    }
}
