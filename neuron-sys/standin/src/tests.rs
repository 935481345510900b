//! Tests of the stand-in: the exported C functions (serialised, they share the process runtime)
//! and private runtime instances for the failure knobs (parallel-safe).

use std::collections::HashMap;
use std::ffi::{CStr, c_void};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::abi::*;
use crate::ffi::*;
use crate::knobs::Knobs;
use crate::runtime::Runtime;

/// Serialises the tests that use the process-wide runtime through the C functions.
pub(crate) static GLOBAL_LOCK: Mutex<()> = Mutex::new(());

/// A NEFF container (header + gzip'd tar) around `files`, written by the shared format crate.
fn container(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(p, b)| (*p, b.as_slice())).collect();
    neff_format::writer::assemble("linear.neff", 1, &refs).expect("in-memory NEFF")
}

fn weight(i: usize, j: usize) -> f32 {
    (((7 * i + 3 * j) % 17) as f32 - 8.0) / 16.0
}

fn bias(j: usize) -> f32 {
    ((j % 5) as f32 - 2.0) / 4.0
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// The built-in `linear` model (INPUT0 [batch, 64] → OUTPUT0 [batch, 16]) with closed-form weights.
pub(crate) fn linear_neff(batch: u64) -> Vec<u8> {
    let neff_json = serde_json::json!({"metadata": {"signatures": {"default": {
        "inputs": {"INPUT0": {"id": 0, "dtype": "float32", "shape": [batch, 64]}},
        "outputs": {"OUTPUT0": {"id": 0, "dtype": "float32", "shape": [batch, 16]}}}}}});
    let def = serde_json::json!({"var": {
        "INPUT0": {"type": "input", "size": batch * 64 * 4, "var_id": 1},
        "OUTPUT0": {"type": "output", "size": batch * 16 * 4, "var_id": 2},
        "W": {"type": "file", "size": 4096, "var_id": 3}}});
    let program = serde_json::json!({"version": 1,
        "blobs": {"w": {"file": "standin/w.bin", "shape": [64, 16]},
                  "b": {"file": "standin/b.bin", "shape": [16]}},
        "ops": [{"op": "dense", "input": "INPUT0", "weight": "w", "bias": "b",
                 "activation": "none", "output": "OUTPUT0"}]});
    let w = f32_bytes((0..64).flat_map(|i| (0..16).map(move |j| weight(i, j))));
    let b = f32_bytes((0..16).map(bias));
    container(&[
        ("neff.json", neff_json.to_string().into_bytes()),
        ("sg00/def.json", def.to_string().into_bytes()),
        ("standin/program.json", program.to_string().into_bytes()),
        ("standin/w.bin", w),
        ("standin/b.bin", b),
    ])
}

fn input_values(batch: usize) -> Vec<f32> {
    (0..batch * 64).map(|k| ((k % 13) as f32 - 6.0) / 8.0).collect()
}

fn reference(x: &[f32]) -> Vec<f32> {
    x.chunks(64)
        .flat_map(|row| (0..16).map(move |j| bias(j) + (0..64).map(|i| row[i] * weight(i, j)).sum::<f32>()))
        .collect()
}

fn fixture() -> Option<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/neff/matmul_small.neff");
    match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(_) => {
            eprintln!("NOTICE: {} is absent; skipping the real-NEFF part", path.display());
            None
        }
    }
}

fn from_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

