//! Dense layers with their weight packed once at load, run by hand-written register-tiled GEMM
//! micro-kernels whose epilogue applies the bias, the activation, the residual and LayerNorm
//! while the output is still in cache.
//!
//! The `gemm` crate packs both operands on every call; at the BERT shapes (M = batch·seq tokens,
//! K = 384 or 1536, N = 384…1536) that packing and the separate bias/activation/residual passes
//! over the output cost a fifth of the forward. Here the weight `[n, k]` (HF `Linear` layout) is
//! stored as column panels of `NR` outputs × `k` inputs (`NR` = two vectors: 16 floats on AVX2 and
//! the scalar path, 32 on AVX-512), laid out so the micro-kernel reads one contiguous stream per
//! panel. Per call only the activations are repacked, a block's rows strip by strip of `MR` rows
//! (a thread-local buffer, no allocation once warm), so the micro-kernel broadcasts them from one
//! contiguous stream. Rows are cut in [`block_count`] blocks that run on the rayon pool;
//! within a block every panel is swept over all its rows while the panel stays in L1/L2, and the
//! LayerNorm of the block runs right after its last panel (the rows are still in L2).

use rayon::prelude::*;

use super::isa::{Isa, isa};
use super::ops::{Activation, layer_norm};
use super::simd::{Lanes, Portable};

/// What is applied to `x·Wᵀ + b` before it is written out.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// `act(x·Wᵀ + b)`.
    Act(Activation),
    /// `LayerNorm(x·Wᵀ + b + residual)` with `(gamma, beta, eps)`; `residual` is `[m, n]`.
    ResidualLayerNorm {
        /// Added before the normalisation (the sub-layer's input).
        residual: &'a [f32],
        /// LayerNorm scale, `n` values.
        gamma: &'a [f32],
        /// LayerNorm shift, `n` values.
        beta: &'a [f32],
        /// LayerNorm epsilon.
        eps: f32,
    },
}

/// A dense layer `y = x·Wᵀ + b` whose weight is packed for the micro-kernels of the instruction
/// set of this process ([`isa`]).
#[derive(Debug, Clone)]
pub struct PackedLinear {
    n: usize,
    k: usize,
    isa: Isa,
    /// Panels of `nr(isa)` columns × `k`, element (kk, j) of panel p at `p·k·nr + kk·nr + j`;
    /// columns past `n` are zero. Starts at `offset` (64-byte aligned).
    panels: Vec<f32>,
    offset: usize,
    /// `n` values padded with zeros to whole panels.
    bias: Vec<f32>,
}

/// Panel width (outputs per micro-kernel tile) for `isa`.
fn nr(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        Isa::Avx2 | Isa::Scalar => 16,
    }
}

impl PackedLinear {
    /// Packs an HF `Linear` weight `[n, k]` (row-major: out × in) and its `n` biases.
    ///
    /// # Panics
    /// If `weight` is not `n·k` long or `bias` not `n` long (shapes come from the loader's checks).
    pub fn new(weight: &[f32], bias: &[f32], n: usize, k: usize) -> PackedLinear {
        PackedLinear::for_isa(isa(), weight, bias, n, k)
    }

