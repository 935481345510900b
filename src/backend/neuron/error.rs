//! Errors of the Neuron layer: which libnrt operation failed, where, with which status, and what
//! to do about it.

use crate::backend::BackendError;

/// A libnrt operation, named in errors and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `nrt_init`.
    Init,
    /// `nrt_get_visible_nc_count`.
    CoreCount,
    /// `nrt_get_version`.
    Version,
    /// `nrt_load`.
    Load,
    /// `nrt_get_model_tensor_info`.
    TensorInfo,
    /// `nrt_tensor_allocate`.
    AllocateTensor,
    /// `nrt_allocate_tensor_set` / `nrt_add_tensor_to_tensor_set`.
    BuildTensorSet,
    /// `nrt_tensor_write` (copying a batch's inputs to the device).
    WriteInput,
    /// `nrt_execute`.
    Execute,
    /// `nrt_tensor_read` (copying outputs back).
    ReadOutput,
}

impl Operation {
    /// A lower-case name (`"load"`, `"execute"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Init => "init",
            Operation::CoreCount => "core count",
            Operation::Version => "version query",
            Operation::Load => "load",
            Operation::TensorInfo => "tensor info",
            Operation::AllocateTensor => "tensor allocation",
            Operation::BuildTensorSet => "tensor set",
            Operation::WriteInput => "input write",
            Operation::Execute => "execute",
            Operation::ReadOutput => "output read",
        }
    }

    /// True for the operations of one execution (write inputs, execute, read outputs).
    pub fn is_execution(self) -> bool {
        matches!(self, Operation::WriteInput | Operation::Execute | Operation::ReadOutput)
    }

    /// True for the process-wide operations that decide whether Neuron is usable at all.
    pub fn is_runtime_setup(self) -> bool {
        matches!(self, Operation::Init | Operation::CoreCount | Operation::Version)
    }
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the Neuron runtime could not be used, a model loaded or a batch executed.
///
/// `Clone`, like [`BackendError`], so one failure can be reported to every request of a batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NeuronError {
    /// libnrt could not be loaded or exposes no NeuronCore to this process.
    #[error("Neuron runtime unavailable: {reason}")]
    Unavailable {
        /// What was tried and what to do.
        reason: String,
    },
    /// A libnrt call returned a status other than `NRT_SUCCESS`.
    #[error(
        "{op}{} failed: {status} ({code}). {}",
        Site(model, *core),
        advice(*op, *code)
    )]
    Status {
        /// The operation.
        op: Operation,
        /// The raw status code (kept as a number when this header does not know it).
        code: u32,
        /// The status name (`NRT_TIMEOUT`) or `NRT status <code>` for unknown codes.
        status: String,
        /// The model, when the call concerned one (empty otherwise).
        model: String,
        /// The NeuronCore (index among the visible cores), when the call concerned one.
        core: Option<u32>,
        /// False when the core is in an undefined state and must be taken out of service.
        core_usable: bool,
    },
    /// The compiled model does not match its configuration.
    #[error("model '{model}' on NeuronCore {core}: {detail}")]
    Mismatch {
        /// The model.
        model: String,
        /// The NeuronCore.
        core: u32,
        /// Which tensor, what the configuration expects and what the NEFF has.
        detail: String,
    },
    /// A request or argument this layer refuses before calling libnrt.
    #[error("{op}{}: {detail}", Site(model, *core))]
    Invalid {
        /// The operation that was about to run.
        op: Operation,
        /// The model (empty when none).
        model: String,
        /// The NeuronCore, when known.
        core: Option<u32>,
        /// What is wrong.
        detail: String,
    },
}

/// Formats " of model 'm' on NeuronCore 3" from whichever parts are known.
struct Site<'a>(&'a str, Option<u32>);

impl std::fmt::Display for Site<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.0.is_empty() {
            write!(f, " of model '{}'", self.0)?;
        }
        if let Some(core) = self.1 {
            write!(f, " on NeuronCore {core}")?;
        }
        Ok(())
    }
}

