//! Tests of the partitioned attention: against an f64 reference, and bit-identical whatever the
//! rows computed together, the threads and the instruction set.

use super::attention::{AttentionShape, AttnScratch, SeqQueries, attend_items_on, attend_rows};
use super::attention_merge::merge;
use super::attention_tasks::attention_rows;
use super::kv_pool::{KvLayer, KvPool};
use crate::backend::cpu::isa::{Isa, isa};
use crate::backend::generative::{KvDtype, LogitsWanted, SeqChunk};

struct Case {
    pool: KvPool,
    shape: AttentionShape,
    blocks: Vec<u32>,
    /// Queries of rows 0..len, `heads * head_dim` each (row r is at position r).
    q: Vec<f32>,
}

fn noise(seed: &mut u64) -> f32 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// A pool holding `len` positions of one sequence whose block table is shuffled.
fn case(len: usize, heads: usize, kv_heads: usize, head_dim: usize, bs: usize) -> Case {
    case_of(len, (heads, kv_heads, head_dim, bs), KvDtype::F32, false)
}

/// [`case`] with a pool of `dtype`; `round`: K and V rounded to f16 before they are stored.
fn case_of(
    len: usize,
    (heads, kv_heads, head_dim, bs): (usize, usize, usize, usize),
    dtype: KvDtype,
    round: bool,
) -> Case {
    let nb = len.div_ceil(bs) + 3;
    let mut pool = KvPool::new(1, kv_heads, head_dim, bs, nb, dtype).unwrap();
    let r = |x: f32| if round { half::f16::from_f32(x).to_f32() } else { x };
    let blocks: Vec<u32> = (0..len.div_ceil(bs) as u32).map(|b| (b * 7 + 2) % nb as u32).collect();
    let mut seed = 0x1234_5678_9abc_def1u64 ^ len as u64;
    let kv = kv_heads * head_dim;
    for pos in 0..len {
        // Scores spread enough that the softmax is far from uniform.
        let k: Vec<f32> = (0..kv).map(|_| r(3.0 * noise(&mut seed))).collect();
        let v: Vec<f32> = (0..kv).map(|_| r(noise(&mut seed))).collect();
        pool.write(0, blocks[pos / bs] as usize, pos % bs, &k, &v);
    }
    let q = (0..len * heads * head_dim).map(|_| noise(&mut seed)).collect();
    let shape = AttentionShape { heads, kv_heads, head_dim, scale: 1.0 / (head_dim as f32).sqrt() };
    Case { pool, shape, blocks, q }
}

impl Case {
    fn q_dim(&self) -> usize {
        self.shape.heads * self.shape.head_dim
    }

    /// Rows `rows` (positions = row numbers) through `attend_rows`.
    fn attend(&self, rows: std::ops::Range<usize>) -> Vec<f32> {
        let positions: Vec<usize> = rows.clone().collect();
        let queries = SeqQueries {
            q: &self.q[rows.start * self.q_dim()..],
            stride: self.q_dim(),
            positions: &positions,
            blocks: &self.blocks,
        };
        let mut out = vec![0.0; rows.len() * self.q_dim()];
        attend_rows(&self.pool, 0, self.shape, queries, &mut AttnScratch::default(), &mut out);
        out
    }

