//! neuron-worker: a gRPC inference worker (KServe v2 / Triton protocol) for AWS Trainium and
//! Inferentia2, with a CPU reference backend that runs everywhere.

pub mod backend;
pub mod batching {
    //! The batching layer (the generative policy; the dynamic and sequence policies move here).
    pub mod generative;
}
pub mod bench;
pub mod cli;
pub mod config;
pub mod neff;
pub mod proto;
pub mod repository;
pub mod scheduler;
pub mod sequence;
pub mod server;
pub mod tensor;
