//! Multi-head self-attention over fused QKV rows, one (sequence, head) pair per task.

use rayon::prelude::*;

use super::gemm::{MatRef, gemm_strided};
use super::ops::masked_softmax;

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
/// get weight exactly 0); `ctx` receives `[batch·seq, hidden]`. `heads_buf` is scratch. Runs the
/// (sequence, head) pairs on the rayon pool when `threads > 1`.
pub fn self_attention(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    ctx: &mut [f32],
    heads_buf: &mut Vec<f32>,
    threads: usize,
) {
    let AttentionShape { batch, seq, heads, head_dim: dh } = shape;
    let hidden = heads * dh;
    let stride = 3 * hidden;
    let scale = 1.0 / (dh as f32).sqrt();
    let block = seq * dh;
    heads_buf.resize(batch * heads * block, 0.0);
    if block == 0 {
        return;
    }

    let one = |scores: &mut Vec<f32>, index: usize, out: &mut [f32]| {
        let (b, h) = (index / heads, index % heads);
        let base = b * seq * stride + h * dh;
        scores.resize(seq * seq, 0.0);
        let q = MatRef { data: &qkv[base..], rs: stride, cs: 1 };
        let k_t = MatRef { data: &qkv[base + hidden..], rs: 1, cs: stride };
        gemm_strided(q, k_t, scores, seq, seq, dh, seq, scale, false, 1);
        let keep_b = &keep[b * seq..(b + 1) * seq];
        for row in scores.chunks_exact_mut(seq) {
            masked_softmax(row, keep_b);
        }
        let v = MatRef { data: &qkv[base + 2 * hidden..], rs: stride, cs: 1 };
        gemm_strided(MatRef::row_major(scores, seq), v, out, dh, seq, seq, dh, 1.0, false, 1);
    };

    if threads > 1 {
        heads_buf
            .par_chunks_mut(block)
            .enumerate()
            .for_each_init(Vec::new, |scores, (index, out)| one(scores, index, out));
    } else {
        let mut scores = Vec::new();
        for (index, out) in heads_buf.chunks_mut(block).enumerate() {
            one(&mut scores, index, out);
        }
    }

    for b in 0..batch {
        for h in 0..heads {
            let src = &heads_buf[(b * heads + h) * block..(b * heads + h + 1) * block];
            for (s, row) in src.chunks_exact(dh).enumerate() {
                let at = (b * seq + s) * hidden + h * dh;
                ctx[at..at + dh].copy_from_slice(row);
            }
        }
    }
}
