//! The Neuron path end to end: the worker binary with `--backend neuron` over the project's stand-in
//! libnrt, serving the built-in models compiled as stand-in NEFFs (one per bucket). The same request
//! bodies run against the CPU backend, and outputs must agree. Fault injection through the stand-in's
//! knobs checks that a failed batch fails only its requests and a fatal status takes a core out.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use common::*;
use neuron_worker::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use neuron_worker::proto::inference::*;
use tonic::Code;
use tonic::transport::Channel;

/// Starts `neuron-worker serve --backend neuron` over a fresh stand-in repository (2 cores) and
/// connects.
async fn start_neuron_worker(
    env: &[(&str, &str)],
    extra_config: &str,
) -> (SpawnedWorker, GrpcInferenceServiceClient<Channel>) {
    let dir = tempfile::tempdir().expect("temp dir");
    for model in ["linear", "mlp"] {
        neuron_worker::neff::testing::write_standin_model(dir.path(), model, &[1, 4, 16], extra_config)
            .expect("write NEFFs");
    }
    let lib = standin();
    let args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), dir.path().as_os_str()];
    let mut all_env: Vec<(&str, &OsStr)> =
        vec![("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "2".as_ref())];
    all_env.extend(env.iter().map(|(k, v)| (*k, OsStr::new(v))));
    let (mut w, c) = spawn_worker(&args, &all_env).await;
    w.dir = Some(dir);
    (w, c)
}

async fn infer(
    c: &mut GrpcInferenceServiceClient<Channel>,
    model: &str,
    dim: usize,
    rows: usize,
    tag: usize,
) -> Result<Vec<f32>, tonic::Status> {
    let x: Vec<f32> = (0..rows * dim).map(|i| (((tag * 31 + i * 7) % 19) as f32) / 9.0 - 1.0).collect();
    let r = c.model_infer(fp32_request(model, "INPUT0", vec![rows as i64, dim as i64], &x)).await?;
    Ok(bytes_f32(&r.into_inner().raw_output_contents[0]))
}

#[tokio::test]
async fn neuron_standin_outputs_match_cpu_for_every_batch_size() {
    let (_neuron, mut n) = start_neuron_worker(&[], "").await;
    let cpu = start().await;
    let mut c = cpu.client().await;
    // 1..=20 rows: exact buckets, padding (3 → 4, 5 → 16) and splitting (20 → 16 + 4).
    for (model, dim) in [("linear", 64), ("mlp", 256)] {
        for rows in [1, 2, 3, 4, 5, 16, 17, 20] {
            let a = infer(&mut n, model, dim, rows, rows).await.expect("neuron infer");
            let b = infer(&mut c, model, dim, rows, rows).await.expect("cpu infer");
            assert_eq!(a.len(), b.len(), "{model} rows {rows}");
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "{model} rows {rows}: neuron {x} vs cpu {y}");
            }
        }
    }
    let md = n
        .model_metadata(ModelMetadataRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("md")
        .into_inner();
    assert_eq!(md.platform, "neuron");
    let st = n
        .model_statistics(ModelStatisticsRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("stats")
        .into_inner();
    let sizes: Vec<u64> = st.model_stats[0].batch_stats.iter().map(|b| b.batch_size).collect();
    // 20 rows ran as 16 + 4: executed (real) batch sizes include both parts.
    assert!(sizes.contains(&16) && sizes.contains(&4), "{sizes:?}");
}

#[tokio::test]
async fn neuron_nonfatal_execute_error_fails_only_that_batch() {
    // NRT_EXEC_COMPLETED_WITH_ERR (1004) on the first execution only: the core stays in service.
    let (w, mut c) =
        start_neuron_worker(&[("NRT_STANDIN_FAIL_EXEC_STATUS", "1004"), ("NRT_STANDIN_FAIL_ONCE", "1")], "").await;
    let err = infer(&mut c, "linear", 64, 1, 0).await.expect_err("first execution fails");
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("NRT_EXEC_COMPLETED_WITH_ERR"), "{}", err.message());
    for i in 0..6 {
        infer(&mut c, "linear", 64, 2, i).await.expect("later requests succeed");
    }
    let cap = capacity(&w.metrics).await;
    let linear =
        cap["models"].as_array().and_then(|m| m.iter().find(|x| x["model"] == "linear")).cloned().unwrap_or_default();
    assert_eq!(linear["instances_in_service"], 2);
}