    fn for_isa(isa: Isa, weight: &[f32], bias: &[f32], n: usize, k: usize) -> PackedLinear {
        assert_eq!(weight.len(), n * k, "packed linear: weight is not {n}x{k}");
        assert_eq!(bias.len(), n, "packed linear: bias is not {n} long");
        let w = nr(isa);
        let panels = n.div_ceil(w);
        let mut data = vec![0.0f32; panels * k * w + 16];
        let offset = (16 - (data.as_ptr() as usize / 4) % 16) % 16;
        for p in 0..panels {
            let base = offset + p * k * w;
            for j in 0..w.min(n - p * w) {
                let row = &weight[(p * w + j) * k..][..k];
                for (kk, v) in row.iter().enumerate() {
                    data[base + kk * w + j] = *v;
                }
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(panels * w, 0.0);
        PackedLinear { n, k, isa, panels: data, offset, bias: padded }
    }

    /// Output features (`n`).
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input features (`k`).
    pub fn in_features(&self) -> usize {
        self.k
    }

    fn panel_data(&self) -> &[f32] {
        &self.panels[self.offset..]
    }
}

/// Blocks the `m` rows are cut into for `threads` threads: about 96 rows each (a block of
/// activations stays in L2), a multiple of `threads` so the blocks split evenly over the threads,
/// and no more than there are strips of `mr` rows.
pub fn block_count(m: usize, threads: usize, mr: usize) -> usize {
    m.div_ceil(96).max(1).next_multiple_of(threads.max(1)).min(m.div_ceil(mr.max(1)).max(1))
}

/// First row of block `i` of `blocks` over `m` rows: whole strips of `mr` rows, the blocks'
/// sizes differing by one strip at most (so at M = 4096 on 2 threads each thread gets 2,048
/// rows, not 22 blocks of 96 against 21).
pub fn block_start(i: usize, blocks: usize, m: usize, mr: usize) -> usize {
    (i * m.div_ceil(mr) / blocks.max(1) * mr).min(m)
}

/// `out[m, n] = epilogue(a[m, k] · Wᵀ + b)`, `a` and `out` row-major. `threads > 1` runs row
/// blocks on the rayon pool.
///
/// # Panics
/// If a slice is shorter than its shape, or the residual/LayerNorm slices do not match `n`.
pub fn linear(a: &[f32], m: usize, w: &PackedLinear, out: &mut [f32], epilogue: Epilogue<'_>, threads: usize) {
    let (n, k) = (w.n, w.k);
    assert!(a.len() >= m * k, "packed linear: input of {} values for {m}x{k}", a.len());
    assert!(out.len() >= m * n, "packed linear: output of {} values for {m}x{n}", out.len());
    if let Epilogue::ResidualLayerNorm { residual, gamma, beta, .. } = epilogue {
        assert!(residual.len() >= m * n && gamma.len() == n && beta.len() == n, "packed linear: LayerNorm shapes");
    }
    if m == 0 || n == 0 {
        return;
    }
    let mr = match w.isa {
        Isa::Avx512 => 12,
        Isa::Avx2 => 6,
        Isa::Scalar => 4,
    };
    let blocks = block_count(m, threads, mr);
    let mut rest = &mut out[..m * n];
    let mut parts = Vec::with_capacity(blocks);
    for i in 0..blocks {
        let (r0, r1) = (block_start(i, blocks, m, mr), block_start(i + 1, blocks, m, mr));
        let (part, tail) = std::mem::take(&mut rest).split_at_mut((r1 - r0) * n);
        parts.push((r0, part));
        rest = tail;
    }
    if threads > 1 && blocks > 1 {
        parts.into_par_iter().for_each(|(r0, block)| run_block(a, r0, w, block, epilogue));
    } else {
        parts.into_iter().for_each(|(r0, block)| run_block(a, r0, w, block, epilogue));
    }
}

/// One block of rows starting at row `r0`, all panels, then its LayerNorm.
fn run_block(a: &[f32], r0: usize, w: &PackedLinear, block: &mut [f32], epilogue: Epilogue<'_>) {
    match w.isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `w.isa` was taken from `isa()` when the weight was packed, which only reports
        // levels detected on this CPU.
        Isa::Avx512 => unsafe { block_avx512(a, r0, w, block, epilogue) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2+FMA.
        Isa::Avx2 => unsafe { block_avx2(a, r0, w, block, epilogue) },
        _ => block_body::<Portable, 4>(a, r0, w, block, epilogue),
    }
    if let Epilogue::ResidualLayerNorm { gamma, beta, eps, .. } = epilogue {
        layer_norm(block, gamma, beta, eps);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn block_avx2(a: &[f32], r0: usize, w: &PackedLinear, block: &mut [f32], epilogue: Epilogue<'_>) {
    block_body::<super::simd::Avx2, 6>(a, r0, w, block, epilogue);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
fn block_avx512(a: &[f32], r0: usize, w: &PackedLinear, block: &mut [f32], epilogue: Epilogue<'_>) {
    block_body::<super::simd::Avx512, 12>(a, r0, w, block, epilogue);
}

/// The panels × row strips of one block. `MR` rows per tile, `2·L::W` columns per panel.
#[inline(always)]
fn block_body<L: Lanes, const MR: usize>(
    a: &[f32],
    r0: usize,
    w: &PackedLinear,
    block: &mut [f32],
    epilogue: Epilogue<'_>,
) {
    let (n, k) = (w.n, w.k);
    let nr = 2 * L::W;
    debug_assert_eq!(nr, nr_of(w));
    let rows = block.len() / n;
    let residual = match epilogue {
        Epilogue::ResidualLayerNorm { residual, .. } => Some(&residual[r0 * n..(r0 + rows) * n]),
        Epilogue::Act(_) => None,
    };
    let act = match epilogue {
        Epilogue::Act(act) => act,
        Epilogue::ResidualLayerNorm { .. } => Activation::None,
    };
    let a = &a[r0 * k..(r0 + rows) * k];
    // The block's rows packed strip by strip (strip of `mr` rows: element (i, kk) at kk·mr + i), so
    // the micro-kernel broadcasts from one contiguous stream. (Broadcasting from the `mr` rows in
    // place instead, which saves this copy, measured no faster on AVX2: 2026-12-01.)
    // Taken out of the thread-local rather than used in a closure, which would not inherit this
    // function's target features.
    let mut strips = STRIPS.take();
    strips.clear();
    strips.resize(rows * k, 0.0);
    {
        let mut r = 0;
        while r < rows {
            let mr = strip_rows(MR, rows - r);
            let dst = &mut strips[r * k..(r + mr) * k];
            for i in 0..mr {
                let src = &a[(r + i) * k..(r + i + 1) * k];
                for (kk, v) in src.iter().enumerate() {
                    dst[kk * mr + i] = *v;
                }
            }
            r += mr;
        }
    }
    panels_body::<L, MR>(&strips, w, block, residual, act);
    STRIPS.set(strips);
}

thread_local! {
    /// The packed rows of the block a thread is running (reused, so no allocation per call).
    static STRIPS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Every panel over every strip of a packed block.
#[inline(always)]
fn panels_body<L: Lanes, const MR: usize>(
    a: &[f32],
    w: &PackedLinear,
    block: &mut [f32],
    residual: Option<&[f32]>,
    act: Activation,
) {
    let (n, k) = (w.n, w.k);
    let nr = 2 * L::W;
    let rows = block.len() / n;
    let panels = w.panel_data();
    // A tile of the last, partial panel goes through this buffer.
    let mut spill = [0.0f32; 12 * 32];
    for p in 0..n.div_ceil(nr) {
        let panel = &panels[p * k * nr..(p + 1) * k * nr];
        let bias = &w.bias[p * nr..(p + 1) * nr];
        let c0 = p * nr;
        let cols = nr.min(n - c0);
        let mut r = 0;
        while r < rows {
            let mr = strip_rows(MR, rows - r);
            let a = &a[r * k..(r + mr) * k];
            let mut args = TileArgs { k, a, lda: 1, a_step: mr, b: panel, ldb: nr, bias: Some(bias), res: None };
            if cols == nr {
                args.res = residual.map(|res| &res[r * n + c0..]);
                let dst = &mut block[r * n + c0..];
                tile_rows::<L, MR>(mr, args, dst, n);
                apply_act::<L>(act, dst, n, mr, nr);
            } else {
                tile_rows::<L, MR>(mr, args, &mut spill, nr);
                for i in 0..mr {
                    let dst = &mut block[(r + i) * n + c0..][..cols];
                    dst.copy_from_slice(&spill[i * nr..i * nr + cols]);
                    if let Some(res) = residual {
                        for (d, v) in dst.iter_mut().zip(&res[(r + i) * n + c0..][..cols]) {
                            *d += v;
                        }
                    }
                }
                apply_act::<L>(act, &mut block[r * n + c0..], n, mr, cols);
            }
            r += mr;
        }
    }
}

fn nr_of(w: &PackedLinear) -> usize {
    nr(w.isa)
}

/// Applies `act` to `rows` rows of `cols` values at row stride `ld` (vectorised where inlined).
#[inline(always)]
fn apply_act<L: Lanes>(act: Activation, c: &mut [f32], ld: usize, rows: usize, cols: usize) {
    if act == Activation::None {
        return;
    }
    for i in 0..rows {
        let row = &mut c[i * ld..i * ld + cols];
        match act {
            Activation::None => {}
            Activation::Relu => row.iter_mut().for_each(|v| *v = v.max(0.0)),
            Activation::Gelu => {
                if L::FUSED {
                    for v in row.iter_mut() {
                        *v = super::ops::gelu_fused(*v);
                    }
                } else {
                    for v in row.iter_mut() {
                        *v = super::ops::gelu(*v);
                    }
                }
            }
            Activation::Tanh => {
                for v in row.iter_mut() {
                    *v = super::ops::tanh(*v);
                }
            }
        }
    }
}

/// Rows of the next strip when `left` rows remain: the full `mr`, else 4, 2 or 1 (so a block
/// of 32 rows runs as 12 + 12 + 4 + 4 on AVX-512, 5 × 6 + 2 on AVX2).
#[inline(always)]
pub(crate) fn strip_rows(mr: usize, left: usize) -> usize {
    if left >= mr {
        mr
    } else if left >= 4 {
        4
    } else if left >= 2 {
        2
    } else {
        1
    }
}

/// [`tile`] with `rows` ∈ {`MR`, 4, 2, 1} (from [`strip_rows`]) picked at run time.
#[inline(always)]
pub(crate) fn tile_rows<L: Lanes, const MR: usize>(rows: usize, t: TileArgs<'_>, c: &mut [f32], ldc: usize) {
    match rows {
        r if r == MR => tile::<L, MR>(t, c, ldc),
        4 => tile::<L, 4>(t, c, ldc),
        2 => tile::<L, 2>(t, c, ldc),
        _ => tile::<L, 1>(t, c, ldc),
    }
}

/// The operands of one tile: `MR` rows of `a` (element (i, kk) at `i·lda + kk·a_step`: row-major
/// rows have `a_step` 1, a packed strip has `lda` 1 and `a_step` MR), a `k × 2·W` block of `b` (row
/// stride `ldb`), an optional `2·W` bias and an optional residual (row stride `ldc`).
#[derive(Clone, Copy)]
pub(crate) struct TileArgs<'a> {
    pub k: usize,
    pub a: &'a [f32],
    pub lda: usize,
    pub a_step: usize,
    pub b: &'a [f32],
    pub ldb: usize,
    pub bias: Option<&'a [f32]>,
    pub res: Option<&'a [f32]>,
}

/// One `MR × 2·W` tile: `c[i][j] = bias[j] + Σ_kk a[i·lda + kk·a_step] · b[kk·ldb + j] (+ res[i·ldc + j])`,
/// accumulated in registers over the whole `k`, written at row stride `ldc`.
#[inline(always)]
pub(crate) fn tile<L: Lanes, const MR: usize>(t: TileArgs<'_>, c: &mut [f32], ldc: usize) {
    let w = L::W;
    let TileArgs { k, a, lda, a_step, b, ldb, bias, res } = t;
    assert!(MR == 0 || k == 0 || a.len() > (MR - 1) * lda + (k - 1) * a_step);
    assert!(k == 0 || b.len() >= (k - 1) * ldb + 2 * w);
    assert!(c.len() >= (MR - 1) * ldc + 2 * w);
    if let Some(res) = res {
        assert!(res.len() >= (MR - 1) * ldc + 2 * w);
    }
    let init = match bias {
        Some(bias) => [L::load(&bias[..w]), L::load(&bias[w..2 * w])],
        None => [L::zero(), L::zero()],
    };
    let mut acc = [init; MR];
    let ap = a.as_ptr();
    let bp = b.as_ptr();
    for kk in 0..k {
        // SAFETY: kk < k, so kk·ldb + 2w ≤ b.len() (asserted above).
        let (w0, w1) = unsafe { (L::load_ptr(bp.add(kk * ldb)), L::load_ptr(bp.add(kk * ldb + w))) };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: i < MR and kk < k, so i·lda + kk·a_step ≤ (MR-1)·lda + (k-1)·a_step < a.len()
            // (asserted above).
            let x = unsafe { L::splat_ptr(ap.add(i * lda + kk * a_step)) };
            row[0] = L::fma(x, w0, row[0]);
            row[1] = L::fma(x, w1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        let (mut v0, mut v1) = (row[0], row[1]);
        if let Some(res) = res {
            v0 = L::add(v0, L::load(&res[i * ldc..i * ldc + w]));
            v1 = L::add(v1, L::load(&res[i * ldc + w..i * ldc + 2 * w]));
        }
        L::store(&mut c[i * ldc..i * ldc + w], v0);
        L::store(&mut c[i * ldc + w..i * ldc + 2 * w], v1);
    }
}

#[cfg(test)]
#[path = "packed_tests.rs"]
mod tests;
