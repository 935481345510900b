//! [`QMatrix`]: a `[n, k]` weight kept in its GGUF block format, applied to f32 activations.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::QuantError;
use super::activations::{ActPrecision, QActs};
use super::format::{QFormat, dequantize_block, quantize_block};
use super::isa::{QuantIsa, quant_isa, rows_with};
use super::layout::{GROUP, RowMajor, interleave, push_row};
use super::pool::{PoolJob, QuantPool};

/// The stored weight, split by field and (block formats) interleaved by groups of 16 rows as
/// [`super::layout`] describes, so the kernels load one piece of 16 rows' blocks per register.
#[derive(Debug, PartialEq)]
pub(crate) struct QData {
    pub format: QFormat,
    pub n: usize,
    pub k: usize,
    /// Blocks per row (k for F16).
    pub nb: usize,
    /// Bytes of quantized values per block.
    pub qs_bytes: usize,
    /// Quantized values, interleaved (F16: the halves row-major, little-endian).
    pub qs: Vec<u8>,
    /// Scales, interleaved, f16 bits.
    pub d: Vec<u16>,
    /// Q4_1 minimums, interleaved, f16 bits (empty otherwise).
    pub mins: Vec<u16>,
    /// `[n, k]`.
    pub shape: [usize; 2],
}

impl QData {
    /// The stored form of `n` rows of `k` elements given row-major (F16: `qs` only).
    fn from_row_major(format: QFormat, n: usize, k: usize, rm: RowMajor) -> QData {
        let nb = k / format.block_elems();
        let qs_bytes = format.qs_bytes();
        let rm = if format == QFormat::F16 { rm } else { interleave(n, nb, qs_bytes, &rm) };
        QData { format, n, k, nb, qs_bytes, qs: rm.qs, d: rm.d, mins: rm.mins, shape: [n, k] }
    }

    /// Appends row `r` in row-major form (F16: its halves' bytes).
    fn push_row(&self, r: usize, out: &mut RowMajor) {
        if self.format == QFormat::F16 {
            out.qs.extend_from_slice(&self.qs[r * self.k * 2..(r + 1) * self.k * 2]);
        } else {
            push_row(self.nb, self.qs_bytes, (&self.qs, &self.d, &self.mins), r, out);
        }
    }
}

/// Activations as the kernels see them: quantized (block formats) or f32 (F16).
pub(crate) struct XRef<'a> {
    pub m: usize,
    pub q: &'a QActs,
    pub f: &'a [f32],
}

/// A quantized `[n, k]` weight (`out = x · Wᵀ`). Cheap to clone (shared storage).
#[derive(Debug, Clone, PartialEq)]
pub struct QMatrix {
    data: Arc<QData>,
    /// How products quantize their activations.
    act: ActPrecision,
}

/// Products with fewer weight elements than this run on the calling thread only.
const PARALLEL_MIN_ELEMS: usize = 32 * 1024;

impl QMatrix {
    /// Builds from GGUF tensor bytes: `n` rows of `k` elements in `format` (GGUF's `ne` = [k, n]).
    pub fn from_gguf_bytes(format: QFormat, n: usize, k: usize, bytes: &[u8]) -> Result<QMatrix, QuantError> {
        let block = format.block_elems();
        if !k.is_multiple_of(block) || k == 0 {
            return Err(QuantError::RaggedRow { format, k, block });
        }
        let expected = format.tensor_bytes(n, k).ok_or(QuantError::WrongSize {
            format,
            n,
            k,
            expected: usize::MAX,
            got: bytes.len(),
        })?;
        if bytes.len() != expected {
            return Err(QuantError::WrongSize { format, n, k, expected, got: bytes.len() });
        }
        let nb = k / block;
        let qs_bytes = format.qs_bytes();
        let bb = format.block_bytes();
        let mut rm = RowMajor::default();
        if format == QFormat::F16 {
            rm.qs.extend_from_slice(bytes);
        } else {
            rm.qs.reserve(n * nb * qs_bytes);
            rm.d.reserve(n * nb);
            for blk in bytes.chunks_exact(bb) {
                rm.d.push(u16::from_le_bytes([blk[0], blk[1]]));
                let q_at = if format == QFormat::Q4_1 {
                    rm.mins.push(u16::from_le_bytes([blk[2], blk[3]]));
                    4
                } else {
                    2
                };
                rm.qs.extend_from_slice(&blk[q_at..]);
            }
        }
        Ok(QMatrix { data: Arc::new(QData::from_row_major(format, n, k, rm)), act: ActPrecision::I8 })
    }

