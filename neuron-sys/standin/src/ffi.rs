//! The exported C functions: argument checks and conversions around [`crate::runtime`].
//!
//! Every function catches panics and reports them as `NRT_FAILURE`, so nothing unwinds into C.

use std::alloc::Layout;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::abi::*;
use crate::knobs::Knobs;
use crate::runtime::global;

fn guard(f: impl FnOnce() -> NrtStatus) -> NrtStatus {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(NRT_FAILURE)
}

/// Reads a C string; `None` for null.
///
/// # Safety
/// `ptr` is null or a valid NUL-terminated string.
unsafe fn c_str(ptr: *const c_char) -> Option<String> {
    // SAFETY: per this function's contract.
    (!ptr.is_null()).then(|| unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
}

/// Writes `value` through `out`, or returns `NRT_INVALID` for a null `out`.
fn store<T>(out: *mut T, value: Result<T, NrtStatus>) -> NrtStatus {
    if out.is_null() {
        return NRT_INVALID;
    }
    match value {
        Ok(v) => {
            // SAFETY: `out` is non-null and points at caller storage for a `T`.
            unsafe { out.write(v) };
            NRT_SUCCESS
        }
        Err(status) => status,
    }
}

/// `nrt_init`: reads the knobs from the environment (see the crate docs).
#[unsafe(no_mangle)]
pub extern "C" fn nrt_init(_framework: u32, _fw_version: *const c_char, _fal_version: *const c_char) -> NrtStatus {
    guard(|| global().init(Knobs::from_env()))
}

/// `nrt_close`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_close() {
    guard(|| {
        global().close();
        NRT_SUCCESS
    });
}

/// `nrt_load`.
///
/// # Safety
/// `neff_bytes` points at `size` readable bytes; `model` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_load(
    neff_bytes: *const c_void,
    size: usize,
    start_nc: i32,
    nc_count: i32,
    model: *mut *mut NrtModel,
) -> NrtStatus {
    guard(|| {
        if neff_bytes.is_null() {
            return NRT_INVALID;
        }
        // SAFETY: per this function's contract.
        let bytes = unsafe { std::slice::from_raw_parts(neff_bytes.cast::<u8>(), size) };
        store(model, global().load(bytes, start_nc, nc_count).map(|h| h as *mut NrtModel))
    })
}

/// `nrt_load_collectives`: loads one rank of a collective group. The stand-in has no collective
/// operators: each rank's program computes the whole model (a replicated group), so a group's ranks
/// agree; it checks the rank is inside the group.
///
/// # Safety
/// As for [`nrt_load`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_load_collectives(
    neff_bytes: *const c_void,
    size: usize,
    vnc: i32,
    vnc_count: i32,
    ctx_device_id: u32,
    ctx_device_count: u32,
    model: *mut *mut NrtModel,
) -> NrtStatus {
    if ctx_device_count == 0 || ctx_device_id >= ctx_device_count {
        crate::runtime::log(&format!(
            "nrt_load_collectives: rank {ctx_device_id} is outside a group of {ctx_device_count}"
        ));
        return NRT_INVALID;
    }
    // SAFETY: same contract as nrt_load.
    unsafe { nrt_load(neff_bytes, size, vnc, vnc_count, model) }
}

/// `nrt_unload`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_unload(model: *mut NrtModel) -> NrtStatus {
    guard(|| global().unload(model as usize))
}

/// `nrt_get_total_nc_count` (callable before `nrt_init`; equals the visible count).
///
/// # Safety
/// `nc_count` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_total_nc_count(nc_count: *mut u32) -> NrtStatus {
    guard(|| store(nc_count, Ok(global().visible_cores())))
}

/// `nrt_get_visible_nc_count` (callable before `nrt_init`).
///
/// # Safety
/// `nc_count` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_visible_nc_count(nc_count: *mut u32) -> NrtStatus {
    guard(|| store(nc_count, Ok(global().visible_cores())))
}

fn info_layout(count: usize) -> Option<Layout> {
    let bytes = std::mem::size_of::<NrtTensorInfo>().checked_mul(count)?.checked_add(8)?;
    Layout::from_size_align(bytes, 8).ok()
}

