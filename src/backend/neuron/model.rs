//! A NEFF loaded on one NeuronCore: `nrt_load` / `nrt_unload`, its tensor info, and the check of
//! that info against the model configuration.

use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use neuron_sys::bindings::{NRT_SUCCESS, NRT_TENSOR_USAGE_OUTPUT, nrt_model_t, nrt_tensor_info_array_t};

use super::error::{NeuronError, Operation};
use super::runtime::{Runtime, c_chars_to_string};
use super::tensor::TensorSet;
use crate::tensor::DataType;

/// Whether a model tensor is read or written by an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorUsage {
    /// Written before each execution.
    Input,
    /// Read after each execution.
    Output,
}

impl TensorUsage {
    fn as_str(self) -> &'static str {
        match self {
            TensorUsage::Input => "input",
            TensorUsage::Output => "output",
        }
    }
}

/// One input or output as the runtime reports it for a loaded NEFF (its dtype field is ignored:
/// two incompatible numberings exist; dtypes come from the model configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeffTensorInfo {
    /// The runtime's name for the tensor.
    pub name: String,
    /// Input or output.
    pub usage: TensorUsage,
    /// Size in bytes.
    pub size: usize,
    /// Dimensions, outermost first (empty when the runtime reports none).
    pub shape: Vec<usize>,
}

/// One input or output as the model configuration describes it, with its full shape for one
/// compiled NEFF (batch dimension included for batching models).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// Tensor name (as in the NEFF).
    pub name: String,
    /// Element datatype from the configuration.
    pub dtype: DataType,
    /// Full shape.
    pub shape: Vec<usize>,
}

impl ExpectedTensor {
    /// Bytes of the whole tensor; `None` for `BYTES` or on overflow.
    pub fn byte_size(&self) -> Option<usize> {
        let elem = self.dtype.size()?;
        self.shape.iter().try_fold(elem, |acc, d| acc.checked_mul(*d))
    }
}

/// Checks a NEFF's tensors against the configuration: every configured input and output exists
/// in the NEFF with size = product(shape) × element size, and the NEFF has no input the
/// configuration leaves out (it would never be written). Extra NEFF outputs are allowed.
pub fn check_tensors(
    found: &[NeffTensorInfo],
    inputs: &[ExpectedTensor],
    outputs: &[ExpectedTensor],
) -> Result<(), String> {
    for (usage, expected) in [(TensorUsage::Input, inputs), (TensorUsage::Output, outputs)] {
        for want in expected {
            let Some(have) = found.iter().find(|t| t.usage == usage && t.name == want.name) else {
                let names: Vec<&str> = found.iter().filter(|t| t.usage == usage).map(|t| t.name.as_str()).collect();
                return Err(format!(
                    "the NEFF has no {} '{}' (its {}s: {})",
                    usage.as_str(),
                    want.name,
                    usage.as_str(),
                    if names.is_empty() { "none".to_owned() } else { names.join(", ") }
                ));
            };
            let Some(bytes) = want.byte_size() else {
                return Err(format!(
                    "{} '{}': {} tensors cannot run on Neuron (only fixed-size datatypes)",
                    usage.as_str(),
                    want.name,
                    want.dtype
                ));
            };
            if bytes != have.size {
                return Err(format!(
                    "{} '{}': the configuration says {} {:?} = {bytes} bytes, the NEFF's tensor is {} bytes \
                     (shape {:?}); fix the config's dtype/dims or recompile the NEFF for this shape",
                    usage.as_str(),
                    want.name,
                    want.dtype,
                    want.shape,
                    have.size,
                    have.shape
                ));
            }
        }
    }
    if let Some(extra) =
        found.iter().find(|t| t.usage == TensorUsage::Input && !inputs.iter().any(|i| i.name == t.name))
    {
        return Err(format!(
            "the NEFF's input '{}' ({} bytes) is not in the model configuration; every input must be configured",
            extra.name, extra.size
        ));
    }
    Ok(())
}

/// A NEFF loaded on one NeuronCore; unloaded when dropped.
pub struct NeuronModel {
    runtime: Arc<Runtime>,
    handle: NonNull<nrt_model_t>,
    name: Arc<str>,
    core: u32,
    tensors: Vec<NeffTensorInfo>,
}

// SAFETY: a model handle is an opaque runtime object that libnrt lets any thread use (several
// threads may even execute one model); this wrapper is moved between threads, never shared.
unsafe impl Send for NeuronModel {}

impl std::fmt::Debug for NeuronModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeuronModel")
            .field("name", &self.name)
            .field("core", &self.core)
            .field("tensors", &self.tensors)
            .finish_non_exhaustive()
    }
}