    /// Quantizes a row-major f32 `[n, k]` matrix (llama.cpp's reference quantizers).
    pub fn quantize(format: QFormat, w: &[f32], n: usize, k: usize) -> Result<QMatrix, QuantError> {
        let block = format.block_elems();
        if !k.is_multiple_of(block) || k == 0 {
            return Err(QuantError::RaggedRow { format, k, block });
        }
        if w.len() != n * k {
            return Err(QuantError::Shape {
                what: format!("weight has {} values, [{n}, {k}] needs {}", w.len(), n * k),
            });
        }
        let mut bytes = Vec::with_capacity(format.tensor_bytes(n, k).unwrap_or(0));
        for b in w.chunks_exact(block) {
            quantize_block(format, b, &mut bytes);
        }
        QMatrix::from_gguf_bytes(format, n, k, &bytes)
    }

    /// A matrix made of rows `rows` of this one, in that order (blocks move untouched). Panics if
    /// a row is out of range (callers build `rows` from `n()`).
    pub fn select_rows(&self, rows: &[usize]) -> QMatrix {
        let d = &self.data;
        let mut rm = RowMajor::default();
        for &r in rows {
            d.push_row(r, &mut rm);
        }
        QMatrix { data: Arc::new(QData::from_row_major(d.format, rows.len(), d.k, rm)), act: self.act }
    }