#[tokio::test]
async fn neuron_fatal_status_takes_the_core_out_and_the_model_keeps_serving() {
    // NRT_EXEC_HW_ERR_NC_UE (1202) on core 0 only: that core leaves service, core 1 serves on.
    let (w, mut c) = start_neuron_worker(
        &[("NRT_STANDIN_FAIL_EXEC_STATUS", "1202"), ("NRT_STANDIN_FAIL_CORE", "0"), ("NRT_STANDIN_FAIL_EVERY_N", "1")],
        "",
    )
    .await;
    let mut failures = Vec::new();
    let mut successes = 0;
    for i in 0..12 {
        match infer(&mut c, "linear", 64, 1, i).await {
            Ok(_) => successes += 1,
            Err(e) => failures.push(e),
        }
    }
    // Requests sent one at a time go to the first idle instance, core 0: its first execution fails
    // with the injected status, and core 0 leaves service. Nothing injected = this fails.
    assert_eq!(failures.len(), 1, "exactly the one batch core 0 ran fails: {failures:?}");
    assert!(
        failures.iter().all(|e| e.code() == Code::Internal && e.message().contains("NRT_EXEC_HW_ERR_NC_UE")),
        "{failures:?}"
    );
    assert_eq!(successes, 11);
    let cap = capacity(&w.metrics).await;
    let linear =
        cap["models"].as_array().and_then(|m| m.iter().find(|x| x["model"] == "linear")).cloned().unwrap_or_default();
    assert_eq!(linear["instances_in_service"], 1, "core 0 out of service: {cap}");
    assert_eq!(linear["ready"], true);
}

#[tokio::test]
async fn neuron_all_cores_lost_makes_the_model_unavailable() {
    let (_w, mut c) =
        start_neuron_worker(&[("NRT_STANDIN_FAIL_EXEC_STATUS", "5"), ("NRT_STANDIN_FAIL_EVERY_N", "1")], "").await;
    let mut codes = Vec::new();
    for i in 0..4 {
        codes.push(infer(&mut c, "linear", 64, 1, i).await.map(|_| ()).map_err(|e| e.code()));
    }
    assert_eq!(codes[0], Err(Code::Internal));
    assert_eq!(codes[3], Err(Code::Unavailable), "{codes:?}");
    let ready = c
        .model_ready(ModelReadyRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("ready rpc")
        .into_inner();
    assert!(!ready.ready);
    // The other model is untouched until it executes.
    let ready = c
        .model_ready(ModelReadyRequest { name: "mlp".into(), version: String::new() })
        .await
        .expect("ready rpc")
        .into_inner();
    assert!(ready.ready);
}

#[test]
fn neuron_backend_without_libnrt_exits_with_the_loader_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_neuron-worker"))
        .args(["serve", "--backend", "neuron", "--grpc-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"])
        .env("NEURON_WORKER_LIBNRT", "/nonexistent/libnrt.so.1")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/libnrt.so.1") && err.contains("/opt/aws/neuron/lib/libnrt.so.1"), "{err}");
}

#[test]
fn nrt_inspect_reads_the_real_fixture() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/neff/matmul_small.neff");
    let out = Command::new(env!("CARGO_BIN_EXE_neuron-worker"))
        .arg("inspect")
        .arg("--json")
        .arg(&fixture)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["inputs"][0]["name"], "x");
    assert_eq!(v["inputs"][0]["size_bytes"], 65536);
    assert_eq!(v["outputs"][0]["name"], "output0");
    assert_eq!(v["outputs"][0]["size_bytes"], 32768);
    assert!(v["outputs"][0]["dtype"].is_null());
    let bad = Command::new(env!("CARGO_BIN_EXE_neuron-worker"))
        .arg("inspect")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg("Cargo.toml")
        .output()
        .expect("runs");
    assert!(!bad.status.success());
}

#[tokio::test]
async fn neuron_warmup_runs_every_bucket_on_every_core_before_ready() {
    // model_warmup on a Neuron model: each bucket's NEFF (1, 4, 16) executes once on each of the 2
    // cores while the model loads. Each stand-in execution takes 100 ms, so the six are not free:
    // they show as 6 warm-up executions and no request execution the moment the model is ready.
    let dir = tempfile::tempdir().expect("temp dir");
    let warm = r#"model_warmup [ { name: "zeros" batch_size: 1 inputs { key: "INPUT0" value: { data_type: TYPE_FP32 dims: [ 64 ] zero_data: true } } } ]"#;
    neuron_worker::neff::testing::write_standin_model(dir.path(), "linear", &[1, 4, 16], warm).expect("write NEFFs");
    let lib = standin();
    let args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), dir.path().as_os_str()];
    let env: Vec<(&str, &OsStr)> = vec![
        ("NEURON_WORKER_LIBNRT", lib.as_os_str()),
        ("NRT_STANDIN_VISIBLE_CORES", "2".as_ref()),
        ("NRT_STANDIN_EXEC_DELAY_US", "100000".as_ref()),
    ];
    let (w, mut c) = spawn_worker(&args, &env).await;
    let ready = c
        .model_ready(ModelReadyRequest { name: "linear".into(), version: String::new() })
        .await
        .expect("ready rpc")
        .into_inner();
    assert!(ready.ready);
    let page = http_get(&w.metrics, "/metrics").await;
    assert!(page.contains("neuron_worker_warmup_executions{model=\"linear\",version=\"1\"} 6"), "{page}");
    assert!(page.contains("neuron_worker_inference_exec_count{model=\"linear\",version=\"1\"} 0"), "{page}");
    let y = infer(&mut c, "linear", 64, 3, 1).await.expect("served after warm-up");
    assert_eq!(y.len(), 3 * 16);
}