impl NeuronModel {
    /// Loads `neff` on NeuronCore `core` (an index among the visible cores) and reads its tensor
    /// info. `name` is the model's name, used in errors.
    pub fn load(runtime: &Arc<Runtime>, name: &str, core: u32, neff: &[u8]) -> Result<NeuronModel, NeuronError> {
        NeuronModel::load_rank(runtime, name, core, neff, None)
    }

    /// Like [`NeuronModel::load`]; with `rank = Some((rank, ranks))` the NEFF is one rank of a
    /// group of `ranks` whose programs hold collective operators, loaded with
    /// `nrt_load_collectives` (the runtime then needs `NEURON_RT_ROOT_COMM_ID`).
    pub fn load_rank(
        runtime: &Arc<Runtime>,
        name: &str,
        core: u32,
        neff: &[u8],
        rank: Option<(u32, u32)>,
    ) -> Result<NeuronModel, NeuronError> {
        let invalid = |detail: String| NeuronError::Invalid {
            op: Operation::Load,
            model: name.to_owned(),
            core: Some(core),
            detail,
        };
        if core >= runtime.visible_cores() {
            return Err(invalid(format!(
                "this process sees {} NeuronCore(s) (indices 0..{}); check NEURON_RT_VISIBLE_CORES",
                runtime.visible_cores(),
                runtime.visible_cores()
            )));
        }
        let start_nc = i32::try_from(core).map_err(|_| invalid("core index out of range".into()))?;
        if neff.is_empty() {
            return Err(invalid("the NEFF is empty".into()));
        }
        let mut raw: *mut nrt_model_t = std::ptr::null_mut();
        // SAFETY: `neff` is a live buffer of `neff.len()` bytes for the duration of the call (the
        // runtime copies what it keeps); `raw` is a valid out-pointer; the runtime is initialised
        // (we hold an Arc to it). The core count is deprecated: AWS's header says always pass -1.
        let code = match rank {
            None => unsafe {
                (runtime.nrt().nrt_load)(neff.as_ptr().cast::<c_void>(), neff.len(), start_nc, -1, &mut raw)
            },
            // SAFETY: as above; the rank and group size are plain integers.
            Some((rank, ranks)) => unsafe {
                (runtime.nrt().nrt_load_collectives)(
                    neff.as_ptr().cast::<c_void>(),
                    neff.len(),
                    start_nc,
                    -1,
                    rank,
                    ranks,
                    &mut raw,
                )
            },
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::Load, code, name, Some(core)));
        }
        let handle = NonNull::new(raw).ok_or_else(|| invalid("nrt_load succeeded but returned no model".into()))?;
        let mut model =
            NeuronModel { runtime: Arc::clone(runtime), handle, name: Arc::from(name), core, tensors: Vec::new() };
        model.tensors = model.read_tensor_info()?;
        Ok(model)
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name shared with the tensors allocated for this model (for their errors).
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The NeuronCore it is loaded on.
    pub fn core(&self) -> u32 {
        self.core
    }

    /// Every input and output, in the runtime's order.
    pub fn tensors(&self) -> &[NeffTensorInfo] {
        &self.tensors
    }

    /// Checks the NEFF against the configuration (see [`check_tensors`]).
    pub fn check_against(&self, inputs: &[ExpectedTensor], outputs: &[ExpectedTensor]) -> Result<(), NeuronError> {
        check_tensors(&self.tensors, inputs, outputs).map_err(|detail| NeuronError::Mismatch {
            model: self.name.to_string(),
            core: self.core,
            detail,
        })
    }

    /// Runs one execution: `inputs` must hold every input, `outputs` every output.
    pub fn execute(&self, inputs: &TensorSet, outputs: &mut TensorSet) -> Result<(), NeuronError> {
        // SAFETY: the model handle and both sets are live (owned by us and the caller) and the
        // sets' tensors outlive them; the runtime may be called from any thread.
        let code =
            unsafe { (self.runtime.nrt().nrt_execute)(self.handle.as_ptr(), inputs.as_ptr(), outputs.as_mut_ptr()) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::Execute, code, &self.name, Some(self.core)));
        }
        Ok(())
    }

    fn read_tensor_info(&self) -> Result<Vec<NeffTensorInfo>, NeuronError> {
        let nrt = self.runtime.nrt();
        let mut raw: *mut nrt_tensor_info_array_t = std::ptr::null_mut();
        // SAFETY: the model handle is live; `raw` is a valid out-pointer.
        let code = unsafe { (nrt.nrt_get_model_tensor_info)(self.handle.as_ptr(), &mut raw) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::TensorInfo, code, &self.name, Some(self.core)));
        }
        if raw.is_null() {
            return Err(NeuronError::Invalid {
                op: Operation::TensorInfo,
                model: self.name.to_string(),
                core: Some(self.core),
                detail: "nrt_get_model_tensor_info succeeded but returned nothing".into(),
            });
        }
        // SAFETY: on success `raw` points to a tensor-info array of `tensor_count` entries (a
        // flexible array member), each with `ndim` shape entries when `shape` is non-null; all of
        // it stays valid until nrt_free_model_tensor_info, called right after copying.
        let infos = unsafe {
            let array = &*raw;
            let count = usize::try_from(array.tensor_count).unwrap_or(0);
            let entries = array.tensor_array.as_slice(count);
            let infos: Vec<NeffTensorInfo> = entries
                .iter()
                .map(|e| NeffTensorInfo {
                    name: c_chars_to_string(&e.name),
                    usage: if e.usage == NRT_TENSOR_USAGE_OUTPUT { TensorUsage::Output } else { TensorUsage::Input },
                    size: e.size,
                    shape: if e.shape.is_null() || e.ndim == 0 {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(e.shape, e.ndim as usize).iter().map(|d| *d as usize).collect()
                    },
                })
                .collect();
            (nrt.nrt_free_model_tensor_info)(raw);
            infos
        };
        Ok(infos)
    }
}

