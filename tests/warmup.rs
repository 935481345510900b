//! `model_warmup` on both backends, through the worker binary: the samples run before the model is
//! ready (on Neuron each batch bucket's NEFF, or each (batch, sequence) bucket pair's, once per
//! core, counted by the stand-in libnrt itself, not by the worker), a reload is warmed before it replaces the serving version, and a sample that
//! fails refuses the load naming the sample.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

#[macro_use]
mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::backends::Backend;
use common::bert_fixture::{MAX_POS, generate, write_checkpoint};
use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::*;
use tonic::transport::Channel;

/// The stand-in's status code for a failed execution (`NRT_FAILURE`).
const NRT_FAILURE: &str = "1";

/// Writes the warmed model `name` for `backend` into `root`: on the CPU a BERT whose sample
/// `sample` has `positions` tokens and runs `count` times with 2 rows; on Neuron the stand-in
/// `linear` model (NEFFs for batches 1, 4 and 16) with one zero sample.
fn warmed_model(root: &Path, backend: Backend, sample: &str, positions: usize, count: u32) -> &'static str {
    match backend {
        Backend::Cpu => {
            let vdir = root.join("bert").join("1");
            std::fs::create_dir_all(&vdir).expect("mkdir");
            write_checkpoint(&vdir, &generate(7), safetensors::Dtype::F32, "", true);
            let config = format!(
                r#"name: "bert" max_batch_size: 8
input [ {{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }}, {{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] }} ]
output [ {{ name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }}, {{ name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] }} ]
model_warmup [ {{ name: "{sample}" batch_size: 2 count: {count} inputs [
  {{ key: "input_ids" value: {{ data_type: TYPE_INT64 dims: [ {positions} ] random_data: true }} }},
  {{ key: "attention_mask" value: {{ data_type: TYPE_INT64 dims: [ {positions} ] zero_data: true }} }} ] }} ]"#
            );
            std::fs::write(root.join("bert").join("config.pbtxt"), config).expect("config");
            "bert"
        }
        Backend::Neuron => {
            let warm = format!(
                r#"model_warmup [ {{ name: "{sample}" batch_size: 1 count: {count} inputs {{ key: "INPUT0" value: {{ data_type: TYPE_FP32 dims: [ 64 ] zero_data: true }} }} }} ]"#
            );
            neuron_worker::neff::testing::write_standin_model(root, "linear", &[1, 4, 16], &warm).expect("NEFFs");
            "linear"
        }
    }
}

/// Writes a model without warm-up (`plain`), which no test executes.
fn plain_model(root: &Path, backend: Backend) {
    match backend {
        Backend::Cpu => {
            let vdir = root.join("plain").join("1");
            std::fs::create_dir_all(&vdir).expect("mkdir");
            write_checkpoint(&vdir, &generate(3), safetensors::Dtype::F32, "", true);
            let config = r#"name: "plain" max_batch_size: 8
input [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }, { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]
output [ { name: "last_hidden_state" data_type: TYPE_FP32 dims: [ -1, 32 ] }, { name: "sentence_embedding" data_type: TYPE_FP32 dims: [ 32 ] } ]"#;
            std::fs::write(root.join("plain").join("config.pbtxt"), config).expect("config");
        }
        Backend::Neuron => {
            neuron_worker::neff::testing::write_standin_model(root, "mlp", &[1], "").expect("NEFF");
        }
    }
}

/// Starts the worker binary on `backend` over `root` in explicit mode, with `env`.
async fn start(
    backend: Backend,
    root: &Path,
    env: &[(&str, &OsStr)],
) -> (SpawnedWorker, GrpcInferenceServiceClient<Channel>) {
    let lib = standin();
    let flag = |s: &'static str| -> &'static OsStr { OsStr::new(s) };
    let mut args: Vec<&OsStr> = vec![flag("--model-repository"), root.as_os_str()];
    args.extend([flag("--model-control-mode"), flag("explicit")]);
    let mut all_env: Vec<(&str, &OsStr)> = env.to_vec();
    match backend {
        Backend::Cpu => args.extend([flag("--backend"), flag("cpu")]),
        Backend::Neuron => {
            args.extend([flag("--backend"), flag("neuron")]);
            all_env.extend([("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", flag("2"))]);
        }
    }
    spawn_worker(&args, &all_env).await
}

async fn ready(c: &mut GrpcInferenceServiceClient<Channel>, model: &str) -> bool {
    let r = c.model_ready(ModelReadyRequest { name: model.into(), version: String::new() }).await;
    r.is_ok_and(|r| r.into_inner().ready)
}

async fn reason(c: &mut GrpcInferenceServiceClient<Channel>, model: &str) -> (String, String) {
    let idx = c.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
    let m = idx.models.into_iter().find(|m| m.name == model).expect("listed");
    (m.state, m.reason)
}

