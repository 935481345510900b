//! `neuron-worker bench` against an in-process worker: the JSON, CSV and SVG it writes, and the
//! messages it gives for a wrong model or an address where nothing listens.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)] // test and benchmark code may panic on setup failures

use std::process::{Command, Output};
use std::sync::Arc;

use neuron_worker::repository::{BackendSelection, ModelControlMode, Repository};
use neuron_worker::server::{self, RunningServer, ServeOptions};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn start_worker() -> Result<RunningServer, Box<dyn std::error::Error>> {
    let repo = Arc::new(Repository::new(None, BackendSelection::Cpu, ModelControlMode::None));
    repo.load_all().await?;
    let opts = ServeOptions::loopback("test");
    Ok(server::start(opts, repo).await?)
}

/// Runs the binary off the async runtime (the worker keeps serving on it meanwhile).
async fn bench(args: Vec<String>) -> Result<Output, Box<dyn std::error::Error>> {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_neuron-worker"))
            .arg("bench")
            .args(args)
            .env_remove("NEURON_WORKER_AUTH_TOKEN")
            .output()
    })
    .await??;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_json_csv_and_svg() -> TestResult {
    let worker = start_worker().await?;
    let dir = tempfile::tempdir()?;
    let (json, csv, svg) = (dir.path().join("r.json"), dir.path().join("r.csv"), dir.path().join("r.svg"));
    let mut args: Vec<String> = ["--url", &worker.grpc_addr.to_string(), "--model", "linear", "--concurrency", "1,4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--duration", "500ms", "--warmup", "100ms"].map(String::from));
    for (flag, path) in [("--json", &json), ("--csv", &csv), ("--plot", &svg)] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    let out = bench(args).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("concurrency") && stdout.contains("infer/s"), "{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report["model"], "linear");
    assert_eq!(report["batch_size"], 1);
    assert_eq!(report["duration_s"], 0.5);
    let points = report["points"].as_array().ok_or("points is not an array")?;
    assert_eq!(points.len(), 2);
    for (p, concurrency) in points.iter().zip([1, 4]) {
        assert_eq!(p["concurrency"], concurrency);
        let throughput = p["throughput"].as_f64().ok_or("throughput")?;
        assert!(throughput > 0.0, "{p}");
        assert_eq!(p["rows_per_s"].as_f64(), Some(throughput));
        let (p50, p99, max) = (p["p50_us"].as_u64(), p["p99_us"].as_u64(), p["max_us"].as_u64());
        assert!(p50 > Some(0) && p50 <= p99 && p99 <= max, "{p}");
        assert_eq!(p["errors"], serde_json::json!({}), "{p}");
        let avg_batch = p["avg_batch"].as_f64().ok_or("avg_batch missing")?;
        assert!(avg_batch >= 1.0, "{p}");
        assert!(p["server_compute_us"].as_f64().ok_or("server_compute_us missing")? > 0.0, "{p}");
        assert!(p["server_queue_us"].as_f64().is_some(), "{p}");
    }

    let csv = std::fs::read_to_string(&csv)?;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(lines[0].starts_with("concurrency,throughput,rows_per_s,p50_us"), "{csv}");
    assert!(lines[1].starts_with("1,") && lines[2].starts_with("4,"), "{csv}");

    assert!(std::fs::read_to_string(&svg)?.starts_with("<svg"));
    worker.shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_lists_the_served_ones() -> TestResult {
    let worker = start_worker().await?;
    let out = bench(
        ["--url", &worker.grpc_addr.to_string(), "--model", "nope", "--duration", "100ms"].map(String::from).to_vec(),
    )
    .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("has no model 'nope'"), "{stderr}");
    assert!(stderr.contains("linear (READY)") && stderr.contains("mlp (READY)"), "{stderr}");
    worker.shutdown.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_suggests_serve() -> TestResult {
    // Bind then drop a listener to get a port nothing listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = bench(["--url", &addr.to_string(), "--model", "linear"].map(String::from).to_vec()).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("cannot connect to the worker at {addr}")), "{stderr}");
    assert!(stderr.contains("neuron-worker serve"), "{stderr}");
    Ok(())
}
