//! The last stage of attention: each query's partial results over the history's partitions
//! (unnormalised weighted sums `o`, maxima `m`, weight sums `l`, see [`super::attention`]) are
//! combined in partition order, `M = max m`, `out = Σ o·exp(m − M) / Σ l·exp(m − M)`.

use super::attention::{AttentionShape, PART};
use crate::backend::cpu::fast_exp::exp_clamped;

/// Combines the items of a task (`partials`, every item of [`SeqQueries::parts`] partitions, in
/// item order) into the outputs of its rows at `positions`, partitions in order.
pub fn merge(shape: AttentionShape, positions: &[usize], partials: &[f32], out: &mut [f32]) {
    let (hd, group) = (shape.head_dim, shape.group());
    let q_dim = shape.heads * hd;
    let parts = positions.iter().max().map_or(0, |&p| p / PART + 1);
    let item_len = shape.item_len(positions.len());
    for (r, (&pos, o_row)) in positions.iter().zip(out.chunks_exact_mut(q_dim)).enumerate() {
        let reached = pos / PART + 1;
        for g in 0..shape.kv_heads {
            for j in 0..group {
                let at = |p: usize| ((g * parts + p) * item_len) + (r * group + j) * (hd + 2);
                let mut big = f32::NEG_INFINITY;
                for p in 0..reached {
                    let m = partials[at(p) + hd];
                    big = if m > big { m } else { big };
                }
                let o = &mut o_row[(g * group + j) * hd..][..hd];
                let mut l = 0f32;
                for p in 0..reached {
                    let part = &partials[at(p)..at(p) + hd + 2];
                    let c = exp_clamped(part[hd] - big);
                    if p == 0 {
                        for (o, &x) in o.iter_mut().zip(part) {
                            *o = x * c;
                        }
                        l = part[hd + 1] * c;
                    } else {
                        for (o, &x) in o.iter_mut().zip(part) {
                            *o += x * c;
                        }
                        l += part[hd + 1] * c;
                    }
                }
                for o in o.iter_mut() {
                    *o /= l;
                }
            }
        }
    }
}