#[test]
fn c_api_runs_linear_like_the_reference() {
    let _serial = GLOBAL_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    nrt_close();
    let batch = 4usize;
    let neff = linear_neff(batch as u64);
    let mut model: *mut NrtModel = std::ptr::null_mut();
    let status = unsafe { nrt_load(neff.as_ptr().cast(), neff.len(), 0, 1, &mut model) };
    assert_eq!(status, NRT_CLOSED, "after close, before init");

    assert_eq!(nrt_init(1, c"2.0".as_ptr(), c"".as_ptr()), NRT_SUCCESS);
    let mut cores = 0u32;
    assert_eq!(unsafe { nrt_get_visible_nc_count(&mut cores) }, NRT_SUCCESS);
    assert!(cores >= 1);
    let mut too_far: *mut NrtModel = std::ptr::null_mut();
    let status = unsafe { nrt_load(neff.as_ptr().cast(), neff.len(), cores as i32, 1, &mut too_far) };
    assert_eq!(status, NRT_LOAD_NOT_ENOUGH_NC);
    assert_eq!(unsafe { nrt_load(neff.as_ptr().cast(), neff.len(), 0, 1, &mut model) }, NRT_SUCCESS);

    // Tensor info: INPUT0 then OUTPUT0, 2.28+ dtype numbering.
    let mut info: *mut NrtTensorInfoArray = std::ptr::null_mut();
    assert_eq!(unsafe { nrt_get_model_tensor_info(model, &mut info) }, NRT_SUCCESS);
    let entries = unsafe {
        std::slice::from_raw_parts(
            (&raw const (*info).tensor_array).cast::<NrtTensorInfo>(),
            (*info).tensor_count as usize,
        )
    };
    assert_eq!(entries.len(), 2);
    let name0 = unsafe { CStr::from_ptr(entries[0].name.as_ptr()) };
    assert_eq!(name0.to_str(), Ok("INPUT0"));
    assert_eq!((entries[0].usage, entries[0].size, entries[0].dtype), (NRT_TENSOR_USAGE_INPUT, batch * 256, 0xA));
    assert_eq!(unsafe { std::slice::from_raw_parts(entries[0].shape, entries[0].ndim as usize) }, [batch as u32, 64]);
    assert_eq!((entries[1].usage, entries[1].size), (NRT_TENSOR_USAGE_OUTPUT, batch * 64));
    assert_eq!(unsafe { nrt_free_model_tensor_info(info) }, NRT_SUCCESS);

    // Sets with one device tensor per entry, as AWS's sample does.
    let mut input: *mut NrtTensor = std::ptr::null_mut();
    let mut output: *mut NrtTensor = std::ptr::null_mut();
    let (mut in_set, mut out_set): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
    unsafe {
        assert_eq!(nrt_tensor_allocate(0, 0, batch * 256, c"INPUT0".as_ptr(), &mut input), NRT_SUCCESS);
        assert_eq!(nrt_tensor_allocate(0, 0, batch * 64, c"OUTPUT0".as_ptr(), &mut output), NRT_SUCCESS);
        assert_eq!(nrt_allocate_tensor_set(&mut in_set), NRT_SUCCESS);
        assert_eq!(nrt_allocate_tensor_set(&mut out_set), NRT_SUCCESS);
        assert_eq!(nrt_add_tensor_to_tensor_set(in_set, c"INPUT0".as_ptr(), input), NRT_SUCCESS);
        assert_eq!(nrt_add_tensor_to_tensor_set(out_set, c"OUTPUT0".as_ptr(), output), NRT_SUCCESS);
        let mut found: *mut NrtTensor = std::ptr::null_mut();
        assert_eq!(nrt_get_tensor_from_tensor_set(in_set, c"nope".as_ptr(), &mut found), NRT_FAILURE);
        assert_eq!(nrt_get_tensor_from_tensor_set(in_set, c"INPUT0".as_ptr(), &mut found), NRT_SUCCESS);
        assert_eq!(found, input);
    }
    assert_eq!(nrt_tensor_get_size(input), batch * 256);
    let x = input_values(batch);
    let x_bytes = f32_bytes(x.iter().copied());
    unsafe {
        assert_eq!(nrt_tensor_write(input, x_bytes.as_ptr().cast(), 0, x_bytes.len()), NRT_SUCCESS);
        assert_eq!(nrt_tensor_write(input, x_bytes.as_ptr().cast(), 4, x_bytes.len()), NRT_INVALID);
    }
    assert_eq!(nrt_execute(model, in_set, out_set), NRT_SUCCESS);
    let mut y_bytes = vec![0u8; batch * 64];
    assert_eq!(unsafe { nrt_tensor_read(output, y_bytes.as_mut_ptr().cast(), 0, y_bytes.len()) }, NRT_SUCCESS);
    let (y, want) = (from_bytes(&y_bytes), reference(&x));
    assert_eq!(y.len(), want.len());
    for (k, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-5, "element {k}: {a} vs {b}");
    }
    assert_eq!(nrt_execute_repeat(model, in_set, out_set, 3), NRT_SUCCESS);

    // A wrong-size tensor is NRT_INVALID; a name the model does not declare is NRT_FAILURE.
    let mut small: *mut NrtTensor = std::ptr::null_mut();
    let mut buffer = vec![0u8; 16];
    let mut stray: *mut NrtTensor = std::ptr::null_mut();
    unsafe {
        assert_eq!(nrt_tensor_allocate_empty(c"small".as_ptr(), &mut small), NRT_SUCCESS);
        assert_eq!(nrt_tensor_attach_buffer(small, buffer.as_mut_ptr().cast(), buffer.len()), NRT_SUCCESS);
        assert_eq!(nrt_tensor_get_size(small), 16);
        assert_eq!(nrt_add_tensor_to_tensor_set(in_set, c"INPUT0".as_ptr(), small), NRT_SUCCESS);
        assert_eq!(nrt_execute(model, in_set, out_set), NRT_INVALID);
        assert_eq!(nrt_add_tensor_to_tensor_set(in_set, c"INPUT0".as_ptr(), input), NRT_SUCCESS);
        assert_eq!(nrt_tensor_allocate(1, 0, 4, c"stray".as_ptr(), &mut stray), NRT_SUCCESS);
        assert_eq!(nrt_add_tensor_to_tensor_set(in_set, c"stray".as_ptr(), stray), NRT_SUCCESS);
        assert_eq!(nrt_execute(model, in_set, out_set), NRT_FAILURE);
        nrt_tensor_free(&mut small);
        nrt_tensor_free(&mut stray);
        assert!(small.is_null());
    }

    // The real compiler fixture: tensor info yes, execution no.
    if let Some(real) = fixture() {
        let mut real_model: *mut NrtModel = std::ptr::null_mut();
        assert_eq!(unsafe { nrt_load(real.as_ptr().cast(), real.len(), -1, -1, &mut real_model) }, NRT_SUCCESS);
        let mut info: *mut NrtTensorInfoArray = std::ptr::null_mut();
        assert_eq!(unsafe { nrt_get_model_tensor_info(real_model, &mut info) }, NRT_SUCCESS);
        let entries = unsafe {
            std::slice::from_raw_parts(
                (&raw const (*info).tensor_array).cast::<NrtTensorInfo>(),
                (*info).tensor_count as usize,
            )
        };
        let summary: Vec<(String, u32, usize, u32, u32)> = entries
            .iter()
            .map(|e| {
                let name = unsafe { CStr::from_ptr(e.name.as_ptr()) }.to_string_lossy().into_owned();
                (name, e.usage, e.size, e.dtype, e.ndim)
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("x".to_string(), 0, 65536, 7, 2),
                ("y".to_string(), 0, 65536, 7, 2),
                ("output0".to_string(), 1, 32768, 0, 0)
            ]
        );
        assert_eq!(unsafe { *entries[2].shape }, 0, "shape is never null");
        assert_eq!(unsafe { nrt_free_model_tensor_info(info) }, NRT_SUCCESS);
        let (mut rin, mut rout): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
        let mut tensors = [std::ptr::null_mut::<NrtTensor>(); 3];
        unsafe {
            assert_eq!(nrt_allocate_tensor_set(&mut rin), NRT_SUCCESS);
            assert_eq!(nrt_allocate_tensor_set(&mut rout), NRT_SUCCESS);
            for (k, (name, size)) in [(c"x", 65536), (c"y", 65536), (c"output0", 32768)].into_iter().enumerate() {
                assert_eq!(nrt_tensor_allocate(0, 0, size, name.as_ptr(), &mut tensors[k]), NRT_SUCCESS);
                let set = if k < 2 { rin } else { rout };
                assert_eq!(nrt_add_tensor_to_tensor_set(set, name.as_ptr(), tensors[k]), NRT_SUCCESS);
            }
        }
        assert_eq!(nrt_execute(real_model, rin, rout), NRT_UNSUPPORTED_NEFF_VERSION);
        assert_eq!(nrt_unload(real_model), NRT_SUCCESS);
    }

    let mut version = std::mem::MaybeUninit::<NrtVersion>::zeroed();
    assert_eq!(unsafe { nrt_get_version(version.as_mut_ptr(), std::mem::size_of::<NrtVersion>()) }, NRT_SUCCESS);
    let version = unsafe { version.assume_init() };
    assert_eq!((version.rt_major, version.rt_minor), (2, 28));
    let status_name = unsafe { CStr::from_ptr(nrt_get_status_as_str(NRT_TIMEOUT)) };
    assert_eq!(status_name.to_str(), Ok("NRT_TIMEOUT"));

    unsafe {
        nrt_destroy_tensor_set(&mut in_set);
        nrt_destroy_tensor_set(&mut out_set);
        nrt_tensor_free(&mut input);
        nrt_tensor_free(&mut output);
    }
    assert!(in_set.is_null());
    assert_eq!(nrt_unload(model), NRT_SUCCESS);
    assert_eq!(nrt_unload(model), NRT_INVALID_HANDLE);
    nrt_close();
    assert_eq!(nrt_execute(model, in_set, out_set), NRT_CLOSED);
}

