//! Device tensors and tensor sets, owned RAII-style: freed (destroyed) when dropped.

use std::ffi::{CString, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use neuron_sys::bindings::{NRT_SUCCESS, NRT_TENSOR_PLACEMENT_DEVICE, nrt_tensor_set_t, nrt_tensor_t};

use super::error::{NeuronError, Operation};
use super::runtime::Runtime;

/// Largest tensor this layer allocates: allocations of 4 GiB or more hit a known runtime bug.
pub const MAX_TENSOR_BYTES: usize = (4 << 30) - 1;

/// A tensor in one NeuronCore's device memory; freed when dropped.
pub struct DeviceTensor {
    runtime: Arc<Runtime>,
    handle: NonNull<nrt_tensor_t>,
    name: CString,
    size: usize,
    model: Arc<str>,
    core: u32,
}

// SAFETY: a tensor handle is an opaque runtime object usable from any thread; this wrapper is
// moved between threads, never shared (reads and writes take `&self`/`&mut self` on one thread).
unsafe impl Send for DeviceTensor {}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl DeviceTensor {
    /// Allocates `size` bytes of device memory on NeuronCore `core` for tensor `name` of `model`.
    pub fn allocate(
        runtime: &Arc<Runtime>,
        model: &Arc<str>,
        core: u32,
        name: &str,
        size: usize,
    ) -> Result<DeviceTensor, NeuronError> {
        let invalid = |detail: String| NeuronError::Invalid {
            op: Operation::AllocateTensor,
            model: model.to_string(),
            core: Some(core),
            detail,
        };
        if size > MAX_TENSOR_BYTES {
            return Err(invalid(format!(
                "tensor '{name}' is {size} bytes; the runtime cannot allocate 4 GiB or more in one tensor"
            )));
        }
        let c_name = CString::new(name).map_err(|_| invalid(format!("tensor name {name:?} contains a NUL byte")))?;
        let nc = i32::try_from(core).map_err(|_| invalid("core index out of range".into()))?;
        let mut raw: *mut nrt_tensor_t = std::ptr::null_mut();
        // SAFETY: `c_name` is NUL-terminated and outlives the call; `raw` is a valid out-pointer.
        let code = unsafe {
            (runtime.nrt().nrt_tensor_allocate)(NRT_TENSOR_PLACEMENT_DEVICE, nc, size, c_name.as_ptr(), &mut raw)
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::AllocateTensor, code, model, Some(core)));
        }
        let handle =
            NonNull::new(raw).ok_or_else(|| invalid(format!("nrt_tensor_allocate returned no tensor for '{name}'")))?;
        Ok(DeviceTensor { runtime: Arc::clone(runtime), handle, name: c_name, size, model: Arc::clone(model), core })
    }

    /// The tensor's name (the runtime's name for the model tensor it backs).
    pub fn name(&self) -> &str {
        self.name.to_str().unwrap_or("<non-UTF-8 name>")
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies `data` (exactly [`size`](Self::size) bytes) to the device.
    pub fn write(&mut self, data: &[u8]) -> Result<(), NeuronError> {
        if data.len() != self.size {
            return Err(self.invalid(Operation::WriteInput, data.len()));
        }
        // SAFETY: the tensor is live and `size` bytes long; `data` is `size` readable bytes.
        let code = unsafe {
            (self.runtime.nrt().nrt_tensor_write)(self.handle.as_ptr(), data.as_ptr().cast::<c_void>(), 0, data.len())
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::WriteInput, code, &self.model, Some(self.core)));
        }
        Ok(())
    }

    /// Copies the tensor (exactly [`size`](Self::size) bytes) from the device into `out`.
    pub fn read_into(&self, out: &mut [u8]) -> Result<(), NeuronError> {
        if out.len() != self.size {
            return Err(self.invalid(Operation::ReadOutput, out.len()));
        }
        // SAFETY: the tensor is live and `size` bytes long; `out` is `size` writable bytes.
        let code = unsafe {
            (self.runtime.nrt().nrt_tensor_read)(self.handle.as_ptr(), out.as_mut_ptr().cast::<c_void>(), 0, out.len())
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::ReadOutput, code, &self.model, Some(self.core)));
        }
        Ok(())
    }

    /// Copies `data` to the device at byte `offset` (one row of a batched tensor, say).
    pub fn write_at(&mut self, offset: usize, data: &[u8]) -> Result<(), NeuronError> {
        if offset.checked_add(data.len()).is_none_or(|end| end > self.size) {
            return Err(self.out_of_range(Operation::WriteInput, offset, data.len()));
        }
        // SAFETY: the tensor is live and `offset + data.len() <= size`; `data` is readable.
        let code = unsafe {
            (self.runtime.nrt().nrt_tensor_write)(
                self.handle.as_ptr(),
                data.as_ptr().cast::<c_void>(),
                offset,
                data.len(),
            )
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::WriteInput, code, &self.model, Some(self.core)));
        }
        Ok(())
    }

    /// Copies `size` bytes from `src` at byte `src_offset` to this tensor at byte `offset`, on the
    /// device (`nrt_tensor_copy`; both tensors on the same core). Returns `false`, copying
    /// nothing, when the runtime does not export `nrt_tensor_copy` (the caller writes from the
    /// host instead).
    pub fn copy_from(
        &mut self,
        offset: usize,
        src: &DeviceTensor,
        src_offset: usize,
        size: usize,
    ) -> Result<bool, NeuronError> {
        if offset.checked_add(size).is_none_or(|end| end > self.size) {
            return Err(self.out_of_range(Operation::WriteInput, offset, size));
        }
        if src_offset.checked_add(size).is_none_or(|end| end > src.size) {
            return Err(src.out_of_range(Operation::ReadOutput, src_offset, size));
        }
        let Some(copy) = self.runtime.optional().tensor_copy() else {
            return Ok(false);
        };
        // SAFETY: both tensors are live, distinct (`&mut self` and `&src` cannot alias) and the
        // ranges are within their sizes (checked above).
        let code = unsafe { copy(src.handle.as_ptr(), src_offset, self.handle.as_ptr(), offset, size) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::WriteInput, code, &self.model, Some(self.core)));
        }
        Ok(true)
    }

    /// Copies `out.len()` bytes from the device, starting at byte `offset`.
    pub fn read_at(&self, offset: usize, out: &mut [u8]) -> Result<(), NeuronError> {
        if offset.checked_add(out.len()).is_none_or(|end| end > self.size) {
            return Err(self.out_of_range(Operation::ReadOutput, offset, out.len()));
        }
        // SAFETY: the tensor is live and `offset + out.len() <= size`; `out` is writable.
        let code = unsafe {
            (self.runtime.nrt().nrt_tensor_read)(
                self.handle.as_ptr(),
                out.as_mut_ptr().cast::<c_void>(),
                offset,
                out.len(),
            )
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::ReadOutput, code, &self.model, Some(self.core)));
        }
        Ok(())
    }

    /// Copies `len` bytes at `src` to `dst` inside this tensor on the device (`nrt_tensor_copy`),
    /// without a round trip through the host. Returns `Ok(false)` when the runtime does not export
    /// `nrt_tensor_copy` (the caller copies through the host instead). The ranges must not overlap.
    pub fn copy_within(&mut self, src: usize, dst: usize, len: usize) -> Result<bool, NeuronError> {
        for at in [src, dst] {
            if at.checked_add(len).is_none_or(|end| end > self.size) {
                return Err(self.out_of_range(Operation::WriteInput, at, len));
            }
        }
        if src.max(dst) < src.min(dst) + len {
            return Err(NeuronError::Invalid {
                op: Operation::WriteInput,
                model: self.model.to_string(),
                core: Some(self.core),
                detail: format!("copy of {len} bytes from {src} to {dst} in tensor '{}' overlaps", self.name()),
            });
        }
        let Some(copy) = self.runtime.optional().tensor_copy() else { return Ok(false) };
        // SAFETY: the tensor is live; both ranges lie inside it and do not overlap.
        let code = unsafe { copy(self.handle.as_ptr(), src, self.handle.as_ptr(), dst, len) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::WriteInput, code, &self.model, Some(self.core)));
        }
        Ok(true)
    }

    fn out_of_range(&self, op: Operation, offset: usize, len: usize) -> NeuronError {
        NeuronError::Invalid {
            op,
            model: self.model.to_string(),
            core: Some(self.core),
            detail: format!(
                "tensor '{}' is {} bytes; {len} bytes at offset {offset} do not fit",
                self.name(),
                self.size
            ),
        }
    }

    fn invalid(&self, op: Operation, got: usize) -> NeuronError {
        NeuronError::Invalid {
            op,
            model: self.model.to_string(),
            core: Some(self.core),
            detail: format!("tensor '{}' is {} bytes, the buffer is {got}", self.name(), self.size),
        }
    }
}