fn metric(page: &str, name: &str, model: &str) -> Option<u64> {
    let prefix = format!("neuron_worker_{name}{{model=\"{model}\",version=\"1\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// The stand-in's execution log as sorted lines (`<program> core <core>`).
fn exec_log(path: &Path) -> Vec<String> {
    let mut lines: Vec<String> =
        std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// What one warm-up of the model leaves in the stand-in's log: each bucket's NEFF once per core.
fn one_neuron_warmup(times: usize) -> Vec<String> {
    let mut want = Vec::new();
    for b in [1, 16, 4] {
        for core in 0..2 {
            want.extend(std::iter::repeat_n(format!("linear_b{b} core {core}"), times));
        }
    }
    want.sort();
    want
}

async fn warmup_runs_before_ready(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("executions.log");
    let root = dir.path().join("repo");
    let model = warmed_model(&root, backend, "warm", 5, 3);
    let (w, mut c) = start(backend, &root, &[("NRT_STANDIN_EXEC_LOG", log.as_os_str())]).await;
    assert!(ready(&mut c, model).await, "{:?}", reason(&mut c, model).await);
    // Ready, and not one request yet: every execution so far is the warm-up's.
    let page = http_get(&w.metrics, "/metrics").await;
    assert_eq!(metric(&page, "inference_exec_count", model), Some(0), "{page}");
    match backend {
        Backend::Cpu => assert_eq!(metric(&page, "warmup_executions", model), Some(3), "{page}"),
        Backend::Neuron => {
            // Counted by the stand-in, independently of the worker: 3 buckets x 2 cores x count 3.
            assert_eq!(exec_log(&log), one_neuron_warmup(3));
            assert_eq!(metric(&page, "warmup_executions", model), Some(18), "{page}");
        }
    }
    // A reload is warmed before the call returns (and before it replaces the serving version).
    let load = RepositoryModelLoadRequest { model_name: model.into(), ..Default::default() };
    c.repository_model_load(load).await.expect("reload");
    assert!(ready(&mut c, model).await);
    if backend == Backend::Neuron {
        assert_eq!(exec_log(&log), one_neuron_warmup(6));
    }
}

async fn a_failing_warmup_refuses_the_load_naming_the_sample(backend: Backend) {
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().join("repo");
    std::fs::create_dir_all(&root).expect("mkdir");
    let env: Vec<(&str, &OsStr)> =
        vec![("NRT_STANDIN_FAIL_EXEC_STATUS", OsStr::new(NRT_FAILURE)), ("NRT_STANDIN_FAIL_ONCE", OsStr::new("1"))];
    // The worker starts with another model only (a model failing at start leaves the server
    // unready); the warmed one comes over the repository API. On the CPU its sample is longer than the
    // model's positions; on Neuron the stand-in fails the process's first execution (the
    // warm-up's; no request has come), once.
    plain_model(&root, backend);
    let (_w, mut c) = start(backend, &root, &env).await;
    let model = warmed_model(&root, backend, "too_long_or_failing", MAX_POS + 1, 1);
    let load = RepositoryModelLoadRequest { model_name: model.into(), ..Default::default() };
    let e = c.repository_model_load(load.clone()).await.expect_err("the warm-up fails");
    assert!(e.message().contains("warm-up sample 'too_long_or_failing' failed"), "{}", e.message());
    assert!(!ready(&mut c, model).await, "a failed warm-up leaves the model unready");
    let (state, why) = reason(&mut c, model).await;
    assert_eq!(state, "UNAVAILABLE");
    assert!(why.contains("too_long_or_failing"), "{why}");
    match backend {
        Backend::Cpu => {
            let e = c.repository_model_load(load).await.expect_err("the sample still fails");
            assert!(e.message().contains("too_long_or_failing"), "{}", e.message());
            assert!(!ready(&mut c, model).await);
        }
        Backend::Neuron => {
            // The injected failure was the only one: the retried load warms up and serves.
            c.repository_model_load(load).await.expect("second load");
            assert!(ready(&mut c, model).await);
        }
    }
}

both_backends!(warmup_before_ready, warmup_runs_before_ready);
both_backends!(failing_warmup, a_failing_warmup_refuses_the_load_naming_the_sample);

/// With `neuron_seq_buckets`, the sample runs once on each (batch, sequence) bucket pair's NEFF on
/// each core before the model is ready, as the stand-in counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn neuron_warmup_runs_every_batch_and_sequence_bucket_pair() {
    let dir = tempfile::tempdir().expect("tmp");
    let log = dir.path().join("executions.log");
    let root = dir.path().join("repo");
    // Batch buckets 1, 4 and sequence buckets 8, 16: NEFFs of 8, 16, 32 and 64 positions (the
    // stand-in names each program after its positions: linear_b{batch x seq}).
    neuron_worker::neff::testing::write_standin_seq_model(&root, "tokens", &[1, 4], &[8, 16]).expect("NEFFs");
    let config = root.join("tokens").join("config.pbtxt");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(
        r#"model_warmup [ { name: "tokens_zero" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 3, 64 ] zero_data: true } } } ]"#,
    );
    std::fs::write(&config, text).expect("config");
    let (w, mut c) = start(Backend::Neuron, &root, &[("NRT_STANDIN_EXEC_LOG", log.as_os_str())]).await;
    assert!(ready(&mut c, "tokens").await, "{:?}", reason(&mut c, "tokens").await);
    let mut want: Vec<String> =
        [8, 16, 32, 64].iter().flat_map(|p| (0..2).map(move |core| format!("linear_b{p} core {core}"))).collect();
    want.sort();
    assert_eq!(exec_log(&log), want);
    let page = http_get(&w.metrics, "/metrics").await;
    assert_eq!(metric(&page, "inference_exec_count", "tokens"), Some(0), "{page}");
}