#[test]
fn calls_before_init_are_uninitialized() {
    let rt = Runtime::default();
    assert_eq!(rt.load(&linear_neff(1), 0, 1), Err(NRT_UNINITIALIZED));
    assert_eq!(rt.tensor_allocate(0, 0, 4, "t").err(), Some(NRT_UNINITIALIZED));
    assert_eq!(rt.set_allocate(), Err(NRT_UNINITIALIZED));
    assert_eq!(rt.execute(1, 2, 3, 1), NRT_UNINITIALIZED);
}

/// A runtime instance with `linear` loaded on `core` and bound input/output sets.
struct Bench {
    rt: Arc<Runtime>,
    model: usize,
    inputs: usize,
    outputs: usize,
    out_tensor: usize,
}

impl Bench {
    fn new(rt: Arc<Runtime>, core: i32, batch: usize) -> Bench {
        let model = rt.load(&linear_neff(batch as u64), core, 1).expect("loads");
        let input = rt.tensor_allocate(0, core, batch * 256, "INPUT0").expect("alloc");
        let out_tensor = rt.tensor_allocate(0, core, batch * 64, "OUTPUT0").expect("alloc");
        let x = f32_bytes(input_values(batch));
        assert_eq!(rt.tensor(input).expect("tensor").write(0, &x), NRT_SUCCESS);
        let (inputs, outputs) = (rt.set_allocate().expect("set"), rt.set_allocate().expect("set"));
        assert_eq!(rt.set_add(inputs, "INPUT0", input), NRT_SUCCESS);
        assert_eq!(rt.set_add(outputs, "OUTPUT0", out_tensor), NRT_SUCCESS);
        Bench { rt, model, inputs, outputs, out_tensor }
    }