    /// f64 reference of one row.
    fn reference(&self, pos: usize) -> Vec<f64> {
        let (hd, group) = (self.shape.head_dim, self.shape.heads / self.shape.kv_heads);
        let (keys, values) = match self.pool.layer(0) {
            KvLayer::F32 { k, v } => (k.to_vec(), v.to_vec()),
            KvLayer::F16 { k, v } => (k.iter().map(|x| x.to_f32()).collect(), v.iter().map(|x| x.to_f32()).collect()),
        };
        let bs = self.pool.block_size();
        let mut out = vec![0f64; self.q_dim()];
        for h in 0..self.shape.heads {
            let q = &self.q[pos * self.q_dim() + h * hd..][..hd];
            let at = |p: usize| self.pool.offset(self.blocks[p / bs] as usize, h / group, p % bs);
            // Keys are transposed within a block.
            let key = |p: usize, d: usize| {
                keys[self.pool.offset(self.blocks[p / bs] as usize, h / group, 0) + d * bs + p % bs]
            };
            let s: Vec<f64> = (0..=pos)
                .map(|p| {
                    (0..hd).map(|d| f64::from(q[d]) * f64::from(key(p, d))).sum::<f64>() * f64::from(self.shape.scale)
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            for (p, w) in w.iter().enumerate() {
                for d in 0..hd {
                    out[h * hd + d] += w / sum * f64::from(values[at(p) + d]);
                }
            }
        }
        out
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn matches_an_f64_reference_across_partitions() {
    for (heads, kv_heads, hd, bs) in [(6, 2, 64, 16), (4, 4, 24, 5), (9, 3, 128, 32)] {
        let len = 300;
        let c = case(len, heads, kv_heads, hd, bs);
        for rows in [0..1, 7..23, 120..140, 281..300] {
            let ours = c.attend(rows.clone());
            for (i, pos) in rows.clone().enumerate() {
                let want = c.reference(pos);
                for (d, (&o, &w)) in ours[i * c.q_dim()..][..c.q_dim()].iter().zip(&want).enumerate() {
                    assert!((f64::from(o) - w).abs() < 2e-5, "hd {hd} row {pos} [{d}]: {o} vs {w}");
                }
            }
        }
    }
}

#[test]
fn rows_together_or_alone_give_the_same_bits() {
    let c = case(600, 6, 2, 64, 16);
    let together = c.attend(250..266);
    for (i, pos) in (250..266).enumerate() {
        let alone = c.attend(pos..pos + 1);
        assert_eq!(bits(&together[i * c.q_dim()..][..c.q_dim()]), bits(&alone), "row {pos}");
    }
    // A task that straddles a partition boundary, and one of three odd rows.
    let together = c.attend(120..136);
    assert_eq!(bits(&together[8 * c.q_dim()..][..c.q_dim()]), bits(&c.attend(128..129)));
    assert_eq!(bits(&c.attend(125..128)[2 * c.q_dim()..]), bits(&c.attend(127..128)));
}

#[test]
fn threads_and_instruction_sets_do_not_change_a_bit() {
    let len = 1100;
    let c = case(len, 6, 2, 64, 16);
    let q_dim = c.q_dim();
    // One 16-row chunk after 1084 positions (split among threads) and a decode row of another
    // chunk (the same sequence's table, for simplicity).
    let rows: Vec<(usize, usize)> = (len - 16..len).map(|p| (p, 0)).chain([(len - 40, 1)]).collect();
    let qkv: Vec<f32> = rows.iter().flat_map(|&(p, _)| c.q[p * q_dim..(p + 1) * q_dim].to_vec()).collect();
    let chunks = [
        SeqChunk { tokens: &[], start: 0, blocks: &c.blocks, logits: LogitsWanted::None },
        SeqChunk { tokens: &[], start: 0, blocks: &c.blocks, logits: LogitsWanted::None },
    ];
    let run = |threads: usize| {
        let mut scratch = vec![AttnScratch::default(); threads];
        let mut out = vec![0.0; rows.len() * q_dim];
        attention_rows(&c.pool, 0, c.shape, &qkv, q_dim, &rows, &chunks, &mut scratch, &mut out, threads);
        out
    };
    let one = run(1);
    for threads in [2, 3] {
        assert_eq!(bits(&run(threads)), bits(&one), "{threads} threads");
    }
    assert_eq!(bits(&one[..q_dim]), bits(&c.attend(len - 16..len - 15)));
    // Every instruction set the CPU has: the same items, the same bits.
    let positions: Vec<usize> = (len - 16..len).collect();
    let queries = SeqQueries { q: &c.q[(len - 16) * q_dim..], stride: q_dim, positions: &positions, blocks: &c.blocks };
    let items = c.shape.kv_heads * queries.parts();
    let n = items * c.shape.item_len(16);
    let on = |level: Isa| {
        let mut partials = vec![0.0; n];
        attend_items_on(level, &c.pool, 0, c.shape, queries, 0..items, &mut AttnScratch::default(), &mut partials);
        let mut out = vec![0.0; 16 * q_dim];
        merge(c.shape, &positions, &partials, &mut out);
        out
    };
    let baseline = on(Isa::Scalar);
    assert_eq!(bits(&baseline), bits(&one[..16 * q_dim]));
    for level in [Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= isa()) {
        assert_eq!(bits(&on(level)), bits(&baseline), "{level:?}");
    }
}

#[test]
fn an_f16_pool_attends_as_an_f32_pool_of_the_rounded_values() {
    // Widening f16 to f32 is exact, so the f16 pool must give the bits of an f32 pool holding the
    // same rounded K/V: for every layout (block sizes that are and are not multiples of 16, one
    // block straddling a partition), rows alone or together, any thread count.
    for dims in [(6, 2, 64, 16), (4, 4, 24, 5), (9, 3, 128, 32), (6, 2, 64, 48)] {
        let len = 300;
        let half = case_of(len, dims, KvDtype::F16, false);
        let rounded = case_of(len, dims, KvDtype::F32, true);
        for rows in [0..1, 7..23, 120..140, 281..300] {
            assert_eq!(bits(&half.attend(rows.clone())), bits(&rounded.attend(rows.clone())), "{dims:?} {rows:?}");
        }
        let q_dim = half.q_dim();
        let rows: Vec<(usize, usize)> = (len - 16..len).map(|p| (p, 0)).chain([(len - 40, 0)]).collect();
        let qkv: Vec<f32> = rows.iter().flat_map(|&(p, _)| half.q[p * q_dim..(p + 1) * q_dim].to_vec()).collect();
        let run = |c: &Case, threads: usize| {
            let chunks = [SeqChunk { tokens: &[], start: 0, blocks: &c.blocks, logits: LogitsWanted::None }];
            let mut scratch = vec![AttnScratch::default(); threads];
            let mut out = vec![0.0; rows.len() * q_dim];
            attention_rows(&c.pool, 0, c.shape, &qkv, q_dim, &rows, &chunks, &mut scratch, &mut out, threads);
            out
        };
        let want = bits(&run(&rounded, 1));
        assert_eq!(bits(&run(&half, 1)), want, "{dims:?}");
        assert_eq!(bits(&run(&half, 2)), want, "{dims:?} 2 threads");
        // Each instruction set's widening (AVX-512, F16C, `half`) feeds the same kernels.
        let positions: Vec<usize> = (len - 16..len).collect();
        let items_on = |c: &Case, level: Isa| {
            let queries =
                SeqQueries { q: &c.q[(len - 16) * q_dim..], stride: q_dim, positions: &positions, blocks: &c.blocks };
            let items = c.shape.kv_heads * queries.parts();
            let mut partials = vec![0.0; items * c.shape.item_len(16)];
            attend_items_on(level, &c.pool, 0, c.shape, queries, 0..items, &mut AttnScratch::default(), &mut partials);
            bits(&partials)
        };
        for level in [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&l| l <= isa()) {
            assert_eq!(items_on(&half, level), items_on(&rounded, level), "{dims:?} {level:?}");
        }
    }
}