/// `nrt_get_model_tensor_info`: inputs then outputs. `shape` is never null (it points at one
/// zero when `ndim` is 0, i.e. when the NEFF does not declare the shape); `dtype` uses the SDK
/// 2.28+ numbering and is 0 when the NEFF does not declare it.
///
/// # Safety
/// `tensor_info` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_model_tensor_info(
    model: *mut NrtModel,
    tensor_info: *mut *mut NrtTensorInfoArray,
) -> NrtStatus {
    guard(|| {
        if tensor_info.is_null() {
            return NRT_INVALID;
        }
        let model = match global().model(model as usize) {
            Ok(m) => m,
            Err(status) => return status,
        };
        let decls: Vec<_> = model
            .inputs
            .iter()
            .map(|d| (d, NRT_TENSOR_USAGE_INPUT))
            .chain(model.outputs.iter().map(|d| (d, NRT_TENSOR_USAGE_OUTPUT)))
            .collect();
        let Some(layout) = info_layout(decls.len()) else {
            return NRT_FAIL_HOST_MEM_ALLOC;
        };
        // SAFETY: the layout has a non-zero size (at least the 8-byte count).
        let array = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<NrtTensorInfoArray>();
        if array.is_null() {
            return NRT_FAIL_HOST_MEM_ALLOC;
        }
        // SAFETY: `array` was just allocated with room for the count and every entry.
        unsafe {
            (*array).tensor_count = decls.len() as u64;
            let entries = (&raw mut (*array).tensor_array).cast::<NrtTensorInfo>();
            for (i, (decl, usage)) in decls.into_iter().enumerate() {
                let dims: Vec<u32> =
                    decl.shape.iter().flatten().map(|&d| u32::try_from(d).unwrap_or(u32::MAX)).collect();
                let ndim = dims.len() as u32;
                let shape = if dims.is_empty() { vec![0u32].into_boxed_slice() } else { dims.into_boxed_slice() };
                let mut name = [0 as c_char; NRT_TENSOR_NAME_MAX];
                for (dst, &src) in name.iter_mut().zip(decl.name.as_bytes().iter().take(NRT_TENSOR_NAME_MAX - 1)) {
                    *dst = src as c_char;
                }
                entries.add(i).write(NrtTensorInfo {
                    name,
                    usage,
                    size: usize::try_from(decl.size).unwrap_or(usize::MAX),
                    dtype: dtype_code(decl.dtype.as_deref()),
                    shape: Box::into_raw(shape).cast::<u32>(),
                    ndim,
                });
            }
            tensor_info.write(array);
        }
        NRT_SUCCESS
    })
}

/// `nrt_free_model_tensor_info`.
///
/// # Safety
/// `tensor_info` is null or came from `nrt_get_model_tensor_info` and was not freed yet.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_free_model_tensor_info(tensor_info: *mut NrtTensorInfoArray) -> NrtStatus {
    guard(|| {
        if tensor_info.is_null() {
            return NRT_INVALID;
        }
        // SAFETY: per this function's contract the array and its shapes are ours.
        unsafe {
            let count = (*tensor_info).tensor_count as usize;
            let entries = (&raw mut (*tensor_info).tensor_array).cast::<NrtTensorInfo>();
            for i in 0..count {
                let entry = &*entries.add(i);
                let len = (entry.ndim as usize).max(1);
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(entry.shape, len)));
            }
            if let Some(layout) = info_layout(count) {
                std::alloc::dealloc(tensor_info.cast::<u8>(), layout);
            }
        }
        NRT_SUCCESS
    })
}

/// `nrt_allocate_tensor_set`.
///
/// # Safety
/// `result` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_allocate_tensor_set(result: *mut *mut NrtTensorSet) -> NrtStatus {
    guard(|| store(result, global().set_allocate().map(|h| h as *mut NrtTensorSet)))
}

/// `nrt_destroy_tensor_set`: destroys the set and nulls `*tensor_set`.
///
/// # Safety
/// `tensor_set` is null or points at a writable set pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_destroy_tensor_set(tensor_set: *mut *mut NrtTensorSet) {
    guard(|| {
        if !tensor_set.is_null() {
            // SAFETY: per this function's contract.
            unsafe {
                global().set_destroy(*tensor_set as usize);
                tensor_set.write(std::ptr::null_mut());
            }
        }
        NRT_SUCCESS
    });
}

/// `nrt_add_tensor_to_tensor_set`.
///
/// # Safety
/// `tensor_name` is null or a valid C string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_add_tensor_to_tensor_set(
    tensor_set: *mut NrtTensorSet,
    tensor_name: *const c_char,
    tensor: *mut NrtTensor,
) -> NrtStatus {
    guard(|| {
        // SAFETY: per this function's contract.
        let Some(name) = (unsafe { c_str(tensor_name) }) else {
            return NRT_INVALID;
        };
        global().set_add(tensor_set as usize, &name, tensor as usize)
    })
}