    fn run(&self) -> NrtStatus {
        self.rt.execute(self.model, self.inputs, self.outputs, 1)
    }
}

pub(crate) fn runtime(knobs: Knobs) -> Arc<Runtime> {
    let rt = Arc::new(Runtime::default());
    assert_eq!(rt.init(knobs), NRT_SUCCESS);
    rt
}

#[test]
fn default_exec_failure_hits_only_the_first_execution() {
    let rt = runtime(Knobs { fail_exec_status: Some(NRT_EXEC_COMPLETED_WITH_ERR), ..Knobs::default() });
    let (a, b) = (Bench::new(Arc::clone(&rt), 0, 2), Bench::new(Arc::clone(&rt), 1, 2));
    assert_eq!(a.run(), NRT_EXEC_COMPLETED_WITH_ERR);
    assert_eq!([a.run(), b.run(), b.run(), a.run()], [NRT_SUCCESS; 4]);
}

#[test]
fn every_nth_execution_fails_per_core_and_only_on_the_chosen_core() {
    let knobs =
        Knobs { fail_exec_status: Some(NRT_HW_ERROR), fail_every_n: Some(2), fail_core: Some(1), ..Knobs::default() };
    let rt = runtime(knobs);
    let (a, b) = (Bench::new(Arc::clone(&rt), 0, 1), Bench::new(Arc::clone(&rt), 1, 1));
    let on_core0: Vec<_> = (0..4).map(|_| a.run()).collect();
    let on_core1: Vec<_> = (0..4).map(|_| b.run()).collect();
    assert_eq!(on_core0, [NRT_SUCCESS; 4]);
    assert_eq!(on_core1, [NRT_SUCCESS, NRT_HW_ERROR, NRT_SUCCESS, NRT_HW_ERROR]);

    rt.set_knobs(Knobs {
        fail_exec_status: Some(NRT_HW_ERROR),
        fail_every_n: Some(2),
        fail_once: true,
        ..Knobs::default()
    });
    let runs: Vec<_> = (0..6).map(|_| a.run()).collect();
    assert_eq!(runs, [NRT_SUCCESS, NRT_HW_ERROR, NRT_SUCCESS, NRT_SUCCESS, NRT_SUCCESS, NRT_SUCCESS]);
}

