//! Llama-family decoders (Llama 2/3, Mistral, Qwen2, SmolLM) on the CPU: configuration, weights from HF
//! safetensors folders, and a batch-invariant forward over paged K/V implementing
//! [`DecoderInstance`](crate::backend::generative::DecoderInstance).

mod attention;
mod attention_merge;
mod attention_tasks;
pub mod config;
pub mod error;
pub mod hf_folder;
mod kv_pool;
mod layers;
pub mod model;
pub mod random;
pub mod rope;
pub mod weights;

pub use config::{Llama3RopeScaling, LlamaConfig};
pub use error::LoadError;
pub use hf_folder::{GenerationDefaults, HfDecoderFiles, load_hf_decoder};
pub use kv_pool::KvPool;
pub use model::LlamaModel;
pub use random::RandomWeights;
pub use weights::{SafetensorsSource, Weight, WeightSource};
#[cfg(test)]
mod attention_tests;