/// `nrt_get_tensor_from_tensor_set`: `NRT_FAILURE` for an unknown name.
///
/// # Safety
/// `tensor_name` is null or a valid C string; `tensor` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_tensor_from_tensor_set(
    tensor_set: *mut NrtTensorSet,
    tensor_name: *const c_char,
    tensor: *mut *mut NrtTensor,
) -> NrtStatus {
    guard(|| {
        // SAFETY: per this function's contract.
        let Some(name) = (unsafe { c_str(tensor_name) }) else {
            return NRT_INVALID;
        };
        store(tensor, global().set_get(tensor_set as usize, &name).map(|h| h as *mut NrtTensor))
    })
}

/// `nrt_tensor_allocate`.
///
/// # Safety
/// `name` is null or a valid C string; `tensor` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_tensor_allocate(
    placement: u32,
    logical_nc_id: c_int,
    size: usize,
    name: *const c_char,
    tensor: *mut *mut NrtTensor,
) -> NrtStatus {
    guard(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { c_str(name) }.unwrap_or_default();
        let handle = global().tensor_allocate(placement, logical_nc_id, size, &name);
        store(tensor, handle.map(|h| h as *mut NrtTensor))
    })
}

/// `nrt_tensor_free`: frees the tensor and nulls `*tensor`.
///
/// # Safety
/// `tensor` is null or points at a writable tensor pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_tensor_free(tensor: *mut *mut NrtTensor) {
    guard(|| {
        if !tensor.is_null() {
            // SAFETY: per this function's contract.
            unsafe {
                global().tensor_free(*tensor as usize);
                tensor.write(std::ptr::null_mut());
            }
        }
        NRT_SUCCESS
    });
}

/// `nrt_tensor_read`: `NRT_INVALID` when `offset + size` exceeds the tensor.
///
/// # Safety
/// `buf` points at `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_tensor_read(
    tensor: *const NrtTensor,
    buf: *mut c_void,
    offset: usize,
    size: usize,
) -> NrtStatus {
    guard(|| {
        if buf.is_null() && size > 0 {
            return NRT_INVALID;
        }
        let tensor = match global().tensor(tensor as usize) {
            Ok(t) => t,
            Err(status) => return status,
        };
        if size == 0 {
            return NRT_SUCCESS;
        }
        // SAFETY: per this function's contract.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), size) };
        global().host_read(&tensor, offset, dst)
    })
}

/// `nrt_tensor_write`: `NRT_INVALID` when `offset + size` exceeds the tensor, or for a tensor
/// the `NRT_STANDIN_DENY_WRITE_PREFIX` knob names.
///
/// # Safety
/// `buf` points at `size` readable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_tensor_write(
    tensor: *mut NrtTensor,
    buf: *const c_void,
    offset: usize,
    size: usize,
) -> NrtStatus {
    guard(|| {
        if buf.is_null() && size > 0 {
            return NRT_INVALID;
        }
        let tensor = match global().tensor(tensor as usize) {
            Ok(t) => t,
            Err(status) => return status,
        };
        if size == 0 {
            return NRT_SUCCESS;
        }
        // SAFETY: per this function's contract.
        let src = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) };
        global().host_write(&tensor, offset, src)
    })
}

/// `nrt_tensor_copy`: `size` bytes from `src` at `src_offset` to `dst` at `dst_offset`. Two
/// device tensors must be on the same core (`NRT_INVALID` otherwise, as documented for the real
/// runtime); ranges out of bounds give `NRT_INVALID`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_tensor_copy(
    src: *const NrtTensor,
    src_offset: usize,
    dst: *mut NrtTensor,
    dst_offset: usize,
    size: usize,
) -> NrtStatus {
    guard(|| global().tensor_copy(src as usize, src_offset, dst as usize, dst_offset, size))
}

