//! CPU reference backend: f32 kernels, the built-in dense models and a BERT encoder.
//!
//! It runs on every machine (CI included) and is the reference the Neuron path is checked
//! against. General GEMMs go through the `gemm` crate's driver with the AVX-512 / AVX2+FMA / scalar
//! micro-kernels picked at run time; the BERT encoder's dense layers and attention run our own
//! micro-kernels on weights packed at load ([`packed`]). See [`isa`] (`NEURON_WORKER_ISA` lowers
//! the choice to measure the AVX2 path).

pub mod attention;
pub mod bert;
pub mod bert_check;
pub mod builtin;
pub mod dense;
pub mod dtypes;
pub mod f16_widen;
pub mod fast_exp;
pub mod gemm;
pub mod gguf;
pub mod instance;
pub mod isa;
pub mod linear;
pub mod linear_kernels;
pub mod llama;
pub mod ops;
pub mod packed;
pub mod pooling;
pub mod quant;
pub(crate) mod simd;
pub mod skinny;
pub mod stateful;
pub mod weights;

pub use bert::{BertConfig, BertInfo, BertModel, BertOutput, BertScratch};
pub use bert_check::BertInputCheck;
pub use builtin::{BUILTIN_NAMES, builtin, linear_weights, mlp_weights};
pub use dense::{Activation, DenseLayer, DenseStack};
pub use gemm::{default_threads, isa_name, matmul, matmul_bt};
pub use instance::{CpuInstance, CpuModel};
pub use pooling::PoolingMode;