/// False for statuses after which the core is in an undefined state: `NRT_TIMEOUT` (5),
/// `NRT_EXEC_UNIT_UNRECOVERABLE` (101) and the 1200-series hardware errors. Such a core must be
/// taken out of service.
pub fn core_usable_after(code: u32) -> bool {
    !(code == neuron_sys::bindings::NRT_TIMEOUT || code == 101 || (1200..1300).contains(&code))
}

/// What an operator should do about `code` returned by `op`.
pub fn advice(op: Operation, code: u32) -> &'static str {
    use neuron_sys::bindings::*;
    match code {
        NRT_RESOURCE if op.is_execution() => {
            "The device ran out of resources during execution; retry, and if it persists put fewer models on this core."
        }
        NRT_RESOURCE => {
            "Device memory is exhausted: put fewer models on this core, or compile smaller buckets (fewer or smaller batch sizes)."
        }
        NRT_LOAD_NOT_ENOUGH_NC => {
            "The NeuronCores are held by another process or not visible to this one: check `neuron-ls` and NEURON_RT_VISIBLE_CORES / NEURON_RT_NUM_CORES."
        }
        NRT_UNSUPPORTED_NEFF_VERSION => {
            "Compiler/runtime version skew: recompile the NEFF with a neuronx-cc that matches this runtime, or upgrade aws-neuronx-runtime-lib."
        }
        NRT_TIMEOUT => {
            "The execution timed out (NEURON_RT_EXEC_TIMEOUT); the core is in an undefined state and is taken out of service."
        }
        NRT_EXEC_HW_ERR_COLLECTIVES..=1299 => {
            "A hardware error left the core in an undefined state; it is taken out of service. Check `neuron-top`, the kernel log, and the instance's health."
        }
        NRT_HW_ERROR => "The device reported a hardware error: check `neuron-ls`, `neuron-top` and the kernel log.",
        NRT_FAIL_HOST_MEM_ALLOC => "Host memory allocation failed: the worker's memory limit is too low.",
        NRT_UNINITIALIZED | NRT_CLOSED => {
            "The runtime is not initialised or already closed (a bug in the worker's lifecycle)."
        }
        NRT_QUEUE_FULL | NRT_EXEC_NC_BUSY => "The core is busy; retry the request.",
        NRT_EXEC_BAD_INPUT => "The runtime rejected the inputs: check their sizes against the compiled model.",
        NRT_EXEC_COMPLETED_WITH_NUM_ERR => "Execution produced numerical errors (NaN or Inf) in the outputs.",
        NRT_EXEC_COMPLETED_WITH_ERR => {
            "Execution completed with errors; this happens under heavy concurrency: retry, and reduce concurrent executions per core if it persists."
        }
        NRT_EXEC_OOB => {
            "Execution accessed memory out of bounds: check index-like inputs (token ids) against the model's limits."
        }
        NRT_INVALID | NRT_INVALID_HANDLE if op == Operation::Load => {
            "The runtime rejected the NEFF: check that the file is a NEFF compiled for this instance type (trn1/inf2/trn2)."
        }
        NRT_INVALID | NRT_INVALID_HANDLE => "The runtime rejected an argument (a bug in the worker).",
        _ if op == Operation::Init => {
            "The runtime failed to start: check the Neuron driver (`neuron-ls`), NEURON_RT_* variables, and set NEURON_RT_LOG_LEVEL=INFO for details."
        }
        _ => "Set NEURON_RT_LOG_LEVEL=INFO to see the runtime's own log.",
    }
}

impl NeuronError {
    /// An error for `code` returned by `op`; classifies whether the core stays usable.
    pub fn status(op: Operation, code: u32, model: &str, core: Option<u32>) -> NeuronError {
        NeuronError::Status {
            op,
            code,
            status: neuron_sys::status_label(code),
            model: model.to_owned(),
            core,
            core_usable: core_usable_after(code),
        }
    }

    /// False when the failure left the NeuronCore in an undefined state.
    pub fn core_usable(&self) -> bool {
        match self {
            NeuronError::Status { core_usable, .. } => *core_usable,
            _ => true,
        }
    }

