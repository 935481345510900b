//! Quantized weight matrices (GGUF block formats) and their integer dot-product kernels.
//!
//! A [`QMatrix`] keeps a `[n, k]` weight in its block format (Q8_0, Q4_0, Q4_1 or F16) — it is
//! never expanded to f32 — and multiplies activations by it as llama.cpp does: each activation row
//! is quantized per 32-element block to 8 bits, then integer dot products run per block
//! (AVX-512 VNNI, AVX2 or a scalar reference, chosen at run time). A matrix may instead quantize its
//! activations to 16 bits per block ([`ActPrecision::I16`]: `vpdpwssd`/`vpmaddwd` on weights
//! widened to 16 bits), closer to f32 products at about twice the integer work. Every output element is reduced
//! in one fixed order that depends neither on the number of rows nor on the instruction set, so the
//! results are batch-invariant and equal across ISAs (the tests check each kernel against the
//! scalar reference bit for bit).

mod activations;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx2_wide;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_wide;
mod format;
mod isa;
mod layout;
mod pool;
mod qmatrix;
mod scalar;
#[cfg(test)]
mod wide_tests;

pub use activations::ActPrecision;
pub use format::QFormat;
pub use isa::{QuantIsa, quant_isa};
pub use pool::{DEFAULT_SPIN_US, QuantPool, default_spin_us};
pub use qmatrix::QMatrix;

/// Why a quantized matrix could not be built or applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// The row length does not split into whole blocks of the format.
    #[error(
        "{format:?} needs a row length (k = {k}) that is a multiple of {block}; re-export the model with another format"
    )]
    RaggedRow {
        /// The block format.
        format: QFormat,
        /// Elements per row.
        k: usize,
        /// Elements per block.
        block: usize,
    },
    /// The bytes given do not have the size the shape and format imply.
    #[error(
        "{format:?} [{n}, {k}] needs {expected} bytes, got {got}: the file is truncated or its tensor info is wrong"
    )]
    WrongSize {
        /// The block format.
        format: QFormat,
        /// Rows.
        n: usize,
        /// Elements per row.
        k: usize,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes given.
        got: usize,
    },
    /// Input or output slices do not match `m`, `k` and `n`.
    #[error("shape mismatch: {what}")]
    Shape {
        /// Which slice and what length was expected.
        what: String,
    },
}
