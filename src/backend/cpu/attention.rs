//! Multi-head self-attention over fused QKV rows, fused per block of query rows: for each head,
//! `Q_block·Kᵀ` → masked softmax → `·V` straight into the context rows, so the scores of one block
//! (`QUERY_BLOCK × seq` floats) stay in L1/L2 and no `[seq × seq]` matrix per head is kept.
//!
//! Both products run on the register-tiled micro-kernel of [`super::packed`]: the keys of a head,
//! scaled by `1/√d`, are transposed into key panels once per block, and the values are read in
//! place from the QKV rows (a panel of `2·W` head features, row stride `3·hidden`).

use rayon::prelude::*;

use super::isa::{Isa, isa};
use super::ops::masked_softmax;
use super::packed::{TileArgs, strip_rows, tile_rows};
use super::simd::{Lanes, Portable};

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

/// Buffers of one attention task, reused across the blocks a worker runs.
#[derive(Debug, Default)]
struct Scratch {
    /// `rows × keys_pad` scores, then probabilities.
    scores: Vec<f32>,
    /// Keys of one head, transposed and scaled: panels of `nr` keys × `head_dim`.
    keys_t: Vec<f32>,
    /// Values of one head for a partial feature panel: `keys × nr`.
    values: Vec<f32>,
    /// Output of a partial feature panel: `MR × nr`.
    spill: Vec<f32>,
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
    assert!(qkv.len() >= batch * seq * 3 * hidden, "attention: qkv too short");
    assert!(keep.len() >= batch * seq, "attention: mask too short");
    let ctx = &mut ctx[..batch * seq * hidden];
    let block_len = QUERY_BLOCK.min(seq) * hidden;
    let task = |scratch: &mut Scratch, b: usize, q0: usize, out: &mut [f32]| {
        attend_block(qkv, &keep[b * seq..(b + 1) * seq], shape, b, q0, out, scratch);
    };
    if threads > 1 {
        ctx.par_chunks_mut(seq * hidden).enumerate().for_each(|(b, seq_ctx)| {
            seq_ctx
                .par_chunks_mut(block_len)
                .enumerate()
                .for_each_init(Scratch::default, |scratch, (i, out)| task(scratch, b, i * QUERY_BLOCK, out));
        });
    } else {
        let mut scratch = Scratch::default();
        for (b, seq_ctx) in ctx.chunks_mut(seq * hidden).enumerate() {
            for (i, out) in seq_ctx.chunks_mut(block_len).enumerate() {
                task(&mut scratch, b, i * QUERY_BLOCK, out);
            }
        }
    }
}

/// Attention of query rows `q0..q0 + out.len()/hidden` of sequence `b`, all heads, into `out`
/// (those rows of the context, row stride `hidden`), on this process's instruction set.
fn attend_block(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    b: usize,
    q0: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` only reports levels whose features were detected on this CPU.
        Isa::Avx512 => unsafe { attend_avx512(qkv, keep, shape, b, q0, out, scratch) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2+FMA.
        Isa::Avx2 => unsafe { attend_avx2(qkv, keep, shape, b, q0, out, scratch) },
        _ => attend_body::<Portable, 4>(qkv, keep, shape, b, q0, out, scratch),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    b: usize,
    q0: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    attend_body::<super::simd::Avx2, 6>(qkv, keep, shape, b, q0, out, scratch);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn attend_avx512(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    b: usize,
    q0: usize,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    attend_body::<super::simd::Avx512, 12>(qkv, keep, shape, b, q0, out, scratch);
}

#[inline(always)]
fn attend_body<L: Lanes, const MR: usize>(
    qkv: &[f32],
    keep: &[bool],
    shape: AttentionShape,
    b: usize,
    q0: usize,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let AttentionShape { seq, heads, head_dim: dh, .. } = shape;
    let nr = 2 * L::W;
    let hidden = heads * dh;
    let stride = 3 * hidden;
    let rows = out.len() / hidden;
    // Keys past the last kept one get weight 0: leave them out of both products.
    let keys = keep.iter().rposition(|k| *k).map_or(seq, |last| last + 1);
    let keep = &keep[..keys];
    let keys_pad = keys.next_multiple_of(nr);
    let scale = 1.0 / (dh as f32).sqrt();
    s.scores.resize(rows * keys_pad, 0.0);
    s.keys_t.resize(keys_pad * dh, 0.0);
    s.spill.resize(MR * nr, 0.0);
    let seq_qkv = &qkv[b * seq * stride..(b + 1) * seq * stride];
    for h in 0..heads {
        // Kᵀ·scale in panels of nr keys: element (d, j) of panel p at p·dh·nr + d·nr + j.
        for p in 0..keys_pad / nr {
            let panel = &mut s.keys_t[p * dh * nr..(p + 1) * dh * nr];
            for j in 0..nr {
                let key = p * nr + j;
                if key < keys {
                    let k_row = &seq_qkv[key * stride + hidden + h * dh..][..dh];
                    for (d, v) in k_row.iter().enumerate() {
                        panel[d * nr + j] = v * scale;
                    }
                } else {
                    for d in 0..dh {
                        panel[d * nr + j] = 0.0;
                    }
                }
            }
        }
        let q = &seq_qkv[q0 * stride + h * dh..];
        for p in 0..keys_pad / nr {
            let mut r = 0;
            while r < rows {
                let mr = strip_rows(MR, rows - r);
                let args = TileArgs {
                    k: dh,
                    a: &q[r * stride..],
                    lda: stride,
                    a_step: 1,
                    b: &s.keys_t[p * dh * nr..(p + 1) * dh * nr],
                    ldb: nr,
                    bias: None,
                    res: None,
                };
                tile_rows::<L, MR>(mr, args, &mut s.scores[r * keys_pad + p * nr..], keys_pad);
                r += mr;
            }
        }
        for row in s.scores.chunks_exact_mut(keys_pad) {
            masked_softmax(&mut row[..keys], keep);
        }
        let v = &seq_qkv[2 * hidden + h * dh..];
        for c0 in (0..dh).step_by(nr) {
            let cols = nr.min(dh - c0);
            let full = cols == nr;
            if !full {
                s.values.clear();
                s.values.resize(keys * nr, 0.0);
                for j in 0..keys {
                    s.values[j * nr..j * nr + cols].copy_from_slice(&v[j * stride + c0..][..cols]);
                }
            }
            let mut r = 0;
            while r < rows {
                let mr = strip_rows(MR, rows - r);
                let (vb, ldb) = if full { (&v[c0..], stride) } else { (&s.values[..], nr) };
                let args = TileArgs {
                    k: keys,
                    a: &s.scores[r * keys_pad..],
                    lda: keys_pad,
                    a_step: 1,
                    b: vb,
                    ldb,
                    bias: None,
                    res: None,
                };
                if full {
                    tile_rows::<L, MR>(mr, args, &mut out[r * hidden + h * dh + c0..], hidden);
                } else {
                    tile_rows::<L, MR>(mr, args, &mut s.spill, nr);
                    for i in 0..mr {
                        out[(r + i) * hidden + h * dh + c0..][..cols].copy_from_slice(&s.spill[i * nr..i * nr + cols]);
                    }
                }
                r += mr;
            }
        }
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