/// `nrt_get_vnc_memory_stats`: the device bytes the stand-in has allocated on core `vnc` and the
/// `NRT_STANDIN_DEVICE_MEMORY_BYTES` limit. Writes `min(stats_size_in, 16)` bytes of the struct
/// and that count to `stats_size_out` (when not null).
///
/// # Safety
/// `stats` is null or points at `stats_size_in` writable bytes; `stats_size_out` is null or
/// writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_vnc_memory_stats(
    vnc: u32,
    stats: *mut NrtVncMemoryStats,
    stats_size_in: usize,
    stats_size_out: *mut usize,
) -> NrtStatus {
    guard(|| {
        if stats.is_null() {
            return NRT_INVALID;
        }
        let (used, limit) = match global().memory_stats(vnc) {
            Ok(v) => v,
            Err(status) => return status,
        };
        let value = NrtVncMemoryStats {
            bytes_used: usize::try_from(used).unwrap_or(usize::MAX),
            bytes_limit: usize::try_from(limit).unwrap_or(usize::MAX),
        };
        let len = stats_size_in.min(std::mem::size_of::<NrtVncMemoryStats>());
        // SAFETY: `stats` has `stats_size_in` writable bytes and `len <= stats_size_in`.
        unsafe { std::ptr::copy_nonoverlapping((&raw const value).cast::<u8>(), stats.cast::<u8>(), len) };
        if !stats_size_out.is_null() {
            // SAFETY: non-null and writable per this function's contract.
            unsafe { stats_size_out.write(len) };
        }
        NRT_SUCCESS
    })
}

/// `nrt_tensor_get_size`: 0 for an unknown handle.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_tensor_get_size(tensor: *const NrtTensor) -> usize {
    catch_unwind(|| global().tensor(tensor as usize).map_or(0, |t| t.size())).unwrap_or(0)
}

/// `nrt_tensor_allocate_empty`.
///
/// # Safety
/// `name` is null or a valid C string; `tensor` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_tensor_allocate_empty(name: *const c_char, tensor: *mut *mut NrtTensor) -> NrtStatus {
    guard(|| {
        // SAFETY: per this function's contract.
        let name = unsafe { c_str(name) }.unwrap_or_default();
        store(tensor, global().tensor_allocate_empty(&name).map(|h| h as *mut NrtTensor))
    })
}

/// `nrt_tensor_attach_buffer`: the caller keeps `buffer` alive while the tensor uses it.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_tensor_attach_buffer(tensor: *mut NrtTensor, buffer: *mut c_void, size: usize) -> NrtStatus {
    guard(|| {
        if buffer.is_null() && size > 0 {
            return NRT_INVALID;
        }
        global().tensor_attach(tensor as usize, buffer as usize, size)
    })
}

/// `nrt_execute`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_execute(
    model: *mut NrtModel,
    input_set: *const NrtTensorSet,
    output_set: *mut NrtTensorSet,
) -> NrtStatus {
    guard(|| global().execute(model as usize, input_set as usize, output_set as usize, 1))
}

/// `nrt_execute_repeat`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_execute_repeat(
    model: *mut NrtModel,
    input_set: *const NrtTensorSet,
    output_set: *mut NrtTensorSet,
    repeat_count: c_int,
) -> NrtStatus {
    guard(|| global().execute(model as usize, input_set as usize, output_set as usize, repeat_count))
}

/// The version the stand-in reports: 2.28.0.0, detail `nrt-standin (test-only, host memory)`.
pub const STANDIN_VERSION: (u64, u64, u64, u64) = (2, 28, 0, 0);

/// `nrt_get_version`: writes at most `size` bytes of an `nrt_version_t`.
///
/// # Safety
/// `ver` is null or points at `size` writable bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nrt_get_version(ver: *mut NrtVersion, size: usize) -> NrtStatus {
    guard(|| {
        if ver.is_null() {
            return NRT_INVALID;
        }
        let mut version = NrtVersion {
            rt_major: STANDIN_VERSION.0,
            rt_minor: STANDIN_VERSION.1,
            rt_patch: STANDIN_VERSION.2,
            rt_maintenance: STANDIN_VERSION.3,
            rt_detail: [0; 128],
            git_hash: [0; 64],
        };
        for (dst, &src) in version.rt_detail.iter_mut().zip(b"nrt-standin (test-only, host memory)") {
            *dst = src as c_char;
        }
        for (dst, &src) in version.git_hash.iter_mut().zip(b"standin") {
            *dst = src as c_char;
        }
        let len = size.min(std::mem::size_of::<NrtVersion>());
        // SAFETY: `ver` has `size` writable bytes and `len <= size`.
        unsafe { std::ptr::copy_nonoverlapping((&raw const version).cast::<u8>(), ver.cast::<u8>(), len) };
        NRT_SUCCESS
    })
}

/// `nrt_get_status_as_str`: a static NUL-terminated name such as `NRT_TIMEOUT`.
#[unsafe(no_mangle)]
pub extern "C" fn nrt_get_status_as_str(status: NrtStatus) -> *const c_char {
    status_name(status).as_ptr()
}