#[tokio::test]
async fn neuron_seq_buckets_run_one_neff_per_batch_and_sequence_bucket() {
    // A per-token linear model with batch buckets 1, 4 and sequence buckets 8, 16: six NEFFs. Requests
    // of 1..=16 positions, alone and three at once, are padded to their (batch, sequence) bucket and
    // cropped back; every position equals the linear reference. 17 positions is refused.
    let dir = tempfile::tempdir().expect("temp dir");
    neuron_worker::neff::testing::write_standin_seq_model(dir.path(), "tokens", &[1, 4], &[8, 16]).expect("NEFFs");
    let lib = standin();
    let args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), dir.path().as_os_str()];
    let env: Vec<(&str, &OsStr)> =
        vec![("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "2".as_ref())];
    let (_w, c) = spawn_worker(&args, &env).await;
    let x = |len: usize, tag: usize| -> Vec<f32> {
        (0..len * 64).map(|i| (((tag * 31 + i * 7) % 19) as f32) / 9.0 - 1.0).collect()
    };
    let run = |len: usize, tag: usize| {
        let mut c = c.clone();
        let data = x(len, tag);
        async move {
            let r = c.model_infer(fp32_request("tokens", "INPUT0", vec![1, len as i64, 64], &data)).await?;
            let r = r.into_inner();
            Ok::<_, tonic::Status>((r.outputs[0].shape.clone(), bytes_f32(&r.raw_output_contents[0])))
        }
    };
    let check = |len: usize, tag: usize, got: &(Vec<i64>, Vec<f32>)| {
        assert_eq!(got.0, vec![1, len as i64, 16], "len {len}");
        let want = linear_reference(&x(len, tag));
        for (a, b) in got.1.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "len {len}: {a} vs {b}");
        }
    };
    for len in [1, 7, 8, 9, 16] {
        check(len, len, &run(len, len).await.expect("alone"));
    }
    let (a, b, d) = tokio::join!(run(3, 1), run(12, 2), run(16, 3));
    check(3, 1, &a.expect("a"));
    check(12, 2, &b.expect("b"));
    check(16, 3, &d.expect("d"));
    let e = run(17, 0).await.expect_err("longer than the largest sequence bucket");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
}

#[tokio::test]
async fn neuron_seq_buckets_with_a_pattern_without_seq_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    neuron_worker::neff::testing::write_standin_seq_model(dir.path(), "tokens", &[1], &[8]).expect("NEFFs");
    // A model that loads, so the worker becomes ready.
    neuron_worker::neff::testing::write_standin_model(dir.path(), "linear", &[1], "").expect("NEFFs");
    let cfg = dir.path().join("tokens/config.pbtxt");
    let text = std::fs::read_to_string(&cfg).expect("read")
        + r#"parameters { key: "neuron_neff_pattern" value: { string_value: "model_b{batch}.neff" } }"#;
    std::fs::write(&cfg, text).expect("write");
    let lib = standin();
    let args: Vec<&OsStr> =
        vec!["--backend".as_ref(), "neuron".as_ref(), "--model-repository".as_ref(), dir.path().as_os_str()];
    let env: Vec<(&str, &OsStr)> =
        vec![("NEURON_WORKER_LIBNRT", lib.as_os_str()), ("NRT_STANDIN_VISIBLE_CORES", "1".as_ref())];
    let (_w, mut c) = spawn_worker(&args, &env).await;
    let idx = c.repository_index(RepositoryIndexRequest::default()).await.expect("index").into_inner();
    let m = idx.models.iter().find(|m| m.name == "tokens").expect("listed");
    assert_eq!(m.state, "UNAVAILABLE");
    assert!(m.reason.contains("{seq}") && m.reason.contains("neuron_seq_buckets"), "{}", m.reason);
}