#[test]
fn load_failure_knob_and_core_bounds() {
    let rt =
        runtime(Knobs { fail_load_status: Some(NRT_RESOURCE), fail_once: true, visible_cores: 4, ..Knobs::default() });
    let neff = linear_neff(1);
    assert_eq!(rt.load(&neff, 0, 1), Err(NRT_RESOURCE));
    assert!(rt.load(&neff, 3, 1).is_ok());
    assert_eq!(rt.load(&neff, 3, 2), Err(NRT_LOAD_NOT_ENOUGH_NC));
    assert_eq!(rt.load(&neff, 4, 1), Err(NRT_LOAD_NOT_ENOUGH_NC));
    assert_eq!(rt.load(&neff[..neff.len() - 100], 0, 1), Err(NRT_INVALID), "truncated payload");
}

#[test]
fn hung_execution_times_out_after_the_bound() {
    let rt = runtime(Knobs {
        hang_exec: true,
        hang_bound: Duration::from_millis(50),
        fail_core: Some(0),
        ..Knobs::default()
    });
    let (a, b) = (Bench::new(Arc::clone(&rt), 0, 1), Bench::new(Arc::clone(&rt), 1, 1));
    let started = std::time::Instant::now();
    assert_eq!(a.run(), NRT_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(b.run(), NRT_SUCCESS);
}

#[test]
fn concurrent_executions_on_two_cores_all_succeed_with_delay() {
    let rt = runtime(Knobs { exec_delay: Duration::from_millis(5), ..Knobs::default() });
    let benches = [Arc::new(Bench::new(Arc::clone(&rt), 0, 8)), Arc::new(Bench::new(Arc::clone(&rt), 1, 8))];
    let threads: Vec<_> = (0..4)
        .map(|k| {
            let bench = Arc::clone(&benches[k % 2]);
            std::thread::spawn(move || (0..5).map(|_| bench.run()).collect::<Vec<_>>())
        })
        .collect();
    for thread in threads {
        assert_eq!(thread.join().expect("thread"), vec![NRT_SUCCESS; 5]);
    }
    let mut y = vec![0u8; 8 * 64];
    assert_eq!(rt.tensor(benches[1].out_tensor).expect("tensor").read(0, &mut y), NRT_SUCCESS);
    let (got, want) = (from_bytes(&y), reference(&input_values(8)));
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
}

#[test]
fn unknown_program_op_is_refused_at_load() {
    let rt = runtime(Knobs::default());
    let neff_json = serde_json::json!({"metadata": {"signatures": {"default": {
        "inputs": {"a": {"id": 0, "dtype": "float32", "shape": [4]}},
        "outputs": {"b": {"id": 0, "dtype": "float32", "shape": [4]}}}}}});
    let program = serde_json::json!({"version": 1, "ops": [{"op": "gru", "input": "a", "output": "b"}]});
    let neff = container(&[
        ("neff.json", neff_json.to_string().into_bytes()),
        ("standin/program.json", program.to_string().into_bytes()),
    ]);
    assert_eq!(rt.load(&neff, 0, 1), Err(NRT_UNSUPPORTED_NEFF_VERSION));
}

#[test]
fn library_path_helper_names_the_cdylib() {
    assert_eq!(crate::library_file_name(), "libnrt_standin.so");
    if let Some(path) = crate::standin_library_path() {
        assert!(path.ends_with("libnrt_standin.so"));
    }
}

/// A version 2 accumulator over `rows` rows: int32 `x`, `ready`, `acc_in` → `y`, `acc_out`.
fn accumulator_neff(rows: u64, version: u64) -> Vec<u8> {
    let t = |shape: u64| serde_json::json!({"dtype": "int32", "shape": [shape, 1]});
    let neff_json = serde_json::json!({"metadata": {"signatures": {"default": {
        "inputs": {"x": t(rows), "ready": t(rows), "acc_in": t(rows)},
        "outputs": {"y": t(rows), "acc_out": t(rows)}}}}});
    let program = serde_json::json!({"version": version, "ops": [
        {"op": "add", "a": "acc_in", "b": "x", "output": "sum"},
        {"op": "select", "cond": "ready", "a": "sum", "b": "acc_in", "output": "acc_out"},
        {"op": "copy", "input": "sum", "output": "y"}]});
    container(&[
        ("neff.json", neff_json.to_string().into_bytes()),
        ("standin/program.json", program.to_string().into_bytes()),
    ])
}

fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn int32_tensors_and_select_run_in_version_2_only() {
    let rt = runtime(Knobs::default());
    assert_eq!(
        rt.load(&accumulator_neff(3, 1), 0, 1),
        Err(NRT_UNSUPPORTED_NEFF_VERSION),
        "select and int32 need version 2"
    );
    let model = rt.load(&accumulator_neff(3, 2), 0, 1).expect("loads");
    let (ins, outs) = (rt.set_allocate().expect("set"), rt.set_allocate().expect("set"));
    let mut tensors = HashMap::new();
    for (name, set, data) in [
        ("x", ins, i32_bytes(&[5, -7, 1 << 20])),
        ("ready", ins, i32_bytes(&[1, 0, 1])),
        ("acc_in", ins, i32_bytes(&[10, 20, -3])),
        ("y", outs, vec![0; 12]),
        ("acc_out", outs, vec![0; 12]),
    ] {
        let h = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 12, name).expect("tensor");
        assert_eq!(rt.tensor(h).expect("tensor").write(0, &data), NRT_SUCCESS);
        assert_eq!(rt.set_add(set, name, h), NRT_SUCCESS);
        tensors.insert(name, h);
    }
    assert_eq!(rt.execute(model, ins, outs, 1), NRT_SUCCESS);
    let read = |name: &str| {
        let mut b = vec![0u8; 12];
        let t = rt.tensor(tensors[name]).expect("tensor");
        assert_eq!(t.read(0, &mut b), NRT_SUCCESS);
        b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<i32>>()
    };
    assert_eq!(read("y"), vec![15, 13, (1 << 20) - 3]);
    assert_eq!(read("acc_out"), vec![15, 20, (1 << 20) - 3], "row 1 is not ready: it keeps its state");
}