impl Drop for DeviceTensor {
    fn drop(&mut self) {
        let mut raw = self.handle.as_ptr();
        // SAFETY: the handle came from nrt_tensor_allocate and is freed exactly once; any tensor
        // set referencing it is destroyed first (TensorSet drops its set before its tensors).
        unsafe { (self.runtime.nrt().nrt_tensor_free)(&mut raw) };
    }
}

/// A tensor set (what `nrt_execute` takes) owning the tensors it references, so they outlive it.
pub struct TensorSet {
    runtime: Arc<Runtime>,
    handle: NonNull<nrt_tensor_set_t>,
    tensors: Vec<DeviceTensor>,
    /// Names of borrowed tensors, kept alive with the set like the owned tensors' names.
    borrowed_names: Vec<CString>,
    model: Arc<str>,
    core: u32,
}

// SAFETY: as for DeviceTensor: an opaque runtime object, moved between threads, never shared.
unsafe impl Send for TensorSet {}

impl std::fmt::Debug for TensorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorSet").field("tensors", &self.tensors).finish_non_exhaustive()
    }
}

impl TensorSet {
    /// An empty set for tensors of `model` on NeuronCore `core`.
    pub fn new(runtime: &Arc<Runtime>, model: &Arc<str>, core: u32) -> Result<TensorSet, NeuronError> {
        let mut raw: *mut nrt_tensor_set_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        let code = unsafe { (runtime.nrt().nrt_allocate_tensor_set)(&mut raw) };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::BuildTensorSet, code, model, Some(core)));
        }
        let handle = NonNull::new(raw).ok_or_else(|| NeuronError::Invalid {
            op: Operation::BuildTensorSet,
            model: model.to_string(),
            core: Some(core),
            detail: "nrt_allocate_tensor_set returned no set".into(),
        })?;
        Ok(TensorSet {
            runtime: Arc::clone(runtime),
            handle,
            tensors: Vec::new(),
            borrowed_names: Vec::new(),
            model: Arc::clone(model),
            core,
        })
    }

    /// Adds `tensor` under its own name and takes ownership of it; returns its index.
    pub fn push(&mut self, tensor: DeviceTensor) -> Result<usize, NeuronError> {
        // SAFETY: the set and the tensor are live; the name is NUL-terminated and, like the
        // tensor, owned by this set from here on, so both outlive the set's use of them.
        let code = unsafe {
            (self.runtime.nrt().nrt_add_tensor_to_tensor_set)(
                self.handle.as_ptr(),
                tensor.name.as_ptr(),
                tensor.handle.as_ptr(),
            )
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::BuildTensorSet, code, &self.model, Some(self.core)));
        }
        self.tensors.push(tensor);
        Ok(self.tensors.len() - 1)
    }

    /// Adds `tensor` under `name` without taking ownership (a tensor can then be in several
    /// sets, e.g. a state tensor that is one set's input and another's output).
    ///
    /// # Safety
    /// `tensor` must stay alive (not be dropped) for as long as this set is used or alive.
    pub(crate) unsafe fn push_borrowed(&mut self, name: &str, tensor: &DeviceTensor) -> Result<(), NeuronError> {
        let c_name = CString::new(name).map_err(|_| NeuronError::Invalid {
            op: Operation::BuildTensorSet,
            model: self.model.to_string(),
            core: Some(self.core),
            detail: format!("tensor name {name:?} contains a NUL byte"),
        })?;
        // SAFETY: the set and the tensor are live; the NUL-terminated name is kept by this set
        // from here on; the caller keeps the tensor alive for the set's life (the contract).
        let code = unsafe {
            (self.runtime.nrt().nrt_add_tensor_to_tensor_set)(
                self.handle.as_ptr(),
                c_name.as_ptr(),
                tensor.handle.as_ptr(),
            )
        };
        if code != NRT_SUCCESS {
            return Err(NeuronError::status(Operation::BuildTensorSet, code, &self.model, Some(self.core)));
        }
        self.borrowed_names.push(c_name);
        Ok(())
    }

    /// The tensor at `index` (in the order pushed).
    pub fn tensor(&self, index: usize) -> Option<&DeviceTensor> {
        self.tensors.get(index)
    }

    /// The tensor at `index`, for writing.
    pub fn tensor_mut(&mut self, index: usize) -> Option<&mut DeviceTensor> {
        self.tensors.get_mut(index)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub(crate) fn as_ptr(&self) -> *const nrt_tensor_set_t {
        self.handle.as_ptr()
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut nrt_tensor_set_t {
        self.handle.as_ptr()
    }
}

impl Drop for TensorSet {
    fn drop(&mut self) {
        let mut raw = self.handle.as_ptr();
        // SAFETY: the set came from nrt_allocate_tensor_set and is destroyed exactly once, before
        // its tensors (the `tensors` field is dropped after this body runs).
        unsafe { (self.runtime.nrt().nrt_destroy_tensor_set)(&mut raw) };
    }
}
