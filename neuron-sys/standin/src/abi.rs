//! The C ABI of libnrt as the stand-in exports it: status codes, enums and `#[repr(C)]` structs.

use std::ffi::c_char;

/// `NRT_STATUS` (a 4-byte C enum).
pub type NrtStatus = u32;

/// Success.
pub const NRT_SUCCESS: NrtStatus = 0;
/// Generic failure (also: unknown tensor name in a set).
pub const NRT_FAILURE: NrtStatus = 1;
/// Invalid argument (null pointer, wrong size, bad NEFF).
pub const NRT_INVALID: NrtStatus = 2;
/// Unknown or already freed handle.
pub const NRT_INVALID_HANDLE: NrtStatus = 3;
/// Out of a resource.
pub const NRT_RESOURCE: NrtStatus = 4;
/// Execution timed out.
pub const NRT_TIMEOUT: NrtStatus = 5;
/// Hardware error.
pub const NRT_HW_ERROR: NrtStatus = 6;
/// Not enough NeuronCores for the requested placement.
pub const NRT_LOAD_NOT_ENOUGH_NC: NrtStatus = 9;
/// The NEFF cannot be run by this runtime.
pub const NRT_UNSUPPORTED_NEFF_VERSION: NrtStatus = 10;
/// Host memory allocation failed.
pub const NRT_FAIL_HOST_MEM_ALLOC: NrtStatus = 11;
/// Called before `nrt_init`.
pub const NRT_UNINITIALIZED: NrtStatus = 13;
/// Called after `nrt_close`.
pub const NRT_CLOSED: NrtStatus = 14;
/// Execution completed with errors.
pub const NRT_EXEC_COMPLETED_WITH_ERR: NrtStatus = 1004;

/// `nrt_tensor_placement_t`: device memory.
pub const NRT_TENSOR_PLACEMENT_DEVICE: u32 = 0;
/// `nrt_tensor_placement_t`: host memory (deprecated).
pub const NRT_TENSOR_PLACEMENT_HOST: u32 = 1;
/// `nrt_tensor_placement_t`: no backing memory until a buffer is attached.
pub const NRT_TENSOR_PLACEMENT_VIRTUAL: u32 = 2;

/// `nrt_tensor_usage_t`: input.
pub const NRT_TENSOR_USAGE_INPUT: u32 = 0;
/// `nrt_tensor_usage_t`: output.
pub const NRT_TENSOR_USAGE_OUTPUT: u32 = 1;

/// `NRT_TENSOR_NAME_MAX`.
pub const NRT_TENSOR_NAME_MAX: usize = 256;

/// Opaque `nrt_model_t`.
#[repr(C)]
pub struct NrtModel {
    _private: [u8; 0],
}

/// Opaque `nrt_tensor_t`.
#[repr(C)]
pub struct NrtTensor {
    _private: [u8; 0],
}

/// `nrt_tensor_set_t` is `void`.
pub type NrtTensorSet = std::ffi::c_void;

/// `nrt_tensor_info_t`.
#[repr(C)]
pub struct NrtTensorInfo {
    /// NUL-terminated tensor name.
    pub name: [c_char; NRT_TENSOR_NAME_MAX],
    /// `nrt_tensor_usage_t`.
    pub usage: u32,
    /// Size in bytes.
    pub size: usize,
    /// `nrt_dtype_t`, SDK 2.28+ numbering (0 when the NEFF does not say).
    pub dtype: u32,
    /// `ndim` dimensions; never null (points at one zero when `ndim` is 0).
    pub shape: *mut u32,
    /// Number of dimensions.
    pub ndim: u32,
}

/// `nrt_tensor_info_array_t` header; `tensor_count` entries follow at offset 8.
#[repr(C)]
pub struct NrtTensorInfoArray {
    /// Number of entries.
    pub tensor_count: u64,
    /// Flexible array member.
    pub tensor_array: [NrtTensorInfo; 0],
}

/// `nrt_version_t`.
#[repr(C)]
pub struct NrtVersion {
    /// Major version.
    pub rt_major: u64,
    /// Minor version.
    pub rt_minor: u64,
    /// Patch version.
    pub rt_patch: u64,
    /// Maintenance version.
    pub rt_maintenance: u64,
    /// NUL-terminated detail string.
    pub rt_detail: [c_char; 128],
    /// NUL-terminated git hash.
    pub git_hash: [c_char; 64],
}

