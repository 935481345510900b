//! Tests of `nrt_tensor_copy`, `nrt_get_vnc_memory_stats` (the device-memory knob) and the
//! deprecated core count of `nrt_load`.

use crate::abi::*;
use crate::ffi::*;
use crate::knobs::Knobs;
use crate::tests::{GLOBAL_LOCK, linear_neff, runtime};

#[test]
fn tensor_copy_moves_bytes_on_one_core_and_refuses_two_device_cores() {
    let rt = runtime(Knobs::default());
    let a = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 16, "a").expect("tensor");
    let b = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 16, "b").expect("tensor");
    let other_core = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 1, 16, "c").expect("tensor");
    let host = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_HOST, -1, 16, "h").expect("tensor");
    let data: Vec<u8> = (1..=16).collect();
    assert_eq!(rt.tensor(a).expect("a").write(0, &data), NRT_SUCCESS);
    assert_eq!(rt.tensor_copy(a, 4, b, 8, 8), NRT_SUCCESS);
    let mut out = [0u8; 16];
    assert_eq!(rt.tensor(b).expect("b").read(0, &mut out), NRT_SUCCESS);
    assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 0, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert_eq!(rt.tensor_copy(a, 0, other_core, 0, 4), NRT_INVALID, "device to device across cores");
    assert_eq!(rt.tensor_copy(a, 0, host, 0, 16), NRT_SUCCESS, "device to host is any core");
    assert_eq!(rt.tensor_copy(host, 0, other_core, 0, 16), NRT_SUCCESS, "host to device");
    assert_eq!(rt.tensor_copy(a, 12, b, 0, 8), NRT_INVALID, "source range out of bounds");
    assert_eq!(rt.tensor_copy(a, 0, b, 12, 8), NRT_INVALID, "destination range out of bounds");
    assert_eq!(rt.tensor_copy(a, 0, a, 2, 8), NRT_SUCCESS, "overlapping ranges of one tensor");
    assert_eq!(rt.tensor(a).expect("a").read(0, &mut out), NRT_SUCCESS);
    assert_eq!(&out[..10], &[1, 2, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(rt.tensor_copy(a, 0, 12345, 0, 1), NRT_INVALID_HANDLE);
}

#[test]
fn copies_to_and_from_host_memory_obey_the_deny_knobs_device_copies_do_not() {
    let rt = runtime(Knobs {
        deny_read_prefix: Some("kv:".into()),
        deny_write_prefix: Some("kv:".into()),
        ..Knobs::default()
    });
    let kv = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 16, "kv:k:0").expect("tensor");
    let staging = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 16, "staging").expect("tensor");
    let host = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_HOST, -1, 16, "host").expect("tensor");
    assert_eq!(rt.tensor_copy(kv, 0, host, 0, 16), NRT_INVALID, "device to host is a host read");
    assert_eq!(rt.tensor_copy(host, 0, kv, 0, 16), NRT_INVALID, "host to device is a host write");
    assert_eq!(rt.tensor_copy(kv, 0, staging, 0, 16), NRT_SUCCESS, "device to device on one core");
    assert_eq!(rt.tensor_copy(staging, 0, kv, 0, 16), NRT_SUCCESS);
    assert_eq!(rt.tensor_copy(staging, 0, host, 0, 16), NRT_SUCCESS, "other tensors are not denied");
}

#[test]
fn memory_stats_count_device_tensors_per_core_against_the_limit() {
    let rt = runtime(Knobs { device_memory_bytes: 1000, ..Knobs::default() });
    assert_eq!(rt.memory_stats(0), Ok((0, 1000)));
    let a = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 600, "a").expect("tensor");
    let _host = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_HOST, -1, 600, "h").expect("host tensors are not counted");
    assert_eq!(rt.memory_stats(0), Ok((600, 1000)));
    assert_eq!(rt.memory_stats(1), Ok((0, 1000)));
    assert_eq!(rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 401, "b"), Err(NRT_RESOURCE));
    let b = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 400, "b").expect("fits exactly");
    assert_eq!(rt.memory_stats(0), Ok((1000, 1000)));
    rt.tensor_free(a);
    rt.tensor_free(b);
    assert_eq!(rt.memory_stats(0), Ok((0, 1000)));
    assert_eq!(rt.memory_stats(2), Err(NRT_INVALID), "core 2 is not visible");
}

#[test]
fn c_api_memory_stats_copy_and_load_with_the_deprecated_count() {
    let _serial = GLOBAL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(nrt_init(1, c"2.0".as_ptr(), c"".as_ptr()), NRT_SUCCESS);
    let mut stats = NrtVncMemoryStats::default();
    let mut written = 0usize;
    assert_eq!(unsafe { nrt_get_vnc_memory_stats(0, &mut stats, 16, &mut written) }, NRT_SUCCESS);
    assert_eq!((written, stats.bytes_limit), (16, 16 << 30));
    let before = stats.bytes_used;
    let (mut src, mut dst): (*mut NrtTensor, *mut NrtTensor) = (std::ptr::null_mut(), std::ptr::null_mut());
    assert_eq!(unsafe { nrt_tensor_allocate(0, 0, 64, c"src".as_ptr(), &mut src) }, NRT_SUCCESS);
    assert_eq!(unsafe { nrt_tensor_allocate(0, 0, 64, c"dst".as_ptr(), &mut dst) }, NRT_SUCCESS);
    assert_eq!(unsafe { nrt_get_vnc_memory_stats(0, &mut stats, 16, &mut written) }, NRT_SUCCESS);
    assert_eq!(stats.bytes_used, before + 128);
    // An older caller that knows only the first field gets only it.
    let mut first = [0usize; 2];
    let status = unsafe { nrt_get_vnc_memory_stats(0, first.as_mut_ptr().cast(), 8, &mut written) };
    assert_eq!((status, written, first[1]), (NRT_SUCCESS, 8, 0));
    let bytes = [7u8; 64];
    assert_eq!(unsafe { nrt_tensor_write(src, bytes.as_ptr().cast(), 0, 64) }, NRT_SUCCESS);
    assert_eq!(nrt_tensor_copy(src, 0, dst, 0, 64), NRT_SUCCESS);
    let mut back = [0u8; 64];
    assert_eq!(unsafe { nrt_tensor_read(dst, back.as_mut_ptr().cast(), 0, 64) }, NRT_SUCCESS);
    assert_eq!(back, bytes);
    unsafe {
        nrt_tensor_free(&mut src);
        nrt_tensor_free(&mut dst);
    }
    assert_eq!(unsafe { nrt_get_vnc_memory_stats(0, &mut stats, 16, std::ptr::null_mut()) }, NRT_SUCCESS);
    assert_eq!(stats.bytes_used, before);
    assert_eq!(unsafe { nrt_get_vnc_memory_stats(0, std::ptr::null_mut(), 16, &mut written) }, NRT_INVALID);

    // `nrt_load`'s core count is deprecated (AWS: always -1); 1 is still accepted.
    let neff = linear_neff(1);
    for count in [-1, 1] {
        let mut model: *mut NrtModel = std::ptr::null_mut();
        assert_eq!(unsafe { nrt_load(neff.as_ptr().cast(), neff.len(), 0, count, &mut model) }, NRT_SUCCESS);
        assert_eq!(nrt_unload(model), NRT_SUCCESS);
    }
    let mut model: *mut NrtModel = std::ptr::null_mut();
    assert_eq!(unsafe { nrt_load(neff.as_ptr().cast(), neff.len(), 0, -2, &mut model) }, NRT_INVALID);
}