impl Drop for NeuronModel {
    fn drop(&mut self) {
        // SAFETY: the handle came from nrt_load and is unloaded exactly once; tensor sets used
        // with it are not referenced by the runtime between executions.
        let code = unsafe { (self.runtime.nrt().nrt_unload)(self.handle.as_ptr()) };
        if code != NRT_SUCCESS {
            tracing::warn!(model = %self.name, core = self.core, status = %neuron_sys::status_label(code), "nrt_unload failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, usage: TensorUsage, size: usize, shape: &[usize]) -> NeffTensorInfo {
        NeffTensorInfo { name: name.into(), usage, size, shape: shape.to_vec() }
    }

    fn want(name: &str, dtype: DataType, shape: &[usize]) -> ExpectedTensor {
        ExpectedTensor { name: name.into(), dtype, shape: shape.to_vec() }
    }

    #[test]
    fn matching_sizes_pass_and_extra_outputs_are_allowed() {
        let found = [
            info("x", TensorUsage::Input, 4 * 8 * 4, &[4, 8]),
            info("y", TensorUsage::Output, 4 * 2 * 2, &[4, 2]),
            info("aux", TensorUsage::Output, 16, &[4]),
        ];
        let ok = check_tensors(&found, &[want("x", DataType::Fp32, &[4, 8])], &[want("y", DataType::Bf16, &[4, 2])]);
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn a_size_mismatch_names_the_tensor_and_both_sizes() {
        let found = [info("x", TensorUsage::Input, 64, &[4, 4]), info("y", TensorUsage::Output, 8, &[4, 2])];
        let err = check_tensors(&found, &[want("x", DataType::Fp32, &[4, 8])], &[]);
        let Err(text) = err else { panic!("a 128-byte config passed against a 64-byte tensor") };
        assert!(text.starts_with("input 'x': the configuration says FP32 [4, 8] = 128 bytes"), "{text}");
        assert!(text.contains("the NEFF's tensor is 64 bytes (shape [4, 4])"), "{text}");
    }

    #[test]
    fn missing_and_unconfigured_tensors_are_reported() {
        let found = [info("x", TensorUsage::Input, 16, &[4]), info("mask", TensorUsage::Input, 4, &[4])];
        let missing = check_tensors(&found, &[want("x", DataType::Fp32, &[4])], &[want("y", DataType::Fp32, &[4])]);
        assert_eq!(missing, Err("the NEFF has no output 'y' (its outputs: none)".to_owned()));
        let extra = check_tensors(&found, &[want("x", DataType::Fp32, &[4])], &[]);
        assert!(
            matches!(&extra, Err(t) if t.starts_with("the NEFF's input 'mask' (4 bytes) is not in the model")),
            "{extra:?}"
        );
        let wrong_name = check_tensors(&found, &[want("z", DataType::Fp32, &[4])], &[]);
        assert_eq!(wrong_name, Err("the NEFF has no input 'z' (its inputs: x, mask)".to_owned()));
        let bytes = check_tensors(&found, &[want("x", DataType::Bytes, &[4])], &[]);
        assert!(matches!(&bytes, Err(t) if t.contains("BYTES tensors cannot run on Neuron")), "{bytes:?}");
    }
}