/// `nrt_vnc_memory_stats_t` (fields may be appended by newer runtimes; callers pass its size).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NrtVncMemoryStats {
    /// Device bytes in use on the core.
    pub bytes_used: usize,
    /// Device bytes the core has.
    pub bytes_limit: usize,
}

const _: () = {
    assert!(std::mem::size_of::<NrtVncMemoryStats>() == 16);
    assert!(std::mem::offset_of!(NrtVncMemoryStats, bytes_limit) == 8);
    assert!(std::mem::size_of::<NrtTensorInfo>() == 296);
    assert!(std::mem::offset_of!(NrtTensorInfo, usage) == 256);
    assert!(std::mem::offset_of!(NrtTensorInfo, size) == 264);
    assert!(std::mem::offset_of!(NrtTensorInfo, dtype) == 272);
    assert!(std::mem::offset_of!(NrtTensorInfo, shape) == 280);
    assert!(std::mem::offset_of!(NrtTensorInfo, ndim) == 288);
    assert!(std::mem::offset_of!(NrtTensorInfoArray, tensor_array) == 8);
    assert!(std::mem::size_of::<NrtVersion>() == 224);
    assert!(std::mem::offset_of!(NrtVersion, rt_detail) == 32);
    assert!(std::mem::offset_of!(NrtVersion, git_hash) == 160);
};

/// `nrt_dtype_t` (SDK 2.28+ numbering) for a compiler dtype name; 0 (INVALID) when unknown.
pub fn dtype_code(dtype: Option<&str>) -> u32 {
    match dtype {
        Some("uint64") => 0x1,
        Some("int8") => 0x2,
        Some("uint8") => 0x3,
        Some("int16") => 0x4,
        Some("uint16") => 0x5,
        Some("bfloat16") => 0x6,
        Some("float16") => 0x7,
        Some("int32") => 0x8,
        Some("uint32") => 0x9,
        Some("float32") => 0xA,
        Some("int64") => 0xC,
        _ => 0,
    }
}

/// The status's symbolic name, as `nrt_get_status_as_str` returns it.
pub fn status_name(status: NrtStatus) -> &'static std::ffi::CStr {
    match status {
        0 => c"NRT_SUCCESS",
        1 => c"NRT_FAILURE",
        2 => c"NRT_INVALID",
        3 => c"NRT_INVALID_HANDLE",
        4 => c"NRT_RESOURCE",
        5 => c"NRT_TIMEOUT",
        6 => c"NRT_HW_ERROR",
        7 => c"NRT_QUEUE_FULL",
        9 => c"NRT_LOAD_NOT_ENOUGH_NC",
        10 => c"NRT_UNSUPPORTED_NEFF_VERSION",
        11 => c"NRT_FAIL_HOST_MEM_ALLOC",
        13 => c"NRT_UNINITIALIZED",
        14 => c"NRT_CLOSED",
        15 => c"NRT_QUEUE_EMPTY",
        101 => c"NRT_EXEC_UNIT_UNRECOVERABLE",
        1002 => c"NRT_EXEC_BAD_INPUT",
        1003 => c"NRT_EXEC_COMPLETED_WITH_NUM_ERR",
        1004 => c"NRT_EXEC_COMPLETED_WITH_ERR",
        1005 => c"NRT_EXEC_NC_BUSY",
        1006 => c"NRT_EXEC_OOB",
        1100 => c"NRT_COLL_PENDING",
        1200 => c"NRT_EXEC_HW_ERR_COLLECTIVES",
        1201 => c"NRT_EXEC_HW_ERR_HBM_UE",
        1202 => c"NRT_EXEC_HW_ERR_NC_UE",
        1203 => c"NRT_EXEC_HW_ERR_DMA_ABORT",
        1204 => c"NRT_EXEC_SW_NQ_OVERFLOW",
        1205 => c"NRT_EXEC_HW_ERR_REPAIRABLE_HBM_UE",
        1206 => c"NRT_NETWORK_PROXY_FAILURE",
        _ => c"NRT_UNKNOWN_STATUS",
    }
}