    /// The libnrt status code, when the failure came from libnrt.
    pub fn nrt_status(&self) -> Option<u32> {
        match self {
            NeuronError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<neuron_sys::LoadError> for NeuronError {
    fn from(e: neuron_sys::LoadError) -> NeuronError {
        NeuronError::Unavailable { reason: e.to_string() }
    }
}

impl From<NeuronError> for BackendError {
    fn from(e: NeuronError) -> BackendError {
        let message = e.to_string();
        match e {
            NeuronError::Unavailable { .. } => BackendError::Unavailable(message),
            NeuronError::Status { op, code, core_usable, .. } if op.is_execution() => {
                BackendError::Execution { message, instance_usable: core_usable, nrt_status: Some(code) }
            }
            NeuronError::Status { op, .. } if op.is_runtime_setup() => BackendError::Unavailable(message),
            NeuronError::Status { .. } | NeuronError::Mismatch { .. } => BackendError::Load(message),
            NeuronError::Invalid { op, .. } if op.is_execution() => {
                BackendError::Execution { message, instance_usable: true, nrt_status: None }
            }
            NeuronError::Invalid { .. } => BackendError::Load(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_and_hardware_errors_take_the_core_out_of_service() {
        for code in [5, 101, 1200, 1201, 1202, 1203, 1204, 1205, 1206, 1299] {
            assert!(!core_usable_after(code), "code {code}");
        }
        for code in [0, 1, 2, 4, 6, 7, 9, 10, 1002, 1003, 1004, 1005, 1006, 1100, 1300, 4242] {
            assert!(core_usable_after(code), "code {code}");
        }
    }

    #[test]
    fn execution_failures_map_to_execution_errors_with_the_status() {
        let e = NeuronError::status(Operation::Execute, 1201, "bert", Some(3));
        let text = e.to_string();
        assert!(
            text.starts_with("execute of model 'bert' on NeuronCore 3 failed: NRT_EXEC_HW_ERR_HBM_UE (1201)"),
            "{text}"
        );
        assert!(text.contains("taken out of service"), "{text}");
        match BackendError::from(e) {
            BackendError::Execution { message, instance_usable, nrt_status } => {
                assert_eq!(message, text);
                assert!(!instance_usable);
                assert_eq!(nrt_status, Some(1201));
            }
            other => panic!("expected Execution, got {other:?}"),
        }
        let busy = BackendError::from(NeuronError::status(Operation::Execute, 1005, "bert", Some(0)));
        assert!(matches!(busy, BackendError::Execution { instance_usable: true, nrt_status: Some(1005), .. }));
        let unknown = NeuronError::status(Operation::ReadOutput, 4242, "bert", Some(1));
        assert!(unknown.to_string().contains("NRT status 4242 (4242)"), "{unknown}");
        assert!(matches!(
            BackendError::from(unknown),
            BackendError::Execution { instance_usable: true, nrt_status: Some(4242), .. }
        ));
    }

    #[test]
    fn load_failures_say_what_to_do() {
        let oom = NeuronError::status(Operation::Load, 4, "llama", Some(1));
        assert!(oom.to_string().contains("load of model 'llama' on NeuronCore 1 failed: NRT_RESOURCE (4)"));
        assert!(oom.to_string().contains("fewer models on this core"), "{oom}");
        assert!(matches!(BackendError::from(oom), BackendError::Load(_)));
        let held = NeuronError::status(Operation::Load, 9, "llama", Some(0)).to_string();
        assert!(held.contains("neuron-ls") && held.contains("NEURON_RT_VISIBLE_CORES"), "{held}");
        let skew = NeuronError::status(Operation::Load, 10, "llama", Some(0)).to_string();
        assert!(skew.contains("version skew"), "{skew}");
    }

    #[test]
    fn setup_failures_make_the_backend_unavailable() {
        let init = NeuronError::status(Operation::Init, 1, "", None);
        assert_eq!(
            init.to_string().split(':').next(),
            Some("init failed"),
            "no model or core is named for init: {init}"
        );
        assert!(matches!(BackendError::from(init), BackendError::Unavailable(_)));
        let missing = NeuronError::Unavailable { reason: "libnrt not found".into() };
        assert!(matches!(BackendError::from(missing), BackendError::Unavailable(m) if m.contains("libnrt not found")));
    }
}
