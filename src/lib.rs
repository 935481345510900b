//! neuron-worker: a gRPC inference worker (KServe v2 / Triton protocol) for AWS Trainium and
//! Inferentia2, with a CPU reference backend that runs everywhere.

pub mod backend;
pub mod batching;
pub mod bench;
pub mod cli;
pub mod config;
pub mod neff;
pub mod proto;
pub mod repository;
pub mod server;
pub mod sessions;
pub mod tensor;
pub mod tokenize;
