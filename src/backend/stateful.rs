//! The stateful instance contract: an executor that keeps each batch slot's implicit state where
//! the model runs (host memory on the CPU, the slot's device tensors on Neuron). The sequence
//! batching policy drives it; implementations live in `cpu::stateful` and `neuron::sequence`.

use super::{BackendError, NamedTensor, RequestInput};
use crate::tensor::Tensor;

/// One sequence's step handed to an instance: which slot, and the request.
#[derive(Debug)]
pub struct SlotStep<'a> {
    /// The batch slot holding the sequence's state.
    pub slot: usize,
    /// Reset the slot's state to the initial state before running (START).
    pub start: bool,
    /// The request's inputs, in model-configuration order.
    pub inputs: &'a [RequestInput],
    /// Control tensors, in configuration order.
    pub controls: &'a [NamedTensor],
}

/// An executor of stateful batches owned by one thread; each slot holds one live sequence's state.
pub trait StatefulInstance: Send {
    /// Runs one step for every entry (distinct slots). Returns each step's outputs, in
    /// model-configuration order.
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError>;
    /// A copy of a slot's state tensors (for spilling and export).
    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError>;
    /// Replaces a slot's state tensors (restore and import).
    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError>;
    /// A short label for logs, e.g. `cpu:0`.
    fn label(&self) -> String;
}
