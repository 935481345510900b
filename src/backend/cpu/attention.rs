//! Multi-head self-attention over fused QKV rows, fused per block of query rows: for each head,
//! `Q_block·Kᵀ` → masked softmax → `·V` straight into the context rows, so the scores of one block
//! (`QUERY_BLOCK × seq` floats) stay in L1/L2 and no `[seq × seq]` matrix per head is kept.

use rayon::prelude::*;

use super::gemm::{MatRef, gemm_strided};
use super::ops::masked_softmax;

/// Query rows per task: the scores of a block (`QUERY_BLOCK × seq` f32, 16 KiB at seq 128) stay
/// in L1/L2 between the two products, and b1 × s128 still splits into 4 tasks for the threads.
pub const QUERY_BLOCK: usize = 32;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Sequences in the batch.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Attention heads.
    pub heads: usize,
    /// Features per head (`hidden = heads · head_dim`).
    pub head_dim: usize,
}

/// Computes `softmax(Q·Kᵀ/√d, masked) · V` for every sequence and head.
///
/// `qkv` is `[batch·seq, 3·hidden]` (queries, keys, values side by side, heads contiguous inside
/// each); `keep[b·seq + j]` says whether key `j` of sequence `b` may be attended to (masked keys
/// get weight exactly 0; keys after the last kept one are skipped altogether); `ctx` receives
/// `[batch·seq, hidden]`. Runs the (sequence, query block) tasks on the rayon pool when
/// `threads > 1`.
pub fn self_attention(qkv: &[f32], keep: &[bool], shape: AttentionShape, ctx: &mut [f32], threads: usize) {
    let AttentionShape { batch, seq, heads, head_dim: dh } = shape;
    let hidden = heads * dh;
    if batch == 0 || seq == 0 || hidden == 0 {
        return;
    }
    let ctx = &mut ctx[..batch * seq * hidden];
    let block_len = QUERY_BLOCK.min(seq) * hidden;
    let task = |scores: &mut Vec<f32>, b: usize, q0: usize, out: &mut [f32]| {
        attend_block(qkv, &keep[b * seq..(b + 1) * seq], shape, b, q0, out, scores);
    };
    if threads > 1 {
        ctx.par_chunks_mut(seq * hidden).enumerate().for_each(|(b, seq_ctx)| {
            seq_ctx
                .par_chunks_mut(block_len)
                .enumerate()
                .for_each_init(Vec::new, |scores, (i, out)| task(scores, b, i * QUERY_BLOCK, out));
        });
    } else {
        let mut scores = Vec::new();
        for (b, seq_ctx) in ctx.chunks_mut(seq * hidden).enumerate() {
            for (i, out) in seq_ctx.chunks_mut(block_len).enumerate() {
                task(&mut scores, b, i * QUERY_BLOCK, out);
            }
        }
    }
}

/// Attention of query rows `q0..q0 + out.len()/hidden` of sequence `b`, all heads, into `out`
/// (those rows of the context, row stride `hidden`).
fn attend_block(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    b: usize,
    q0: usize,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let AttentionShape { seq, heads, head_dim: dh, .. } = shape;
    let hidden = heads * dh;
    let stride = 3 * hidden;
    let rows = out.len() / hidden;
    // Keys past the last kept one get weight 0: leave them out of both products.
    let keys = keep.iter().rposition(|k| *k).map_or(seq, |last| last + 1);
    let keep = &keep[..keys];
    let scale = 1.0 / (dh as f32).sqrt();
    scores.resize(rows * keys, 0.0);
    let seq_base = b * seq * stride;
    for h in 0..heads {
        let q = MatRef { data: &qkv[seq_base + q0 * stride + h * dh..], rs: stride, cs: 1 };
        let k_t = MatRef { data: &qkv[seq_base + hidden + h * dh..], rs: 1, cs: stride };
        gemm_strided(q, k_t, scores, keys, rows, dh, keys, scale, false, 1);
        for row in scores.chunks_exact_mut(keys) {
            masked_softmax(row, keep);
        }
        let v = MatRef { data: &qkv[seq_base + 2 * hidden + h * dh..], rs: stride, cs: 1 };
        gemm_strided(MatRef::row_major(scores, keys), v, &mut out[h * dh..], hidden, rows, keys, dh, 1.0, false, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain per-(sequence, head) attention with an additive −∞ mask, the textbook way.
    fn naive(qkv: &[f32], keep: &[bool], s: AttentionShape) -> Vec<f32> {
        let hidden = s.heads * s.head_dim;
        let mut ctx = vec![0.0f32; s.batch * s.seq * hidden];
        for b in 0..s.batch {
            for h in 0..s.heads {
                for i in 0..s.seq {
                    let q = &qkv[(b * s.seq + i) * 3 * hidden + h * s.head_dim..][..s.head_dim];
                    let mut w: Vec<f64> = (0..s.seq)
                        .map(|j| {
                            let k = &qkv[(b * s.seq + j) * 3 * hidden + hidden + h * s.head_dim..][..s.head_dim];
                            let dot: f64 = q.iter().zip(k).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                            if keep[b * s.seq + j] { dot / (s.head_dim as f64).sqrt() } else { f64::NEG_INFINITY }
                        })
                        .collect();
                    let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    w.iter_mut().for_each(|x| *x = (*x - max).exp());
                    let total: f64 = w.iter().sum();
                    for d in 0..s.head_dim {
                        let v: f64 = (0..s.seq)
                            .map(|j| {
                                w[j] / total
                                    * f64::from(qkv[(b * s.seq + j) * 3 * hidden + 2 * hidden + h * s.head_dim + d])
                            })
                            .sum();
                        ctx[(b * s.seq + i) * hidden + h * s.head_dim + d] = v as f32;
                    }
                }
            }
        }
        ctx
    }

    #[test]
    fn blocks_match_naive_with_padding_and_holes() {
        // seq 70: two full query blocks and a partial one; sequence 1 padded at the end, sequence 2
        // with a hole in the middle.
        let shape = AttentionShape { batch: 3, seq: 70, heads: 3, head_dim: 8 };
        let hidden = 24;
        let qkv: Vec<f32> = (0..3 * 70 * 3 * hidden).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.7).collect();
        let mut keep = vec![true; 3 * 70];
        keep[70 + 41..140].iter_mut().for_each(|k| *k = false);
        keep[140 + 10..140 + 20].iter_mut().for_each(|k| *k = false);
        let want = naive(&qkv, &keep, shape);
        for threads in [1, 2] {
            let mut ctx = vec![f32::NAN; 3 * 70 * hidden];
            self_attention(&qkv, &keep, shape, &mut ctx, threads);
            for (i, (x, y)) in ctx.iter().zip(&want).enumerate() {
                assert!((x - y).abs() < 1e-5, "threads {threads}, element {i}: {x} vs {y}");
            }
        }
    }
}
