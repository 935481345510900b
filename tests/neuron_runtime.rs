//! The Neuron safe layer against the stand-in libnrt: probe, runtime, bucketed instances,
//! failures and their classification.
//!
//! libnrt is one per process and its knobs are process-wide environment, so every scenario runs
//! in a child process: the parent test re-runs this binary with `--ignored --exact <child>` and the
//! scenario's environment, and checks the child passed. A child run directly (without the marker
//! variable) does nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use neuron_worker::backend::neuron::{
    self, NeuronError, NeuronInstance, NeuronModelConfig, Probe, Runtime, TensorConfig,
};
use neuron_worker::backend::{BackendError, BatchInput, ModelInstance};
use neuron_worker::neff::writer::DenseLayer;
use neuron_worker::neff::{Activation, NeffBuilder};
use neuron_worker::tensor::{DataType, Tensor};

const CHILD_MARKER: &str = "NEURON_RUNTIME_TEST_CHILD";
const IN: usize = 8;
const OUT: usize = 4;

fn standin() -> PathBuf {
    match nrt_standin::standin_library_path() {
        Some(p) => p,
        None => panic!("the stand-in libnrt is not built: run `cargo build -p nrt-standin`"),
    }
}

/// Runs child test `name` in a fresh process with `env`; asserts it ran and passed.
fn run_child(name: &str, env: &[(&str, String)]) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut cmd = Command::new(exe);
    cmd.args(["--ignored", "--exact", name, "--nocapture", "--test-threads=1"]).env(CHILD_MARKER, "1");
    for key in ["NRT_STANDIN_VISIBLE_CORES", "NRT_STANDIN_FAIL_EXEC_STATUS", "NRT_STANDIN_FAIL_LOAD_STATUS"] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run child {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child {name} failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("CHILD-OK {name}")), "child {name} did not run:\n{stdout}\n{stderr}");
    stdout
}

fn is_child() -> bool {
    std::env::var_os(CHILD_MARKER).is_some()
}

fn weights() -> Vec<f32> {
    (0..IN * OUT).map(|i| (i as f32 - 10.0) / 16.0).collect()
}

fn bias() -> Vec<f32> {
    (0..OUT).map(|i| i as f32 * 0.5).collect()
}

fn linear_neff(batch: usize, in_features: usize) -> Vec<u8> {
    let layer = DenseLayer {
        weight: (0..in_features * OUT).map(|i| weights().get(i).copied().unwrap_or(0.0)).collect(),
        bias: Some(bias()),
        in_features: in_features as u64,
        out_features: OUT as u64,
        activation: Activation::None,
    };
    match NeffBuilder::dense_chain("linear", batch as u64, "x", "y", &[layer]).build() {
        Ok(bytes) => bytes,
        Err(e) => panic!("cannot build the test NEFF: {e}"),
    }
}

fn config() -> NeuronModelConfig {
    NeuronModelConfig {
        name: "linear".into(),
        batching: true,
        inputs: vec![TensorConfig { name: "x".into(), dtype: DataType::Fp32, dims: vec![IN] }],
        outputs: vec![TensorConfig { name: "y".into(), dtype: DataType::Fp32, dims: vec![OUT] }],
    }
}

fn input(batch: usize) -> Tensor {
    let values: Vec<f32> = (0..batch * IN).map(|i| (i % 7) as f32 - 3.0).collect();
    Tensor::from_f32(vec![batch, IN], &values)
}

fn expected(x: &Tensor) -> Vec<f32> {
    let xs = x.view().to_f32().unwrap_or_default();
    let (w, b) = (weights(), bias());
    let rows = x.shape[0];
    let mut y = vec![0f32; rows * OUT];
    for r in 0..rows {
        for o in 0..OUT {
            y[r * OUT + o] = b[o] + (0..IN).map(|k| xs[r * IN + k] * w[k * OUT + o]).sum::<f32>();
        }
    }
    y
}

fn instance(core: u32, buckets: &[usize]) -> Result<NeuronInstance, NeuronError> {
    let runtime = Runtime::get_or_init()?;
    let neffs: Vec<(usize, Vec<u8>)> = buckets.iter().map(|b| (*b, linear_neff(*b, IN))).collect();
    let refs: Vec<(usize, &[u8])> = neffs.iter().map(|(b, n)| (*b, n.as_slice())).collect();
    NeuronInstance::new(runtime, core, config(), &refs)
}

