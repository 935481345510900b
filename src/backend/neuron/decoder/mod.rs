//! Generative decoders on NeuronCores: compiled prefill programs per sequence bucket and decode
//! programs per (batch, context) bucket, weights loaded once per core, the KV cache resident in
//! device memory and updated in place by every program (bound as both input and output).
//!
//! - [`manifest`]: `neuron_decoder.json`, the compiled layout of a version folder.
//! - [`buckets`]: which program runs which tokens of a step.
//! - [`program`]: one loaded program and its tensor sets.
//! - [`instance`]: the [`DecoderInstance`](crate::backend::generative::DecoderInstance) of one core.
//! - [`load`]: a version folder to one instance per core.
//! - [`timings`]: time inside and between executions.
//! - [`cpu_clock`]: the thread CPU time behind the host-overhead figures.

pub mod buckets;
pub mod cpu_clock;
pub mod instance;
pub mod load;
pub mod manifest;
pub mod program;
pub mod timings;

pub use instance::{DecoderTimings, NeuronDecoderInstance};
pub use manifest::{DecoderManifest, MANIFEST_FILE};