#[test]
fn deny_read_prefix_refuses_host_reads_of_matching_tensors_only() {
    let rt = runtime(Knobs { deny_read_prefix: Some("state:".into()), ..Knobs::default() });
    let state = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 8, "state:h:0").expect("tensor");
    let other = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 8, "OUTPUT0").expect("tensor");
    let mut buf = [0u8; 8];
    let t = rt.tensor(state).expect("tensor");
    assert_eq!(rt.host_read(&t, 0, &mut buf), NRT_INVALID);
    assert_eq!(t.read(0, &mut buf), NRT_SUCCESS, "the runtime itself still reads it");
    assert_eq!(rt.host_read(&rt.tensor(other).expect("tensor"), 0, &mut buf), NRT_SUCCESS);
}

#[test]
fn deny_write_prefix_refuses_host_writes_of_matching_tensors_only() {
    let rt = runtime(Knobs { deny_write_prefix: Some("kv:".into()), ..Knobs::default() });
    let kv = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 8, "kv:k:0").expect("tensor");
    let other = rt.tensor_allocate(NRT_TENSOR_PLACEMENT_DEVICE, 0, 8, "INPUT0").expect("tensor");
    let t = rt.tensor(kv).expect("tensor");
    assert_eq!(rt.host_write(&t, 0, &[1; 8]), NRT_INVALID);
    assert_eq!(t.write(0, &[2; 8]), NRT_SUCCESS, "the runtime itself (an execution) still writes it");
    let mut buf = [0u8; 8];
    assert_eq!(rt.host_read(&t, 0, &mut buf), NRT_SUCCESS, "reads are not denied by the write knob");
    assert_eq!(buf, [2; 8]);
    assert_eq!(rt.host_write(&rt.tensor(other).expect("tensor"), 0, &[3; 8]), NRT_SUCCESS);
}

#[test]
fn serial_cores_run_one_execution_at_a_time_per_core() {
    let delay = Duration::from_millis(30);
    for (serial, at_least) in [(false, delay), (true, 3 * delay)] {
        let rt = runtime(Knobs { exec_delay: delay, serial_cores: serial, ..Knobs::default() });
        let bench = Arc::new(Bench::new(Arc::clone(&rt), 0, 1));
        let other_core = Arc::new(Bench::new(Arc::clone(&rt), 1, 1));
        let started = std::time::Instant::now();
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let b = if k < 3 { Arc::clone(&bench) } else { Arc::clone(&other_core) };
                std::thread::spawn(move || b.run())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("thread"), NRT_SUCCESS);
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= at_least, "serial {serial}: three executions on core 0 took {elapsed:?}");
        if !serial {
            continue;
        }
        // The fourth execution, on core 1, did not wait for core 0.
        let started = std::time::Instant::now();
        assert_eq!(other_core.run(), NRT_SUCCESS);
        assert!(started.elapsed() < 3 * delay);
    }
}