fn execute(inst: &mut NeuronInstance, x: &Tensor) -> Result<Vec<f32>, BackendError> {
    let out = inst.execute(&[BatchInput { name: "x", tensor: x.view() }])?;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "y");
    assert_eq!(out[0].tensor.dtype, DataType::Fp32);
    assert_eq!(out[0].tensor.shape, vec![x.shape[0], OUT]);
    Ok(out[0].tensor.view().to_f32().unwrap_or_default())
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "got {got:?}, want {want:?}");
    }
}

// ---- parents -------------------------------------------------------------------------------

#[test]
fn neuron_probe_and_bucketed_execution_on_the_standin() {
    run_child(
        "child_nrt_probe_and_execute",
        &[("NEURON_WORKER_LIBNRT", standin().display().to_string()), ("NRT_STANDIN_VISIBLE_CORES", "3".into())],
    );
}

#[test]
fn neuron_hardware_error_takes_the_core_out_of_service() {
    run_child(
        "child_nrt_exec_failure",
        &[
            ("NEURON_WORKER_LIBNRT", standin().display().to_string()),
            ("NRT_STANDIN_FAIL_EXEC_STATUS", "1202".into()),
            ("NRT_STANDIN_FAIL_EVERY_N", "2".into()),
            ("EXPECT_USABLE", "0".into()),
        ],
    );
}

#[test]
fn neuron_completed_with_err_keeps_the_core_in_service() {
    run_child(
        "child_nrt_exec_failure",
        &[
            ("NEURON_WORKER_LIBNRT", standin().display().to_string()),
            ("NRT_STANDIN_FAIL_EXEC_STATUS", "1004".into()),
            ("NRT_STANDIN_FAIL_EVERY_N", "2".into()),
            ("EXPECT_USABLE", "1".into()),
        ],
    );
}

#[test]
fn neuron_load_out_of_device_memory_is_a_load_error() {
    run_child(
        "child_nrt_load_resource",
        &[("NEURON_WORKER_LIBNRT", standin().display().to_string()), ("NRT_STANDIN_FAIL_LOAD_STATUS", "4".into())],
    );
}

#[test]
fn neuron_probe_reports_zero_visible_cores() {
    run_child(
        "child_nrt_probe_no_cores",
        &[("NEURON_WORKER_LIBNRT", standin().display().to_string()), ("NRT_STANDIN_VISIBLE_CORES", "0".into())],
    );
}

#[test]
fn neuron_probe_without_libnrt_explains_what_was_tried() {
    run_child("child_nrt_probe_missing", &[("NEURON_WORKER_LIBNRT", "/nonexistent/libnrt.so.1".into())]);
}

// ---- children ------------------------------------------------------------------------------

#[test]
#[ignore = "runs in a child process of neuron_probe_and_bucketed_execution_on_the_standin"]
fn child_nrt_probe_and_execute() {
    if !is_child() {
        return;
    }
    let Probe::Available { runtime_version, visible_cores, library_path } = neuron::probe() else {
        panic!("probe: {:?}", neuron::probe());
    };
    assert_eq!(visible_cores, 3);
    assert_eq!(library_path, standin());
    assert!(runtime_version.starts_with("2."), "{runtime_version}");

    let rt = Runtime::get_or_init().unwrap_or_else(|e| panic!("init: {e}"));
    let again = Runtime::get_or_init().unwrap_or_else(|e| panic!("second init: {e}"));
    assert!(Arc::ptr_eq(&rt, &again), "a second get_or_init must return the same runtime");
    assert_eq!(rt.visible_cores(), 3);
    assert_eq!(rt.version(), runtime_version);

    let mut inst = instance(1, &[4, 1, 2]).unwrap_or_else(|e| panic!("instance: {e}"));
    assert_eq!(inst.bucket_sizes(), vec![1, 2, 4]);
    assert_eq!(inst.label(), "nc:1");
    for batch in [1, 2, 4, 2, 2, 1, 4] {
        let x = input(batch);
        let y = execute(&mut inst, &x).unwrap_or_else(|e| panic!("batch {batch}: {e}"));
        assert_close(&y, &expected(&x));
    }

    match execute(&mut inst, &input(3)) {
        Err(BackendError::InvalidInput { name, reason }) => {
            assert_eq!(name, "x");
            assert!(reason.contains("batch size 3") && reason.contains("[1, 2, 4]"), "{reason}");
        }
        other => panic!("batch 3 without a bucket: {other:?}"),
    }
    let wrong = Tensor { dtype: DataType::Fp16, shape: vec![2, IN], data: vec![0; 2 * IN * 2] };
    assert!(matches!(execute(&mut inst, &wrong), Err(BackendError::InvalidInput { .. })));

    let single = NeuronInstance::with_single_neff(Arc::clone(&rt), 0, config(), &linear_neff(2, IN))
        .unwrap_or_else(|e| panic!("single NEFF: {e}"));
    assert_eq!(single.bucket_sizes(), vec![2]);

    let mut bad = config();
    bad.inputs[0].dims = vec![IN * 2];
    match NeuronInstance::new(Arc::clone(&rt), 2, bad, &[(2, &linear_neff(2, IN))]) {
        Err(NeuronError::Mismatch { model, core, detail }) => {
            assert_eq!((model.as_str(), core), ("linear", 2));
            assert!(
                detail.contains("input 'x'") && detail.contains("128 bytes") && detail.contains("64 bytes"),
                "{detail}"
            );
        }
        other => panic!("size mismatch: {other:?}"),
    }
    match NeuronInstance::new(Arc::clone(&rt), 3, config(), &[(1, &linear_neff(1, IN))]) {
        Err(e @ NeuronError::Invalid { .. }) => {
            assert!(e.to_string().contains("sees 3 NeuronCore"), "{e}")
        }
        other => panic!("core 3 of 3: {other:?}"),
    }
    println!("CHILD-OK child_nrt_probe_and_execute");
}

