//! The backend contracts: what the batching layer hands an instance (one batch, or one step of
//! live sequences' slots) and what it gets back.
//!
//! A backend loads one model version and creates *instances*; each instance is owned by one
//! worker thread (one per NeuronCore, or per CPU instance) and executes one batch at a time.

pub mod cpu;
pub mod error;
pub mod generative;
mod input_check;
mod kind;
pub mod neuron;
pub mod stateful;

pub use error::BackendError;
pub use input_check::InputCheck;
pub use kind::BackendKind;
pub use stateful::{SlotStep, StatefulInstance};

use bytes::Bytes;

use crate::tensor::{Tensor, TensorView};

/// One input of a request, already validated against the model's spec.
#[derive(Debug, Clone)]
pub struct RequestInput {
    /// Full shape, including the batch dimension for batching models.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes (exactly `shape` × element size).
    pub data: Bytes,
}

/// One input of a batch, named as in the model configuration.
#[derive(Debug, Clone, Copy)]
pub struct BatchInput<'a> {
    /// Input name from the model configuration.
    pub name: &'a str,
    /// The batch's data: the first dimension is the batch dimension when the model batches.
    pub tensor: TensorView<'a>,
}

/// One output of a batch, named as in the model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Output name from the model configuration.
    pub name: String,
    /// The output for the whole batch (first dimension = batch when the model batches).
    pub tensor: Tensor,
}

/// An executor of batches for one model version, owned by exactly one worker thread.
pub trait ModelInstance: Send {
    /// Runs one batch. `inputs` are in model-configuration order and all share the same batch size
    /// (their first dimension, for batching models). Returns every output of the model, in
    /// model-configuration order, for the whole batch.
    fn execute(&mut self, inputs: &[BatchInput<'_>]) -> Result<Vec<NamedTensor>, BackendError>;

    /// A short label for logs and metrics, e.g. `cpu:0` or `nc:3`.
    fn label(&self) -> String;

    /// The model's check of one request's values, run before the request joins a batch (`None`:
    /// nothing to check beyond names, datatypes and shapes).
    fn input_check(&self) -> Option<std::sync::Arc<dyn InputCheck>> {
        None
    }

    /// Whether the batcher may call [`ModelInstance::execute`] from another thread (its queue's,
    /// on the async runtime) while this instance's own thread is idle, for batches that take a
    /// few microseconds — two thread hand-offs would cost more than the model. Instances whose
    /// calls must stay on one OS thread, or may take long, keep the default `false`.
    fn may_run_inline(&self) -> bool {
        false
    }
}
