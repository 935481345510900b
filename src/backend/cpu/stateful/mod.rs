//! CPU stateful instances: the slots' implicit states in host memory, stepped by a
//! [`SequenceKernel`] (the built-in `accumulate` and `gru` kernels live in [`kernels`]).

pub mod kernels;

use std::sync::Arc;

pub use kernels::{SequenceKernel, builtin_kernel};

use crate::backend::stateful::{SlotStep, StatefulInstance};
use crate::backend::{BackendError, NamedTensor};
use crate::config::{ModelSpec, SequenceSpec};
use crate::tensor::Tensor;
use kernels::KernelStep;

/// A CPU instance over a [`SequenceKernel`], with the slots' states in host memory.
#[derive(Debug)]
pub struct CpuSequenceInstance {
    kernel: Arc<dyn SequenceKernel>,
    initial: Vec<Tensor>,
    states: Vec<Vec<Tensor>>,
    index: usize,
}

impl CpuSequenceInstance {
    /// An instance with `slots` slots, each starting at `initial`.
    pub fn new(
        kernel: Arc<dyn SequenceKernel>,
        initial: Vec<Tensor>,
        slots: usize,
        index: usize,
    ) -> CpuSequenceInstance {
        CpuSequenceInstance { kernel, states: vec![initial.clone(); slots], initial, index }
    }

    fn slot_error(&self, slot: usize) -> BackendError {
        BackendError::Execution {
            message: format!("slot {slot} does not exist (instance has {})", self.states.len()),
            instance_usable: true,
            nrt_status: None,
        }
    }
}

impl StatefulInstance for CpuSequenceInstance {
    fn execute(&mut self, steps: &[SlotStep<'_>]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
        let mut taken = Vec::with_capacity(steps.len());
        for s in steps {
            let st = self.states.get_mut(s.slot).ok_or_else(|| BackendError::Execution {
                message: format!("slot {} does not exist", s.slot),
                instance_usable: true,
                nrt_status: None,
            })?;
            taken.push(if s.start { self.initial.clone() } else { std::mem::take(st) });
        }
        let before = taken.clone();
        let mut ksteps: Vec<KernelStep<'_>> = steps
            .iter()
            .zip(taken.iter_mut())
            .map(|(s, state)| KernelStep { inputs: s.inputs, controls: s.controls, state: state.as_mut_slice() })
            .collect();
        let result = self.kernel.run(&mut ksteps);
        drop(ksteps);
        // A failed batch leaves every slot as it was before it (a START's slot reset), so a
        // retried request applies its step once; the state is small, the copy is cheap.
        let taken = if result.is_ok() { taken } else { before };
        for (s, state) in steps.iter().zip(taken) {
            if let Some(slot) = self.states.get_mut(s.slot) {
                *slot = state;
            }
        }
        result
    }

    fn read_state(&mut self, slot: usize) -> Result<Vec<Tensor>, BackendError> {
        self.states.get(slot).cloned().ok_or_else(|| self.slot_error(slot))
    }

    fn write_state(&mut self, slot: usize, state: Vec<Tensor>) -> Result<(), BackendError> {
        let err = self.slot_error(slot);
        let s = self.states.get_mut(slot).ok_or(err)?;
        *s = state;
        Ok(())
    }

    fn label(&self) -> String {
        format!("cpu:{}", self.index)
    }
}

/// Creates CPU instances for a built-in stateful model: `count` instances of `slots` slots each;
/// `None` when the CPU backend has no stateful kernel for `spec`'s model (built-ins: accumulate, gru).
pub fn create_cpu_instances(
    spec: &ModelSpec,
    seq: &SequenceSpec,
    slots: usize,
    count: usize,
) -> Option<Vec<Box<dyn StatefulInstance>>> {
    let kernel = builtin_kernel(&spec.name)?;
    let initial = seq.states.iter().map(|s| s.initial.clone()).collect::<Vec<_>>();
    Some(
        (0..count)
            .map(|i| {
                Box::new(CpuSequenceInstance::new(kernel.clone(), initial.clone(), slots, i))
                    as Box<dyn StatefulInstance>
            })
            .collect(),
    )
}