#[test]
#[ignore = "runs in a child process of the neuron_*_core_* tests"]
fn child_nrt_exec_failure() {
    if !is_child() {
        return;
    }
    let expect_usable = std::env::var("EXPECT_USABLE").is_ok_and(|v| v == "1");
    let code: u32 = std::env::var("NRT_STANDIN_FAIL_EXEC_STATUS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut inst = instance(0, &[2]).unwrap_or_else(|e| panic!("instance: {e}"));
    let x = input(2);
    let first = execute(&mut inst, &x).unwrap_or_else(|e| panic!("first execution: {e}"));
    assert_close(&first, &expected(&x));
    match execute(&mut inst, &x) {
        Err(BackendError::Execution { message, instance_usable, nrt_status }) => {
            assert_eq!(nrt_status, Some(code));
            assert_eq!(instance_usable, expect_usable, "{message}");
            let name = neuron_sys::status_name(code).unwrap_or("?");
            assert!(
                message.contains(name) && message.contains("NeuronCore 0") && message.contains("'linear'"),
                "{message}"
            );
        }
        other => panic!("second execution should fail with {code}: {other:?}"),
    }
    println!("CHILD-OK child_nrt_exec_failure");
}

#[test]
#[ignore = "runs in a child process of neuron_load_out_of_device_memory_is_a_load_error"]
fn child_nrt_load_resource() {
    if !is_child() {
        return;
    }
    match instance(0, &[1]) {
        Err(e @ NeuronError::Status { code: 4, .. }) => {
            let text = e.to_string();
            assert!(text.contains("load of model 'linear' on NeuronCore 0 failed: NRT_RESOURCE (4)"), "{text}");
            assert!(matches!(BackendError::from(e), BackendError::Load(m) if m.contains("fewer models")));
        }
        other => panic!("load should fail with NRT_RESOURCE: {other:?}"),
    }
    println!("CHILD-OK child_nrt_load_resource");
}

#[test]
#[ignore = "runs in a child process of neuron_probe_reports_zero_visible_cores"]
fn child_nrt_probe_no_cores() {
    if !is_child() {
        return;
    }
    match neuron::probe() {
        Probe::Unavailable { reason } => {
            assert!(reason.contains("no NeuronCore is visible"), "{reason}")
        }
        other => panic!("zero cores: {other:?}"),
    }
    println!("CHILD-OK child_nrt_probe_no_cores");
}

#[test]
#[ignore = "runs in a child process of neuron_probe_without_libnrt_explains_what_was_tried"]
fn child_nrt_probe_missing() {
    if !is_child() {
        return;
    }
    match neuron::probe() {
        Probe::Unavailable { reason } => {
            for needle in ["/nonexistent/libnrt.so.1", "/opt/aws/neuron/lib/libnrt.so.1", "aws-neuronx-runtime-lib"] {
                assert!(reason.contains(needle), "{needle} missing from {reason}");
            }
        }
        other => panic!("missing libnrt: {other:?}"),
    }
    assert!(matches!(Runtime::get_or_init(), Err(NeuronError::Unavailable { .. })));
    println!("CHILD-OK child_nrt_probe_missing");
}
