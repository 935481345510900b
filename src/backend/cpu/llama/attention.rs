//! Causal grouped-query attention of the query rows of one sequence over its paged K/V, split into
//! fixed partitions of the history (flash-decoding style) so that one sequence's attention can be
//! shared by several threads.
//!
//! The history is cut at fixed positions, every [`PART`] positions from 0. For each query (row,
//! head) and each partition it reaches, an *item* computes the scores (sequential multiply-adds
//! over the head dimension, one lane per position: the pool keeps keys transposed per block), their maximum `m`, the weights `exp(s − m)`
//! with their sum `l` (16 lanes by position, then summed in lane order) and the unnormalised
//! weighted sum of values `o` (position order). [`merge`] then combines the partitions of each
//! query in partition order: `M = max m`, `out = Σ o·exp(m − M) / Σ l·exp(m − M)`.
//!
//! Every query's arithmetic is fixed by its position and the stored K/V alone: not by the other
//! rows of the step, how its prefill was chunked, how many threads ran the items, nor the
//! instruction set — the bodies are plain IEEE operations in a fixed order (no fused multiply-add
//! is formed) compiled three times (baseline, AVX2+FMA, AVX-512) and picked at run time
//! ([`crate::backend::cpu::isa::isa`]); the register blocking (queries and head-dimension columns
//! handled together) changes which values share a load, never an operation. Rows of one sequence
//! are computed together so that each K/V row is read once for all of them and all heads of a
//! group: the transposed keys of a partition are shared by the group's queries.

use super::attention_merge::merge;
use super::kv_pool::{KvLayer, KvPool};
use crate::backend::cpu::f16_widen::widen;
use crate::backend::cpu::fast_exp::exp_clamped;
use crate::backend::cpu::isa::{Isa, isa};

/// Positions per partition of the history (part of the arithmetic: changing it changes results).
pub const PART: usize = 128;

/// Lanes of the scores (positions computed together) and of the weight sums.
const LANES: usize = 16;

/// Queries whose scores and weighted sums are computed together (shares each K/V load).
const QB: usize = 4;

/// Runs `$body` with the constant `$Q` set to `$q` (1 to [`QB`] queries computed together).
macro_rules! by_queries {
    ($q:expr, $Q:ident => $body:expr) => {
        match $q {
            4 => {
                const $Q: usize = 4;
                $body
            }
            3 => {
                const $Q: usize = 3;
                $body
            }
            2 => {
                const $Q: usize = 2;
                $body
            }
            _ => {
                const $Q: usize = 1;
                $body
            }
        }
    };
}

/// How far ahead (positions) the weighted sums prefetch value rows.
const PREFETCH_POSITIONS: usize = 16;