    /// Row `r` dequantized into `out` (`k` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let d = &self.data;
        let f = d.format;
        let mut rm = RowMajor::default();
        d.push_row(r, &mut rm);
        // One GGUF block at a time, straight from the row's fields (F16: one half per "block").
        let mut blk = Vec::with_capacity(f.block_bytes());
        for (b, o) in out.chunks_exact_mut(f.block_elems()).enumerate().take(d.nb) {
            blk.clear();
            if f != QFormat::F16 {
                blk.extend_from_slice(&rm.d[b].to_le_bytes());
            }
            if f == QFormat::Q4_1 {
                blk.extend_from_slice(&rm.mins[b].to_le_bytes());
            }
            blk.extend_from_slice(&rm.qs[b * d.qs_bytes..(b + 1) * d.qs_bytes]);
            dequantize_block(f, &blk, o);
        }
    }

    /// Matrices over the same `k` in the same format, rows concatenated (fused q/k/v or gate/up);
    /// `None` when formats or widths differ.
    pub fn stack(parts: &[QMatrix]) -> Option<QMatrix> {
        let first = &parts.first()?.data;
        if parts.iter().any(|p| p.data.format != first.format || p.data.k != first.k) {
            return None;
        }
        let n = parts.iter().map(|p| p.data.n).sum();
        let mut rm = RowMajor::default();
        for p in parts {
            for r in 0..p.data.n {
                p.data.push_row(r, &mut rm);
            }
        }
        Some(QMatrix { data: Arc::new(QData::from_row_major(first.format, n, first.k, rm)), act: parts[0].act })
    }

    /// This matrix with products quantizing activations to `act` (the weight is shared, not copied).
    pub fn with_activations(&self, act: ActPrecision) -> QMatrix {
        QMatrix { data: Arc::clone(&self.data), act }
    }

    /// How products quantize their activations.
    pub fn activations(&self) -> ActPrecision {
        self.act
    }

    /// `[n, k]`.
    pub fn shape(&self) -> &[usize] {
        &self.data.shape
    }

    /// Output features (rows of the weight).
    pub fn n(&self) -> usize {
        self.data.n
    }

    /// Input features (columns of the weight).
    pub fn k(&self) -> usize {
        self.data.k
    }

    /// The storage format.
    pub fn format(&self) -> QFormat {
        self.data.format
    }

    /// Bytes the weight occupies in memory (what a product reads).
    pub fn bytes(&self) -> usize {
        let d = &self.data;
        d.qs.len() + 2 * (d.d.len() + d.mins.len())
    }

    /// The weight in GGUF block bytes again (for digests and round trips).
    pub fn gguf_bytes(&self) -> Vec<u8> {
        let d = &self.data;
        if d.format == QFormat::F16 {
            return d.qs.clone();
        }
        let mut out = Vec::with_capacity(d.n * d.nb * d.format.block_bytes());
        let mut rm = RowMajor::default();
        for r in 0..d.n {
            rm.qs.clear();
            rm.d.clear();
            rm.mins.clear();
            d.push_row(r, &mut rm);
            for (b, q) in rm.qs.chunks_exact(d.qs_bytes).enumerate() {
                out.extend_from_slice(&rm.d[b].to_le_bytes());
                if d.format == QFormat::Q4_1 {
                    out.extend_from_slice(&rm.mins[b].to_le_bytes());
                }
                out.extend_from_slice(q);
            }
        }
        out
    }

    /// The weight as row-major f32 `[n, k]`, with gguf-py's dequantization arithmetic.
    pub fn dequantize(&self) -> Vec<f32> {
        let f = self.data.format;
        let bytes = self.gguf_bytes();
        let mut out = vec![0.0f32; self.data.n * self.data.k];
        for (blk, o) in bytes.chunks_exact(f.block_bytes()).zip(out.chunks_exact_mut(f.block_elems())) {
            dequantize_block(f, blk, o);
        }
        out
    }

    /// `out[m, n] = x[m, k] · Wᵀ` with this process's kernel ISA ([`quant_isa`]) and thread pool.
    ///
    /// Deterministic and batch-invariant: each output is reduced in one fixed order (see the
    /// `scalar` module) whatever `m`, the ISA or the thread split. Panics if `x` is not `m·k` long
    /// or `out` not `m·n` (a caller bug, never input-dependent).
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.forward_with(quant_isa(), QuantPool::global(), x, m, out)
    }

    /// [`forward`](Self::forward) with an explicit ISA (capped at what the CPU has) and pool.
    pub fn forward_with(&self, isa: QuantIsa, pool: &QuantPool, x: &[f32], m: usize, out: &mut [f32]) {
        let d = &self.data;
        assert_eq!(x.len(), m * d.k, "QMatrix::forward: x must be [m={m}, k={}]", d.k);
        assert_eq!(out.len(), m * d.n, "QMatrix::forward: out must be [m={m}, n={}]", d.n);
        if m == 0 || d.n == 0 {
            return;
        }
        let isa = isa.min(QuantIsa::detect());
        let mut job = SCRATCH.with(|s| s.borrow_mut().take()).unwrap_or_default();
        if d.format == QFormat::F16 {
            job.xf.clear();
            job.xf.extend_from_slice(x);
            job.xq.m = m;
        } else {
            job.xq.quantize_with(x, m, d.k, d.format, self.act);
        }
        let threads = if d.n * d.k < PARALLEL_MIN_ELEMS { 1 } else { pool.threads() };
        // Row chunks: a few per thread (dynamic balance), starting at whole interleaved groups.
        let tasks = if threads == 1 { 1 } else { threads * 3 };
        let per = d.n.div_ceil(tasks).div_ceil(GROUP) * GROUP;
        job.chunks = (0..d.n).step_by(per.max(GROUP)).map(|s| s..(s + per).min(d.n)).collect();
        job.outs.resize_with(job.chunks.len(), Default::default);
        let run = Arc::new(MatJob {
            w: Arc::clone(&self.data),
            isa,
            inner: job,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        if threads == 1 {
            while run.run_next() {}
        } else {
            pool.run(Arc::clone(&run) as Arc<dyn PoolJob>);
        }
        for (rows, o) in run.inner.chunks.iter().zip(&run.inner.outs) {
            let Ok(o) = o.lock() else { continue };
            let len = rows.len();
            for c in 0..m {
                out[c * d.n + rows.start..c * d.n + rows.end].copy_from_slice(&o[c * len..(c + 1) * len]);
            }
        }
        // A worker may still hold the job for a moment after its last task: then the scratch is
        // simply not reused this time.
        let Ok(job) = Arc::try_unwrap(run).map(|j| j.inner) else { return };
        SCRATCH.with(|s| *s.borrow_mut() = Some(job));
    }
}

/// Per calling thread, reused between products: quantized activations and per-chunk outputs.
#[derive(Default)]
struct Scratch {
    xq: QActs,
    xf: Vec<f32>,
    chunks: Vec<Range<usize>>,
    outs: Vec<Mutex<Vec<f32>>>,
}

thread_local! {
    static SCRATCH: RefCell<Option<Scratch>> = const { RefCell::new(None) };
}

struct MatJob {
    w: Arc<QData>,
    isa: QuantIsa,
    inner: Scratch,
    next: AtomicUsize,
    done: AtomicUsize,
}

impl PoolJob for MatJob {
    fn run_next(&self) -> bool {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(rows) = self.inner.chunks.get(i) else { return false };
        let m = self.inner.xq.m;
        if let Ok(mut o) = self.inner.outs[i].lock() {
            o.resize(m * rows.len(), 0.0);
            let x = XRef { m, q: &self.inner.xq, f: &self.inner.xf };
            rows_with(self.isa, &self.w, rows.clone(), &x, &mut o);
        }
        self.done.fetch_add(1, Ordering::Release);
        true
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire) >= self.inner.chunks.len()
    }
}

#[cfg(test)]
#[path = "qmatrix_tests.rs"]
mod tests;