/// Asks for the cache line holding `s[at]` (nothing when `at` is out of range). A hint only: it
/// changes no result.
#[inline(always)]
fn prefetch(s: &[f32], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(x) = s.get(at) {
        // SAFETY: `prefetch` only hints the cache (SSE, part of every x86_64 CPU); `x` is a valid
        // reference, and a prefetch never faults nor writes.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const f32).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, at);
}

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

impl AttentionShape {
    /// Query heads per K/V head.
    pub(super) fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Floats of partial results one item (K/V head, partition) produces for `rows` query rows:
    /// per query (row-major, then head of the group) `o` (`head_dim`), `m`, `l`.
    pub fn item_len(&self, rows: usize) -> usize {
        rows * self.group() * (self.head_dim + 2)
    }
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

impl SeqQueries<'_> {
    /// Partitions the rows reach: items are `(kv_head, partition)`, numbered
    /// `kv_head * parts + partition`.
    pub fn parts(&self) -> usize {
        self.positions.iter().max().map_or(0, |&p| p / PART + 1)
    }
}

/// Scratch of one thread (grown as needed, never shrunk).
#[derive(Debug, Default, Clone)]
pub struct AttnScratch {
    /// Keys of one partition, `[head_dim][PART]` (block sizes not a multiple of 16 only).
    kt: Vec<f32>,
    /// Scores then weights of one item, `[query][PART]`.
    scores: Vec<f32>,
    /// Offsets of the partition's K/V rows in the layer's storage.
    offs: Vec<usize>,
    /// Positions of the partition each query attends to.
    n_q: Vec<usize>,
    /// Partial results of a whole task ([`attend_rows`]) or of a task shared by threads.
    pub partials: Vec<f32>,
    /// An f16 pool's keys, then values, of one partition's blocks for one K/V head, widened to f32.
    kv_buf: Vec<f32>,
}

/// Attention outputs (`heads * head_dim` per row, rows in order) of the rows of `rows`, reading K/V
/// of positions `0..=pos` of each: every item, then [`merge`], on the calling thread.
pub fn attend_rows(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    scratch: &mut AttnScratch,
    out: &mut [f32],
) {
    let items = shape.kv_heads * rows.parts();
    let len = items * shape.item_len(rows.positions.len());
    let mut partials = std::mem::take(&mut scratch.partials);
    if partials.len() < len {
        partials.resize(len, 0.0);
    }
    attend_items(pool, layer, shape, rows, 0..items, scratch, &mut partials[..len]);
    merge(shape, rows.positions, &partials[..len], out);
    scratch.partials = partials;
}

/// Computes items `items` of `rows` (see [`SeqQueries::parts`]) into `partials`, which holds
/// [`AttentionShape::item_len`] floats per item, in item order.
pub fn attend_items(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    items: std::ops::Range<usize>,
    scratch: &mut AttnScratch,
    partials: &mut [f32],
) {
    attend_items_on(isa(), pool, layer, shape, rows, items, scratch, partials)
}

/// [`attend_items`] on a given instruction set (no higher than the CPU's).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_items_on(
    level: Isa,
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    items: std::ops::Range<usize>,
    scratch: &mut AttnScratch,
    partials: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match level {
        // SAFETY: callers pass `isa()` or lower, and `isa()` never reports a level the CPU lacks.
        Isa::Avx512 => return unsafe { items_avx512(pool, layer, shape, rows, items, scratch, partials) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { items_avx2(pool, layer, shape, rows, items, scratch, partials) },
        Isa::Scalar => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    items_body::<16>(Isa::Scalar, pool, layer, shape, rows, items, scratch, partials)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn items_avx2(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    items: std::ops::Range<usize>,
    scratch: &mut AttnScratch,
    partials: &mut [f32],
) {
    items_body::<32>(Isa::Avx2, pool, layer, shape, rows, items, scratch, partials)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
fn items_avx512(
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    items: std::ops::Range<usize>,
    scratch: &mut AttnScratch,
    partials: &mut [f32],
) {
    items_body::<64>(Isa::Avx512, pool, layer, shape, rows, items, scratch, partials)
}

/// The items, with weighted sums computed `DS` head-dimension columns at a time (as many as fit in
/// registers for [`QB`] queries; the arithmetic does not depend on it); an f16 pool's blocks are
/// widened with the conversions of `level`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn items_body<const DS: usize>(
    level: Isa,
    pool: &KvPool,
    layer: usize,
    shape: AttentionShape,
    rows: SeqQueries<'_>,
    items: std::ops::Range<usize>,
    scratch: &mut AttnScratch,
    partials: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.group();
    let bs = pool.block_size();
    let nq = rows.positions.len() * group;
    let parts = rows.parts();
    let item_len = shape.item_len(rows.positions.len());
    let Some(&last) = rows.positions.iter().max() else { return };
    let kv = pool.layer(layer);
    let AttnScratch { kt, scores, offs, n_q, kv_buf, .. } = scratch;
    if kt.len() < hd * PART {
        kt.resize(hd * PART, 0.0);
    }
    if scores.len() < nq * PART {
        scores.resize(nq * PART, 0.0);
    }
    n_q.clear();
    n_q.resize(nq, 0);
    for (item, part_out) in items.zip(partials.chunks_exact_mut(item_len)) {
        let (g, p) = (item / parts, item % parts);
        let a = p * PART;
        let n = (a + PART).min(last + 1) - a;
        // The item's keys, then its values: the pool's own storage (f32), or the partition's
        // blocks of one K/V head widened to f32 (exactly) into `kv_buf`, laid out as in the pool
        // (f16) — the keys first, then the values in the same buffer once the scores are done
        // (one partition's worth stays in the first-level cache).
        let first_block = a / bs;
        let widened_blocks = (a + n - 1) / bs + 1 - first_block;
        let block_len = bs * hd;
        let widen_into = |src: &[half::f16], buf: &mut Vec<f32>| {
            if buf.len() < widened_blocks * block_len {
                buf.resize(widened_blocks * block_len, 0.0);
            }
            for (j, &block) in rows.blocks[first_block..first_block + widened_blocks].iter().enumerate() {
                let at = pool.offset(block as usize, g, 0);
                widen(level, &src[at..at + block_len], &mut buf[j * block_len..(j + 1) * block_len]);
            }
        };
        let widened = matches!(kv, KvLayer::F16 { .. });
        let keys: &[f32] = match kv {
            KvLayer::F32 { k, .. } => k,
            KvLayer::F16 { k, .. } => {
                widen_into(k, kv_buf);
                kv_buf
            }
        };
        // Where position `pos`'s value row (and, with slot 0, its block's transposed keys) starts.
        let offset = |pos: usize, slot: usize| {
            if widened {
                ((pos / bs - first_block) * bs + slot) * hd
            } else {
                pool.offset(rows.blocks[pos / bs] as usize, g, slot)
            }
        };
        offs.clear();
        offs.extend((a..a + n).map(|pos| offset(pos, pos % bs)));
        // The pool keeps keys transposed per block (`[head_dim][slot]`): 16 positions of one block
        // are 16 adjacent lanes. Blocks of other sizes are gathered into `kt` ([head_dim][PART]).
        let direct = bs.is_multiple_of(LANES);
        if !direct {
            for i in 0..n {
                let pos = a + i;
                let base = offset(pos, 0) + pos % bs;
                for d in 0..hd {
                    kt[d * PART + i] = keys[base + d * bs];
                }
            }
        }
        let (k_src, stride): (&[f32], usize) = if direct { (keys, bs) } else { (kt, PART) };
        let base_of = |c: usize| {
            if direct {
                let pos = a + c * LANES;
                offset(pos, 0) + pos % bs
            } else {
                c * LANES
            }
        };
        for (qi, nqi) in n_q.iter_mut().enumerate() {
            *nqi = (rows.positions[qi / group] + 1).saturating_sub(a).min(n);
        }
        let query = |qi: usize| {
            let (r, j) = (qi / group, qi % group);
            &rows.q[r * rows.stride + (g * group + j) * hd..][..hd]
        };
        // Scores, up to QB queries at a time (a group of 3 decode queries runs as one block)
        // over 2 or 4 chunks of LANES positions: enough independent sums to hide the latency of
        // the additions.
        let mut qi = 0;
        while qi < nq {
            let q = (nq - qi).min(QB);
            let chunks = n_q[qi..qi + q].iter().max().map_or(0, |&m| m.div_ceil(LANES));
            let out = &mut scores[qi * PART..];
            by_queries!(q, Q => score_chunks::<Q>(
                k_src,
                &base_of,
                chunks,
                stride,
                std::array::from_fn(|j| query(qi + j)),
                shape.scale,
                out,
            ));
            qi += q;
        }
        // Softmax within the partition: the maximum, the weights and their sum.
        for qi in 0..nq {
            let o = &mut part_out[qi * (hd + 2)..(qi + 1) * (hd + 2)];
            let (m, l) = weights(&mut scores[qi * PART..][..n_q[qi]]);
            o[hd] = m;
            o[hd + 1] = l;
        }
        let values: &[f32] = match kv {
            KvLayer::F32 { v, .. } => v,
            KvLayer::F16 { v, .. } => {
                widen_into(v, kv_buf);
                kv_buf
            }
        };
        // Weighted sums of values, up to QB queries and DS columns at a time.
        let mut qi = 0;
        while qi < nq {
            let q = (nq - qi).min(QB);
            by_queries!(q, Q => values_columns::<Q, DS>(values, offs, scores, n_q, hd, qi, part_out));
            qi += q;
        }
    }
}

/// Scores of `Q` queries over `chunks` chunks of [`LANES`] positions (chunk `c`'s keys at
/// `base_of(c)`), written at `out[j * PART + c * LANES..]`: 2 chunks at a time for 3 or more
/// queries, 4 for fewer, then one.
#[inline(always)]
fn score_chunks<const Q: usize>(
    k: &[f32],
    base_of: &impl Fn(usize) -> usize,
    chunks: usize,
    stride: usize,
    qs: [&[f32]; Q],
    scale: f32,
    out: &mut [f32],
) {
    let mut c = 0;
    // Bases of up to `n` chunks after the `at..at + n` being computed (fewer near the end).
    let next = |at: usize, n: usize| {
        let m = n.min(chunks.saturating_sub(at + n));
        let mut ahead = [0usize; 4];
        for (i, a) in ahead.iter_mut().take(m).enumerate() {
            *a = base_of(at + n + i);
        }
        (ahead, m)
    };
    if Q >= 3 {
        while c + 2 <= chunks {
            let (pf, m) = next(c, 2);
            score_lanes::<Q, 2>(k, [base_of(c), base_of(c + 1)], &pf[..m], stride, qs, scale, &mut out[c * LANES..]);
            c += 2;
        }
    } else {
        while c + 4 <= chunks {
            let (pf, m) = next(c, 4);
            let bases = [base_of(c), base_of(c + 1), base_of(c + 2), base_of(c + 3)];
            score_lanes::<Q, 4>(k, bases, &pf[..m], stride, qs, scale, &mut out[c * LANES..]);
            c += 4;
        }
    }
    while c < chunks {
        let (pf, m) = next(c, 1);
        score_lanes::<Q, 1>(k, [base_of(c)], &pf[..m], stride, qs, scale, &mut out[c * LANES..]);
        c += 1;
    }
}

/// [`values_block`] over every column of queries `qi..qi + Q`: `DS` columns at a time, then 8, then 1.
#[inline(always)]
fn values_columns<const Q: usize, const DS: usize>(
    values: &[f32],
    offs: &[usize],
    scores: &[f32],
    n_q: &[usize],
    hd: usize,
    qi: usize,
    part_out: &mut [f32],
) {
    let mut d0 = 0;
    while d0 + DS <= hd {
        values_block::<Q, DS>(values, offs, scores, n_q, hd, qi, d0, part_out);
        d0 += DS;
    }
    while d0 + 8 <= hd {
        values_block::<Q, 8>(values, offs, scores, n_q, hd, qi, d0, part_out);
        d0 += 8;
    }
    while d0 < hd {
        values_block::<Q, 1>(values, offs, scores, n_q, hd, qi, d0, part_out);
        d0 += 1;
    }
}

/// Scores of `Q` queries at `C` chunks of `LANES` positions, chunk `c`'s keys at
/// `k[bases[c] + d * stride..][..LANES]`: `out[j * PART + c * LANES + l] = (Σ_d q_j[d] · k[d]) · scale`,
/// the sum in `d` order.
// Indexing by constant bounds keeps the accumulators in registers (iterator chains vectorised
// across chunks with gathers instead).
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn score_lanes<const Q: usize, const C: usize>(
    k: &[f32],
    bases: [usize; C],
    ahead: &[usize],
    stride: usize,
    qs: [&[f32]; Q],
    scale: f32,
    out: &mut [f32],
) {
    let hd = qs[0].len();
    let mut acc = [[[0f32; LANES]; C]; Q];
    for d in 0..hd {
        // One line of the next chunks' keys per head-dimension row: a partition's blocks lie
        // apart in the pool, where the hardware prefetchers do not follow.
        for &a in ahead {
            prefetch(k, a + d * stride);
        }
        for c in 0..C {
            let kd = &k[bases[c] + d * stride..][..LANES];
            for j in 0..Q {
                let x = qs[j][d];
                let a = &mut acc[j][c];
                for l in 0..LANES {
                    a[l] += x * kd[l];
                }
            }
        }
    }
    for (j, acc) in acc.iter().enumerate() {
        for (c, acc) in acc.iter().enumerate() {
            for (s, &a) in out[j * PART + c * LANES..][..LANES].iter_mut().zip(acc) {
                *s = a * scale;
            }
        }
    }
}

/// Turns scores into `exp(s − m)` in place; returns `(m, Σ exp(s − m))` (the sum in 16 lanes by
/// position, then the lanes in order). `(−∞, 0)` for no scores.
#[inline(always)]
fn weights(s: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = s.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    if s.is_empty() {
        return (m, 0.0);
    }
    let mut sums = [0f32; LANES];
    let mut chunks = s.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp_clamped(c[l] - m);
            sums[l] += c[l];
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = exp_clamped(*v - m);
        sums[l] += *v;
    }
    let mut sum = 0f32;
    for v in sums {
        sum += v;
    }
    (m, sum)
}

/// Weighted sums of values for queries `qi..qi + Q`, columns `d0..d0 + D`: for each query, in
/// position order, `o[d] += w[i] · V[i][d]` over its `n_q` positions; written to its partial `o`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn values_block<const Q: usize, const D: usize>(
    values: &[f32],
    offs: &[usize],
    scores: &[f32],
    n_q: &[usize],
    hd: usize,
    qi: usize,
    d0: usize,
    part_out: &mut [f32],
) {
    let n = &n_q[qi..qi + Q];
    let common = n.iter().copied().min().unwrap_or(0);
    let offs_c = &offs[..common];
    let w: [&[f32]; Q] = std::array::from_fn(|k| &scores[(qi + k) * PART..][..common]);
    let mut acc = [[0f32; D]; Q];
    for (i, &o) in offs_c.iter().enumerate() {
        // The value row a block ahead (blocks lie apart in the pool).
        if D >= 16
            && let Some(&at) = offs.get(i + PREFETCH_POSITIONS)
        {
            for l in (0..D).step_by(16) {
                prefetch(values, at + d0 + l);
            }
        }
        let Ok(v): Result<&[f32; D], _> = values[o + d0..][..D].try_into() else { return };
        for (acc, w) in acc.iter_mut().zip(&w) {
            let x = w[i];
            for d in 0..D {
                acc[d] += x * v[d];
            }
        }
    }
    for (k, acc) in acc.iter().enumerate() {
        part_out[(qi + k) * (hd + 2) + d0..][..D].copy_from_slice(acc);
    }
    // Queries with more positions (the last rows of a causal task) continue alone.
    for (k, &nk) in n.iter().enumerate() {
        let o = &mut part_out[(qi + k) * (hd + 2) + d0..][..D];
        let w = &scores[(qi + k) * PART..][..nk];
        for (i, &at) in offs[..nk].iter().enumerate().skip(common) {
            let x = w[i];
            for (o, &v) in o.iter_mut().zip(&values[at + d0..at + d0 + D]) {
                *o += x * v;
            }
        }
    }
}
